"""Issue 14, hardening round two: the cases of the attack run, each reproduced with real files
and real `python -m parnn` processes (the MPI ones with real mpiexec, in test_distributed.py).

Every bad input must end as exactly one line `parnn: error: ...` that names the problem, a
non-zero status, no traceback, no hang, bounded memory, and no file of the workspace touched.
docs/ROBUSTNESS.md lists the catalogue.
"""

import ctypes
import gzip
import hashlib
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import zlib

import numpy as np
import pytest
import safetensors.numpy
from PIL import Image

from parnn import io, paths
from parnn.core.model import MLP, Spec
from synthetic_data import parnn, write_dataset

TRAIN = ["--hidden", "8", "--epochs", "1", "--engine", "numpy", "--threads", "1",
         "--no-progress", "--batch-size", "50"]
LONG = "n" * 300  # one path component longer than NAME_MAX (255): ENAMETOOLONG
MB = 1 << 20


# --- helpers -----------------------------------------------------------------------------------

def assert_one_line(r, *words):
    """A refused command: status != 0, one `parnn: error:` line containing words, no traceback."""
    assert r.returncode not in (0, None), (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("parnn: error: "), lines[0]
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def snapshot(root):
    """Every entry under root: the hash and mtime of files, the kind and mode of everything."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        digest = None
        if stat.S_ISREG(st.st_mode):
            digest = hashlib.sha256(p.read_bytes()).hexdigest(), st.st_mtime_ns
        out[p.relative_to(root)] = (stat.S_IFMT(st.st_mode), st.st_mode & 0o7777, digest)
    return out


def _drop_dac():
    """In the child, before exec: drop CAP_DAC_OVERRIDE (1) and CAP_DAC_READ_SEARCH (2) from the
    bounding set, so that root is refused by permission bits like any user (the issue's case)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _can_drop_dac():
    if os.name != "posix" or not sys.platform.startswith("linux"):
        return False
    r = subprocess.run(["true"], preexec_fn=_drop_dac, capture_output=True) \
        if os.geteuid() == 0 else None
    return r is not None and r.returncode == 0


NO_DAC = _can_drop_dac()


def unprivileged(*args, **kw):
    """parnn as a process that permission bits apply to: as root, root without its DAC
    capabilities; otherwise the user itself."""
    return parnn(*args, preexec_fn=_drop_dac if NO_DAC else None, **kw)


@pytest.fixture
def locked(tmp_path):
    """A directory nobody may enter (mode 000), holding a dataset, a picture and checkpoints."""
    if os.geteuid() == 0 and not NO_DAC:
        pytest.skip("running as root and cannot drop CAP_DAC_OVERRIDE")
    d = tmp_path / "locked"
    write_dataset(d / "data", n_train=100, n_test=20)
    Image.new("L", (28, 28)).save(d / "img.png")
    (d / "ck").mkdir()
    d.chmod(0)
    yield d
    d.chmod(0o755)


# The peak resident memory of the process itself: VmHWM of its own address space at exit.
# (ru_maxrss from wait4 would not do: Linux counts the forking parent's size in it.)
MEASURED = """
import atexit, os, runpy, sys
def report():
    with open("/proc/self/status") as f:
        kb = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
    with open(os.environ["PARNN_TEST_HWM"], "w") as f:
        f.write(kb)
atexit.register(report)
sys.argv[0] = "parnn"
runpy.run_module("parnn", run_name="__main__")
"""


def run_measured(args, env=None, timeout=120):
    """parnn ARGS as a subprocess: (CompletedProcess, its peak resident memory in MB)."""
    with tempfile.TemporaryDirectory() as d:
        hwm = os.path.join(d, "hwm")
        r = subprocess.run([sys.executable, "-c", MEASURED, *map(str, args)], capture_output=True,
                           text=True, timeout=timeout,
                           env={**(os.environ if env is None else env), "PARNN_TEST_HWM": hwm})
        with open(hwm) as f:
            return r, int(f.read()) / 1024


def sparse(path, head: bytes, size: int):
    """A file of `size` bytes starting with head, the rest a hole (no disk, no page cache)."""
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)
    return path


def gzip_bomb(path, head: bytes, zeros: int):
    """A .gz of head followed by `zeros` zero bytes, written without holding them in memory."""
    with gzip.open(path, "wb", compresslevel=9) as g:
        g.write(head)
        block = bytes(MB)
        for _ in range(zeros // MB):
            g.write(block)
    return path


def fifo(path):
    os.mkfifo(path)
    return path


def png_header(width, height):
    """A tiny PNG that declares width x height: IHDR, one small IDAT, IEND."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(64)))
            + chunk(b"IEND", b""))


def save_raw_model(path, net, header_edits=None, drop_checksum=False, meta=None):
    """A model file written around io's checks: header edited, checksum kept or dropped."""
    header = {"format": io.FORMAT, "writer": "test", "kind": "model", "spec": net.spec.to_dict(),
              "meta": meta or {}, "params_sha256": io.params_sha256(net.params)}
    header.update(header_edits or {})
    if not drop_checksum:
        header["header_sha256"] = io._header_sha256(header)
    path.write_bytes(safetensors.numpy.save({"params": net.params},
                                            metadata={"parnn": json.dumps(header)}))
    return path


# --- one workspace for the cases ---------------------------------------------------------------

@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    w = tmp_path_factory.mktemp("hard")
    data = write_dataset(w / "data", n_train=200, n_test=40)
    r = parnn("train", "--data", data, "--out", w / "run", *TRAIN)
    assert r.returncode == 0, r.stderr
    model = w / "run" / "model.safetensors"
    net, meta = io.load_model(model)
    rng = np.random.default_rng(0)
    np.save(w / "good.npy", rng.random((28, 28)))

    # item 2: .npy files that are not a plain numeric array
    shutil.copy(_npz(w), w / "npz_renamed.npy")
    np.save(w / "structured.npy", np.zeros(784, dtype=[("a", "f4"), ("b", "i4")]))
    np.save(w / "objects.npy", np.array([{"a": 1}] * 784, dtype=object), allow_pickle=True)
    np.save(w / "complex.npy", (rng.random(784) + 1j).astype(np.complex128))
    np.save(w / "strings.npy", np.array(["1"] * 784))
    with open(w / "huge_shape.npy", "wb") as f:  # declares 10**12 values, holds 4
        np.lib.format.write_array_header_1_0(f, {"descr": "<f8", "fortran_order": False,
                                                 "shape": (10**12,)})
        f.write(bytes(32))
    np.save(w / "short.npy", rng.random(784))
    (w / "short.npy").write_bytes((w / "short.npy").read_bytes()[:-100])

    # item 3: pictures that declare more pixels than parnn decodes
    for n in (20000, 10000, 8400):
        (w / f"declares_{n}.png").write_bytes(png_header(n, n))

    # item 4: FIFOs where files are read
    fifo(w / "fifo.safetensors")
    fifo(w / "fifo.png")
    shutil.copytree(data, w / "data_fifo")
    (w / "data_fifo" / "t10k-labels-idx1-ubyte.gz").unlink()
    fifo(w / "data_fifo" / "t10k-labels-idx1-ubyte.gz")
    (w / "ck_fifo").mkdir()
    fifo(w / "ck_fifo" / "checkpoint.safetensors")
    (w / "csv_fifo").mkdir()
    fifo(w / "csv_fifo" / "fashion-mnist_train.csv")
    fifo(w / "csv_fifo" / "fashion-mnist_test.csv")

    # item 7: the header checksum is required
    save_raw_model(w / "no_checksum.safetensors", net, drop_checksum=True, meta=meta)
    spec = dict(net.spec.to_dict(), output="sigmoid", loss="mse")
    save_raw_model(w / "edited_v1.safetensors", net, {"format": 1, "spec": spec},
                   drop_checksum=True, meta=meta)

    # behaved badly: a newline in a class name
    save_raw_model(w / "newline_names.safetensors", net,
                   meta=dict(meta, class_names=["a\nb"] + meta["class_names"][1:]))
    (w / "empty").mkdir()
    return w


def _npz(w):
    np.savez(w / "two.npz", a=np.zeros(784), b=np.ones(3))
    return w / "two.npz"


M = "{w}/run/model.safetensors"
D = ["--data", "{w}/data"]

# (args with {w} and {long} placeholders, extra environment, words the line must contain)
CASES = [
    # item 1: a 300-character component (ENAMETOOLONG) wherever a path is probed
    (["train", *D, "--out", "{w}/{long}/x", *TRAIN], {}, ["--out", "File name too long"]),
    (["train", *D, "--out", "{w}/new", "--checkpoint-dir", "{w}/{long}", *TRAIN], {},
     ["--checkpoint-dir", "File name too long"]),
    (["train", "--data", "{w}/{long}", "--out", "{w}/new", *TRAIN], {},
     ["data directory", "File name too long"]),
    (["data", "info"], {"PARNN_DATA": "{w}/{long}"}, ["$PARNN_DATA", "File name too long"]),
    (["predict", M, "{w}/{long}.png"], {}, ["File name too long"]),
    (["evaluate", "{w}/{long}.safetensors", *D], {}, ["File name too long"]),
    # item 2: a plain numeric ndarray only
    (["predict", M, "{w}/npz_renamed.npy"], {}, ["npz_renamed.npy", "zip archive"]),
    (["predict", M, "{w}/structured.npy"], {}, ["structured.npy", "structured array"]),
    (["predict", M, "{w}/objects.npy"], {}, ["objects.npy", "Python objects"]),
    (["predict", M, "{w}/complex.npy"], {}, ["complex.npy", "complex values"]),
    (["predict", M, "{w}/strings.npy"], {}, ["strings.npy", "plain numbers"]),
    (["predict", M, "{w}/huge_shape.npy"], {}, ["huge_shape.npy", "1000000000000 values"]),
    (["predict", M, "{w}/short.npy"], {}, ["short.npy", "truncated"]),
    # item 3: pixel count bounded before decoding, PIL's warnings replaced by one line
    (["predict", M, "{w}/declares_20000.png"], {}, ["declares_20000.png", "too large"]),
    (["predict", M, "{w}/declares_10000.png"], {}, ["declares_10000.png", "too large"]),
    (["predict", M, "{w}/declares_8400.png"], {}, ["8400x8400", "too large"]),
    # item 4: FIFOs are refused, never opened for a blocking read
    (["predict", "{w}/fifo.safetensors", "{w}/good.npy"], {}, ["fifo.safetensors", "FIFO"]),
    (["evaluate", "{w}/fifo.safetensors", *D], {}, ["fifo.safetensors", "FIFO"]),
    (["predict", M, "{w}/fifo.png"], {}, ["fifo.png", "FIFO"]),
    (["data", "info", "--data", "{w}/data_fifo"], {}, ["t10k-labels-idx1-ubyte.gz", "FIFO"]),
    (["data", "info", "--data", "{w}/csv_fifo"], {}, ["fashion-mnist_train.csv", "FIFO"]),
    (["train", "--resume", "{w}/ck_fifo"], {}, ["checkpoint.safetensors", "FIFO"]),
    # item 7: the header checksum is required
    (["predict", "{w}/no_checksum.safetensors", "{w}/good.npy"], {}, ["no checksum"]),
    (["predict", "{w}/edited_v1.safetensors", "{w}/good.npy"], {},
     ["format 1", "python -m parnn.io upgrade"]),
    # behaved badly: more than one line, names that reach the terminal as they are
    (["data", "info"], {"PARNN_DATA": "\x01\n"}, ["\\x01\\n", "$PARNN_DATA"]),
    (["train", "--data", "{w}/da\nta", "--out", "{w}/new", *TRAIN], {}, ["da\\nta"]),
    (["predict", "{w}/newline_names.safetensors", "{w}/good.npy"], {},
     ["class name 0", "a\\nb", "control character"]),
    (["train", *D, "--out", "/proc/parnn-test", *TRAIN], {}, ["--out", "not writable"]),
]


def _fill(a, w):
    return a.replace("{w}", str(w)).replace("{long}", LONG)


def _ids(case):
    text = " ".join(a for a in case[0] if a not in TRAIN and a not in D)
    env = " ".join(f"{k}={v!r}" for k, v in case[1].items())
    return (env + " " + text).replace("{w}/", "").replace("{long}", "LONG").strip()[:70]


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_bad_input_is_one_clean_line(case, ws):
    args, env, words = case
    before = snapshot(ws)
    env = {**{k: v for k, v in os.environ.items() if k != "PARNN_DATA"},
           **{k: _fill(v, ws) for k, v in env.items()}}
    r = parnn(*[_fill(a, ws) for a in args], cwd=ws, env=env, timeout=60)
    assert_one_line(r, *words)
    assert r.stdout == ""  # nothing half-done: no prediction of the good images either
    assert snapshot(ws) == before, "a failed command changed or created files"


# --- item 1: a directory that cannot be entered (EACCES) -----------------------------------------

@pytest.mark.parametrize("case", [
    (["train", "--data", "{t}/data", "--out", "{L}/x", *TRAIN], {}, ["--out", "Permission denied"]),
    (["train", "--data", "{t}/data", "--out", "{t}/new", "--checkpoint-dir", "{L}/ck/x", *TRAIN],
     {}, ["--checkpoint-dir", "Permission denied"]),
    (["train", "--data", "{L}/data", "--out", "{t}/new", *TRAIN], {},
     ["data directory", "Permission denied"]),
    (["data", "info"], {"PARNN_DATA": "{L}/data"}, ["$PARNN_DATA", "Permission denied"]),
    (["predict", "{t}/model.safetensors", "{L}/img.png"], {}, ["img.png", "Permission denied"]),
    (["evaluate", "{L}/model.safetensors", "--data", "{t}/data"], {},
     ["model.safetensors", "Permission denied"]),
], ids=["--out", "--checkpoint-dir", "--data", "$PARNN_DATA", "predict image", "evaluate model"])
def test_a_directory_that_cannot_be_entered(case, locked, ws):
    args, env, words = case
    t = locked.parent
    shutil.copy(ws / "run" / "model.safetensors", t / "model.safetensors")
    shutil.copytree(ws / "data", t / "data")

    def fill(a):
        return a.replace("{L}", str(locked)).replace("{t}", str(t))
    env = {**{k: v for k, v in os.environ.items() if k != "PARNN_DATA"},
           **{k: fill(v) for k, v in env.items()}}
    before = snapshot(t)
    r = unprivileged(*map(fill, args), env=env, timeout=60)
    assert_one_line(r, str(locked), *words)
    assert snapshot(t) == before


def test_resume_from_a_directory_that_cannot_be_entered(locked):
    assert_one_line(unprivileged("train", "--resume", locked / "ck", timeout=60), "Permission denied")


def test_resume_from_a_name_too_long(tmp_path):
    assert_one_line(parnn("train", "--resume", tmp_path / LONG, timeout=60), "File name too long")


# --- item 4: a FIFO where a fresh run's checkpoint would be ----------------------------------------

def test_a_fifo_in_place_of_the_checkpoint_does_not_hang_a_fresh_run(ws, tmp_path):
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    fifo(out / "checkpoints" / "checkpoint.safetensors")
    r = parnn("train", "--data", ws / "data", "--out", out, *TRAIN, timeout=90)
    assert r.returncode == 0 or len(r.stderr.splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr


# --- item 7: old files can be re-saved -----------------------------------------------------------

def test_an_old_model_is_upgraded_by_the_command_the_message_gives(ws, tmp_path):
    old = tmp_path / "old.safetensors"
    net, meta = io.load_model(ws / "run" / "model.safetensors")
    save_raw_model(old, net, {"format": 1}, drop_checksum=True, meta=meta)
    line = assert_one_line(parnn("predict", old, ws / "good.npy"))
    command = line.split("`")[1].split()
    assert command[:4] == ["python", "-m", "parnn.io", "upgrade"]
    r = subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and f"re-saved in format {io.FORMAT}" in r.stdout, r.stderr
    r = parnn("predict", old, ws / "good.npy")
    assert r.returncode == 0 and r.stderr == "" and len(r.stdout.splitlines()) == 1, r.stderr
    assert io.load_model(old)[0].params.tobytes() == net.params.tobytes()


# --- behaved badly: sizes checked against headers before reading; gzip bombs -----------------------

@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """Sparse and bomb files a few hundred MB to 1 GiB large, made once."""
    w = tmp_path_factory.mktemp("big")
    data = write_dataset(w / "data", n_train=200, n_test=40, gz=False)
    images = "train-images-idx3-ubyte"

    def dataset_with(name, make):
        d = w / name
        shutil.copytree(data, d)
        (d / images).unlink()
        make(d / images)
        return d

    head = bytes([0, 0, 8, 3]) + struct.pack(">3i", 60000, 28, 28)
    dataset_with("bad_magic", lambda p: sparse(p, b"\x12\x34\x56\x78", 1 << 30))
    dataset_with("trailing", lambda p: sparse(p, head, 1 << 30))
    dataset_with("too_many", lambda p: sparse(p, bytes([0, 0, 8, 3]) + struct.pack(
        ">3i", 1_000_000, 28, 28), 16 + 784_000_000))
    d = dataset_with("bomb", lambda p: None)
    gzip_bomb(d / (images + ".gz"), head, 512 * MB)
    d = dataset_with("bomb_header", lambda p: None)
    gzip_bomb(d / (images + ".gz"), bytes([0, 0, 8, 3]) + struct.pack(">3i", 1 << 20, 1024, 1024),
              512 * MB)
    mirror = w / "mirror"
    mirror.mkdir()
    for f in data.iterdir():
        (mirror / (f.name + ".gz")).write_bytes(gzip.compress(f.read_bytes()))
    shutil.copy(w / "bomb" / (images + ".gz"), mirror)

    # Format 1 with its header checksum, as the previous version wrote: both versions read it.
    blob = save_raw_model(w / "model.safetensors", SMALL, {"format": 1}).read_bytes()
    sparse(w / "model_trailing.safetensors", blob, 1 << 30)
    # The same header (its parnn part, checksum and all, untouched), but its safetensors index
    # declares a params tensor of 1 GiB, and the file is that large.
    n = int.from_bytes(blob[:8], "little")
    index = json.loads(blob[8:8 + n])
    index["params"].update(shape=[1 << 28], data_offsets=[0, 1 << 30])
    text = json.dumps(index).encode()
    sparse(w / "model_declares_1g.safetensors", struct.pack("<Q", len(text)) + text,
           8 + len(text) + (1 << 30))
    return w


SMALL = MLP(Spec((784, 8, 10), "relu", "softmax", "cross_entropy", "float32"), seed=0)


LIMIT_MB = 250  # the CLI alone is ~40 MB; the largest legitimate file here is 47 MB


@pytest.mark.parametrize("name,words", [
    ("bad_magic", ["not an IDX ubyte file"]),
    ("trailing", ["trailing bytes"]),
    ("too_many", ["1000000x28x28", "more than this dataset's file holds"]),
    ("bomb", ["trailing bytes"]),
    ("bomb_header", ["more than this dataset's file holds"]),
])
def test_idx_sizes_are_checked_before_reading(big, name, words):
    r, peak = run_measured(["data", "info", "--data", big / name])
    assert_one_line(r, "train-images-idx3-ubyte", *words)
    assert peak < LIMIT_MB, f"{peak:.0f} MB resident"


def test_data_fetch_stops_inflating_a_bomb(big, tmp_path):
    env = {**os.environ, "PARNN_MIRROR": (big / "mirror").as_uri(),
           "XDG_CACHE_HOME": str(tmp_path / "cache")}
    dest = tmp_path / "dest"
    r, peak = run_measured(["data", "fetch", "--dest", dest], env=env)
    assert_one_line(r, "train-images-idx3-ubyte.gz", "nothing was kept")
    assert peak < LIMIT_MB, f"{peak:.0f} MB resident"
    assert not list(dest.glob("train-images*")) and not list(dest.glob(".*"))


@pytest.mark.parametrize("name,words", [
    ("model_trailing", ["bytes after the last tensor"]),
    ("model_declares_1g", ["shape (268435456,)", f"the spec needs ({SMALL.spec.n_params},)"]),
])
def test_model_sizes_are_checked_before_reading(big, name, words):
    r, peak = run_measured(["predict", big / f"{name}.safetensors", big / "model.safetensors"])
    assert_one_line(r, f"{name}.safetensors", *words)
    assert peak < LIMIT_MB, f"{peak:.0f} MB resident"


# --- behaved badly: a read-only model is not replaced silently -------------------------------------

def test_a_read_only_model_is_not_replaced(ws, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(ws / "run", out)
    shutil.rmtree(out / "checkpoints")
    model = out / "model.safetensors"
    model.chmod(0o444)
    before = model.read_bytes()
    r = parnn("train", "--data", ws / "data", "--out", out, *TRAIN, "--seed", "7", timeout=120)
    assert_one_line(r, "model.safetensors", "read-only")
    assert model.read_bytes() == before and stat.S_IMODE(model.stat().st_mode) == 0o444


def test_a_read_only_model_is_refused_before_training(ws, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(ws / "run", out)
    shutil.rmtree(out / "checkpoints")
    (out / "model.safetensors").chmod(0o444)
    r = parnn("train", "--data", ws / "data", "--out", out, *TRAIN, timeout=120)
    assert_one_line(r, "--out", "read-only")
    assert not (out / "checkpoints").exists()


def test_a_directory_in_place_of_an_output_is_refused_before_training(ws, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(ws / "run", out)
    shutil.rmtree(out / "checkpoints")
    (out / "history.json").unlink()
    (out / "history.json").mkdir()
    before = (out / "model.safetensors").read_bytes()
    r = parnn("train", "--data", ws / "data", "--out", out, *TRAIN, "--seed", "7", timeout=120)
    assert_one_line(r, "history.json", "directory")
    assert (out / "model.safetensors").read_bytes() == before


def test_check_output_dir_refuses_outputs_that_could_not_be_replaced(tmp_path):
    """The up-front check the CLI can call with the names of its outputs."""
    from parnn.errors import ConfigError

    (tmp_path / "history.json").mkdir()
    with pytest.raises(ConfigError, match="history.json is a directory, not a file"):
        paths.check_output_dir(tmp_path, "--out", files=("model.safetensors", "history.json"))
    (tmp_path / "history.json").rmdir()
    (tmp_path / "model.safetensors").write_bytes(b"x")
    (tmp_path / "model.safetensors").chmod(0o444)
    with pytest.raises(ConfigError, match="model.safetensors is read-only"):
        paths.check_output_dir(tmp_path, "--out", files=("model.safetensors", "history.json"))
    (tmp_path / "model.safetensors").chmod(0o644)
    paths.check_output_dir(tmp_path, "--out", files=("model.safetensors", "history.json"))


# --- item 8: every field of a checkpoint is checked before anything acts on it -------------------

@pytest.mark.parametrize("row,words", [
    ({}, "history row 1 is not a row of epoch 1"),
    ({"test_acc": "0.9"}, "history row 1's test_acc '0.9' is not a finite number"),
    ({"loss": {"a": 1}}, "history row 1's loss"),
    ({"train_acc": 7.0}, "history row 1's train_acc 7.0 is out of range"),
    ({"extra": 1}, "history row 1 has unknown 'extra'"),
], ids=["empty row", "string test_acc", "nested loss", "accuracy 7", "unknown key"])
def test_a_checkpoint_with_malformed_history_is_refused_before_anything_is_written(
        ws, tmp_path, row, words):
    """A finished checkpoint whose checksums are valid but whose history rows are not rows:
    before, --resume wrote the model and history into the recorded --out, then a traceback."""
    out = tmp_path / "out"
    shutil.copytree(ws / "run", out)
    ck = out / "checkpoints" / "checkpoint.safetensors"
    arrays, meta = io.load_checkpoint(ck)
    first = {} if row == {} else {**meta["history"][0], **row}
    meta = {**meta, "run": {**meta["run"], "out": str(out)},
            "history": [first, *meta["history"][1:]]}
    io.save_checkpoint(ck, arrays, meta)
    (out / "checkpoints" / "checkpoint.prev.safetensors").unlink(missing_ok=True)
    before = snapshot(out)
    assert_one_line(parnn("train", "--resume", out, timeout=60), "no usable checkpoint", words)
    assert snapshot(out) == before


# --- item 9: temporaries left by a SIGKILL are swept when the next run starts --------------------

def test_temporaries_of_a_killed_run_are_swept_at_start(ws, tmp_path):
    """What a SIGKILL at any point of the output writes leaves (parnn.atomic.atomic_open's temporaries,
    beside each output and each checkpoint), removed by the next run in that directory."""
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    stale = [out / f".{name}.k1lled.tmp" for name in
             ("model.safetensors", "history.json", "history.csv", "history.png")]
    stale += [out / "checkpoints" / f".{name}.k1lled.tmp" for name in
              ("checkpoint.safetensors", "checkpoint.prev.safetensors")]
    for p in stale:
        p.write_bytes(bytes(1000))
    keep = out / ".notes.tmp"    # not parnn's: kept
    keep.write_text("mine")
    r = parnn("train", "--data", ws / "data", "--out", out, *TRAIN, timeout=120)
    assert r.returncode == 0, r.stderr
    assert not [p for p in stale if p.exists()] and keep.read_text() == "mine"
    assert not list(out.rglob(".parnn.lock"))


# --- item 11: one run per directory ----------------------------------------------------------------

def test_a_second_run_in_a_locked_directory_gets_one_line_naming_the_first(ws, tmp_path):
    from parnn.run import rundir

    out = tmp_path / "out"
    with rundir.hold(out, "--out"):
        r = parnn("train", "--data", ws / "data", "--out", out, *TRAIN, timeout=120)
        assert_one_line(r, "--out", "in use by another parnn run", f"PID {os.getpid()}")
        assert not (out / "checkpoints").exists()
    assert not out.exists()   # the lock file goes with the lock, and the directory it made


def test_two_runs_started_together_one_trains_the_other_is_refused(ws, tmp_path):
    """Before: both said "model saved", one model was lost and the checkpoints interleaved."""
    from synthetic_data import popen

    out = tmp_path / "out"
    args = ["train", "--data", ws / "data", "--out", out, "--hidden", "8", "--engine", "numpy",
            "--threads", "1", "--no-progress", "--batch-size", "1", "--epochs", "30",
            "--optimizer", "sgd"]
    first = popen(*args, env={**os.environ, "PYTHONUNBUFFERED": "1"})  # its log line, at once
    try:
        assert first.stdout.readline().startswith("parnn ")   # it holds the lock, training
        second = parnn(*args, timeout=120)
        assert_one_line(second, "in use by another parnn run", f"PID {first.pid}")
    finally:
        first.kill()
        first.wait()


# --- behaved badly: memory estimated before data loads ---------------------------------------------

def _room():
    from parnn.run import memory

    return memory.available()


@pytest.mark.skipif(_room() is None, reason="the available memory is not known here")
def test_a_run_that_cannot_fit_in_memory_is_refused_before_the_data_loads(tmp_path):
    """--hidden 3000000 (about 40 GB with Adam): before, resident memory passed 4 GB with
    nothing printed. Refused now before the data is read (the data directory is not even
    there), with the estimate and what is available."""
    from parnn.run import memory

    r, peak = run_measured(["train", "--hidden", "3000000", "--engine", "numpy", "--data",
                            tmp_path / "nowhere", "--out", tmp_path / "out", "--no-progress"])
    line = assert_one_line(r, "this run needs about", "GB of memory", "is available",
                           "--hidden")
    need = float(line.split("needs about ")[1].split(" GB")[0])
    assert need > 30   # 2.38e9 float32 parameters, gradient and two Adam moments
    room = float(line.split("but ")[1].split(" GB")[0])
    assert room == pytest.approx(memory.available() / 1e9, rel=0.2)
    assert peak < LIMIT_MB and not (tmp_path / "out").exists()


def test_the_memory_estimate_counts_what_a_run_allocates():
    from parnn.run import memory
    from parnn.run.config import make_config

    cfg = make_config("modern", hidden=(1000,), batch_size=256)
    spec = cfg.spec()
    parts = memory.estimate(cfg, spec, 60000, 10000)
    # parameters, gradient, Adam's two moments: four float32 buffers of n_params
    assert parts["parameters, gradient and optimizer state"] == 4 * 4 * spec.n_params
    sgd = memory.estimate(make_config("paper", hidden=(1000,)), make_config(
        "paper", hidden=(1000,)).spec(), 60000, 10000)
    assert sgd["parameters, gradient and optimizer state"] == 2 * 8 * spec.n_params
    assert parts["dataset"] > 70000 * 784 * 4     # the float arrays, at least


# --- behaved badly: threads capped, non-finite outputs, one line from matplotlib and numba --------

def test_threads_beyond_the_cores_are_capped_with_a_message(ws, tmp_path):
    from parnn.run.config import usable_cores

    r = parnn("train", "--data", ws / "data", "--out", tmp_path / "out",
              *[a if a != "1" or i != TRAIN.index("--threads") + 1 else "10000"
                for i, a in enumerate(TRAIN)], timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == [f"parnn: warning: --threads 10000 is more than the "
                                     f"{usable_cores()} core(s) this process may use: using "
                                     f"{usable_cores()}"]
    net, meta = io.load_model(tmp_path / "out" / "model.safetensors")
    assert meta["config"]["threads"] == usable_cores() == meta["threads"]


@pytest.fixture(scope="module")
def huge_weights(ws):
    """A model whose weights are all 3e38 (valid checksums): its outputs overflow to NaN."""
    net, meta = io.load_model(ws / "run" / "model.safetensors")
    net.params[...] = 3e38
    path = ws.parent / "huge_weights.safetensors"
    io.save_model(path, net, meta)
    return path


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_non_finite_outputs_are_an_error(ws, huge_weights, command):
    """Before: NaN -> class 0, four RuntimeWarnings, exit 0."""
    args = [ws / "good.npy"] if command == "predict" else ["--data", ws / "data"]
    r = parnn(command, huge_weights, *args, timeout=60)
    assert_one_line(r, "huge_weights.safetensors", "NaN or infinity")
    assert r.stdout == ""


def test_matplotlib_is_quiet_with_an_unwritable_home(ws, tmp_path):
    env = {**os.environ, "HOME": "/proc/nonexistent", "MPLCONFIGDIR": "/proc/parnn-mpl"}
    env.pop("XDG_CACHE_HOME", None)
    r = parnn("train", "--data", ws / "data", "--out", tmp_path / "out", *TRAIN, env=env,
              timeout=120)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert (tmp_path / "out" / "history.png").stat().st_size > 0


@pytest.mark.parametrize("value", ["abc", "0", "-2", ""])
def test_a_bad_numba_num_threads_is_one_line(ws, tmp_path, value):
    r = parnn("train", "--data", ws / "data", "--out", tmp_path / "out", *TRAIN,
              env={**os.environ, "NUMBA_NUM_THREADS": value}, timeout=60)
    assert_one_line(r, "$NUMBA_NUM_THREADS must be a whole number >= 1", f"got '{value}'")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_bench_quiet_wait_must_be_a_finite_number(tmp_path, value):
    """Before: accepted (nan made every wait end at once, inf never)."""
    r = parnn("bench", f"--quiet-wait={value}", "--out", tmp_path / "b", timeout=60)
    assert r.returncode == 2 and r.stderr.splitlines() == [
        f"parnn bench: error: argument --quiet-wait: expected a number of seconds, got "
        f"'{value}' (see 'parnn bench --help')"], r.stderr
    assert not (tmp_path / "b").exists()


# --- item 2 and issue 10 defect 5: one bad file among good ones ------------------------------------

def test_a_bad_file_among_good_ones_gets_its_line_and_the_others_are_predicted(ws):
    """Before: a traceback, and nothing printed for the good files either."""
    r = parnn("predict", M.format(w=ws), ws / "good.npy", ws / "complex.npy", ws / "good.npy",
              timeout=60)
    assert r.returncode == 1
    assert len(r.stderr.splitlines()) == 1 and "complex.npy" in r.stderr, r.stderr
    lines = r.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(ws / "good.npy")] * 2


def test_the_python_api_checks_the_memory_too():
    from parnn import train
    from parnn.errors import ConfigError

    X = np.zeros((20, 784), np.float32)
    with pytest.raises(ConfigError, match="this run needs about .* of memory"):
        train(X, np.arange(20) % 2, hidden=(30_000_000,), engine="numpy")   # ~900 GB
