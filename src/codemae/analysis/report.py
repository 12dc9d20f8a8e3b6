"""Figures and the HTML report of one checkpoint (``analyze``) or several side by side (``compare``)."""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from codemae.analysis.collect import Collected, Reconstructed
from codemae.analysis.measures import Binned, bin_by, effective_rank, project_2d, singular_spectrum

MODALITY_NAMES = {"opt": "optical", "sar": "SAR"}

SECTIONS = ("Summary", "Singular value spectrum", "Paired embeddings", "Alignment vs heterogeneity", "Reconstructions")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, ax, out: Path) -> None:
    """Grid, legend, tight layout, PNG, close."""
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    _plt().close(fig)


@dataclass
class Analysis:
    """One checkpoint's measures, ready for figures and tables."""

    name: str
    collected: Collected
    spectra: dict[str, Tensor]
    ranks: dict[str, float]
    binned: Binned

    @classmethod
    def of(cls, name: str, c: Collected, bins: int = 10) -> Analysis:
        joint = torch.cat([c.opt, c.sar])
        embeddings = {"optical": c.opt, "SAR": c.sar, "joint": joint}
        return cls(name, c, {k: singular_spectrum(v) for k, v in embeddings.items()},
                   {k: effective_rank(v, centre=True) for k, v in embeddings.items()}, bin_by(c.ssim, c.alignment, bins))

    def summary(self) -> dict[str, float]:
        c = self.collected
        return {**{f"effective rank ({k})": v for k, v in self.ranks.items()},
                "mean patch alignment (cosine)": float(c.alignment.mean()),
                "alignment vs SSIM slope": self.binned.slope,
                **{f"{what} ({MODALITY_NAMES[m]}{f', {where}' if where else ''})": v
                   for where, r in c.reconstruction_sets()
                   for what, ratios in (("recon error / flattened-recon error", r.error_ratio),
                                        ("smooth-field reference", r.reference_ratio)) for m, v in ratios.items()},
                "pairs": len(c.opt)}


def plot_spectra(analyses: list[Analysis], out: Path, keys: tuple[str, ...]) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for a in analyses:
        for key in keys:
            label = f"{a.name}: {key} (erank {a.ranks[key]:.1f})" if len(analyses) > 1 else \
                f"{key} (erank {a.ranks[key]:.1f})"
            ax.plot(np.arange(1, len(a.spectra[key]) + 1), a.spectra[key].numpy(), label=label)
    ax.set_yscale("log")
    ax.set_xlabel("singular value index")
    ax.set_ylabel("singular value / largest")
    ax.set_title("normalised singular value spectrum of the mean-pooled embeddings")
    _save(fig, ax, out)


def plot_projection(a: Analysis, out: Path) -> str:
    plt = _plt()
    c = a.collected
    points, how = project_2d(torch.cat([c.opt, c.sar]).numpy())
    n = len(c.opt)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for i in range(n):
        ax.plot(points[[i, n + i], 0], points[[i, n + i], 1], color="0.75", linewidth=0.5, zorder=1)
    ax.scatter(points[:n, 0], points[:n, 1], s=10, label="optical", zorder=2)
    ax.scatter(points[n:, 0], points[n:, 1], s=10, label="SAR", zorder=2)
    ax.set_title(f"paired embeddings ({how.split(' ')[0]}), a line per pair")
    _save(fig, ax, out)
    return how


