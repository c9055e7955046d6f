import csv
import hashlib
import json
import os

import numpy as np
import pytest
import safetensors.numpy

from parnn import atomic, io, modelinfo, paths
from parnn.errors import ModelFileError
from parnn.core.model import MLP, Spec
from synthetic_data import no_hang

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


def test_file_is_plain_safetensors_with_a_weight_and_a_bias_per_layer(tmp_path):
    net = small_net()
    path = tmp_path / "m.safetensors"
    io.save_model(path, net, {"x": np.int64(3)})  # numpy scalars in meta are fine
    with safetensors.safe_open(path, "np") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        h = json.loads(f.metadata()["parnn"])
    assert sorted(tensors) == ["layers.0.bias", "layers.0.weight", "layers.1.bias",
                               "layers.1.weight"]
    for l in range(2):   # weight (out, in), as torch.nn.Linear keeps it
        assert tensors[f"layers.{l}.weight"].tobytes() == net.W[l].tobytes()
        assert tensors[f"layers.{l}.weight"].shape == (net.spec.sizes[l + 1], net.spec.sizes[l])
        assert tensors[f"layers.{l}.bias"].tobytes() == net.b[l].tobytes()
    assert h["format"] == io.FORMAT == 3 and h["layout"] == "layers"
    assert h["spec"] == net.spec.to_dict() and h["meta"] == {"x": 3}
    # The digest is the flat buffer's: the layers' tensors one after the other.
    assert h["params_sha256"] == sha(net.params) == sha(np.concatenate(
        [tensors[k].ravel() for k in io.layer_tensors(net.spec, net.params)]))


def test_the_tensors_alone_reproduce_the_network(tmp_path):
    """What a reader without parnn does: y = act(x @ weight.T + bias), layer after layer."""
    net = MLP(Spec((6, 5, 4, 3), "relu", "sigmoid", "mse", "float64"), seed=3)
    path = tmp_path / "m.safetensors"
    io.save_model(path, net, {})
    t = safetensors.numpy.load_file(path)
    acts = {"relu": lambda z: np.maximum(z, 0), "sigmoid": lambda z: 1 / (1 + np.exp(-z))}
    x = np.random.default_rng(0).random((7, 6))
    for l in range(3):
        x = acts[net.spec.activation(l)](x @ t[f"layers.{l}.weight"].T + t[f"layers.{l}.bias"])
    np.testing.assert_allclose(x, net.output(np.random.default_rng(0).random((7, 6))), rtol=1e-12)


def test_layer_tensors_are_views_in_buffer_order():
    net = small_net()
    t = io.layer_tensors(net.spec, net.params, "members.2.")
    assert list(t) == ["members.2.layers.0.weight", "members.2.layers.0.bias",
                       "members.2.layers.1.weight", "members.2.layers.1.bias"]
    assert all(np.shares_memory(a, net.params) for a in t.values())
    assert [a.shape for a in t.values()] == [(5, 6), (5,), (3, 5), (3,)]
    assert np.concatenate([a.ravel() for a in t.values()]).tobytes() == net.params.tobytes()


def test_ensemble_round_trip_and_load_any(tmp_path):
    nets = [small_net(seed=s) for s in range(3)]
    path = tmp_path / "e.safetensors"
    io.save_ensemble(path, nets, META)
    with safetensors.safe_open(path, "np") as f:
        assert sorted(f.keys()) == sorted(f"members.{k}.layers.{l}.{p}" for k in range(3)
                                          for l in range(2) for p in ("weight", "bias"))
    got, meta = io.load_any(path)
    assert meta == META and len(got) == 3
    for a, b in zip(got, nets):
        assert a.spec == b.spec and a.params.tobytes() == b.params.tobytes()
        assert a.params.flags.owndata and np.shares_memory(a.W[1], a.params)
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


def test_checkpoint_bytes_are_the_file_and_read_back_with_the_same_checks(tmp_path):
    # How a distributed checkpoint's state travels between MPI ranks: as its file's bytes.
    arrays = {"params": np.arange(6.0).reshape(2, 3), "step": np.array(3, np.int64)}
    path = tmp_path / "ck.safetensors"
    io.save_checkpoint(path, arrays, {"epoch": 1})
    data = io.file_bytes(path)
    assert data == path.read_bytes() == io.checkpoint_bytes(arrays, {"epoch": 1})
    got, meta = io.load_checkpoint("rank 1's checkpoint", data)
    assert meta == {"epoch": 1} and got["params"].tobytes() == arrays["params"].tobytes()
    flipped = bytearray(data)
    flipped[-1] ^= 1                                          # one bit of the last tensor
    with pytest.raises(ModelFileError, match="rank 1's checkpoint: .*checksum"):
        io.load_checkpoint("rank 1's checkpoint", bytes(flipped))
    with pytest.raises(ModelFileError, match="truncated"):
        io.load_checkpoint("rank 1's checkpoint", data[:-3])
    with pytest.raises(ModelFileError, match="no such file"):
        io.file_bytes(tmp_path / "gone.safetensors")


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


