"""Encoder export: the encoder alone (no decoders, no CCL/CDR/OKD heads), the normalisation it was
trained with, its band names and where it came from, in one of three formats.

``codemae export --checkpoint CKPT --out DIR --format F`` writes ``DIR/config.json`` (see
:func:`describe`), ``DIR/README.md`` (a model card) and the weights as safetensors (tensors only,
no pickle):

- ``codemae``: ``encoder.safetensors``; ``codemae.load_encoder(DIR)`` gives an
  :class:`ExportedEncoder`.
- ``hf``: ``model.safetensors``, the ``huggingface_hub`` ``PyTorchModelHubMixin`` layout:
  ``ExportedEncoder.from_pretrained(DIR)`` reads it (and ``push_to_hub`` publishes it).
- ``timm`` (plain ViT backbones): ``model.safetensors`` in the names of timm's
  ``VisionTransformer`` with the chosen modality's patch embedding; ``config.json["timm"]`` holds
  the ``timm.create_model`` arguments that load it strictly.
"""

from __future__ import annotations

import json
import logging
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from codemae.checkpoint import LAYOUT
from codemae.config import Config
from codemae.data.listing import source_modalities, source_name
from codemae.data.readers import BAND_NAMES
from codemae.data.stats import pooled_stats, recorded_stats
from codemae.errors import ConfigError, DataError
from codemae.loading import (
    config_from_dict,
    encoder_from_config,
    method_from_config,
    method_from_state,
    read_method_checkpoint,
    upgrade,
)
from codemae.methods import PretrainMethod
from codemae.models.backbone import Encoder, EncoderOutput, PerModalityBackbones
from codemae.models.vit import ViT

try:  # the optional ``hub`` extra: ExportedEncoder.from_pretrained / push_to_hub
    from huggingface_hub import PyTorchModelHubMixin

    HUB_BASES: tuple[type, ...] = (PyTorchModelHubMixin,)
    HUB_KWARGS = {"library_name": "codemae", "tags": ["remote-sensing", "sar", "self-supervised"]}
except ImportError:  # pragma: no cover - exercised only without the extra
    HUB_BASES, HUB_KWARGS = (), {}

log = logging.getLogger("codemae")

CONFIG, CARD = "config.json", "README.md"
WEIGHTS = {"codemae": "encoder.safetensors", "hf": "model.safetensors", "timm": "model.safetensors"}
FORMATS = tuple(WEIGHTS)
FORMAT, VERSION = "codemae-encoder", 2  # version 1: no statistics, band names or geometry (read, statistics unknown)
OUTPUTS = {
    "forward(images, modality)": "(B, D) mean of the final normalised patch tokens",
    "tokens(images, modality)": "(B, N, D) final patch tokens, row-major patch order",
    "feature_map(images, modality)": "(B, D, H/p, W/p) the tokens on the patch grid",
    "encode({modality: images})": "per modality an EncoderOutput: tokens and the pyramid levels (coarsest first)",
}


