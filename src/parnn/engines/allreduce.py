"""Synchronous data-parallel training over MPI: the batch engine, with an Allreduce of its
gradient as the gradient-reduce hook.

Every rank holds the same network. Each global batch of B samples is split into `size`
contiguous parts; each rank computes its part's gradient scaled by 1/B, one in-place
Allreduce(SUM) of the flat gradient buffer gives every rank the batch's mean gradient, and every
rank takes the same optimizer step. So training equals one process at batch B up to rounding,
and all ranks end with bitwise-identical weights. A batch with fewer samples than ranks leaves
some ranks a zero gradient to add.

mpi4py is imported only by the methods that talk to MPI: importing this module needs no MPI.
"""

from __future__ import annotations

import time

import numpy as np

from parnn.engines import EpochStats
from parnn.engines.batch import BatchEngine


class AllreduceEngine:
    """The engine protocol (parnn.engines) for data-parallel training over the communicator
    `comm` (an mpi4py Intracomm); all ranks must call train with the same arguments."""

    name = "allreduce"

    def __init__(self, comm):
        self.comm = comm
        self.comm_seconds = 0.0   # inside Allreduce: transfer AND waiting for the slowest rank
        self.calls = 0            # Allreduce calls: one per batch, one per train() for the stats
        self.batch = BatchEngine(reducer=self)
        self._synced = False

    def check(self, spec, optimizer, batch_size):
        self.batch.check(spec, optimizer, batch_size)

    def info(self):
        return {**self.batch.info(), "engine": self.name, "ranks": self.comm.Get_size()}

    # --- the gradient-reduce hook of the batch engine -------------------------------------------

    def part(self, idx):
        """This rank's contiguous part of the global batch idx (sizes differ by at most one)."""
        rank, size = self.comm.Get_rank(), self.comm.Get_size()
        return idx[len(idx) * rank // size:len(idx) * (rank + 1) // size]

    def reduce(self, grad):
        self._allreduce(grad)

    def _allreduce(self, buf):
        from mpi4py import MPI

        t = time.perf_counter()
        self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)   # buffer API: no pickling
        self.comm_seconds += time.perf_counter() - t
        self.calls += 1

    # --- the engine -----------------------------------------------------------------------------

    def train(self, net, opt, X, T, order, batch_size):
        if not self._synced:
            # Same seed means same init already; the broadcast makes sure of it even across
            # machines whose NumPy draws differently.
            self.comm.Bcast(net.params, root=0)
            self._synced = True
        mine = self.batch.train(net, opt, X, T, order, batch_size)
        # Once per call, so every rank reports the global loss and accuracy.
        sums = np.array([mine.loss_sum, mine.correct, mine.n], dtype=np.float64)
        self._allreduce(sums)
        return EpochStats(float(sums[0]), int(sums[1]), int(sums[2]))
