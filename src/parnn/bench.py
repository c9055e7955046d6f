"""`parnn bench`: engines x thread counts, timed, with the paper's numbers beside.

One process, one sitting (run it under `flock /tmp/bench.lock`: the machine is shared):

  * every engine at every thread count, --repeat times, in interleaved rounds (A B C, A B C, ...)
    so a slow minute of the machine hits every configuration alike; median, min and max. Only
    the training pass is timed, as the C reference's train_s: loading, one short warm-up per
    engine and thread count (compiles the kernels, starts the thread pools) and the test pass
    are outside the clock.
  * the machine's GEMM peak at each thread count in the workload's dtype (a 2048 x 2048 np.matmul),
    and each configuration's GFLOP/s as a fraction of it;
  * for the per-sample engines, where the time goes: forward, error and update, and the cost of
    synchronisation alone (empty prange regions for neuron, empty spin barriers for owner); a
    fitted model time(p) = serial + compute/p + regions x cost_per_region(p) then predicts the
    paper's thread counts (4 to 28), labelled as a prediction;
  * optionally PyTorch and scikit-learn on the same workload (--peers) and the C/OpenMP
    reference binaries (--c-reference DIR).

Writes OUT/bench.json (everything), OUT/bench.csv (one row per configuration),
OUT/breakdown.csv and PNG figures; prints the paper's table format per engine.
"""

from __future__ import annotations

import datetime
import fcntl
import importlib.util
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from numba import njit, prange
from numba.core.errors import NumbaError

# The breakdown kernels below call the engines' own compiled helpers, so the phases time the
# same code; they follow kernels.neuron_run and must change when it does (tests/test_bench.py).
from parnn.engines.persample import (FLAG, NONE, PerSampleEngine, barrier, blocked_transpose,
                                   combine_errors, input_forward, input_rows, layer, layer_table,
                                   out_buf, output_delta, p_buf, partial_errors, rows_forward,
                                   run_threads, span)
from parnn.errors import ConfigError

# The paper's Table (Results section): threads -> seconds, on its machine.
PAPER_TIMES = {1: 1260.0, 4: 386.175, 7: 237.89, 10: 202.56, 14: 178.54, 28: 180.97}
PAPER_REGIONS = 9                 # parallel regions per sample in the paper (3 layers x 3 loops)
EPOCH = 60000                     # samples in a Fashion-MNIST epoch; times are also given per one
PER_SAMPLE = ("serial", "neuron", "hogwild", "owner")
BATCH = ("batch", "numpy")
PEERS = ("torch", "sklearn")
WORKLOADS = {"paper": "W1", "modern": "W2"}     # workload = train.py's preset of that name
GEMM_N = 2048
PHASE_SAMPLES = 10000             # samples the breakdown kernels run on, scaled to the run
WARMUP_SAMPLES = 256


@dataclass
class Options:
    workload: str = "paper"
    engines: tuple = ()           # () = the workload's default engines
    threads: tuple = ()           # () = 1, 2, 4, ... up to all cores
    hidden: tuple | None = None
    epochs: int = 1
    limit_train: int | None = None
    repeat: int = 3
    out: Path = Path("runs/bench")
    peers: tuple = ()
    c_reference: Path | None = None
    data: str | None = None
    dataset: str = "fashion-mnist"
    seed: int = 1
    progress: bool = True
    breakdown: bool = True
    dense: bool = False           # per-sample engines skip zero inputs unless this is set
    quiet_wait: float = 0         # seconds to wait, at most, for other processes to go quiet

    def command(self):
        """The command line that reproduces these options, written out in full."""
        a = ["parnn", "bench", "--workload", self.workload, "--engines", ",".join(self.engines),
             "--threads", ",".join(map(str, self.threads)), "--epochs", str(self.epochs),
             "--repeat", str(self.repeat), "--seed", str(self.seed)]
        if self.hidden:
            a += ["--hidden", ",".join(map(str, self.hidden))]
        if self.limit_train:
            a += ["--limit-train", str(self.limit_train)]
        if self.peers:
            a += ["--peers", ",".join(self.peers)]
        if self.c_reference:
            a += ["--c-reference", str(self.c_reference)]
        if self.dataset != "fashion-mnist":
            a += ["--dataset", self.dataset]
        if self.data:
            a += ["--data", str(self.data)]
        if not self.breakdown:
            a += ["--no-breakdown"]
        if self.dense:
            a += ["--dense"]
        if self.quiet_wait:
            a += ["--quiet-wait", f"{self.quiet_wait:g}"]
        return shlex.join(a + ["--out", str(self.out)])


# --- checks, before any work ------------------------------------------------------------------

def usable_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:                        # not Linux
        return os.cpu_count() or 1


def default_threads(cores=None):
    """1, 2, 4, ... and all cores."""
    cores = cores or usable_cores()
    ps, p = [], 1
    while p < cores:
        ps.append(p)
        p *= 2
    return tuple(ps + [cores])


