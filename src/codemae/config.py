"""Typed config schema, YAML loading, dotted command-line overrides and validation.

A config is a tree of dataclasses. YAML files and ``key.sub=value`` overrides are
merged into plain dicts first, then converted into the dataclasses in one pass that
checks every key and value; the first problem raises :class:`ConfigError` naming
the dotted key. Configs are data only: nothing is imported or instantiated from
strings in them.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from codemae.batch import Geometry
from codemae.errors import ConfigError

SourceKind = Literal["paired", "opt", "sar", "synthetic"]
SourceLayout = Literal["folder", "reference", "shards"]


@dataclass
class ScalingConfig:
    """How raw pixel values of one modality map to [0, 1].

    ``auto``: 8-bit integers / 255, 16-bit integers / ``max_value``, floats as-is.
    ``db``: float decibels clipped to ``db_range`` and rescaled.
    ``linear``: decibels converted to linear power, clipped at ``max_value``, rescaled.
    ``dtype``: the pixel type every file must have (``uint8``, ``uint16``, ...); a file of
    another type (a 16-bit PNG among 8-bit ones) is refused instead of scaled differently.
    """

    mode: Literal["auto", "db", "linear"] = "auto"
    db_range: list[float] = field(default_factory=lambda: [-25.0, 0.0])
    max_value: float = 10000.0
    dtype: Optional[str] = None


@dataclass
class SyntheticConfig:
    """Knobs of the generated paired scenes (see :mod:`codemae.data.synthetic`)."""

    num_scenes: int = 512
    image_size: int = 128
    speckle_looks: float = 4.0
    marking_density: float = 0.5
    cloud_cover: float = 0.0
    misregistration: int = 0


@dataclass
class GivenStats:
    """Normalisation statistics written into the config (``stats: given``), on [0, 1] values.
    One value stands for every channel (the reference code's SAR statistics)."""

    opt_mean: list[float] = field(default_factory=list)
    opt_std: list[float] = field(default_factory=list)
    sar_mean: list[float] = field(default_factory=list)
    sar_std: list[float] = field(default_factory=list)


@dataclass
class SourceConfig:
    """One pretraining source of a mixture.

    Layouts: ``folder`` (``<root>/opt`` + ``<root>/sar`` for pairs, any image tree for one
    modality; ``split`` picks a split of a CSV), ``reference`` (the reference code's
    ``<root>/<dataset>/{RGB,SAR}/<name>.png`` with ``{train,val,test}.txt`` lists, chosen by
    ``splits`` and ``exclude``), ``shards`` (a ``codemae shard`` output folder or URL).
    ``holdout`` lists must never reach pretraining (``codemae data check`` reports a leak).
    ``weight`` scales the source's share of an epoch (0.5: a random half each epoch, 2:
    every sample twice). Bands are picked by index or name (``opt_band_names``; Sentinel-2
    and Sentinel-1 names are known by band count). ``tile`` cuts each image into
    non-overlapping tiles of that many pixels, one sample each. ``opt_dir``/``sar_dir``
    rename the modality folders (defaults ``opt``/``sar``, ``RGB``/``SAR`` in the reference
    layout); ``stem_replace`` items ``old=new`` rewrite file stems before pairing (SEN12MS-CR
    names its pairs ``..._s1_...`` and ``..._gt_...``).
    """

    name: str = ""
    kind: SourceKind = "paired"
    layout: SourceLayout = "folder"
    root: str = ""
    dataset: str = ""
    opt_dir: str = ""
    sar_dir: str = ""
    stem_replace: list[str] = field(default_factory=list)
    split: Optional[str] = None
    split_csv: Optional[str] = None
    splits: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    holdout: list[str] = field(default_factory=lambda: ["test"])
    weight: float = 1.0
    expected: Optional[int] = None
    stats: str = "auto"
    given: GivenStats = field(default_factory=GivenStats)
    seed: int = 0
    opt_bands: list[str] = field(default_factory=list)
    sar_bands: list[str] = field(default_factory=list)
    opt_band_names: list[str] = field(default_factory=list)
    sar_band_names: list[str] = field(default_factory=list)
    tile: Optional[int] = None
    opt_scaling: ScalingConfig = field(default_factory=ScalingConfig)
    sar_scaling: ScalingConfig = field(default_factory=ScalingConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class DataConfig:
    """The pretraining mixture and its loading. ``root`` is the folder relative source roots
    are resolved against; ``on_error`` decides what an unreadable sample does: ``raise``
    stops with the file named, ``skip`` replaces it with the next readable sample of its
    source and counts it (logged per epoch)."""

    sources: list[SourceConfig] = field(default_factory=list)
    kinds: list[SourceKind] = field(default_factory=lambda: ["paired", "opt", "sar", "synthetic"])
    root: str = ""
    on_error: Literal["raise", "skip"] = "raise"
    shuffle_buffer: int = 1000  # shards: samples held per stream for shuffling
    batch_size: int = 32
    num_workers: int = 2
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 4.0 / 3.0])
    hflip: bool = True
    stats_samples: int = 256


