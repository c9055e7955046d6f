"""Many networks and many processes: ensemble voting, and (with mpi4py) MPI training.

mpi4py is imported only by the functions that need it, so single-process use never needs MPI.

`mpiexec -n K parnn train --distributed MODE ...` runs the same command on K ranks:

ensemble   the paper's future work. Rank r trains member r of `parnn train --members K`
           (parnn.run.members: seed + r and --member-recipe's settings for member r, the
           validation split held out once, from the run's seed) on its own shard of the other
           training rows (disjoint: one shuffle with the run's seed, cut into K contiguous
           parts; bootstrap: n/K rows drawn with replacement, one stream per rank; all: every
           row, so that the job trains exactly the members of `parnn train --members K`, side
           by side).
           After every epoch each rank computes its output layer on the validation and test sets
           and rank 0 gathers them (MPI Gather into NumPy buffers) to score the soft and hard
           votes; at the end it gathers the parameters, reports every member and the votes, and
           saves ONE ensemble file.
allreduce  synchronous data parallelism. Every rank holds the same network; each global batch of B
           samples is split into K contiguous parts, each rank computes its part's gradient scaled
           by 1/B, the ranks sum the flat gradient (layer by layer as backward produces it) and
           every rank applies the same optimizer step: the compiled batch engine with the sum as
           its gradient-reduce hook (parnn.engines.allreduce). Equals one process with batch B up
           to rounding; all ranks end with bitwise-identical weights (checked).
average    local SGD: the same parts of the same batches, but each rank steps on its own part's
           mean gradient; every --average-every steps and after every epoch one Allreduce
           averages the parameters (optimizer state stays each rank's own).

The modes themselves are in distributed/modes.py; checkpoints (rank 0 writes, one file for every
member) and resume in distributed/checkpoints.py; every collective goes through
distributed/watchdog.py (no rank waits forever, nor spinning), and distributed/launch.py tells
from the environment whether an MPI launcher started this process.

Failures: set-up problems (bad flags, missing or different data on some rank) are collected from
all ranks, rank 0 reports them and every rank exits with status 2; a rank that failed before MPI
started (a bad flag on one rank of an MPMD launch) joins that exchange through fail_early. A
rank that fails later (an exception, divergence, a second Ctrl-C: the first checkpoints and
stops every rank, distributed/checkpoints.py) prints which rank failed and why, then
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
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from parnn.core.model import soft_vote
from parnn.errors import ConfigError, ParnnError

VOTES = ("soft", "hard")
MODES = ("ensemble", "allreduce", "average")
SHARDS = ("disjoint", "bootstrap", "all")
_SHARD_STREAM = 7919           # the shard shuffle's own random stream, apart from init and order
FAIL_ENV = "PARNN_TEST_FAIL"   # test hook "RANK:raise", "RANK:kill" or "RANK:stop", docs/MPI.md
RANK_TIMEOUT = 60.0            # seconds a rank may be silent before the job is ended
AVERAGE_EVERY = 8              # --distributed average: optimizer steps between two averages
# An ensemble checkpoint's record says which members it trains: 2 = those of `parnn train
# --members K` (seed + r, each its own augmentation and dropout draws, one validation split);
# absent = before (seed + 1000 r, every rank drawing from the run's seed, no split).
MEMBERS_SCHEME = 2
# Set once this process enters train(): from then on its problems go through train's own
# exchange, so the CLI must not send them through fail_early too.
ENTERED = False


def combine_outputs(outputs, vote="soft"):
    """Combine the members' output layers (each (n, classes)) into one (n, classes) score.

    soft: the mean of the outputs (parnn.core.model.soft_vote); hard: the number of members
    that voted for each class (ties broken by the soft score, so the result is never arbitrary).
    """
    soft = soft_vote(outputs)
    if vote == "soft":
        return soft
    stack = np.stack(outputs)
    n_classes = stack.shape[2]
    votes = np.zeros_like(soft)
    for out in stack:
        votes[np.arange(len(out)), out.argmax(axis=1)] += 1
    # the soft score is < 1 after scaling, so it only decides between equal vote counts
    span = soft.max() - soft.min() + 1.0
    return votes + (soft - soft.min()) / (span * n_classes)


# --- ensemble shards ---------------------------------------------------------------------------

def shard_indices(n, rank, size, kind="disjoint", seed=1):
    """The positions, among n training rows, of the rows rank `rank` of `size` trains on
    (sorted)."""
    if kind == "disjoint":
        # The same shuffle on every rank, then contiguous parts: disjoint, covering every
        # sample, sizes differing by at most one.
        perm = np.random.default_rng([seed, _SHARD_STREAM]).permutation(n)
        return np.sort(np.array_split(perm, size)[rank])
    if kind == "bootstrap":
        rng = np.random.default_rng([seed, _SHARD_STREAM, rank])
        return np.sort(rng.integers(0, n, max(1, n // size)))
    if kind == "all":   # every member the whole training set: only its seed differs
        return np.arange(n)
    raise ConfigError(f"unknown shards {kind!r}: choose one of {', '.join(SHARDS)}")


# --- `parnn train --distributed` ---------------------------------------------------------------

@dataclass(frozen=True)
class DistributedOptions:
    """How a distributed run spreads over the ranks, where its data comes from and where rank 0
    writes; the training settings themselves are a TrainConfig beside it."""

    mode: str                            # "ensemble", "allreduce" or "average"
    shards: str | None = None            # ensemble: "disjoint" (None) or "bootstrap"
    dataset: str | None = "fashion-mnist"   # None: resuming, the checkpoint's
    data: Path | None = None             # None: parnn.data's search
    limit_train: int | None = None
    limit_test: int | None = None
    out: Path | None = None              # None: runs/PRESET
    threads: int | None = None           # per rank; None: this node's cores shared among its ranks
    progress: bool = True
    overwrite: bool = False              # rank 0 may replace a trained model in `out`
    rank_timeout: float = RANK_TIMEOUT   # seconds of silence before a rank is given up; 0: never
    checkpoint_dir: Path | None = None   # None: OUT/checkpoints (rank 0 writes them)
    checkpoint_every: int | None = None  # optimizer steps; None: after every epoch only
    resume: Path | None = None           # carry on the run whose checkpoints are there
    average_every: int | None = None     # average: optimizer steps between averages (K)
    overlap: bool = True                 # allreduce: reduce each layer as backward produces it
    member_recipe: str | list | None = None   # ensemble: how each member trains, as parnn
                                         # train --members (a MEMBER_RECIPES name, or from
                                         # Python a list of settings dicts); None: seeds

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
        if self.member_recipe is not None and self.mode != "ensemble":
            raise ConfigError("--member-recipe only applies to an ensemble (--members K, or "
                              "--distributed ensemble): how each member trains")
        if self.member_recipe is not None and self.resume is not None:
            raise ConfigError("a resumed ensemble keeps its members' settings: drop "
                              "--member-recipe")
        if self.average_every is not None and self.mode != "average":
            raise ConfigError("--average-every only applies to --distributed average (optimizer "
                              "steps between two averages of the ranks' parameters)")
        for flag, n in (("--average-every", self.average_every),
                        ("--checkpoint-every", self.checkpoint_every)):
            if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
                raise ConfigError(f"{flag} must be a whole number >= 1 (optimizer steps), "
                                  f"got {n!r}")
        if self.resume is not None and self.checkpoint_dir is not None:
            raise ConfigError("--checkpoint-dir cannot be combined with --resume: a resumed run "
                              "goes on writing its checkpoints into the --resume directory")


def mode_config(cfg, mode):
    """cfg as `mode` trains it: allreduce and average train one network on the whole training
    set with the batch engine (no rows held out, and the run's files say so); an ensemble's
    members train as `parnn train` would."""
    if mode not in ("allreduce", "average"):
        return cfg
    if cfg.engine not in ("auto", "batch"):
        what = "reduces the gradients of" if mode == "allreduce" else "steps with"
        raise ConfigError(f"--distributed {mode} {what} the batch engine; --engine "
                          f"{cfg.engine} cannot be combined with it (use auto or batch)")
    return replace(cfg, engine="batch", validation_split=0.0)


def world():
    """MPI.COMM_WORLD, importing mpi4py only now."""
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError) as e:
        raise ConfigError(f"--distributed needs mpi4py and an MPI library ({e}): "
                          "pip install 'parnn[mpi]', or mpi4py built against your system MPI") from None
    return MPI.COMM_WORLD


@dataclass
class Plan:
    """Where a distributed run's checkpoints go and what it carries on from (this rank's)."""

    ckdir: Path
    out: Path                       # where rank 0 writes the run's files
    every: int | None               # optimizer steps between checkpoints
    run: dict                       # the checkpoint's run record (RunRecord + "distributed")
    resume: object = None           # this rank's parnn.run.checkpoint.Checkpoint, or None
    extra: dict = field(default_factory=dict)   # rank 0: what else was saved (votes)
    hybrid: dict = field(default_factory=dict)  # ranks x threads, for the history
    rows: object = None             # ensemble: the training rows (None: all), as parnn train's
    validation: object = None       # ensemble: the held-out rows (a run.train.Subset) or None
    member: object = None           # ensemble: this rank's member's TrainConfig


def train(cfg, opts, settings=None):
    """Train cfg (a TrainConfig) as opts (DistributedOptions) say; every rank of the MPI job
    runs this. With opts.resume, cfg is ignored: the checkpoint's settings are used, and
    settings (TrainConfig settings given again, None: not given) are checked against them
    (run/resume.py). Returns the exit status."""
    global ENTERED
    from parnn.distributed import modes
    from parnn.distributed.watchdog import Watched
    from parnn.run.checkpoint import Interrupted

    ENTERED = True
    comm = Watched(world(), opts.rank_timeout)
    rank, size = comm.Get_rank(), comm.Get_size()
    # flush: stdout is a pipe under mpiexec, and an Abort would lose what is still buffered
    log = functools.partial(print, flush=True) if rank == 0 else _quiet
    with contextlib.ExitStack() as held:   # rank 0: the locks on `out` and the checkpoints
        local = _start(comm)
        if opts.resume is not None:
            from parnn.distributed.checkpoints import resumed

            got = resumed(opts, settings or {}, comm, log)
            if isinstance(got, int):
                return got
            cfg, opts, resume = got
        else:
            resume = None
        problem, fingerprint = None, None
        try:
            fail = _fail_hook(rank)
            cfg, ds, engine, notes, plan = _setup(opts, cfg, comm, local, held, resume)
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
        plan.hybrid = _hybrid(comm, local, cfg.threads, opts.threads)

        progress = opts.progress and rank == 0
        for note in notes:
            log(note)
        try:
            if opts.mode == "ensemble":
                return modes.train_ensemble(cfg, ds, engine, plan.out, comm,
                                            opts.shards or "disjoint", progress, log, fail, plan)
            return modes.train_replicas(cfg, ds, engine, plan.out, comm, progress, log, fail,
                                        plan)
        except Interrupted as err:   # every rank stopped at the same boundary, after a checkpoint
            if rank == 0 or size == 1:
                raise
            return err.exit_status
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


def _setup(opts, cfg, comm, local, held, resume):
    """This rank's config, data and engine (the one its run keeps), notes for rank 0 to print,
    and the Plan of its checkpoints; ParnnError for anything wrong, before any training. Rank 0
    takes the locks on `out` and the checkpoint directory into `held` (a contextlib.ExitStack).
    resume: None, or this rank's share of the checkpoint (distributed.checkpoints.resumed)."""
    from parnn.data import load_dataset
    from parnn.paths import check_output_dir
    from parnn.run import checkpoint, outputs, rundir, session
    from parnn.run.api import holdout
    from parnn.run.config import batch_size_for, pick_engine, usable_cores
    from parnn.run.members import member_configs
    from parnn.run.resume import RunRecord, recorded_data

    rank, size = comm.Get_rank(), comm.Get_size()
    out = Path(resume.out) if resume is not None else outputs.out_dir(cfg, opts.out)
    ckdir = Path(resume.ckdir) if resume is not None else \
        Path(opts.checkpoint_dir or out / "checkpoints")
    if rank == 0:   # only rank 0 writes: refuse an unusable --out before any training
        check_output_dir(out, "--out", files=outputs.FILES)
        check_output_dir(ckdir, "--resume" if resume else "--checkpoint-dir",
                         files=checkpoint.FILES)
        rundir.refuse_in_use(out, "--out")
        rundir.refuse_in_use(ckdir, "--resume" if resume else "--checkpoint-dir")
        if resume is None:
            _refuse_replacing(out, ckdir, opts.overwrite)
    notes = []
    if size == 1:
        notes.append(f"parnn: --distributed {opts.mode} on 1 rank (not started by mpiexec; "
                     "use `mpiexec -n K parnn train ...` for K ranks)")
    cpus = usable_cores()
    if opts.threads and opts.threads > cpus:
        notes.append(f"parnn: warning: --threads {opts.threads} is more than the {cpus} "
                     f"core(s) this process may use: using {cpus}")
    # cfg's default "all cores" is per process: unless told, the ranks of a node share them.
    cfg = replace(cfg, threads=min(opts.threads, cpus) if opts.threads else max(1, cpus // local))
    if local * cfg.threads > cpus:
        notes.append(f"parnn: warning: {local} ranks x {cfg.threads} threads = "
                     f"{local * cfg.threads} exceeds the {cpus} cores of this machine; they will "
                     "slow each other down")
    if cfg.early_stopping:   # the ranks meet after every epoch: none may stop before the others
        raise ConfigError("--early-stopping does not work with --distributed: every rank trains "
                          "the run's epochs")
    cfg = mode_config(cfg, opts.mode)
    session.check_plan(cfg, opts.dataset, opts.limit_train, opts.limit_test, processes=local)
    # The images as stored (uint8) on every rank: the engines scale what they read.
    if resume is not None:   # the data may have moved (--data), but must be the same bytes
        ds = recorded_data(resume.record, opts.data, "uint8")
    else:
        ds = load_dataset(opts.dataset, opts.data, "uint8", opts.limit_train, opts.limit_test)
    if rank == 0:
        held.enter_context(rundir.hold(out, "--out"))
        if ckdir.absolute() != out.absolute():
            held.enter_context(rundir.hold(ckdir, "--checkpoint-dir"))
        if resume is None:
            _refuse_replacing(out, ckdir, opts.overwrite)   # again, under the lock
            if opts.overwrite:   # never mix two runs' checkpoints
                for name in rundir.existing(ckdir, checkpoint.FILES):
                    (ckdir / name).unlink()
        rundir.sweep(out, outputs.FILES)
        rundir.sweep(ckdir, checkpoint.FILES)
    n = len(ds.X_train)
    spec = cfg.spec(ds.n_features, ds.n_classes)
    every = opts.checkpoint_every or (resume.record.checkpoint_every if resume else None)
    record = RunRecord.of(ds, opts.limit_train, opts.limit_test, out, every).to_dict()
    if resume is not None:
        record = dict(resume.record.to_dict(), out=str(out.absolute()), checkpoint_every=every)
    record["distributed"] = dict(mode=opts.mode, ranks=size)
    if opts.mode == "ensemble":
        record["distributed"]["shards"] = opts.shards or "disjoint"
        record["distributed"]["members_scheme"] = MEMBERS_SCHEME
    if opts.mode == "average":
        record["distributed"]["average_every"] = opts.average_every or AVERAGE_EVERY
    plan = Plan(ckdir, out, every, record, resume.member if resume else None,
                resume.extra if resume else {})
    if opts.mode in ("allreduce", "average"):
        from parnn.engines.allreduce import AllreduceEngine, AverageEngine
        from parnn.run.config import engine_options

        bs = batch_size_for(cfg, n)
        options = engine_options(cfg, "batch")           # augmentation, dropout
        if opts.mode == "average":
            if bs < size:
                raise ConfigError(f"--distributed average needs a batch of at least one sample "
                                  f"per rank: batch size {bs} < {size} ranks")
            engine = AverageEngine(comm, opts.average_every or AVERAGE_EVERY, **options)
        else:
            if bs < size:
                notes.append(f"parnn: warning: batch size {bs} < {size} ranks: some ranks get no "
                             "samples and only add communication")
            engine = AllreduceEngine(comm, overlap=opts.overlap, **options)
        engine.check(spec, cfg.optimizer, bs)
        return cfg, ds, engine, notes, plan
    # The members' rows as `parnn train --members` has them: cfg.validation_split held out
    # once, from the run's seed (a resumed run's config carries both, so the same split).
    plan.rows, plan.validation = holdout(cfg, ds)
    n = n if plan.rows is None else len(plan.rows)
    if n < size:
        raise ConfigError(f"{n} training samples cannot be shared among {size} ranks")
    # This rank's member: member `rank` of `parnn train --members K` (seed + rank, the recipe's
    # settings); a resumed member keeps its own (before, rank r had seed + 1000 r). Its engine
    # draws the member's own augmentation and dropout from its seed.
    if resume is None:
        members = member_configs(cfg, size, opts.member_recipe, ds.n_features, ds.n_classes)
        if any(m.epochs != cfg.epochs for m in members):   # the ranks meet after every epoch
            raise ConfigError("--member-recipe: a recipe cannot change the epochs of an MPI "
                              "ensemble's members, whose ranks meet after every epoch "
                              "(parnn train --members trains such members one after another)")
        plan.member = members[rank]
        if plan.member.batch_size != cfg.batch_size:   # what the member needs changes too
            session.check_plan(plan.member, opts.dataset, opts.limit_train, opts.limit_test,
                               processes=local)
    else:
        plan.member = replace(resume.config, threads=cfg.threads)
    try:   # against the smallest shard (sizes differ by at most one)
        engine = pick_engine(plan.member, spec, n // size)
    except ConfigError as e:
        raise ConfigError(f"{e}, the shard of each of the {size} ensemble members") from None
    return cfg, ds, engine, notes, plan


def _refuse_replacing(out, ckdir, overwrite):
    """A new run must not replace a trained model (without --overwrite) nor the checkpoints of
    an unfinished run (resume it); as parnn.run.session.refuse_replacing, for either kind of
    checkpoint."""
    from parnn.distributed.checkpoints import peek
    from parnn.paths import shown
    from parnn.run import checkpoint, rundir

    saved = peek(ckdir) if Path(ckdir).is_dir() else None
    if saved is not None and not saved.finished:
        d = saved.distributed or {}
        ck = saved.first
        command = checkpoint.resume_command(ckdir, d.get("mode"), d.get("ranks", 1))
        raise ConfigError(f"{ckdir} holds the checkpoint of an unfinished run (epoch "
                          f"{ck.position.epoch} of {ck.config.epochs}, step {ck.step}): continue "
                          f"it with `{command}`"
                          ", or start over with another --out or --checkpoint-dir (or delete "
                          "that directory)")
    if overwrite:
        return
    if rundir.existing(out, ("model.safetensors",)):
        raise ConfigError(f"--out {shown(out)} already holds a trained model "
                          "(model.safetensors): pass --overwrite to replace it and its history, "
                          "or choose another --out")
    if rundir.existing(ckdir, checkpoint.FILES):
        raise ConfigError(f"{shown(ckdir)} holds the checkpoints of a finished run whose model "
                          f"is not in --out {shown(out)}: pass --overwrite to replace them, or "
                          "choose another --out or --checkpoint-dir")


def _hybrid(comm, local, threads, given):
    """How the job spreads over nodes, ranks and threads, for the history."""
    import socket

    from parnn.run.config import usable_cores

    nodes = len(set(comm.allgather(socket.gethostname())))
    return dict(ranks=comm.Get_size(), nodes=nodes, ranks_per_node=local,
                threads_per_rank=threads, cores_per_node=usable_cores(),
                threads_from="--threads" if given else
                "default: the node's cores / its ranks (MPI shared-memory split)")


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
    next collective; R:stop@S (raise@S, kill@S) after the first chunk that ends at optimizer
    step S or later."""
    spec = os.environ.get(FAIL_ENV)
    if not spec:
        return lambda epoch, done, step=0: None
    who, _, how = spec.partition(":")
    how, _, at = how.partition("@")
    if not who.isdigit() or how not in ("raise", "kill", "stop") or (at and not at.isdigit()):
        raise ConfigError(f"{FAIL_ENV} must be RANK:raise, RANK:kill or RANK:stop, optionally "
                          f"followed by @STEP, got {spec!r}")
    if int(who) != rank:
        return lambda epoch, done, step=0: None

    fired = []

    def fail(epoch, done, step=0):
        if step < int(at or 0) or fired:   # once: a stopped rank may be continued (SIGCONT)
            return
        fired.append(step)
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
