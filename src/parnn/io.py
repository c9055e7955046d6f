"""Files: atomic writes, and model / ensemble / checkpoint files in safetensors.

Atomic writes: every file goes to a temp file in the target's directory, is fsynced, then
os.replace()d onto the target and the directory is fsynced. A crash or an exception leaves
either the old file or the new one, never half of one, and no temp file behind.

Model files are safetensors (tensors + a str->str header; no pickle, so loading a file cannot
run code). The header holds one key, "parnn", whose value is a JSON document:

    {"format": 1, "kind": "model" | "ensemble" | "checkpoint", "writer": "parnn 0.1.0",
     "spec": {...Spec.to_dict()...},          # model and ensemble
     "meta": {...whatever the caller gave...},
     "params_sha256": "<hex>",                # model: SHA-256 of the little-endian params
     "members_sha256": ["<hex>", ...],        # ensemble: one per member
     "sha256": "<hex>",                       # checkpoint: see _arrays_sha256
     "header_sha256": "<hex>"}                # all of the above (every key but this one)

The header checksum makes a damaged spec, meta or class name as detectable as damaged
parameters; files written before it existed have none and are read without it.

Tensors: a model stores its flat buffer as "params"; an ensemble stores "member0.params",
"member1.params", ... and ONE spec shared by all members (members of an ensemble are trained
with the same configuration; save_ensemble refuses mixed specs).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import tempfile
from dataclasses import fields
from pathlib import Path

import numpy as np
import safetensors
import safetensors.numpy

from parnn import __version__
from parnn.errors import ConfigError, ModelFileError
from parnn.core.model import MLP, Spec

FORMAT = 1
META_KEY = "parnn"

# mkstemp creates files 0600; finished files should get the usual 0666 & ~umask like open()
# would. The umask can only be read by setting it, so do that once, at import time.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


# --- atomic writes -------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_open(path, mode="w", encoding="utf-8", newline=None):
    """Open a temp file for writing; on a clean exit it replaces `path`, on an exception it
    is deleted and `path` is untouched. mode is "w" (text) or "wb"."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
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


def _dumps(obj, **kw):
    return json.dumps(obj, sort_keys=True, default=_jsonable, **kw)


def atomic_write_json(path, obj):
    atomic_write_text(path, _dumps(obj, indent=2) + "\n")


def atomic_write_csv(path, rows: list[dict], fieldnames=None):
    """Columns: `fieldnames`, or every key in order of first appearance; missing cells empty."""
    if fieldnames is None:
        fieldnames = list(dict.fromkeys(k for row in rows for k in row))
    with atomic_open(path, "w", newline="") as f:  # the csv module wants newline=""
        w = csv.DictWriter(f, fieldnames=fieldnames)
        w.writeheader()
        w.writerows(rows)


# --- checksums -----------------------------------------------------------------------------

def _sha256(a):
    """SHA-256 of an array's bytes, little-endian (the order safetensors stores)."""
    a = np.asarray(a, dtype=a.dtype.newbyteorder("<"), order="C")
    return hashlib.sha256(a.data).hexdigest()


