"""The reference engine: the network's own forward and backward (parnn.core), one optimizer step
per batch, nothing preallocated.

Any batch size (1 = the paper's per-sample SGD), any activation, loss and optimizer. Compiled
engines are tested against this one.
"""

from __future__ import annotations

import numpy as np

from parnn.core.losses import n_correct
from parnn.engines import EpochStats


class NumpyEngine:
    name = "numpy"

    def check(self, spec, optimizer, batch_size):
        return None

    def info(self):
        return {"engine": self.name}

    def train(self, net, opt, X, T, order, batch_size):
        grad = np.empty_like(net.params)
        stats = EpochStats()
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            Tb = T[idx]
            acts = net.forward(X[idx])
            stats += EpochStats(net.backward(acts, Tb, grad), n_correct(acts[-1], Tb), len(idx))
            opt.step(net.params, grad)
        return stats
