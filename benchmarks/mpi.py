"""MPI benchmark: time per epoch and test accuracy of every --distributed mode at 1 and 2 ranks
(docs/MPI.md; the model for more ranks is benchmarks/comm_model.py).

    .venv/bin/python benchmarks/mpi.py [--epochs 2] [--rounds 3] [--out benchmarks/out/mpi]

It takes /tmp/bench.lock itself, once per round (a round runs every configuration once, in
turn, so that they share the machine's state; each hold stays under 3 minutes so others get
turns), and records `top` beside each round. Every run is a real `mpiexec -n K` of this
script's `train` subcommand, which calls parnn.distributed.train as `parnn train --distributed`
does (it can also turn the overlap off, which the CLI does not offer). Workload: the modern
preset (784-256-128-10 ReLU, softmax cross-entropy, Adam 1e-3, batch 128, float32), full
Fashion-MNIST, 1 thread per rank. Reported: the median over rounds of the last epoch's
training time (no test scoring inside it) and the time inside MPI; accuracies are seeded, so
they do not vary between rounds.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
LOCK = "/tmp/bench.lock"

# name: (ranks, options for DistributedOptions)
RUNS = {
    "allreduce, 1 rank": (1, {"mode": "allreduce"}),
    "allreduce blocking, 2 ranks": (2, {"mode": "allreduce", "overlap": False}),
    "allreduce overlapped, 2 ranks": (2, {"mode": "allreduce"}),
    # --rank-timeout 0: MPICH's own waits (spinning), not the watchdog's polling with naps
    "allreduce blocking, 2 ranks, no watchdog": (2, {"mode": "allreduce", "overlap": False,
                                                     "rank_timeout": 0}),
    "allreduce overlapped, 2 ranks, no watchdog": (2, {"mode": "allreduce", "rank_timeout": 0}),
    # the watchdog with a shorter longest nap between two polls (watchdog.NAP, 50 ms)
    "allreduce blocking, 2 ranks, nap 5 ms": (2, {"mode": "allreduce", "overlap": False,
                                                  "nap": 0.005}),
    "allreduce blocking, 2 ranks, nap 1 ms": (2, {"mode": "allreduce", "overlap": False,
                                                  "nap": 0.001}),
    "average K=1, 2 ranks": (2, {"mode": "average", "average_every": 1}),
    "average K=8, 2 ranks": (2, {"mode": "average", "average_every": 8}),
    "average K=64, 2 ranks": (2, {"mode": "average", "average_every": 64}),
    "ensemble, 1 rank": (1, {"mode": "ensemble"}),
    "ensemble, 2 ranks": (2, {"mode": "ensemble"}),
}


def train(spec):
    """Under mpiexec: one distributed run as `parnn train --distributed` makes it."""
    from dataclasses import replace

    from parnn.distributed import DistributedOptions, train as distributed_train
    from parnn.run.config import make_config

    options = dict(spec["options"])
    if "nap" in options:   # an experiment on the watchdog's polling, not a user setting
        from parnn.distributed import watchdog

        watchdog.NAP = options.pop("nap")
    cfg = make_config("modern", epochs=spec["epochs"], engine="batch")
    opts = DistributedOptions(**options, out=Path(spec["out"]), threads=1,
                              progress=False, overwrite=True)
    # every mode on all 60,000 images, like for like (an ensemble from the command line holds
    # out the preset's validation split, as parnn train does)
    return distributed_train(replace(cfg, validation_split=0.0), opts)


def run(name, ranks, options, epochs, out):
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "PARNN_TEST_FAIL")}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    where = out / name.replace(" ", "").replace(",", "-").replace("=", "")
    spec = dict(epochs=epochs, options=options, out=str(where))
    t = time.perf_counter()
    p = subprocess.run([str(BIN / "mpiexec"), "-n", str(ranks), sys.executable, __file__,
                        "train", json.dumps(spec)], capture_output=True, text=True, env=env,
                       cwd=ROOT)
    wall = time.perf_counter() - t
    if p.returncode:
        sys.exit(f"{name} failed:\n{p.stdout}\n{p.stderr}")
    hist = json.loads((where / "history.json").read_text())
    rows, info = hist["history"], hist["info"]
    row = dict(name=name, ranks=ranks, options=options, wall=wall,
               epoch_s=[r["seconds"] for r in rows], test_acc=hist["test_acc"])
    if "comm_seconds" in rows[-1]:
        row.update(comm_s=[r["comm_seconds"] for r in rows], calls=info["allreduce_calls"])
    if "members" in hist:
        row.update(member_acc=[m["test_acc"] for m in hist["members"]],
                   hard_acc=info["hard_acc"])
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cmd", nargs="?", choices=["train"], help="(internal, under mpiexec)")
    ap.add_argument("spec", nargs="?")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", help="run names separated by ; (default: all)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "mpi")
    args = ap.parse_args()
    if args.cmd == "train":
        sys.exit(train(json.loads(args.spec)))
    names = [n for n in RUNS if not args.only or n in args.only.split(";")]
    args.out.mkdir(parents=True, exist_ok=True)
    rounds = []
    for k in range(args.rounds):
        with open(LOCK, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            top = subprocess.run(["top", "-bn1"], capture_output=True, text=True).stdout
            rows = [run(n, *RUNS[n], args.epochs, args.out) for n in names]
        rounds.append(dict(top="\n".join(top.splitlines()[:15]), runs=rows))
        print(f"round {k + 1}: " + ", ".join(f"{r['name']} {r['epoch_s'][-1]:.2f}s"
                                           for r in rows), flush=True)
        time.sleep(5)   # let others take the lock between rounds
    res = dict(epochs=args.epochs, rounds=rounds, summary=summary(names, rounds))
    (args.out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    report(res["summary"])


def summary(names, rounds):
    out = []
    for i, name in enumerate(names):
        runs = [rd["runs"][i] for rd in rounds]
        last = runs[-1]
        row = dict(name=name, ranks=last["ranks"], test_acc=last["test_acc"],
                   epoch_s=float(np.median([r["epoch_s"][-1] for r in runs])),
                   all_epoch_s=[r["epoch_s"][-1] for r in runs])
        if "comm_s" in last:
            row.update(comm_s=float(np.median([r["comm_s"][-1] for r in runs])),
                       calls=last["calls"])
        if "member_acc" in last:
            row.update(member_acc=last["member_acc"], hard_acc=last["hard_acc"])
        out.append(row)
    return out


def report(rows):
    base = {r["ranks"]: r["epoch_s"] for r in rows if r["name"].startswith("allreduce, 1")}
    one = base.get(1)
    print("\n| run | s/epoch (median of rounds) | speed-up vs allreduce 1 rank | in MPI | "
          "reductions | test accuracy |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        comm = f"{r['comm_s']:.3f} ({r['comm_s'] / r['epoch_s']:.0%})" if "comm_s" in r else "-"
        acc = f"{r['test_acc']:.4f}"
        if "member_acc" in r:
            acc += (f" (soft; hard {r['hard_acc']:.4f}; members "
                    + ", ".join(f"{a:.4f}" for a in r["member_acc"]) + ")")
        speed = f"{one / r['epoch_s']:.2f}x" if one else "-"
        print(f"| {r['name']} | {r['epoch_s']:.3f} | {speed} | {comm} | {r.get('calls', '-')} "
              f"| {acc} |")


if __name__ == "__main__":
    main()
