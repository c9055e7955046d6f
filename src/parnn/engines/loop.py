"""The per-sample SGD loop, written once, and the buffers it works on.

`sample_loop` is the whole per-sample algorithm (persample.py has the math and the engines). A
participant works on the neuron slices c0 <= c < c1 (of nt) of every layer, step by step: each
step is a `for c in prange(c0, c1)` over its slices, after which the participants meet. How
they meet is all that differs between the engines:

    serial, hogwild   c0, c1, nt = 0, 1, 1 in the nogil build (prange is range): they never meet
    neuron            c0, c1 = 0, nt in the parallel build: every step is a fork/join region
    owner             one Python thread per slice, c0, c1 = tid, tid + 1 in the nogil build:
                      the threads meet at spin barriers (spin=True)

The steps of one sample, for L weight layers:

    forward   L steps: layer 0, whose one pass over W0 also finishes the previous sample's
              backward (combine the input layer's errors, update W0), then layers 1..L-1
    output    no step of its own: each participant computes the small output layer privately
    backward  L-1 steps, l = L-1..1: combine layer l's errors from the blocks the step before
              left (l < L-1), then its error blocks and update in one pass over W_l

so the participants meet 2L-1 times per sample (owner 2 times without a hidden layer: every
thread must have read the output before the next sample overwrites it). Each call adds one
step at the end: the last sample's input-layer update.

Giving up (owner): spin barriers need a core per thread. When another process takes one, a
barrier waits for a time slice and the threads run slower than one thread alone. Participant 0
counts the barriers where it had to give its core away; once they are more than one per
SLOW_LIMIT samples (after `patience` samples' grace) it raises the stop word before the
sample's last barrier, so every participant sees it after that barrier and leaves after the
same sample. The caller carries on from there with the serial build: the same bits.

Phase timing (profile=True): each participant adds the cycle counter's ticks over its steps to
forward / output / backward (the final update counts as backward) and over its barriers to
wait. In the parallel build the caller times each region, so fork/join and load imbalance sit
inside the phases. When off, it costs a branch per step.
"""

from __future__ import annotations

import types

import numpy as np
from numba import njit, prange

from parnn.engines.compiled import (FLAG, NONE, atomic_load, atomic_store, barrier, clock, lap,
                                    load_input, output_delta, pixel_table)
from parnn.engines.rows import (JB, combine_errors, input_forward, input_rows, input_update,
                                input_update_forward, rows_error_update, rows_forward)

PHASES = ("forward", "output", "backward", "wait")
FORWARD, OUTPUT, BACKWARD, WAIT = range(4)
PAD = 16    # buffers start on multiples of 16 elements: no two threads' slices share a cache line
# owner gives up on its threads when more than one barrier per SLOW_LIMIT samples had to yield
# the core (after PATIENCE samples' grace): the machine has no free core for them
SLOW_LIMIT = 100
PATIENCE = 100


# --- the layer table and the participants' slices ---------------------------------------------
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


def span_py(c, nt, n):
    """Part c of nt of range(n), cut on multiples of JB: (lo, hi, first block, end block)."""
    nb = (n + JB - 1) // JB
    b0, b1 = nb * c // nt, nb * (c + 1) // nt
    return min(b0 * JB, n), min(b1 * JB, n), b0, b1


span = njit(inline="always")(span_py)


@njit(inline="always")
def meet(spin, flags, tid, nt):
    """The next spin barrier if the participants meet at spin barriers, else nothing. Its number
    is one more than this thread's own flag. Returns 1 if it had to yield the core."""
    if spin:
        return barrier(flags, tid, nt, flags[tid * FLAG] + 1)
    return 0


@njit(inline="always")
def input_deltas(L, P1, a0, hid, d0, G, lr, lo, hi):
    """G = lr * the input layer's deltas for its neurons lo..hi: combined from layer 1's error
    blocks into d0, or (no hidden layer) d0 is the output's delta already."""
    if L > 1:
        combine_errors(P1, a0, hid, d0, lo, hi)
    for j in range(lo, hi):
        G[j] = lr * d0[j]


# --- the sample loop, written once ------------------------------------------------------------

