"""W1's dominant kernel alone: the input layer's fused update + forward pass
(rows.input_update_forward) over real consecutive samples, on W0 whole (serial's 1.6 MB block)
and on one half (an owner thread's 0.8 MB block), each thread alone and both halves at once
on two threads, with the two-core probe beside each round (docs/RESULTS.md, "Issue 12: where
each target stands").

    flock /tmp/bench.lock env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE \
        .venv/bin/python benchmarks/w1_w0pass.py [ROUNDS]
"""
import sys
import threading
import time

import numpy as np
from numba import njit

from parnn.bench.harness import two_core_probe
from parnn.data import load_dataset
from parnn.engines.loop import blocked_transpose
from parnn.engines.rows import input_rows, input_update_forward

N = 6000            # samples per timed pass


@njit(nogil=True)
def passes(WT, b, g, z, X, rows, n):
    """n samples' W0 passes on block WT: sample s's forward fused with s-1's update."""
    for s in range(1, n + 1):
        nr = input_rows(X[s], X[s - 1], False, rows)
        input_update_forward(WT, b, g, X[s - 1], X[s], z, 1, rows, nr)


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    X = load_dataset(dtype="float64").X_train[:N + 1].copy()
    rng = np.random.default_rng(0)
    W0 = rng.normal(0, 0.05, (256, 784))
    blocks = {1: blocked_transpose(W0, 1), 2: blocked_transpose(W0, 2)}

    def run(nb, t):
        m = 256 // nb
        passes(blocks[nb][t], np.zeros(m), rng.normal(0, 1e-4, m), np.zeros(m), X,
               np.zeros(784, np.int64), N)

    run(1, 0), run(2, 0), run(2, 1)                 # compile, warm
    res = {"whole W0, 1 thread": [], "half, alone": [], "both halves at once": [], "probe": []}
    for r in range(rounds):
        t = time.perf_counter()
        run(1, 0)
        res["whole W0, 1 thread"].append(time.perf_counter() - t)
        t = time.perf_counter()
        run(2, 0)
        run(2, 1)
        res["half, alone"].append((time.perf_counter() - t) / 2)
        helper = threading.Thread(target=run, args=(2, 1))
        t = time.perf_counter()
        helper.start()
        run(2, 0)
        helper.join()
        res["both halves at once"].append(time.perf_counter() - t)
        res["probe"].append(two_core_probe())
        print(f"round {r}: " + ", ".join(f"{k} {v[-1] / N * 1e6:.1f} us" if k != "probe"
                                          else f"probe {v[-1]:.2f}" for k, v in res.items()),
              flush=True)
    med = {k: float(np.median(v)) for k, v in res.items()}
    whole = med["whole W0, 1 thread"]
    print(f"medians per sample: whole {whole / N * 1e6:.1f} us, half alone "
          f"{med['half, alone'] / N * 1e6:.1f} us ({whole / med['half, alone']:.2f}x), both "
          f"halves at once {med['both halves at once'] / N * 1e6:.1f} us "
          f"({whole / med['both halves at once']:.2f}x), probe {med['probe']:.2f}")


if __name__ == "__main__":
    main()
