"""Atomic writes: every file parnn writes goes to a temp file in the target's directory, is
fsynced, then os.replace()d onto the target and the directory is fsynced. A crash or an
exception leaves either the old file or the new one, never half of one, and no temp file behind
(a killed run's temporaries, `.NAME.*.tmp`, are swept by the next run: parnn.run.rundir). A
target whose owner write bit is clear (chmod 444) is not replaced: PermissionError, nothing
written.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from parnn.paths import read_only, shown

# mkstemp creates files 0600; finished files should get the usual 0666 & ~umask like open()
# would. The umask can only be read by setting it, so do that once, at import time.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_open(path, mode="w", encoding="utf-8", newline=None):
    """Open a temp file for writing; on a clean exit it replaces `path`, on an exception it
    is deleted and `path` is untouched. mode is "w" (text) or "wb"."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        if read_only(os.stat(path)):
            raise PermissionError(errno.EACCES, f"{shown(path.name)} is read-only: not "
                                  "replaced (chmod u+w lets parnn replace it)", str(path))
    directory = path.absolute().parent
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        text = {} if mode == "wb" else {"encoding": encoding, "newline": newline}
        with open(fd, mode, **text) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def _fsync_dir(directory):
    # Makes the rename itself durable. Windows cannot open a directory, and does not need to.
    if os.name == "nt":  # pragma: no cover
        return
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path, data: bytes):
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path, text: str):
    with atomic_open(path, "w") as f:
        f.write(text)


def _jsonable(obj):
    """json `default=`: NumPy scalars/arrays and paths are common in configs and results."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def dumps(obj, **kw):
    """JSON with sorted keys; NumPy values and paths as plain JSON."""
    return json.dumps(obj, sort_keys=True, default=_jsonable, **kw)


def atomic_write_json(path, obj):
    atomic_write_text(path, dumps(obj, indent=2) + "\n")


def atomic_write_csv(path, rows: list[dict], fieldnames=None):
    """Columns: `fieldnames`, or every key in order of first appearance; missing cells empty."""
    if fieldnames is None:
        fieldnames = list(dict.fromkeys(k for row in rows for k in row))
    with atomic_open(path, "w", newline="") as f:  # the csv module wants newline=""
        w = csv.DictWriter(f, fieldnames=fieldnames)
        w.writeheader()
        w.writerows(rows)
