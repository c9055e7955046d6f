"""The training loop: presets, validated settings, epochs, shuffling, evaluation, history.

One plain loop (as in llm.c): for each epoch, shuffle an index order from the seed, hand it to
the engine in chunks of whole batches (so a progress bar can move and a checkpoint can be taken
in between), evaluate on the test set, record one history row.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from parnn import __version__
from parnn.engines import EpochStats, make_engine
from parnn.errors import ConfigError, DivergenceError
from parnn.core.model import INITS, MLP, Spec
from parnn.core.optim import OPTIMIZERS, make_optimizer

# The paper's system, faithfully, except for the init: its U[0,1) weights saturate every tanh,
# so nothing learns (accuracy stays at 10%, see docs/PAPER.md); `--init paper` still selects it.
PAPER = dict(hidden=(256, 128), activation="tanh", output="tanh", loss="mse", init="xavier",
             dtype="float64", optimizer="sgd", lr=0.01, lr_schedule="constant", batch_size=1,
             epochs=1, engine="auto")
# A good MLP today: ReLU, softmax + cross-entropy, Adam on mini-batches, float32, and a cosine
# decay of the learning rate over the run (measured after 15 epochs: 0.897-0.899 test accuracy
# against 0.890-0.893 with a constant rate; numpy and batch engines, see docs/RESULTS.md).
MODERN = dict(hidden=(256, 128), activation="relu", output="softmax", loss="cross_entropy",
              init="he", dtype="float32", optimizer="adam", lr=1e-3, lr_schedule="cosine",
              batch_size=128, epochs=15, engine="auto")
LR_SCHEDULES = ("constant", "cosine")
PRESETS = {"paper": PAPER, "modern": MODERN}
DEFAULT_PRESET = "modern"

# Which engine "auto" picks for per-sample SGD: `serial`. On an idle machine `owner` is faster
# at 2 threads (docs/RESULTS.md, W1: 2.18 s against 2.80 s), but its spin barriers collapse when
# another process competes for the cores (9.5 s against 3.1 s measured with a busy neighbour),
# so it is opt-in with --engine owner.
AUTO_PER_SAMPLE = ("serial", "numpy")
AUTO_BATCH = ("batch", "numpy")


@dataclass(frozen=True)
class TrainConfig:
    preset: str = DEFAULT_PRESET
    hidden: tuple = MODERN["hidden"]
    activation: str = MODERN["activation"]
    output: str = MODERN["output"]
    loss: str = MODERN["loss"]
    init: str = MODERN["init"]
    dtype: str = MODERN["dtype"]
    optimizer: str = MODERN["optimizer"]
    lr: float = MODERN["lr"]
    lr_schedule: str = MODERN["lr_schedule"]
    momentum: float = 0.9
    batch_size: int | str = MODERN["batch_size"]   # int, or "full" for full-batch GD
    epochs: int = MODERN["epochs"]
    seed: int = 1
    engine: str = "auto"
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)

    def spec(self, n_in=784, n_out=10):
        return Spec((n_in, *self.hidden, n_out), self.activation, self.output, self.loss, self.dtype)

    def to_dict(self):
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d


def make_config(preset=DEFAULT_PRESET, **overrides):
    """A preset with some settings overridden (None means 'keep the preset's'), validated."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    values = dict(PRESETS[preset], preset=preset)
    values.update({k: v for k, v in overrides.items() if v is not None})
    cfg = TrainConfig(**values)
    validate(cfg)
    if overrides.get("momentum") is not None and cfg.optimizer != "momentum":
        raise ConfigError(f"a momentum coefficient only applies to optimizer momentum "
                          f"(the optimizer is {cfg.optimizer}): add --optimizer momentum "
                          "or drop --momentum")
    return cfg


def validate(cfg, n_train=None):
    """Every setting checked up front, with what was wrong and what is allowed."""
    if not cfg.hidden or any(int(h) < 1 for h in cfg.hidden):
        raise ConfigError(f"hidden layer sizes must be >= 1, got {list(cfg.hidden)}")
    spec = cfg.spec()
    if cfg.init not in INITS:
        raise ConfigError(f"unknown init {cfg.init!r}: choose one of {', '.join(INITS)}")
    if cfg.optimizer not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {cfg.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
    if not (np.isfinite(cfg.lr) and cfg.lr > 0):
        raise ConfigError(f"learning rate must be a number > 0, got {cfg.lr}")
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise ConfigError(f"unknown learning-rate schedule {cfg.lr_schedule!r}: choose one of "
                          f"{', '.join(LR_SCHEDULES)}")
    if not 0 <= cfg.momentum < 1:
        raise ConfigError(f"momentum must be in [0, 1), got {cfg.momentum}")
    if cfg.epochs < 1:
        raise ConfigError(f"epochs must be >= 1, got {cfg.epochs}")
    if cfg.threads < 1:
        raise ConfigError(f"threads must be >= 1, got {cfg.threads}")
    if cfg.seed < 0:
        raise ConfigError(f"seed must be an integer >= 0, got {cfg.seed}")
    if cfg.batch_size != "full":
        if not isinstance(cfg.batch_size, int) or cfg.batch_size < 1:
            raise ConfigError(f"batch size must be an integer >= 1 or 'full', got {cfg.batch_size!r}")
        if n_train is not None and cfg.batch_size > n_train:
            raise ConfigError(f"batch size {cfg.batch_size} is larger than the training set "
                              f"({n_train} samples)")
    pick_engine(cfg, spec, n_train or 1)


def lr_at(cfg, epoch):
    """The learning rate of an epoch (1-based): constant, or cosine from lr down towards 0.

    A function of the epoch alone, so a resumed run needs no extra state for it."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    return cfg.lr * 0.5 * (1.0 + np.cos(np.pi * (epoch - 1) / cfg.epochs))


def batch_size_for(cfg, n_train):
    return n_train if cfg.batch_size == "full" else cfg.batch_size


def pick_engine(cfg, spec, n_train):
    """The engine object for cfg; 'auto' = the first in the preference list that accepts it."""
    bs = batch_size_for(cfg, n_train)
    if cfg.engine != "auto":
        engine = make_engine(cfg.engine)
        engine.check(spec, cfg.optimizer, bs)
        return engine
    prefs = AUTO_PER_SAMPLE if bs == 1 and cfg.optimizer == "sgd" else AUTO_BATCH
    for name in prefs:
        try:
            engine = make_engine(name)
            engine.check(spec, cfg.optimizer, bs)
            return engine
        except ConfigError:
            continue
    return make_engine("numpy")


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


# --- the loop --------------------------------------------------------------------------------

@dataclass
class Result:
    net: MLP
    history: list
    config: TrainConfig
    engine: str
    info: dict


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


def chunk_size(engine, batch_size, n, max_chunk=None):
    """Samples per engine call: whole batches, a few thousand samples, so progress moves;
    at most max_chunk (whole batches too) so a checkpoint every N steps lands on a boundary."""
    target = 2000 if batch_size == 1 else 8192
    size = min(n, max(batch_size, (target // batch_size) * batch_size))
    return min(size, max_chunk) if max_chunk else size


def fit(cfg, data, progress=True, log=print, on_chunk=None, checkpoints=None, resume=None,
        engine=None):
    """Train a network on data (a parnn.data.Dataset); returns a Result.

    on_chunk(epoch, done, net, opt) is called after every engine call (tests).
    checkpoints: a parnn.run.checkpoint.Checkpointer or None. It saves after every epoch and every
    `checkpoints.every` optimizer steps, and turns SIGINT/SIGTERM into a checkpoint followed by
    checkpoint.Interrupted.
    resume: a parnn.run.checkpoint.Checkpoint to carry on from, bit for bit, instead of a new network.
    engine: an engine object to use instead of cfg.engine's (parnn.distributed's allreduce).
    """
    from parnn.data import one_hot

    n_train = len(data.X_train)
    validate(cfg, n_train)
    spec = cfg.spec(data.X_train.shape[1], len(data.class_names))
    net = MLP(spec, init=cfg.init, seed=cfg.seed)
    X = np.ascontiguousarray(data.X_train, dtype=spec.dtype)
    T = one_hot(data.y_train, spec.sizes[-1], spec.dtype)
    bs = batch_size_for(cfg, n_train)
    engine = pick_engine(cfg, spec, n_train) if engine is None else engine
    opt = make_optimizer(cfg.optimizer, spec.n_params, spec.dtype, cfg.lr, cfg.momentum)
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
        log(f"parnn {__version__}: {spec.sizes} {spec.hidden}/{spec.output} {spec.loss} "
            f"{spec.dtype}, {cfg.optimizer} lr={cfg.lr} batch={bs}, engine {engine.name}, "
            f"{cfg.threads} thread(s), {n_train} training samples"
            + (f", resumed at epoch {pos.epoch} step {opt.t}" if resume is not None else ""))
        for epoch in range(pos.epoch, cfg.epochs + 1):
            # A resumed run restored this state, so it draws the same order again.
            pos.order_rng = order_rng.bit_generator.state
            order = order_rng.permutation(n_train)
            opt.lr = lr_at(cfg, epoch)
            try:
                stats, seconds = run_epoch(engine, net, opt, X, T, order, bs, epoch, cfg,
                                           progress, after_chunk, pos, max_chunk)
            except DivergenceError as e:
                note = checkpoints.kept() if checkpoints is not None else ""
                raise DivergenceError(f"{e}{note}") from None
            if "threading_layer" in getattr(engine, "info", lambda: {})():
                info["threading_layer"] = engine.info()["threading_layer"]
            test_acc = float(np.mean(net.predict(data.X_test.astype(spec.dtype, copy=False))
                                     == data.y_test)) if len(data.X_test) else float("nan")
            row = dict(epoch=epoch, loss=stats.loss, train_acc=stats.accuracy, test_acc=test_acc,
                       seconds=seconds, samples_per_s=stats.n / seconds if seconds else 0.0)
            pos.history.append(row)
            log(f"epoch {epoch}/{cfg.epochs}  loss {stats.loss:.4f}  train_acc {stats.accuracy:.4f}"
                f"  test_acc {test_acc:.4f}  {seconds:.1f}s")
            pos.epoch, pos.done, pos.stats, pos.seconds = epoch + 1, 0, EpochStats(), 0.0
            pos.order_rng = order_rng.bit_generator.state
            if checkpoints is not None:
                checkpoints.after_epoch(cfg, pos, net, opt)
    return Result(net, pos.history, cfg, engine.name, info)


def run_epoch(engine, net, opt, X, T, order, bs, epoch, cfg, progress, on_chunk, pos=None,
              max_chunk=None):
    """Train on `order` from pos.done on (0 unless resumed), in chunks of whole batches.

    pos is kept current after every chunk, before on_chunk runs, so on_chunk can checkpoint."""
    pos = pos if pos is not None else Position(epoch)
    step = chunk_size(engine, bs, len(order), max_chunk)
    bar = _progress_bar(len(order), epoch, cfg.epochs, progress, initial=pos.done)
    t0 = time.perf_counter() - pos.seconds
    for start in range(pos.done, len(order), step):
        chunk = engine.train(net, opt, X, T, order[start:start + step], bs)
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
    pred = net.predict(np.asarray(X, dtype=net.dtype))
    return pred, float(np.mean(pred == y))


# --- what a run leaves behind --------------------------------------------------------------------

def model_metadata(result, data):
    """Everything needed to trust and reuse a model file, beside its spec."""
    return {
        "parnn_version": __version__,
        "config": result.config.to_dict(),
        "engine": result.engine,
        "threads": result.info.get("threads"),
        "threading_layer": result.info.get("threading_layer"),
        "dataset": {"name": data.name, "sha256": data.sha256},
        "class_names": list(data.class_names),
        "preprocessing": {"input": "28x28 grayscale, row-major", "scale": "pixel / 255",
                          "targets": "one-hot 0/1"},
        "history": result.history,
    }


def save_run(out, result, data):
    """model.safetensors, history.json, history.csv and history.png in `out`, each atomically."""
    from pathlib import Path

    from parnn import io, plots

    out = Path(out)
    paths = {"model": out / "model.safetensors", "history_json": out / "history.json",
             "history_csv": out / "history.csv", "plot": out / "history.png"}
    io.save_model(paths["model"], result.net, model_metadata(result, data))
    io.atomic_write_json(paths["history_json"], {"config": result.config.to_dict(),
                                                 "engine": result.engine, "info": result.info,
                                                 "history": result.history})
    io.atomic_write_csv(paths["history_csv"], result.history)
    plots.plot_history(result.history, paths["plot"], title=f"parnn {result.config.preset}")
    return paths