def plot_alignment(analyses: list[Analysis], out: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for k, a in enumerate(analyses):
        b, colour = a.binned, f"C{k}"
        if len(analyses) == 1:
            c = a.collected
            pick = torch.randperm(c.ssim.numel(), generator=torch.Generator().manual_seed(0))[:3000]
            ax.scatter(c.ssim.flatten()[pick], c.alignment.flatten()[pick], s=3, alpha=0.25, color="0.6",
                       label="patches")
        ax.errorbar(b.centres, b.means, yerr=b.stds, marker="o", capsize=3, color=colour,
                    label=f"{a.name} binned mean +- std")
        xs = np.array([min(b.centres), max(b.centres)])
        ax.plot(xs, b.slope * xs + b.intercept, linestyle="--", color=colour,
                label=f"{a.name} trend (slope {b.slope:.3f})")
    ax.set_xlabel("SSIM of the optical (grayscale) and SAR input patches")
    ax.set_ylabel("patch cosine, optical vs SAR")
    ax.set_title("patch-level alignment vs heterogeneity")
    _save(fig, ax, out)


def _show(x: Tensor) -> np.ndarray:
    """(C, H, W) normalised image -> displayable (H, W[, 3]) in [0, 1], each image min-max scaled."""
    x = x.float()
    x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-6)
    return x[0].numpy() if x.shape[0] != 3 else x.permute(1, 2, 0).numpy()


def _masked(x: Tensor, mask: Tensor, patch: int) -> Tensor:
    grid = x.shape[-1] // patch
    keep = (1 - mask).reshape(grid, grid).repeat_interleave(patch, 0).repeat_interleave(patch, 1)
    return x * keep + x.min() * (1 - keep)


def plot_reconstructions(r: Reconstructed, out: Path, patch: int) -> bool:
    """Rows of images: per modality the input, masked input and self-reconstruction, and CDR from SAR if
    present; False (nothing drawn) for a method without pixel decoder."""
    if not r.shown:
        return False
    plt = _plt()
    s = r.shown
    columns = [column for m in ("opt", "sar") if f"{m}_recon" in s for column in (
        (MODALITY_NAMES[m], lambda i, m=m: r.inputs[m][i]),
        (f"{MODALITY_NAMES[m]} masked", lambda i, m=m: _masked(r.inputs[m][i], s[f"{m}_mask"][i], patch)),
        (f"{MODALITY_NAMES[m]} reconstructed", lambda i, m=m: s[f"{m}_recon"][i]))]
    if "cdr_recon" in s:
        columns.append(("CDR: optical target from SAR", lambda i: s["cdr_recon"][i]))
    rows = len(next(iter(r.inputs.values())))
    fig, axes = plt.subplots(rows, len(columns), figsize=(1.9 * len(columns), 1.9 * rows), squeeze=False)
    for i in range(rows):
        for j, (title, image) in enumerate(columns):
            ax = axes[i][j]
            ax.imshow(_show(image(i)), cmap="gray")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return True


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto;line-height:1.45}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
th:first-child,td:first-child{{text-align:left}}img{{max-width:100%}}nav a{{margin-right:1em}}</style></head>
<body>
<h1>{title}</h1>
<nav>{nav}</nav>
{body}
<script>
window.addEventListener("load", () => {{
  const imgs = [...document.images];
  const broken = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute("src"));
  document.body.dataset.imagesTotal = imgs.length;
  document.body.dataset.imagesBroken = broken.join(" ");
  document.body.dataset.checked = "yes";
}});
</script>
</body></html>
"""


def _section(title: str, content: str) -> str:
    anchor = title.lower().replace(" ", "-")
    return f'<section id="{anchor}"><h2>{html.escape(title)}</h2>\n{content}\n</section>'


def _table(rows: list[dict], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else html.escape(str(v))  # noqa: E731
    body = "".join("<tr>" + "".join(f"<td>{fmt(r.get(c, '-'))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def unpaired_note(c: Collected) -> str:
    """The summary's sentence on the unpaired images reconstructed too, if any."""
    if c.images is None or not c.images.error_ratio:
        return ""
    return (f" Reconstructions also of {c.images.count} unpaired images of {html.escape(c.images_name)}, "
            "normalised with their own statistics (the columns named after them).")


