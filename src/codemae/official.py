"""The published weights: the CoDe-MAE authors' checkpoints and the ImageNet-1K iTPN initialisation.

codemae's HiViT + iTPN, decoders and CoDe-MAE heads hold exactly the tensors of the published
models (GitHub scenarri/CoDeMAE, sunsmarterjie/iTPN) under codemae's own names. This module maps
the names both ways, one tensor to one tensor:

- :func:`published_names` lists, for a method in the published layout, each codemae name with its
  published name; :func:`to_published` and :func:`from_published` rename a state dict, refusing
  any key they cannot place (naming it).
- :func:`convert_checkpoint` turns a published pretraining checkpoint into a codemae checkpoint
  (config inferred from the keys, overridable) that loads strictly and runs every protocol.
- :func:`init_from_itpn_imagenet` fills an encoder from the ImageNet-1K iTPN file (``model.init``),
  as the authors' ``load_INP`` does: the one RGB patch embedding into both modalities (summed over
  input channels for a 1-channel SAR embedding), decoder and mask-token keys left out.

Published checkpoint files hold ``{'model', 'optimizer', 'epoch', 'scaler', 'args'}`` where
``args`` is an ``argparse.Namespace``: they are read with ``weights_only=True`` and that one class
allowed, never by unrestricted unpickling.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from codemae import __version__
from codemae.checkpoint import LAYOUT, load_checkpoint, save_atomic
from codemae.config import Config, apply_override, from_dict, to_dict, validate
from codemae.errors import ConfigError, DataError, one_line
from codemae.loading import load_method
from codemae.methods import PretrainMethod, build_method
from codemae.models.backbone import Encoder
from codemae.models.build import build_backbone
from codemae.models.hivit import HIVIT_SIZES, HiViT
from codemae.models.pos_embed import sincos_2d

log = logging.getLogger("codemae")

CCL_SIDES = {"opt": "rgb", "sar": "sar"}
PATCH_SIDES = {"opt": "patch_embed_rgb", "sar": "patch_embed_sar"}
# what load_INP leaves out of the ImageNet file: decoders and mask tokens (it skips them), and the
# second MLP block of each top-down merge (iTPN's fpn_depth 2; CoDe-MAE publishes fpn_depth 1)
IMAGENET_UNUSED = re.compile(r"^(mask|decoder)|^block_(16to8|8to4)\.[1-9]\d*\.")


def encoder_prefixes(encoder: HiViT, prefix: str = "encoder.") -> list[tuple[str, str]]:
    """(codemae prefix, published prefix) pairs of a HiViT + iTPN encoder."""
    d1, d2 = encoder.mlp_depths
    pairs = [(f"{prefix}patch_embed.{m}.", f"{PATCH_SIDES[m]}.") for m in encoder.channels]
    pairs.append((f"{prefix}pos_embed", "absolute_pos_embed"))
    pairs += [(f"{prefix}stage1.{i}.", f"blocks.{i}.") for i in range(d1)]
    pairs.append((f"{prefix}merge1.", f"blocks.{d1}."))
    pairs += [(f"{prefix}stage2.{i}.", f"blocks.{d1 + 1 + i}.") for i in range(d2)]
    pairs.append((f"{prefix}merge2.", f"blocks.{d1 + d2 + 1}."))
    pairs += [(f"{prefix}blocks.{i}.", f"blocks.{d1 + d2 + 2 + i}.") for i in range(len(encoder.blocks))]
    pyramid = {"align16": "align_dim_16tofpn", "align8": "align_dim_16to8", "split16to8": "split_16to8",
               "block8": "block_16to8.0", "align4": "align_dim_8to4", "split8to4": "split_8to4", "block4": "block_8to4.0"}
    pairs += [(f"{prefix}pyramid.{ours}.", f"{theirs}.") for ours, theirs in pyramid.items()]
    pairs += [(f"{prefix}pyramid.outputs.{k}.", f"fpn_modules.{k}.") for k in range(3)]
    return pairs


def method_prefixes(method: PretrainMethod) -> list[tuple[str, str]]:
    """(codemae prefix, published prefix) pairs of a CoDe-MAE / joint-MAE method in the published layout."""
    if not isinstance(method.encoder, HiViT) or "shared" not in getattr(method, "decoders", {}):
        raise DataError("the published layout is a shared HiViT + iTPN encoder with a shared decoder "
                        "(model.backbone hivit_*, method.encoder and method.decoder shared)")
    pairs = encoder_prefixes(method.encoder)
    pairs += [(f"decoder_embed.shared.proj.{k}.", f"decoder_embed.{k}.") for k in range(3)]
    decoders = {"decoders.shared": ("mask_token", "decoder_blocks", "decoder_norm", "decoder_pred"),
                "cdr_decoder": ("mask_token_cross", "decoder_blocks_cross", "decoder_norm_cross", "decoder_pred_cross")}
    for ours, (token, blocks, norm, pred) in decoders.items():
        if hasattr(method, ours.split(".")[0]):
            decoder = method.get_submodule(ours)
            if len(decoder.heads) != 1:
                raise DataError(f"the published {ours} has one prediction head; this config gives it "
                                f"{len(decoder.heads)} ({sorted(decoder.heads)} values per patch)")
            pairs += [(f"{ours}.mask_token", token), (f"{ours}.blocks.", f"{blocks}."), (f"{ours}.norm.", f"{norm}."),
                      (f"{ours}.heads.{next(iter(decoder.heads))}.", f"{pred}.")]
    pairs += [("okd_main.0.", "norm."), ("okd_main.1.", "lm_head."), ("okd_aux.0.", "cls_pt_layers.0."),
              ("okd_aux.1.", "cls_pt_layers.1."), ("okd_aux.2.", "norm_cls."), ("okd_aux.3.", "lm_cls_head.")]
    for m, side in CCL_SIDES.items():
        base = f"contrastive_loss.crossattn_{side}.cattn."
        pairs += [(f"ccl_heads.{m}.norm_q.", f"{base}n_q."), (f"ccl_heads.{m}.norm_kv.", f"{base}n_kv."),
                  (f"ccl_heads.{m}.attn.", base)]
    return pairs


def rename(key: str, pairs: list[tuple[str, str]]) -> str | None:
    """``key`` with its longest matching prefix replaced, or None."""
    best = max((p for p in pairs if key.startswith(p[0])), key=lambda p: len(p[0]), default=None)
    return None if best is None else best[1] + key[len(best[0]):]


def published_names(method: PretrainMethod) -> dict[str, str]:
    """codemae name -> published name for every tensor of ``method``'s state dict (a bijection)."""
    pairs = method_prefixes(method)
    names = {}
    for key in method.state_dict():
        theirs = rename(key, pairs)
        if theirs is None:
            raise DataError(f"codemae tensor {key} has no place in the published layout")
        names[key] = theirs
    if len(set(names.values())) != len(names):
        raise DataError("two codemae tensors map to one published name")  # a bug in the tables above
    return names


