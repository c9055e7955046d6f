"""Mini-batch and full-batch training: the network's own forward and backward (parnn.core) run
into a workspace allocated once, BLAS for the matrix products, any optimizer of parnn.core.optim.
The fast path of the modern preset.

Per batch of B samples:

    gather    X, T rows of the batch into preallocated buffers (np.take, out=)
    forward   net.forward(X, out=workspace)      each layer straight into its buffer
    backward  net.backward(..., deltas=workspace) each layer's gradient straight into its view of
              the flat gradient buffer, its deltas into preallocated buffers
    reduce    the gradient-reduce hook, for data-parallel training (see BatchEngine)
    step      opt.step(params, grad) on the flat buffers (Adam's is one compiled pass)

So the math is the numpy engine's, written once in parnn.core; this engine only removes the
allocations and the per-batch copies. BLAS threads are whatever the caller set (threadpoolctl);
with float32 data and parameters nothing is ever converted. A full batch (every sample at once)
uses X as it is instead of gathering it in the shuffled order: the gradient is a sum over all
samples, so only the rounding order changes.
"""

from __future__ import annotations

import numpy as np

from parnn.core.losses import n_correct
from parnn.core.optim import OPTIMIZERS
from parnn.engines import EpochStats, contiguous_inputs
from parnn.errors import ConfigError


class Workspace:
    """Every per-batch array, allocated once for (network, batch size): the gathered inputs and
    targets, each layer's outputs and deltas, and the flat gradient buffer."""

    def __init__(self, spec, B):
        dt = np.dtype(spec.dtype)
        self.key = (spec, B)
        self.X = np.empty((B, spec.sizes[0]), dt)
        self.T = np.empty((B, spec.sizes[-1]), dt)
        shapes = [(B, *layer.out_shape) for layer in spec.layers()]
        self.A = [np.empty(s, dt) for s in shapes]       # each layer's output
        self.D = [np.empty(s, dt) for s in shapes]       # dL/d(each layer's output), scratch
        self.grad = np.empty(spec.n_params, dt)

    @staticmethod
    def rows(buffers, b):
        """The first b rows of each buffer (a short last batch)."""
        return buffers if len(buffers[0]) == b else [a[:b] for a in buffers]


class BatchEngine:
    """The engine protocol (parnn.engines) over mini-batches.

    reducer: None for one process. For data-parallel training (parnn.engines.allreduce), the
    gradient-reduce hook, an object with
        part(idx)     the samples of the global batch `idx` this process computes
        reduce(grad)  sums the flat gradient over the processes, in place, before the step
    Each part's gradient is scaled by 1/len(idx) of the GLOBAL batch, so the sum is the batch's
    mean gradient and every process takes the same step. Stats are this process's part only.
    """

    name = "batch"

    def __init__(self, reducer=None):
        self.reducer = reducer
        self._ws = None

    def check(self, spec, optimizer, batch_size):
        opt = getattr(optimizer, "name", optimizer)
        if opt not in OPTIMIZERS:
            raise ConfigError(f"engine batch: unknown optimizer {opt!r}: choose one of "
                              f"{', '.join(OPTIMIZERS)}")
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ConfigError(f"engine batch: batch size must be a whole number >= 1, "
                              f"got {batch_size!r}")

    def info(self):
        from threadpoolctl import threadpool_info
        blas = [{k: d.get(k) for k in ("internal_api", "architecture", "num_threads", "version")}
                for d in threadpool_info() if d.get("user_api") == "blas"]
        return {"engine": self.name, "blas": blas}

    def workspace(self, spec, B):
        if self._ws is None or self._ws.key != (spec, B):
            self._ws = None                      # free the old buffers before the new ones
            self._ws = Workspace(spec, B)
        return self._ws

    def train(self, net, opt, X, T, order, batch_size):
        self.check(net.spec, opt, batch_size)
        X, T, order = contiguous_inputs(net, X, T, order)
        B = min(batch_size, max(len(order), 1))
        ws = self.workspace(net.spec, B)
        loss_sum, correct, n = 0.0, 0, 0
        for start in range(0, len(order), B):
            idx = order[start:start + B]
            part = idx if self.reducer is None else self.reducer.part(idx)
            b = len(part)
            if b == len(X):                       # full batch: the sum over all samples
                Xb, Tb = X, T
            else:                                 # gather (mode=clip: no hidden buffer)
                Xb, Tb = ws.X[:b], ws.T[:b]
                np.take(X, part, axis=0, out=Xb, mode="clip")
                np.take(T, part, axis=0, out=Tb, mode="clip")
            acts = net.forward(Xb, out=ws.rows(ws.A, b))
            loss_sum += net.backward(acts, Tb, ws.grad, scale=1.0 / len(idx),
                                     deltas=ws.rows(ws.D, b))
            correct += n_correct(acts[-1], Tb)
            n += b
            if self.reducer is not None:
                self.reducer.reduce(ws.grad)
            opt.step(net.params, ws.grad)
        return EpochStats(loss_sum, correct, n)
