"""An ensemble trained in one process: K members, one after another, each on every thread.

Member k (0-based) is the run's config with seed + k: its own initial weights, sample order,
dropout and augmentation draws. Every member trains on the same rows: the validation split is
drawn once, from the run's own seed, so no member has seen the images the ensemble is validated
on (with a different split per member, the vote would be scored on images most members trained
on). The ensemble predicts by soft vote, the mean of the members' class probabilities, as an MPI
ensemble does (parnn.distributed) and as parnn.load reads an ensemble file.

One after another rather than side by side: each member's matrix products already use every
core (BLAS), and K members at once would hold K workspaces; `mpiexec -n K parnn train
--distributed ensemble` trains them side by side, one per process.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from parnn.engines import scaled
from parnn.errors import ConfigError
from parnn.run import train as loop
from parnn.run.api import holdout, memory_check
from parnn.run.memory import SCORE_ROWS


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
    """The mean of the members' output probabilities for rows X (floats, or uint8 pixels:
    x / 255 in the members' dtype), (n, classes)."""
    Xf = scaled(X, nets[0].dtype)
    out = nets[0].forward(Xf)[-1].astype(np.float64)
    for net in nets[1:]:
        out += net.forward(Xf)[-1]
    return out / len(nets)


def vote_accuracy(nets, subset, batch=SCORE_ROWS):
    """The soft vote's accuracy on a Subset, a chunk of rows at a time."""
    correct = sum(int(np.count_nonzero(soft_vote(nets, X).argmax(axis=1) == y))
                  for X, y in subset.chunks(nets[0].spec.rows_at_once(batch)))
    return correct / len(subset)


def check_members(members):
    if not isinstance(members, int) or isinstance(members, bool) or members < 1:
        raise ConfigError(f"members must be an integer >= 1, got {members!r}")


def train_members(cfg, data, members, *, validation=None, log=print, **options):
    """Train `members` networks of cfg (seeds cfg.seed, cfg.seed + 1, ...) on data; returns
    Members. validation: a Subset scored after every epoch of every member; without one,
    cfg.validation_split of data's training set is held out once, from cfg.seed. The other
    options go to parnn.run.train.fit (progress, ...)."""
    check_members(members)
    memory_check(cfg, data)
    rows, validation = holdout(cfg, data, validation)   # once, from the run's seed
    test = None if data.X_test is None or not len(data.X_test) else \
        loop.Subset(data.X_test, data.y_test)
    results = []
    for k in range(members):
        if members > 1:
            log(f"member {k + 1} of {members} (seed {cfg.seed + k})")
        result = loop.fit(replace(cfg, seed=cfg.seed + k), data, rows=rows,
                          validation=validation, log=log, **options)
        results.append(result)
    nets = [r.net for r in results]
    val_acc = vote_accuracy(nets, validation) if validation is not None else None
    test_acc = vote_accuracy(nets, test) if test is not None else None
    return Members(results, val_acc, test_acc)