def decoder_pos_table(method: PretrainMethod) -> Tensor:
    """The published ``decoder_pos_embed``: the fixed sin-cos table codemae's decoders compute."""
    return sincos_2d(method.cfg.decoder_dim, method.encoder.grid).unsqueeze(0)


def to_published(method: PretrainMethod) -> dict[str, Tensor]:
    """``method``'s weights under the published names (plus the fixed ``decoder_pos_embed``)."""
    names = published_names(method)
    out = {names[k]: v for k, v in method.state_dict().items()}
    return {"decoder_pos_embed": decoder_pos_table(method)} | out


def from_published(weights: dict[str, Tensor], method: PretrainMethod, where: str) -> dict[str, Tensor]:
    """A published state dict renamed for ``method``; every key must have a place and every
    tensor of ``method`` must be given, else a :class:`DataError` names the key."""
    ours = {theirs: key for key, theirs in published_names(method).items()}
    out: dict[str, Tensor] = {}
    for key, value in weights.items():
        if key == "decoder_pos_embed":
            table = decoder_pos_table(method)
            if value.shape != table.shape or not torch.allclose(value.float(), table, atol=1e-5):
                raise DataError(f"{where}: decoder_pos_embed is not the fixed sin-cos table codemae's decoder uses")
            continue
        if key not in ours:
            raise DataError(f"{where}: published tensor {key} has no place in the codemae model of this config")
        out[ours[key]] = value
    missing = sorted(set(ours) - set(weights))
    if missing:
        raise DataError(f"{where}: published tensors missing: {', '.join(missing[:5])}"
                        + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    return out


def read_published(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    """A published checkpoint file's state dict (its ``model`` entry, or the file itself when flat,
    ``module.`` prefixes removed) and its ``args`` as a dict (empty when absent)."""
    raw = load_checkpoint(path, allowed=[argparse.Namespace])
    weights = raw.get("model", raw.get("state_dict", raw))
    if not isinstance(weights, dict) or not all(torch.is_tensor(v) for v in weights.values()):
        raise DataError(f"checkpoint {path}: its 'model' entry is not a state dict of tensors")
    args = raw.get("args")
    return ({k.removeprefix("module."): v for k, v in weights.items()},
            vars(args) if isinstance(args, argparse.Namespace) else {})


def infer_model(weights: dict[str, Tensor], where: str, patch_key: str = "patch_embed_rgb") -> dict:
    """The codemae ``model`` config (plain data) of a published HiViT state dict, read off its shapes."""
    if "absolute_pos_embed" not in weights or f"{patch_key}.proj.weight" not in weights:
        raise DataError(f"{where}: not a published CoDe-MAE / iTPN state dict (no absolute_pos_embed or {patch_key})")
    tokens, dim = weights["absolute_pos_embed"].shape[1:]
    attention = sum(1 for k in weights if re.fullmatch(r"blocks\.\d+\.attn\.qkv\.weight", k))
    merges = sorted(int(k.split(".")[1]) for k in weights if re.fullmatch(r"blocks\.\d+\.reduction\.weight", k))
    if len(merges) != 2:
        raise DataError(f"{where}: {len(merges)} patch merges; a HiViT has two")
    stages = (merges[0], merges[1] - merges[0] - 1)
    family = [name for name, arch in HIVIT_SIZES.items() if tuple(arch["mlp_depths"]) == stages]
    if not family:
        raise DataError(f"{where}: MLP stages of {stages} blocks match no codemae HiViT preset")
    size = next((n for n in family if (HIVIT_SIZES[n]["embed_dim"], HIVIT_SIZES[n]["depth"]) == (dim, attention)), None)
    conv = weights[f"{patch_key}.proj.weight"]
    sar = weights.get("patch_embed_sar.proj.weight", conv)
    model = {"backbone": f"hivit_{size or family[0]}", "img_size": math.isqrt(tokens) * conv.shape[-1] * 4,
             "patch_size": conv.shape[-1] * 4, "opt_channels": conv.shape[1], "sar_channels": sar.shape[1],
             "pos_interp": "published", "pyramid": "align_dim_16tofpn.weight" in weights}
    if size is None:  # widths and depths of no preset: the head count cannot be read off the tensors
        model |= {"embed_dim": dim, "depth": attention, "num_heads": None}
    if model["pyramid"]:
        model["pyramid_dim"] = weights["align_dim_16tofpn.weight"].shape[0]
    return model


def with_overrides(raw: dict, overrides: list[str], where: str) -> Config:
    """``raw`` with ``key=value`` overrides applied, validated; a head count that the tensors could not
    tell and no override gave is an error saying which key to set."""
    for item in overrides:
        apply_override(raw, item)
    if raw["model"].get("num_heads", 0) is None:
        raise ConfigError(f"{where}: a HiViT of width {raw['model']['embed_dim']} with {raw['model']['depth']} "
                          "attention blocks is no preset; give its head count as model.num_heads=N")
    cfg = from_dict(Config, raw)
    validate(cfg)
    return cfg


def infer_config(weights: dict[str, Tensor], where: str) -> dict:
    """The codemae config (plain data) of a published pretraining state dict, read off its shapes."""
    model = infer_model(weights, where)
    depth = lambda name: len({k.split(".")[1] for k in weights if k.startswith(f"{name}.")})  # noqa: E731
    method = {"name": "codemae", "decoder": "shared", "decoder_dim": weights["mask_token"].shape[-1],
              "decoder_depth": depth("decoder_blocks"), "decoder_heads": 16}
    if "lm_head.weight" in weights:
        method |= {"okd": True, "teacher": {"dim": weights["lm_head.weight"].shape[0]}}
    if any(k.startswith("contrastive_loss.") for k in weights):
        method |= {"ccl": "cross_attention"}
    if "decoder_pred_cross.weight" in weights:
        width = weights["decoder_pred_cross.weight"].shape[0]
        targets = {model["patch_size"] ** 2: "gray", 9 * model["patch_size"] ** 2: "hog"}
        method |= {"cdr": True, "cdr_direction": "both", "cdr_target": targets.get(width, "rgb"),
                   "cdr_depth": depth("decoder_blocks_cross")}
    if not any(method.get(k) for k in ("okd", "ccl", "cdr")):
        method["name"] = "mae"
    return {"model": model, "method": method}


def convert_checkpoint(path: str | Path, out: str | Path, overrides: list[str] = ()) -> Path:
    """Write the published pretraining checkpoint ``path`` as the codemae checkpoint ``out``.

    ``overrides`` (``key=value``) settle what the tensors cannot tell: the CDR target of a
    768-wide head (rgb, spatial or mgf; rgb assumed), the decoder's head count (16 assumed).
    """
    weights, args = read_published(path)
    raw = infer_config(weights, str(path))
    if args:
        target = {("pixel", "channel"): "gray", ("pixel", "none"): "rgb", ("pixel", "spatial"): "spatial",
                  ("hog", "none"): "hog", ("hog", "spatial"): "hog", ("mgf", "none"): "mgf", ("mgf", "spatial"): "mgf"}
        if "cdr" in raw["method"] and (args.get("target"), args.get("reduction")) in target:
            raw["method"]["cdr_target"] = target[(args["target"], args["reduction"])]
        if "decoder_num_heads" in args:
            raw["method"]["decoder_heads"] = int(args["decoder_num_heads"])
    raw["run_dir"] = str(Path(out).parent)
    cfg = with_overrides(raw, list(overrides), str(path))
    method = build_method(cfg)
    try:
        method.load_state_dict(from_published(weights, method, str(path)), strict=True)
    except RuntimeError as err:
        raise DataError(f"{path}: its tensors do not fit the config (check the overrides): "
                        f"{str(err).splitlines()[-1].strip()}") from err
    save_atomic({"model": method.state_dict(), "config": to_dict(cfg), "step": args.get("epoch"),
                 "version": __version__, "layout": LAYOUT, "converted_from": str(path)}, Path(out))
    return Path(out)


def init_from_itpn_imagenet(encoder: HiViT, path: str | Path) -> None:
    """Fill ``encoder`` from an ImageNet-1K iTPN state dict (see the module docstring); a key it cannot
    place, or an encoder tensor the file does not give, is an error naming it."""
    weights, _ = read_published(path)
    pairs = encoder_prefixes(encoder, "")
    wanted = {rename(key, pairs): key for key in encoder.state_dict()}
    state, unused = {}, []
    for key, value in weights.items():
        if IMAGENET_UNUSED.search(key):
            unused.append(key)
        elif key.startswith("patch_embed."):
            for m, side in PATCH_SIDES.items():
                ours = wanted.get(f"{side}.{key.removeprefix('patch_embed.')}")
                if ours is None:
                    raise DataError(f"{path}: ImageNet iTPN tensor {key} has no place in the codemae encoder")
                if m in encoder.channels:
                    state[ours] = fit_channels(value, encoder, m, key)
        elif key in wanted:
            state[wanted[key]] = value
        else:
            raise DataError(f"{path}: ImageNet iTPN tensor {key} has no place in the codemae encoder")
    missing = sorted(set(encoder.state_dict()) - set(state))
    if missing:
        raise DataError(f"{path}: the file gives no {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise DataError(f"{path}: shapes do not fit this encoder: {str(err).splitlines()[-1].strip()}") from err
    log.info("encoder initialised from %s (%d tensors; %d decoder / mask / extra-merge tensors left out)",
             path, len(state), len(unused))


def init_encoder(encoder: Encoder, spec: str) -> None:
    """``model.init``: ``itpn-imagenet:<file>`` (the paper's starting point) or ``codemae:<checkpoint>``
    (the encoder of another codemae run, same architecture)."""
    kind, _, path = spec.partition(":")
    if kind == "itpn-imagenet" and isinstance(encoder, HiViT):
        init_from_itpn_imagenet(encoder, path)
    elif kind == "codemae" and path:
        source = load_method(path).encoder
        try:
            encoder.load_state_dict(source.state_dict(), strict=True)
        except RuntimeError as err:
            raise ConfigError(f"config key 'model.init': the encoder of {path} does not fit this model: "
                              f"{str(err).splitlines()[-1].strip()}") from err
        log.info("encoder initialised from the codemae checkpoint %s", path)
    else:
        raise ConfigError(f"config key 'model.init': {spec!r}; give itpn-imagenet:<file> (HiViT backbones) "
                          "or codemae:<checkpoint>")


def fit_channels(weight: Tensor, encoder: HiViT, modality: str, key: str) -> Tensor:
    """The RGB patch-embedding conv for a ``modality`` input: as is for 3 channels; summed over its
    input channels for 1 (equal to feeding the band replicated three times); other counts refused."""
    channels = encoder.channels[modality]
    if weight.ndim != 4 or weight.shape[1] == channels:
        return weight
    if channels == 1:
        return weight.sum(1, keepdim=True)
    raise DataError(f"{key}: an RGB patch embedding cannot initialise a {channels}-channel {modality} input")


def imagenet_method(path: str | Path, overrides: list[str] = ()) -> tuple[PretrainMethod, Config]:
    """A joint-MAE method whose HiViT encoder holds the ImageNet-1K iTPN weights of ``path`` (its config
    read off the file; ``model.sar_channels=1`` and the like as overrides); decoders freshly built."""
    weights, _ = read_published(path)
    raw = {"model": infer_model(weights, str(path), "patch_embed"), "method": {"name": "mae"}}
    cfg = with_overrides(raw, list(overrides), str(path))
    method = build_method(cfg)
    init_from_itpn_imagenet(method.encoder, path)
    return method.eval(), cfg


CLASSIFIER_WEIGHTS, CLASSIFIER_CONFIG = "classifier.safetensors", "classifier.json"


class PublishedClassifier(torch.nn.Module):
    """The authors' fine-tuned classifier: HiViT without pyramid, mean of the final tokens, ``fc_norm``
    (LayerNorm), for the SAR target sets a BatchNorm without affine parameters, then the linear head."""

    def __init__(self, cfg: Config, modalities: tuple[str, ...], num_classes: int, batch_norm: bool) -> None:
        super().__init__()
        encoder = build_backbone(cfg.model, only=modalities[0] if len(modalities) == 1 else None)
        self.encoder = encoder
        self.modalities = modalities
        self.fc_norm = torch.nn.LayerNorm(encoder.embed_dim, eps=1e-6)
        self.batch_norm = torch.nn.BatchNorm1d(encoder.embed_dim, affine=False, eps=1e-6) if batch_norm else None
        self.head = torch.nn.Linear(encoder.embed_dim, num_classes)

    def forward(self, images: dict[str, Tensor]) -> Tensor:
        """Logits (B, classes) of one modality's images, ``{"sar": x}`` or ``{"opt": x}``."""
        (modality, image), = images.items()
        x = self.fc_norm(self.encoder({modality: image})[modality].tokens.mean(1))
        return self.head(self.batch_norm(x) if self.batch_norm is not None else x)


def classifier_names(model: PublishedClassifier) -> dict[str, str]:
    """codemae name -> published name for every tensor of a :class:`PublishedClassifier`."""
    pairs = encoder_prefixes(model.encoder)
    pairs += [("fc_norm.", "fc_norm.")]
    pairs += [("batch_norm.", "head.0."), ("head.", "head.1.")] if model.batch_norm is not None else [("head.", "head.")]
    return {key: rename(key, pairs) for key in model.state_dict()}


def convert_classifier(path: str | Path, out: str | Path, overrides: list[str] = ()) -> Path:
    """Write the authors' fine-tuned classifier ``path`` as ``out/classifier.safetensors`` (codemae names)
    and ``out/classifier.json``; :func:`load_classifier` reads them back."""
    weights, _ = read_published(path)
    modalities = tuple(m for m, side in PATCH_SIDES.items() if f"{side}.proj.weight" in weights)
    if not modalities or "fc_norm.weight" not in weights:
        raise DataError(f"{path}: not a published fine-tuned classifier (no patch embedding or fc_norm)")
    patch_key = PATCH_SIDES[modalities[0]]
    model = infer_model(weights, str(path), patch_key) | {"pyramid": False}
    for m in ("opt", "sar"):
        if m not in modalities:
            model[f"{m}_channels"] = weights[f"{patch_key}.proj.weight"].shape[1]
    cfg = with_overrides({"model": model}, list(overrides), str(path))
    batch_norm = "head.0.running_mean" in weights
    head = weights["head.1.weight" if batch_norm else "head.weight"]
    meta = {"format": "codemae-published-classifier", "layout": LAYOUT, "converted_from": str(path),
            "modalities": list(modalities), "num_classes": head.shape[0], "batch_norm": batch_norm,
            "model": to_dict(cfg)["model"]}
    classifier = classifier_from_meta(meta)
    ours = {theirs: key for key, theirs in classifier_names(classifier).items()}
    unplaced = [k for k in weights if k not in ours]
    if unplaced:
        raise DataError(f"{path}: published tensor {unplaced[0]} has no place in the classifier")
    try:
        classifier.load_state_dict({ours[k]: v for k, v in weights.items()}, strict=True)
    except RuntimeError as err:
        raise DataError(f"{path}: does not fit the inferred classifier: {str(err).splitlines()[-1].strip()}") from err
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, str(out / CLASSIFIER_WEIGHTS))
    (out / CLASSIFIER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def classifier_from_meta(meta: dict) -> PublishedClassifier:
    cfg = from_dict(Config, {"model": meta["model"]})
    return PublishedClassifier(cfg, tuple(meta["modalities"]), meta["num_classes"], meta["batch_norm"])


def load_classifier(directory: str | Path) -> PublishedClassifier:
    """A classifier written by :func:`convert_classifier`, in eval mode."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / CLASSIFIER_CONFIG).read_text())
        weights = load_file(str(directory / CLASSIFIER_WEIGHTS))
        classifier = classifier_from_meta(meta)
        classifier.load_state_dict(weights, strict=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as err:
        raise DataError(f"{directory}: not a converted classifier ({one_line(err)})") from err
    return classifier.eval()
