"""Runs parnn.distributed.train under mpiexec from a JSON description, for the MPI tests:
`mpiexec -n K python tests/mpi_driver.py '{"mode": ..., "settings": {...}, "options": {...}}'`.
It is what `parnn train --distributed ...` does after parsing (cli/__init__.py), without the
parser: settings are TrainConfig settings (make_config), options DistributedOptions fields."""

import json
import sys
from pathlib import Path

from parnn.distributed import DistributedOptions, train
from parnn.errors import ParnnError
from parnn.run.config import DEFAULT_PRESET, make_config


def run(spec):
    settings = {k: tuple(v) if isinstance(v, list) else v
                for k, v in spec.get("settings", {}).items()}   # as argparse gives them
    options = dict(spec.get("options", {}))
    for k in ("data", "out", "checkpoint_dir", "resume"):
        if options.get(k) is not None:
            options[k] = Path(options[k])
    opts = DistributedOptions(**options)
    if opts.resume is not None:
        return train(None, opts, settings)
    cfg = make_config(settings.pop("preset", None) or DEFAULT_PRESET, **settings)
    return train(cfg, opts)


if __name__ == "__main__":
    try:
        sys.exit(run(json.loads(sys.argv[1])))
    except ParnnError as e:   # as the CLI prints it
        print(f"parnn: error: {e}", file=sys.stderr, flush=True)
        sys.exit(getattr(e, "exit_status", 2))
