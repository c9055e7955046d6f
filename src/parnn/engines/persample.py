"""Per-sample SGD compiled with Numba: the paper's algorithm, four ways.

    serial   one thread, the paper's serial program
    neuron   the paper's parallel strategy: inside every sample the neurons of each layer are split
             over the threads, one parallel region (fork/join) per loop
    hogwild  sample-parallel lock-free SGD (Niu, Recht, Re, Wright 2011): each thread runs `serial`
             on its own contiguous part of the order, all on the same weights, without locks
    owner    like neuron, but every thread owns a slice of the neurons of every layer for the
             whole chunk, and the threads meet at spin barriers (5 per sample for 3 layers)
             instead of forking and joining 8 times. Each thread's weights stay in its own
             core's L2 cache.

neuron uses Numba's parallel=True/prange (one parallel region per loop, as the paper).
hogwild and owner start Python threads that each call a kernel compiled with nogil=True: the
same concurrency as a prange over thread ids, but the compiled per-sample code is shared instead
of being inlined and re-optimized into a second (parallel) kernel, which halved the cold compile
time, and every thread is guaranteed to run at once (the owner's barriers need that).

All four do exactly the same arithmetic in the same order, so serial, neuron (any thread count),
owner (any thread count) and hogwild (1 thread) produce bit-identical weights. The tests check
it. The math is model.py's, for one sample (B = 1) and plain SGD:

    forward   z = b + W a_prev,  a = act(z)
    output    delta = dL/dz (p - t for softmax + cross-entropy, (a - t) act'(a) for MSE, ...)
    errors    delta_prev = (W^T delta) * act'(a_prev)     from the weights BEFORE the update
    update    W -= lr * delta a_prev^T,  b -= lr * delta

Summation order (what makes the bitwise claims true) -- every engine calls the same helpers:
  * input layer (W0, the 784-wide one, 85% of the work): z_j = b_j + sum_k W0[j,k] x_k with k
    ascending, one fused multiply-add per term: the C reference's order. We keep W0
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
layer reads each old weight, adds its term to the error and writes the updated weight; the W0
update of sample s is fused with the W0 forward pass of sample s+1 (same arithmetic, one pass
over 1.6 MB instead of two).

Kernels take activation and loss as integer codes and work in float32 or float64 (the arrays'
dtype); constants are converted with `typed` so float32 math stays float32.
"""

from __future__ import annotations

import threading
import time

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from parnn.engines import EpochStats, contiguous_inputs
from parnn.errors import ConfigError

TANH, SIGMOID, RELU, SOFTMAX = 0, 1, 2, 3
MSE, CROSS_ENTROPY = 0, 1
NONE = -1                      # "leave z as it is" (the output layer, done by output_delta)
ACT_CODES = {"tanh": TANH, "sigmoid": SIGMOID, "relu": RELU, "softmax": SOFTMAX}
LOSS_CODES = {"mse": MSE, "cross_entropy": CROSS_ENTROPY}

JB = 16     # neurons per error block and per ownership granule (64 B of float32, 128 B of float64)
PAD = 16    # buffers start on multiples of 16 elements: no two threads' slices share a cache line
FLAG = 16   # int64s between two threads' barrier flags (128 bytes)

# fastmath flags: 'contract' lets LLVM fuse a*b+c into one FMA (deterministic: the same source
# expression always becomes the same FMA); 'reassoc' lets it reorder a sum, used only in `dot`.
FMA = {"contract"}
REASSOC = {"contract", "reassoc"}


# --- intrinsics: typed constants, atomics, spin-wait hints -----------------------------------

@intrinsic
def typed(typingctx, like, value):
    """`value` converted to the (float) type of `like`: keeps float32 arithmetic in float32."""
    if not isinstance(like, types.Float):
        return None
    sig = like(like, value)

    def codegen(context, builder, sig, args):
        return context.cast(builder, args[1], sig.args[1], sig.return_type)
    return sig, codegen


@intrinsic
def atomic_load(typingctx, arr, idx):
    """arr[idx] with acquire ordering (no later memory access moves before it)."""
    sig = arr.dtype(arr, idx)

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, sig.args[0], ary, [args[1]])
        return builder.load_atomic(ptr, "acquire", 8)
    return sig, codegen


