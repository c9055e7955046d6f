"""Find and load Fashion-MNIST (and MNIST); parnn.download verifies and fetches it.

Formats: the four IDX files (gzipped or not) and the Kaggle CSV pair.
Every problem a user can cause is a one-line DataError naming the file.
This module knows nothing of models: it hands out arrays.

Files are read header first: an IDX file's magic and dimensions, then its size against them
(and against the size the dataset's real file has), and only then its data; gzip is inflated
as a stream, never past the declared size + 1 byte, so a gzip bomb or a huge sparse file costs
nothing. Only regular files are opened (parnn.paths), so a FIFO cannot hang a run.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import hashlib
import io as _stdio
import math
import os
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from parnn.errors import ConfigError, DataError
from parnn.paths import not_regular, open_regular, path_kind, read_fully, shown

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
MNIST_CLASSES = tuple(str(d) for d in range(10))

# The four IDX files in the order train-images, train-labels, test-images, test-labels.
ROLES = ("train-images", "train-labels", "t10k-images", "t10k-labels")
IDX_NAMES = {
    "train-images": "train-images-idx3-ubyte",
    "train-labels": "train-labels-idx1-ubyte",
    "t10k-images": "t10k-images-idx3-ubyte",
    "t10k-labels": "t10k-labels-idx1-ubyte",
}

# Overridable so tests do not depend on what the machine has installed.
SYSTEM_DATASETS = Path("/usr/share/datasets")
GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20
# Deflate cannot expand data more than about 1032:1, so a gzip file of n bytes holds at most
# this many times n: a header that promises more is refused before memory is set aside for it.
_MAX_INFLATE = 1100


@dataclass(frozen=True)
class FileSpec:
    """What one IDX file must be. sha256_raw covers the uncompressed bytes, so any
    re-gzipping (Debian's, the mirror's) verifies the same; sha256_gz covers the
    published .gz exactly and is only used where no raw checksum is known."""

    name: str
    size: int | None = None  # uncompressed bytes
    sha256_raw: str | None = None
    sha256_gz: str | None = None


@dataclass(frozen=True)
class DatasetSpec:
    classes: tuple[str, ...]
    mirror: str
    files: dict[str, FileSpec]

    def samples(self, role):
        """The most samples its files hold ("train" or "t10k"): a label file is an 8-byte
        header and a byte per sample. A directory may hold fewer; never more."""
        return self.files[f"{role}-labels"].size - 8


DATASETS: dict[str, DatasetSpec] = {
    # Measured on this project from the real files (Debian dataset-fashion-mnist).
    "fashion-mnist": DatasetSpec(
        FASHION_CLASSES,
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        {
            "train-images": FileSpec(IDX_NAMES["train-images"], 47040016,
                                     sha256_raw="c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
            "train-labels": FileSpec(IDX_NAMES["train-labels"], 60008,
                                     sha256_raw="bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
            "t10k-images": FileSpec(IDX_NAMES["t10k-images"], 7840016,
                                    sha256_raw="5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
            "t10k-labels": FileSpec(IDX_NAMES["t10k-labels"], 10008,
                                    sha256_raw="0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
        },
    ),
    # Only the .gz checksums are published (tensorflow/datasets
    # tensorflow_datasets/url_checksums/mnist.txt); no trusted raw values exist here,
    # so an uncompressed MNIST file is loaded but reported as unverifiable.
    "mnist": DatasetSpec(
        MNIST_CLASSES,
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        {
            "train-images": FileSpec(IDX_NAMES["train-images"], 47040016,
                                     sha256_gz="440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
            "train-labels": FileSpec(IDX_NAMES["train-labels"], 60008,
                                     sha256_gz="3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
            "t10k-images": FileSpec(IDX_NAMES["t10k-images"], 7840016,
                                    sha256_gz="8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
            "t10k-labels": FileSpec(IDX_NAMES["t10k-labels"], 10008,
                                    sha256_gz="f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
        },
    ),
}


def _dataset_spec(dataset: str) -> DatasetSpec:
    try:
        return DATASETS[dataset]
    except KeyError:
        raise ConfigError(f"unknown dataset {dataset!r}: choose one of {', '.join(sorted(DATASETS))}") from None


# ---------------------------------------------------------------- reading files


@contextlib.contextmanager
def _unpacked(path: Path):
    """(stream, size, gz): the file's content, gunzipped as it is read if it starts with the
    gzip magic (names lie); size is the file's own size. Only regular files are opened."""
    with open_regular(path, DataError, "data file") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise DataError(f"{shown(path)}: empty file")
        gz = f.read(2) == GZIP_MAGIC
        f.seek(0)
        stream = gzip.GzipFile(fileobj=f, mode="rb") if gz else f
        try:
            yield stream, size, gz
        except (EOFError, zlib.error, OSError) as e:  # gzip.BadGzipFile is an OSError
            if gz:
                raise DataError(f"{shown(path)}: damaged gzip data ({e or type(e).__name__})") from None
            raise DataError(f"{shown(path)}: cannot read: {e.strerror or e}") from None


