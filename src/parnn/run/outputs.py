"""What a run leaves behind in its output directory: model.safetensors (the network and all it
takes to trust and reuse it), history.json, history.csv and history.png, each written atomically
at the end. history.csv is also written while the run goes, a row per epoch (LiveHistory).
"""

from __future__ import annotations

import csv
from pathlib import Path

from parnn import __version__

# A history row's columns, in this order when present (fit's rows; distributed adds its own).
HISTORY_COLUMNS = ("epoch", "loss", "train_acc", "val_loss", "val_acc", "test_acc", "seconds",
                   "samples_per_s")
PREPROCESSING = {
    "pixels": {"input": "28x28 grayscale, row-major", "scale": "pixel / 255",
               "targets": "one-hot 0/1"},
    "features": {"input": "features", "scale": "none", "targets": "one-hot 0/1"},
}


def out_dir(cfg, out=None):
    """Where a run's files go: `out`, or runs/PRESET."""
    return Path(out) if out is not None else Path("runs") / cfg.preset


# The files of a run's output directory, by role.
NAMES = {"model": "model.safetensors", "history_json": "history.json",
         "history_csv": "history.csv", "plot": "history.png"}
FILES = tuple(NAMES.values())


def paths(out):
    out = Path(out)
    return {role: out / name for role, name in NAMES.items()}


def model_metadata(result, data, classes=None, inputs="pixels"):
    """Everything needed to trust and reuse a model file, beside its spec. classes: the label
    of each output (None: the class indices 0..K-1)."""
    n = len(data.class_names)
    return {
        "parnn_version": __version__,
        "config": result.config.to_dict(),
        "engine": result.engine,
        "threads": result.info.get("threads"),
        "threading_layer": result.info.get("threading_layer"),
        **{k: result.info[k] for k in ("path", "solo_batches") if k in result.info},
        "dataset": {"name": data.name, "sha256": data.sha256},
        "class_names": list(data.class_names),
        "classes": list(range(n)) if classes is None else classes.tolist(),
        "inputs": inputs,
        "preprocessing": PREPROCESSING[inputs],
        "history": result.history,
        "best_epoch": result.best_epoch,
    }


def history_columns(rows, test=False):
    """The CSV columns of these rows: HISTORY_COLUMNS present in any (test_acc too if test),
    then any other keys in order of first appearance."""
    keys = dict.fromkeys(k for r in rows for k in r)
    if test:
        keys["test_acc"] = None
    return [c for c in HISTORY_COLUMNS if c in keys] + \
        [k for k in keys if k not in HISTORY_COLUMNS]


class LiveHistory:
    """history.csv while a run goes: at the first epoch it is written whole (atomically: the
    rows a resumed run's checkpoint holds, then that epoch's), then each epoch appends its row
    and flushes, so `tail -f` follows the run. save_run rewrites it at the end. Nothing is
    written before the first epoch ends, so a run refused or diverging in epoch 1 leaves no
    file. test: the run has a test set (a test_acc column, filled where it was measured)."""

    def __init__(self, path, rows=(), test=False):
        self.path, self.rows, self.test = Path(path), [dict(r) for r in rows], test
        self.columns = None

    def append(self, row):
        """One epoch's row (OSError if the file cannot be written)."""
        from parnn import atomic

        if self.columns is None:
            self.rows.append(row)
            self.columns = history_columns(self.rows, self.test)
            atomic.atomic_write_csv(self.path, self.rows, self.columns)
            return
        with open(self.path, "a", newline="") as f:   # closing flushes it
            csv.DictWriter(f, self.columns, extrasaction="ignore").writerow(row)


def save_run(out, result, data):
    """The four files of a run in `out` (data: only its identity is read); returns their paths."""
    from parnn import atomic, io, plots

    files = paths(out)
    meta = model_metadata(result, data)
    meta["test_acc"] = result.test_acc
    io.save_model(files["model"], result.net, meta)
    atomic.atomic_write_json(files["history_json"], {"config": result.config.to_dict(),
                                                 "engine": result.engine, "info": result.info,
                                                 "history": result.history,
                                                 "test_acc": result.test_acc,
                                                 "best_epoch": result.best_epoch})
    test = result.test_acc is not None
    atomic.atomic_write_csv(files["history_csv"], result.history,
                        history_columns(result.history, test))
    plots.plot_history(result.history, files["plot"], title=f"parnn {result.config.preset}")
    return files
