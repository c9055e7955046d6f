"""Classification metrics from labels: accuracy, confusion matrix, precision / recall / F1,
a text report."""

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


def precision_recall_f1(cm):
    """(precision, recall, F1) of each class from a confusion matrix (rows true, columns
    predicted); NaN where undefined: precision of a class never predicted, recall of a class
    with no samples, F1 where either is NaN or both are 0."""
    cm = np.asarray(cm, dtype=np.float64)
    tp, predicted, support = np.diag(cm), cm.sum(axis=0), cm.sum(axis=1)
    precision, recall, f1 = (np.full(len(cm), np.nan) for _ in range(3))
    np.divide(tp, predicted, out=precision, where=predicted > 0)
    np.divide(tp, support, out=recall, where=support > 0)
    both = precision + recall
    np.divide(2 * precision * recall, both, out=f1, where=both > 0)
    return precision, recall, f1


def macro_average(values) -> float:
    """The mean over the classes where the value is defined (NaN if none is)."""
    values = np.asarray(values, dtype=np.float64)
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if len(defined) else float("nan")


def format_report(cm, class_names) -> str:
    """Overall accuracy, a per-class table (precision, recall, F1) with their macro averages,
    and the confusion matrix (columns by class index)."""
    cm = np.asarray(cm)
    if len(class_names) != len(cm):
        raise ValueError(f"{len(class_names)} class names for a {len(cm)}-class matrix")
    total = int(cm.sum())
    overall = np.trace(cm) / total if total else float("nan")
    precision, recall, f1 = precision_recall_f1(cm)
    namew = max([len("class")] + [len(n) for n in class_names])
    lines = [f"accuracy: {overall:.4f} ({int(np.trace(cm))}/{total})", "",
             f"  # {'class':<{namew}}  {'samples':>7}  {'correct':>7}  {'precision':>9}  "
             f"{'recall':>6}  {'F1':>6}"]
    for i, name in enumerate(class_names):
        lines.append(f"{i:>3} {name:<{namew}}  {int(cm[i].sum()):>7}  {int(cm[i, i]):>7}  "
                     f"{precision[i]:>9.4f}  {recall[i]:>6.4f}  {f1[i]:>6.4f}")
    lines.append(f"    {'macro average':<{namew + 18}}  {macro_average(precision):>9.4f}  "
                 f"{macro_average(recall):>6.4f}  {macro_average(f1):>6.4f}")
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
