"""Verified data: checksums over the uncompressed bytes, `parnn data info`'s report, and
`parnn data fetch`'s download.

Debian's dataset-fashion-mnist re-gzips the files, so their .gz checksums differ from the
official mirror's while their content is the same: files are verified by the SHA-256 of their
uncompressed bytes (MNIST: only the .gz checksums are published, so its .gz files are checked).
A download lands in a temporary file beside its final name and is renamed only once it verifies.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from http.client import HTTPException
from pathlib import Path

from parnn import data
from parnn.data import (_CHUNK, GZIP_MAGIC, ROLES, Dataset, FileSpec, _dataset_files,
                        _dataset_spec, _sha256_file, _unpacked, _what_is_missing, cache_dir)
from parnn.errors import DataError
from parnn.paths import open_regular, path_kind, shown


# --- checksums ----------------------------------------------------------------------------

def _sha256_raw(path: Path, max_bytes: int | None) -> str:
    """SHA-256 of the content, gunzipped if gzip, inflating no more than max_bytes + 1."""
    h, n = hashlib.sha256(), 0
    with _unpacked(path) as (stream, _, _):
        while chunk := stream.read(_CHUNK):
            h.update(chunk)
            n += len(chunk)
            if max_bytes is not None and n > max_bytes:
                raise DataError(f"{shown(path)}: more than {max_bytes} bytes (after gunzip): "
                                "not the file expected here")
    return h.hexdigest()


def _check_file(path: Path, fs: FileSpec, raw_sha: str | None = None) -> tuple[bool | None, str, str | None]:
    """(ok, actual, expected) for one file; ok is None when no checksum applies to this form of it."""
    if fs.sha256_raw:
        if raw_sha is None:
            raw_sha = _sha256_raw(path, fs.size)
        return raw_sha == fs.sha256_raw, raw_sha, fs.sha256_raw
    if fs.sha256_gz and _is_gzip(path):
        actual = _sha256_file(path)
        return actual == fs.sha256_gz, actual, fs.sha256_gz
    return None, raw_sha or _sha256_raw(path, fs.size), None


def _is_gzip(path: Path) -> bool:
    with open_regular(path, DataError, "data file") as f:
        return f.read(2) == GZIP_MAGIC


def verify(data_dir: str | os.PathLike, dataset: str = "fashion-mnist") -> dict[str, dict]:
    """Per file: {"path", "sha256", "expected", "ok"}; ok is None where no checksum is known
    (the Kaggle CSVs; MNIST files stored uncompressed, as only .gz checksums are published)."""
    spec, d = _dataset_spec(dataset), Path(data_dir)
    files = _dataset_files(d, dataset)
    if files is None:
        raise DataError(_what_is_missing(d, dataset))
    out = {}
    for role, path in files.items():
        if role in spec.files:
            ok, actual, expected = _check_file(path, spec.files[role])
        else:
            ok, actual, expected = None, _sha256_file(path), None
        out[role] = {"path": path, "sha256": actual, "expected": expected, "ok": ok}
    return out


def describe(ds: Dataset) -> str:
    """Human-readable summary for `parnn data info`."""
    spec = data.DATASETS.get(ds.name)
    lines = [
        f"dataset:  {ds.name}",
        f"found in: {shown(ds.source)}",
        f"train:    {len(ds.X_train)} samples x {ds.X_train.shape[1]} features ({ds.X_train.dtype})",
        f"test:     {len(ds.X_test)} samples",
        f"classes:  {', '.join(f'{i}={c}' for i, c in enumerate(ds.class_names))}",
        "files:",
    ]
    all_ok = True
    for role, path in ds.files.items():
        fs = spec.files.get(role) if spec else None
        ok = _check_file(path, fs, ds.sha256.get(role))[0] if fs else None
        status = {True: "verified", False: "MISMATCH", None: "no known checksum"}[ok]
        all_ok &= ok is not False
        lines.append(f"  {shown(path.name):<28} sha256 {ds.sha256.get(role, '?')}  {status}")
    if not all_ok:
        lines.append("warning: some files do not match the published checksums")
    return "\n".join(lines)


# --- downloading ----------------------------------------------------------------------------


def _download(url: str, dest: Path, progress: bool, max_bytes: int | None = None) -> None:
    """url into dest; more than max_bytes (a mirror that never stops) is refused."""
    from tqdm import tqdm

    where = shown(url)
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(dest, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            if max_bytes is not None and total is not None and total > max_bytes:
                raise DataError(f"{where}: {total} bytes, more than the file can be "
                                f"({max_bytes}); nothing was kept")
            # disable=None: no bar when stderr is not a terminal, where an error must be one line
            with tqdm(total=total, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1],
                      disable=None if progress else True, leave=False) as bar:
                got = 0
                while chunk := r.read(_CHUNK):
                    f.write(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
                    if max_bytes is not None and got > max_bytes:
                        raise DataError(f"{where}: more than {max_bytes} bytes, more than the "
                                        "file can be; nothing was kept")
            if total is not None and got != total:
                raise DataError(f"{where}: download cut short: {got} of {total} bytes")
    except urllib.error.HTTPError as e:
        raise DataError(f"{where}: download failed: HTTP {e.code} {shown(e.reason)}") from None
    except urllib.error.URLError as e:
        raise DataError(f"{where}: download failed: {shown(e.reason)}") from None
    except (OSError, HTTPException, ValueError) as e:
        raise DataError(f"{where}: download failed: {shown(e) or type(e).__name__}") from None


def fetch(dataset: str = "fashion-mnist", dest: str | os.PathLike | None = None,
          base_url: str | None = None, progress: bool = True) -> Path:
    """Download the four .gz files into dest (default: the per-user cache), verifying each.

    Each file lands in a temporary file beside its final name and is os.replace'd only once
    its checksum matches, so a damaged download leaves nothing behind and a concurrent
    reader never sees half a file. Files already present and verified are skipped.
    """
    spec = _dataset_spec(dataset)
    dest = Path(dest) if dest is not None else cache_dir(dataset)
    base_url = base_url or os.environ.get("PARNN_MIRROR") or spec.mirror
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{shown(dest)}: cannot create directory: {e.strerror or e}") from None
    for role in ROLES:
        fs = spec.files[role]
        final = dest / f"{fs.name}.gz"
        if path_kind(final, DataError) == "file":
            try:
                if _check_file(final, fs)[0]:
                    continue
            except DataError:
                pass
            final.unlink()  # damaged or unverifiable: never leave a bad file behind
        url = base_url.rstrip("/") + "/" + final.name
        fd, tmp_name = tempfile.mkstemp(dir=dest, prefix=f".{final.name}.", suffix=".part")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            # A .gz is at most a little larger than its content (stored deflate blocks).
            _download(url, tmp, progress, fs.size and fs.size + fs.size // 100 + 4096)
            ok, actual, expected = _check_file(tmp, fs)
            if ok is not True:
                raise DataError(f"{final.name} from {shown(url)}: checksum mismatch: expected sha256 "
                                f"{expected}, got {actual}; nothing was kept")
            os.replace(tmp, final)
        except DataError as e:
            # _check_file names the temp file; say which download it was instead.
            msg = str(e).replace(shown(tmp), f"{final.name} from {shown(url)}")
            raise DataError(msg if "nothing was kept" in msg else f"{msg}; nothing was kept") \
                from None
        finally:
            tmp.unlink(missing_ok=True)
    return dest
