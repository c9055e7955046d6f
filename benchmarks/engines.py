"""Engine benchmark: the paper's workload (W1) and the modern one (W2), against the C reference
and the machine's own GEMM peak, all measured by this one script in one sitting, with the
harness `parnn bench` uses (parnn.bench.harness, parnn.bench.runners).

    flock /tmp/bench.lock env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE \\
        .venv/bin/python benchmarks/engines.py [--runs 3] [--c-reference DIR] [--out benchmarks/out]

W1  paper: the `paper` preset (784-256-128-10, tanh, MSE vs one-hot, per-sample SGD lr 0.01,
    float64, Xavier init, seed 1), one epoch over the 60k real training images, handed to the
    engine in the training loop's chunks (run.train.chunk_size). Every per-sample engine at 1
    and 2 threads, and with --c-reference DIR the C reference (the sources of anchors/paper_c in
    DIR, built with `make` and `make extras` in a temporary copy: nn_serial, nn_omp -t 1/2, and
    its -ffast-math builds). Time = training pass only (like the C's train_s), test accuracy on
    the 10k test images after the epoch.
W2  modern: the `modern` preset for one epoch (784-256-128-10, ReLU, softmax + cross-entropy,
    Adam lr 1e-3, batch 128, float32, He init): the batch engine (and numpy for reference) at 1
    and 2 BLAS threads. GFLOP/s count the dense work (harness.flops_per_sample) and are compared
    with the float32 GEMM peak measured here: the best of 3 4096^2 sgemms.

The per-sample engines skip W0 rows whose input pixel is 0 (about half of Fashion-MNIST; the
same values, see rows.input_rows); "dense" rows turn that off, like for like with the C.

Every timed configuration runs --runs times, rounds interleaved (config A, B, C, A, B, C, ...),
and the tables report medians. The machine is a 2-vCPU VM shared with other people. Every run
records how much CPU OTHER processes in the VM used during it ("others", from /proc/stat), and
every 2-thread run is preceded by the harness's 2-core probe of what the host gives us: the
time of two independent compute loops run at once over one loop alone (1.0 = two real cores,
2.0 = the two vCPUs share one core at that moment).

--profile: where a sample's time goes, by the per-sample engines' own phase timers
(make_engine("owner", profile=True)): owner at 1 thread (serial's work split) and 2 threads.
Results: JSON in --out, a markdown report on stdout.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from parnn.bench import harness, runners
from parnn.engines import PER_SAMPLE, make_engine

ROOT = Path(__file__).resolve().parents[1]


def workload(preset, limit_train=None):
    """The Work of a preset for one epoch on the real data."""
    from parnn.data import load_dataset
    from parnn.run.config import make_config

    cfg = make_config(preset, epochs=1)
    return runners.make_work(cfg, load_dataset(dtype=cfg.dtype, limit_train=limit_train))


def probe(threads):
    return harness.two_core_probe() if threads > 1 else None


# --- W1: the paper's per-sample workload ------------------------------------------------------

def w1_run(name, threads, w, dense=False):
    from parnn.run.train import chunk_size

    eng = make_engine(name, dense=dense)
    runners.train_run(eng, w, threads, warm_up=True)
    p = probe(threads)
    net, out = runners.train_run(eng, w, threads)
    return {**out, "probe": p, "param_sum": float(net.params.sum()),
            "serial_chunks": eng.info().get("serial_chunks", 0),
            "chunks": -(-len(w.X) // chunk_size(eng, 1, len(w.X)))}


def c_run(build, binary, threads):
    cmd = harness.c_reference_command(build, binary, threads, (256, 128), 1)
    p = probe(threads)
    out = harness.run_c_reference(cmd)
    if "error" in out:
        sys.exit(out["error"])
    return {**out, "probe": p}


# --- W2: the modern mini-batch workload -------------------------------------------------------

def w2_run(name, threads, w):
    eng = make_engine(name)
    p = probe(threads)                                     # before BLAS threads start spinning
    runners.train_run(eng, w, threads, warm_up=True)
    _, out = runners.train_run(eng, w, threads)
    flop = harness.flops_per_sample(w.spec) * w.samples
    return {**out, "probe": p, "flop": flop, "gflops": flop / out["time_s"] / 1e9}


def gemm_peak(threads, n=4096):
    p = probe(threads)
    with harness.Timer() as t:
        g = harness.gemm_peak("float32", threads, n=n)
    return {"gflops": g, "others": t.others, "probe": p}


# --- compile time: a fresh process with an empty cache, then again with that cache ----------

COMPILE_SNIPPET = """
import time, numpy as np
t0 = time.perf_counter()
from parnn.engines import PER_SAMPLE, make_engine
from parnn.core.model import Spec
t1 = time.perf_counter()
out = {"import_s": t1 - t0}
for name in ("serial", "neuron", "hogwild", "owner", "batch"):
    eng = make_engine(name)
    t = time.perf_counter()
    if name in PER_SAMPLE:
        eng.warm_up(Spec((784, 256, 128, 10)), np.dtype("float64"))
    else:
        from parnn.core.model import MLP
        from parnn.core.optim import Adam
        spec = Spec((8, 4, 3), "relu", "softmax", "cross_entropy", "float32")
        net = MLP(spec); X = np.zeros((4, 8), np.float32); T = np.eye(3, dtype=np.float32)[[0, 1, 2, 0]]
        eng.train(net, Adam(spec.n_params, "float32", 1e-3), X, T, np.arange(4), 2)
    out[name] = time.perf_counter() - t
