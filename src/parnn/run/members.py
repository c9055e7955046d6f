"""An ensemble trained in one process: K members, one after another, each on every thread.

Member k (0-based) is the run's config with seed + k: its own initial weights, sample order,
dropout and augmentation draws. Given recipes (a list of settings, MEMBER_RECIPES names a few),
member k also takes the settings of recipes[k % len(recipes)]: members that differ in how they
train, not only in their seed, make fewer of the same mistakes (docs/ACCURACY.md, "Ensembles").
Every member keeps the run's network shape, so that the ensemble is one file of one spec.

Every member trains on the same rows: the validation split is drawn once, from the run's own
seed, so no member has seen the images the ensemble is validated on (with a different split
per member, the vote would be scored on images most members trained on). The ensemble predicts
by soft vote, the mean of the members' class probabilities, as an MPI ensemble does
(parnn.distributed) and as parnn.load reads an ensemble file.

One after another rather than side by side: each member's matrix products already use every
core (BLAS), and K members at once would hold K workspaces; `mpiexec -n K parnn train
--distributed ensemble` trains them side by side, one per process.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

from parnn.core.model import soft_vote as vote
from parnn.engines import scaled
from parnn.errors import ConfigError
from parnn.run import train as loop
from parnn.run.api import holdout, memory_check
from parnn.run.config import override
from parnn.run.memory import SCORE_ROWS

# The settings that make the network itself (its Spec): a member recipe may not change them.
SHAPE_SETTINGS = ("hidden", "layers", "activation", "output", "loss", "dtype")
# What each member trains with, cycled over the members (`parnn train --member-recipe NAME`):
# "seeds", the run's settings for all; "shift1", every other member trained on batches shifted
# by up to a pixel (--augment shift1), whose mistakes differ more from the plain members' than
# another seed's do (docs/ACCURACY.md, "Ensembles": what it gains, and what it does not).
MEMBER_RECIPES = {
    "seeds": ({},),
    "shift1": ({}, {"augment": "shift1"}),
}


@dataclass
class Members:
    """What train_members returns: each member's Result, and the vote's accuracies."""

    results: list           # parnn.run.train.Result, one per member, in seed order
    val_acc: float | None   # the soft vote on the validation rows (None: no validation set)
    test_acc: float | None  # the soft vote on the test set, scored once at the end

    @property
    def nets(self):
        return [r.net for r in self.results]


def soft_vote(nets, X):
    """The members' soft vote (parnn.core.model.soft_vote) for rows X (floats, or uint8
    pixels: x / 255 in the members' dtype), (n, classes)."""
    Xf = scaled(X, nets[0].dtype)
    return vote(net.forward(Xf)[-1] for net in nets)


def vote_accuracy(nets, subset, batch=SCORE_ROWS):
    """The soft vote's accuracy on a Subset, a chunk of rows at a time."""
    correct = sum(int(np.count_nonzero(soft_vote(nets, X).argmax(axis=1) == y))
                  for X, y in subset.chunks(nets[0].spec.rows_at_once(batch)))
    return correct / len(subset)


def check_members(members):
    if not isinstance(members, int) or isinstance(members, bool) or members < 1:
        raise ConfigError(f"members must be an integer >= 1, got {members!r}")


def _recipes(recipes):
    """recipes as a list of settings dicts (None: "seeds"; a name: MEMBER_RECIPES')."""
    if recipes is None or isinstance(recipes, str):
        if (recipes or "seeds") not in MEMBER_RECIPES:
            raise ConfigError(f"unknown member recipe {recipes!r}: choose one of "
                              f"{', '.join(MEMBER_RECIPES)}")
        return MEMBER_RECIPES[recipes or "seeds"]
    if not isinstance(recipes, (list, tuple)) or not recipes \
            or not all(isinstance(r, dict) for r in recipes):
        raise ConfigError("member recipes must be a list of one or more dicts of settings, or "
                          f"one of the names {', '.join(MEMBER_RECIPES)}; got {recipes!r:.60}")
    return list(recipes)


def member_configs(cfg, members, recipes=None, n_in=784, n_out=10, validation_given=False):
    """The config of each member: cfg with seed + k and, given recipes (settings dicts, or a
    name in MEMBER_RECIPES), the settings of recipes[k % len(recipes)]. Everything a member
    could be refused for is checked here, before any member trains: a recipe that changes the
    network (one ensemble file holds one spec), an engine that cannot take a recipe's settings,
    early stopping without a validation split (or a validation set given: validation_given),
    K members' weights beyond the memory."""
    from parnn.run.config import check_engine
    from parnn.run.memory import check_kept

    check_members(members)
    recipes = _recipes(recipes)
    for fixed in ("seed", "validation_split"):   # member k's seed is seed + k; one split for all
        if any(fixed in r for r in recipes):
            raise ConfigError(f"a member recipe cannot set {fixed}: it is the run's for every "
                              "member (member k trains with seed + k, on one split)")
    spec = cfg.spec(n_in, n_out)
    check_kept(spec, members, "members")     # before K configs are made: K may be huge
    for recipe in recipes[:members]:         # each kind of member, once
        kind = override(cfg, **recipe)
        if kind.spec(n_in, n_out) != spec:
            changed = ", ".join(f"{k} {getattr(kind, k)!r} instead of {getattr(cfg, k)!r}"
                                for k in SHAPE_SETTINGS if getattr(kind, k) != getattr(cfg, k))
            raise ConfigError(f"a member recipe changes the network ({changed}): the members "
                              "of one ensemble share one network")
        check_engine(kind, spec)
        loop.check_early_stopping(kind, bool(kind.validation_split) or validation_given)
    return [override(cfg, **recipes[k % len(recipes)], seed=cfg.seed + k)
            for k in range(members)]


