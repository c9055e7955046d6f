"""Is this process one of several that an MPI launcher started? Read from the environment the
launchers set, without importing mpi4py (so without starting MPI).

`mpiexec -n 2 parnn train` without --distributed would run two identical trainings writing the
same files: the CLI refuses it. And a rank that fails before MPI starts (a bad flag on one rank
of an MPMD launch) must still take part in the set-up exchange of the ranks that did start, or
they wait for it forever (distributed.fail_early).
"""

from __future__ import annotations

import os

# (rank variable, size variable) of each launcher family; None: that launcher sets no size.
LAUNCHERS = (
    ("PMI_RANK", "PMI_SIZE"),                            # MPICH's Hydra, Intel MPI
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),    # Open MPI
    ("PMIX_RANK", None),                                 # PMIx (Open MPI 5, prrte, Slurm)
    ("MPI_LOCALRANKID", "MPI_LOCALNRANKS"),              # MPICH and Intel MPI, this node's share
)


def launched():
    """(rank, size) if an MPI launcher started this process, else None. size is None when the
    launcher says which rank this is but not how many there are."""
    for rank_var, size_var in LAUNCHERS:
        rank = _int(os.environ.get(rank_var))
        if rank is None:
            continue
        size = _int(os.environ.get(size_var)) if size_var else None
        return rank, size
    return None


def several():
    """An MPI launcher started this process as one of several (or of an unknown number)."""
    found = launched()
    return found is not None and (found[1] is None or found[1] > 1)


def describe():
    """How the environment says so, for a message: 'PMI_SIZE=2', 'PMIX_RANK=1'."""
    for rank_var, size_var in LAUNCHERS:
        if _int(os.environ.get(rank_var)) is not None:
            if size_var and _int(os.environ.get(size_var)) is not None:
                return f"{size_var}={os.environ[size_var]}"
            return f"{rank_var}={os.environ[rank_var]}"
    return "no launcher"


def _int(text):
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None
