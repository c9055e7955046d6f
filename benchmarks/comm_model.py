"""A communication model for --distributed, calibrated on this machine (docs/MPI.md).

    flock /tmp/bench.lock .venv/bin/python benchmarks/comm_model.py [--out benchmarks/out/mpi]

1. Allreduce(SUM, float32, in place) under `mpiexec -n 2` over message sizes 8 B .. 4 MB:
   median seconds per call (the slower rank's, after a Barrier so it times the transfer).
2. Fit, per algorithm MPICH picks for a commutative Allreduce (MPIR_CVAR_ALLREDUCE_SHORT_MSG_SIZE,
   2048 bytes by default):
     recursive doubling (short):       T(p, n) = log2(p) * (alpha_s + n * delta_s)
     Rabenseifner (reduce-scatter +    T(p, n) = 2 log2(p) * alpha_l + 2 (p-1)/p * n * delta_l
       allgather, long):
   At p = 2 the two read T = alpha_s + n delta_s and T = 2 alpha_l + n delta_l, so a straight
   line through each size range gives the constants (delta: seconds per byte, transfer and
   reduction together; Rabenseifner's per-byte terms are (p-1)/p n (2 beta + gamma), which is
   2 (p-1)/p n delta_l with delta_l = beta + gamma/2, the p = 2 slope).
3. Compute on one rank (1 thread, the batch engine): forward + backward per batch of b samples,
   and one optimizer step on every parameter (every rank repeats it).
4. PREDICTED seconds per epoch for p = 1 .. 64 (powers of two): allreduce at per-rank batch b
   (global b*p), blocking and overlapped (overlap hides at most the backward time of the layers
   below the one in flight), average every K steps, ensemble; and the break-even per-rank batch
   (compute per step = communication per step). A model: it assumes every pair of ranks talks
   at this machine's shared-memory speed (one very large node) unless another network's
   constants are given; measured 1 and 2 rank epochs (benchmarks/mpi.py) go beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
N_TRAIN = 60000
SIZES = [8, 32, 128, 512, 1024, 2048, 4096, 16384, 65536, 262144, 1048576, 4194304]
SHORT = 2048          # MPICH's MPIR_CVAR_ALLREDUCE_SHORT_MSG_SIZE (bytes): <= is short
RANKS = [1, 2, 4, 8, 16, 32, 64]
BATCHES = [2, 4, 8, 16, 32, 64, 128, 256, 512]
EVERY = [1, 8, 64]
# Typical published figures, NOT measured here: what the model says on a real cluster network.
NETWORKS = {"10 GbE (TCP), assumed": (25e-6, 1 / 1.1e9),
            "InfiniBand HDR100, assumed": (2e-6, 1 / 11e9)}


def micro(reps_small=300, reps_large=40):
    """Under mpiexec: {bytes: median seconds} of Allreduce at each size."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    out = {}
    for nbytes in SIZES:
        buf = np.ones(max(1, nbytes // 4), np.float32)
        reps = reps_small if nbytes <= 65536 else reps_large
        for _ in range(10):
            comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        times = []
        for _ in range(reps):
            comm.Barrier()   # the transfer, not the wait for a late rank
            t = time.perf_counter()
            comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
            times.append(time.perf_counter() - t)
        out[nbytes] = comm.allreduce(float(np.median(times)), op=MPI.MAX)
    if comm.rank == 0:
        print(json.dumps({"seconds": out, "mpi": MPI.Get_library_version().splitlines()[0]}))


def fit(seconds):
    """(alpha_s, delta_s, alpha_l, delta_l) from p = 2 times (least squares per size range)."""
    short = [(n, t) for n, t in seconds.items() if n <= SHORT]
    long = [(n, t) for n, t in seconds.items() if n > SHORT]
    (ds, a_s), (dl, a_l2) = (np.polyfit(*zip(*rng), 1) for rng in (short, long))
    return max(a_s, 0.0), max(ds, 0.0), max(a_l2 / 2, 0.0), max(dl, 0.0)


def t_allreduce(p, nbytes, c):
    """Predicted seconds of one Allreduce of nbytes on p ranks (p a power of two)."""
    if p == 1:
        return 0.0
    alpha_s, delta_s, alpha_l, delta_l = c
    steps = math.log2(p)
    if nbytes <= SHORT:
        return steps * (alpha_s + nbytes * delta_s)
    return 2 * steps * alpha_l + 2 * (p - 1) / p * nbytes * delta_l


def compute(batches, reps=20):
    """Per batch size b: seconds of forward + backward on one rank; per layer the share of
    backward below it; seconds of one Adam step (the modern preset, 1 thread)."""
    from threadpoolctl import threadpool_limits

    from parnn.core.model import MLP
    from parnn.core.optim import make_optimizer
    from parnn.engines.batch import Workspace
    from parnn.run.config import make_config

    spec = make_config("modern").spec(784, 10)
    net = MLP(spec, init="he", seed=0)
    rng = np.random.default_rng(0)
    out = {}
    with threadpool_limits(1, "blas"):
        for b in batches:
            ws = Workspace(spec, b)
            X = rng.random((b, 784), dtype=np.float32)
            T = np.eye(10, dtype=np.float32)[rng.integers(0, 10, b)]
            stamps = []
            def on_layer(l, g, stamps=stamps):
                stamps.append(time.perf_counter())
            for _ in range(3):
                net.backward(net.forward(X, out=ws.A), T, ws.grad, deltas=ws.D)
            fb, layer_tail = [], []
            for _ in range(reps):
                stamps.clear()
                t0 = time.perf_counter()
                acts = net.forward(X, out=ws.A)
                net.backward(acts, T, ws.grad, deltas=ws.D, on_layer=on_layer)
                t2 = time.perf_counter()
                fb.append(t2 - t0)
                # backward left to compute after the last (output) layer's gradient is done:
                # the most an overlapped reduction can hide
                layer_tail.append(t2 - stamps[0])
            out[b] = dict(fwd_bwd=float(np.median(fb)), after_first=float(np.median(layer_tail)))
        opt = make_optimizer("adam", spec.n_params, spec.dtype, 1e-3)
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            opt.step(net.params, ws.grad)
            times.append(time.perf_counter() - t)
    layers = [W.size + b.size for W, b in zip(net.W, net.b)]
    return out, float(np.median(times)), spec.n_params, layers


def predict(c, comp, step, n_params, layers):
    """Predicted seconds per epoch: see the module's docstring."""
    nbytes = 4 * n_params
    rows = []
    for p in RANKS:
        for b in BATCHES:
            steps = N_TRAIN / (b * p)
            work = comp[b]["fwd_bwd"] + step
            # blocking: one Allreduce of the gradient; overlapped: one per layer, the last
            # layer's started first, hidden behind the backward still to compute
            t_block = t_allreduce(p, nbytes, c)
            t_layers = sum(t_allreduce(p, 4 * n, c) for n in layers)
            t_over = max(t_allreduce(p, 4 * layers[0], c), t_layers - comp[b]["after_first"])
            row = dict(p=p, b=b, allreduce=steps * (work + t_block),
                       overlapped=steps * (work + (t_over if p > 1 else 0.0)),
                       ensemble=N_TRAIN / p / b * work, comm_per_step=t_block,
                       compute_per_step=comp[b]["fwd_bwd"])
            for k in EVERY:
                row[f"average{k}"] = steps * work + steps / k * t_block
            rows.append(row)
    return rows


def break_even(rows):
    """Per p: the smallest per-rank batch whose compute per step is at least the blocking
    Allreduce of the gradient (so at most half of a step is communication)."""
    out = {}
    for p in RANKS[1:]:
        ok = [r["b"] for r in rows if r["p"] == p and r["compute_per_step"] >= r["comm_per_step"]]
        out[p] = min(ok) if ok else None
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cmd", nargs="?", choices=["micro", "doc"],
                    help="micro: (internal, under mpiexec); doc: docs/MPI.md's tables from the "
                    "saved results (no timing)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "mpi")
    args = ap.parse_args()
    if args.cmd == "micro":
        return micro()
    if args.cmd == "doc":
        return doc(json.loads((args.out / "comm_model.json").read_text()))
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    top = subprocess.run(["top", "-bn1"], capture_output=True, text=True).stdout
    p = subprocess.run([str(BIN / "mpiexec"), "-n", "2", sys.executable, __file__, "micro"],
                       capture_output=True, text=True, check=True, env=env)
    got = json.loads(p.stdout)
    seconds = {int(k): v for k, v in got["seconds"].items()}
    comp, step, n_params, layers = compute(BATCHES)
    models = {"this machine (shared memory), measured at 2 ranks": fit(seconds)}
    for name, (alpha, delta) in NETWORKS.items():
        models[name] = (alpha, delta, alpha, delta)
    res = dict(mpi=got["mpi"], allreduce_seconds=seconds, compute=comp, adam_step=step,
               n_params=n_params, layers=layers, load_before="\n".join(top.splitlines()[:15]),
               models={name: dict(constants=dict(zip(("alpha_s", "delta_s", "alpha_l",
                                                      "delta_l"), c)),
                                  epochs=(rows := predict(c, comp, step, n_params, layers)),
                                  break_even=break_even(rows))
                       for name, c in models.items()})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "comm_model.json").write_text(json.dumps(res, indent=2) + "\n")
    report(res)


def report(res):
    print(f"{res['mpi']}\nAllreduce at 2 ranks (median s per call):")
    print(" | ".join(f"{n} B: {t * 1e6:.1f} us" for n, t in res["allreduce_seconds"].items()))
    print("compute per batch (fwd+bwd, 1 thread): "
          + ", ".join(f"{b}: {v['fwd_bwd'] * 1e3:.2f} ms" for b, v in res["compute"].items())
          + f"; Adam step {res['adam_step'] * 1e3:.2f} ms")
    for name, m in res["models"].items():
        c = m["constants"]
        print(f"\nMODEL, {name}: alpha_s {c['alpha_s'] * 1e6:.2f} us, delta_s "
              f"{c['delta_s'] * 1e9:.3f} ns/B, alpha_l {c['alpha_l'] * 1e6:.2f} us, delta_l "
              f"{c['delta_l'] * 1e9:.3f} ns/B ({1 / max(c['delta_l'], 1e-15) / 1e9:.2f} GB/s)")
        print("break-even per-rank batch (compute/step >= Allreduce/step): "
              + ", ".join(f"p={p}: {b}" for p, b in m["break_even"].items()))
        print("| p | b/rank | allreduce | overlapped | " +
              " | ".join(f"average K={k}" for k in EVERY) + " | ensemble |")
        print("|---|---|---|---|" + "---|" * len(EVERY) + "---|")
        for r in m["epochs"]:
            if r["b"] in (16, 64, 128, 512):
                print(f"| {r['p']} | {r['b']} | {r['allreduce']:.3f} | {r['overlapped']:.3f} | "
                      + " | ".join(f"{r[f'average{k}']:.3f}" for k in EVERY)
                      + f" | {r['ensemble']:.3f} |")


def doc(res):
    """Per model: PREDICTED s/epoch (speed-up over 1 rank): allreduce at a global batch of 128
    split p ways (what equals one process at batch 128), then every mode at a per-rank batch b
    (global b*p: fewer, larger steps; another optimisation) against 1 rank at batch b."""
    for name, m in res["models"].items():
        at = {(r["p"], r["b"]): r for r in m["epochs"]}
        cols = [("allreduce", 16), ("allreduce", 128), ("allreduce", 512), ("overlapped", 128),
                ("average1", 128), ("average8", 128), ("average64", 128), ("ensemble", 128)]
        print(f"\nPREDICTED s/epoch, {name} (speed-up over 1 rank):\n")
        print("| p | allreduce, global batch 128 (b=128/p) | overlapped, same | "
              + " | ".join(f"{k.replace('average', 'average K=')} b={b}" for k, b in cols)
              + " |")
        print("|---|---|---|" + "---|" * len(cols))
        for p in RANKS:
            strong = [f"{at[p, 128 // p][k]:.3f} ({at[1, 128][k] / at[p, 128 // p][k]:.1f})"
                      for k in ("allreduce", "overlapped")]
            print(f"| {p} | " + " | ".join(strong + [
                f"{at[p, b][k]:.3f} ({at[1, b][k] / at[p, b][k]:.1f})" for k, b in cols]) + " |")
        print("\nbreak-even per-rank batch: " + ", ".join(f"p={p}: {b}" for p, b in
                                                        m["break_even"].items()))


if __name__ == "__main__":
    main()
