"""The command line: argument parsing and messages only, no math.

Every user mistake ends as one line `parnn: error: ...` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from parnn import __version__
from parnn.errors import ParnnError


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (what was wrong, where to look)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _int_list(text):
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 256,128, got {text!r}")
    return values


def _batch_size(text):
    if text == "full":
        return "full"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'full', got {text!r}")


def _add_data_args(p):
    p.add_argument("--data", metavar="DIR", help="dataset directory (IDX .gz/raw files or Kaggle "
                   "CSVs); default: $PARNN_DATA, /usr/share/datasets/DATASET, the user cache")
    p.add_argument("--dataset", default="fashion-mnist", choices=("fashion-mnist", "mnist"))


def build_parser():
    from parnn.train import PRESETS, DEFAULT_PRESET

    top = Parser(prog="parnn", description="Train feedforward neural networks on Fashion-MNIST "
                 "in parallel (per-neuron threads, Hogwild, mini-batch BLAS, MPI).")
    top.add_argument("--version", action="version", version=f"parnn {__version__}")
    sub = top.add_subparsers(dest="command", required=True, parser_class=Parser)

    t = sub.add_parser("train", help="train a network and report its test accuracy",
                       description="Train a network. A preset gives every setting; any flag "
                       "overrides it. paper = the paper's system (tanh, MSE, per-sample SGD, "
                       "float64); modern = ReLU, softmax cross-entropy, Adam, mini-batches, float32.")
    t.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET,
                   help=f"default: {DEFAULT_PRESET}")
    t.add_argument("--hidden", type=_int_list, help="hidden layer sizes, e.g. 256,128")
    t.add_argument("--activation", help="hidden activation: tanh, sigmoid, relu")
    t.add_argument("--output", help="output activation: tanh, sigmoid, softmax")
    t.add_argument("--loss", help="mse or cross_entropy")
    t.add_argument("--init", help="paper (U[0,1), saturates tanh), xavier, he")
    t.add_argument("--dtype", help="float32 or float64")
    t.add_argument("--optimizer", help="sgd, momentum, adam")
    t.add_argument("--lr", type=float, help="learning rate")
    t.add_argument("--momentum", type=float, help="momentum coefficient (optimizer momentum)")
    t.add_argument("--batch-size", type=_batch_size,
                   help="1 = per-sample SGD (the paper's code), N = mini-batch, full = full-batch GD")
    t.add_argument("--epochs", type=int)
    t.add_argument("--seed", type=int)
    t.add_argument("--engine", help="numpy, serial, neuron, hogwild, batch, or auto (default)")
    t.add_argument("--threads", type=int, help="threads for Numba and BLAS (default: all cores)")
    t.add_argument("--limit-train", type=int, metavar="N", help="train on the first N samples only")
    t.add_argument("--limit-test", type=int, metavar="N", help="test on the first N samples only")
    t.add_argument("--out", type=Path, metavar="DIR",
                   help="where the model, history and plot go (default: runs/PRESET)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_data_args(t)

    e = sub.add_parser("evaluate", help="accuracy, per-class accuracy and confusion matrix of a model")
    e.add_argument("model", type=Path)
    e.add_argument("--limit-test", type=int, metavar="N")
    _add_data_args(e)

    p = sub.add_parser("predict", help="classify your own images (PNG/JPEG, or .npy arrays)")
    p.add_argument("model", type=Path)
    p.add_argument("images", type=Path, nargs="+")
    p.add_argument("--invert", choices=("auto", "yes", "no"), default="auto",
                   help="Fashion-MNIST is light clothing on black; auto inverts images whose "
                   "border is light")

    d = sub.add_parser("data", help="find, describe or download the dataset")
    dsub = d.add_subparsers(dest="data_command", required=True, parser_class=Parser)
    f = dsub.add_parser("fetch", help="download the four IDX files into the user cache, verified")
    f.add_argument("--dataset", default="fashion-mnist", choices=("fashion-mnist", "mnist"))
    f.add_argument("--dest", type=Path, metavar="DIR", help="default: the user cache")
    i = dsub.add_parser("info", help="where the data is, counts, classes, checksums")
    _add_data_args(i)
    return top


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args) or 0
    except ParnnError as err:
        print(f"parnn: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("parnn: interrupted", file=sys.stderr)
        return 130


# --- commands ----------------------------------------------------------------------------------

def cmd_train(args):
    from parnn import data as datamod
    from parnn import train

    overrides = {k: getattr(args, k) for k in (
        "hidden", "activation", "output", "loss", "init", "dtype", "optimizer", "lr", "momentum",
        "batch_size", "epochs", "seed", "engine", "threads")}
    cfg = train.make_config(args.preset, **overrides)
    _check_limits(args)
    out = args.out or Path("runs") / cfg.preset
    ds = datamod.load_dataset(args.dataset, args.data, cfg.dtype, args.limit_train, args.limit_test)
    result = train.fit(cfg, ds, progress=not args.no_progress)
    paths = train.save_run(out, result, ds)
    last = result.history[-1]
    print(f"test accuracy {last['test_acc']:.4f} after {len(result.history)} epoch(s); "
          f"model saved to {paths['model']}")


def _check_limits(args):
    from parnn.errors import ConfigError

    for name in ("limit_train", "limit_test"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {v}")


def cmd_evaluate(args):
    from parnn import data as datamod
    from parnn import io, metrics
    from parnn.train import evaluate

    _check_limits(args)
    nets, meta = io.load_any(args.model)
    ds = datamod.load_dataset(args.dataset, args.data, nets[0].spec.dtype, 1, args.limit_test)
    from parnn.distributed import combine_outputs

    if len(nets) == 1:
        pred, _ = evaluate(nets[0], ds.X_test, ds.y_test)
    else:
        pred = combine_outputs([n.output(ds.X_test) for n in nets], "soft").argmax(1)
    cm = metrics.confusion_matrix(ds.y_test, pred, len(ds.class_names))
    print(f"model {args.model} ({len(nets)} network{'s' if len(nets) > 1 else ''}) "
          f"on {len(ds.y_test)} test images from {ds.source}")
    print(metrics.format_report(cm, ds.class_names))


def cmd_predict(args):
    from parnn import io
    from parnn.images import load_images

    nets, meta = io.load_any(args.model)
    names = meta.get("class_names") or [str(i) for i in range(nets[0].spec.sizes[-1])]
    X = load_images(args.images, nets[0].spec.sizes[0], nets[0].spec.dtype, args.invert)
    outs = [n.output(X) for n in nets]
    from parnn.distributed import combine_outputs

    out = outs[0] if len(outs) == 1 else combine_outputs(outs, "soft")
    for path, row in zip(args.images, out):
        k = int(row.argmax())
        print(f"{path}\t{k}\t{names[k]}")


def cmd_data(args):
    from parnn import data as datamod

    if args.data_command == "fetch":
        path = datamod.fetch(args.dataset, args.dest)
        print(f"{args.dataset} is in {path}")
    else:
        ds = datamod.load_dataset(args.dataset, args.data)
        print(datamod.describe(ds))


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict, "data": cmd_data}


if __name__ == "__main__":
    sys.exit(main())