@intrinsic
def atomic_store(typingctx, arr, idx, value):
    """arr[idx] = value with release ordering (no earlier memory access moves after it)."""
    sig = types.void(arr, idx, arr.dtype)

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, sig.args[0], ary, [args[1]])
        builder.store_atomic(args[2], ptr, "release", 8)
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def cpu_relax(typingctx):
    """x86 PAUSE: tells the core we are spinning."""
    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                            "llvm.x86.sse2.pause")
        builder.call(fn, [])
        return context.get_dummy_value()
    return types.void(), codegen


@intrinsic
def sched_yield(typingctx):
    """libc sched_yield(): give the core away when a partner thread is descheduled."""
    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), []),
                                            "sched_yield")
        return builder.call(fn, [])
    return types.int32(), codegen


# --- barrier (owner engine) -----------------------------------------------------------------
# flags[t * FLAG] = number of barriers thread t has reached. Arriving at barrier k = publish k,
# then wait until every other thread has published >= k. With 2 threads that is one cache line
# each way (~40 ns). Spin with PAUSE, then yield, so an oversubscribed machine still progresses.

SPIN = 4000           # PAUSEs (~50 us) before falling back to sched_yield


@njit(cache=True)
def spin_wait(spins):
    if spins < SPIN:
        cpu_relax()
    else:
        sched_yield()


@njit(cache=True)
def barrier(flags, tid, nt, k):
    """Wait until all nt threads reached barrier number k. Returns 1 if it waited so long (over
    SPIN pauses, ~0.1 ms) that it had to yield the core, else 0."""
    atomic_store(flags, tid * FLAG, k)
    slow = 0
    for o in range(nt):
        if o != tid:
            spins = 0
            while atomic_load(flags, o * FLAG) < k:
                spin_wait(spins)
                spins += 1
            if spins > SPIN:
                slow = 1
    return slow


# --- activations: forward and derivative side by side (derivative from the OUTPUT a) ---------

@njit(cache=True)
def act(z, code):
    one, half, zero = typed(z, 1.0), typed(z, 0.5), typed(z, 0.0)
    if code == TANH:
        return np.tanh(z)
    if code == SIGMOID:                        # 0.5 * (1 + tanh(z/2)), as model.py
        return (np.tanh(z * half) + one) * half
    return max(z, zero)                        # RELU


@njit(cache=True)
def dact(a, code):
    one, zero = typed(a, 1.0), typed(a, 0.0)
    if code == TANH:
        return one - a * a
    if code == SIGMOID:
        return a * (one - a)
    return one if a > zero else zero           # RELU


@njit(cache=True)
def activate(z, code):
    """z = act(z) in place (nothing for NONE: the output layer is left to output_delta)."""
    if code != NONE:
        for j in range(z.shape[0]):
            z[j] = act(z[j], code)


# --- input layer W0, stored transposed in per-thread blocks -----------------------------------
# WTb[t, k, j] = W0[lo_t + j, k] for thread t's neurons lo_t <= lo_t + j < hi_t. Inner loops run
# over neurons j (contiguous), so they vectorize while each neuron's sum keeps its k-ascending
# order: four k's per pass over z, z = (((z + w0 x0) + w1 x1) + w2 x2) + w3 x3.
# One contiguous block per thread: with the threads' columns interleaved in one W0^T (each
# 2 KB row half one thread's, half the other's) the hardware prefetchers of one core kept pulling
# the other core's freshly written lines, and 2 threads ran 2.5x SLOWER than one.
# The helpers get b, g, z already sliced to the block's neurons, and index everything from 0
# (with range(j0, j1) Numba cannot prove j >= 0, checks every index and LLVM stops vectorizing).

