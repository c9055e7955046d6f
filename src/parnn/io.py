"""Model, ensemble and checkpoint files in safetensors (written atomically: parnn.atomic).

Files are opened with parnn.paths.open_regular (regular files only, one-line errors).

Model files are safetensors (tensors + a str->str header; no pickle, so loading a file cannot
run code). The header holds one key, "parnn", whose value is a JSON document:

    {"format": 3, "kind": "model" | "ensemble" | "checkpoint", "writer": "parnn 0.1.0",
     "layout": "layers",                      # model and ensemble: how the tensors are named
     "spec": {...Spec.to_dict()...},          # model and ensemble
     "meta": {...whatever the caller gave...},
     "params_sha256": "<hex>",                # model: params_sha256 of its flat buffer
     "members_sha256": ["<hex>", ...],        # ensemble: one per member
     "sha256": "<hex>",                       # checkpoint: see _arrays_sha256
     "header_sha256": "<hex>"}                # all of the above (every key but this one)

Tensors, layout "layers" (what format 3 writes): layer l of a model is "layers.{l}.weight",
shape (out, in), row j holding neuron j's incoming weights, and "layers.{l}.bias", shape
(out,): y = act(x @ weight.T + bias), act = spec["hidden"] for every layer but the last and
spec["output"] for the last. That is torch.nn.Linear's convention, so a PyTorch user maps the
tensors one to one. A network with a layer list (spec["arch"], parnn.core.conv) numbers its
layers as the list does, pooling and flatten layers included (they have no tensors), as
torch.nn.Sequential would; a conv layer's weight is 4-D, (C_out, k, k, C_in) ("OHWI", images
being channels-last: .permute(0, 3, 1, 2) gives PyTorch's Conv2d weight), its bias (C_out,).
Member k of an ensemble is "members.{k}.layers.{l}.weight" and so on, with
ONE spec shared by all members (save_ensemble refuses mixed specs). In parnn's flat buffer
these tensors follow each other in the order weight 0, bias 0, weight 1, ... (core/model.py),
so a model is read straight into ONE flat buffer, which the tensors become views of, and
params_sha256 is the digest of that buffer whatever the layout: the same numbers give the same
digest in a format 2 file and a format 3 one.

Layout "flat" (formats 1 and 2 wrote it; a header without "layout" means it): the flat buffer
as one tensor "params", an ensemble's as "member0.params", "member1.params", ...; still read.
Checkpoints keep their named flat arrays ("params", "optimizer.m", ...: see run/checkpoint.py):
they are parnn's own, read back only by a resumed run, and the optimizer state they hold is
laid out like the flat buffer.

Formats: 1, the first; 2 requires header_sha256; 3 names the tensors per layer. Format 1 files
that have a header checksum load as before; format 1 files without one (written before it
existed) are refused, since their spec and class names cannot be checked, and
`python -m parnn.io upgrade FILE` re-saves a trusted one in the current format.

The checksums detect damage (a flipped bit, a truncated copy, an edited spec); they are no
signature: whoever can rewrite a file can rewrite its checksums too.

Reading checks the file's size against what the safetensors header declares, and the tensors'
names, dtypes and shapes against the parnn spec, before any tensor is read; then each tensor is
read straight into its place (a model's into its flat buffer), so a file is never held in
memory twice.

parnn.modelinfo summarises a model or ensemble file for `parnn info MODEL`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shlex
import sys
from dataclasses import fields
from io import BytesIO

import numpy as np
import safetensors.numpy

from parnn import __version__
from parnn.errors import ConfigError, ModelFileError, ParnnError
from parnn.core.model import MLP, Spec
from parnn.atomic import atomic_write_bytes, dumps
from parnn.paths import open_regular, read_fully, shown

FORMAT = 3  # 2: header_sha256 is required (format 1 files may lack it); 3: tensors per layer
META_KEY = "parnn"
LAYOUTS = ("layers", "flat")   # how a model's tensors are named; "flat" when a header names none
UPGRADE = "python -m parnn.io upgrade"
MAX_HEADER = 100_000_000  # bytes of safetensors JSON header; the safetensors library's own limit

# --- checksums -----------------------------------------------------------------------------

def params_sha256(a) -> str:
    """SHA-256 of an array's bytes in little-endian C order (the order safetensors stores), so
    equal parameters give equal digests on every machine: the one parameter digest of parnn."""
    a = np.asarray(a)
    a = np.asarray(a, dtype=a.dtype.newbyteorder("<"), order="C")
    return hashlib.sha256(a.data).hexdigest()


def _arrays_sha256(arrays):
    """One digest over all arrays in sorted-name order. Name, dtype and shape go in too, so a
    renamed, retyped or reshaped array does not hash like the original."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.asarray(arrays[name])
        a = np.asarray(a, dtype=a.dtype.newbyteorder("<"), order="C")
        h.update(dumps([name, a.dtype.str, list(a.shape)]).encode())
        h.update(a.data)
    return h.hexdigest()


