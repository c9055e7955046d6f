"""Mini-batch and full-batch training: BLAS for the matrix products, small Numba loops for the
elementwise parts, any optimizer from optim.py. The fast path for the modern preset.

Per batch of B samples (model.py's math, the same as the numpy engine, written into buffers
allocated once per (network, batch size, dtype) instead of per batch):

    forward   Z_l = A_l @ W_l.T      sgemm/dgemm into a preallocated (B, n_out) buffer
              Z_l += b_l; A_{l+1} = act(Z_l) in place (numpy's SIMD tanh for tanh/sigmoid)
    output    P = act(Z_L), loss, hits and delta = dL/dZ / B in one Numba pass over the rows
    backward  gW_l = delta.T @ A_l   straight into the flat gradient buffer's view
              gb_l = delta summed over the batch
              delta_{l-1} = (delta @ W_l) * act'(A_l)   (matmul, then one Numba pass)
    step      opt.step(params, grad) on the flat buffers (SGD, momentum or Adam); for
              optim.Adam itself, the same step fused into one parallel pass (see adam_step)

BLAS threads are whatever the caller set (threadpoolctl); with float32 data and parameters
nothing is ever converted (the float32 fast path). A full batch (every sample at once) uses X
as it is instead of gathering it in the shuffled order: the gradient is a sum over all samples,
so only the rounding order changes.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from parnn.engines import EpochStats, contiguous_inputs
from parnn.engines.persample import (ACT_CODES, LOSS_CODES, RELU, SIGMOID, TANH, dact,
                                   optimizer_name, output_delta, typed)
from parnn.errors import ConfigError
from parnn.core.optim import OPTIMIZERS, Adam


# --- elementwise kernels: forward and backward side by side ------------------------------------

def hidden_forward(Z, b, name):
    """A = act(Z + b) in place on Z (B, n). numpy ufuncs: SIMD tanh, no temporaries."""
    Z += b
    if name == "tanh":
        np.tanh(Z, out=Z)
    elif name == "sigmoid":                       # 0.5 * (1 + tanh(z/2)), as model.py
        Z *= 0.5
        np.tanh(Z, out=Z)
        Z += 1.0
        Z *= 0.5
    else:
        np.maximum(Z, 0.0, out=Z)


@njit(cache=True, fastmath={"contract"})
def hidden_backward(D, A, code):
    """D *= act'(A) in place, (B, n); the derivative from the activation A, as model.py."""
    for r in range(D.shape[0]):
        d, a = D[r], A[r]
        if code == RELU:                          # separate loops so each one vectorizes
            for j in range(d.shape[0]):
                d[j] = d[j] * dact(a[j], RELU)
        elif code == TANH:
            for j in range(d.shape[0]):
                d[j] = d[j] * dact(a[j], TANH)
        else:
            for j in range(d.shape[0]):
                d[j] = d[j] * dact(a[j], SIGMOID)


@njit(cache=True)
def output_layer(Z, T, out_code, loss_code, tiny, scale, D):
    """Row by row: Z <- output activation, D <- dL/dz * scale. Returns (summed loss, hits)."""
    loss, hits = 0.0, 0
    for r in range(Z.shape[0]):
        l, hit = output_delta(Z[r], T[r], out_code, loss_code, tiny, Z[r], D[r])
        loss += l
        hits += hit
        d = D[r]
        for j in range(d.shape[0]):
            d[j] = d[j] * scale
    return loss, hits


# --- the optimizer step --------------------------------------------------------------------------
# optim.Adam.step is a dozen NumPy passes over the 235k parameters (plus a temporary): 470 us per
# batch in float32, a third of a batch's time at 2 threads. adam_step does the same arithmetic
# in one pass (130 us): the same operations in the same order and precision -- including the
# two that NumPy does in float64 because lr_t and eps_t are float64 scalars -- so the result is
# bit-identical (tests/test_engines.py checks it against opt.step). Any other optimizer, or a
# subclass of Adam, goes through opt.step.
# Deliberately NOT parallel: a Numba (OpenMP) parallel region between BLAS calls leaves two
# spinning thread pools fighting over the cores; with prange here an epoch at 2 threads took
# 3.9 s instead of 0.6 s. error_model="numpy": no division-by-zero check (it would stop LLVM
# from vectorizing the loop); sqrt(v) + eps_t > 0 anyway.

