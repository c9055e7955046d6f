"""Small synthetic Fashion-MNIST look-alikes written as real IDX files, so tests can run the
real CLI (`--data DIR`) without the real dataset: ten noisy class templates, learnable."""

import gzip
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np


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
