"""`parnn`'s argument parser: every subcommand and flag, with its help. A usage mistake is a
UsageError (one line), printed by parnn.cli.main."""

from __future__ import annotations

import argparse
from pathlib import Path

from parnn import __version__
from parnn.errors import ParnnError


class UsageError(ParnnError):
    """argparse's complaint about the command line; `prog` is the (sub)command's name."""

    def __init__(self, prog, message):
        super().__init__(f"{message} (see '{prog} --help')")
        self.prog = prog


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (what was wrong, where to look), printed by
    main (which, under an MPI launcher, lets rank 0 say it for every rank)."""

    def error(self, message):
        raise UsageError(self.prog, message)


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


class _Model(argparse.Action):
    """--model cnn sets --layers to the default CNN unless --layers is given (in any order);
    --model mlp leaves --layers unset, so the preset's MLP trains."""

    def __call__(self, parser, namespace, values, option_string=None):
        from parnn.run.config import CNN_LAYERS

        if values == "cnn" and getattr(namespace, "layers", None) is None:
            namespace.layers = CNN_LAYERS


def _names(text):
    return tuple(v.strip() for v in text.split(",") if v.strip())


def _add_data_args(p, dataset="fashion-mnist"):
    p.add_argument("--data", metavar="DIR", help="dataset directory (IDX .gz/raw files or Kaggle "
                   "CSVs); default: $PARNN_DATA, /usr/share/datasets/DATASET, the user cache")
    p.add_argument("--dataset", default=dataset, choices=("fashion-mnist", "mnist"),
                   help="default: fashion-mnist")


def show_value(value):
    """A setting's value as a flag takes it."""
    if value is None:
        return "off"
    if value == "":
        return '""'           # an empty --layers: none, the MLP of --hidden
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _setting_adder(presets):
    """add(group, flag, ...): the flag of a TrainConfig setting, its help ending with the
    value each preset gives it."""
    def add(group, flag, help, **kw):
        name = flag[2:].replace("-", "_")
        values = {p: show_value(getattr(cfg, name)) for p, cfg in presets.items()}
        shown = (f"every preset: {next(iter(values.values()))}" if len(set(values.values())) == 1
                 else "; ".join(f"{p}: {v}" for p, v in values.items()))
        group.add_argument(flag, help=f"{help} ({shown})".replace("%", "%%"), **kw)
    return add


