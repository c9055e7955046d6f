"""`parnn bench`: engines x thread counts, timed, with the paper's numbers beside.

One process, one sitting (run it under `flock /tmp/bench.lock`: the machine is shared):

  * every engine at every thread count, --repeat times, in interleaved rounds (A B C, A B C, ...)
    so a slow minute of the machine hits every configuration alike; median, min and max. Only
    the training pass is timed, as the C reference's train_s: loading, one short warm-up per
    engine and thread count (compiles the kernels, starts the thread pools) and the test pass
    are outside the clock.
  * the machine's GEMM peak at each thread count in the workload's dtype (a 2048 x 2048 np.matmul),
    and each configuration's GFLOP/s as a fraction of it;
  * for the per-sample engines, where the time goes: one more run with the engine's own phase
    timers on (forward, output, backward, wait), and the cost of synchronisation alone (empty
    prange regions for neuron, empty spin barriers for owner); a fitted model
    time(p) = serial + compute/p + regions x cost_per_region(p) then predicts the paper's thread
    counts (4 to 28), labelled as a prediction;
  * optionally PyTorch, JAX and scikit-learn on the same workload (--peers), each run a child
    process pinned to the thread count's cores (bench.pinned), and the C/OpenMP reference
    binaries (--c-reference DIR).

Writes OUT/bench.json (everything), OUT/bench.csv (one row per configuration),
OUT/breakdown.csv and PNG figures; prints the paper's table format per engine.

The modules, by job: options (the flags, declared once), harness (timing and machine facts,
shared with the scripts in benchmarks/), runners (one timed run of each kind), overhead (sync
costs, the breakdown, the model), report (tables, files, figures). The CLI imports this package
for its parser on every command, so the measuring modules are imported only when a bench runs.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from functools import partial
from pathlib import Path

from parnn.bench.options import PEERS, WORKLOADS, Options
from parnn.errors import ConfigError

BATCH = ("batch", "numpy")
SYNC_SAMPLES = 10000              # samples' worth of empty regions and barriers the probes time

__all__ = ["Options", "prepare", "run"]


def prepare(opts):
    """Validate everything up front, before any work. Returns the options with their defaults
    filled in (engines, threads), the run's TrainConfig, and {name: engine object}: one per
    engine for the whole bench, as a program would keep one for its whole run."""
    import numba

    from parnn.bench.harness import C_BINARIES, default_threads
    from parnn.engines import PER_SAMPLE, available
    from parnn.run.config import make_config

    if opts.workload not in WORKLOADS:
        raise ConfigError(f"unknown workload {opts.workload!r}: choose one of {', '.join(WORKLOADS)}")
    for flag, v in (("--repeat", opts.repeat), ("--epochs", opts.epochs)):
        if v < 1:
            raise ConfigError(f"{flag} must be >= 1, got {v}")
    if opts.quiet_wait < 0:
        raise ConfigError(f"--quiet-wait must be >= 0 seconds, got {opts.quiet_wait:g}")
    if opts.limit_train is not None and opts.limit_train < 1:
        raise ConfigError(f"--limit-train must be >= 1, got {opts.limit_train}")
    threads = tuple(opts.threads) or default_threads()
    if any(p < 1 for p in threads):
        raise ConfigError(f"--threads must be >= 1 each, got {','.join(map(str, threads))}")
    threads = tuple(sorted(set(threads)))
    cfg = workload_config(opts)
    spec = cfg.spec()
    default = {"paper": PER_SAMPLE, "modern": BATCH, "cnn": ("batch",)}[opts.workload]
    engines = opts.engines or tuple(e for e in default if e in available())
    made = {}
    for name in engines:
        engine = made[name] = engine_maker(name, opts.dense)()     # ConfigError: unknown engine
        try:
            engine.check(spec, cfg.optimizer, cfg.batch_size)
        except ConfigError as e:
            raise ConfigError(f"engine {name} cannot run the {opts.workload} workload: {e}") from None
    pool = numba.config.NUMBA_NUM_THREADS
    if max(threads) > pool and any(n != "numpy" for n in engines):
        raise ConfigError(f"--threads {max(threads)} is more than Numba's pool of {pool} "
                          f"threads: run with NUMBA_NUM_THREADS={max(threads)} to "
                          "oversubscribe on purpose")
    for p in opts.peers:
        if p not in PEERS:
            raise ConfigError(f"unknown peer {p!r}: choose from {', '.join(PEERS)}")
    if opts.c_reference is not None:
        c = Path(opts.c_reference)
        missing = [b for b in C_BINARIES if not os.access(c / b, os.X_OK)]
        if missing:
            raise ConfigError(f"--c-reference {c}: no executable {' or '.join(missing)} there "
                              "(build it with `make` in a copy of anchors/paper_c)")
        if opts.workload != "paper" or len(spec.sizes) != 4:
            raise ConfigError("--c-reference: the C reference only runs the paper workload with "
                              "two hidden layers")
    return dataclasses.replace(opts, engines=engines, threads=threads), cfg, made


def workload_config(opts):
    """The TrainConfig a workload trains: its preset's; for cnn the modern preset's settings
    (Adam, batch 128, float32) with the layers of `parnn train --model cnn`."""
    from parnn.run.config import CNN_LAYERS, make_config

    if opts.workload != "cnn":
        return make_config(opts.workload, hidden=opts.hidden, epochs=opts.epochs, seed=opts.seed)
    if opts.hidden is not None:
        raise ConfigError(f"--hidden does not apply to the cnn workload (its layers are "
                          f"{CNN_LAYERS}): drop --hidden")
    return make_config("modern", layers=CNN_LAYERS, epochs=opts.epochs, seed=opts.seed)


def engine_maker(name, dense, profile=False):
    """make_engine for an engine name: the per-sample engines take dense and profile."""
    from parnn.engines import PER_SAMPLE, make_engine

    if name in PER_SAMPLE:
        return partial(make_engine, name, dense=dense, profile=profile)
    return partial(make_engine, name)


def run(opts, log=print):
    """Validate, measure, summarise, print, write. Returns the results dict."""
    import importlib.util

    from tqdm import tqdm

    from parnn.bench import harness, overhead, pinned, report, runners
    from parnn.data import load_dataset
    from parnn.engines import PER_SAMPLE

    opts, cfg, engines = prepare(opts)
    spec = cfg.spec()
    res = {"command": opts.command(), "started_utc": harness.now_utc(),
           "workload": workload_info(opts, cfg), "code": harness.code_version(), "notes": []}

    def note(text):
        res["notes"].append(text)
        log(f"note: {text}")

    if harness.bench_lock_free():
        note("/tmp/bench.lock was free: not run under `flock /tmp/bench.lock`, other "
             "benchmarks may have run at the same time")
    for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        if os.environ.get(k):
            note(f"{k}={os.environ[k]} is set: the BLAS kernel may not be the one for this CPU")
    log("BLAS: " + "; ".join(f"{b['internal_api']} {b['version']} kernel {b['kernel']}"
                              for b in harness.blas_info()))
    peers = []
    for p in opts.peers:
        if p == "sklearn" and spec.arch:
            note("peer sklearn has no convolutional layers: skipped")
        elif importlib.util.find_spec(p) is None:
            note(f"peer {p} is not installed (pip install 'parnn[peers]'): skipped")
        else:
            peers.append(p)

    ds = load_dataset(opts.dataset, opts.data, spec.dtype, opts.limit_train)
    w = runners.make_work(cfg, ds)
    res["workload"].update(samples=len(w.X), data=str(ds.source), test_samples=len(w.y_test))
    scale60k = overhead.EPOCH / w.samples
    if w.samples != overhead.EPOCH:
        note(f"each run trains {len(w.X)} samples x {cfg.epochs} epoch(s); 'epoch_60k_s' scales "
             f"its time by {scale60k:.3g} to one epoch of {overhead.EPOCH} samples")

    if "serial" in engines and set(opts.threads) - {1}:
        note("engine serial starts no threads: it runs at 1 thread only (the other --threads "
             "counts apply to the other engines)")
    # what runs: (kind, name, threads) -> a callable taking warm_up= and returning a dict
    configs = {}
    for name, engine in engines.items():
        for p in ((1,) if name == "serial" else opts.threads):    # serial never starts threads
            configs[("engine", name, p)] = partial(runners.engine_run, engine, w, p)
    for peer in peers:                 # each run a child process pinned to p cores
        for p in opts.threads:
            configs[("peer", peer, p)] = partial(pinned.pinned_run, peer, w, p)
    if opts.c_reference:
        # the C reads the gzipped IDX files of a directory; else it uses its own default one
        c_data = ds.source if (Path(ds.source) / "train-images-idx3-ubyte.gz").exists() else None
        for b, p in [("nn_serial", 1)] + [("nn_omp", p) for p in opts.threads]:
            configs[("c-reference", b, p)] = partial(runners.c_run, opts.c_reference, b, p, w,
                                                     c_data)
        if w.samples != overhead.EPOCH:
            note("the C reference always trains all 60000 samples per epoch (no --limit-train)")
    all_threads = sorted({p for _, _, p in configs})
    profiled = [(n, p) for kind, n, p in configs if kind == "engine" and n in PER_SAMPLE]
    do_breakdown = opts.breakdown and bool(profiled)
    sync_threads = sorted(set(opts.threads) | ({1} if "serial" in opts.engines else set()))

    steps = len(all_threads) + len(configs) * (1 + opts.repeat) + (
        len(sync_threads) + len(profiled) if do_breakdown else 0)
    bar = tqdm(total=steps, desc="bench", unit="step", file=sys.stderr, disable=not opts.progress,
               dynamic_ncols=True)

    def quiet():
        """Wait for other processes to go quiet, if asked to; what happened, for the record."""
        if not opts.quiet_wait:
            return {}
        bar.set_postfix_str("waiting for other processes to go quiet")
        waited, ok = harness.wait_for_quiet(opts.quiet_wait)
        return {"quiet_wait_s": waited, "quiet": ok}

    try:
        res["gemm_peak_gflops"], res["gemm_peak_others"] = {}, {}
        for p in all_threads:
            quiet()
            bar.set_postfix_str(f"GEMM peak, {p} thread(s)")
            with harness.Timer() as t:
                res["gemm_peak_gflops"][p] = harness.gemm_peak(spec.dtype, p)
            res["gemm_peak_others"][p] = t.others
            bar.update()
        for key, f in configs.items():               # compile, start pools: not timed
            bar.set_postfix_str(f"warm-up {key[1]} {key[2]}t")
            f(warm_up=True)
            bar.update()
        runs = []
        for r in range(opts.repeat):                  # interleaved rounds
            for key, f in configs.items():
                waited = quiet()
                bar.set_postfix_str(f"round {r + 1}/{opts.repeat}: {key[1]} {key[2]}t")
                out = f()
                runs.append({"kind": key[0], "name": key[1], "threads": key[2], "round": r + 1,
                             **waited, **out})
                bar.update()
        res["runs"] = runs
        noisy = sum(1 for r in runs if r.get("quiet") is False)
        if noisy:
            note(f"{noisy} run(s) started while other processes were still busy after waiting "
                 f"{opts.quiet_wait:g} s (see 'others')")
        failed = {r["error"] for r in runs if "error" in r}
        for e in sorted(failed):
            note(e if e.startswith("peer ") else f"C reference failed: {e}")
        rows = report.summarize(runs, w, res["gemm_peak_gflops"])
        res["results"] = rows
        if do_breakdown:
            res.update(where_time_goes(w, rows, profiled, sync_threads, opts, bar, quiet))
    finally:
        bar.close()
    res["paper"] = {"times_s": overhead.PAPER_TIMES, "regions_per_sample": overhead.PAPER_REGIONS,
                    "implied_overhead_us_per_region": overhead.paper_implied_overhead(),
                    "model_fit": overhead.fit_paper()}
    res["engine_info"] = {name: engine.info() for name, engine in engines.items()}
    res["machine"] = harness.machine_facts()
    res["finished_utc"] = harness.now_utc()
    log(report.report(res))
    paths = report.write_results(res, Path(opts.out))
    log("wrote " + ", ".join(str(p) for p in paths))
    return res


def where_time_goes(w, rows, profiled, threads, opts, bar, quiet):
    """The sync costs, the per-phase breakdown of every per-sample configuration and the model,
    as entries of the results dict."""
    from parnn.bench import harness, overhead, runners

    out = {}
    samples = min(len(w.X), SYNC_SAMPLES)
    bar.set_postfix_str("fork/join and barrier costs")
    out["sync"] = sync = overhead.sync_costs(threads, samples, "owner" in opts.engines)
    if opts.c_reference:
        out["c_forkjoin_us"] = {p: harness.c_forkjoin_us(opts.c_reference, p, samples)
                                for p in threads}
    bar.update(len(threads))
    # the breakdown and the model take each configuration's FASTEST run: the least disturbed
    # one on a shared machine (other processes only ever add time)
    fastest = {(r["name"], r["threads"]): r["time_min_s"] for r in rows if r["kind"] == "engine"}
    out["phases"], out["breakdown"] = {}, []
    for name, p in profiled:
        waited = quiet()
        bar.set_postfix_str(f"profiled run: {name} {p}t")
        prof = runners.profiled_run(engine_maker(name, opts.dense, profile=True)(), w, p)
        out["phases"][f"{name} {p}"] = {**waited, **prof, "seconds": prof["seconds"].tolist()}
        out["breakdown"].append(overhead.breakdown_row(name, p, fastest[name, p], prof, sync,
                                                       w.spec.n_layers, w.samples))
        bar.update()
    neuron = {p: t for (n, p), t in fastest.items() if n == "neuron"}
    if neuron:
        out["model"] = overhead.neuron_model(neuron, sync, w.spec.n_layers, w.samples)
    return out


def workload_info(opts, cfg):
    from parnn.bench.harness import flops_per_sample

    spec = cfg.spec()
    return {"name": opts.workload, "id": WORKLOADS[opts.workload], "sizes": list(spec.sizes),
            "layers": spec.arch, "shape": spec.shape_text(), "n_params": spec.n_params,
            "hidden": spec.hidden, "output": spec.output, "loss": spec.loss, "dtype": spec.dtype,
            "optimizer": cfg.optimizer, "lr": cfg.lr, "lr_schedule": cfg.lr_schedule,
            "batch_size": cfg.batch_size, "init": cfg.init, "epochs": cfg.epochs, "seed": cfg.seed,
            "flops_per_sample": flops_per_sample(spec), "dense": opts.dense}
