"""The measuring harness every benchmark shares (`parnn bench` and the scripts in benchmarks/).

  Timer            wall time of a block, and the CPU other processes used meanwhile
  wait_for_quiet   before a timed run, wait for other processes to go quiet
  two_core_probe   do the two cores we got share one core's caches right now?
  gemm_peak        the machine's GEMM GFLOP/s at a thread count and dtype
  bench_lock_free  are we (not) running under `flock /tmp/bench.lock`?
  machine_facts    CPU, caches, BLAS, Numba, versions, environment, load
  code_version     which code was measured (git commit, sha256 of the engine sources)
  the C reference  build it from its sources, run a binary, read its RESULT line
"""

from __future__ import annotations

import datetime
import fcntl
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

GEMM_N = 2048
LOCK = "/tmp/bench.lock"


# --- threads ------------------------------------------------------------------------------------

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


# --- timing -------------------------------------------------------------------------------------

def _busy_jiffies():
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v) - v[3] - v[4]               # everything but idle and iowait
    except OSError:
        return None


def _own_cpu_seconds():
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class Timer:
    """Wall time of a block, and how many cores OTHER processes kept busy meanwhile (from
    /proc/stat minus our own CPU time): on a shared machine a slow run should say why."""

    def __enter__(self):
        self._j, self._own = _busy_jiffies(), _own_cpu_seconds()
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._t
        j = _busy_jiffies()
        if j is None or self._j is None or self.seconds < 0.5:   # /proc/stat counts in 10 ms
            self.others = None
        else:
            busy = (j - self._j) / os.sysconf("SC_CLK_TCK")
            self.others = round(max(0.0, busy - (_own_cpu_seconds() - self._own)) / self.seconds,
                                2)


def timed(f, *args, **kw):
    """Seconds of one call f(*args, **kw)."""
    t = time.perf_counter()
    f(*args, **kw)
    return time.perf_counter() - t


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


def _stream(a, reps, out, i):
    s = 0.0
    for _ in range(reps):
        for k in range(a.shape[0]):
            s += a[k]
    out[i] = s


_stream_compiled = None


def two_core_probe(kb=640, reps=300):
    """Seconds(two threads each streaming its own kb KB at once) / seconds(one alone), median
    of 3. ~1.0: two cores with private L2s (what the owner engine is built for); ~2: the two
    vCPUs share a core or its L2 (SMT siblings on the host, or a noisy neighbour) right now."""
    global _stream_compiled
    import threading

    from numba import njit

    time.sleep(0.3)       # let idle BLAS / OpenMP worker threads stop spinning first
    if _stream_compiled is None:
        _stream_compiled = njit(nogil=True, fastmath=True)(_stream)
    run = _stream_compiled
    a, b, out = np.ones(kb * 128), np.ones(kb * 128), np.zeros(2)
    run(a, 2, out, 0)
    run(b, 2, out, 1)
    ratios = []
    for _ in range(3):
        solo = timed(run, a, reps, out, 0)
        th = threading.Thread(target=run, args=(b, reps, out, 1))
        t = time.perf_counter()
        th.start()
        run(a, reps, out, 0)
        th.join()
        ratios.append((time.perf_counter() - t) / solo)
    return float(np.median(ratios))


def flops_per_sample(spec):
    """Multiply-adds x 2 of one sample's training step, the same for per-sample and mini-batch:
    forward (every weight once), errors (every weight but the input layer's), update (every
    weight once). Bias and activation work is not counted. A conv layer's weights are used at
    every output pixel: its multiply-adds are H_out W_out x its weights; pooling adds none."""
    if spec.arch:
        macs = [math.prod(layer.out_shape[:-1]) * math.prod(layer.shapes[0])
                for layer in spec.layers(compiled=False) if layer.shapes]
    else:
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
        best = min(timed(np.matmul, a, b, out=c) for _ in range(reps))
    return 2 * n ** 3 / best / 1e9


# --- the machine --------------------------------------------------------------------------------