def _read_idx_hashed(path: Path, ndim: int | None = None,
                     max_bytes: int | None = None) -> tuple[np.ndarray, str]:
    """(array, SHA-256 of the raw IDX bytes). The header is read and checked first, then the
    size it declares (against max_bytes, and against the file's size for a raw file) before any
    data is read; gzip data is inflated only up to the declared size + 1 byte."""
    with _unpacked(path) as (stream, size, gz):
        head = stream.read(4)
        if not head and gz:
            raise DataError(f"{shown(path)}: empty file (after gunzip)")
        if len(head) < 4:
            raise DataError(f"{shown(path)}: too short for an IDX header ({len(head)} bytes)")
        if head[:3] != b"\0\0\x08" or head[3] not in (1, 3):
            magic = int.from_bytes(head, "big")
            raise DataError(f"{shown(path)}: not an IDX ubyte file (magic number {magic}, "
                            "expected 2049 or 2051)")
        nd = head[3]
        if ndim is not None and nd != ndim:
            want, got = (("an image file (magic 2051)", "a label file") if ndim == 3 else
                         ("a label file (magic 2049)", "an image file"))
            raise DataError(f"{shown(path)}: expected {want} but this is {got}")
        header = 4 + 4 * nd
        head += stream.read(4 * nd)
        if len(head) < header:
            raise DataError(f"{shown(path)}: truncated header: {len(head)} bytes, need {header}")
        dims = tuple(int.from_bytes(head[4 + 4 * i: 8 + 4 * i], "big", signed=True)
                     for i in range(nd))
        shape = "x".join(map(str, dims))
        if any(d <= 0 for d in dims):
            raise DataError(f"{shown(path)}: bad header: dimensions {shape} must be positive")
        expected = math.prod(dims)  # Python ints: a hostile header cannot overflow
        says = f"header says {shape} ({expected} bytes)"
        if max_bytes is not None and header + expected > max_bytes:
            raise DataError(f"{shown(path)}: {says}, more than this dataset's file holds "
                            f"({max_bytes - header} bytes)")
        if not gz and size - header != expected:
            found = size - header
            what = "truncated" if found < expected else f"{found - expected} trailing bytes"
            raise DataError(f"{shown(path)}: {what}: {says} but found {found}")
        if gz and expected > _MAX_INFLATE * size:
            raise DataError(f"{shown(path)}: truncated: {says} but {size} bytes of gzip data "
                            "cannot hold that much")
        array = np.empty(dims, np.uint8)
        # A chunk at a time: gzip inflates a read request into a temporary bytes object of the
        # request's size before copying it, which for the whole file doubles the peak.
        flat, found = array.reshape(-1), 0
        for start in range(0, expected, _CHUNK):
            n = read_fully(stream, flat[start:start + _CHUNK])
            found += n
            if n < len(flat[start:start + _CHUNK]):
                break
        if found < expected:
            raise DataError(f"{shown(path)}: truncated: {says} but found {found}")
        if gz and stream.read(1):  # also reads the gzip trailer, so its CRC is checked
            raise DataError(f"{shown(path)}: trailing bytes: {says} but the data goes on "
                            "(after gunzip)")
    h = hashlib.sha256(head)
    h.update(array)
    return array, h.hexdigest()


