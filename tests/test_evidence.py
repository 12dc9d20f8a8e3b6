"""The evidence study's pieces: the pretraining time budget, the small CNN baseline, the study's plan."""

import json
import types
from pathlib import Path

import pytest

from codemae.checkpoint import load_checkpoint
from codemae.config import load_config
from codemae.errors import ConfigError
from codemae.train import engine
from codemae.train.engine import pretrain

from conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]


def fake_clock(monkeypatch, seconds_per_step: float) -> None:
    """The engine's clock starts at 0 s and advances ``seconds_per_step`` with every training step."""
    now = [0.0]
    step = engine.Trainer.train_step

    def timed_step(self, *args):
        now[0] += seconds_per_step
        return step(self, *args)

    monkeypatch.setattr(engine, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    monkeypatch.setattr(engine.Trainer, "train_step", timed_step)


def test_max_minutes_stops_and_checkpoints_at_the_step_the_budget_ends(tmp_path, monkeypatch):
    # 0.4 s a step: 0.4, 0.8, 1.2 s -> a 1 s budget ends after step 3
    fake_clock(monkeypatch, 0.4)
    summary = pretrain(tiny_config(tmp_path / "run", train={"epochs": 5, "max_minutes": 1 / 60}))
    assert summary["step"] == 3 and summary["total_steps"] == 5 * 4 and summary["max_minutes_reached"] is True
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 3
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["step"] == 3


def test_max_minutes_unset_or_long_runs_every_step(tmp_path, monkeypatch):
    fake_clock(monkeypatch, 0.4)
    summary = pretrain(tiny_config(tmp_path / "run", train={"epochs": 1, "max_minutes": 10.0}))
    assert summary["step"] == summary["total_steps"] == 4 and summary["max_minutes_reached"] is False


@pytest.mark.parametrize("value", [0, -1, ".nan"])
def test_max_minutes_must_be_positive(value):
    with pytest.raises(ConfigError, match="train.max_minutes"):
        load_config(None, [f"train.max_minutes={value}"])


# --- the small CNN baseline ---------------------------------------------------------------------------

def test_small_cnn_gives_tokens_the_classifier_pools_and_one_undecayed_lr():
    import torch

    from codemae.eval.cnn import CNNMethod
    from codemae.eval.finetune import Classifier, layer_decay_groups

    method = CNNMethod(64, {"opt": 3, "sar": 1})
    tokens = method.encode({"sar": torch.randn(2, 1, 64, 64)})["sar"]
    assert tokens.shape == (2, 8 * 8, 128) and method.encoder.embed_dim == 128
    model = Classifier(method, ("sar",), 10)
    assert model({"sar": torch.randn(3, 1, 64, 64)}).shape == (3, 10)
    groups = layer_decay_groups(model, 1e-3, 0.05, 0.85)
    assert {g["lr_scale"] for g in groups} == {1.0}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def write_classes(root, classes=("a", "b"), per_class=10, size=32):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(root / c / f"{c}{i}.png")
    return root


def test_finetune_cnn_runs_the_protocol_and_refuses_an_encoder_beside_it(tmp_path, capsys):
    from codemae.cli import main

    data = write_classes(tmp_path / "data")
    out = tmp_path / "cnn.json"
    assert main(["finetune", "--cnn", "32", "--data", str(data), "--modality", "sar", "--shots", "2",
                 "--seeds", "1", "--epochs", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    honest = next(iter(result["summary"].values()))
    assert result["train_size"] == 4 and len(honest["values"]) == 1
    assert f"seed 0: honest {honest['values'][0]:.2f}, reference " in capsys.readouterr().out  # one line a seed
    with pytest.raises(SystemExit) as err:
        main(["finetune", "--cnn", "32", "--random", "x.yaml", "--data", str(data)])
    assert err.value.code == 2 and "not allowed with" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["cnn", "random"])
def test_finetune_initialises_each_seed_from_that_seed_alone(tmp_path, monkeypatch, model):
    """A seed's model (the CNN, or the encoder from scratch) and head start from the same weights whether it
    runs alone (--first-seed, as `codemae merge` assumes), after another seed, or after other draws from the
    global generator; and each seed from its own weights, the encoder's included."""
    import torch

    import codemae.eval.finetune as finetune
    from codemae.cli import main

    from conftest import write_config

    data, starts = write_classes(tmp_path / "data"), []
    train = finetune.finetune_once

    def recording(model, *args):
        starts.append((torch.cat([p.detach().flatten() for p in model.parameters()]),
                       torch.cat([p.detach().flatten() for p in model.method.encoder.parameters()])))
        return train(model, *args)

    monkeypatch.setattr(finetune, "finetune_once", recording)
    encoder = ["--cnn", "32"] if model == "cnn" else ["--random", str(write_config(tmp_path / "tiny.yaml"))]
    common = ["finetune", *encoder, "--data", str(data), "--modality", "sar", "--shots", "2", "--epochs", "1"]
    assert main(common + ["--seeds", "2"]) == 0
    torch.rand(7)  # another history of the global generator
    assert main(common + ["--seeds", "1", "--first-seed", "1"]) == 0
    first, second, alone = starts
    assert torch.equal(second[0], alone[0])
    assert not torch.equal(first[1], second[1])  # the model's own weights differ, not only the head's


# --- benchmarks/evidence.py ---------------------------------------------------------------------------

@pytest.fixture
def evidence():
    import importlib
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        yield importlib.import_module("evidence")
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


def test_budget_epochs_fit_the_hours_at_the_measured_step_time(evidence):
    timing = {"total_steps": 530, "step": 12, "seconds": 18.0}  # 10 epochs of 53 steps, 1.5 s a step
    assert evidence.budget_epochs(timing, 10, 0.1) == (4, 0.4)  # 360 s / (1.5 s x 53) = 4.5
    assert evidence.budget_epochs(timing, 10, 0.5) == (22, 2.2)  # 1800 / 79.5 = 22.6
    assert evidence.budget_epochs(timing, 10, 0.001) == (1, 0.1)  # at least one epoch
    steady = timing | {"steady_seconds_per_step": 1.0}  # the start-up left out: 1800 / 53 = 33.96
    assert evidence.budget_epochs(steady, 10, 0.5) == (33, 3.3)


def test_steady_step_time_leaves_the_start_up_out(tmp_path, monkeypatch):
    now, step = [0.0], engine.Trainer.train_step

    def timed_step(self, *args):  # 0.4 s a step, and 5 s of start-up (workers, first batch) in the first one
        now[0] += 0.4 + (5.0 if self.step == 0 else 0.0)
        return step(self, *args)

    monkeypatch.setattr(engine, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    monkeypatch.setattr(engine.Trainer, "train_step", timed_step)
    summary = pretrain(tiny_config(tmp_path / "run", train={"epochs": 3, "log_every": 2}))  # 12 steps
    assert summary["seconds"] == pytest.approx(5.0 + 12 * 0.4)
    assert summary["steady_seconds_per_step"] == pytest.approx(0.4)


def test_mstar_split_is_stratified_disjoint_and_the_csv_agrees(evidence, tmp_path):
    root = write_classes(tmp_path / "mstar")
    lists = evidence.write_mstar_split(root, tmp_path / "split")
    parts = {p: lists[p].read_text().split() for p in ("train", "val", "test")}
    assert [len(parts[p]) for p in parts] == [12, 4, 4]
    assert all(sum(s.startswith(c + "/") for s in parts["test"]) == 2 for c in "ab")
    everything = parts["train"] + parts["val"] + parts["test"]
    assert len(set(everything)) == 20
    rows = lists["csv"].read_text().splitlines()
    assert rows[0] == "stem,split" and sorted(rows[1:]) == sorted(f"{s},{p}" for p, v in parts.items() for s in v)
    again = evidence.write_mstar_split(root, tmp_path / "split2")
    assert again["test"].read_text() == lists["test"].read_text()  # fixed seed


def test_study_skips_finished_steps_and_names_the_log_of_a_failed_one(evidence, tmp_path, monkeypatch):
    args = evidence.parse_args(["--out", str(tmp_path)])
    study = evidence.Study(args, tmp_path)
    done = tmp_path / "done.json"
    done.write_text("{}")
    monkeypatch.setattr(evidence.subprocess, "run", lambda *a, **k: pytest.fail("a finished step ran again"))
    study.run("finished", ["probe"], done)
    monkeypatch.setattr(evidence.subprocess, "run", lambda *a, **k: types.SimpleNamespace(returncode=2))
    with pytest.raises(SystemExit, match="step broken failed .exit 2.; see .*broken.log"):
        study.run("broken", ["probe"], tmp_path / "absent.json")


def test_parallel_studies_on_one_out_keep_each_others_times(evidence, tmp_path, monkeypatch):
    args = evidence.parse_args(["--out", str(tmp_path)])
    first, second = evidence.Study(args, tmp_path), evidence.Study(args, tmp_path)  # e.g. one per core
    monkeypatch.setattr(evidence.subprocess, "run", lambda *a, **k: types.SimpleNamespace(returncode=0))
    first.run("pretrain_mae", ["pretrain"], tmp_path / "a.json")
    second.run("pretrain_codemae", ["pretrain"], tmp_path / "b.json")
    first.run("probe40_mae", ["probe"], tmp_path / "c.json")
    times = json.loads((tmp_path / "times.json").read_text())
    assert set(times) == {"pretrain_mae", "pretrain_codemae", "probe40_mae"}
    assert not list(tmp_path.glob("*.tmp"))


def test_evidence_refuses_half_a_given_mstar_split(evidence):
    with pytest.raises(SystemExit) as err:
        evidence.parse_args(["--mstar-train", "x"])
    assert err.value.code == 2


def test_table_shows_mean_and_std_of_each_output_and_dashes_for_missing(evidence, tmp_path):
    import evidence_table

    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "probe40_mae.json").write_text(json.dumps(
        {"summary": {"honest (val-selected, test once)": {"mean": 61.25, "std": 1.5}, "reference": {"mean": 0, "std": 0}}}))
    (tmp_path / "eval" / "retrieval_mae.json").write_text(json.dumps(
        {"pairs": 4, "chance": {"R@1": 25.0, "R@5": 100.0, "median rank": 2.5},
         "metrics": {f"{d} {m}": v for d in ("opt->sar", "sar->opt") for m, v in (("R@1", 50), ("R@5", 100),
                                                                                    ("median rank", 1.5))}}))
    args = evidence.parse_args(["--shots", "40", "--methods", "mae"])
    evidence_table.write_table(tmp_path, args, ["mae"], ["evidence.py"])
    text = (tmp_path / "evidence.md").read_text()
    assert "| joint MAE | 61.2 +- 1.5 | - | - | - |" in text
    assert "| joint MAE | 50.00 | 100.00 | 1.50 | 50.00 | 100.00 | 1.50 |" in text and "chance R@1 25.00" in text
    assert json.loads((tmp_path / "evidence.json").read_text())["rows"][0]["probe 40-shot"]["mean"] == 61.25
    assert "- MSTAR weight in the pretraining mixture: 6 " in text
    assert "- machine: " in text and "no timing runs (--epochs)" in text
    weighted = evidence.parse_args(["--shots", "40", "--methods", "mae", "--mstar-weight", "2.5"])
    evidence_table.write_table(tmp_path, weighted, ["mae"], ["evidence.py"])
    assert "- MSTAR weight in the pretraining mixture: 2.5 " in (tmp_path / "evidence.md").read_text()


def test_equal_epochs_skip_the_timing_run_and_the_budget_still_caps(evidence, tmp_path, monkeypatch):
    args = evidence.parse_args(["--out", str(tmp_path), "--epochs", "3", "--hours", "0.2",
                                "--mstar-train", "given/train", "--mstar-test", "given/test"])
    study, calls = evidence.Study(args, tmp_path), []
    monkeypatch.setattr(study, "run", lambda step, argv, done: calls.append((step, argv, done)))
    assert study.pretrain("codemae") == tmp_path / "pretrain" / "codemae" / "checkpoints" / "last.pt"
    (step, argv, done), = calls
    assert step == "pretrain_codemae" and done == tmp_path / "pretrain" / "codemae" / "summary.json"
    assert {"train.epochs=3", "train.warmup_epochs=0.3", "train.max_minutes=12.0",
            f"data.sources.1.root={Path('given/train').resolve()}"} <= set(argv)
    assert argv[:3] == ["pretrain", "--config", "configs/pretrain/evidence_codemae.yaml"]


def test_a_given_mstar_train_folder_is_pretrained_on_whole(evidence, tmp_path):
    """--mstar-train replaces the fixed split: the MSTAR source of every method lists each chip of the given
    folder, and the configs' split CSV (written only by the default split) is not asked for."""
    from codemae.data.sources import build_source

    given = write_classes(tmp_path / "given", per_class=3)
    args = evidence.parse_args(["--out", str(tmp_path / "out"), "--mstar-weight", "2",
                                "--mstar-train", str(given), "--mstar-test", str(given)])
    study = evidence.Study(args, tmp_path / "out")
    for name, (config_file, _) in evidence.METHODS.items():
        config = load_config(REPO / "configs/pretrain" / config_file, study.mstar_pretrain_overrides(name))
        mstar = next((source for source in config.data.sources if source.name == "mstar"), None)
        if mstar is None:
            assert name == "fusmae"  # it fuses pairs: its data.kinds drop MSTAR
            continue
        assert len(build_source(mstar, {"opt": 3, "sar": 1})) == 6, name
        assert mstar.weight == (2.0 if name in evidence.MIXTURE else 1.0)


def test_mstar_weight_reaches_every_pretraining_and_must_be_positive(evidence, tmp_path, monkeypatch):
    args = evidence.parse_args(["--out", str(tmp_path), "--epochs", "2", "--mstar-weight", "6"])
    study, calls = evidence.Study(args, tmp_path), []
    monkeypatch.setattr(evidence, "write_mstar_split", lambda root, out: {"csv": out / "split.csv"})
    monkeypatch.setattr(study, "run", lambda step, argv, done: calls.append(argv))
    study.pretrain("mae")
    assert "data.sources.1.weight=6.0" in calls[0] and "data.sources.1.split=train" in calls[0]
    default = evidence.Study(evidence.parse_args(["--out", str(tmp_path)]), tmp_path)
    assert not any(".weight=" in a for a in default.mstar_pretrain_overrides("mae"))
    with pytest.raises(SystemExit):
        evidence.parse_args(["--mstar-weight", "0"])


def test_mstar_only_encoder_is_asked_for_by_name_and_pretrains_on_the_train_chips_alone(evidence, tmp_path,
                                                                                         monkeypatch):
    assert "mae_sar" not in evidence.parse_args([]).methods
    args = evidence.parse_args(["--out", str(tmp_path), "--epochs", "2", "--mstar-weight", "6", "--methods", "mae_sar"])
    study, calls = evidence.Study(args, tmp_path), []
    monkeypatch.setattr(evidence, "write_mstar_split", lambda root, out: {"csv": out / "split.csv"})
    monkeypatch.setattr(study, "run", lambda step, argv, done: calls.append(argv))
    study.pretrain("mae_sar")
    argv = calls[0]
    assert argv[:3] == ["pretrain", "--config", "configs/pretrain/evidence_mae_sar.yaml"]
    assert not any(".weight=" in a for a in argv)  # the mixture's weight is not its business
    overrides = [a for a in argv[3:] if a.startswith("data.sources.")]
    config = load_config(REPO / argv[2], overrides)
    (source,) = config.data.sources
    assert (source.name, source.split, source.weight) == ("mstar", "train", 1.0)
    assert Path(source.split_csv) == (tmp_path / "mstar_split" / "split.csv").resolve()
    mixture = load_config(REPO / "configs/pretrain/evidence_mae.yaml")
    assert (config.model, config.method, config.train) == (mixture.model, mixture.method, mixture.train)
    import evidence_table

    evidence_table.write_table(tmp_path, args, ["mae_sar"], ["evidence.py"])
    text = (tmp_path / "evidence.md").read_text()
    assert "| joint MAE, MSTAR only (the MSTAR-task encoder) |" in text and "the MSTAR chips alone)" in text


def test_pretrain_only_evaluates_nothing(evidence, tmp_path, monkeypatch):
    steps = []
    monkeypatch.setattr(evidence.Study, "run", lambda self, step, argv, done: steps.append(step))
    assert evidence.main(["--out", str(tmp_path), "--methods", "mae", "rigid", "--epochs", "2", "--pretrain-only",
                          "--mstar-train", "given/train", "--mstar-test", "given/test"]) == 0
    assert steps == ["pretrain_mae", "pretrain_rigid"]
    assert not (tmp_path / "evidence.md").exists()


def test_the_patch_mean_reference_line_is_for_norm_pix_runs_only(evidence, tmp_path):
    import evidence_table

    pixel, default = tmp_path / "pixel", tmp_path / "default"
    pixel.mkdir(), default.mkdir()
    (pixel / "config.yaml").write_text("method:\n  name: mae\n  norm_pix_loss: false\n")
    (default / "config.yaml").write_text("method:\n  name: mae\n")
    assert not evidence_table.norm_pix(pixel)
    assert evidence_table.norm_pix(default)


def test_study_segments_the_flood_chip_and_synthetic_scenes_at_the_cpu_recipe(evidence, tmp_path, monkeypatch):
    args = evidence.parse_args(["--out", str(tmp_path), "--shots", "10", "--skip", "retrieval",
                                "--mstar-train", "given/train", "--mstar-test", "given/test"])
    study, calls = evidence.Study(args, tmp_path), {}
    monkeypatch.setattr(study, "run", lambda step, argv, done: calls.update({step: (argv, done)}))
    study.evaluate("mae", ["--checkpoint", "c.pt"])
    assert set(calls) == {"probe10_mae", "flood_mae", "synthseg_mae"}
    for step in ("flood_mae", "synthseg_mae"):
        argv, done = calls[step]
        assert argv[:3] == ["segment", "--checkpoint", "c.pt"] and done == tmp_path / "eval" / f"{step}.json"
        assert " ".join(evidence.SEGMENT_RECIPE) in " ".join(argv) and argv[-1] == str(done)
    assert "--scene" in calls["flood_mae"][0] and "--scene" not in calls["synthseg_mae"][0]


def test_comparison_reconstructs_mstar_chips_no_evaluation_trains_on(evidence, tmp_path, monkeypatch):
    calls = {}
    monkeypatch.setattr(evidence.Study, "run", lambda self, step, argv, done: calls.update({step: argv}))
    monkeypatch.setattr(evidence, "write_mstar_split",
                        lambda root, out: {part: out / f"{part}.txt" for part in ("train", "val", "test", "csv")})
    assert evidence.main(["--out", str(tmp_path), "--methods", "mae", "--epochs", "2", "--skip", "finetune",
                          "segment", "retrieval"]) == 0
    compare = calls["compare"]
    assert compare[compare.index("--images-list") + 1] == str(tmp_path / "mstar_split" / "val.txt")
    assert compare[compare.index("--images") + 1].endswith("mstar/train_17deg")
    calls.clear()
    assert evidence.main(["--out", str(tmp_path), "--methods", "mae", "--epochs", "2", "--skip", "finetune",
                          "segment", "retrieval", "--mstar-train", "given/train", "--mstar-test", "given/test"]) == 0
    compare = calls["compare"]
    assert compare[compare.index("--images") + 1] == "given/test" and "--images-list" not in compare


def test_table_gives_each_reconstructed_set_its_ratio_and_yardstick(evidence, tmp_path):
    import evidence_table

    ratio, yardstick = "recon error / flattened-recon error", "smooth-field reference"
    rows = {"mae": {"effective rank (joint)": 20.0, f"{ratio} (SAR)": 1.01, f"{yardstick} (SAR)": 0.97,
                    f"{ratio} (SAR, chips/val)": 0.9, f"{yardstick} (SAR, chips/val)": 0.94},
            "fusmae": {"effective rank (joint)": 50.0}}
    text = evidence_table.markdown([], [40], [40], [], rows)
    assert (f"| checkpoint | {ratio} (SAR) | {yardstick} (SAR) | {ratio} (SAR, chips/val) | "
            f"{yardstick} (SAR, chips/val) |") in text
    assert "| mae | 1.010 | 0.970 | 0.900 | 0.940 |" in text and "| fusmae | - | - | - | - |" in text
    assert "| fusmae | - | - | 50.000 | - | - |" in text  # the embedding table: only the joint rank known


def test_machine_names_the_cpu_and_its_widest_vector_extension(evidence, tmp_path):
    import evidence_table

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 avx avx2 fma\n")
    named = evidence_table.machine(info)
    assert named.startswith("AMD EPYC 7B13, ") and named.endswith(", avx2")
    info.write_text("model name\t: Xeon\nflags\t\t: avx avx2 avx512f avx512bw\n")
    assert evidence_table.machine(info).endswith(", avx512f")
    (tmp_path / "timing" / "mae").mkdir(parents=True)
    (tmp_path / "timing" / "mae" / "summary.json").write_text(json.dumps({"steady_seconds_per_step": 0.7112}))
    assert evidence_table.step_times(tmp_path, ["mae", "rigid"]) == "mae 0.711 s"