@pytest.mark.parametrize("fmt,words", [(io.FORMAT + 1, ["newer", f"format {io.FORMAT + 1}"]),
                                       (0, ["unknown file format"]),
                                       ("1", ["unknown file format"]),
                                       (None, ["names no file format"])])
def test_wrong_format_version(tmp_path, fmt, words):
    net = small_net()
    assert_bad(write_raw(tmp_path / "m", {"params": net.params}, header(net, format=fmt)), *words)


def test_a_header_whose_format_key_was_damaged_says_it_names_no_format(tmp_path):
    net = small_net()
    damaged = header(net)
    damaged["formbt"] = damaged.pop("format")       # one flipped bit in the key
    assert_bad(write_raw(tmp_path / "m", {"params": net.params}, damaged), "names no file format")


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


# --- files of the previous versions: one flat buffer ---------------------------------------------

def old_file(path, nets, meta, fmt, kind="model"):
    """What parnn wrote before the tensors were named per layer: format 1 (with its header
    checksum) or 2, the flat buffer as "params" (an ensemble's as "member{k}.params")."""
    if kind == "model":
        tensors, digests = {"params": nets[0].params}, {"params_sha256": sha(nets[0].params)}
    else:
        tensors = {f"member{k}.params": n.params for k, n in enumerate(nets)}
        digests = {"members_sha256": [sha(n.params) for n in nets]}
    h = {"format": fmt, "kind": kind, "writer": "parnn 0.1.0", "spec": nets[0].spec.to_dict(),
         "meta": meta, **digests}
    return write_raw(path, tensors, h)


@pytest.mark.parametrize("fmt", [1, 2])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_flat_files_of_the_previous_versions_still_load(tmp_path, fmt, dtype):
    nets = [small_net(dtype, seed=s) for s in range(3)]
    got, meta = io.load_model(old_file(tmp_path / "m", nets[:1], META, fmt))
    assert meta == META and got.spec == nets[0].spec
    assert got.params.tobytes() == nets[0].params.tobytes() and got.params.flags.owndata
    got, meta = io.load_any(old_file(tmp_path / "e", nets, META, fmt, "ensemble"))
    assert [n.params.tobytes() for n in got] == [n.params.tobytes() for n in nets]
    info = modelinfo.model_info(tmp_path / "e")
    assert info["format"] == fmt and info["layout"] == "flat" and info["members"] == 3


@pytest.mark.parametrize("kind", ["model", "ensemble"])
def test_upgrade_turns_a_flat_file_into_per_layer_tensors_with_the_same_digest(tmp_path, kind):
    nets = [small_net(seed=s) for s in range(2 if kind == "ensemble" else 1)]
    path = old_file(tmp_path / "m", nets, META, 1, kind)
    with open(path, "rb") as f:   # drop the header checksum: the oldest files had none
        blob = f.read()
    h = json.loads(json.loads(blob[8:8 + int.from_bytes(blob[:8], "little")])["__metadata__"]
                   ["parnn"])
    del h["header_sha256"]
    write_raw(path, safetensors.numpy.load(blob), h, rehash=False)
    assert_bad(path, "upgrade", load=io.load_any)
    assert io.upgrade(path) == kind
    with safetensors.safe_open(path, "np") as f:
        assert "layers.0.weight" in f.keys() or "members.1.layers.1.bias" in f.keys()
        h2 = json.loads(f.metadata()["parnn"])
    assert h2["format"] == io.FORMAT and h2["layout"] == "layers"
    assert h2.get("params_sha256") == h.get("params_sha256")
    assert h2.get("members_sha256") == h.get("members_sha256")
    got, meta = io.load_any(path)
    assert meta == META and [n.params.tobytes() for n in got] == [n.params.tobytes() for n in nets]


# --- per-layer files that are wrong --------------------------------------------------------------

def layered(net, **over):
    return io.layer_tensors(net.spec, net.params), header(net, layout="layers", **over)


