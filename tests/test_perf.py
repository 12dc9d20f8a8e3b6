"""Speed settings of a run (precision by device, TF32, torch.compile with its fallback, fused AdamW, bf16
teacher, decoders predicting only the masked patches the losses read) keep the math, and the
official-MAE comparison runs when a local copy is given."""

from __future__ import annotations

import copy
import logging
import os
import time

import pytest
import torch
import yaml
from torch import nn

from codemae.batch import make_batch
from codemae.checkpoint import load_checkpoint, save_atomic
from codemae.cli import main
from codemae.config import Config, MethodConfig, ModelConfig
from codemae.methods import build_method
from codemae.losses import masked_mean, patch_errors, patchify
from codemae.masking import modality_masks
from codemae.methods.cdr_targets import as_rgb
from codemae.models.attention import Block
from codemae.models.backbone import gather_tokens
from codemae.models.decoder import MaskedDecoder
from codemae.train import accel
from codemae.train.engine import CHECKPOINT, pretrain
from codemae.train.optim import adamw_kind, param_groups, pretraining_optimizer

from conftest import tiny_config

CUDA = torch.device("cuda")  # only inspected, never used to allocate: these tests run on CPU machines
CPU = torch.device("cpu")


def tiny_mae() -> nn.Module:
    torch.manual_seed(0)
    model = ModelConfig(backbone="vit_tiny", img_size=32, embed_dim=32, depth=1, num_heads=2, sar_channels=3)
    return build_method(Config(model=model, method=MethodConfig(decoder_dim=32, decoder_depth=1, decoder_heads=2)))


def tiny_batch():
    torch.manual_seed(1)
    return make_batch(torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32))


def loss_and_grads(method: nn.Module, seed: int = 5) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)  # the same masks for both runs
    loss = sum(method(tiny_batch()).values())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}


def test_precision_auto_is_bf16_on_cuda_and_fp32_elsewhere():
    assert accel.resolve_precision("auto", CUDA) == "bf16"
    assert accel.resolve_precision("auto", CPU) == "fp32"
    assert accel.resolve_precision("fp32", CUDA) == "fp32" and accel.resolve_precision("bf16", CPU) == "bf16"
    cfg = Config()
    assert cfg.train.precision == "auto"
    assert accel.with_device_precision(cfg, CUDA).train.precision == "bf16"
    assert cfg.train.precision == "auto"  # a copy, the given config untouched
    from codemae.train.step import TrainStep

    layer = nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(layer.parameters())
    assert TrainStep(layer, optimizer, CUDA, "auto").bf16 and not TrainStep(layer, optimizer, CPU, "auto").bf16


def test_tf32_enabled_on_cuda_only():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        accel.enable_tf32(CPU)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        accel.enable_tf32(CUDA)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_compile_falls_back_with_a_one_line_reason(monkeypatch, caplog):
    monkeypatch.setattr(accel.shutil, "which", lambda name: None)
    method = tiny_mae()
    with caplog.at_level(logging.WARNING, logger="codemae"):
        assert accel.compile_blocks(method, CPU) is False
    (record,) = caplog.records
    assert "running eagerly, no C++ compiler found" in record.getMessage() and "\n" not in record.getMessage()
    assert all(m._compiled_call_impl is None for m in method.modules() if isinstance(m, Block))
    import torch.utils._triton

    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: False)
    assert "triton is not installed" in accel.compile_unavailable(CUDA)
    assert accel.compile_unavailable(torch.device("meta")) == "no inductor backend for device meta"


