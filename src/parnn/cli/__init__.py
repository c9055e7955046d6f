"""The command line: argument parsing and messages only, no math.

Every user mistake ends as one line `parnn: error: ...` on stderr and exit status 2; SIGINT or
SIGTERM during training ends as one line too (after a checkpoint), with status 128 + signal.
Under an MPI launcher it is still one line for the whole job: a `parnn train` rank that fails
before MPI starts joins the other ranks' set-up exchange, and rank 0 speaks
(parnn.distributed.fail_early).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from dataclasses import replace
from pathlib import Path

from parnn import __version__
from parnn.errors import ConfigError, ParnnError


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
    # Not required: bare `parnn` prints this help (main), not argparse's internal names.
    sub = top.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

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
             "probability 1/2), shift1+flip, shift2+flip; mini-batch engines only")
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
    g.add_argument("--distributed", choices=("ensemble", "allreduce"),
                   help="ensemble = K networks on K shards, voted; allreduce = one network, "
                   "every batch split over K ranks")
    g.add_argument("--shards", choices=("disjoint", "bootstrap"),
                   help="ensemble members' training data: disjoint parts (default) or "
                   "bootstrap samples of n/K")
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


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        try:
            args = build_parser().parse_args(argv)
            if args.command is None or (args.command == "data" and args.data_command is None):
                return _help(argv)
            _check_environment(args.command)
            return COMMANDS[args.command](args) or 0
        except (ParnnError, MemoryError, OSError) as err:
            if _mpi_train(argv):   # one rank of several: the job ends with one line, rank 0's
                return _fail_early(err, argv)
            raise
    except UsageError as err:
        print(f"{err.prog}: error: {_line(err)}", file=sys.stderr)
        return 2
    except ParnnError as err:
        _error(err)
        return getattr(err, "exit_status", 2)  # checkpoint.Interrupted: 128 + the signal
    except MemoryError as err:  # e.g. --hidden 1000000000: a user mistake, not a bug
        _error(_memory_error(err))
        return 2
    except OSError as err:  # the last resort: a probe or a write that no check foresaw
        _error(_os_error(err))
        return 2
    except KeyboardInterrupt:
        print("parnn: interrupted", file=sys.stderr)
        return 130


def _help(argv):
    """Bare `parnn` or `parnn data`: their help, not argparse's internal names."""
    parser = build_parser()
    if argv[:1] == ["data"]:
        parser = next(a for a in parser._actions
                      if isinstance(a, argparse._SubParsersAction)).choices["data"]
    parser.print_help()
    return 2


def _check_environment(command):
    """Settings from the environment that a library would only warn about, several lines at
    a time, and then ignore: one line, before any work."""
    from parnn.paths import shown

    value = os.environ.get("NUMBA_NUM_THREADS")
    if command in ("train", "bench") and value is not None and \
            not (value.strip().isdigit() and int(value) >= 1):
        raise ConfigError(f"$NUMBA_NUM_THREADS must be a whole number >= 1 (the size of Numba's "
                          f"thread pool), got '{shown(value)}': fix it or unset it")


def _mpi_train(argv):
    """Is this `parnn train` one of several processes an MPI launcher started, and has it not
    yet reached parnn.distributed.train (whose own set-up exchange reports its problems)?"""
    from parnn import distributed
    from parnn.distributed import launch

    return argv[:1] == ["train"] and launch.several() and not distributed.ENTERED


def _fail_early(err, argv):
    from parnn import distributed

    if isinstance(err, MemoryError):
        message = _memory_error(err)
    elif isinstance(err, OSError):
        message = _os_error(err)
    else:
        message = _line(err)
    try:
        return distributed.fail_early(message, _rank_timeout(argv))
    except ParnnError as report:   # rank 0: the one line for the job
        _error(report)
        return 2


def _rank_timeout(argv):
    """--rank-timeout from argv if it parses, else the default (argv may be what failed)."""
    from parnn.distributed import RANK_TIMEOUT

    for i, a in enumerate(argv):
        text = a.split("=", 1)[1] if a.startswith("--rank-timeout=") else \
            argv[i + 1] if a == "--rank-timeout" and i + 1 < len(argv) else None
        try:
            value = float(text) if text is not None else None
        except ValueError:
            continue
        if value is not None and 0 <= value < float("inf"):
            return value
    return RANK_TIMEOUT


def _line(err):
    from parnn.paths import shown

    return shown(str(err))


def _memory_error(err):
    return f"out of memory ({' '.join(str(err).split()) or 'MemoryError'})"


def _error(message):
    """One line on stderr, whatever the message holds: a newline in a path or a name is shown
    escaped (parnn.paths.shown), never as a second line."""
    from parnn.paths import shown

    print(f"parnn: error: {shown(message)}", file=sys.stderr)