def _arrays_sha256(arrays):
    """One digest over all arrays in sorted-name order. Name, dtype and shape go in too, so a
    renamed, retyped or reshaped array does not hash like the original."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.asarray(arrays[name])
        a = np.asarray(a, dtype=a.dtype.newbyteorder("<"), order="C")
        h.update(_dumps([name, a.dtype.str, list(a.shape)]).encode())
        h.update(a.data)
    return h.hexdigest()


# --- writing -------------------------------------------------------------------------------

def _header_sha256(header):
    return hashlib.sha256(_dumps({k: v for k, v in header.items()
                                  if k != "header_sha256"}).encode()).hexdigest()


def _write(path, tensors, header):
    # Hash the header as a reader will see it (JSON round trip: tuples become lists, NumPy
    # scalars Python numbers, keys strings), so that any change to it is detected on reading.
    header = json.loads(_dumps({"format": FORMAT, "writer": f"parnn {__version__}", **header}))
    header["header_sha256"] = _header_sha256(header)
    # np.asarray, not np.ascontiguousarray: the latter turns 0-d arrays into shape (1,).
    data = safetensors.numpy.save({k: np.asarray(v, order="C") for k, v in tensors.items()},
                                  metadata={META_KEY: _dumps(header)})
    atomic_write_bytes(path, data)


def save_model(path, net: MLP, meta: dict):
    """One network: its flat buffer as tensor "params", spec + meta + checksum in the header."""
    _write(path, {"params": net.params},
           {"kind": "model", "spec": net.spec.to_dict(), "meta": meta,
            "params_sha256": _sha256(net.params)})


def save_ensemble(path, nets: list[MLP], meta: dict):
    """Several networks with one shared spec (see the module docstring)."""
    if not nets:
        raise ValueError("an ensemble needs at least one network")
    spec = nets[0].spec
    if any(n.spec != spec for n in nets):
        raise ValueError("all members of an ensemble must share one spec")
    _write(path, {f"member{i}.params": n.params for i, n in enumerate(nets)},
           {"kind": "ensemble", "spec": spec.to_dict(), "meta": meta,
            "members_sha256": [_sha256(n.params) for n in nets]})


def save_checkpoint(path, arrays: dict[str, np.ndarray], meta: dict):
    """Any named arrays (params, optimizer state...) + meta, with one checksum over them all."""
    _write(path, arrays, {"kind": "checkpoint", "meta": meta, "sha256": _arrays_sha256(arrays)})


# --- reading -------------------------------------------------------------------------------

def _read(path):
    """(tensors, header) of a parnn safetensors file, or ModelFileError. Tensors are copies."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            # safetensors starts with the header length (u64 LE). Check it against the file
            # size first: on garbage it is a random huge number.
            if len(head) < 8:
                raise ModelFileError(f"{path}: not a model file (only {size} bytes)")
            n = int.from_bytes(head, "little")
            if n > size - 8:
                raise ModelFileError(f"{path}: not a safetensors file or truncated "
                                     f"(header length {n} but the file has {size} bytes)")
            data = head + f.read()
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ModelFileError(f"{path}: is a directory, not a model file") from None
    except OSError as e:
        raise ModelFileError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        tensors = safetensors.numpy.load(data)
        # safetensors validated the header; its metadata is not exposed for bytes, so read it.
        meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
    except (safetensors.SafetensorError, ValueError, TypeError, OSError) as e:
        raise ModelFileError(f"{path}: not a valid safetensors file ({_one_line(e)})") from None
    if META_KEY not in meta:
        raise ModelFileError(f"{path}: a safetensors file but not a parnn one "
                             f"(no '{META_KEY}' metadata)")
    try:
        header = json.loads(meta[META_KEY])
    except ValueError:
        raise ModelFileError(f"{path}: the '{META_KEY}' metadata is not valid JSON") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{path}: the '{META_KEY}' metadata is not a JSON object")
    fmt = header.get("format")
    if type(fmt) is not int or fmt < 1:
        raise ModelFileError(f"{path}: unknown file format {fmt!r}")
    if fmt > FORMAT:
        raise ModelFileError(f"{path}: written by a newer parnn (format {fmt}); "
                             f"this version reads format {FORMAT}")
    # Files written before the header checksum existed have none; any file that has one must match.
    if "header_sha256" in header and header["header_sha256"] != _header_sha256(header):
        raise ModelFileError(f"{path}: the header does not match its checksum: "
                             "the file is damaged or was modified")
    if not isinstance(header.get("meta", {}), dict):
        raise ModelFileError(f"{path}: 'meta' in the metadata is not a JSON object")
    return {k: v.copy() for k, v in tensors.items()}, header


def _one_line(e):
    return " ".join(str(e).split())


def _kind(path, header, *allowed):
    kind = header.get("kind")
    if kind in allowed:
        return kind
    if kind == "ensemble" and "model" in allowed:
        k = len(header.get("members_sha256") or [])
        raise ModelFileError(f"{path}: an ensemble of {k} model{'s' * (k != 1)}, not a single model; "
                             "load it with parnn.io.load_any (`parnn evaluate` handles both)")
    raise ModelFileError(f"{path}: a parnn {kind!r} file, expected {' or '.join(allowed)}")


