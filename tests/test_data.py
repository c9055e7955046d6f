"""Data loading, validation, lookup and fetching, all on tiny synthetic files."""

import functools
import gzip
import hashlib
import os
import http.server
import struct
import threading
from pathlib import Path

import numpy as np
import pytest

from parnn import data, download
from parnn.errors import ConfigError, DataError
from parnn.data import (Dataset, find_data_dir, load_dataset, load_pair, one_hot, read_csv,
                        read_idx)
from parnn.download import describe, fetch, verify
from synthetic_data import no_hang

REAL = Path("/usr/share/datasets/fashion-mnist")
N_TRAIN, N_TEST = 24, 8


def idx_bytes(arr: np.ndarray) -> bytes:
    arr = np.asarray(arr, dtype=np.uint8)
    return bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}i", *arr.shape) + arr.tobytes()


def write_idx(path: Path, arr: np.ndarray, gz: bool) -> Path:
    raw = idx_bytes(arr)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def make_arrays(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "train-images": rng.integers(0, 256, (N_TRAIN, 28, 28), dtype=np.uint8),
        "train-labels": rng.integers(0, 10, N_TRAIN, dtype=np.uint8),
        "t10k-images": rng.integers(0, 256, (N_TEST, 28, 28), dtype=np.uint8),
        "t10k-labels": rng.integers(0, 10, N_TEST, dtype=np.uint8),
    }


def write_dataset(directory: Path, gz=True, seed=0) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    arrays = make_arrays(seed)
    for role, arr in arrays.items():
        name = data.IDX_NAMES[role] + (".gz" if gz else "")
        write_idx(directory / name, arr, gz)
    return arrays


def write_csv(path: Path, images: np.ndarray, labels: np.ndarray, header=True) -> Path:
    lines = ["label," + ",".join(f"pixel{i}" for i in range(1, 785))] if header else []
    for x, y in zip(images.reshape(len(images), -1), labels):
        lines.append(",".join(map(str, [int(y), *x.tolist()])))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(autouse=True)
def isolated_lookup(tmp_path, monkeypatch):
    """No test may see the machine's real data, cache or environment unless it asks to."""
    monkeypatch.delenv("PARNN_DATA", raising=False)
    monkeypatch.delenv("PARNN_MIRROR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setattr(data, "SYSTEM_DATASETS", tmp_path / "system")


# ---------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [True, False])
def test_idx_roundtrip(tmp_path, gz):
    arr = np.random.default_rng(1).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    # A misleading name: the format is detected from the bytes, not the suffix.
    path = write_idx(tmp_path / ("images.raw" if gz else "images.gz"), arr, gz)
    out = read_idx(path)
    assert out.dtype == np.uint8 and out.shape == (5, 28, 28)
    np.testing.assert_array_equal(out, arr)
    out[0, 0, 0] = 1  # an ordinary writable array
    labels = read_idx(write_idx(tmp_path / "l", np.arange(7) % 10, gz), ndim=1)
    np.testing.assert_array_equal(labels, np.arange(7))


def test_load_dataset_roundtrip_and_scaling(tmp_path):
    arrays = write_dataset(tmp_path / "d", gz=True)
    ds = load_dataset(data_dir=tmp_path / "d")
    assert isinstance(ds, Dataset)
    assert ds.X_train.shape == (N_TRAIN, 784) and ds.X_test.shape == (N_TEST, 784)
    assert ds.X_train.dtype == np.float32 and ds.X_train.flags.c_contiguous
    np.testing.assert_array_equal(ds.X_train, arrays["train-images"].reshape(N_TRAIN, -1) / np.float32(255))
    np.testing.assert_array_equal(ds.y_test, arrays["t10k-labels"])
    assert ds.y_train.dtype == np.int64
    assert ds.class_names == data.FASHION_CLASSES and ds.source == tmp_path / "d"
    assert ds.sha256["train-labels"] == hashlib.sha256(idx_bytes(arrays["train-labels"])).hexdigest()
    assert set(ds.files) == set(data.ROLES)

    small = load_dataset(data_dir=tmp_path / "d", dtype="float64", limit_train=5, limit_test=3)
    assert small.X_train.shape == (5, 784) and small.X_train.dtype == np.float64
    np.testing.assert_array_equal(small.y_test, arrays["t10k-labels"][:3])
    assert small.X_train.max() <= 1.0 and small.X_train.min() >= 0.0


def test_gz_and_raw_hash_the_same(tmp_path):
    write_dataset(tmp_path / "gz", gz=True)
    write_dataset(tmp_path / "raw", gz=False)
    a, b = load_dataset(data_dir=tmp_path / "gz"), load_dataset(data_dir=tmp_path / "raw")
    assert a.sha256 == b.sha256
    np.testing.assert_array_equal(a.X_train, b.X_train)


def test_one_hot():
    np.testing.assert_array_equal(one_hot(np.array([2, 0]), 3), [[0, 0, 1], [1, 0, 0]])
    assert one_hot(np.array([1]), dtype="float64").dtype == np.float64
    with pytest.raises(DataError, match="label 10 at index 1"):
        one_hot(np.array([1, 10]))


# ---------------------------------------------------------------- bad input: one-line DataError naming the file


def assert_data_error(fn, *names, match=None):
    with pytest.raises(DataError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg
    for name in names:
        assert str(name) in msg, msg
    if match:
        assert match in msg, msg
    return msg


def test_truncated_idx(tmp_path):
    raw = idx_bytes(np.zeros((3, 28, 28)))
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(raw[:-100])
    assert_data_error(lambda: read_idx(path), path,
                      match="truncated: header says 3x28x28 (2352 bytes) but found 2252")


def test_trailing_bytes(tmp_path):
    path = tmp_path / "labels"
    path.write_bytes(idx_bytes(np.arange(5)) + b"\0\0")
    assert_data_error(lambda: read_idx(path), path, match="2 trailing bytes")


def test_truncated_gzip(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((3, 28, 28))))[:-30])
    assert_data_error(lambda: read_idx(path), path, match="gzip")


