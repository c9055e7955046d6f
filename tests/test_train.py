import dataclasses

import numpy as np
import synthetic_data
import pytest

from parnn.run import train
from parnn.data import Dataset, load_dataset, FASHION_CLASSES
from parnn.errors import ConfigError, DivergenceError
from parnn.core.optim import make_optimizer

REAL = pytest.mark.skipif(not __import__("pathlib").Path("/usr/share/datasets/fashion-mnist").is_dir(),
                          reason="Fashion-MNIST not installed")


def synthetic(n=300, n_test=100, seed=0, dtype="float64"):
    return synthetic_data.blobs(n, n_test, seed, dtype=dtype)


def test_presets_hold_the_papers_and_the_modern_settings():
    p = train.make_config("paper")
    assert (p.activation, p.output, p.loss, p.optimizer, p.batch_size, p.dtype, p.lr) == \
        ("tanh", "tanh", "mse", "sgd", 1, "float64", 0.01)
    m = train.make_config("modern")
    assert (m.activation, m.output, m.loss, m.optimizer, m.dtype) == \
        ("relu", "softmax", "cross_entropy", "adam", "float32")
    assert train.make_config("paper", lr=0.5, hidden=(32,)).lr == 0.5


@pytest.mark.parametrize("overrides,words", [
    (dict(lr=0), "learning rate must be"),
    (dict(lr=float("nan")), "learning rate must be"),
    (dict(hidden=(256, 0)), "hidden layer sizes must be >= 1"),
    (dict(threads=0), "threads must be >= 1"),
    (dict(epochs=0), "epochs must be >= 1"),
    (dict(batch_size=0), "batch size must be"),
    (dict(engine="gpu"), "unknown engine 'gpu': choose one of numpy"),
    (dict(optimizer="rmsprop"), "sgd, momentum, adam"),
    (dict(init="zeros"), "paper, xavier, he"),
    (dict(momentum=1.5), "momentum must be in"),
    (dict(lr_schedule="step"), "constant, cosine"),
    (dict(output="tanh", loss="cross_entropy"), "needs output softmax"),
])
def test_bad_settings_are_refused_up_front(overrides, words):
    with pytest.raises(ConfigError, match=words):
        train.make_config("modern", **overrides)


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="paper, modern"):
        train.make_config("fast")


def test_batch_larger_than_training_set_is_refused():
    cfg = train.make_config("modern", batch_size=1000, engine="numpy", threads=1)
    with pytest.raises(ConfigError, match="larger than the training set"):
        train.fit(cfg, synthetic(n=300), progress=False, log=lambda *_: None)


def test_same_seed_same_weights_different_seed_differs():
    ds = synthetic()
    run = lambda seed: train.fit(train.make_config("modern", epochs=2, seed=seed, engine="numpy",
                                                   threads=1, dtype="float64"),
                                 ds, progress=False, log=lambda *_: None).net.params
    a, b, c = run(5), run(5), run(6)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("batch_size,lr,epochs", [(1, 0.01, 5), (32, 0.05, 8), ("full", 0.005, 60)])
def test_every_batch_mode_learns_the_blobs(batch_size, lr, epochs):
    cfg = train.make_config("paper", batch_size=batch_size, lr=lr, epochs=epochs, engine="numpy",
                            threads=1, hidden=(32, 16))
    res = train.fit(cfg, synthetic(), progress=False, log=lambda *_: None)
    assert res.history[-1]["test_acc"] > 0.8
    assert res.history[-1]["loss"] < 0.5 * res.history[0]["loss"]


def test_full_batch_takes_one_step_per_epoch():
    cfg = train.make_config("modern", batch_size="full", epochs=3, engine="numpy", threads=1)
    steps = []
    res = train.fit(cfg, synthetic(), progress=False, log=lambda *_: None,
                    on_chunk=lambda epoch, done, net, opt: steps.append(opt.t))
    assert steps == [1, 2, 3]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_divergence_stops_with_a_hint():
    cfg = train.make_config("modern", lr=1e30, engine="numpy", threads=1, hidden=(64,))
    with pytest.raises(DivergenceError, match="lower the learning rate"):
        train.fit(cfg, synthetic(), progress=False, log=lambda *_: None)


@REAL
@pytest.mark.slow
def test_paper_network_learns_real_fashion_mnist():
    ds = load_dataset(dtype="float64", limit_train=4000, limit_test=2000)
    cfg = train.make_config("paper", engine="numpy", threads=1, hidden=(64, 32))
    res = train.fit(cfg, ds, progress=False, log=lambda *_: None)
    assert res.history[-1]["test_acc"] > 0.65     # chance is 0.10


@REAL
@pytest.mark.slow
def test_modern_network_learns_real_fashion_mnist():
    ds = load_dataset(dtype="float32", limit_train=5000, limit_test=2000)
    cfg = train.make_config("modern", epochs=3, engine="numpy", threads=2)
    res = train.fit(cfg, ds, progress=False, log=lambda *_: None)
    assert res.history[-1]["test_acc"] > 0.75


def test_cosine_schedule_decays_each_epochs_rate_and_constant_keeps_it():
    cfg = train.make_config("modern", epochs=4, lr=0.01)
    assert cfg.lr_schedule == "cosine"
    rates = [train.lr_at(cfg, e) for e in range(1, 5)]
    np.testing.assert_allclose(rates, [0.01, 0.01 * (1 + np.cos(np.pi / 4)) / 2, 0.005,
                                       0.01 * (1 + np.cos(3 * np.pi / 4)) / 2])
    const = train.make_config("modern", epochs=4, lr=0.01, lr_schedule="constant")
    assert [train.lr_at(const, e) for e in range(1, 5)] == [0.01] * 4
    seen = []
    train.fit(dataclasses.replace(cfg, engine="numpy", threads=1), synthetic(), progress=False,
              log=lambda *_: None, on_chunk=lambda epoch, done, net, opt: seen.append(opt.lr))
    np.testing.assert_allclose(seen, rates)
