"""Your own images → the network's input: 28x28 grayscale, light object on black, in [0, 1].

Fashion-MNIST images are light clothing centred on a black background; a photo is usually the
opposite, so by default an image whose border is lighter than its centre is inverted.

Every file is checked before it is decoded: a regular file (not a FIFO or a directory); a
picture of at most MAX_PIXELS pixels (its header is read first: a 274-byte PNG can declare
20000x20000); a .npy array of plain numbers (no Python objects, no structured or complex
values, and the right number of them) whose header is read before its data.
"""

from __future__ import annotations

import math
import struct
import warnings
from pathlib import Path

import numpy as np

from parnn.errors import DataError
from parnn.paths import open_regular, path_kind, shown

SIDE = 28
# 8192 x 8192: a photo of today's cameras fits; decoding it takes at most ~200 MB (RGB).
MAX_PIXELS = 8192 * 8192
NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK\x03\x04"


def _side(n_in):
    side = math.isqrt(n_in)
    if side * side != n_in:
        raise DataError(f"this model takes {n_in} inputs, not a square image")
    return side


def load_images(paths, n_in=SIDE * SIDE, dtype="float32", invert="auto"):
    """(len(paths), n_in) array for a model whose input is n_in pixels: one picture per file."""
    side = _side(n_in)
    return np.stack([_one(Path(p), side, invert) for p in paths]).astype(dtype)


def read_file(path, n_in=SIDE * SIDE, dtype="float32", invert="auto"):
    """(labels, (n, n_in) array) of one file: a picture, or a .npy of one picture (labelled
    PATH), or a .npy stack (N, side, side) or (N, n_in) (labelled PATH[i])."""
    side, path = _side(n_in), Path(path)
    with _open(path) as f:
        if path.suffix.lower() == ".npy":
            images, stacked = _read_npy(path, f, side)
        else:
            images, stacked = _read_picture(path, f, side)[None], False
    labels = [f"{path}[{i}]" for i in range(len(images))] if stacked else [str(path)]
    shown_labels = [f"{shown(path)}[{i}]" for i in range(len(images))] if stacked \
        else [shown(path)]
    X = np.stack([_pixels(label, img, invert) for label, img in zip(shown_labels, images)])
    return labels, X.astype(dtype, copy=False)


def _open(path):
    kind = path_kind(path, DataError)
    if kind in (None, "dir"):
        raise DataError(f"{shown(path)}: no such file" + (" (it is a directory)" if kind else ""))
    return open_regular(path, DataError, "image file")


def _one(path, side, invert):
    with _open(path) as f:
        if path.suffix.lower() == ".npy":
            images, _ = _read_npy(path, f, side, stacks=False)
            img = images[0]
        else:
            img = _read_picture(path, f, side)
    return _pixels(shown(path), img, invert)


def _pixels(label, img, invert):
    """One (side, side) picture as the network's input: values in [0, 1], light object on dark
    (inverted when asked, or when its border is light and invert is "auto"), flattened."""
    if not np.isfinite(img).all() or img.min() < 0 or img.max() > 1:
        raise DataError(f"{label}: pixel values must be in 0..255 (or 0..1 for .npy)")
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]]).mean()
    if invert == "yes" or (invert == "auto" and border > 0.5):
        img = 1.0 - img
    return img.reshape(-1)


def _read_npy(path, f, side, stacks=True):
    """(images (N, side, side) float64, stacked): a .npy of side*side plain numbers (bool, int,
    uint, float) is one picture; with stacks, (N, side, side) or (N, side*side) is N of them.
    Scaled to [0, 1] if it looks like 0..255. The header is checked before the data, the data's
    size against the file before it is read; nothing is unpickled."""
    import os

    bad = f"{shown(path)}: not a readable .npy array"
    magic = f.read(len(NPY_MAGIC))
    if magic.startswith(ZIP_MAGIC):
        raise DataError(f"{bad} (a zip archive, e.g. an .npz: save one array with numpy.save)")
    if magic != NPY_MAGIC:
        raise DataError(f"{bad} (no .npy header)")
    f.seek(0)
    try:
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0) else
                       np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(f)
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as err:
        raise DataError(f"{bad} ({shown(' '.join(str(err).split()))[:100]})") from None
    if dtype.hasobject:
        raise DataError(f"{bad} (it holds Python objects; parnn does not unpickle)")
    if dtype.fields is not None or dtype.subdtype is not None:
        raise DataError(f"{bad} (a structured array, dtype {shown(dtype.descr)}: parnn needs "
                        "an array of plain numbers)")
    if dtype.kind == "c":
        raise DataError(f"{bad} (complex values, dtype {dtype}: pixels are real numbers)")
    if dtype.kind not in "biuf":
        raise DataError(f"{bad} (dtype {dtype}: parnn needs an array of plain numbers)")
    n_in = side * side
    stacked = stacks and len(shape) >= 2 and shape[0] >= 1 and (
        (len(shape) == 3 and tuple(shape[1:]) == (side, side))
        or (len(shape) == 2 and shape[1] == n_in and tuple(shape) != (side, side)))
    n = math.prod(shape)
    if not stacked and n != n_in:
        raise DataError(f"{shown(path)}: array has {n} values, expected {side}x{side}")
    need = n * dtype.itemsize
    left = os.fstat(f.fileno()).st_size - f.tell()
    if left < need:
        raise DataError(f"{bad} (truncated: {max(left, 0)} of {need} bytes)")
    a = np.frombuffer(f.read(need), dtype).reshape(shape, order="F" if fortran else "C")
    a = a.astype(np.float64).reshape(-1, side, side)
    if a.size and np.isfinite(a).all() and a.max() > 1.0:
        a = a / 255.0
    return a, stacked


def _read_picture(path, f, side):
    from PIL import Image, UnidentifiedImageError

    too_big = f"{shown(path)}: the image is too large for parnn"
    try:
        # Our own refusal instead of PIL's warnings (one line, not two); other PIL warnings
        # (odd palettes, EXIF) do not stop a picture that decodes.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(f) as im:
                w, h = im.size  # from the header: nothing is decoded yet
                if w * h > MAX_PIXELS:
                    raise DataError(f"{too_big}: {w}x{h} pixels, at most {MAX_PIXELS} "
                                    "(8192x8192): scale it down first")
                im = im.convert("L")
                # fit the longer side into the square, centred, like Fashion-MNIST's framing
                im.thumbnail((side, side), Image.Resampling.LANCZOS)
                canvas = Image.new("L", (side, side), color=_corner(im))
                canvas.paste(im, ((side - im.width) // 2, (side - im.height) // 2))
                return np.asarray(canvas, dtype=np.float64) / 255.0
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise DataError(f"{too_big}: more than {MAX_PIXELS} pixels (8192x8192): scale it "
                        "down first") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError,
            struct.error) as err:
        raise DataError(f"{shown(path)}: not an image parnn can read "
                        f"({err.__class__.__name__})") from None


def _corner(im):
    return im.getpixel((0, 0))