def test_corrupt_gzip(tmp_path):
    good = bytearray(gzip.compress(idx_bytes(np.arange(200) % 10)))
    good[20:30] = b"\xff" * 10
    path = tmp_path / "x.gz"
    path.write_bytes(bytes(good))
    assert_data_error(lambda: read_idx(path), path)


def test_wrong_magic(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"hello world, this is not IDX")
    assert_data_error(lambda: read_idx(path), path, match="magic")
    labels = write_idx(tmp_path / "labels", np.arange(4), gz=False)
    assert_data_error(lambda: read_idx(labels, ndim=3), labels, match="image file")


def test_bad_dimensions(tmp_path):
    path = tmp_path / "zero"
    path.write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">3i", 0, 28, 28))
    assert_data_error(lambda: read_idx(path), path, match="positive")


@pytest.mark.parametrize("content", [b"", gzip.compress(b"")])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.gz"
    path.write_bytes(content)
    assert_data_error(lambda: read_idx(path), path, match="empty")


def test_missing_file(tmp_path):
    assert_data_error(lambda: read_idx(tmp_path / "nope.gz"), tmp_path / "nope.gz", match="no such file")


def test_count_mismatch(tmp_path):
    x = write_idx(tmp_path / "x", np.zeros((4, 28, 28)), gz=True)
    y = write_idx(tmp_path / "y", np.zeros(5), gz=True)
    assert_data_error(lambda: load_pair(x, y), x, y, match="4 images")


def test_label_10(tmp_path):
    x = write_idx(tmp_path / "x", np.zeros((4, 28, 28)), gz=False)
    y = write_idx(tmp_path / "y", [1, 2, 3, 10], gz=False)
    assert_data_error(lambda: load_pair(x, y), y, match="label 10 at index 3")


def test_not_28x28(tmp_path):
    x = write_idx(tmp_path / "x", np.zeros((2, 28, 27)), gz=False)
    y = write_idx(tmp_path / "y", [1, 2], gz=False)
    assert_data_error(lambda: load_pair(x, y), x, match="28x28")


def test_bad_file_in_dataset_dir_names_it(tmp_path):
    write_dataset(tmp_path / "d")
    victim = tmp_path / "d" / "t10k-labels-idx1-ubyte.gz"
    victim.write_bytes(victim.read_bytes()[:-5])
    assert_data_error(lambda: load_dataset(data_dir=tmp_path / "d"), victim)


# ---------------------------------------------------------------- CSV


