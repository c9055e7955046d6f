"""Losses: each one's value and output delta side by side.

The output activation goes with the loss, not with the last layer (which is linear): softmax
followed by cross-entropy has the delta p - t, because softmax's Jacobian cancels the loss's
1/p, and computing the two apart would lose that. For an output p = output(z) of targets t,
one row per sample:

    value(p, t)                   the loss summed over the rows (callers divide by B for the mean)
    delta(p, t, output, out=None) dL/dz, the delta of the last layer's pre-activation z

Label smoothing (Szegedy et al. 2016) is cross-entropy against softened targets,
t' = (1 - eps) t + eps / K for K classes: smooth_labels makes t' once, and value and delta above
then give L = -sum_j t'_j log p_j and dL/dz = p - t' unchanged (tests/test_model.py checks the
gradient by finite differences).
"""

from __future__ import annotations

import numpy as np

from parnn.core.layers import DERIVATIVES
from parnn.errors import ConfigError


class MSE:
    """L = 1/2 sum_j (p_j - t_j)^2 per sample. The 1/2 makes dL/dp = p - t, the error of the
    paper's Algorithm 2 (mse_der), so lr means the same as in the paper and the C reference."""

    name = "mse"

    def value(self, p, t):
        d = p - t
        return 0.5 * float(np.einsum("ij,ij->", d, d))

    def delta(self, p, t, output, out=None):
        delta = np.subtract(p, t, out=out)         # dL/dp: (B, n)
        return DERIVATIVES[output](p, delta)       # dL/dz = dL/dp * output'(z), in place


class CrossEntropy:
    """L = -sum_j t_j log p_j per sample, p a softmax output (Spec refuses any other)."""

    name = "cross_entropy"

    def value(self, p, t):
        tiny = np.finfo(p.dtype).tiny              # a p that underflowed to 0 costs -log(tiny)
        return -float(np.einsum("ij,ij->", t, np.log(np.maximum(p, tiny))))

    def delta(self, p, t, output, out=None):
        if output != "softmax":  # pragma: no cover - Spec.validate refuses this
            raise ConfigError("cross_entropy needs the softmax output")
        return np.subtract(p, t, out=out)          # dL/dz = p - t: (B, n)


def smooth_labels(t, eps, out=None):
    """t' = (1 - eps) t + eps / K, K = t.shape[1]: one-hot targets softened for label smoothing
    (eps in [0, 1): the true class keeps the largest target, so accuracy reads the same)."""
    out = np.multiply(t, 1.0 - eps, out=out)
    out += eps / t.shape[1]
    return out


LOSSES = {"mse": MSE(), "cross_entropy": CrossEntropy()}


def n_correct(p, t):
    """Rows whose predicted class (the largest output, the paper's prediction) is the target's."""
    return int(np.count_nonzero(p.argmax(axis=1) == t.argmax(axis=1)))
