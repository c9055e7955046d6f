"""The training loop: presets, validated settings, epochs, shuffling, evaluation, history.

One plain loop (as in llm.c): for each epoch, shuffle an index order from the seed, hand it to
the engine in chunks of whole batches (so a progress bar can move and a checkpoint can be taken
in between), evaluate on the test set, record one history row.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from parnn import __version__
from parnn.engines import EpochStats, get_engine
from parnn.errors import ConfigError, DivergenceError
from parnn.model import INITS, MLP, Spec
from parnn.optim import OPTIMIZERS, make_optimizer

# The paper's system, faithfully, except for the init: its U[0,1) weights saturate every tanh,
# so nothing learns (accuracy stays at 10%, see docs/PAPER.md); `--init paper` still selects it.
PAPER = dict(hidden=(256, 128), activation="tanh", output="tanh", loss="mse", init="xavier",
             dtype="float64", optimizer="sgd", lr=0.01, batch_size=1, epochs=1, engine="auto")
# A good MLP today: ReLU, softmax + cross-entropy, Adam on mini-batches, float32.
MODERN = dict(hidden=(256, 128), activation="relu", output="softmax", loss="cross_entropy",
              init="he", dtype="float32", optimizer="adam", lr=1e-3, batch_size=128, epochs=15,
              engine="auto")
PRESETS = {"paper": PAPER, "modern": MODERN}
DEFAULT_PRESET = "modern"

# Which engine "auto" picks: the fastest measured one that supports the settings.
AUTO_PER_SAMPLE = ("neuron", "serial", "numpy")
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
    if not 0 <= cfg.momentum < 1:
        raise ConfigError(f"momentum must be in [0, 1), got {cfg.momentum}")
    if cfg.epochs < 1:
        raise ConfigError(f"epochs must be >= 1, got {cfg.epochs}")
    if cfg.threads < 1:
        raise ConfigError(f"threads must be >= 1, got {cfg.threads}")
    if cfg.batch_size != "full":
        if not isinstance(cfg.batch_size, int) or cfg.batch_size < 1:
            raise ConfigError(f"batch size must be an integer >= 1 or 'full', got {cfg.batch_size!r}")
        if n_train is not None and cfg.batch_size > n_train:
            raise ConfigError(f"batch size {cfg.batch_size} is larger than the training set "
                              f"({n_train} samples)")
    pick_engine(cfg, spec, n_train or 1)


def batch_size_for(cfg, n_train):
    return n_train if cfg.batch_size == "full" else cfg.batch_size


def pick_engine(cfg, spec, n_train):
    """The engine object for cfg; 'auto' = the first in the preference list that accepts it."""
    bs = batch_size_for(cfg, n_train)
    if cfg.engine != "auto":
        engine = get_engine(cfg.engine)
        engine.check(spec, cfg.optimizer, bs)
        return engine
    prefs = AUTO_PER_SAMPLE if bs == 1 and cfg.optimizer == "sgd" else AUTO_BATCH
    for name in prefs:
        try:
            engine = get_engine(name)
            engine.check(spec, cfg.optimizer, bs)
            return engine
        except ConfigError:
            continue
    return get_engine("numpy")


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


def chunk_size(engine, batch_size, n):
    """Samples per engine call: whole batches, a few thousand samples, so progress moves."""
    target = 2000 if batch_size == 1 else 8192
    return min(n, max(batch_size, (target // batch_size) * batch_size))


def fit(cfg, data, progress=True, log=print, on_chunk=None):
    """Train a new network on data (a parnn.data.Dataset); returns a Result.

    on_chunk(epoch, done, net, opt) is called after every engine call (checkpoints, tests).
    """
    from parnn.data import one_hot

    n_train = len(data.X_train)
    validate(cfg, n_train)
    spec = cfg.spec(data.X_train.shape[1], len(data.class_names))
    net = MLP(spec, init=cfg.init, seed=cfg.seed)
    X = np.ascontiguousarray(data.X_train, dtype=spec.dtype)
    T = one_hot(data.y_train, spec.sizes[-1], spec.dtype)
    bs = batch_size_for(cfg, n_train)
    engine = pick_engine(cfg, spec, n_train)
    opt = make_optimizer(cfg.optimizer, spec.n_params, spec.dtype, cfg.lr, cfg.momentum)
    # The shuffle has its own stream (seed + 1, as in the C reference): the order never depends
    # on how many random numbers the init drew.
    order_rng = np.random.default_rng(cfg.seed + 1)
    limits, info = set_threads(cfg.threads, engine)
    info["engine"] = engine.name
    history = []
    with limits:
        log(f"parnn {__version__}: {spec.sizes} {spec.hidden}/{spec.output} {spec.loss} "
            f"{spec.dtype}, {cfg.optimizer} lr={cfg.lr} batch={bs}, engine {engine.name}, "
            f"{cfg.threads} thread(s), {n_train} training samples")
        for epoch in range(1, cfg.epochs + 1):
            order = order_rng.permutation(n_train)
            stats, seconds = run_epoch(engine, net, opt, X, T, order, bs, epoch, cfg, progress,
                                       on_chunk)
            if "threading_layer" in getattr(engine, "info", lambda: {})():
                info["threading_layer"] = engine.info()["threading_layer"]
            test_acc = float(np.mean(net.predict(data.X_test.astype(spec.dtype, copy=False))
                                     == data.y_test)) if len(data.X_test) else float("nan")
            row = dict(epoch=epoch, loss=stats.loss, train_acc=stats.accuracy, test_acc=test_acc,
                       seconds=seconds, samples_per_s=stats.n / seconds if seconds else 0.0)
            history.append(row)
            log(f"epoch {epoch}/{cfg.epochs}  loss {stats.loss:.4f}  train_acc {stats.accuracy:.4f}"
                f"  test_acc {test_acc:.4f}  {seconds:.1f}s")
    return Result(net, history, cfg, engine.name, info)


def run_epoch(engine, net, opt, X, T, order, bs, epoch, cfg, progress, on_chunk):
    stats = EpochStats()
    step = chunk_size(engine, bs, len(order))
    bar = _progress_bar(len(order), epoch, cfg.epochs, progress)
    t0 = time.perf_counter()
    for start in range(0, len(order), step):
        chunk = engine.train_epoch(net, opt, X, T, order[start:start + step], bs)
        stats += chunk
        if not np.isfinite(chunk.loss_sum) or not np.isfinite(net.params).all():
            bar.close()
            raise DivergenceError(
                f"training diverged (NaN or infinity) in epoch {epoch} after "
                f"{stats.n} samples: lower the learning rate (now {cfg.lr})")
        bar.update(chunk.n)
        bar.set_postfix(loss=f"{stats.loss:.4f}", refresh=False)
        if on_chunk is not None:
            on_chunk(epoch, stats.n, net, opt)
    seconds = time.perf_counter() - t0
    bar.close()
    return stats, seconds


def _progress_bar(total, epoch, epochs, enabled):
    from tqdm import tqdm

    return tqdm(total=total, desc=f"epoch {epoch}/{epochs}", unit="sample", unit_scale=True,
                leave=False, disable=not enabled, dynamic_ncols=True)


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
