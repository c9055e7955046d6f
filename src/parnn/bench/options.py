"""`parnn bench`'s options: each flag declared once, as a field of `Options`.

The CLI's `bench` subparser is generated from these fields (`add_arguments`), the parsed
namespace becomes an `Options` in one step (`from_namespace`), and `command()` writes the
options back out as the command line that reproduces them. Nothing below the CLI sees argparse.

This module is imported by the CLI for every command (to build its parser), so it imports no
numerics.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from pathlib import Path

# workload = run.train's preset of that name; cnn = the modern preset with `--model cnn`'s layers
WORKLOADS = {"paper": "W1", "modern": "W2", "cnn": "W3"}
PEERS = ("torch", "jax", "sklearn")
DATASETS = ("fashion-mnist", "mnist")


def workload_of(cfg):
    """The workload a TrainConfig is: its preset's, or cnn for a layer list."""
    return "cnn" if cfg.layers else cfg.preset


def int_list(text):
    """'1,2,4' -> (1, 2, 4)."""
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers like 256,128, got {text!r}") from None


def seconds(text):
    """'2.5' -> 2.5: a finite number of seconds (nan and inf are refused, not waited for)."""
    import math

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}")
    return value


def names(text):
    """'serial, owner' -> ('serial', 'owner'); empty items dropped."""
    return tuple(v.strip() for v in text.split(",") if v.strip())


def flag(default, name, help=None, always=False, in_command=True, **argparse_kw):
    """A field that is also the command-line flag `name`.

    A bool field is a switch: giving the flag stores `not default` (--dense, --no-progress).
    always: command() writes it even at its default (what the run did is then explicit).
    in_command: False for flags that change no result (the progress bar)."""
    meta = {"flag": name, "help": help, "always": always, "in_command": in_command,
            "argparse": argparse_kw}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Options:
    workload: str = flag("paper", "--workload", always=True, choices=tuple(WORKLOADS))
    engines: tuple = flag((), "--engines", always=True, type=names,
                          help="comma-separated; default: serial,neuron,hogwild,owner for paper, "
                          "batch,numpy for modern, batch for cnn")
    threads: tuple = flag((), "--threads", always=True, type=int_list,
                          help="comma-separated thread counts, e.g. 1,2,4 (default: 1, 2, 4, ... "
                          "up to all cores)")
    hidden: tuple | None = flag(None, "--hidden", type=int_list,
                                help="hidden layer sizes (default: 256,128; not for cnn)")
    epochs: int = flag(1, "--epochs", always=True, type=int, help="epochs per run (default: 1)")
    limit_train: int | None = flag(None, "--limit-train", type=int, metavar="N",
                                   help="train on the first N samples (times are also reported "
                                   "scaled to a 60k epoch, labelled)")
    repeat: int = flag(3, "--repeat", always=True, type=int, metavar="K",
                       help="runs per configuration, in interleaved rounds (default: 3)")
    peers: tuple = flag((), "--peers", nargs="?", const=PEERS, type=names, metavar="LIST",
                        help="also time PyTorch, JAX and scikit-learn on the same workload, "
                        "each pinned to the thread count's cores (or only LIST)")
    c_reference: Path | None = flag(None, "--c-reference", type=Path, metavar="DIR",
                                    help="also time the C reference binaries nn_serial and "
                                    "nn_omp in DIR")
    seed: int = flag(1, "--seed", always=True, type=int)
    breakdown: bool = flag(True, "--no-breakdown",
                           help="skip the per-phase breakdown, the fork/join and barrier costs "
                           "and the model")
    dense: bool = flag(False, "--dense", help="per-sample engines visit every input weight row, "
                       "even for zero pixels (like the C reference; same results)")
    quiet_wait: float = flag(0.0, "--quiet-wait", type=seconds, metavar="S",
                             help="before each timed run wait up to S seconds for other "
                             "processes to go quiet (< 0.25 cores busy); default 0 = do not wait")
    out: Path = flag(Path("runs/bench"), "--out", always=True, type=Path, metavar="DIR",
                     help="where bench.json, bench.csv and the figures go (default: runs/bench)")
    progress: bool = flag(True, "--no-progress", in_command=False, help="no progress bar")
    data: str | None = flag(None, "--data", metavar="DIR",
                            help="dataset directory (IDX .gz/raw files or Kaggle CSVs); default: "
                            "$PARNN_DATA, /usr/share/datasets/DATASET, the user cache")
    dataset: str = flag("fashion-mnist", "--dataset", choices=DATASETS,
                        help="default: fashion-mnist")

    @classmethod
    def from_namespace(cls, ns):
        """The options of a namespace parsed by a parser that add_arguments built."""
        return cls(**{f.name: getattr(ns, f.name) for f in fields(cls)})

    def argv(self, everything=True):
        """The flags that give these options (without 'parnn bench'): every field that differs
        from its default, and the `always` ones; with everything=False only what changes
        results (the command of record)."""
        out = []
        for f in fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if not (everything or meta["in_command"]):
                continue
            if value in (None, ()) or (value == f.default and not meta["always"]):
                continue
            if isinstance(f.default, bool):
                out.append(meta["flag"])
            else:
                out += [meta["flag"], _text(value)]
        return out

    def command(self):
        """The command line that reproduces these options, written out in full."""
        import shlex

        return shlex.join(["parnn", "bench", *self.argv(everything=False)])


def _text(value):
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    return str(value)


GIVEN = "_bench_flags_given"       # namespace attribute: the dests set so far


class Once(argparse.Action):
    """argparse's 'store' (or, with nargs=0, its store_true/store_false), but a flag given twice
    is an error instead of the last one silently winning."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = namespace.__dict__.setdefault(GIVEN, set())
        if self.dest in given:
            parser.error(f"{'/'.join(self.option_strings)} given twice")
        given.add(self.dest)
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


def add_arguments(parser):
    """Add one argument per Options field to an argparse parser."""
    for f in fields(Options):
        meta = f.metadata
        kw = dict(meta["argparse"])
        if isinstance(f.default, bool):
            kw.update(nargs=0, const=not f.default)
        parser.add_argument(meta["flag"], dest=f.name, action=Once, default=f.default,
                            help=meta["help"], **kw)
    return parser


def build_parser(prog="parnn bench"):
    """A stand-alone parser for these options (the CLI adds them to its own subparser)."""
    return add_arguments(argparse.ArgumentParser(prog=prog))
