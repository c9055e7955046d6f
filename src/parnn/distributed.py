"""Many networks and many processes: ensemble voting, and (with mpi4py) MPI training.

mpi4py is imported only by the functions that need it, so single-process use never needs MPI.
"""

from __future__ import annotations

import numpy as np

VOTES = ("soft", "hard")


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