def _os_error(err):
    """An OSError as one line: the path(s) it names, and the system's reason."""
    from parnn.paths import shown

    where = " -> ".join(shown(f) for f in (err.filename, err.filename2) if f is not None)
    why = err.strerror or " ".join(str(err).split()) or type(err).__name__
    return f"{where}: {why}" if where else why


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
                              progress=_progress(args),
                              test_every_epoch=args.test_every_epoch, overwrite=args.overwrite)
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
    if args.json and args.distributed:
        raise ConfigError("--json does not work with --distributed yet")
    if args.rank_timeout is not None and not args.distributed:
        raise ConfigError("--rank-timeout only applies to --distributed (how long a silent "
                          "rank is waited for)")
    _refuse_undistributed_launch(args)
    # With --json stdout is the JSON alone: the log goes to stderr.
    log = functools.partial(print, file=sys.stderr) if args.json else print
    # Every setting has a flag of its name; None = not given (the preset's or the checkpoint's).
    settings = {f.name: getattr(args, f.name) for f in fields(config.TrainConfig)}
    if args.resume is not None:
        if args.show_config:
            return _show_config(session.resumed(args.resume, opts, settings, warn=_warn)[2])
        result, paths = session.resume(args.resume, opts, settings, warn=_warn, log=log)
    else:
        cfg = config.make_config(settings.pop("preset") or config.DEFAULT_PRESET, **settings)
        if args.show_config:
            return _show_config(cfg)
        if args.distributed:  # every MPI rank runs this; mpi4py is imported only there
            # The distributed runs train on the whole training set: say so in their files.
            return _train_distributed(args, replace(cfg, validation_split=0.0))
        result, paths = session.start(cfg, opts, log=log, warn=_warn)
    if args.json:
        import json

        print(json.dumps({"test_acc": result.test_acc, "epochs": len(result.history),
                          "best_epoch": result.best_epoch, "stopped": result.stopped,
                          "engine": result.engine, "files": {k: str(v) for k, v in paths.items()},
                          "config": result.config.to_dict(), "history": result.history}))
        return
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

    timeout = {} if args.rank_timeout is None else {"rank_timeout": args.rank_timeout}
    opts = distributed.DistributedOptions(
        mode=args.distributed, shards=args.shards, dataset=args.dataset or "fashion-mnist",
        data=args.data, limit_train=args.limit_train, limit_test=args.limit_test, out=args.out,
        threads=args.threads, progress=_progress(args), overwrite=args.overwrite, **timeout)
    return distributed.train(cfg, opts)


def _refuse_undistributed_launch(args):
    """`mpiexec -n 2 parnn train` without --distributed: two identical trainings writing the
    same files. Refused on every rank (and reported once, by rank 0)."""
    from parnn.distributed import launch

    if args.distributed or not launch.several():
        return
    size = launch.launched()[1]
    raise ConfigError(f"this process is one of {'several' if size is None else size} that an "
                      f"MPI launcher started "
                      f"({launch.describe()}), but --distributed is not given: each would train "
                      "the same network into the same files; add --distributed ensemble or "
                      "allreduce (docs/MPI.md), or run parnn train without mpiexec")


def _progress(args):
    """A progress bar only on a terminal: in a redirected log every frame would be a line (the
    log has a line per epoch anyway)."""
    return not args.no_progress and sys.stderr.isatty()


def _warn(message):
    print(f"parnn: warning: {message}", file=sys.stderr)


def _check_limits(args):
    from parnn.errors import ConfigError

    for name in ("limit_train", "limit_test"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {v}")


def cmd_evaluate(args):
    from parnn.cli import models

    _check_limits(args)
    models.evaluate(args, _warn)


def cmd_predict(args):
    from parnn.cli import models

    return models.predict(args, models.print_error)


def cmd_data(args):
    from parnn import data as datamod
    from parnn import download

    if args.data_command == "fetch":
        return _fetch(args)
    else:
        ds = datamod.load_dataset(args.dataset, args.data)
        print(download.describe(ds))


def _fetch(args):
    """`parnn data fetch`: nothing to do when the data is already where parnn looks (installed
    system-wide, or verified in the cache); a failed download leaves no empty directory."""
    from parnn import data as datamod
    from parnn import download
    from parnn.errors import DataError
    from parnn.paths import path_kind, shown

    dest = args.dest
    if dest is None:
        try:
            found = datamod.find_data_dir(args.dataset)
        except DataError:
            found = None
        if found is not None and Path(found) != datamod.cache_dir(args.dataset):
            print(f"{args.dataset} is already in {shown(found)}, where parnn finds it: nothing "
                  f"to fetch (`parnn data info --dataset {args.dataset}` verifies it; "
                  "--dest DIR downloads a copy there)")
            return 0
        dest = datamod.cache_dir(args.dataset)
    made = []   # the directories fetch will make: dest and its missing parents
    for d in (Path(dest), *Path(dest).parents):
        if path_kind(d, DataError) is not None:
            break
        made.append(d)
    try:
        path = download.fetch(args.dataset, dest)
    except BaseException:
        for d in made:   # only what this command made, and only while nothing is in it
            try:
                d.rmdir()
            except OSError:
                break
        raise
    print(f"{args.dataset} is in {shown(path)}")


def cmd_info(args):
    import json

    from parnn import modelinfo

    info = modelinfo.model_info(args.model)
    print(json.dumps(info) if args.json else modelinfo.info_text(info))


def cmd_export(args):
    from parnn.export import to_onnx     # says how to install onnx when it is missing

    to_onnx(args.model, args.out, opset=args.opset)
    print(f"{args.model} written as ONNX to {args.out}")


def cmd_bench(args):
    from parnn.paths import check_output_dir
    from parnn import bench

    opts = bench.Options.from_namespace(args)
    check_output_dir(opts.out, "--out")
    bench.run(opts)


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict, "data": cmd_data,
            "info": cmd_info, "export": cmd_export, "bench": cmd_bench}


if __name__ == "__main__":
    sys.exit(main())