def prepare(opts):
    """Validate everything up front; fill in defaults. Returns (cfg, engines dict)."""
    import numba

    from parnn.engines import available, make_engine
    from parnn.run.train import make_config

    if opts.workload not in WORKLOADS:
        raise ConfigError(f"unknown workload {opts.workload!r}: choose one of {', '.join(WORKLOADS)}")
    for flag, v in (("--repeat", opts.repeat), ("--epochs", opts.epochs)):
        if v < 1:
            raise ConfigError(f"{flag} must be >= 1, got {v}")
    if opts.quiet_wait < 0:
        raise ConfigError(f"--quiet-wait must be >= 0 seconds, got {opts.quiet_wait:g}")
    if opts.limit_train is not None and opts.limit_train < 1:
        raise ConfigError(f"--limit-train must be >= 1, got {opts.limit_train}")
    opts.threads = tuple(opts.threads) or default_threads()
    if any(p < 1 for p in opts.threads):
        raise ConfigError(f"--threads must be >= 1 each, got {','.join(map(str, opts.threads))}")
    opts.threads = tuple(sorted(set(opts.threads)))
    cfg = make_config(opts.workload, hidden=opts.hidden, epochs=opts.epochs, seed=opts.seed)
    spec = cfg.spec()
    if not opts.engines:
        default = PER_SAMPLE if opts.workload == "paper" else BATCH
        opts.engines = tuple(e for e in default if e in available())
    engines = {}
    for name in opts.engines:
        eng = make_engine(name)                    # ConfigError: unknown engine
        try:
            eng.check(spec, cfg.optimizer, cfg.batch_size)
        except ConfigError as e:
            raise ConfigError(f"engine {name} cannot run the {opts.workload} workload: {e}") from None
        if hasattr(eng, "dense"):                 # the per-sample engines' zero-input skipping
            eng.dense = opts.dense
        engines[name] = eng
    pool = numba.config.NUMBA_NUM_THREADS
    if max(opts.threads) > pool and any(n != "numpy" for n in engines):
        raise ConfigError(f"--threads {max(opts.threads)} is more than Numba's pool of {pool} "
                          f"threads: run with NUMBA_NUM_THREADS={max(opts.threads)} to "
                          "oversubscribe on purpose")
    for p in opts.peers:
        if p not in PEERS:
            raise ConfigError(f"unknown peer {p!r}: choose from {', '.join(PEERS)}")
    if opts.c_reference is not None:
        c = Path(opts.c_reference)
        missing = [b for b in ("nn_serial", "nn_omp") if not os.access(c / b, os.X_OK)]
        if missing:
            raise ConfigError(f"--c-reference {c}: no executable {' or '.join(missing)} there "
                              "(build it with `make` in a copy of anchors/paper_c)")
        if opts.workload != "paper" or len(spec.sizes) != 4:
            raise ConfigError("--c-reference: the C reference only runs the paper workload with "
                              "two hidden layers")
    return cfg, engines


# --- measuring --------------------------------------------------------------------------------

def _busy_jiffies():
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v) - v[3] - v[4]               # everything but idle and iowait
    except OSError:
        return None


class Timer:
    """Wall time of a block, and how many cores OTHER processes kept busy meanwhile (from
    /proc/stat minus our own CPU time): on a shared machine a slow run should say why."""

    def __enter__(self):
        self._j, self._own = _busy_jiffies(), self._cpu()
        self._t = time.perf_counter()
        return self

    @staticmethod
    def _cpu():
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._t
        j = _busy_jiffies()
        if j is None or self._j is None or self.seconds < 0.5:   # /proc/stat counts in 10 ms
            self.others = None
        else:
            busy = (j - self._j) / os.sysconf("SC_CLK_TCK")
            self.others = round(max(0.0, busy - (self._cpu() - self._own)) / self.seconds, 2)


def wait_for_quiet(limit_s, threshold=0.25):
    """Before a timed run: wait until other processes use < threshold cores over one second, at
    most limit_s seconds. Processes outside the bench lock (tests, compiles) come and go on a
    shared machine. Returns (seconds waited, whether it became quiet)."""
    t0 = time.perf_counter()
    while True:
        with Timer() as t:
            time.sleep(1.0)
        waited = time.perf_counter() - t0
        if t.others is None or t.others < threshold:
            return round(waited, 1), True
        if waited >= limit_s:
            return round(waited, 1), False


def flops_per_sample(spec):
    """Multiply-adds x 2 of one sample's training step, the same for per-sample and mini-batch:
    forward (every weight once), errors (every weight but the input layer's), update (every
    weight once). Bias and activation work is not counted."""
    macs = [n_in * n_out for n_out, n_in in spec.shapes()]
    return 2 * (3 * sum(macs) - macs[0])


