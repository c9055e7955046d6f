"""Convolutional layer kinds: Conv2D, MaxPool2D, Flatten, each with its forward and backward side
by side (the layer protocol of parnn.core.layers), and `parse_layers`, the layer list a Spec
spells as "conv32:3,pool,conv64:3,pool,dense128".

Images are NHWC: a batch is (B, H, W, C), channels last. Data arrives as (B, 784) rows, which
ARE (B, 28, 28, 1) in memory, so the first layer reshapes without copying. Why NHWC, not
PyTorch's NCHW: with channels last, one im2col row (the k x k x C_in window of one output pixel)
is k runs of k*C_in contiguous inputs, and the whole batch's convolution is ONE matrix product

    z (B*H'*W', C_out) = cols (B*H'*W', k*k*C_in) @ W_m.T (k*k*C_in, C_out)

whose result already is the next layer's NHWC input: no per-sample GEMMs, no transposes. (NCHW
needs a GEMM per sample, W_m (C_out, k*k*C_in) @ cols_b (k*k*C_in, H'*W'), or a transpose of
the output.) So a kernel is stored (C_out, k, k, C_in), "OHWI": W_m above is a view of it, and so
is its gradient; parnn.export transposes it to ONNX's OIHW, and a PyTorch user permutes it with
.permute(0, 3, 1, 2). Max-pooling in NHWC compares contiguous channel vectors.

im2col and col2im are copies and sums of the same numbers in a fixed order per sample, so the
compiled kernels (parnn.core.conv_kernels, Numba, parallel over the batch) give the NumPy
reference's bits whatever the thread count; only the BLAS products are shared work.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from parnn.core.layers import ACTIVATIONS, DERIVATIVES, Dense
from parnn.errors import ConfigError

PADDINGS = ("same", "valid")
CHUNK = 256    # samples per im2col buffer: inference on 10,000 images must not hold all cols


# --- im2col / col2im and pooling: the NumPy reference -------------------------------------------

def im2col(x, k, pad, out=None):
    """cols[(b, i, j), (di, dj, c)] = x_padded[b, i + di, j + dj, c]: one row per output pixel.

        x (B, H, W, C)   ->   cols (B*H'*W', k*k*C),   H' = H + 2*pad - k + 1
    """
    B, H, W, C = x.shape
    if pad:
        x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    win = sliding_window_view(x, (k, k), axis=(1, 2))        # (B, H', W', C, k, k), a view
    Ho, Wo = win.shape[1:3]
    cols = np.empty((B * Ho * Wo, k * k * C), x.dtype) if out is None else out
    cols.reshape(B, Ho, Wo, k, k, C)[...] = win.transpose(0, 1, 2, 4, 5, 3)
    return cols


def col2im(dcols, x_shape, k, pad, out=None):
    """The adjoint of im2col: dx[b, i + di - pad, j + dj - pad, c] += dcols[(b, i, j), (di, dj, c)],
    summed over (di, dj) in that order for every input pixel.

        dcols (B*H'*W', k*k*C)   ->   dx (B, H, W, C)
    """
    B, H, W, C = x_shape
    Ho, Wo = H + 2 * pad - k + 1, W + 2 * pad - k + 1
    d6 = dcols.reshape(B, Ho, Wo, k, k, C)
    dxp = np.zeros((B, H + 2 * pad, W + 2 * pad, C), dcols.dtype)
    for di in range(k):
        for dj in range(k):
            dxp[:, di:di + Ho, dj:dj + Wo, :] += d6[:, :, :, di, dj, :]
    dx = np.empty(x_shape, dcols.dtype) if out is None else out
    dx[...] = dxp[:, pad:pad + H, pad:pad + W, :]
    return dx


def maxpool(x, out=None):
    """y[b, i, j, c] = max of the 2x2 window x[b, 2i:2i+2, 2j:2j+2, c].

        x (B, H, W, C)   ->   y (B, H/2, W/2, C)
    """
    B, H, W, C = x.shape
    y = np.empty((B, H // 2, W // 2, C), x.dtype) if out is None else out
    return np.max(x.reshape(B, H // 2, 2, W // 2, 2, C), axis=(2, 4), out=y)


def maxpool_backward(x, dy, out=None):
    """dx: each window's dy goes to its first maximum (in the order (0,0), (0,1), (1,0), (1,1),
    as PyTorch picks), the other three get 0."""
    B, H, W, C = x.shape
    win = x.reshape(B, H // 2, 2, W // 2, 2, C).transpose(0, 1, 3, 5, 2, 4).reshape(
        B, H // 2, W // 2, C, 4)
    first = win.argmax(axis=-1)[..., None]                     # (B, H/2, W/2, C, 1)
    dwin = np.zeros(win.shape, dy.dtype)
    np.put_along_axis(dwin, first, dy[..., None], axis=-1)
    dx = np.empty(x.shape, dy.dtype) if out is None else out
    dx.reshape(B, H // 2, 2, W // 2, 2, C)[...] = \
        dwin.reshape(B, H // 2, W // 2, C, 2, 2).transpose(0, 1, 4, 2, 5, 3)
    return dx


# Where the compiled kernels' threads come from: "numba", each kernel parallel over the batch
# on Numba's threads (BLAS keeps its own for the products), or "blas", the kernels on the
# calling thread and BLAS's threads the only pool. Chosen by measurement, docs/RESULTS.md
# ("Convolutional networks"); either gives the same bits.
THREADS_BY = "numba"


def _kernels(compiled=True):
    """The compiled kernels (parnn.core.conv_kernels) when Numba is there, else None (the
    NumPy reference: correct, only slower)."""
    if not compiled:
        return None
    try:
        from parnn.core import conv_kernels as K
    except ImportError:
        return None
    if THREADS_BY == "blas":
        return SimpleNamespace(**K.serial, bias_act=K.bias_act)
    return SimpleNamespace(**{name: getattr(K, name) for name in K.KERNELS}, bias_act=K.bias_act)


# --- layer kinds ---------------------------------------------------------------------------------

class Conv2D:
    """y = act(conv(x, W) + b): k x k kernels, stride 1, padding "same" (k odd, zeros around,
    H' = H) or "valid" (H' = H - k + 1), via im2col and one BLAS product per chunk of samples.

        x (B, H, W, C_in)   W (C_out, k, k, C_in)   b (C_out)   z, y (B, H', W', C_out)
        cols (B*H'*W', k*k*C_in)   W_m = W.reshape(C_out, k*k*C_in)

    forward keeps its cols for backward (as autograd keeps saved tensors): backward must follow
    the forward of the same input array, as every engine does; handed another array, it
    recomputes them.
    """

    def __init__(self, in_shape, c_out, k, padding="same", activation="identity", compiled=True):
        H, W, c_in = in_shape
        self.in_shape, self.c_in, self.c_out, self.k = tuple(in_shape), c_in, c_out, k
        self.padding, self.activation = padding, activation
        self.pad = k // 2 if padding == "same" else 0
        self.out_shape = (H + 2 * self.pad - k + 1, W + 2 * self.pad - k + 1, c_out)
        self.shapes = ((c_out, k, k, c_in), (c_out,))
        self.n_params = c_out * k * k * c_in + c_out
        self.fans = (k * k * c_in, k * k * c_out)        # for Glorot's and He's init
        self.kern = _kernels(compiled)
        self._saved = (None, None)                       # (x of the last forward, its cols)
        self._cols = None                                # the im2col buffer, reused

    def __repr__(self):
        return (f"Conv2D({self.in_shape}, {self.c_out}, {self.k}, {self.padding!r}, "
                f"{self.activation!r})")

    def _im2col(self, x):
        """cols of x (at most CHUNK samples) into the reused buffer."""
        Ho, Wo, _ = self.out_shape
        n = len(x) * Ho * Wo
        K = self.k * self.k * self.c_in
        if self._cols is None or self._cols.shape[0] < n or self._cols.dtype != x.dtype:
            self._cols = None
            self._cols = np.empty((n, K), x.dtype)
        cols = self._cols[:n]
        if self.kern is not None:
            return self.kern.im2col(x, self.k, self.pad, cols)
        return im2col(x, self.k, self.pad, cols)

    def forward(self, p, x, y=None):
        W, b = p
        B = len(x)
        Ho, Wo, c_out = self.out_shape
        xi = x.reshape(B, *self.in_shape)                 # (B, 784) rows are (B, 28, 28, 1)
        y = np.empty((B, Ho, Wo, c_out), x.dtype) if y is None else y
        z = y.reshape(B * Ho * Wo, c_out)
        Wm = W.reshape(c_out, -1)                         # (C_out, k*k*C_in), a view
        cols = None
        for s in range(0, B, CHUNK):
            cols = self._im2col(xi[s:s + CHUNK])         # (b*H'*W', k*k*C_in)
            np.matmul(cols, Wm.T, out=z[s * Ho * Wo:(s + CHUNK) * Ho * Wo])   # z = cols @ W_m.T
        if self.kern is not None and self.activation in ("relu", "identity"):
            self.kern.bias_act(z, b, self.activation == "relu")   # one pass: y = act(z + b)
        else:
            z += b
            ACTIVATIONS[self.activation](z)               # y = act(z), over z
        self._saved = (x, cols) if B <= CHUNK else (None, None)
        return y

    def backward(self, p, x, y, dy, g, dx=None, propagate=True):
        W, _ = p
        dW, db = g
        B = len(x)
        Ho, Wo, c_out = self.out_shape
        xi = x.reshape(B, *self.in_shape)
        dz = DERIVATIVES[self.activation](y.reshape(-1, c_out), dy.reshape(-1, c_out))
        dz.sum(axis=0, out=db)                            # db = sum of dz over batch and pixels
        dWm, Wm = dW.reshape(c_out, -1), W.reshape(c_out, -1)
        if propagate:
            dx = np.empty((B, *self.in_shape), x.dtype) if dx is None else dx
            dxi = dx.reshape(B, *self.in_shape)
        rows = CHUNK * Ho * Wo
        for s in range(0, B, CHUNK):
            saved_x, cols = self._saved
            if saved_x is not x or B > CHUNK:
                cols = self._im2col(xi[s:s + CHUNK])
            dzs = dz[s * Ho * Wo:s * Ho * Wo + rows]      # (b*H'*W', C_out)
            if s == 0:
                np.matmul(dzs.T, cols, out=dWm)           # dW_m = dz.T @ cols: (C_out, k*k*C_in)
            else:
                dWm += dzs.T @ cols
            if propagate:
                dcols = np.matmul(dzs, Wm, out=cols)      # dcols = dz @ W_m, over cols (used)
                xs = xi[s:s + CHUNK]
                if self.kern is not None:
                    self.kern.col2im(dcols, self.k, self.pad, dxi[s:s + CHUNK])
                else:
                    col2im(dcols, xs.shape, self.k, self.pad, dxi[s:s + CHUNK])
        self._saved = (None, None)                        # cols now hold dcols
        return dx if propagate else None


class MaxPool2D:
    """2x2 max-pooling, stride 2: y = the largest of each window; the gradient flows to it.

        x (B, H, W, C)   y (B, H/2, W/2, C)   no parameters
    """

    shapes = ()
    n_params = 0

    def __init__(self, in_shape, compiled=True):
        H, W, C = in_shape
        self.in_shape = tuple(in_shape)
        self.out_shape = (H // 2, W // 2, C)
        self.kern = _kernels(compiled)

    def __repr__(self):
        return f"MaxPool2D({self.in_shape})"

    def forward(self, p, x, y=None):
        x = x.reshape(len(x), *self.in_shape)
        if self.kern is not None:
            y = np.empty((len(x), *self.out_shape), x.dtype) if y is None else y
            return self.kern.maxpool(x, y)
        return maxpool(x, y)

    def backward(self, p, x, y, dy, g, dx=None, propagate=True):
        if not propagate:
            return None
        x = x.reshape(len(x), *self.in_shape)
        if self.kern is not None:
            dx = np.empty(x.shape, x.dtype) if dx is None else dx
            return self.kern.maxpool_backward(x, dy, dx)
        return maxpool_backward(x, dy, dx)


class Flatten:
    """(B, H, W, C) -> (B, H*W*C), in NHWC order: a view both ways, nothing computed.

        x (B, H, W, C)   y (B, H*W*C)   no parameters
    """

    shapes = ()
    n_params = 0

    def __init__(self, in_shape):
        self.in_shape = tuple(in_shape)
        self.out_shape = (math.prod(in_shape),)

    def __repr__(self):
        return f"Flatten({self.in_shape})"

    def forward(self, p, x, y=None):
        return x.reshape(len(x), *self.out_shape)

    def backward(self, p, x, y, dy, g, dx=None, propagate=True):
        return dy.reshape(len(dy), *self.in_shape) if propagate else None


# --- a layer list from its spelling ---------------------------------------------------------------

SPELLING = ("convC:K[:same|valid], pool, flatten or denseN, "
            "e.g. conv32:3,pool,conv64:3,pool,dense128")


def parse_layers(text, n_in, n_out, activation, compiled=True):
    """The layer objects of "conv32:3,pool,conv64:3,pool,dense128" on n_in inputs (a square
    single-channel image), every layer with the hidden activation, then a linear Dense to n_out
    (its output activation goes with the loss). A Flatten goes in before the first dense layer
    after convolutions. ConfigError (one line) for anything that does not fit."""
    side = math.isqrt(n_in)
    tokens = [t.strip() for t in text.split(",")]
    if tokens and tokens[0].startswith(("conv", "pool")) and side * side != n_in:
        raise ConfigError(f"layers {text!r}: convolutions read the {n_in} inputs as a square "
                          "image, and that is not a square number")
    shape = (side, side, 1) if tokens and tokens[0].startswith(("conv", "pool")) else (n_in,)
    layers = []
    for i, tok in enumerate(tokens):
        where = f"layers {text!r}: layer {i + 1} ({tok!r})"
        if tok.startswith("conv"):
            c_out, k, padding = _conv_token(tok, where)
            if len(shape) != 3:
                raise ConfigError(f"{where}: a convolution needs an image, not {shape[0]} "
                                  "flat features (put conv and pool layers before dense ones)")
            if padding == "same" and k % 2 == 0:
                raise ConfigError(f"{where}: padding same needs an odd kernel size, got {k}")
            if padding == "valid" and k > min(shape[:2]):
                raise ConfigError(f"{where}: a {k}x{k} kernel does not fit a "
                                  f"{shape[0]}x{shape[1]} image without padding")
            layers.append(Conv2D(shape, c_out, k, padding, activation, compiled))
        elif tok == "pool":
            if len(shape) != 3:
                raise ConfigError(f"{where}: pooling needs an image, not {shape[0]} flat features")
            if shape[0] % 2 or shape[1] % 2:
                raise ConfigError(f"{where}: 2x2 pooling needs an even height and width, got "
                                  f"{shape[0]}x{shape[1]}")
            layers.append(MaxPool2D(shape, compiled))
        elif tok == "flatten":
            if len(shape) != 3:
                raise ConfigError(f"{where}: flatten needs an image, the input is already flat")
            layers.append(Flatten(shape))
        elif tok.startswith("dense") and tok[5:].isdigit() and int(tok[5:]) >= 1:
            if len(shape) == 3:
                layers.append(Flatten(shape))
            layers.append(Dense(layers[-1].out_shape[0] if layers else n_in, int(tok[5:]),
                                activation))
        else:
            raise ConfigError(f"{where}: unknown layer: use {SPELLING}")
        shape = layers[-1].out_shape
    if len(shape) == 3:
        layers.append(Flatten(shape))
    layers.append(Dense(layers[-1].out_shape[0], n_out, "identity"))
    return layers


def _conv_token(tok, where):
    """(channels, kernel size, padding) of "conv32:3" or "conv32:5:valid"."""
    parts = tok[4:].split(":")
    ok = len(parts) in (2, 3) and all(p.isdigit() and int(p) >= 1 for p in parts[:2]) \
        and (len(parts) == 2 or parts[2] in PADDINGS)
    if not ok:
        raise ConfigError(f"{where}: a convolution is spelled convC:K or convC:K:same|valid "
                          "(C output channels, K x K kernels), e.g. conv32:3")
    return int(parts[0]), int(parts[1]), parts[2] if len(parts) == 3 else "same"