def _header_sha256(header):
    return hashlib.sha256(dumps({k: v for k, v in header.items()
                                  if k != "header_sha256"}).encode()).hexdigest()


# --- writing -------------------------------------------------------------------------------

def _encode(tensors, header) -> bytes:
    # Hash the header as a reader will see it (JSON round trip: tuples become lists, NumPy
    # scalars Python numbers, keys strings), so that any change to it is detected on reading.
    header = json.loads(dumps({"format": FORMAT, "writer": f"parnn {__version__}", **header}))
    header["header_sha256"] = _header_sha256(header)
    # np.asarray, not np.ascontiguousarray: the latter turns 0-d arrays into shape (1,).
    return safetensors.numpy.save({k: np.asarray(v, order="C") for k, v in tensors.items()},
                                  metadata={META_KEY: dumps(header)})


def _write(path, tensors, header):
    atomic_write_bytes(path, _encode(tensors, header))


def _printable_class_names(meta):
    """A control character in a class name would reach the terminal as is when printed."""
    names = meta.get("class_names") if isinstance(meta, dict) else None
    if isinstance(names, (list, tuple)):
        for i, name in enumerate(names):
            if isinstance(name, str) and not name.isprintable():
                return f"class name {i} ({shown(name)}) contains a control character"
    return None


def layer_tensors(spec, flat, prefix="") -> dict[str, np.ndarray]:
    """A network's tensors as a model file names them, as views into its flat buffer, in the
    buffer's order: {prefix + "layers.0.weight": W_0 (out, in), prefix + "layers.0.bias": b_0,
    prefix + "layers.1.weight": ...}. No copies."""
    return _views(spec, "layers", flat, prefix)


def _views(spec, layout, flat, prefix=""):
    return {name: flat[o:o + math.prod(shape)].reshape(shape)
            for name, shape, o in _tensor_layout(spec, layout, prefix)}


def _tensor_layout(spec, layout, prefix=""):
    """(name, shape, offset in the flat buffer) of each tensor of one network, in buffer order.
    The offsets come from the spec (core/model.py's layout), so nothing here repeats it."""
    if layout == "flat":
        return [(prefix + "params", (spec.n_params,), 0)]
    entries, o = [], 0
    for l, layer in enumerate(spec.layers(compiled=False)):   # l counts pool and flatten too
        for name, shape in zip(("weight", "bias"), layer.shapes):
            entries.append((f"{prefix}layers.{l}.{name}", shape, o))
            o += math.prod(shape)
    return entries


def _member_prefix(layout, k):
    return f"members.{k}." if layout == "layers" else f"member{k}."


def save_model(path, net: MLP, meta: dict):
    """One network: its tensors per layer (layer_tensors), spec + meta + checksums in the
    header."""
    if problem := _printable_class_names(meta):
        raise ValueError(problem)
    _write(path, layer_tensors(net.spec, net.params),
           {"kind": "model", "layout": "layers", "spec": net.spec.to_dict(), "meta": meta,
            "params_sha256": params_sha256(net.params)})