def gemm_peak(dtype, threads, n=GEMM_N, reps=3):
    """Best of `reps` n^3 matmuls in dtype, after one untimed: the machine's GEMM GFLOP/s."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    a, b = rng.random((n, n)).astype(dtype), rng.random((n, n)).astype(dtype)
    c = np.empty_like(a)
    with threadpool_limits(threads, user_api="blas"):
        np.matmul(a, b, out=c)
        best = min(_timed(np.matmul, a, b, out=c) for _ in range(reps))
    return 2 * n ** 3 / best / 1e9


def _timed(f, *args, **kw):
    t = time.perf_counter()
    f(*args, **kw)
    return time.perf_counter() - t


# --- parnn's engines ----------------------------------------------------------------------------

@dataclass
class Work:
    """What every run shares: settings, data, the epochs' sample orders."""

    cfg: object
    spec: object
    X: np.ndarray
    T: np.ndarray
    y: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    orders: list = field(default_factory=list)

    @property
    def samples(self):
        return len(self.X) * len(self.orders)      # samples trained per run


def engine_run(engine, w, threads, warm_up=False):
    """One run: a new network from the seed, every epoch in the training loop's chunks."""
    from parnn.core.model import MLP
    from parnn.core.optim import make_optimizer
    from parnn.run.train import chunk_size, lr_at, set_threads

    cfg = w.cfg
    net = MLP(w.spec, init=cfg.init, seed=cfg.seed)
    opt = make_optimizer(cfg.optimizer, w.spec.n_params, w.spec.dtype, cfg.lr, cfg.momentum)
    step = chunk_size(engine, cfg.batch_size, len(w.X))
    limits, _ = set_threads(threads, engine)
    with limits, np.errstate(all="ignore"):
        if warm_up:
            n = WARMUP_SAMPLES if cfg.batch_size == 1 else 2 * cfg.batch_size
            engine.train(net, opt, w.X, w.T, w.orders[0][:n], cfg.batch_size)
            return None
        with Timer() as t:
            for epoch, order in enumerate(w.orders, 1):
                opt.lr = lr_at(cfg, epoch)
                for start in range(0, len(order), step):
                    engine.train(net, opt, w.X, w.T, order[start:start + step],
                                       cfg.batch_size)
        acc = float(np.mean(net.predict(w.X_test) == w.y_test))
    return {"time_s": t.seconds, "others": t.others, "test_acc": acc}


# --- peers --------------------------------------------------------------------------------------

def torch_run(w, threads, warm_up=False):
    """The same network, init, sample order and optimizer in PyTorch: per-sample SGD for the
    paper workload (a Python loop of batch-1 steps, as its users would write it), Adam on
    mini-batches for the modern one. torch.set_num_threads(threads)."""
    import torch

    from parnn.core.model import MLP
    from parnn.run.train import lr_at

    cfg, spec = w.cfg, w.spec
    torch.set_num_threads(threads)
    dt = getattr(torch, spec.dtype)
    net = MLP(spec, init=cfg.init, seed=cfg.seed)
    act = {"tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid, "relu": torch.nn.ReLU}
    layers = []
    for l, (W, b) in enumerate(zip(net.W, net.b)):
        lin = torch.nn.Linear(W.shape[1], W.shape[0], dtype=dt)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(W))
            lin.bias.copy_(torch.from_numpy(b))
        layers.append(lin)
        if spec.activation(l) != "softmax":      # softmax is inside CrossEntropyLoss
            layers.append(act[spec.activation(l)]())
    model = torch.nn.Sequential(*layers)
    if cfg.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    X, T, y = torch.from_numpy(w.X), torch.from_numpy(w.T), torch.from_numpy(w.y)
    ce = torch.nn.CrossEntropyLoss()

    def loss_of(out, idx):
        if spec.loss == "mse":                   # parnn's: mean over the batch of 0.5 sum (a-t)^2
            return 0.5 * ((out - T[idx]) ** 2).sum() / out.shape[0]
        return ce(out, y[idx])

    bs = cfg.batch_size

    def batches(order):
        if bs == 1:                              # a slice is much cheaper than an index tensor
            return (slice(i, i + 1) for i in order.tolist())
        o = torch.from_numpy(order)
        return (o[s:s + bs] for s in range(0, len(order), bs))

    def steps(order):
        for idx in batches(order):
            opt.zero_grad(set_to_none=True)
            loss_of(model(X[idx]), idx).backward()
            opt.step()

    if warm_up:
        steps(w.orders[0][:64 if bs == 1 else 2 * bs])
        return None
    with Timer() as t:
        for epoch, order in enumerate(w.orders, 1):
            for g in opt.param_groups:
                g["lr"] = lr_at(cfg, epoch)
            steps(order)
    with torch.no_grad():
        pred = model(torch.from_numpy(w.X_test)).argmax(1).numpy()
    return {"time_s": t.seconds, "others": t.others, "test_acc": float(np.mean(pred == w.y_test))}


