"""The pretraining loop: one process or many under torchrun, resuming from the run folder.

Randomness is a pure function of (seed, step, rank): data order and augmentation
come from the epoch plan, masks and drop-path from a generator reseeded at every
micro-step. A checkpoint therefore needs no RNG state, and a resumed run takes
exactly the steps an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from codemae import __version__
from codemae.batch import images_in, model_input
from codemae.checkpoint import LAYOUT, check_entries, load_checkpoint, save_atomic
from codemae.config import Config, to_dict
from codemae.data.pipeline import build_training_data, source_kinds
from codemae.errors import ConfigError, Interrupted, TrainingError, one_line
from codemae.loading import prepare_teacher
from codemae.methods import PretrainMethod, build_method
from codemae.official import init_encoder
from codemae.train.distributed import (
    DistInfo,
    all_reduce_mean,
    init_distributed,
    params_in_sync,
    shutdown,
)
from codemae.train.metrics import MetricsLog, plot_losses, step_line
from codemae.train.accel import compile_blocks, enable_tf32, teacher_in_bf16, with_device_precision
from codemae.train.optim import lr_at, pretraining_optimizer, scaled_lr
from codemae.train.step import TrainStep

log = logging.getLogger("codemae")
CHECKPOINT = Path("checkpoints") / "last.pt"


def pretrain(cfg: Config) -> dict:
    """Run (or resume) the pretraining described by ``cfg``; returns the run summary."""
    info = init_distributed(cfg.train.device, cfg.train.dist_timeout_s)
    cfg = with_device_precision(cfg, info.device)  # what the run uses is what its config and checkpoint record
    run_dir = Path(cfg.run_dir)
    lock = None
    try:
        if info.is_main:
            prepare_run_dir(run_dir)
            lock = lock_run_dir(run_dir)
        check_resume(cfg, run_dir)
        setup_logging(run_dir, info, shows_bar(cfg, info))
        return Trainer(cfg, info, run_dir).fit()
    except OSError as err:  # a file the run cannot create, write or read (metrics, logs, statistics)
        raise TrainingError(f"cannot use {err.filename or run_dir}: {err.strerror or err}") from err
    except RuntimeError as err:
        if not (info.enabled and peer_failure(err)):
            raise
        raise TrainingError(
            f"rank {info.rank}: another process of the run failed or stopped answering "
            f"({one_line(err)}); the last checkpoint {run_dir / CHECKPOINT} is intact, relaunch to resume"
        ) from err
    finally:
        shutdown()
        close_logging()
        if lock is not None:
            lock.close()  # releases the lock


LOCK = ".lock"
# keys a resumed run may change: how long it runs, how often it logs and saves, how it loads data
RESUME_SAFE = ("run_dir", "train.epochs", "train.max_steps", "train.max_minutes", "train.log_every", "train.ckpt_every",
               "train.progress", "train.dist_timeout_s", "train.resume", "train.compile", "data.num_workers")


def lock_run_dir(run_dir: Path):  # noqa: ANN201 (an open file whose lock lasts as long as it is open)
    """An exclusive lock on the run folder for this process's lifetime; a second process exits 2 naming
    the holder's pid."""
    handle = open(run_dir / LOCK, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise TrainingError(f"run folder {run_dir} is in use by another run (pid {holder}); wait for it or "
                            "choose another run_dir") from err
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        out |= flatten(value, f"{name}.") if isinstance(value, dict) else {name: value}
    return out


def check_resume(cfg: Config, run_dir: Path) -> None:
    """Resuming a run with another config is refused (naming the keys that differ) unless the change is
    one of ``RESUME_SAFE`` or ``train.resume=force``."""
    path = run_dir / CHECKPOINT
    if cfg.train.resume == "force" or not path.is_file():
        return
    state = load_checkpoint(path, mmap=True)  # the config the checkpoint was written with; tensors stay on disk
    check_entries(state, path, "config")
    stored, new = flatten(state["config"]), flatten(to_dict(cfg))
    differ = sorted(k for k in stored.keys() | new.keys()
                    if stored.get(k) != new.get(k) and not k.startswith(RESUME_SAFE))
    if differ:
        raise ConfigError(f"run folder {run_dir} holds a run of another config ({', '.join(differ[:6])}"
                          f"{' ...' if len(differ) > 6 else ''} differ); use a new run_dir, or set "
                          "train.resume=force to continue it anyway")


PEER_FAILURE_MARKS = ("gloo", "nccl", "connection closed", "connection reset", "timed out", "timeout")


def peer_failure(err: RuntimeError) -> bool:
    """Whether ``err`` says another rank died or stopped answering (collective errors; gloo raises
    plain RuntimeErrors naming its transport)."""
    text = str(err).lower()
    return isinstance(err, dist.DistError) or any(mark in text for mark in PEER_FAILURE_MARKS)


def prepare_run_dir(run_dir: Path) -> None:
    """Create the run folder and prove it is writable before any work is done."""
    probe = run_dir / ".write-test"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise TrainingError(f"run folder {run_dir} is not writable: {err.strerror or err}") from err


STEP_LINE = "step_line"  # set on the log records of the per-``log_every`` step lines


def shows_bar(cfg: Config, info: DistInfo) -> bool:
    """A progress bar on a terminal (``train.progress``, main process); elsewhere (a file, CI, SLURM) and
    with ``train.progress=false`` one plain line per ``train.log_every`` steps instead."""
    return cfg.train.progress and info.is_main and sys.stderr.isatty()


def setup_logging(run_dir: Path, info: DistInfo, bar: bool = False) -> None:
    """Log to the console and (main process) ``train.log``; the step lines reach the console only when no
    progress bar is drawn there, and the log file always."""
    close_logging()
    log.setLevel(logging.INFO if info.is_main else logging.WARNING)
    log.propagate = False
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if bar:
        handlers[0].addFilter(lambda record: not getattr(record, STEP_LINE, False))
    if info.is_main:
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    for handler in handlers:
        handler.setFormatter(formatter)
        log.addHandler(handler)


def close_logging() -> None:
    """Detach and close the run's handlers (the log file, and the console stream of this run)."""
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()


def check_pairing(method: PretrainMethod, kinds: set[str]) -> None:
    """A method that fuses pairs (``needs_pairs``) refuses data with unpaired samples."""
    if method.needs_pairs and kinds - {"paired"}:
        raise ConfigError(f"config key 'data.sources': {type(method).__name__} fuses the two images of a pair and "
                          f"needs paired sources only; these sources also hold {sorted(kinds - {'paired'})}")


def nonfinite(terms: dict[str, float], grad_norm: float) -> str:
    """What went bad, naming the loss terms (rank-averaged values); '' if all is finite."""
    bad = {name: v for name, v in terms.items() if not math.isfinite(v)}
    if bad:
        return "non-finite loss " + ", ".join(f"'{k}' = {v}" for k, v in bad.items())
    return "" if math.isfinite(grad_norm) else f"non-finite gradient norm ({grad_norm})"


def writer_alive(temp: Path) -> bool:
    """Whether the process that named a temp file ``.<name>.tmp-<pid>`` still runs."""
    pid = temp.name.rpartition("-")[2]
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


def step_seed(seed: int, micro_step: int, rank: int) -> int:
    return ((seed * 1_000_003 + micro_step) * 1_009 + rank) % (2**63 - 1)


class Trainer:
    def __init__(self, cfg: Config, info: DistInfo, run_dir: Path) -> None:
        self.cfg, self.info, self.run_dir = cfg, info, run_dir
        tc = cfg.train
        if tc.precision == "bf16" and info.device.type == "cpu":
            log.warning("bf16 autocast on a CPU without bf16 hardware is very slow; use precision=fp32")
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.method = build_method(cfg)
        if cfg.model.init and not (run_dir / CHECKPOINT).is_file():  # a resumed run's weights come from last.pt
            init_encoder(self.method.encoder, cfg.model.init)
        self.method.to(info.device)
        enable_tf32(info.device)
        kinds = source_kinds(cfg.data)
        check_pairing(self.method, kinds)
        teacher_features = prepare_teacher(self.method, cfg.method, info.device)
        teacher_in_bf16(self.method, tc.precision, info.device)
        if tc.compile:
            compile_blocks(self.method, info.device)
        self.loader, self.sampler = build_training_data(cfg.data, cfg.model.geometry, run_dir, info.world_size,
                                                        info.rank, info.is_main, cfg.seed, teacher_features)
        self.steps_per_epoch = len(self.sampler) // tc.accum_steps
        if self.steps_per_epoch == 0:
            raise ConfigError(f"config key 'train.accum_steps': {tc.accum_steps} exceeds the "
                              f"{len(self.sampler)} batches of an epoch")
        self.total_steps = tc.epochs * self.steps_per_epoch
        self.stop_at = min(self.total_steps, tc.max_steps) if tc.max_steps else self.total_steps
        self.effective_batch = images_in(cfg.data.batch_size) * info.world_size * tc.accum_steps
        self.peak_lr = scaled_lr(tc.base_lr, self.effective_batch)
        self.warmup_steps = tc.warmup_epochs * self.steps_per_epoch
        self.optimizer = pretraining_optimizer(self.method, self.peak_lr, tc.weight_decay, tc.betas)
        self.step = self.resume()
        self.saved_step = self.step
        self.skipped_steps = 0
        self.skipped_samples = 0
        self.model = self.method
        if info.enabled:
            single = ("opt" in kinds) != ("sar" in kinds)  # one unpaired modality only
            self.model = DistributedDataParallel(self.method, find_unused_parameters=single)
        self.step_parts = TrainStep(self.model, self.optimizer, info.device, tc.precision, tc.clip_grad)
        self.metrics = MetricsLog(run_dir, self.step) if info.is_main else None
        if info.is_main:
            (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

    def resume(self) -> int:
        path = self.run_dir / CHECKPOINT
        if self.info.is_main:
            for stale in path.parent.glob(f".{path.name}.tmp-*"):  # a write a crash interrupted
                if writer_alive(stale):
                    continue
                log.info("removing %s, left by a checkpoint write that did not finish", stale)
                stale.unlink(missing_ok=True)
        if not path.is_file():
            return 0
        state = load_checkpoint(path)
        check_entries(state, path, "model", "optimizer", "step", "config")
        if state.get("layout", 1) < LAYOUT:
            raise TrainingError(f"checkpoint {path} has codemae's model layout {state.get('layout', 1)}, this "
                                f"version trains layout {LAYOUT}: it cannot be resumed; start a new run_dir")
        try:
            self.method.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, RuntimeError, ValueError) as err:
            raise TrainingError(f"checkpoint {path} does not match the configured model: "
                                f"{str(err).splitlines()[0]}") from err
        log.info("resumed from %s at step %d", path, state["step"])
        return int(state["step"])

    def checkpoint(self) -> None:
        """Save the run; a Ctrl-C noted while the file is written stops the run once it is complete (raised
        inside torch.save, it would end in torch's own error instead of the one-line message)."""
        self.saving = True
        try:
            if self.info.is_main:
                save_atomic({
                    "model": self.method.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "step": self.step,
                    "config": to_dict(self.cfg),
                    "version": __version__,
                    "layout": LAYOUT,
                }, self.run_dir / CHECKPOINT)
            self.saved_step = self.step
        finally:
            self.saving = False
        if self.interrupt_requested:
            raise KeyboardInterrupt

    def fit(self) -> dict:
        tc = self.cfg.train
        log.info("%d process(es), effective batch %d images, peak lr %.3g, %d steps/epoch, steps %d -> %d of %d",
                 self.info.world_size, self.effective_batch, self.peak_lr, self.steps_per_epoch,
                 self.step, self.stop_at, self.total_steps)
        start, start_step = time.perf_counter(), self.step
        self.deadline, self.timed_out = start + 60 * tc.max_minutes if tc.max_minutes else math.inf, False
        self.logged_at = (start, self.step)  # time and step of the last step line, for its throughput
        self.first_logged: tuple[float, int] | None = None  # the first step line's, for the steady step time
        bar = tqdm(total=self.stop_at, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not shows_bar(self.cfg, self.info))
        self.method.train()
        try:
            with self.sigint_noted():
                self.run_steps(bar)
        except KeyboardInterrupt:
            bar.close()
            saved = f"the last checkpoint {self.run_dir / CHECKPOINT} (step {self.saved_step}) is intact; re-run " \
                    "the same command to resume" if self.saved_step else "no checkpoint was written yet"
            raise Interrupted(f"interrupted at step {self.step}; {saved}") from None
        bar.close()
        return self.finish(time.perf_counter() - start, self.step - start_step)

    @contextlib.contextmanager
    def sigint_noted(self) -> Iterator[None]:
        """Ctrl-C raises KeyboardInterrupt as usual and is also noted, so that one landing where Python
        swallows exceptions (a finaliser run by garbage collection) still stops the run after the step.
        Only in the main thread, and only where SIGINT has Python's default handler. While a checkpoint is
        written it is only noted (:meth:`checkpoint` raises it after the write)."""
        self.interrupt_requested = self.saving = False
        if threading.current_thread() is not threading.main_thread() or \
                signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            yield
            return

        def note(signum, frame):
            self.interrupt_requested = True
            if not self.saving:
                raise KeyboardInterrupt

        signal.signal(signal.SIGINT, note)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def run_steps(self, bar: tqdm) -> None:
        """Train from ``self.step`` to ``stop_at``, logging and checkpointing on the way."""
        tc = self.cfg.train
        while self.step < self.stop_at and not self.timed_out:
            epoch, in_epoch = divmod(self.step, self.steps_per_epoch)
            self.sampler.set_epoch(epoch, start=in_epoch * tc.accum_steps)
            batches = iter(self.loader)
            while in_epoch < self.steps_per_epoch and self.step < self.stop_at and not self.timed_out:
                row = self.train_step(batches, epoch)
                if self.interrupt_requested:
                    raise KeyboardInterrupt
                in_epoch += 1
                bar.update(1)
                bar.set_postfix(loss=f"{row['total']:.4f}")
                if self.metrics and (self.step % tc.log_every == 0 or self.step == self.stop_at):
                    self.log_row(row)
                self.skipped_samples += int(row["skipped_samples"])
                if in_epoch == self.steps_per_epoch and self.skipped_samples and self.info.is_main:
                    log.warning("epoch %d: %d unreadable samples skipped so far (data.on_error=skip)", epoch,
                                self.skipped_samples)
                self.timed_out = self.out_of_time()
                if (self.step % tc.ckpt_every == 0 or in_epoch == self.steps_per_epoch or self.step == self.stop_at
                        or self.timed_out):
                    self.checkpoint()
        if self.timed_out and self.step < self.stop_at:
            log.info("train.max_minutes=%g reached at step %d of %d", tc.max_minutes, self.step, self.stop_at)

    def out_of_time(self) -> bool:
        """Whether this run has trained for ``train.max_minutes`` in this process (checked after each step;
        rank 0's clock decides for every rank, so all stop at the same step)."""
        if not math.isfinite(self.deadline):  # no limit: no tensor, no device round trip each step
            return False
        over = torch.tensor(float(time.perf_counter() >= self.deadline), device=self.info.device)
        if self.info.enabled:
            dist.broadcast(over, 0)
        return bool(over)

    def log_row(self, row: dict[str, float]) -> None:
        """``row`` to metrics.csv and TensorBoard, and as one plain step line with the throughput (images per
        second, all processes) since the previous one."""
        now, step = time.perf_counter(), int(row["step"])
        rate = (step - self.logged_at[1]) * self.effective_batch / max(now - self.logged_at[0], 1e-9)
        self.logged_at = (now, step)
        self.first_logged = self.first_logged or (now, step)
        self.metrics.log(row)
        log.info(step_line(row, self.stop_at, rate), extra={STEP_LINE: True})

    def train_step(self, batches, epoch: int) -> dict[str, float]:
        tc, device = self.cfg.train, self.info.device
        lr = lr_at(self.step, self.peak_lr, self.warmup_steps, self.total_steps, tc.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        sums: dict[str, torch.Tensor] = {}
        skipped_samples = 0.0
        for micro in range(tc.accum_steps):
            batch, skipped = model_input(next(batches), device)
            torch.manual_seed(step_seed(self.cfg.seed, self.step * tc.accum_steps + micro, self.info.rank))
            last = micro == tc.accum_steps - 1
            sync = contextlib.nullcontext() if last or not self.info.enabled else self.model.no_sync()
            with sync:
                terms = self.step_parts.forward(batch)
                # one collective per micro-step: the loss terms and the count of skipped unreadable samples
                reduced = all_reduce_mean(torch.stack([*(t.detach().float() for t in terms.values()),
                                                       torch.tensor(float(skipped), device=device)]), self.info)
                self.step_parts.backward(terms, 1 / tc.accum_steps)
            for name, value in zip(terms, reduced):
                sums[name] = sums.get(name, 0.0) + value / tc.accum_steps
            skipped_samples += float(reduced[-1]) * self.info.world_size
        grad_norm = self.step_parts.clip()
        values = {name: float(v) for name, v in sums.items()}
        problem = nonfinite(values, grad_norm)
        if problem and tc.on_nonfinite == "stop":
            raise TrainingError(f"{problem} at step {self.step}; stopped before the update, "
                                f"last good checkpoint {self.run_dir / CHECKPOINT} kept")
        if problem:  # every rank sees the same all-reduced values, so all skip together
            log.warning("%s at step %d; update skipped (train.on_nonfinite=skip)", problem, self.step)
            self.skipped_steps += 1
        self.step_parts.apply(update=not problem)
        self.step += 1
        return {"step": self.step, "epoch": epoch, "lr": lr, "total": sum(values.values()), **values,
                "grad_norm": grad_norm,
                "skipped_samples": round(skipped_samples)}

    def steady_seconds_per_step(self) -> float | None:
        """Seconds a step between the first and the last step line: the step time without the start-up
        (data-loader workers, first batches) that ``seconds`` includes; None with fewer than two lines."""
        if self.first_logged is None or self.logged_at[1] <= self.first_logged[1]:
            return None
        return round((self.logged_at[0] - self.first_logged[0]) / (self.logged_at[1] - self.first_logged[1]), 4)

    def finish(self, seconds: float, steps: int) -> dict:
        in_sync = params_in_sync(self.method, self.info)
        summary = {
            "step": self.step,
            "total_steps": self.total_steps,
            "world_size": self.info.world_size,
            "effective_batch": self.effective_batch,
            "peak_lr": self.peak_lr,
            "ranks_in_sync": in_sync,
            "skipped_samples": self.skipped_samples,
            "skipped_steps": self.skipped_steps,
            "seconds": round(seconds, 2),
            "max_minutes_reached": self.timed_out and self.step < self.stop_at,
            "pairs_per_s": round(steps * self.effective_batch / 2 / seconds, 2) if steps and seconds else None,
            "steady_seconds_per_step": self.steady_seconds_per_step(),
            "final": self.metrics.rows[-1] if self.metrics and self.metrics.rows else None,
        }
        if not in_sync:
            raise TrainingError("parameters differ across ranks at the end of training")
        if self.info.is_main:
            self.metrics.close()
            plot_losses(self.metrics.rows, self.run_dir / "loss_curve.png", f"{self.cfg.method.name} pretraining")
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            log.info("done: step %d, %s", self.step, self.run_dir / CHECKPOINT)
        return summary
