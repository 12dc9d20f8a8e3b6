"""Command-line conventions: python -m, --version, defaults in help, per-subcommand usage, numeric and
device checks, config show with did-you-mean, plain step lines off a terminal, --device resolution."""

from __future__ import annotations

import argparse
import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios

import pytest
import torch
import yaml

import codemae
from codemae.cli import HelpFormatter, build_parser, main
from codemae.config import Config, load_config, nearest_key, to_dict
from codemae.errors import ConfigError
from codemae.eval.device import inference_autocast, module_device, resolve_device
from codemae.train.distributed import DistInfo
from codemae.train.engine import STEP_LINE, close_logging, log, pretrain, setup_logging
from codemae.train.metrics import read_metrics, step_line

from conftest import REPO, tiny_config, write_config


def run_module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "codemae", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_python_m_codemae_help_and_version():
    helped = run_module("--help")
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: codemae") and "pretrain" in helped.stdout
    version = run_module("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"codemae {codemae.__version__}"


def subparsers(parser: argparse.ArgumentParser):
    """Every (nested) subcommand parser."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield child
                yield from subparsers(child)


def test_every_subcommand_help_shows_its_defaults():
    checked = 0
    commands = list(subparsers(build_parser()))
    assert {"pretrain", "probe", "segment", "bench", "config show", "data check"} <= {
        c.prog.removeprefix("codemae ") for c in commands}
    for command in commands:
        assert command.formatter_class is HelpFormatter, command.prog
        text = " ".join(command.format_help().split())
        for action in command._actions:
            shown = HelpFormatter.default_of(action)
            if shown is None:
                continue
            block = command.formatter_class(command.prog)
            block.add_argument(action)
            assert f"default: {shown}" in " ".join(block.format_help().split()), (command.prog, action.dest)
            checked += 1
        assert "default: False" not in text and "default: None" not in text, command.prog
    assert checked > 60
    helps = {c.prog: " ".join(c.format_help().split()) for c in commands}
    assert "--seeds SEEDS how many seeds (each with its own K-shot draw) (default: 5)" in helps["codemae probe"]
    assert "--first-seed FIRST_SEED the first seed" in helps["codemae probe"]
    assert "--opt-channels OPT_CHANNELS default: 3" in helps["codemae stats"]  # an option without help text
    assert "--multilabel synthetic: classes" in helps["codemae probe"]


@pytest.mark.parametrize("argv, usage, hint", [
    (["probe", "--random", "c.yaml", "--data", "synthetic", "--sedes", "3"], "usage: codemae probe",
     "unrecognized arguments: --sedes 3 (did you mean --seeds?)"),
    (["data", "check", "c.yaml", "--pixles"], "usage: codemae data check",
     "unrecognized arguments: --pixles (did you mean --pixels?)"),
    (["bench", "--qqqq"], "usage: codemae bench", "unrecognized arguments: --qqqq"),
])
def test_a_mistyped_option_shows_that_subcommands_usage(argv, usage, hint, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(usage + " ")
    assert err.strip().splitlines()[-1].endswith(hint)


@pytest.mark.parametrize("argv, message", [
    (["probe", "--random", "c.yaml", "--data", "synthetic", "--seeds", "0"],
     "codemae probe: error: argument --seeds: must be an integer >= 1, got 0"),
    (["probe", "--random", "c.yaml", "--data", "synthetic", "--shots", "-1"],
     "codemae probe: error: argument --shots: must be an integer >= 0, got -1"),
    (["probe", "--random", "c.yaml", "--data", "synthetic", "--epochs", "-5"],
     "codemae probe: error: argument --epochs: must be an integer >= 1, got -5"),
    (["knn", "--random", "c.yaml", "--data", "synthetic", "--k", "ten"],
     "codemae knn: error: argument --k: expected an integer, got 'ten'"),
    (["bench", "--batch-size", "0"], "codemae bench: error: argument --batch-size: must be an integer >= 1, got 0"),
    (["segment", "--random", "c.yaml", "--train-fraction", "1.5"],
     "codemae segment: error: argument --train-fraction: must be a number in (0, 1), got 1.5"),
    (["segment", "--random", "c.yaml", "--opt-max", "nan"],
     "codemae segment: error: argument --opt-max: expected a finite number, got 'nan'"),
    (["teacher-cache", "--config", "c.yaml", "--batch-size", "-2"],
     "codemae teacher-cache: error: argument --batch-size: must be an integer >= 1, got -2"),
    (["split-lists", "--data", "d", "--out", "o", "--fractions", "nan", "0.5", "0.5"],
     "codemae split-lists: error: argument --fractions: expected a finite number, got 'nan'"),
])
def test_an_invalid_number_exits_2_with_one_error_line(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert errors == [message] and err.strip().splitlines()[-1] == message and "Traceback" not in err


def test_config_show_prints_the_resolved_config(tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml")
    assert main(["config", "show", str(config), "train.epochs=3", "data.batch_size=6"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown == to_dict(load_config(config, ["train.epochs=3", "data.batch_size=6"]))
    assert shown["train"]["epochs"] == 3 and shown["data"]["batch_size"] == 6
    assert shown["train"]["base_lr"] == Config().train.base_lr  # a default the file does not set
    assert shown["model"]["img_size"] == 32  # from the file


def test_an_unknown_config_key_suggests_the_nearest(tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml")
    assert main(["config", "show", str(config), "train.epoch=3"]) == 2
    assert capsys.readouterr().err.strip() == \
        "codemae: error: unknown config key 'train.epoch' (did you mean train.epochs?)"
    assert nearest_key(Config, "epochs") == "train.epochs"  # a key of a section, given at the top
    assert nearest_key(Config, "batchsize") == "data.batch_size"
    assert nearest_key(Config, "zzzzqq") is None
    with pytest.raises(ConfigError, match=r"^unknown config key 'zzzzqq'$"):
        load_config(None, ["zzzzqq=1"])


def test_step_line_format_by_hand():
    row = {"step": 4.0, "epoch": 0.0, "lr": 1.2e-4, "total": 1.5, "recon": 0.98, "ccl": 0.52, "grad_norm": 3.0,
           "skipped_samples": 0.0}
    assert step_line(row, 8, 12.34) == "step 4/8 lr 1.20e-04 recon 0.98 ccl 0.52 total 1.5 12.3 img/s"


LINE = re.compile(r"step (\d+)/4 lr (\S+) recon (\S+) total (\S+) (\d+\.\d) img/s$")


def test_off_a_terminal_pretraining_logs_plain_step_lines(tmp_path, capsys):
    cfg = tiny_config(tmp_path / "run", train={"max_steps": 4, "log_every": 2, "progress": True})
    pretrain(cfg)
    err = capsys.readouterr().err  # captured: not a terminal, so no progress bar although train.progress
    assert "\r" not in err and "it/s" not in err and "step/s" not in err
    console = [LINE.search(line) for line in err.splitlines() if " step " in line and "img/s" in line]
    logged = [LINE.search(line) for line in (tmp_path / "run" / "train.log").read_text().splitlines()
              if "img/s" in line]
    assert all(console) and len(console) == 2 and [m.groups()[:4] for m in console] == [m.groups()[:4]
                                                                                      for m in logged]
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert [int(m[1]) for m in console] == [int(r["step"]) for r in rows] == [2, 4]
    for match, row in zip(console, rows):
        assert match[2] == f"{row['lr']:.2e}" and match[3] == f"{row['recon']:.4g}" and float(match[5]) > 0


def test_on_a_terminal_a_progress_bar_and_the_step_lines_in_the_log_file(tmp_path):
    config = write_config(tmp_path / "c.yaml", train={"max_steps": 4, "log_every": 2, "progress": True})
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a 120-column terminal
    proc = subprocess.Popen([sys.executable, "-m", "codemae", "pretrain", "--config", str(config)], cwd=REPO,
                            stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    screen = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closes when the process ends
            break
        if not chunk:
            break
        screen += chunk
    os.close(leader)
    assert proc.wait(timeout=120) == 0, screen.decode(errors="replace")
    text = screen.decode(errors="replace")
    assert re.search(r"\r100%\|\S+\| 4/4 \[", text)  # tqdm's bar, redrawn in place
    assert "img/s" not in text
    logged = [line for line in (tmp_path / "run" / "train.log").read_text().splitlines() if "img/s" in line]
    assert [LINE.search(line)[1] for line in logged] == ["2", "4"]


def test_with_a_progress_bar_step_lines_go_to_the_log_file_only(tmp_path, capsys):
    setup_logging(tmp_path, DistInfo(0, 1, 0, torch.device("cpu")), bar=True)
    try:
        log.info("step 1/2 lr 1.00e-04 recon 1 total 1 5.0 img/s", extra={STEP_LINE: True})
        log.info("an ordinary message")
    finally:
        for handler in log.handlers:
            handler.flush()
        logged = (tmp_path / "train.log").read_text()
        close_logging()
    err = capsys.readouterr().err
    assert "an ordinary message" in err and "img/s" not in err
    assert "step 1/2" in logged and "an ordinary message" in logged


def test_device_names(monkeypatch, tmp_path, capsys):
    config = str(write_config(tmp_path / "c.yaml"))
    assert build_parser().parse_args(["probe", "--random", config, "--data", "synthetic", "--device", "cpu"]
                                     ).device == "cpu"
    assert build_parser().parse_args(["analyze", "--checkpoint", "x", "--pairs", "p", "--out", "o"]).device is None
    with pytest.raises(SystemExit) as stop:
        main(["retrieval", "--random", config, "--pairs", "synthetic", "--device", "gpu"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "codemae retrieval: error: argument --device: expected cpu, cuda or cuda:N, got 'gpu'"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["retrieval", "--random", config, "--pairs", "synthetic", "--device", "cuda"]) == 2
    assert "--device cuda: CUDA is not available on this machine" in capsys.readouterr().err
    assert resolve_device(None) == torch.device("cpu")
    with pytest.raises(ConfigError, match="expected cpu, cuda or cuda:N"):
        resolve_device("mps")


def test_retrieval_runs_with_device_cpu(tmp_path, capsys):
    config = str(write_config(tmp_path / "c.yaml"))
    out = tmp_path / "r.json"
    assert main(["retrieval", "--random", config, "--pairs", "synthetic", "--synthetic-n", "8", "--device", "cpu",
                 "--out", str(out)]) == 0
    assert "cross-modal retrieval on 8 pairs" in capsys.readouterr().out and out.is_file()


def test_cuda_is_chosen_when_available(monkeypatch, tmp_path):
    """With CUDA reported available (patched: this machine has none), the default device is CUDA, a device
    index is checked against the count, and an evaluation command moves its encoder there."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device(None) == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"has 2 CUDA device\(s\), cuda:0 to cuda:1"):
        resolve_device("cuda:2")

    moved = []

    class Placed(RuntimeError):
        pass

    class Stub:
        def to(self, device):
            moved.append(device)
            raise Placed  # stop here: there is no GPU to run on

    import codemae.eval.features as features

    monkeypatch.setattr(features, "method_to_evaluate", lambda *a, **k: Stub())
    with pytest.raises(Placed):
        main(["probe", "--random", str(write_config(tmp_path / "c.yaml")), "--data", "synthetic"])
    assert moved == [torch.device("cuda")]


def test_bf16_autocast_only_on_cuda(monkeypatch):
    assert not isinstance(inference_autocast(torch.device("cpu")), torch.autocast)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    with pytest.warns(UserWarning, match="CUDA is not available"):  # constructed only: no kernel runs here
        ctx = inference_autocast(torch.device("cuda"))
    assert isinstance(ctx, torch.autocast) and ctx.device == "cuda" and ctx.fast_dtype == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert not isinstance(inference_autocast(torch.device("cuda")), torch.autocast)


def test_module_device_follows_the_parameters():
    assert module_device(torch.nn.Linear(2, 2, device="meta")) == torch.device("meta")
    assert module_device(torch.nn.ReLU()) == torch.device("cpu")
