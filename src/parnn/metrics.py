"""Classification metrics from labels: accuracy, confusion matrix, a text report."""

from __future__ import annotations

import numpy as np


def accuracy(y_true, y_pred) -> float:
    """Fraction of equal labels; NaN for no samples."""
    y_true, y_pred = _labels(y_true, y_pred)
    return float(np.mean(y_true == y_pred)) if len(y_true) else float("nan")


def confusion_matrix(y_true, y_pred, n_classes) -> np.ndarray:
    """cm[i, j] = number of samples of true class i predicted as class j (int64)."""
    y_true, y_pred = _labels(y_true, y_pred)
    for y in (y_true, y_pred):
        # out-of-range labels would silently land in another cell of the flattened bincount
        if len(y) and (y.min() < 0 or y.max() >= n_classes):
            raise ValueError(f"labels must be in 0..{n_classes - 1}, got {y.min()}..{y.max()}")
    flat = np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes)
    return flat.reshape(n_classes, n_classes)


def per_class_accuracy(cm) -> np.ndarray:
    """Recall of each class (diagonal / row sum); NaN for a class with no samples."""
    cm = np.asarray(cm)
    support = cm.sum(axis=1)
    out = np.full(len(cm), np.nan)
    np.divide(np.diag(cm), support, out=out, where=support > 0)
    return out


def format_report(cm, class_names) -> str:
    """Overall accuracy, a per-class table, and the confusion matrix (columns by class index)."""
    cm = np.asarray(cm)
    if len(class_names) != len(cm):
        raise ValueError(f"{len(class_names)} class names for a {len(cm)}-class matrix")
    total = int(cm.sum())
    overall = np.trace(cm) / total if total else float("nan")
    recall = per_class_accuracy(cm)
    namew = max([len("class")] + [len(n) for n in class_names])
    lines = [f"accuracy: {overall:.4f} ({int(np.trace(cm))}/{total})", "",
             f"  # {'class':<{namew}}  {'samples':>7}  {'correct':>7}  {'recall':>6}"]
    for i, name in enumerate(class_names):
        lines.append(f"{i:>3} {name:<{namew}}  {int(cm[i].sum()):>7}  {int(cm[i, i]):>7}  "
                     f"{recall[i]:>6.4f}")
    w = max(3, len(str(int(cm.max()))) if cm.size else 1)
    lines += ["", "confusion matrix (rows = true class, columns = predicted class #):",
              " " * (4 + namew) + "".join(f" {j:>{w}}" for j in range(len(cm)))]
    for i, name in enumerate(class_names):
        lines.append(f"{i:>3} {name:<{namew}}" + "".join(f" {int(c):>{w}}" for c in cm[i]))
    return "\n".join(lines)


def _labels(y_true, y_pred):
    y_true, y_pred = np.asarray(y_true).ravel(), np.asarray(y_pred).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"{len(y_true)} true labels but {len(y_pred)} predictions")
    return y_true.astype(np.int64, copy=False), y_pred.astype(np.int64, copy=False)
