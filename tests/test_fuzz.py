"""Fuzzing: damaged files give a clean ParnnError or a valid result, never another exception,
a hang, or a half-written output.

Mutations are truncations and bit flips of small, valid files (IDX raw and gz, CSV, model,
ensemble and checkpoint files), plus random JSON in the model and checkpoint headers.
"""

import atexit
import contextlib
import gzip
import hashlib
import json
import os
import shutil
import tempfile
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from parnn import cli, data, io
from parnn.run import checkpoint, config, train
from parnn.data import FASHION_CLASSES, Dataset
from parnn.errors import DataError, ModelFileError, ParnnError
from parnn.core.model import MLP, Spec
from synthetic_data import idx_bytes, no_hang, write_dataset

# PARNN_FUZZ_EXAMPLES=2000 for a longer campaign; the default keeps the file under ~15 s.
SCALE = int(os.environ.get("PARNN_FUZZ_EXAMPLES", "60")) / 60
FUZZ = settings(max_examples=int(60 * SCALE), deadline=timedelta(seconds=5),
                suppress_health_check=[HealthCheck.too_slow])
WORK = Path(tempfile.mkdtemp(prefix="parnn-fuzz-"))
atexit.register(shutil.rmtree, WORK, ignore_errors=True)




@st.composite
def damage(draw, data: bytes):
    """data truncated, or with 1-8 bits flipped (half of them in the first 64 bytes, where
    headers live), or both."""
    n = len(data)
    pos = st.one_of(st.integers(0, min(n, 64) - 1), st.integers(0, n - 1))
    flips = draw(st.lists(st.tuples(pos, st.integers(0, 7)), max_size=8))
    cut = draw(st.one_of(st.none(), st.integers(0, n - 1)))
    out = bytearray(data)
    for i, bit in flips:
        out[i] ^= 1 << bit
    if cut is not None:
        del out[cut:]
    if bytes(out) == data:  # make sure something changed
        out[draw(pos)] ^= 0x80
    return bytes(out)


def parse(blob):
    """(tensors, parnn header) of a safetensors file's bytes, without any of parnn's checks."""
    n = int.from_bytes(blob[:8], "little")
    return safetensors.numpy.load(blob), json.loads(json.loads(blob[8:8 + n])["__metadata__"]["parnn"])


@st.composite
def payload_flips(draw, data: bytes, start=16):
    """Bit flips past an IDX header only: for images that is still a valid file."""
    out = bytearray(data)
    for i, bit in draw(st.lists(st.tuples(st.integers(start, len(data) - 1), st.integers(0, 7)),
                                min_size=1, max_size=8)):
        out[i] ^= 1 << bit
    return bytes(out)


def _images(n=5, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 28, 28), dtype=np.uint8)


IDX_IMAGES = idx_bytes(_images())
IDX_LABELS = idx_bytes(np.arange(5) % 10)


# --- IDX and CSV -----------------------------------------------------------------------------------

@FUZZ
@given(st.data(), st.sampled_from(["images", "labels"]), st.booleans())
def test_damaged_idx(draw, which, gz):
    raw = IDX_IMAGES if which == "images" else IDX_LABELS
    good = gzip.compress(raw, mtime=0) if gz else raw
    path = WORK / f"idx{'.gz' if gz else ''}"
    path.write_bytes(draw.draw(damage(good)))
    with no_hang():
        try:
            arr = data.read_idx(path, ndim=3 if which == "images" else 1)
        except DataError:
            return
    assert arr.dtype == np.uint8 and arr.ndim == (3 if which == "images" else 1)


def _csv(n=4):
    x, y = _images(n), np.arange(n) % 10
    rows = ["label," + ",".join(f"pixel{i}" for i in range(1, 785))]
    rows += [",".join(map(str, [y[i], *x[i].ravel()])) for i in range(n)]
    return ("\n".join(rows) + "\n").encode()


CSV = _csv()


@FUZZ
@given(st.data())
def test_damaged_csv(draw):
    path = WORK / "fuzz.csv"
    path.write_bytes(draw.draw(damage(CSV)))
    with no_hang():
        try:
            x, y = data.read_csv(path)
        except DataError:
            return
    assert x.dtype == np.uint8 and x.shape[1:] == (28, 28) and len(x) == len(y) >= 1
    assert y.max() <= 9