class ExportedEncoder(nn.Module, *HUB_BASES, **HUB_KWARGS):
    """A trained codemae encoder that takes raw [0, 1] images and applies the stored normalisation.

    Built from an export's ``config.json`` (the dict :func:`describe` writes). A modality whose
    statistics were not recorded is passed through unnormalised (``normalised`` lists the others).
    See :data:`OUTPUTS` for what each call returns.
    """

    def __init__(self, config: dict) -> None:
        super().__init__()
        self.meta = config
        self.encoder: Encoder = encoder_from_config(config["training_config"])
        self.normalised: list[str] = []
        for m, norm in config["normalisation"].items():
            if norm is not None:
                self.register_buffer(f"{m}_mean", torch.tensor(norm["mean"], dtype=torch.float32).view(-1, 1, 1))
                self.register_buffer(f"{m}_std", torch.tensor(norm["std"], dtype=torch.float32).view(-1, 1, 1))
                self.normalised.append(m)

    @property
    def patch_size(self) -> int:
        return self.encoder.patch_size

    def normalise(self, images: Tensor, modality: str) -> Tensor:
        """(B, C, H, W) [0, 1] images of ``modality`` with the training statistics applied."""
        if modality not in self.encoder.channels:
            raise ValueError(f"modality {modality!r}: the encoder takes {', '.join(self.encoder.channels)}")
        if modality not in self.normalised:
            return images
        mean, std = getattr(self, f"{modality}_mean"), getattr(self, f"{modality}_std")
        return (images - mean.to(images.dtype)) / std.to(images.dtype)

    def encode(self, images: dict[str, Tensor]) -> dict[str, EncoderOutput]:
        """Raw images per modality (both at once where the encoder fuses them) -> their EncoderOutput."""
        return self.encoder({m: self.normalise(x, m) for m, x in images.items()})

    def tokens(self, images: Tensor, modality: str) -> Tensor:
        return self.encode({modality: images})[modality].tokens

    def feature_map(self, images: Tensor, modality: str) -> Tensor:
        tokens = self.tokens(images, modality)
        p = self.encoder.patch_size
        return tokens.transpose(1, 2).unflatten(2, (images.shape[-2] // p, images.shape[-1] // p))

    def forward(self, images: Tensor, modality: str) -> Tensor:
        return self.tokens(images, modality).mean(1)


def describe(config: dict, encoder: Encoder, origin: dict, run_dirs: list[Path]) -> dict:
    """An export's ``config.json``: geometry, channels and band names per modality, the training
    normalisation (null where the run folder does not hold it, with the reason in
    ``normalisation_note``), the method, the source checkpoint and the full ``training_config`` (version 1
    exports called it ``config``, a name ``PyTorchModelHubMixin`` takes for its own argument)."""
    cfg = config_from_dict(config)
    norms, per_source, note = training_normalisation(cfg, run_dirs)
    return {
        "format": FORMAT, "version": VERSION, "layout": LAYOUT, "codemae_version": codemae_version(),
        "export_format": "codemae", "method": cfg.method.name, "backbone": cfg.model.backbone,
        "img_size": encoder.img_size, "patch_size": encoder.patch_size, "embed_dim": encoder.embed_dim,
        "depth": encoder.num_attention_blocks, "num_heads": encoder.num_heads,
        "channels": dict(encoder.channels),
        "band_names": {m: band_names(cfg, m, c) for m, c in encoder.channels.items()},
        "normalisation": norms, "normalisation_per_source": per_source, "normalisation_note": note,
        "pretraining_sources": [{"name": source_name(s), "kind": s.kind, "layout": s.layout, "root": s.root,
                                 "stats": s.stats} for s in cfg.data.sources],
        "outputs": OUTPUTS, **origin, "training_config": config,
    }


def codemae_version() -> str:
    try:
        return version("codemae")
    except PackageNotFoundError:  # a source checkout run without installing
        return "unknown"


def training_normalisation(cfg: Config, run_dirs: list[Path]) -> tuple[dict, dict, str]:
    """Per modality {mean, std} (or None), per source the same, and a note on how they were found."""
    found = {source_name(s): recorded_stats(s, run_dirs) for s in cfg.data.sources}
    per_source = {name: None if stats is None else {m: vars(n) for m, n in stats.items()}
                  for name, stats in found.items()}
    norms, notes = {}, []
    for m in cfg.model.channels:
        names = [source_name(s) for s in cfg.data.sources if m in source_modalities(s)]
        missing = [n for n in names if found[n] is None]
        if not names or missing:
            norms[m] = None
            notes.append(f"{m}: unknown ({'no source of this modality' if not names else 'no statistics found for '}"
                         f"{', '.join(missing)}; images of this modality are not normalised by load_encoder)")
            continue
        norms[m] = vars(pooled_stats([found[n][m] for n in names]))
        if len(names) > 1:
            notes.append(f"{m}: equal-weight pool of {len(names)} sources' statistics (training normalised each "
                         "source with its own; see normalisation_per_source)")
    return norms, per_source, "; ".join(notes) or "as used in pretraining"


def band_names(cfg: Config, modality: str, channels: int) -> list[str] | None:
    """The bands the encoder's ``modality`` channels hold, as the sources pick or name them (None: not
    recorded, or the sources disagree)."""
    seen = set()
    for s in cfg.data.sources:
        if modality not in source_modalities(s):
            continue
        picks, names = getattr(s, f"{modality}_bands"), getattr(s, f"{modality}_band_names")
        if picks:
            seen.add(tuple(names[int(p)] if p.isdigit() and int(p) < len(names) else p for p in picks))
        elif len(names) == channels:
            seen.add(tuple(names))
        else:  # the Sentinel-2 (12, 13 bands) and Sentinel-1 (2) names readers assume by band count
            seen.add(tuple(BAND_NAMES[channels]) if channels in BAND_NAMES and (modality == "sar") == (channels == 2)
                     else ())
    return list(seen.pop()) if len(seen) == 1 and () not in seen else None


def encoder_from_checkpoint(checkpoint: str | Path) -> ExportedEncoder:
    """The encoder of a pretraining checkpoint with the statistics of its run folder."""
    state = read_method_checkpoint(checkpoint)
    method = method_from_state(state, str(checkpoint))
    run_dirs = list(dict.fromkeys([Path(checkpoint).resolve().parent.parent, Path(state["config"]["run_dir"])]))
    origin = {"checkpoint": str(checkpoint), "step": state.get("step"), "run_summary": run_summary(run_dirs)}
    return with_encoder(describe(state["config"], method.encoder, origin, run_dirs), method.encoder)


def run_summary(run_dirs: list[Path]) -> dict | None:
    """The ``summary.json`` a finished pretraining left in its run folder (None if absent or unreadable)."""
    for directory in run_dirs:
        try:
            return json.loads((directory / "summary.json").read_text())
        except (OSError, ValueError):
            continue
    return None


def with_encoder(meta: dict, encoder: Encoder) -> ExportedEncoder:
    exported = ExportedEncoder(meta)
    exported.encoder.load_state_dict(encoder.state_dict())
    return exported.eval()


def export_encoder(checkpoint: str | Path, out: str | Path, fmt: str = "codemae", modality: str = "opt") -> Path:
    """Write the checkpoint's encoder to ``out`` in format ``fmt``; return the folder."""
    return write_folder(encoder_from_checkpoint(checkpoint), out, fmt, modality)


def write_export(method: PretrainMethod, config: dict, out: str | Path, origin: dict) -> Path:
    """``method``'s encoder (of the plain-data ``config``, weights from ``origin``: converted, not trained in
    ``config``'s run folder, so only statistics the config itself gives are recorded) as a codemae export."""
    meta = describe(config, method.encoder, origin, [])
    return write_folder(with_encoder(meta, method.encoder), out, "codemae")


def write_folder(exported: ExportedEncoder, out: str | Path, fmt: str, modality: str = "opt") -> Path:
    """Weights, ``config.json`` and the model card of ``exported`` in format ``fmt``."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt}: choose from {', '.join(FORMATS)}")
    meta = dict(exported.meta, export_format=fmt)
    if fmt == "timm":
        state, meta["timm"] = timm_state(exported, modality)
    else:
        state = {k: v.detach().contiguous() for k, v in exported.state_dict().items()}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{WEIGHTS[fmt]}.tmp-{os.getpid()}"
    save_file(state, str(tmp), metadata={"format": FORMAT if fmt != "timm" else "timm-vit"})
    os.replace(tmp, out / WEIGHTS[fmt])
    (out / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    (out / CARD).write_text(model_card(meta))
    return out


def timm_state(exported: ExportedEncoder, modality: str) -> tuple[dict[str, Tensor], dict]:
    """The encoder as timm's ``VisionTransformer`` weights (``modality``'s patch embedding; qkv, blocks,
    position table (no class token) and final norm keep their names) and the ``create_model`` arguments."""
    encoder, meta = exported.encoder, exported.meta
    if isinstance(encoder, PerModalityBackbones):
        encoder = encoder.backbones[modality] if modality in encoder.backbones else encoder
    if type(encoder) is not ViT:
        raise ConfigError(f"--format timm: the {meta['backbone']} encoder of {meta['method']} "
                          f"({type(encoder).__name__}) has no timm counterpart; only plain ViT encoders do "
                          "(use --format codemae or hf)")
    if modality not in encoder.channels:
        raise ConfigError(f"--modality {modality}: the encoder takes {', '.join(encoder.channels)}")
    state = {}
    for key, value in encoder.state_dict().items():
        head, _, rest = key.partition(".")
        if head == "patch_embed":
            m, _, leaf = rest.partition(".")
            if m == modality:
                state[f"patch_embed.proj.{leaf}"] = value.contiguous()
        else:
            state[key] = value.contiguous()
    kwargs = {"img_size": encoder.img_size, "patch_size": encoder.patch_size, "in_chans": encoder.channels[modality],
              "embed_dim": encoder.embed_dim, "depth": encoder.num_attention_blocks, "num_heads": encoder.num_heads,
              "mlp_ratio": 4.0, "qkv_bias": True, "class_token": False, "global_pool": "avg", "fc_norm": False,
              "num_classes": 0}
    norm = meta["normalisation"].get(modality)
    return state, {"model_name": f"{meta['backbone']}_patch16_224", "kwargs": kwargs, "modality": modality,
                   "mean": norm and norm["mean"], "std": norm and norm["std"]}


def read_meta(directory: Path) -> dict:
    """An export folder's ``config.json``, refused in one line unless a codemae (or hf) encoder export."""
    try:
        meta = json.loads((directory / CONFIG).read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{directory / CONFIG}: not a readable export config ({err})") from err
    version = meta.get("version", 1) if isinstance(meta, dict) else None
    if not isinstance(version, int) or meta.get("format") != FORMAT or \
            ("training_config" if version >= VERSION else "config") not in meta or \
            (version >= VERSION and not isinstance(meta.get("normalisation"), dict)):
        raise DataError(f"{directory / CONFIG}: not a codemae encoder export")
    if meta.get("export_format") == "timm":
        raise DataError(f"{directory}: a timm-format export; load it with timm.create_model(**config['timm']) "
                        "(see its README.md), or export again with --format codemae")
    return meta


def load_encoder(directory: str | Path, device: str | torch.device = "cpu") -> ExportedEncoder:
    """The encoder of a codemae- or hf-format export folder (eval mode; see :class:`ExportedEncoder`).

    Exports of version 1 (before statistics were recorded) load with their statistics unknown.
    """
    directory = Path(directory)
    meta = read_meta(directory)
    path = directory / WEIGHTS.get(meta.get("export_format"), WEIGHTS["codemae"])
    try:
        weights = load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise DataError(f"{path}: not a safetensors file ({err}); refusing to load it") from err
    if meta.get("version", 1) < VERSION:
        weights, config = upgrade(weights, meta["config"], meta.get("layout", 1), str(directory))
        method = method_from_config(config)
        meta = describe(config, method.encoder, {"checkpoint": meta.get("checkpoint"), "step": meta.get("step")}, [])
        meta["normalisation_note"] += "; a version 1 export, written before codemae recorded statistics"
        log.warning("%s: an export of version 1: normalisation %s", directory, meta["normalisation_note"])
    exported = ExportedEncoder(meta)
    try:
        exported.load_state_dict(weights)
    except RuntimeError as err:
        raise DataError(f"{path}: weights do not match the export's config.json (another architecture?): "
                        f"{str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else err}") from err
    return exported.eval().to(device)


def load_export_method(directory: str | Path, drop_path: float | None = None) -> PretrainMethod:
    """The method of an export's config with the exported encoder weights (eval mode), for the evaluation
    commands; its decoders stay as built (``encoder_only``) and it normalises nothing itself."""
    exported = load_encoder(directory)
    method = method_from_config(exported.meta["training_config"], drop_path)
    method.encoder.load_state_dict(exported.encoder.state_dict())
    method.encoder_only = True
    return method.eval()


def model_card(meta: dict) -> str:
    """README.md of an export: what is known about the run and how to load the folder."""
    cfg = meta["training_config"]
    lines = ["---", "library_name: codemae", "tags: [remote-sensing, sar, optical, self-supervised]", "---", "",
             f"# {meta['method']} encoder ({meta['backbone']})", "",
             f"Exported by codemae {meta['codemae_version']} ({meta['export_format']} format) from checkpoint "
             f"`{meta.get('checkpoint')}` at step {meta.get('step')}. Encoder only: no decoders or pretraining heads.",
             "", "| | |", "|---|---|",
             f"| image size / patch size | {meta['img_size']} / {meta['patch_size']} |",
             f"| width / blocks / heads | {meta['embed_dim']} / {meta['depth']} / {meta['num_heads']} |"]
    for m, c in meta["channels"].items():
        bands = meta["band_names"].get(m)
        lines.append(f"| {m} channels | {c} ({', '.join(bands) if bands else 'band names not recorded'}) |")
    for m, norm in meta["normalisation"].items():
        lines.append(f"| {m} normalisation | " + (f"mean {norm['mean']}, std {norm['std']}" if norm else "unknown")
                     + " |")
    lines += ["", f"Normalisation: {meta['normalisation_note']}.", "", "## Pretraining", ""]
    for s in meta["pretraining_sources"]:
        lines.append(f"- source `{s['name']}`: {s['kind']}, layout {s['layout']}, root `{s['root'] or '-'}`, "
                     f"statistics {s['stats']}")
    train = cfg.get("train", {})
    lines.append(f"- method `{meta['method']}`, {train.get('epochs')} epochs (max steps {train.get('max_steps')}), "
                 f"base lr {train.get('base_lr')}, seed {cfg.get('seed')}")
    summary = meta.get("run_summary")
    if summary:
        final = {k: round(v, 4) for k, v in (summary.get("final") or {}).items() if isinstance(v, float)}
        lines.append(f"- finished at step {summary.get('step')} of {summary.get('total_steps')} in "
                     f"{summary.get('seconds')} s on {summary.get('world_size')} process(es); last logged {final}")
    lines += ["", "## Use", ""]
    if meta["export_format"] == "timm":
        t = meta["timm"]
        lines += ["```python", "import timm, torch", "from safetensors.torch import load_file",
                  f"model = timm.create_model({t['model_name']!r}, pretrained=False, **{t['kwargs']!r})",
                  "model.load_state_dict(load_file('model.safetensors'), strict=True)",
                  f"mean, std = (torch.tensor(v).view(-1, 1, 1) for v in ({t['mean']}, {t['std']}))"
                  if t["mean"] else "mean, std = 0.0, 1.0  # the training statistics were not recorded",
                  f"features = model((x - mean) / std)  # x: {t['modality']} images in [0, 1]; (B, D) mean of the "
                  "final tokens", "```"]
    else:
        lines += ["```python", "import codemae", "encoder = codemae.load_encoder('THIS_FOLDER')",
                  "embedding = encoder(images, 'opt')  # raw [0, 1] images in; normalisation applied inside",
                  "tokens = encoder.tokens(images, 'opt')  # (B, N, D); encoder.encode({...}) for the pyramid",
                  "# hf format: codemae.export.ExportedEncoder.from_pretrained('THIS_FOLDER') (huggingface_hub)",
                  "```", "", "Outputs:", ""] + [f"- `{k}`: {v}" for k, v in meta["outputs"].items()]
    return "\n".join(lines) + "\n"
