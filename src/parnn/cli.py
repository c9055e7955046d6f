"""The command line: argument parsing and messages only, no math.

Every user mistake ends as one line `parnn: error: ...` on stderr and exit status 2; SIGINT or
SIGTERM during training ends as one line too (after a checkpoint), with status 128 + signal.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
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


def _names(text):
    return tuple(v.strip() for v in text.split(",") if v.strip())


def _add_data_args(p, dataset="fashion-mnist"):
    p.add_argument("--data", metavar="DIR", help="dataset directory (IDX .gz/raw files or Kaggle "
                   "CSVs); default: $PARNN_DATA, /usr/share/datasets/DATASET, the user cache")
    p.add_argument("--dataset", default=dataset, choices=("fashion-mnist", "mnist"),
                   help="default: fashion-mnist")


def _text(value):
    """A setting's value as a flag takes it."""
    if value is None:
        return "off"
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _setting_adder(presets):
    """add(group, flag, ...): the flag of a TrainConfig setting, its help ending with the
    value each preset gives it."""
    def add(group, flag, help, **kw):
        name = flag[2:].replace("-", "_")
        values = {p: _text(getattr(cfg, name)) for p, cfg in presets.items()}
        shown = (f"every preset: {next(iter(values.values()))}" if len(set(values.values())) == 1
                 else "; ".join(f"{p}: {v}" for p, v in values.items()))
        group.add_argument(flag, help=f"{help} ({shown})".replace("%", "%%"), **kw)
    return add