def _spec(path, header):
    d = header.get("spec")
    names = {f.name for f in fields(Spec)}
    # Every field must be present: a missing one would silently take Spec's default.
    if not isinstance(d, dict) or set(d) != names:
        raise ModelFileError(f"{path}: the network spec is missing or malformed "
                             f"(expected fields {', '.join(sorted(names))})")
    if not isinstance(d["sizes"], list) or any(type(s) is not int for s in d["sizes"]):
        raise ModelFileError(f"{path}: invalid network spec: sizes must be a list of integers")
    try:
        return Spec(**d)
    except ConfigError as e:
        raise ModelFileError(f"{path}: invalid network spec: {e}") from None


def _params(path, tensors, name, spec, sha, what="parameters"):
    """Check one flat buffer against the spec and its checksum; return it."""
    if name not in tensors:
        raise ModelFileError(f"{path}: tensor '{name}' is missing")
    p = tensors[name]
    if p.dtype != np.dtype(spec.dtype):
        raise ModelFileError(f"{path}: tensor '{name}' is {p.dtype}, the spec says {spec.dtype}")
    if p.shape != (spec.n_params,):
        raise ModelFileError(f"{path}: tensor '{name}' has shape {p.shape}, the spec needs "
                             f"({spec.n_params},)")
    if not isinstance(sha, str) or _sha256(p) != sha:
        raise ModelFileError(f"{path}: {what} do not match their checksum: "
                             "the file is damaged or was modified")
    if not np.isfinite(p).all():
        raise ModelFileError(f"{path}: {what} contain NaN or infinity")
    return p


def _no_extra(path, tensors, expected):
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise ModelFileError(f"{path}: unexpected tensors {', '.join(extra)}")


def _model_from(path, tensors, header):
    spec = _spec(path, header)
    params = _params(path, tensors, "params", spec, header.get("params_sha256"))
    _no_extra(path, tensors, ["params"])
    return MLP(spec, params), header.get("meta", {})


def load_model(path) -> tuple[MLP, dict]:
    """(network, the meta given to save_model). ModelFileError on anything wrong."""
    tensors, header = _read(path)
    _kind(path, header, "model")
    return _model_from(path, tensors, header)


def load_any(path) -> tuple[list[MLP], dict]:
    """A model file as a 1-element list, or every member of an ensemble file."""
    tensors, header = _read(path)
    if _kind(path, header, "model", "ensemble") == "model":
        net, meta = _model_from(path, tensors, header)
        return [net], meta
    spec = _spec(path, header)
    shas = header.get("members_sha256")
    if not isinstance(shas, list) or not shas:
        raise ModelFileError(f"{path}: ensemble metadata lists no members")
    names = [f"member{i}.params" for i in range(len(shas))]
    nets = [MLP(spec, _params(path, tensors, name, spec, sha, f"member {i}'s parameters"))
            for i, (name, sha) in enumerate(zip(names, shas))]
    _no_extra(path, tensors, names)
    return nets, header.get("meta", {})


def load_checkpoint(path) -> tuple[dict[str, np.ndarray], dict]:
    """(arrays, meta) as given to save_checkpoint, after checking the checksum. Values are not
    checked for NaN here: the arrays are generic, the caller knows what they mean."""
    tensors, header = _read(path)
    _kind(path, header, "checkpoint")
    if _arrays_sha256(tensors) != header.get("sha256"):
        raise ModelFileError(f"{path}: arrays do not match their checksum: "
                             "the file is damaged or was modified")
    return tensors, header.get("meta", {})


def check_output_dir(path, flag):
    """Refuse up front, before any work, an output directory that cannot be made or written."""
    p = Path(path).absolute()
    q = p
    while not q.exists():  # the nearest existing ancestor is where it would be created
        q = q.parent
    if not q.is_dir():
        where = "is a file" if q == p else f"cannot be created: {q} is a file"
        raise ConfigError(f"{flag} {path}: {where}, not a directory")
    if not os.access(q, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: {q} is not writable")
