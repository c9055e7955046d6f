"""Where a W2 batch's time goes in the batch engine: each phase of a shard timed on its own.

The batch of 128 is cut into the engine's 2 shards of 64; each shard runs the engine's sequence
of calls (written out here, phase by phase, with a clock read between phases), then the shards'
gradients are summed and Adam steps. At --threads 2 the two shards run at the same time in two
Python threads with BLAS held to one thread each, as in the engine; the table then gives each
thread's phases (thread 1's first phase includes waking it up). `--impl core` is the sequence
of core's layer calls (MLP.forward/backward as the engine makes them on its general path);
`--impl fused` the kernels of the engine's fused path (parnn.engines.fused) called one by one
from Python: its compiled loop runs the same kernels without the calls in between. The last
row, "engine batch", is BatchEngine.train's own time per batch (general or fused path) over an
epoch; what it has beyond the phases' sum is Python between them and the hand-over to the
second thread.

    flock /tmp/bench.lock env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE \
        .venv/bin/python benchmarks/batch_phases.py --threads 1 --impl core
"""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np


def core_shard(net, X8, T, rows, ws, scale, tick):
    """The engine's calls for one shard before the fused path, with a clock between phases."""
    from parnn.core.layers import relu_derivative, softmax
    from parnn.core.losses import n_correct
    from parnn.engines import scaled

    b = len(rows)
    x, t = ws["X"][:b], ws["T"][:b]
    (W0, b0), (W1, b1), (W2, b2) = net.layer_params
    (gW0, gb0), (gW1, gb1), (gW2, gb2) = net._grad_views(ws["grad"])
    A0, A1, A2 = (a[:b] for a in ws["A"])
    D0, D1, D2 = (d[:b] for d in ws["D"])
    tick("start")
    scaled(np.take(X8, rows, axis=0, out=ws["X8"][:b], mode="clip"), x.dtype, x)
    np.take(T, rows, axis=0, out=t, mode="clip")
    tick("gather + scale")
    np.matmul(x, W0.T, out=A0)
    tick("L0 forward GEMM")
    A0 += b0
    np.maximum(A0, 0.0, out=A0)
    tick("L0 bias + relu")
    np.matmul(A0, W1.T, out=A1)
    tick("L1 forward GEMM")
    A1 += b1
    np.maximum(A1, 0.0, out=A1)
    tick("L1 bias + relu")
    np.matmul(A1, W2.T, out=A2)
    tick("L2 forward GEMM")
    A2 += b2
    softmax(A2)
    tick("L2 bias + softmax")
    loss = net.loss.value(A2, t)
    tick("loss value")
    np.subtract(A2, t, out=D2)
    D2 *= scale
    tick("delta p - t")
    np.matmul(D2.T, A1, out=gW2)
    np.matmul(D2, W2, out=D1)
    tick("L2 backward GEMMs")
    D2.sum(axis=0, out=gb2)
    relu_derivative(A1, D1)
    tick("L2 db, L1 relu'")
    np.matmul(D1.T, A0, out=gW1)
    np.matmul(D1, W1, out=D0)
    tick("L1 backward GEMMs")
    D1.sum(axis=0, out=gb1)
    relu_derivative(A0, D0)
    tick("L1 db, L0 relu'")
    np.matmul(D0.T, x, out=gW0)
    tick("L0 backward GEMM (dW0)")
    D0.sum(axis=0, out=gb0)
    tick("L0 db")
    n_correct(A2, t)
    tick("hits")
    return loss


