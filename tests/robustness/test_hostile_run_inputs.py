"""Hostile manifests, configs, images, checkpoints and run folders (issue 20): each ends with exit code 2
and one line naming the file, key or value, before any large allocation, nothing written outside the
intended folders and no command executed."""

from __future__ import annotations

import fcntl
import json
import os
import resource
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml
from PIL import Image

from codemae.checkpoint import load_checkpoint, save_atomic
from codemae.cli import main
from codemae.config import load_config, to_dict
from codemae.data.readers import read_image
from codemae.data.shards import MAX_MEMBER_BYTES, iter_records, read_manifest
from codemae.errors import ConfigError, DataError
from conftest import stream_of, tiny_config, write_pairs
from test_shards import epoch_ids, shard_set, stream_cfg

SRC = str(Path(__file__).resolve().parents[2] / "src")


def cli(*args: str, memory_gb: float = 6.0, timeout: float = 120, env_extra: dict | None = None
        ) -> subprocess.CompletedProcess:
    """``codemae ARGS`` in a subprocess under an address-space limit (a large allocation fails loudly).

    The CUDA build of torch (the one that comes with torchvision) maps about 3 GB of address space
    before any work, so the cap sits at 6 GB: far below what any of the refused sizes would allocate."""
    def limit() -> None:
        cap = int(memory_gb * (1 << 30))
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    env = {**os.environ, "PYTHONPATH": SRC, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "codemae.cli", *args], preexec_fn=limit, capture_output=True,
                          text=True, timeout=timeout, env=env)