def train_members(cfg, data, members, *, recipes=None, validation=None, log=print,
                  on_member=lambda result: None, **options):
    """Train `members` networks of cfg (seeds cfg.seed, cfg.seed + 1, ...; recipes: see
    member_configs) on data; returns Members. validation: a Subset scored after every epoch of
    every member; without one, cfg.validation_split of data's training set is held out once,
    from cfg.seed. on_member(result) hears of each member trained. The other options go to
    parnn.run.train.fit (progress, ...)."""
    configs = member_configs(cfg, members, recipes, data.X_train.shape[1],
                             len(data.class_names), validation_given=validation is not None)
    for member in configs[:len(_recipes(recipes))]:     # each kind of member, once
        memory_check(member, data)   # a recipe may change the batch size
    rows, validation = holdout(cfg, data, validation)   # once, from the run's seed
    test = None if data.X_test is None or not len(data.X_test) else \
        loop.Subset(data.X_test, data.y_test)
    results = []
    for k, member in enumerate(configs):
        if members > 1:
            log(f"member {k + 1} of {members} (seed {member.seed}{_differs(cfg, member)})")
        result = loop.fit(member, data, rows=rows, validation=validation, log=log, **options)
        results.append(result)
        on_member(result)
    nets = [r.net for r in results]
    val_acc = vote_accuracy(nets, validation) if validation is not None else None
    test_acc = vote_accuracy(nets, test) if test is not None else None
    return Members(results, val_acc, test_acc)


def _differs(cfg, member):
    """', augment shift1': the settings in which a member differs from the run, as text."""
    a, b = cfg.to_dict(), member.to_dict()
    return "".join(f", {k.replace('_', '-')} {b[k]}" for k in a if k != "seed" and a[k] != b[k])


@contextlib.contextmanager
def _stopped_by_signals(done, members):
    """SIGINT or SIGTERM while members train: stop at once, with one line saying what is lost
    (an ensemble is saved whole, at the end; --members keeps no checkpoints) and status 128 +
    the signal. Without this, SIGTERM killed the process silently and left its locks."""
    import signal

    from parnn.run.checkpoint import Interrupted, handling_signals

    caught = []

    def handler(signum, frame):
        caught.append(signum)
        raise KeyboardInterrupt

    try:
        with handling_signals(handler):
            yield
    except KeyboardInterrupt:
        signum = caught[0] if caught else signal.SIGINT
        raise Interrupted(f"stopped by {signal.Signals(signum).name} after {len(done)} of "
                          f"{members} members had trained: --members saves the ensemble only "
                          "when all have trained and keeps no checkpoints, so no ensemble was "
                          "saved", signum) from None


def start(cfg, opts, members, recipes=None, log=print, warn=None):
    """`parnn train --members K`: a new run of K members (opts: a parnn.run.session.RunOptions
    without checkpoints), saved as one ensemble file that parnn evaluate, parnn.load and parnn
    export read, beside history.json (each member's config and history). Returns (Members,
    {name: path})."""
    from parnn import atomic, io
    from parnn.data import load_dataset
    from parnn.paths import check_output_dir
    from parnn.run import outputs, rundir, session
    from parnn.run.config import capped_threads

    if opts.checkpoint_dir is not None or opts.checkpoint_every is not None:
        raise ConfigError("--members trains without checkpoints: drop --checkpoint-dir and "
                          "--checkpoint-every")
    cfg = capped_threads(cfg, warn)
    configs = member_configs(cfg, members, recipes)       # refused before the data loads
    out = outputs.out_dir(cfg, opts.out)
    check_output_dir(out, "--out", files=outputs.FILES)
    rundir.refuse_in_use(out, "--out")
    session.refuse_replacing(out, out / "checkpoints", opts.overwrite)
    dataset = opts.dataset or "fashion-mnist"
    session.check_plan(cfg, dataset, opts.limit_train, opts.limit_test)
    ds = load_dataset(dataset, opts.data, "uint8", opts.limit_train, opts.limit_test)
    ckdir = out / "checkpoints"
    done = []                                   # the members trained so far, for the message
    with session.hold(out, ckdir):
        session.clear(out, ckdir, opts.overwrite)
        with _stopped_by_signals(done, members):    # training only: not the save below
            ens = train_members(cfg, ds, members, recipes=recipes, progress=opts.progress,
                                log=log, test_every_epoch=opts.test_every_epoch,
                                on_member=done.append)
        meta = outputs.model_metadata(ens.results[0], ds)
        meta.update(test_acc=ens.test_acc, val_acc=ens.val_acc, members=members,
                    seeds=[c.seed for c in configs],
                    member_configs=[c.to_dict() for c in configs])
        files = outputs.paths(out)
        for single in ("history_csv", "plot"):    # one network's history: not an ensemble's
            with contextlib.suppress(FileNotFoundError):   # nor a replaced run's: remove it
                files.pop(single).unlink()
        io.save_ensemble(files["model"], ens.nets, meta)
        atomic.atomic_write_json(files["history_json"], {
            "config": cfg.to_dict(), "test_acc": ens.test_acc, "val_acc": ens.val_acc,
            "members": [{"config": r.config.to_dict(), "engine": r.engine,
                         "test_acc": r.test_acc, "history": r.history} for r in ens.results]})
    return ens, files
