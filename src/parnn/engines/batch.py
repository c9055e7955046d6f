"""Mini-batch and full-batch training: the network's own forward and backward (parnn.core) run
into a workspace allocated once, BLAS for the matrix products, any optimizer of parnn.core.optim.
The fast path of the modern preset.

Per batch of B samples, cut into S shards of consecutive samples (S = 2 by default), each
shard computed by one of the caller's threads into its own workspace:

    gather    X, T rows of the batch into preallocated buffers (np.take, out=); uint8 pixels
              (the training set as stored) are scaled x / 255 in the network's dtype on the
              way (parnn.engines.scaled: the bits of a float copy made up front); with an
              Augmentation, X's rows are written transformed and scaled instead (augment_batch)
    forward   net.forward(X, out=workspace)      each layer straight into its buffer
    backward  net.backward(..., deltas=workspace) each layer's gradient straight into its view of
              the flat gradient buffer, its deltas into preallocated buffers
    sum       the shards' gradients added in shard order: grad_0 + grad_1 + ...
    reduce    the gradient-reduce hook, for data-parallel training (see BatchEngine)
    step      opt.step(params, grad) on the flat buffers (Adam's is one compiled pass)

So the math is the numpy engine's, written once in parnn.core; this engine removes the
allocations and per-batch copies, and spreads the shards over threads. For a dense ReLU
network with softmax + cross-entropy and Adam (the modern preset) the same steps run fused
and compiled, a whole chunk of batches per call and thread, no Python per batch
(parnn.engines.fused; `fused=False` keeps the general path described here).

Data parallelism inside the process, not BLAS threads: with 2 threads each runs its shard's
GEMMs single-threaded (64 rows at batch 128) instead of both threads splitting every small
GEMM, and an OpenBLAS pool that spins next to a busy neighbour cannot collapse the epoch
(measured in docs/ENGINES.md). The shards are fixed by S, not by the thread count, and summed
in one order, so the results are the same bits at any thread count. shards=1 on the general
path gives the numpy engine's bits (one gradient, BLAS threads as the caller set them); the
fused path's feature-major GEMMs round differently. One shard is faster on one core, where
a second shard only adds its Python and a second pass over each weight matrix. With float32
data and parameters nothing is ever converted. A full batch (every sample at once) uses X as
it is instead of gathering it in the shuffled order: the gradient is a sum over all samples,
so only the rounding order changes.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from parnn.core.layers import Dropout, param_views
from parnn.core.losses import n_correct
from parnn.core.model import MLP
from parnn.core.optim import OPTIMIZERS
from parnn.engines import EpochStats, contiguous_inputs, scaled
from parnn.errors import ConfigError


@dataclass(frozen=True)
class Augmentation:
    """An engine option, set once per run: each sample of a batch is transformed as
    parnn.engines.augment.augment_batch draws it from (seed, epoch, sample index), so the
    batches do not depend on threads, batch boundaries or where a resumed run restarts."""

    seed: int
    shift: float = 0        # pixels per axis, at most: whole pixels, or continuous if subpixel
    hflip: bool = False     # mirror left-right with probability 1/2
    rotate: float = 0.0     # degrees, at most (bilinear sampling when any of these three is on)
    scale: float = 0.0      # zoom by 1 +- scale, at most
    subpixel: bool = False  # shifts drawn continuously in [-shift, shift]

    def fill(self, X, idx, out, epoch):
        """out[b] = the transformed X[idx[b]]; returns out."""
        from parnn.engines.augment import augment_batch

        return augment_batch(X, idx, out, self.seed, epoch, shift=self.shift, hflip=self.hflip,
                             rotate=self.rotate, scale=self.scale, subpixel=self.subpixel)

    def fill_rows(self, X, idx, out, epoch, lo, hi):
        """fill's rows lo..hi-1 only, on the calling thread (the same bits)."""
        from parnn.engines.augment import augment_rows

        return augment_rows(X, idx, out, lo, hi, self.seed, epoch, shift=self.shift,
                            hflip=self.hflip, rotate=self.rotate, scale=self.scale,
                            subpixel=self.subpixel)


@dataclass(frozen=True)
class DropoutOption:
    """An engine option, set once per run: inverted dropout of this rate after every hidden
    layer while training (parnn.core.layers.Dropout), masks drawn from (seed, epoch, layer,
    sample index, unit)."""

    rate: float
    seed: int


