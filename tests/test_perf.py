"""Speed settings of a run (precision by device, TF32, torch.compile with its fallback, fused AdamW, bf16
teacher) keep the math, and the official-MAE comparison runs when a local copy is given."""

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
from codemae.models.attention import Block
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
    attention.CrossAttention(8, 2)(x, torch.randn(2, 3, 8))
    assert calls == [((), {}, [1, 1, 1])] * 2


@pytest.mark.parametrize("override, key", [("train.compile=maybe", "train.compile"),
                                           ("train.precision=fp16", "train.precision")])
def test_bad_compile_or_precision_values_are_config_errors(override, key):
    from codemae.config import load_config
    from codemae.errors import ConfigError

    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])
