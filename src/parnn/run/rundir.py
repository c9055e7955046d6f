"""A run's directories while it runs: one run at a time (an exclusive lock), no temporaries
left by a killed run, and no finished run replaced unless asked (docs/ROBUSTNESS.md).

    with hold(out, "--out"):     # the second run gets one line naming the first's PID
        sweep(out, outputs.FILES)
        ...train, checkpoint, save...

The up-front checks (check_output_dir, refuse_finished) run before any work and create
nothing; two runs started together both pass them, so the lock is what decides: whoever takes
it second stops before training, and the first re-checks under it what the checks saw.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from parnn.errors import ConfigError
from parnn.paths import path_kind, shown

LOCK = ".parnn.lock"


@contextlib.contextmanager
def hold(directory, flag):
    """An exclusive lock on `directory` for the duration of the block: an advisory flock() on
    directory/.parnn.lock, which holds the owner's PID. The kernel drops the lock when the
    process ends, however it ends, so a SIGKILL leaves no stale lock, only the file. At the end
    the file is removed (still locked), and the directory too if the block made it and left it
    empty: a run refused late leaves nothing behind."""
    try:
        import fcntl
    except ImportError:   # pragma: no cover  (Windows: no flock; runs are not locked)
        yield
        return
    d = Path(directory)
    path = d / LOCK
    made = path_kind(d, ConfigError) is None
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd = _locked_fd(path, flag, d, fcntl)
    except OSError as e:
        _remove_if_made(d, made)
        raise ConfigError(f"{flag} {shown(d)}: cannot lock it ({shown(path.name)}: "
                          f"{e.strerror or e})") from None
    except ConfigError:
        _remove_if_made(d, made)
        raise
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)   # releases the lock
        _remove_if_made(d, made)


def _locked_fd(path, flag, d, fcntl):
    """An open descriptor of the lock file at `path`, flock()ed. A run that ends unlinks its
    lock file while still holding it, so a descriptor opened just before may hold a lock on a
    file no longer there: check that the path still names the locked file, or start again."""
    while True:
        # O_NONBLOCK: a FIFO planted as the lock file must not block the open.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0),
                     0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            message = _in_use(d, flag, fd)
            os.close(fd)
            raise ConfigError(message) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _remove_if_made(d, made):
    if made:
        with contextlib.suppress(OSError):   # not empty: it holds what the run wrote
            d.rmdir()


def refuse_in_use(directory, flag):
    """Before any work: ConfigError naming the PID if another run holds directory's lock.
    Creates nothing (a directory without a lock file is free)."""
    try:
        import fcntl
    except ImportError:   # pragma: no cover
        return
    path = Path(directory) / LOCK
    if path_kind(path, ConfigError) != "file":
        return
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return   # hold() will say what is wrong with it
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ConfigError(_in_use(directory, flag, fd)) from None
    except OSError:
        pass
    finally:
        os.close(fd)


def _in_use(directory, flag, fd):
    owner = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    who = f"PID {owner}" if owner.isdigit() else "PID unknown"
    return (f"{flag} {shown(directory)} is in use by another parnn run ({who}): wait for it to "
            f"end, or choose another {flag}")


def sweep(directory, names):
    """Remove the temporaries a killed run left beside each file in names (parnn.atomic.atomic_open
    writes .NAME.XXXXXX.tmp and renames it; a SIGKILL in between leaves it). Call it holding
    the lock: another run's temporaries are in flight otherwise."""
    d = Path(directory)
    if path_kind(d, ConfigError) != "dir":
        return
    for name in names:
        for stale in d.glob(f".{name}.*.tmp"):
            with contextlib.suppress(OSError):   # gone already, or not ours to remove
                stale.unlink()


def existing(directory, names):
    """The names in `names` that exist in `directory` (any kind of file)."""
    d = Path(directory)
    return [n for n in names if path_kind(d / n, ConfigError) is not None]