def one_line_exit_2(result: subprocess.CompletedProcess, *needles: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and lines[-1].startswith("codemae: error:"), result.stderr[-2000:]
    for needle in needles:
        assert needle in lines[-1], lines[-1]


def write_config(path: Path, cfg) -> Path:
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    return path


def edit_manifest(shards: Path, change) -> None:
    manifest = json.loads((shards / "manifest.json").read_text())
    change(manifest)
    (shards / "manifest.json").write_text(json.dumps(manifest))


# ---- security ---------------------------------------------------------------------------------------------------


def test_manifest_paths_never_reach_a_shell_or_leave_the_shard_set(tmp_path):
    shards, _ = shard_set(tmp_path, pairs=24, per_shard=12)
    marker = tmp_path / "pwned"
    for bad in (f"pairs/shard-000000.tar; touch {marker}", "../../etc/passwd", "/etc/passwd", "pairs/$(id).tar"):
        edit_manifest(shards, lambda m: m["sources"][0]["shards"][0].update(path=bad))
        cfg = stream_cfg(tmp_path, f"pipe:cat {shards}" if ";" in bad else shards)
        with pytest.raises(DataError, match="not a plain relative path"):
            stream_of(cfg)
    assert not marker.exists()


def test_source_names_cannot_place_files_outside_their_folders(tmp_path):
    root = write_pairs(tmp_path / "p", n=4)
    cfg = tiny_config(tmp_path / "run", data={"sources": [{"name": "../escape", "kind": "paired", "root": str(root)}]})
    config = write_config(tmp_path / "c.yaml", cfg)
    one_line_exit_2(cli("pretrain", "--config", str(config)), "source name '../escape'")
    one_line_exit_2(cli("shard", "--source", str(config), "--out", str(tmp_path / "out")), "source name")
    assert not (tmp_path / "escape").exists() and not (tmp_path / "escape.json").exists()


def test_errors_never_quote_a_file_that_is_not_a_config(tmp_path):
    secret = tmp_path / "shadow"
    secret.write_text("root:$6$SECRETHASH$abcdef:19000:0:99999:7:::\nbin:*:19000:0:99999:7:::\n")
    config = tmp_path / "c.yaml"
    for text in (f"base: {secret}\n", f"model: {{img_size: 64}}\nbase: {secret}\n"):
        config.write_text(text)
        with pytest.raises(ConfigError) as err:
            load_config(config)
        assert "SECRETHASH" not in str(err.value) and "19000" not in str(err.value)
    secret.write_text("key: [unclosed SECRETHASH\n")
    config.write_text(f"base: {secret}\n")
    with pytest.raises(ConfigError, match=r"not valid YAML \(line") as err:
        load_config(config)
    assert "SECRETHASH" not in str(err.value)


# ---- unbounded memory and recursion -------------------------------------------------------------------------


def test_a_huge_shard_member_is_refused_unread(tmp_path):
    """A gzip shard whose member declares more than the member limit: refused from its tar header."""
    path = tmp_path / "bomb.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("000000000.opt.png")
        info.size = MAX_MEMBER_BYTES + 1
        tar.addfile(info)  # the header claims the size; no data follows
    with pytest.raises(DataError, match="over the .*-byte limit"):
        list(iter_records(str(path)))


def test_manifest_counts_and_nesting_are_bounded(tmp_path):
    shards, _ = shard_set(tmp_path, pairs=24, per_shard=12)
    cfg = stream_cfg(tmp_path, shards)
    edit_manifest(shards, lambda m: m["sources"][0]["shards"][0].update(samples=10**10))
    with pytest.raises(DataError, match="sample count 10000000000 is not in"):
        stream_of(cfg)
    edit_manifest(shards, lambda m: m["sources"][0]["shards"][0].update(samples=-3))
    with pytest.raises(DataError, match="sample count -3"):
        stream_of(cfg)
    edit_manifest(shards, lambda m: m["sources"][0]["shards"][0].update(samples=11))
    with pytest.raises(DataError, match="its shards hold 23 samples, the manifest says 24"):
        stream_of(cfg)
    edit_manifest(shards, lambda m: m["sources"][0]["shards"][0].update(samples=12))
    edit_manifest(shards, lambda m: m["sources"][0].update(kind="foo"))
    with pytest.raises(DataError, match="kind 'foo'"):
        stream_of(cfg)
    (shards / "manifest.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(DataError, match="manifest"):
        read_manifest(str(shards))


def test_deep_yaml_and_alias_bombs_are_refused(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("train: " + "[" * 50_000 + "]" * 50_000 + "\n")
    with pytest.raises(ConfigError, match="nested too deeply|not valid YAML"):
        load_config(config)
    laughs = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 9):
        prev = chr(ord("a") + i - 1)
        laughs.append(f"{chr(ord('a') + i)}: &{chr(ord('a') + i)} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},"
                      f"*{prev},*{prev},*{prev}]")
    config.write_text("\n".join(laughs) + "\n")
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="aliases"):
        load_config(config)
    assert time.perf_counter() - start < 5
    (tmp_path / "big.yaml").write_bytes(b"#" * (2 << 20))
    with pytest.raises(ConfigError, match="larger than"):
        load_config(tmp_path / "big.yaml")


def test_a_tiff_that_decodes_beyond_the_limit_is_refused_from_its_header(tmp_path):
    path = tmp_path / "bomb.tif"
    with tifffile.TiffWriter(path) as tif:  # 8192 x 8192 x 3 float64: 1.5 GiB decoded; a sparse file on disk
        tif.write(shape=(8192, 8192, 3), dtype="float64", photometric="rgb")
    assert path.stat().st_blocks * 512 < 5 << 20
    with pytest.raises(DataError, match="bomb.tif: .*limit"):
        read_image(path)


@pytest.mark.parametrize("override, key", [
    ("model.img_size=100000", "model.img_size"), ("model.embed_dim=1000000000", "model.embed_dim"),
    ("model.depth=1000000000", "model.depth"), ("model.sar_channels=1000000", "model.sar_channels"),
    ("data.num_workers=100000", "data.num_workers"), ("data.sources.0.weight=1e12", "data.sources.0.weight"),
    ("model.embed_dim=16000", "model.embed_dim"),  # each within its bound, together about 100G parameters
])
def test_absurd_sizes_are_refused_before_allocating(tmp_path, override, key):
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "run", model={"depth": 500}
                                                           if override.startswith("model.embed_dim=16000") else {}))
    result = cli("pretrain", "--config", str(config), override)
    one_line_exit_2(result, key)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_checkpoint_whose_stored_config_is_absurd_is_refused(tmp_path):
    cfg = to_dict(tiny_config(tmp_path))
    cfg["model"]["img_size"] = 160000
    torch.save({"model": {}, "config": cfg, "step": 1, "layout": 2}, tmp_path / "evil.pt")
    one_line_exit_2(cli("export", "--checkpoint", str(tmp_path / "evil.pt"), "--out", str(tmp_path / "e")),
                    "model.img_size")


# ---- nonsense accepted silently -----------------------------------------------------------------------------------