def sklearn_run(w, threads, warm_up=False):
    """MLPClassifier, configured as close as it allows: same hidden layers and activation, same
    solver (sgd without momentum at batch 1, or adam at batch 128), same lr, no L2 penalty. Its
    output layer is ALWAYS softmax with log-loss (no tanh + MSE), and it draws its own init and
    sample order. The whole fit() call is timed; BLAS threads limited to `threads`."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier
    from threadpoolctl import threadpool_limits

    cfg, spec = w.cfg, w.spec
    act = {"tanh": "tanh", "relu": "relu", "sigmoid": "logistic"}[spec.hidden]
    kw = dict(solver="sgd", momentum=0.0, nesterovs_momentum=False) if cfg.optimizer == "sgd" \
        else dict(solver="adam")
    clf = MLPClassifier(hidden_layer_sizes=spec.sizes[1:-1], activation=act, alpha=0.0,
                        batch_size=cfg.batch_size, learning_rate_init=cfg.lr,
                        max_iter=1 if warm_up else cfg.epochs, shuffle=True,
                        random_state=cfg.seed, tol=0.0, n_iter_no_change=cfg.epochs + 1, **kw)
    X, y = (w.X[:WARMUP_SAMPLES], w.y[:WARMUP_SAMPLES]) if warm_up else (w.X, w.y)
    with threadpool_limits(threads, user_api="blas"), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        with Timer() as t:
            clf.fit(X, y)
    if warm_up:
        return None
    return {"time_s": t.seconds, "others": t.others,
            "test_acc": float(clf.score(w.X_test, w.y_test)), "dtype": str(clf.coefs_[0].dtype)}


PEER_RUNS = {"torch": torch_run, "sklearn": sklearn_run}


# --- the C reference --------------------------------------------------------------------------

def c_run(cdir, binary, threads, w, data_dir, warm_up=False):
    """One run of the C reference; its own `RESULT ... train_s=...` line is the time. (No
    warm-up: it has nothing to compile and times itself after loading.)"""
    if warm_up:
        return None
    h1, h2 = w.spec.sizes[1:3]
    cmd = [str(Path(cdir) / binary), "-h1", str(h1), "-h2", str(h2), "-e", str(len(w.orders)),
           "-lr", str(w.cfg.lr), "-seed", str(w.cfg.seed)]
    if binary == "nn_omp":
        cmd += ["-t", str(threads)]
    if data_dir:
        cmd += ["-data", str(data_dir)]
    with Timer() as t:
        p = subprocess.run(cmd, capture_output=True, text=True)
    kv = parse_result(p.stdout)
    if p.returncode or "train_s" not in kv:
        last = (p.stderr.strip().splitlines() or ["no RESULT line"])[-1]
        return {"error": f"{shlex.join(cmd)}: exit {p.returncode}: {last}"}
    return {"time_s": float(kv["train_s"]), "others": t.others,
            "test_acc": float(kv.get("test_acc", "nan")), "param_sum": kv.get("param_sum"),
            "cmd": shlex.join([binary] + cmd[1:])}


def parse_result(stdout):
    """key=value pairs of the last `RESULT ...` line."""
    lines = [l for l in stdout.splitlines() if l.startswith("RESULT")]
    return dict(x.split("=", 1) for x in lines[-1].split()[1:] if "=" in x) if lines else {}


def c_forkjoin_us(cdir, threads, samples):
    """libgomp's cost of one empty `parallel for` (the C reference's `forkjoin`), if built."""
    exe = Path(cdir) / "forkjoin"
    if not os.access(exe, os.X_OK):
        return None
    p = subprocess.run([str(exe), str(samples)], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    kv = parse_result(p.stdout)
    return float(kv["per_region_us"]) if "per_region_us" in kv else None


# --- where the time goes: synchronisation alone, and the phases -------------------------------

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


@njit(parallel=True, cache=True)
def phase_kernel(params, WTb, lay, X, T, order, tiny, hid, out, loss_code, A, D, P, rows,
                 dense, nt, errors):
    """The neuron engine's forward loops, and with errors=True also its output delta and error
    loops: the same prange regions over the same neuron slices (kernels.neuron_run), no update.
    time(update) = time(engine) - time(forward + error)."""
    L = lay.shape[0]
    first = L - L
    b0 = layer(params, lay, first)[1]
    for s in range(order.shape[0]):
        i = order[s]
        x = X[i]
        a1 = out_buf(A, lay, first)
        code0 = hid if L > 1 else NONE
        nr = input_rows(x, x, dense, rows)
        for c in prange(nt):
            lo, hi, _, _ = span(c, nt, lay[first, 3])
            input_forward(WTb[c], b0[lo:hi], x, a1[lo:hi], code0, rows, nr)
        for l in range(1, L):
            W, b = layer(params, lay, l)
            a_in, a_out = out_buf(A, lay, l - 1), out_buf(A, lay, l)
            code = hid if l < L - 1 else NONE
            for c in prange(nt):
                lo, hi, _, _ = span(c, nt, lay[l, 3])
                rows_forward(W, b, a_in, a_out, lo, hi, code)
        if errors:
            zL = out_buf(A, lay, L - 1)
            output_delta(zL, T[i], out, loss_code, tiny, zL, out_buf(D, lay, L - 1))
            for l in range(L - 1, 0, -1):
                W = layer(params, lay, l)[0]
                Pl, d, a_in = p_buf(P, lay, l), out_buf(D, lay, l), out_buf(A, lay, l - 1)
                d_in = out_buf(D, lay, l - 1)
                for c in prange(nt):
                    lo, hi, _, _ = span(c, nt, lay[l, 2])
                    partial_errors(W, d, Pl, lo, hi)
                    combine_errors(Pl, a_in, hid, d_in, lo, hi)
    return 0


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
        fj = min(_timed(empty_regions, n, p, sink) for _ in range(3)) / n
        out[p] = {"forkjoin_us": fj * 1e6}
        if owner:
            nb = 5 * samples
            flags = np.zeros(p * FLAG, np.int64)
            times = []
            for _ in range(3):
                flags[:] = 0
                times.append(_timed(run_threads, p, lambda t: barrier_loop(flags, t, p, nb)))
            out[p]["barrier_us"] = min(times) / nb * 1e6
    return out


def phase_times(w, threads, samples, reps=5, dense=False):
    """Per thread count: seconds of forward, and of forward + error, over `samples` samples.
    The error phase is small next to the forward one, so both are the fastest of `reps`
    interleaved runs (noise from other processes only ever adds time)."""
    import numba

    from parnn.engines.persample import ACT_CODES, LOSS_CODES
    from parnn.core.model import MLP

    spec = w.spec
    dt = np.dtype(spec.dtype)
    net = MLP(spec, init=w.cfg.init, seed=w.cfg.seed)
    lay, na, npart = layer_table(spec)
    A, D, _, P = PerSampleEngine.buffers(lay, dt, na, npart)
    rows = np.empty(spec.sizes[0], np.int64)
    order = w.orders[0][:samples]
    codes = (dt.type(np.finfo(dt).tiny), ACT_CODES[spec.hidden], ACT_CODES[spec.output],
             LOSS_CODES[spec.loss], A, D, P, rows, dense)
    out = {}
    for p in threads:
        numba.set_num_threads(p)
        args = (net.params, blocked_transpose(net.W[0], p), lay, w.X, w.T)   # as the engine cuts W0
        phase_kernel(*args, order[:2], *codes, p, True)          # compile / warm up
        t = {False: [], True: []}
        for _ in range(reps):
            for errors in (False, True):
                t[errors].append(_timed(phase_kernel, *args, order, *codes, p, errors))
        out[p] = {"forward_s": min(t[False]), "forward_error_s": min(t[True])}
    return out


def breakdown_rows(w, fastest, sync, phases, scale):
    """forward, error, update, sync seconds per per-sample engine and thread count, summing to
    the fastest measured run. Phases come from the phase kernel minus its own regions' cost."""
    L = w.spec.n_layers
    n = w.samples
    rows = []
    for (name, p), total in fastest.items():            # in the results' order
        if name not in ("serial", "neuron", "owner") or p not in phases:
            continue
        fj = sync[p]["forkjoin_us"] * 1e-6
        fwd = phases[p]["forward_s"] * scale - L * n * fj
        err = (phases[p]["forward_error_s"] - phases[p]["forward_s"]) * scale - (L - 1) * n * fj
        if name == "neuron":
            regions, what, cost = 3 * L - 1, "fork/join", fj
        elif name == "owner":
            regions, what, cost = 2 * L - 1, "barriers", sync[p].get("barrier_us", 0.0) * 1e-6
        else:
            regions, what, cost = 0, "none", 0.0
        s = regions * n * cost
        rows.append({"engine": name, "threads": p, "total_s": total, "forward_s": fwd,
                     "error_s": err, "update_s": total - fwd - err - s, "sync_s": s,
                     "sync_kind": what, "sync_per_sample": regions,
                     "sync_us_each": cost * 1e6})
    return rows


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


