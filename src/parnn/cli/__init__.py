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
from pathlib import Path

from parnn.errors import ConfigError, ParnnError


from parnn.cli.parser import UsageError, build_parser, show_value


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
    if args.average_every is not None and args.distributed != "average":
        raise ConfigError("--average-every only applies to --distributed average (optimizer "
                          "steps between two averages of the ranks' parameters)")
    if args.distributed and (args.early_stopping or args.test_every_epoch):
        raise ConfigError("--early-stopping and --test-every-epoch do not work with --distributed "
                          "(every rank trains the run's epochs; an ensemble scores its vote on "
                          "the test set after every epoch anyway)")
    if args.distributed in ("allreduce", "average") and args.validation_split:
        raise ConfigError(f"--validation-split does not work with --distributed "
                          f"{args.distributed}: it trains one network on the whole training "
                          "set (an ensemble holds a validation split out, as parnn train does)")
    if args.shards is not None and not args.distributed:
        raise ConfigError("--shards only applies to --distributed ensemble (each member's share "
                          "of the training set)")
    if args.json and args.distributed:
        raise ConfigError("--json does not work with --distributed yet")
    if args.rank_timeout is not None and not args.distributed:
        raise ConfigError("--rank-timeout only applies to --distributed (how long a silent "
                          "rank is waited for)")
    if args.member_recipe is not None and args.members is None \
            and args.distributed != "ensemble":
        raise ConfigError("--member-recipe only applies to an ensemble (--members K, or "
                          "--distributed ensemble): how each member trains")
    if args.members is not None and (args.resume is not None or args.distributed):
        raise ConfigError("--members trains K networks one after another in this process and "
                          "cannot be combined with --resume or --distributed (mpiexec -n K "
                          "parnn train --distributed ensemble trains one per process)")
    _refuse_undistributed_launch(args)
    # With --json stdout is the JSON alone: the log goes to stderr.
    log = functools.partial(print, file=sys.stderr) if args.json else print
    # Every setting has a flag of its name; None = not given (the preset's or the checkpoint's).
    settings = {f.name: getattr(args, f.name) for f in fields(config.TrainConfig)}
    if args.resume is not None and args.distributed:
        if args.show_config:
            from parnn.distributed.checkpoints import shown_config

            cfg, members = shown_config(_distributed_options(args), settings,
                                        functools.partial(print, file=sys.stderr))
            return _show_config(cfg, args, members)
        return _train_distributed(args, None, settings)   # the checkpoint's settings
    if args.resume is not None:
        if args.show_config:
            return _show_config(session.resumed(args.resume, opts, settings, warn=_warn)[2],
                                args)
        result, paths = session.resume(args.resume, opts, settings, warn=_warn, log=log)
    else:
        cfg = config.make_config(settings.pop("preset") or config.DEFAULT_PRESET, **settings)
        if args.show_config:
            if args.distributed:   # what the mode trains (mpi4py is not needed for that)
                from parnn.distributed import mode_config

                cfg = mode_config(cfg, args.distributed)
            return _show_config(cfg, args)
        if args.distributed:  # every MPI rank runs this; mpi4py is imported only there
            return _train_distributed(args, cfg)
        if args.members is not None and args.members != 1:
            return _train_members(args, cfg, opts, log)
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


def _train_members(args, cfg, opts, log):
    """`parnn train --members K`: K networks one after another, saved as one ensemble file."""
    from parnn.run import members

    ens, paths = members.start(cfg, opts, args.members, args.member_recipe, log=log, warn=_warn)
    if args.json:
        import json

        print(json.dumps({"test_acc": ens.test_acc, "val_acc": ens.val_acc,
                          "files": {k: str(v) for k, v in paths.items()},
                          "members": [{"config": r.config.to_dict(), "test_acc": r.test_acc,
                                       "history": r.history} for r in ens.results]}))
        return
    accs = ", ".join(f"{r.test_acc:.4f}" for r in ens.results)
    print(f"test accuracy {ens.test_acc:.4f} (soft vote of {args.members} members: {accs}); "
          f"ensemble saved to {paths['model']}")


def _show_config(cfg, args, members=None):
    """Each setting and its value, as the flags take them (--json: one JSON object); --hidden
    only where it is used (a layer list spells its own sizes); beside engine auto, the engine
    it picks for this run (not for --distributed, whose modes bring their own); with --members,
    K and the recipe; for a resumed ensemble (members: each member's config), the settings in
    which its members differ (the settings above are member 0's)."""
    from parnn.modelinfo import member_settings

    shown = {k: v for k, v in cfg.to_dict().items() if not (k == "hidden" and cfg.layers)}
    if cfg.engine == "auto" and not args.distributed:
        shown["engine_picked"] = _auto_engine(cfg, args)
    if members is not None:
        differ = member_settings([m.to_dict() for m in members], len(members)) or {}
        shown.update({f"member_{k}": v for k, v in differ.items()})
    elif args.members is not None or args.distributed == "ensemble":
        if args.members is not None:
            shown["members"] = args.members
        shown["member_recipe"] = args.member_recipe or "seeds"
    if args.json:
        import json

        print(json.dumps({k.replace("_", "-"): v for k, v in shown.items()}))
        return
    width = max(len(k) for k in shown)
    for k, v in shown.items():
        print(f"{k.replace('_', '-'):<{width}}  {show_value(tuple(v) if isinstance(v, list) else v)}")


def _auto_engine(cfg, args):
    """The engine `--engine auto` picks for this run (parnn.run.config.pick_engine: it goes by
    the batch size, the optimizer, the layers and the threads as capped to the cores, not by
    the data), or why none would."""
    from parnn.data import DATASETS
    from parnn.run import config

    cfg = config.capped_threads(cfg)
    known = DATASETS.get(args.dataset or "fashion-mnist")
    n = known.samples("train") if known is not None else 60000
    n_train = max(1, int(min(n, args.limit_train or n) * (1 - cfg.validation_split)))
    try:
        return config.pick_engine(cfg, cfg.spec(), n_train).name
    except ConfigError as e:
        return f"none: {e}"


def _train_distributed(args, cfg, settings=None):
    from parnn import distributed

    return distributed.train(cfg, _distributed_options(args), settings)


def _distributed_options(args):
    from parnn import distributed

    timeout = {} if args.rank_timeout is None else {"rank_timeout": args.rank_timeout}
    return distributed.DistributedOptions(
        mode=args.distributed, shards=args.shards,
        # resuming: None unless given, so a --dataset other than the checkpoint's is refused
        dataset=args.dataset if args.resume is not None else args.dataset or "fashion-mnist",
        data=args.data, limit_train=args.limit_train, limit_test=args.limit_test, out=args.out,
        threads=args.threads, progress=_progress(args), overwrite=args.overwrite,
        checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
        resume=args.resume, average_every=args.average_every, member_recipe=args.member_recipe,
        **timeout)


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
    from parnn.paths import check_output_file

    check_output_file(args.out, "output", args.overwrite, reads=(args.model,))
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
