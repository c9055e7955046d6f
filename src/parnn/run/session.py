"""A run as `parnn train` makes it, from options to saved files.

    start(cfg, opts)                   a new run: check where files go, load the data, train
    resume(directory, opts, settings)  carry on from the checkpoint in directory (run/resume.py)

Both train through parnn.run.api.run_training (the path parnn.train takes too), checkpoint as
they go (run/checkpoint.py), write history.csv a row per epoch and save what a run saves
(run/outputs.py), and return (Result, {name: path of each file}). Every refusal is a ParnnError
saying why, raised before anything is trained or written.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from parnn.errors import ConfigError, ParnnError
from parnn.paths import check_output_dir
from parnn.paths import shown
from parnn.run import api, checkpoint, memory, outputs, rundir
from parnn.run.config import capped_threads, check_engine
from parnn.run.resume import RunRecord, recorded_data, refuse_unfinished, resumed_config

# Both datasets parnn knows are 28x28 images (parnn.data.DATASETS gives their classes).
N_FEATURES = 28 * 28


@dataclass(frozen=True)
class RunOptions:
    """Where a run's data comes from and where its files go: nothing that changes the result."""

    dataset: str | None = None            # None: fashion-mnist (resume: the checkpoint's)
    data: Path | None = None              # None: parnn.data's search (resume: where it was)
    limit_train: int | None = None        # train on the first N samples only
    limit_test: int | None = None
    out: Path | None = None               # None: runs/PRESET (resume: the checkpoint's)
    checkpoint_dir: Path | None = None    # None: OUT/checkpoints
    checkpoint_every: int | None = None   # optimizer steps; None: after every epoch only
    progress: bool = True
    test_every_epoch: bool = False        # score the test set after each epoch, not only at the end
    overwrite: bool = False               # a new run may replace a trained model in `out`

    def __post_init__(self):
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise ConfigError(f"--checkpoint-every must be >= 1 (optimizer steps), "
                              f"got {self.checkpoint_every}")


def start(cfg, opts, log=print, warn=None):
    """A new run of cfg (a checked TrainConfig). warn(message) hears of --threads capped."""
    from parnn.data import load_dataset

    cfg = capped_threads(cfg, warn)
    out = outputs.out_dir(cfg, opts.out)
    ckdir = opts.checkpoint_dir or out / "checkpoints"
    check_output_dir(out, "--out", files=outputs.FILES)
    check_output_dir(ckdir, "--checkpoint-dir", files=checkpoint.FILES)
    rundir.refuse_in_use(out, "--out")
    rundir.refuse_in_use(ckdir, "--checkpoint-dir")
    refuse_replacing(out, ckdir, opts.overwrite)
    dataset = opts.dataset or "fashion-mnist"
    check_plan(cfg, dataset, opts.limit_train, opts.limit_test)
    # The images as stored (uint8): the engines scale them a batch or a sample at a time.
    ds = load_dataset(dataset, opts.data, "uint8", opts.limit_train, opts.limit_test)
    with hold(out, ckdir):
        clear(out, ckdir, opts.overwrite)
        record = RunRecord.of(ds, opts.limit_train, opts.limit_test, out, opts.checkpoint_every)
        return _train_and_save(cfg, ds, out, ckdir, record, None, opts, log)


def resume(directory, opts, settings, warn=None, log=print):
    """Carry on the run whose checkpoints are in directory (or directory/checkpoints).

    settings: TrainConfig settings given again (None: not given); KEPT_ON_RESUME ones must
    repeat the saved values, epochs and threads may change. warn(message) hears of a damaged
    newest checkpoint that was passed over for the previous one, and of --threads capped."""
    ck, record, cfg = resumed(directory, opts, settings, warn)
    out = Path(opts.out or record.out)
    check_output_dir(out, "--out", files=outputs.FILES)
    check_output_dir(ck.path.parent, "--resume", files=checkpoint.FILES)
    rundir.refuse_in_use(out, "--out")
    rundir.refuse_in_use(ck.path.parent, "--resume")
    check_plan(capped_threads(cfg), record.dataset, record.limit_train, record.limit_test)
    ds = recorded_data(record, opts.data, "uint8")   # the data may have moved (--data)
    ckdir = ck.path.parent
    with rundir.hold(out, "--out"), _hold_also(ckdir, out, "--resume"):
        # Read again under the lock: another run may have carried it on meanwhile.
        ck, record, cfg = resumed(directory, opts, settings)
        cfg = capped_threads(cfg, warn)
        rundir.sweep(out, outputs.FILES)
        rundir.sweep(ckdir, checkpoint.FILES)
        record = replace(record, out=str(out.absolute()),
                         checkpoint_every=opts.checkpoint_every or record.checkpoint_every)
        return _train_and_save(cfg, ds, out, ckdir, record, ck, opts, log)


