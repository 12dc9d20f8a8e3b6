"""``codemae data check``: walk every source of a config without training and report.

Per source: samples found vs expected, complete pairs, image sizes, channel counts
and pixel types seen, unreadable files, split lists naming absent images, and
samples of a holdout split (a test set) that would leak into pretraining. Headers
are read, not pixels (``pixels=True`` decodes every image as training would).
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from codemae.config import Config, SourceConfig
from codemae.data.listing import (
    Listing,
    list_source,
    source_modalities,
    source_name,
    source_root,
)
from codemae.data.readers import Header, band_indices, read_header
from codemae.data.sources import load_source_image
from codemae.errors import DataError

SHOWN_PROBLEMS = 8  # per source; the rest are counted


@dataclass
class SourceReport:
    """What the check found in one source."""

    name: str
    layout: str
    kind: str
    samples: int = 0
    expected: int | None = None
    pairs: int | None = None
    sizes: Counter = field(default_factory=Counter)
    channels: dict[str, Counter] = field(default_factory=dict)
    dtypes: dict[str, Counter] = field(default_factory=dict)
    unreadable: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and not self.unreadable


def check_config(cfg: Config, pixels: bool = False, workers: int = 8) -> list[SourceReport]:
    return [check_source(s, cfg.model.channels, cfg.data.root, pixels, workers) for s in cfg.data.sources]


def check_source(cfg: SourceConfig, channels: dict[str, int], data_root: str = "", pixels: bool = False,
                 workers: int = 8) -> SourceReport:
    report = SourceReport(source_name(cfg), cfg.layout, cfg.kind, expected=cfg.expected)
    if cfg.kind == "synthetic":
        report.samples = cfg.synthetic.num_scenes
        return report
    if cfg.layout == "shards":
        return check_shards(cfg, data_root, pixels, report)
    listing = list_source(cfg, source_root(cfg, data_root))
    report.problems += listing.problems
    if listing.leaks:
        report.problems.append(f"{len(listing.leaks)} samples of holdout split(s) {', '.join(cfg.holdout)} would be "
                               f"pretrained on (first: '{listing.leaks[0]}'); exclude them")
    headers = read_headers(cfg, listing, channels, pixels, workers, report)
    report.pairs = len(listing.files) if listing.paired else None
    report.samples = count_samples(cfg, listing, headers, report)
    if cfg.expected is not None and report.samples != cfg.expected:
        report.problems.append(f"{report.samples} samples found, {cfg.expected} expected")
    for m in source_modalities(cfg):
        check_channels(cfg, m, channels[m], report)
    return report


def check_shards(cfg: SourceConfig, data_root: str, verify: bool, report: SourceReport) -> SourceReport:
    """A shard set: the manifest's counts, every local shard present at its size (and, with ``verify``,
    its SHA-256)."""
    from codemae.data.shards import is_url, join, read_manifest, sha256, shard_root

    root = shard_root(cfg, data_root)
    try:
        sources = [s for s in read_manifest(root) if not cfg.dataset or s.name == cfg.dataset]
    except DataError as err:
        report.problems.append(str(err))
        return report
    report.samples = sum(s.samples for s in sources)
    for source in sources:
        for shard in source.shards:
            if is_url(root):
                continue
            path = Path(join(root, shard.path))
            if not path.is_file() or path.stat().st_size != shard.bytes:
                report.problems.append(f"shard {path}: missing or not {shard.bytes} bytes as the manifest says")
            elif verify and sha256(path) != shard.sha256:
                report.problems.append(f"shard {path}: SHA-256 differs from the manifest (corrupt)")
    return report


def read_headers(cfg: SourceConfig, listing: Listing, channels: dict[str, int], pixels: bool, workers: int,
                 report: SourceReport) -> list[dict[str, Header]]:
    """Each sample's headers by modality (a sample with an unreadable file gets {})."""
    def one(files: dict[str, Path]) -> dict[str, Header] | str:
        try:
            headers = {m: read_header(path) for m, path in files.items()}
            if pixels:
                for m, path in files.items():
                    load_source_image(cfg, channels, m, path)
            return headers
        except DataError as err:
            return str(err)

    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = list(pool.map(one, listing.files))
    out = []
    for files, result in zip(listing.files, results):
        if isinstance(result, str):
            report.unreadable.append(result)
            out.append({})
            continue
        out.append(result)
        for m, header in result.items():
            report.channels.setdefault(m, Counter())[header.bands] += 1
            report.dtypes.setdefault(m, Counter())[header.dtype] += 1
        sizes = {(h.height, h.width) for h in result.values()}
        report.sizes[next(iter(sizes))] += 1
        if len(sizes) > 1:
            report.problems.append(f"pair sizes differ: {files['opt']} is {_wh(result['opt'])} but "
                                   f"{files['sar']} is {_wh(result['sar'])}")
    return out


