"""Per-sample SGD compiled with Numba: the paper's algorithm as four engines over one loop.

    serial   one thread, the paper's serial program
    neuron   the paper's parallel strategy: inside every sample the neurons of each layer are
             split over the threads, which fork and join around every step (Numba prange)
    hogwild  sample-parallel lock-free SGD (Niu, Recht, Re, Wright 2011): each thread runs the
             serial loop on its own contiguous part of the order, all on the same weights,
             without locks
    owner    like neuron, but every thread owns a slice of the neurons of every layer for the
             whole chunk, and the threads meet at spin barriers instead of forking and joining,
             so each thread's weights stay in its own core's cache

The math is model.py's, for one sample (B = 1) and plain SGD:

    forward   z = b + W a_prev,  a = act(z)
    output    delta = dL/dz (p - t for softmax + cross-entropy, (a - t) act'(a) for MSE, ...)
    errors    delta_prev = (W^T delta) * act'(a_prev)     from the weights BEFORE the update
    update    W -= lr * delta a_prev^T,  b -= lr * delta

All four run the same loop (loop.py), so they do the same arithmetic in the same order: serial,
neuron (any thread count), owner (any thread count) and hogwild (1 thread) give bit-identical
weights, and the tests check it. They differ only in how threads meet inside a sample: for L
weight layers neuron forks and joins 2L-1 times per sample and owner meets at 2L-1 barriers
(2 without a hidden layer), serial and hogwild never. For the paper's 3 layers that is 5, where
the paper forks and joins 9 times (one region per loop: 3 forward, 3 error, 3 update).
`sync_points_per_sample` gives these numbers to the benchmark's overhead model.

hogwild and owner start Python threads that call the loop's nogil build: the concurrency of a
prange over thread ids, but one compiled loop shared with serial, and every thread surely runs
at once, which the owner's barriers need. The row kernels and their summation order are in
rows.py, the shared primitives (activations, output layer, barrier, cycle counter) in
compiled.py.

Engines are made per run: make_engine(name, dense=False, profile=False). With profile=True,
phase_seconds() returns where the time went (see loop.py), summed over every train call.
"""

from __future__ import annotations

import threading
import time

import numba
import numpy as np

from parnn.engines import EpochStats, contiguous_inputs
from parnn.engines.compiled import ACT_CODES, LOSS_CODES, cycles_per_second
from parnn.engines.loop import (PATIENCE, PHASES, SLOW_LIMIT, Workspace, blocked_transpose,
                                layer_table, nogil_loop, prange_loop, unblock)
from parnn.errors import ConfigError


def sync_points_per_sample(name, n_layers):
    """How often per sample the threads of engine `name` meet, for n_layers weight layers:
    fork/join regions (neuron), spin barriers (owner), none (serial, hogwild)."""
    if name == "neuron":
        return 2 * n_layers - 1
    if name == "owner":
        return 2 * n_layers - 1 if n_layers > 1 else 2
    return 0


# --- the engines --------------------------------------------------------------------------------

def optimizer_name(optimizer):
    return getattr(optimizer, "name", optimizer)


