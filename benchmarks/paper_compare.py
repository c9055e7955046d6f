"""The paper's comparison (issue 13): the default MLP against the default CNN, each at 1 and 2
threads and at 1 and 2 MPI ranks: seconds per epoch, speedup, and test accuracy after the SAME
training time.

    .venv/bin/python benchmarks/paper_compare.py time [--rounds 3]
    .venv/bin/python benchmarks/paper_compare.py accuracy [--budget 60] [--ways "2 threads"]
    .venv/bin/python benchmarks/paper_compare.py report

Models, each what `parnn train` trains (the default preset `accurate`: Adam, batch 128,
float32, label smoothing, AdamW decay, warm-up-cosine), engine batch:

    mlp   parnn train                 784-512-256-10
    cnn   parnn train --model cnn     conv32:3,pool,conv64:3,pool,dense128 -> 10

Ways to run, each a real command line:

    1 thread    parnn train --threads 1
    2 threads   parnn train --threads 2
    1 rank      mpiexec -n 1 parnn train --distributed allreduce --threads 1
    2 ranks     mpiexec -n 2 parnn train --distributed allreduce --threads 1

`time`: every (model, way) once per round, the rounds interleaved; each round holds
/tmp/bench.lock (one hold under 3 minutes) and records `top` beside it. A run trains SAMPLES
(all 60,000 for the MLP, 12,000 for the CNN, so each epoch takes seconds and a round stays
under the 3 minutes) for 2 epochs with no validation split; its time is the SECOND epoch's
(the first one loads Numba's compiled kernels), as `parnn train` reports it (training only:
no scoring, no saving). The figure of a (model, way) is the median over rounds, also scaled to
an epoch of 60,000 samples.

`accuracy`: for each (model, way), epochs = floor(budget / its 60k-epoch time), at least 1;
then one seed (1) trained on all 60,000 images for that many epochs, no validation split,
scored on the 10,000 test images. Thread ways that get the same epochs train the same network
(the batch engine's results do not depend on its thread count), so each (model, threads,
epochs) is trained once; every rank count is trained on its own (an MPI run sums each batch in
its own order). These runs are not timed, so they run `nice -n 19` outside the lock.

`report`: docs/figures/cnn/compare.png and the markdown table for docs/RESULTS.md.
Everything goes to docs/figures/cnn/compare.json.
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "figures" / "cnn"
LOCK = "/tmp/bench.lock"
EPOCH = 60000

MODELS = {"mlp": [], "cnn": ["--model", "cnn"]}
SAMPLES = {"mlp": 60000, "cnn": 12000}            # trained per epoch by `time`
WAYS = {  # name: (MPI ranks or 0 for no mpiexec, threads per process)
    "1 thread": (0, 1),
    "2 threads": (0, 2),
    "1 rank": (1, 1),
    "2 ranks": (2, 1),
}


def now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def top():
    return "\n".join(subprocess.run(["top", "-bn1"], capture_output=True,
                                    text=True).stdout.splitlines()[:15])


def command(model, way, out, extra):
    ranks, threads = WAYS[way]
    cmd = [str(BIN / "parnn"), "train", *MODELS[model], "--threads", str(threads),
           "--validation-split", "0", "--engine", "batch", "--no-progress", "--overwrite",
           "--out", str(out), *extra]
    if ranks:
        cmd = [str(BIN / "mpiexec"), "-n", str(ranks), *cmd, "--distributed", "allreduce"]
    return cmd


def train(model, way, extra, nice=False):
    """One `parnn train` run; its history.json."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    with tempfile.TemporaryDirectory(prefix="parnn-compare-") as d:
        cmd = command(model, way, Path(d) / "run", extra)
        p = subprocess.run((["nice", "-n", "19"] if nice else []) + cmd, capture_output=True,
                           text=True, env=env, cwd=ROOT)
        if p.returncode:
            sys.exit(f"{model}, {way} failed: {' '.join(cmd)}\n{p.stdout}\n{p.stderr}")
        hist = json.loads((Path(d) / "run" / "history.json").read_text())
    hist["command"] = " ".join(cmd).replace(f"{BIN}/", "")
    return hist


