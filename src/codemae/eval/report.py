"""Results as a mean +- std table over seeds and a JSON file."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from codemae.errors import ConfigError

SEED_OPTIONS = ("--seeds", "--first-seed", "--out")  # what may differ between runs of one evaluation


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


def evaluation_of(command: list[str]) -> list[str]:
    """A result's command without the options that only choose its seeds and where it was written."""
    kept, skip = [], False
    for word in command:
        if skip:
            skip = False
        elif word in SEED_OPTIONS:
            skip = True
        elif not word.startswith(tuple(f"{o}=" for o in SEED_OPTIONS)):
            kept.append(word)
    return kept


def merge_results(parts: dict[str, dict]) -> dict:
    """One result from the JSON results (by file name) of one evaluation run over disjoint seeds: the
    summary over all their seeds in seed order; fields that differ between the parts (timings, say) are
    kept per part under ``parts``. Refuses results of different evaluations or overlapping seeds."""
    named = list(parts.items())
    for name, result in named:
        missing = [k for k in ("command", "seeds", "summary") if k not in result]
        if missing:
            raise ConfigError(f"{name}: not a codemae evaluation result with its seeds (no {', '.join(missing)}; "
                              "results written before --first-seed existed lack 'seeds')")
    first_name, first = named[0]
    for name, result in named[1:]:
        if evaluation_of(result["command"]) != evaluation_of(first["command"]):
            raise ConfigError(f"{name}: another evaluation than {first_name} ({shown_command(result)} vs "
                              f"{shown_command(first)})")
        if set(result["summary"]) != set(first["summary"]):
            raise ConfigError(f"{name}: other metrics than {first_name}")
    owner: dict[int, str] = {}
    for name, result in named:
        for seed in result["seeds"]:
            if seed in owner:
                raise ConfigError(f"{name}: seed {seed} is in {owner[seed]} too")
            owner[seed] = name
    rows = sorted((seed, {k: s["values"][i] for k, s in result["summary"].items()})
                  for _, result in named for i, seed in enumerate(result["seeds"]))
    shared = {k: v for k, v in first.items()
              if k not in ("command", "seeds", "summary") and all(r.get(k) == v for _, r in named)}
    differing = sorted({k for _, r in named for k in r} - set(shared) - {"command", "seeds", "summary"})
    merged = {"command": first["command"], **shared, "seeds": [seed for seed, _ in rows],
              "summary": summarise([row for _, row in rows]), "merged_from": [name for name, _ in named]}
    if differing:
        merged["parts"] = {name: {k: r[k] for k in differing if k in r} for name, r in named}
    return merged


def shown_command(result: dict) -> str:
    return " ".join(evaluation_of(result["command"]))[:120]
