"""The training loop: epochs, shuffling, chunks, validation, early stopping, history.

One plain loop (as in llm.c): for each epoch, shuffle an index order from the seed, hand it to
the engine in chunks of whole batches (so a progress bar can move and a checkpoint can be taken
in between), score the validation set, record one history row. With early stopping it keeps the
weights of the epoch with the lowest validation loss and stops once `early_stopping` epochs have
passed without a lower one. The test set is scored once, at the end, on the weights returned
(after every epoch too only when asked). The settings come checked (run/config.py), the
validation split is carved by run/api.py, what a run saves is in run/outputs.py.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import numpy as np

from parnn import __version__
from parnn.core.losses import smooth_labels
from parnn.core.model import MLP
from parnn.core.optim import make_optimizer
from parnn.engines import EpochStats, scaled
from parnn.errors import ConfigError, DivergenceError
from parnn.run.config import TrainConfig, batch_size_for, lr_at, pick_engine
from parnn.run.memory import SCORE_ROWS


# --- threads ---------------------------------------------------------------------------------

def set_threads(n, engine):
    """Numba's thread count (for compiled engines) and the BLAS pool; returns a context to exit."""
    from threadpoolctl import threadpool_limits

    info = {"threads": n, "threading_layer": None}
    if engine.name != "numpy":
        import numba

        if n > numba.config.NUMBA_NUM_THREADS:
            raise ConfigError(f"threads {n} is more than Numba's pool of "
                              f"{numba.config.NUMBA_NUM_THREADS} (set NUMBA_NUM_THREADS to raise it)")
        numba.set_num_threads(n)
    return threadpool_limits(limits=n, user_api="blas"), info


# --- what the loop keeps ---------------------------------------------------------------------

@dataclass
class Result:
    net: MLP                        # the weights returned: with early stopping, the best epoch's
    history: list                   # one row per epoch trained (see fit)
    config: TrainConfig
    engine: str
    info: dict
    test_acc: float | None = None   # of the weights returned; None without a test set
    best_epoch: int | None = None   # early stopping: the epoch whose weights were returned
    stopped: bool = False           # early stopping ended the run before cfg.epochs


@dataclass
class Position:
    """Where training is: with the parameters and optimizer state, all a checkpoint needs to
    carry on bit for bit (see parnn.run.checkpoint)."""

    epoch: int = 1                  # the epoch in progress; cfg.epochs + 1 once all are done
    done: int = 0                   # samples of its order already trained (whole batches)
    order_rng: dict | None = None   # the order RNG's state before it drew this epoch's order
    stats: EpochStats = field(default_factory=EpochStats)  # sums over those `done` samples
    seconds: float = 0.0            # training time spent on them
    history: list = field(default_factory=list)
    # Early stopping: the epoch with the lowest validation loss so far and its weights (the
    # epochs since then are len(history) - best_epoch), and whether patience ran out.
    best_epoch: int | None = None
    best_params: np.ndarray | None = None
    stopped: bool = False


@dataclass(frozen=True)
class Subset:
    """Rows of a data set: X (n, features) and y (n,) class indices; rows None = all of them.
    It is scored in chunks of rows, so it is never copied whole."""

    X: np.ndarray
    y: np.ndarray
    rows: np.ndarray | None = None

    def __len__(self):
        return len(self.X) if self.rows is None else len(self.rows)

    def chunks(self, size):
        for i in range(0, len(self), size):
            which = slice(i, i + size) if self.rows is None else self.rows[i:i + size]
            yield self.X[which], self.y[which]


def score(net, subset, batch=SCORE_ROWS):
    """(mean loss, accuracy) of net on a Subset; the loss is the one it trains on. A chunk of
    rows at a time: its float inputs and activations are all the memory scoring takes."""
    from parnn.data import one_hot

    loss_sum, correct, n_out = 0.0, 0, net.spec.sizes[-1]
    for X, y in subset.chunks(net.spec.rows_at_once(batch)):
        p = net.forward(scaled(X, net.dtype))[-1]      # uint8 pixels: x / 255, a chunk at a time
        loss_sum += net.loss.value(p, one_hot(y, n_out, net.dtype))
        correct += int(np.count_nonzero(p.argmax(axis=1) == y))
    return loss_sum / len(subset), correct / len(subset)