def load():
    path = OUT / "compare.json"
    return json.loads(path.read_text()) if path.exists() else {}


def save(res):
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "compare.json").write_text(json.dumps(res, indent=2) + "\n")


def time_runs(a):
    configs = [(m, w) for m in MODELS for w in WAYS]
    rounds = []
    for k in range(a.rounds):
        with open(LOCK, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            rd = {"started_utc": now(), "top": top(), "runs": []}
            for m, w in configs:
                h = train(m, w, ["--limit-train", str(SAMPLES[m]), "--epochs", "2",
                                 "--limit-test", "100"])
                rd["runs"].append({"model": m, "way": w, "epoch_s": h["history"][-1]["seconds"],
                                   "first_epoch_s": h["history"][0]["seconds"],
                                   "command": h["command"]})
            rd["finished_utc"], rd["top_after"] = now(), top()
        rounds.append(rd)
        print(f"round {k + 1} ({rd['started_utc']}): " + ", ".join(
            f"{r['model']} {r['way']} {r['epoch_s']:.2f}s" for r in rd["runs"]), flush=True)
        time.sleep(5)                               # others may take the lock in between
    summary = []
    for m, w in configs:
        ts = [r["epoch_s"] for rd in rounds for r in rd["runs"] if (r["model"], r["way"]) == (m, w)]
        med = statistics.median(ts)
        summary.append({"model": m, "way": w, "ranks": WAYS[w][0], "threads": WAYS[w][1],
                        "epoch_s": med, "runs_s": ts,
                        "samples": SAMPLES[m], "epoch_60k_s": med * EPOCH / SAMPLES[m]})
    for r in summary:
        base = next(q for q in summary if q["model"] == r["model"] and q["way"] == (
            "1 rank" if r["ranks"] else "1 thread"))
        r["speedup"] = base["epoch_s"] / r["epoch_s"]
        r["speedup_vs_1_thread"] = next(q["epoch_s"] for q in summary if q["model"] == r[
            "model"] and q["way"] == "1 thread") / r["epoch_s"]
    res = load()
    res["time"] = {"samples": SAMPLES, "epochs": 2, "rounds": rounds,
                   "summary": summary, "note": "epoch_s: the second epoch of each run, median "
                   "over rounds; epoch_60k_s scales it to 60,000 samples"}
    save(res)
    for r in summary:
        print(f"{r['model']:4} {r['way']:10} {r['epoch_s']:6.2f} s ({r['epoch_60k_s']:6.1f} s "
              f"per 60k)  speedup {r['speedup']:.2f}")


def accuracy_runs(a):
    res = load()
    summary = res["time"]["summary"]
    done = res.setdefault("accuracy", {}).setdefault(str(a.budget), {"runs": {}})
    done["budget_s"], done["rule"] = a.budget, ("epochs = max(1, floor(budget / epoch_60k_s)); "
                                                "seed 1, all 60,000 training images, no "
                                                "validation split, 10,000 test images")
    for r in summary:
        if a.ways and r["way"] not in a.ways:
            continue
        epochs = max(1, math.floor(a.budget / r["epoch_60k_s"]))
        # The batch engine gives the same bits at any thread count; an MPI run takes the general
        # path with its reducer, and each rank count sums the batch in its own order.
        kind = f"mpi{r['ranks']}" if r["ranks"] else "threads"
        key = f"{r['model']} {kind} {epochs}"
        r.setdefault("epochs_at", {})[str(a.budget)] = epochs
        if key not in done["runs"]:
            t = time.perf_counter()
            h = train(r["model"], r["way"], ["--epochs", str(epochs)], nice=True)
            done["runs"][key] = {"test_acc": h["test_acc"], "epochs": epochs,
                                 "train_s": sum(q["seconds"] for q in h["history"]),
                                 "wall_s": time.perf_counter() - t, "command": h["command"],
                                 "finished_utc": now()}
            print(f"{key}: test {h['test_acc']:.4f} ({done['runs'][key]['train_s']:.0f} s "
                  "of training, niced, not a timing)", flush=True)
            save(res)
        r.setdefault("test_acc_at", {})[str(a.budget)] = done["runs"][key]["test_acc"]
    save(res)


def report(a):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = load()
    summary = res["time"]["summary"]
    budgets = sorted(res.get("accuracy", {}), key=float)
    head = "| model | way | s / epoch (runs) | 60k epoch (s) | speedup |" + "".join(
        f" epochs in {b} s | test acc |" for b in budgets)
    print(head)
    print("|" + "---|" * (5 + 2 * len(budgets)))
    for r in summary:
        line = (f"| {r['model']} | {r['way']} | {r['epoch_s']:.2f} ("
                + ", ".join(f"{t:.2f}" for t in r["runs_s"]) + f") | {r['epoch_60k_s']:.1f} | "
                f"{r['speedup']:.2f} |")
        for b in budgets:
            acc = r.get("test_acc_at", {}).get(b)
            line += (f" {r.get('epochs_at', {}).get(b, '-')} | "
                     + ("-" if acc is None else f"{acc:.4f}") + " |")
        print(line)

    full = [b for b in budgets if all(b in r.get("test_acc_at", {}) for r in summary)]
    fig, axes = plt.subplots(1, 2 if full else 1, figsize=(11 if full else 6, 4))
    axes = list(axes) if full else [axes]
    ways = list(WAYS)
    width = 0.38
    for i, m in enumerate(MODELS):
        rows = {r["way"]: r for r in summary if r["model"] == m}
        xs = [j + (i - 0.5) * width for j in range(len(ways))]
        bars = axes[0].bar(xs, [rows[w]["epoch_60k_s"] for w in ways], width, label=m)
        for bar, w in zip(bars, ways):
            axes[0].annotate(f"{rows[w]['speedup']:.2f}x", (bar.get_x() + width / 2,
                             bar.get_height()), ha="center", va="bottom", fontsize=8)
    axes[0].set_xticks(range(len(ways)), ways)
    axes[0].set_ylabel("seconds per 60k epoch (median of 3)")
    axes[0].set_title("time per epoch; label: speedup over 1 thread / 1 rank", fontsize=9)
    axes[0].legend()
    if full:                                        # the largest budget every way was run at
        b = full[-1]
        for i, m in enumerate(MODELS):
            rows = {r["way"]: r for r in summary if r["model"] == m}
            xs = [j + (i - 0.5) * width for j in range(len(ways))]
            accs = [rows[w].get("test_acc_at", {}).get(b, float("nan")) for w in ways]
            bars = axes[1].bar(xs, accs, width, label=m)
            for bar, w in zip(bars, ways):
                axes[1].annotate(f"{rows[w]['epochs_at'][b]} ep", (bar.get_x() + width / 2,
                                 bar.get_height()), ha="center", va="bottom", fontsize=8)
        axes[1].set_xticks(range(len(ways)), ways)
        accs = [r["test_acc_at"][b] for r in summary]
        axes[1].set_ylim(min(accs) - 0.01, max(accs) + 0.006)
        axes[1].set_ylabel("test accuracy (seed 1)")
        axes[1].set_title(f"accuracy after {b} s of training; label: epochs", fontsize=9)
        axes[1].legend()
    fig.suptitle(f"MLP 784-512-256-10 vs CNN conv32-pool-conv64-pool-dense128, batch engine, "
                 f"2 cores ({res['time']['rounds'][0]['started_utc'][:10]}; the load: "
                 "docs/RESULTS.md)", fontsize=10)
    fig.tight_layout()
    fig.savefig(OUT / "compare.png", dpi=110)
    print(f"wrote {OUT / 'compare.png'}")


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("time", "accuracy", "report"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--budget", type=int, default=60, help="seconds of training (accuracy)")
    p.add_argument("--ways", nargs="+", choices=WAYS, help="accuracy: only these (default: all)")
    a = p.parse_args(argv)
    {"time": time_runs, "accuracy": accuracy_runs, "report": report}[a.what](a)


if __name__ == "__main__":
    main(sys.argv[1:])