class PerSampleEngine:
    """The Python side shared by the per-sample engines: checks, the W0 transpose in and out,
    compile time, stats, phase cycles. Subclasses define kernel(run, workspace, order):
    run(loop, c0, c1, nt, spin, order, ws, blocks=None, loss0=0.0) calls the loop on W0^T cut
    into `blocks` (default: as self.blocks() cut it), re-cutting it if the last call had another
    cut; loss0: the loss sum to carry on."""

    threads_by = "none"               # how the engine runs threads (reported by info())
    patience = PATIENCE               # owner: samples of grace before its threads give up
    takes_pixels = True               # uint8 X (x / 255): each participant scales its row

    def __init__(self, dense=False, profile=False):
        # dense: visit every W0 row even when its input is 0 (the benchmark's like-for-like
        # comparison with the C reference); the results are the same either way.
        self.dense = dense
        self.profile = profile        # record phase cycles (phase_seconds)
        self.compile_s = {}           # dtype -> seconds of the first (compiling) call
        self._cycles = np.zeros((0, len(PHASES)), np.int64)   # participant x phase, summed
        self._hz = None

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
        if spec.output not in ACT_CODES:
            raise ConfigError(f"engine {self.name} has no {spec.output} output layer: use "
                              "--engine batch (or numpy)")
        if spec.arch:
            raise ConfigError(f"engine {self.name} trains dense layers sample by sample, not the "
                              f"layer list {spec.arch}: use --engine batch (or numpy)")

    def info(self):
        d = {"engine": self.name, "threads_by": self.threads_by, "compile_s": dict(self.compile_s)}
        if self.threads_by == "numba prange":
            d["threading_layer"] = _threading_layer()
        return d

    def train(self, net, opt, X, T, order, batch_size):
        spec = net.spec
        self.check(spec, opt, batch_size)
        dt = net.params.dtype
        X, T, order = contiguous_inputs(net, X, T, order, pixels=True)   # uint8 stays uint8
        if _key(dt, X.dtype) not in self.compile_s:
            self.warm_up(spec, dt, X.dtype)
        loss_sum, correct, cycles = self._run(net.params, net.W[0], spec, X, T, order, opt.lr,
                                              self.profile)
        if self.profile:
            self._add_cycles(cycles)
        opt.count_steps(len(order))       # one SGD step per sample, as the numpy engine counts
        return EpochStats(float(loss_sum), int(correct), len(order))

    def phase_seconds(self):
        """{"phases": PHASES, "seconds": participants x phases}, summed over every train call."""
        if not self.profile:
            raise RuntimeError(f"engine {self.name} records phases only when made with "
                               f"make_engine({self.name!r}, profile=True)")
        if self._hz is None:
            self._hz = cycles_per_second()
        return {"phases": PHASES, "seconds": self._cycles / self._hz}

    def _add_cycles(self, cycles):
        grow = len(cycles) - len(self._cycles)
        if grow > 0:
            self._cycles = np.vstack([self._cycles, np.zeros((grow, len(PHASES)), np.int64)])
        self._cycles[:len(cycles)] += cycles

    def _run(self, params, W0, spec, X, T, order, lr, profile):
        if len(order) == 0:
            return 0.0, 0, np.zeros((0, len(PHASES)), np.int64)
        dt = params.dtype
        lay, na, npart = layer_table(spec)
        consts = (dt.type(lr), dt.type(np.finfo(dt).tiny), ACT_CODES[spec.hidden],
                  ACT_CODES[spec.output], LOSS_CODES[spec.loss])
        cut = [blocked_transpose(W0, self.blocks())]  # W0 as the row kernels want it

        def run(loop, c0, c1, nt, spin, order, ws, blocks=None, loss0=0.0):
            if blocks is not None and blocks != cut[0].shape[0]:
                unblock(cut[0], W0)
                cut[0] = blocked_transpose(W0, blocks)
            return loop(c0, c1, nt, spin, params, cut[0], lay, X, T, order, *consts, *ws.args(),
                        self.dense, profile, self.patience, loss0)

        def workspace(participants):
            return Workspace(lay, dt, na, npart, X.shape[1], participants)

        try:
            return self.kernel(run, workspace, order)
        finally:
            unblock(cut[0], W0)                       # the flat buffer holds the result

    def warm_up(self, spec, dt, inputs=None):
        """Compile (or load from Numba's cache) on a tiny network, for inputs X of dtype inputs
        (default dt; or uint8 pixels); record the time it took."""
        from parnn.core.model import MLP, Spec
        tiny = Spec((3, 2, 2), spec.hidden, spec.output, spec.loss, dt.name)
        net = MLP(tiny, seed=0)
        X = np.zeros((2, 3), dt if inputs is None else inputs)
        T = np.eye(2, dtype=dt)
        t0 = time.perf_counter()
        self._run(net.params, net.W[0], tiny, X, T, np.arange(2), 0.0, False)
        self.compile_s[_key(dt, X.dtype)] = round(time.perf_counter() - t0, 3)

    def blocks(self):
        """How many blocks W0^T is cut into (one per participant slice)."""
        return 1

    def serial(self, run, workspace, order, loss0=0.0):
        ws = workspace(1)
        loss_sum, correct, _, _ = run(nogil_loop, 0, 1, 1, False, order, ws, blocks=1,
                                      loss0=loss0)
        return loss_sum, correct, ws.cycles()


class SerialEngine(PerSampleEngine):
    """Per-sample SGD on one thread: the paper's serial program."""

    name = "serial"

    def kernel(self, run, workspace, order):
        return self.serial(run, workspace, order)


class NeuronEngine(PerSampleEngine):
    """Per-sample SGD, each layer's neurons split over the threads, a fork/join per step."""

    name = "neuron"
    threads_by = "numba prange"

    def blocks(self):
        return numba.get_num_threads()

    def kernel(self, run, workspace, order):
        nt = numba.get_num_threads()
        ws = workspace(1)                               # the caller is the one participant
        loss_sum, correct, _, _ = run(prange_loop, 0, nt, nt, False, order, ws)
        return loss_sum, correct, ws.cycles()