def test_per_layer_tensors_missing_transposed_extra_or_of_another_layout(tmp_path):
    net = small_net()
    tensors, h = layered(net)
    write_raw(tmp_path / "ok", tensors, h)
    assert io.load_model(tmp_path / "ok")[0].params.tobytes() == net.params.tobytes()
    missing = {k: v for k, v in tensors.items() if k != "layers.1.bias"}
    assert_bad(write_raw(tmp_path / "a", missing, h), "'layers.1.bias' is missing")
    transposed = dict(tensors, **{"layers.0.weight": tensors["layers.0.weight"].T.copy()})
    assert_bad(write_raw(tmp_path / "b", transposed, h), "'layers.0.weight' has shape (6, 5)",
               "needs (5, 6)")
    assert_bad(write_raw(tmp_path / "c", dict(tensors, params=net.params), h),
               "unexpected tensors params")
    # Per-layer tensors under a header that states no layout (formats 1 and 2: flat)
    assert_bad(write_raw(tmp_path / "d", tensors, header(net)), "'params' is missing")
    assert_bad(write_raw(tmp_path / "e", tensors, header(net, layout="columns")),
               "unknown tensor layout 'columns'")
    f32 = {k: v.astype(np.float32) for k, v in tensors.items()}
    assert_bad(write_raw(tmp_path / "f", f32, h), "float32", "float64")


def test_swapped_layers_or_a_flipped_byte_fail_the_checksum(tmp_path):
    net = MLP(Spec((4, 4, 4, 4), "tanh", "softmax", "cross_entropy", "float64"), seed=0)
    tensors, h = layered(net)
    swapped = dict(tensors, **{"layers.0.weight": tensors["layers.1.weight"],
                               "layers.1.weight": tensors["layers.0.weight"]})
    assert_bad(write_raw(tmp_path / "a", swapped, h), "parameters do not match their checksum")
    path = tmp_path / "m.safetensors"
    io.save_model(path, net, {})
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x04
    path.write_bytes(bytes(data))
    assert_bad(path, "parameters do not match their checksum")


# --- model_info and info_text -------------------------------------------------------------

RUN_META = {"config": {"preset": "modern", "lr": 0.001, "hidden": [5], "epochs": 2},
            "engine": "batch", "dataset": {"name": "fashion-mnist", "sha256": {
                "train-images": "cd" * 32, "t10k-labels": "ef" * 32}},
            "class_names": ["shirt", "shoe", "bag"], "classes": [0, 1, 2], "inputs": "pixels",
            "history": [{"epoch": 1, "train_acc": 0.5, "val_acc": 0.4},
                        {"epoch": 2, "train_acc": 0.75, "val_acc": 0.625}],
            "test_acc": 0.6, "best_epoch": 2}


def test_model_info_summarises_a_model(tmp_path):
    net = small_net("float32")
    io.save_model(tmp_path / "m.safetensors", net, RUN_META)
    info = modelinfo.model_info(tmp_path / "m.safetensors")
    assert json.loads(json.dumps(info)) == info   # `parnn info --json` can print it as is
    assert info["kind"] == "model" and info["members"] == 1 and info["format"] == io.FORMAT
    assert info["layout"] == "layers" and info["dtype"] == "float32"
    assert info["layers"] == [
        {"name": "layers.0", "kind": "dense", "inputs": 6, "outputs": 5, "activation": "tanh",
         "weight": [5, 6], "bias": [5], "params": 35},
        {"name": "layers.1", "kind": "dense", "inputs": 5, "outputs": 3, "activation": "softmax",
         "weight": [3, 5], "bias": [3], "params": 18}]
    assert info["n_params"] == info["n_params_total"] == net.spec.n_params == 53
    assert info["accuracy"] == {"train_acc": 0.75, "val_acc": 0.625, "test_acc": 0.6}
    assert info["dataset"] == RUN_META["dataset"] and info["config"] == RUN_META["config"]
    assert info["class_names"] == ["shirt", "shoe", "bag"] and info["epochs"] == 2
    assert info["params_sha256"] == [sha(net.params)] and info["engine"] == "batch"

    text = modelinfo.info_text(info)
    lines = text.splitlines()
    assert lines[0] == f"{tmp_path / 'm.safetensors'}: parnn model, format {io.FORMAT}, " \
                       "written by parnn 0.1.0"
    for words in (["network", "6-5-3", "tanh hidden", "softmax output", "float32"],
                  ["layers.0", "6 -> 5", "tanh", "weight (5, 6)", "bias (5,)", "35"],
                  ["layers.1", "5 -> 3", "softmax", "weight (3, 5)", "18"],
                  ["parameters", "53"], ["classes", "3: shirt, shoe, bag"],
                  ["dataset", "fashion-mnist"], ["train-images", "cd" * 32],
                  ["t10k-labels", "ef" * 32], ["training", "preset=modern", "lr=0.001"],
                  ["accuracy", "train 0.7500, validation 0.6250, test 0.6000"],
                  ["history", "2 epochs, best epoch 2"], ["checksum", sha(net.params)]):
        assert any(all(w in line for w in words) for line in lines), (words, text)