print(out)
"""


def compile_times():
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        res = {}
        for label in ("cold", "cached"):
            p = subprocess.run([sys.executable, "-c", COMPILE_SNIPPET], env=env, cwd=ROOT,
                               capture_output=True, text=True, check=True)
            res[label] = eval(p.stdout.strip().splitlines()[-1])
        return res


# --- profile: where a sample's time goes (--profile) -------------------------------------------

def profile(n=6000):
    """Microseconds per sample of each phase, per thread, by the engine's own phase timers, for
    owner at 1 thread (= serial's work split) and 2 threads: W1 on the first n real training
    images, float64, zero inputs skipped."""
    w = workload("paper", limit_train=n)
    out = {"probe_before": harness.two_core_probe()}
    for nt in (1, 2):
        eng = make_engine("owner", profile=True)
        r = runners.profiled_run(eng, w, nt)
        us = r["seconds"][r["seconds"].sum(axis=1) > 0] / n * 1e6     # the threads that ran
        out[nt] = {"us_per_sample": r["time_s"] / n * 1e6, "phases": r["phases"],
                   "us": us.round(2).tolist(), "serial_chunks": eng.info()["serial_chunks"]}
    out["probe_after"] = harness.two_core_probe()
    return out


def profile_report(p):
    one, two = p[1]["us"][0], p[2]["us"]
    lines = ["| phase (µs per sample) | 1 thread | " +
             " | ".join(f"2 threads: thread {t}" for t in range(len(two))) + " |",
             "|---|---|" + "---|" * len(two)]
    for i, name in enumerate(p[1]["phases"]):
        lines.append(f"| {name} | {one[i]:.1f} | " + " | ".join(f"{t[i]:.1f}" for t in two) + " |")
    lines.append(f"| **total** | **{sum(one):.1f}** | " +
                 " | ".join(f"**{sum(t):.1f}**" for t in two) + " |")
    lines.append(f"| wall µs per sample | {p[1]['us_per_sample']:.1f} | "
                 f"{p[2]['us_per_sample']:.1f} |" + " |" * (len(two) - 1))
    if p[2]["serial_chunks"]:
        lines.append(f"\nAt 2 threads owner ran {p[2]['serial_chunks']} chunk(s) with its serial "
                     "loop: its barriers kept yielding the core (another process took one).")
    lines.append(f"\n2-core probe before / after: {p['probe_before']:.2f} / {p['probe_after']:.2f} "
                 "(1.0 = two real cores)")
    return "\n".join(lines)


# --- report ------------------------------------------------------------------------------------

def summarize(runs):
    s = {"time_s": float(np.median([r["time_s"] for r in runs]))}
    s["runs_s"] = [round(r["time_s"], 3) for r in runs]
    others = [r["others"] for r in runs if r["others"] is not None]   # None: under 0.5 s
    s["others_max"] = round(max(others), 2) if others else None
    probes = [r["probe"] for r in runs if r.get("probe") is not None]
    s["probe_max"] = round(max(probes), 2) if probes else None
    s["min_s"] = min(r["time_s"] for r in runs)
    s["serial_chunks"] = [r.get("serial_chunks", 0) for r in runs]
    s["test_acc"] = [r["test_acc"] for r in runs]
    if "flop" in runs[0]:
        s["gflops"] = runs[0]["flop"] / s["time_s"] / 1e9
    return s


def _f(v):
    return "" if v is None else f"{v:.2f}"


def report(res):
    m = res["machine"]
    out = [f"# Engine benchmark — {m['date_utc']}", "",
           f"Machine: {m['cpu']}, {m['cores']} cores, L2 {m['caches_cpu0'].get('L2')}, "
           f"L3 {m['caches_cpu0'].get('L3')}; "
           f"Python {m['python']}, NumPy {m['numpy']}, Numba {m['numba']} "
           f"(threading layer {res.get('threading_layer')}); {m['gcc']}.",
           "BLAS: " + "; ".join(f"{b['internal_api']} {b['version']} kernel {b['kernel']} "
                               f"({b['threading_layer']})" for b in m["blas"]),
           f"Env: {m['env']}; load average at start {' '.join(f'{x:.2f}' for x in m['loadavg'])}.",
           f"Runs per configuration: {res['runs']} (medians; rounds interleaved). "
           "'others' = CPU cores used by other processes in the VM during the run, '2-core "
           "probe' = how much two threads streaming their own L2-sized buffers slow each other "
           "down just before the run (1.0 = two cores with private L2s, 2.0 = shared), both "
           "the worst over the runs.", ""]

    w1 = res["w1"]
    c_ser = w1.get("C nn_serial", {}).get("time_s")
    c_omp2 = w1.get("C nn_omp t=2", {}).get("time_s")
    out += ["## W1 paper: 784-256-128-10 tanh MSE, per-sample SGD, float64, 1 epoch of 60k", "",
            "| engine | threads | train s (median) | runs | vs C serial | vs C omp 2t | "
            "test acc | others | 2-core probe |", "|---|---|---|---|---|---|---|---|---|"]
    for key, s in w1.items():
        eng, th = key.rsplit(" t=", 1) if " t=" in key else (key, "1")
        rs = ", ".join(f"{x:.2f}" for x in s["runs_s"])
        r1 = f"{s['time_s'] / c_ser:.3f}" if c_ser else ""
        r2 = f"{s['time_s'] / c_omp2:.3f}" if c_omp2 else ""
        acc = "/".join(sorted({f"{a:.4f}" for a in s["test_acc"]}))
        pr = f"{s['probe_max']:.2f}" if s["probe_max"] is not None else ""
        out.append(f"| {eng} | {th} | **{s['time_s']:.2f}** | {rs} | {r1} | {r2} | {acc} | "
                   f"{_f(s['others_max'])} | {pr} |")
    fb = {k: v["serial_chunks"] for k, v in w1.items() if any(v["serial_chunks"])}
    out += ["", "owner's contention fallback (chunks of 2000 run serially, per run; 30 chunks "
            "per epoch): " + (", ".join(f"{k}: {v}" for k, v in fb.items()) if fb else "none")]
    t = res["targets"]
    out += ["", "Targets (W1):",
            f"- serial <= 0.35 x C serial: {t['serial_vs_c']:.3f} x -> "
            f"{'MET' if t['serial_vs_c'] <= 0.35 else 'MISSED'}",
            f"- best per-sample engine at 2 threads ({t['best_2t']}) <= 0.25 x C omp 2 threads: "
            f"{t['best_2t_vs_c_omp2']:.3f} x -> {'MET' if t['best_2t_vs_c_omp2'] <= 0.25 else 'MISSED'}",
            f"- ... and >= 1.7 x faster than serial: {t['best_2t_speedup']:.2f} x -> "
            f"{'MET' if t['best_2t_speedup'] >= 1.7 else 'MISSED'}"]
    if "dense_owner_speedup" in t:
        out.append(f"- dense (no zero skipping, like for like with the C): serial "
                   f"{t['dense_serial_vs_c']:.3f} x C serial; owner 2 threads "
                   f"{t['dense_owner_vs_c_omp2']:.3f} x C omp 2 threads and "
                   f"{t['dense_owner_speedup']:.2f} x faster than dense serial")
    out.append("")

    w2 = res["w2"]
    peak = res["gemm_peak"]
    out += ["## W2 modern: 784-256-128-10 ReLU softmax CE, Adam, batch 128, float32, 1 epoch", "",
            f"float32 GEMM peak (4096^2 sgemm, best of 3): 1 thread "
            f"{peak['1']['gflops']:.1f} GFLOP/s, 2 threads {peak['2']['gflops']:.1f} GFLOP/s.", "",
            "| engine | BLAS threads | train s (median) | runs | GFLOP/s | % of GEMM peak | test acc | "
            "others | 2-core probe |", "|---|---|---|---|---|---|---|---|---|"]
    for key, s in w2.items():
        eng, th = key.rsplit(" t=", 1)
        rs = ", ".join(f"{x:.3f}" for x in s["runs_s"])
        pct = 100 * s["gflops"] / peak[th]["gflops"]
        pr = f"{s['probe_max']:.2f}" if s["probe_max"] is not None else ""
        out.append(f"| {eng} | {th} | **{s['time_s']:.3f}** | {rs} | {s['gflops']:.1f} | "
                   f"{pct:.0f}% | {s['test_acc'][0]:.4f} | {_f(s['others_max'])} | {pr} |")
    out += ["", f"Target (W2): batch at 2 threads >= 50% of GEMM peak: {t['w2_pct']:.0f}% -> "
            f"{'MET' if t['w2_pct'] >= 50 else 'MISSED'}", ""]

    if "compile" in res:
        c = res["compile"]
        out += ["## Start-up (784-256-128-10 float64 warm-up in a fresh process)", "",
                "| | import | serial | neuron | hogwild | owner | batch |", "|---|---|---|---|---|---|---|"]
        for label in ("cold", "cached"):
            v = c[label]
            out.append(f"| {label} cache | " + " | ".join(
                f"{v[k]:.2f} s" for k in ("import_s", "serial", "neuron", "hogwild", "owner",
                                          "batch")) + " |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    ap.add_argument("--c-reference", type=Path, metavar="DIR",
                    help="the C reference's sources (anchors/paper_c): built in a temporary "
                    "copy and timed beside the engines; without it, no C runs")
    ap.add_argument("--skip-compile", action="store_true", help="no start-up measurement")
    ap.add_argument("--engines", default=",".join(PER_SAMPLE))
    ap.add_argument("--profile", action="store_true",
                    help="only the per-phase profile of a sample (owner at 1 and 2 threads)")
    args = ap.parse_args(argv)
    if harness.bench_lock_free():
        print(f"WARNING: {harness.LOCK} is free: run me under `flock {harness.LOCK} ...`",
              file=sys.stderr)
    if args.profile:
        print(profile_report(profile()))
        return

    import numba
    res = {"machine": {**harness.machine_facts(), "gcc": gcc_version(),
                       "date_utc": datetime.datetime.now(datetime.timezone.utc)
                       .strftime("%Y-%m-%d %H:%M UTC")},
           "runs": args.runs, "under_bench_lock": harness.bench_lock_free() is False}
    m = res["machine"]
    print(f"# {m['cpu']} x{m['cores']}, BLAS: " +
          ", ".join(f"{b['internal_api']} {b['version']} kernel={b['kernel']}"
                    for b in m["blas"]), file=sys.stderr)
    if any(m["env"][k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")):
        print("WARNING: OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE are set", file=sys.stderr)
    if numba.config.NUMBA_NUM_THREADS < 2:
        sys.exit("Numba's pool has fewer than 2 threads")

    engines = args.engines.split(",")
    w1_configs = [(e, th, False) for e in engines for th in ((1,) if e == "serial" else (1, 2))]
    w1_configs += [("serial", 1, True), ("owner", 2, True)]
    c_configs = [] if args.c_reference is None else [
        ("nn_serial", 1), ("nn_omp", 1), ("nn_omp", 2), ("nn_serial_fm", 1), ("nn_omp_fm", 2)]
    w2_configs = [("batch", 1), ("batch", 2), ("numpy", 2)]

    d1, d2 = workload("paper"), workload("modern")
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        build = harness.build_c_reference(args.c_reference, tmp) if c_configs else None
        for r in range(args.runs):
            for e, th, dense in w1_configs:
                key = e + (" dense" if dense else "") + (f" t={th}" if e != "serial" else "")
                runs.setdefault(("w1", key), []).append(w1_run(e, th, d1, dense))
                print(f"round {r + 1} W1 {key}: {runs['w1', key][-1]['time_s']:.2f} s", file=sys.stderr)
            for b, th in c_configs:
                key = f"C {b}" + (f" t={th}" if b.startswith("nn_omp") else "")
                runs.setdefault(("w1", key), []).append(c_run(build, b, th))
                print(f"round {r + 1} W1 {key}: {runs['w1', key][-1]['time_s']:.2f} s", file=sys.stderr)
            for e, th in w2_configs:
                key = f"{e} t={th}"
                runs.setdefault(("w2", key), []).append(w2_run(e, th, d2))
                print(f"round {r + 1} W2 {key}: {runs['w2', key][-1]['time_s']:.3f} s", file=sys.stderr)
    res["w1"] = {k: summarize(v) for (w, k), v in runs.items() if w == "w1"}
    res["w2"] = {k: summarize(v) for (w, k), v in runs.items() if w == "w2"}
    res["raw"] = {f"{w}:{k}": v for (w, k), v in runs.items()}
    try:
        res["threading_layer"] = numba.threading_layer()
    except ValueError:
        res["threading_layer"] = None
    res["gemm_peak"] = {str(th): gemm_peak(th) for th in (1, 2)}
    res["engine_info"] = {e: make_engine(e).info() for e in engines + ["batch"]}
    res["targets"] = targets(res["w1"], res["w2"], res["gemm_peak"])
    if not args.skip_compile:
        res["compile"] = compile_times()
    res["machine"]["loadavg_end"] = os.getloadavg()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = out / f"engines-{stamp}.json"
    path.write_text(json.dumps(res, indent=1, default=float))
    print(report(res))
    print(f"\n(JSON: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path})")


def targets(w1, w2, peak):
    """The W1 and W2 targets of docs/ENGINES.md, as ratios to the same sitting's baselines."""
    nan = float("nan")
    two = {k: v["time_s"] for k, v in w1.items()
           if k.endswith("t=2") and not k.startswith("C") and "dense" not in k}
    best = min(two, key=two.get)
    ser = w1["serial"]["time_s"]
    c_ser = w1["C nn_serial"]["time_s"] if "C nn_serial" in w1 else nan
    c_omp2 = w1["C nn_omp t=2"]["time_s"] if "C nn_omp t=2" in w1 else nan
    t = {"serial_vs_c": ser / c_ser, "best_2t": best, "best_2t_vs_c_omp2": two[best] / c_omp2,
         "best_2t_speedup": ser / two[best],
         "w2_pct": 100 * w2["batch t=2"]["gflops"] / peak["2"]["gflops"]}
    if "serial dense" in w1 and "owner dense t=2" in w1:
        ds, do = w1["serial dense"]["time_s"], w1["owner dense t=2"]["time_s"]
        t.update(dense_serial_vs_c=ds / c_ser, dense_owner_vs_c_omp2=do / c_omp2,
                 dense_owner_speedup=ds / do)
    return t


def gcc_version():
    try:
        return subprocess.run(["gcc", "--version"], capture_output=True,
                              text=True).stdout.split("\n")[0]
    except OSError:
        return None


if __name__ == "__main__":
    main()
