"""Checkpoints: a run can be stopped at any moment and carried on to the same bits.

A checkpoint is a safetensors file written by io.save_checkpoint (a checksum over the arrays and
one over the header). Arrays: "params" (the flat parameter buffer), "optimizer.<name>" for
each optimizer state buffer (momentum: v; Adam: m, v) and, with early stopping once an epoch
has been scored, "best.params" (the weights of the epoch with the lowest validation loss).
The meta, JSON:

    {"checkpoint": 1,
     "config": TrainConfig.to_dict(), "spec": Spec.to_dict(),
     "epoch": E,          # the epoch in progress (config.epochs + 1 once the run is finished)
     "done": D,           # samples of epoch E's order already trained: a whole number of batches
     "step": S,           # optimizer steps so far (opt.t; Adam's bias correction needs it)
     "order_rng": {...},  # numpy bit_generator state just before epoch E's order was drawn
     "partial": {"loss_sum", "correct", "n", "seconds"},   # epoch E's sums so far
     "history": [...],    # one row per finished epoch
     "best_epoch": B,     # early stopping: the epoch of "best.params" (null before/without it)
     "stopped": false,    # early stopping ended the run (then it is finished before E > epochs)
     "engine": "numpy",   # the engine used ("auto" resolved): a resumed run uses the same
     "run": {...}}        # the caller's: `parnn train` keeps a run.resume.RunRecord here

Two files per directory: checkpoint.safetensors (newest) and checkpoint.prev.safetensors. A save
renames the newest to prev, then writes the new one atomically (temp file, fsync, rename), so at
every instant one complete checkpoint exists and a SIGKILL or power cut costs at most the steps
since the last one. load() takes the newest file that passes every check, else the previous.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shlex
import signal
import threading
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from parnn import io
from parnn.engines import EpochStats, available
from parnn.errors import ConfigError, ModelFileError, ParnnError
from parnn.paths import path_kind, shown
from parnn.core.model import Spec
from parnn.core.optim import make_optimizer
from parnn.run.config import TrainConfig
from parnn.run.train import Position

NEWEST = "checkpoint.safetensors"
PREVIOUS = "checkpoint.prev.safetensors"
FILES = (NEWEST, PREVIOUS)
VERSION = 1
SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def handling_signals(handler):
    """SIGINT and SIGTERM go to handler(signum, frame) inside, the old handlers come back
    after. Python handles signals in the main thread only: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = [(s, signal.signal(s, handler)) for s in SIGNALS]
    try:
        yield
    finally:
        for s, h in old:
            signal.signal(s, h if h is not None else signal.SIG_DFL)


class Interrupted(ParnnError):
    """SIGINT or SIGTERM stopped training after a checkpoint; exit status 128 + signal number."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.exit_status = 128 + signum


def resume_command(directory, mode=None, ranks=1):
    """The command that carries a run on; mode, ranks: a --distributed run's (parnn.distributed)."""
    if mode is None:
        return f"parnn train --resume {shlex.quote(str(directory))}"
    return (f"mpiexec -n {ranks} parnn train --distributed {mode} --resume "
            f"{shlex.quote(str(directory))}")


# --- writing -------------------------------------------------------------------------------