class HogwildEngine(PerSampleEngine):
    """Lock-free sample-parallel SGD, each thread on its own part of the order."""

    name = "hogwild"
    threads_by = "python threads running nogil kernels"

    def kernel(self, run, workspace, order):
        nt, n = numba.get_num_threads(), len(order)
        parts = [order[n * t // nt:n * (t + 1) // nt] for t in range(nt)]
        spaces = [workspace(1) for _ in range(nt)]     # all buffers private, weights shared
        results = run_threads(nt, lambda t: run(nogil_loop, 0, 1, 1, False, parts[t], spaces[t]))
        return (sum(r[0] for r in results), sum(r[1] for r in results),
                np.vstack([ws.cycles() for ws in spaces]))


class OwnerEngine(PerSampleEngine):
    """Per-sample SGD, each thread owns a slice of every layer's neurons for the whole chunk;
    spin barriers between the steps instead of fork/join."""

    name = "owner"
    threads_by = "python threads running nogil kernels"
    # The barriers need every thread on its own core: when another process takes a core, each
    # barrier waits for a time slice. So the threads give up within a chunk once more than one
    # barrier per SLOW_LIMIT samples had to yield the core (loop.py), and the rest of the chunk
    # and the next COOLDOWN chunks run serially (the same bits); then the threads try again.
    # Each retry that fails again doubles the cooldown, up to MAX_COOLDOWN chunks.
    COOLDOWN = 4
    MAX_COOLDOWN = 32

    def __init__(self, dense=False, profile=False):
        super().__init__(dense, profile)
        self._cooldown = 0
        self._next_cooldown = self.COOLDOWN
        self.contended_chunks = 0     # chunks whose barriers kept yielding
        self.serial_chunks = 0        # chunks run serially because of that
        self.gave_up = 0              # chunks whose threads gave up part way (then serial)

    def blocks(self):
        return 1 if self._cooldown > 0 else numba.get_num_threads()

    def warm_up(self, spec, dt, inputs=None):
        # the warm-up's barriers (threads starting, two samples) say nothing about contention
        state = (self._cooldown, self._next_cooldown, self.contended_chunks, self.serial_chunks,
                 self.gave_up)
        super().warm_up(spec, dt, inputs)
        (self._cooldown, self._next_cooldown, self.contended_chunks, self.serial_chunks,
         self.gave_up) = state

    def kernel(self, run, workspace, order):
        if self._cooldown > 0:                 # blocks() gave serial's one-block layout
            self._cooldown -= 1
            self.serial_chunks += 1
            return self.serial(run, workspace, order)
        nt = numba.get_num_threads()
        ws = workspace(nt)
        results = run_threads(nt, lambda t: run(nogil_loop, t, t + 1, nt, True, order, ws))
        loss_sum, correct, _, done = results[0]                  # thread 0 counts
        cycles = ws.cycles().copy()
        if done < len(order) or sum(r[2] for r in results) * SLOW_LIMIT > len(order):
            self.contended_chunks += 1
            self._cooldown = self._next_cooldown
            self._next_cooldown = min(2 * self._next_cooldown, self.MAX_COOLDOWN)
        else:
            self._next_cooldown = self.COOLDOWN
        if done < len(order):                  # the threads gave up: the rest on one thread
            self.gave_up += 1
            loss_sum, rest_correct, rest_cycles = self.serial(run, workspace, order[done:],
                                                              loss0=loss_sum)
            correct += rest_correct
            cycles[0] += rest_cycles[0]
        return loss_sum, correct, cycles

    def info(self):
        return {**super().info(), "contended_chunks": self.contended_chunks,
                "serial_chunks": self.serial_chunks, "gave_up": self.gave_up}


def run_threads(nt, work):
    """work(t) for t = 0..nt-1 at the same time: t = 0 on the calling thread, the others on
    new threads (the loop is compiled nogil). Returns the results in order."""
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


def _key(dt, inputs):
    """compile_s's key: the dtype, and the inputs' if they are not in it (uint8 pixels)."""
    return dt.name if inputs == dt else f"{dt.name}, {np.dtype(inputs).name} inputs"


def _threading_layer():
    try:
        return numba.threading_layer()
    except ValueError:          # no parallel region has run yet in this process
        return None
