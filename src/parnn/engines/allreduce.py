"""Data-parallel training over MPI around the batch engine: allreduce (one Allreduce of the
gradient per batch, the batch engine's gradient-reduce hook) and average (local SGD: each rank
steps on its own part of every batch, the parameters averaged every K steps).

allreduce: every rank holds the same network. Each global batch of B samples is split into
`size` contiguous parts; each rank computes its part's gradient scaled by 1/B, an in-place
Allreduce(SUM) of the gradient gives every rank the batch's mean gradient, and every rank takes
the same optimizer step. So training equals one process at batch B up to rounding, and all
ranks end with bitwise-identical weights. A batch with fewer samples than ranks leaves some
ranks a zero gradient to add. With overlap (the default) each layer's gradient is reduced as
soon as backward has produced it (MLP.backward's on_layer hook): one non-blocking Iallreduce
per layer, last layer first, all waited for before the step, so the sums travel while the
layers below are still computed. Every element is summed over the same ranks either way, so
on 2 ranks overlapped and blocking are bitwise identical (a + b == b + a).

average: the same parts of the same global batches, but each rank takes its own step with its
part's mean gradient (scaled by 1/b, not 1/B) and no communication; every `every` optimizer
steps (and when the caller asks, at an epoch's end) one Allreduce averages the parameters.
Optimizer state (momentum's v, Adam's m and v) stays each rank's own: only parameters travel.
With plain SGD and every=1 it is allreduce: the mean over ranks of w - lr*g_r is w - lr*mean(g_r),
and mean(g_r) is the batch's mean gradient when every part has B/size samples.

mpi4py is imported only by the methods that talk to MPI: importing this module needs no MPI.
`comm` is an mpi4py Intracomm or parnn.distributed.watchdog.Watched (whose waits are watched).
"""

from __future__ import annotations

import time

import numpy as np

from parnn.engines import EpochStats
from parnn.engines.batch import BatchEngine


def _sum(comm, buf):
    """In-place Allreduce(SUM) of buf over comm."""
    from mpi4py import MPI

    comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)   # buffer API: no pickling


def _wait(comm, request):
    wait = getattr(comm, "wait", None)   # Watched: polled, with the watchdog
    if wait is not None:
        wait(request, "Allreduce")
    else:
        request.Wait()