def build_parser():
    from parnn.engines import available
    from parnn.run.config import AFFINE, CNN_LAYERS, PRESETS, DEFAULT_PRESET
    from parnn.run.members import MEMBER_RECIPES

    top = Parser(prog="parnn", description="Train feedforward neural networks on Fashion-MNIST "
                 "in parallel (per-neuron threads, Hogwild, mini-batch BLAS, MPI).")
    top.add_argument("--version", action="version", version=f"parnn {__version__}")
    # Not required: bare `parnn` prints this help (main), not argparse's internal names.
    sub = top.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    t = sub.add_parser("train", help="train a network and report its test accuracy",
                       description="Train a network. A preset gives every setting; any flag "
                       "overrides it. paper = the paper's system (tanh, MSE, per-sample SGD, "
                       "float64); modern = ReLU, softmax cross-entropy, Adam, mini-batches, "
                       "float32; accurate (the default) = modern, 512-256 wide, 30 epochs, "
                       "label smoothing, AdamW decay, warm-up. Each setting's help ends with its value in each preset; "
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
    m.add_argument("--model", choices=("mlp", "cnn"), action=_Model,
                   help="mlp: dense layers of --hidden (default); cnn: the layer list "
                   f"{CNN_LAYERS} (a --layers given wins)")
    _setting(m, "--layers", metavar="LIST",
             help="a layer list instead of --hidden, e.g. conv32:3,pool,conv64:3,pool,dense128: "
             "convC:K (C channels, KxK kernels, padding same; convC:K:valid without padding), "
             "pool (2x2 max), denseN; the output layer follows it; engine batch or numpy")
    _setting(m, "--activation", metavar="NAME", help="hidden activation: tanh, sigmoid, relu")
    _setting(m, "--output", metavar="NAME", help="output activation: tanh, sigmoid, softmax")
    _setting(m, "--loss", metavar="NAME", help="mse or cross_entropy")
    _setting(m, "--init", metavar="NAME", help="paper (U[0,1), saturates tanh), xavier, he")
    _setting(m, "--dtype", metavar="NAME", help="float32 or float64")
    r = t.add_argument_group("training")
    _setting(r, "--optimizer", metavar="NAME", help="sgd, momentum, adam")
    _setting(r, "--lr", type=float, help="learning rate")
    _setting(r, "--lr-schedule", metavar="NAME",
             help="constant, cosine (decays lr towards 0 over the epochs), or warmup-cosine "
             "(rises linearly over --warmup-epochs, then the cosine over the rest)")
    _setting(r, "--warmup-epochs", type=int, metavar="N",
             help="epochs of linear warm-up of the learning rate (lr schedule warmup-cosine)")
    _setting(r, "--momentum", type=float, help="momentum coefficient (optimizer momentum)")
    _setting(r, "--weight-decay", type=float, metavar="LAMBDA",
             help="AdamW's decoupled weight decay: every step also shrinks the weights by "
             "lr * LAMBDA (optimizer adam); 0 = off")
    _setting(r, "--batch-size", type=_batch_size, metavar="N|full",
             help="1 = per-sample SGD (the paper's code), N = mini-batch, full = full-batch GD")
    _setting(r, "--epochs", type=int, help="passes over the training set")
    _setting(r, "--seed", type=int, help="seeds the init, the sample order and the validation "
             "split: the same seed, the same run")
    _setting(r, "--augment", metavar="NAME",
             help="transform each training batch on the fly, drawn from the seed: none, "
             "shift1, shift2 (whole-pixel shifts of up to 1 or 2 pixels), flip (left-right, "
             "probability 1/2), shift1+flip, shift2+flip, affine (per image a rotation of up "
             f"to {AFFINE['rotate']:g} degrees, a zoom of up to {100 * AFFINE['scale']:g} "
             f"percent and a shift of up to {AFFINE['shift']:g} pixel, bilinear); mini-batch "
             "engines only")
    _setting(r, "--dropout", type=float, metavar="RATE",
             help="while training, zero each hidden unit with probability RATE and scale the "
             "rest by 1/(1-RATE), masks drawn from the seed; 0 = off; mini-batch engines only")
    _setting(r, "--label-smoothing", type=float, metavar="EPS",
             help="train cross-entropy on targets (1 - EPS) one-hot + EPS / classes; 0 = off")
    _setting(r, "--validation-split", type=float, metavar="FRACTION",
             help="hold out this fraction of the training set (stratified by class, drawn from "
             "the seed) and report its loss and accuracy after every epoch; 0 = none")
    _setting(r, "--early-stopping", type=int, metavar="PATIENCE",
             help="stop after PATIENCE epochs without a lower validation loss and keep the "
             "weights of the epoch with the lowest (needs a validation split)")
    _setting(r, "--engine", metavar="NAME",
             help=f"{', '.join(available())}, or auto (owner for per-sample SGD on 2 threads, "
             "else serial; batch for mini-batches)")
    r.add_argument("--threads", type=int, help="threads for Numba and BLAS (default: all cores)")
    r.add_argument("--test-every-epoch", action="store_true",
                   help="score the test set after every epoch too (default: once, at the end, "
                   "on the weights returned: the test set never steers training)")
    r.add_argument("--members", type=int, metavar="K",
                   help="train an ensemble of K networks in this process, one after another "
                   "(seeds SEED..SEED+K-1, one validation split), saved as one file that "
                   "soft-votes (default: 1, a single network)")
    r.add_argument("--member-recipe", choices=sorted(MEMBER_RECIPES), metavar="NAME",
                   help="with --members or --distributed ensemble: seeds (every member trains "
                   "with the run's settings, the default) or shift1 (every other member with "
                   "--augment shift1)")
    d = t.add_argument_group("data")
    _add_data_args(d, dataset=None)
    d.add_argument("--limit-train", type=int, metavar="N", help="train on the first N samples only")
    d.add_argument("--limit-test", type=int, metavar="N", help="test on the first N samples only")
    o = t.add_argument_group("output")
    o.add_argument("--out", type=Path, metavar="DIR",
                   help="where the model, history and plot go (default: runs/PRESET); "
                   "history.csv gains a row after every epoch")
    o.add_argument("--overwrite", action="store_true",
                   help="replace a trained model (and its history and checkpoints) already in "
                   "--out; without it such a run is refused")
    o.add_argument("--no-progress", action="store_true",
                   help="no progress bar (there is none when stderr is not a terminal: the log "
                   "has a line per epoch)")
    o.add_argument("--json", action="store_true",
                   help="print one JSON object at the end (test accuracy, history, files, "
                   "settings) on stdout; the log goes to stderr")
    o.add_argument("--checkpoint-dir", type=Path, metavar="DIR",
                   help="where checkpoints go (default: OUT/checkpoints); one is written after "
                   "every epoch, every --checkpoint-every steps, and on Ctrl-C or SIGTERM")
    o.add_argument("--checkpoint-every", type=int, metavar="N",
                   help="also checkpoint every N optimizer steps (at the next boundary of the "
                   "chunks of batches handed to the engine)")
    g = t.add_argument_group("distributed", "under `mpiexec -n K` (docs/MPI.md)")
    g.add_argument("--distributed", choices=("ensemble", "allreduce", "average"),
                   help="ensemble = K networks on K shards, voted; allreduce = one network, "
                   "every batch split over K ranks; average = local SGD, each rank steps on "
                   "its part of every batch, parameters averaged every --average-every steps")
    g.add_argument("--average-every", type=int, metavar="K",
                   help="--distributed average: optimizer steps between two averages of the "
                   "ranks' parameters (default: 8; 1 with plain SGD is allreduce)")
    g.add_argument("--shards", choices=("disjoint", "bootstrap", "all"),
                   help="ensemble members' training data: disjoint parts (default), "
                   "bootstrap samples of n/K, or all of it (members differ by seed only)")
    g.add_argument("--rank-timeout", type=float, metavar="SECONDS",
                   help="end the whole job, naming the rank, when a rank has been silent this "
                   "long (stopped, hung); 0 = wait forever (default: 60)")

    e = sub.add_parser("evaluate", help="accuracy, precision, recall, F1 and confusion matrix "
                       "of a model on a test set",
                       description="Score a model (or an ensemble: its soft vote) on the test "
                       "set of the dataset it was trained on; another dataset is refused.")
    e.add_argument("model", type=Path, help="a model or ensemble file (model.safetensors)")
    e.add_argument("--limit-test", type=int, metavar="N",
                   help="score the first N test images only (default: all)")
    e.add_argument("--figure", type=Path, metavar="PATH",
                   help="also draw the confusion matrix into PATH (PNG)")
    e.add_argument("--overwrite", action="store_true",
                   help="replace the file in --figure if there is one (refused without it)")
    e.add_argument("--json", action="store_true",
                   help="print one JSON object (accuracy, per-class precision, recall and F1, "
                   "the confusion matrix) instead of the report")
    _add_data_args(e)

    p = sub.add_parser("predict", help="classify your own images (PNG/JPEG, or .npy arrays)",
                       description="One line per picture: the file, then the class number, "
                       "its name and its probability (--top-k: the K most likely, best first), "
                       "tab-separated. A file that cannot be read gets its own error line and "
                       "the others are still predicted; the exit status is then 1.")
    p.add_argument("model", type=Path, help="a model or ensemble file (model.safetensors)")
    p.add_argument("images", type=Path, nargs="+", metavar="PICTURE",
                   help="picture files (PNG, JPEG, ...), .npy arrays (28x28, or stacks "
                   "(N,28,28) or (N,784): one line each, FILE[i]), or directories of them")
    p.add_argument("--top-k", type=int, default=1, metavar="K",
                   help="show the K most likely classes of each picture (default: 1)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per picture and line: file, class, name, probability, "
                   "top")
    p.add_argument("--invert", choices=("auto", "yes", "no"), default="auto",
                   help="Fashion-MNIST is light clothing on black; auto inverts images whose "
                   "border is light (default: auto)")

    m = sub.add_parser("info", help="what a model file holds: layers, parameters, training, "
                       "accuracy", description="Summarise a model or ensemble file after "
                       "checking it: its layers and tensors, parameter count, dtype, classes, "
                       "the dataset and settings it was trained with, its final accuracies.")
    m.add_argument("model", type=Path, help="a model or ensemble file (model.safetensors)")
    m.add_argument("--json", action="store_true", help="print one JSON object instead")

    x = sub.add_parser("export", help="write a model as ONNX (needs the onnx extra)",
                       description="Write a model or ensemble file as an ONNX graph (input "
                       "'input' float32 (N, features); outputs 'probabilities' and 'label'; an "
                       "ensemble's soft vote inside the graph), checked with onnx's checker.")
    x.add_argument("model", type=Path, help="a model or ensemble file (model.safetensors)")
    x.add_argument("out", type=Path, help="the .onnx file to write")
    x.add_argument("--opset", type=int, default=17, help="ONNX opset (default: 17)")
    x.add_argument("--overwrite", action="store_true",
                   help="replace OUT if there is a file there (refused without it)")

    d = sub.add_parser("data", help="find, describe or download the dataset")
    dsub = d.add_subparsers(dest="data_command", metavar="COMMAND", parser_class=Parser)
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
