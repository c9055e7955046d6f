"""The convolution layers' data movement compiled by Numba, parallel over the samples of a batch:
im2col, col2im, 2x2 max-pooling and its backward (the NumPy reference is in parnn.core.conv).

Each sample is one prange iteration that writes only that sample's rows of the output, and
every output number is computed in the reference's order (col2im adds a pixel's k*k
contributions in (di, dj) order, starting from 0), so the results are the reference's bits
whatever the thread count. Compiled on first call (parnn.core.jit); this module is imported
when the first conv layer is made, never by `import parnn.core`.
"""

from __future__ import annotations

import types

from parnn.core.jit import compiled

from numba import prange   # imported with the first conv layer (parnn.core.conv._kernels)


def _im2col(x, k, pad, cols):
    """cols[(b, i, j), (di, dj, c)] = x[b, i + di - pad, j + dj - pad, c], 0 outside the image.
    x (B, H, W, C), cols (B*H'*W', k*k*C)."""
    B, H, W, C = x.shape
    Ho, Wo = H + 2 * pad - k + 1, W + 2 * pad - k + 1
    zero = cols.dtype.type(0)
    for b in prange(B):
        for i in range(Ho):
            for j in range(Wo):
                r = (b * Ho + i) * Wo + j
                for di in range(k):
                    h = i + di - pad
                    for dj in range(k):
                        w = j + dj - pad
                        base = (di * k + dj) * C
                        if 0 <= h < H and 0 <= w < W:
                            for c in range(C):
                                cols[r, base + c] = x[b, h, w, c]
                        else:
                            for c in range(C):
                                cols[r, base + c] = zero
    return cols


def _col2im(dcols, k, pad, dx):
    """dx[b, h, w, c] = sum over (di, dj), in that order, of dcols[(b, h - di + pad, w - dj + pad),
    (di, dj, c)]: the adjoint of im2col. dcols (B*H'*W', k*k*C), dx (B, H, W, C)."""
    B, H, W, C = dx.shape
    Ho, Wo = H + 2 * pad - k + 1, W + 2 * pad - k + 1
    for b in prange(B):
        dx[b] = 0
        for di in range(k):
            for dj in range(k):
                base = (di * k + dj) * C
                for i in range(max(0, pad - di), min(Ho, H + pad - di)):
                    h = i + di - pad
                    for j in range(max(0, pad - dj), min(Wo, W + pad - dj)):
                        w = j + dj - pad
                        r = (b * Ho + i) * Wo + j
                        for c in range(C):
                            dx[b, h, w, c] += dcols[r, base + c]
    return dx


def _maxpool(x, y):
    """y[b, i, j, c] = max of x[b, 2i:2i+2, 2j:2j+2, c]. x (B, H, W, C), y (B, H/2, W/2, C)."""
    B, Ho, Wo, C = y.shape
    for b in prange(B):
        for i in range(Ho):
            for j in range(Wo):
                for c in range(C):
                    m = x[b, 2 * i, 2 * j, c]
                    m = max(m, x[b, 2 * i, 2 * j + 1, c])
                    m = max(m, x[b, 2 * i + 1, 2 * j, c])
                    y[b, i, j, c] = max(m, x[b, 2 * i + 1, 2 * j + 1, c])
    return y


def _maxpool_backward(x, dy, dx):
    """dx = dy at each window's first maximum (order (0,0), (0,1), (1,0), (1,1)), 0 elsewhere."""
    B, Ho, Wo, C = dy.shape
    for b in prange(B):
        dx[b] = 0
        for i in range(Ho):
            for j in range(Wo):
                for c in range(C):
                    h, w = 2 * i, 2 * j
                    m = x[b, h, w, c]
                    for hh, ww in ((2 * i, 2 * j + 1), (2 * i + 1, 2 * j), (2 * i + 1, 2 * j + 1)):
                        if x[b, hh, ww, c] > m:
                            m, h, w = x[b, hh, ww, c], hh, ww
                    dx[b, h, w, c] = dy[b, i, j, c]
    return dx


@compiled(cache=True)
def bias_act(z, b, relu):
    """z += b row by row, then max(z, 0) if relu, in one pass over z (two NumPy passes over a
    conv layer's output cost more than its im2col)."""
    zero = z.dtype.type(0)
    for r in range(z.shape[0]):
        for j in range(z.shape[1]):
            v = z[r, j] + b[j]
            z[r, j] = max(v, zero) if relu else v
    return z


# Each kernel twice: over the batch on Numba's threads, and on the calling thread only (when
# BLAS's threads are the only pool: see parnn.core.conv, "threads").
KERNELS = ("im2col", "col2im", "maxpool", "maxpool_backward")
im2col = compiled(parallel=True, cache=True)(_im2col)
col2im = compiled(parallel=True, cache=True)(_col2im)
maxpool = compiled(parallel=True, cache=True)(_maxpool)
maxpool_backward = compiled(parallel=True, cache=True)(_maxpool_backward)


def _renamed(fn, name):
    """fn under another name: Numba's cache is per qualified name, and must not hand the
    parallel build to the serial one."""
    copy = types.FunctionType(fn.__code__, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    copy.__qualname__ = name
    return copy


serial = {name: compiled(cache=True)(_renamed(globals()["_" + name], f"{name}_serial"))
          for name in KERNELS}