@pytest.fixture(scope="module")
def dataset_dir():
    return write_dataset(WORK / "dataset", n_train=40, n_test=10, gz=False)


@settings(FUZZ, max_examples=int(40 * SCALE))
@given(st.data(), st.sampled_from(sorted(data.IDX_NAMES.values())), st.booleans())
def test_damaged_dataset_file(dataset_dir, draw, name, gz):
    d = WORK / "damaged_dataset"
    d.mkdir(exist_ok=True)
    for f in dataset_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    good = (dataset_dir / name).read_bytes()
    bad = draw.draw(damage(gzip.compress(good, mtime=0) if gz else good))
    (d / name).unlink()
    (d / (name + ".gz" if gz else name)).write_bytes(bad)
    with no_hang():
        try:
            ds = data.load_dataset(data_dir=d)
        except DataError:
            return
    for X, y in ((ds.X_train, ds.y_train), (ds.X_test, ds.y_test)):
        assert X.shape == (len(y), 784) and X.min() >= 0 and X.max() <= 1 and y.max() <= 9


# --- model, ensemble and checkpoint files ------------------------------------------------------------

def _model_bytes():
    path = WORK / "good_model.safetensors"
    io.save_model(path, MLP(Spec((4, 5, 3), "tanh", "softmax", "cross_entropy", "float32"), seed=0),
                  {"class_names": ["a", "b", "c"], "history": [{"epoch": 1, "loss": 0.5}]})
    model = path.read_bytes()
    io.save_ensemble(path, [MLP(Spec((4, 4, 3)), seed=s) for s in range(2)], {"members": 2})
    return model, path.read_bytes()


MODEL, ENSEMBLE = _model_bytes()


@pytest.mark.parametrize("edit", [
    lambda h: h["meta"]["class_names"].__setitem__(0, "z"),   # still valid, just wrong
    lambda h: h["spec"].__setitem__("hidden", "relu"),
    lambda h: h.__setitem__("writer", "someone else"),
])
def test_any_edit_of_the_header_is_caught(edit):
    tensors, header = parse(MODEL)
    edit(header)
    path = WORK / "edited.safetensors"
    path.write_bytes(safetensors.numpy.save(tensors, metadata={"parnn": json.dumps(header)}))
    with pytest.raises(ModelFileError, match="header does not match its checksum"):
        io.load_model(path)


def test_a_header_without_its_checksum_is_refused_and_old_files_can_be_upgraded():
    """Format 2 requires the header checksum: deleting it (to edit the spec unseen) is caught.
    A format 1 file from before the checksum existed gets a message on how to re-save it, and
    upgrade() re-saves it after every other check."""
    tensors, header = parse(MODEL)
    del header["header_sha256"]
    path = WORK / "old.safetensors"
    path.write_bytes(safetensors.numpy.save(tensors, metadata={"parnn": json.dumps(header)}))
    with pytest.raises(ModelFileError, match="header has no checksum: the file is damaged"):
        io.load_model(path)
    header["format"] = 1
    path.write_bytes(safetensors.numpy.save(tensors, metadata={"parnn": json.dumps(header)}))
    with pytest.raises(ModelFileError, match=r"older parnn \(format 1\) without a header checksum"
                                             r".*python -m parnn.io upgrade"):
        io.load_model(path)
    assert io.upgrade(path) == "model"
    net, meta = io.load_model(path)
    assert meta["class_names"] == ["a", "b", "c"]
    assert net.params.tobytes() == b"".join(tensors[k].tobytes()
                                            for k in io.layer_tensors(net.spec, net.params))
    assert parse(path.read_bytes())[1]["format"] == io.FORMAT


def _check_loaded(path):
    """load_any gives ModelFileError or networks that work."""
    with no_hang():
        try:
            nets, meta = io.load_any(path)
        except ModelFileError:
            event("refused")
            return
    event("loaded")
    assert isinstance(meta, dict) and nets
    for net in nets:
        out = net.output(np.zeros((2, net.spec.sizes[0]), net.dtype))
        assert out.shape == (2, net.spec.sizes[-1]) and np.isfinite(net.params).all()


