import contextlib
import csv
import hashlib
import json
import os
import signal

import numpy as np
import pytest
import safetensors.numpy

from parnn import io
from parnn.errors import ModelFileError
from parnn.core.model import MLP, Spec

META = {"train": {"lr": 0.1, "epochs": 3}, "preprocessing": {"scale": "x/255", "input_shape": [28, 28]},
        "dataset_sha256": "ab" * 32, "class_names": ["a", "b", "c"]}


def small_net(dtype="float64", seed=0):
    return MLP(Spec((6, 5, 3), "tanh", "softmax", "cross_entropy", dtype), seed=seed)


def sha(a):
    return hashlib.sha256(np.ascontiguousarray(a, a.dtype.newbyteorder("<")).tobytes()).hexdigest()


def header(net, **over):
    h = {"format": io.FORMAT, "kind": "model", "spec": net.spec.to_dict(), "meta": {},
         "params_sha256": sha(net.params)}
    h.update(over)
    return h


def write_raw(path, tensors, parnn_meta, rehash=True):
    """A safetensors file with any tensors and any 'parnn' metadata (str, dict or None); a dict
    gets a matching header checksum unless rehash is False (as a careful forger would)."""
    if isinstance(parnn_meta, dict) and rehash:
        parnn_meta = dict(parnn_meta, header_sha256=io._header_sha256(parnn_meta))
    md = None if parnn_meta is None else {
        "parnn": parnn_meta if isinstance(parnn_meta, str) else json.dumps(parnn_meta)}
    path.write_bytes(safetensors.numpy.save(tensors, metadata=md))
    return path


def assert_bad(path, *words, load=io.load_model):
    with pytest.raises(ModelFileError) as e:
        load(path)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg
    for w in words:
        assert w in msg, msg
    return msg


# --- round trips ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_model_round_trip_is_bitwise(tmp_path, dtype):
    net = small_net(dtype)
    path = tmp_path / "m.safetensors"
    io.save_model(path, net, META)
    got, meta = io.load_model(path)
    assert got.spec == net.spec
    assert got.params.dtype == np.dtype(dtype)
    assert got.params.tobytes() == net.params.tobytes()
    assert meta == META
    p = got.params
    assert p.flags.c_contiguous and p.flags.writeable and p.flags.owndata
    p += 1  # the views follow the buffer: the MLP really owns it
    assert got.W[0].base is p or np.shares_memory(got.W[0], p)


def test_file_is_plain_safetensors_with_one_params_tensor(tmp_path):
    net = small_net()
    path = tmp_path / "m.safetensors"
    io.save_model(path, net, {"x": np.int64(3)})  # numpy scalars in meta are fine
    with safetensors.safe_open(path, "np") as f:
        assert list(f.keys()) == ["params"]
        h = json.loads(f.metadata()["parnn"])
    assert h["format"] == io.FORMAT == 2 and h["spec"] == net.spec.to_dict()
    assert h["params_sha256"] == sha(net.params) and h["meta"] == {"x": 3}


def test_ensemble_round_trip_and_load_any(tmp_path):
    nets = [small_net(seed=s) for s in range(3)]
    path = tmp_path / "e.safetensors"
    io.save_ensemble(path, nets, META)
    got, meta = io.load_any(path)
    assert meta == META and len(got) == 3
    for a, b in zip(got, nets):
        assert a.spec == b.spec and a.params.tobytes() == b.params.tobytes()
    assert_bad(path, "ensemble of 3", "load_any")

    single = tmp_path / "m.safetensors"
    io.save_model(single, nets[0], {"k": 1})
    got, meta = io.load_any(single)
    assert len(got) == 1 and meta == {"k": 1}


def test_ensemble_refuses_mixed_specs_and_empty(tmp_path):
    with pytest.raises(ValueError):
        io.save_ensemble(tmp_path / "e", [small_net("float32"), small_net("float64")], {})
    with pytest.raises(ValueError):
        io.save_ensemble(tmp_path / "e", [], {})


def test_damaged_ensemble_member(tmp_path):
    nets = [small_net(seed=s) for s in range(2)]
    path = tmp_path / "e.safetensors"
    io.save_ensemble(path, nets, {})
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # last byte belongs to the last member
    path.write_bytes(bytes(data))
    assert_bad(path, "member 1", "checksum", load=io.load_any)


