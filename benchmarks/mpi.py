"""MPI benchmark: `--distributed allreduce` and `ensemble` with 1 and 2 ranks, the cost of an
Allreduce, and a model of both at 8-64 ranks. Results go to docs/MPI.md by hand.

    flock /tmp/bench.lock .venv/bin/python benchmarks/mpi.py [--epochs 2] [--out benchmarks/out/mpi]

Steps (every training run is a real `mpiexec -n K parnn train --distributed ...`, modern preset,
full Fashion-MNIST, --engine batch (the compiled mini-batch engine, which allreduce wraps)):
  1. Allreduce micro-benchmark under `mpiexec -n 2` (this script's `allreduce` subcommand):
     median time of 8 B and of one gradient's size, to fit latency alpha and bandwidth beta.
  2. Compute micro-benchmark: forward+backward time per sample at per-rank batch sizes
     128, 64, ..., 2 (what one rank computes when a batch of 128 is split p ways).
  3. Training runs: allreduce with 1 and 2 ranks, ensemble with 1, 2 (and, accuracy only,
     4 and 8 ranks oversubscribed), one process with 2 BLAS threads for reference.
  4. The model (a prediction, not a measurement) for 1-64 ranks.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from parnn.bench import harness

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
N_TRAIN, BATCH = 60000, 128

# Assumed networks for the prediction (typical published figures, NOT measured here).
NETWORKS = {"10 GbE (TCP)": (25e-6, 1.1e9), "InfiniBand HDR100": (2e-6, 11e9)}


def allreduce_micro(sizes, reps):
    """Run under mpiexec: median seconds of Allreduce(IN_PLACE, SUM) per float32 buffer size."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    out = {}
    for n in sizes:
        buf = np.ones(n, np.float32)
        for _ in range(10):
            comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        times = []
        for _ in range(reps):
            comm.Barrier()   # time the transfer, not the wait for a late rank
            t = time.perf_counter()
            comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
            times.append(time.perf_counter() - t)
        out[n * 4] = float(np.median(comm.allreduce(np.median(times), op=MPI.MAX)))
    if comm.rank == 0:
        print(json.dumps(dict(seconds=out, mpi=MPI.Get_library_version().splitlines()[0].strip())))


def compute_micro(batches, reps=30):
    """Seconds per sample of forward + backward (numpy reference, 1 thread) at each batch size,
    and seconds per Adam step (every rank applies the whole step: it does not shrink with p)."""
    from threadpoolctl import threadpool_limits

    from parnn.core.model import MLP
    from parnn.core.optim import make_optimizer
    from parnn.run.config import make_config

    spec = make_config("modern").spec()
    net = MLP(spec, init="he", seed=0)
    rng = np.random.default_rng(0)
    X = rng.random((BATCH, 784), dtype=np.float32)
    T = np.eye(10, dtype=np.float32)[rng.integers(0, 10, BATCH)]
    grad = np.empty_like(net.params)
    out = {}
    with threadpool_limits(1, "blas"):
        for b in batches:
            for _ in range(3):
                net.backward(net.forward(X[:b]), T[:b], grad)
            t = time.perf_counter()
            for _ in range(reps):
                net.backward(net.forward(X[:b]), T[:b], grad)
            out[b] = (time.perf_counter() - t) / reps / b
        opt = make_optimizer("adam", spec.n_params, spec.dtype, 1e-3)
        t = time.perf_counter()
        for _ in range(reps):
            opt.step(net.params, grad)
        step = (time.perf_counter() - t) / reps
    return out, step


def wait_quiet():
    """The machine is shared: wait (up to 600 s) until other processes use < 0.3 cores; what
    happened is recorded beside the timing."""
    waited, quiet = harness.wait_for_quiet(600, threshold=0.3)
    return {"quiet_wait_s": waited, "quiet": quiet}