def chunk_size(engine, batch_size, n, max_chunk=None):
    """Samples per engine call: whole batches, a few thousand samples, so progress moves;
    at most max_chunk (whole batches too) so a checkpoint every N steps lands on a boundary."""
    target = 2000 if batch_size == 1 else 8192
    size = min(n, max(batch_size, (target // batch_size) * batch_size))
    return min(size, max_chunk) if max_chunk else size


# --- the loop --------------------------------------------------------------------------------

def check_early_stopping(cfg, has_validation):
    """Early stopping watches the validation loss: ConfigError without a validation set."""
    if cfg.early_stopping and not has_validation:
        raise ConfigError("early stopping watches the validation loss, but there is no "
                          "validation set: set a validation split > 0 (--validation-split)")


def fit(cfg, data, progress=True, log=print, on_chunk=None, checkpoints=None, resume=None,
        engine=None, *, rows=None, validation=None, test_every_epoch=False, on_epoch=None):
    """Train a network on data (a parnn.data.Dataset, or anything with its X_train, y_train,
    X_test, y_test and class_names; X_test may be None); returns a Result.
    parnn.run.api.run_training is the way in that carves cfg.validation_split and calls this.

    rows: the rows of data.X_train to train on (None: all of them).
    validation: a Subset scored after every epoch (val_loss, val_acc in its row); early
    stopping (cfg.early_stopping) watches its loss, so needs one.
    test_every_epoch: score the test set after every epoch too (test_acc in every row); by
    default only once, at the end, on the weights returned (test_acc in the row of the epoch
    they are from), so the test set never steers training.
    on_epoch(row) is called after each epoch's row is recorded and checkpointed.
    on_chunk(epoch, done, net, opt) is called after every engine call (tests).
    checkpoints: a parnn.run.checkpoint.Checkpointer or None. It saves after every epoch and every
    `checkpoints.every` optimizer steps, and turns SIGINT/SIGTERM into a checkpoint followed by
    checkpoint.Interrupted.
    resume: a parnn.run.checkpoint.Checkpoint to carry on from, bit for bit, instead of a new network.
    engine: the engine object to train with (parnn.distributed's allreduce, or one picked
    before); by default pick_engine makes the one for cfg. Either way the run keeps one engine.
    """
    from parnn.data import one_hot

    n_train = len(data.X_train) if rows is None else len(rows)
    bs = batch_size_for(cfg, n_train)
    check_early_stopping(cfg, validation is not None)
    spec = cfg.spec(data.X_train.shape[1], len(data.class_names))
    engine = pick_engine(cfg, spec, n_train) if engine is None else engine
    for name, wanted in (("augment", cfg.augment != "none"), ("dropout", cfg.dropout)):
        if wanted and getattr(engine, name, None) is None:
            raise ConfigError(f"{name} {getattr(cfg, name)}: the engine {engine.name} given was "
                              f"made without it (make it with run.config.engine_options)")
    net = MLP(spec, init=cfg.init, seed=cfg.seed)
    # uint8 pixels stay uint8 for engines that scale what they read (takes_pixels): a quarter
    # of float32's memory; the others get them scaled once, here.
    pixels = data.X_train.dtype == np.uint8 and getattr(engine, "takes_pixels", False)
    X = np.ascontiguousarray(data.X_train) if pixels else \
        np.ascontiguousarray(scaled(data.X_train, spec.dtype))
    T = one_hot(data.y_train, spec.sizes[-1], spec.dtype)
    if cfg.label_smoothing:   # every engine then trains on the smoothed loss (core/losses.py)
        T = smooth_labels(T, cfg.label_smoothing, out=T)
    test = None if data.X_test is None or not len(data.X_test) else \
        Subset(data.X_test, data.y_test)
    opt = make_optimizer(cfg.optimizer, spec.n_params, spec.dtype, cfg.lr, cfg.momentum,
                         cfg.weight_decay)
    # The shuffle has its own stream (seed + 1, as in the C reference): the order never depends
    # on how many random numbers the init drew.
    order_rng = np.random.default_rng(cfg.seed + 1)
    pos = resume.restore(net, opt, order_rng, n_train, bs) if resume is not None else Position()
    max_chunk = checkpoints.every * bs if checkpoints is not None and checkpoints.every else None

    def after_chunk(epoch, done, net, opt):
        if on_chunk is not None:
            on_chunk(epoch, done, net, opt)
        if checkpoints is not None and done < n_train:  # the epoch's end is saved after its row
            checkpoints.after_chunk(cfg, pos, net, opt)

    limits, info = set_threads(cfg.threads, engine)
    info["engine"] = engine.name
    watching = checkpoints.running(opt, pos, engine.name) if checkpoints is not None \
        else contextlib.nullcontext()
    # Overflow is reported as one DivergenceError after the chunk, not as NumPy warnings.
    with limits, watching, np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        log(f"parnn {__version__}: {spec.shape_text() if spec.arch else spec.sizes} "
            f"{spec.hidden}/{spec.output} {spec.loss} "
            f"{spec.dtype}, {cfg.optimizer} lr={cfg.lr} batch={bs}, engine {engine.name}, "
            f"{cfg.threads} thread(s), {n_train} training samples"
            + (f", {len(validation)} validation" if validation is not None else "")
            + (f", resumed at epoch {pos.epoch} step {opt.t}" if resume is not None else ""))
        for epoch in range(pos.epoch, cfg.epochs + 1):
            if pos.stopped:   # resumed from the checkpoint of a run early stopping ended
                break
            # A resumed run restored this state, so it draws the same order again.
            pos.order_rng = order_rng.bit_generator.state
            order = order_rng.permutation(n_train)
            if rows is not None:
                order = rows[order]
            opt.lr = lr_at(cfg, epoch)
            try:
                stats, seconds = run_epoch(engine, net, opt, X, T, order, bs, epoch, cfg,
                                           progress, after_chunk, pos, max_chunk)
            except DivergenceError as e:
                note = checkpoints.kept() if checkpoints is not None else ""
                raise DivergenceError(f"{e}{note}") from None
            row = dict(epoch=epoch, loss=stats.loss, train_acc=stats.accuracy)
            if validation is not None:
                row["val_loss"], row["val_acc"] = score(net, validation)
            if test is not None and test_every_epoch:
                row["test_acc"] = score(net, test)[1]
            row.update(seconds=seconds, samples_per_s=stats.n / seconds if seconds else 0.0)
            pos.history.append(row)
            if cfg.early_stopping:
                watch_best(cfg, pos, net, row)
            log(epoch_line(row, cfg.epochs))
            pos.epoch, pos.done, pos.stats, pos.seconds = epoch + 1, 0, EpochStats(), 0.0
            pos.order_rng = order_rng.bit_generator.state
            if checkpoints is not None:
                checkpoints.after_epoch(cfg, pos, net, opt)
            if on_epoch is not None:
                on_epoch(row)
        if cfg.early_stopping and pos.best_params is not None:
            net.params[...] = pos.best_params
            if pos.best_epoch != len(pos.history):
                log(_best_line(pos))
        test_acc = None
        if test is not None:   # once, on the weights returned
            test_acc = score(net, test)[1]
            pos.history[(pos.best_epoch or len(pos.history)) - 1]["test_acc"] = test_acc
    # Known once a parallel region has run (Numba's OpenMP, TBB or workqueue layer).
    # The batch engine's path (fused or general: their bits differ by rounding) and how many
    # batches its threads gave to one of them (a busy neighbour).
    after = engine.info()
    info.update({k: after[k] for k in ("threading_layer", "path", "solo_batches") if k in after})
    return Result(net, pos.history, cfg, engine.name, info, test_acc,
                  pos.best_epoch if cfg.early_stopping else None, pos.stopped)


def watch_best(cfg, pos, net, row):
    """Early stopping, after an epoch's row: keep its weights if its validation loss is the
    lowest so far (strictly: on a tie the earlier epoch stays best); stop once
    cfg.early_stopping epochs have passed without a lower one."""
    best = pos.history[pos.best_epoch - 1]["val_loss"] if pos.best_epoch else math.inf
    if row["val_loss"] < best:
        pos.best_epoch = row["epoch"]
        if pos.best_params is None:
            pos.best_params = net.params.copy()
        else:
            pos.best_params[...] = net.params
    elif row["epoch"] - pos.best_epoch >= cfg.early_stopping:
        pos.stopped = True


def epoch_line(row, epochs):
    """An epoch's row as the log shows it, with the measures it has."""
    text = (f"epoch {row['epoch']}/{epochs}  loss {row['loss']:.4f}  "
            f"train_acc {row['train_acc']:.4f}")
    for k in ("val_loss", "val_acc", "test_acc"):
        if k in row:
            text += f"  {k} {row[k]:.4f}"
    return f"{text}  {row['seconds']:.1f}s"


def _best_line(pos):
    last, best = len(pos.history), pos.history[pos.best_epoch - 1]
    why = (f"no lower validation loss in the {last - pos.best_epoch} epochs after epoch "
           f"{pos.best_epoch}, stopped" if pos.stopped else
           f"epoch {pos.best_epoch} had the lowest validation loss of the {last}")
    return (f"early stopping: {why}; keeping epoch {pos.best_epoch}'s weights "
            f"(val_loss {best['val_loss']:.4f}, val_acc {best['val_acc']:.4f})")


def run_epoch(engine, net, opt, X, T, order, bs, epoch, cfg, progress, on_chunk, pos=None,
              max_chunk=None):
    """Train on `order` from pos.done on (0 unless resumed), in chunks of whole batches.

    pos is kept current after every chunk, before on_chunk runs, so on_chunk can checkpoint."""
    pos = pos if pos is not None else Position(epoch)
    step = chunk_size(engine, bs, len(order), max_chunk)
    # Engines that augment or drop out draw each epoch's transforms and masks from it; the
    # others take no epoch.
    random = any(getattr(engine, k, None) is not None for k in ("augment", "dropout"))
    when = {"epoch": epoch} if random else {}
    bar = _progress_bar(len(order), epoch, cfg.epochs, progress, initial=pos.done)
    t0 = time.perf_counter() - pos.seconds
    for start in range(pos.done, len(order), step):
        chunk = engine.train(net, opt, X, T, order[start:start + step], bs, **when)
        pos.stats += chunk
        pos.done = min(start + step, len(order))
        pos.seconds = time.perf_counter() - t0
        if not np.isfinite(chunk.loss_sum) or not np.isfinite(net.params).all():
            bar.close()
            raise DivergenceError(
                f"training diverged (NaN or infinity) in epoch {epoch} at step {opt.t} "
                f"({pos.done} samples into the epoch): lower the learning rate (now {cfg.lr})")
        bar.update(chunk.n)
        bar.set_postfix(loss=f"{pos.stats.loss:.4f}", refresh=False)
        if on_chunk is not None:
            on_chunk(epoch, pos.done, net, opt)
    bar.close()
    return pos.stats, pos.seconds


def _progress_bar(total, epoch, epochs, enabled, initial=0):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=f"epoch {epoch}/{epochs}", unit="sample",
                unit_scale=True, leave=False, disable=not enabled, dynamic_ncols=True)


def evaluate(net, X, y):
    """Predictions and accuracy of a network on (X, y)."""
    pred = net.predict(scaled(np.asarray(X), net.dtype))     # uint8 pixels: x / 255
    return pred, float(np.mean(pred == y))