def test_model_info_of_an_ensemble_and_of_a_bare_file(tmp_path):
    nets = [small_net(seed=s) for s in range(3)]
    io.save_ensemble(tmp_path / "e", nets, {"class_names": ["a", "b\u00e9", "c"]})
    info = modelinfo.model_info(tmp_path / "e")
    assert info["kind"] == "ensemble" and info["members"] == 3
    assert info["n_params_total"] == 3 * info["n_params"]
    assert info["params_sha256"] == [sha(n.params) for n in nets]
    assert info["config"] is info["dataset"] is info["best_epoch"] is None
    assert info["accuracy"] == {"train_acc": None, "val_acc": None, "test_acc": None}
    text = modelinfo.info_text(info)
    assert "ensemble of 3 networks (soft vote)" in text and "members.K.layers.L.weight" in text
    assert "accuracy" not in text and "training" not in text and "b\u00e9" in text
    assert text.count("sha256 ") == 3


def test_model_info_escapes_what_the_file_says_and_refuses_what_is_not_a_model(tmp_path):
    net = small_net()
    meta = {"engine": "batch\x1b[2J", "dataset": {"name": "x\ny", "sha256": 5},
            "history": "not rows", "test_acc": "high", "config": ["not", "a", "dict"]}
    io.save_model(tmp_path / "m", net, meta)
    info = modelinfo.model_info(tmp_path / "m")
    assert info["accuracy"]["test_acc"] is None and info["epochs"] == 0 and info["config"] is None
    assert info["dataset"] == {"name": "x\ny", "sha256": None}
    io.save_model(tmp_path / "m", net, {"dataset": {"name": "d", "sha256": "ab" * 32}})
    assert f"dataset     d, sha256 {'ab' * 32}" in modelinfo.info_text(modelinfo.model_info(tmp_path / "m"))
    text = modelinfo.info_text(info)
    assert "\x1b" not in text and "batch\\x1b[2J" in text and "x\\ny" in text
    assert_bad(tmp_path / "nope", "no such file", load=modelinfo.model_info)
    io.save_checkpoint(tmp_path / "ck", {"params": net.params}, {})
    assert_bad(tmp_path / "ck", "'checkpoint'", load=modelinfo.model_info)


# --- atomic writes -------------------------------------------------------------------------

def leftovers(d):
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".tmp"))


def test_exception_midway_leaves_old_file_and_no_temp(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic.atomic_open(target, "w") as f:
            f.write("new half")
            raise RuntimeError("boom")
    assert target.read_text() == "old" and leftovers(tmp_path) == []

    def rows():
        yield {"a": 1}
        raise RuntimeError("generator died")

    with pytest.raises(RuntimeError):
        with atomic.atomic_open(target, "w") as f:
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
    atomic.atomic_write_bytes(d / "b.bin", b"\x00\x01")
    assert (d / "b.bin").read_bytes() == b"\x00\x01"
    umask = os.umask(0)
    os.umask(umask)
    assert (d / "b.bin").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    atomic.atomic_write_text(d / "t.txt", "héllo")
    assert (d / "t.txt").read_text(encoding="utf-8") == "héllo"
    atomic.atomic_write_json(d / "j.json", {"b": np.float32(0.5), "a": np.arange(2)})
    assert json.loads((d / "j.json").read_text()) == {"a": [0, 1], "b": 0.5}
    atomic.atomic_write_csv(d / "c.csv", [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "acc": 0.9}])
    with open(d / "c.csv", newline="") as f:
        assert list(csv.DictReader(f)) == [{"epoch": "1", "loss": "0.5", "acc": ""},
                                           {"epoch": "2", "loss": "", "acc": "0.9"}]
    assert leftovers(d) == []
    with pytest.raises(ValueError):
        with atomic.atomic_open(d / "x", "a"):
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
    assert paths.shown("/data/fashion é") == "/data/fashion é"
    assert paths.shown("a\nb\x01") == "a\\nb\\x01"
    assert paths.shown(b"/x\xff".decode("utf-8", "surrogateescape")) == "/x\\udcff"


@pytest.mark.parametrize("where,words", [
    ("/proc/parnn-x", ["/proc is not writable"]),
    ("{t}/file/sub", ["cannot be created", "is a file"]),
    ("{t}/" + "y" * 300, ["File name too long"]),
])
def test_check_output_dir(tmp_path, where, words):
    from parnn.errors import ConfigError

    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError) as e:
        paths.check_output_dir(where.replace("{t}", str(tmp_path)), "--out")
    assert str(e.value).startswith("--out ") and "\n" not in str(e.value)
    for w in words:
        assert w in str(e.value), str(e.value)
    paths.check_output_dir(tmp_path / "new" / "dirs", "--out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # the test left nothing
