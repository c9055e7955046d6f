"""The resume policy: what a resumed run keeps from its checkpoint, what may change, and the
checkpoint's record of the data and outputs it was trained with (docs/ROBUSTNESS.md).

A resumed run must compute what the interrupted one would have: so it keeps every setting that
changes the arithmetic (KEPT_ON_RESUME) and the same data, byte for byte (checked by digest;
the files may have moved). It may change how many epochs it runs, how many threads it uses,
how often it checkpoints and where its files go.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from parnn.errors import ConfigError, ModelFileError
from parnn.paths import path_kind
from parnn.run import checkpoint

# What a resumed run keeps: a setting given again may repeat the saved value, not change it.
KEPT_ON_RESUME = ("preset", "hidden", "layers", "activation", "output", "loss", "init", "dtype",
                  "optimizer", "lr", "lr_schedule", "warmup_epochs", "momentum", "weight_decay",
                  "batch_size", "validation_split", "early_stopping", "seed", "augment",
                  "dropout", "label_smoothing", "engine", "dataset", "limit_train", "limit_test")
MAY_CHANGE = "--epochs, --threads, --checkpoint-every, --out, --data and --no-progress"


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """The checkpoint's record of its data and outputs (meta["run"]): enough to find the same
    data again and know it is the same, and where the run's files go."""

    dataset: str                    # a name in parnn.data.DATASETS
    data_dir: str                   # absolute, where the data was read from
    sha256: dict                    # the data's digests (Dataset.sha256)
    limit_train: int | None
    limit_test: int | None
    out: str                        # absolute output directory
    checkpoint_every: int | None    # optimizer steps between checkpoints

    @classmethod
    def of(cls, data, limit_train, limit_test, out, checkpoint_every):
        """The record of a new run on `data` (a parnn.data.Dataset)."""
        return cls(data.name, str(Path(data.source).absolute()), data.sha256, limit_train,
                   limit_test, str(Path(out).absolute()), checkpoint_every)

    @classmethod
    def of_checkpoint(cls, ck, launched=False):
        """The record a checkpoint holds, checked; ModelFileError if it has none (a checkpoint
        written by parnn.run.train.fit alone, not by `parnn train`). launched: resumed by
        parnn.distributed, which checks the ranks itself (check_ranks); a single process
        refuses a --distributed run's checkpoint."""
        from parnn.data import DATASETS

        run = ck.run
        d = run.get("distributed")
        if d and not launched:
            command = checkpoint.resume_command(ck.path.parent, d.get("mode"), d.get("ranks"))
            raise ConfigError(f"{ck.path} is the checkpoint of a --distributed {d.get('mode')} "
                              f"run on {d.get('ranks')} ranks; one process would sum each "
                              f"batch's gradient in another order: continue it with `{command}`")
        counts_ok = all(run.get(k) is None or (type(run.get(k)) is int and run[k] >= 1)
                        for k in ("limit_train", "limit_test", "checkpoint_every"))
        if not (run.get("dataset") in DATASETS and isinstance(run.get("data_dir"), str)
                and isinstance(run.get("out"), str) and isinstance(run.get("sha256"), dict)
                and counts_ok):
            raise ModelFileError(f"{ck.path}: the checkpoint does not record its data and output "
                                 "directory (was it written by `parnn train`?)")
        return cls(**{f.name: run.get(f.name) for f in dataclasses.fields(cls)})

    def to_dict(self):
        return dataclasses.asdict(self)


