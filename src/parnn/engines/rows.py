"""The row kernels of the per-sample engines: one layer's work on a slice of its neurons.

Summation order (what makes the engines' bitwise claims true): every engine calls these same
compiled loops on the same rows.
  * input layer (W0, the 784-wide one, most of the work): z_j = b_j + sum_k W0[j,k] x_k with k
    ascending, one fused multiply-add per term: the C reference's order. W0 is kept
    TRANSPOSED, one contiguous block of columns per thread (WTb[t, k, j], copied in and out
    once per call), so this loop runs over neurons j in the inner loop and vectorizes without
    reordering any sum. Rows k whose input is 0 are skipped (input_rows): that changes no value.
  * deeper layers: z_j = b_j + dot(W[j], a) with a vectorized (reassociated) dot, rows taken
    in fours from multiples of 16 (dot4), always the same compiled loops on the same rows, so
    the same order everywhere.
  * errors: rows (neurons of the upper layer) are taken in fixed blocks of JB = 16;
    P[blk, k] = sum_{j in blk} delta_j W[j,k] (j ascending), then e_k = P[0,k] + P[1,k] + ...
    in block order. Threads own whole blocks, so the order never depends on the thread count.

Weights are read-modify-written in ONE pass where the algorithm allows it: the error pass of a
layer reads each old weight, adds its term to the error and writes the updated weight
(rows_error_update); the W0 update of sample s is fused with the W0 forward pass of sample s+1
(input_update_forward: same arithmetic, one pass over W0 instead of two).
"""

from __future__ import annotations

from numba import njit

from parnn.engines.compiled import activate, dact, typed

JB = 16     # neurons per error block and per ownership granule (64 B of float32, 128 B of float64)

# fastmath flags: 'contract' lets LLVM fuse a*b+c into one FMA (deterministic: the same source
# expression always becomes the same FMA); 'reassoc' lets it reorder a sum, used only in `dot`.
FMA = {"contract"}
REASSOC = {"contract", "reassoc"}


# --- input layer W0, stored transposed in per-thread blocks -----------------------------------
# WTb[t, k, j] = W0[lo_t + j, k] for thread t's neurons lo_t <= lo_t + j < hi_t. Inner loops run
# over neurons j (contiguous), so they vectorize while each neuron's sum keeps its k-ascending
# order: four k's per pass over z, z = (((z + w0 x0) + w1 x1) + w2 x2) + w3 x3.
# One contiguous block per thread: with the threads' columns interleaved in one W0^T, the
# hardware prefetchers of one core keep pulling the other core's freshly written lines
# (docs/ENGINES.md has the measurement).
# The helpers get b, g, z already sliced to the block's neurons, and index everything from 0
# (with range(j0, j1) Numba cannot prove j >= 0, checks every index and LLVM stops vectorizing).

@njit(cache=True)
def input_rows(x, xp, dense, rows):
    """rows[:n] = the k where x[k] != 0 or xp[k] != 0 (all k if dense); returns n.

    A zero input contributes exactly nothing to a weight row: the update w - g*0 and the
    forward term z + w*0 leave w and z as they are. Skipping those rows changes no value (at
    most the sign of a zero) and saves the traffic over those rows of W0 (image background is
    0). Every engine skips by the same rule, so they stay identical."""
    n = 0
    for k in range(x.shape[0]):
        if dense or x[k] != 0 or xp[k] != 0:
            rows[n] = k
            n += 1
    return n


@njit(cache=True, fastmath=FMA)
def input_forward(WT, b, x, z, code, rows, nr):
    """z[j] = act(b[j] + sum_k WT[k, j] x[k]) for the block's neurons j < len(z); k over
    rows[:nr] (ascending)."""
    m = z.shape[0]
    for j in range(m):
        z[j] = b[j]
    i = 0
    while i + 4 <= nr:
        k0, k1, k2, k3 = rows[i], rows[i + 1], rows[i + 2], rows[i + 3]
        x0, x1, x2, x3 = x[k0], x[k1], x[k2], x[k3]
        w0, w1, w2, w3 = WT[k0], WT[k1], WT[k2], WT[k3]
        for j in range(m):
            z[j] = (((z[j] + w0[j] * x0) + w1[j] * x1) + w2[j] * x2) + w3[j] * x3
        i += 4
    while i < nr:
        xk, wk = x[rows[i]], WT[rows[i]]
        for j in range(m):
            z[j] = z[j] + wk[j] * xk
        i += 1
    activate(z, code)


@njit(cache=True, fastmath=FMA)
def input_update(WT, b, g, xp, rows, nr):
    """The previous sample's update: WT[k, j] -= g[j] xp[k], b[j] -= g[j]  (g = lr * delta),
    k over rows[:nr]."""
    m = g.shape[0]
    for j in range(m):
        b[j] = b[j] - g[j]
    for i in range(nr):
        pk, wk = xp[rows[i]], WT[rows[i]]
        for j in range(m):
            wk[j] = wk[j] - g[j] * pk


