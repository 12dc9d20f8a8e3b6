"""Results as a mean +- std table over seeds and a JSON file."""

from __future__ import annotations

import json
import statistics
from pathlib import Path


def summarise(per_seed: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """{metric: {"mean", "std", "values"}} over seeds (std 0 for a single seed)."""
    keys = list(per_seed[0])
    return {
        k: {
            "mean": statistics.mean(r[k] for r in per_seed),
            "std": statistics.stdev([r[k] for r in per_seed]) if len(per_seed) > 1 else 0.0,
            "values": [r[k] for r in per_seed],
        }
        for k in keys
    }


def print_table(title: str, summary: dict[str, dict[str, float]], seeds: int) -> None:
    print(f"{title} ({seeds} seed{'s' if seeds > 1 else ''})")
    width = max(len(k) for k in summary)
    for key, s in summary.items():
        print(f"  {key:<{width}}  {s['mean']:8.2f} +- {s['std']:.2f}")


def write_json(path: str | Path | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")