def train_run(out, name, ranks, mode, epochs, threads=1, extra=()):
    quiet = wait_quiet()
    cmd = [BIN / "mpiexec", "-n", str(ranks), BIN / "parnn", "train", "--distributed", mode,
           "--epochs", str(epochs), "--engine", "batch", "--threads", str(threads),
           "--no-progress", "--out", out / name, *extra]
    with harness.Timer() as t:
        p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=ROOT)
    if p.returncode:
        sys.exit(f"{name} failed:\n{p.stdout}\n{p.stderr}")
    print(p.stdout.strip().splitlines()[-2], flush=True)
    hist = json.loads((out / name / "history.json").read_text())
    row = dict(name=name, mode=mode, ranks=ranks, threads=threads, wall=t.seconds,
               others=t.others, **quiet,
               command=" ".join(str(c) for c in cmd).replace(str(BIN) + "/", ""))
    if mode == "allreduce":
        h = hist["history"]
        row.update(epoch_s=[r["seconds"] for r in h], comm_s=[r["comm_seconds"] for r in h],
                   test_acc=h[-1]["test_acc"], test_acc_by_epoch=[r["test_acc"] for r in h])
    else:
        m = hist["members"]
        d = hist["distributed"]
        # an epoch of the ensemble lasts as long as its slowest member's
        row.update(epoch_s=[max(x["history"][e]["seconds"] for x in m) for e in range(epochs)],
                   member_acc=[x["test_acc"] for x in m], test_acc=d["soft_acc"],
                   hard_acc=d["hard_acc"],
                   member0_acc_by_epoch=[r["test_acc"] for r in m[0]["history"]])
    return row


def best_of(repeat, *args, **kwargs):
    """The run whose fastest epoch is fastest (results are seeded, so only the times differ)."""
    runs = [train_run(*args, **kwargs) for _ in range(repeat)]
    return min(runs, key=lambda r: min(r["epoch_s"]))


def t_allreduce(p, nbytes, alpha, beta):
    """Ring-style allreduce: latency per step of a log-depth algorithm plus the bandwidth term
    2(p-1)/p * bytes / beta (reduce-scatter + allgather), the optimum for large messages."""
    if p == 1:
        return 0.0
    return alpha * math.ceil(math.log2(p)) + 2 * (p - 1) / p * nbytes / beta