# --- machine ------------------------------------------------------------------------------------

def bench_lock_free():
    """True if nobody holds /tmp/bench.lock, i.e. we are NOT running under `flock` it."""
    try:
        with open("/tmp/bench.lock", "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            fcntl.flock(f, fcntl.LOCK_UN)
            return True
    except OSError:
        return None


def _cpu():
    """Model name, family/model numbers, the vector ISA and cache sizes: a VM may call the CPU
    just "AMD EPYC", and the caches explain where per-sample weights live."""
    info = {"cpu": platform.processor() or platform.machine()}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read().split("\n\n")[0]
    except OSError:
        return info
    field = lambda k: (re.search(rf"^{k}\s*:\s*(.*)$", text, re.M) or [None, None])[1]
    flags = set((field("flags") or "").split())
    info.update(cpu=field("model name") or info["cpu"], cpu_family=field("cpu family"),
                cpu_model=field("model"),
                isa=[f for f in ("avx2", "fma", "avx512f", "avx512_bf16") if f in flags])
    caches = {}
    for d in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level, kind = (d / "level").read_text().strip(), (d / "type").read_text().strip()
            caches[f"L{level}{'d' if kind == 'Data' else 'i' if kind == 'Instruction' else ''}"] = \
                (d / "size").read_text().strip()
        except OSError:
            pass
    info["caches_cpu0"] = caches
    return info


def blas_info():
    from threadpoolctl import threadpool_info
    return [{"internal_api": d.get("internal_api"), "version": d.get("version"),
             "kernel": d.get("architecture"), "threading_layer": d.get("threading_layer"),
             "library": os.path.basename(d.get("filepath", ""))}
            for d in threadpool_info() if d.get("user_api") == "blas"]


def machine_facts():
    import numba
    try:
        layer_ = numba.threading_layer()
    except ValueError:                            # no parallel region has run in this process
        layer_ = None
    versions = {}
    for mod in ("torch", "sklearn"):
        if mod in sys.modules:
            versions[mod] = sys.modules[mod].__version__
    return {**_cpu(), "cores": os.cpu_count(), "usable_cores": usable_cores(),
            "blas": blas_info(), "numba": numba.__version__, "numba_threading_layer": layer_,
            "numba_num_threads": numba.config.NUMBA_NUM_THREADS, "numpy": np.__version__,
            "python": platform.python_version(), "platform": platform.platform(), **versions,
            "env": {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
                                                   "OMP_NUM_THREADS", "NUMBA_NUM_THREADS",
                                                   "OMP_WAIT_POLICY", "NUMBA_THREADING_LAYER")},
            "loadavg": os.getloadavg()}


