"""What `parnn bench` writes: the summary rows, the printed tables, CSV, JSON and figures."""

from __future__ import annotations

import statistics

from parnn.bench.harness import GEMM_N, flops_per_sample, usable_cores
from parnn.bench.options import WORKLOADS, workload_of
from parnn.bench.overhead import EPOCH, PAPER_TIMES
from parnn.engines.persample import PHASES


def summarize(runs, w, peak):
    """One row per (kind, name, threads): median/min/max, speedups, GFLOP/s, peers' ratios."""
    groups = {}
    for r in runs:
        if "error" not in r:
            groups.setdefault((r["kind"], r["name"], r["threads"]), []).append(r)
    flops = flops_per_sample(w.spec)
    cores = usable_cores()
    rows = []
    for (kind, name, p), rs in groups.items():
        ts = [r["time_s"] for r in rs]
        med = statistics.median(ts)
        samples = EPOCH * len(w.orders) if kind == "c-reference" else w.samples
        g = flops * samples / med / 1e9
        others = [r["others"] for r in rs if r["others"] is not None]
        rows.append({"workload": WORKLOADS[workload_of(w.cfg)], "kind": kind, "name": name,
                     "threads": p, "oversubscribed": p > cores, "repeats": len(ts),
                     "samples": samples,
                     "time_s": med, "time_min_s": min(ts), "time_max_s": max(ts),
                     "epoch_60k_s": med * EPOCH / samples,
                     "gflops": g, "gemm_peak_gflops": peak[p], "peak_fraction": g / peak[p],
                     "test_acc": statistics.median(r["test_acc"] for r in rs),
                     "others_cpu_max": max(others) if others else None})
    by = {(r["kind"], r["name"], r["threads"]): r for r in rows}
    serial = by.get(("engine", "serial", 1))
    for r in rows:
        base = by.get((r["kind"], r["name"], 1))
        if r["kind"] == "c-reference" and r["name"] == "nn_omp":
            base = base or by.get(("c-reference", "nn_serial", 1))
        r["speedup"] = base["time_s"] / r["time_s"] if base else None
        r["efficiency"] = r["speedup"] / r["threads"] if base else None
        r["speedup_vs_serial"] = serial["epoch_60k_s"] / r["epoch_60k_s"] if serial else None
        best = min((q for q in rows if q["kind"] == "engine" and q["threads"] == r["threads"]),
                   key=lambda q: q["time_s"], default=None)
        if r["kind"] != "engine" and best:
            r["best_parnn_engine"] = best["name"]
            r["parnn_over_this"] = best["epoch_60k_s"] / r["epoch_60k_s"]
    first = {}                                    # tables in the order the runs were given
    for r in runs:
        first.setdefault((r["kind"], r["name"]), len(first))
    order = {"engine": 0, "c-reference": 1, "peer": 2}
    rows.sort(key=lambda r: (order[r["kind"]], first[r["kind"], r["name"]], r["threads"]))
    return rows


# --- output -------------------------------------------------------------------------------------

CSV_COLUMNS = ("workload", "kind", "name", "threads", "oversubscribed", "repeats", "samples",
               "time_s", "time_min_s", "time_max_s", "epoch_60k_s", "speedup", "efficiency",
               "speedup_vs_serial", "gflops", "gemm_peak_gflops", "peak_fraction", "test_acc",
               "others_cpu_max", "best_parnn_engine", "parnn_over_this")
BREAKDOWN_COLUMNS = ("engine", "threads", "total_s", "profiled_s",
                     *(f"{phase}_s" for phase in PHASES),
                     "sync_s", "sync_kind", "sync_per_sample", "sync_us_each")


def _shape(wl):
    """784-256-128-10, or 784-[conv32:3,pool,...]-10 (results written before layer lists have
    no 'shape')."""
    return wl.get("shape") or "-".join(map(str, wl["sizes"]))


def _f(v, fmt):
    return "-" if v is None else format(v, fmt)