def training_net(net, dropout):
    """net as it trains: with a Dropout layer after each hidden layer when dropout is given,
    sharing net's parameter buffer (net itself, for scoring and inference, has none)."""
    if dropout is None:
        return net
    layers, params = [], []
    last = len(net.layers) - 1
    for l, (layer, p) in enumerate(zip(net.layers, net.layer_params)):
        layers.append(layer)
        params.append(p)
        if l < last:
            layers.append(Dropout(layer.n_out, dropout.rate, dropout.seed, l, net.dtype))
            params.append(())
    # MLP walks its layer list; parnn.core.model has no constructor argument for extra layers yet.
    tnet = MLP(net.spec, net.params)
    tnet.layers, tnet.layer_params = layers, params
    return tnet


def draw_masks(tnet, epoch, idx):
    """Set every Dropout layer's mask for the batch of samples idx."""
    for layer in tnet.layers:
        if isinstance(layer, Dropout):
            layer.draw(epoch, idx)


AUGMENT_BATCHES = 64      # batches augmented in one call (at most): one block of rows
SHARDS = 2                # shards of a batch, one process (see BatchEngine)


class Workspace:
    """Every per-batch array, allocated once for (network, batch size): the gathered inputs and
    targets, each layer's outputs and deltas, and the flat gradient buffer."""

    def __init__(self, spec, B, layers=None):
        dt = np.dtype(spec.dtype)
        self.X = np.empty((B, spec.sizes[0]), dt)
        self.X8 = np.empty((B, spec.sizes[0]), np.uint8)   # uint8 pixels before scaling
        self.T = np.empty((B, spec.sizes[-1]), dt)
        layers = spec.layers() if layers is None else layers
        shapes = [(B, *layer.out_shape) for layer in layers]
        self.A = [np.empty(s, dt) for s in shapes]       # each layer's output
        self.D = [np.empty(s, dt) for s in shapes]       # dL/d(each layer's output), scratch
        self.grad = np.empty(spec.n_params, dt)

    @staticmethod
    def rows(buffers, b):
        """The first b rows of each buffer (a short last batch)."""
        return buffers if len(buffers[0]) == b else [a[:b] for a in buffers]