@FUZZ
@given(st.data(), st.sampled_from(["model", "ensemble"]))
def test_damaged_model_file(draw, kind):
    path = WORK / "fuzz.safetensors"
    path.write_bytes(draw.draw(damage(MODEL if kind == "model" else ENSEMBLE)))
    _check_loaded(path)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4),
    max_leaves=12)
SPEC_FIELDS = ["sizes", "hidden", "output", "loss", "dtype"]
HEADER_FIELDS = ["format", "kind", "spec", "meta", "params_sha256", "members_sha256"]


@FUZZ
@given(st.sampled_from(["model", "ensemble"]),
       st.dictionaries(st.sampled_from(HEADER_FIELDS + ["spec." + f for f in SPEC_FIELDS]),
                       json_values | st.sampled_from([1, 2, "model", "ensemble", "checkpoint",
                                                      [4, 5, 3], "float64", "relu"]),
                       min_size=1, max_size=3),
       st.booleans())
def test_random_model_metadata(kind, changes, rehash):
    """Random JSON in the header, with (rehash) or without a matching header checksum; then
    `parnn predict` on it must give a prediction or one clean error line."""
    path = WORK / "meta.safetensors"
    tensors, header = parse(MODEL if kind == "model" else ENSEMBLE)
    for key, value in changes.items():
        if key.startswith("spec."):
            if not isinstance(header.get("spec"), dict):
                header["spec"] = {}
            header["spec"][key[5:]] = value
        else:
            header[key] = value
    header.pop("header_sha256", None)
    if rehash:
        header = json.loads(json.dumps(header))
        header["header_sha256"] = io._header_sha256(header)
    try:
        text = json.dumps(header)
    except (ValueError, TypeError):
        return
    path.write_bytes(safetensors.numpy.save(tensors, metadata={"parnn": text}))
    _check_loaded(path)
    npy = WORK / "four.npy"
    np.save(npy, np.zeros(4))
    with no_hang(), contextlib.redirect_stdout(None):
        err = _stderr_of(["predict", str(path), str(npy)])
    assert err.count("\n") <= 1 and "Traceback" not in err


TENSOR_ENTRY = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F64", "F32", "U8", "BOOL", "BF16", "X"]) | json_values,
    "shape": st.lists(st.integers(-1, 6), max_size=3) | json_values,
    "data_offsets": st.lists(st.integers(-1, 80), min_size=2, max_size=2) | json_values})


@FUZZ
@given(st.dictionaries(st.text(max_size=4), TENSOR_ENTRY | json_values, max_size=4),
       st.integers(0, 100), st.booleans())
def test_random_safetensors_index(index, n_data, keep_parnn):
    """parnn reads the safetensors container itself (sizes before data): any index, any data
    length gives ModelFileError or tensors that tile the file exactly."""
    if keep_parnn:
        n = int.from_bytes(MODEL[:8], "little")
        index["__metadata__"] = json.loads(MODEL[8:8 + n])["__metadata__"]
    text = json.dumps(index).encode()
    path = WORK / "index.safetensors"
    path.write_bytes(len(text).to_bytes(8, "little") + text + bytes(n_data))
    with no_hang():
        try:
            arrays, meta = io.load_checkpoint(path)
        except ModelFileError:
            event("refused")
            return
    event("loaded")  # only a header whose checksum matched could get here
    assert sum(a.nbytes for a in arrays.values()) == n_data


def _stderr_of(argv):
    import io as _io

    buf = _io.StringIO()
    with contextlib.redirect_stderr(buf):
        status = cli.main(argv)
    assert status in (0, 2)
    assert (status == 0) == (buf.getvalue() == "")
    return buf.getvalue()


# --- checkpoints -----------------------------------------------------------------------------------

