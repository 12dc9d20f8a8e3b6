"""The evidence study (issue 14): every compared method pretrained at the same wall-clock budget on real
data, then evaluated with codemae's own commands; one table (Markdown + JSON) and the comparison report.

    python benchmarks/evidence.py --hours 0.5 --out runs/evidence/study     # or: make evidence

Pretraining: the S1/S2 train pairs plus the TRAIN part of the MSTAR split as unpaired SAR (Fus-MAE
fuses pairs, so it takes the pairs only), the recipe of configs/pretrain/evidence_*.yaml. Each method's
epochs come from its own measured step time (a short timing run) so that its schedule ends within
``--hours``; ``train.max_minutes`` stops it at the budget in any case. MSTAR split: without
``--mstar-train/--mstar-test``, a fixed stratified split (seed 0, 60/20/20 train/val/test) of
``mstar/train_17deg`` (the 17-degree chips only: the standard 15-degree test set is not in
../shared/data), written as split lists into the output folder. Every step's output is kept and skipped
when present, so an interrupted study resumes where it stopped (an interrupted pretraining resumes
from its checkpoint). Run from anywhere; commands run from the repository root.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CODEMAE = [sys.executable, "-m", "codemae.cli"]
CONFIGS = "configs/pretrain"
METHODS = {  # name: (config, label)
    "mae": ("evidence_mae.yaml", "joint MAE"),
    "codemae": ("evidence_codemae.yaml", "CoDe-MAE (CCL + CDR)"),
    "rigid": ("evidence_rigid.yaml", "rigid contrastive (linear, encoder)"),
    "fusmae": ("evidence_fusmae.yaml", "Fus-MAE XAE&D"),
    "mae_sar": ("evidence_mae_sar.yaml", "joint MAE, MSTAR only (the MSTAR-task encoder)"),
}
COMPARED = ["mae", "codemae", "rigid", "fusmae"]  # the paper's methods, the default; mae_sar is asked for by name
MIXTURE = {"mae", "codemae", "rigid"}  # the methods that pretrain on the pairs + MSTAR mixture
# the untrained floors: the HiViT of the MAE-family methods, and Fus-MAE's ViT (when Fus-MAE is compared)
RANDOM = {"random": f"{CONFIGS}/evidence_mae.yaml", "random_vit": f"{CONFIGS}/evidence_fusmae.yaml"}


def random_encoders(methods: list[str]) -> list[str]:
    return ["random", *(["random_vit"] if "fusmae" in methods else [])]
TIMING_STEPS = 20
MSTAR_SOURCE = 1  # index of the MSTAR source in the evidence configs
FLOOD = "sen1floods11/{}/Spain_7370579_{}Hand.tif"
# segmentation sized for one CPU core (the papers' LoveDA recipe, 10k iterations of 16 crops of 512 px, is
# GPU-days): the light head on the frozen encoder, 80 iterations of 8 crops at the pretraining size
SEGMENT_RECIPE = ["--head", "light", "--iters", "80", "--batch-size", "8", "--crop", "64", "--lr", "1e-3"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hours", type=float, default=0.5, help="pretraining wall clock per method")
    p.add_argument("--out", default="runs/evidence/study", help="output folder (relative: to the repository)")
    p.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--mstar-train", help="MSTAR training chips, <class>/<image> (default: the fixed split)")
    p.add_argument("--mstar-test", help="MSTAR test chips, <class>/<image> (e.g. the 15-degree SOC set)")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=COMPARED,
                   help="pretrained encoders (default: the compared methods; mae_sar: joint MAE on MSTAR alone)")
    p.add_argument("--mstar-weight", type=float, help="sampling weight of MSTAR's unpaired chips in the pretraining "
                                                      "mixture (default: the configs' 6)")
    p.add_argument("--epochs", type=int, help="the same pretraining epochs for every method instead of the epochs that "
                                              "fit --hours at each one's measured step time (--hours still caps it)")
    p.add_argument("--shots", type=int, nargs="+", default=[10, 40])
    p.add_argument("--probe-seeds", type=int, default=5)
    p.add_argument("--ft-seeds", type=int, default=3)
    p.add_argument("--ft-shots", type=int, nargs="+", help="fine-tuning shots (default: --shots)")
    p.add_argument("--ft-epochs", type=int, help="fine-tuning epochs (default: the sar-target protocol's 60)")
    p.add_argument("--ft-encoders", nargs="+", help="encoders to fine-tune (default: all, the CNN and random)")
    p.add_argument("--skip", nargs="*", default=[], choices=["finetune", "segment", "compare", "retrieval"],
                   help="evaluations to leave out (a reduced study)")
    p.add_argument("--table-only", action="store_true", help="only rebuild the table from the outputs already there")
    p.add_argument("--pretrain-only", action="store_true",
                   help="pretrain the methods and stop (no evaluation reads the MSTAR test part: recipe search)")
    args = p.parse_args(argv)
    if (args.mstar_train is None) != (args.mstar_test is None):
        p.error("give both --mstar-train and --mstar-test, or neither")
    if args.hours <= 0:
        p.error(f"--hours must be positive, got {args.hours}")
    if args.mstar_weight is not None and args.mstar_weight <= 0:
        p.error(f"--mstar-weight must be positive, got {args.mstar_weight}")
    args.ft_shots = args.ft_shots or args.shots
    return args


@dataclass
class Study:
    args: argparse.Namespace
    out: Path

    @property
    def data(self) -> Path:
        return Path(self.args.data_root)

    def run(self, step: str, argv: list[str], done: Path) -> None:
        """Run one codemae command unless ``done`` exists; its output goes to ``logs/<step>.log``."""
        if done.exists():
            return
        log = self.out / "logs" / f"{step}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"[{time.strftime('%H:%M:%S')}] {step}: codemae {shlex.join(argv)}", flush=True)
        start = time.perf_counter()
        with open(log, "w") as f:
            proc = subprocess.run([*CODEMAE, *argv], cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
        if proc.returncode:
            sys.exit(f"evidence: step {step} failed (exit {proc.returncode}); see {log}")
        self.record_time(step, round(time.perf_counter() - start, 1))

    def record_time(self, step: str, seconds: float) -> None:
        """Add a step's time to ``times.json``, merged with what is there (studies sharing ``--out`` in
        parallel, one per core, keep each other's entries), written atomically."""
        path = self.out / "times.json"
        times = (json.loads(path.read_text()) if path.exists() else {}) | {step: seconds}
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(times, indent=2) + "\n")
        tmp.replace(path)

    # --- MSTAR split -----------------------------------------------------------------------------------
    @property
    def mstar_root(self) -> Path:
        return self.data / "mstar" / "train_17deg"

    def mstar_lists(self) -> dict[str, Path]:
        """The fixed split's lists and CSV (:func:`write_mstar_split`, written once into the study's folder)."""
        return write_mstar_split(self.mstar_root, self.out / "mstar_split")

    def mstar_eval_args(self) -> list[str]:
        """``--data/--train/--val/--test`` of the MSTAR probe and fine-tuning."""
        if self.args.mstar_train:
            return ["--data", self.args.mstar_train, "--train", self.args.mstar_train, "--test", self.args.mstar_test]
        lists = self.mstar_lists()
        return ["--data", str(self.mstar_root),
                *(a for part in ("train", "val", "test") for a in (f"--{part}", str(lists[part])))]

    def mstar_images_args(self) -> list[str]:
        """``--images`` of the comparison: MSTAR chips none of the evaluations train on (the fixed split's val
        part, or a given --mstar-test set), whose SAR reconstructions are measured beside the S1/S2 pairs'."""
        if self.args.mstar_train:
            return ["--images", self.args.mstar_test]
        return ["--images", str(self.mstar_root), "--images-list", str(self.mstar_lists()["val"])]

    def mstar_pretrain_overrides(self, name: str) -> list[str]:
        """The MSTAR source's chips (the split's train part, or every chip of ``--mstar-train``: the configs'
        split CSV does not apply to it) and, for the mixture methods, ``--mstar-weight``."""
        key = f"data.sources.{MSTAR_SOURCE}"
        mixed = self.args.mstar_weight is not None and name in MIXTURE
        weight = [f"{key}.weight={self.args.mstar_weight}"] if mixed else []
        if self.args.mstar_train:
            return [f"{key}.root={Path(self.args.mstar_train).resolve()}", f"{key}.split=null",
                    f"{key}.split_csv=null", *weight]
        lists = self.mstar_lists()
        return [f"{key}.split=train", f"{key}.split_csv={lists['csv'].resolve()}", *weight]

    # --- pretraining -----------------------------------------------------------------------------------
    def pretrain(self, name: str) -> Path:
        """Time a few steps, then pretrain for the epochs that fit ``--hours``; the checkpoint."""
        config = f"{CONFIGS}/{METHODS[name][0]}"
        common = [f"data.root={self.data.resolve()}", "train.progress=false", *self.mstar_pretrain_overrides(name)]
        if self.args.epochs:
            epochs, warmup = self.args.epochs, round(0.1 * self.args.epochs, 2)
        else:
            timing = self.out / "timing" / name
            self.run(f"timing_{name}", ["pretrain", "--config", config, f"run_dir={timing}",
                                        f"train.max_steps={TIMING_STEPS}", *common], timing / "summary.json")
            epochs, warmup = budget_epochs(json.loads((timing / "summary.json").read_text()),
                                           read_epochs(timing), self.args.hours)
        run_dir = self.out / "pretrain" / name
        self.run(f"pretrain_{name}", ["pretrain", "--config", config, f"run_dir={run_dir}", f"train.epochs={epochs}",
                                      f"train.warmup_epochs={warmup}", f"train.max_minutes={self.args.hours * 60}",
                                      *common], run_dir / "summary.json")
        return run_dir / "checkpoints" / "last.pt"

    # --- evaluation ------------------------------------------------------------------------------------
    def evaluate(self, name: str, encoder: list[str]) -> None:
        """The frozen-encoder evaluations: MSTAR probes, retrieval, segmentation."""
        ev, d = self.out / "eval", self.data
        mstar = self.mstar_eval_args()
        for k in self.args.shots:
            self.run(f"probe{k}_{name}", ["probe", *encoder, *mstar, "--modality", "sar", "--shots", str(k),
                                          "--seeds", str(self.args.probe_seeds), "--centre-crop", "128",
                                          "--out", str(ev / f"probe{k}_{name}.json")], ev / f"probe{k}_{name}.json")
        if "retrieval" not in self.args.skip:
            self.run(f"retrieval_{name}", ["retrieval", *encoder, "--pairs", str(d / "s1s2_pairs"), "--split", "val",
                                           "--out", str(ev / f"retrieval_{name}.json")], ev / f"retrieval_{name}.json")
        if "segment" not in self.args.skip:
            scene = [str(d / FLOOD.format(m, m)) for m in ("S2", "S1")] + [str(d / FLOOD.format("Labels", "Label"))]
            scene_args = ["--scene", *scene, "--opt-bands", "3", "2", "1", "--sar-bands", "1", "--sar-db", "-30", "0"]
            for step, data in ((f"flood_{name}", scene_args), (f"synthseg_{name}", [])):
                out = ev / f"{step}.json"
                self.run(step, ["segment", *encoder, *data, "--modality", "both", "--seeds", "3", *SEGMENT_RECIPE,
                                "--out", str(out)], out)

    def finetune(self, name: str, encoder: list[str]) -> None:
        if "finetune" in self.args.skip or (self.args.ft_encoders and name not in self.args.ft_encoders):
            return
        ev = self.out / "eval"
        epochs = ["--epochs", str(self.args.ft_epochs)] if self.args.ft_epochs else []
        for k in self.args.ft_shots:
            out = ev / f"finetune{k}_{name}.json"
            self.run(f"finetune{k}_{name}", ["finetune", *encoder, *self.mstar_eval_args(), "--modality", "sar",
                                             "--shots", str(k), "--seeds", str(self.args.ft_seeds), *epochs,
                                             "--out", str(out)], out)


