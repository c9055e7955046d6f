"""Figures, written as PNG with matplotlib's non-interactive backend (no display needed)."""

from __future__ import annotations

import io as _io


def _figure():
    import logging

    # With an unwritable HOME or MPLCONFIGDIR matplotlib logs warnings (and makes a temporary
    # cache); parnn writes PNGs only, which need neither: its messages are not the user's.
    logging.getLogger("matplotlib").setLevel(logging.ERROR)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path):
    """Render to memory first so the file on disk is written atomically."""
    from parnn.atomic import atomic_write_bytes

    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _figure().close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plot_history(history, path, title="training"):
    """Loss and accuracy per epoch, side by side (see history_figure)."""
    save_png(history_figure(history, title), path)


# What the accuracy panel draws, when a row has it: (key, label).
ACCURACIES = (("train_acc", "train"), ("val_acc", "validation"), ("test_acc", "test"))


def history_figure(history, title="training"):
    """The figure of a run's history rows (run/train.py's): training and validation loss on
    the left; train, validation and test accuracy on the right. A measure missing from a row
    (test_acc is scored at the end only, unless asked) is a gap; one measured once is a point.
    The epoch axis has whole epochs only, 1 to the last."""
    plt = _figure()
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in history]
    # constrained layout keeps the right panel's y label off the left panel
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5), layout="constrained")
    _series(ax1, epochs, history, "loss", "training")
    _series(ax1, epochs, history, "val_loss", "validation")
    ax1.set_ylabel("loss")
    for key, label in ACCURACIES:
        _series(ax2, epochs, history, key, label)
    ax2.set_ylabel("accuracy")
    for ax in (ax1, ax2):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        if epochs:   # half an epoch of margin: a 1-epoch run gets the tick 1 alone
            ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    return fig


def _series(ax, epochs, history, key, label):
    values = [r.get(key) for r in history]
    if all(v is None for v in values):
        return
    ys = [float("nan") if v is None else v for v in values]
    ax.plot(epochs, ys, marker="o", label=label)


def plot_confusion(cm, class_names, path, title="confusion matrix"):
    """The confusion matrix as a heat map: rows the true class, columns the predicted one, each
    row coloured by its share of the class's samples (so classes of any size compare), each
    cell labelled with its count."""
    import numpy as np

    plt = _figure()
    cm = np.asarray(cm)
    support = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, support, out=np.zeros(cm.shape), where=support > 0)
    k = len(cm)
    fig, ax = plt.subplots(figsize=(1.6 + 0.55 * k, 1.2 + 0.5 * k), layout="constrained")
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=7,
                    color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xticklabels([f"{j}" for j in range(k)])
    ax.set_yticklabels([f"{name} ({i})" for i, name in enumerate(class_names)], fontsize=8)
    ax.set_xlabel("predicted class #")
    ax.set_ylabel("true class")
    fig.colorbar(image, ax=ax, label="share of the true class")
    ax.set_title(title, fontsize=9)
    save_png(fig, path)


# --- parnn bench ---------------------------------------------------------------------------------
# series: {label: [(threads, value), ...]}; paper: {threads: seconds} from the paper's table.

PAPER_LABEL = "the paper's numbers (ITS machine, 1 epoch)"


def _threads_axis(ax, threads):
    """log2 thread axis with the measured and the paper's counts as ticks."""
    from matplotlib.ticker import NullFormatter

    ticks = sorted(set(threads))
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t) for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("threads")
    ax.grid(alpha=0.3, which="both")


