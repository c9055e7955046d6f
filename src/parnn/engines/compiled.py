"""Numba building blocks shared by the compiled engines (persample, batch).

    typed, atomic_load/atomic_store, cpu_relax, sched_yield, cycles   LLVM intrinsics
    barrier                          the owner engine's spin barrier
    ACT_CODES, LOSS_CODES, act/dact  activations as integer codes, forward and derivative
    output_delta                     the output layer of ONE sample: activation, loss, delta, hit
    load_input, pixel_table          one input row into a float buffer (uint8 pixels scaled)
    clock/lap, cycles_per_second     the optional phase timing of the sample loop

Kernels take activation and loss as integer codes and work in float32 or float64 (the arrays'
dtype); constants are converted with `typed` so float32 math stays float32.
"""

from __future__ import annotations

import time

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

TANH, SIGMOID, RELU, SOFTMAX = 0, 1, 2, 3
MSE, CROSS_ENTROPY = 0, 1
NONE = -1                      # "leave z as it is" (the output layer, done by output_delta)
ACT_CODES = {"tanh": TANH, "sigmoid": SIGMOID, "relu": RELU, "softmax": SOFTMAX}
LOSS_CODES = {"mse": MSE, "cross_entropy": CROSS_ENTROPY}

FLAG = 16   # int64s between two threads' barrier flags (128 bytes: no shared cache line)


# --- intrinsics: typed constants, atomics, spin-wait hints, the cycle counter -------------------

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


@intrinsic
def cycles(typingctx):
    """llvm.readcyclecounter (RDTSC on x86): a few ns to read, ticks at a constant rate."""
    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(64), []),
                                            "llvm.readcyclecounter")
        return builder.call(fn, [])
    return types.int64(), codegen


# --- barrier (owner engine) -----------------------------------------------------------------
# flags[t * FLAG] = number of barriers thread t has reached. Arriving at barrier k = publish k,
# then wait until every other thread has published >= k: with 2 threads, one cache line each
# way. Spin with PAUSE, then yield, so an oversubscribed machine still progresses.

SPIN = 4000           # PAUSEs before falling back to sched_yield


@njit(cache=True)
def spin_wait(spins):
    if spins < SPIN:
        cpu_relax()
    else:
        sched_yield()


@njit(cache=True)
def barrier(flags, tid, nt, k):
    """Wait until all nt threads reached barrier number k. Returns 1 if it waited so long (over
    SPIN pauses) that it had to yield the core, else 0."""
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
# fastmath=False is explicit on purpose: a helper without it takes the fastmath flags of the first
# caller that compiles it (Numba inherits them), so 1 - a*a would become an FMA or not depending
# on which engine compiled first, and the bits with it.

@njit(cache=True, fastmath=False)
def act(z, code):
    one, half, zero = typed(z, 1.0), typed(z, 0.5), typed(z, 0.0)
    if code == TANH:
        return np.tanh(z)
    if code == SIGMOID:                        # 0.5 * (1 + tanh(z/2)), as model.py
        return (np.tanh(z * half) + one) * half
    return max(z, zero)                        # RELU


@njit(cache=True, fastmath=False)
def dact(a, code):
    one, zero = typed(a, 1.0), typed(a, 0.0)
    if code == TANH:
        return one - a * a
    if code == SIGMOID:
        return a * (one - a)
    return one if a > zero else zero           # RELU


@njit(cache=True, fastmath=False)
def activate(z, code):
    """z = act(z) in place (nothing for NONE: the output layer is left to output_delta)."""
    if code != NONE:
        for j in range(z.shape[0]):
            z[j] = act(z[j], code)


# --- output layer of one sample: activation, loss, delta, hit ----------------------------------

@njit(cache=True, fastmath=False)
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


# --- one input row: the training set may be uint8 pixels, meaning x / 255 ----------------------

def pixel_table(dtype):
    """The 256 values u / 255 in dtype, each as `uint8 array / dtype(255)` computes it: looking a
    pixel up gives the same bits as dividing it, without a division per pixel."""
    dtype = np.dtype(dtype)
    return np.divide(np.arange(256, dtype=np.uint8), dtype.type(255), dtype=dtype)


def load_input(row, table, x):
    """x[:] = the input row as floats: table[row] for uint8 pixels, else the row as it is."""
    raise NotImplementedError("compiled only (numba overload below)")


@overload(load_input, inline="always")
def _load_input(row, table, x):
    if isinstance(row.dtype, types.Integer):
        def pixels(row, table, x):
            for k in range(x.shape[0]):
                x[k] = table[row[k]]
        return pixels

    def floats(row, table, x):
        for k in range(x.shape[0]):
            x[k] = row[k]
    return floats


# --- phase timing: off by default, then only a branch ----------------------------------------

@njit(inline="always")
def clock(on):
    """The cycle counter if timing is on, else 0 (not read)."""
    return cycles() if on else 0


@njit(inline="always")
def lap(on, rec, phase, t):
    """rec[phase] += cycles since t and returns now, if timing is on; else returns t."""
    if on:
        now = cycles()
        rec[phase] += now - t
        return now
    return t


@njit(cache=True)
def read_cycles():
    return cycles()


def cycles_per_second(seconds=0.02):
    """The cycle counter's rate, measured once against time.perf_counter over `seconds`."""
    read_cycles()                                   # compiled (or loaded) before timing
    t0, c0 = time.perf_counter(), read_cycles()
    time.sleep(seconds)
    c1, t1 = read_cycles(), time.perf_counter()
    if c1 <= c0:
        raise RuntimeError("llvm.readcyclecounter does not count on this machine")
    return (c1 - c0) / (t1 - t0)