def test_checkpoint_round_trip(tmp_path):
    arrays = {"params": np.arange(5.0), "adam.m": np.ones(5, np.float32),
              "step": np.array(7, np.int64), "empty": np.zeros(0)}
    path = tmp_path / "ck.safetensors"
    io.save_checkpoint(path, arrays, {"epoch": 2})
    got, meta = io.load_checkpoint(path)
    assert meta == {"epoch": 2} and set(got) == set(arrays)
    for k in arrays:
        assert got[k].dtype == arrays[k].dtype and got[k].shape == arrays[k].shape
        assert got[k].tobytes() == arrays[k].tobytes()
    assert_bad(path, "'checkpoint'", "expected model")  # not a model
    io.save_model(path, small_net(), {})
    assert_bad(path, "'model'", "expected checkpoint", load=io.load_checkpoint)


def test_checkpoint_checksum_covers_names(tmp_path):
    path = tmp_path / "ck.safetensors"
    io.save_checkpoint(path, {"a": np.arange(3.0)}, {})
    h = json.loads(safetensors.safe_open(path, "np").metadata()["parnn"])
    write_raw(path, {"b": np.arange(3.0)}, h)  # same bytes, renamed
    assert_bad(path, "checksum", load=io.load_checkpoint)


# --- bad files -----------------------------------------------------------------------------

def test_missing_empty_random_directory(tmp_path):
    assert_bad(tmp_path / "nope.safetensors", "no such file")
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    assert_bad(empty, "0 bytes")
    rnd = tmp_path / "random.bin"
    rnd.write_bytes(np.random.default_rng(0).bytes(4096))
    assert_bad(rnd, "header length")
    assert_bad(tmp_path, "directory")


def test_random_bytes_with_plausible_header_length(tmp_path):
    rnd = tmp_path / "random.bin"
    rnd.write_bytes((100).to_bytes(8, "little") + np.random.default_rng(1).bytes(200))
    assert_bad(rnd, "not a valid safetensors file")


def test_truncated_at_several_points(tmp_path):
    path = tmp_path / "m.safetensors"
    io.save_model(path, small_net(), {})
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    for cut in (1, 7, 8, 12, 8 + n // 2, 8 + n, 8 + n + 9, len(data) - 1):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        assert_bad(bad)


def test_header_length_larger_than_file(tmp_path):
    path = tmp_path / "m.safetensors"
    io.save_model(path, small_net(), {})
    data = path.read_bytes()
    path.write_bytes((2**62).to_bytes(8, "little") + data[8:])
    assert_bad(path, "header length")


def test_metadata_missing_or_not_json_or_not_object(tmp_path):
    p = small_net().params
    assert_bad(write_raw(tmp_path / "a", {"params": p}, None), "no 'parnn' metadata")
    assert_bad(write_raw(tmp_path / "b", {"params": p}, "{not json"), "not valid JSON")
    assert_bad(write_raw(tmp_path / "c", {"params": p}, "[1, 2]"), "not a JSON object")


@pytest.mark.parametrize("fmt,words", [(3, ["newer", "format 3"]), (0, ["unknown file format"]),
                                       ("1", ["unknown file format"]), (None, ["unknown"])])
def test_wrong_format_version(tmp_path, fmt, words):
    net = small_net()
    assert_bad(write_raw(tmp_path / "m", {"params": net.params}, header(net, format=fmt)), *words)


def test_invalid_spec(tmp_path):
    net = small_net()
    spec = dict(net.spec.to_dict(), hidden="swish")
    assert_bad(write_raw(tmp_path / "a", {"params": net.params}, header(net, spec=spec)),
               "invalid network spec", "swish")
    spec = net.spec.to_dict()
    del spec["dtype"]  # would silently default to float64
    assert_bad(write_raw(tmp_path / "b", {"params": net.params}, header(net, spec=spec)),
               "spec is missing or malformed")
    spec = dict(net.spec.to_dict(), sizes=[6, "5", 3])
    assert_bad(write_raw(tmp_path / "c", {"params": net.params}, header(net, spec=spec)),
               "sizes")


def test_params_missing_wrong_shape_wrong_dtype_extra(tmp_path):
    net = small_net()
    assert_bad(write_raw(tmp_path / "a", {"weights": net.params}, header(net)),
               "'params' is missing")
    short = net.params[:-1].copy()
    assert_bad(write_raw(tmp_path / "b", {"params": short}, header(net, params_sha256=sha(short))),
               "shape")
    f32 = net.params.astype(np.float32)
    assert_bad(write_raw(tmp_path / "c", {"params": f32}, header(net, params_sha256=sha(f32))),
               "float32", "float64")
    assert_bad(write_raw(tmp_path / "d", {"params": net.params, "x": np.zeros(1)}, header(net)),
               "unexpected tensors x")


def test_one_flipped_byte_fails_the_checksum(tmp_path):
    path = tmp_path / "m.safetensors"
    io.save_model(path, small_net(), {})
    data = bytearray(path.read_bytes())
    data[len(data) - 20] ^= 0x10  # inside the params, past the header
    path.write_bytes(bytes(data))
    assert_bad(path, "do not match their checksum", "damaged or was modified")


def test_nan_params_with_matching_checksum(tmp_path):
    net = small_net()
    p = net.params.copy()
    p[3] = np.nan
    assert_bad(write_raw(tmp_path / "m", {"params": p}, header(net, params_sha256=sha(p))), "NaN")
    p[3] = np.inf
    assert_bad(write_raw(tmp_path / "m", {"params": p}, header(net, params_sha256=sha(p))), "NaN")


def test_unknown_kind(tmp_path):
    net = small_net()
    assert_bad(write_raw(tmp_path / "m", {"params": net.params}, header(net, kind="optimizer")),
               "'optimizer'")


# --- atomic writes -------------------------------------------------------------------------

def leftovers(d):
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".tmp"))


