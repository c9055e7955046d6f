"""W2 epochs of the batch engine in one process: the default preset's network on the real
training set, handed over in chunks of 8192 as the training loop does; prints the median and
the minimum of the epochs. For interleaved comparisons between processes (a commit against
another, shard counts, float against uint8 inputs); run each under `flock /tmp/bench.lock`.

    python benchmarks/batch_epochs.py --threads 2 --shards 2 --uint8
    PYTHONPATH=/tmp/parnn-base/src python benchmarks/batch_epochs.py --threads 2 --shards none
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--shards", default="default",
                    help="a number, 'default' (the engine's), or 'none' (an engine without the "
                    "option: an older commit)")
    ap.add_argument("--uint8", action="store_true", help="the training set as uint8 pixels")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--general", action="store_true",
                    help="the engine's general path, not the fused one (fused=False)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
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
    X, T = ds.X_train, one_hot(ds.y_train, spec.sizes[-1], spec.dtype)
    if args.uint8:
        X = np.rint(X * 255).astype(np.uint8)        # the files' bytes: x / 255 gives X back
    rng = np.random.default_rng(2)
    numba.set_num_threads(args.threads)
    options = {} if args.shards in ("default", "none") else {"shards": int(args.shards)}
    if args.general:
        options["fused"] = False
    B = args.batch_size or cfg.batch_size
    engine = make_engine("batch", **options)
    net = MLP(spec, init=cfg.init, seed=cfg.seed)
    opt = make_optimizer(cfg.optimizer, spec.n_params, spec.dtype, cfg.lr)
    times = []
    with threadpool_limits(args.threads, user_api="blas"):
        engine.train(net, opt, X, T, rng.permutation(len(X))[:1024], B)  # warm-up
        for _ in range(args.epochs):
            order = rng.permutation(len(X))
            t = time.perf_counter()
            for s in range(0, len(order), 8192):
                engine.train(net, opt, X, T, order[s:s + 8192], B)
            times.append(time.perf_counter() - t)
    acc = float(np.mean(net.predict(ds.X_test) == ds.y_test))
    print(f"shards {args.shards} threads {args.threads}{' uint8' if args.uint8 else ''}"
          f"{' general' if args.general else ''} batch {B}: "
          f"median {np.median(times):.3f} s  min {min(times):.3f} s  max {max(times):.3f} s  "
          f"test acc {acc:.4f}  batches run by one thread after giving up "
          f"{getattr(engine, 'solo_batches', 0)}")


if __name__ == "__main__":
    main()