def model(c_per_sample, step, alpha, beta, nbytes, ps=(1, 2, 4, 8, 16, 32, 64)):
    """Predicted seconds per epoch.

    allreduce: each of the n/B batches costs B/p samples of gradient (per-sample cost measured
               at batch B/p: small batches use BLAS worse), one allreduce, and the whole
               optimizer step, which every rank repeats (the serial part, as in Amdahl's law).
    allreduce_big: the batch grows with p (B per rank, 128p in all): n/(Bp) batches, so fewer
               steps and allreduces per epoch, but a different optimisation (larger batch).
    ensemble:  each rank trains n/p samples at batch B with its own steps; no communication
               until the one Gather of test outputs at the end (not counted).
    """
    rows = []
    n_batches = N_TRAIN / BATCH
    for p in ps:
        b = max(1, BATCH // p)
        c = c_per_sample[min(c_per_sample, key=lambda k: abs(k - b))]
        compute = N_TRAIN / p * c + n_batches * step
        comm = n_batches * t_allreduce(p, nbytes, alpha, beta)
        big = (N_TRAIN * c_per_sample[BATCH] + n_batches * (step + t_allreduce(p, nbytes, alpha,
                                                                             beta))) / p
        rows.append(dict(p=p, allreduce_compute=compute, allreduce_comm=comm,
                         allreduce=compute + comm, allreduce_big=big,
                         ensemble=(N_TRAIN * c_per_sample[BATCH] + n_batches * step) / p))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd")
    a = sub.add_parser("allreduce", help="(internal) the Allreduce micro-benchmark, under mpiexec")
    a.add_argument("--sizes", default="2,235146")
    a.add_argument("--reps", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "mpi")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs: best of N")
    ap.add_argument("--accuracy-ranks", default="4,8",
                    help="extra ensemble sizes run oversubscribed, for accuracy only")
    args = ap.parse_args()
    if args.cmd == "allreduce":
        return allreduce_micro([int(s) for s in args.sizes.split(",")], args.reps)

    from parnn.run.config import make_config

    n_params = make_config("modern").spec().n_params
    nbytes = 4 * n_params
    args.out.mkdir(parents=True, exist_ok=True)
    wait_quiet()
    p = subprocess.run([str(BIN / "mpiexec"), "-n", "2", sys.executable, __file__, "allreduce",
                        "--sizes", f"2,{n_params}"], capture_output=True, text=True, check=True)
    got = json.loads(p.stdout)
    micro = {int(k): v for k, v in got["seconds"].items()}
    res = dict(machine=dict(cpu=harness.cpu_facts()["cpu"], cores=os.cpu_count(),
                            python=platform.python_version(), mpi=got["mpi"]),
               epochs=args.epochs, n_params=n_params)
    alpha = micro[8]
    beta = nbytes / (micro[nbytes] - alpha)   # p = 2: 2(p-1)/p = 1
    res["allreduce_micro"] = dict(seconds=micro, alpha=alpha, beta=beta)
    print(f"Allreduce, 2 ranks: 8 B {alpha * 1e6:.1f} us, {nbytes / 1e6:.2f} MB "
          f"{micro[nbytes] * 1e3:.3f} ms -> beta {beta / 1e9:.2f} GB/s", flush=True)

    wait_quiet()
    c, step = compute_micro([128, 64, 32, 16, 8, 4, 2])
    res["compute_per_sample"], res["adam_step"] = c, step
    print("forward+backward per sample (us) by batch: "
          + ", ".join(f"{b}: {s * 1e6:.1f}" for b, s in c.items())
          + f"; Adam step {step * 1e3:.2f} ms", flush=True)

    r = args.repeat
    runs = [best_of(r, args.out, "allreduce-1", 1, "allreduce", args.epochs),
            best_of(r, args.out, "allreduce-2", 2, "allreduce", args.epochs),
            best_of(r, args.out, "ensemble-1", 1, "ensemble", args.epochs),
            best_of(r, args.out, "ensemble-2", 2, "ensemble", args.epochs),
            best_of(r, args.out, "ensemble-2-bootstrap", 2, "ensemble", args.epochs,
                    extra=["--shards", "bootstrap"]),
            best_of(r, args.out, "one-rank-2-threads", 1, "allreduce", args.epochs, threads=2)]
    for k in (int(x) for x in args.accuracy_ranks.split(",") if x):
        runs.append(train_run(args.out, f"ensemble-{k}-oversubscribed", k, "ensemble",
                              args.epochs))
    res["runs"] = runs

    # Model: per-sample compute from the 1-rank run (its epoch minus Allreduce calls and optimizer
    # steps; the per-epoch evaluation is not in the epoch time), shaped by the micro-benchmark's
    # batch-size dependence.
    one, i = runs[0], best(runs[0])
    c_run = (one["epoch_s"][i] - one["comm_s"][i] - N_TRAIN / BATCH * step) / N_TRAIN
    scale = c_run / c[BATCH]
    res["compute_scale"] = scale
    c_model = {b: s * scale for b, s in c.items()}
    res["model"] = {"measured here (shared memory)": model(c_model, step, alpha, beta, nbytes)}
    for name, (al, be) in NETWORKS.items():
        res["model"][f"assumed {name}"] = model(c_model, step, al, be, nbytes)
    (args.out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    report(res)


def best(run):
    """The fastest epoch: on a shared machine other work only ever adds time."""
    return int(np.argmin(run["epoch_s"]))


def report(res):
    print("\n| run | ranks x threads | s/epoch (best) | in Allreduce (share) | test acc |")
    print("|---|---|---|---|---|")
    for r in res["runs"]:
        i = best(r)
        ep = r["epoch_s"][i]
        comm = f"{r['comm_s'][i]:.2f} ({r['comm_s'][i] / ep:.0%})" if "comm_s" in r else "-"
        acc = f"{r['test_acc']:.4f}"
        if "member_acc" in r:
            acc += (f" soft, {r['hard_acc']:.4f} hard; members "
                    + ", ".join(f"{a:.4f}" for a in r["member_acc"]))
        print(f"| {r['name']} | {r['ranks']} x {r['threads']} | {ep:.2f} | {comm} | {acc} |")
    for name, rows in res["model"].items():
        print(f"\nPREDICTED s/epoch, {name}:")
        print("| p | allreduce B=128: compute + step | comm | total | speedup | "
              "allreduce B=128p | speedup | ensemble | speedup |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['p']} | {r['allreduce_compute']:.2f} | {r['allreduce_comm']:.2f} | "
                  f"{r['allreduce']:.2f} | {rows[0]['allreduce'] / r['allreduce']:.1f} | "
                  f"{r['allreduce_big']:.2f} | {rows[0]['allreduce_big'] / r['allreduce_big']:.1f} | "
                  f"{r['ensemble']:.2f} | {rows[0]['ensemble'] / r['ensemble']:.1f} |")


if __name__ == "__main__":
    main()
