"""The default CNN (conv32:3,pool,conv64:3,pool,dense128 -> 10; ReLU, softmax cross-entropy,
Adam, batch 128, float32): parnn's batch engine against PyTorch and JAX on the same network,
time per training batch (forward, backward, Adam step), each run a fresh process.

    flock /tmp/bench.lock env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE \\
        .venv/bin/python benchmarks/cnn.py --threads 1 2 --rounds 3

runs every implementation at every thread count, interleaved, `rounds` times, and prints the
median batch time of each (and x 469, one epoch of 60,000 samples). With --phases: parnn's
time per layer, forward and backward, at each thread count. With --direct: each conv layer's
forward by im2col + GEMM against a direct convolution compiled by Numba. With --strategies:
conv64's GEMMs shared among the threads by BLAS, over the batch, or over output channels.
One run: a warm-up of 3 batches (Numba compiles or loads its cache), then 3 timings of
`--batches` batches on random inputs; the run's figure is the median of the 3. Implementations:

    torch        torch.nn.Sequential of Conv2d/ReLU/MaxPool2d/Flatten/Linear, torch.set_num_threads
    jax          the same network in JAX (jax.lax.conv_general_dilated, NHWC; parnn.bench.runners.
                 jax_model), one jitted optax Adam step per batch, the process pinned to
                 `threads` cores (XLA sizes its pool from the cores it sees); warm-up: compiling
    jax-scan     the same, but all the run's batches ONE jitted lax.scan (not run by default:
                 XLA's CPU convolutions inside the loop are far slower)
    parnn-numba  parnn's conv kernels parallel over the batch on Numba's threads, BLAS's own
                 threads for the products (what parnn uses: parnn.core.conv.THREADS_BY)
    parnn-blas   the same kernels on the calling thread: BLAS's threads the only pool
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ARCH = "conv32:3,pool,conv64:3,pool,dense128"
IMPLS = ("torch", "jax", "parnn-numba", "parnn-blas")
OTHER_IMPLS = ("jax-scan",)
B = 128


def one_run(impl, threads, batches):
    rng = np.random.default_rng(0)
    X = rng.random((batches * B, 784), dtype=np.float32)
    y = rng.integers(0, 10, batches * B)
    if impl == "torch":
        import torch
        nn = torch.nn
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                            nn.Flatten(), nn.Linear(3136, 128), nn.ReLU(), nn.Linear(128, 10))
        opt = torch.optim.Adam(net.parameters(), 1e-3)
        Xt, yt = torch.from_numpy(X).reshape(-1, 1, 28, 28), torch.from_numpy(y)

        def train(n):
            for i in range(n):
                opt.zero_grad()
                batch = slice(i * B, (i + 1) * B)
                loss = nn.functional.cross_entropy(net(Xt[batch]), yt[batch])
                loss.backward()
                opt.step()
    elif impl.startswith("jax"):
        return jax_run(threads, X, y, batches, scan=impl == "jax-scan")
    else:
        import numba
        from threadpoolctl import threadpool_limits

        from parnn.core import conv
        from parnn.core.model import MLP, Spec
        from parnn.core.optim import make_optimizer
        from parnn.engines.batch import BatchEngine

        conv.THREADS_BY = impl.split("-")[1]
        numba.set_num_threads(threads)
        threadpool_limits(threads)
        spec = Spec((784, 10), "relu", "softmax", "cross_entropy", "float32", ARCH)
        net = MLP(spec, init="he", seed=1)
        opt = make_optimizer("adam", spec.n_params, "float32", 1e-3)
        T = np.eye(10, dtype=np.float32)[y]
        engine = BatchEngine()

        def train(n):
            engine.train(net, opt, X, T, np.arange(n * B), B)
    train(3)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        train(batches)
        times.append((time.perf_counter() - t) / batches)
    return float(np.median(times))


def jax_run(threads, X, y, batches, scan=False):
    """one_run's jax: the median seconds per batch of 3 passes over the batches (a jitted step
    per batch, or with scan one jitted lax.scan over them all), after a pass that compiles."""
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])   # before XLA starts
    import jax
    import jax.numpy as jnp
    import optax

    from parnn.bench.runners import jax_model
    from parnn.core.model import MLP, Spec

    spec = Spec((784, 10), "relu", "softmax", "cross_entropy", "float32", ARCH)
    params, logits = jax_model(MLP(spec, init="he", seed=1))
    tx = optax.adam(1e-3)
    Xb = jnp.asarray(X).reshape(batches, B, 784)
    Tb = jax.nn.one_hot(jnp.asarray(y), 10, dtype=jnp.float32).reshape(batches, B, 10)

    def loss(params, x, t):
        return optax.softmax_cross_entropy(logits(params, x), t).mean()

    def step(carry, xt):
        params, state = carry
        g = jax.grad(loss)(params, *xt)
        updates, state = tx.update(g, state, params)
        return (optax.apply_updates(params, updates), state), None

    if scan:
        train = jax.jit(lambda params, state: jax.lax.scan(step, (params, state), (Xb, Tb))[0])
    else:
        one = jax.jit(lambda carry, x, t: step(carry, (x, t))[0])
        pairs = [(Xb[i], Tb[i]) for i in range(batches)]       # sliced once, not timed

        def train(params, state):
            carry = (params, state)
            for x, t in pairs:
                carry = one(carry, x, t)
            return carry

    carry = jax.block_until_ready(train(params, tx.init(params)))     # compiles
    times = []
    for _ in range(3):
        t = time.perf_counter()
        carry = jax.block_until_ready(train(*carry))
        times.append((time.perf_counter() - t) / batches)
    return float(np.median(times))


def strategies(threads, reps=20):
    """The costliest kernel, conv64's three GEMMs (cols (M, K) with M = B*14*14 pixel rows,
    K = 3*3*32; W (C_out = 64, K)), shared among `threads` three ways; median ms of reps:

      blas      one GEMM each, OpenBLAS's own threads split it (what parnn does)
      batch     the pixel rows M split at sample boundaries, a 1-thread GEMM per part on a
                Python thread; dW = dz.T @ cols sums over M, so its parts are added after
      channels  the output channels C_out split; dcols = dz @ W sums over C_out, so its
                (M, K) parts are added after (that add split over rows too)

    (Image tiles split M the same way as the batch for these GEMMs, with halos for im2col.)"""
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    M, K, N = B * 14 * 14, 3 * 3 * 32, 64
    cols, Wm = rng.random((M, K), dtype=np.float32), rng.random((N, K), dtype=np.float32)
    dz = rng.random((M, N), dtype=np.float32)
    z, dW, dcols = np.empty((M, N), np.float32), np.empty((N, K), np.float32), \
        np.empty((M, K), np.float32)
    pool = ThreadPoolExecutor(threads)
    parts = lambda n, unit=1: [slice(n // unit * t // threads * unit,
                                     n // unit * (t + 1) // threads * unit) for t in range(threads)]
    rows, chans = parts(M, 14 * 14), parts(N)
    dW_part = np.empty((threads, N, K), np.float32)
    dcols_part = np.empty((threads, M, K), np.float32)

    def each(f, pieces):
        list(pool.map(f, range(len(pieces)), pieces))

    def blas():
        yield lambda: np.matmul(cols, Wm.T, out=z)
        yield lambda: np.matmul(dz.T, cols, out=dW)
        yield lambda: np.matmul(dz, Wm, out=dcols)

    def batch():
        yield lambda: each(lambda t, r: np.matmul(cols[r], Wm.T, out=z[r]), rows)

        def dW_by_rows():
            each(lambda t, r: np.matmul(dz[r].T, cols[r], out=dW_part[t]), rows)
            dW_part.sum(axis=0, out=dW)
        yield dW_by_rows
        yield lambda: each(lambda t, r: np.matmul(dz[r], Wm, out=dcols[r]), rows)

    def channels():
        yield lambda: each(lambda t, c: np.matmul(cols, Wm[c].T, out=z[:, c]), chans)
        yield lambda: each(lambda t, c: np.matmul(dz[:, c].T, cols, out=dW[c]), chans)

        def dcols_by_channels():
            each(lambda t, c: np.matmul(dz[:, c], Wm[c], out=dcols_part[t]), chans)
            each(lambda t, r: np.sum(dcols_part[:, r], axis=0, out=dcols[r]), rows)
        yield dcols_by_channels

    results = {}
    for name, gen in (("blas", blas), ("batch", batch), ("channels", channels)):
        if threads == 1 and name != "blas":
            continue
        with threadpool_limits(threads if name == "blas" else 1, user_api="blas"):
            fs = list(gen())
            ts = np.zeros((reps + 2, len(fs)))
            for r in range(reps + 2):
                for i, f in enumerate(fs):
                    t = time.perf_counter()
                    f()
                    ts[r, i] = time.perf_counter() - t
        results[name] = (np.median(ts[2:], axis=0), np.median(ts[2:].sum(1)), dW.copy(),
                         dcols.copy())
    ref = results["blas"]
    print(f"{threads} thread(s), conv64's GEMMs (M={M}, K={K}, C_out={N}), median ms of {reps}:")
    print(f"  {'strategy':10} {'z = cols W.T':>13} {'dW = dz.T cols':>15} {'dcols = dz W':>13} "
          f"{'all three':>10}")
    for name, (each_ms, total, dW_, dcols_) in results.items():
        assert np.allclose(dW_, ref[2], rtol=1e-3) and np.allclose(dcols_, ref[3], rtol=1e-3)
        print(f"  {name:10} {each_ms[0] * 1e3:13.2f} {each_ms[1] * 1e3:15.2f} "
              f"{each_ms[2] * 1e3:13.2f} {total * 1e3:10.2f}")


def phases(threads, reps=10):
    """parnn's time per layer, forward and backward, median over reps batches (one process)."""
    import numba
    from threadpoolctl import threadpool_limits

    from parnn.core.model import MLP, Spec

    numba.set_num_threads(threads)
    threadpool_limits(threads)
    spec = Spec((784, 10), "relu", "softmax", "cross_entropy", "float32", ARCH)
    net = MLP(spec, init="he", seed=1)
    rng = np.random.default_rng(0)
    X = rng.random((B, 784), dtype=np.float32)
    T = np.eye(10, dtype=np.float32)[rng.integers(0, 10, B)]
    from parnn.engines.batch import Workspace

    ws = Workspace(spec, B)        # preallocated outputs and deltas, as the batch engine runs
    g = net._grad_views(ws.grad)
    L = len(net.layers)
    fwd, bwd = np.zeros((reps, L)), np.zeros((reps, L))
    for r in range(-2, reps):                     # two warm-up batches
        acts = [X]
        for l, (layer, p) in enumerate(zip(net.layers, net.layer_params)):
            t = time.perf_counter()
            acts.append(layer.forward(p, acts[-1], ws.A[l]))
            fwd[r, l] = time.perf_counter() - t
        dy = net.loss.delta(acts[-1], T, "softmax", ws.D[-1])
        dy *= 1.0 / B
        for l in reversed(range(L)):
            t = time.perf_counter()
            dy = net.layers[l].backward(net.layer_params[l], acts[l], acts[l + 1], dy, g[l],
                                        ws.D[l - 1] if l else None, propagate=l > 0)
            bwd[r, l] = time.perf_counter() - t
    print(f"parnn, {threads} thread(s): median ms per batch of {B}")
    for l, layer in enumerate(net.layers):
        print(f"  {layer!r:48} forward {np.median(fwd[:, l]) * 1e3:7.2f}  "
              f"backward {np.median(bwd[:, l]) * 1e3:7.2f}")
    print(f"  {'all layers':48} forward {np.median(fwd.sum(1)) * 1e3:7.2f}  "
          f"backward {np.median(bwd.sum(1)) * 1e3:7.2f}")


