"""Many networks and many processes: ensemble voting, and (with mpi4py) MPI training.

mpi4py is imported only by the functions that need it, so single-process use never needs MPI.

`mpiexec -n K parnn train --distributed MODE ...` runs the same command on K ranks:

ensemble   the paper's future work. Rank r trains its own network with seed + 1000*r on its own
           shard of the training set (disjoint: one shuffle with the run's seed, cut into K
           contiguous parts; bootstrap: n/K samples drawn with replacement, one stream per rank).
           After every epoch each rank computes its output layer on the test set and rank 0
           gathers them (MPI Gather into NumPy buffers) to score the soft and hard votes; at the
           end it gathers the parameters, reports every member and the votes, and saves ONE
           ensemble file.
allreduce  synchronous data parallelism. Every rank holds the same network; each global batch of B
           samples is split into K contiguous parts, each rank computes its part's gradient scaled
           by 1/B, one Allreduce(SUM) of the flat gradient buffer gives every rank the batch's mean
           gradient, and every rank applies the same optimizer step: the compiled batch engine
           with an Allreduce as its gradient-reduce hook (parnn.engines.allreduce). Equals one
           process with batch B up to rounding; all ranks end with bitwise-identical weights
           (checked).

The modes themselves are in distributed/modes.py; every collective goes through
distributed/watchdog.py (no rank waits forever, nor spinning), and distributed/launch.py tells
from the environment whether an MPI launcher started this process.

Failures: set-up problems (bad flags, missing or different data on some rank) are collected from
all ranks, rank 0 reports them and every rank exits with status 2; a rank that failed before MPI
started (a bad flag on one rank of an MPMD launch) joins that exchange through fail_early. A
rank that fails later (an exception, divergence, Ctrl-C) prints which rank failed and why, then
calls MPI Abort, which ends every rank: a peer blocked in a collective would otherwise wait
forever. A rank that goes silent (stopped, hung) is named by the watchdog, which aborts the job.
(A rank killed by a signal is cleaned up by mpiexec itself.)
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import signal
import sys
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from parnn.errors import ConfigError, ParnnError

VOTES = ("soft", "hard")
MODES = ("ensemble", "allreduce")
SHARDS = ("disjoint", "bootstrap")
SEED_STRIDE = 1000             # ensemble member r trains with seed + SEED_STRIDE * r
_SHARD_STREAM = 7919           # the shard shuffle's own random stream, apart from init and order
FAIL_ENV = "PARNN_TEST_FAIL"   # test hook "RANK:raise", "RANK:kill" or "RANK:stop", docs/MPI.md
RANK_TIMEOUT = 60.0            # seconds a rank may be silent before the job is ended
# Set once this process enters train(): from then on its problems go through train's own
# exchange, so the CLI must not send them through fail_early too.
ENTERED = False


def combine_outputs(outputs, vote="soft"):
    """Combine the members' output layers (each (n, classes)) into one (n, classes) score.

    soft: the mean of the outputs; hard: the number of members that voted for each class
    (ties broken by the soft score, so the result is never arbitrary).
    """
    stack = np.stack(outputs)
    soft = stack.mean(axis=0)
    if vote == "soft":
        return soft
    n_classes = stack.shape[2]
    votes = np.zeros_like(soft)
    for out in stack:
        votes[np.arange(len(out)), out.argmax(axis=1)] += 1
    # the soft score is < 1 after scaling, so it only decides between equal vote counts
    span = soft.max() - soft.min() + 1.0
    return votes + (soft - soft.min()) / (span * n_classes)


# --- ensemble shards ---------------------------------------------------------------------------

def member_seed(seed, rank):
    """Rank 0 keeps the run's seed, so a 1-rank ensemble is exactly `parnn train`."""
    return seed + SEED_STRIDE * rank