@njit(cache=True)
def input_rows(x, xp, dense, rows):
    """rows[:n] = the k where x[k] != 0 or xp[k] != 0 (all k if dense); returns n.

    A zero input contributes exactly nothing to a weight row: the update w - g*0 and the
    forward term z + w*0 leave w and z as they are. Skipping those rows changes no value (at
    most the sign of a zero) and, on Fashion-MNIST (about half the pixels are 0), saves about a
    third of the traffic over W0. Every engine skips by the same rule, so they stay identical."""
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
def partial_errors(W, d, P, k0, k1):
    """Columns k0..k1-1 of every block of P, from W as it is (the neuron engine's error loop)."""
    n_out, m = W.shape[0], k1 - k0
    for blk in range(P.shape[0]):
        p = P[blk, k0:k1]
        for k in range(m):
            p[k] = typed(d[0], 0.0)
        for j in range(blk * JB, min((blk + 1) * JB, n_out)):
            w, dj = W[j, k0:k1], d[j]
            for k in range(m):
                p[k] = p[k] + dj * w[k]


@njit(cache=True, fastmath=FMA)
def rows_update(W, b, d, lr, a, j0, j1):
    """W[j, k] -= (lr d[j]) a[k], b[j] -= lr d[j] for rows j0..j1-1 (the neuron update loop)."""
    for j in range(j0, j1):
        w = W[j]
        gj = lr * d[j]
        for k in range(W.shape[1]):
            w[k] = w[k] - gj * a[k]
        b[j] = b[j] - gj


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


# --- output layer: activation, loss, delta, hit ------------------------------------------------

@njit(cache=True)
def output_delta(z, t, out_code, loss_code, tiny, p, d):
    """p = output activation of z, d = dL/dz for target t; returns (loss, correct) for this sample.
    Same formulas as model.py: mse 0.5 sum (p-t)^2, cross_entropy -sum t log max(p, tiny)."""
    n = z.shape[0]
    zero, half = typed(tiny, 0.0), typed(tiny, 0.5)
    if out_code == SOFTMAX:
        m = z[0]
        for j in range(1, n):
            m = max(m, z[j])
        s = zero
        for j in range(n):
            p[j] = np.exp(z[j] - m)
            s += p[j]
        for j in range(n):
            p[j] = p[j] / s
    else:
        for j in range(n):
            p[j] = act(z[j], out_code)
    loss = zero
    if loss_code == MSE:
        for j in range(n):
            r = p[j] - t[j]
            loss += r * r
        loss *= half
    else:
        for j in range(n):
            loss -= t[j] * np.log(max(p[j], tiny))
    if out_code == SOFTMAX and loss_code == CROSS_ENTROPY:
        for j in range(n):
            d[j] = p[j] - t[j]
    elif out_code == SOFTMAX:                   # softmax + MSE: Jacobian-vector product
        s = zero
        for j in range(n):
            s += (p[j] - t[j]) * p[j]
        for j in range(n):
            d[j] = ((p[j] - t[j]) - s) * p[j]
    else:
        for j in range(n):
            d[j] = (p[j] - t[j]) * dact(p[j], out_code)
    bp, bt = 0, 0
    for j in range(1, n):
        if p[j] > p[bp]:
            bp = j
        if t[j] > t[bt]:
            bt = j
    return np.float64(loss), bp == bt


# --- layer table ------------------------------------------------------------------------------
# lay[l] = (W offset, b offset, n_in, n_out, offset of the layer's output in A/D, offset in P).
# A holds each layer's activations, D its deltas, P its error blocks (nblk(n_out) x n_in).

@njit(inline="always")
def layer(params, lay, l):
    wo, bo, n_in, n_out = lay[l, 0], lay[l, 1], lay[l, 2], lay[l, 3]
    return params[wo:wo + n_out * n_in].reshape((n_out, n_in)), params[bo:bo + n_out]


@njit(inline="always")
def out_buf(buf, lay, l):
    return buf[lay[l, 4]:lay[l, 4] + lay[l, 3]]


@njit(inline="always")
def p_buf(P, lay, l):
    n_in, n_out = lay[l, 2], lay[l, 3]
    nb = (n_out + JB - 1) // JB
    return P[lay[l, 5]:lay[l, 5] + nb * n_in].reshape((nb, n_in))


@njit(inline="always")
def span(c, nt, n):
    """Part c of nt of range(n), cut on multiples of JB: (lo, hi, first block, end block)."""
    nb = (n + JB - 1) // JB
    b0, b1 = nb * c // nt, nb * (c + 1) // nt
    return min(b0 * JB, n), min(b1 * JB, n), b0, b1


# --- serial: the whole per-sample algorithm on one thread --------------------------------------

