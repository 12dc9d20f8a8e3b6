"""The published CoDe-MAE layout: codemae holds its tensors exactly, and each lands where it acts.

The manifests in ../shared/reference list every name and shape of the authors' models; the
reference forward below is written from the published layout, independently of codemae's code.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import codemae
from codemae.batch import make_batch
from codemae.cli import main
from codemae.config import Config, from_dict, to_dict
from codemae.errors import ConfigError, DataError
from codemae.loading import load_method
from codemae.methods import build_method
from codemae.models.build import build_backbone
from codemae.official import (classifier_names, convert_checkpoint, from_published, infer_config, init_encoder,
                              load_classifier, read_published, to_published)

from conftest import tiny_config

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"


def manifest(name: str) -> dict[str, tuple[int, ...]]:
    path = REFERENCE / name
    if not path.is_file():
        pytest.skip(f"{path} is absent (the published layout manifests live in ../shared/reference)")
    rows = [line.split("\t") for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return {name: tuple(int(d) for d in shape.split(",")) for name, shape in rows}


def random_published(shapes: dict[str, tuple[int, ...]], method) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    weights = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    weights["decoder_pos_embed"] = to_published(method)["decoder_pos_embed"]  # fixed in the published model too
    return weights


def test_codemae_holds_the_published_pretraining_layout_exactly():
    """A state dict with exactly the manifest's 646 names and shapes loads strictly into codemae's
    HiViT-B + iTPN + decoders + OKD/CCL/CDR, and comes back out tensor for tensor."""
    shapes = manifest("codemae_official_pretrain_keys.tsv")
    assert len(shapes) == 646
    raw = infer_config({k: torch.empty(s) for k, s in shapes.items()}, "manifest")
    assert raw["model"]["backbone"] == "hivit_base" and raw["method"]["cdr_target"] == "gray"
    cfg = from_dict(Config, raw)
    torch.manual_seed(0)
    method = build_method(cfg)
    published = random_published(shapes, method)
    method.load_state_dict(from_published(published, method, "manifest"), strict=True)
    back = to_published(method)
    assert list(back) != [] and set(back) == set(shapes)
    assert all(torch.equal(back[k], published[k]) for k in shapes)
    ours = sum(p.numel() for p in method.state_dict().values())
    theirs = sum(math.prod(s) for k, s in shapes.items() if k != "decoder_pos_embed")
    assert ours == theirs == 142262432 - 100352  # every tensor but the fixed decoder position table

    with pytest.raises(DataError, match="no place"):
        from_published({**published, "contrastive_loss.extra.weight": torch.zeros(1)}, method, "f")
    with pytest.raises(DataError, match="missing: lm_head.weight"):
        from_published({k: v for k, v in published.items() if k != "lm_head.weight"}, method, "f")


def test_encoder_holds_the_published_classifier_backbone():
    """The fine-tuning model's backbone tensors (all but fc_norm and head) are exactly the encoder's
    embedding and block tensors, under the same mapping."""
    shapes = manifest("codemae_official_finetune_keys.tsv")
    encoder_keys = {k: s for k, s in shapes.items() if not k.startswith(("fc_norm", "head"))}
    pretrain = manifest("codemae_official_pretrain_keys.tsv")
    cfg = from_dict(Config, infer_config({k: torch.empty(s) for k, s in pretrain.items()}, "manifest"))
    with torch.device("meta"):
        method = build_method(cfg)
    names = {theirs: ours for ours, theirs in published_encoder_names(method).items()}
    assert set(encoder_keys) <= set(names)
    state = method.state_dict()
    assert all(tuple(state[names[k]].shape) == s for k, s in encoder_keys.items())


def published_encoder_names(method) -> dict[str, str]:
    from codemae.official import published_names

    return {k: v for k, v in published_names(method).items() if k.startswith("encoder.")}


# ---- a reference forward, written from the published layout -------------------------------------------------


def ln(x, P, name, eps=1e-6):
    return F.layer_norm(x, x.shape[-1:], P[f"{name}.weight"], P[f"{name}.bias"], eps)


def linear(x, P, name):
    return F.linear(x, P[f"{name}.weight"], P.get(f"{name}.bias"))


def mlp_block(x, P, name):
    h = linear(F.gelu(linear(ln(x, P, f"{name}.norm2"), P, f"{name}.mlp.fc1")), P, f"{name}.mlp.fc2")
    return x + h


def attention_block(x, P, name, heads):
    b, n, d = x.shape
    qkv = linear(ln(x, P, f"{name}.norm1"), P, f"{name}.attn.qkv").reshape(b, n, 3, heads, d // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    attn = ((q * (d // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
    x = x + linear((attn @ v).transpose(1, 2).reshape(b, n, d), P, f"{name}.attn.proj")
    return mlp_block(x, P, name)


def merge(x, P, name):
    x = torch.cat([x[..., 0::2, 0::2, :], x[..., 1::2, 0::2, :], x[..., 0::2, 1::2, :], x[..., 1::2, 1::2, :]], -1)
    return linear(ln(x, P, f"{name}.norm"), P, f"{name}.reduction")


def split(x, P, name):
    b, n, h, w, _ = x.shape
    y = linear(ln(x, P, f"{name}.norm"), P, f"{name}.reduction")
    return y.reshape(b, n, h, w, 2, 2, -1).permute(0, 1, 2, 4, 3, 5, 6).reshape(b, n, 2 * h, 2 * w, -1)


def reference_encoder(P, image, side, ids_keep, heads, depths, resample=True):
    """Published HiViT on one modality, masked by ``ids_keep``: final tokens and the two stage features."""
    y = F.conv2d(image, P[f"patch_embed_{side}.proj.weight"], P[f"patch_embed_{side}.proj.bias"], stride=4)
    b, c, hh, ww = y.shape
    y = y.view(b, c, hh // 4, 4, ww // 4, 4).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, 4, 4, c)
    x = ln(y, P, f"patch_embed_{side}.norm")
    x = torch.gather(x, 1, ids_keep[:, :, None, None, None].expand(-1, -1, 4, 4, c))
    d1, d2, depth = depths
    features = []
    for i in range(d1 + d2 + 2):
        if i in (d1, d1 + d2 + 1):
            features.append(x)
            x = merge(x, P, f"blocks.{i}")
        else:
            x = mlp_block(x, P, f"blocks.{i}")
    x = x[..., 0, 0, :]
    pe = table = P["absolute_pos_embed"]
    grid = math.isqrt(table.shape[1])
    if resample:  # the published masked forward
        pe = F.interpolate(table.reshape(1, grid, grid, -1).permute(0, 3, 1, 2), scale_factor=((grid + 0.1) / grid,) * 2,
                           mode="bicubic").permute(0, 2, 3, 1).reshape(1, grid * grid, -1)
    x = x + torch.gather(pe.expand(b, -1, -1), 1, ids_keep[:, :, None].expand(-1, -1, x.shape[-1]))
    for i in range(d1 + d2 + 2, d1 + d2 + 2 + depth):
        x = attention_block(x, P, f"blocks.{i}", heads)
    return x, features


def reference_forward(P, image, side, ids_keep, heads, depths):
    """Published encoder + pyramid + decoder embedding on one modality, masked by ``ids_keep``."""
    x, features = reference_encoder(P, image, side, ids_keep, heads, depths)
    b = x.shape[0]
    top = x[:, :, None, None, :]
    o16 = linear(top, P, "align_dim_16tofpn")
    x8 = mlp_block(split(top, P, "split_16to8") + linear(features[1], P, "align_dim_16to8"), P, "block_16to8.0")
    x4 = mlp_block(split(x8, P, "split_8to4") + linear(features[0], P, "align_dim_8to4"), P, "block_8to4.0")
    levels = [mlp_block(o, P, f"fpn_modules.{k}") for k, o in enumerate((o16, x8, x4))]
    embedded = sum(linear(ln(lv, P, f"decoder_embed.{k}.0"), P, f"decoder_embed.{k}.1").reshape(b, lv.shape[1], -1)
                   for k, lv in enumerate(levels))
    return x, levels, embedded


def test_mapped_tensors_act_where_the_published_model_uses_them(tmp_path):
    """codemae's masked encoder, pyramid and decoder embedding on a tiny published-layout model match the
    reference forward computed from the published names: a tensor mapped to the wrong place fails."""
    cfg = tiny_config(tmp_path, model={"backbone": "hivit_tiny", "embed_dim": 64, "depth": 2, "num_heads": 2,
                                       "img_size": 64, "sar_channels": 3, "pos_interp": "published"},
                      method={"name": "codemae", "okd": True, "teacher": {"dim": 24}, "ccl": "cross_attention",
                              "cdr": True, "cdr_direction": "both", "decoder_dim": 32, "decoder_heads": 2})
    torch.manual_seed(0)
    method = build_method(cfg).eval()
    with torch.no_grad():
        for p in method.parameters():  # LayerNorms away from 1/0 too, so a swapped norm shows
            p.add_(0.05 * torch.randn_like(p))
    P = to_published(method)
    images = {"opt": torch.randn(2, 3, 64, 64), "sar": torch.randn(2, 3, 64, 64)}
    ids_keep = torch.stack([torch.randperm(16)[:4] for _ in range(2)])
    with torch.no_grad():
        out = method.encoder(images, {"opt": ids_keep, "sar": ids_keep})
        for m, side in (("opt", "rgb"), ("sar", "sar")):
            tokens, levels, embedded = reference_forward(P, images[m], side, ids_keep, 2, (1, 1, 2))
            torch.testing.assert_close(out[m].tokens, tokens, rtol=1e-4, atol=1e-5)
            for ours, theirs in zip(out[m].levels, levels):
                torch.testing.assert_close(ours, theirs.flatten(2), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(method.decoder_embed["shared"](out[m].levels), embedded, rtol=1e-4, atol=1e-5)


def test_published_position_resampling_changes_the_table_only_when_asked(tmp_path):
    cfg = tiny_config(tmp_path, model={"img_size": 64, "pos_interp": "published"})
    encoder = build_backbone(cfg.model)
    table = encoder.pos_embed
    keep_all = torch.arange(16)[None]
    assert torch.equal(encoder.pos_for(16, None, 1), table)  # unmasked at the stored size: the table itself
    resampled = encoder.pos_for(16, keep_all, 1)
    assert 0 < (resampled - table).abs().max() < 0.2
    exact = build_backbone(tiny_config(tmp_path, model={"img_size": 64}).model)
    assert torch.equal(exact.pos_for(16, keep_all, 1), exact.pos_embed)


# ---- files: published checkpoints, conversion, the ImageNet initialisation ---------------------------------


def tiny_published_method(tmp_path, **method):
    """A codemae model in the published layout small enough for tests (hivit_tiny at 32 px: 2x2 patches)."""
    cfg = tiny_config(tmp_path, model={"backbone": "hivit_tiny", "img_size": 32, "sar_channels": 3,
                                       "pos_interp": "published"},
                      method={"name": "codemae", "okd": True, "teacher": {"dim": 24}, "ccl": "cross_attention",
                              "cdr": True, "cdr_direction": "both", **method})
    torch.manual_seed(1)
    return build_method(cfg)


def save_published(path: Path, weights: dict, **args) -> Path:
    torch.save({"model": weights, "optimizer": {}, "epoch": 799, "scaler": {},
                "args": argparse.Namespace(target="pixel", reduction="channel", epochs=800, **args)}, path)
    return path


def test_convert_a_published_checkpoint_and_evaluate_it(tmp_path):
    """``codemae convert --from codemae-official``: the file (with its argparse settings, read weights-only)
    becomes a checkpoint that loads strictly and gives the published model's outputs; the evaluation
    commands run on it."""
    method = tiny_published_method(tmp_path).eval()
    published = save_published(tmp_path / "checkpoint-800.pth", to_published(method), decoder_num_heads=2)
    out = tmp_path / "converted" / "codemae.pt"
    convert = ["convert", "--from", "codemae-official", "--checkpoint", str(published), "--out", str(out)]
    assert main(convert) == 2  # a width of no preset: the head count must be given
    assert main([*convert, "model.num_heads=2"]) == 0
    converted = load_method(out)
    assert converted.cfg.cdr_target == "gray" and converted.encoder.pos_interp == "published"
    x = {"opt": torch.randn(2, 3, 32, 32), "sar": torch.randn(2, 3, 32, 32)}
    assert torch.equal(converted.encode(x)["opt"], method.encode(x)["opt"])
    torch.manual_seed(5)
    loss = converted(make_batch(**x, opt_mean=torch.zeros(2, 3), opt_std=torch.ones(2, 3),
                                teacher_opt=torch.randn(2, 4, 24)))
    assert set(loss) == {"recon", "okd", "ccl", "cdr"} and all(torch.isfinite(v) for v in loss.values())
    report = tmp_path / "probe.json"
    assert main(["probe", "--checkpoint", str(out), "--data", "synthetic", "--modality", "sar", "--synthetic-n", "40",
                 "--synthetic-size", "32", "--shots", "0", "--epochs", "2", "--seeds", "1", "--out", str(report)]) == 0
    assert main(["retrieval", "--checkpoint", str(out), "--pairs", "synthetic", "--synthetic-n", "20"]) == 0


class Payload:
    """An arbitrary class: unpickling it would import and run code."""


def test_published_files_refuse_code_and_unknown_keys(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"model": {}, "args": Payload()}, bad)
    with pytest.raises(DataError, match="weights only"):
        read_published(bad)
    method = tiny_published_method(tmp_path)
    stray = save_published(tmp_path / "stray.pth", to_published(method) | {"mystery.weight": torch.zeros(2)})
    with pytest.raises(DataError, match="mystery.weight"):
        convert_checkpoint(stray, tmp_path / "out.pt", ["model.num_heads=2"])
    good = save_published(tmp_path / "good.pth", to_published(method))
    with pytest.raises(DataError, match="do not fit the config"):  # a 256-wide CDR head is no HOG head
        convert_checkpoint(good, tmp_path / "out.pt", ["model.num_heads=2", "method.cdr_target=hog"])


def imagenet_file(tmp_path, encoder_source) -> Path:
    """An iTPN ImageNet-style file: one patch embedding, fpn_depth 2, decoder and mask keys (as released)."""
    names = to_published(encoder_source)
    weights = {k.replace("patch_embed_rgb", "patch_embed"): v for k, v in names.items()
               if not k.startswith(("patch_embed_sar", "contrastive", "lm_", "norm", "cls_pt", "decoder_blocks_cross",
                                    "decoder_norm_cross", "decoder_pred_cross", "mask_token_cross"))}
    weights["block_16to8.1.norm2.weight"] = torch.ones(3)
    path = tmp_path / "itpn_tiny_fpn.pth"
    torch.save(weights, path)
    return path


def test_itpn_imagenet_initialisation(tmp_path):
    """``model.init: itpn-imagenet:<file>`` fills every encoder tensor; the RGB patch embedding serves both
    modalities (summed over channels for 1-channel SAR); unknown keys and absent tensors are errors."""
    source = tiny_published_method(tmp_path)
    path = imagenet_file(tmp_path, source)
    cfg = tiny_config(tmp_path, model={"backbone": "hivit_tiny", "img_size": 32, "sar_channels": 1,
                                       "init": f"itpn-imagenet:{path}"})
    torch.manual_seed(9)
    target = build_method(cfg).encoder
    init_encoder(target, cfg.model.init)
    ours, theirs = target.state_dict(), source.encoder.state_dict()
    rgb = theirs["patch_embed.opt.proj.weight"]
    assert torch.equal(ours["patch_embed.opt.proj.weight"], rgb)
    torch.testing.assert_close(ours["patch_embed.sar.proj.weight"], rgb.sum(1, keepdim=True))
    from_rgb = lambda k: k.replace("patch_embed.sar.", "patch_embed.opt.")  # noqa: E731
    assert all(torch.equal(ours[k], theirs[from_rgb(k)]) for k in ours if k != "patch_embed.sar.proj.weight")
    weights = torch.load(path, weights_only=True)
    for stray in ("unexpected.weight", "patch_embed.extra.weight"):
        torch.save(weights | {stray: torch.zeros(1)}, tmp_path / "stray.pth")
        with pytest.raises(DataError, match=stray):
            init_encoder(target, f"itpn-imagenet:{tmp_path / 'stray.pth'}")
    torch.save({k: v for k, v in weights.items() if not k.startswith("fpn_modules")}, tmp_path / "short.pth")
    with pytest.raises(DataError, match="gives no pyramid.outputs"):
        init_encoder(target, f"itpn-imagenet:{tmp_path / 'short.pth'}")
    with pytest.raises(ConfigError, match="model.init"):
        init_encoder(target, "imagenet:x")


def test_pretraining_starts_from_the_imagenet_weights(tmp_path):
    from codemae.train.engine import pretrain

    source = tiny_published_method(tmp_path)
    path = imagenet_file(tmp_path, source)
    cfg = tiny_config(tmp_path / "run", model={"backbone": "hivit_tiny", "img_size": 32, "sar_channels": 3,
                                               "init": f"itpn-imagenet:{path}"},
                      train={"max_steps": 1, "base_lr": 1e-12})
    pretrain(cfg)
    trained = load_method(tmp_path / "run" / "checkpoints" / "last.pt").encoder.state_dict()
    expected = source.encoder.state_dict()
    torch.testing.assert_close(trained["blocks.0.attn.qkv.weight"], expected["blocks.0.attn.qkv.weight"],
                               rtol=0, atol=1e-6)


def test_checkpoints_of_the_earlier_hivit_layout_are_refused_with_the_reason(tmp_path):
    method = build_method(tiny_config(tmp_path))
    path = tmp_path / "old.pt"
    torch.save({"model": method.state_dict(), "config": to_dict(tiny_config(tmp_path))}, path)  # no "layout"
    with pytest.raises(DataError, match="published HiViT/iTPN layout .* cannot be converted"):
        load_method(path)


def test_convert_a_published_classifier_and_score_it(tmp_path):
    """``--from codemae-official-classifier``: a SAR fine-tuned model (patch_embed_sar only, no pyramid,
    fc_norm, BatchNorm without affine, head) converts; its logits equal the published forward written
    here; ``codemae classify`` scores it on class folders."""
    cfg = tiny_config(tmp_path, model={"img_size": 32, "sar_channels": 3, "pyramid": False, "pos_interp": "published"})
    from codemae.official import PublishedClassifier

    torch.manual_seed(3)
    source = PublishedClassifier(cfg, ("sar",), 4, batch_norm=True).eval()
    with torch.no_grad():
        source.batch_norm.running_mean.normal_()
        source.batch_norm.running_var.uniform_(0.5, 2.0)
    names = classifier_names(source)
    P = {names[k]: v for k, v in source.state_dict().items() if not k.startswith("encoder.patch_embed.opt.")}
    assert "head.0.running_var" in P and "head.1.weight" in P and "patch_embed_rgb.proj.weight" not in P
    path = tmp_path / "checkpoint-best.pth"
    torch.save({"model": P, "args": argparse.Namespace(nb_classes=4)}, path)
    out = tmp_path / "classifier"
    assert main(["convert", "--from", "codemae-official-classifier", "--checkpoint", str(path), "--out", str(out),
                 "model.num_heads=2"]) == 0
    model = load_classifier(out)
    x = torch.randn(3, 3, 32, 32)
    tokens, _ = reference_encoder(P, x, "sar", torch.arange(4).expand(3, -1), 2, (1, 1, 2), resample=False)
    pooled = F.layer_norm(tokens.mean(1), (32,), P["fc_norm.weight"], P["fc_norm.bias"], 1e-6)
    pooled = (pooled - P["head.0.running_mean"]) / torch.sqrt(P["head.0.running_var"] + 1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model({"sar": x}), F.linear(pooled, P["head.1.weight"], P["head.1.bias"]),
                                   rtol=1e-4, atol=1e-5)
    from PIL import Image
    for c in range(4):
        (tmp_path / "data" / str(c)).mkdir(parents=True)
        for i in range(2):
            Image.fromarray((torch.rand(40, 40) * 255).byte().numpy()).save(tmp_path / "data" / str(c) / f"{i}.png")
    report = tmp_path / "classify.json"
    assert main(["classify", "--classifier", str(out), "--data", str(tmp_path / "data"), "--modality", "sar",
                 "--out", str(report)]) == 0
    assert '"samples": 8' in report.read_text()


def test_imagenet_weights_as_an_evaluable_encoder(tmp_path):
    """``--from itpn-imagenet`` writes an export folder that every evaluation command takes as --checkpoint."""
    source = tiny_published_method(tmp_path)
    path = imagenet_file(tmp_path, source)
    out = tmp_path / "imagenet_encoder"
    assert main(["convert", "--from", "itpn-imagenet", "--checkpoint", str(path), "--out", str(out),
                 "model.num_heads=2", "model.sar_channels=1"]) == 0
    assert main(["retrieval", "--checkpoint", str(out), "--pairs", "synthetic", "--synthetic-n", "20"]) == 0
    report = tmp_path / "report"
    assert main(["analyze", "--checkpoint", str(out), "--pairs", "synthetic", "--pairs-n", "20", "--out", str(report)]) == 0
    assert not list(report.glob("reconstructions_*.png"))  # an export's decoders were never trained: none shown
    encoder = codemae.load_encoder(str(out)).encoder
    assert torch.equal(encoder.state_dict()["blocks.1.attn.qkv.weight"], source.encoder.state_dict()["blocks.1.attn.qkv.weight"])