def build_parser():
    from parnn.engines import available
    from parnn.run.config import PRESETS, DEFAULT_PRESET

    top = Parser(prog="parnn", description="Train feedforward neural networks on Fashion-MNIST "
                 "in parallel (per-neuron threads, Hogwild, mini-batch BLAS, MPI).")
    top.add_argument("--version", action="version", version=f"parnn {__version__}")
    sub = top.add_subparsers(dest="command", required=True, parser_class=Parser)

    t = sub.add_parser("train", help="train a network and report its test accuracy",
                       description="Train a network. A preset gives every setting; any flag "
                       "overrides it. paper = the paper's system (tanh, MSE, per-sample SGD, "
                       "float64); modern = ReLU, softmax cross-entropy, Adam, mini-batches, "
                       "float32. Each setting's help ends with its value in each preset; "
                       "--show-config prints the settings a run would use.")
    # Defaults of None here and for --dataset: --resume must tell a flag given from a default.
    t.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help=f"default: {DEFAULT_PRESET}")
    t.add_argument("--show-config", action="store_true",
                   help="print the resolved settings (preset, flags, or a --resume "
                   "checkpoint's) and exit without training")
    t.add_argument("--resume", type=Path, metavar="DIR",
                   help="continue the run whose checkpoints are in DIR (or DIR/checkpoints) with "
                   "its saved settings; --epochs may extend it")
    _setting = _setting_adder(PRESETS)
    m = t.add_argument_group("model")
    _setting(m, "--hidden", type=_int_list, metavar="N,N", help="hidden layer sizes")
    _setting(m, "--activation", metavar="NAME", help="hidden activation: tanh, sigmoid, relu")
    _setting(m, "--output", metavar="NAME", help="output activation: tanh, sigmoid, softmax")
    _setting(m, "--loss", metavar="NAME", help="mse or cross_entropy")
    _setting(m, "--init", metavar="NAME", help="paper (U[0,1), saturates tanh), xavier, he")
    _setting(m, "--dtype", metavar="NAME", help="float32 or float64")
    r = t.add_argument_group("training")
    _setting(r, "--optimizer", metavar="NAME", help="sgd, momentum, adam")
    _setting(r, "--lr", type=float, help="learning rate")
    _setting(r, "--lr-schedule", metavar="NAME",
             help="constant, or cosine (decays lr towards 0 over the epochs)")
    _setting(r, "--momentum", type=float, help="momentum coefficient (optimizer momentum)")
    _setting(r, "--batch-size", type=_batch_size, metavar="N|full",
             help="1 = per-sample SGD (the paper's code), N = mini-batch, full = full-batch GD")
    _setting(r, "--epochs", type=int, help="passes over the training set")
    _setting(r, "--seed", type=int, help="seeds the init, the sample order and the validation "
             "split: the same seed, the same run")
    _setting(r, "--validation-split", type=float, metavar="FRACTION",
             help="hold out this fraction of the training set (stratified by class, drawn from "
             "the seed) and report its loss and accuracy after every epoch; 0 = none")
    _setting(r, "--early-stopping", type=int, metavar="PATIENCE",
             help="stop after PATIENCE epochs without a lower validation loss and keep the "
             "weights of the epoch with the lowest (needs a validation split)")
    _setting(r, "--engine", metavar="NAME",
             help=f"{', '.join(available())}, or auto (serial for per-sample SGD, else batch)")
    r.add_argument("--threads", type=int, help="threads for Numba and BLAS (default: all cores)")
    r.add_argument("--test-every-epoch", action="store_true",
                   help="score the test set after every epoch too (default: once, at the end, "
                   "on the weights returned: the test set never steers training)")
    d = t.add_argument_group("data")
    _add_data_args(d, dataset=None)
    d.add_argument("--limit-train", type=int, metavar="N", help="train on the first N samples only")
    d.add_argument("--limit-test", type=int, metavar="N", help="test on the first N samples only")
    o = t.add_argument_group("output")
    o.add_argument("--out", type=Path, metavar="DIR",
                   help="where the model, history and plot go (default: runs/PRESET); "
                   "history.csv gains a row after every epoch")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    o.add_argument("--checkpoint-dir", type=Path, metavar="DIR",
                   help="where checkpoints go (default: OUT/checkpoints); one is written after "
                   "every epoch, every --checkpoint-every steps, and on Ctrl-C or SIGTERM")
    o.add_argument("--checkpoint-every", type=int, metavar="N",
                   help="also checkpoint every N optimizer steps (at the next boundary of the "
                   "chunks of batches handed to the engine)")
    g = t.add_argument_group("distributed", "under `mpiexec -n K` (docs/MPI.md)")
    g.add_argument("--distributed", choices=("ensemble", "allreduce"),
                   help="ensemble = K networks on K shards, voted; allreduce = one network, "
                   "every batch split over K ranks")
    g.add_argument("--shards", choices=("disjoint", "bootstrap"),
                   help="ensemble members' training data: disjoint parts (default) or "
                   "bootstrap samples of n/K")

    e = sub.add_parser("evaluate", help="accuracy, per-class accuracy and confusion matrix of a model")
    e.add_argument("model", type=Path, help="a model or ensemble file (model.safetensors)")
    e.add_argument("--limit-test", type=int, metavar="N", help="the first N test images only")
    _add_data_args(e)

    p = sub.add_parser("predict", help="classify your own images (PNG/JPEG, or .npy arrays)")
    p.add_argument("model", type=Path, help="a model or ensemble file (model.safetensors)")
    p.add_argument("images", type=Path, nargs="+", help="image files: PNG, JPEG or .npy")
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

    from parnn.bench import options as bench_options

    b = sub.add_parser("bench", help="time engines x thread counts (and peers, the C reference)",
                       description="Time every engine at every thread count on the paper's "
                       "workload (784-256-128-10 tanh, MSE, per-sample SGD, float64) or the "
                       "modern one (ReLU, softmax CE, Adam, batch 128, float32); print the "
                       "paper's table per engine; write CSV, JSON and PNG figures. Run it under "
                       "`flock /tmp/bench.lock` on a shared machine.")
    bench_options.add_arguments(b)        # one argument per field of bench.Options
    return top


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args) or 0
    except ParnnError as err:
        print(f"parnn: error: {err}", file=sys.stderr)
        return getattr(err, "exit_status", 2)  # checkpoint.Interrupted: 128 + the signal
    except MemoryError as err:  # e.g. --hidden 1000000000: a user mistake, not a bug
        print(f"parnn: error: out of memory ({' '.join(str(err).split()) or 'MemoryError'})",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("parnn: interrupted", file=sys.stderr)
        return 130


# --- commands ----------------------------------------------------------------------------------

def cmd_train(args):
    from dataclasses import fields

    from parnn.errors import ConfigError
    from parnn.run import config, session

    _check_limits(args)
    opts = session.RunOptions(dataset=args.dataset, data=args.data, limit_train=args.limit_train,
                              limit_test=args.limit_test, out=args.out,
                              checkpoint_dir=args.checkpoint_dir,
                              checkpoint_every=args.checkpoint_every,
                              progress=not args.no_progress,
                              test_every_epoch=args.test_every_epoch)
    if args.distributed and (args.resume or args.checkpoint_dir or args.checkpoint_every):
        raise ConfigError("--resume, --checkpoint-dir and --checkpoint-every do not work with "
                          "--distributed yet")
    if args.distributed and (args.validation_split or args.early_stopping
                             or args.test_every_epoch):
        raise ConfigError("--validation-split, --early-stopping and --test-every-epoch do not "
                          "work with --distributed yet")
    if args.shards is not None and not args.distributed:
        raise ConfigError("--shards only applies to --distributed ensemble (each member's share "
                          "of the training set)")
    # Every setting has a flag of its name; None = not given (the preset's or the checkpoint's).
    settings = {f.name: getattr(args, f.name) for f in fields(config.TrainConfig)}
    if args.resume is not None:
        if args.show_config:
            return _show_config(session.resumed(args.resume, opts, settings, warn=_warn)[2])
        result, paths = session.resume(args.resume, opts, settings, warn=_warn)
    else:
        cfg = config.make_config(settings.pop("preset") or config.DEFAULT_PRESET, **settings)
        if args.show_config:
            return _show_config(cfg)
        if args.distributed:  # every MPI rank runs this; mpi4py is imported only there
            # The distributed runs train on the whole training set: say so in their files.
            return _train_distributed(args, replace(cfg, validation_split=0.0))
        result, paths = session.start(cfg, opts)
    kept = f" (early stopping: the weights of epoch {result.best_epoch})" \
        if result.best_epoch is not None and result.best_epoch != len(result.history) else ""
    print(f"test accuracy {result.test_acc:.4f} after {len(result.history)} epoch(s){kept}; "
          f"model saved to {paths['model']}")


def _show_config(cfg):
    """Each setting and its value, as the flags take them."""
    width = max(len(k) for k in cfg.to_dict())
    for k, v in cfg.to_dict().items():
        print(f"{k.replace('_', '-'):<{width}}  {_text(tuple(v) if isinstance(v, list) else v)}")


def _train_distributed(args, cfg):
    from parnn import distributed

    opts = distributed.DistributedOptions(
        mode=args.distributed, shards=args.shards, dataset=args.dataset or "fashion-mnist",
        data=args.data, limit_train=args.limit_train, limit_test=args.limit_test, out=args.out,
        threads=args.threads, progress=not args.no_progress)
    return distributed.train(cfg, opts)


def _warn(message):
    print(f"parnn: warning: {message}", file=sys.stderr)


def _check_limits(args):
    from parnn.errors import ConfigError

    for name in ("limit_train", "limit_test"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {v}")


def cmd_evaluate(args):
    from parnn import data as datamod
    from parnn import io, metrics
    from parnn.run.train import evaluate

    _check_limits(args)
    nets, meta = io.load_any(args.model)
    ds = datamod.load_dataset(args.dataset, args.data, nets[0].spec.dtype, 1, args.limit_test)
    sizes = nets[0].spec.sizes
    if (sizes[0], sizes[-1]) != (ds.n_features, ds.n_classes):
        from parnn.errors import ModelFileError

        raise ModelFileError(f"{args.model}: the model takes {sizes[0]} inputs and gives "
                             f"{sizes[-1]} classes, {ds.name} has {ds.n_features} and "
                             f"{ds.n_classes}")
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
    names = meta.get("class_names")
    n_out = nets[0].spec.sizes[-1]
    if not (isinstance(names, list) and len(names) == n_out and all(isinstance(n, str) for n in names)):
        names = [str(i) for i in range(n_out)]  # a model saved without (usable) class names
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


def cmd_bench(args):
    from parnn.io import check_output_dir
    from parnn import bench

    opts = bench.Options.from_namespace(args)
    check_output_dir(opts.out, "--out")
    bench.run(opts)


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict, "data": cmd_data,
            "bench": cmd_bench}


if __name__ == "__main__":
    sys.exit(main())