def read_idx(path: str | os.PathLike, ndim: int | None = None) -> np.ndarray:
    """Read one IDX ubyte file (gzipped or raw) as uint8; ndim=3 or 1 insists on images or labels."""
    return _read_idx_hashed(Path(path), ndim)[0]


def _check_labels(labels: np.ndarray, where: Path | str) -> None:
    bad = np.flatnonzero(labels > 9)
    if bad.size:
        i = int(bad[0])
        raise DataError(f"label {int(labels[i])} at index {i} in {shown(where)}: labels must be 0..9")


def _check_pair(images: np.ndarray, labels: np.ndarray, images_path, labels_path) -> None:
    if images.shape[1:] != (28, 28):
        raise DataError(f"{shown(images_path)}: images are {images.shape[1]}x{images.shape[2]}, expected 28x28")
    if len(images) != len(labels):
        raise DataError(f"{shown(images_path)} has {len(images)} images but {shown(labels_path)} "
                        f"has {len(labels)} labels")
    _check_labels(labels, labels_path)


def load_pair(images: str | os.PathLike, labels: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read an images/labels IDX pair: (uint8 (n,28,28), uint8 (n,)), checked against each other."""
    x, _ = _read_idx_hashed(Path(images), 3)
    y, _ = _read_idx_hashed(Path(labels), 1)
    _check_pair(x, y, images, labels)
    return x, y


def _csv_diagnose(path: Path) -> None:
    """Slow row-by-row pass that finds the first bad line; only run once the fast parser failed."""
    # errors="replace": a non-UTF-8 byte becomes U+FFFD and is reported as a bad cell below.
    with open_regular(path, DataError, "CSV file") as raw, \
            _stdio.TextIOWrapper(raw, newline="", encoding="utf-8", errors="replace") as f:
        try:
            for lineno, row in enumerate(csv.reader(f), start=1):
                if lineno > 1 and row:
                    _csv_check_row(path, lineno, row)
        except csv.Error as e:
            raise DataError(f"{shown(path)}: not a readable CSV file ({e})") from None


def _csv_check_row(path, lineno, row):
    if len(row) != 785:
        raise DataError(f"{shown(path)}: line {lineno} has {len(row)} columns, expected 785 (label + 784 pixels)")
    for col, cell in enumerate(row, start=1):
        try:
            v = int(cell)
        except ValueError:
            raise DataError(f"{shown(path)}: line {lineno}, column {col}: {shown(repr(cell[:20]))} "
                            "is not an integer") from None
        hi = 9 if col == 1 else 255
        if not 0 <= v <= hi:
            what = "label" if col == 1 else "pixel"
            raise DataError(f"{shown(path)}: line {lineno}, column {col}: {what} {v} is outside 0..{hi}")


def read_csv(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read the Kaggle CSV (`label,pixel1..pixel784`): (images uint8 (n,28,28), labels uint8 (n,))."""
    path = Path(path)
    with open_regular(path, DataError, "CSV file") as f:
        # A line longer than any header could be (785 names): not read whole into memory.
        first = f.readline(_CHUNK)
        if not first.strip():
            raise DataError(f"{shown(path)}: empty file")
        head = first.decode("utf-8", "replace").strip().split(",")
        if head[0].strip().strip('"') != "label":
            raise DataError(f"{shown(path)}: missing header: expected 'label,pixel1,...,pixel784' "
                            "on line 1")
        if len(head) != 785:
            raise DataError(f"{shown(path)}: header has {len(head)} columns, expected 785 "
                            "(label + 784 pixels)")
        f.seek(0)
        try:
            # numpy's C parser: 60k rows in about a second; int16 so -1 and 256 survive to the
            # range check.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "no data": a DataError below
                table = np.loadtxt(f, delimiter=",", skiprows=1, dtype=np.int16, ndmin=2)
        except (ValueError, OverflowError):
            _csv_diagnose(path)
            raise DataError(f"{shown(path)}: cannot parse as CSV") from None
        except OSError as e:
            raise DataError(f"{shown(path)}: cannot read: {e.strerror or e}") from None
    if table.shape[0] == 0:
        raise DataError(f"{shown(path)}: no data rows after the header")
    if table.shape[1] != 785:  # every row equally wrong, e.g. one truncated row
        _csv_diagnose(path)
        raise DataError(f"{shown(path)}: rows have {table.shape[1]} columns, expected 785")
    if table.min() < 0 or table[:, 1:].max() > 255 or table[:, 0].max() > 9:
        _csv_diagnose(path)
        raise DataError(f"{shown(path)}: values out of range")
    return table[:, 1:].astype(np.uint8).reshape(-1, 28, 28), table[:, 0].astype(np.uint8)


# ---------------------------------------------------------------- finding data


def cache_dir(dataset: str = "fashion-mnist") -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "parnn" / dataset


def _csv_names(dataset: str) -> tuple[str, str]:
    return f"{dataset}_train.csv", f"{dataset}_test.csv"


def _is_file(path: Path) -> bool:
    """A regular file is there (True) or nothing is (False). Anything else there (a FIFO, a
    directory) and any error probing it (permission denied, name too long) is one line."""
    kind = path_kind(path, DataError)
    if kind not in (None, "file"):
        raise DataError(f"{shown(path)}: {not_regular(kind, 'data file')}")
    return kind == "file"


def _idx_files(directory: Path) -> dict[str, Path] | None:
    """The four IDX files in directory (gz name preferred, as that is what fetch writes), or None."""
    found = {}
    for role, name in IDX_NAMES.items():
        for candidate in (directory / f"{name}.gz", directory / name):
            if _is_file(candidate):
                found[role] = candidate
                break
        else:
            return None
    return found


def _dataset_files(directory: Path, dataset: str) -> dict[str, Path] | None:
    idx = _idx_files(directory)
    if idx:
        return idx
    train, test = (directory / n for n in _csv_names(dataset))
    if _is_file(train) and _is_file(test):
        return {"train": train, "test": test}
    return None


def _what_is_missing(directory: Path, dataset: str) -> str:
    missing = [f"{n}[.gz]" for n in IDX_NAMES.values()
               if not _is_file(directory / n) and not _is_file(directory / f"{n}.gz")]
    return (f"{shown(directory)}: no {dataset} data here: missing {', '.join(missing)} "
            f"(or {' + '.join(_csv_names(dataset))})")


def find_data_dir(dataset: str = "fashion-mnist", data_dir: str | os.PathLike | None = None) -> Path:
    """Where the data is: data_dir, $PARNN_DATA (or its <dataset>/), /usr/share/datasets/<dataset>,
    then $XDG_CACHE_HOME/parnn/<dataset>. A place the user named explicitly must hold the data:
    we do not fall through to another copy behind their back."""
    _dataset_spec(dataset)
    explicit: list[tuple[str, Path]] = []
    if data_dir is not None:
        explicit.append(("data directory", Path(data_dir)))
    elif os.environ.get("PARNN_DATA"):
        explicit.append(("$PARNN_DATA", Path(os.environ["PARNN_DATA"])))
    for label, d in explicit:
        try:
            kind = path_kind(d, DataError)
        except DataError as e:
            raise DataError(f"{label} {e}") from None
        if kind != "dir":
            raise DataError(f"{shown(d)}: {label} does not exist" if kind is None else
                            f"{shown(d)}: {label} is not a directory")
        for candidate in (d / dataset, d):
            if path_kind(candidate, DataError) == "dir" and _dataset_files(candidate, dataset):
                return candidate
        raise DataError(_what_is_missing(d, dataset))
    # The default places are only looked in: one that cannot be read is skipped, and said so.
    looked, problems = [SYSTEM_DATASETS / dataset, cache_dir(dataset)], []
    for d in looked:
        try:
            if path_kind(d, DataError) == "dir" and _dataset_files(d, dataset):
                return d
        except DataError as e:
            problems.append(str(e))
    raise DataError(
        f"no {dataset} data found (looked in {', '.join(map(shown, looked))}; $PARNN_DATA is unset"
        + "".join(f"; {p}" for p in problems) + "): run `parnn data fetch"
        + ("`" if dataset == "fashion-mnist" else f" --dataset {dataset}`")
        + (" or `apt-get install dataset-fashion-mnist`" if dataset == "fashion-mnist" else "")
        + ", or pass the directory with --data DIR")


# ---------------------------------------------------------------- the dataset


@dataclass
class Dataset:
    X_train: np.ndarray  # (n, 784) floats in [0, 1], or uint8 0..255 as stored; C-contiguous
    y_train: np.ndarray  # (n,) int64
    X_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]
    name: str
    source: Path
    files: dict[str, Path] = field(default_factory=dict)
    sha256: dict[str, str] = field(default_factory=dict)  # raw IDX bytes; the file itself for CSV

    @property
    def n_features(self) -> int:
        return self.X_train.shape[1]

    @property
    def n_classes(self) -> int:
        return len(self.class_names)