def code_version():
    """Which code was measured: the git commit (and whether src/ had uncommitted changes) and a
    short sha256 of each engine's source and of this file: engines change between runs."""
    import hashlib

    here = Path(__file__).resolve().parent
    files = sorted((here / "engines").glob("*.py")) + [Path(__file__).resolve()]
    out = {"sha256": {str(f.relative_to(here.parent)): hashlib.sha256(f.read_bytes()).hexdigest()[:12]
                      for f in files}}
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=here, capture_output=True, text=True,
                                        timeout=10).stdout.strip()
        out["git_commit"] = git("rev-parse", "--short", "HEAD") or None
        out["src_modified"] = bool(git("status", "--porcelain", "--", str(here)))
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def _now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


# --- the run ------------------------------------------------------------------------------------

def run(opts, log=print):
    """Validate, measure, summarise, print, write. Returns the results dict."""
    from tqdm import tqdm

    from parnn.data import load_dataset, one_hot

    cfg, engines = prepare(opts)
    spec = cfg.spec()
    res = {"command": opts.command(), "started_utc": _now(), "workload": workload_info(opts, cfg),
           "code": code_version(), "notes": []}

    def note(text):
        res["notes"].append(text)
        log(f"note: {text}")

    if bench_lock_free():
        note("/tmp/bench.lock was free: not run under `flock /tmp/bench.lock`, other "
             "benchmarks may have run at the same time")
    for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        if os.environ.get(k):
            note(f"{k}={os.environ[k]} is set: the BLAS kernel may not be the one for this CPU")
    log("BLAS: " + "; ".join(f"{b['internal_api']} {b['version']} kernel {b['kernel']}"
                              for b in blas_info()))
    peers = []
    for p in opts.peers:
        if importlib.util.find_spec(p) is None:
            note(f"peer {p} is not installed (pip install 'parnn[peers]'): skipped")
        else:
            peers.append(p)

    ds = load_dataset(opts.dataset, opts.data, spec.dtype, opts.limit_train)
    rng = np.random.default_rng(cfg.seed + 1)     # the training loop's order stream
    w = Work(cfg, spec, ds.X_train, one_hot(ds.y_train, spec.sizes[-1], spec.dtype),
             ds.y_train, ds.X_test, ds.y_test, [rng.permutation(len(ds.X_train))
                                               for _ in range(cfg.epochs)])
    res["workload"].update(samples=len(w.X), data=str(ds.source), test_samples=len(w.y_test))
    scale60k = EPOCH / w.samples
    if w.samples != EPOCH:
        note(f"each run trains {len(w.X)} samples x {cfg.epochs} epoch(s); 'epoch_60k_s' scales "
             f"its time by {scale60k:.3g} to one epoch of {EPOCH} samples")

    # what runs: (kind, name, threads) -> a callable taking warm_up= and returning a dict
    configs = {}
    for name, eng in engines.items():
        for p in ((1,) if name == "serial" else opts.threads):    # serial never starts threads
            configs[("engine", name, p)] = partial(engine_run, eng, w, p)
    for peer in peers:
        for p in opts.threads:
            configs[("peer", peer, p)] = partial(PEER_RUNS[peer], w, p)
    if opts.c_reference:
        # the C reads the gzipped IDX files of a directory; else it uses its own default one
        c_data = ds.source if (Path(ds.source) / "train-images-idx3-ubyte.gz").exists() else None
        for b, p in [("nn_serial", 1)] + [("nn_omp", p) for p in opts.threads]:
            configs[("c-reference", b, p)] = partial(c_run, opts.c_reference, b, p, w, c_data)
        if w.samples != EPOCH:
            note("the C reference always trains all 60000 samples per epoch (no --limit-train)")
    all_threads = sorted({p for _, _, p in configs})
    do_breakdown = opts.breakdown and any(n in engines for n in ("serial", "neuron", "owner"))
    sync_threads = sorted(set(opts.threads) | ({1} if "serial" in engines else set()))

    steps = len(all_threads) + len(configs) * (1 + opts.repeat) + (2 * len(sync_threads)
                                                                     if do_breakdown else 0)
    bar = tqdm(total=steps, desc="bench", unit="step", file=sys.stderr, disable=not opts.progress,
               dynamic_ncols=True)
    try:
        res["gemm_peak_gflops"], res["gemm_peak_others"] = {}, {}
        for p in all_threads:
            if opts.quiet_wait:
                bar.set_postfix_str("waiting for other processes to go quiet")
                wait_for_quiet(opts.quiet_wait)
            bar.set_postfix_str(f"GEMM peak, {p} thread(s)")
            with Timer() as t:
                res["gemm_peak_gflops"][p] = gemm_peak(spec.dtype, p)
            res["gemm_peak_others"][p] = t.others
            bar.update()
        for key, f in configs.items():               # compile, start pools: not timed
            bar.set_postfix_str(f"warm-up {key[1]} {key[2]}t")
            f(warm_up=True)
            bar.update()
        runs = []
        for r in range(opts.repeat):                  # interleaved rounds
            for key, f in configs.items():
                quiet = {}
                if opts.quiet_wait:
                    bar.set_postfix_str("waiting for other processes to go quiet")
                    waited, ok = wait_for_quiet(opts.quiet_wait)
                    quiet = {"quiet_wait_s": waited, "quiet": ok}
                bar.set_postfix_str(f"round {r + 1}/{opts.repeat}: {key[1]} {key[2]}t")
                out = f()
                runs.append({"kind": key[0], "name": key[1], "threads": key[2], "round": r + 1,
                             **quiet, **out})
                bar.update()
        res["runs"] = runs
        noisy = sum(1 for r in runs if r.get("quiet") is False)
        if noisy:
            note(f"{noisy} run(s) started while other processes were still busy after waiting "
                 f"{opts.quiet_wait:g} s (see 'others')")
        failed = {r["error"] for r in runs if "error" in r}
        for e in sorted(failed):
            note(f"C reference failed: {e}")
        rows = summarize(runs, w, res["gemm_peak_gflops"], scale60k)
        res["results"] = rows
        if do_breakdown:
            res.update(where_time_goes(w, rows, engines, sync_threads, opts.c_reference, bar,
                                       note))
    finally:
        bar.close()
    res["paper"] = {"times_s": PAPER_TIMES, "regions_per_sample": PAPER_REGIONS,
                    "implied_overhead_us_per_region": paper_implied_overhead(),
                    "model_fit": fit_paper()}
    res["engine_info"] = {n: e.info() if hasattr(e, "info") else {} for n, e in engines.items()}
    res["machine"] = machine_facts()
    res["finished_utc"] = _now()
    log(report(res))
    paths = write_results(res, Path(opts.out))
    log("wrote " + ", ".join(str(p) for p in paths))
    return res