class Checkpointer:
    """Writes one run's checkpoints into `directory` (fit calls it at chunk boundaries)."""

    def __init__(self, directory, every=None, run=None):
        self.dir = Path(directory)
        self.every = every        # optimizer steps between checkpoints; None: after epochs only
        self.run = run or {}      # stored as meta["run"]
        self.last = None          # (epoch, step) of the newest checkpoint of this run
        self.signum = None        # set by the signal handler, acted on at the next boundary
        self.engine = None        # the engine training uses (what "auto" became)
        self._saved_step = 0
        self._wrote_newest = False  # whether the newest file is known good: this run wrote it

    def save(self, cfg, pos, net, opt):
        self.write(*self.contents(cfg, pos, net, opt))
        self.last, self._saved_step, self._wrote_newest = (pos.epoch, opt.t), opt.t, True

    def contents(self, cfg, pos, net, opt):
        """(arrays, meta) of a checkpoint at pos (see the module's docstring)."""
        arrays = {"params": net.params, **{f"optimizer.{k}": v for k, v in opt.state().items()}}
        if pos.best_params is not None:
            arrays["best.params"] = pos.best_params
        meta = {"checkpoint": VERSION, "config": cfg.to_dict(), "spec": net.spec.to_dict(),
                "epoch": pos.epoch, "done": pos.done, "step": opt.t, "order_rng": pos.order_rng,
                "partial": {"loss_sum": pos.stats.loss_sum, "correct": pos.stats.correct,
                            "n": pos.stats.n, "seconds": pos.seconds},
                "history": pos.history, "best_epoch": pos.best_epoch, "stopped": pos.stopped,
                "engine": self.engine, "run": self.run}
        return arrays, meta

    def write(self, arrays, meta):
        """One checkpoint file, atomically, the newest before it kept as prev."""
        newest = self.dir / NEWEST
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            # Keep the newest as prev until the new one is complete; but never rotate a damaged
            # file over a good prev (a run resumed from prev finds the newest damaged).
            if newest.exists() and (self._wrote_newest or self.usable(newest)):
                os.replace(newest, self.dir / PREVIOUS)
            io.save_checkpoint(newest, arrays, meta)
        except OSError as e:
            raise ParnnError(f"{self.dir}: cannot write a checkpoint: {e.strerror or e}") from None

    def usable(self, path):
        """Whether path is a checkpoint that passes every check (so it may become prev)."""
        return _usable(path)

    def after_chunk(self, cfg, pos, net, opt):
        """Inside an epoch: save when `every` steps have passed, or a signal came (then stop)."""
        if self.signum is not None:
            self.save(cfg, pos, net, opt)
            raise self._interrupted(pos, opt)
        if self.every and opt.t - self._saved_step >= self.every:
            self.save(cfg, pos, net, opt)

    def after_epoch(self, cfg, pos, net, opt):
        self.save(cfg, pos, net, opt)
        # After the last epoch only the output files are left to write: finish rather than stop.
        if self.signum is not None and pos.epoch <= cfg.epochs:
            raise self._interrupted(pos, opt)

    def _interrupted(self, pos, opt):
        name = signal.Signals(self.signum).name
        return Interrupted(f"stopped by {name} in epoch {pos.epoch} at step {opt.t}; checkpoint "
                           f"saved in {self.dir}: continue with `{resume_command(self.dir)}`",
                           self.signum)

    def kept(self):
        """What is left after a divergence, for its message."""
        if self.last is None:
            return "; no checkpoint had been written yet and no model file was written"
        return (f"; the last good checkpoint (epoch {self.last[0]}, step {self.last[1]}) is kept "
                f"in {self.dir} and no model file was written")

    @contextlib.contextmanager
    def running(self, opt, pos, engine=None):
        """While training: SIGINT/SIGTERM set a flag (no I/O in a handler: the loop saves at the
        next chunk boundary); a second one stops at once. Python handles signals in the main
        thread only, so elsewhere this does nothing."""
        self._saved_step, self.engine = opt.t, engine
        if opt.t:  # resumed: the checkpoint we started from is the last good one so far
            self.last = (pos.epoch, opt.t)
        # A run killed while writing leaves its temp file (parnn.atomic.atomic_open's name) behind.
        for stale in self.dir.glob(f".{NEWEST}.*.tmp"):
            stale.unlink(missing_ok=True)

        def handler(signum, frame):
            if self.signum is not None:
                raise KeyboardInterrupt
            self.signum = signum

        with handling_signals(handler):
            yield


def _usable(path):
    try:
        read(path)
        return True
    except ModelFileError:
        return False


# --- reading -------------------------------------------------------------------------------

