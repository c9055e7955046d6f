"""The command line: argument parsing and messages only, no math.

Every user mistake ends as one line `parnn: error: ...` on stderr and exit status 2; SIGINT or
SIGTERM during training ends as one line too (after a checkpoint), with status 128 + signal.
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


def _names(text):
    return tuple(v.strip() for v in text.split(",") if v.strip())


def _add_data_args(p, dataset="fashion-mnist"):
    p.add_argument("--data", metavar="DIR", help="dataset directory (IDX .gz/raw files or Kaggle "
                   "CSVs); default: $PARNN_DATA, /usr/share/datasets/DATASET, the user cache")
    p.add_argument("--dataset", default=dataset, choices=("fashion-mnist", "mnist"),
                   help="default: fashion-mnist")


def build_parser():
    from parnn.run.train import PRESETS, DEFAULT_PRESET

    top = Parser(prog="parnn", description="Train feedforward neural networks on Fashion-MNIST "
                 "in parallel (per-neuron threads, Hogwild, mini-batch BLAS, MPI).")
    top.add_argument("--version", action="version", version=f"parnn {__version__}")
    sub = top.add_subparsers(dest="command", required=True, parser_class=Parser)

    t = sub.add_parser("train", help="train a network and report its test accuracy",
                       description="Train a network. A preset gives every setting; any flag "
                       "overrides it. paper = the paper's system (tanh, MSE, per-sample SGD, "
                       "float64); modern = ReLU, softmax cross-entropy, Adam, mini-batches, float32.")
    # Defaults of None here and for --dataset: --resume must tell a flag given from a default.
    t.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help=f"default: {DEFAULT_PRESET}")
    t.add_argument("--hidden", type=_int_list, help="hidden layer sizes, e.g. 256,128")
    t.add_argument("--activation", help="hidden activation: tanh, sigmoid, relu")
    t.add_argument("--output", help="output activation: tanh, sigmoid, softmax")
    t.add_argument("--loss", help="mse or cross_entropy")
    t.add_argument("--init", help="paper (U[0,1), saturates tanh), xavier, he")
    t.add_argument("--dtype", help="float32 or float64")
    t.add_argument("--optimizer", help="sgd, momentum, adam")
    t.add_argument("--lr", type=float, help="learning rate")
    t.add_argument("--lr-schedule", help="constant, or cosine (decays lr towards 0 over the epochs)")
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
    t.add_argument("--checkpoint-dir", type=Path, metavar="DIR",
                   help="where checkpoints go (default: OUT/checkpoints); one is written after "
                   "every epoch, every --checkpoint-every steps, and on Ctrl-C or SIGTERM")
    t.add_argument("--checkpoint-every", type=int, metavar="N",
                   help="also checkpoint every N optimizer steps (at the next boundary of the "
                   "chunks of batches handed to the engine)")
    t.add_argument("--resume", type=Path, metavar="DIR",
                   help="continue the run whose checkpoints are in DIR (or DIR/checkpoints) with "
                   "its saved settings; --epochs may extend it")
    t.add_argument("--distributed", choices=("ensemble", "allreduce"),
                   help="under `mpiexec -n K`: ensemble = K networks on K shards, voted; "
                   "allreduce = one network, every batch split over K ranks (docs/MPI.md)")
    t.add_argument("--shards", choices=("disjoint", "bootstrap"),
                   help="ensemble members' training data: disjoint parts (default) or "
                   "bootstrap samples of n/K")
    _add_data_args(t, dataset=None)

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

    b = sub.add_parser("bench", help="time engines x thread counts (and peers, the C reference)",
                       description="Time every engine at every thread count on the paper's "
                       "workload (784-256-128-10 tanh, MSE, per-sample SGD, float64) or the "
                       "modern one (ReLU, softmax CE, Adam, batch 128, float32); print the "
                       "paper's table per engine; write CSV, JSON and PNG figures. Run it under "
                       "`flock /tmp/bench.lock` on a shared machine.")
    b.add_argument("--workload", choices=("paper", "modern"), default="paper")
    b.add_argument("--engines", type=_names, help="comma-separated; default: serial,neuron,"
                   "hogwild,owner for paper, batch,numpy for modern")
    b.add_argument("--threads", type=_int_list, help="comma-separated thread counts, e.g. 1,2,4 "
                   "(default: 1, 2, 4, ... up to all cores)")
    b.add_argument("--hidden", type=_int_list, help="hidden layer sizes (default: 256,128)")
    b.add_argument("--epochs", type=int, default=1, help="epochs per run (default: 1)")
    b.add_argument("--limit-train", type=int, metavar="N", help="train on the first N samples "
                   "(times are also reported scaled to a 60k epoch, labelled)")
    b.add_argument("--repeat", type=int, default=3, metavar="K",
                   help="runs per configuration, in interleaved rounds (default: 3)")
    b.add_argument("--peers", nargs="?", const="torch,sklearn", type=_names, metavar="LIST",
                   help="also time PyTorch and scikit-learn on the same workload (or only LIST)")
    b.add_argument("--c-reference", type=Path, metavar="DIR",
                   help="also time the C reference binaries nn_serial and nn_omp in DIR")
    b.add_argument("--seed", type=int, default=1)
    b.add_argument("--no-breakdown", action="store_true",
                   help="skip the forward/error/update/fork-join breakdown and the model")
    b.add_argument("--dense", action="store_true", help="per-sample engines visit every input "
                   "weight row, even for zero pixels (like the C reference; same results)")
    b.add_argument("--quiet-wait", type=float, default=0, metavar="S",
                   help="before each timed run wait up to S seconds for other processes to go "
                   "quiet (< 0.25 cores busy); default 0 = do not wait")
    b.add_argument("--out", type=Path, default=Path("runs/bench"), metavar="DIR",
                   help="where bench.json, bench.csv and the figures go (default: runs/bench)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_data_args(b)
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

CONFIG_FLAGS = ("hidden", "activation", "output", "loss", "init", "dtype", "optimizer", "lr",
                "lr_schedule", "momentum", "batch_size", "epochs", "seed", "engine", "threads")
# What a resumed run keeps from its checkpoint: a flag may repeat the saved value, not change it.
KEPT_ON_RESUME = ("preset", "hidden", "activation", "output", "loss", "init", "dtype", "optimizer",
                  "lr", "lr_schedule", "momentum", "batch_size", "seed", "engine", "dataset", "limit_train",
                  "limit_test")


def cmd_train(args):
    from parnn.io import check_output_dir
    from parnn import data as datamod
    from parnn.run import train
    from parnn.errors import ConfigError

    _check_limits(args)
    if args.checkpoint_every is not None and args.checkpoint_every < 1:
        raise ConfigError(f"--checkpoint-every must be >= 1 (optimizer steps), "
                          f"got {args.checkpoint_every}")
    if args.distributed and (args.resume or args.checkpoint_dir or args.checkpoint_every):
        raise ConfigError("--resume, --checkpoint-dir and --checkpoint-every do not work with "
                          "--distributed yet")
    if args.shards is not None and args.distributed != "ensemble":
        raise ConfigError("--shards only applies to --distributed ensemble (each member's share "
                          "of the training set)")
    if args.resume is not None:
        return _resume(args)
    args.dataset = args.dataset or "fashion-mnist"
    cfg = train.make_config(args.preset or train.DEFAULT_PRESET,
                            **{k: getattr(args, k) for k in CONFIG_FLAGS})
    out = args.out or Path("runs") / cfg.preset
    if args.distributed:  # every MPI rank runs this; mpi4py is imported only there
        from parnn import distributed

        return distributed.cmd_train(args, cfg, out)
    ckdir = args.checkpoint_dir or out / "checkpoints"
    check_output_dir(out, "--out")
    check_output_dir(ckdir, "--checkpoint-dir")
    _refuse_unfinished(ckdir)
    ds = datamod.load_dataset(args.dataset, args.data, cfg.dtype, args.limit_train, args.limit_test)
    run = {"dataset": ds.name, "data_dir": str(Path(ds.source).absolute()), "sha256": ds.sha256,
           "limit_train": args.limit_train, "limit_test": args.limit_test,
           "out": str(Path(out).absolute()), "checkpoint_every": args.checkpoint_every}
    _train_and_save(args, cfg, ds, out, ckdir, run)


def _resume(args):
    """parnn train --resume DIR: the checkpoint's settings, data and position; see docs/ROBUSTNESS.md."""
    from parnn.io import check_output_dir
    import dataclasses
    import os

    from parnn.run import checkpoint, train
    from parnn import data as datamod
    from parnn.errors import ConfigError

    if args.checkpoint_dir is not None:
        raise ConfigError("--checkpoint-dir cannot be combined with --resume: a resumed run "
                          "goes on writing its checkpoints into the --resume directory")
    ck = checkpoint.load(args.resume, warn=_warn)
    run = _saved_run(ck)
    saved = {**dataclasses.asdict(ck.config), **run}
    conflicts = [f"--{k.replace('_', '-')} {_show(getattr(args, k))} (it has {_show(saved[k])})"
                 for k in KEPT_ON_RESUME
                 if getattr(args, k) is not None and getattr(args, k) != saved[k]]
    if conflicts:
        raise ConfigError(f"a resumed run keeps the settings of its checkpoint in "
                          f"{ck.path.parent}, but {'; '.join(conflicts)}: drop those flags "
                          "(--epochs, --threads, --checkpoint-every, --out, --data and "
                          "--no-progress may change)")
    pos = ck.position
    epochs = args.epochs if args.epochs is not None else ck.config.epochs
    trained = pos.epoch - (pos.done == 0)  # epochs finished or begun
    if epochs < trained:
        raise ConfigError(f"--epochs {epochs} is fewer than the {trained} epoch(s) the checkpoint "
                          f"has already trained or begun: pass --epochs {trained} or more")
    threads = args.threads if args.threads is not None else \
        min(ck.config.threads, os.cpu_count() or 1)
    cfg = dataclasses.replace(ck.config, epochs=epochs, threads=threads)
    if cfg.engine == "auto" and ck.engine:  # the engine "auto" chose then, even if it would not now
        cfg = dataclasses.replace(cfg, engine=ck.engine)
    train.validate(cfg)
    out = args.out or Path(run["out"])
    check_output_dir(out, "--out")
    check_output_dir(ck.path.parent, "--resume")
    # The data may have moved (--data), but it must be the same bytes.
    data_dir = args.data or (run["data_dir"] if Path(run["data_dir"]).is_dir() else None)
    ds = datamod.load_dataset(run["dataset"], data_dir, cfg.dtype, run["limit_train"],
                              run["limit_test"])
    if ds.sha256 != run["sha256"]:
        raise ConfigError(f"the data in {ds.source} differs from the data the checkpoint was "
                          f"trained on (from {run['data_dir']}): pass --data with that dataset")
    every = args.checkpoint_every or run["checkpoint_every"]
    run = dict(run, out=str(Path(out).absolute()), checkpoint_every=every)
    _train_and_save(args, cfg, ds, out, ck.path.parent, run, ck)


