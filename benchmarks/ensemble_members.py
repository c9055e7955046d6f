"""Members for an ensemble, and the ablation rows of docs/ACCURACY.md's third pass.

    # train runs, one after another; each keeps its validation and test probabilities
    nice -n 19 .venv/bin/python benchmarks/ensemble_members.py train --out /tmp/acc11 \\
        base_s1 base_s2 shift1_s1 deep_s1 q128w_s1 ...
    # soft-vote any subset offline (a vote is the mean of the stored probabilities)
    .venv/bin/python benchmarks/ensemble_members.py vote --out /tmp/acc11 --singles \\
        "plain=base*" "mixed=base_s1,base_s2,shift1_s1,shift1_s2"
    # seconds per epoch of the default recipe and its depth / batch variants (under the lock)
    flock /tmp/bench.lock env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE \\
        .venv/bin/python benchmarks/ensemble_members.py time-epochs

A run is RECIPE_sSEED: the `accurate` preset (or RECIPES' "_base") with the recipe's settings and
that seed. Every run is validated on the SAME 6,000 images (the stratified 10 % drawn from seed
1, as parnn.train(..., members=K) draws it for a whole ensemble), so any runs can be voted
together on it. OUT/RUN.json: the settings, the validation and test accuracy after every epoch
(the test set is scored every epoch: time to 0.89 is read off it), seconds, load average;
OUT/RUN_val.npy, OUT/RUN_test.npy: the final class probabilities (float32).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import time

import numpy as np

QUICK = dict(_base="modern", epochs=8, label_smoothing=0.1, weight_decay=5e-2)
WARM = dict(lr_schedule="warmup-cosine", warmup_epochs=1)
RECIPES = {
    # the default recipe, one change at a time (ablation, and candidate ensemble members)
    "base": {},
    "deep": dict(hidden=(512, 256, 128)),
    "b64": dict(batch_size=64),
    "b256": dict(batch_size=256),
    "w1024": dict(hidden=(1024, 512)),
    "shift1": dict(augment="shift1"),
    "shift1e60": dict(augment="shift1", epochs=60),
    "flip": dict(augment="flip"),
    "drop2": dict(dropout=0.2),
    # time to 0.89: the modern network with label smoothing + AdamW (`quick`), 8 epochs
    "q128": QUICK,
    "q128w": dict(QUICK, lr=2e-3, **WARM),
    "q128w3": dict(QUICK, lr=3e-3, **WARM),
    "q128e6w": dict(QUICK, epochs=6, lr=2e-3, **WARM),
    "q256": dict(QUICK, batch_size=256, lr=2e-3),
    "q256w": dict(QUICK, batch_size=256, lr=3e-3, **WARM),
    "q512": dict(QUICK, batch_size=512, lr=4e-3),
    "q512w": dict(QUICK, batch_size=512, lr=6e-3, **WARM),
    "a8": dict(epochs=8),                     # the default network, 8 epochs
}
TIMED = {"base (512-256, batch 128)": {}, "deep (512-256-128)": RECIPES["deep"],
         "batch 64": RECIPES["b64"], "batch 256": RECIPES["b256"],
         "modern 256-128": dict(hidden=(256, 128)),
         "modern 256-128, batch 256": dict(hidden=(256, 128), batch_size=256)}


def config(recipe, seed, **more):
    from parnn.run.config import make_config

    settings = dict(RECIPES[recipe] if isinstance(recipe, str) else recipe)
    return make_config(settings.pop("_base", "accurate"), seed=seed, threads=2,
                       **settings, **more)


def shared_split():
    """The data, the rows trained on and the validation Subset (drawn from seed 1)."""
    from parnn.data import load_dataset
    from parnn.run.api import holdout

    data = load_dataset("fashion-mnist", dtype="uint8")
    rows, validation = holdout(config("base", 1), data)
    return data, rows, validation


def probabilities(net, subset):
    from parnn.engines import scaled

    return np.concatenate([net.forward(scaled(X, net.dtype))[-1]
                           for X, _ in subset.chunks(2048)]).astype(np.float32)


def train(out, jobs):
    from parnn.run import train as loop

    data, rows, validation = shared_split()
    test = loop.Subset(data.X_test, data.y_test)
    np.save(f"{out}/y_val.npy", data.y_train[validation.rows])
    np.save(f"{out}/y_test.npy", data.y_test)
    for job in jobs:
        recipe, seed = job.rsplit("_s", 1)
        if os.path.exists(f"{out}/{job}.json"):
            continue
        load = os.getloadavg()[0]
        r = loop.fit(config(recipe, int(seed)), data, rows=rows, validation=validation,
                     progress=False, log=lambda *a, **k: None, test_every_epoch=True)
        pv, pt = probabilities(r.net, validation), probabilities(r.net, test)
        np.save(f"{out}/{job}_val.npy", pv)
        np.save(f"{out}/{job}_test.npy", pt)
        rec = dict(job=job, recipe=recipe, seed=int(seed), config=r.config.to_dict(),
                   val_acc=r.history[-1]["val_acc"],
                   test_acc=float(np.mean(pt.argmax(1) == data.y_test)),
                   train_s=sum(h["seconds"] for h in r.history),
                   load_start=load, load_end=os.getloadavg()[0],
                   epochs=[dict(e=h["epoch"], val=h["val_acc"], test=h["test_acc"],
                                s=h["seconds"]) for h in r.history])
        with open(f"{out}/{job}.json", "w") as f:
            json.dump(rec, f)
        print(f"{job:14s} val {rec['val_acc']:.4f} test {rec['test_acc']:.4f} "
              f"train {rec['train_s']:.1f}s load {load:.1f}-{rec['load_end']:.1f}", flush=True)


def vote(out, groups, singles=False):
    yv, yt = np.load(f"{out}/y_val.npy"), np.load(f"{out}/y_test.npy")
    recs = {os.path.basename(p)[:-5]: json.load(open(p)) for p in glob.glob(f"{out}/*_s*.json")}

    def expand(body):          # "base*" = every seed of recipe base
        return [j for part in body.split(",")
                for j in (sorted(k for k in recs if k.rsplit("_s", 1)[0] == part[:-1])
                          if part.endswith("*") else [part])]

    if singles:
        by = {}
        for r in recs.values():
            by.setdefault(r["recipe"], []).append(r)
        for name, rs in sorted(by.items()):
            va, te = [r["val_acc"] for r in rs], [r["test_acc"] for r in rs]
            print(f"{name:10s} seeds {sorted(r['seed'] for r in rs)}: val {np.mean(va):.4f} "
                  f"(min {min(va):.4f}), test {np.mean(te):.4f} (min {min(te):.4f})")
    for group in groups:
        name, body = group.split("=", 1)
        jobs = expand(body)
        pv = np.mean([np.load(f"{out}/{j}_val.npy") for j in jobs], axis=0)
        pt = np.mean([np.load(f"{out}/{j}_test.npy") for j in jobs], axis=0)
        print(f"{name:20s} {len(jobs):2d} members: vote val {np.mean(pv.argmax(1) == yv):.4f} "
              f"test {np.mean(pt.argmax(1) == yt):.4f}")


def time_epochs(rounds):
    """Seconds per epoch on the 54,000 images: 3 epochs per variant, rounds interleaved, the
    median of epochs 2-3 (the first pays for warming caches) over the rounds."""
    from parnn.run import train as loop

    data, rows, _ = shared_split()
    times = {k: [] for k in TIMED}
    for _ in range(rounds):
        for name, settings in TIMED.items():
            r = loop.fit(config(settings, 1, epochs=3), data, rows=rows, progress=False,
                         log=lambda *a, **k: None)
            times[name] += [h["seconds"] for h in r.history[1:]]
    base = np.median(times[next(iter(TIMED))])
    for name, t in times.items():
        print(f"{name:28s} {np.median(t):6.2f} s/epoch  {np.median(t) / base:5.2f}x  "
              f"(epochs: {', '.join(f'{x:.2f}' for x in t)})")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("train", "vote", "time-epochs"))
    p.add_argument("items", nargs="*", help="train: RECIPE_sSEED runs; vote: NAME=RUN,RUN*,...")
    p.add_argument("--out", default="/tmp/acc11")
    p.add_argument("--singles", action="store_true", help="vote: also each recipe's runs alone")
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_intermixed_args(argv)
    t = time.time()
    if a.what == "train":
        os.makedirs(a.out, exist_ok=True)
        train(a.out, a.items)
    elif a.what == "vote":
        vote(a.out, a.items, a.singles)
    else:
        time_epochs(a.rounds)
    print(f"({time.time() - t:.0f} s)")


if __name__ == "__main__":
    main()