def shard_indices(n, rank, size, kind="disjoint", seed=1):
    """The training-sample indices rank `rank` of `size` trains on (sorted)."""
    if kind == "disjoint":
        # The same shuffle on every rank, then contiguous parts: disjoint, covering every
        # sample, sizes differing by at most one.
        perm = np.random.default_rng([seed, _SHARD_STREAM]).permutation(n)
        return np.sort(np.array_split(perm, size)[rank])
    if kind == "bootstrap":
        rng = np.random.default_rng([seed, _SHARD_STREAM, rank])
        return np.sort(rng.integers(0, n, max(1, n // size)))
    raise ConfigError(f"unknown shards {kind!r}: choose one of {', '.join(SHARDS)}")


# --- `parnn train --distributed` ---------------------------------------------------------------

@dataclass(frozen=True)
class DistributedOptions:
    """How a distributed run spreads over the ranks, where its data comes from and where rank 0
    writes; the training settings themselves are a TrainConfig beside it."""

    mode: str                            # "ensemble" or "allreduce"
    shards: str | None = None            # ensemble: "disjoint" (None) or "bootstrap"
    dataset: str = "fashion-mnist"
    data: Path | None = None             # None: parnn.data's search
    limit_train: int | None = None
    limit_test: int | None = None
    out: Path | None = None              # None: runs/PRESET
    threads: int | None = None           # per rank; None: this node's cores shared among its ranks
    progress: bool = True
    overwrite: bool = False              # rank 0 may replace a trained model in `out`
    rank_timeout: float = RANK_TIMEOUT   # seconds of silence before a rank is given up; 0: never

    def __post_init__(self):
        t = self.rank_timeout
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ConfigError(f"--rank-timeout must be a number of seconds >= 0 (0: wait "
                              f"forever), got {t!r}")
        if self.mode not in MODES:
            raise ConfigError(f"unknown distributed mode {self.mode!r}: choose one of "
                              f"{', '.join(MODES)}")
        if self.shards is not None and self.mode != "ensemble":
            raise ConfigError("--shards only applies to --distributed ensemble (each member's "
                              "share of the training set)")
        if self.shards is not None and self.shards not in SHARDS:
            raise ConfigError(f"unknown shards {self.shards!r}: choose one of {', '.join(SHARDS)}")


def world():
    """MPI.COMM_WORLD, importing mpi4py only now."""
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError) as e:
        raise ConfigError(f"--distributed needs mpi4py and an MPI library ({e}): "
                          "pip install 'parnn[mpi]', or mpi4py built against your system MPI") from None
    return MPI.COMM_WORLD


def train(cfg, opts):
    """Train cfg (a TrainConfig) as opts (DistributedOptions) say; every rank of the MPI job
    runs this. Returns the exit status."""
    global ENTERED
    from parnn.distributed import modes
    from parnn.distributed.watchdog import Watched
    from parnn.run.outputs import out_dir

    ENTERED = True
    comm = Watched(world(), opts.rank_timeout)
    rank, size = comm.Get_rank(), comm.Get_size()
    out = out_dir(cfg, opts.out)
    with contextlib.ExitStack() as held:   # rank 0: the lock on `out`, for the whole run
        local = _start(comm)
        problem, fingerprint = None, None
        try:
            fail = _fail_hook(rank)
            cfg, ds, engine, notes = _setup(opts, cfg, out, comm, local, held)
            fingerprint = _fingerprint(opts, cfg, ds)
        except ParnnError as e:
            problem = str(e)
        except Exception as e:   # a bug; still reported through the same path, so no rank hangs
            problem = f"{type(e).__name__}: {e}"
        error = _setup_error(comm.allgather((problem, fingerprint)), size)
        if error:
            if rank == 0:
                raise ConfigError(error)
            return 2

        # flush: stdout is a pipe under mpiexec, and an Abort would lose what is still buffered
        log = functools.partial(print, flush=True) if rank == 0 else _quiet
        progress = opts.progress and rank == 0
        for note in notes:
            log(note)
        try:
            if opts.mode == "allreduce":
                return modes.train_allreduce(cfg, ds, engine, out, comm, progress, log, fail)
            return modes.train_ensemble(cfg, ds, engine, out, comm, opts.shards or "disjoint",
                                        progress, log, fail)
        except BaseException as err:
            if size == 1:
                raise
            _abort(comm, err)


def fail_early(message, rank_timeout=RANK_TIMEOUT):
    """For a rank of an MPI launch whose `parnn train` failed before distributed.train (a bad
    flag, no --distributed): take part in the set-up exchange of the ranks that started, with
    `message` as this rank's problem, so the whole job ends with one line (rank 0's) instead of
    the others waiting for this rank forever. Returns the exit status; rank 0 raises the
    ConfigError to print."""
    from parnn.distributed import launch
    from parnn.distributed.watchdog import Watched

    try:
        comm = Watched(world(), rank_timeout)
    except ConfigError:   # no mpi4py: nobody to tell, and no peer can be waiting in MPI
        where = launch.launched()
        if where is None or where[0] == 0:
            raise ConfigError(message) from None
        return 2
    _start(comm)
    error = _setup_error(comm.allgather((message, None)), comm.Get_size())
    if comm.Get_rank() == 0:
        raise ConfigError(error)
    return 2


def _start(comm):
    """The first collective of every rank (distributed.train's and fail_early's alike): the
    number of ranks on this node."""
    from mpi4py import MPI

    return comm.Split_type(MPI.COMM_TYPE_SHARED).Get_size()


def _setup(opts, cfg, out, comm, local, held):
    """This rank's config, data and engine (the one its run keeps), and notes for rank 0 to
    print; ParnnError for anything wrong, before any training. Rank 0 takes the lock on `out`
    into `held` (a contextlib.ExitStack)."""
    from parnn.data import load_dataset
    from parnn.paths import check_output_dir
    from parnn.run import outputs, rundir, session
    from parnn.run.config import batch_size_for, pick_engine, usable_cores

    rank, size = comm.Get_rank(), comm.Get_size()
    if rank == 0:   # only rank 0 writes: refuse an unusable --out before any training
        check_output_dir(out, "--out", files=outputs.FILES)
        rundir.refuse_in_use(out, "--out")
        _refuse_replacing(out, opts.overwrite)
    notes = []
    if size == 1:
        notes.append(f"parnn: --distributed {opts.mode} on 1 rank (not started by mpiexec; "
                     "use `mpiexec -n K parnn train ...` for K ranks)")
    cpus = usable_cores()
    if opts.threads and opts.threads > cpus:
        notes.append(f"warning: --threads {opts.threads} is more than the {cpus} core(s) this "
                     f"process may use: using {cpus}")
    # cfg's default "all cores" is per process: unless told, the ranks of a node share them.
    cfg = replace(cfg, threads=min(opts.threads, cpus) if opts.threads else max(1, cpus // local))
    if local * cfg.threads > cpus:
        notes.append(f"warning: {local} ranks x {cfg.threads} threads = {local * cfg.threads} "
                     f"exceeds the {cpus} cores of this machine; they will slow each other down")
    if opts.mode == "allreduce":
        if cfg.engine not in ("auto", "batch"):
            raise ConfigError(f"--distributed allreduce reduces the gradients of the batch "
                              f"engine; --engine {cfg.engine} cannot be combined with it "
                              "(use auto or batch)")
        cfg = replace(cfg, engine="batch")
    session.check_plan(cfg, opts.dataset, opts.limit_train, opts.limit_test, processes=local)
    ds = load_dataset(opts.dataset, opts.data, cfg.dtype, opts.limit_train, opts.limit_test)
    if rank == 0:
        held.enter_context(rundir.hold(out, "--out"))
        _refuse_replacing(out, opts.overwrite)   # again, under the lock
        rundir.sweep(out, outputs.FILES)
    n = len(ds.X_train)
    spec = cfg.spec(ds.n_features, ds.n_classes)
    if opts.mode == "allreduce":
        from parnn.engines.allreduce import AllreduceEngine

        bs = batch_size_for(cfg, n)
        if bs < size:
            notes.append(f"warning: batch size {bs} < {size} ranks: some ranks get no samples "
                         "and only add communication")
        engine = AllreduceEngine(comm)
        engine.check(spec, cfg.optimizer, bs)
        return cfg, ds, engine, notes
    if n < size:
        raise ConfigError(f"{n} training samples cannot be shared among {size} ranks")
    try:   # against the smallest shard (sizes differ by at most one)
        engine = pick_engine(cfg, spec, n // size)
    except ConfigError as e:
        raise ConfigError(f"{e}, the shard of each of the {size} ensemble members") from None
    return cfg, ds, engine, notes


def _refuse_replacing(out, overwrite):
    from parnn.paths import shown
    from parnn.run import rundir

    if not overwrite and rundir.existing(out, ("model.safetensors",)):
        raise ConfigError(f"--out {shown(out)} already holds a trained model "
                          "(model.safetensors): pass --overwrite to replace it and its history, "
                          "or choose another --out")


def _fingerprint(opts, cfg, ds):
    """What must be equal on every rank (threads may differ)."""
    import parnn

    settings = {k: v for k, v in cfg.to_dict().items() if k != "threads"}
    return dict(mode=opts.mode, shards=opts.shards, settings=settings,
                samples=(len(ds.X_train), len(ds.X_test)), data=ds.sha256,
                versions=(parnn.__version__, np.__version__))


def _setup_error(reports, size):
    """One message for every rank's set-up problem, or for ranks that disagree with rank 0."""
    problems = [(r, p) for r, (p, _) in enumerate(reports) if p]
    if problems:
        if size == 1:
            return problems[0][1]
        if len(problems) == size and len({p for _, p in problems}) == 1:
            return f"on all {size} ranks: {problems[0][1]}"
        return "; ".join(f"rank {r} of {size}: {p}" for r, p in problems)
    first = reports[0][1]
    for r, (_, fp) in enumerate(reports):
        diff = [k for k in first if k != "settings" and fp[k] != first[k]]
        diff += [f"{k} ({fp['settings'][k]!r} vs {first['settings'][k]!r})"
                 for k in first["settings"] if fp["settings"][k] != first["settings"][k]]
        if diff:
            return (f"rank {r} of {size} differs from rank 0 in {', '.join(diff)}: every rank "
                    "must train with the same settings, data and versions")
    return None


def _fail_hook(rank):
    """The test hook: PARNN_TEST_FAIL=R:raise (R:kill, R:stop) makes rank R raise (SIGKILL,
    SIGSTOP itself) after its first chunk of training, while the other ranks go on into their
    next collective."""
    spec = os.environ.get(FAIL_ENV)
    if not spec:
        return lambda epoch, done: None
    who, _, how = spec.partition(":")
    if not who.isdigit() or how not in ("raise", "kill", "stop"):
        raise ConfigError(f"{FAIL_ENV} must be RANK:raise, RANK:kill or RANK:stop, got {spec!r}")
    if int(who) != rank:
        return lambda epoch, done: None

    def fail(epoch, done):
        if how == "stop":   # alive but silent, as under a debugger: the watchdog's case
            os.kill(os.getpid(), signal.SIGSTOP)
            return
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise ParnnError(f"injected failure ({FAIL_ENV}={spec})")
    return fail


def _abort(comm, err):
    if isinstance(err, ParnnError):
        why = str(err)
    elif isinstance(err, KeyboardInterrupt):
        why = "interrupted"
    else:
        traceback.print_exc()   # not a user mistake: keep the traceback
        why = f"{type(err).__name__}: {err}"
    from parnn.distributed.watchdog import abort_quietly

    print(f"parnn: error: rank {comm.Get_rank()} of {comm.Get_size()} failed: {why}; "
          "stopping all ranks", file=sys.stderr, flush=True)
    abort_quietly(comm, 1)


def _quiet(*args, **kwargs):
    pass