@dataclass
class ModelConfig:
    """Backbone: a preset name plus optional overrides of its widths and depths."""

    backbone: str = "hivit_tiny"
    img_size: int = 224
    patch_size: int = 16
    opt_channels: int = 3
    sar_channels: int = 1
    drop_path: float = 0.0
    embed_dim: Optional[int] = None
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    pyramid_dim: Optional[int] = None
    pyramid: bool = True  # HiViT's iTPN pyramid; off for the published classifiers, whose one level is the tokens
    # "published": resample the position table as the published models do in masked forwards (see
    # Backbone.pos_for); on for runs in the published layout (codemae_base.yaml, converted checkpoints)
    pos_interp: Literal["exact", "published"] = "exact"
    # encoder initialisation from a file before pretraining: "itpn-imagenet:<path>" (the paper's
    # ImageNet-1K iTPN weights) or "codemae:<checkpoint>" (another run's encoder)
    init: Optional[str] = None

    @property
    def channels(self) -> dict[str, int]:
        """Input channels per modality, as the patch embeddings take them."""
        return {"opt": self.opt_channels, "sar": self.sar_channels}

    @property
    def geometry(self) -> Geometry:
        """What the data pipeline needs to know of the model."""
        return Geometry(self.img_size, self.patch_size, self.channels)


SAT_MEAN = [0.430, 0.411, 0.296]  # DINOv3-Sat input normalisation
SAT_STD = [0.213, 0.156, 0.143]


@dataclass
class TeacherConfig:
    """The frozen OKD teacher (loaded from local files only) or its feature cache.

    ``hf``: a Hugging Face-format directory (``DINOv3ViTModel``, needs the
    ``teacher`` extra); ``hub``: a local clone of the DINOv3 repository (``path``)
    plus a weights file (``weights``) via ``torch.hub.load(source='local')``, which runs that
    folder's ``hubconf.py`` (configs with hub teachers must be trusted like code);
    ``checkpoint``: a codemae checkpoint's encoder. ``cache``: a folder written by
    ``codemae teacher-cache``; when set, pretraining reads features from it and
    never runs the teacher.
    """

    kind: Literal["none", "hf", "hub", "checkpoint"] = "none"
    path: str = ""
    weights: str = ""
    hub_model: str = "dinov3_vitl16"
    dim: int = 1024
    mean: list[float] = field(default_factory=lambda: list(SAT_MEAN))
    std: list[float] = field(default_factory=lambda: list(SAT_STD))
    input_size: Optional[int] = None
    cache: str = ""


@dataclass
class LossWeights:
    recon: float = 1.0
    okd: float = 1.0
    ccl: float = 1.0
    cdr: float = 1.0