def save_ensemble(path, nets: list[MLP], meta: dict):
    """Several networks with one shared spec (see the module docstring)."""
    if not nets:
        raise ValueError("an ensemble needs at least one network")
    spec = nets[0].spec
    if any(n.spec != spec for n in nets):
        raise ValueError("all members of an ensemble must share one spec")
    if problem := _printable_class_names(meta):
        raise ValueError(problem)
    tensors = {}
    for k, net in enumerate(nets):
        tensors |= layer_tensors(spec, net.params, _member_prefix("layers", k))
    _write(path, tensors,
           {"kind": "ensemble", "layout": "layers", "spec": spec.to_dict(), "meta": meta,
            "members_sha256": [params_sha256(n.params) for n in nets]})


def checkpoint_bytes(arrays: dict[str, np.ndarray], meta: dict) -> bytes:
    """What save_checkpoint writes, as bytes: how a checkpoint's state travels between MPI
    ranks (parnn.distributed.checkpoints), read back by load_checkpoint(name, data)."""
    return _encode(arrays, {"kind": "checkpoint", "meta": meta, "sha256": _arrays_sha256(arrays)})


def save_checkpoint(path, arrays: dict[str, np.ndarray], meta: dict):
    """Any named arrays (params, optimizer state...) + meta, with one checksum over them all."""
    atomic_write_bytes(path, checkpoint_bytes(arrays, meta))


def file_bytes(path) -> bytes:
    """A regular file's bytes, as many as it had when opened; ModelFileError naming the path."""
    with open_regular(path, ModelFileError, "model file") as f:
        try:
            buf = np.empty(os.fstat(f.fileno()).st_size, np.uint8)
            return buf[:read_fully(f, buf)].tobytes()
        except OSError as e:
            raise ModelFileError(f"{shown(path)}: cannot read: {e.strerror or e}") from None


# --- reading: the safetensors container ----------------------------------------------------

# safetensors dtype names; tensors are little-endian. (BF16 and the F8 kinds have no NumPy type.)
_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
           "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?"}


def _one_line(e):
    return " ".join(str(e).split())


