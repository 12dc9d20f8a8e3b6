"""``codemae bench --against-official MAE_SRC_DIR``: codemae's joint-MAE step against the official MAE.

The official model is facebookresearch/mae ``models_mae.py`` (on timm's ``Block`` and ``PatchEmbed``),
imported from a local copy the user points at; it never enters this repository. Both models get the
same work: the same encoder and decoder sizes, mask ratio, norm-pix MSE, AdamW and the same pixels, the
official model as one batch of ``images`` images, codemae as ``images / 2`` optical + ``images / 2``
3-channel SAR images through its shared encoder and decoder. Their training steps alternate in one
process (the order flips every round, so drift hits both), and the ratio official / codemae of each
round's step time is reported as median, min and max, for process CPU time (what a step costs, robust
to other processes on a shared machine; meaningful single-threaded) and wall time.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from codemae.batch import make_batch
from codemae.config import Config, MethodConfig, ModelConfig
from codemae.errors import ConfigError, DataError
from codemae.methods import build_method
from codemae.train.accel import compile_blocks
from codemae.train.optim import param_groups, pretraining_optimizer
from codemae.train.step import TrainStep


@dataclass(frozen=True)
class EqualWork:
    """The compared configuration (default: the issue's ViT-Tiny/16 MAE, 64 images per step)."""

    img_size: int = 128
    patch_size: int = 16
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    mask_ratio: float = 0.75
    images: int = 64
    lr: float = 1.5e-4
    weight_decay: float = 0.05


def load_official(src_dir: str | Path):  # noqa: ANN201 (the official module)
    """Import ``models_mae.py`` (and its ``util/pos_embed.py``) from ``src_dir``. New timm's ``Block`` no
    longer takes the ``qk_scale`` the official code passes: the module's ``Block`` is swapped for one that
    drops keyword arguments timm's does not accept (the official file itself is left as it is)."""
    src = Path(src_dir)
    path = src / "models_mae.py"
    if not path.is_file() or not (src / "util" / "pos_embed.py").is_file():
        raise DataError(f"--against-official {src}: expected the facebookresearch/mae sources there "
                        "(models_mae.py and util/pos_embed.py)")
    try:
        from timm.models.vision_transformer import Block
    except ImportError as err:
        raise ConfigError("--against-official needs timm, which the official MAE code builds on: "
                          "pip install timm") from err

    accepted = set(inspect.signature(Block.__init__).parameters)

    class TimmBlock(Block):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **{k: v for k, v in kwargs.items() if k in accepted})

    spec = importlib.util.spec_from_file_location("official_models_mae", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(src))
    try:
        spec.loader.exec_module(module)
    except ImportError as err:
        raise DataError(f"--against-official {src}: cannot import models_mae.py ({err})") from err
    finally:
        sys.path.remove(str(src))
    module.Block = TimmBlock
    return module


def official_model(module, work: EqualWork) -> nn.Module:  # noqa: ANN001 (the module load_official returns)
    return module.MaskedAutoencoderViT(
        img_size=work.img_size, patch_size=work.patch_size, in_chans=3, embed_dim=work.embed_dim,
        depth=work.depth, num_heads=work.num_heads, decoder_embed_dim=work.decoder_dim,
        decoder_depth=work.decoder_depth, decoder_num_heads=work.decoder_heads, mlp_ratio=4,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), norm_pix_loss=True)


def codemae_model(work: EqualWork) -> nn.Module:
    """codemae's joint MAE at ``work``: shared encoder and decoder, consistent masking, 3-channel SAR."""
    model = ModelConfig(backbone="vit_tiny", img_size=work.img_size, patch_size=work.patch_size, sar_channels=3,
                        embed_dim=work.embed_dim, depth=work.depth, num_heads=work.num_heads)
    method = MethodConfig(mask_ratio=work.mask_ratio, decoder_dim=work.decoder_dim,
                          decoder_depth=work.decoder_depth, decoder_heads=work.decoder_heads)
    return build_method(Config(model=model, method=method))


