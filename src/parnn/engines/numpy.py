"""The reference engine: the network's own forward and backward (parnn.core), one optimizer step
per batch, nothing preallocated.

Any batch size (1 = the paper's per-sample SGD), any activation, loss and optimizer. Compiled
engines are tested against this one.
"""

from __future__ import annotations

import numpy as np

from parnn.core.losses import n_correct
from parnn.engines import EpochStats, scaled


class NumpyEngine:
    """augment: None, or a parnn.engines.batch.Augmentation (train's `epoch` picks the
    epoch's transforms); dropout: None, or a parnn.engines.batch.DropoutOption; as for the
    batch engine."""

    name = "numpy"
    takes_pixels = True     # uint8 X (x / 255) is scaled a batch at a time

    def __init__(self, augment=None, dropout=None):
        self.augment = augment
        self.dropout = dropout

    def check(self, spec, optimizer, batch_size):
        return None

    def info(self):
        return {"engine": self.name}

    def train(self, net, opt, X, T, order, batch_size, epoch=1):
        grad = np.empty_like(net.params)
        stats = EpochStats()
        tnet = net
        if self.dropout is not None:
            from parnn.engines.batch import draw_masks, training_net
            tnet = training_net(net, self.dropout)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            Tb = T[idx]
            # X may be uint8 pixels (x / 255): scaled a batch at a time, never as a whole
            Xb = scaled(X[idx], net.dtype) if self.augment is None else \
                self.augment.fill(X, idx, np.empty((len(idx), X.shape[1]), net.dtype), epoch)
            if tnet is not net:
                draw_masks(tnet, epoch, idx)
            acts = tnet.forward(Xb)
            stats += EpochStats(tnet.backward(acts, Tb, grad), n_correct(acts[-1], Tb), len(idx))
            opt.step(net.params, grad)
        return stats