def direct(threads, reps=20):
    """A conv layer's forward two ways, at `threads`: parnn's im2col + GEMM + bias/ReLU pass, and
    a direct convolution compiled by Numba (prange over the batch, the C_out outputs of a pixel
    accumulated together), for both conv layers of the default CNN; median ms of reps calls."""
    import numba
    from numba import njit, prange
    from threadpoolctl import threadpool_limits

    from parnn.core.conv import Conv2D

    @njit(parallel=True, fastmath=False, cache=False)
    def conv_direct(x, W, b, pad, y):
        Bn, H, Wd, C = x.shape
        Co, k = W.shape[0], W.shape[1]
        for n in prange(Bn):
            acc = np.empty(Co, x.dtype)
            for i in range(H):
                for j in range(Wd):
                    acc[:] = b
                    for di in range(k):
                        h = i + di - pad
                        if h < 0 or h >= H:
                            continue
                        for dj in range(k):
                            w = j + dj - pad
                            if w < 0 or w >= Wd:
                                continue
                            for c in range(C):
                                v = x[n, h, w, c]
                                for o in range(Co):
                                    acc[o] += v * W[o, di, dj, c]
                    for o in range(Co):
                        y[n, i, j, o] = max(acc[o], 0)
        return y

    numba.set_num_threads(threads)
    rng = np.random.default_rng(0)
    with threadpool_limits(threads):
        for shape, c_out in (((28, 28, 1), 32), ((14, 14, 32), 64)):
            layer = Conv2D(shape, c_out, 3, "same", "relu")
            W = rng.standard_normal((c_out, 3, 3, shape[2])).astype(np.float32) * 0.1
            b = rng.standard_normal(c_out).astype(np.float32) * 0.1
            x = rng.random((B, *shape), dtype=np.float32)
            y1 = np.empty((B, *layer.out_shape), np.float32)
            y2 = np.empty_like(y1)
            times = {"im2col+GEMM": [], "direct": []}
            for r in range(reps + 2):
                t = time.perf_counter()
                layer.forward((W, b), x, y1)
                t1 = time.perf_counter()
                conv_direct(x, W, b, 1, y2)
                t2 = time.perf_counter()
                if r >= 2:
                    times["im2col+GEMM"].append(t1 - t)
                    times["direct"].append(t2 - t1)
            assert np.allclose(y1, y2, rtol=1e-4, atol=1e-4)
            print(f"{threads} thread(s) conv {shape} -> {c_out}: " + ", ".join(
                f"{k} {np.median(v) * 1e3:.2f} ms" for k, v in times.items()))


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS + OTHER_IMPLS)
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--phases", action="store_true",
                   help="instead: parnn's time per layer, forward and backward, at each --threads")
    p.add_argument("--direct", action="store_true",
                   help="instead: a conv forward by im2col + GEMM against a direct convolution")
    p.add_argument("--strategies", action="store_true",
                   help="instead: conv64's GEMMs split over the batch or over output channels")
    p.add_argument("--one", nargs=2, metavar=("IMPL", "THREADS"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.direct or a.phases or a.strategies:
        fn = "direct" if a.direct else "phases" if a.phases else "strategies"
        for threads in a.threads:
            here = os.path.dirname(os.path.abspath(__file__))
            subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {here!r}); "
                            f"import cnn; cnn.{fn}({threads})"], check=True)
        return
    if a.one:
        print(json.dumps({"batch_s": one_run(a.one[0], int(a.one[1]), a.batches)}))
        return
    results = {}
    for r in range(a.rounds):
        for threads in a.threads:
            for impl in a.impls:
                out = subprocess.run([sys.executable, __file__, "--one", impl, str(threads),
                                      "--batches", str(a.batches)], capture_output=True,
                                     text=True, check=True, env=os.environ)
                s = json.loads(out.stdout.splitlines()[-1])["batch_s"]
                results.setdefault((impl, threads), []).append(s)
                print(f"round {r + 1}: {impl:12} {threads} thread(s)  {s * 1e3:7.1f} ms/batch",
                      flush=True)
    print(f"\n{'impl':12} threads  median ms/batch  epoch (469 batches) s   runs (ms)")
    for (impl, threads), ts in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        m = float(np.median(ts))
        print(f"{impl:12} {threads:>7}  {m * 1e3:15.1f}  {m * 469:20.1f}   "
              f"{' '.join(f'{t * 1e3:.1f}' for t in ts)}")


if __name__ == "__main__":
    main(sys.argv[1:])