@njit(cache=True, error_model="numpy")
def adam_step(p, g, m, v, b1, c1, b2, c2, eps_t, lr_t):
    """m = m*b1 + c1*g;  v = v*b2 + (g*g)*c2;  p -= (m / (sqrt(v) + eps_t)) * lr_t.
    b1, c1 = beta1, 1-beta1 and b2, c2 in the arrays' dtype; eps_t, lr_t float64."""
    for i in range(p.shape[0]):
        gi = g[i]
        mi = m[i] * b1 + c1 * gi
        vi = v[i] * b2 + (gi * gi) * c2
        m[i] = mi
        v[i] = vi
        den = typed(vi, np.sqrt(vi) + eps_t)
        p[i] = p[i] - typed(vi, (mi / den) * lr_t)


def optimizer_step(opt, params, grad):
    """opt.step(params, grad), with optim.Adam's step fused (bit-identical, see above)."""
    if type(opt) is not Adam:
        opt.step(params, grad)
        return
    opt.t += 1
    b1, b2, t = opt.beta1, opt.beta2, opt.t
    lr_t = opt.lr * np.sqrt(1 - b2 ** t) / (1 - b1 ** t)      # exactly as optim.Adam.step
    eps_t = opt.eps * np.sqrt(1 - b2 ** t)
    f = params.dtype.type
    adam_step(params, grad, opt.m, opt.v, f(b1), f(1 - b1), f(b2), f(1 - b2), float(eps_t),
              float(lr_t))


# --- the engine ------------------------------------------------------------------------------------

class Workspace:
    """Every per-batch array, allocated once: gathered inputs/targets, each layer's
    activations and deltas, and the flat gradient buffer with per-layer views."""

    def __init__(self, spec, B):
        from parnn.core.model import views
        dt = np.dtype(spec.dtype)
        self.key = (spec.sizes, spec.dtype, B)
        self.X = np.empty((B, spec.sizes[0]), dt)
        self.T = np.empty((B, spec.sizes[-1]), dt)
        self.A = [np.empty((B, n), dt) for n in spec.sizes[1:]]      # Z, then act(Z) in place
        self.D = [np.empty((B, n), dt) for n in spec.sizes[1:]]      # deltas of each layer
        self.grad = np.empty(spec.n_params, dt)
        self.gW, self.gb = views(spec, self.grad)


class BatchEngine:
    name = "batch"
    per_sample = False

    def __init__(self):
        self._ws = None

    def check(self, spec, optimizer, batch_size):
        opt = optimizer_name(optimizer)
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
        if self._ws is None or self._ws.key != (spec.sizes, spec.dtype, B):
            self._ws = None                      # free the old buffers before the new ones
            self._ws = Workspace(spec, B)
        return self._ws

    def train(self, net, opt, X, T, order, batch_size):
        spec = net.spec
        self.check(spec, opt, batch_size)
        dt = net.params.dtype
        X, T, order = contiguous_inputs(net, X, T, order)
        B = min(batch_size, max(len(order), 1))
        ws = self.workspace(spec, B)
        L = spec.n_layers
        hid, out, loss_code = ACT_CODES[spec.hidden], ACT_CODES[spec.output], LOSS_CODES[spec.loss]
        tiny = dt.type(np.finfo(dt).tiny)
        stats = EpochStats()
        for start in range(0, len(order), B):
            idx = order[start:start + B]
            b = len(idx)
            if b == len(X):                       # full batch: the sum over all samples
                Xb, Tb = X, T
            else:                                 # gather (mode=clip: no hidden buffer)
                Xb, Tb = ws.X[:b], ws.T[:b]
                np.take(X, idx, axis=0, out=Xb, mode="clip")
                np.take(T, idx, axis=0, out=Tb, mode="clip")
            # forward
            a = Xb
            for l in range(L):
                Z = ws.A[l][:b]
                np.matmul(a, net.W[l].T, out=Z)                     # (b, n_in) @ (n_in, n_out)
                if l < L - 1:
                    hidden_forward(Z, net.b[l], spec.hidden)
                else:
                    Z += net.b[l]
                a = Z
            # output: activation, loss, hits, delta / b
            D = ws.D[L - 1][:b]
            loss, hits = output_layer(ws.A[L - 1][:b], Tb, out, loss_code, tiny,
                                      dt.type(1.0 / b), D)
            # backward
            for l in reversed(range(L)):
                a_in = Xb if l == 0 else ws.A[l - 1][:b]
                np.matmul(D.T, a_in, out=ws.gW[l])                  # (n_out, b) @ (b, n_in)
                np.sum(D, axis=0, out=ws.gb[l])
                if l > 0:
                    Dp = ws.D[l - 1][:b]
                    np.matmul(D, net.W[l], out=Dp)                  # (b, n_out) @ (n_out, n_in)
                    hidden_backward(Dp, a_in, hid)
                    D = Dp
            optimizer_step(opt, net.params, ws.grad)
            stats += EpochStats(float(loss), int(hits), b)
        return stats