def test_csv_equals_idx(tmp_path):
    arrays = write_dataset(tmp_path / "idx")
    x, y = read_csv(write_csv(tmp_path / "t.csv", arrays["train-images"], arrays["train-labels"]))
    assert x.dtype == np.uint8 and x.shape == (N_TRAIN, 28, 28) and y.dtype == np.uint8
    np.testing.assert_array_equal(x, read_idx(tmp_path / "idx" / "train-images-idx3-ubyte.gz"))
    np.testing.assert_array_equal(y, read_idx(tmp_path / "idx" / "train-labels-idx1-ubyte.gz"))


def test_csv_dataset_dir(tmp_path):
    arrays = make_arrays()
    d = tmp_path / "kaggle"
    d.mkdir()
    write_csv(d / "fashion-mnist_train.csv", arrays["train-images"], arrays["train-labels"])
    write_csv(d / "fashion-mnist_test.csv", arrays["t10k-images"], arrays["t10k-labels"])
    ds = load_dataset(data_dir=d)
    np.testing.assert_array_equal(ds.y_train, arrays["train-labels"])
    np.testing.assert_array_equal(ds.X_test, arrays["t10k-images"].reshape(N_TEST, -1) / np.float32(255))
    assert ds.sha256["train"] == hashlib.sha256((d / "fashion-mnist_train.csv").read_bytes()).hexdigest()
    assert verify(d)["test"]["ok"] is None  # no published checksum for the Kaggle files
    assert "no known checksum" in describe(ds)


def csv_lines(n=3):
    arrays = make_arrays()
    header = "label," + ",".join(f"pixel{i}" for i in range(1, 785))
    rows = [",".join(map(str, [int(y), *x.ravel().tolist()]))
            for x, y in zip(arrays["train-images"][:n], arrays["train-labels"][:n])]
    return header, rows


def test_csv_783_pixel_columns(tmp_path):
    header, rows = csv_lines()
    rows[1] = rows[1].rsplit(",", 1)[0]
    path = tmp_path / "short.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    assert_data_error(lambda: read_csv(path), path, match="line 3 has 784 columns")


def test_csv_non_numeric_cell(tmp_path):
    header, rows = csv_lines()
    cells = rows[2].split(",")
    cells[10] = "abc"
    rows[2] = ",".join(cells)
    path = tmp_path / "bad.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    assert_data_error(lambda: read_csv(path), path, match="line 4, column 11: 'abc'")


@pytest.mark.parametrize("cell,col,what", [("256", 5, "pixel 256"), ("-1", 2, "pixel -1"), ("10", 1, "label 10")])
def test_csv_out_of_range(tmp_path, cell, col, what):
    header, rows = csv_lines()
    cells = rows[0].split(",")
    cells[col - 1] = cell
    rows[0] = ",".join(cells)
    path = tmp_path / "range.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    assert_data_error(lambda: read_csv(path), path, match=f"line 2, column {col}: {what}")


def test_csv_header_and_empty(tmp_path):
    header, rows = csv_lines()
    no_header = tmp_path / "noheader.csv"
    no_header.write_text("\n".join(rows) + "\n")
    assert_data_error(lambda: read_csv(no_header), no_header, match="header")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert_data_error(lambda: read_csv(empty), empty, match="empty")
    only_header = tmp_path / "only.csv"
    only_header.write_text(header + "\n")
    assert_data_error(lambda: read_csv(only_header), only_header, match="no data rows")


# ---------------------------------------------------------------- lookup


def test_lookup_order(tmp_path, monkeypatch):
    system = tmp_path / "system" / "fashion-mnist"
    cache = tmp_path / "xdg-cache" / "parnn" / "fashion-mnist"
    env = tmp_path / "env"
    explicit = tmp_path / "explicit"
    for d in (system, cache, env, explicit):
        write_dataset(d, gz=d is not cache)  # the cache holds raw files: both names count

    assert find_data_dir(data_dir=explicit) == explicit
    monkeypatch.setenv("PARNN_DATA", str(env))
    assert find_data_dir(data_dir=explicit) == explicit
    assert find_data_dir() == env
    monkeypatch.delenv("PARNN_DATA")
    assert find_data_dir() == system
    for f in system.iterdir():
        f.unlink()
    assert find_data_dir() == cache


def test_parnn_data_may_hold_dataset_subdirs(tmp_path, monkeypatch):
    write_dataset(tmp_path / "all" / "fashion-mnist")
    monkeypatch.setenv("PARNN_DATA", str(tmp_path / "all"))
    assert find_data_dir() == tmp_path / "all" / "fashion-mnist"