@njit(cache=True, fastmath=FMA)
def input_update_forward(WT, b, g, xp, x, z, code, rows, nr):
    """input_update(.., xp) then input_forward(.., x) in one pass over WT: same arithmetic."""
    m = z.shape[0]
    for j in range(m):
        b[j] = b[j] - g[j]
        z[j] = b[j]
    i = 0
    while i + 4 <= nr:
        k0, k1, k2, k3 = rows[i], rows[i + 1], rows[i + 2], rows[i + 3]
        p0, p1, p2, p3 = xp[k0], xp[k1], xp[k2], xp[k3]
        x0, x1, x2, x3 = x[k0], x[k1], x[k2], x[k3]
        w0, w1, w2, w3 = WT[k0], WT[k1], WT[k2], WT[k3]
        for j in range(m):
            gj = g[j]
            v0 = w0[j] - gj * p0
            v1 = w1[j] - gj * p1
            v2 = w2[j] - gj * p2
            v3 = w3[j] - gj * p3
            w0[j] = v0
            w1[j] = v1
            w2[j] = v2
            w3[j] = v3
            z[j] = (((z[j] + v0 * x0) + v1 * x1) + v2 * x2) + v3 * x3
        i += 4
    while i < nr:
        k = rows[i]
        pk, xk, wk = xp[k], x[k], WT[k]
        for j in range(m):
            v = wk[j] - g[j] * pk
            wk[j] = v
            z[j] = z[j] + v * xk
        i += 1
    activate(z, code)


# --- deeper layers, row-major W[j, k] as in the flat buffer ------------------------------------

@njit(cache=True, fastmath=REASSOC)
def dot(w, a):
    """A reassociated (vectorized) sum. Every engine calls the same compiled loops (dot for a
    single row, dot4 for four) on the same rows, so the order is the same everywhere."""
    s = typed(w[0], 0.0)
    for k in range(w.shape[0]):
        s += w[k] * a[k]
    return s


@njit(cache=True, fastmath=REASSOC)
def dot4(w0, w1, w2, w3, a):
    """Four rows' dots with a in one pass, so a is loaded once for four rows."""
    s0 = s1 = s2 = s3 = typed(a[0], 0.0)
    for k in range(a.shape[0]):
        ak = a[k]
        s0 += w0[k] * ak
        s1 += w1[k] * ak
        s2 += w2[k] * ak
        s3 += w3[k] * ak
    return s0, s1, s2, s3


@njit(cache=True)
def rows_forward(W, b, a, z, j0, j1, code):
    """z[j] = act(b[j] + W[j] . a) for rows j0 <= j < j1. Rows go in fours from j0, which is
    always a multiple of JB, so every engine groups the same rows."""
    j = j0
    while j + 4 <= j1:
        s0, s1, s2, s3 = dot4(W[j], W[j + 1], W[j + 2], W[j + 3], a)
        z[j], z[j + 1], z[j + 2], z[j + 3] = b[j] + s0, b[j + 1] + s1, b[j + 2] + s2, b[j + 3] + s3
        j += 4
    while j < j1:
        z[j] = b[j] + dot(W[j], a)
        j += 1
    activate(z[j0:j1], code)


@njit(cache=True, fastmath=FMA)
def rows_error_update(W, b, d, lr, a, P, blk0, blk1):
    """Row blocks blk0..blk1-1 of W, one pass each: partial errors from the OLD weights, then
    the update.   P[blk, k] = sum_{j in blk} d[j] W[j, k] (j ascending);
                  W[j, k] -= (lr d[j]) a[k],  b[j] -= lr d[j].
    Four rows per pass over P: p = (((p + d0 w0) + d1 w1) + d2 w2) + d3 w3 (the same order)."""
    n_out, n_in = W.shape
    for blk in range(blk0, blk1):
        p = P[blk]
        for k in range(n_in):
            p[k] = typed(lr, 0.0)
        j, end = blk * JB, min((blk + 1) * JB, n_out)
        while j + 4 <= end:
            w0, w1, w2, w3 = W[j], W[j + 1], W[j + 2], W[j + 3]
            d0, d1, d2, d3 = d[j], d[j + 1], d[j + 2], d[j + 3]
            g0, g1, g2, g3 = lr * d0, lr * d1, lr * d2, lr * d3
            for k in range(n_in):
                u0, u1, u2, u3, ak = w0[k], w1[k], w2[k], w3[k], a[k]
                p[k] = (((p[k] + d0 * u0) + d1 * u1) + d2 * u2) + d3 * u3
                w0[k] = u0 - g0 * ak
                w1[k] = u1 - g1 * ak
                w2[k] = u2 - g2 * ak
                w3[k] = u3 - g3 * ak
            b[j], b[j + 1], b[j + 2], b[j + 3] = b[j] - g0, b[j + 1] - g1, b[j + 2] - g2, b[j + 3] - g3
            j += 4
        while j < end:
            w, dj = W[j], d[j]
            gj = lr * dj
            for k in range(n_in):
                wk = w[k]
                p[k] = p[k] + dj * wk
                w[k] = wk - gj * a[k]
            b[j] = b[j] - gj
            j += 1


@njit(cache=True, fastmath=FMA)
def combine_errors(P, a, code, dprev, k0, k1):
    """dprev[k] = (P[0,k] + P[1,k] + ...) * act'(a[k]), blocks in order, for k0 <= k < k1."""
    m = k1 - k0
    ds, as_ = dprev[k0:k1], a[k0:k1]
    p = P[0, k0:k1]
    for k in range(m):
        ds[k] = p[k]
    for blk in range(1, P.shape[0]):
        p = P[blk, k0:k1]
        for k in range(m):
            ds[k] = ds[k] + p[k]
    for k in range(m):
        ds[k] = ds[k] * dact(as_[k], code)