@dataclass
class MethodConfig:
    """The pretraining method. ``mae`` is the joint-MAE baseline; ``codemae`` adds the
    switches below (each off reproduces the corresponding ablation row)."""

    name: Literal["mae", "codemae", "fusmae"] = "mae"
    mask_ratio: float = 0.75
    sar_mask_ratio: Optional[float] = None  # independent masking only; None: mask_ratio
    masking: Literal["consistent", "independent"] = "consistent"
    encoder: Literal["shared", "independent"] = "shared"
    decoder: Literal["shared", "independent"] = "shared"
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    norm_pix_loss: bool = True
    okd: bool = False
    okd_aux_block: Optional[int] = None  # None: int(0.75 * depth), the published tap
    okd_aux_depth: int = 2
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    ccl: Literal["none", "vanilla", "linear", "mlp", "cross_attention"] = "none"
    ccl_temperature: float = 0.07
    ccl_input: Literal["decoder", "encoder"] = "decoder"  # encoder: rigid alignment on raw encoder embeddings
    # exact: the full-batch gradient across processes; local: the published code's, through each
    # process's own query rows only (equal on one process; about half the norm at 8 GPUs x 128)
    ccl_gradient: Literal["exact", "local"] = "exact"
    cdr: bool = False
    cdr_direction: Literal["sar_to_opt", "both"] = "sar_to_opt"
    cdr_target: Literal["gray", "rgb", "spatial", "hog", "mgf"] = "gray"
    cdr_depth: Optional[int] = None
    # the published decoders fill every pyramid level with the mask token before summing the levels,
    # so a masked position carries one token per level; false: one token in all
    mask_token_per_level: bool = True
    weights: LossWeights = field(default_factory=LossWeights)
    fusion: Literal["xad", "xaed"] = "xaed"

    @property
    def mask_ratios(self) -> dict[str, float]:
        sar = self.mask_ratio if self.sar_mask_ratio is None else self.sar_mask_ratio
        return {"opt": self.mask_ratio, "sar": sar}


@dataclass
class TrainConfig:
    epochs: int = 800
    max_steps: Optional[int] = None
    max_minutes: Optional[float] = None  # stop (and checkpoint) once this process has trained this long
    warmup_epochs: float = 15.0
    base_lr: float = 1.5e-4
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    accum_steps: int = 1
    clip_grad: Optional[float] = None
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on a CPU
    compile: bool = False  # torch.compile the transformer blocks (eager, with the reason logged, where it cannot)
    on_nonfinite: Literal["stop", "skip"] = "stop"  # a NaN/inf loss or gradient: stop, or skip the update
    dist_timeout_s: int = 600  # a collective waiting this long for a dead or hung peer fails the run
    device: Literal["auto", "cpu", "cuda"] = "auto"
    ckpt_every: int = 500
    log_every: int = 10
    progress: bool = True
    # check: resuming refuses a config that differs from the run's in anything but RESUME_SAFE keys;
    # force: resume anyway
    resume: Literal["check", "force"] = "check"


@dataclass
class Config:
    run_dir: str = "runs/default"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (or the defaults), apply ``key=value`` overrides, validate."""
    raw = read_yaml(Path(path)) if path is not None else {}
    for item in overrides:
        apply_override(raw, item)
    cfg = from_dict(Config, raw)
    cfg.data.sources = [s for s in cfg.data.sources if s.kind in cfg.data.kinds]
    validate(cfg)
    return cfg


MAX_CONFIG_BYTES = 1 << 20  # a config larger than 1 MiB is not a config
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases: ``*ref`` is refused (an alias bomb expands a few bytes into
    gigabytes, and configs have no need of aliases)."""

    def compose_node(self, parent, index):  # noqa: ANN001, ANN201 (PyYAML's signature)
        if self.check_event(yaml.AliasEvent):
            raise yaml.YAMLError("YAML aliases (*name) are not allowed in configs")
        return super().compose_node(parent, index)


def parse_yaml(text: str, where: str) -> Any:
    """YAML text as data; errors name ``where`` and the line, never quote the text."""
    try:
        return yaml.load(text, Loader=ConfigLoader)  # noqa: S506 (a SafeLoader subclass)
    except RecursionError as err:
        raise ConfigError(f"{where}: nested too deeply to be a config") from err
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        reason = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where} is not valid YAML{at}: {reason}") from err