@dataclass
class Checkpoint:
    """A checkpoint read back and checked through and through (see read())."""

    path: Path
    config: TrainConfig
    spec: Spec
    position: Position
    step: int
    arrays: dict
    run: dict
    engine: str | None = None  # the engine the run used: a resumed "auto" run keeps it

    @property
    def finished(self):
        return self.position.stopped or self.position.epoch > self.config.epochs

    def restore(self, net, opt, order_rng, n_train, batch_size):
        """Put the saved parameters, optimizer state and order RNG into a new run (fit calls
        this); returns a fresh copy of the Position."""
        pos = self.position
        if net.spec != self.spec:
            raise ModelFileError(f"{self.path}: the checkpoint's network {self.spec.sizes} does "
                                 f"not fit this data's {net.spec.sizes}")
        if pos.done and (pos.done >= n_train or pos.done % batch_size):
            raise ModelFileError(f"{self.path}: position {pos.done} is not a batch boundary "
                                 f"inside an epoch of {n_train} samples")
        net.params[...] = self.arrays["params"]
        opt.load_state({k.removeprefix("optimizer."): v for k, v in self.arrays.items()
                        if k.startswith("optimizer.")})
        opt.t = self.step
        order_rng.bit_generator.state = pos.order_rng
        best = self.arrays.get("best.params")
        return dataclasses.replace(pos, stats=dataclasses.replace(pos.stats),
                                   history=[dict(r) for r in pos.history],
                                   best_params=None if best is None else best.copy())


def read(path) -> Checkpoint:
    """One checkpoint file, or ModelFileError saying what is wrong with it."""
    path = Path(path)
    arrays, meta = io.load_checkpoint(path)
    if "members" in meta:   # every rank's state in one file: parnn.distributed reads it
        d = meta.get("distributed") or {}
        raise ConfigError(f"{path} is the checkpoint of a --distributed {d.get('mode')} run on "
                          f"{d.get('ranks')} ranks: continue it with "
                          f"`{resume_command(path.parent, d.get('mode'), d.get('ranks'))}`")
    return parse(path, arrays, meta)


