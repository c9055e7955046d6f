"""The batch engine's fused path: a chunk of mini-batches of a dense ReLU network with softmax +
cross-entropy and Adam (the modern preset) in ONE compiled call per thread, no Python per batch.

What a thread does per batch (tid of nt threads, S shards, shard s on thread s % nt), with
activations and deltas feature-major, aT = (features, samples of the shard):

    gather   its shard's rows x of X (uint8 pixels scaled x / 255 on the way) and of T
    forward  per layer  zT = W @ aT (GEMM; W0 @ x.T first)  then  relu(zT + b) in place
             (with dropout, then times each sample's mask, drawn as layers.Dropout draws it)
    output   per sample  bias, softmax, loss, hit, dzT = (p - t) / B and the last layer's db
    backward per layer  dW = dzT @ a (GEMM; dzT @ x last), daT = W.T @ dzT (GEMM), then
             (daT *= the mask), then daT *= relu'(aT) and the layer's db (sums over the
             samples) in one pass
    meet     all threads have their shards' gradients (a spin barrier)
    step     Adam over this thread's fixed part of the parameters, reading grad_0 + grad_1 + ...
             (the shard sum) in the same pass
    meet     all parameters are updated before the next batch reads them

It is the general path's arithmetic (parnn.core's layers through MLP.forward/backward, then
`grad += grad_s` and Adam.step): each kernel here gives the bits of core's (tests/test_fused.py),
and the GEMMs are numpy's own cblas_?gemm (numpy's OpenBLAS, bound by symbol) with np.matmul's
arguments. Only the GEMMs' operand layout differs (feature-major is faster at 64 rows,
docs/ENGINES.md), so the results differ from the general path's by rounding, within the
engine tests' tolerance; the loss is summed in float64 (a statistic). At any thread count the
bits are the same: shards fixed by S, summed in shard order, the step elementwise.

GEMMs run single-threaded on the calling thread (BatchEngine holds BLAS to one thread when
nt > 1), between the spin barriers of parnn.engines.compiled.
"""

from __future__ import annotations

import ctypes
import os
import platform

import llvmlite.binding as llvm
import numpy as np
from numba import njit, types

from parnn.core.layers import dropout_key, dropout_mask
from parnn.engines.compiled import (FLAG, atomic_load, atomic_store, barrier, cycles,
                                    cycles_per_second)

ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112
_BLAS = {}      # {"ok": whether numpy's ?gemm symbols are bound for Numba}, once per process


def _bind_blas():
    """Bind numpy's own cblas_sgemm / cblas_dgemm (the wheel's OpenBLAS in numpy.libs, with the
    symbol prefix scipy_ and 64-bit ints) so compiled code calls them by name; True if found."""
    if not _BLAS:
        _BLAS["ok"] = False
        from threadpoolctl import threadpool_info
        for lib in threadpool_info():
            path = str(lib.get("filepath"))
            if lib.get("user_api") != "blas" or "numpy" not in os.path.basename(
                    os.path.dirname(path)):            # numpy.libs/, numpy's own copy
                continue
            dll = ctypes.CDLL(path)
            try:
                found = {p: getattr(dll, f"scipy_cblas_{p}gemm64_") for p in "sd"}
            except AttributeError:                     # another build: look further
                continue
            for p, fn in found.items():
                llvm.add_symbol(f"scipy_cblas_{p}gemm64_",
                                ctypes.cast(fn, ctypes.c_void_p).value)
            _BLAS["ok"] = True
            break
    return _BLAS["ok"]