@njit(cache=True, nogil=True)
def serial_run(params, WTb, lay, X, T, order, lr, tiny, hid, out, loss_code, A, D, G, P,
               rows, dense):
    """SGD over `order`, one sample at a time. Returns (loss_sum, correct)."""
    L = lay.shape[0]
    first = L - L                                  # layer 0 (a variable, not a literal 0)
    b0 = layer(params, lay, first)[1]
    a1, d1 = out_buf(A, lay, first), out_buf(D, lay, first)
    lo1, hi1, _, _ = span(first, 1, lay[first, 3])      # one thread: all neurons
    WT, b0s, a1s, G1 = WTb[first], b0[lo1:hi1], a1[lo1:hi1], G[lo1:hi1]
    code0 = hid if L > 1 else NONE
    loss_sum, correct = 0.0, 0
    for s in range(order.shape[0]):
        i = order[s]
        x = X[i]
        # forward. Layer 0's update for the previous sample is fused into this pass.
        if s == 0:
            nr = input_rows(x, x, dense, rows)
            input_forward(WT, b0s, x, a1s, code0, rows, nr)
        else:
            xp = X[order[s - 1]]
            nr = input_rows(x, xp, dense, rows)
            input_update_forward(WT, b0s, G1, xp, x, a1s, code0, rows, nr)
        for l in range(1, L):
            W, b = layer(params, lay, l)
            lo, hi, _, _ = span(first, 1, lay[l, 3])
            rows_forward(W, b, out_buf(A, lay, l - 1), out_buf(A, lay, l), lo, hi,
                         hid if l < L - 1 else NONE)
        zL = out_buf(A, lay, L - 1)
        loss, hit = output_delta(zL, T[i], out, loss_code, tiny, zL, out_buf(D, lay, L - 1))
        loss_sum += loss
        correct += hit
        # backward: each layer's errors and update in one pass over its weights
        for l in range(L - 1, 0, -1):
            W, b = layer(params, lay, l)
            Pl = p_buf(P, lay, l)
            _, _, blk0, blk1 = span(first, 1, lay[l, 3])
            rows_error_update(W, b, out_buf(D, lay, l), lr, out_buf(A, lay, l - 1), Pl,
                              blk0, blk1)
            lo, hi, _, _ = span(first, 1, lay[l, 2])
            combine_errors(Pl, out_buf(A, lay, l - 1), hid, out_buf(D, lay, l - 1), lo, hi)
        for j in range(lo1, hi1):
            G[j] = lr * d1[j]
    if order.shape[0] > 0:
        xp = X[order[-1]]
        nr = input_rows(xp, xp, dense, rows)
        input_update(WT, b0s, G1, xp, rows, nr)
    return loss_sum, correct


# --- neuron: the paper's parallelization, one parallel region per loop per sample -------------
# Every `for c in prange(nt)` below is a fork/join: the nt threads each take a slice of the
# neurons (cut on JB blocks), then all wait for the slowest. 8 regions per sample for 3 layers:
# 3 forward, 2 hidden-error, 3 update (the paper's 9th, the 10-neuron output error, runs on the
# calling thread: softmax needs a serial sum anyway and it is 10 multiplications).