class BatchEngine:
    """The engine protocol (parnn.engines) over mini-batches.

    reducer: None for one process. For data-parallel training (parnn.engines.allreduce), the
    gradient-reduce hook, an object with
        part(idx)     the samples of the global batch `idx` this process computes
        reduce(grad)  sums the flat gradient over the processes, in place, before the step
        on_layer(l, g_l)  optional: layer l's gradient views are final (MLP.backward's hook),
                      so the sum of that layer may start while backward goes on
    Each part's gradient is scaled by 1/len(idx) of the GLOBAL batch, so the sum is the batch's
    mean gradient and every process takes the same step. Stats are this process's part only.

    augment: None, or an Augmentation: train's `epoch` then picks the epoch's transforms.
    dropout: None, or a DropoutOption: train's `epoch` then picks the epoch's masks.
    shards: how many shards each batch is cut into (None: SHARDS for one process, 1 with a
    reducer, whose processes are the data parallelism). Threads = Numba's thread count, which
    parnn.run.train.set_threads sets with BLAS's; with a reducer and S > 1, on_layer is
    called for each layer once the shards are summed, last layer first.
    fused: take the fused path where it applies (see `fuses`); False: always the general one.
    """

    name = "batch"
    takes_pixels = True     # uint8 X (x / 255) is scaled in the gather

    def __init__(self, reducer=None, augment=None, dropout=None, shards=None, fused=True):
        self.reducer = reducer
        self.augment = augment
        self.dropout = dropout
        self.shards = shards
        self.fused = fused      # False: always the general path (to compare against)
        self._shards = None     # (key, params, [(training net, workspace)] per shard)
        self._plan = None       # (key, the fused path's buffers: parnn.engines.fused.Plan)
        self.solo_batches = 0   # fused path: batches thread 0 ran alone after the threads gave up
        self._patience = ()     # (patience,) overrides fused.PATIENCE (tests)
        self.path = None        # the path the last train call took: "fused" or "general"
        self._aug = None        # the augmented block of batches
        self._blas = None       # threadpoolctl's controller, made on first use

    def check(self, spec, optimizer, batch_size):
        opt = getattr(optimizer, "name", optimizer)
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
        return {"engine": self.name, "blas": blas,
                "shards": self.shards if self.shards is not None else
                SHARDS if self.reducer is None else 1,
                "path": self.path, "solo_batches": self.solo_batches}

    def shards_for(self, spec):
        """Shards per batch: as given; else 1 under an MPI reducer, and SHARDS in one process,
        except for a layer list (conv kernels, Numba-parallel over the batch, run inside each
        shard) when Numba's threading layer cannot run two parallel regions at once."""
        if self.shards is not None:
            return self.shards
        if self.reducer is not None or (spec.arch and not _concurrent_parallel_regions()):
            return 1
        return SHARDS

    def _block_buffer(self, n, X, dtype):
        """n rows like X's in dtype for a block of augmented batches, reused from call to call."""
        buf = self._aug
        if buf is None or len(buf) < n or buf.shape[1:] != X.shape[1:] or buf.dtype != dtype:
            self._aug = None                     # free the old buffer before the new one
            self._aug = buf = np.empty((n, X.shape[1]), dtype)
        return buf[:n]

    def _augment_block(self, X, order, epoch, dtype):
        """The augmented X[order] in dtype (the parallel kernel)."""
        return self.augment.fill(X, order, self._block_buffer(len(order), X, dtype), epoch)

    def shard_nets(self, net, B, S):
        """S (training net, workspace) pairs, kept from call to call: each shard its own
        network object over net's parameters (its own dropout masks and gradient views) and
        its own buffers, so shards can run at the same time. Shard 0 trains net itself."""
        key = (net.spec, B, S, self.dropout)
        if self._shards is None or self._shards[0] != key or self._shards[1] is not net.params:
            self._shards = None                  # free the old buffers before the new ones
            pairs = []
            for s in range(S):
                tnet = training_net(net if s == 0 else MLP(net.spec, net.params), self.dropout)
                layers = None if tnet.layers is net.layers else tnet.layers
                pairs.append((tnet, Workspace(net.spec, -(-B // S), layers)))  # ceil(B/S) rows
            self._shards = (key, net.params, pairs)
        return self._shards[2]

    def train(self, net, opt, X, T, order, batch_size, epoch=1):
        self.check(net.spec, opt, batch_size)
        X, T, order = contiguous_inputs(net, X, T, order, pixels=True)   # uint8 stays uint8
        pixels = X.dtype == np.uint8
        B = min(batch_size, max(len(order), 1))
        S = self.shards_for(net.spec)
        S = max(1, min(S, B))                    # a shard of a batch has at least one sample
        nt = min(S, _threads())                  # threads that run the shards
        self.path = "fused" if self.fuses(net, opt, X, B) else "general"
        if self.path == "fused" and self.augment is not None:
            return self._train_fused_augmented(net, opt, X, T, order, B, S, nt, epoch)
        if self.path == "fused":
            return self._train_fused(net, opt, X, T, order, order, B, S, nt, epoch)
        shards = self.shard_nets(net, B, S)
        on_layer = getattr(self.reducer, "on_layer", None)
        # Augmenting AUGMENT_BATCHES batches in one parallel call, not one batch per call:
        # a Numba region between every pair of BLAS calls makes the two thread pools fight
        # (docs/ACCURACY.md). Each sample's transform is its own: the same bits either way.
        blocks = self.augment is not None and self.reducer is None
        block = AUGMENT_BATCHES * B
        losses, hits = np.zeros(S), np.zeros(S, np.int64)
        batch = {}                               # what the shards of this batch need

        def run_shard(s):
            """Shard s of the batch: rows part[lo:hi] into its own gradient buffer."""
            tnet, ws = shards[s]
            part, start, scale = batch["part"], batch["start"], batch["scale"]
            lo, hi = len(part) * s // S, len(part) * (s + 1) // S
            rows, b = part[lo:hi], hi - lo
            if tnet is not net:
                draw_masks(tnet, epoch, rows)
            if batch["full"]:                     # X as it is: the gradient is a sum anyway
                Xb, Tb = X[lo:hi], T[lo:hi]
                if pixels:
                    Xb = scaled(Xb, ws.X.dtype, ws.X[:b])
            else:                                 # gather (mode=clip: no hidden buffer)
                Xb, Tb = ws.X[:b], ws.T[:b]
                if blocks:
                    at = start % block + lo
                    Xb = batch["Xa"][at:at + b]
                elif self.augment is not None:
                    self.augment.fill(X, rows, Xb, epoch)
                elif pixels:
                    scaled(np.take(X, rows, axis=0, out=ws.X8[:b], mode="clip"), Xb.dtype, Xb)
                else:
                    np.take(X, rows, axis=0, out=Xb, mode="clip")
                np.take(T, rows, axis=0, out=Tb, mode="clip")
            acts = tnet.forward(Xb, out=ws.rows(ws.A, b))
            losses[s] += tnet.backward(acts, Tb, ws.grad, scale=scale, deltas=ws.rows(ws.D, b),
                                       on_layer=on_layer if S == 1 else None)
            hits[s] += n_correct(acts[-1], Tb)

        def job(t):
            for s in range(t, S, nt):
                run_shard(s)

        grad = shards[0][1].grad                 # shard 0's gradient, then the sum of all
        n = 0
        with Crew(nt, self._blas_single if nt > 1 else None) as crew:
            for start in range(0, len(order), B):
                if blocks and start % block == 0:
                    batch["Xa"] = self._augment_block(X, order[start:start + block], epoch,
                                                      net.dtype)
                idx = order[start:start + B]
                part = idx if self.reducer is None else self.reducer.part(idx)
                batch.update(part=part, start=start, scale=1.0 / len(idx),
                             full=len(part) == len(X) and self.augment is None
                             and self.dropout is None)
                crew.run(job)
                for s in range(1, S):             # in shard order: the same bits at any
                    grad += shards[s][1].grad     # thread count
                n += len(part)
                if self.reducer is not None:
                    if S > 1 and on_layer is not None:    # the layers' sums are final now
                        for l, g_l in reversed(list(enumerate(
                                param_views(shards[0][0].layers, grad)))):
                            on_layer(l, g_l)
                    self.reducer.reduce(grad)
                opt.step(net.params, grad)
        # summed in shard order, not as they came: the same stats at any thread count
        return EpochStats(float(sum(losses.tolist())), int(hits.sum()), n)

    def fuses(self, net, opt, X, B):
        """Whether train takes the fused path (parnn.engines.fused): a dense ReLU network with
        softmax + cross-entropy, Adam, batches smaller than X, no MPI reducer (augmentation:
        see _train_fused_augmented; dropout: the same masks, drawn in the compiled loop)."""
        spec = net.spec
        if not (self.fused and not spec.arch and spec.hidden == "relu"
                and spec.output == "softmax" and spec.loss == "cross_entropy"
                and getattr(opt, "name", None) == "adam" and B < len(X)
                and self.reducer is None):
            return False
        from parnn.engines import fused
        return fused.available()

    def _train_fused(self, net, opt, X, T, order, ids, B, S, nt, epoch):
        """train's batches on the fused path: one compiled call per thread for all of them.
        ids[i]: the sample number of row order[i] (dropout's masks are drawn by it)."""
        from parnn.engines import fused

        key = (net.spec, B, S, self.dropout is not None)
        if self._plan is None or self._plan[0] != key:
            self._plan = None                    # free the old buffers before the new ones
            self._plan = (key, fused.Plan(net.spec, B, S, dropout=key[-1]))
        d = self.dropout
        drop = fused.dropout_of(d.rate if d else 0.0, d.seed if d else 0, epoch,
                                len(net.spec.sizes) - 2, net.dtype)
        plan = self._plan[1]
        n_batches = -(-len(order) // B)
        steps = np.array([opt.scalars(opt.t + k) for k in range(1, n_batches + 1)],
                         net.dtype).reshape(n_batches, 2)     # fused.adam_sum's precision
        losses, hits = np.zeros(S), np.zeros(S, np.int64)
        plan.flags[:] = 0

        gave_up = [0]

        def job(t):
            try:
                done = fused.train(plan, t, nt, net, opt, X, T, order, ids, B, steps,
                                   opt.decay(), drop, losses, hits, *self._patience)
            except BaseException:                # e.g. Ctrl-C before the compiled call began
                fused.release(plan.flags, t, nt)
                raise
            if t == 0:
                gave_up[0] = done

        with Crew(nt, self._blas_single if nt > 1 else None) as crew:
            crew.run(job)
        if gave_up[0]:                           # a busy neighbour: one thread went on alone
            self.solo_batches += n_batches - gave_up[0]
        opt.t += n_batches
        return EpochStats(float(sum(losses.tolist())), int(hits.sum()), len(order))

    def _train_fused_augmented(self, net, opt, X, T, order, B, S, nt, epoch):
        """The fused path on augmented batches: AUGMENT_BATCHES batches at a time are written by
        a crew of as many threads as the fused path runs, each its share of the rows
        (Augmentation.fill_rows: no Numba parallel region, whose pool would fight the fused
        path's threads for the cores), then trained on the fused path in order. Each sample's
        transform is its own, so the batches are the general path's, bit for bit."""
        block = AUGMENT_BATCHES * B
        stats = EpochStats()
        for start in range(0, len(order), block):
            rows = order[start:start + block]
            n = len(rows)
            Xa = self._block_buffer(n, X, net.dtype)
            with Crew(nt) as crew:
                crew.run(lambda t: self.augment.fill_rows(X, rows, Xa, epoch, n * t // nt,
                                                          n * (t + 1) // nt))
            Ta = np.take(T, rows, axis=0)
            stats += self._train_fused(net, opt, Xa, Ta, np.arange(n), rows, B, S, nt, epoch)
        return stats

    def _blas_single(self):
        """A context in which BLAS runs on the calling thread only (each shard's thread)."""
        if self._blas is None:
            from threadpoolctl import ThreadpoolController
            self._blas = ThreadpoolController()
        return self._blas.limit(limits=1, user_api="blas")


def _threads():
    """The caller's thread count (parnn.run.train.set_threads sets Numba's with BLAS's)."""
    import numba
    return numba.get_num_threads()


_LAYER = []


def _concurrent_parallel_regions():
    """Whether two Python threads may run Numba parallel kernels at the same time: OpenMP and
    TBB allow it; the workqueue layer (Numba's fallback when neither is installed) aborts the
    process. The layer is known once a parallel region has run, so a tiny one runs first."""
    if not _LAYER:
        import numba

        @numba.njit(parallel=True)
        def touch(n):
            total = 0
            for i in numba.prange(n):
                total += i
            return total

        touch(2)
        _LAYER.append(numba.threading_layer())
    return _LAYER[0] != "workqueue"


class Crew:
    """nt threads for one train() call: the caller and nt - 1 helpers. run(job) calls job(t)
    for t = 0..nt-1 at the same time, job(0) on the caller, and returns when all are done (a
    helper's exception is raised there). blas: None, or a context, entered once for the whole
    call (BLAS limits are process-wide), that keeps each GEMM on the thread that calls it, so
    the shards' GEMMs do not fight for the cores."""

    def __init__(self, nt, blas=None):
        self.nt, self.blas = nt, blas
        self.job, self.errors = None, []
        self.go = [threading.Event() for _ in range(nt)]
        self.done = [threading.Event() for _ in range(nt)]
        self.threads = [threading.Thread(target=self._helper, args=(t,), daemon=True)
                        for t in range(1, nt)]

    def __enter__(self):
        self._limits = self.blas() if self.blas is not None else None
        if self._limits is not None:
            self._limits.__enter__()
        for th in self.threads:
            th.start()
        return self

    def __exit__(self, *exc):
        self.job = None                           # helpers return on a go without a job
        for t in range(1, self.nt):
            self.go[t].set()
        for th in self.threads:
            th.join()
        if self._limits is not None:
            self._limits.__exit__(*exc)

    def run(self, job):
        self.job = job
        for t in range(1, self.nt):
            self.go[t].set()
        try:
            job(0)
        finally:
            for t in range(1, self.nt):
                self.done[t].wait()
                self.done[t].clear()
        if self.errors:
            raise self.errors.pop()

    def _helper(self, t):
        while True:
            self.go[t].wait()
            self.go[t].clear()
            job = self.job
            if job is None:
                return
            try:
                job(t)
            except BaseException as e:          # raised again on the caller, in run
                self.errors.append(e)
            self.done[t].set()