def available():
    """Whether the fused path can run here: numpy's BLAS has the symbols it calls, and the
    cycle counter that the give-up rule reads counts (tried on x86-64 only: elsewhere reading
    it may trap, so the general path runs there)."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not _bind_blas():
        return False
    try:
        slow_cycles()
    except RuntimeError:
        return False
    return True


_bind_blas()    # before any kernel is compiled or loaded from Numba's cache


def _gemm_type(ft):
    i, p = types.int64, types.intp
    return types.ExternalFunction(f"scipy_cblas_{'s' if ft is types.float32 else 'd'}gemm64_",
                                  types.void(types.int32, types.int32, types.int32, i, i, i, ft,
                                             p, i, p, i, ft, p, i))


_sgemm = _gemm_type(types.float32)
_dgemm = _gemm_type(types.float64)


@njit(cache=True, nogil=True)
def gemm(ta, tb, a, b, c):
    """c = op(a) @ op(b), op the transpose where ta / tb, all C-contiguous 2-d arrays of one
    dtype: the cblas_?gemm call np.matmul(a.T if ta else a, b.T if tb else b, out=c) makes."""
    m, n = c.shape
    k = a.shape[0] if ta else a.shape[1]
    o, t1 = np.int32(ROW_MAJOR), np.int32(TRANS if ta else NO_TRANS)
    t2 = np.int32(TRANS if tb else NO_TRANS)
    if c.itemsize == 4:
        _sgemm(o, t1, t2, m, n, k, np.float32(1.0), a.ctypes.data, a.shape[1], b.ctypes.data,
               b.shape[1], np.float32(0.0), c.ctypes.data, c.shape[1])
    else:
        _dgemm(o, t1, t2, m, n, k, 1.0, a.ctypes.data, a.shape[1], b.ctypes.data, b.shape[1],
               0.0, c.ctypes.data, c.shape[1])


# --- epilogues: core's passes, fused (tests check them against parnn.core) ------------------

# Every array here is feature-major, (features, samples of the shard): see shard_gradient.

@njit(cache=True, nogil=True)
def bias_relu(zT, b):
    """zT = relu(zT + b) in place: Dense.forward's `y += b` then np.maximum(y, 0), which keeps
    a NaN and turns -0 into +0 (so the same bits)."""
    zero = zT.dtype.type(0)
    for j in range(zT.shape[0]):
        bj = b[j]
        for r in range(zT.shape[1]):
            y = zT[j, r] + bj
            zT[j, r] = y if (y > zero or y != y) else zero


@njit(cache=True, nogil=True)
def relu_back(aT, dT, db):
    """dT *= relu'(aT) (layers.relu_derivative) and db = the sums of dT over the samples, in
    sample order (Dense.backward's d.sum(axis=0)), in one pass."""
    one, zero = dT.dtype.type(1), dT.dtype.type(0)
    for j in range(dT.shape[0]):
        acc = zero
        for r in range(dT.shape[1]):
            d = dT[j, r] * (one if aT[j, r] > 0 else zero)
            dT[j, r] = d
            acc += d
        db[j] = acc


# Dropout: layers.Dropout's masks, drawn by core's own function (compiled with core's options)
# through a transposed view into a feature-major block like the activations' (its strided
# stores cost less than multiplying twice by a sample-major block across: docs/ENGINES.md),
# then Dropout.forward's a * mask and Dropout.backward's d * mask as times_mask. Backward,
# relu_back then takes relu' of the MASKED activations: that differs from relu' of the
# unmasked ones (what the general path takes) only where the mask is 0, and there d is
# already d * 0 (a zero of d's sign, or NaN), which relu' (0 or 1) leaves as it is: the same
# bits.
_mask = njit(cache=True)(dropout_mask.py_func)


@njit(cache=True, nogil=True)
def times_mask(aT, maskT):
    """aT *= maskT in place, both (features, samples)."""
    for j in range(aT.shape[0]):
        for r in range(aT.shape[1]):
            aT[j, r] = aT[j, r] * maskT[j, r]


@njit(cache=True, nogil=True)
def softmax_xent(zT, b, t, scale, tiny, dT, db):
    """The output layer of a shard, sample by sample (a column of zT): z += b, then
    p = softmax(z) in place as layers.softmax computes it (max, exp(z - max), sum in order,
    divide); dT = (p - t) * scale (CrossEntropy.delta, then MLP.backward's dy *= scale);
    db = the sums of dT over the samples. Returns (summed loss, samples whose argmax of p is
    the argmax of t)."""
    loss, hits = 0.0, 0
    n = zT.shape[0]
    zero = dT.dtype.type(0)
    for j in range(n):
        db[j] = zero
    for r in range(zT.shape[1]):
        for j in range(n):
            zT[j, r] += b[j]
        top = zT[0, r]                           # ndarray.max: the first NaN, else the max
        for j in range(1, n):
            if top != top:
                break
            z = zT[j, r]
            if z != z or z > top:
                top = z
        total = zero
        for j in range(n):
            e = np.exp(zT[j, r] - top)
            zT[j, r] = e
            total += e
        best_p, best_t = 0, 0
        for j in range(n):
            p = zT[j, r] / total
            zT[j, r] = p
            loss -= t[r, j] * np.log(max(p, tiny))
            if p > zT[best_p, r]:
                best_p = j
            if t[r, j] > t[r, best_t]:
                best_t = j
            d = (p - t[r, j]) * scale
            dT[j, r] = d
            db[j] += d
        hits += best_p == best_t
    return loss, hits


@njit(cache=True, nogil=True, error_model="numpy")
def adam_sum(p, G, m, v, lo, hi, b1, c1, b2, c2, eps_t, lr_t, decay):
    """optim.adam_update on p[lo:hi] with the gradient G[0] + G[1] + ... (the shards' sum, in
    shard order: the last shard is added in the same pass), after AdamW's p *= decay as in
    Adam.step (without weight decay decay = 1, and p * 1 is p). Unsigned indices: with signed
    ones Numba checks for negative indices and the loop does not vectorize (5x slower).

    eps_t and lr_t come in the arrays' dtype: in float32 the whole step is float32, as
    PyTorch's, twice as fast as adam_update, which computes its two last operations in float64
    (69 against 132 us over 235k parameters); so the same bits in float64, within a rounding
    of the update in float32 (tests/test_fused.py)."""
    lo, hi = np.uint64(lo), np.uint64(hi)
    g0, S = G[0], G.shape[0]
    for s in range(1, S - 1):                    # more than two shards: sum all but the last
        gs = G[s]
        for i in range(lo, hi):
            g0[i] += gs[i]
    g1 = G[S - 1]
    two = S > 1
    for i in range(lo, hi):
        gi = g0[i] + g1[i] if two else g0[i]
        mi = m[i] * b1 + c1 * gi
        vi = v[i] * b2 + (gi * gi) * c2
        m[i] = mi
        v[i] = vi
        p[i] = p[i] * decay - (mi / (np.sqrt(vi) + eps_t)) * lr_t


# --- one shard, one chunk ------------------------------------------------------------------------

@njit(inline="always")
def weights(params, lay, l):
    wo, bo, n_in, n_out = lay[l, 0], lay[l, 1], lay[l, 2], lay[l, 3]
    return params[wo:wo + n_out * n_in].reshape((n_out, n_in)), params[bo:bo + n_out]


@njit(cache=True, nogil=True)
def gather(X, div, T, rows, x, t):
    """x[r] = X[rows[r]] / div in x's dtype, t[r] = T[rows[r]]: np.take then `scaled`
    (uint8 / dtype(255) is computed in dtype: the same bits)."""
    ft = x.dtype.type
    for r in range(rows.shape[0]):
        src, tsrc = X[rows[r]], T[rows[r]]
        for k in range(X.shape[1]):
            x[r, k] = ft(src[k]) / div
        for j in range(t.shape[1]):
            t[r, j] = tsrc[j]


@njit(inline="always")
def cols_of(buf, lay, l, b):
    """Layer l's (n_out, b) block of a shard's activations or deltas (feature-major)."""
    o, n = lay[l, 4], lay[l, 3]
    return buf[o:o + b * n].reshape((n, b))


@njit(cache=True, nogil=True)
def shard_gradient(X, div, T, rows, scale, params, lay, Xs, Ts, AT, DT, g, tiny, ids, drop, M):
    """One shard's gradient (scaled by `scale` = 1 / the batch's size) into g; returns its
    (summed loss, hits). Xs, Ts, AT, DT are the shard's buffers; X the training set, its rows
    divided by div on the way (255 for uint8 pixels, 1 for floats: x / 1 is x).
    Dropout, if drop = (rate, scale, keys) has rate > 0: each hidden layer's activations are
    multiplied by the masks of samples ids (the rows' sample numbers) under keys[l], kept in M
    (laid out as AT).

    Activations and deltas are kept feature-major, a.T = (features, samples), so every GEMM
    has its second operand untransposed, the layout in which OpenBLAS's single-threaded sgemm
    is fastest at 64 rows (W0's forward product at 258-276 us against 332 for x @ W0.T,
    docs/ENGINES.md); only the gathered x stays sample-major, as the files store it:

        forward   zT_l = W_l @ aT_(l-1)      (W0 @ x.T for the first layer)
        backward  dW_l = dzT_l @ a_(l-1)     (dzT_0 @ x for the first layer)
                  daT_(l-1) = W_l.T @ dzT_l"""
    b, L = rows.shape[0], lay.shape[0]
    x, t = Xs[:b], Ts[:b]
    ft = x.dtype.type
    gather(X, div, T, rows, x, t)
    for l in range(L):                           # forward
        W, bias = weights(params, lay, l)
        zT = cols_of(AT, lay, l, b)
        if l == 0:
            gemm(False, True, W, x, zT)
        else:
            gemm(False, False, W, cols_of(AT, lay, l - 1, b), zT)
        if l < L - 1:
            bias_relu(zT, bias)
            if drop[0] > 0:
                maskT = cols_of(M, lay, l, b)
                _mask(drop[2][l], ids, drop[0], drop[1], maskT.T)
                times_mask(zT, maskT)
    # the output layer's zT and bias (the loop's last): its bias goes in with the softmax
    _, gbL = weights(g, lay, L - 1)
    loss, hits = softmax_xent(zT, bias, t, ft(scale), tiny, cols_of(DT, lay, L - 1, b), gbL)
    for l in range(L - 1, -1, -1):               # backward: dz of layer l is in DT already
        W, _ = weights(params, lay, l)
        gW, _ = weights(g, lay, l)
        dzT = cols_of(DT, lay, l, b)
        if l == 0:
            gemm(False, False, dzT, x, gW)
        else:
            gemm(False, True, dzT, cols_of(AT, lay, l - 1, b), gW)
            daT = cols_of(DT, lay, l - 1, b)
            gemm(True, False, W, dzT, daT)
            if drop[0] > 0:
                times_mask(daT, cols_of(M, lay, l - 1, b))
            _, gb = weights(g, lay, l - 1)
            relu_back(cols_of(AT, lay, l - 1, b), daT, gb)
    return loss, hits


# The threads give up on each other when more than one barrier in SLOW_LIMIT batches waited
# longer than SLOW_WAIT seconds (after PATIENCE batches of grace, which cover waking the
# helper): its partner lost its core for a time slice, so a busy neighbour holds one of the
# cores, and one thread alone is faster (docs/ENGINES.md). Shards that are merely uneven
# differ by tens of microseconds. (Counting the barriers that fell back to sched_yield, as
# owner does, gave up on a quiet machine: 4000 PAUSEs are only microseconds on Zen 4.)
SLOW_LIMIT = 8
PATIENCE = 8
SLOW_WAIT = 0.5e-3
_SLOW_CYCLES = []


def slow_cycles():
    """SLOW_WAIT in ticks of the cycle counter, measured once per process."""
    if not _SLOW_CYCLES:
        _SLOW_CYCLES.append(int(SLOW_WAIT * cycles_per_second()))
    return _SLOW_CYCLES[0]


@njit(inline="always")
def meet(flags, tid, nt, k, slow):
    """Barrier k of nt threads; 1 if it waited more than `slow` cycles, else 0."""
    t0 = cycles()
    barrier(flags, tid, nt, k)
    return 1 if cycles() - t0 > slow else 0


@njit(cache=True, nogil=True)
def train_chunk(tid, nt, X, div, T, order, ids, B, params, lay, Xs, Ts, AT, DT, G, m, v, b1, c1,
                b2, c2, steps, decay, tiny, drop, M, flags, losses, hits, patience, slow_wait):
    """Thread tid's share of the batches of `order` (batches of B, the last one shorter): its
    shards' gradients, then its part of the Adam step; steps[k] = (eps_t, lr_t) of batch k, in
    the parameters' dtype. ids[i]: the sample number of row order[i], for dropout's masks.

    Giving up: a thread whose barriers waited long (over slow_wait cycles) too often raises
    the stop word before a batch's last barrier; after that barrier every thread sees it, the
    helpers return and thread 0 carries on alone with every shard and the whole step: the same
    arithmetic, so the same bits. patience: the batches of grace (PATIENCE), or < 0 to give up
    after the first batch (tests). Returns the batches done before giving up (0: the threads
    never did)."""
    S, n, P = G.shape[0], order.shape[0], params.shape[0]
    lo = P * tid // nt // 16 * 16                # parts on 64-byte lines (float32)
    hi = P if tid == nt - 1 else P * (tid + 1) // nt // 16 * 16
    stop, slow, gave_up = nt * FLAG, 0, 0
    for k in range((n + B - 1) // B):
        idx, sid = order[k * B:min(k * B + B, n)], ids[k * B:min(k * B + B, n)]
        nb = idx.shape[0]
        for s in range(tid, S, nt):
            lo_s, hi_s = nb * s // S, nb * (s + 1) // S
            loss, hit = shard_gradient(X, div, T, idx[lo_s:hi_s], 1.0 / nb, params, lay, Xs[s],
                                       Ts[s], AT[s], DT[s], G[s], tiny, sid[lo_s:hi_s], drop, M[s])
            losses[s] += loss
            hits[s] += hit
        if nt > 1:
            slow += meet(flags, tid, nt, 2 * k + 1, slow_wait)
        adam_sum(params, G, m, v, lo, hi, b1, c1, b2, c2, steps[k, 0], steps[k, 1], decay)
        if nt > 1:
            if (k >= patience and slow * SLOW_LIMIT > k + 1) or patience < 0:
                atomic_store(flags, stop, 1)
            slow += meet(flags, tid, nt, 2 * k + 2, slow_wait)
            if atomic_load(flags, stop) != 0:
                if tid != 0:
                    return k + 1
                nt, lo, hi, gave_up = 1, 0, P, k + 1
    return gave_up


def release(flags, tid, nt):
    """Thread tid failed outside train_chunk (an exception before or after the compiled call):
    its partners pass every barrier from now on and stop after their batch, instead of
    spinning forever for it (their results are not used: the exception ends the train call)."""
    flags[nt * FLAG] = 1                         # the stop word
    flags[tid * FLAG] = np.iinfo(flags.dtype).max


class Plan:
    """The fused path's buffers for (network, batch size, shards), allocated once: per shard
    the gathered rows, the activations and deltas of every layer (one flat buffer each, layer
    after layer), with dropout its masks (laid out as the activations), and a flat gradient;
    the layer table; the barrier flags."""

    def __init__(self, spec, B, S, dropout=False):
        dt = np.dtype(spec.dtype)
        Bs = -(-B // S)                              # rows of the largest shard
        starts, _ = spec.offsets()
        lay, o = [], 0
        for (w0, b0), (n_out, n_in) in zip(starts, spec.shapes()):
            lay.append((w0, b0, n_in, n_out, o))
            o += Bs * n_out
        self.lay = np.array(lay, np.int64)
        self.X = np.empty((S, Bs, spec.sizes[0]), dt)
        self.T = np.empty((S, Bs, spec.sizes[-1]), dt)
        self.AT = np.empty((S, o), dt)       # activations, feature-major, layer after layer
        self.DT = np.empty((S, o), dt)       # deltas, likewise
        hidden = lay[-1][4]                  # the hidden layers' share (the output comes last)
        self.M = np.empty((S, hidden if dropout else 1), dt)    # dropout's masks, as AT
        self.G = np.empty((S, spec.n_params), dt)
        self.flags = np.zeros((S + 1) * FLAG, np.int64)


def dropout_of(rate, seed, epoch, hidden_layers, dtype):
    """train_chunk's `drop` for an epoch: (rate, 1 / (1 - rate), each hidden layer's key), the
    values layers.Dropout draws its masks with; (0, 1, -) without dropout."""
    f = np.dtype(dtype).type
    if not rate:
        return 0.0, f(1), np.zeros(1, np.uint64)
    keys = [dropout_key(seed, epoch, l) for l in range(hidden_layers)]
    return float(rate), f(1.0 / (1.0 - rate)), np.array(keys, np.uint64)


def train(plan, tid, nt, net, opt, X, T, order, ids, B, steps, decay, drop, losses, hits,
          patience=PATIENCE):
    """Thread tid's call of train_chunk (the caller resets plan.flags before the threads
    start); returns the batches after which the threads gave up (0: they did not)."""
    f = net.params.dtype.type
    div = f(255) if X.dtype == np.uint8 else f(1)
    return train_chunk(tid, nt, X, div, T, order, ids, B, net.params, plan.lay, plan.X, plan.T,
                plan.AT, plan.DT, plan.G, opt.m, opt.v, f(opt.beta1), f(1 - opt.beta1),
                f(opt.beta2), f(1 - opt.beta2), steps, f(decay), np.finfo(net.params.dtype).tiny,
                drop, plan.M, plan.flags, losses, hits, patience, slow_cycles())
