"""`parnn evaluate` and `parnn predict`: what a model file says about a test set, and about your
own pictures. Messages and output only; the model is parnn.run.api's Model, the pictures are
read by parnn.images (one file) and here (directories, .npy stacks).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

from parnn.core.model import soft_vote
from parnn.errors import ConfigError, DataError, ModelFileError
from parnn.paths import check_output_file, path_kind, shown

# What `predict DIR` reads from a directory (others are skipped).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".npy")


def outputs(model, X, path):
    """The model's output layer on X (an ensemble's: the soft vote, parnn.core.model.soft_vote),
    or ModelFileError if any of it is NaN or infinity: weights that overflow give no class."""
    with np.errstate(all="ignore"):
        out = soft_vote(net.output(X) for net in model.nets)
    if not np.isfinite(out).all():
        raise ModelFileError(f"{shown(path)}: the network's outputs are NaN or infinity (its "
                             "weights overflow): this model cannot classify anything")
    return out


# --- evaluate ----------------------------------------------------------------------------------

def evaluate(args, warn):
    from parnn import data as datamod
    from parnn import metrics
    from parnn.run.api import load

    if args.figure is not None:
        check_output_file(args.figure, "--figure", args.overwrite, reads=(args.model,))
    model = load(args.model)
    ds = datamod.load_dataset(args.dataset, args.data, model.dtype, 1, args.limit_test)
    sizes = model.spec.sizes
    if (sizes[0], sizes[-1]) != (ds.n_features, ds.n_classes):
        raise ModelFileError(f"{shown(args.model)}: the model takes {sizes[0]} inputs and gives "
                             f"{sizes[-1]} classes, {ds.name} has {ds.n_features} and "
                             f"{ds.n_classes}")
    same_dataset(model, ds, args, warn)
    pred = outputs(model, ds.X_test, args.model).argmax(axis=1)
    cm = metrics.confusion_matrix(ds.y_test, pred, ds.n_classes)
    if args.figure is not None:
        from parnn import plots

        plots.plot_confusion(cm, ds.class_names, args.figure,
                             f"{Path(args.model).name} on {len(ds.y_test)} {ds.name} test images")
    n_nets = len(model.nets)
    if args.json:
        precision, recall, f1 = metrics.precision_recall_f1(cm)
        print(json.dumps({
            "model": str(args.model), "networks": n_nets, "dataset": ds.name,
            "data": str(ds.source), "samples": int(cm.sum()),
            "accuracy": float(np.trace(cm) / cm.sum()),
            "macro": {"precision": _num(metrics.macro_average(precision)),
                      "recall": _num(metrics.macro_average(recall)),
                      "f1": _num(metrics.macro_average(f1))},
            "classes": [{"index": i, "name": name, "samples": int(cm[i].sum()),
                         "precision": _num(precision[i]), "recall": _num(recall[i]),
                         "f1": _num(f1[i])} for i, name in enumerate(ds.class_names)],
            "confusion_matrix": cm.tolist(),
            "figure": None if args.figure is None else str(args.figure)}))
        return
    print(f"model {shown(args.model)} ({n_nets} network{'s' if n_nets > 1 else ''}) "
          f"on {len(ds.y_test)} test images from {shown(ds.source)}")
    print(metrics.format_report(cm, ds.class_names))
    if args.figure is not None:
        print(f"confusion matrix figure: {shown(args.figure)}")


def same_dataset(model, ds, args, warn):
    """Refuse to score a model on another dataset than it was trained on (its class k is not the
    data's class k); warn when the test files differ from those its run read."""
    trained = model.meta.get("dataset")
    name = trained.get("name") if isinstance(trained, dict) else None
    from parnn.data import DATASETS

    if name in DATASETS and name != ds.name:
        raise ConfigError(f"{shown(args.model)} was trained on {name}, but this is {ds.name}: "
                          f"its classes are {name}'s ({', '.join(DATASETS[name].classes[:3])}, "
                          f"...), so the scores would mean nothing; pass --dataset {name}")
    names = list(model.class_names)
    if name in DATASETS and names != list(ds.class_names):
        raise ConfigError(f"{shown(args.model)}: its class names ({', '.join(names[:3])}, ...) "
                          f"are not {ds.name}'s ({', '.join(ds.class_names[:3])}, ...)")
    if name not in DATASETS:
        warn(f"{shown(args.model)} does not say which dataset it was trained on"
             + (f" ({shown(name)})" if isinstance(name, str) else "")
             + f": its classes are taken to be {ds.name}'s, in order")
        return
    digests = trained.get("sha256") if isinstance(trained.get("sha256"), dict) else {}
    differ = sorted(k for k in digests.keys() & ds.sha256.keys()
                    if k.startswith(("t10k", "test")) and digests[k] != ds.sha256[k])
    if differ:
        warn(f"the test files in {shown(ds.source)} ({', '.join(differ)}) differ from those the "
             f"model's training run read: the accuracy is on other data than its own test set")


def _num(v):
    return None if isinstance(v, float) and math.isnan(v) else float(v)


# --- predict -----------------------------------------------------------------------------------

def predict(args, error):
    """One line (or JSON object) per picture; a file that cannot be read gets its own error line
    (error(exception)) and the others are still predicted. Returns the exit status: 1 if any
    file failed."""
    from parnn.images import read_file
    from parnn.run.api import load, probabilities

    if args.top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {args.top_k}")
    model = load(args.model)
    names = model.class_names
    k = min(args.top_k, len(names))
    failed = 0
    for path in expand(args.images, error):
        if path is None:   # a directory that could not be listed, or held nothing to read
            failed += 1
            continue
        try:
            labels, X = read_file(path, model.n_features_in, model.dtype, args.invert)
        except DataError as e:
            error(e)
            failed += 1
            continue
        P = probabilities(outputs(model, X, args.model), model.spec.output)
        for label, p in zip(labels, P):
            top = np.argsort(-p, kind="stable")[:k]
            if args.json:
                ranked = [{"class": int(c), "name": names[c], "probability": float(p[c])}
                          for c in top]
                print(json.dumps({"file": label, **ranked[0], "top": ranked}), flush=True)
            else:
                print("\t".join([shown(label), *(f"{c}\t{shown(names[c])}\t{p[c]:.4f}"
                                                 for c in top)]), flush=True)
    return 1 if failed else 0


def expand(paths, error):
    """The files to read: each path as given, a directory as its picture files (sorted; see
    IMAGE_SUFFIXES), and None (after error(...)) for a directory with none or unreadable."""
    for p in paths:
        try:
            kind = path_kind(p, DataError)
        except DataError as e:
            error(e)
            yield None
            continue
        if kind != "dir":
            yield p   # the reader says what is wrong with it, if anything
            continue
        try:
            found = sorted(q for q in Path(p).iterdir()
                           if q.suffix.lower() in IMAGE_SUFFIXES
                           and path_kind(q, DataError) == "file")
        except (OSError, DataError) as e:
            error(DataError(f"{shown(p)}: cannot list it ({getattr(e, 'strerror', None) or e})"))
            yield None
            continue
        if not found:
            error(DataError(f"{shown(p)}: a directory with no picture files in it "
                            f"({', '.join(IMAGE_SUFFIXES)})"))
            yield None
        yield from found


def print_error(err):
    """One error line, whatever the message holds."""
    print(f"parnn: error: {shown(str(err))}", file=sys.stderr, flush=True)