def _to_float(images: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if dtype == np.uint8:   # as stored: flattened, and copied only if a limit cut it short
        flat = images.reshape(len(images), -1)   # (a view of the whole file's array)
        whole = flat.base if flat.base is not None else flat
        return flat if whole.size == flat.size else flat.copy()
    out = np.empty((len(images), 28 * 28), dtype=dtype)
    # uint8 / float32-scalar computes in float32 (NEP 50): one pass, no float64 temporary.
    np.divide(images.reshape(len(images), -1), dtype.type(255), out=out)
    return out


def _limit(n: int | None, what: str) -> int | None:
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
        raise ConfigError(f"{what} must be a positive integer, got {n!r}")
    return int(n)


def one_hot(y: np.ndarray, n_classes: int = 10, dtype="float32") -> np.ndarray:
    y = np.asarray(y)
    bad = np.flatnonzero((y < 0) | (y >= n_classes))
    if bad.size:
        i = int(bad[0])
        raise DataError(f"label {int(y[i])} at index {i}: labels must be 0..{n_classes - 1}")
    out = np.zeros((len(y), n_classes), dtype=dtype)
    out[np.arange(len(y)), y] = 1
    return out


def load_dataset(name: str = "fashion-mnist", data_dir: str | os.PathLike | None = None,
                 dtype="float32", limit_train: int | None = None,
                 limit_test: int | None = None) -> Dataset:
    """Find and load a dataset; limit_* keep the first n samples of each split.

    dtype: the images as floats x / 255 in [0, 1] of that type, or "uint8": as stored, 0..255
    (a quarter of float32's memory; the engines and parnn.engines.scaled divide by 255 as
    they read, with the same bits)."""
    spec = _dataset_spec(name)
    dt = np.dtype(dtype)
    if dt.kind != "f" and dt != np.uint8:
        raise ConfigError(f"dtype must be a floating type or uint8, got {dt}")
    limit_train, limit_test = _limit(limit_train, "limit_train"), _limit(limit_test, "limit_test")
    source = find_data_dir(name, data_dir)
    files = _dataset_files(source, name)
    sha: dict[str, str] = {}
    # Each split becomes floats as soon as it is read, and its raw bytes are dropped before the
    # next file is read: the peak is the float training set plus one raw file, not all of them
    # (with uint8 the raw bytes are kept: the peak is the files' images).
    # No file is read past the size the dataset's file has (a gzip bomb stops there).
    splits = []
    for csv_split, prefix, limit in (("train", "train", limit_train), ("test", "t10k", limit_test)):
        if "train" in files:  # Kaggle CSV
            x, y = read_csv(files[csv_split])
            sha[csv_split] = _sha256_file(files[csv_split])
        else:
            images, labels = files[f"{prefix}-images"], files[f"{prefix}-labels"]
            x, sha[f"{prefix}-images"] = _read_idx_hashed(images, 3, _max_size(spec, f"{prefix}-images"))
            y, sha[f"{prefix}-labels"] = _read_idx_hashed(labels, 1, _max_size(spec, f"{prefix}-labels"))
            _check_pair(x, y, images, labels)
        splits.append((_to_float(x[:limit], dt), y[:limit].astype(np.int64)))
        del x, y
    (X_train, y_train), (X_test, y_test) = splits
    return Dataset(X_train=X_train, y_train=y_train, X_test=X_test, y_test=y_test,
                   class_names=spec.classes, name=name, source=source, files=files, sha256=sha)


def _max_size(spec: DatasetSpec, role: str) -> int | None:
    fs = spec.files.get(role)
    return fs.size if fs else None


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open_regular(path, DataError, "data file") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()