def fused_shard(net, X8, T, rows, ws, scale, tick):
    """shard_gradient of the fused path (parnn.engines.fused), its kernels called one by one
    (each call adds a few us of Python that the compiled loop does not have)."""
    from parnn.engines import fused

    plan, s = ws["plan"], ws["s"]
    b = len(rows)
    f = net.params.dtype.type
    x, t = plan.X[s][:b], plan.T[s][:b]
    lay, AT, DT, g = plan.lay, plan.AT[s], plan.DT[s], plan.G[s]

    def cols(buf, l):
        return buf[lay[l, 4]:lay[l, 4] + b * lay[l, 3]].reshape(lay[l, 3], b)
    (W0, b0), (W1, b1), (W2, b2) = net.layer_params
    (gW0, gb0), (gW1, gb1), (gW2, gb2) = net._grad_views(g)
    tick("start")
    fused.gather(X8, f(255), T, rows, x, t)
    tick("gather + scale")
    fused.gemm(False, True, W0, x, cols(AT, 0))
    tick("L0 forward GEMM")
    fused.bias_relu(cols(AT, 0), b0)
    tick("L0 bias + relu")
    fused.gemm(False, False, W1, cols(AT, 0), cols(AT, 1))
    tick("L1 forward GEMM")
    fused.bias_relu(cols(AT, 1), b1)
    tick("L1 bias + relu")
    fused.gemm(False, False, W2, cols(AT, 1), cols(AT, 2))
    tick("L2 forward GEMM")
    loss, _ = fused.softmax_xent(cols(AT, 2), b2, t, f(scale), np.finfo(f).tiny, cols(DT, 2),
                                 gb2)
    tick("L2 bias, softmax, loss, delta, hits, db")
    fused.gemm(False, True, cols(DT, 2), cols(AT, 1), gW2)
    fused.gemm(True, False, W2, cols(DT, 2), cols(DT, 1))
    tick("L2 backward GEMMs")
    fused.relu_back(cols(AT, 1), cols(DT, 1), gb1)
    tick("L1 relu' + db")
    fused.gemm(False, True, cols(DT, 1), cols(AT, 0), gW1)
    fused.gemm(True, False, W1, cols(DT, 1), cols(DT, 0))
    tick("L1 backward GEMMs")
    fused.relu_back(cols(AT, 0), cols(DT, 0), gb0)
    tick("L0 relu' + db")
    fused.gemm(False, False, cols(DT, 0), x, gW0)
    tick("L0 backward GEMM (dW0)")
    return loss


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--impl", choices=("core", "fused"), default="core")
    ap.add_argument("--batches", type=int, default=469)
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args()

    import numba
    from threadpoolctl import threadpool_limits

    from parnn.core.model import MLP
    from parnn.core.optim import make_optimizer
    from parnn.data import load_dataset, one_hot
    from parnn.engines import make_engine
    from parnn.engines.batch import Workspace
    from parnn.run.config import make_config

    cfg = make_config("modern")
    spec = cfg.spec()
    ds = load_dataset("fashion-mnist", None, "float32")
    X8 = np.rint(ds.X_train * 255).astype(np.uint8)
    T = one_hot(ds.y_train, spec.sizes[-1], spec.dtype)
    numba.set_num_threads(args.threads)
    net = MLP(spec, init=cfg.init, seed=cfg.seed)
    opt = make_optimizer(cfg.optimizer, spec.n_params, spec.dtype, cfg.lr)
    B, S = args.batch_size, 2
    nets = [net, MLP(spec, net.params)]
    wss = []
    for s in range(S):
        w = Workspace(spec, B // S)
        ws = {"X": w.X, "X8": w.X8, "T": w.T, "A": w.A, "D": w.D, "grad": w.grad}
        wss.append(ws)
    if args.impl == "fused":
        from parnn.engines import fused
        fused.available()
        plan = fused.Plan(spec, B, S)
        for s in range(S):
            wss[s].update(plan=plan, s=s)
    shard = core_shard if args.impl == "core" else fused_shard
    rng = np.random.default_rng(2)
    order = rng.permutation(len(X8))
    phases = [{} for _ in range(S)]

    def run(s, idx, keep):
        clock = [time.perf_counter_ns()]

        def tick(name):
            now = time.perf_counter_ns()
            if keep and name != "start":
                phases[s].setdefault(name, []).append(now - clock[0])
            clock[0] = now
        rows = idx[len(idx) * s // S:len(idx) * (s + 1) // S]
        shard(nets[s], X8, T, rows, wss[s], 1.0 / len(idx), tick)

    tail = {}

    def batch(i, keep):
        idx = order[(i * B) % (len(order) - B):][:B]
        if args.threads == 1:
            for s in range(S):
                run(s, idx, keep)
        else:
            th = threading.Thread(target=run, args=(1, idx, keep))
            th.start()
            run(0, idx, keep)
            th.join()
        t0 = time.perf_counter_ns()
        if args.impl == "core":
            grad = wss[0]["grad"]
            grad += wss[1]["grad"]
            t1 = time.perf_counter_ns()
            opt.step(net.params, grad)
        else:
            t1 = t0
            f = net.params.dtype.type
            eps_t, lr_t = opt.scalars(opt.t + 1)
            opt.t += 1
            fused.adam_sum(net.params, plan.G, opt.m, opt.v, 0, len(net.params), f(0.9),
                           f(1 - 0.9), f(0.999), f(1 - 0.999), f(eps_t), f(lr_t),
                           f(opt.decay()))
        t2 = time.perf_counter_ns()
        if keep:
            tail.setdefault("shard sum", []).append(t1 - t0)
            tail.setdefault("Adam step" if args.impl == "core" else "shard sum + Adam",
                            []).append(t2 - t1)

    with threadpool_limits(1 if args.threads > 1 else args.threads, user_api="blas"):
        for i in range(50):
            batch(i, False)
        for i in range(args.batches):
            batch(i, True)
    engine = make_engine("batch", fused=args.impl == "fused")
    with threadpool_limits(args.threads, user_api="blas"):
        engine.train(net, opt, X8, T, order[:1024], B)
        per = []
        for rep in range(3):
            t = time.perf_counter()
            for s in range(0, len(order), 8192):
                engine.train(net, opt, X8, T, order[s:s + 8192], B)
            per.append((time.perf_counter() - t) / (len(order) / B))
    print(f"impl {args.impl}, threads {args.threads}, batch {B} in {S} shards of {B // S}; "
          f"median us per batch over {args.batches} batches")
    total = [0.0] * S
    for name in phases[0]:
        med = [float(np.median(phases[s][name])) / 1e3 for s in range(S)]
        for s in range(S):
            total[s] += med[s]
        print(f"| {name} | " + " | ".join(f"{m:.1f}" for m in med) + " |")
    print("| shards' phases, summed | " + " | ".join(f"{m:.1f}" for m in total) + " |")
    for name, v in tail.items():
        print(f"| {name} | {np.median(v) / 1e3:.1f} |")
    print(f"| engine batch (epoch / 469, median of 3 epochs) | {np.median(per) * 1e6:.1f} |")


if __name__ == "__main__":
    main()
