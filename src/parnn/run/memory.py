"""How much memory a run will take, estimated before anything big is allocated, and a refusal
when it is more than the machine has (docs/ROBUSTNESS.md, "Memory").

Without it `--hidden 3000000` starts allocating tens of GB and ends, after minutes of swapping,
in the kernel's OOM killer or in a MemoryError halfway through. The estimate is deliberately
simple and errs on the high side: it is a gate, not a profile.
"""

from __future__ import annotations


import numpy as np

from parnn.errors import ConfigError

# What an optimizer keeps per parameter, beside the parameters and the gradient.
OPTIMIZER_STATE = {"sgd": 0, "momentum": 1, "adam": 2}
# Python, NumPy, Numba, BLAS, matplotlib and parnn themselves, rounded up (docs/ROBUSTNESS.md).
BASE = 150 * 2**20
# Rows of the test and validation sets scored at a time (run/train.py's score()): 1024 rows of
# float64 inputs and activations of the paper's net are 10 MB, 4096 were 40 MB, most of what a
# per-sample run took beside its uint8 data (docs/ROBUSTNESS.md).
SCORE_ROWS = 1024


def estimate(cfg, spec, n_train, n_test=0, data_loaded=False):
    """{part: bytes} of a run of cfg (a TrainConfig) on spec (its network) with n_train
    training and n_test test samples. data_loaded: the data is already in memory, in this
    process (the Python API): neither it nor the interpreter is counted again."""
    item = np.dtype(spec.dtype).itemsize
    n_in, n_out = spec.sizes[0], spec.sizes[-1]
    copies = 2 + OPTIMIZER_STATE[cfg.optimizer] + (1 if cfg.early_stopping else 0)
    # A checkpoint is serialised in memory before it is written: one more copy of each buffer.
    saved = 1 + OPTIMIZER_STATE[cfg.optimizer] + (1 if cfg.early_stopping else 0)
    layers = list(zip(spec.sizes[:-1], spec.sizes[1:]))
    batch = n_train if cfg.batch_size == "full" else cfg.batch_size
    # values per sample of the input and every layer's output (a conv layer's whole image),
    # and a conv layer's im2col columns (k*k*C_in per output pixel), kept for its backward
    width = n_in + sum(_values_per_sample(layer) for layer in spec.layers(compiled=False))
    parts = {
        "parameters, gradient and optimizer state": spec.n_params * item * copies,
        "checkpoint writing": spec.n_params * item * saved,
        # init_params draws each layer's weights in float64 before storing them
        "initialisation": max(a * b for a, b in layers) * 8,
        # each layer's outputs and their gradients for a batch; or the outputs alone for a
        # chunk of rows being scored
        "activations": max(batch * 2, spec.rows_at_once(SCORE_ROWS)) * width * item,
    }
    if not data_loaded:   # a process still to start, its data still to read
        # the images as stored (uint8), a float copy of the training images (for an engine
        # that does not scale pixels as it reads them; or the data loaded as floats), and the
        # one-hot targets
        parts["dataset"] = ((n_train + n_test) * n_in + n_train * n_in * item
                            + n_train * n_out * item)
        parts["interpreter and libraries"] = BASE
    else:                  # in this process: the one-hot targets are still to be made
        parts["targets"] = n_train * n_out * item
    return parts


def _values_per_sample(layer):
    out = int(np.prod(layer.out_shape))
    if hasattr(layer, "k"):                      # a Conv2D: (H', W', C_out) and its columns
        out += out // layer.c_out * layer.k * layer.k * layer.c_in
    return out


def available():
    """Bytes this process may still allocate without swapping (MemAvailable, within the
    cgroup's limit), or None where that cannot be known."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    try:   # cgroup v2: a container's limit, less what it already uses
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit.isdigit():
            with open("/sys/fs/cgroup/memory.current") as f:
                room = int(limit) - int(f.read().strip())
            avail = room if avail is None else min(avail, room)
    except (OSError, ValueError):
        pass
    return avail


def check(cfg, spec, n_train, n_test=0, processes=1, data_loaded=False):
    """ConfigError if the run (times `processes` on this machine: MPI ranks) needs more
    memory than is available."""
    parts = estimate(cfg, spec, n_train, n_test, data_loaded)
    need = sum(parts.values()) * processes
    room = available()
    if room is None or need <= room:
        return
    big = sorted(((v, k) for k, v in parts.items()), reverse=True)[:2]
    each = f" per process x {processes}" if processes > 1 else ""
    largest = ", ".join(f"{k} {_size(v)}" for v, k in big)
    raise ConfigError(
        f"this run needs about {_size(need)} of memory{each} ({largest}, ...), but "
        f"{_size(room)} is available: choose smaller --hidden layers, "
        f"{'float32, ' if spec.dtype == 'float64' else ''}a smaller --batch-size or "
        f"--limit-train")


# What each trained network of an ensemble keeps beside its weights until the ensemble is saved
# (its config, history and result), rounded up.
KEPT_OVERHEAD = 64 * 2**10


def check_kept(spec, count, what="members"):
    """ConfigError if `count` trained networks of spec, all kept in memory until they are saved
    together (an ensemble's members), would not fit beside this process: checked before any
    is trained, and before anything per member is made (count may be absurd)."""
    each = spec.n_params * np.dtype(spec.dtype).itemsize + KEPT_OVERHEAD
    room = available()
    if room is not None and count > room // each:     # integers: count may be 10**400
        need = count * each
        need = f"about {_size(need)}" if need < 10**15 else "more than a petabyte"
        many = str(count) if count < 10**12 else f"about 10^{len(str(count)) - 1}"
        raise ConfigError(f"{many} {what} of {spec.n_params} parameters each need {need} "
                          f"of memory to keep until they are saved, but {_size(room)} is "
                          f"available: train fewer {what} or smaller networks")


def _size(n):
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 1e3:.0f} kB"