@pytest.mark.parametrize("override, key", [
    ("train.clip_grad=-1", "train.clip_grad"), ("train.weight_decay=-5", "train.weight_decay"),
    ("train.warmup_epochs=.inf", "train.warmup_epochs"), ("model.depth=-1", "model.depth"),
    ("seed=-1", "seed"), ("seed=1e30", "seed"), ("train.base_lr=.nan", "train.base_lr"),
])
def test_nonsense_values_are_refused(override, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        load_config(None, [override])


def test_small_images_grayscale_optical_and_exif_rotation(tmp_path):
    flat = tmp_path / "flat.png"
    Image.fromarray(np.zeros((1, 5, 3), np.uint8)).save(flat)
    assert read_image(flat).shape == (1, 5, 3)  # a 1-pixel-high RGB image, not 1 band of 3 x 5
    root = write_pairs(tmp_path / "p", n=4)
    Image.fromarray(np.full((40, 40), 90, np.uint8)).save(root / "opt" / "t1.png")  # grayscale among RGB
    cfg = tiny_config(tmp_path / "run", data={"sources": [{"name": "p", "kind": "paired", "root": str(root)}]})
    config = write_config(tmp_path / "c.yaml", cfg)
    one_line_exit_2(cli("pretrain", "--config", str(config)), "t1.png", "model.opt_channels")
    check = cli("data", "check", str(config))
    assert check.returncode == 2 and "opt files have 1 channels" in check.stdout + check.stderr
    rotated = tmp_path / "rotated.jpg"
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = 255  # white left half
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(pixels).save(rotated, exif=exif, quality=95)
    shown = read_image(rotated)
    assert shown.shape == (40, 20, 3) and shown[:20].mean() > 200 and shown[20:].mean() < 50


# ---- run folder integrity -------------------------------------------------------------------------------------


def test_resume_refuses_a_changed_config_and_statistics_follow_the_data(tmp_path, capsys):
    root = write_pairs(tmp_path / "p", n=8)
    cfg = tiny_config(tmp_path / "run", data={"sources": [{"name": "p", "kind": "paired", "root": str(root)}]},
                      train={"epochs": 1})
    config = write_config(tmp_path / "c.yaml", cfg)
    assert main(["pretrain", "--config", str(config)]) == 0
    capsys.readouterr()
    assert main(["pretrain", "--config", str(config), "train.base_lr=0.5", "train.epochs=2"]) == 2
    message = capsys.readouterr().err
    assert "train.base_lr" in message and "train.resume=force" in message and "train.epochs" not in message
    assert "base_lr: 0.5" not in (tmp_path / "run" / "config.yaml").read_text()  # not overwritten
    assert main(["pretrain", "--config", str(config), "train.epochs=2"]) == 0  # a safe change resumes
    before = sorted((tmp_path / "run" / "stats").glob("p-*.json"))
    write_pairs(tmp_path / "p2", n=8)
    (root / "opt" / "t0.png").write_bytes((tmp_path / "p2" / "opt" / "t5.png").read_bytes())
    (root / "opt" / "extra.png").write_bytes((tmp_path / "p2" / "opt" / "t5.png").read_bytes())
    (root / "sar" / "extra.png").write_bytes((tmp_path / "p2" / "sar" / "t5.png").read_bytes())
    assert main(["pretrain", "--config", str(config), "train.epochs=3"]) == 0
    after = sorted((tmp_path / "run" / "stats").glob("p-*.json"))
    assert len(before) == 1 and len(after) == 2  # the changed source got statistics of its own


def test_one_process_per_run_folder(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = open(run_dir / ".lock", "a+")
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    holder.write("4242")
    holder.flush()
    config = write_config(tmp_path / "c.yaml", tiny_config(run_dir))
    one_line_exit_2(cli("pretrain", "--config", str(config)), "in use by another run (pid 4242)")
    holder.close()
    ckpt = run_dir / "checkpoints"
    ckpt.mkdir()
    alive = ckpt / f".last.pt.tmp-{os.getppid()}"  # a temp file whose writer (our parent) still runs
    dead = ckpt / ".last.pt.tmp-999999999"
    alive.write_text("x")
    dead.write_text("x")
    result = cli("pretrain", "--config", str(config), "train.max_steps=1")
    assert result.returncode == 0, result.stderr[-1500:]
    assert alive.exists() and not dead.exists()


@pytest.mark.parametrize("payload, entry", [
    ([1, 2], "holds a list"), (torch.zeros(3), "holds a Tensor"), ({"model": [1], "config": {}}, "'model'"),
    ({"model": {}, "config": {}, "optimizer": {}}, "'step'"),
    ({"model": {}, "config": {}, "optimizer": {}, "step": "abc"}, "'step'"),
])
def test_checkpoints_of_the_wrong_structure(tmp_path, payload, entry):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    torch.save(payload, run_dir / "checkpoints" / "last.pt")
    config = write_config(tmp_path / "c.yaml", tiny_config(run_dir))
    one_line_exit_2(cli("pretrain", "--config", str(config), "train.resume=force"), entry)
    if entry != "'step'":
        one_line_exit_2(cli("export", "--checkpoint", str(run_dir / "checkpoints" / "last.pt"), "--out",
                            str(tmp_path / "e")), entry)


def test_unwritable_run_files_end_in_one_line(tmp_path):
    """A folder where the metrics file goes (unwritable even for root)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.csv").mkdir()  # a folder where the metrics file goes
    config = write_config(tmp_path / "c.yaml", tiny_config(run_dir))
    one_line_exit_2(cli("pretrain", "--config", str(config)), "metrics.csv")


def test_outputs_are_checked_before_the_work(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    one_line_exit_2(cli("analyze", "--checkpoint", "x.pt", "--pairs", "synthetic", "--out", str(afile)),
                    "exists and is a file")
    one_line_exit_2(cli("probe", "--random", "x.yaml", "--data", "synthetic", "--out", str(tmp_path)),
                    "exists and is a folder")
    one_line_exit_2(cli("export", "--checkpoint", "nothing.pt", "--out", str(afile / "sub")), "not a writable folder")


def test_a_swapped_shard_of_the_same_size_is_detected(tmp_path):
    shards, _ = shard_set(tmp_path, pairs=24, per_shard=12)
    first, second = shards / "pairs" / "shard-000000.tar", shards / "pairs" / "shard-000001.tar"
    a, b = first.read_bytes(), second.read_bytes()
    if len(a) != len(b):
        pytest.skip("the two shards differ in size; the swap would be caught by the size check anyway")
    first.write_bytes(b)
    second.write_bytes(a)
    with pytest.raises(DataError, match="SHA-256 differs"):
        epoch_ids(stream_of(stream_cfg(tmp_path, shards)))


def test_a_ctrl_c_during_a_checkpoint_write_stops_the_run_after_it(tmp_path, monkeypatch):
    """Raised inside torch.save, a Ctrl-C ended in torch's 'unexpected pos' error and a traceback; now
    the write completes, and the run stops with the one-line message and that checkpoint intact."""
    from codemae.errors import Interrupted
    from codemae.train import engine

    def interrupted_save(payload, path):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs here, inside the trainer's checkpoint write
        save_atomic(payload, path)

    monkeypatch.setattr(engine, "save_atomic", interrupted_save)
    monkeypatch.setattr(engine.signal, "getsignal", lambda signum: signal.default_int_handler)
    cfg = tiny_config(tmp_path / "run", train={"epochs": 50, "ckpt_every": 2})
    with pytest.raises(Interrupted, match="interrupted at step 2; the last checkpoint .* \\(step 2\\) is intact"):
        engine.pretrain(cfg)
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 2


def test_a_ctrl_c_swallowed_by_a_finaliser_still_stops_the_run(tmp_path, monkeypatch):
    """Python ignores exceptions raised in finalisers (``__del__`` during garbage collection): a Ctrl-C
    landing there used to be lost and the run went on. Here one lands in a finaliser during step 3."""
    from codemae.errors import Interrupted
    from codemae.train import engine

    class SignalsWhenCollected:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler runs here, inside the finaliser

    original = engine.Trainer.train_step

    def step_then_collect(self, batches, epoch):
        row = original(self, batches, epoch)
        if self.step == 3:
            SignalsWhenCollected()  # collected at once: its KeyboardInterrupt is swallowed
        return row

    monkeypatch.setattr(engine.Trainer, "train_step", step_then_collect)
    # Python's own Ctrl-C handler, even where this test runs with SIGINT ignored (a background job)
    monkeypatch.setattr(engine.signal, "getsignal", lambda signum: signal.default_int_handler)
    cfg = tiny_config(tmp_path / "run", train={"epochs": 50})
    with pytest.raises(Interrupted, match="interrupted at step 3;"):
        engine.pretrain(cfg)


def test_interrupt_prints_one_line_and_keeps_the_checkpoint(tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "run", train={"epochs": 10_000, "ckpt_every": 2}))
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.Popen([sys.executable, "-m", "codemae.cli", "pretrain", "--config", str(config)],
                            stderr=subprocess.PIPE, text=True, env=env,  # Ctrl-C live even if ignored here
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    checkpoint = tmp_path / "run" / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("no exit 60 s after Ctrl-C; its stderr ends: " + proc.communicate()[1][-3000:])
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert "interrupted at step" in err.strip().splitlines()[-1] and checkpoint.exists(), err[-3000:]
