"""`--augment affine` (run/config.py AFFINE, engines/batch.py Augmentation): the setting reaches
the batch engine with its ranges, its runs are bitwise by seed at 1 and 2 threads, it keeps the
label, and the engines that cannot apply it still refuse it in one line."""

import dataclasses

import numba
import numpy as np
import pytest
import synthetic_data
from synthetic_data import parnn as run_cli, write_dataset
from test_augment import scaled, shapes

from parnn.core.model import MLP
from parnn.core.optim import make_optimizer
from parnn.engines import make_engine
from parnn.engines.augment import augment_batch
from parnn.engines.batch import Augmentation
from parnn.errors import ConfigError
from parnn.run import config, train
from parnn.run.config import AFFINE, make_config


@pytest.fixture(autouse=True)
def restore_threads():
    n = numba.get_num_threads()
    yield
    numba.set_num_threads(n)


def quiet_fit(cfg, ds):
    return train.fit(cfg, ds, progress=False, log=lambda *_: None)


def test_affine_names_small_bilinear_transforms_and_the_engine_gets_them():
    assert "affine" in config.AUGMENTS
    # small: a few degrees, a few percent, about a pixel (larger ones stop keeping labels)
    assert 0 < AFFINE["rotate"] <= 10 and 0 < AFFINE["scale"] <= 0.1
    assert 0 < AFFINE["shift"] <= 1.5 and AFFINE["subpixel"]
    cfg = make_config("accurate", augment="affine", seed=5)
    aug = config.augmentation(cfg)
    assert aug == Augmentation(5, shift=AFFINE["shift"], rotate=AFFINE["rotate"],
                               scale=AFFINE["scale"], subpixel=True)
    assert config.engine_options(cfg, "batch")["augment"] == aug
    # the fused path takes augmented batches too (written by the same kernel)
    net = MLP(cfg.spec(), seed=0)
    adam = make_optimizer("adam", net.spec.n_params, net.spec.dtype, 1e-3)
    X8 = np.zeros((256, 784), np.uint8)
    from parnn.engines import fused
    assert make_engine("batch", augment=aug).fuses(net, adam, X8, 128) == fused.available()


def test_an_affine_batch_is_the_kernels_transform_not_a_whole_pixel_shift_and_keeps_labels():
    X, y = shapes(400)
    idx = np.random.default_rng(1).permutation(400)[:200].astype(np.int64)
    aug = config.augmentation(make_config("accurate", augment="affine", seed=3))
    out = aug.fill(X, idx, np.empty((200, 784), np.float32), 4)
    expected = augment_batch(X, idx, np.empty((200, 784), np.float32), 3, 4, **AFFINE)
    assert np.array_equal(out, expected)
    plain = scaled(X, idx, "float32")
    assert np.any(out != plain, axis=1).mean() > 0.95
    # bilinear: values between the pixel levels a whole-pixel shift could only copy
    assert not np.all(np.isin(out, np.arange(256, dtype=np.float32) / np.float32(255)))
    # every image is still nearest to an unaugmented image of its own class
    every = scaled(X, np.arange(400), "float32")
    nearest = ((out[:, None, :] - every[None]) ** 2).sum(axis=2).argmin(axis=1)
    assert np.mean(y[nearest] == y[idx]) >= 0.97


@pytest.mark.parametrize("fused", [True, False], ids=["fused path", "general path"])
def test_the_engine_trains_on_the_affine_batches(monkeypatch, fused):
    """The batches a run with --augment affine trains on are the kernel's affine batches of
    the run's seed, not the plain rows: written by the parallel kernel (general path) or by
    the fused path's own threads, a share of the rows each (fill_rows)."""
    seen = []
    fill, fill_rows = Augmentation.fill, Augmentation.fill_rows

    def spy(self, X, idx, out, epoch):
        result = fill(self, X, idx, out, epoch)
        seen.append((self, X, idx.copy(), out.copy(), epoch))
        return result

    def spy_rows(self, X, idx, out, epoch, lo, hi):
        result = fill_rows(self, X, idx, out, epoch, lo, hi)
        seen.append((self, X, idx[lo:hi].copy(), out[lo:hi].copy(), epoch))
        return result
    monkeypatch.setattr(Augmentation, "fill", spy)
    monkeypatch.setattr(Augmentation, "fill_rows", spy_rows)
    real = make_engine
    monkeypatch.setattr(config, "make_engine", lambda name, **kw: real(name, fused=fused, **kw))
    ds = synthetic_data.blobs(128, 16, dtype="float32")
    cfg = make_config("modern", hidden=(8,), epochs=2, batch_size=32, validation_split=0.0,
                      engine="batch", threads=1, augment="affine", seed=9)
    res = quiet_fit(cfg, ds)
    from parnn.engines import fused as fused_module
    assert res.info["path"] == ("fused" if fused and fused_module.available() else
                                "general")
    assert {s[4] for s in seen} == {1, 2}
    for aug, X, idx, out, epoch in seen:
        assert aug.seed == 9 and aug.rotate == AFFINE["rotate"]
        again = augment_batch(X, idx, np.empty_like(out), 9, epoch, **AFFINE)
        assert np.array_equal(out, again)
        assert not np.array_equal(out, X[idx])


def test_affine_runs_are_bitwise_by_seed_at_1_and_2_threads_and_differ_from_others():
    ds = synthetic_data.blobs(256, 32, dtype="float32")

    def weights(**kw):
        cfg = make_config("modern", hidden=(16,), epochs=2, batch_size=32, validation_split=0.0,
                          engine="batch", **kw)
        return quiet_fit(cfg, ds).net.params

    one = weights(augment="affine", threads=1)
    assert np.array_equal(one, weights(augment="affine", threads=2))
    for other in (dict(augment="none"), dict(augment="shift1"), dict(augment="affine", seed=2)):
        assert not np.array_equal(one, weights(threads=1, **other))


def test_per_sample_engines_still_refuse_augmentation():
    cfg = make_config("paper", engine="serial", augment="affine")
    with pytest.raises(ConfigError, match="engine serial .*cannot apply --augment affine"):
        quiet_fit(cfg, synthetic_data.blobs(64, 16))
    with pytest.raises(ConfigError, match="unknown augmentation 'affine2'.*affine"):
        make_config("modern", augment="affine2")
    auto = dataclasses.replace(cfg, engine="auto", threads=1)     # auto falls back to numpy
    assert quiet_fit(auto, synthetic_data.blobs(64, 16)).engine == "numpy"


def test_parnn_train_offers_affine_and_refuses_it_on_a_per_sample_engine_in_one_line(tmp_path):
    help_text = " ".join(run_cli("train", "--help").stdout.split())
    assert f"affine (per image a rotation of up to {AFFINE['rotate']:g} degrees" in help_text
    data = write_dataset(tmp_path / "data", n_train=100, n_test=20)
    r = run_cli("train", "--data", data, "--out", tmp_path / "run", "--preset", "paper",
                "--engine", "serial", "--augment", "affine", "--epochs", "1", "--no-progress")
    assert r.returncode == 2, r.stderr
    assert "cannot apply --augment affine" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
