"""Training logs: a CSV of every loss term, TensorBoard scalars and a loss-curve PNG."""

from __future__ import annotations

import csv
from pathlib import Path

NOT_LOSSES = ("step", "epoch", "lr", "grad_norm", "skipped_samples")


class MetricsLog:
    """Appends rows ``{step, epoch, lr, <terms>}`` to ``metrics.csv`` and TensorBoard.

    On resume, rows beyond the resumed step are dropped so the log matches the weights.
    Rows may differ in their terms (an unpaired batch has no contrastive loss): a new term
    adds a column, and a row without it leaves the cell empty.
    """

    def __init__(self, run_dir: Path, resume_step: int, tensorboard: bool = True) -> None:
        self.path = run_dir / "metrics.csv"
        self.rows = read_metrics(self.path)
        self.rows = [r for r in self.rows if r["step"] <= resume_step]
        self.fields = list(dict.fromkeys(k for r in self.rows for k in r))
        self._rewrite()
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)

    def log(self, row: dict[str, float]) -> None:
        self.rows.append(row)
        new = [k for k in row if k not in self.fields]
        if new:
            self.fields += new
            self._rewrite()
        else:
            with self.path.open("a", newline="") as f:
                csv.DictWriter(f, self.fields).writerow(row)
        if self.writer is not None:
            for key, value in row.items():
                if key not in ("step", "epoch"):
                    self.writer.add_scalar(f"train/{key}", value, int(row["step"]))

    def _rewrite(self) -> None:
        with self.path.open("w", newline="") as f:
            if self.fields:
                writer = csv.DictWriter(f, self.fields)
                writer.writeheader()
                writer.writerows(self.rows)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def step_line(row: dict[str, float], total_steps: int, images_per_s: float) -> str:
    """One plain log line for a logged row: ``step 4/8 lr 1.20e-04 recon 0.9812 ... total 1.234 12.3 img/s``
    (each loss term, then their total, then the throughput since the previous line)."""
    terms = [k for k in row if k not in NOT_LOSSES and k != "total"] + (["total"] if "total" in row else [])
    losses = " ".join(f"{k} {row[k]:.4g}" for k in terms)
    return f"step {int(row['step'])}/{total_steps} lr {row['lr']:.2e} {losses} {images_per_s:.1f} img/s"


def read_metrics(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(f)]


def plot_losses(rows: list[dict[str, float]], out: Path, title: str) -> None:
    """Every loss term against the optimiser step, log-scaled if all positive."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return
    terms = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in NOT_LOSSES]
    fig, ax = plt.subplots(figsize=(7, 4))
    for term in terms:
        have = [r for r in rows if term in r]
        ax.plot([r["step"] for r in have], [r[term] for r in have], label=term,
                linewidth=1.2 if term == "total" else 0.9)
    if all(r[t] > 0 for r in rows for t in terms if t in r):
        ax.set_yscale("log")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