def _log_y(ax, base=10):
    """Log y axis labelled with plain numbers (2, 5, 10, ... not 6 x 10^0)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log", base=base)
    if base == 10:
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _line_style(label):
    """Engines solid, the C reference dashed, peers dotted."""
    return "--" if label.startswith("C ") else ":" if label.startswith("peer ") else "-"


def plot_bench_time(series, paper, path, title):
    """Time per 60k epoch vs threads, one line per engine; with `paper`, its Figure 1 beside."""
    plt = _figure()
    fig, axes = plt.subplots(1, 2 if paper else 1, figsize=(11 if paper else 6, 4), squeeze=False)
    ax = axes[0][0]
    for label, pts in series.items():
        pts = sorted(pts)
        ax.plot([p for p, _ in pts], [t for _, t in pts], _line_style(label), marker="o",
                label=label)
    _log_y(ax)
    ax.set_ylabel("seconds per epoch of 60,000 samples")
    ax.set_title("this machine (measured)")
    _threads_axis(ax, [p for pts in series.values() for p, _ in pts])
    ax.legend(fontsize=8)
    if paper:
        ax2 = axes[0][1]
        ps = sorted(paper)
        ax2.plot(ps, [paper[p] for p in ps], "s-", color="grey", label=PAPER_LABEL)
        for p in ps:
            ax2.annotate(f"{paper[p]:g}", (p, paper[p]), textcoords="offset points",
                         xytext=(0, 6), ha="center", fontsize=7)
        ax2.set_ylabel("seconds")
        ax2.set_title("the paper's Figure 1 (its machine, not this one)")
        _threads_axis(ax2, ps)
        ax2.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    save_png(fig, path)


def plot_bench_speedup(series, paper, path, title):
    """Speedup over each line's own 1-thread time, the ideal p, and the paper's speedup."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    threads = [p for pts in series.values() for p, _ in pts]
    for label, pts in series.items():
        if pts:
            pts = sorted(pts)
            ax.plot([p for p, _ in pts], [s for _, s in pts], _line_style(label), marker="o",
                    label=label)
    if paper:
        ps = sorted(paper)
        ax.plot(ps, [paper[1] / paper[p] for p in ps], "s--", color="grey",
                label="the paper (ITS machine)")
        threads += ps
    top = max(threads or [1])
    ax.plot([1, top], [1, top], color="black", lw=0.8, label="ideal (speedup = threads)")
    _log_y(ax, 2)
    ax.set_ylabel("speedup over 1 thread")
    _threads_axis(ax, threads)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    save_png(fig, path)


def plot_bench_breakdown(rows, path, title, phases):
    """Stacked bars per (engine, threads): the profiled phases (each row has PHASE_s for each of
    `phases`); beside them the fastest measured run and the synchronisation alone (which the
    phases contain)."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(rows) + 2), 4))
    labels = [f"{r['engine']}\n{r['threads']}t" for r in rows]
    bottom = [0.0] * len(rows)
    for phase in phases:
        vals = [r[f"{phase}_s"] for r in rows]
        ax.bar(labels, vals, bottom=bottom, label=f"{phase} (profiled run)")
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.scatter(labels, [r["total_s"] for r in rows], marker="_", s=400, color="black",
               label="fastest run (not profiled)", zorder=3)
    ax.scatter(labels, [r["sync_s"] for r in rows], marker="v", color="red", zorder=3,
               label="fork/joins or barriers alone (empty, probed)")
    ax.set_ylabel("seconds per run")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(title, fontsize=9)
    save_png(fig, path)


def plot_bench_model(prediction, measured, paper, path, title, paper_fit=None):
    """Left: the model's predicted time (compute and overhead) per 60k epoch with the measured
    points. Right: its predicted speedup beside the paper's measured speedup (and the same model
    fitted to the paper's table, paper_fit = {threads: seconds})."""
    plt = _figure()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ps = [q["threads"] for q in prediction]
    ax1.plot(ps, [q["time_s"] for q in prediction], "o--", label="PREDICTED total")
    ax1.plot(ps, [q["compute_s"] for q in prediction], ":", label="predicted compute (serial + C/p)")
    ax1.plot(ps, [q["overhead_s"] for q in prediction], ":", label="predicted fork/join overhead")
    if measured:
        m = sorted(measured)
        ax1.plot([p for p, _ in m], [t for _, t in m], "ko",
                 label="measured, fastest run (this machine)")
    _log_y(ax1)
    ax1.set_ylabel("seconds per epoch of 60,000 samples")
    ax1.set_title("neuron engine: model fitted on this machine", fontsize=9)
    _threads_axis(ax1, ps)
    ax1.legend(fontsize=8)
    t1 = prediction[0]["time_s"]
    ax2.plot(ps, [t1 / q["time_s"] for q in prediction], "o--", label="PREDICTED, parnn neuron")
    pp = sorted(paper)
    ax2.plot(pp, [paper[1] / paper[p] for p in pp], "s-", color="grey",
             label="the paper, measured (ITS machine)")
    if paper_fit:
        fp = sorted(paper_fit)
        ax2.plot(fp, [paper[1] / paper_fit[p] for p in fp], "--", color="grey", lw=0.8,
                 label="the same model fitted to the paper's table")
    ax2.plot([1, max(ps)], [1, max(ps)], color="black", lw=0.8, label="ideal")
    _log_y(ax2, 2)
    ax2.set_ylabel("speedup over 1 thread")
    _threads_axis(ax2, ps + pp)
    ax2.legend(fontsize=8)
    fig.suptitle(title + " — predictions beyond the measured thread counts are a model, "
                 "not measurements", fontsize=9)
    save_png(fig, path)