def where_time_goes(w, rows, engines, threads, c_reference, bar, note):
    """sync costs, the phase breakdown and the model, as entries of the results dict."""
    out = {}
    samples = min(len(w.X), PHASE_SAMPLES)
    bar.set_postfix_str("fork/join and barrier costs")
    out["sync"] = sync = sync_costs(threads, samples, "owner" in engines)
    if c_reference:
        out["c_forkjoin_us"] = {p: c_forkjoin_us(c_reference, p, samples) for p in threads}
    bar.update(len(threads))
    # the breakdown and the model take each configuration's FASTEST run: the least disturbed
    # one on a shared machine (other processes only ever add time)
    fastest = {(r["name"], r["threads"]): r["time_min_s"] for r in rows if r["kind"] == "engine"}
    bar.set_postfix_str("phase kernels")
    try:
        phases = phase_times(w, threads, samples)
        out["phases"] = {"samples": samples, "by_threads": phases}
        out["breakdown"] = breakdown_rows(w, fastest, sync, phases, w.samples / samples)
    except NumbaError as e:                       # kernels.py changed under the phase kernel
        note("no forward/error/update breakdown: the phase kernel no longer matches "
             f"kernels.py ({' '.join(str(e).split())[:200]})")
    bar.update(len(threads))
    neuron = {p: t for (n, p), t in fastest.items() if n == "neuron"}
    if neuron:
        scale = EPOCH / w.samples
        m = fit_model(neuron, {p: sync[p]["forkjoin_us"] for p in sync},
                      (3 * w.spec.n_layers - 1) * w.samples)
        out["model"] = {"engine": "neuron", **m, "per_60k_epoch_scale": scale,
                        "prediction": [scale_pred(predict(m, p), scale)
                                       for p in sorted(set(PAPER_TIMES) | set(neuron))]}
    return out


