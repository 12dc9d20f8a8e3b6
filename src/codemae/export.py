"""Encoder export: the weights ``encode()`` needs as safetensors, plus the config to rebuild it.

``codemae export --checkpoint CKPT --out DIR`` writes ``DIR/encoder.safetensors`` and
``DIR/config.json``; ``codemae.load_encoder(DIR)`` rebuilds the method from the config
and loads the encoder weights (no optimiser state, no decoder weights, no pickle: the
safetensors format holds tensors only, and a file that is not one is refused).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from codemae.checkpoint import LAYOUT
from codemae.errors import DataError
from codemae.loading import (
    method_from_config,
    method_from_state,
    read_method_checkpoint,
    upgrade,
)
from codemae.methods import PretrainMethod

WEIGHTS, CONFIG = "encoder.safetensors", "config.json"
ENCODER_PREFIX = "encoder."  # everything encode() reads
FORMAT = "codemae-encoder"


def encoder_state(method: PretrainMethod) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in method.state_dict().items() if k.startswith(ENCODER_PREFIX)}


def export_encoder(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the checkpoint's encoder to ``out``; return the folder."""
    state = read_method_checkpoint(checkpoint)
    method = method_from_state(state, str(checkpoint))
    return write_export(method, state["config"], out, {"step": state.get("step"), "checkpoint": str(checkpoint)})


def write_export(method: PretrainMethod, config: dict, out: str | Path, origin: dict) -> Path:
    """``method``'s encoder weights and its (plain-data) ``config`` as an export folder; ``origin`` says
    where the weights come from."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{WEIGHTS}.tmp-{os.getpid()}"
    save_file(encoder_state(method), str(tmp), metadata={"format": FORMAT})
    os.replace(tmp, out / WEIGHTS)
    meta = {"format": FORMAT, "version": 1, "layout": LAYOUT, **origin, "config": config}
    (out / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def load_encoder(directory: str | Path, device: str | torch.device = "cpu",
                 drop_path: float | None = None) -> PretrainMethod:
    """The exported encoder, ready for ``encode({"opt": x, "sar": y})`` (eval mode).

    The returned object is the method of the export's config; only its encoder
    weights are loaded (the decoders stay as built and are not meant to be used).
    """
    directory = Path(directory)
    try:
        meta = json.loads((directory / CONFIG).read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{directory / CONFIG}: not a readable export config ({err})") from err
    if meta.get("format") != FORMAT or "config" not in meta:
        raise DataError(f"{directory / CONFIG}: not a codemae encoder export")
    try:
        weights = load_file(str(directory / WEIGHTS))
    except (OSError, SafetensorError) as err:
        raise DataError(f"{directory / WEIGHTS}: not a safetensors file ({err}); refusing to load it") from err
    weights, config = upgrade(weights, meta["config"], meta.get("layout", 1), str(directory))
    method = method_from_config(config, drop_path)
    expected = set(encoder_state(method))
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise DataError(f"{directory / WEIGHTS}: weights do not match the export's config "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    method.load_state_dict(weights, strict=False)
    method.encoder_only = True
    return method.eval().to(device)
