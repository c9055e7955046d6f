"""The augmentation kernel (engines/augment.py): what it keeps, that its randomness is a pure
function of (seed, epoch, index), and that it computes the transform it says (against np.roll,
a flip, and the plain NumPy reference)."""

import numba
import numpy as np
import pytest

from parnn.engines.augment import (augment_batch, reference_batch, reference_transform,
                                   sample_transform)
from parnn.errors import ConfigError

H = W = 28
SEED, EPOCH = 7, 3           # run()'s defaults
FULL = dict(shift=2, rotate=12.0, scale=0.1, hflip=True)          # every option on
SETTINGS = [dict(shift=2), dict(shift=2, hflip=True), dict(shift=1.5, subpixel=True),
            dict(shift=0, rotate=15.0), dict(shift=0, scale=0.15), FULL,
            dict(FULL, subpixel=True)]
# (X's dtype, out's dtype): the training set kept as bytes, or already as the network's floats
DTYPES = [("uint8", "float32"), ("uint8", "float64"), ("float32", "float32"),
          ("float64", "float64")]


@pytest.fixture(autouse=True)
def restore_threads():
    n = numba.get_num_threads()
    yield
    numba.set_num_threads(n)


def images(n=300, dtype="uint8", seed=0):
    """n random 28x28 images, uint8 0..255 or floats in [0, 1] (every value reachable)."""
    X = np.random.default_rng(seed).integers(0, 256, (n, H * W)).astype(np.uint8)
    return X if dtype == "uint8" else (X / np.float64(255)).astype(dtype)


def shapes(n, seed=0):
    """n images of four labelled classes, each a shape at a random place and thickness:
    horizontal bar, vertical bar, ring, plus. Returns (uint8 images, labels)."""
    rng = np.random.default_rng(seed)
    v, u = np.mgrid[0:H, 0:W]
    y = np.arange(n) % 4
    X = np.zeros((n, H, W), bool)
    for k in range(n):
        cy, cx = 13.5 + rng.uniform(-1, 1, 2)
        half = rng.uniform(2.0, 3.0)                  # half the stroke width
        dy, dx = v - cy, u - cx
        bar_h = (abs(dy) < half) & (abs(dx) < 9)
        bar_v = (abs(dx) < half) & (abs(dy) < 9)
        X[k] = [bar_h, bar_v, abs(np.hypot(dy, dx) - 7) < half, bar_h | bar_v][y[k]]
    return (255 * X).astype(np.uint8).reshape(n, -1), y


def run(X, idx, out_dtype="float32", seed=SEED, epoch=EPOCH, **kw):
    idx = np.asarray(idx, np.int64)
    out = np.full((len(idx), H * W), np.nan, out_dtype)   # NaN: a pixel left unwritten shows
    assert augment_batch(X, idx, out, seed, epoch, **kw) is out
    return out


def scaled(X, idx, out_dtype):
    """X[idx] in [0, 1] as the data loader makes it (uint8 / 255 in the target dtype)."""
    dt = np.dtype(out_dtype)
    if X.dtype == np.uint8:
        return np.divide(X[idx], dt.type(255), dtype=dt)
    return X[idx].astype(dt)


# --- what the kernel keeps ----------------------------------------------------------------------

@pytest.mark.parametrize("x_dtype, out_dtype", DTYPES)
@pytest.mark.parametrize("kw", SETTINGS, ids=str)
def test_shape_dtype_range_kept_and_input_untouched(kw, x_dtype, out_dtype):
    X = images(dtype=x_dtype)
    before = X.copy()
    idx = np.random.default_rng(1).integers(0, len(X), 128)
    out = run(X, idx, out_dtype, **kw)
    assert out.shape == (128, H * W) and out.dtype == out_dtype
    assert np.all((out >= 0) & (out <= 1))           # also: no NaN left, every pixel written
    assert np.array_equal(X, before)
    # the images still look like the inputs: same brightness give or take what leaves the frame
    assert abs(out.mean() - scaled(X, idx, out_dtype).mean()) < 0.1


@pytest.mark.parametrize("x_dtype, out_dtype", DTYPES)
def test_identity_settings_give_the_batch_exactly(x_dtype, out_dtype):
    X = images(dtype=x_dtype)
    idx = np.array([5, 0, 299, 5, 17, 42])              # unsorted, repeated, both ends
    out = run(X, idx, out_dtype, shift=0, rotate=0.0, scale=0.0, hflip=False)
    assert np.array_equal(out, scaled(X, idx, out_dtype))