@njit(parallel=True, cache=True)
def neuron_run(params, WTb, lay, X, T, order, lr, tiny, hid, out, loss_code, A, D, G, P,
               rows, dense, nt):
    L = lay.shape[0]
    first = L - L
    n1 = lay[first, 3]
    b0 = layer(params, lay, first)[1]
    loss_sum, correct = 0.0, 0
    for s in range(order.shape[0]):
        i = order[s]
        x = X[i]
        # forward, layer by layer
        a1 = out_buf(A, lay, first)
        code0 = hid if L > 1 else NONE
        nr = input_rows(x, x, dense, rows)
        for c in prange(nt):                                       # PARALLEL: neurons of layer 1
            lo, hi, _, _ = span(c, nt, n1)
            input_forward(WTb[c], b0[lo:hi], x, a1[lo:hi], code0, rows, nr)
        for l in range(1, L):
            W, b = layer(params, lay, l)
            a_in, a_out = out_buf(A, lay, l - 1), out_buf(A, lay, l)
            code = hid if l < L - 1 else NONE
            for c in prange(nt):                                   # PARALLEL: neurons of layer l+1
                lo, hi, _, _ = span(c, nt, lay[l, 3])
                rows_forward(W, b, a_in, a_out, lo, hi, code)
        zL = out_buf(A, lay, L - 1)
        loss, hit = output_delta(zL, T[i], out, loss_code, tiny, zL, out_buf(D, lay, L - 1))
        loss_sum += loss
        correct += hit
        # errors, from the weights before any update
        for l in range(L - 1, 0, -1):
            W = layer(params, lay, l)[0]
            Pl, d, a_in = p_buf(P, lay, l), out_buf(D, lay, l), out_buf(A, lay, l - 1)
            d_in = out_buf(D, lay, l - 1)
            for c in prange(nt):                                   # PARALLEL: neurons of layer l
                lo, hi, _, _ = span(c, nt, lay[l, 2])
                partial_errors(W, d, Pl, lo, hi)
                combine_errors(Pl, a_in, hid, d_in, lo, hi)
        # updates
        for l in range(L - 1, 0, -1):
            W, b = layer(params, lay, l)
            d, a_in = out_buf(D, lay, l), out_buf(A, lay, l - 1)
            for c in prange(nt):                                   # PARALLEL: neurons of layer l+1
                lo, hi, _, _ = span(c, nt, lay[l, 3])
                rows_update(W, b, d, lr, a_in, lo, hi)
        d1 = out_buf(D, lay, first)
        for c in prange(nt):                                       # PARALLEL: neurons of layer 1
            lo, hi, _, _ = span(c, nt, n1)
            for j in range(lo, hi):
                G[j] = lr * d1[j]
            input_update(WTb[c], b0[lo:hi], G[lo:hi], x, rows, nr)
    return loss_sum, correct


# --- hogwild: threads own parts of the ORDER, share all weights, no locks ---------------------
# No kernel of its own: `HogwildEngine` starts one thread per part of the order, each running
# serial_run (compiled nogil, so the threads run at once) on its own activation buffers and the
# SHARED weights. Reads and writes of the weights race without locks, as in Hogwild!.


# --- owner: threads own neurons for good, meet at spin barriers ------------------------------
# `OwnerEngine` starts one thread per slice (nogil: they run at once) for the whole chunk. No
# fork/join per loop: between layers the threads only wait for each other at a barrier.

@njit(cache=True, nogil=True)
def owner_thread(tid, nt, params, WTb, lay, X, T, order, lr, tiny, hid, out, loss_code,
                 A, D, G, P, Po, Do, flags, rows, dense):
    """Thread tid's share of every sample.

    Returns (loss_sum, correct, slow): thread 0 counts the samples; slow = how many of its
    barriers had to give the core away.

    Thread tid owns the neurons span(tid, nt, n) of every layer: their rows of W (columns of
    WT0), biases, activations and deltas. Per sample: forward layer by layer with a barrier
    after each (the next layer needs all activations); every thread then computes the whole
    (small) output layer's delta privately; backward: each thread writes its blocks' partial
    errors and updates its rows, barrier, then sums the partial errors of its own neurons.
    """
    L = lay.shape[0]
    first = L - L
    b0 = layer(params, lay, first)[1]
    a1 = out_buf(A, lay, first)
    lo1, hi1, _, _ = span(tid, nt, lay[first, 3])
    WT, b0s, a1s, G1 = WTb[tid], b0[lo1:hi1], a1[lo1:hi1], G[lo1:hi1]
    po, do = Po[tid], Do[tid]
    k = 0                                     # barriers passed
    slow = 0                                  # barriers that had to yield (see barrier())
    loss_sum, correct = 0.0, 0
    for s in range(order.shape[0]):
        i = order[s]
        x = X[i]
        code0 = hid if L > 1 else NONE
        if s == 0:
            nr = input_rows(x, x, dense, rows)
            input_forward(WT, b0s, x, a1s, code0, rows, nr)
        else:
            xp = X[order[s - 1]]
            nr = input_rows(x, xp, dense, rows)
            input_update_forward(WT, b0s, G1, xp, x, a1s, code0, rows, nr)
        k += 1
        slow += barrier(flags, tid, nt, k)                  # BARRIER: layer 1 complete
        for l in range(1, L):
            W, b = layer(params, lay, l)
            lo, hi, _, _ = span(tid, nt, lay[l, 3])
            rows_forward(W, b, out_buf(A, lay, l - 1), out_buf(A, lay, l), lo, hi,
                         hid if l < L - 1 else NONE)
            k += 1
            slow += barrier(flags, tid, nt, k)              # BARRIER: layer l+1 complete
        loss, hit = output_delta(out_buf(A, lay, L - 1), T[i], out, loss_code, tiny, po, do)
        if tid == 0:
            loss_sum += loss
            correct += hit
        d = do
        for l in range(L - 1, 0, -1):
            W, b = layer(params, lay, l)
            Pl = p_buf(P, lay, l)
            _, _, blk0, blk1 = span(tid, nt, lay[l, 3])
            rows_error_update(W, b, d, lr, out_buf(A, lay, l - 1), Pl, blk0, blk1)
            k += 1
            slow += barrier(flags, tid, nt, k)              # BARRIER: all partial errors in
            lo, hi, _, _ = span(tid, nt, lay[l, 2])
            d = out_buf(D, lay, l - 1)
            combine_errors(Pl, out_buf(A, lay, l - 1), hid, d, lo, hi)
        for j in range(lo1, hi1):
            G[j] = lr * d[j]
        if L == 1:
            # no backward barrier: wait until everyone has read the output before the next
            # sample overwrites it
            k += 1
            slow += barrier(flags, tid, nt, k)                 # BARRIER: output read
        if s == 0:
            slow = 0                          # the first sample waits for the threads to start
    if order.shape[0] > 0:
        xp = X[order[-1]]
        nr = input_rows(xp, xp, dense, rows)
        input_update(WT, b0s, G1, xp, rows, nr)
    return loss_sum, correct, slow


