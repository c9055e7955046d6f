"""W1 (the paper's per-sample workload, one epoch): W0's transposed blocks (loop.WTb) on
transparent huge pages or on ordinary 4 KB pages, for serial (1 thread) and owner (2 threads),
rounds interleaved (docs/ENGINES.md, "Measured for owner and not kept").

The question: a thread's W0 block (784 KB of float64) nearly fills its 1 MB L2, and with 4 KB
pages the physical addresses, hence the L2 sets its lines fall in, are whatever the kernel
gave; on one 2 MB huge page they spread evenly over the sets. Linux only (madvise).

    flock /tmp/bench.lock env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE \
        .venv/bin/python benchmarks/w1_hugepages.py [ROUNDS]
"""
import ctypes
import json
import sys

import numpy as np

from parnn.bench import harness, runners
from parnn.data import load_dataset
from parnn.engines import loop, make_engine, persample
from parnn.run.config import make_config

MB2 = 2 << 20
libc = ctypes.CDLL("libc.so.6", use_errno=True)
orig = loop.blocked_transpose


def hp_transpose(W0, nb):
    n_out, n_in = W0.shape
    cuts = [loop.span_py(t, nb, n_out)[:2] for t in range(nb)]
    width = loop._pad(max(hi - lo for lo, hi in cuts))
    n = nb * n_in * width
    nbytes = n * W0.dtype.itemsize
    raw = np.empty(nbytes + 2 * MB2, np.uint8)
    start = (-raw.ctypes.data) % MB2
    length = (nbytes + MB2 - 1) // MB2 * MB2
    rc = libc.madvise(ctypes.c_void_p(raw.ctypes.data + start), ctypes.c_size_t(length), 14)
    assert rc == 0, ctypes.get_errno()
    out = raw[start:start + nbytes].view(W0.dtype).reshape(nb, n_in, width)
    out[...] = 0
    for t, (lo, hi) in enumerate(cuts):
        out[t, :, :hi - lo] = W0[lo:hi].T
    return out


def anon_huge():
    kb = 0
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("AnonHugePages"):
            kb = int(line.split()[1])
    return kb


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    cfg = make_config("paper", epochs=1)
    w = runners.make_work(cfg, load_dataset(dtype=cfg.dtype))
    variants = [("serial", 1, False), ("owner", 2, False), ("serial", 1, True), ("owner", 2, True)]
    engines = {}
    for name, thr, hp in variants:
        persample.blocked_transpose = hp_transpose if hp else orig
        e = engines[(name, thr, hp)] = make_engine(name)
        runners.engine_run(e, w, thr, warm_up=True)
    res = {v: [] for v in variants}
    for r in range(rounds):
        for v in variants:
            name, thr, hp = v
            persample.blocked_transpose = hp_transpose if hp else orig
            probe = harness.two_core_probe() if thr == 2 else None
            before = anon_huge()
            out = runners.engine_run(engines[v], w, thr)
            res[v].append(out["time_s"])
            print(f"round {r} {name} x{thr} hp={hp}: {out['time_s']:.3f}s others {out['others']:.2f} "
                  f"probe {probe and round(probe, 2)} acc {out['test_acc']:.4f} anonhuge {before}->{anon_huge()}kB",
                  flush=True)
    base = np.median(res[("serial", 1, False)])
    for v, t in res.items():
        print(f"{v}: median {np.median(t):.3f}s  serial/this {base / np.median(t):.2f}x  runs {[round(x, 3) for x in t]}")
    print(json.dumps({str(k): v for k, v in res.items()}))


if __name__ == "__main__":
    main()
