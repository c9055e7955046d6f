"""Synthetic data for the tests, in one place.

write_dataset: small Fashion-MNIST look-alikes written as real IDX files, so tests can run the
real CLI (`--data DIR`) without the real dataset: ten noisy class templates, learnable.
blobs:         ten Gaussian blobs in 784-d as an in-memory Dataset: learnable, tiny, no files.
engine_data:   inputs, one-hot targets and a shuffled order for a network's sizes, for engines.
no_hang:       a time limit for a call that could block (a FIFO opened for reading).
"""

import contextlib
import gzip
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

from parnn.data import FASHION_CLASSES, Dataset


def idx_bytes(arr):
    arr = np.asarray(arr, dtype=np.uint8)
    return bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}i", *arr.shape) + arr.tobytes()


def write_dataset(directory, n_train=600, n_test=100, seed=0, gz=True):
    """The four IDX files in directory; returns it."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    templates = rng.integers(0, 256, (10, 28, 28))
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        y = rng.integers(0, 10, n).astype(np.uint8)
        x = np.clip(templates[y] + rng.normal(0, 90, (n, 28, 28)), 0, 255).astype(np.uint8)
        for kind, arr in (("images-idx3", x), ("labels-idx1", y)):
            raw = idx_bytes(arr)
            name = f"{prefix}-{kind}-ubyte" + (".gz" if gz else "")
            (d / name).write_bytes(gzip.compress(raw, 1) if gz else raw)
    return d


def parnn(*args, **kw):
    """`python -m parnn ARGS` as a subprocess: CompletedProcess with text stdout/stderr."""
    return subprocess.run([sys.executable, "-m", "parnn", *map(str, args)], capture_output=True,
                          text=True, timeout=kw.pop("timeout", 120), **kw)


def popen(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "parnn", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def blobs(n=300, n_test=100, seed=0, noise=0.1, dtype="float64"):
    """Ten Gaussian blobs in 784-d, clipped to [0, 1]: learnable, tiny, no files."""
    rng = np.random.default_rng(seed)
    centres = rng.random((10, 784))
    y = rng.integers(0, 10, n + n_test)
    X = np.clip(centres[y] + noise * rng.standard_normal((n + n_test, 784)), 0, 1).astype(dtype)
    return Dataset(X[:n], y[:n], X[n:], y[n:], FASHION_CLASSES, "blobs", None, {}, {})


def engine_data(spec, n, seed=1):
    """Inputs in [0, 1) with about 40% exact zeros (like image background: the per-sample
    engines skip zero inputs), one-hot targets, a shuffled order."""
    rng = np.random.default_rng(seed)
    X = (rng.random((n, spec.sizes[0])) * (rng.random((n, spec.sizes[0])) < 0.6)).astype(spec.dtype)
    T = np.eye(spec.sizes[-1], dtype=spec.dtype)[rng.integers(0, spec.sizes[-1], n)]
    return X, T, rng.permutation(n)


@contextlib.contextmanager
def no_hang(seconds=10):
    """A call that blocks fails with TimeoutError after `seconds` instead of hanging the suite
    (hypothesis' deadline only measures examples that return)."""
    def alarm(signum, frame):
        raise TimeoutError(f"no result after {seconds}s")
    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