def _checkpoint_bytes():
    rng = np.random.default_rng(0)
    X = rng.random((40, 784))
    y = rng.integers(0, 10, 40)
    ds = Dataset(X, y, X[:5], y[:5], FASHION_CLASSES, "tiny", None, {}, {})
    cfg = config.make_config("modern", hidden=(3,), epochs=2, batch_size=8, engine="numpy",
                            threads=1)
    d = WORK / "ck"
    train.fit(cfg, ds, progress=False, log=lambda *a: None,
              checkpoints=checkpoint.Checkpointer(d, every=2, run={"out": "x"}))
    return (d / checkpoint.PREVIOUS).read_bytes(), ds


CHECKPOINT, CK_DATA = _checkpoint_bytes()


def _check_checkpoint(d):
    with no_hang():
        try:
            ck = checkpoint.load(d)
        except ModelFileError:
            event("refused")
            return
        event("loaded")
        if ck.config.epochs > 5:  # consistent, just long (--epochs 2**70): not a test of resuming
            return
        # A checkpoint that loads can be resumed, or refused cleanly.
        try:
            res = train.fit(ck.config, CK_DATA, progress=False, log=lambda *a: None, resume=ck)
        except ParnnError:
            return
    assert np.isfinite(res.net.params).all() and len(res.history) == ck.config.epochs


@FUZZ
@given(st.data())
def test_damaged_checkpoint(draw):
    d = WORK / "fuzz_ck"
    d.mkdir(exist_ok=True)
    (d / checkpoint.NEWEST).write_bytes(draw.draw(damage(CHECKPOINT)))
    _check_checkpoint(d)


CK_FIELDS = ["checkpoint", "config", "spec", "epoch", "done", "step", "order_rng", "partial",
             "history", "run", "config.epochs", "config.hidden", "config.batch_size",
             "config.optimizer", "config.lr", "partial.n", "partial.loss_sum", "order_rng.state"]


@FUZZ
@given(st.dictionaries(st.sampled_from(CK_FIELDS),
                       json_values | st.integers(-3, 50) | st.sampled_from(["full", "sgd", [3]]),
                       min_size=1, max_size=3))
def test_random_checkpoint_metadata(changes):
    arrays, header = parse(CHECKPOINT)
    meta = header["meta"]
    for key, value in changes.items():
        outer, _, inner = key.partition(".")
        if inner:
            if not isinstance(meta.get(outer), dict):
                meta[outer] = {}
            meta[outer][inner] = value
        else:
            meta[outer] = value
    d = WORK / "meta_ck"
    d.mkdir(exist_ok=True)
    try:
        io.save_checkpoint(d / checkpoint.NEWEST, arrays, meta)
    except (ValueError, TypeError):  # not JSON (NaN keys and the like): cannot be written at all
        return
    _check_checkpoint(d)


# --- no partial outputs ---------------------------------------------------------------------------

def _tree(root):
    return {p.relative_to(root): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()} if root.exists() else {}


@settings(FUZZ, max_examples=int(15 * SCALE))
@given(st.data(), st.sampled_from(sorted(data.IDX_NAMES.values())))
def test_train_on_damaged_data_writes_all_or_nothing(dataset_dir, draw, name):
    d = WORK / "train_data"
    d.mkdir(exist_ok=True)
    for f in dataset_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    good = (dataset_dir / name).read_bytes()
    (d / name).write_bytes(draw.draw(st.one_of(damage(good), payload_flips(good))))
    out = WORK / "train_out"
    out.mkdir(exist_ok=True)
    (out / "model.safetensors").write_bytes(b"the previous model")
    before = _tree(out)
    argv = ["train", "--data", str(d), "--out", str(out), "--hidden", "4", "--epochs", "1",
            "--batch-size", "8", "--engine", "numpy", "--threads", "1", "--no-progress",
            "--checkpoint-dir", str(WORK / "train_ck")]
    with no_hang(30), contextlib.redirect_stdout(None):
        err = _stderr_of(argv)
    after = _tree(out)
    event("refused" if err else "trained")
    if err:
        assert after == before, err
    else:
        assert set(after) == set(before) | {Path(n) for n in ("history.json", "history.csv",
                                                              "history.png")}
        io.load_model(out / "model.safetensors")
    for f in (WORK / "train_ck").glob("*"):
        f.unlink()