def sample_loop(c0, c1, nt, spin, params, WTb, lay, X, T, order, lr, tiny, hid, out, loss_code,
                A, D, G, P, Po, Do, Rows, Xr, table, flags, prof, dense, profile, patience,
                loss0):
    """SGD over `order`, one sample at a time: participant c0's share (see the top).

    Returns (loss_sum, correct, slow, done): participant 0 counts the samples; slow = how many
    of its barriers had to give the core away, after the first sample (which waits for the
    threads to start); done = the samples of `order` trained (fewer if the participants gave up,
    see the top; patience: the grace in samples, or < 0 to give up after the second sample).
    loss0 is the sum the losses are added to: carrying on after the threads gave up, the serial
    loop goes on with their sum, so it is the sum one loop would have made.

    Shared: the weights (params; W0 as WTb, one transposed block per slice), every layer's
    activations A and deltas D, the scaled input-layer deltas G, the error blocks P.
    Private, indexed by participant: the output layer's activations Po and deltas Do, the list
    of nonzero inputs Rows, the phase cycles prof, and Xr: this sample's input row and the
    previous one's, in the network's dtype (X itself may be uint8 pixels: table[u] = u / 255)."""
    L = lay.shape[0]
    first = L - L                                   # layer 0 (a variable, not a literal 0)
    n1 = lay[first, 3]
    b0 = layer(params, lay, first)[1]
    a0 = out_buf(A, lay, first)
    po, do, rows, rec, xr = Po[c0], Do[c0], Rows[c0], prof[c0], Xr[c0]
    n_in = X.shape[1]
    d0 = out_buf(D, lay, first) if L > 1 else do
    P1 = p_buf(P, lay, min(1, L - 1))               # layer 1's error blocks (if there is one)
    code0 = hid if L > 1 else NONE
    loss_sum, correct, slow, done = loss0, 0, 0, order.shape[0]
    stop = nt * FLAG                                # the stop word, after the barrier flags
    t = clock(profile)
    for s in range(order.shape[0]):
        x = xr[s % 2, :n_in]                        # the rows alternate: xp is loaded already
        xp = xr[(s - 1) % 2, :n_in] if s > 0 else x
        load_input(X[order[s]], table, x)
        # forward, layer 0: one pass over W0 that first finishes the previous sample
        nr = input_rows(x, xp, dense, rows)
        for c in prange(c0, c1):
            lo, hi, _, _ = span(c, nt, n1)
            if s == 0:
                input_forward(WTb[c], b0[lo:hi], x, a0[lo:hi], code0, rows, nr)
            else:
                input_deltas(L, P1, a0, hid, d0, G, lr, lo, hi)
                input_update_forward(WTb[c], b0[lo:hi], G[lo:hi], xp, x, a0[lo:hi], code0,
                                     rows, nr)
        t = lap(profile, rec, FORWARD, t)
        slow += meet(spin, flags, c0, nt)
        t = lap(profile and spin, rec, WAIT, t)
        # forward, deeper layers
        for l in range(1, L):
            W, b = layer(params, lay, l)
            a_in, a_out = out_buf(A, lay, l - 1), out_buf(A, lay, l)
            code = hid if l < L - 1 else NONE
            for c in prange(c0, c1):
                lo, hi, _, _ = span(c, nt, lay[l, 3])
                rows_forward(W, b, a_in, a_out, lo, hi, code)
            t = lap(profile, rec, FORWARD, t)
            slow += meet(spin, flags, c0, nt)
            t = lap(profile and spin, rec, WAIT, t)
        # output: every participant, privately (it is small; softmax needs a serial sum)
        loss, hit = output_delta(out_buf(A, lay, L - 1), T[order[s]], out, loss_code, tiny,
                                 po, do)
        if c0 == 0:
            loss_sum += loss
            correct += hit
            if spin and s > 0 and (slow * SLOW_LIMIT > s + patience or patience < 0):
                atomic_store(flags, stop, 1)        # seen by all after this sample's last barrier
        t = lap(profile, rec, OUTPUT, t)
        if L == 1:              # everyone has read the output before the next sample writes it
            slow += meet(spin, flags, c0, nt)
            t = lap(profile and spin, rec, WAIT, t)
        # backward: layer l's errors (from the step before) and its update, one pass over W_l
        for l in range(L - 1, 0, -1):
            W, b = layer(params, lay, l)
            d = do if l == L - 1 else out_buf(D, lay, l)
            Pl, Pup = p_buf(P, lay, l), p_buf(P, lay, min(l + 1, L - 1))
            a_in, a_l = out_buf(A, lay, l - 1), out_buf(A, lay, l)
            for c in prange(c0, c1):
                lo, hi, blk0, blk1 = span(c, nt, lay[l, 3])
                if l < L - 1:
                    combine_errors(Pup, a_l, hid, d, lo, hi)
                rows_error_update(W, b, d, lr, a_in, Pl, blk0, blk1)
            t = lap(profile, rec, BACKWARD, t)
            slow += meet(spin, flags, c0, nt)
            t = lap(profile and spin, rec, WAIT, t)
        if s == 0:
            slow = 0
        if spin and atomic_load(flags, stop) != 0:
            done = s + 1
            break
    if done > 0:                                    # the last sample's input-layer update
        xp = xr[(done - 1) % 2, :n_in]
        nr = input_rows(xp, xp, dense, rows)
        for c in prange(c0, c1):
            lo, hi, _, _ = span(c, nt, n1)
            input_deltas(L, P1, a0, hid, d0, G, lr, lo, hi)
            input_update(WTb[c], b0[lo:hi], G[lo:hi], xp, rows, nr)
        t = lap(profile, rec, BACKWARD, t)
    return loss_sum, correct, slow, done


