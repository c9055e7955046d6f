"""Optimizers: each one a step on flat buffers (params and grad share the model's layout).

Their state is flat buffers too, so a checkpoint is a handful of arrays.
"""

from __future__ import annotations

import numpy as np

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
    """Adam (Kingma & Ba 2015) with bias correction."""

    name = "adam"

    def __init__(self, n, dtype, lr, beta1=0.9, beta2=0.999, eps=1e-8):
        super().__init__(n, dtype, lr)
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.m = np.zeros(n, dtype)
        self.v = np.zeros(n, dtype)
        self._tmp = np.zeros(n, dtype)

    def step(self, params, grad):
        self.t += 1
        b1, b2 = self.beta1, self.beta2
        self.m *= b1
        self.m += (1 - b1) * grad
        self.v *= b2
        np.multiply(grad, grad, out=self._tmp)
        self._tmp *= 1 - b2
        self.v += self._tmp
        # params -= lr_t * m / (sqrt(v) + eps_t), with the bias corrections folded into lr_t, eps_t
        lr_t = self.lr * np.sqrt(1 - b2 ** self.t) / (1 - b1 ** self.t)
        eps_t = self.eps * np.sqrt(1 - b2 ** self.t)
        np.sqrt(self.v, out=self._tmp)
        self._tmp += eps_t
        np.divide(self.m, self._tmp, out=self._tmp)
        self._tmp *= lr_t
        params -= self._tmp

    def state(self):
        return {"m": self.m, "v": self.v}

    def load_state(self, state):
        self.m[...] = state["m"]
        self.v[...] = state["v"]


def make_optimizer(name, n, dtype, lr, momentum=0.9):
    if name == "sgd":
        return SGD(n, dtype, lr)
    if name == "momentum":
        return Momentum(n, dtype, lr, momentum)
    if name == "adam":
        return Adam(n, dtype, lr)
    raise ConfigError(f"unknown optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}")
