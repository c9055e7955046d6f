"""Figures, written as PNG with matplotlib's non-interactive backend (no display needed)."""

from __future__ import annotations

import io as _io


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path):
    """Render to memory first so the file on disk is written atomically."""
    from parnn.io import atomic_write_bytes

    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _figure().close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plot_history(history, path, title="training"):
    """Loss and accuracy per epoch, side by side."""
    plt = _figure()
    epochs = [r["epoch"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.plot(epochs, [r["loss"] for r in history], marker="o")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("training loss")
    ax2.plot(epochs, [r["train_acc"] for r in history], marker="o", label="train")
    ax2.plot(epochs, [r["test_acc"] for r in history], marker="o", label="test")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("accuracy")
    ax2.legend()
    from matplotlib.ticker import MaxNLocator

    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    save_png(fig, path)
