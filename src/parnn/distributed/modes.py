"""The distributed modes, as every rank runs them once the set-up agreed
(parnn.distributed.train): allreduce and average (one network, each batch split over the ranks:
the gradient summed every batch, or local steps averaged every K; parnn.engines.allreduce) and
ensemble (one network per rank, voted). Only rank 0 prints and writes; `comm` is a
distributed.watchdog.Watched communicator, so no collective here can hang.

All write what a single run writes (run/outputs.py): model.safetensors, and history.json,
history.csv and history.png with a single run's layout, one row per epoch. The ensemble's rows
are the ensemble's: test_acc is the soft vote's accuracy after that epoch (hard_acc the hard
vote's), loss and train_acc the members' means; each member's own rows are in history.json's
"members".
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from parnn.distributed import VOTES, combine_outputs, shard_indices
from parnn.engines import scaled
from parnn.run.memory import SCORE_ROWS


def train_replicas(cfg, ds, engine, out, comm, progress, log, fail, plan):
    """allreduce and average: one network, on every rank, saved once by rank 0."""
    from parnn.distributed.checkpoints import RankCheckpointer
    from parnn.io import params_sha256
    from parnn.run.config import batch_size_for
    from parnn.run.outputs import save_run
    from parnn.run.train import fit

    rank, size = comm.Get_rank(), comm.Get_size()
    mode = engine.name
    comm_at = {}   # epoch -> cumulative seconds in MPI after its last chunk
    n = len(ds.X_train)
    checkpoints = RankCheckpointer(comm, plan.ckdir, plan.every, plan.run, mode,
                                   members=mode == "average")
    if plan.resume is not None:   # every rank restored its own state: no broadcast from rank 0
        engine.synced = mode == "average"

    def on_chunk(epoch, done, net, opt):
        if mode == "average" and done == n:   # the epoch's model is the replicas' average
            engine.average(net, opt)
        comm_at[epoch] = engine.comm_seconds
        fail(epoch, done, opt.t)

    bs = batch_size_for(cfg, n)
    if mode == "average":
        log(f"average on {size} rank(s): each rank steps on its part of every batch of {bs}, "
            f"the parameters averaged every {engine.every} step(s) and after every epoch, "
            f"{cfg.threads} thread(s) per rank")
    else:
        how = "layer by layer during backward" if engine.overlap else "after backward"
        log(f"allreduce on {size} rank(s): each batch of {bs} split among the ranks, the "
            f"gradient summed {how}, {cfg.threads} thread(s) per rank")
    result = fit(cfg, ds, progress=progress, log=log, on_chunk=on_chunk, engine=engine,
                 test_every_epoch=True, checkpoints=checkpoints, resume=plan.resume)
    before = 0.0
    for row in result.history:
        if row["epoch"] in comm_at:   # epochs trained by this job (not before a resume)
            row["comm_seconds"] = comm_at[row["epoch"]] - before
            before = comm_at[row["epoch"]]
    digest = params_sha256(result.net.params)
    digests = comm.allgather(digest)
    if len(set(digests)) != 1:
        raise RuntimeError(f"ranks ended with different weights: {digests}")
    result.info.update(distributed=mode, ranks=size, params_sha256=digest,
                       allreduce_calls=engine.calls, comm_seconds=engine.comm_seconds,
                       hybrid=plan.hybrid)
    if mode == "average":
        result.info["average_every"] = engine.every
    if mode == "allreduce":
        result.info["overlap"] = engine.overlap
    if rank != 0:
        return 0
    paths = save_run(out, result, ds)
    share = engine.comm_seconds / max(sum(r["seconds"] for r in result.history
                                          if "comm_seconds" in r), 1e-12)
    print(f"weights identical on all {size} ranks (sha256 {digest[:16]}); "
          f"{share:.0%} of training time in MPI" if size > 1 else
          f"1 rank: {share:.0%} of training time in (trivial) MPI calls")
    print(f"test accuracy {result.test_acc:.4f} after {len(result.history)} epoch(s); "
          f"model saved to {paths['model']}")
    return 0


def train_ensemble(cfg, ds, engine, out, comm, shards, progress, log, fail, plan):
    from parnn.core.model import MLP
    from parnn.distributed.checkpoints import RankCheckpointer
    from parnn.run.config import batch_size_for
    from parnn.run.outputs import model_metadata
    from parnn.run.train import Subset, chunk_size, fit

    rank, size = comm.Get_rank(), comm.Get_size()
    mine = np.arange(len(ds.X_train)) if plan.rows is None else plan.rows
    idx = mine[shard_indices(len(mine), rank, size, shards, cfg.seed)]
    mcfg = plan.member   # member `rank` of `parnn train --members K` (distributed._setup)
    log(f"ensemble of {size}: rank r trains member r of parnn train --members {size} (seed "
        f"{cfg.seed} + r) on its {shards} shard; showing rank 0 ({len(idx)} samples)")
    validation, test = plan.validation, Subset(ds.X_test, ds.y_test)
    # rank 0: each epoch's accuracy of the soft and the hard vote (a resumed run's so far)
    votes = list(plan.extra.get("votes", []))
    checkpoints = RankCheckpointer(comm, plan.ckdir, plan.every, plan.run, "ensemble",
                                   members=True, extra=lambda: {"votes": votes})
    # The members meet after every chunk only if they cut their shards into as many chunks.
    bs = batch_size_for(mcfg, len(idx))
    chunks = -(-len(idx) // chunk_size(engine, bs, len(idx), plan.every * bs if plan.every
                                       else None))
    checkpoints.in_chunks = len(set(comm.allgather(chunks))) == 1

    def on_chunk(epoch, done, net, opt):
        fail(epoch, done, opt.t)
        if done == len(idx):   # the epoch's last chunk: these are the epoch's weights
            scores = [vote_accuracies(gather_outputs(comm, net, s), s)
                      for s in (test, validation) if s is not None]
            if rank == 0:
                votes.append(scores[0] if validation is None else
                             dict(scores[0], val=scores[1]["soft"]))

    # A bootstrap shard trains on its own copy of the rows drawn, so that a row drawn twice is
    # two samples with their own augmentation and dropout draws (they follow the position);
    # the other shards train on their rows of the data set, as parnn train --members does.
    data, rows = (replace(ds, X_train=ds.X_train[idx], y_train=ds.y_train[idx]), None) \
        if shards == "bootstrap" else (ds, idx)
    t0 = time.perf_counter()
    result = fit(mcfg, data, progress=progress, log=log, engine=engine, on_chunk=on_chunk,
                 test_every_epoch=True, checkpoints=checkpoints, resume=plan.resume, rows=rows,
                 validation=validation)
    seconds = time.perf_counter() - t0

    # Rank 0 gathers the parameters into one NumPy buffer, and small per-member records.
    net = result.net
    params = np.empty((size, net.spec.n_params), net.dtype) if rank == 0 else None
    comm.Gather(net.params, params, root=0)
    members = comm.gather(dict(rank=rank, seed=mcfg.seed, n_train=len(idx),
                               unique_samples=int(len(np.unique(idx))), seconds=seconds,
                               engine=result.engine, threads=mcfg.threads,
                               config=mcfg.to_dict(),
                               val_acc=result.history[-1].get("val_acc"),
                               test_acc=result.test_acc, history=result.history), root=0)
    if rank != 0:
        return 0

    acc = votes[-1]
    rows = ensemble_rows(members, votes)
    nets = [MLP(net.spec, np.ascontiguousarray(p)) for p in params]
    info = dict(distributed="ensemble", mode="ensemble", ranks=size, shards=shards,
                vote_in_file="soft", soft_acc=acc["soft"], hard_acc=acc["hard"],
                val_acc=acc.get("val"), wall_seconds=max(m["seconds"] for m in members),
                hybrid=plan.hybrid)
    meta = model_metadata(replace(result, config=cfg, history=rows), ds)
    meta.update(test_acc=acc["soft"], val_acc=acc.get("val"), distributed=info,
                members=[{k: v for k, v in m.items() if k != "history"} for m in members])
    paths = save_ensemble(out, nets, meta, cfg, result, members, rows)

    print(f"{'member':>6} {'seed':>6} {'samples':>8} {'test_acc':>9}")
    for m in members:
        print(f"{m['rank']:>6} {m['seed']:>6} {m['n_train']:>8} {m['test_acc']:>9.4f}")
    accs = [m["test_acc"] for m in members]
    print(f"ensemble of {size} ({shards} shards): soft vote {acc['soft']:.4f}, hard vote "
          f"{acc['hard']:.4f} (members: mean {np.mean(accs):.4f}, best {max(accs):.4f}); "
          f"{info['wall_seconds']:.1f}s training")
    if validation is not None:
        print(f"validation: soft vote {acc['val']:.4f} on the {len(validation)} training images "
              "held out from every member")
    print(f"test accuracy {acc['soft']:.4f} (soft vote) after {cfg.epochs} epoch(s); "
          f"ensemble saved to {paths['model']}")
    return 0


def gather_outputs(comm, net, subset):
    """Every member's output layer on a Subset's rows, at rank 0 ((size, n, classes); None
    elsewhere)."""
    mine = np.concatenate([net.output(scaled(X, net.dtype))   # uint8: x / 255, a chunk at a time
                           for X, _ in subset.chunks(SCORE_ROWS)])
    rank, size = comm.Get_rank(), comm.Get_size()
    outputs = np.empty((size, *mine.shape), mine.dtype) if rank == 0 else None
    comm.Gather(mine, outputs, root=0)
    return outputs


def vote_accuracies(outputs, subset):
    """{vote: accuracy} of the gathered outputs on a Subset (rank 0; None elsewhere)."""
    if outputs is None:
        return None
    y = subset.y if subset.rows is None else subset.y[subset.rows]
    return {v: float(np.mean(combine_outputs(outputs, v).argmax(1) == y)) for v in VOTES}


def ensemble_rows(members, votes):
    """The ensemble's history, one row per epoch, in a single run's columns: loss and
    train_acc are the members' means; test_acc the soft vote's accuracy (hard_acc the hard
    vote's, member_test_acc the members' mean); an epoch lasts as long as its slowest member's."""
    rows = []
    for e, vote in enumerate(votes):
        mine = [m["history"][e] for m in members]
        seconds = max(r["seconds"] for r in mine)
        n = sum(r["samples_per_s"] * r["seconds"] for r in mine)
        rows.append(dict(epoch=e + 1, loss=float(np.mean([r["loss"] for r in mine])),
                         train_acc=float(np.mean([r["train_acc"] for r in mine])),
                         test_acc=vote["soft"], hard_acc=vote["hard"],
                         member_test_acc=float(np.mean([r["test_acc"] for r in mine])),
                         seconds=seconds, samples_per_s=n / seconds if seconds else 0.0))
        if "val" in vote:   # the soft vote on the held-out rows
            rows[-1]["val_acc"] = vote["val"]
    return rows


def save_ensemble(out, nets, meta, cfg, result, members, rows):
    """model.safetensors (all members), history.json, history.csv and history.png as a single
    run writes them (the voted rows), each atomically; history.json adds "distributed" and
    "members" (each member's record and rows)."""
    from parnn import atomic, io, plots
    from parnn.run.outputs import history_columns, paths as output_paths

    paths = output_paths(out)
    io.save_ensemble(paths["model"], nets, meta)
    atomic.atomic_write_json(paths["history_json"], {
        "config": cfg.to_dict(), "engine": result.engine, "info": meta["distributed"],
        "history": rows, "test_acc": meta["test_acc"], "best_epoch": None,
        "distributed": meta["distributed"], "members": members})
    atomic.atomic_write_csv(paths["history_csv"], rows, history_columns(rows, test=True))
    plots.plot_history(rows, paths["plot"],
                       title=f"parnn ensemble of {len(nets)}: soft vote (test), members' mean "
                       "(loss, train)")
    return paths