def count_samples(cfg: SourceConfig, listing: Listing, headers: list[dict[str, Header]], report: SourceReport) -> int:
    """Samples the source yields: one per file, or its full tiles when ``tile`` is set."""
    if not cfg.tile:
        return len(listing.files)
    tiles = 0
    for found in headers:
        if found:
            h = next(iter(found.values()))
            tiles += max(h.height // cfg.tile, 1) * max(h.width // cfg.tile, 1)
    return tiles


def check_channels(cfg: SourceConfig, modality: str, expected: int, report: SourceReport) -> None:
    """Band counts seen against the configured channels (after band picks); pixel types against the scaling."""
    picks = getattr(cfg, f"{modality}_bands")
    names = getattr(cfg, f"{modality}_band_names")
    for bands in report.channels.get(modality, {}):
        try:
            have = len(band_indices(picks, names, bands, f"{report.name} {modality}")) if picks else bands
        except DataError as err:
            report.problems.append(f"{err} ({report.channels[modality][bands]} files)")
            continue
        replicated = have == 1 and modality == "sar"  # one SAR band is replicated; a grayscale optical image is not
        if have != expected and not replicated and not (expected == 1 and have == 3):  # 3 identical bands collapse
            report.problems.append(f"{report.channels[modality][bands]} {modality} files have {have} channels but "
                                   f"config key 'model.{modality}_channels' is {expected}")
    dtypes = report.dtypes.get(modality, Counter())
    wanted = getattr(cfg, f"{modality}_scaling").dtype
    if wanted and set(dtypes) - {wanted}:
        report.problems.append(f"{modality} pixel types {dict(dtypes)} but {modality}_scaling.dtype is {wanted}")
    elif len(dtypes) > 1:
        report.problems.append(f"mixed {modality} pixel types {dict(dtypes)}: set {modality}_scaling.dtype "
                               "so the odd files are refused rather than scaled differently")


def print_check(reports: list[SourceReport]) -> bool:
    """Print the table, then every source's problems; return whether all is clean."""
    rows = [("source", "layout", "kind", "samples", "expected", "pairs", "sizes", "channels", "dtypes",
             "unreadable", "status")]
    for r in reports:
        rows.append((r.name, r.layout, r.kind, str(r.samples), _opt(r.expected), _opt(r.pairs), _top(r.sizes),
                     _per_modality(r.channels), _per_modality(r.dtypes), str(len(r.unreadable)),
                     "ok" if r.ok else f"{len(r.problems) + len(r.unreadable)} problems"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    bad = [r for r in reports if not r.ok]
    for r in bad:
        print(f"\n{r.name}:")
        issues = r.unreadable + r.problems
        for line in issues[:SHOWN_PROBLEMS]:
            print(f"  - {line}")
        if len(issues) > SHOWN_PROBLEMS:
            print(f"  ... and {len(issues) - SHOWN_PROBLEMS} more")
    total = sum(r.samples for r in reports)
    count = sum(len(r.problems) + len(r.unreadable) for r in reports)
    print(f"\ndata check: {len(reports)} sources, {total} samples, "
          + (f"{count} problems in {len(bad)} source(s)" if bad else "no problems"))
    return not bad


def _opt(value: int | None) -> str:
    return "-" if value is None else str(value)


def _wh(header: Header) -> str:
    return f"{header.width}x{header.height}"


def _top(sizes: Counter) -> str:
    if not sizes:
        return "-"
    shown = ", ".join(f"{w}x{h}" + ("" if len(sizes) == 1 else f" ({n})") for (h, w), n in sizes.most_common(2))
    return shown + (f", +{len(sizes) - 2} more" if len(sizes) > 2 else "")


def _per_modality(counts: dict[str, Counter]) -> str:
    return " ".join(f"{m}:{'/'.join(str(k) for k in sorted(c))}" for m, c in counts.items()) or "-"