def report(res):
    """Plain-text tables: the paper's format per engine, then C, peers, breakdown, model."""
    wl, m = res["workload"], res["machine"]
    rows = res["results"]
    scaled = any(r["samples"] != EPOCH for r in rows if r["kind"] != "c-reference")
    out = [f"\n{wl['id']} {wl['name']}: {_shape(wl)} {wl['hidden']}/"
           f"{wl['output']} {wl['loss']}, {wl['optimizer']} lr {wl['lr']} batch {wl['batch_size']},"
           f" {wl['dtype']}, {wl['epochs']} epoch(s) x {wl['samples']} samples",
           f"{m['cpu']}, {m['usable_cores']} cores; " + "; ".join(
               f"{b['internal_api']} {b['version']} kernel {b['kernel']}" for b in m["blas"])
           + f"; numba {m['numba']} ({m['numba_threading_layer']}); {res['started_utc']}",
           "Time = median of the runs; others = CPU cores other processes used (max over runs); "
           "GFLOP/s count the dense work" + ("" if wl["dense"] or wl["batch_size"] != 1 else
                                             " (the per-sample engines skip zero pixels' rows)")]
    head = "Threads | Time (s) | Speedup | Efficiency |  min (s) |  max (s) | GFLOP/s | of peak"
    head += " | 60k epoch (s)" if scaled else ""
    head += " | test acc | others"
    groups = {}
    for r in rows:
        groups.setdefault((r["kind"], r["name"]), []).append(r)
    for (kind, name), rs in groups.items():
        label = {"engine": "engine", "peer": "peer", "c-reference": "C reference"}[kind]
        out += ["", f"{label} {name}", head, "-" * len(head)]
        for r in rs:
            line = (f"{r['threads']:>7}{'*' if r['oversubscribed'] else ' '}| {r['time_s']:8.3f} | "
                    f"{_f(r['speedup'], '7.2f')} | {_f(r['efficiency'], '10.0%')} | "
                    f"{r['time_min_s']:8.3f} | {r['time_max_s']:8.3f} | {r['gflops']:7.2f} | "
                    f"{r['peak_fraction']:7.1%}")
            line += f" | {r['epoch_60k_s']:13.2f}" if scaled else ""
            line += f" | {r['test_acc']:8.4f} | {_f(r['others_cpu_max'], '.2f')}"
            if "parnn_over_this" in r:
                line += f" | parnn {r['best_parnn_engine']}/this = {r['parnn_over_this']:.3f}"
            out.append(line)
    if any(r["oversubscribed"] for r in rows):
        out.append("* more threads than cores")
    out += ["", "GEMM peak (GFLOP/s, %s, %d^3 matmul; others): " % (wl["dtype"], GEMM_N) + ", ".join(
        f"{p} thread(s) {g:.1f} ({_f(res['gemm_peak_others'].get(p), '.2f')})"
        for p, g in res["gemm_peak_gflops"].items())]
    if res.get("breakdown"):
        out += ["", "Where the time goes (s per run; total = the fastest run; the phases are the "
                "engine's own timers in one more, profiled run (its time: profiled), mean over "
                "its threads; sync = its fork/joins or barriers alone, at their probed cost, "
                "and inside the phases)",
                "engine  threads |  total | profiled | forward | output | backward |   wait | "
                "  sync (kind, us each)"]
        for b in res["breakdown"]:
            out.append(f"{b['engine']:<7} {b['threads']:>7} | {b['total_s']:6.3f} | "
                       f"{b['profiled_s']:8.3f} | {b['forward_s']:7.3f} | {b['output_s']:6.3f} | "
                       f"{b['backward_s']:8.3f} | {b['wait_s']:6.3f} | "
                       f"{b['sync_s']:6.3f} ({b['sync_kind']}, {b['sync_per_sample']}/sample x "
                       f"{b['sync_us_each']:.2f} us)")
        out.append("empty prange region (us): " + ", ".join(
            f"{p}t {s['forkjoin_us']:.2f}" for p, s in res["sync"].items()))
    if res.get("model"):
        mo = res["model"]
        out += ["", "PREDICTION (a fitted model, not a measurement) for the neuron engine, one 60k "
                "epoch if this machine had p such cores: time(p) = serial + compute/p + regions "
                "x (a + b p) us",
                f"  serial {mo['serial_s'] * mo['per_60k_epoch_scale']:.2f} s, compute "
                f"{mo['compute_s'] * mo['per_60k_epoch_scale']:.2f} s, a {mo['cost_us_intercept']:.2f} "
                f"us, b {mo['cost_us_per_thread']:.2f} us/thread; fitted on the fastest runs, "
                f"{mo['fit']}",
                "Threads | predicted (s) | compute | overhead | speedup || paper (s) | paper speedup"]
        t1 = mo["prediction"][0]["time_s"]
        for q in mo["prediction"]:
            pt = PAPER_TIMES.get(q["threads"])
            out.append(f"{q['threads']:>7} | {q['time_s']:13.2f} | {q['compute_s']:7.2f} | "
                       f"{q['overhead_s']:8.2f} | {t1 / q['time_s']:7.2f} || "
                       f"{_f(pt, '9.2f')} | {_f(pt and PAPER_TIMES[1] / pt, '.2f')}")
    if wl["name"] != "paper" or not (res.get("breakdown") or res.get("model")):
        return "\n".join(out)   # the paper's per-region overheads explain only that breakdown
    imp = res["paper"]["implied_overhead_us_per_region"]
    fp = res["paper"]["model_fit"]
    out += ["", "The paper's table implies, if its compute scaled perfectly, an overhead per "
            "parallel region of " + ", ".join(f"{p}t {u:.0f} us" for p, u in imp.items()),
            f"The same model fitted to the paper's table: {fp['compute_s']:.0f} s / p + "
            f"{fp['regions']} regions x ({fp['cost_us_intercept']:.0f} + "
            f"{fp['cost_us_per_thread']:.1f} p) us -> " + ", ".join(
                f"{p}t {v:.0f} s" for p, v in fp["fitted_s"].items())]
    return "\n".join(out)