@pytest.mark.slow  # compiling the two blocks (forward and backward) takes 1-5 minutes on the shared 2-core machine
def test_compiled_step_gives_the_eager_loss_and_gradients():
    eager = tiny_mae()
    compiled = copy.deepcopy(eager)
    start = time.perf_counter()
    assert accel.compile_blocks(compiled, CPU)
    blocks = [m for m in compiled.modules() if isinstance(m, Block)]
    assert len(blocks) == 2 and all(m._compiled_call_impl is not None for m in blocks)
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # nothing renamed (_orig_mod)
    loss_e, grads_e = loss_and_grads(eager)
    loss_c, grads_c = loss_and_grads(compiled)
    print(f"compile + first compiled step: {time.perf_counter() - start:.1f} s")
    assert loss_c.item() == pytest.approx(loss_e.item(), rel=1e-5)
    assert grads_c.keys() == grads_e.keys()
    for name, grad in grads_e.items():
        torch.testing.assert_close(grads_c[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    for name in ("encoder.blocks.0.mlp.fc1.weight", "decoders.shared.blocks.0.attn.qkv.weight"):
        assert grads_e[name].abs().sum() > 0  # real gradients, not zeros compared with zeros


def test_fused_adamw_takes_the_loop_adamw_steps():
    fused_model = tiny_mae()
    loop_model = copy.deepcopy(fused_model)
    fused = pretraining_optimizer(fused_model, 1e-3, 0.05, [0.9, 0.95])
    loop = torch.optim.AdamW(param_groups(loop_model, 0.05), lr=1e-3, betas=(0.9, 0.95), foreach=False)
    assert fused.defaults["fused"] is True
    for step in range(3):
        loss_and_grads(fused_model, seed=step)
        for a, b in zip(fused_model.parameters(), loop_model.parameters()):
            b.grad = a.grad.clone()  # the same gradients: only the optimisers' arithmetic may differ
        for opt in (fused, loop):
            opt.step()
            opt.zero_grad(set_to_none=True)
    moved = 0
    for (name, a), b, start in zip(fused_model.named_parameters(), loop_model.parameters(),
                                   tiny_mae().parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
        moved += not torch.equal(a, start)
    assert moved > 10  # the steps did change the weights
    assert adamw_kind(nn.Linear(2, 2, device="meta")) == {}  # no fused kernel there: torch's default


class WithTeacher(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self._teacher = [nn.Linear(4, 4)]


def test_teacher_held_in_bf16_only_for_bf16_on_cuda():
    for precision, device in (("bf16", CPU), ("fp32", CUDA)):
        method = WithTeacher()
        assert not accel.teacher_in_bf16(method, precision, device)
        assert method._teacher[0].weight.dtype == torch.float32
    method = WithTeacher()
    assert accel.teacher_in_bf16(method, "bf16", CUDA)  # the device is only inspected: cast, not moved
    assert method._teacher[0].weight.dtype == torch.bfloat16
    assert not accel.teacher_in_bf16(nn.Linear(2, 2), "bf16", CUDA)  # no teacher: nothing to do


def test_run_records_resolved_precision_and_resumes_an_older_config(tmp_path, monkeypatch):
    from codemae.train import engine

    compiled = []
    monkeypatch.setattr(engine, "compile_blocks", lambda method, device: compiled.append(device.type))
    cfg = tiny_config(tmp_path / "run", train={"max_steps": 1})
    pretrain(cfg)
    assert compiled == []
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]["precision"] == "fp32"
    path = tmp_path / "run" / CHECKPOINT
    state = load_checkpoint(path)
    del state["config"]["train"]["compile"]  # as written before train.compile existed
    save_atomic(state, path)
    cfg.train.max_steps, cfg.train.compile = 2, True
    assert pretrain(cfg)["step"] == 2  # compile is resume-safe, fp32 = auto on this CPU
    assert compiled == ["cpu"]  # train.compile reaches the engine


def test_against_official_refuses_a_folder_without_the_sources(tmp_path, capsys):
    assert main(["bench", "--against-official", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "models_mae.py and util/pos_embed.py" in err and str(tmp_path) in err


def test_against_official_on_a_tiny_config():
    src = os.environ.get("CODEMAE_OFFICIAL_MAE")
    if not src:
        pytest.skip("set CODEMAE_OFFICIAL_MAE to a local copy of facebookresearch/mae (models_mae.py, util/) "
                    "to compare against the official MAE")
    from codemae.bench_official import EqualWork, compare

    work = EqualWork(img_size=32, embed_dim=32, depth=1, num_heads=2, decoder_dim=32, decoder_depth=1,
                     decoder_heads=2, images=4)
    result = compare(src, work, rounds=3, device=CPU)
    official, ours = result["flop_per_step"]["official"], result["flop_per_step"]["codemae"]
    assert 0 < ours < official  # the same work but the official class token
    for clock in ("cpu", "wall"):
        s = result[f"speedup_{clock}"]
        assert 0 < s["min"] <= s["median"] <= s["max"]
        assert all(result[f"{clock}_s"][m]["median"] > 0 for m in ("official", "codemae"))


def test_attention_reaches_sdpa_without_masks_and_with_unit_stride(monkeypatch):
    """What keeps the flash / memory-efficient kernels reachable on a GPU: no attention mask, no dropout, no
    causal flag, and q, k, v whose last dimension is contiguous."""
    import torch.nn.functional as F

    from codemae.models import attention

    calls, sdpa = [], F.scaled_dot_product_attention

    def recording_sdpa(q, k, v, *args, **kwargs):
        calls.append((args, kwargs, [t.stride(-1) for t in (q, k, v)]))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", recording_sdpa)
    x = torch.randn(2, 5, 8)
    attention.Attention(8, 2)(x)
    attention.Attention(8, 2)(x, torch.tensor([[0, 3], [4, 1]]))  # queries at some tokens only
    attention.CrossAttention(8, 2)(x, torch.randn(2, 3, 8))
    assert calls == [((), {}, [1, 1, 1])] * 3


@pytest.mark.parametrize("override, key", [("train.compile=maybe", "train.compile"),
                                           ("train.precision=fp16", "train.precision")])
def test_bad_compile_or_precision_values_are_config_errors(override, key):
    from codemae.config import load_config
    from codemae.errors import ConfigError

    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


# --- the decoders predict only the masked patches the losses read ---

def test_decoder_at_positions_equals_the_full_prediction_taken_there():
    """Any positions, unequal counts per modality (one last-block call each), and a decoder without blocks."""
    for depth in (2, 0):
        torch.manual_seed(0)
        decoder = MaskedDecoder(16, depth, 2, 4, {"opt": 12, "sar": 4}).eval()
        inputs = {"opt": (torch.randn(3, 5, 16), torch.randperm(16).repeat(3, 1)),
                  "sar": (torch.randn(3, 8, 16), torch.randperm(16).repeat(3, 1))}
        positions = {"opt": torch.randint(0, 16, (3, 7)), "sar": torch.randint(0, 16, (3, 2))}
        full, part = decoder(inputs), decoder(inputs, positions)
        for m, ids in positions.items():
            assert part[m].shape == (3, ids.shape[1], decoder.outputs[m])
            torch.testing.assert_close(part[m], gather_tokens(full[m], ids), rtol=1e-5, atol=1e-6)
        equal = {"opt": positions["opt"], "sar": positions["opt"].flip(0)}  # equal counts: one call for both
        torch.testing.assert_close(decoder(inputs, equal)["sar"], gather_tokens(full["sar"], equal["sar"]),
                                   rtol=1e-5, atol=1e-6)


def test_ids_masked_are_the_masked_patches():
    mask = modality_masks(["opt"], 5, 16, 0.75, "independent", generator=torch.Generator().manual_seed(0))["opt"]
    assert mask.ids_masked.shape == (5, 12)
    for row in range(5):
        assert sorted(mask.ids_masked[row].tolist()) == mask.mask[row].nonzero().flatten().tolist()


def full_reconstruction(model, images, visible):
    """The joint-MAE loss as computed before: every position predicted, the 0/1 mask weighting the mean."""
    preds = model.decode(visible)
    p = model.encoder.patch_size
    errors = [patch_errors(preds[m], patchify(images[m], p), model.cfg.norm_pix_loss) for m in images]
    return masked_mean(errors, [visible[m].mask.mask for m in images])


def full_degraded_reconstruction(model, batch, visible):
    """CoDe-MAE's CDR loss as computed before (every position predicted, masked mean)."""
    decoder, target, p = model.cdr_decoder, model.cdr_target, model.encoder.patch_size
    preds = decoder({m: (visible[m].tokens, visible[m].mask.ids_restore) for m in decoder.outputs})
    source = {"sar": "opt", "opt": "sar"}
    errors = [patch_errors(pred, target.compute(as_rgb(batch[source[m]]), p), model.cfg.norm_pix_loss)
              for m, pred in preds.items()]
    return masked_mean(errors, [visible[m].mask.mask for m in preds])


def full_fusmae(model, batch, masks):
    """Fus-MAE's loss as computed before (every position predicted, masked mean) for the given masks."""
    images = model.images(batch)
    latents = model.encoder(images, {m: masks[m].ids_keep for m in images})
    z = {m: model.decoder_embed(latents[m].levels) for m in images}
    errors = []
    for m in images:
        fused = model.decoder_fusion[m](z[m], z["sar" if m == "opt" else "opt"])
        pred = model.decoders[m]({m: (fused, masks[m].ids_restore)})[m]
        errors.append(patch_errors(pred, patchify(images[m], model.encoder.patch_size), model.cfg.norm_pix_loss))
    return masked_mean(errors, [masks[m].mask for m in images])


def assert_same_loss_and_gradients(model, new, old):
    params = dict(model.named_parameters())
    grads_new = torch.autograd.grad(new, list(params.values()), retain_graph=True, allow_unused=True)
    grads_old = torch.autograd.grad(old, list(params.values()), allow_unused=True)
    assert new.item() == pytest.approx(old.item(), rel=1e-5)
    checked = 0
    for name, g_new, g_old in zip(params, grads_new, grads_old):
        assert (g_new is None) == (g_old is None), name
        if g_old is not None:
            torch.testing.assert_close(g_new, g_old, rtol=1e-4, atol=1e-7, msg=name)
            checked += int(g_old.abs().sum() > 0)
    assert checked > 10  # real gradients, not zeros compared with zeros


def pair_batch(sar_channels=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return make_batch(torch.randn(2, 3, 64, 64, generator=g), torch.randn(2, sar_channels, 64, 64, generator=g), True)


@pytest.mark.parametrize("method", [
    {"decoder": "shared"},
    {"decoder": "independent"},
    {"masking": "independent", "sar_mask_ratio": 0.5},  # unequal masked counts through the shared decoder
    {"masking": "independent", "sar_mask_ratio": 0.0},  # no SAR patch masked: no query at all for SAR
])
def test_joint_mae_masked_only_decoding_keeps_loss_and_gradients(tmp_path, method):
    torch.manual_seed(0)
    model = build_method(tiny_config(tmp_path, model={"img_size": 64}, method={"decoder_depth": 2, **method}))
    b = pair_batch()
    images = model.images(b)
    visible = model.embed_visible(images)
    assert_same_loss_and_gradients(model, model.reconstruction(images, visible),
                                   full_reconstruction(model, images, visible))


@pytest.mark.parametrize("direction", ["sar_to_opt", "both"])
def test_codemae_cdr_masked_only_decoding_keeps_loss_and_gradients(tmp_path, direction):
    torch.manual_seed(0)
    method = {"name": "codemae", "cdr": True, "cdr_direction": direction, "decoder_depth": 2,
              "masking": "independent", "sar_mask_ratio": 0.5}
    model = build_method(tiny_config(tmp_path, model={"img_size": 64}, method=method))
    b = pair_batch()
    visible = model.embed_visible(model.images(b))
    assert_same_loss_and_gradients(model, model.degraded_reconstruction(b, visible),
                                   full_degraded_reconstruction(model, b, visible))


def test_fusmae_masked_only_decoding_keeps_loss_and_gradients(tmp_path):
    vit = {"backbone": "vit_tiny", "img_size": 64, "embed_dim": 32, "num_heads": 2, "depth": 2}
    method = {"name": "fusmae", "decoder_depth": 2, "masking": "independent", "sar_mask_ratio": 0.5}
    torch.manual_seed(0)
    model = build_method(tiny_config(tmp_path, model=vit, method=method))
    b = pair_batch()
    torch.manual_seed(3)
    new = model(b)["recon"]
    torch.manual_seed(3)  # the masks the forward drew
    masks = modality_masks(["opt", "sar"], 2, model.encoder.num_patches, model.cfg.mask_ratios, "independent")
    assert_same_loss_and_gradients(model, new, full_fusmae(model, b, masks))