def _train_and_save(args, cfg, ds, out, ckdir, run, resume=None):
    from parnn.run import checkpoint, train
    from parnn.errors import ParnnError

    checkpoints = checkpoint.Checkpointer(ckdir, run["checkpoint_every"], run)
    result = train.fit(cfg, ds, progress=not args.no_progress, checkpoints=checkpoints,
                       resume=resume)
    # Only the data's identity goes into the files: free the arrays (210 MB) before matplotlib
    # loads for the plot, or that moment sets the run's peak memory (docs/ROBUSTNESS.md).
    ds.X_train = ds.X_test = None
    try:
        paths = train.save_run(out, result, ds)
    except OSError as e:
        raise ParnnError(f"{out}: cannot write the results ({e.strerror or e}); the trained "
                         f"network is in the checkpoint: fix that and run "
                         f"`{checkpoint.resume_command(ckdir)}`") from None
    last = result.history[-1]
    print(f"test accuracy {last['test_acc']:.4f} after {len(result.history)} epoch(s); "
          f"model saved to {paths['model']}")


def _saved_run(ck):
    """The checkpoint's record of its data and outputs (written by cmd_train), checked."""
    from parnn.data import DATASETS
    from parnn.errors import ModelFileError

    run = ck.run
    limits_ok = all(run.get(k) is None or (type(run.get(k)) is int and run[k] >= 1)
                    for k in ("limit_train", "limit_test", "checkpoint_every"))
    if not (run.get("dataset") in DATASETS and isinstance(run.get("data_dir"), str)
            and isinstance(run.get("out"), str) and isinstance(run.get("sha256"), dict)
            and limits_ok):
        raise ModelFileError(f"{ck.path}: the checkpoint does not record its data and output "
                             "directory (was it written by `parnn train`?)")
    return run


def _show(value):
    if value is None:
        return "none"
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def _warn(message):
    print(f"parnn: warning: {message}", file=sys.stderr)


def _refuse_unfinished(ckdir):
    """A new run must not rotate away the checkpoints of an unfinished one."""
    from parnn.run import checkpoint
    from parnn.errors import ConfigError

    ck = checkpoint.peek(ckdir) if Path(ckdir).is_dir() else None
    if ck is not None and not ck.finished:
        raise ConfigError(f"{ckdir} holds the checkpoint of an unfinished run (epoch "
                          f"{ck.position.epoch} of {ck.config.epochs}, step {ck.step}): continue "
                          f"it with `{checkpoint.resume_command(ckdir)}`, or start over with "
                          "another --out or --checkpoint-dir (or delete that directory)")


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

    check_output_dir(args.out, "--out")
    bench.main(args)


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict, "data": cmd_data,
            "bench": cmd_bench}


if __name__ == "__main__":
    sys.exit(main())