def _no_duplicate_keys(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate keys")
    return dict(pairs)


def _index(path, f, size):
    """The safetensors header: ({name: (dtype, shape, begin)}, {metadata}), after checking that
    the tensors it declares tile the rest of the file exactly: nothing past the header is read."""
    head = f.read(8)
    if len(head) < 8:
        raise ModelFileError(f"{shown(path)}: not a model file (only {size} bytes)")
    # The header length (u64 LE) comes first: on garbage it is a random huge number.
    n = int.from_bytes(head, "little")
    if n > size - 8:
        raise ModelFileError(f"{shown(path)}: not a safetensors file or truncated "
                             f"(header length {n} but the file has {size} bytes)")
    bad = f"{shown(path)}: not a valid safetensors file"
    if n > MAX_HEADER:
        raise ModelFileError(f"{bad} (a header of {n} bytes)")
    try:
        doc = json.loads(f.read(n), object_pairs_hook=_no_duplicate_keys)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ModelFileError(f"{bad} (the header is not JSON: {_one_line(e)[:80]})") from None
    if not isinstance(doc, dict):
        raise ModelFileError(f"{bad} (the header is not a JSON object)")
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ModelFileError(f"{bad} (__metadata__ is not a map of strings)")
    index, spans = {}, []
    for name, t in doc.items():
        ok = (isinstance(t, dict) and set(t) == {"dtype", "shape", "data_offsets"}
              and isinstance(t["dtype"], str) and t["dtype"] in _DTYPES and isinstance(t["shape"], list)
              and all(type(d) is int and d >= 0 for d in t["shape"])
              and isinstance(t["data_offsets"], list) and len(t["data_offsets"]) == 2
              and all(type(o) is int and o >= 0 for o in t["data_offsets"]))
        if not ok:
            raise ModelFileError(f"{bad} (tensor {shown(name)!r}: malformed entry)")
        dtype, (begin, end) = np.dtype(_DTYPES[t["dtype"]]), t["data_offsets"]
        if end - begin != math.prod(t["shape"]) * dtype.itemsize:
            raise ModelFileError(f"{bad} (tensor {shown(name)!r}: {end - begin} bytes for shape "
                                 f"{t['shape']} of {t['dtype']})")
        index[name] = (dtype, tuple(t["shape"]), begin)
        spans.append((begin, end))
    total = 0
    for begin, end in sorted(spans):
        if begin != total:
            raise ModelFileError(f"{bad} (tensors overlap or leave gaps)")
        total = end
    have = size - 8 - n
    if have < total:
        raise ModelFileError(f"{shown(path)}: truncated: the header declares {total} bytes of "
                             f"tensors but {have} follow it")
    if have > total:
        raise ModelFileError(f"{bad} ({have - total} bytes after the last tensor)")
    return index, metadata


def _tensors(path, f, index, into):
    """Each tensor read, in file order (the index was checked): into into[name] (a
    little-endian array of its dtype and shape, e.g. a view of a flat buffer) when given, else
    into its own new array, returned in native byte order."""
    out = {}
    for name, (dtype, shape, _) in sorted(index.items(), key=lambda kv: kv[1][2]):
        a = into[name] if name in into else np.empty(shape, dtype)
        if read_fully(f, a.reshape(-1).view(np.uint8)) != a.nbytes:
            raise ModelFileError(f"{shown(path)}: truncated while reading tensor {shown(name)!r}")
        if name not in into:
            out[name] = a.astype(dtype.newbyteorder("="), copy=False)
    return out


# --- reading: parnn's header ---------------------------------------------------------------

def _read(path, check=None, legacy=False, data=None):
    """(tensors, header) of a parnn safetensors file, or ModelFileError. check(header, index)
    runs before any tensor is read, and may return {name: array} to read those tensors into
    (they are then left out of the tensors returned). legacy: accept a format 1 file without a
    header checksum. data: the file's bytes, already read (path only names them)."""
    opened = open_regular(path, ModelFileError, "model file") if data is None else BytesIO(data)
    with opened as f:
        try:
            size = os.fstat(f.fileno()).st_size if data is None else len(data)
            index, metadata = _index(path, f, size)
            header = _header(path, metadata, legacy)
            into = check(header, index) if check is not None else None
            return _tensors(path, f, index, into or {}), header
        except OSError as e:
            raise ModelFileError(f"{shown(path)}: cannot read: {e.strerror or e}") from None


def _header(path, metadata, legacy):
    if META_KEY not in metadata:
        raise ModelFileError(f"{shown(path)}: a safetensors file but not a parnn one "
                             f"(no '{META_KEY}' metadata)")
    try:
        header = json.loads(metadata[META_KEY])
    except (ValueError, RecursionError):
        raise ModelFileError(f"{shown(path)}: the '{META_KEY}' metadata is not valid JSON") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{shown(path)}: the '{META_KEY}' metadata is not a JSON object")
    fmt = header.get("format")
    if fmt is None:          # e.g. one flipped byte in the key: say what is missing
        raise ModelFileError(f"{shown(path)}: its parnn header names no file format (a damaged "
                             "or foreign file)")
    if type(fmt) is not int or fmt < 1:
        raise ModelFileError(f"{shown(path)}: unknown file format {fmt!r}")
    if fmt > FORMAT:
        raise ModelFileError(f"{shown(path)}: written by a newer parnn (format {fmt}); "
                             f"this version reads format {FORMAT}")
    if "header_sha256" not in header:
        if fmt >= 2:
            raise ModelFileError(f"{shown(path)}: the header has no checksum: the file is "
                                 "damaged or was modified")
        if not legacy:
            raise ModelFileError(
                f"{shown(path)}: written by an older parnn (format 1) without a header checksum, "
                "so its spec and class names cannot be checked; if you trust this file, re-save "
                f"it in format {FORMAT} with `{UPGRADE} {shlex.quote(shown(path))}`")
    elif header["header_sha256"] != _header_sha256(header):
        raise ModelFileError(f"{shown(path)}: the header does not match its checksum: "
                             "the file is damaged or was modified")
    if not isinstance(header.get("meta", {}), dict):
        raise ModelFileError(f"{shown(path)}: 'meta' in the metadata is not a JSON object")
    return header


def _kind(path, header, *allowed):
    kind = header.get("kind")
    if kind in allowed:
        return kind
    if kind == "ensemble" and "model" in allowed:
        k = len(header.get("members_sha256") or [])
        raise ModelFileError(f"{shown(path)}: an ensemble of {k} model{'s' * (k != 1)}, not a "
                             "single model; load it with parnn.io.load_any (`parnn evaluate` "
                             "handles both)")
    raise ModelFileError(f"{shown(path)}: a parnn {shown(repr(kind))} file, expected "
                         f"{' or '.join(allowed)}")


def network_spec(path, d) -> Spec:
    """The network Spec stored as dict d (a model's header["spec"], a checkpoint's
    meta["spec"]), or ModelFileError naming path. Every field must be present."""
    names = {f.name for f in fields(Spec)}
    # A missing field would silently take Spec's default; only "arch" may be absent (an MLP's
    # spec has none, so files from before layer lists read as they are).
    if not isinstance(d, dict) or not names - {"arch"} <= set(d) <= names:
        raise ModelFileError(f"{shown(path)}: the network spec is missing or malformed "
                             f"(expected fields {', '.join(sorted(names - {'arch'}))}"
                             ", and arch for a layer list)")
    if "arch" in d and (not isinstance(d["arch"], str) or not d["arch"]):
        raise ModelFileError(f"{shown(path)}: invalid network spec: arch must be a non-empty "
                             "layer list")
    if not isinstance(d["sizes"], list) or any(type(s) is not int for s in d["sizes"]):
        raise ModelFileError(f"{shown(path)}: invalid network spec: sizes must be a list of "
                             "integers")
    try:
        return Spec(**d)
    except ConfigError as e:
        raise ModelFileError(f"{shown(path)}: invalid network spec: {shown(e)}") from None


def _layout(path, header):
    layout = header.get("layout", "flat")
    if layout not in LAYOUTS:
        raise ModelFileError(f"{shown(path)}: unknown tensor layout {shown(repr(layout))} "
                             f"(this version reads {' and '.join(LAYOUTS)})")
    return layout


def _expect(path, index, shapes, spec):
    """Before reading: each tensor of shapes ({name: shape}) is there with the spec's dtype
    and that shape, and nothing else is."""
    for name, want in shapes.items():
        if name not in index:
            raise ModelFileError(f"{shown(path)}: tensor '{name}' is missing")
        dtype, shape, _ = index[name]
        if dtype != np.dtype(spec.dtype).newbyteorder("<"):   # as stored: little-endian
            raise ModelFileError(f"{shown(path)}: tensor '{name}' is {dtype.name}, the spec says "
                                 f"{spec.dtype}")
        if shape != want:
            raise ModelFileError(f"{shown(path)}: tensor '{name}' has shape {shape}, the spec "
                                 f"needs {want}")
    extra = sorted(set(index) - set(shapes))
    if extra:
        raise ModelFileError(f"{shown(path)}: unexpected tensors "
                             f"{', '.join(shown(x) for x in extra)}")


def _params(path, p, sha, what="parameters"):
    """A flat buffer against its checksum, then finite."""
    if not isinstance(sha, str) or params_sha256(p) != sha:
        raise ModelFileError(f"{shown(path)}: {what} do not match their checksum: "
                             "the file is damaged or was modified")
    if not np.isfinite(p).all():
        raise ModelFileError(f"{shown(path)}: {what} contain NaN or infinity")
    return p


def _members(header):
    shas = header.get("members_sha256")
    return shas if isinstance(shas, list) else []


def _load(path, allowed, legacy=False, data=None):
    """(kind, networks or arrays, header) of a file of one of the allowed kinds, checked."""
    found = {}

    def check(header, index):
        kind = found["kind"] = _kind(path, header, *allowed)
        if kind == "checkpoint":
            return None
        spec = found["spec"] = network_spec(path, header.get("spec"))
        layout = _layout(path, header)
        if kind == "ensemble" and not _members(header):
            raise ModelFileError(f"{shown(path)}: ensemble metadata lists no members")
        prefixes = [""] if kind == "model" else \
            [_member_prefix(layout, k) for k in range(len(_members(header)))]
        _expect(path, index, {name: shape for prefix in prefixes
                              for name, shape, _ in _tensor_layout(spec, layout, prefix)}, spec)
        if problem := _printable_class_names(header.get("meta", {})):
            raise ModelFileError(f"{shown(path)}: {problem}: the file is damaged or was modified")
        # Sizes checked: one flat buffer per network (little-endian, as stored), and each of
        # its tensors a view into it to read into.
        stored = np.dtype(spec.dtype).newbyteorder("<")
        buffers = found["buffers"] = [np.empty(spec.n_params, stored) for _ in prefixes]
        return {name: view for prefix, flat in zip(prefixes, buffers)
                for name, view in _views(spec, layout, flat, prefix).items()}

    tensors, header = _read(path, check, legacy, data)
    kind = found["kind"]
    if kind == "checkpoint":
        if _arrays_sha256(tensors) != header.get("sha256"):
            raise ModelFileError(f"{shown(path)}: arrays do not match their checksum: "
                                 "the file is damaged or was modified")
        return kind, tensors, header
    buffers = [b.astype(b.dtype.newbyteorder("="), copy=False) for b in found["buffers"]]
    if kind == "model":
        shas, what = [header.get("params_sha256")], ["parameters"]
    else:
        shas = _members(header)
        what = [f"member {k}'s parameters" for k in range(len(shas))]
    return kind, [MLP(found["spec"], _params(path, flat, sha, w))
                  for flat, sha, w in zip(buffers, shas, what)], header


def load_model(path) -> tuple[MLP, dict]:
    """(network, the meta given to save_model). ModelFileError on anything wrong."""
    _, nets, header = _load(path, ("model",))
    return nets[0], header.get("meta", {})


def load_any(path) -> tuple[list[MLP], dict]:
    """A model file as a 1-element list, or every member of an ensemble file."""
    _, nets, header = _load(path, ("model", "ensemble"))
    return nets, header.get("meta", {})


def load_checkpoint(path, data=None) -> tuple[dict[str, np.ndarray], dict]:
    """(arrays, meta) as given to save_checkpoint, after checking the checksum; data: the
    file's bytes (checkpoint_bytes), path then only names them. Values are not checked for NaN
    here: the arrays are generic, the caller knows what they mean."""
    _, arrays, header = _load(path, ("checkpoint",), data=data)
    return arrays, header.get("meta", {})


def upgrade(path) -> str:
    """Re-save a model, ensemble or checkpoint file in the current format (a model's tensors
    then per layer), after every check but the header checksum that format 1 files may lack.
    Only for files you trust: without that checksum nobody can tell whether the spec or the
    class names were edited."""
    kind, content, header = _load(path, ("model", "ensemble", "checkpoint"), legacy=True)
    meta = header.get("meta", {})
    if kind == "model":
        save_model(path, content[0], meta)
    elif kind == "ensemble":
        save_ensemble(path, content, meta)
    else:
        save_checkpoint(path, content, meta)
    return kind


def _main(argv):
    """python -m parnn.io upgrade FILE...: see upgrade()."""
    if len(argv) < 2 or argv[0] != "upgrade":
        print("usage: python -m parnn.io upgrade FILE...", file=sys.stderr)
        return 2
    for path in argv[1:]:
        try:
            kind = upgrade(path)
        except (ParnnError, OSError, ValueError) as e:
            detail = e.strerror if isinstance(e, OSError) and e.strerror else e
            print(f"parnn: error: {shown(path) + ': ' if isinstance(e, OSError) else ''}"
                  f"{shown(detail)}", file=sys.stderr)
            return 2
        print(f"{shown(path)}: {kind} re-saved in format {FORMAT}")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
