"""The evidence study's table: every output JSON of benchmarks/evidence.py gathered into one Markdown and
one JSON file, headed by the commit, the command and the measured wall time."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
from pathlib import Path

from evidence import CONFIGS, METHODS, MIXTURE, MSTAR_SOURCE, REPO, random_encoders

LABELS = {**{k: v[1] for k, v in METHODS.items()}, "random": "random init (HiViT, the MAE-family encoder)",
          "random_vit": "random init (ViT, Fus-MAE's encoder)", "cnn": "small CNN from scratch"}


def read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def first(summary: dict, prefix: str = "") -> dict | None:
    """The first metric of a ``summary`` whose name starts with ``prefix`` (mean, std, values)."""
    return next((v for k, v in summary.items() if k.startswith(prefix)), None)


def pm(metric: dict | None) -> str:
    return "-" if metric is None else f"{metric['mean']:.1f} +- {metric['std']:.1f}"


def commit() -> str:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + (" (with uncommitted changes)" if git("status", "--porcelain") else "")


def machine(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU the budget was spent on: its model, cores and widest vector extension (the same ``--hours``
    holds different steps on different CPUs; docs/evidence.md)."""
    text = cpuinfo.read_text() if cpuinfo.is_file() else ""
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    vector = next((f for f in ("avx512f", "avx2", "avx") if f in flags), "no AVX")
    return f"{fields.get('model name') or platform.processor() or platform.machine()}, {os.cpu_count()} cores, {vector}"


def step_times(out: Path, methods: list[str]) -> str:
    """Each method's steady seconds a step in its timing run, the step time its epochs were budgeted by."""
    times = {m: (read(out / "timing" / m / "summary.json") or {}).get("steady_seconds_per_step") for m in methods}
    return ", ".join(f"{m} {t:.3f} s" for m, t in times.items() if t) or "no timing runs (--epochs)"


def encoder_row(out: Path, name: str, shots: list[int], ft_shots: list[int]) -> dict:
    ev = out / "eval"
    row: dict = {"encoder": LABELS[name]}
    for k in shots:
        probe = read(ev / f"probe{k}_{name}.json")
        row[f"probe {k}-shot"] = first(probe["summary"], "honest") if probe else None
    for k in ft_shots:
        ft = read(ev / f"finetune{k}_{name}.json")
        row[f"fine-tune {k}-shot"] = first(ft["summary"]) if ft else None
    for key, file in (("flood mIoU", "flood"), ("synthetic mIoU", "synthseg")):
        seg = read(ev / f"{file}_{name}.json")
        row[key] = first(seg["summary"], "mIoU") if seg else None
    retrieval = read(ev / f"retrieval_{name}.json")
    if retrieval:
        row["retrieval"] = {**retrieval["metrics"], "chance": retrieval["chance"], "pairs": retrieval["pairs"]}
    summary = read(out / "pretrain" / name / "summary.json")
    if summary:
        row["pretraining"] = {k: summary.get(k) for k in ("step", "total_steps", "seconds", "max_minutes_reached")}
        row["pretraining"]["final"] = summary.get("final")
    return row


def analysis_rows(out: Path) -> dict[str, dict]:
    """The comparison report's measures per checkpoint (named by run folder)."""
    report = read(out / "compare" / "report.json")
    return {} if report is None else {r["checkpoint"]: r for r in report["checkpoints"]}


def analysis_table(analysis: dict, keys: list[str]) -> list[str]:
    """Markdown rows of the comparison report's ``keys`` per checkpoint; '-' where one has none."""
    return ["| checkpoint | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|",
            *("| " + name + " | " + " | ".join(f"{a[k]:.3f}" if k in a else "-" for k in keys) + " |"
              for name, a in analysis.items())]