def test_accepts_images_as_height_by_width():
    X = images()
    idx = np.arange(10, 20)
    assert np.array_equal(run(X.reshape(-1, H, W), idx, **FULL), run(X, idx, **FULL))


def test_small_transforms_keep_the_label():
    """out[b] is still an image of X[idx[b]]'s class: the nearest plain image of the augmented
    one has its label. A large rotation (up to 90 degrees: a horizontal bar becomes a vertical
    one) does not keep labels, and the same check sees it."""
    X, y = shapes(400)
    plain = scaled(X, np.arange(400), "float32")
    idx = np.random.default_rng(2).permutation(400)[:200]

    def accuracy(augmented):
        distance = ((augmented[:, None, :] - plain[None]) ** 2).sum(axis=2)
        return np.mean(y[distance.argmin(axis=1)] == y[idx])
    assert accuracy(run(X, idx, **FULL)) >= 0.97
    assert accuracy(run(X, idx, shift=0, rotate=90.0)) < 0.8


# --- randomness: a pure function of (seed, epoch, index) ---------------------------------------

def test_transform_follows_the_documented_recipe():
    """The compiled draws are the Python-integer splitmix64 recipe, for any seed (negative
    too: taken mod 2^64) and every option."""
    for seed, epoch, index in [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (-3, 7, 59999),
                               (2 ** 40 + 5, 3, 12345)]:
        for kw in SETTINGS:
            assert sample_transform(seed, epoch, index, **kw) == \
                reference_transform(seed, epoch, index, **kw)


def test_draws_cover_their_ranges():
    draws = [sample_transform(0, 1, i, **FULL) for i in range(3000)]
    tx, ty, theta, zoom, flip = map(np.array, zip(*draws))
    assert set(tx) == set(ty) == {-2.0, -1.0, 0.0, 1.0, 2.0}
    assert np.all(np.abs(theta) <= 12) and theta.min() < -11 and theta.max() > 11
    assert np.all(np.abs(zoom - 1) <= 0.1) and zoom.min() < 0.91 and zoom.max() > 1.09
    assert 0.45 < flip.mean() < 0.55
    sub = np.array([sample_transform(0, 1, i, shift=1.5, subpixel=True)[0] for i in range(500)])
    assert np.all(np.abs(sub) <= 1.5) and len(np.unique(sub)) == 500


def test_deterministic_by_seed_epoch_and_index():
    X = images()
    idx = np.arange(0, 300, 3)
    same = run(X, idx, **FULL)
    assert np.array_equal(same, run(X, idx, **FULL))
    for other in (dict(seed=SEED + 1), dict(epoch=EPOCH + 1)):
        changed = np.any(run(X, idx, **other, **FULL) != same, axis=1)
        assert changed.mean() > 0.9                  # nearly every sample gets a new transform


def test_same_bits_at_one_and_two_threads():
    X = images()
    idx = np.random.default_rng(3).integers(0, len(X), 256)
    outs = []
    for threads in (1, 2):
        numba.set_num_threads(threads)
        outs.append([run(X, idx, **kw) for kw in (dict(shift=2, hflip=True), FULL)])
    for one, two in zip(*outs):
        assert np.array_equal(one, two)


def test_same_bits_whatever_batch_a_sample_falls_in():
    X = images()
    order = np.random.default_rng(4).permutation(len(X))
    whole = run(X, order, **FULL)
    for batch in (1, 7, 128):
        parts = [run(X, order[k:k + batch], **FULL) for k in range(0, len(order), batch)]
        assert np.array_equal(np.concatenate(parts), whole)
    # another epoch's order: each sample keeps its row, wherever it now sits
    again = np.random.default_rng(5).permutation(len(X))
    rows = {int(i): row for i, row in zip(order, whole)}
    assert all(np.array_equal(row, rows[int(i)]) for i, row in zip(again, run(X, again, **FULL)))


# --- the transform it computes ------------------------------------------------------------------

def find_index(tx, ty, **kw):
    """The first sample index that run() shifts by (tx, ty), unflipped."""
    for i in range(10_000):
        t = sample_transform(SEED, EPOCH, i, **kw)
        if (t[0], t[1], t[4]) == (tx, ty, False):
            return i