def test_exception_midway_leaves_old_file_and_no_temp(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with io.atomic_open(target, "w") as f:
            f.write("new half")
            raise RuntimeError("boom")
    assert target.read_text() == "old" and leftovers(tmp_path) == []

    def rows():
        yield {"a": 1}
        raise RuntimeError("generator died")

    with pytest.raises(RuntimeError):
        with io.atomic_open(target, "w") as f:
            csv.writer(f).writerows([r.values()] for r in rows())
    assert target.read_text() == "old" and leftovers(tmp_path) == []


def test_failing_replace_leaves_old_model(tmp_path, monkeypatch):
    target = tmp_path / "m.safetensors"
    io.save_model(target, small_net(seed=1), {"v": 1})
    before = target.read_bytes()

    def fail(*a):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        io.save_model(target, small_net(seed=2), {"v": 2})
    assert target.read_bytes() == before and leftovers(tmp_path) == []


def test_atomic_helpers(tmp_path):
    d = tmp_path / "new" / "dirs"
    io.atomic_write_bytes(d / "b.bin", b"\x00\x01")
    assert (d / "b.bin").read_bytes() == b"\x00\x01"
    umask = os.umask(0)
    os.umask(umask)
    assert (d / "b.bin").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    io.atomic_write_text(d / "t.txt", "héllo")
    assert (d / "t.txt").read_text(encoding="utf-8") == "héllo"
    io.atomic_write_json(d / "j.json", {"b": np.float32(0.5), "a": np.arange(2)})
    assert json.loads((d / "j.json").read_text()) == {"a": [0, 1], "b": 0.5}
    io.atomic_write_csv(d / "c.csv", [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "acc": 0.9}])
    with open(d / "c.csv", newline="") as f:
        assert list(csv.DictReader(f)) == [{"epoch": "1", "loss": "0.5", "acc": ""},
                                           {"epoch": "2", "loss": "", "acc": "0.9"}]
    assert leftovers(d) == []
    with pytest.raises(ValueError):
        with io.atomic_open(d / "x", "a"):
            pass


# --- issue 14: the reader checks sizes first; digests; read-only targets ----------------------

def test_params_sha256_is_the_digest_of_the_little_endian_bytes():
    p = small_net().params
    assert io.params_sha256(p) == hashlib.sha256(p.astype("<f8").tobytes()).hexdigest()
    assert io.params_sha256(p.astype(">f8")) == io.params_sha256(p)  # same numbers, same digest
    assert io.params_sha256(p[::2]) == io.params_sha256(p[::2].copy())
    assert io.params_sha256(p.astype(np.float32)) != io.params_sha256(p)


def test_the_reader_agrees_with_the_safetensors_library(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {f"a{i}": rng.integers(0, 100, (3, 2)).astype(dt)
              for i, dt in enumerate(["f8", "f4", "f2", "i8", "i4", "i2", "i1", "u8", "u4", "u2",
                                      "u1", "?"])}
    arrays |= {"scalar": np.array(2.5), "empty": np.zeros((0, 4), np.float32)}
    path = tmp_path / "ck.safetensors"
    io.save_checkpoint(path, arrays, {})
    got, _ = io.load_checkpoint(path)
    ref = safetensors.numpy.load(path.read_bytes())
    assert set(got) == set(ref) == set(arrays)
    for k, a in ref.items():
        assert got[k].dtype == a.dtype and got[k].shape == a.shape, k
        assert got[k].tobytes() == a.tobytes(), k
        assert got[k].flags.owndata and got[k].flags.writeable


def safetensors_file(path, index, data=b""):
    text = json.dumps(index).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)
    return path