def parse(path, arrays, meta) -> Checkpoint:
    """A checkpoint from (arrays, meta) as io.load_checkpoint returns them, checked through and
    through; ModelFileError saying what is wrong (read() reads a file; parnn.distributed keeps
    every rank's (arrays, meta) in one file)."""
    try:
        return _parse(path, arrays, meta)
    except ModelFileError:
        raise
    except (ParnnError, KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
        detail = " ".join(str(e).split()) or type(e).__name__
        raise ModelFileError(f"{path}: not a usable parnn checkpoint ({detail})") from None


def _int(value, what, lo=0, hi=None):
    if type(value) is not int or value < lo or (hi is not None and value > hi):
        raise ValueError(f"{what} {value!r} is not an integer in {lo}..{hi if hi else ''}")
    return value


def _number(value, what):
    if type(value) not in (int, float) or not np.isfinite(value):
        raise ValueError(f"{what} {value!r} is not a finite number")
    return float(value)


# Settings added after checkpoints were first written, and the values that reproduce what a
# checkpoint without them did: no validation split, no early stopping, none of the training
# ingredients (augmentation, dropout, label smoothing, weight decay, warm-up), an MLP (no layer
# list).
LATER_SETTINGS = {"validation_split": 0.0, "early_stopping": None, "augment": "none",
                  "dropout": 0.0, "label_smoothing": 0.0, "weight_decay": 0.0, "warmup_epochs": 0,
                  "layers": ""}


def _parse(path, arrays, meta):
    if meta.get("checkpoint") != VERSION:
        raise ModelFileError(f"{path}: not a parnn training checkpoint (version "
                             f"{meta.get('checkpoint')!r}, expected {VERSION})")
    c = meta["config"]
    names = {f.name for f in fields(TrainConfig)}
    if isinstance(c, dict) and names - set(c) <= set(LATER_SETTINGS):
        c = {**LATER_SETTINGS, **c}
    if not isinstance(c, dict) or set(c) != names:
        raise ValueError("the training settings are missing or malformed")
    cfg = TrainConfig(**c)   # checks every setting's type and range (run/config.py)
    spec = io.network_spec(path, meta["spec"])
    if spec != cfg.spec(spec.sizes[0], spec.sizes[-1]):
        raise ValueError("the network spec does not match the training settings")

    # Shapes first: they bound what the optimizer below allocates by the file's own size.
    params = arrays.get("params")
    if params is None or params.dtype != np.dtype(spec.dtype) or params.shape != (spec.n_params,):
        raise ValueError(f"tensor 'params' is missing or not {spec.dtype} ({spec.n_params},)")
    if not np.isfinite(params).all():
        raise ValueError("the parameters contain NaN or infinity")
    state = make_optimizer(cfg.optimizer, spec.n_params, spec.dtype, cfg.lr, cfg.momentum).state()
    best_epoch, stopped = meta.get("best_epoch"), meta.get("stopped", False)
    expected = {"params", *(f"optimizer.{k}" for k in state),
                *(["best.params"] if best_epoch is not None else [])}
    if set(arrays) != expected:
        raise ValueError(f"tensors {', '.join(sorted(arrays))}, expected {', '.join(sorted(expected))}")
    for k, v in state.items():
        a = arrays[f"optimizer.{k}"]
        if a.dtype != v.dtype or a.shape != v.shape:
            raise ValueError(f"optimizer state '{k}' is {a.dtype} {a.shape}, expected {v.dtype} {v.shape}")

    epoch = _int(meta["epoch"], "epoch", 1, cfg.epochs + 1)
    done = _int(meta["done"], "done")
    if done and epoch > cfg.epochs:
        raise ValueError(f"{done} samples into epoch {epoch} of {cfg.epochs}")
    p = meta["partial"]
    stats = EpochStats(_number(p["loss_sum"], "loss_sum"), _int(p["correct"], "correct", 0, done),
                       _int(p["n"], "n", done, done))
    seconds = _number(p["seconds"], "seconds")
    np.random.default_rng().bit_generator.state = meta["order_rng"]  # raises if malformed
    history = meta["history"]
    if not isinstance(history, list) or len(history) != epoch - 1:
        raise ValueError(f"the history does not have {epoch - 1} rows")
    for i, row in enumerate(history, 1):
        _check_row(row, i)
    run, engine = meta.get("run", {}), meta.get("engine")
    if engine is not None and engine not in available():
        raise ValueError(f"engine {engine!r} is not one of {', '.join(available())}")
    if not isinstance(run, dict):
        raise ValueError("'run' is not a JSON object")
    _check_run(run)
    _check_best(cfg, history, best_epoch, stopped, arrays.get("best.params"), params)
    pos = Position(epoch, done, meta["order_rng"], stats, seconds, history, best_epoch, None,
                   stopped)
    return Checkpoint(path, cfg, spec, pos, _int(meta["step"], "step"), arrays, run, engine)


# A history row's measures (run/train.py's rows): required ones, and those a row may have.
ROW_REQUIRED = ("loss", "train_acc", "seconds", "samples_per_s")
ROW_OPTIONAL = ("val_loss", "val_acc", "test_acc")
ROW_FRACTIONS = ("train_acc", "val_acc", "test_acc")


def _check_row(row, epoch):
    """Row `epoch` of the history: its epoch number, and only finite numbers where run/train.py
    puts them (fractions for accuracies, >= 0 for losses and times); nothing else."""
    if not isinstance(row, dict) or row.get("epoch") != epoch or type(row["epoch"]) is not int:
        raise ValueError(f"history row {epoch} is not a row of epoch {epoch}")
    missing = [k for k in ROW_REQUIRED if k not in row]
    unknown = [k for k in row if k != "epoch" and k not in ROW_REQUIRED + ROW_OPTIONAL]
    if missing or unknown:
        raise ValueError(f"history row {epoch} " + (f"lacks {', '.join(missing)}" if missing else
                                                    f"has unknown {', '.join(map(repr, unknown))}"))
    for k, v in row.items():
        if k == "epoch":
            continue
        v = _number(v, f"history row {epoch}'s {k}")
        if v < 0 or (k in ROW_FRACTIONS and v > 1):
            raise ValueError(f"history row {epoch}'s {k} {v!r} is out of range")


def _check_run(run):
    """The caller's record (run.resume.RunRecord's fields, when there) has the right types, so
    nothing acts on a malformed one; RunRecord.of_checkpoint checks what it means."""
    for k in ("dataset", "data_dir", "out"):
        if k in run and not isinstance(run[k], str):
            raise ValueError(f"run.{k} {run[k]!r} is not a string")
    sha = run.get("sha256", {})
    if not (isinstance(sha, dict) and all(isinstance(k, str) and isinstance(v, str)
                                          for k, v in sha.items())):
        raise ValueError("run.sha256 is not a table of file digests")
    for k in ("limit_train", "limit_test", "checkpoint_every"):
        if run.get(k) is not None:
            _int(run[k], f"run.{k}", 1)


def _check_best(cfg, history, best_epoch, stopped, best, params):
    """Early stopping's state agrees with the settings and the history: best_epoch is the
    first epoch of the lowest validation loss, and stopped only once patience ran out."""
    if type(stopped) is not bool:
        raise ValueError(f"stopped {stopped!r} is not true or false")
    if best_epoch is None:
        if stopped or (cfg.early_stopping and history):
            raise ValueError("early stopping's best epoch is missing")
        return
    if not cfg.early_stopping:
        raise ValueError("a best epoch without early stopping")
    _int(best_epoch, "best_epoch", 1, len(history))
    losses = [r.get("val_loss") for r in history]
    if not all(type(v) in (int, float) for v in losses):
        raise ValueError("the history has no validation loss for every epoch")
    lowest, first = math.inf, None   # as run.train.watch_best: the first strictly lowest
    for epoch, v in enumerate(losses, 1):
        if v < lowest:
            lowest, first = v, epoch
    if best_epoch != first:
        raise ValueError(f"best_epoch {best_epoch} is not the epoch of the lowest validation loss")
    if stopped != (len(history) - best_epoch >= cfg.early_stopping):
        raise ValueError(f"stopped is {stopped} {len(history) - best_epoch} epochs after the best")
    if best.dtype != params.dtype or best.shape != params.shape or not np.isfinite(best).all():
        raise ValueError("tensor 'best.params' is not a finite buffer like 'params'")


def load(directory, warn=None, reader=None) -> Checkpoint:
    """The newest usable checkpoint in `directory` (a checkpoint directory, or a run's output
    directory holding checkpoints/), else the previous one (warn(message) says why).
    reader(path): read() by default; parnn.distributed passes its own."""
    reader = reader or read
    d = Path(directory)
    kind = path_kind(d, ModelFileError)
    if kind != "dir":
        raise ModelFileError(f"{shown(d)}: no such checkpoint directory" if kind is None else
                             f"{shown(d)}: not a directory (--resume takes the checkpoint "
                             "directory)")
    present = {name: path_kind(d / name, ModelFileError) is not None
               for name in (NEWEST, PREVIOUS)}
    if not any(present.values()) and path_kind(d / "checkpoints", ModelFileError) == "dir":
        d = d / "checkpoints"
        present = {name: path_kind(d / name, ModelFileError) is not None
                   for name in (NEWEST, PREVIOUS)}
    errors = []
    for name in (NEWEST, PREVIOUS):
        if not present[name]:
            continue
        try:
            ck = reader(d / name)
        except ModelFileError as e:
            errors.append(str(e))
            continue
        if errors and warn is not None:
            warn(f"{errors[0]}; using the previous checkpoint {ck.path}")
        return ck
    if not errors:
        raise ModelFileError(f"{shown(d)}: no checkpoint here (expected {NEWEST})")
    raise ModelFileError(f"{shown(d)}: no usable checkpoint: {'; '.join(errors)}")


def peek(directory):
    """The usable checkpoint in directory, or None (nothing there, or nothing readable)."""
    try:
        return load(directory)
    except ModelFileError:
        return None
