"""Members for an ensemble, and the ablation rows of docs/ACCURACY.md's third and fourth passes.

    # train runs, one after another; each keeps its validation and test probabilities
    nice -n 19 .venv/bin/python benchmarks/ensemble_members.py train --out /tmp/acc11 \\
        base_s1 base_s2 shift1_s1 deep_s1 q128w_s1 ...
    # soft-vote any subset offline (a vote is the mean of the stored probabilities)
    .venv/bin/python benchmarks/ensemble_members.py vote --out /tmp/acc11 --singles \\
        "plain=base*" "mixed=base_s1,base_s2,shift1_s1,shift1_s2"
    # ensemble selection on validation over the runs matching the patterns
    .venv/bin/python benchmarks/ensemble_members.py greedy --steps 12 "base_s*" "affCe60_s*"
    # test-time augmentation of stored runs (their weights), then voted as RUN~ or "affCe60*~"
    nice -n 19 .venv/bin/python benchmarks/ensemble_members.py tta affCe60_s1 affCe60_s2
    # seconds per epoch of the default recipe and its depth / batch variants (under the lock)
    flock /tmp/bench.lock env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE \\
        .venv/bin/python benchmarks/ensemble_members.py time-epochs

A run is RECIPE_sSEED: the `accurate` preset (or RECIPES' "_base") with the recipe's settings and
that seed. Every run is validated on the SAME 6,000 images (the stratified 10 % drawn from seed
1, as parnn.train(..., members=K) draws it for a whole ensemble), so any runs can be voted
together on it. OUT/RUN.json: the settings, the validation and test accuracy after every epoch
(the test set is scored every epoch: time to 0.89 is read off it), seconds, load average;
OUT/RUN_val.npy, OUT/RUN_test.npy: the final class probabilities (float32); OUT/RUN_params.npy:
the final weights (runs trained since the fourth pass). Before each run the script waits while
/tmp/quiet exists (someone timing on the shared cores).
"""

from __future__ import annotations

import argparse
import fnmatch
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
    # small affine transforms (--augment affine): "_affine" tries ranges other than
    # parnn.run.config.AFFINE's (the candidates it was chosen from, on validation)
    "affine": dict(augment="affine"),
    "affinee60": dict(augment="affine", epochs=60),
    "affA": dict(augment="affine", _affine=dict(shift=1.0, rotate=5.0, scale=0.05, subpixel=True)),
    "affB": dict(augment="affine", _affine=dict(shift=1.5, rotate=10.0, scale=0.1, subpixel=True)),
    "affC": dict(augment="affine", _affine=dict(shift=0.5, rotate=3.0, scale=0.03, subpixel=True)),
    "affAe60": dict(augment="affine", epochs=60, _affine=dict(shift=1.0, rotate=5.0,
                                                              scale=0.05, subpixel=True)),
    "affCe60": dict(augment="affine", epochs=60, _affine=dict(shift=0.5, rotate=3.0,
                                                              scale=0.03, subpixel=True)),
    # one-cycle-shaped: 30 % warm-up, to the default peak or to 3x it
    "oc1": dict(warmup_epochs=9),
    "oc3": dict(warmup_epochs=9, lr=3e-3),
    # wide members: 1024-512 with the affine transforms, 60 epochs
    "w1kaff60": dict(hidden=(1024, 512), augment="affine", epochs=60),
    "w2kaff60": dict(hidden=(2048, 1024), augment="affine", epochs=60),
    "w1kaff120": dict(hidden=(1024, 512), augment="affine", epochs=120),
    # the default network (512-256) trained as long as the best wide members
    "affinee120": dict(augment="affine", epochs=120),
}
TIMED = {"base (512-256, batch 128)": {}, "deep (512-256-128)": RECIPES["deep"],
         "batch 64": RECIPES["b64"], "batch 256": RECIPES["b256"],
         "modern 256-128": dict(hidden=(256, 128)),
         "modern 256-128, batch 256": dict(hidden=(256, 128), batch_size=256),
         "--augment shift1": RECIPES["shift1"], "--augment affine": RECIPES["affine"]}