def bench_lock_free():
    """True if nobody holds /tmp/bench.lock, i.e. we are NOT running under `flock` it."""
    try:
        with open(LOCK, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            fcntl.flock(f, fcntl.LOCK_UN)
            return True
    except OSError:
        return None


def cpu_facts():
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
    return {**cpu_facts(), "cores": os.cpu_count(), "usable_cores": usable_cores(),
            "blas": blas_info(), "numba": numba.__version__, "numba_threading_layer": layer_,
            "numba_num_threads": numba.config.NUMBA_NUM_THREADS, "numpy": np.__version__,
            "python": platform.python_version(), "platform": platform.platform(), **versions,
            "env": {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
                                                   "OMP_NUM_THREADS", "NUMBA_NUM_THREADS",
                                                   "OMP_WAIT_POLICY", "NUMBA_THREADING_LAYER")},
            "loadavg": os.getloadavg()}


def code_version():
    """Which code was measured: the git commit (and whether src/ had uncommitted changes) and a
    short sha256 of each engine's source and of the bench's: engines change between runs."""
    import hashlib

    pkg = Path(__file__).resolve().parents[1]                  # src/parnn
    files = sorted((pkg / "engines").glob("*.py")) + sorted((pkg / "bench").glob("*.py"))
    out = {"sha256": {str(f.relative_to(pkg.parent)): hashlib.sha256(f.read_bytes()).hexdigest()[:12]
                      for f in files}}
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=pkg, capture_output=True, text=True,
                                        timeout=10).stdout.strip()
        out["git_commit"] = git("rev-parse", "--short", "HEAD") or None
        out["src_modified"] = bool(git("status", "--porcelain", "--", str(pkg)))
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def now_utc():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


# --- the C reference (anchors/paper_c: nn.c as nn_serial and nn_omp, forkjoin.c) ----------------

C_BINARIES = ("nn_serial", "nn_omp")


def build_c_reference(sources, workdir):
    """`make` and `make extras` in a copy of the C reference's sources (nothing is written
    where they are). Returns the directory holding the binaries."""
    build = Path(workdir) / "paper_c"
    shutil.copytree(sources, build, ignore=shutil.ignore_patterns(
        "logs", "nn_omp", "nn_serial", "*_fm", "forkjoin"))
    for target in ("all", "extras"):
        subprocess.run(["make", "-s", target], cwd=build, check=True, capture_output=True)
    return build


def c_reference_command(cdir, binary, threads, hidden, epochs, lr=None, seed=None, data=None):
    """The argv of one C reference run: nn_serial / nn_omp (and their _fm builds) take the two
    hidden sizes, epochs, and optionally lr, seed and the data directory; nn_omp* a thread count."""
    h1, h2 = hidden
    cmd = [str(Path(cdir) / binary), "-h1", str(h1), "-h2", str(h2), "-e", str(epochs)]
    if lr is not None:
        cmd += ["-lr", str(lr)]
    if seed is not None:
        cmd += ["-seed", str(seed)]
    if binary.startswith("nn_omp"):
        cmd += ["-t", str(threads)]
    if data:
        cmd += ["-data", str(data)]
    return cmd


def run_c_reference(cmd):
    """Run one C reference command; its own `RESULT ... train_s=...` line is the time (it times
    itself after loading). Returns time_s, others, test_acc, param_sum, cmd; or error."""
    with Timer() as t:
        p = subprocess.run(cmd, capture_output=True, text=True)
    kv = parse_result(p.stdout)
    if p.returncode or "train_s" not in kv:
        last = (p.stderr.strip().splitlines() or ["no RESULT line"])[-1]
        return {"error": f"{shlex.join(cmd)}: exit {p.returncode}: {last}"}
    return {"time_s": float(kv["train_s"]), "others": t.others,
            "test_acc": float(kv.get("test_acc", "nan")), "param_sum": kv.get("param_sum"),
            "cmd": shlex.join([Path(cmd[0]).name] + cmd[1:])}


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