# --- the engines --------------------------------------------------------------------------------

def _aligned(n, dtype):
    """Zeroed 1-d array of n elements starting on a 128-byte boundary."""
    dtype = np.dtype(dtype)
    extra = 128 // dtype.itemsize
    raw = np.zeros(n + extra, dtype)
    start = (-raw.ctypes.data % 128) // dtype.itemsize
    return raw[start:start + n]


def blocked_transpose(W0, nb):
    """W0 (n_out, n_in) as nb contiguous blocks: out[t, k, j] = W0[lo_t + j, k], 128-byte
    aligned, blocks cut like the threads' neuron slices (span)."""
    n_out, n_in = W0.shape
    cuts = [span_py(t, nb, n_out) for t in range(nb)]
    width = _pad(max(hi - lo for lo, hi in cuts))
    out = _aligned(nb * n_in * width, W0.dtype).reshape(nb, n_in, width)
    for t, (lo, hi) in enumerate(cuts):
        out[t, :, :hi - lo] = W0[lo:hi].T
    return out


def unblock(WTb, W0):
    nb = WTb.shape[0]
    for t in range(nb):
        lo, hi = span_py(t, nb, W0.shape[0])
        W0[lo:hi] = WTb[t, :, :hi - lo].T


def span_py(c, nt, n):
    nb = -(-n // JB)
    return min(nb * c // nt * JB, n), min(nb * (c + 1) // nt * JB, n)


def _pad(n):
    return -(-n // PAD) * PAD


def layer_table(spec):
    starts, _ = spec.offsets()
    rows, a, p = [], 0, 0
    for (w0, b0), (n_out, n_in) in zip(starts, spec.shapes()):
        rows.append((w0, b0, n_in, n_out, a, p))
        a += _pad(n_out)
        p += _pad(-(-n_out // JB) * n_in)
    return np.array(rows, np.int64), a, p


def optimizer_name(optimizer):
    return getattr(optimizer, "name", optimizer)


class PerSampleEngine:
    """The Python side shared by the per-sample engines: checks, buffers, the W0 transpose in
    and out, compile-time measurement, stats. Subclasses define kernel(...)."""

    per_sample = True
    threads_by = "none"               # how the engine runs threads (reported by info())
    description = ""

    def __init__(self, dense=False):
        self.compile_s = {}           # dtype -> seconds of the first (compiling) call
        # True: visit every W0 row even when its input is 0 (the benchmark's like-for-like
        # comparison with the C reference); the results are the same either way.
        self.dense = dense

    def check(self, spec, optimizer, batch_size):
        opt = optimizer_name(optimizer)
        if opt != "sgd":
            raise ConfigError(
                f"engine {self.name} does the paper's per-sample plain SGD update in place; "
                f"optimizer {opt} keeps per-parameter state that would have to be stepped over "
                f"all {spec.n_params} parameters after every sample: use --engine batch (or numpy)")
        if batch_size != 1:
            raise ConfigError(
                f"engine {self.name} updates after every sample (batch size 1), got batch size "
                f"{batch_size}: use --engine batch for mini-batch or full-batch training")

    def info(self):
        d = {"engine": self.name, "compile_s": dict(self.compile_s), "threads_by": self.threads_by}
        if self.threads_by == "numba prange":
            d["threading_layer"] = _threading_layer()
        return d

    def train(self, net, opt, X, T, order, batch_size):
        spec = net.spec
        self.check(spec, opt, batch_size)
        dt = net.params.dtype
        X, T, order = contiguous_inputs(net, X, T, order)
        if dt.name not in self.compile_s:
            self.warm_up(spec, dt)
        loss_sum, correct = self._run(net.params, net.W[0], spec, X, T, order, opt.lr)
        opt.count_steps(len(order))       # one SGD step per sample, as the numpy engine counts
        return EpochStats(float(loss_sum), int(correct), len(order))

    def _run(self, params, W0, spec, X, T, order, lr):
        if len(order) == 0:
            return 0.0, 0
        dt = params.dtype
        lay, na, npart = layer_table(spec)
        args = (dt.type(lr), dt.type(np.finfo(dt).tiny), ACT_CODES[spec.hidden],
                ACT_CODES[spec.output], LOSS_CODES[spec.loss])
        # W0 transposed for the kernels (see top), on a 128-byte boundary so that threads owning
        # different columns never share a cache line
        nb = self.blocks()
        WTb = blocked_transpose(W0, nb)               # W0 as the kernels want it (see above)
        try:
            return self.kernel(params, WTb, lay, X, T, order, args, na, npart)
        finally:
            unblock(WTb, W0)                          # the flat buffer holds the result

    def warm_up(self, spec, dt):
        """Compile (or load from Numba's cache) on a tiny network; record the time it took."""
        from parnn.core.model import MLP, Spec
        tiny = Spec((3, 2, 2), spec.hidden, spec.output, spec.loss, dt.name)
        net = MLP(tiny, seed=0)
        X = np.zeros((2, 3), dt)
        T = np.eye(2, dtype=dt)
        t0 = time.perf_counter()
        self._run(net.params, net.W[0], tiny, X, T, np.arange(2), 0.0)
        self.compile_s[dt.name] = round(time.perf_counter() - t0, 3)

    def blocks(self):
        """How many thread blocks W0^T is cut into (one per thread that owns neurons)."""
        return 1

    @staticmethod
    def buffers(lay, dt, na, npart, rows=None):
        """Activations A, deltas D (one slot per layer), scaled layer-1 deltas G, error blocks P;
        with rows: one set per thread (hogwild)."""
        sizes = (na, na, _pad(int(lay[0, 3])), max(npart, 1))
        if rows is None:
            return tuple(_aligned(m, dt) for m in sizes)
        return tuple(_aligned(rows * m, dt).reshape(rows, m) for m in sizes)


class SerialEngine(PerSampleEngine):
    name = "serial"
    description = "per-sample SGD on one thread (the paper's serial program)"

    def kernel(self, params, WTb, lay, X, T, order, args, na, npart):
        A, D, G, P = self.buffers(lay, params.dtype, na, npart)
        rows = np.empty(X.shape[1], np.int64)
        return serial_run(params, WTb, lay, X, T, order, *args, A, D, G, P, rows, self.dense)


class NeuronEngine(PerSampleEngine):
    name = "neuron"
    description = "per-sample SGD, each layer's neurons split over threads, fork/join per loop"
    threads_by = "numba prange"

    def blocks(self):
        return numba.get_num_threads()

    def kernel(self, params, WTb, lay, X, T, order, args, na, npart):
        A, D, G, P = self.buffers(lay, params.dtype, na, npart)
        rows = np.empty(X.shape[1], np.int64)
        return neuron_run(params, WTb, lay, X, T, order, *args, A, D, G, P, rows, self.dense,
                          numba.get_num_threads())


class HogwildEngine(PerSampleEngine):
    name = "hogwild"
    description = "lock-free sample-parallel SGD, each thread on its own part of the order"
    threads_by = "python threads running nogil kernels"

    def kernel(self, params, WTb, lay, X, T, order, args, na, npart):
        nt = numba.get_num_threads()
        A, D, G, P = self.buffers(lay, params.dtype, na, npart, rows=nt)
        n = len(order)
        parts = [order[n * t // nt:n * (t + 1) // nt] for t in range(nt)]
        rows = np.empty((nt, X.shape[1]), np.int64)
        results = run_threads(nt, lambda t: serial_run(params, WTb, lay, X, T, parts[t], *args,
                                                       A[t], D[t], G[t], P[t], rows[t],
                                                       self.dense))
        return sum(r[0] for r in results), sum(r[1] for r in results)


class OwnerEngine(PerSampleEngine):
    name = "owner"
    description = ("per-sample SGD, each thread owns a slice of every layer's neurons for the "
                   "whole chunk; spin barriers between layers instead of fork/join")
    threads_by = "python threads running nogil kernels"
    # 5 barriers per sample need every thread on its own core. When another process takes a
    # core, a barrier waits for a whole time slice and an epoch can take 10x longer. So: if
    # more than one barrier per SLOW_LIMIT samples of a chunk had to yield the core, run the
    # next COOLDOWN chunks with the serial kernel (bit-identical results), then try again.
    SLOW_LIMIT = 100
    COOLDOWN = 4

    def __init__(self, dense=False):
        super().__init__(dense)
        self._cooldown = 0
        self.last_slow = 0            # slow barriers in the last threaded chunk
        self.contended_chunks = 0     # chunks whose barriers kept yielding
        self.serial_chunks = 0        # chunks run serially because of that

    def blocks(self):
        return 1 if self._cooldown > 0 else numba.get_num_threads()

    def kernel(self, params, WTb, lay, X, T, order, args, na, npart):
        nt = numba.get_num_threads()
        A, D, G, P = self.buffers(lay, params.dtype, na, npart)
        rows = np.empty((nt, X.shape[1]), np.int64)
        if self._cooldown > 0:                 # blocks() gave serial's one-block layout
            self._cooldown -= 1
            self.serial_chunks += 1
            return serial_run(params, WTb, lay, X, T, order, *args, A, D, G, P, rows[0],
                              self.dense)
        m = _pad(int(lay[-1, 3]))
        Po = _aligned(nt * m, params.dtype).reshape(nt, m)      # private output activations
        Do = _aligned(nt * m, params.dtype).reshape(nt, m)      # private output deltas
        flags = _aligned(nt * FLAG, np.int64)                   # barrier counters
        results = run_threads(nt, lambda t: owner_thread(t, nt, params, WTb, lay, X, T, order,
                                                         *args, A, D, G, P, Po, Do, flags,
                                                         rows[t], self.dense))
        self.last_slow = sum(r[2] for r in results)
        if self.last_slow * self.SLOW_LIMIT > len(order):
            self.contended_chunks += 1
            self._cooldown = self.COOLDOWN
        return results[0][0], results[0][1]                    # thread 0 counts

    def info(self):
        return {**super().info(), "contended_chunks": self.contended_chunks,
                "serial_chunks": self.serial_chunks}


def run_threads(nt, work):
    """work(t) for t = 0..nt-1 at the same time: t = 0 on the calling thread, the others on
    new threads (the kernels are compiled nogil). Returns the results in order."""
    results, errors = [None] * nt, []

    def body(t):
        try:
            results[t] = work(t)
        except BaseException as e:       # pragma: no cover - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=body, args=(t,), daemon=True) for t in range(1, nt)]
    for th in threads:
        th.start()
    body(0)
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    return results


def _threading_layer():
    try:
        return numba.threading_layer()
    except ValueError:          # no parallel region has run yet in this process
        return None

