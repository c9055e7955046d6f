"""The batch engine's fused path against its general path in ONE process, alternating: W2 (the
modern preset's 784-256-128-10 network, Adam, uint8 pixels of the real training set), each
round one chunk of 8192 samples on each path from the same parameters. Alternating short runs
and reading low percentiles keeps a busy neighbour's bursts out of the comparison better than
whole epochs in separate processes. Prints us per batch (median and 20th percentile of the
rounds) and their ratio; run it under `flock /tmp/bench.lock`.

    python benchmarks/batch_fused_ab.py --threads 2 --batch-size 128 --rounds 15
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()

    import numba
    from threadpoolctl import threadpool_limits

    from parnn.core.model import MLP
    from parnn.core.optim import make_optimizer
    from parnn.data import load_dataset, one_hot
    from parnn.engines import make_engine
    from parnn.run.config import make_config

    cfg = make_config("modern")
    spec = cfg.spec()
    ds = load_dataset("fashion-mnist", None, "float32")
    X = np.rint(ds.X_train * 255).astype(np.uint8)
    T = one_hot(ds.y_train, spec.sizes[-1], spec.dtype)
    numba.set_num_threads(args.threads)
    B, chunk = args.batch_size, 8192
    order = np.random.default_rng(2).permutation(len(X))
    paths = {"fused": make_engine("batch"), "general": make_engine("batch", fused=False)}
    start = MLP(spec, init=cfg.init, seed=cfg.seed).params
    times = {name: [] for name in paths}
    with threadpool_limits(args.threads, user_api="blas"):
        for rnd in range(args.rounds + 1):
            for name, engine in paths.items():
                net = MLP(spec, start.copy())
                opt = make_optimizer(cfg.optimizer, spec.n_params, spec.dtype, cfg.lr)
                part = order[(rnd * chunk) % (len(X) - chunk):][:chunk]
                t = time.perf_counter()
                engine.train(net, opt, X, T, part, B)
                if rnd:                                  # round 0 warms up (and compiles)
                    times[name].append((time.perf_counter() - t) / (chunk / B) * 1e6)
    med = {k: float(np.median(v)) for k, v in times.items()}
    p20 = {k: float(np.percentile(v, 20)) for k, v in times.items()}
    print(f"threads {args.threads} batch {B}: us per batch, median / 20th percentile of "
          f"{args.rounds} rounds of {chunk} samples")
    for k in times:
        print(f"  {k:8s} {med[k]:8.1f} / {p20[k]:8.1f}")
    print(f"  fused / general: {med['fused'] / med['general']:.3f} (median), "
          f"{p20['fused'] / p20['general']:.3f} (20th percentile); epoch of 60k at the "
          f"20th percentile: fused {p20['fused'] * 60000 / B / 1e6:.3f} s, general "
          f"{p20['general'] * 60000 / B / 1e6:.3f} s")


if __name__ == "__main__":
    main()