def write_results(res, out):
    """bench.json, bench.csv, breakdown.csv and the figures in `out`. Returns the paths."""
    from parnn import plots
    from parnn.atomic import atomic_write_csv, atomic_write_json

    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "bench.json", out / "bench.csv"]
    atomic_write_json(paths[0], res)
    atomic_write_csv(paths[1], [{k: r.get(k) for k in CSV_COLUMNS} for r in res["results"]],
                     CSV_COLUMNS)
    if res.get("breakdown"):
        paths.append(out / "breakdown.csv")
        atomic_write_csv(paths[-1], res["breakdown"], BREAKDOWN_COLUMNS)
    wl = res["workload"]
    title = (f"{wl['id']} {wl['name']}: {_shape(wl)}, {wl['dtype']} — "
             f"{res['machine']['cpu']}, {res['machine']['usable_cores']} cores, "
             f"{res['started_utc'][:10]}")
    if wl["samples"] * wl["epochs"] != EPOCH:
        title += (f"\ntimes of {wl['epochs']} epoch(s) x {wl['samples']} samples, scaled to one "
                  f"epoch of {EPOCH}")
    series = {}
    for r in res["results"]:
        label = {"engine": "", "peer": "peer ", "c-reference": "C "}[r["kind"]] + r["name"]
        series.setdefault(label, []).append((r["threads"], r["epoch_60k_s"], r["speedup"]))
    paper = PAPER_TIMES if wl["name"] == "paper" else None
    paths.append(out / "time.png")
    plots.plot_bench_time({k: [(p, t) for p, t, _ in v] for k, v in series.items()}, paper,
                          paths[-1], title)
    paths.append(out / "speedup.png")
    plots.plot_bench_speedup({k: [(p, s) for p, _, s in v if s is not None]
                              for k, v in series.items()}, paper, paths[-1], title)
    if res.get("breakdown"):
        paths.append(out / "breakdown.png")
        plots.plot_bench_breakdown(res["breakdown"], paths[-1], title, PHASES)
    if res.get("model"):
        paths.append(out / "model.png")
        measured = [(r["threads"], r["time_min_s"] * EPOCH / r["samples"]) for r in res["results"]
                    if r["kind"] == "engine" and r["name"] == "neuron"]     # what the model fits
        plots.plot_bench_model(res["model"]["prediction"], measured, PAPER_TIMES, paths[-1],
                               title, res["paper"]["model_fit"]["fitted_s"])
    return paths