def markdown(rows: list[dict], shots: list[int], ft_shots: list[int], header: list[str], analysis: dict) -> str:
    cols = [f"probe {k}-shot" for k in shots] + [f"fine-tune {k}-shot" for k in ft_shots] + \
           ["flood mIoU", "synthetic mIoU"]
    lines = [*header, "", "| encoder | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += ["| " + r["encoder"] + " | " + " | ".join(pm(r.get(c)) for c in cols) + " |" for r in rows]
    retrieval = [r for r in rows if "retrieval" in r]
    if retrieval:
        chance = retrieval[0]["retrieval"]["chance"]
        lines += ["", f"Retrieval, S1/S2 val pairs ({retrieval[0]['retrieval']['pairs']}; chance R@1 "
                      f"{chance['R@1']:.2f}, R@5 {chance['R@5']:.2f}, median rank {chance['median rank']:.1f}):", "",
                  "| encoder | opt->SAR R@1 | R@5 | median rank | SAR->opt R@1 | R@5 | median rank |",
                  "|---|---|---|---|---|---|---|"]
        keys = ["opt->sar R@1", "opt->sar R@5", "opt->sar median rank", "sar->opt R@1", "sar->opt R@5",
                "sar->opt median rank"]
        lines += ["| " + r["encoder"] + " | " + " | ".join(f"{r['retrieval'][k]:.2f}" for k in keys) + " |"
                  for r in retrieval]
    if analysis:
        keys = ["effective rank (optical)", "effective rank (SAR)", "effective rank (joint)",
                "mean patch alignment (cosine)", "alignment vs SSIM slope"]
        lines += ["", "Analysis (`codemae compare`, S1/S2 val pairs):", ""] + analysis_table(analysis, keys)
        ratio, reference = "recon error / flattened-recon error (", "smooth-field reference ("
        sets = list(dict.fromkeys(k[len(ratio):-1] for a in analysis.values() for k in a if k.startswith(ratio)))
        if sets:
            lines += ["", "Reconstructions (`codemae compare`): squared error over the masked patches divided by that "
                      "of the same reconstructions flattened to their patch means (below 1: the structure predicted "
                      "inside masked patches is real), and the same ratio for a smooth field through each image's "
                      "true patch means (reference). S1/S2: the val pairs; MSTAR: SAR chips no evaluation trains "
                      "on (the val part of the fixed split, or the given --mstar-test set):",
                      ""] + analysis_table(analysis, [f"{kind}{s})" for s in sets for kind in (ratio, reference)])
    pre = [r for r in rows if "pretraining" in r]
    if pre:
        lines += ["", "Pretraining (steps done / scheduled, wall s, final logged losses):", "",
                  "| method | steps | wall s | stopped by max_minutes | final losses |", "|---|---|---|---|---|"]
        for r in pre:
            p, final = r["pretraining"], r["pretraining"]["final"] or {}
            losses = ", ".join(f"{k} {v:.3f}" for k, v in final.items()
                               if k not in ("step", "epoch", "lr", "grad_norm", "skipped_samples", "total"))
            lines.append(f"| {r['encoder']} | {p['step']} / {p['total_steps']} | {p['seconds']} | "
                         f"{p['max_minutes_reached']} | {losses} |")
    return "\n".join(lines) + "\n"


def norm_pix(run: Path) -> bool:
    """Whether a run reconstructed per-patch normalised targets (its ``config.yaml``)."""
    from codemae.config import load_config

    config = run / "config.yaml"
    return load_config(config if config.is_file() else None).method.norm_pix_loss


def mstar_weight(out: Path, methods: list[str], args) -> float:
    """The sampling weight of MSTAR's chips in the pretraining mixture, as the study's first mixture run
    was configured (``config.yaml``); before any run, ``--mstar-weight`` or the configs'."""
    from codemae.config import load_config

    for method in methods:
        config = out / "pretrain" / method / "config.yaml"
        if method in MIXTURE and config.is_file():
            return load_config(config).data.sources[MSTAR_SOURCE].weight
    if args.mstar_weight is not None:
        return args.mstar_weight
    return load_config(REPO / CONFIGS / METHODS["mae"][0]).data.sources[MSTAR_SOURCE].weight


def plot_recon_curves(runs: dict[str, Path], out: Path, smooth: int = 10) -> None:
    """The reconstruction loss of each run (``metrics.csv``, running mean over ``smooth`` logged rows)
    against its step, in one figure; with per-patch normalised targets, the loss of predicting each
    patch's mean (1) as a reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from codemae.train.metrics import read_metrics

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, run in runs.items():
        rows = read_metrics(run / "metrics.csv") if (run / "metrics.csv").is_file() else []
        if len(rows) >= smooth:
            recon = np.convolve([r["recon"] for r in rows], np.ones(smooth) / smooth, mode="valid")
            ax.plot([r["step"] for r in rows][smooth - 1:], recon, label=name)
    if any(norm_pix(run) for run in runs.values()):
        ax.axhline(1.0, color="grey", linestyle=":", label="predicting each patch's mean (norm-pix loss 1)")
    ax.set(xlabel="step", ylabel=f"reconstruction loss (mean of {smooth} logged steps)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def write_table(out: Path, args, methods: list[str], command: list[str]) -> None:
    names = [*methods, *random_encoders(methods), "cnn"]
    rows = [encoder_row(out, n, args.shots, args.ft_shots) for n in names]
    times = read(out / "times.json") or {}
    total = sum(times.values())
    split = (f"MSTAR train {args.mstar_train} / test {args.mstar_test}" if args.mstar_train else
             "MSTAR: a fixed stratified split (seed 0, 60/20/20 train/val/test) of ../shared/data/mstar/train_17deg "
             "(17-degree chips only; pretraining sees the train part)")
    header = [f"# codemae evidence study, --hours {args.hours} per method",
              "", f"- commit {commit()}", f"- command: `{shlex.join(map(str, command))}`",
              f"- measured wall time of the steps this table was built from: {total / 60:.1f} min "
              f"(per step in times.json)",
              f"- machine: {machine()}; steady step time of the timing runs: {step_times(out, methods)}",
              f"- {split}",
              f"- MSTAR weight in the pretraining mixture: {mstar_weight(out, methods, args):g} "
              "(Fus-MAE takes the S1/S2 pairs only" + ("; joint MAE, MSTAR only, the MSTAR chips alone" if
                                                         "mae_sar" in methods else "") + ")",
              f"- probe: honest protocol, {args.probe_seeds} seeds; fine-tuning: sar-target, {args.ft_seeds} seeds"
              + (f", {args.ft_epochs} epochs" if args.ft_epochs else ", 60 epochs"),
              "- OKD: no teacher (none within the budget), so CoDe-MAE runs CCL + CDR",
              "- loss curves: [recon_curves.png](recon_curves.png); reconstructions, spectra and alignment: "
              "[compare/index.html](compare/index.html)"]
    analysis = analysis_rows(out)
    (out / "evidence.md").write_text(markdown(rows, args.shots, args.ft_shots, header, analysis))
    (out / "evidence.json").write_text(json.dumps({"header": header, "rows": rows, "analysis": analysis,
                                                   "times_s": times}, indent=2) + "\n")
    plot_recon_curves({LABELS[m]: out / "pretrain" / m for m in methods}, out / "recon_curves.png")
    print(f"table: {out / 'evidence.md'}")
