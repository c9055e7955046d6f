"""Interchangeable training engines behind one small protocol.

An engine is a small object made for one run (`make_engine(name)`); it holds no state that
outlives the run and there are no module-level engine instances. It trains in place on the
network's flat parameter buffer, over a given sample order:

    engine.check(spec, optimizer, batch_size)      None, or ConfigError saying why not
    engine.train(net, opt, X, T, order, batch_size) -> EpochStats   over `order` only
    engine.info()                                  dict for the run's history (engine name, ...)
    engine.takes_pixels                            optional, True: train accepts uint8 X

X is (n, n_in) in the network's dtype or, for an engine whose takes_pixels is True, uint8 pixels
as the dataset stores them (meaning X / 255, see `scaled`); T the (n, n_out) targets in the
network's dtype; `order` the part of the epoch's shuffled sample order to train on now (the
training loop hands over an epoch in chunks of whole batches, so it can show progress and
checkpoint in between).

Engines import parnn.core only (and each other's compiled helpers).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from parnn.errors import ConfigError


@dataclass
class EpochStats:
    """Sums over the samples seen, so chunks and MPI ranks add up."""

    loss_sum: float = 0.0   # summed per-sample loss, measured before each update
    correct: int = 0        # samples whose prediction was right, before the update
    n: int = 0

    def __iadd__(self, other):
        self.loss_sum += other.loss_sum
        self.correct += other.correct
        self.n += other.n
        return self

    @property
    def loss(self):
        return self.loss_sum / max(self.n, 1)

    @property
    def accuracy(self):
        return self.correct / max(self.n, 1)


class Engine(Protocol):
    name: str

    def check(self, spec, optimizer, batch_size) -> None: ...

    def train(self, net, opt, X, T, order, batch_size) -> EpochStats: ...

    def info(self) -> dict: ...


# uint8 inputs are pixels 0..255 that mean X / PIXEL_MAX: the training set stays as stored (a
# quarter of float32's memory, an eighth of float64's) and each engine scales what it reads.
PIXEL_MAX = 255


def scaled(X, dtype, out=None):
    """X (rows of inputs) in dtype: uint8 pixels divided by 255 in dtype, as parnn.data used to
    store them (so the bits are the same), floats converted (no copy if already dtype)."""
    dtype = np.dtype(dtype)
    if X.dtype == np.uint8:
        # uint8 / a dtype scalar computes in dtype (NEP 50): one pass, no float64 temporary
        return np.divide(X, dtype.type(PIXEL_MAX), out=out,
                         dtype=dtype if out is None else None)
    if out is None:
        return X.astype(dtype, copy=False)
    out[...] = X
    return out


def contiguous_inputs(net, X, T, order, pixels=False):
    """X, T and the order as int64, all contiguous, checked to fit the network: the compiled
    engines index them without bounds checks. T comes in the network's dtype; so does X, except
    that uint8 X stays uint8 if the engine scales its pixels itself (pixels=True); for the
    others it becomes a scaled float copy here."""
    spec, dt = net.spec, net.params.dtype
    X = np.asarray(X)
    X = np.ascontiguousarray(X) if pixels and X.dtype == np.uint8 else \
        np.ascontiguousarray(scaled(X, dt))
    T = np.ascontiguousarray(T, dt)
    order = np.ascontiguousarray(order, np.int64)
    if X.ndim != 2 or X.shape[1] != spec.sizes[0] or T.shape != (len(X), spec.sizes[-1]):
        raise ConfigError(f"data of shape {X.shape} / {T.shape} does not fit network "
                          f"{'-'.join(map(str, spec.sizes))}")
    if len(order) and (order.min() < 0 or order.max() >= len(X)):
        raise ConfigError(f"sample order has indices outside 0..{len(X) - 1}")
    return X, T, order


# name -> (module, class); modules are imported on first use so that `--engine numpy` never
# pays Numba's import and compile time.
_REGISTRY = {
    "numpy": ("parnn.engines.numpy", "NumpyEngine"),
    "serial": ("parnn.engines.persample", "SerialEngine"),
    "neuron": ("parnn.engines.persample", "NeuronEngine"),
    "hogwild": ("parnn.engines.persample", "HogwildEngine"),
    "owner": ("parnn.engines.persample", "OwnerEngine"),
    "batch": ("parnn.engines.batch", "BatchEngine"),
}
PER_SAMPLE = ("serial", "neuron", "hogwild", "owner")   # per-sample plain SGD only


def available():
    """Engine names whose module is present."""
    return [name for name, (mod, _) in _REGISTRY.items()
            if importlib.util.find_spec(mod) is not None]


def make_engine(name, **options) -> Engine:
    """A new engine object for one run; options go to its constructor (e.g. dense=True)."""
    if name not in _REGISTRY or importlib.util.find_spec(_REGISTRY[name][0]) is None:
        raise ConfigError(f"unknown engine {name!r}: choose one of {', '.join(available())}")
    mod, cls = _REGISTRY[name]
    return getattr(importlib.import_module(mod), cls)(**options)