def test_default_cache_is_under_home(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.cache_dir("mnist") == tmp_path / "home" / ".cache" / "parnn" / "mnist"


def test_explicit_dir_missing_does_not_fall_through(tmp_path, monkeypatch):
    write_dataset(tmp_path / "system" / "fashion-mnist")
    missing = tmp_path / "typo"
    assert_data_error(lambda: find_data_dir(data_dir=missing), missing, match="does not exist")
    monkeypatch.setenv("PARNN_DATA", str(missing))
    assert_data_error(lambda: find_data_dir(), missing, match="PARNN_DATA")


def test_explicit_dir_missing_a_file(tmp_path):
    write_dataset(tmp_path / "d")
    (tmp_path / "d" / "t10k-images-idx3-ubyte.gz").unlink()
    assert_data_error(lambda: find_data_dir(data_dir=tmp_path / "d"), tmp_path / "d",
                      match="missing t10k-images-idx3-ubyte[.gz]")


def test_nothing_found(tmp_path):
    msg = assert_data_error(lambda: find_data_dir(), tmp_path / "system" / "fashion-mnist",
                            tmp_path / "xdg-cache" / "parnn" / "fashion-mnist")
    assert "parnn data fetch" in msg and "apt-get install dataset-fashion-mnist" in msg


# ---------------------------------------------------------------- fetch from loopback


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def mirror(tmp_path):
    """Serve tmp_path/mirror over HTTP on 127.0.0.1; yields (directory, base_url)."""
    root = tmp_path / "mirror"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def tiny_spec(root: Path, kind="raw") -> data.DatasetSpec:
    """A fake dataset whose checksums are those of the files now in root."""
    files = {}
    for role, name in data.IDX_NAMES.items():
        gz = (root / f"{name}.gz").read_bytes()
        raw = gzip.decompress(gz)
        files[role] = data.FileSpec(name, len(raw),
                                    sha256_raw=hashlib.sha256(raw).hexdigest() if kind == "raw" else None,
                                    sha256_gz=hashlib.sha256(gz).hexdigest() if kind == "gz" else None)
    return data.DatasetSpec(data.MNIST_CLASSES, "http://127.0.0.1:9/unused/", files)


@pytest.mark.parametrize("kind", ["raw", "gz"])
def test_fetch_success_and_skip(mirror, tmp_path, monkeypatch, kind):
    root, url = mirror
    arrays = write_dataset(root)
    monkeypatch.setitem(data.DATASETS, "tiny", tiny_spec(root, kind))
    monkeypatch.setenv("PARNN_MIRROR", url)

    dest = fetch("tiny", progress=False)
    assert dest == tmp_path / "xdg-cache" / "parnn" / "tiny"
    assert sorted(p.name for p in dest.iterdir()) == sorted(f"{n}.gz" for n in data.IDX_NAMES.values())
    ds = load_dataset("tiny")
    assert ds.source == dest and ds.class_names == data.MNIST_CLASSES
    np.testing.assert_array_equal(ds.y_train, arrays["train-labels"])
    assert all(v["ok"] for v in verify(dest, "tiny").values())

    # Already present and verified: nothing is requested, so an empty mirror still works.
    for f in root.iterdir():
        f.unlink()
    before = {p: p.stat().st_mtime_ns for p in dest.iterdir()}
    assert fetch("tiny", progress=False) == dest
    assert {p: p.stat().st_mtime_ns for p in dest.iterdir()} == before


def test_fetch_corrupted_file_leaves_nothing(mirror, tmp_path, monkeypatch):
    root, url = mirror
    write_dataset(root)
    monkeypatch.setitem(data.DATASETS, "tiny", tiny_spec(root))
    bad = root / "t10k-images-idx3-ubyte.gz"
    write_idx(bad, np.ones((N_TEST, 28, 28)), gz=True)  # valid IDX, wrong content
    dest = tmp_path / "dest"

    msg = assert_data_error(lambda: fetch("tiny", dest=dest, base_url=url, progress=False),
                            "t10k-images-idx3-ubyte.gz", match="checksum mismatch")
    expected = data.DATASETS["tiny"].files["t10k-images"].sha256_raw
    actual = hashlib.sha256(gzip.decompress(bad.read_bytes())).hexdigest()
    assert expected in msg and actual in msg
    left = sorted(p.name for p in dest.iterdir())
    assert "t10k-images-idx3-ubyte.gz" not in left
    assert not [n for n in left if n.startswith(".") or n.endswith(".part")]
    # Files that did verify are kept; the fix is just to fetch again.
    assert all(verify_one(dest / n, "tiny") for n in left)


def verify_one(path: Path, dataset: str) -> bool:
    role = next(r for r, n in data.IDX_NAMES.items() if path.name.startswith(n))
    return download._check_file(path, data.DATASETS[dataset].files[role])[0] is True


def test_fetch_replaces_a_damaged_cached_file(mirror, tmp_path, monkeypatch):
    root, url = mirror
    write_dataset(root)
    monkeypatch.setitem(data.DATASETS, "tiny", tiny_spec(root))
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8bjunk")
    fetch("tiny", dest=dest, base_url=url, progress=False)
    assert all(v["ok"] for v in verify(dest, "tiny").values())


def test_fetch_network_errors(mirror, tmp_path, monkeypatch):
    root, url = mirror  # empty mirror: HTTP 404
    write_dataset(tmp_path / "spec-source")
    monkeypatch.setitem(data.DATASETS, "tiny", tiny_spec(tmp_path / "spec-source"))
    dest = tmp_path / "dest"
    assert_data_error(lambda: fetch("tiny", dest=dest, base_url=url, progress=False),
                      "train-images-idx3-ubyte.gz", match="404")
    assert list(dest.iterdir()) == []
    # Nothing listens on the discard port of loopback: connection refused.
    assert_data_error(lambda: fetch("tiny", dest=dest, base_url="http://127.0.0.1:9/", progress=False),
                      "127.0.0.1:9", match="download failed")
    assert list(dest.iterdir()) == []


# ---------------------------------------------------------------- the real data


@pytest.mark.skipif(not (REAL / "train-labels-idx1-ubyte.gz").exists(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist(monkeypatch):
    monkeypatch.setattr(data, "SYSTEM_DATASETS", REAL.parent)
    ds = load_dataset()
    assert ds.source == REAL
    assert ds.X_train.shape == (60000, 784) and ds.X_test.shape == (10000, 784)
    assert ds.X_train.dtype == np.float32 and ds.X_train.flags.c_contiguous
    assert ds.X_train.min() == 0.0 and ds.X_train.max() == 1.0
    assert ds.y_train.shape == (60000,) and set(np.unique(ds.y_test)) == set(range(10))
    expected = {role: fs.sha256_raw for role, fs in data.DATASETS["fashion-mnist"].files.items()}
    assert ds.sha256 == expected
    text = describe(ds)
    assert text.count("verified") == 4 and "MISMATCH" not in text


# ---------------------------------------------------------------- issue 14: sizes first, probes


def test_gzip_trailing_bytes_are_found_without_inflating_them(tmp_path):
    import tracemalloc

    path = tmp_path / "labels.gz"  # 64 KB of gzip, 64 MB of zeros after 5 labels
    path.write_bytes(gzip.compress(idx_bytes(np.arange(5)) + bytes(64 * 2**20)))
    tracemalloc.start()
    try:
        assert_data_error(lambda: read_idx(path), path,
                          match="trailing bytes: header says 5 (5 bytes) but the data goes on")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, f"{peak / 2**20:.0f} MB allocated"


def test_a_gzip_header_promising_more_than_gzip_can_hold(tmp_path):
    path = tmp_path / "images.gz"
    path.write_bytes(gzip.compress(bytes([0, 0, 8, 3]) + struct.pack(">3i", 2**30, 28, 28)))
    assert_data_error(lambda: read_idx(path), path, match="cannot hold that much")


def test_a_header_larger_than_the_datasets_file_is_refused_before_reading(tmp_path, monkeypatch):
    d = tmp_path / "d"
    write_dataset(d)
    monkeypatch.setitem(data.DATASETS, "tiny", tiny_spec(d))
    victim = d / "train-labels-idx1-ubyte.gz"
    victim.write_bytes(gzip.compress(idx_bytes(np.zeros(N_TRAIN + 1))))  # one label too many
    assert_data_error(lambda: load_dataset("tiny", data_dir=d), victim,
                      match=f"header says {N_TRAIN + 1} ({N_TRAIN + 1} bytes), more than this "
                            f"dataset's file holds ({N_TRAIN} bytes)")




def test_a_fifo_among_the_data_files_is_named_not_opened(tmp_path):
    write_dataset(tmp_path / "d")
    victim = tmp_path / "d" / "train-labels-idx1-ubyte.gz"
    victim.unlink()
    os.mkfifo(victim)
    with no_hang():
        assert_data_error(lambda: load_dataset(data_dir=tmp_path / "d"), victim, match="is a FIFO")
        assert_data_error(lambda: read_idx(victim), victim, match="is a FIFO")
        assert_data_error(lambda: read_csv(victim), victim, match="is a FIFO")


def test_paths_that_cannot_be_probed_are_one_line(tmp_path, monkeypatch):
    long = tmp_path / ("x" * 300)
    assert_data_error(lambda: find_data_dir(data_dir=long), long, match="File name too long")
    monkeypatch.setenv("PARNN_DATA", "\x01\n")
    msg = assert_data_error(lambda: find_data_dir(), "\\x01\\n", match="$PARNN_DATA")
    assert "\x01" not in msg
    monkeypatch.delenv("PARNN_DATA")
    # The default places are only looked in: one that cannot be probed is skipped, and said so.
    monkeypatch.setattr(data, "SYSTEM_DATASETS", long)
    msg = assert_data_error(lambda: find_data_dir(), match="File name too long")
    write_dataset(tmp_path / "xdg-cache" / "parnn" / "fashion-mnist")
    assert find_data_dir() == tmp_path / "xdg-cache" / "parnn" / "fashion-mnist"


def test_fetch_refuses_a_download_larger_than_the_file_can_be(tmp_path, monkeypatch):
    root = tmp_path / "mirror"
    write_dataset(root)
    monkeypatch.setitem(data.DATASETS, "tiny", tiny_spec(root))
    size = data.DATASETS["tiny"].files["train-images"].size
    (root / "train-images-idx3-ubyte.gz").write_bytes(np.random.default_rng(0).bytes(2 * size + 8192))
    dest = tmp_path / "dest"
    assert_data_error(lambda: fetch("tiny", dest=dest, base_url=root.as_uri(), progress=False),
                      "train-images-idx3-ubyte.gz", "nothing was kept", match="more than")
    assert list(dest.iterdir()) == []


def test_nothing_found_names_the_fetch_for_that_dataset_and_the_data_flag(tmp_path):
    """Issue 10 defect 4: the MNIST hint named a fetch of Fashion-MNIST and never --data."""
    msg = assert_data_error(lambda: find_data_dir("mnist"), tmp_path / "system" / "mnist",
                            tmp_path / "xdg-cache" / "parnn" / "mnist")
    assert "parnn data fetch --dataset mnist" in msg and "--data DIR" in msg
    assert "apt-get" not in msg                   # Debian packages Fashion-MNIST only


# ---------------------------------------------------------------- uint8, read in chunks


def test_load_dataset_as_uint8_is_the_float_data_before_the_division(tmp_path):
    arrays = write_dataset(tmp_path / "d", gz=True)
    ds = load_dataset(data_dir=tmp_path / "d", dtype="uint8")
    assert ds.X_train.dtype == np.uint8 and ds.X_train.shape == (N_TRAIN, 784)
    assert ds.X_train.flags.c_contiguous
    np.testing.assert_array_equal(ds.X_train, arrays["train-images"].reshape(N_TRAIN, -1))
    for dt in ("float32", "float64"):
        floats = load_dataset(data_dir=tmp_path / "d", dtype=dt)
        assert (ds.X_train / np.dtype(dt).type(255)).tobytes() == floats.X_train.tobytes()
    small = load_dataset(data_dir=tmp_path / "d", dtype="uint8", limit_train=5)
    assert small.X_train.shape == (5, 784) and small.X_train.base is None   # not a view of all
    with pytest.raises(ConfigError, match="floating type or uint8"):
        load_dataset(data_dir=tmp_path / "d", dtype="int16")


@pytest.mark.parametrize("gz", [True, False])
def test_a_file_larger_than_a_read_chunk(tmp_path, gz, monkeypatch):
    """Data is read a chunk at a time (gzip would otherwise inflate the whole file into a
    temporary first); the chunks join up, and a short file is still found short."""
    monkeypatch.setattr(data, "_CHUNK", 1000)
    arr = np.random.default_rng(2).integers(0, 256, (7, 28, 28), dtype=np.uint8)  # 5.5 chunks
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "i", arr, gz)), arr)
    short = idx_bytes(arr)[:-1500]
    (tmp_path / "s").write_bytes(gzip.compress(short) if gz else short)
    assert_data_error(lambda: read_idx(tmp_path / "s"), "s", match="truncated")