def read_epochs(run_dir: Path) -> int:
    """The epochs a run was configured with (its config.yaml)."""
    import yaml

    return int(yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["epochs"])


def budget_epochs(timing: dict, epochs_configured: int, hours: float) -> tuple[int, float]:
    """Epochs (at least 1) whose steps at the timing run's seconds per step fit ``hours``, and a warm-up of
    10% of them. The step time is the steady one, between the run's first and last step lines, where the
    summary has it: the run's whole time includes its start-up, which overstated the step time by 24-110%
    on the 2-core machine and left a fifth of the budget unused."""
    steps_per_epoch = timing["total_steps"] / epochs_configured
    seconds_per_step = timing.get("steady_seconds_per_step") or timing["seconds"] / timing["step"]
    epochs = max(1, int(hours * 3600 / (seconds_per_step * steps_per_epoch)))
    return epochs, round(0.1 * epochs, 2)


def write_mstar_split(root: Path, out: Path) -> dict[str, Path]:
    """codemae's fixed stratified 60/20/20 split (seed 0) of the class folders at ``root`` as split lists
    (``train.txt``, ``val.txt``, ``test.txt``: one stem a line) and a split CSV for pretraining."""
    from codemae.eval.data import class_folders, split_indices

    lists = {part: out / f"{part}.txt" for part in ("train", "val", "test")} | {"csv": out / "split.csv"}
    if all(p.exists() for p in lists.values()):
        return lists
    data = class_folders(root, "sar", {"opt": 3, "sar": 1})
    parts = split_indices(data.labels, {"train": 0.6, "val": 0.2, "test": 0.2}, seed=0)
    out.mkdir(parents=True, exist_ok=True)
    owner = {}
    for part, idx in parts.items():
        stems = [data.source.stems[i] for i in idx]
        lists[part].write_text("\n".join(stems) + "\n")
        owner |= dict.fromkeys(stems, part)
    with open(lists["csv"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["stem", "split"])
        writer.writerows(sorted(owner.items()))
    return lists


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    study = Study(args, out)
    command = [sys.executable, *sys.argv] if argv is None else argv
    from evidence_table import write_table  # noqa: PLC0415 (benchmarks/ is the script's folder)

    if args.table_only:
        write_table(out, args, args.methods, command)
        return 0
    checkpoints = {name: study.pretrain(name) for name in args.methods}
    if args.pretrain_only:
        return 0
    encoders = {n: ["--random", RANDOM[n]] for n in random_encoders(args.methods)} | \
               {n: ["--checkpoint", str(c)] for n, c in checkpoints.items()}
    for name, encoder in encoders.items():  # cheap evaluations of every encoder first, fine-tuning last
        study.evaluate(name, encoder)
    if "compare" not in args.skip:
        study.run("compare", ["compare", *map(str, checkpoints.values()), "--pairs", str(study.data / "s1s2_pairs"),
                              "--split", "val", *study.mstar_images_args(), "--out", str(out / "compare")],
                  out / "compare" / "report.json")
    for name, encoder in {"cnn": ["--cnn", "64"], **encoders}.items():
        study.finetune(name, encoder)
    write_table(out, args, list(checkpoints), command)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    sys.exit(main())