def _build(name, **flags):
    """sample_loop compiled with `flags` under its own name: Numba's cache tells functions apart
    by name and bytecode, not by compile flags, so two builds of one function would collide."""
    fn = types.FunctionType(sample_loop.__code__.replace(co_name=name, co_qualname=name),
                            sample_loop.__globals__, name)
    fn.__qualname__, fn.__doc__ = name, sample_loop.__doc__
    return njit(cache=True, **flags)(fn)


nogil_loop = _build("nogil_loop", nogil=True)           # serial, hogwild, owner
prange_loop = _build("prange_loop", parallel=True)      # neuron: each prange a fork/join


# --- buffers ------------------------------------------------------------------------------------

def _pad(n):
    return -(-n // PAD) * PAD


def _aligned(n, dtype):
    """Zeroed 1-d array of n elements starting on a 128-byte boundary."""
    dtype = np.dtype(dtype)
    extra = 128 // dtype.itemsize
    raw = np.zeros(n + extra, dtype)
    start = (-raw.ctypes.data % 128) // dtype.itemsize
    return raw[start:start + n]


def _rows_aligned(rows, n, dtype):
    """rows x n, every row on its own 128-byte lines (n padded)."""
    return _aligned(rows * _pad(n), dtype).reshape(rows, _pad(n))


def layer_table(spec):
    starts, _ = spec.offsets()
    rows, a, p = [], 0, 0
    for (w0, b0), (n_out, n_in) in zip(starts, spec.shapes()):
        rows.append((w0, b0, n_in, n_out, a, p))
        a += _pad(n_out)
        p += _pad(-(-n_out // JB) * n_in)
    return np.array(rows, np.int64), a, p


def blocked_transpose(W0, nb):
    """W0 (n_out, n_in) as nb contiguous blocks: out[t, k, j] = W0[lo_t + j, k], 128-byte
    aligned, blocks cut like the participants' neuron slices (span)."""
    n_out, n_in = W0.shape
    cuts = [span_py(t, nb, n_out)[:2] for t in range(nb)]
    width = _pad(max(hi - lo for lo, hi in cuts))
    out = _aligned(nb * n_in * width, W0.dtype).reshape(nb, n_in, width)
    for t, (lo, hi) in enumerate(cuts):
        out[t, :, :hi - lo] = W0[lo:hi].T
    return out


def unblock(WTb, W0):
    nb = WTb.shape[0]
    for t in range(nb):
        lo, hi = span_py(t, nb, W0.shape[0])[:2]
        W0[lo:hi] = WTb[t, :, :hi - lo].T


class Workspace:
    """What the sample loop writes besides the weights, allocated once per call. Shared:
    activations A and deltas D (one slot per layer), scaled input-layer deltas G, error blocks
    P, the barrier flags, the pixel table. Private, one row per participant: output activations
    Po and deltas Do, nonzero-input lists Rows, two input rows Xr, phase cycles prof."""

    def __init__(self, lay, dtype, na, npart, n_in, participants):
        self.A, self.D = _aligned(na, dtype), _aligned(na, dtype)
        self.G = _aligned(_pad(int(lay[0, 3])), dtype)
        self.P = _aligned(max(npart, 1), dtype)
        self.Po = _rows_aligned(participants, int(lay[-1, 3]), dtype)
        self.Do = _rows_aligned(participants, int(lay[-1, 3]), dtype)
        self.Rows = _rows_aligned(participants, n_in, np.int64)
        self.Xr = _rows_aligned(participants * 2, n_in, dtype).reshape(participants, 2, -1)
        self.table = pixel_table(dtype)
        self.flags = _aligned((participants + 1) * FLAG, np.int64)   # + the stop word
        self.prof = _rows_aligned(participants, len(PHASES), np.int64)

    def args(self):
        return (self.A, self.D, self.G, self.P, self.Po, self.Do, self.Rows, self.Xr, self.table,
                self.flags, self.prof)

    def cycles(self):
        return self.prof[:, :len(PHASES)]