def config(recipe, seed, **more):
    from parnn.run.config import make_config

    settings = dict(RECIPES[recipe] if isinstance(recipe, str) else recipe)
    settings.pop("_affine", None)                 # see affine_ranges
    return make_config(settings.pop("_base", "accurate"), seed=seed, threads=2,
                       **settings, **more)


def affine_ranges(recipe):
    """The ranges `--augment affine` takes in this recipe's run: parnn.run.config.AFFINE,
    replaced for the run by the recipe's "_affine" (a candidate), as a context manager."""
    import contextlib
    from types import MappingProxyType
    from unittest import mock

    from parnn.run import config as settings

    candidate = RECIPES[recipe].get("_affine")
    if candidate is None:
        return contextlib.nullcontext(settings.AFFINE)
    return mock.patch.object(settings, "AFFINE", MappingProxyType(candidate))


def wait_while_quiet():
    """Hold the next run while /tmp/quiet exists: someone is timing on the shared cores."""
    while os.path.exists("/tmp/quiet"):
        time.sleep(5)


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
        wait_while_quiet()
        load = os.getloadavg()[0]
        with affine_ranges(recipe) as ranges:
            r = loop.fit(config(recipe, int(seed)), data, rows=rows, validation=validation,
                         progress=False, log=lambda *a, **k: None, test_every_epoch=True)
            affine = dict(ranges) if "affine" in r.config.augment else None
        pv, pt = probabilities(r.net, validation), probabilities(r.net, test)
        np.save(f"{out}/{job}_val.npy", pv)
        np.save(f"{out}/{job}_test.npy", pt)
        np.save(f"{out}/{job}_params.npy", r.net.params)      # for test-time augmentation
        rec = dict(job=job, recipe=recipe, seed=int(seed), config=r.config.to_dict(),
                   affine=affine,
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


def stored(out, job, split):
    """A run's stored probabilities on split ("val" or "test"); "RUN~": under test-time
    augmentation (see tta)."""
    if job.endswith("~"):
        return np.load(f"{out}/{job[:-1]}_t{split}.npy")
    return np.load(f"{out}/{job}_{split}.npy")


def vote(out, groups, singles=False):
    from parnn.core.model import soft_vote

    yv, yt = np.load(f"{out}/y_val.npy"), np.load(f"{out}/y_test.npy")
    recs = {os.path.basename(p)[:-5]: json.load(open(p)) for p in glob.glob(f"{out}/*_s*.json")}

    def expand(body):          # "base*" = every seed of recipe base; "base*~" with TTA
        runs = []
        for part in body.split(","):
            tilde = "~" if part.endswith("~") else ""
            part = part.rstrip("~")
            runs += [j + tilde for j in
                     (sorted(k for k in recs if k.rsplit("_s", 1)[0] == part[:-1])
                      if part.endswith("*") else [part])]
        return runs

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
        pv = soft_vote(stored(out, j, "val") for j in jobs)     # as parnn votes
        pt = soft_vote(stored(out, j, "test") for j in jobs)
        print(f"{name:20s} {len(jobs):2d} members: vote val {np.mean(pv.argmax(1) == yv):.4f} "
              f"test {np.mean(pt.argmax(1) == yt):.4f}")


def greedy(out, pool, steps):
    """Ensemble selection on validation (Caruana et al. 2004): start from nothing, add the run
    of the pool (with replacement) whose addition gives the best validation vote, `steps`
    times; prints each step's vote on validation and, beside it, on test."""
    yv, yt = np.load(f"{out}/y_val.npy"), np.load(f"{out}/y_test.npy")
    runs = sorted(os.path.basename(p)[:-5] for p in glob.glob(f"{out}/*_s*.json")
                  if any(fnmatch.fnmatch(os.path.basename(p)[:-5], g) for g in pool))
    pv = {j: stored(out, j, "val").astype(np.float64) for j in runs}
    pt = {j: stored(out, j, "test").astype(np.float64) for j in runs}
    chosen, sv, st = [], 0.0, 0.0
    for step in range(1, steps + 1):
        best = max(runs, key=lambda j: (np.mean((sv + pv[j]).argmax(1) == yv), -runs.index(j)))
        chosen.append(best)
        sv, st = sv + pv[best], st + pt[best]
        print(f"{step:2d} + {best:14s} vote val {np.mean(sv.argmax(1) == yv):.4f} "
              f"test {np.mean(st.argmax(1) == yt):.4f}")
    return chosen


def tta_probabilities(net, X):
    """The mean of net's probabilities over each image and its 4 one-pixel shifts (up, down,
    left, right; zero fill): test-time augmentation, offline, not in the package."""
    from parnn.engines import scaled

    images = X.reshape(-1, 28, 28)
    total = net.forward(scaled(X, net.dtype))[-1].astype(np.float64)
    for axis, step in ((1, 1), (1, -1), (2, 1), (2, -1)):
        moved = np.roll(images, step, axis=axis)
        edge = [slice(None)] * 3
        edge[axis] = 0 if step == 1 else -1                # the row/column rolled round
        moved[tuple(edge)] = 0
        total += net.forward(scaled(moved.reshape(len(X), -1), net.dtype))[-1]
    return (total / 5).astype(np.float32)


def tta(out, jobs):
    """OUT/RUN_tval.npy, OUT/RUN_ttest.npy: each run's probabilities under test-time
    augmentation (its stored weights, RUN_params.npy); vote them as RUN~ (see vote)."""
    from parnn.core.model import MLP

    data, _, validation = shared_split()
    Xv, Xt = data.X_train[validation.rows], data.X_test
    for job in jobs:
        if os.path.exists(f"{out}/{job}_ttest.npy"):
            continue
        rec = json.load(open(f"{out}/{job}.json"))
        recipe = rec["recipe"]
        net = MLP(config(recipe, rec["seed"]).spec(), params=np.load(f"{out}/{job}_params.npy"))
        for name, X in (("tval", Xv), ("ttest", Xt)):
            p = np.concatenate([tta_probabilities(net, X[i:i + 2048])
                                for i in range(0, len(X), 2048)])
            np.save(f"{out}/{job}_{name}.npy", p)
        print(job, "tta done", flush=True)


def time_epochs(rounds, only=()):
    """Seconds per epoch on the 54,000 images: 3 epochs per variant, rounds interleaved, the
    median of epochs 2-3 (the first pays for warming caches) over the rounds. only: the
    variants whose names contain one of these words (the base variant always runs first)."""
    from parnn.run import train as loop

    data, rows, _ = shared_split()
    first = next(iter(TIMED))
    times = {k: [] for k in TIMED if k == first or not only or any(w in k for w in only)}
    for _ in range(rounds):
        for name in times:
            settings = TIMED[name]
            r = loop.fit(config(settings, 1, epochs=3), data, rows=rows, progress=False,
                         log=lambda *a, **k: None)
            times[name] += [h["seconds"] for h in r.history[1:]]
    base = np.median(times[first])
    for name, t in times.items():
        print(f"{name:28s} {np.median(t):6.2f} s/epoch  {np.median(t) / base:5.2f}x  "
              f"(epochs: {', '.join(f'{x:.2f}' for x in t)})")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("train", "vote", "greedy", "tta", "time-epochs"))
    p.add_argument("items", nargs="*", help="train: RECIPE_sSEED runs; vote: NAME=RUN,RUN*,...; "
                   "greedy: patterns of the runs to choose from (base_s*); tta: runs; "
                   "time-epochs: words of the variants to time (augment)")
    p.add_argument("--out", default="/tmp/acc11")
    p.add_argument("--singles", action="store_true", help="vote: also each recipe's runs alone")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=12, help="greedy: runs added to the vote")
    a = p.parse_intermixed_args(argv)
    t = time.time()
    if a.what == "train":
        os.makedirs(a.out, exist_ok=True)
        train(a.out, a.items)
    elif a.what == "vote":
        vote(a.out, a.items, a.singles)
    elif a.what == "greedy":
        greedy(a.out, a.items, a.steps)
    elif a.what == "tta":
        tta(a.out, a.items)
    else:
        time_epochs(a.rounds, a.items)
    print(f"({time.time() - t:.0f} s)")


if __name__ == "__main__":
    main()
