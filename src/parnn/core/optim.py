"""Optimizers: each one a step on flat buffers (params and grad share the model's layout).

Their state is flat buffers too, so a checkpoint is a handful of arrays.
"""

from __future__ import annotations

import numpy as np

from parnn.core.jit import compiled
from parnn.errors import ConfigError

OPTIMIZERS = ("sgd", "momentum", "adam")


class SGD:
    """params -= lr * grad (the paper's update)."""

    name = "sgd"

    def __init__(self, n, dtype, lr):
        self.lr = lr
        self.t = 0

    def step(self, params, grad):
        self.t += 1
        params -= self.lr * grad

    def count_steps(self, n):
        """n plain-SGD steps that a per-sample engine applied in place, fused into its kernel."""
        self.t += n

    def state(self):
        return {}

    def load_state(self, state):
        pass


class Momentum(SGD):
    """Heavy-ball momentum: v = mu*v - lr*grad; params += v."""

    name = "momentum"

    def __init__(self, n, dtype, lr, momentum=0.9):
        super().__init__(n, dtype, lr)
        self.mu = momentum
        self.v = np.zeros(n, dtype)

    def step(self, params, grad):
        self.t += 1
        self.v *= self.mu
        self.v -= self.lr * grad
        params += self.v

    def state(self):
        return {"v": self.v}

    def load_state(self, state):
        self.v[...] = state["v"]


class Adam(SGD):
    """Adam (Kingma & Ba 2015) with bias correction:

        m = beta1 m + (1 - beta1) g        v = beta2 v + (1 - beta2) g^2
        m_hat = m / (1 - beta1^t)          v_hat = v / (1 - beta2^t)
        params -= lr m_hat / (sqrt(v_hat) + eps)

    with the corrections folded into one step size and epsilon:
        params -= lr_t m / (sqrt(v) + eps_t),   lr_t = lr sqrt(1 - beta2^t) / (1 - beta1^t),
                                                eps_t = eps sqrt(1 - beta2^t)

    weight_decay = lambda > 0 makes it AdamW (Loshchilov & Hutter 2019), the decay decoupled from
    the gradient's moments: params -= lr (m_hat / (sqrt(v_hat) + eps) + lambda params), done as
    params *= 1 - lr lambda before the Adam step (as torch.optim.AdamW does). lr is the
    scheduled rate, so the decay follows the schedule. Every parameter decays, biases too.
    """

    name = "adam"

    def __init__(self, n, dtype, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
        super().__init__(n, dtype, lr)
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.weight_decay = weight_decay
        self.m = np.zeros(n, dtype)
        self.v = np.zeros(n, dtype)

    def scalars(self, t):
        """(eps_t, lr_t) of step t, as float64: the bias corrections folded in (above)."""
        b1, b2 = self.beta1, self.beta2
        lr_t = self.lr * np.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        eps_t = self.eps * np.sqrt(1 - b2 ** t)
        return float(eps_t), float(lr_t)

    def decay(self):
        """AdamW's factor on the parameters before a step (1: no weight decay)."""
        return 1 - self.lr * self.weight_decay if self.weight_decay else 1.0

    def step(self, params, grad):
        self.t += 1
        b1, b2 = self.beta1, self.beta2
        eps_t, lr_t = self.scalars(self.t)
        f = params.dtype.type
        if self.weight_decay:
            params *= f(self.decay())
        adam_update(params, grad, self.m, self.v, f(b1), f(1 - b1), f(b2), f(1 - b2),
                    eps_t, lr_t)

    def state(self):
        return {"m": self.m, "v": self.v}

    def load_state(self, state):
        self.m[...] = state["m"]
        self.v[...] = state["v"]


# Not parallel on purpose: a Numba (OpenMP) parallel region between BLAS calls leaves two
# spinning thread pools fighting over the cores. error_model="numpy" drops the check for a
# division by zero, which would stop LLVM from vectorizing the loop (sqrt(v) + eps_t > 0).
@compiled(cache=True, error_model="numpy")
def adam_update(p, g, m, v, b1, c1, b2, c2, eps_t, lr_t):
    """Adam.step's update in ONE pass over the parameters: as a dozen NumPy passes over every
    parameter it cost several times more (docs/ENGINES.md).

    b1, c1 = beta1, 1 - beta1 and b2, c2 come in the arrays' dtype; eps_t and lr_t in float64.
    Numba computes float32 op float64 in float64, so the casts round the two steps that use
    them back to the arrays' dtype (the same bits as the NumPy step this pass replaced).
    """
    for i in range(p.shape[0]):
        gi = g[i]
        mi = m[i] * b1 + c1 * gi
        vi = v[i] * b2 + (gi * gi) * c2
        m[i] = mi
        v[i] = vi
        den = v.dtype.type(np.sqrt(vi) + eps_t)
        p[i] = p[i] - v.dtype.type((mi / den) * lr_t)


def make_optimizer(name, n, dtype, lr, momentum=0.9, weight_decay=0.0):
    """weight_decay: AdamW's decoupled decay, optimizer adam only."""
    if weight_decay and name != "adam":
        raise ConfigError(f"weight decay is AdamW's decoupled decay: it needs optimizer adam, "
                          f"not {name}")
    if name == "sgd":
        return SGD(n, dtype, lr)
    if name == "momentum":
        return Momentum(n, dtype, lr, momentum)
    if name == "adam":
        return Adam(n, dtype, lr, weight_decay=weight_decay)
    raise ConfigError(f"unknown optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}")