@pytest.mark.parametrize("index,data,words", [
    ({"a": {"dtype": "F64", "shape": [2], "data_offsets": [0, 16]}}, bytes(26),
     ["10 bytes after the last tensor"]),
    ({"a": {"dtype": "F64", "shape": [2], "data_offsets": [0, 16]}}, bytes(6), ["truncated"]),
    ({"a": {"dtype": "F64", "shape": [2], "data_offsets": [0, 8]}}, bytes(8), ["8 bytes for shape"]),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12), ["overlap"]),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8), ["gaps"]),
    ({"a": {"dtype": "BF16", "shape": [1], "data_offsets": [0, 2]}}, bytes(2), ["malformed"]),
    ({"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, bytes(4), ["malformed"]),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, bytes(4), ["malformed"]),
    ({"__metadata__": {"parnn": 3}}, b"", ["__metadata__"]),
], ids=["trailing", "truncated", "size-vs-shape", "overlap", "gap", "bf16", "dtype-list",
        "negative-dim", "metadata-not-str"])
def test_the_safetensors_index_is_checked_against_the_file(tmp_path, index, data, words):
    assert_bad(safetensors_file(tmp_path / "x.safetensors", index, data), *words)


def test_duplicate_keys_in_the_index_are_refused(tmp_path):
    text = b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, ' \
           b'"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}'
    path = tmp_path / "dup.safetensors"
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"\x00")
    assert_bad(path, "not a valid safetensors file", "duplicate")


@contextlib.contextmanager
def no_hang(seconds=10):
    """A FIFO opened for a blocking read would wait forever: fail instead."""
    def alarm(signum, frame):
        raise TimeoutError(f"no result after {seconds}s")
    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_special_files_are_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    with no_hang():
        assert_bad(tmp_path / "fifo", "is a FIFO, not a model file")
    assert_bad("/dev/zero", "is a character device, not a model file")
    assert_bad(tmp_path / ("x" * 300), "File name too long")


def test_a_read_only_file_is_not_replaced(tmp_path):
    target = tmp_path / "m.safetensors"
    io.save_model(target, small_net(seed=1), {})
    target.chmod(0o444)
    before = target.read_bytes()
    with pytest.raises(PermissionError, match="m.safetensors is read-only"):
        io.save_model(target, small_net(seed=2), {})
    assert target.read_bytes() == before and leftovers(tmp_path) == []
    target.chmod(0o644)
    io.save_model(target, small_net(seed=2), {})
    assert target.read_bytes() != before


def test_class_names_with_control_characters(tmp_path):
    with pytest.raises(ValueError, match="class name 1"):
        io.save_model(tmp_path / "m", small_net(), {"class_names": ["a", "b\nc", "d"]})
    net = small_net()
    h = header(net, meta={"class_names": ["a", "b\x1b[2Jc", "d"]})
    msg = assert_bad(write_raw(tmp_path / "m", {"params": net.params}, h), "control character")
    assert "\x1b" not in msg and "\\x1b" in msg


def test_shown_escapes_only_what_cannot_be_printed():
    assert io.shown("/data/fashion é") == "/data/fashion é"
    assert io.shown("a\nb\x01") == "a\\nb\\x01"
    assert io.shown(b"/x\xff".decode("utf-8", "surrogateescape")) == "/x\\udcff"


@pytest.mark.parametrize("where,words", [
    ("/proc/parnn-x", ["/proc is not writable"]),
    ("{t}/file/sub", ["cannot be created", "is a file"]),
    ("{t}/" + "y" * 300, ["File name too long"]),
])
def test_check_output_dir(tmp_path, where, words):
    from parnn.errors import ConfigError

    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError) as e:
        io.check_output_dir(where.replace("{t}", str(tmp_path)), "--out")
    assert str(e.value).startswith("--out ") and "\n" not in str(e.value)
    for w in words:
        assert w in str(e.value), str(e.value)
    io.check_output_dir(tmp_path / "new" / "dirs", "--out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # the test left nothing