def resumed_config(ck, record, given):
    """The config a resumed run trains with: the checkpoint's, with `given` settings (None: not
    given) checked against KEPT_ON_RESUME; epochs and threads may change."""
    saved = {**dataclasses.asdict(ck.config), **record.to_dict()}
    conflicts = [f"--{k.replace('_', '-')} {_show(given[k])} (it has {_show(saved[k])})"
                 for k in KEPT_ON_RESUME if given.get(k) is not None and given[k] != saved[k]]
    if conflicts:
        raise ConfigError(f"a resumed run keeps the settings of its checkpoint in "
                          f"{ck.path.parent}, but {'; '.join(conflicts)}: drop those flags "
                          f"({MAY_CHANGE} may change)")
    pos = ck.position
    epochs = given.get("epochs") if given.get("epochs") is not None else ck.config.epochs
    trained = pos.epoch - (pos.done == 0)  # epochs finished or begun
    if epochs < trained:
        raise ConfigError(f"--epochs {epochs} is fewer than the {trained} epoch(s) the checkpoint "
                          f"has already trained or begun: pass --epochs {trained} or more")
    # Threads change no result; the saved count may exceed this machine's cores.
    threads = given.get("threads") if given.get("threads") is not None else \
        min(ck.config.threads, os.cpu_count() or 1)
    engine = ck.engine if ck.config.engine == "auto" and ck.engine else ck.config.engine
    # The engine "auto" chose then, even if it would not now: the same engine, the same bits.
    return dataclasses.replace(ck.config, epochs=epochs, threads=threads, engine=engine)


def recorded_data(record, data_dir, dtype):
    """The data a checkpoint was trained on: from data_dir, else where it was, if still there;
    ConfigError if those bytes differ from the recorded ones."""
    from parnn.data import load_dataset

    where = data_dir or (record.data_dir if path_kind(record.data_dir, ConfigError) == "dir"
                         else None)
    ds = load_dataset(record.dataset, where, dtype, record.limit_train, record.limit_test)
    if ds.sha256 != record.sha256:
        raise ConfigError(f"the data in {ds.source} differs from the data the checkpoint was "
                          f"trained on (from {record.data_dir}): pass --data with that dataset")
    return ds


def refuse_unfinished(ckdir):
    """A new run must not rotate away the checkpoints of an unfinished one."""
    ck = checkpoint.peek(ckdir) if path_kind(ckdir, ConfigError) == "dir" else None
    if ck is not None and not ck.finished:
        raise ConfigError(f"{ckdir} holds the checkpoint of an unfinished run (epoch "
                          f"{ck.position.epoch} of {ck.config.epochs}, step {ck.step}): continue "
                          f"it with `{checkpoint.resume_command(ckdir)}`, or start over with "
                          "another --out or --checkpoint-dir (or delete that directory)")


def _show(value):
    if value is None:
        return "none"
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


# What another number of ranks would change, per --distributed mode.
RANKS_CHANGE = {
    "allreduce": "each batch would be split into {size} parts and its gradient summed in "
                 "another order, so the run would not continue bit for bit",
    "average": "each batch would be split into {size} parts and the {ranks} replicas and their "
               "optimizer states saved would not map onto {size} ranks",
    "ensemble": "the ensemble would have {size} members, on other shards with other seeds, "
                "instead of the {ranks} saved",
}


def check_ranks(saved, mode, size):
    """A distributed run resumes its checkpoint (parnn.distributed.checkpoints.Saved) with the
    same mode on the same number of ranks; ConfigError saying what would change otherwise."""
    directory = saved.path.parent
    d = saved.distributed
    if not d:
        raise ConfigError(f"{saved.path} is the checkpoint of a single-process run: continue it "
                          f"with `{checkpoint.resume_command(directory)}`")
    if d.get("mode") != mode:
        command = checkpoint.resume_command(directory, d.get("mode"), d.get("ranks"))
        raise ConfigError(f"{saved.path} is the checkpoint of a --distributed {d.get('mode')} "
                          f"run, not {mode}: continue it with `{command}`")
    if d.get("ranks") != size:
        why = RANKS_CHANGE.get(mode, "").format(size=size, ranks=d.get("ranks"))
        raise ConfigError(f"{saved.path} was trained on {d.get('ranks')} ranks, this job has "
                          f"{size}: {why}; continue it with "
                          f"`{checkpoint.resume_command(directory, mode, d.get('ranks'))}`")