def flat_range(g_l):
    """(root, start, stop): the flat buffer a layer's gradient views g_l live in, and the
    contiguous range they cover ([W | b], see parnn.core.model)."""
    root = g_l[0]
    while isinstance(root.base, np.ndarray):
        root = root.base
    offsets = [(a.ctypes.data - root.ctypes.data) // a.itemsize for a in g_l]
    return root, min(offsets), max(o + a.size for o, a in zip(offsets, g_l))


class _Replicas:
    """What allreduce and average share: the first call's broadcast, the split of each batch,
    the stats summed over the ranks."""

    takes_pixels = True       # uint8 X goes to the batch engine, which scales its gathers:
                              # every rank holds the training set, a quarter of float32's size

    def __init__(self, comm, augment=None, dropout=None):
        self.comm = comm
        self.comm_seconds = 0.0   # inside MPI: transfer AND waiting for the slowest rank
        self.calls = 0            # reductions: gradients (or averages) and stats
        # augmentation and dropout draw by (seed, epoch, sample number): whichever rank trains
        # a sample draws what one process would
        self.batch = BatchEngine(reducer=self, augment=augment, dropout=dropout)
        self.synced = False       # set by a resumed run whose ranks restored their own state

    @property
    def augment(self):
        return self.batch.augment

    @property
    def dropout(self):
        return self.batch.dropout

    def check(self, spec, optimizer, batch_size):
        self.batch.check(spec, optimizer, batch_size)

    def info(self):
        return {**self.batch.info(), "engine": self.name, "ranks": self.comm.Get_size()}

    def part(self, idx):
        """This rank's contiguous part of the global batch idx (sizes differ by at most one)."""
        rank, size = self.comm.Get_rank(), self.comm.Get_size()
        return idx[len(idx) * rank // size:len(idx) * (rank + 1) // size]

    def _allreduce(self, buf):
        t = time.perf_counter()
        _sum(self.comm, buf)
        self.comm_seconds += time.perf_counter() - t
        self.calls += 1

    def _start(self, net):
        if not self.synced:
            # Same seed means same init already; the broadcast makes sure of it even across
            # machines whose NumPy draws differently.
            self.comm.Bcast(net.params, root=0)
            self.synced = True

    def _global(self, mine):
        """Once per call, so every rank reports the global loss and accuracy."""
        sums = np.array([mine.loss_sum, mine.correct, mine.n], dtype=np.float64)
        self._allreduce(sums)
        return EpochStats(float(sums[0]), int(sums[1]), int(sums[2]))


class AllreduceEngine(_Replicas):
    """The engine protocol (parnn.engines) for data-parallel training over the communicator
    `comm`; all ranks must call train with the same arguments. overlap: reduce each layer's
    gradient as backward produces it (else one Allreduce after the whole backward).
    augment, dropout: the batch engine's options (parnn.run.config.engine_options)."""

    name = "allreduce"

    def __init__(self, comm, overlap=True, augment=None, dropout=None):
        super().__init__(comm, augment, dropout)
        self.overlap = overlap
        self._pending = []        # this batch's started Iallreduce requests
        self._flat = {}           # id(a layer's gradient views) -> (views, its flat slice)

    # --- the gradient-reduce hook of the batch engine -------------------------------------------

    def on_layer(self, l, g_l):
        if not self.overlap or not g_l:   # blocking, or a layer without parameters
            return
        from mpi4py import MPI

        t = time.perf_counter()
        known = self._flat.get(id(g_l))   # MLP keeps the same views for the same buffer
        if known is None or known[0] is not g_l:
            root, start, stop = flat_range(g_l)
            known = self._flat[id(g_l)] = (g_l, root[start:stop])
        self._pending.append(self.comm.Iallreduce(MPI.IN_PLACE, known[1], op=MPI.SUM))
        MPI.Request.Testall(self._pending)   # MPICH moves messages only inside MPI calls
        self.comm_seconds += time.perf_counter() - t

    def reduce(self, grad):
        if not self._pending:           # blocking (or a network that never called on_layer)
            self._allreduce(grad)
            return
        t = time.perf_counter()
        for request in self._pending:
            _wait(self.comm, request)
        self._pending.clear()
        self.comm_seconds += time.perf_counter() - t
        self.calls += 1

    # --- the engine -----------------------------------------------------------------------------

    def train(self, net, opt, X, T, order, batch_size, **when):
        self._start(net)
        return self._global(self.batch.train(net, opt, X, T, order, batch_size, **when))


class AverageEngine(_Replicas):
    """The engine protocol for local SGD over `comm`: see the module's docstring. every: the
    optimizer steps between two averages of the parameters (counted by opt.t, so a resumed
    run averages where the interrupted one would have). augment, dropout: as allreduce's."""

    name = "average"

    def __init__(self, comm, every, augment=None, dropout=None):
        super().__init__(comm, augment, dropout)
        self.every = int(every)
        self.averaged_at = None   # opt.t of the last average
        self._scale = 1.0

    def part(self, idx):
        mine = super().part(idx)
        self._scale = len(idx) / max(len(mine), 1)   # 1/B -> 1/b: this part's mean gradient
        return mine

    def reduce(self, grad):   # no communication: each rank steps on its own gradient
        grad *= self._scale

    def average(self, net, opt):
        """Average the parameters over the ranks (once per step count)."""
        if self.averaged_at == opt.t:
            return
        self._allreduce(net.params)
        net.params /= self.comm.Get_size()
        self.averaged_at = opt.t

    def train(self, net, opt, X, T, order, batch_size, **when):
        self._start(net)
        stats, start = EpochStats(), 0
        while start < len(order):   # up to the next step that is a multiple of `every`
            stop = start + (self.every - opt.t % self.every) * batch_size
            stats += self.batch.train(net, opt, X, T, order[start:stop], batch_size, **when)
            start = stop
            if opt.t % self.every == 0:
                self.average(net, opt)
        return self._global(stats)
