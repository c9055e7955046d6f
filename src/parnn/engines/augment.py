"""On-the-fly data augmentation: every image of a mini-batch gets its own small random affine
transform, computed in parallel (Numba prange over the batch, or a share of the rows on each of
the caller's threads) straight from the training set, which is never copied.

    augment_batch(X, idx, out, seed, epoch, ...)   the kernel: out[b] = transform_b(X[idx[b]])
    augment_rows(X, idx, out, lo, hi, ...)         its rows lo..hi-1 on the calling thread
    sample_transform(seed, epoch, index, ...)      the random transform one sample gets
    reference_batch(X, idx, seed, epoch, ...)      the same in plain NumPy, slow and readable,
                                                   for the tests only

The transform of one image (pixel centres at integer coordinates, c the image's centre):

    rotate by theta and zoom by z about c, then translate by t, then (maybe) mirror left-right
    theta ~ U[-rotate, rotate] degrees, z ~ U[1 - scale, 1 + scale],
    t     ~ whole pixels, uniform on {-S..S} per axis (S = floor(shift)), or with subpixel=True
            U[-shift, shift] per axis; flip with probability 1/2 when hflip

computed backwards, as image warps are: output pixel p (column u, row v; u mirrored first when
flipped) reads the input at

    src = c + R(theta)^T (p - c - t) / z

by bilinear interpolation, with zero outside the image (the Fashion-MNIST background is 0).
With only whole-pixel shifts every src is an input pixel centre and the image moves exactly.

Which transforms keep a Fashion-MNIST label: a shift of a pixel or two, a rotation of a few
degrees and a zoom of a few percent do (the classes are garments, not positions or angles).
A horizontal flip does too: every class is left-right symmetric as a class (a mirrored sneaker
is a sneaker). But the footwear in the dataset all faces one way, so flipped shoes are images
the test set never shows: whether the flip pays is for the ablation (docs/ACCURACY.md). A
vertical flip does NOT keep the labels (an upside-down boot or dress is not a Fashion-MNIST
image of one, and nothing here does it).

Randomness is a pure function of (seed, epoch, sample index), not a sequential generator:

    key   = splitmix64(splitmix64(splitmix64(seed) ^ epoch) ^ index)
    r_k   = splitmix64(key + k * GOLDEN),  k = 0..4     (the splitmix64 stream seeded at key)
    t_x, t_y, theta, z, flip from r_0..r_4, each always drawn (turning an option on or off
    never changes the others' draws)

so a sample's transform does not depend on the thread count, on which batch it falls in or on
where a resumed run restarts. Each output row is written by exactly one prange iteration, so
the whole output is bitwise the same at any thread count. The per-sample constants are
computed in float64, the per-pixel math in out's dtype (float32 stays float32).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from parnn.engines.compiled import typed
from parnn.errors import ConfigError

GOLDEN = 0x9E3779B97F4A7C15           # splitmix64's increment, 2^64 / golden ratio
MIX1, MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
MASK64 = (1 << 64) - 1
N_DRAWS = 5                           # t_x, t_y, theta, z, flip

_GOLDEN, _MIX1, _MIX2 = np.uint64(GOLDEN), np.uint64(MIX1), np.uint64(MIX2)


# --- the random transform of one sample -----------------------------------------------------------

@njit(cache=True)
def splitmix64(x):
    """The first output of splitmix64 seeded at x (uint64; arithmetic wraps mod 2^64)."""
    z = x + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


@njit(cache=True)
def _unit(r):
    """r's top 53 bits as a float64 in [0, 1)."""
    return np.float64(r >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@njit(cache=True)
def _transform(seed, epoch, index, shift, subpixel, rotate, scale, hflip):
    """(t_x, t_y, theta in degrees, zoom, flip) of one sample; seed, epoch, index are uint64."""
    key = splitmix64(splitmix64(splitmix64(seed) ^ epoch) ^ index)
    r0 = splitmix64(key)
    r1 = splitmix64(key + _GOLDEN)
    r2 = splitmix64(key + np.uint64(2) * _GOLDEN)
    r3 = splitmix64(key + np.uint64(3) * _GOLDEN)
    r4 = splitmix64(key + np.uint64(4) * _GOLDEN)
    if subpixel:
        tx = shift * (2.0 * _unit(r0) - 1.0)
        ty = shift * (2.0 * _unit(r1) - 1.0)
    else:
        whole = np.int64(math.floor(shift))
        n = np.uint64(2 * whole + 1)
        tx = np.float64(np.int64(r0 % n) - whole)
        ty = np.float64(np.int64(r1 % n) - whole)
    theta = rotate * (2.0 * _unit(r2) - 1.0)
    zoom = 1.0 + scale * (2.0 * _unit(r3) - 1.0)
    flip = hflip and (r4 >> np.uint64(63)) == np.uint64(1)
    return tx, ty, theta, zoom, flip


def _uint64(k):
    return np.uint64(int(k) & MASK64)


def sample_transform(seed, epoch, index, shift=2, rotate=0.0, scale=0.0, hflip=False,
                     subpixel=False):
    """(t_x, t_y, theta in degrees, zoom, flip) that augment_batch gives sample `index`."""
    tx, ty, theta, zoom, flip = _transform(_uint64(seed), _uint64(epoch), _uint64(index),
                                           float(shift), bool(subpixel), float(rotate),
                                           float(scale), bool(hflip))
    return float(tx), float(ty), float(theta), float(zoom), bool(flip)


# --- the kernel ---------------------------------------------------------------------------------

@njit(inline="always")
def _floor(a):
    """floor(a) as an int64, inline: math.floor of a float32 is a call to libm's floorf."""
    i = np.int64(a)
    return i - 1 if a < i else i


@njit(inline="always")
def _pixel(x, r, c, height, width, like):
    """Input pixel (r, c) in like's dtype, zero outside the image."""
    if r < 0 or r >= height or c < 0 or c >= width:
        return typed(like, 0.0)
    return typed(like, x[r * width + c])


@njit(inline="always")
def _shift(x, y, tx, ty, flip, height, width, div):
    """A whole-pixel shift (and flip): every source is a pixel centre, so this copies, bitwise
    what _warp computes for the same transform, without its four loads per pixel."""
    itx, ity = np.int64(tx), np.int64(ty)
    for v in range(height):
        for u in range(width):
            su = (width - 1 - u if flip else u) - itx
            y[v * width + u] = _pixel(x, v - ity, su, height, width, div) / div


@njit(inline="always")
def _warp(x, y, tx, ty, theta, zoom, flip, height, width, div):
    """y = x warped by the transform, bilinear with zero fill, in div's dtype. Row by row in
    three passes, so that the coordinate and interpolation arithmetic vectorizes; only the
    loads, with their border test, stay scalar (measured against one pass: docs/ACCURACY.md)."""
    rad = math.radians(theta)
    c, s = typed(div, math.cos(rad) / zoom), typed(div, math.sin(rad) / zoom)
    cx, cy = typed(div, 0.5 * (width - 1)), typed(div, 0.5 * (height - 1))
    shift_x, shift_y = typed(div, tx), typed(div, ty)
    zero, one = typed(div, 0.0), typed(div, 1.0)
    dx = np.empty(width, y.dtype)                     # p - c - t along a row, mirrored if flipped
    for u in range(width):
        dx[u] = (typed(div, width - 1 - u if flip else u) - cx) - shift_x
    x0, y0 = np.empty(width, np.int64), np.empty(width, np.int64)
    fx, fy = np.empty(width, y.dtype), np.empty(width, y.dtype)
    p00, p01 = np.empty(width, y.dtype), np.empty(width, y.dtype)
    p10, p11 = np.empty(width, y.dtype), np.empty(width, y.dtype)
    for v in range(height):
        dy = (typed(div, v) - cy) - shift_y
        bx, by = cx + s * dy, cy + c * dy            # src = c + R^T (p - c - t) / zoom
        for u in range(width):
            sx, sy = bx + c * dx[u], by - s * dx[u]
            x0[u], y0[u] = _floor(sx), _floor(sy)
            fx[u], fy[u] = sx - typed(div, x0[u]), sy - typed(div, y0[u])
        for u in range(width):
            a, b = x0[u], y0[u]
            if 0 <= a < width - 1 and 0 <= b < height - 1:     # all four inside: most pixels
                k = b * width + a
                p00[u], p01[u] = typed(div, x[k]), typed(div, x[k + 1])
                p10[u], p11[u] = typed(div, x[k + width]), typed(div, x[k + width + 1])
            else:
                p00[u] = _pixel(x, b, a, height, width, div)
                p01[u] = _pixel(x, b, a + 1, height, width, div)
                p10[u] = _pixel(x, b + 1, a, height, width, div)
                p11[u] = _pixel(x, b + 1, a + 1, height, width, div)
        for u in range(width):
            top = p00[u] + fx[u] * (p01[u] - p00[u])
            bottom = p10[u] + fx[u] * (p11[u] - p10[u])
            value = (top + fy[u] * (bottom - top)) / div
            # a lerp can overshoot its ends by a rounding error: keep the [0, 1] promise
            y[v * width + u] = min(max(value, zero), one)


@njit(inline="always")
def _augment_row(X, idx, out, b, seed, epoch, shift, subpixel, rotate, scale, hflip, height,
                 width, divisor):
    """out[b] = the transformed X[idx[b]]: each row on its own, so any split gives the same bits."""
    i = idx[b]
    tx, ty, theta, zoom, flip = _transform(seed, epoch, np.uint64(i), shift, subpixel, rotate,
                                           scale, hflip)
    div = typed(out[b, 0], divisor)     # 255 or 1 in out's dtype
    if not subpixel and rotate == 0.0 and scale == 0.0:
        _shift(X[i], out[b], tx, ty, flip, height, width, div)
    else:
        _warp(X[i], out[b], tx, ty, theta, zoom, flip, height, width, div)


@njit(cache=True, parallel=True)
def _augment(X, idx, out, seed, epoch, shift, subpixel, rotate, scale, hflip, height, width,
             divisor):
    for b in prange(len(idx)):          # one row per iteration: any thread count, same bits
        _augment_row(X, idx, out, b, seed, epoch, shift, subpixel, rotate, scale, hflip, height,
                     width, divisor)


@njit(cache=True, nogil=True)
def _augment_part(X, idx, out, lo, hi, seed, epoch, shift, subpixel, rotate, scale, hflip,
                  height, width, divisor):
    for b in range(lo, hi):             # the rows of one thread the caller runs (no pool)
        _augment_row(X, idx, out, b, seed, epoch, shift, subpixel, rotate, scale, hflip, height,
                     width, divisor)


def _check(X, idx, out, shift, rotate, scale, height, width):
    if X.ndim == 3:
        X = X.reshape(len(X), -1)       # (n, height, width) images: a view, not a copy
    if X.ndim != 2 or X.shape[1] != height * width:
        raise ConfigError(f"images of shape {X.shape} are not {height}x{width}")
    if X.dtype != np.uint8 and X.dtype.kind != "f":
        raise ConfigError(f"images must be uint8 or floats in [0, 1], got {X.dtype}")
    if idx.dtype != np.int64 or idx.ndim != 1:
        raise ConfigError(f"batch indices must be a 1-d int64 array, got {idx.dtype} {idx.shape}")
    if len(idx) and (idx.min() < 0 or idx.max() >= len(X)):
        raise ConfigError(f"batch indices outside 0..{len(X) - 1}")
    if out.dtype.kind != "f" or out.shape != (len(idx), height * width):
        raise ConfigError(f"out must be floats of shape {(len(idx), height * width)}, "
                          f"got {out.dtype} {out.shape}")
    if not (0 <= shift < min(height, width)) or not 0 <= rotate <= 180 or not 0 <= scale < 1:
        raise ConfigError(f"augmentation needs 0 <= shift < {min(height, width)}, "
                          f"0 <= rotate <= 180 and 0 <= scale < 1, got shift={shift}, "
                          f"rotate={rotate}, scale={scale}")
    return X


def augment_batch(X, idx, out, seed, epoch, shift=2, rotate=0.0, scale=0.0, hflip=False,
                  height=28, width=28, subpixel=False):
    """Write the augmented images X[idx] into out, scaled to [0, 1]; returns out.

    X      (n, height*width) uint8 0..255 (divided by 255) or floats in [0, 1], not copied
    idx    (b,) int64, the batch's sample indices
    out    (b, height*width) float32 or float64, written in full
    seed, epoch   with each sample's index, all the randomness (see the module docstring)
    shift  translations of up to `shift` pixels per axis: whole pixels, or continuous with
           subpixel=True
    rotate largest rotation in degrees; scale largest zoom as a fraction (0.1: 0.9x..1.1x)
    hflip  mirror left-right with probability 1/2

    With shift=0, rotate=0, scale=0, hflip=False, out is exactly X[idx] / 255 (uint8) or
    X[idx] (floats) in out's dtype.
    """
    X = _check(X, idx, out, float(shift), float(rotate), float(scale), height, width)
    divisor = 255.0 if X.dtype == np.uint8 else 1.0
    _augment(X, idx, out, _uint64(seed), _uint64(epoch), float(shift), bool(subpixel),
             float(rotate), float(scale), bool(hflip), int(height), int(width), divisor)
    return out


def augment_rows(X, idx, out, lo, hi, seed, epoch, shift=2, rotate=0.0, scale=0.0, hflip=False,
                 height=28, width=28, subpixel=False):
    """augment_batch's rows lo..hi-1 only, on the calling thread, without the GIL and without a
    Numba parallel region: for threads of the caller's own (a parallel region between their
    BLAS calls would make two thread pools fight for the cores). The same bits as
    augment_batch's rows."""
    X = _check(X, idx, out, float(shift), float(rotate), float(scale), height, width)
    if not 0 <= lo <= hi <= len(idx):
        raise ConfigError(f"rows {lo}..{hi} are not within the batch's 0..{len(idx)}")
    divisor = 255.0 if X.dtype == np.uint8 else 1.0
    _augment_part(X, idx, out, int(lo), int(hi), _uint64(seed), _uint64(epoch), float(shift),
                  bool(subpixel), float(rotate), float(scale), bool(hflip), int(height),
                  int(width), divisor)
    return out


# --- the reference: the same transform in plain NumPy, one image at a time ---------------------

def _splitmix64_py(x):
    z = (x + GOLDEN) & MASK64
    z = ((z ^ (z >> 30)) * MIX1) & MASK64
    z = ((z ^ (z >> 27)) * MIX2) & MASK64
    return z ^ (z >> 31)


def reference_transform(seed, epoch, index, shift=2, rotate=0.0, scale=0.0, hflip=False,
                        subpixel=False):
    """sample_transform written in Python integers: the recipe of the module docstring."""
    key = _splitmix64_py(_splitmix64_py(_splitmix64_py(seed & MASK64) ^ (epoch & MASK64))
                         ^ (index & MASK64))
    r = [_splitmix64_py((key + k * GOLDEN) & MASK64) for k in range(N_DRAWS)]
    unit = [(rk >> 11) * 2.0 ** -53 for rk in r]
    if subpixel:
        tx, ty = shift * (2 * unit[0] - 1), shift * (2 * unit[1] - 1)
    else:
        whole = math.floor(shift)
        tx, ty = float(r[0] % (2 * whole + 1) - whole), float(r[1] % (2 * whole + 1) - whole)
    theta = rotate * (2 * unit[2] - 1)
    zoom = 1 + scale * (2 * unit[3] - 1)
    flip = bool(hflip) and r[4] >> 63 == 1
    return tx, ty, theta, zoom, flip


def reference_batch(X, idx, seed, epoch, shift=2, rotate=0.0, scale=0.0, hflip=False,
                    height=28, width=28, subpixel=False, dtype=np.float32):
    """augment_batch's result, computed image by image with NumPy (slow: for the tests)."""
    dt = np.dtype(dtype).type
    X = np.asarray(X).reshape(len(X), -1)
    divisor = dt(255 if X.dtype == np.uint8 else 1)
    out = np.empty((len(idx), height * width), dt)
    v, u = np.mgrid[0:height, 0:width].astype(dt)
    cx, cy = dt(0.5 * (width - 1)), dt(0.5 * (height - 1))
    for b, i in enumerate(idx):
        tx, ty, theta, zoom, flip = reference_transform(seed, epoch, int(i), shift, rotate,
                                                        scale, hflip, subpixel)
        # zero border: an index clipped to -1 or width/height reads zero
        padded = np.zeros((height + 2, width + 2), dt)
        padded[1:-1, 1:-1] = X[i].reshape(height, width).astype(dt)
        c, s = dt(math.cos(math.radians(theta)) / zoom), dt(math.sin(math.radians(theta)) / zoom)
        dx = ((dt(width - 1) - u if flip else u) - cx) - dt(tx)
        dy = (v - cy) - dt(ty)
        sx = (cx + s * dy) + c * dx                    # src = c + R^T (p - c - t) / zoom
        sy = (cy + c * dy) - s * dx
        x0, y0 = np.floor(sx), np.floor(sy)
        fx, fy = sx - x0, sy - y0

        def at(rows, cols):
            rows = np.clip(rows, -1, height).astype(np.int64) + 1
            cols = np.clip(cols, -1, width).astype(np.int64) + 1
            return padded[rows, cols]
        p00, p01 = at(y0, x0), at(y0, x0 + 1)
        p10, p11 = at(y0 + 1, x0), at(y0 + 1, x0 + 1)
        top = p00 + fx * (p01 - p00)
        bottom = p10 + fx * (p11 - p10)
        out[b] = np.clip((top + fy * (bottom - top)) / divisor, 0, 1).ravel()
    return out