def hold(out, ckdir):
    """The locks of a new run's output and checkpoint directories (one lock if they are one)."""
    import contextlib

    stack = contextlib.ExitStack()
    with stack:
        stack.enter_context(rundir.hold(out, "--out"))
        stack.enter_context(_hold_also(ckdir, out, "--checkpoint-dir"))
        return stack.pop_all()


def clear(out, ckdir, overwrite):
    """Holding hold(out, ckdir): refuse again (another run may have finished meanwhile), drop
    the checkpoints of a run being replaced (a fallback would resume the old run), remove what
    killed runs left half-written."""
    refuse_replacing(out, ckdir, overwrite)
    if overwrite:
        for name in rundir.existing(ckdir, checkpoint.FILES):
            (Path(ckdir) / name).unlink()
    rundir.sweep(out, outputs.FILES)
    rundir.sweep(ckdir, checkpoint.FILES)


def _hold_also(directory, held, flag):
    """rundir.hold(directory), unless it is the directory already held (one lock each)."""
    import contextlib

    if Path(directory).absolute() == Path(held).absolute():
        return contextlib.nullcontext()
    return rundir.hold(directory, flag)


def check_plan(cfg, dataset, limit_train=None, limit_test=None, processes=1):
    """Before the data loads: an explicit engine that refuses the run, and a run that needs more
    memory than this machine has (processes: how many such runs share it, MPI ranks)."""
    from parnn.data import DATASETS

    known = DATASETS.get(dataset)
    if known is None:
        return   # load_dataset says which names exist
    spec = cfg.spec(N_FEATURES, len(known.classes))
    check_engine(cfg, spec)
    n_train, n_test = known.samples("train"), known.samples("t10k")
    memory.check(cfg, spec, min(n_train, limit_train or n_train),
                 min(n_test, limit_test or n_test), processes)


def refuse_replacing(out, ckdir, overwrite=False):
    """A new run must not silently replace a trained model or another run's checkpoints; an
    unfinished run's checkpoints are kept even with overwrite (resume it, or delete them)."""
    refuse_unfinished(ckdir)
    if overwrite:
        return
    model = rundir.existing(out, ("model.safetensors",))
    if model:
        raise ConfigError(f"--out {shown(out)} already holds a trained model "
                          f"({model[0]}): pass --overwrite to replace it and its history, or "
                          "choose another --out")
    if rundir.existing(ckdir, checkpoint.FILES):
        raise ConfigError(f"{shown(ckdir)} holds the checkpoints of a finished run whose model "
                          f"is not in --out {shown(out)}: pass --overwrite to replace them, "
                          f"`{checkpoint.resume_command(ckdir)}` to write its model, or choose "
                          "another --out or --checkpoint-dir")


def resumed(directory, opts, settings, warn=None):
    """(checkpoint, its RunRecord, the config the resumed run trains with), checked: what
    resume() carries on, and what `parnn train --resume DIR --show-config` shows."""
    if opts.checkpoint_dir is not None:
        raise ConfigError("--checkpoint-dir cannot be combined with --resume: a resumed run "
                          "goes on writing its checkpoints into the --resume directory")
    ck = checkpoint.load(directory, warn=warn)
    record = RunRecord.of_checkpoint(ck)
    given = dict(settings, dataset=opts.dataset, limit_train=opts.limit_train,
                 limit_test=opts.limit_test)
    return ck, record, resumed_config(ck, record, given)


def _train_and_save(cfg, ds, out, ckdir, record, resume_from, opts, log):
    checkpoints = checkpoint.Checkpointer(ckdir, record.checkpoint_every, record.to_dict())
    rows = resume_from.position.history if resume_from is not None else ()
    live = outputs.LiveHistory(outputs.paths(out)["history_csv"], rows, test=True)

    def on_epoch(row):   # after the epoch's checkpoint: a failure here loses nothing
        try:
            live.append(row)
        except OSError as e:
            raise ParnnError(f"{live.path}: cannot write the history ({e.strerror or e}); "
                             f"fix that and run `{checkpoint.resume_command(ckdir)}`") from None

    result = api.run_training(cfg, ds, progress=opts.progress, log=log, checkpoints=checkpoints,
                              resume=resume_from, on_epoch=on_epoch,
                              test_every_epoch=opts.test_every_epoch)
    # Only the data's identity goes into the files: free its arrays before matplotlib loads for
    # the plot, or that moment sets the run's peak memory (docs/ROBUSTNESS.md).
    ds.X_train = ds.X_test = None
    try:
        return result, outputs.save_run(out, result, ds)
    except OSError as e:
        raise ParnnError(f"{out}: cannot write the results ({e.strerror or e}); the trained "
                         f"network is in the checkpoint: fix that and run "
                         f"`{checkpoint.resume_command(ckdir)}`") from None
