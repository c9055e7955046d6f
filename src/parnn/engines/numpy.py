"""The reference engine: the NumPy math of model.py, one optimizer step per batch.

Any batch size (1 = the paper's per-sample SGD), any activation, loss and optimizer. Compiled
engines are tested against this one.
"""

from __future__ import annotations

import numpy as np

from parnn.engines import EpochStats


class NumpyEngine:
    name = "numpy"
    per_sample = False

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
            stats.loss_sum += net.backward(acts, Tb, grad)
            stats.correct += int(np.count_nonzero(acts[-1].argmax(1) == Tb.argmax(1)))
            stats.n += len(idx)
            opt.step(net.params, grad)
        return stats

