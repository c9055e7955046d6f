"""Mini-batch and full-batch training: the network's own forward and backward (parnn.core) run
into a workspace allocated once, BLAS for the matrix products, any optimizer of parnn.core.optim.
The fast path of the modern preset.

Per batch of B samples:

    gather    X, T rows of the batch into preallocated buffers (np.take, out=); with an
              Augmentation, X's rows are written transformed instead (augment_batch)
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

from dataclasses import dataclass

import numpy as np

from parnn.core.layers import Dropout
from parnn.core.losses import n_correct
from parnn.core.model import MLP
from parnn.core.optim import OPTIMIZERS
from parnn.engines import EpochStats, contiguous_inputs
from parnn.errors import ConfigError


@dataclass(frozen=True)
class Augmentation:
    """An engine option, set once per run: each sample of a batch is transformed as
    parnn.engines.augment.augment_batch draws it from (seed, epoch, sample index), so the
    batches do not depend on threads, batch boundaries or where a resumed run restarts."""

    seed: int
    shift: int = 0          # whole pixels per axis, at most
    hflip: bool = False     # mirror left-right with probability 1/2

    def fill(self, X, idx, out, epoch):
        """out[b] = the transformed X[idx[b]]; returns out."""
        from parnn.engines.augment import augment_batch

        return augment_batch(X, idx, out, self.seed, epoch, shift=self.shift, hflip=self.hflip)


@dataclass(frozen=True)
class DropoutOption:
    """An engine option, set once per run: inverted dropout of this rate after every hidden
    layer while training (parnn.core.layers.Dropout), masks drawn from (seed, epoch, layer,
    sample index, unit)."""

    rate: float
    seed: int


def training_net(net, dropout):
    """net as it trains: with a Dropout layer after each hidden layer when dropout is given,
    sharing net's parameter buffer (net itself, for scoring and inference, has none)."""
    if dropout is None:
        return net
    layers, params = [], []
    last = len(net.layers) - 1
    for l, (layer, p) in enumerate(zip(net.layers, net.layer_params)):
        layers.append(layer)
        params.append(p)
        if l < last:
            layers.append(Dropout(layer.n_out, dropout.rate, dropout.seed, l, net.dtype))
            params.append(())
    # MLP walks its layer list; parnn.core.model has no constructor argument for extra layers yet.
    tnet = MLP(net.spec, net.params)
    tnet.layers, tnet.layer_params = layers, params
    return tnet


def draw_masks(tnet, epoch, idx):
    """Set every Dropout layer's mask for the batch of samples idx."""
    for layer in tnet.layers:
        if isinstance(layer, Dropout):
            layer.draw(epoch, idx)


AUGMENT_BATCHES = 64      # batches augmented in one parallel call (at most)


class Workspace:
    """Every per-batch array, allocated once for (network, batch size): the gathered inputs and
    targets, each layer's outputs and deltas, and the flat gradient buffer."""

    def __init__(self, spec, B, layers=None):
        dt = np.dtype(spec.dtype)
        self.key = (spec, B, None if layers is None else len(layers))
        self.X = np.empty((B, spec.sizes[0]), dt)
        self.T = np.empty((B, spec.sizes[-1]), dt)
        layers = spec.layers() if layers is None else layers
        shapes = [(B, *layer.out_shape) for layer in layers]
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

    augment: None, or an Augmentation: train's `epoch` then picks the epoch's transforms.
    dropout: None, or a DropoutOption: train's `epoch` then picks the epoch's masks.
    """

    name = "batch"

    def __init__(self, reducer=None, augment=None, dropout=None):
        self.reducer = reducer
        self.augment = augment
        self.dropout = dropout
        self._ws = None
        self._tnet = None
        self._aug = None        # the augmented block of batches

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

    def workspace(self, spec, B, layers=None):
        if self._ws is None or self._ws.key != (spec, B, None if layers is None else len(layers)):
            self._ws = None                      # free the old buffers before the new ones
            self._ws = Workspace(spec, B, layers)
        return self._ws

    def training_net(self, net):
        if self._tnet is None or self._tnet.params is not net.params:
            self._tnet = training_net(net, self.dropout)
        return self._tnet

    def _augment_block(self, X, order, epoch):
        """The augmented X[order], in a buffer reused from call to call."""
        buf = self._aug
        if buf is None or len(buf) < len(order) or buf.shape[1:] != X.shape[1:] \
                or buf.dtype != X.dtype:
            self._aug = None                     # free the old buffer before the new one
            self._aug = buf = np.empty((len(order), X.shape[1]), X.dtype)
        return self.augment.fill(X, order, buf[:len(order)], epoch)

    def train(self, net, opt, X, T, order, batch_size, epoch=1):
        self.check(net.spec, opt, batch_size)
        X, T, order = contiguous_inputs(net, X, T, order)
        B = min(batch_size, max(len(order), 1))
        tnet = self.training_net(net)
        ws = self.workspace(net.spec, B, None if tnet is net else tnet.layers)
        loss_sum, correct, n = 0.0, 0, 0
        # Augmenting AUGMENT_BATCHES batches in one parallel call, not one batch per call:
        # a Numba region between every pair of BLAS calls makes the two thread pools fight
        # (docs/ACCURACY.md). Each sample's transform is its own: the same bits either way.
        blocks = self.augment is not None and self.reducer is None
        block = AUGMENT_BATCHES * B
        for start in range(0, len(order), B):
            if blocks and start % block == 0:
                Xa = self._augment_block(X, order[start:start + block], epoch)
            idx = order[start:start + B]
            part = idx if self.reducer is None else self.reducer.part(idx)
            b = len(part)
            if tnet is not net:
                draw_masks(tnet, epoch, part)
            if b == len(X) and self.augment is None and tnet is net:   # full batch: the sum
                Xb, Tb = X, T                                          # over all samples
            else:                                 # gather (mode=clip: no hidden buffer)
                Xb, Tb = ws.X[:b], ws.T[:b]
                if blocks:
                    Xb = Xa[start % block:start % block + b]
                elif self.augment is not None:
                    self.augment.fill(X, part, Xb, epoch)
                else:
                    np.take(X, part, axis=0, out=Xb, mode="clip")
                np.take(T, part, axis=0, out=Tb, mode="clip")
            acts = tnet.forward(Xb, out=ws.rows(ws.A, b))
            loss_sum += tnet.backward(acts, Tb, ws.grad, scale=1.0 / len(idx),
                                     deltas=ws.rows(ws.D, b))
            correct += n_correct(acts[-1], Tb)
            n += b
            if self.reducer is not None:
                self.reducer.reduce(ws.grad)
            opt.step(net.params, ws.grad)
        return EpochStats(loss_sum, correct, n)
