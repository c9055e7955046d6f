"""A peer's timed run in a child process pinned to `threads` cores.

Thread-count settings do not keep every library on that many cores: XLA sizes its pool from
the cores the process may use, whatever its flags say, and PyTorch's and OpenBLAS's pools start
before anything can limit them. So each peer run is a fresh `python -m parnn.bench.pinned`
whose first act is os.sched_setaffinity to the first `threads` of the cores it may use, before
it imports the peer's library; it reads the Work from an .npz of its arrays and the config as
JSON (written once per bench; never a pickle), warms up, times one run (runners.PEER_RUNS) and
prints the result as JSON on its last line.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import tempfile

SAVED = "_pinned_work_file"       # Work attribute: the .npz the children read
ARRAYS = ("X", "T", "y", "X_test", "y_test")


def pinned_run(peer, w, threads, warm_up=False):
    """runners.PEER_RUNS[peer](w, threads) in a child pinned to `threads` cores; its result
    dict plus the cores it ran on. warm_up: nothing (each child warms up before its clock)."""
    if warm_up:
        return None
    proc = subprocess.run([sys.executable, "-m", "parnn.bench.pinned", peer, str(threads),
                           _saved(w)], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"peer {peer} at {threads} core(s) failed: {last}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _saved(w):
    """The file holding w for the children, written on first use, removed at exit."""
    path = getattr(w, SAVED, None)
    if path is None:
        import numpy as np

        fd, path = tempfile.mkstemp(prefix="parnn-bench-work-", suffix=".npz")
        atexit.register(_remove, path)
        arrays = {name: getattr(w, name) for name in ARRAYS}
        arrays["orders"] = np.stack(w.orders) if w.orders else np.zeros((0, len(w.X)), np.int64)
        arrays["cfg"] = np.frombuffer(json.dumps(w.cfg.to_dict()).encode(), np.uint8)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        setattr(w, SAVED, path)
    return path


def _load(path):
    """The Work _saved wrote."""
    import numpy as np

    from parnn.bench.runners import Work
    from parnn.run.config import TrainConfig

    with np.load(path, allow_pickle=False) as f:
        arrays = {name: f[name] for name in (*ARRAYS, "orders", "cfg")}
    cfg = TrainConfig(**json.loads(arrays.pop("cfg").tobytes()))
    orders = list(arrays.pop("orders"))
    return Work(cfg, cfg.spec(arrays["X"].shape[1], arrays["T"].shape[1]), orders=orders,
                **arrays)


def _remove(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def pin(threads):
    """Restrict this process to the first `threads` cores it may use; returns them."""
    cores = sorted(os.sched_getaffinity(0))[:threads]
    os.sched_setaffinity(0, cores)
    return cores


def main(argv):
    peer, threads, path = argv[0], int(argv[1]), argv[2]
    cores = pin(threads)                   # before numpy, torch or jax start a thread pool
    from parnn.bench.runners import PEER_RUNS

    w = _load(path)
    run = PEER_RUNS[peer]
    run(w, threads, warm_up=True)
    out = run(w, threads)
    print(json.dumps({**out, "pinned_cores": cores}, default=float))


if __name__ == "__main__":
    main(sys.argv[1:])
