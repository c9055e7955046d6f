"""Many networks and many processes: ensemble voting, and (with mpi4py) MPI training.

mpi4py is imported only by the functions that need it, so single-process use never needs MPI.

`mpiexec -n K parnn train --distributed MODE ...` runs the same command on K ranks:

ensemble   the paper's future work. Rank r trains its own network with seed + 1000*r on its own
           shard of the training set (disjoint: one shuffle with the run's seed, cut into K
           contiguous parts; bootstrap: n/K samples drawn with replacement, one stream per rank).
           No communication while training. Then every rank computes its output layer on the
           test set, rank 0 gathers the outputs and the parameters (MPI Gather into NumPy
           buffers), reports every member and the soft and hard votes, and saves ONE ensemble file.
allreduce  synchronous data parallelism. Every rank holds the same network; each global batch of B
           samples is split into K contiguous parts, each rank computes its part's gradient scaled
           by 1/B, one Allreduce(SUM) of the flat gradient buffer gives every rank the batch's mean
           gradient, and every rank applies the same optimizer step: the compiled batch engine
           with an Allreduce as its gradient-reduce hook (parnn.engines.allreduce). Equals one
           process with batch B up to rounding; all ranks end with bitwise-identical weights
           (checked).

Failures: set-up problems (bad flags, missing or different data on some rank) are collected from
all ranks, rank 0 reports them and every rank exits with status 2. A rank that fails later (an
exception, divergence, Ctrl-C) prints which rank failed and why, then calls MPI Abort, which ends
every rank: a peer blocked in a collective would otherwise wait forever. (A rank killed by a
signal is cleaned up by mpiexec itself.)
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import time
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
FAIL_ENV = "PARNN_TEST_FAIL"   # test hook "RANK:raise" or "RANK:kill", see docs/MPI.md


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

    def __post_init__(self):
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
    from parnn.run.outputs import out_dir

    comm = world()
    from mpi4py import MPI

    rank, size = comm.Get_rank(), comm.Get_size()
    out = out_dir(cfg, opts.out)
    # Collective, so before anything that can fail on one rank only.
    local = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_size()
    problem, fingerprint = None, None
    try:
        fail = _fail_hook(rank)
        cfg, ds, engine, notes = _setup(opts, cfg, out, comm, local)
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
            return _train_allreduce(cfg, ds, engine, out, comm, progress, log, fail)
        return _train_ensemble(cfg, ds, engine, out, comm, opts.shards or "disjoint", progress,
                               log, fail)
    except BaseException as err:
        if size == 1:
            raise
        _abort(comm, err)


def _setup(opts, cfg, out, comm, local):
    """This rank's config, data and engine (the one its run keeps), and notes for rank 0 to
    print; ParnnError for anything wrong, before any training."""
    from parnn.data import load_dataset
    from parnn.io import check_output_dir
    from parnn.run.config import batch_size_for, pick_engine

    rank, size = comm.Get_rank(), comm.Get_size()
    if rank == 0:   # only rank 0 writes: refuse an unusable --out before any training
        check_output_dir(out, "--out")
    notes = []
    if size == 1:
        notes.append(f"parnn: --distributed {opts.mode} on 1 rank (not started by mpiexec; "
                     "use `mpiexec -n K parnn train ...` for K ranks)")
    cpus = os.cpu_count() or 1
    # cfg's default "all cores" is per process: unless told, the ranks of a node share them.
    cfg = replace(cfg, threads=opts.threads or max(1, cpus // local))
    if local * cfg.threads > cpus:
        notes.append(f"warning: {local} ranks x {cfg.threads} threads = {local * cfg.threads} "
                     f"exceeds the {cpus} cores of this machine; they will slow each other down")
    if opts.mode == "allreduce":
        if cfg.engine not in ("auto", "batch"):
            raise ConfigError(f"--distributed allreduce reduces the gradients of the batch "
                              f"engine; --engine {cfg.engine} cannot be combined with it "
                              "(use auto or batch)")
        cfg = replace(cfg, engine="batch")
    ds = load_dataset(opts.dataset, opts.data, cfg.dtype, opts.limit_train, opts.limit_test)
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
    """The test hook: PARNN_TEST_FAIL=R:raise (or R:kill) makes rank R fail after its first
    chunk of training, while the other ranks go on into their next collective."""
    spec = os.environ.get(FAIL_ENV)
    if not spec:
        return lambda epoch, done: None
    who, _, how = spec.partition(":")
    if not who.isdigit() or how not in ("raise", "kill"):
        raise ConfigError(f"{FAIL_ENV} must be RANK:raise or RANK:kill, got {spec!r}")
    if int(who) != rank:
        return lambda epoch, done: None

    def fail(epoch, done):
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
    print(f"parnn: error: rank {comm.Get_rank()} of {comm.Get_size()} failed: {why}; "
          "stopping all ranks", file=sys.stderr, flush=True)
    # mpiexec forwards each rank's stderr through a pipe and Abort kills every rank at once:
    # without a moment's pause the message saying why is sometimes lost on its way.
    time.sleep(0.5)
    comm.Abort(1)


def _quiet(*args, **kwargs):
    pass


def _train_allreduce(cfg, ds, engine, out, comm, progress, log, fail):
    from parnn.io import params_sha256
    from parnn.run.config import batch_size_for
    from parnn.run.outputs import save_run
    from parnn.run.train import fit

    rank, size = comm.Get_rank(), comm.Get_size()
    comm_at = {}   # epoch -> cumulative seconds in Allreduce after its last chunk

    def on_chunk(epoch, done, net, opt):
        comm_at[epoch] = engine.comm_seconds
        fail(epoch, done)

    bs = batch_size_for(cfg, len(ds.X_train))
    log(f"allreduce on {size} rank(s): each batch of {bs} split among the ranks, one Allreduce "
        f"of the gradient per batch, {cfg.threads} thread(s) per rank")
    result = fit(cfg, ds, progress=progress, log=log, on_chunk=on_chunk, engine=engine)
    before = 0.0
    for row in result.history:
        row["comm_seconds"] = comm_at[row["epoch"]] - before
        before = comm_at[row["epoch"]]
    digest = params_sha256(result.net.params)
    digests = comm.allgather(digest)
    if len(set(digests)) != 1:
        raise RuntimeError(f"ranks ended with different weights: {digests}")
    result.info.update(distributed="allreduce", ranks=size, params_sha256=digest,
                       allreduce_calls=engine.calls, comm_seconds=engine.comm_seconds)
    if rank != 0:
        return 0
    paths = save_run(out, result, ds)
    share = engine.comm_seconds / max(sum(r["seconds"] for r in result.history), 1e-12)
    last = result.history[-1]
    print(f"weights identical on all {size} ranks (sha256 {digest[:16]}); "
          f"{share:.0%} of training time in Allreduce" if size > 1 else
          f"1 rank: {share:.0%} of training time in (trivial) Allreduce calls")
    print(f"test accuracy {last['test_acc']:.4f} after {len(result.history)} epoch(s); "
          f"model saved to {paths['model']}")
    return 0


def _train_ensemble(cfg, ds, engine, out, comm, shards, progress, log, fail):
    from parnn.core.model import MLP
    from parnn.run.outputs import model_metadata
    from parnn.run.train import fit

    rank, size = comm.Get_rank(), comm.Get_size()
    idx = shard_indices(len(ds.X_train), rank, size, shards, cfg.seed)
    shard = replace(ds, X_train=ds.X_train[idx], y_train=ds.y_train[idx])
    mcfg = replace(cfg, seed=member_seed(cfg.seed, rank))
    log(f"ensemble of {size}: rank r trains on its {shards} shard with seed {cfg.seed} + "
        f"{SEED_STRIDE}*r; showing rank 0 ({len(idx)} samples)")
    t0 = time.perf_counter()
    result = fit(mcfg, shard, progress=progress, log=log, engine=engine,
                 on_chunk=lambda epoch, done, net, opt: fail(epoch, done))
    seconds = time.perf_counter() - t0

    # Rank 0 gathers every member's test outputs and parameters into NumPy buffers.
    net = result.net
    mine = np.ascontiguousarray(net.output(ds.X_test))
    outputs = np.empty((size, *mine.shape), mine.dtype) if rank == 0 else None
    comm.Gather(mine, outputs, root=0)
    params = np.empty((size, net.spec.n_params), net.dtype) if rank == 0 else None
    comm.Gather(net.params, params, root=0)
    # Small per-member records: pickled gather is fine here.
    members = comm.gather(dict(rank=rank, seed=mcfg.seed, n_train=len(idx),
                               unique_samples=int(len(np.unique(idx))), seconds=seconds,
                               engine=result.engine, threads=mcfg.threads,
                               history=result.history), root=0)
    if rank != 0:
        return 0

    y = ds.y_test
    for m, o in zip(members, outputs):
        m["test_acc"] = float(np.mean(o.argmax(1) == y))
    acc = {v: float(np.mean(combine_outputs(outputs, v).argmax(1) == y)) for v in VOTES}
    nets = [MLP(net.spec, np.ascontiguousarray(p)) for p in params]
    rows = [dict(member=m["rank"], **row) for m in members for row in m["history"]]
    info = dict(mode="ensemble", ranks=size, shards=shards, seed_stride=SEED_STRIDE,
                vote_in_file="soft", soft_acc=acc["soft"], hard_acc=acc["hard"],
                wall_seconds=max(m["seconds"] for m in members))
    meta = model_metadata(result, ds)
    meta.update(config=cfg.to_dict(), distributed=info, history=rows,
                members=[{k: v for k, v in m.items() if k != "history"} for m in members])
    paths = _save_ensemble(out, nets, meta, cfg, members, rows, size)

    print(f"{'member':>6} {'seed':>6} {'samples':>8} {'test_acc':>9}")
    for m in members:
        print(f"{m['rank']:>6} {m['seed']:>6} {m['n_train']:>8} {m['test_acc']:>9.4f}")
    accs = [m["test_acc"] for m in members]
    print(f"ensemble of {size} ({shards} shards): soft vote {acc['soft']:.4f}, hard vote "
          f"{acc['hard']:.4f} (members: mean {np.mean(accs):.4f}, best {max(accs):.4f}); "
          f"{info['wall_seconds']:.1f}s training")
    print(f"test accuracy {acc['soft']:.4f} (soft vote) after {cfg.epochs} epoch(s); "
          f"ensemble saved to {paths['model']}")
    return 0


def _save_ensemble(out, nets, meta, cfg, members, rows, size):
    """model.safetensors (all members), history.json/.csv (every member's epochs) and a plot of
    the members' mean, each written atomically."""
    from parnn import io, plots
    from parnn.run.outputs import paths as output_paths

    paths = output_paths(out)
    io.save_ensemble(paths["model"], nets, meta)
    io.atomic_write_json(paths["history_json"], {"config": cfg.to_dict(),
                                                 "distributed": meta["distributed"],
                                                 "members": members})
    io.atomic_write_csv(paths["history_csv"], rows)
    mean = [dict(epoch=i + 1, **{k: float(np.mean([m["history"][i][k] for m in members]))
                                 for k in ("loss", "train_acc", "test_acc")})
            for i in range(cfg.epochs)]
    plots.plot_history(mean, paths["plot"], title=f"parnn ensemble of {size}: member mean")
    return paths