def step_functions(module, work: EqualWork,  # noqa: ANN001
                   device: torch.device) -> tuple[dict[str, Callable[[], None]], nn.Module]:
    """One training step of each model on the same pixels, and codemae's model: the official step as its
    ``main_pretrain.py`` runs it (forward, backward, AdamW over weight-decay groups), codemae's through
    :class:`TrainStep` (forward, backward, gradient-norm clip pass, its AdamW) as the engine runs it."""
    torch.manual_seed(0)
    images = torch.randn(work.images, 3, work.img_size, work.img_size, device=device)
    half = work.images // 2
    batch = make_batch(images[:half], images[half:])
    official = official_model(module, work).to(device)
    official_opt = torch.optim.AdamW(param_groups(official, work.weight_decay), lr=work.lr, betas=(0.9, 0.95))
    ours = codemae_model(work).to(device)
    step = TrainStep(ours, pretraining_optimizer(ours, work.lr, work.weight_decay, [0.9, 0.95]), device, "fp32")

    def official_step() -> None:
        official(images, work.mask_ratio)[0].backward()
        official_opt.step()
        official_opt.zero_grad(set_to_none=True)

    def codemae_step() -> None:
        step.backward(step.forward(batch))
        step.clip()
        step.apply()

    return {"official": official_step, "codemae": codemae_step}, ours


def timed(step: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """(process CPU seconds, wall seconds) of one step."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    cpu, wall = time.process_time(), time.perf_counter()
    step()
    sync()
    return time.process_time() - cpu, time.perf_counter() - wall


def spread(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3)}


def compare(src_dir: str | Path, work: EqualWork, rounds: int, warmup: int = 1, compile_codemae: bool = False,
            device: torch.device | None = None) -> dict:
    """Alternate the two steps for ``rounds`` rounds after ``warmup`` steps each (the first, eager, counted
    by ``FlopCounterMode``; compiling happens in the second) and summarise the per-round ratios
    official / codemae."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    steps, ours = step_functions(load_official(src_dir), work, device)
    flop = {}
    for name, step in steps.items():
        with FlopCounterMode(display=False) as counter:
            step()
        flop[name] = counter.get_total_flops()
    compile_codemae = compile_codemae and compile_blocks(ours, device)  # after the (eager) FLOP count
    for _ in range(warmup - 1):
        for step in steps.values():
            step()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in steps}
    for r in range(rounds):
        for name in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
            times[name].append(timed(steps[name], device))
    result = {"work": asdict(work), "device": device.type, "threads": torch.get_num_threads(), "rounds": rounds,
              "codemae_compiled": compile_codemae, "flop_per_step": flop}
    for k, clock in enumerate(("cpu", "wall")):
        result[f"{clock}_s"] = {name: spread([t[k] for t in ts]) for name, ts in times.items()}
        result[f"speedup_{clock}"] = spread([o[k] / c[k] for o, c in zip(times["official"], times["codemae"])])
    return result


def run_against_official(src_dir: str, img_size: int, pairs: int, rounds: int, threads: int | None,
                         compile_codemae: bool, out: str | None) -> dict:
    """The CLI entry: compare at the issue's configuration with ``img_size`` and ``2 * pairs`` images."""
    if threads:
        torch.set_num_threads(threads)
    work = EqualWork(img_size=img_size, images=2 * pairs)
    result = compare(src_dir, work, rounds, warmup=2 if compile_codemae else 1, compile_codemae=compile_codemae)
    s = result["speedup_cpu"]
    print(f"official MAE vs codemae joint MAE, {img_size} px, {work.images} images/step "
          f"({pairs} optical + {pairs} SAR for codemae), fp32, {result['device']} x{result['threads']} threads, "
          f"{rounds} alternating rounds{', codemae compiled' if compile_codemae else ''}")
    print("model | GFLOP/step | CPU s/step (median, min-max) | wall s/step (median)")
    for name in ("official", "codemae"):
        c, w = result["cpu_s"][name], result["wall_s"][name]
        gflop = result["flop_per_step"][name] / 1e9
        print(f"{name} | {gflop:.1f} | {c['median']} ({c['min']}-{c['max']}) | {w['median']}")
    w = result["speedup_wall"]
    print(f"codemae speed-up (official / codemae step time): CPU time {s['median']} (min {s['min']}, max {s['max']}),"
          f" wall {w['median']} (min {w['min']}, max {w['max']})")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    return result