def shifted(image, ty, tx):
    """image moved by ty rows and tx columns (each -1, 0 or 1), zero where it moved from."""
    out = np.roll(image, (ty, tx), axis=(0, 1))
    if ty:
        out[0 if ty > 0 else -1, :] = 0
    if tx:
        out[:, 0 if tx > 0 else -1] = 0
    return out


@pytest.mark.parametrize("tx, ty", [(1, 0), (-1, 0), (0, 1), (0, -1), (1, -1)])
def test_one_pixel_shift_moves_the_image_exactly(tx, ty):
    i = find_index(tx, ty, shift=1)
    X = images(n=i + 1)
    expected = shifted(X[i].reshape(H, W) / np.float32(255), ty, tx)
    # a tiny rotation leaves the same transform but takes the bilinear path instead of the copy
    for kw in (dict(shift=1), dict(shift=1, rotate=1e-30)):
        assert np.array_equal(run(X, [i], **kw).reshape(H, W), expected)


def test_hflip_is_a_flip():
    X = images()
    idx = np.arange(len(X))
    out = run(X, idx, shift=0, hflip=True).reshape(-1, H, W)
    image = scaled(X, idx, "float32").reshape(-1, H, W)
    flipped = np.array([sample_transform(SEED, EPOCH, i, shift=0, hflip=True)[4] for i in idx])
    assert np.array_equal(out[flipped], image[flipped][:, :, ::-1])
    assert np.array_equal(out[~flipped], image[~flipped])
    assert 0.4 < flipped.mean() < 0.6


@pytest.mark.parametrize("x_dtype, out_dtype", DTYPES)
@pytest.mark.parametrize("kw", SETTINGS, ids=str)
def test_matches_the_numpy_reference(kw, x_dtype, out_dtype):
    X = images(dtype=x_dtype)
    idx = np.random.default_rng(6).integers(0, len(X), 64)
    expected = reference_batch(X, idx, SEED, EPOCH, dtype=out_dtype, **kw)
    assert np.abs(run(X, idx, out_dtype, **kw) - expected).max() <= 1e-6


def test_rejects_what_it_cannot_do():
    X = images(n=10)
    out = np.empty((2, H * W), np.float32)
    bad = [(X, np.array([0, 10]), out, {}),                        # index past the end
           (X, np.array([0, 1], np.int32), out, {}),               # not int64
           (X, np.array([0, 1]), np.empty((2, 100), np.float32), {}),
           (X, np.array([0, 1]), np.empty((2, H * W), np.int32), {}),
           (X[:, :100], np.array([0, 1]), out, {}),
           (X.astype(np.int16), np.array([0, 1]), out, {}),
           (X, np.array([0, 1]), out, dict(shift=-1)),
           (X, np.array([0, 1]), out, dict(scale=1.0))]
    for images_, idx, out_, kw in bad:
        with pytest.raises(ConfigError):
            augment_batch(images_, idx, out_, 0, 0, **kw)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("opts", [dict(shift=2, hflip=True),
                                  dict(shift=0.5, rotate=3.0, scale=0.03, subpixel=True)],
                         ids=["whole pixels", "bilinear"])
def test_rows_written_in_parts_on_the_callers_threads_are_the_kernels_rows(dtype, opts):
    """augment_rows (the fused path's threads, a share of the rows each) writes exactly the rows
    augment_batch writes, from uint8 pixels or floats, however the rows are split."""
    from parnn.engines.augment import augment_rows

    X, _ = shapes(300)
    idx = np.random.default_rng(2).permutation(300)[:77].astype(np.int64)
    for images in (X, X.astype(dtype) / np.dtype(dtype).type(255)):
        whole = augment_batch(images, idx, np.empty((77, 784), dtype), 4, 3, **opts)
        parts = np.full((77, 784), np.nan, dtype)
        for lo, hi in ((0, 30), (30, 31), (31, 77)):
            augment_rows(images, idx, parts, lo, hi, 4, 3, **opts)
        assert np.array_equal(parts, whole)
    for lo, hi in ((0, 78), (-1, 5), (10, 9)):                  # never outside the batch
        with pytest.raises(ConfigError, match="not within the batch's 0..77"):
            augment_rows(X, idx, parts, lo, hi, 4, 3, **opts)
