"""Paths given by a user, probed and opened so that anything wrong is one line naming them.

Path.exists() and is_dir() raise PermissionError and "File name too long" as they are, and
open() waits forever on a FIFO. Every path parnn reads or writes goes through path_kind() or
open_regular() instead, which turn any OSError into `error` (a ParnnError subclass the caller
picks) with one line, the path escaped by shown() so that a newline in it cannot split it.
check_output_dir() tests an output directory before any work is done, check_output_file() a
file output (export, a figure).
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from parnn.errors import ConfigError, ParnnError


def shown(path) -> str:
    """A path (or any name) as printable text on one line: control characters escaped."""
    s = os.fsdecode(path) if isinstance(path, (bytes, os.PathLike)) else str(path)
    return s if s.isprintable() else s.encode("unicode_escape").decode("ascii")


_KINDS = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFIFO: "fifo",
          stat.S_IFCHR: "character device", stat.S_IFBLK: "block device", stat.S_IFSOCK: "socket"}
_A = {"dir": "a directory", "fifo": "a FIFO", "character device": "a character device",
      "block device": "a block device", "socket": "a socket"}


def _kind_of(mode):
    return _KINDS.get(stat.S_IFMT(mode), "special file")


def path_kind(path, error=ParnnError) -> str | None:
    """"file" (regular), "dir", "fifo", "character device", "block device", "socket", or None
    when nothing is there (or a parent is a file). Any other OSError (permission denied, name
    too long, a symlink loop) raises `error` with one line naming the path: Path.exists() and
    is_dir() would raise it raw."""
    try:
        return _kind_or_none(path)
    except OSError as e:
        raise error(f"{shown(path)}: cannot access: {e.strerror or e}") from None
    except ValueError:  # an embedded NUL byte
        raise error(f"{shown(path)}: not a valid path") from None


def not_regular(kind, what="regular file"):
    """The message part for a path that is there but is not a regular file."""
    return f"is {_A.get(kind, 'a ' + kind)}, not {'an' if what[0] in 'aeiou' else 'a'} {what}"


def open_regular(path, error=ParnnError, what="regular file"):
    """Open a regular file for binary reading, or raise `error` with one line naming the path.

    O_NONBLOCK: opening a FIFO returns at once instead of waiting for a writer, and fstat then
    refuses it like a directory, a device or a socket; a regular file ignores the flag."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except (FileNotFoundError, NotADirectoryError):
        raise error(f"{shown(path)}: no such file") from None
    except OSError as e:
        raise error(f"{shown(path)}: cannot read: {e.strerror or e}") from None
    except ValueError:
        raise error(f"{shown(path)}: not a valid path") from None
    try:
        kind = _kind_of(os.fstat(fd).st_mode)
        if kind != "file":
            raise error(f"{shown(path)}: {not_regular(kind, what)}")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_fully(f, buf) -> int:
    """readinto until buf is full or the stream ends; the number of bytes read."""
    view, got = memoryview(buf).cast("B"), 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def read_only(st) -> bool:
    """The owner write bit is clear (chmod 444): parnn does not replace such a file, even as
    root, where os.access() would say it is writable."""
    return stat.S_ISREG(st.st_mode) and not st.st_mode & stat.S_IWUSR


def check_output_dir(path, flag, files=()):
    """Refuse up front, before any work, an output directory that cannot be made or written,
    and (files: names inside it) an existing output that could not be replaced: a directory or
    special file in its place, or a read-only file. Writing is tried for real (a temp file or
    directory, removed at once): os.access() says yes to root for /proc, /sys and read-only
    mounts."""
    p = Path(path).absolute()
    q = p
    try:
        while (kind := _kind_or_none(q)) is None:
            q = q.parent  # the nearest existing ancestor is where it would be created
    except OSError as e:
        raise ConfigError(f"{flag} {shown(path)}: cannot access it: {e.strerror or e}") from None
    if kind != "dir":
        where = "is a file" if q == p else f"cannot be created: {shown(q)} is a file"
        raise ConfigError(f"{flag} {shown(path)}: {where}, not a directory")
    try:
        if q == p:
            with tempfile.TemporaryFile(dir=p):
                pass
        else:
            os.rmdir(tempfile.mkdtemp(dir=q))
    except OSError as e:
        raise ConfigError(f"{flag} {shown(path)}: {shown(q)} is not writable "
                          f"({e.strerror or e})") from None
    for name in files if q == p else ():
        try:
            st = os.stat(p / name)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as e:
            raise ConfigError(f"{flag} {shown(path)}: cannot access {shown(name)}: "
                              f"{e.strerror or e}") from None
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{flag} {shown(path)}: {shown(name)} "
                              f"{not_regular(_kind_of(st.st_mode), 'file')}: parnn cannot "
                              "write its output there")
        if read_only(st):
            raise ConfigError(f"{flag} {shown(path)}: {shown(name)} is read-only: parnn does not "
                              f"replace a read-only file; make it writable (chmod u+w) or "
                              f"choose another {flag}")


def check_output_file(path, what, overwrite=False, reads=()):
    """Refuse up front a file output (what: how the message names it) that would destroy
    something: one of the files this command reads (`reads`; even with --overwrite), an
    existing file without --overwrite, or anything check_output_dir refuses in its place."""
    p = Path(path)
    for source in reads:
        try:
            same = os.path.samefile(p, source)
        except OSError:
            same = False       # one of them is not there: they are not the same file
        if same:
            raise ConfigError(f"{what} {shown(path)} is the file this command reads: writing it "
                              "would destroy it; choose another name")
    check_output_dir(p.parent if str(p.parent) else ".", what, files=(p.name,))
    if path_kind(p, ConfigError) is not None and not overwrite:
        raise ConfigError(f"{what} {shown(path)} exists: add --overwrite to replace it, or "
                          "choose another name")


def _kind_or_none(p):
    """path_kind() that raises the OSError itself."""
    try:
        return _kind_of(os.stat(p).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return None