def workload_info(opts, cfg):
    spec = cfg.spec()
    return {"name": opts.workload, "id": WORKLOADS[opts.workload], "sizes": list(spec.sizes),
            "hidden": spec.hidden, "output": spec.output, "loss": spec.loss, "dtype": spec.dtype,
            "optimizer": cfg.optimizer, "lr": cfg.lr, "lr_schedule": cfg.lr_schedule,
            "batch_size": cfg.batch_size, "init": cfg.init, "epochs": cfg.epochs, "seed": cfg.seed,
            "flops_per_sample": flops_per_sample(spec), "dense": opts.dense}


def scale_pred(pred, scale):
    return {k: (v * scale if k != "threads" else v) for k, v in pred.items()}


def summarize(runs, w, peak, scale60k):
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
        rows.append({"workload": WORKLOADS[w.cfg.preset], "kind": kind, "name": name, "threads": p,
                     "oversubscribed": p > cores, "repeats": len(ts), "samples": samples,
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
BREAKDOWN_COLUMNS = ("engine", "threads", "total_s", "forward_s", "error_s", "update_s", "sync_s",
                     "sync_kind", "sync_per_sample", "sync_us_each")


def _f(v, fmt):
    return "-" if v is None else format(v, fmt)


def report(res):
    """Plain-text tables: the paper's format per engine, then C, peers, breakdown, model."""
    wl, m = res["workload"], res["machine"]
    rows = res["results"]
    scaled = any(r["samples"] != EPOCH for r in rows if r["kind"] != "c-reference")
    out = [f"\n{wl['id']} {wl['name']}: {'-'.join(map(str, wl['sizes']))} {wl['hidden']}/"
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
        out += ["", f"Where the time goes (s per run; total = the fastest run; phases timed on "
                f"{res['phases']['samples']} samples and scaled; update = total - the rest)",
                "engine  threads |  total | forward |  error | update |   sync (kind, us each)"]
        for b in res["breakdown"]:
            out.append(f"{b['engine']:<7} {b['threads']:>7} | {b['total_s']:6.3f} | "
                       f"{b['forward_s']:7.3f} | {b['error_s']:6.3f} | {b['update_s']:6.3f} | "
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
    from parnn.io import atomic_write_csv, atomic_write_json

    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "bench.json", out / "bench.csv"]
    atomic_write_json(paths[0], res)
    atomic_write_csv(paths[1], [{k: r.get(k) for k in CSV_COLUMNS} for r in res["results"]],
                     CSV_COLUMNS)
    if res.get("breakdown"):
        paths.append(out / "breakdown.csv")
        atomic_write_csv(paths[-1], res["breakdown"], BREAKDOWN_COLUMNS)
    wl = res["workload"]
    title = (f"{wl['id']} {wl['name']}: {'-'.join(map(str, wl['sizes']))}, {wl['dtype']} — "
             f"{res['machine']['cpu']}, {res['machine']['usable_cores']} cores, "
             f"{res['started_utc'][:10]}")
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
        plots.plot_bench_breakdown(res["breakdown"], paths[-1], title)
    if res.get("model"):
        paths.append(out / "model.png")
        measured = [(r["threads"], r["time_min_s"] * EPOCH / r["samples"]) for r in res["results"]
                    if r["kind"] == "engine" and r["name"] == "neuron"]     # what the model fits
        plots.plot_bench_model(res["model"]["prediction"], measured, PAPER_TIMES, paths[-1],
                               title, res["paper"]["model_fit"]["fitted_s"])
    return paths


def main(args):
    """Entry point from the CLI (args: its argparse namespace)."""
    opts = Options(workload=args.workload, engines=tuple(args.engines or ()),
                   threads=tuple(args.threads or ()), hidden=args.hidden, epochs=args.epochs,
                   limit_train=args.limit_train, repeat=args.repeat, out=args.out,
                   peers=tuple(args.peers or ()), c_reference=args.c_reference, data=args.data,
                   dataset=args.dataset, seed=args.seed, progress=not args.no_progress,
                   breakdown=not args.no_breakdown, dense=args.dense,
                   quiet_wait=args.quiet_wait)
    run(opts)
