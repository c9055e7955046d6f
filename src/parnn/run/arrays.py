"""Arrays a caller hands in: inputs checked, labels turned into class indices, and the
validation split carved from the training set.

Every refusal is a ValueError that says what was expected, as scikit-learn's checks do: a
wrong value is never used silently (uint8 pixels are scaled, floats out of [0, 1] refused).
"""

from __future__ import annotations

import numpy as np

# parnn.data's images: 28x28, flattened row by row.
IMAGE_SHAPE = (28, 28)
# What a model expects of its inputs: "pixels" in [0, 1] (uint8 0..255 are scaled by 1/255,
# as the datasets are), or "features": any finite numbers, used as given.
INPUTS = ("pixels", "features")
# The validation split's own random stream, apart from the init (seed) and the order (seed + 1).
_SPLIT_STREAM = 104729


def check_inputs(X, n_features=None, dtype="float32", inputs="pixels", what="X",
                 keep_uint8=False):
    """X as a C-contiguous (n, n_features) array of dtype, or ValueError.

    Accepted: (n, n_features), and (n, 28, 28) images when n_features is 784 (or not fixed yet:
    training), flattened row by row. inputs="pixels": values in [0, 1]; uint8 is scaled by
    1/255; floats above 1 (0..255 pixels) or below 0 are refused. inputs="features": any
    finite numbers. NaN and infinity are always refused.
    keep_uint8: uint8 pixels are returned as they are (uint8, meaning x / 255), not as a float
    copy: for callers that scale them as they read them (training, predicting in chunks).
    """
    if inputs not in INPUTS:
        raise ValueError(f"inputs must be one of {', '.join(INPUTS)}, got {inputs!r}")
    X = np.asarray(X)
    if X.dtype == object:   # e.g. a pandas frame of mixed columns: numbers, or refused below
        try:
            X = X.astype(np.float64)
        except (TypeError, ValueError):
            pass
    want = f"(n, {n_features})" if n_features is not None else "(n, features)"
    if n_features in (None, 28 * 28):
        want += " or (n, 28, 28)"
    if X.dtype.kind not in "biuf":
        raise ValueError(f"{what} must hold numbers, got an array of {X.dtype}")
    if X.ndim == 3 and X.shape[1:] == IMAGE_SHAPE and n_features in (None, 28 * 28):
        X = X.reshape(len(X), 28 * 28)    # -1 cannot be inferred for 0 images
    if X.ndim != 2 or (n_features is not None and X.shape[1] != n_features):
        hint = " (one sample? pass X[None], or X.reshape(1, -1))" if X.ndim == 1 else ""
        raise ValueError(f"{what} has shape {X.shape}, expected {want}{hint}")
    if len(X) == 0 or X.shape[1] == 0:
        raise ValueError(f"{what} has shape {X.shape}: it needs at least one sample and one "
                         "feature")
    dtype = np.dtype(dtype)
    if X.dtype == np.uint8 and inputs == "pixels":
        if keep_uint8:
            return np.ascontiguousarray(X)
        out = np.empty(X.shape, dtype)
        np.divide(X, dtype.type(255), out=out)   # as parnn.data reads pixel files
        return out
    X = np.ascontiguousarray(X, dtype=dtype)
    # min and max find NaN (it propagates) and infinity without a temporary the size of X.
    lo, hi = X.min(), X.max()
    if not (np.isfinite(lo) and np.isfinite(hi)):
        bad = np.flatnonzero(~np.isfinite(X).all(axis=1))[0]
        raise ValueError(f"{what} contains NaN or infinity (first in sample {bad})")
    if inputs == "pixels" and (lo < 0 or hi > 1):
        scale = (" (0..255 pixels? pass them as uint8, which parnn scales, or divide by 255)"
                 if hi > 1 else "")
        # 9 digits: a float32 just above 1 must not print as 1
        raise ValueError(f"{what} has values in [{lo + 0:.9g}, {hi + 0:.9g}], expected pixel "
                         f"values in [0, 1]{scale}; for other inputs train with inputs='features'")
    return X


def encode_labels(y, classes=None, what="y"):
    """(class indices as int64, classes): y mapped through classes.

    Without classes, integer labels are the class indices themselves (classes 0..max(y)), and
    any other labels (strings, ...) are mapped through their sorted unique values.
    classes fixes the classes and their order (the columns of predict_proba)."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{what} has shape {y.shape}, expected (n,): one label per sample")
    indices = classes is None and y.dtype.kind in "iu" and len(y)
    if indices and y.min() < 0:
        raise ValueError(f"{what} holds the integer label {y.min()}: integer labels are class "
                         "indices 0..K-1; pass classes= to map other labels")
    if classes is None:
        classes = np.arange(int(y.max()) + 1) if indices else _unique(y, what)
    classes = np.asarray(classes)
    if classes.ndim != 1 or len(classes) < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {_few(classes.tolist())}")
    if indices:
        return y.astype(np.int64), classes
    order = np.argsort(classes, kind="stable")
    ranked = classes[order]
    if (ranked[1:] == ranked[:-1]).any():
        raise ValueError(f"classes must be distinct, got {_few(classes.tolist())}")
    try:
        at = np.clip(np.searchsorted(ranked, y), 0, len(ranked) - 1)
        unknown = np.flatnonzero(ranked[at] != y)
    except (TypeError, ValueError):   # labels and classes of types that do not compare
        raise ValueError(f"{what} holds labels of another type ({y.dtype}) than the classes "
                         f"({classes.dtype})") from None
    if unknown.size:
        i = int(unknown[0])
        raise ValueError(f"{what}[{i}] = {y[i:i + 1].tolist()[0]!r} is not one of the classes "
                         f"{_few(classes.tolist())}")
    return order[at].astype(np.int64), classes


def _unique(y, what):
    try:
        classes = np.unique(y)
    except TypeError:   # mixed types: str and int cannot be sorted together
        raise ValueError(f"{what} mixes labels of different types; use one type") from None
    if classes.dtype.kind == "f" and np.isnan(classes).any():
        raise ValueError(f"{what} contains NaN")
    return classes


def _few(values, n=10):
    if len(values) <= n:
        return repr(values)
    return f"[{', '.join(map(repr, values[:n]))}, ...] ({len(values)} in all)"


def validation_rows(y, fraction, seed, stratify=True):
    """(train rows, validation rows), each sorted: round(fraction * n) samples held out (at
    least 1, at most n - 1), drawn from the seed alone, so a resumed run carves the same split.

    stratify: each class gives its share of the validation set (largest remainders decide
    the rounding), so both sets keep the class proportions; else a plain random subset."""
    n = len(y)
    if n < 2:
        raise ValueError(f"a validation split needs at least 2 samples, got {n}")
    n_val = min(max(1, round(fraction * n)), n - 1)
    rng = np.random.default_rng([seed, _SPLIT_STREAM])
    perm = rng.permutation(n)
    if not stratify:
        val = perm[:n_val]
    else:
        grouped = perm[np.argsort(y[perm], kind="stable")]   # class by class, shuffled within
        counts = np.bincount(y)
        # n_val * counts / n per class, in integers: the floors, then one more for the classes
        # with the largest remainders (each has fewer than counts, so never more than it has)
        quota, remainder = np.divmod(counts * n_val, n)
        quota[np.argsort(-remainder, kind="stable")[:n_val - quota.sum()]] += 1
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        val = np.concatenate([grouped[s:s + q] for s, q in zip(starts, quota)])
    is_val = np.zeros(n, bool)
    is_val[val] = True
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)
