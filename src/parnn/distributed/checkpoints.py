"""Checkpoints of a --distributed run: one directory, written by rank 0 only (run/checkpoint.py's
files, rotation and atomic writes).

allreduce  every rank holds the same network and optimizer state: rank 0 writes an ordinary
           checkpoint; its run record says {"distributed": {"mode", "ranks"}}.
ensemble,  each rank holds its own state. Rank 0 gathers every rank's (arrays, meta), as
average    Checkpointer.contents makes them, and writes ONE file: arrays "member.R.<name>",
           meta {"checkpoint": 1, "distributed": {...}, "run": {...}, "members": [rank R's
           meta, ...], "votes": [...]}; one file, one atomic rename, so every member is from
           the same moment.

The ranks decide together: after every chunk one small Allreduce(MAX) of (a signal seen, a
checkpoint due), so they all save at the same boundary and all stop when SIGINT or SIGTERM
reached any of them (mpiexec forwards both to every rank). The ensemble's members may cut
their shards into different numbers of chunks; then they meet at epoch ends only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from parnn.errors import ConfigError, ModelFileError
from parnn.run import checkpoint
from parnn.run.checkpoint import Checkpointer, resume_command

PREFIX = "member.{}."


@dataclass
class Saved:
    """A distributed run's checkpoint read back: the mode and ranks it was trained on
    (None: a single-process checkpoint), one Checkpoint per rank (one for allreduce), and
    what else rank 0 saved (the ensemble's votes)."""

    path: Path
    distributed: dict | None
    members: list
    extra: dict = field(default_factory=dict)

    @property
    def first(self):
        return self.members[0]

    @property
    def finished(self):
        return self.first.finished


def read(path, data=None) -> Saved:
    """A checkpoint file of either kind (data: its bytes, read already); ModelFileError saying
    what is wrong."""
    from parnn import io

    path = Path(path)
    arrays, meta = io.load_checkpoint(path, data)
    if "members" not in meta:
        ck = checkpoint.parse(path, arrays, meta)
        return Saved(path, ck.run.get("distributed"), [ck])
    try:
        d, metas = meta["distributed"], meta["members"]
        if not (isinstance(d, dict) and isinstance(metas, list) and d.get("ranks") == len(metas)):
            raise ValueError("the members do not match the ranks")
        members = []
        for r, m in enumerate(metas):
            prefix = PREFIX.format(r)
            mine = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
            members.append(checkpoint.parse(path, mine, m))
        if sum(len(m.arrays) for m in members) != len(arrays):
            raise ValueError("tensors that belong to no member")
        votes = meta.get("votes", [])
        if not isinstance(votes, list):
            raise ValueError("votes is not a list")
    except ModelFileError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ModelFileError(f"{path}: not a usable parnn checkpoint ({e})") from None
    return Saved(path, d, members, {"votes": votes})


def load(directory, warn=None) -> Saved:
    """The newest usable checkpoint in directory, else the previous one (run/checkpoint.py)."""
    return checkpoint.load(directory, warn=warn, reader=read)


def peek(directory):
    try:
        return load(directory)
    except ModelFileError:
        return None


class RankCheckpointer(Checkpointer):
    """Every rank's Checkpointer in a distributed run; only rank 0 writes (see the module's
    docstring). members: each rank's own state goes into one file (ensemble, average);
    extra(): more of rank 0's meta for that file (the ensemble's votes)."""

    def __init__(self, comm, directory, every, run, mode, members=False, extra=None):
        super().__init__(directory, every, run)
        self.comm, self.mode, self.members = comm, mode, members
        self.extra = extra or dict
        self.in_chunks = True     # False: meet at epoch ends only (set before training)
        self.distributed = run.get("distributed", {})

    def _agree(self, due):
        """(any rank saw a signal, any rank has a checkpoint due), the same on every rank."""
        from mpi4py import MPI

        flags = np.array([self.signum or 0, int(bool(due))], np.int64)
        self.comm.Allreduce(MPI.IN_PLACE, flags, op=MPI.MAX)
        if flags[0]:
            self.signum = int(flags[0])
        return bool(flags[1])

    def after_chunk(self, cfg, pos, net, opt):
        if not self.in_chunks:
            return
        due = self._agree(self.every and opt.t - self._saved_step >= self.every)
        if self.signum is not None:
            self.save(cfg, pos, net, opt)
            raise self._interrupted(pos, opt)
        if due:
            self.save(cfg, pos, net, opt)

    def after_epoch(self, cfg, pos, net, opt):
        self._agree(False)
        super().after_epoch(cfg, pos, net, opt)

    def save(self, cfg, pos, net, opt):
        from parnn import io

        arrays, meta = self.contents(cfg, pos, net, opt)
        if self.members:   # each rank's state travels as a checkpoint file's bytes
            sent = self.comm.gather_bytes(io.checkpoint_bytes(arrays, meta), root=0)
            if sent is not None:
                everyone = [io.load_checkpoint(f"rank {r}'s checkpoint", data)
                            for r, data in enumerate(sent)]
                arrays = {PREFIX.format(r) + k: v for r, (a, _) in enumerate(everyone)
                          for k, v in a.items()}
                meta = {"checkpoint": checkpoint.VERSION, "distributed": self.distributed,
                        "run": self.run, "members": [m for _, m in everyone], **self.extra()}
        if self.comm.Get_rank() == 0:
            self.write(arrays, meta)
        self.last, self._saved_step, self._wrote_newest = (pos.epoch, opt.t), opt.t, True

    def usable(self, path):
        try:
            read(path)
            return True
        except (ModelFileError, ConfigError):
            return False

    def running(self, opt, pos, engine=None):
        # A checkpoint names the engine whose arithmetic it continues: allreduce and average
        # are the batch engine's.
        return super().running(opt, pos, "batch" if engine in ("allreduce", "average")
                               else engine)

    def _interrupted(self, pos, opt):
        err = super()._interrupted(pos, opt)
        single = resume_command(self.dir)
        err.args = (str(err).replace(single, self.command()),)
        return err

    def command(self):
        return resume_command(self.dir, self.mode, self.comm.Get_size())


@dataclass
class Share:
    """What one rank carries on from a checkpoint: its own Checkpoint (every rank the same one
    for allreduce), the run's record, where its files go, and rank 0's extra (votes)."""

    member: object
    record: object
    out: Path
    ckdir: Path
    extra: dict
    config: object = None   # the member's own settings (an ensemble's; the settings given
                            # again applied to its checkpoint's), or None: the run's


def resumed(opts, settings, comm, log):
    """Rank 0 reads the checkpoint in opts.resume and checks it against this job (mode, ranks,
    settings given again), then sends the file's bytes to every rank, which reads its own
    Share from them (no pickle). Returns (cfg, opts with the saved shards or average_every,
    Share); on a problem rank 0 raises ConfigError and the others return the exit status 2."""
    import json
    from dataclasses import replace

    from parnn import io
    from parnn.errors import ParnnError

    rank, size = comm.Get_rank(), comm.Get_size()
    data, path, problem, shares = b"", "", None, None
    if rank == 0:
        read_bytes = {}

        def reader(p):                   # keeps the bytes of the file it chooses, read once
            read_bytes["data"] = io.file_bytes(p)
            return read(p, read_bytes["data"])

        try:
            saved = checkpoint.load(opts.resume, warn=lambda m: log(f"parnn: warning: {m}"),
                                    reader=reader)
            path, data = saved.path, read_bytes["data"]
            shares = _shares(saved, opts, settings, size)         # the checks, once
        except ParnnError as e:
            problem = str(e)
        except Exception as e:   # a bug: still one line, and no rank left waiting
            problem = f"{type(e).__name__}: {e}"
    head = json.loads(comm.bcast_bytes(json.dumps([problem, str(path)]).encode()))
    if head[0] is not None:
        if rank == 0:
            raise ConfigError(head[0])
        return 2
    data = comm.bcast_bytes(data)
    if shares is None:                   # the other ranks, from rank 0's bytes
        shares = _shares(read(head[1], data), opts, settings, size)
    cfg, d, share = shares[0] if len(shares) == 1 else shares[rank]
    record = share.record
    return cfg, replace(opts, shards=d.get("shards"), average_every=d.get("average_every"),
                        dataset=record.dataset, limit_train=record.limit_train,
                        limit_test=record.limit_test, checkpoint_dir=None), share


def shown_config(opts, settings, log):
    """(the config `mpiexec -n K parnn train --distributed MODE --resume DIR` would train with,
    checked as that job checks it, on the checkpoint's own number of ranks; each member's
    config, for an ensemble, else None): what --show-config prints, without MPI."""
    saved = load(opts.resume, warn=lambda m: log(f"parnn: warning: {m}"))
    shares = _shares(saved, opts, settings, None)
    members = [share.config for _, _, share in shares] if shares[0][2].config else None
    return shares[0][0], members


def _shares(saved, opts, settings, size):
    """[(cfg, distributed record, Share) per rank] of a checkpoint read (a Saved), checked
    against this job; one for allreduce; size None: the checkpoint's ranks."""
    from parnn.run.resume import RunRecord, check_ranks, resumed_config

    check_ranks(saved, opts.mode, size if size is not None or not saved.distributed
                else saved.distributed.get("ranks"))
    d = saved.distributed
    for flag, given, kept in (("--shards", opts.shards, d.get("shards")),
                              ("--average-every", opts.average_every, d.get("average_every"))):
        if given is not None and given != kept:
            raise ConfigError(f"a resumed run keeps the settings of its checkpoint in "
                              f"{saved.path.parent}, but {flag} {given} (it has {kept}): drop "
                              "that flag")
    first = saved.first
    record = RunRecord.of_checkpoint(first, launched=True)
    given = dict(settings, dataset=opts.dataset, limit_train=opts.limit_train,
                 limit_test=opts.limit_test)
    cfg = resumed_config(first, record, given)
    if d.get("mode") == "ensemble" and "members_scheme" not in d and d.get("ranks", 1) > 1 \
            and (cfg.augment != "none" or cfg.dropout):
        # Its members drew their augmentation and dropout from the run's seed, by position in
        # their shard: this release draws each member's own, so it would not carry on the same
        # (one rank drew from its own seed, by the same positions: it carries on).
        raise ConfigError(f"the ensemble checkpoint in {saved.path.parent} was written before "
                          "an MPI ensemble's members became those of parnn train --members, and "
                          "its members train with augment or dropout, whose draws this parnn "
                          "makes differently: resume it with the parnn that wrote it, or start "
                          "the run again")
    out = Path(opts.out or record.out)
    if d.get("mode") == "allreduce":
        return [(cfg, d, Share(first, record, out, saved.path.parent, {}))]
    # Each member carries on with its own settings (its seed, a recipe's); the settings given
    # again were checked against the run's (member 0's) above, and only those a resumed run may
    # change (epochs, threads) apply to every member.
    changes = {k: given.get(k) for k in ("epochs", "threads")}
    return [(cfg, d, Share(m, record, out, saved.path.parent, saved.extra if r == 0 else {},
                           cfg if r == 0 else resumed_config(m, record, changes)))
            for r, m in enumerate(saved.members)]