def read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML config as a dict; a top-level ``base: <path>`` (relative to the file) is
    read first and this file's keys are merged over it, section by section. A file that is
    not shaped like a config is refused without quoting it (it may be any file on the machine)."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"config file {path}: 'base' chain loops back to itself")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is larger than {MAX_CONFIG_BYTES} bytes: not a config")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} cannot be read as text") from err
    raw = parse_yaml(text, f"config file {path}") or {}
    if not isinstance(raw, dict) or not all(isinstance(k, str) and IDENTIFIER.fullmatch(k) for k in raw):
        raise ConfigError(f"config file {path} is not a codemae config (its top level is not a mapping of keys)")
    base = raw.pop("base", None)
    if base is None:
        return raw
    return deep_merge(read_yaml(path.parent / str(base), seen + (path.resolve(),)), raw)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` merged into a copy of ``base``; nested mappings merge, anything else replaces."""
    out = dict(base)
    for key, value in over.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def shown(value: Any, limit: int = 60) -> str:
    """A value for an error message, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _require(ok: bool, key: str, message: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {message}, got {shown(value)}")


def validate(cfg: Config) -> None:
    """Value checks the types alone cannot express; the first failure names its key."""
    positive = {
        "model.img_size": cfg.model.img_size, "model.patch_size": cfg.model.patch_size,
        "model.opt_channels": cfg.model.opt_channels, "model.sar_channels": cfg.model.sar_channels,
        "method.decoder_dim": cfg.method.decoder_dim, "method.decoder_heads": cfg.method.decoder_heads,
        "data.batch_size": cfg.data.batch_size, "data.stats_samples": cfg.data.stats_samples,
        "data.shuffle_buffer": cfg.data.shuffle_buffer,
        "train.epochs": cfg.train.epochs, "train.accum_steps": cfg.train.accum_steps,
        "train.ckpt_every": cfg.train.ckpt_every, "train.dist_timeout_s": cfg.train.dist_timeout_s, "train.log_every": cfg.train.log_every,
        "train.base_lr": cfg.train.base_lr,
    }
    for key, value in positive.items():
        _require(value > 0, key, "must be positive", value)
    validate_bounds(cfg)
    for key, ratio in (("mask_ratio", cfg.method.mask_ratio), ("sar_mask_ratio", cfg.method.sar_mask_ratio)):
        _require(ratio is None or 0.0 <= ratio < 1.0, f"method.{key}", "must be in [0, 1)", ratio)
    _require(cfg.method.sar_mask_ratio is None or cfg.method.masking == "independent", "method.sar_mask_ratio",
             "needs method.masking=independent", cfg.method.sar_mask_ratio)
    _require(cfg.data.num_workers >= 0, "data.num_workers", "must be >= 0", cfg.data.num_workers)
    _require(cfg.train.warmup_epochs >= 0, "train.warmup_epochs", "must be >= 0", cfg.train.warmup_epochs)
    _require(cfg.train.max_steps is None or cfg.train.max_steps > 0, "train.max_steps", "must be positive",
             cfg.train.max_steps)
    _require(cfg.train.max_minutes is None or (math.isfinite(cfg.train.max_minutes) and cfg.train.max_minutes > 0),
             "train.max_minutes", "must be a positive number (or unset)", cfg.train.max_minutes)
    _require(0.0 <= cfg.model.drop_path < 1.0, "model.drop_path", "must be in [0, 1)", cfg.model.drop_path)
    crops = (("data.crop_scale", cfg.data.crop_scale, 1.0), ("data.crop_ratio", cfg.data.crop_ratio, None))
    for key, pair, upper in crops:
        ok = len(pair) == 2 and 0 < pair[0] <= pair[1] and (upper is None or pair[1] <= upper)
        _require(ok, key, "must be [low, high] with 0 < low <= high" + (" <= 1" if upper else ""), pair)
    _require(cfg.method.ccl_temperature > 0, "method.ccl_temperature", "must be positive", cfg.method.ccl_temperature)
    _require(cfg.method.okd_aux_depth >= 0, "method.okd_aux_depth", "must be >= 0", cfg.method.okd_aux_depth)
    extras = [k for k, on in (("okd", cfg.method.okd), ("ccl", cfg.method.ccl != "none"), ("cdr", cfg.method.cdr)) if on]
    _require(cfg.method.name == "codemae" or not extras, "method.name", f"{'/'.join(extras)} need 'codemae'",
             cfg.method.name)
    betas = cfg.train.betas
    _require(len(betas) == 2 and all(0 <= b < 1 for b in betas), "train.betas", "must be two values in [0, 1)", betas)
    for i, source in enumerate(cfg.data.sources):
        validate_source(source, f"data.sources.{i}")


# upper bounds: a config (a user's, or one stored in a checkpoint or export) beyond them is refused
# before anything is allocated; each is far beyond any real setting
BOUNDS = {
    "model.img_size": 8192, "model.patch_size": 512, "model.opt_channels": 256, "model.sar_channels": 256,
    "model.embed_dim": 16384, "model.depth": 512, "model.num_heads": 1024, "model.pyramid_dim": 16384,
    "method.decoder_dim": 16384, "method.decoder_depth": 512, "method.decoder_heads": 1024,
    "method.cdr_depth": 512, "method.okd_aux_depth": 64, "method.teacher.dim": 16384,
    "data.batch_size": 65536, "data.num_workers": 256, "data.stats_samples": 10_000_000,
    "data.shuffle_buffer": 1_000_000, "train.epochs": 1_000_000, "train.accum_steps": 65536,
}
MAX_PARAMETERS = 20e9  # a model estimated larger than this is refused before it is built


def setting(cfg: Config, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def validate_bounds(cfg: Config) -> None:
    """Upper bounds, sane signs and finite numbers; a rough parameter count against ``MAX_PARAMETERS``."""
    for key, limit in BOUNDS.items():
        value, low = setting(cfg, key), 0 if key in ("data.num_workers", "method.okd_aux_depth") else 1
        _require(value is None or low <= value <= limit, key, f"must be in [{low}, {limit}]", value)
    t = cfg.train
    finite = {"train.base_lr": t.base_lr, "train.min_lr": t.min_lr, "train.weight_decay": t.weight_decay,
              "train.warmup_epochs": t.warmup_epochs}
    for key, value in finite.items():
        _require(math.isfinite(value) and value >= 0, key, "must be a finite number >= 0", value)
    _require(t.clip_grad is None or (math.isfinite(t.clip_grad) and t.clip_grad > 0), "train.clip_grad",
             "must be a positive number (or unset)", t.clip_grad)
    _require(0 <= cfg.seed < 2**63, "seed", "must be in [0, 2^63)", cfg.seed)
    m = cfg.model
    width = m.embed_dim or 1024
    estimate = 12 * width**2 * (m.depth or 48) + cfg.method.decoder_depth * 12 * cfg.method.decoder_dim**2
    _require(estimate <= MAX_PARAMETERS, "model.embed_dim",
             f"with these widths and depths the model has about {estimate / 1e9:.0f}G parameters, over the "
             f"{MAX_PARAMETERS / 1e9:.0f}G limit", width)
    for i, source in enumerate(cfg.data.sources):
        _require(math.isfinite(source.weight) and source.weight <= 1000, f"data.sources.{i}.weight",
                 "must be a finite number <= 1000", source.weight)


def validate_source(source: SourceConfig, where: str) -> None:
    """Checks of one source's settings; keys are reported under ``where``."""
    synthetic = source.kind == "synthetic"
    _require(synthetic or bool(source.root or source.dataset), f"{where}.root", "is required for a folder source",
             source.root)
    _require(not synthetic or source.layout == "folder", f"{where}.layout", "synthetic sources have no layout",
             source.layout)
    _require(all("=" in item for item in source.stem_replace), f"{where}.stem_replace",
             "items must be 'old=new'", source.stem_replace)
    _require(source.weight > 0, f"{where}.weight", "must be positive", source.weight)
    _require(source.tile is None or source.tile > 0, f"{where}.tile", "must be positive", source.tile)
    _require(source.layout == "reference" or not (source.splits or source.exclude), f"{where}.splits",
             "split lists (splits/exclude) belong to the reference layout; use 'split' with a split CSV", source.splits)
    _require(source.layout == "folder" or source.split is None, f"{where}.split",
             "a split CSV belongs to the folder layout; use 'splits'/'exclude' lists", source.split)
    if source.stats == "given":
        modalities = ("opt", "sar") if source.kind in ("paired", "synthetic") else (source.kind,)
        for m in modalities:
            mean, std = getattr(source.given, f"{m}_mean"), getattr(source.given, f"{m}_std")
            _require(bool(mean) and len(mean) == len(std) and all(v > 0 for v in std), f"{where}.given.{m}_mean",
                     f"stats: given needs {m}_mean and {m}_std of equal length, std > 0", [mean, std])
    for name in ("opt_scaling", "sar_scaling"):
        bounds = getattr(source, name).db_range
        _require(len(bounds) == 2 and bounds[0] < bounds[1], f"{where}.{name}.db_range",
                 "must be [low, high] with low < high", bounds)


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set ``a.b.c=value`` in a nested dict; the value is parsed as YAML (``1e-4``, ``[1, 2]``).

    A numeric path component indexes a list (``data.sources.0.root=...``).
    """
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override '{item}' is not of the form key=value")
    try:
        value = parse_yaml(text, f"override '{key}'")
    except ConfigError:
        value = text
    parts = key.split(".")
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            node = _list_item(node, part, where)
        else:
            node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"config key '{where}' is not a section")
    if isinstance(node, list):
        index = _index(node, parts[-1], key)
        node[index] = value
    else:
        node[parts[-1]] = value


def _index(items: list, part: str, where: str) -> int:
    if not part.isdigit() or int(part) >= len(items):
        raise ConfigError(f"config key '{where}': no list item {part!r} (the list has {len(items)})")
    return int(part)


def _list_item(items: list, part: str, where: str) -> Any:
    return items[_index(items, part, where)]


def from_dict(cls: type, raw: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from ``raw``, checking every key and value type."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config key '{where or '<root>'}': expected a mapping, got {shown(raw)}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            full = f"{where}.{key}" if where else str(key)
            near = nearest_key(cls, str(key))
            hint = f" (did you mean {where + '.' if where else ''}{near}?)" if near else ""
            raise ConfigError(f"unknown config key '{shown(full)[1:-1]}'{hint}")
    kwargs = {key: _convert(hints[key], value, f"{where}.{key}" if where else key) for key, value in raw.items()}
    return cls(**kwargs)


def schema_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of dataclass ``cls``, nested sections included (list items not)."""
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        keys.append(prefix + f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            keys += schema_keys(hints[f.name], f"{prefix}{f.name}.")
    return keys


def nearest_key(cls: type, key: str) -> str | None:
    """The valid key of ``cls`` closest to a misspelt ``key``: a sibling (``epoch`` -> ``epochs``), else a
    key of a nested section with that name (``epochs`` at the top -> ``train.epochs``); None if none is close."""
    near = difflib.get_close_matches(key, [f.name for f in dataclasses.fields(cls)], n=1)
    if near:
        return near[0]
    leaves: dict[str, str] = {}
    for dotted in schema_keys(cls):
        leaves.setdefault(dotted.rsplit(".", 1)[-1], dotted)
    near = difflib.get_close_matches(key, list(leaves), n=1)
    return leaves[near[0]] if near else None


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        inner = [o for o in options if o is not type(None)]
        return _convert(inner[0], value, where)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"config key '{where}': {shown(value)} is not one of {', '.join(map(str, allowed))}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{where}': expected a list, got {shown(value)}")
        return [_convert(item_tp, v, f"{where}.{i}") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{where}': expected true or false, got {shown(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{where}': expected an integer, got {shown(value)}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{where}': expected a number, got {shown(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"config key '{where}': expected a string, got {shown(value)}")
        return str(value)
    raise TypeError(f"unsupported config type {tp} at {where}")


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain data (YAML- and checkpoint-safe)."""
    return dataclasses.asdict(cfg)
