"""Your own images → the network's input: 28x28 grayscale, light object on black, in [0, 1].

Fashion-MNIST images are light clothing centred on a black background; a photo is usually the
opposite, so by default an image whose border is lighter than its centre is inverted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from parnn.errors import DataError

SIDE = 28


def load_images(paths, n_in=SIDE * SIDE, dtype="float32", invert="auto"):
    """(len(paths), n_in) array for a model whose input is n_in pixels."""
    side = int(round(n_in ** 0.5))
    if side * side != n_in:
        raise DataError(f"this model takes {n_in} inputs, not a square image")
    return np.stack([_one(Path(p), side, invert) for p in paths]).astype(dtype)


def _one(path, side, invert):
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix.lower() == ".npy":
        try:
            img = np.load(path, allow_pickle=False).astype(np.float64)
        except (ValueError, OSError) as err:
            raise DataError(f"{path}: not a readable .npy array ({err})") from None
        if img.size != side * side:
            raise DataError(f"{path}: array has {img.size} values, expected {side}x{side}")
        img = img.reshape(side, side)
        if img.max() > 1.0:
            img = img / 255.0
    else:
        img = _read_picture(path, side)
    if not np.isfinite(img).all() or img.min() < 0 or img.max() > 1:
        raise DataError(f"{path}: pixel values must be in 0..255 (or 0..1 for .npy)")
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]]).mean()
    if invert == "yes" or (invert == "auto" and border > 0.5):
        img = 1.0 - img
    return img.reshape(-1)


def _read_picture(path, side):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("L")
            # fit the longer side into the square, centred, like Fashion-MNIST's framing
            im.thumbnail((side, side), Image.Resampling.LANCZOS)
            canvas = Image.new("L", (side, side), color=_corner(im))
            canvas.paste(im, ((side - im.width) // 2, (side - im.height) // 2))
            return np.asarray(canvas, dtype=np.float64) / 255.0
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"{path}: not an image parnn can read ({err.__class__.__name__})") from None


def _corner(im):
    return im.getpixel((0, 0))