def write_report(analyses: list[Analysis], out: Path, source_name: str, patch: int) -> Path:
    """PNGs, ``report.json`` and ``index.html`` in ``out``; returns the HTML path."""
    out.mkdir(parents=True, exist_ok=True)
    single = len(analyses) == 1
    plot_spectra(analyses, out / "spectrum.png", ("optical", "SAR", "joint") if single else ("joint",))
    plot_alignment(analyses, out / "alignment.png")
    rows = [{"checkpoint": a.name, **a.summary()} for a in analyses]
    projections, recon = [], []
    for k, a in enumerate(analyses):
        how = plot_projection(a, out / f"embeddings_{k}.png")
        projections.append(f"<h3>{html.escape(a.name)}</h3><p>{html.escape(how)}.</p>"
                           f'<img src="embeddings_{k}.png" alt="paired embeddings of {html.escape(a.name)}">')
        recon.append(f"<h3>{html.escape(a.name)}</h3>")
        for where, r in a.collected.reconstruction_sets():
            what, png = (where, f"reconstructions_{k}_images.png") if where else ("pairs", f"reconstructions_{k}.png")
            recon.append(f'<img src="{png}" alt="reconstructions of {html.escape(a.name)}, {html.escape(what)}">'
                         if plot_reconstructions(r, out / png, patch) else
                         f"<p>No reconstructions of the {html.escape(what)}: this checkpoint has no pixel decoder "
                         "(Fus-MAE) or left it out (an export).</p>")
    columns = list(dict.fromkeys(c for r in rows for c in r))  # an export has no reconstruction columns
    body = [
        _section(SECTIONS[0], f"<p>{len(analyses[0].collected.opt)} pairs of {html.escape(source_name)}; each "
                 "modality encoded on its own, tokens mean-pooled." + unpaired_note(analyses[0].collected)
                 + " <a href=\"report.json\">report.json</a> holds every number.</p>" + _table(rows, columns)),
        _section(SECTIONS[1], "<p>Singular values of the centred embedding matrix, divided by the largest; the "
                 "effective rank is exp of the entropy of the normalised singular values. A fast decay means "
                 "dimensional collapse.</p><img src=\"spectrum.png\" alt=\"singular value spectrum\">"),
        _section(SECTIONS[2], "".join(projections)),
        _section(SECTIONS[3], "<p>Per patch location: cosine similarity of the optical and SAR patch embeddings "
                 "against the SSIM of the grayscale optical and SAR input patches, in equal-count bins, with the "
                 "least-squares trend.</p><img src=\"alignment.png\" alt=\"alignment vs SSIM\">"),
        _section(SECTIONS[4], "<p>Masked patches are predicted, visible ones copied; a model trained on "
                 "normalised patches (norm-pix) has its predictions mapped back with each target patch's mean and "
                 "variance, as MAE visualises them. <i>recon error / flattened-recon error</i> in the table: the "
                 "squared error over every masked patch of all images, divided by that of the same reconstruction "
                 "flattened to its own patch means; below 1 the structure predicted inside the masked patches is "
                 "real (it brings the prediction closer to the image than flat patches at the same levels). "
                 "<i>smooth-field reference</i>: the same ratio for a field interpolated through each image's true "
                 "patch means (all patches), the structure that knowing every patch's level implies. A model on "
                 "pixel targets also gets the levels wrong, so a ratio near the reference is good; a norm-pix "
                 "model is mapped back with each target patch's true mean and spread, which flatters it.</p>"
                 + "".join(recon)),
    ]
    nav = "".join(f'<a href="#{s.lower().replace(" ", "-")}">{s}</a>' for s in SECTIONS)
    title = "codemae analysis: " + (analyses[0].name if single else f"{len(analyses)} checkpoints compared")
    (out / "report.json").write_text(json.dumps({"source": source_name, "checkpoints": rows,
                                                 "alignment_bins": {a.name: a.binned.__dict__ for a in analyses}},
                                                indent=2) + "\n")
    page = out / "index.html"
    page.write_text(PAGE.format(title=html.escape(title), nav=nav, body="\n".join(body)))
    return page
