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

from parnn.errors import ConfigError, DataError, ModelFileError
from parnn.paths import open_regular, path_kind, shown

# What `predict DIR` reads from a directory (others are skipped).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".npy")


def outputs(model, X, path):
    """The model's output layer on X (an ensemble's: the soft vote, as in parnn.distributed),
    or ModelFileError if any of it is NaN or infinity: weights that overflow give no class."""
    with np.errstate(all="ignore"):
        out = model.nets[0].output(X)
        for net in model.nets[1:]:
            out += net.output(X)
        if len(model.nets) > 1:
            out /= len(model.nets)
    if not np.isfinite(out).all():
        raise ModelFileError(f"{shown(path)}: the network's outputs are NaN or infinity (its "
                             "weights overflow): this model cannot classify anything")
    return out


# --- evaluate ----------------------------------------------------------------------------------

def evaluate(args, warn):
    from parnn import data as datamod
    from parnn import metrics
    from parnn.run.api import load

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
            labels, X = read_pictures(path, model.n_features_in, model.dtype, args.invert)
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


def read_pictures(path, n_in, dtype, invert):
    """(labels, (n, n_in) array) of one file: a picture or a 28x28 .npy (parnn.images), or a
    .npy stack (N, 28, 28) or (N, 784), labelled PATH[i]."""
    from parnn.images import load_images

    stack = _npy_stack_header(path, n_in) if Path(path).suffix.lower() == ".npy" else None
    if stack is None:
        return [str(path)], load_images([path], n_in, dtype, invert)
    X = _read_npy_stack(path, n_in, *stack)
    for i, img in enumerate(X):
        X[i] = _as_pixels(f"{shown(path)}[{i}]", img.reshape(-1), invert)
    return [f"{path}[{i}]" for i in range(len(X))], X.astype(dtype, copy=False)


def _npy_stack_header(path, n_in):
    """(shape, fortran order, dtype) if path is a readable .npy holding a stack of pictures of
    n_in plain numbers each; None for anything else (parnn.images reads it, or says why not)."""
    side = math.isqrt(n_in)
    try:
        with open_regular(path, DataError, "image file") as f:
            version = np.lib.format.read_magic(f)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0) else
                    np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read(f)
    except (DataError, ValueError, OSError, EOFError, SyntaxError, TypeError):
        return None
    plain = (not dtype.hasobject and dtype.fields is None and dtype.subdtype is None
             and dtype.kind in "biuf")
    stacked = ((len(shape) == 3 and tuple(shape[1:]) == (side, side))
               or (len(shape) == 2 and shape[1] == n_in and shape != (side, side)))
    return (shape, fortran, dtype) if plain and stacked and shape[0] >= 1 else None


def _read_npy_stack(path, n_in, shape, fortran, dtype):
    """The stack's values as (N, n_in) float64, its size checked against the file first."""
    import os

    need = math.prod(shape) * dtype.itemsize
    with open_regular(path, DataError, "image file") as f:
        version = np.lib.format.read_magic(f)
        (np.lib.format.read_array_header_1_0 if version == (1, 0) else
         np.lib.format.read_array_header_2_0)(f)
        left = os.fstat(f.fileno()).st_size - f.tell()
        if left < need:
            raise DataError(f"{shown(path)}: not a readable .npy array (truncated: {left} of "
                            f"{need} bytes)")
        data = f.read(need)
    a = np.frombuffer(data, dtype).reshape(shape, order="F" if fortran else "C")
    a = a.astype(np.float64).reshape(shape[0], n_in)
    if a.size and np.isfinite(a).all() and a.max() > 1.0:   # 0..255 pixels, as parnn.images
        a /= 255.0
    return a


def _as_pixels(label, img, invert):
    """One picture of a stack as parnn.images makes one: values in [0, 1], light on dark."""
    if not np.isfinite(img).all() or img.min() < 0 or img.max() > 1:
        raise DataError(f"{label}: pixel values must be in 0..255 (or 0..1 for .npy)")
    side = math.isqrt(len(img))
    square = img.reshape(side, side)
    border = np.concatenate([square[0], square[-1], square[:, 0], square[:, -1]]).mean()
    if invert == "yes" or (invert == "auto" and border > 0.5):
        img = 1.0 - img
    return img


def print_error(err):
    """One error line, whatever the message holds."""
    print(f"parnn: error: {shown(str(err))}", file=sys.stderr, flush=True)
