"""What synchronisation costs, where a run's time goes, and the model built from both.

  sync_costs      the cost of synchronisation alone: empty prange regions (the neuron engine's
                  fork/joins) and empty spin barriers (the owner engine's), per thread count
  breakdown_row   a per-sample engine's profiled phases beside its fastest run and its sync
  fit_model       time(p) = serial + compute/p + regions x cost_per_region(p), fitted to the
                  measurements, and `predict` for thread counts this machine does not have
  fit_paper       the same model fitted to the paper's own table
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from parnn.bench.harness import timed
from parnn.engines.compiled import FLAG, barrier
from parnn.engines.persample import run_threads, sync_points_per_sample

# The paper's Table (Results section): threads -> seconds, on its machine.
PAPER_TIMES = {1: 1260.0, 4: 386.175, 7: 237.89, 10: 202.56, 14: 178.54, 28: 180.97}
PAPER_REGIONS = 9                 # parallel regions per sample in the paper (3 layers x 3 loops)
EPOCH = 60000                     # samples in a Fashion-MNIST epoch; times are also given per one
SYNC_KIND = {"neuron": ("fork/join", "forkjoin_us"), "owner": ("barriers", "barrier_us")}


# --- synchronisation alone ------------------------------------------------------------------

@njit(parallel=True, cache=True)
def empty_regions(n, nt, sink):
    """n fork/joins of nt threads doing nothing: the paper's per-loop pattern without work."""
    for r in range(n):
        for c in prange(nt):
            sink[c * 16] += 1.0
    return sink[0]


@njit(cache=True, nogil=True)
def barrier_loop(flags, tid, nt, n):
    """n of the owner engine's spin barriers with nothing between them."""
    for k in range(1, n + 1):
        barrier(flags, tid, nt, k)


def sync_costs(threads, samples, owner):
    """Per thread count: microseconds per empty prange region (9 per sample x samples, as the
    paper would fork), and per empty owner barrier; the fastest of 3 (noise only adds)."""
    import numba

    sink = np.zeros(16 * max(threads) + 16)
    out = {}
    for p in threads:
        numba.set_num_threads(p)
        n = PAPER_REGIONS * samples
        empty_regions(10, p, sink)
        fj = min(timed(empty_regions, n, p, sink) for _ in range(3)) / n
        out[p] = {"forkjoin_us": fj * 1e6}
        if owner:
            nb = 5 * samples
            flags = np.zeros(p * FLAG, np.int64)
            times = []
            for _ in range(3):
                flags[:] = 0
                times.append(timed(run_threads, p, lambda t: barrier_loop(flags, t, p, nb)))
            out[p]["barrier_us"] = min(times) / nb * 1e6
    return out


# --- where a run's time goes ------------------------------------------------------------------

def breakdown_row(name, threads, total_s, profiled, sync, n_layers, samples):
    """One row of the breakdown: the fastest unprofiled run (total), the profiled run's own time
    and its phases (seconds per run, the mean over its threads: each thread's phases add up to
    about the run's time), and what the engine's sync points cost alone (fork/joins or
    barriers, as many as it passes, each at its probed cost; this is inside the phases)."""
    seconds = np.asarray(profiled["seconds"], float).mean(axis=0)
    row = {"engine": name, "threads": threads, "total_s": total_s,
           "profiled_s": profiled["time_s"]}
    row.update({f"{phase}_s": float(s) for phase, s in zip(profiled["phases"], seconds)})
    kind, key = SYNC_KIND.get(name, ("none", None))
    points = sync_points_per_sample(name, n_layers) if key else 0
    each = sync[threads].get(key, 0.0) * 1e-6 if key else 0.0
    row.update(sync_s=points * samples * each, sync_kind=kind, sync_per_sample=points,
               sync_us_each=each * 1e6)
    return row


# --- the model time(p) = serial + compute/p + regions x cost(p) --------------------------------

def fit_model(times, cost_us, regions):
    """Fit on the measurements: cost(p) per region linear in p through the measured sync costs,
    then serial + compute/p through what remains of the measured times. All seconds.
    times: {p: s}, cost_us: {p: us}, regions: sync regions per run."""
    ps = sorted(cost_us)
    if len(ps) >= 2:
        slope, icpt = np.polyfit(ps, [cost_us[p] for p in ps], 1)
        if slope < 0:
            slope, icpt = 0.0, float(np.mean([cost_us[p] for p in ps]))
    else:
        slope, icpt = 0.0, cost_us[ps[0]]
    cost = lambda p: (icpt + slope * p) * 1e-6
    tp = sorted(times)
    rest = np.array([times[p] - regions * cost(p) for p in tp])
    fit = "amdahl: serial + compute/p, least squares"
    if len(tp) >= 2:
        (serial, compute), *_ = np.linalg.lstsq(np.array([[1.0, 1.0 / p] for p in tp]), rest,
                                                rcond=None)
    else:
        serial, compute = 0.0, rest[0] * tp[0]
    if not 0 <= serial <= rest[0]:
        # more threads made the compute SLOWER (a core busy with another process, or memory
        # bound): no Amdahl fit exists; assume perfect scaling from the fewest threads measured
        fit = f"perfect scaling from {tp[0]} thread(s): the measured times do not fit Amdahl"
        serial, compute = 0.0, rest[0] * tp[0]
    return {"serial_s": float(serial), "compute_s": float(compute), "regions": regions,
            "cost_us_intercept": float(icpt), "cost_us_per_thread": float(slope), "fit": fit}


def predict(model, p):
    overhead = model["regions"] * (model["cost_us_intercept"] + model["cost_us_per_thread"] * p) * 1e-6
    compute = model["serial_s"] + model["compute_s"] / p
    return {"threads": p, "time_s": compute + overhead, "compute_s": compute,
            "overhead_s": overhead}


def neuron_model(fastest, sync, n_layers, samples):
    """The model fitted to the neuron engine's fastest runs {p: s}, with its predictions for
    this machine's and the paper's thread counts, per 60k epoch."""
    scale = EPOCH / samples
    m = fit_model(fastest, {p: sync[p]["forkjoin_us"] for p in sync},
                  sync_points_per_sample("neuron", n_layers) * samples)
    pred = [predict(m, p) for p in sorted(set(PAPER_TIMES) | set(fastest))]
    return {"engine": "neuron", **m, "per_60k_epoch_scale": scale,
            "prediction": [{k: (v * scale if k != "threads" else v) for k, v in q.items()}
                           for q in pred]}


def fit_paper():
    """The same model fitted to the paper's own table (no serial term: 3 unknowns, 6 points):
    time(p) = compute/p + 9 x 60000 x (a + b p) us. Returns compute_s, a, b and the fit."""
    ps = sorted(PAPER_TIMES)
    R = PAPER_REGIONS * EPOCH
    A = np.array([[1.0 / p, R * 1e-6, R * 1e-6 * p] for p in ps])
    (compute, a, b), *_ = np.linalg.lstsq(A, np.array([PAPER_TIMES[p] for p in ps]), rcond=None)
    return {"compute_s": float(compute), "cost_us_intercept": float(a),
            "cost_us_per_thread": float(b), "regions": R,
            "fitted_s": {p: float(v) for p, v in zip(ps, A @ [compute, a, b])}}


def paper_implied_overhead():
    """What the paper's own table implies per region if its compute scaled perfectly:
    (T(p) - T(1)/p) / (9 x 60000), in microseconds."""
    t1 = PAPER_TIMES[1]
    return {p: (t - t1 / p) / (PAPER_REGIONS * EPOCH) * 1e6 for p, t in PAPER_TIMES.items() if p > 1}
