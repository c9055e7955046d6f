import dataclasses

import numpy as np
import synthetic_data
import pytest

from parnn.data import load_dataset
from parnn.errors import ConfigError, DivergenceError
from parnn.run import config, train
from parnn.run.config import make_config

REAL = pytest.mark.skipif(not __import__("pathlib").Path("/usr/share/datasets/fashion-mnist").is_dir(),
                          reason="Fashion-MNIST not installed")


def synthetic(n=300, n_test=100, seed=0, dtype="float64"):
    return synthetic_data.blobs(n, n_test, seed, dtype=dtype)


def test_presets_hold_the_papers_and_the_modern_settings():
    p = make_config("paper")
    assert (p.activation, p.output, p.loss, p.optimizer, p.batch_size, p.dtype, p.lr) == \
        ("tanh", "tanh", "mse", "sgd", 1, "float64", 0.01)
    m = make_config("modern")
    assert (m.activation, m.output, m.loss, m.optimizer, m.dtype) == \
        ("relu", "softmax", "cross_entropy", "adam", "float32")
    assert make_config("paper", lr=0.5, hidden=(32,)).lr == 0.5


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
        make_config("modern", **overrides)


def test_bad_settings_are_value_errors_for_python_callers():
    """ConfigError is also a ValueError: scikit-learn's and NumPy's callers catch that."""
    with pytest.raises(ValueError, match="learning rate must be a number > 0"):
        make_config("modern", lr=-1.0)


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="paper, modern"):
        make_config("fast")


def test_batch_larger_than_training_set_is_refused():
    cfg = make_config("modern", batch_size=1000, engine="numpy", threads=1)
    with pytest.raises(ConfigError, match="larger than the training set"):
        train.fit(cfg, synthetic(n=300), progress=False, log=lambda *_: None)


def test_same_seed_same_weights_different_seed_differs():
    ds = synthetic()
    run = lambda seed: train.fit(make_config("modern", epochs=2, seed=seed, engine="numpy",
                                             threads=1, dtype="float64"),
                                 ds, progress=False, log=lambda *_: None).net.params
    a, b, c = run(5), run(5), run(6)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("batch_size,lr,epochs", [(1, 0.01, 5), (32, 0.05, 8), ("full", 0.005, 60)])
def test_every_batch_mode_learns_the_blobs(batch_size, lr, epochs):
    cfg = make_config("paper", batch_size=batch_size, lr=lr, epochs=epochs, engine="numpy",
                      threads=1, hidden=(32, 16))
    res = train.fit(cfg, synthetic(), progress=False, log=lambda *_: None)
    assert res.history[-1]["test_acc"] > 0.8
    assert res.history[-1]["loss"] < 0.5 * res.history[0]["loss"]


def test_full_batch_takes_one_step_per_epoch():
    cfg = make_config("modern", batch_size="full", epochs=3, engine="numpy", threads=1)
    steps = []
    train.fit(cfg, synthetic(), progress=False, log=lambda *_: None,
              on_chunk=lambda epoch, done, net, opt: steps.append(opt.t))
    assert steps == [1, 2, 3]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_divergence_stops_with_a_hint():
    cfg = make_config("modern", lr=1e30, engine="numpy", threads=1, hidden=(64,))
    with pytest.raises(DivergenceError, match="lower the learning rate"):
        train.fit(cfg, synthetic(), progress=False, log=lambda *_: None)


@REAL
@pytest.mark.slow
def test_paper_network_learns_real_fashion_mnist():
    ds = load_dataset(dtype="float64", limit_train=4000, limit_test=2000)
    cfg = make_config("paper", engine="numpy", threads=1, hidden=(64, 32))
    res = train.fit(cfg, ds, progress=False, log=lambda *_: None)
    assert res.history[-1]["test_acc"] > 0.65     # chance is 0.10


@REAL
@pytest.mark.slow
def test_modern_network_learns_real_fashion_mnist():
    ds = load_dataset(dtype="float32", limit_train=5000, limit_test=2000)
    cfg = make_config("modern", epochs=3, engine="numpy", threads=2)
    res = train.fit(cfg, ds, progress=False, log=lambda *_: None)
    assert res.history[-1]["test_acc"] > 0.75


def test_cosine_schedule_starts_at_lr_halves_midway_and_decays_towards_0():
    cfg = make_config("modern", epochs=8, lr=0.01)
    assert cfg.lr_schedule == "cosine"
    rates = [config.lr_at(cfg, e) for e in range(1, 9)]
    assert rates[0] == 0.01
    assert np.all(np.diff(rates) < 0)                          # every epoch lower than the last
    assert config.lr_at(cfg, 5) == pytest.approx(0.005)        # epoch 1 + epochs/2: half
    assert 0 < rates[-1] < 0.001                               # close to 0, not 0: it still learns
    # symmetric about the midpoint: lr_at(1 + k) + lr_at(1 + epochs - k) = lr
    assert config.lr_at(cfg, 3) + config.lr_at(cfg, 7) == pytest.approx(0.01)
    const = make_config("modern", epochs=4, lr=0.01, lr_schedule="constant")
    assert [config.lr_at(const, e) for e in range(1, 5)] == [0.01] * 4


def test_the_loop_uses_each_epochs_scheduled_rate():
    cfg = make_config("modern", epochs=4, lr=0.01, engine="numpy", threads=1)
    seen = {}
    train.fit(cfg, synthetic(), progress=False, log=lambda *_: None,
              on_chunk=lambda epoch, done, net, opt: seen.setdefault(epoch, opt.lr))
    assert seen == {e: config.lr_at(cfg, e) for e in range(1, 5)}


# --- the constraints table -----------------------------------------------------------------------

def test_every_setting_has_a_constraint():
    assert set(config.CONSTRAINTS) == {f.name for f in dataclasses.fields(config.TrainConfig)}


def test_presets_are_checked_configs_and_make_config_starts_from_them():
    assert config.PRESETS == {"paper": config.PAPER, "modern": config.MODERN,
                              "accurate": config.ACCURATE}
    assert make_config("paper") == config.PAPER and make_config("modern") == config.MODERN
    assert make_config() == config.ACCURATE and config.DEFAULT_PRESET == "accurate"
    assert make_config("paper", lr=None, hidden=None) == config.PAPER   # None: keep the preset's


@pytest.mark.parametrize("change,words", [
    (dict(epochs=2.0), "epochs must be an integer >= 1, got 2.0"),
    (dict(threads=True), "threads must be an integer >= 1, got True"),
    (dict(lr=float("inf")), "learning rate must be a number > 0, got inf"),
    (dict(hidden=(16, 1.5)), r"hidden layer sizes must be an integer >= 1, got \[16, 1.5\]"),
    (dict(hidden=()), "hidden layer sizes must be one or more integers >= 1, got \\[\\]"),
    (dict(batch_size="half"), "batch size must be an integer >= 1 or 'full', got 'half'"),
    (dict(activation=None), "unknown hidden activation None: choose one of tanh, sigmoid, relu"),
])
def test_a_config_is_checked_whenever_it_is_made(change, words):
    """dataclasses.replace (and TrainConfig(...)) check too: an invalid config cannot exist."""
    with pytest.raises(ConfigError, match=words):
        dataclasses.replace(config.MODERN, **change)


def test_hidden_sizes_given_as_a_list_become_a_tuple():
    cfg = config.TrainConfig(hidden=[32, 16])
    assert cfg.hidden == (32, 16) and cfg.spec().sizes == (784, 32, 16, 10)


def test_unknown_settings_are_named():
    with pytest.raises(ConfigError, match="unknown setting.*: hiden"):
        make_config("modern", hiden=(3,))


# --- the engine: picked once per run -------------------------------------------------------------

@pytest.mark.parametrize("engine,batch,optimizer,threads,picked",
                         [("auto", 32, "adam", 1, "batch"), ("auto", 1, "sgd", 1, "serial"),
                          ("auto", 1, "sgd", 2, "owner"), ("auto", 1, "adam", 2, "batch"),
                          ("numpy", 1, "sgd", 2, "numpy")])
def test_the_engine_is_made_once_per_run(monkeypatch, engine, batch, optimizer, threads, picked):
    """auto: owner for per-sample SGD on 2 threads (serial on 1), batch for mini-batches."""
    import numba

    if threads > numba.config.NUMBA_NUM_THREADS:
        pytest.skip(f"Numba's pool has fewer than {threads} threads here")
    made = []
    real = config.make_engine
    monkeypatch.setattr(config, "make_engine", lambda name, **kw: made.append(name) or real(name, **kw))
    monkeypatch.setattr(config, "usable_cores", lambda: 2)      # the choice, on any machine
    cfg = make_config("modern", engine=engine, batch_size=batch, optimizer=optimizer, lr=0.01,
                      epochs=2, hidden=(8,), threads=threads)
    res = train.fit(cfg, synthetic(n=64, n_test=16), progress=False, log=lambda *_: None)
    assert made == [picked] and res.engine == picked


def test_auto_keeps_serial_for_per_sample_sgd_at_thread_counts_owner_was_not_measured_at(monkeypatch):
    monkeypatch.setattr(config, "usable_cores", lambda: 8)
    spec = make_config("paper", threads=1).spec()
    for threads, picked in ((1, "serial"), (2, "owner"), (3, "serial"), (8, "serial")):
        cfg = make_config("paper", threads=threads)
        assert config.pick_engine(cfg, spec, 1000).name == picked, threads
    monkeypatch.setattr(config, "usable_cores", lambda: 1)    # 2 threads on 1 core: serial
    assert config.pick_engine(make_config("paper", threads=2), spec, 1000).name == "serial"


def test_an_engine_that_refuses_the_run_says_why():
    cfg = make_config("modern", engine="serial", threads=1)   # Adam on mini-batches
    with pytest.raises(ConfigError, match="engine serial .* optimizer adam"):
        train.fit(cfg, synthetic(), progress=False, log=lambda *_: None)


def test_a_given_engine_is_used_and_none_is_made(monkeypatch):
    monkeypatch.setattr(config, "make_engine", lambda *a, **kw: pytest.fail("made an engine"))
    from parnn.engines.numpy import NumpyEngine

    engine = NumpyEngine()
    cfg = make_config("modern", engine="batch", batch_size=16, epochs=1, hidden=(8,), threads=1)
    assert train.fit(cfg, synthetic(n=64, n_test=16), progress=False, log=lambda *_: None,
                     engine=engine).engine == "numpy"


# --- the validation split ------------------------------------------------------------------------

def test_the_validation_split_is_stratified_and_drawn_from_the_seed():
    from parnn.run.arrays import validation_rows

    rng = np.random.default_rng(0)
    y = rng.choice(10, 1003, p=np.linspace(1, 10, 10) / 55)   # classes of unequal sizes
    train_rows, val_rows = validation_rows(y, 0.1, seed=1)
    assert len(val_rows) == 100 and len(train_rows) == 903
    assert np.array_equal(np.sort(np.concatenate([train_rows, val_rows])), np.arange(1003))
    assert np.all(np.diff(val_rows) > 0) and np.all(np.diff(train_rows) > 0)
    counts, held = np.bincount(y, minlength=10), np.bincount(y[val_rows], minlength=10)
    assert np.all(np.abs(held - 0.1 * counts) < 1)                 # each class its share
    again, other = validation_rows(y, 0.1, seed=1)[1], validation_rows(y, 0.1, seed=2)[1]
    assert np.array_equal(again, val_rows) and not np.array_equal(other, val_rows)
    plain = validation_rows(y, 0.1, seed=1, stratify=False)[1]
    assert len(plain) == 100 and not np.array_equal(plain, val_rows)


def test_the_engine_trains_on_the_training_rows_only_and_the_test_set_waits(monkeypatch):
    """The validation rows never reach the engine's order, the test set never reaches the
    engine at all, and the test set is scored once, after the last epoch."""
    from parnn.engines.numpy import NumpyEngine
    from parnn.run import api
    from parnn.run.arrays import validation_rows

    ds = synthetic(dtype="float32")
    cfg = make_config("modern", epochs=3, engine="numpy", threads=1, batch_size=16, hidden=(8,))
    events, engine = [], NumpyEngine()
    real_train, real_score = engine.train, train.score
    monkeypatch.setattr(engine, "train", lambda net, opt, X, T, order, bs: (
        events.append(("train", X, order.copy())), real_train(net, opt, X, T, order, bs))[1])
    monkeypatch.setattr(train, "score", lambda net, subset, *a: (
        events.append(("score", subset.X)), real_score(net, subset, *a))[1])
    res = api.run_training(cfg, ds, engine=engine, progress=False, log=lambda *_: None)
    train_rows, val_rows = validation_rows(ds.y_train, 0.1, cfg.seed)
    orders = [e[2] for e in events if e[0] == "train"]
    assert all(e[1] is ds.X_train for e in events if e[0] == "train")
    assert len(orders) == 3 and all(np.array_equal(np.sort(o), train_rows) for o in orders)
    assert not np.isin(np.concatenate(orders), val_rows).any()
    tested = [i for i, e in enumerate(events) if e[0] == "score" and e[1] is ds.X_test]
    assert tested == [len(events) - 1]                              # once, at the very end
    assert [("test_acc" in r) for r in res.history] == [False, False, True]
    assert res.history[-1]["test_acc"] == res.test_acc == \
        float(np.mean(res.net.predict(ds.X_test) == ds.y_test))
    # asked for, the test set is scored after every epoch too
    every = api.run_training(cfg, ds, progress=False, log=lambda *_: None, test_every_epoch=True)
    assert all("test_acc" in r for r in every.history)
    assert np.array_equal(every.net.params, res.net.params)        # and changes no weight


def test_the_paper_preset_holds_nothing_out():
    from parnn.run import api

    lines = []
    api.run_training(make_config("paper", engine="numpy", threads=1, hidden=(8,)), synthetic(),
                     progress=False, log=lines.append)
    assert "300 training samples" in lines[0] and "validation" not in lines[0]
    assert "val_acc" not in lines[1]


# --- early stopping -------------------------------------------------------------------------------

def overfitting(**kw):
    """Data and settings whose validation loss turns up after some epochs (checked below)."""
    ds = synthetic_data.blobs(120, 60, seed=0, noise=0.3)
    cfg = make_config("modern", epochs=30, lr=0.03, lr_schedule="constant", batch_size=16,
                      hidden=(32,), engine="numpy", threads=1, dtype="float64",
                      validation_split=0.25, early_stopping=2)
    return ds, dataclasses.replace(cfg, **kw)


def test_early_stopping_keeps_the_best_epochs_weights():
    from parnn.run import api
    from parnn.run.arrays import validation_rows

    ds, cfg = overfitting()
    at_end = {}
    res = api.run_training(cfg, ds, progress=False, log=lambda *_: None,
                           on_chunk=lambda epoch, done, net, opt:
                           at_end.__setitem__(epoch, net.params.copy()))
    losses = [r["val_loss"] for r in res.history]
    best = 1 + int(np.argmin(losses))
    assert res.stopped and res.best_epoch == best < len(res.history) < cfg.epochs
    assert len(res.history) == best + cfg.early_stopping             # patience ran out
    assert np.array_equal(res.net.params, at_end[best])
    assert not np.array_equal(res.net.params, at_end[len(res.history)])
    # the row's val_loss is these weights' loss on the held-out rows
    held = train.Subset(ds.X_train, ds.y_train, validation_rows(ds.y_train, 0.25, cfg.seed)[1])
    assert train.score(res.net, held) == (losses[best - 1], res.history[best - 1]["val_acc"])
    assert [r.get("test_acc") is not None for r in res.history].count(True) == 1
    assert res.history[best - 1]["test_acc"] == res.test_acc


def test_without_early_stopping_the_last_epochs_weights_are_kept():
    from parnn.run import api

    ds, cfg = overfitting()
    cfg = dataclasses.replace(cfg, early_stopping=None, epochs=6)
    at_end = {}
    res = api.run_training(cfg, ds, progress=False, log=lambda *_: None,
                           on_chunk=lambda epoch, done, net, opt:
                           at_end.__setitem__(epoch, net.params.copy()))
    assert res.best_epoch is None and not res.stopped and len(res.history) == 6
    assert np.array_equal(res.net.params, at_end[6]) and "test_acc" in res.history[-1]


class Crash(Exception):
    """Stands for a kill right after a checkpoint."""


def test_a_run_resumed_from_any_checkpoint_stops_early_at_the_same_epoch(tmp_path):
    """The best weights and the epochs since the best survive a resume (the checkpoint holds
    them), so an interrupted run stops where the uninterrupted one did, with its weights."""
    from parnn.run import api, checkpoint

    class Recorder(checkpoint.Checkpointer):
        def __init__(self, directory, crash_at=None):
            super().__init__(directory, every=2)
            self.saves, self.crash_at = 0, crash_at

        def save(self, cfg, pos, net, opt):
            super().save(cfg, pos, net, opt)
            self.saves += 1
            if self.saves == self.crash_at:
                raise Crash

    ds, cfg = overfitting()
    quiet = dict(progress=False, log=lambda *_: None)
    rec = Recorder(tmp_path / "ref")
    ref = api.run_training(cfg, ds, checkpoints=rec, **quiet)
    assert ref.stopped
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("seconds", "samples_per_s")}
                       for r in h]
    for k in sorted({1, 3, 7, rec.saves // 2, rec.saves - 3, rec.saves - 1, rec.saves}):
        d = tmp_path / f"crash{k}"
        with pytest.raises(Crash):
            api.run_training(cfg, ds, checkpoints=Recorder(d, crash_at=k), **quiet)
        ck = checkpoint.load(d)
        res = api.run_training(cfg, ds, checkpoints=Recorder(d), resume=ck, **quiet)
        assert np.array_equal(res.net.params, ref.net.params), f"resumed after save {k}"
        assert strip(res.history) == strip(ref.history)
        assert (res.best_epoch, res.stopped, res.test_acc) == (ref.best_epoch, True, ref.test_acc)
    # the last checkpoint is of a finished run: nothing is left to train
    assert checkpoint.load(tmp_path / f"crash{rec.saves}").finished


def test_the_checkpoints_early_stopping_state_is_checked(tmp_path):
    from parnn import io
    from parnn.errors import ModelFileError
    from parnn.run import api, checkpoint

    ds, cfg = overfitting(epochs=6)
    api.run_training(cfg, ds, checkpoints=checkpoint.Checkpointer(tmp_path), progress=False,
                     log=lambda *_: None)
    arrays, meta = io.load_checkpoint(tmp_path / checkpoint.NEWEST)
    assert meta["best_epoch"] >= 1 and "best.params" in arrays
    bad = [({**meta, "best_epoch": meta["best_epoch"] % 6 + 1}, arrays, "lowest validation loss"),
           ({**meta, "stopped": not meta["stopped"]}, arrays, "stopped"),
           ({**meta, "best_epoch": None}, arrays, "tensors"),
           (meta, {k: v for k, v in arrays.items() if k != "best.params"}, "tensors"),
           ({**meta, "config": {**meta["config"], "early_stopping": None}}, arrays,
            "without early stopping")]
    for m, a, words in bad:
        io.save_checkpoint(tmp_path / "x.safetensors", a, m)
        with pytest.raises(ModelFileError, match=words):
            checkpoint.read(tmp_path / "x.safetensors")


def test_a_checkpoint_from_before_validation_loads_without_a_split(tmp_path):
    from parnn import io
    from parnn.run import checkpoint

    cfg = make_config("modern", epochs=2, engine="numpy", threads=1, hidden=(8,),
                      validation_split=0.0)
    train.fit(cfg, synthetic(), checkpoints=checkpoint.Checkpointer(tmp_path), progress=False,
              log=lambda *_: None)
    arrays, meta = io.load_checkpoint(tmp_path / checkpoint.NEWEST)
    old = {k: v for k, v in meta.items() if k not in ("best_epoch", "stopped")}
    old["config"] = {k: v for k, v in meta["config"].items()
                     if k not in ("validation_split", "early_stopping")}
    io.save_checkpoint(tmp_path / "old.safetensors", arrays, old)
    ck = checkpoint.read(tmp_path / "old.safetensors")
    assert ck.config == cfg and ck.finished and ck.position.best_epoch is None


# --- augmentation --------------------------------------------------------------------------------

def test_augment_settings_are_checked_and_per_sample_engines_refuse_it():
    with pytest.raises(ConfigError, match="unknown augmentation 'shift3'.*shift2\\+flip"):
        make_config("modern", augment="shift3")
    cfg = make_config("paper", engine="serial", augment="shift1")
    with pytest.raises(ConfigError, match="engine serial .*cannot apply --augment shift1"):
        train.fit(cfg, synthetic(), progress=False, log=lambda *_: None)
    # auto falls back from the per-sample engine to numpy, which augments
    auto = dataclasses.replace(cfg, engine="auto", threads=1)
    assert train.fit(auto, synthetic(n=64, n_test=16), progress=False,
                     log=lambda *_: None).engine == "numpy"
    assert config.augmentation(make_config("modern", augment="shift2+flip")).shift == 2
    assert config.augmentation(make_config("modern", augment="flip")).shift == 0
    assert config.augmentation(make_config("modern")) is None


def test_augmented_runs_are_bitwise_at_1_and_2_threads_and_differ_from_plain():
    ds = synthetic(n=256, n_test=32, dtype="float32")

    def weights(**kw):
        cfg = make_config("modern", hidden=(16,), epochs=2, batch_size=32, validation_split=0.0,
                          engine="batch", **kw)
        return train.fit(cfg, ds, progress=False, log=lambda *_: None).net.params

    one = weights(augment="shift2+flip", threads=1)
    assert np.array_equal(one, weights(augment="shift2+flip", threads=2))
    assert not np.array_equal(one, weights(augment="none", threads=1))
    assert not np.array_equal(one, weights(augment="shift2+flip", threads=1, seed=2))


def test_a_given_engine_without_augmentation_is_refused_for_an_augmented_run():
    from parnn.engines import make_engine

    cfg = make_config("modern", augment="shift1", batch_size=16, threads=1)
    with pytest.raises(ConfigError, match="augment shift1: the engine batch given was made "
                       "without it"):
        train.fit(cfg, synthetic(n=64, n_test=16), progress=False, log=lambda *_: None,
                  engine=make_engine("batch"))


def test_an_augmented_dropout_run_resumed_mid_epoch_ends_with_the_same_bits(tmp_path):
    from parnn.run import checkpoint

    ds = synthetic(n=240, n_test=40)
    cfg = make_config("modern", hidden=(16,), epochs=2, batch_size=20, validation_split=0.0,
                      engine="batch", augment="shift2+flip", dropout=0.2, threads=1,
                      lr_schedule="constant")
    quiet = dict(progress=False, log=lambda *_: None)
    whole = train.fit(cfg, ds, **quiet).net.params

    class Crash(Exception):
        pass

    def crash(epoch, done, net, opt):   # 6 steps into epoch 2, before that chunk is saved
        if epoch == 2 and done >= 120:
            raise Crash

    with pytest.raises(Crash):
        train.fit(cfg, ds, checkpoints=checkpoint.Checkpointer(tmp_path, every=3),
                  on_chunk=crash, **quiet)
    ck = checkpoint.load(tmp_path)
    assert ck.step < 24 and ck.step > 12                        # mid-epoch 2
    resumed = train.fit(cfg, ds, resume=ck, **quiet).net.params
    assert np.array_equal(whole, resumed)


# --- label smoothing -----------------------------------------------------------------------------

def test_label_smoothing_is_checked_and_trains_on_the_smoothed_targets(monkeypatch):
    for bad in (1.0, -0.1, "0.1"):
        with pytest.raises(ConfigError, match="label smoothing must be a number in \\[0, 1\\)"):
            make_config("modern", label_smoothing=bad)
    with pytest.raises(ConfigError, match="label smoothing applies to the cross_entropy loss"):
        make_config("paper", label_smoothing=0.1)
    seen = []
    real = config.make_engine

    def spy(name, **kw):
        eng = real(name, **kw)
        inner = eng.train
        eng.train = lambda net, opt, X, T, *a, **k: seen.append(T.copy()) or inner(net, opt, X, T,
                                                                                    *a, **k)
        return eng

    monkeypatch.setattr(config, "make_engine", spy)
    cfg = make_config("modern", hidden=(8,), epochs=1, batch_size=16, threads=1,
                      label_smoothing=0.2, validation_split=0.0)
    train.fit(cfg, synthetic(n=64, n_test=16), progress=False, log=lambda *_: None)
    T = seen[0]
    np.testing.assert_allclose(np.sort(np.unique(T)), [0.02, 0.82], rtol=1e-6)


# --- weight decay (AdamW) ------------------------------------------------------------------------

def test_weight_decay_is_checked_and_shrinks_the_weights():
    with pytest.raises(ConfigError, match="weight decay must be a number >= 0"):
        make_config("modern", weight_decay=-0.1)
    with pytest.raises(ConfigError, match="weight decay is AdamW's .* needs optimizer adam"):
        make_config("modern", optimizer="sgd", weight_decay=0.01)
    ds = synthetic(n=128, n_test=16)

    def weights(wd, engine):
        cfg = make_config("modern", hidden=(8,), epochs=2, batch_size=16, threads=1,
                          validation_split=0.0, weight_decay=wd, engine=engine)
        return train.fit(cfg, ds, progress=False, log=lambda *_: None).net.params

    decayed = weights(0.5, "batch")
    np.testing.assert_allclose(decayed, weights(0.5, "numpy"), rtol=1e-4, atol=1e-6)
    assert np.linalg.norm(decayed) < np.linalg.norm(weights(0.0, "batch"))


# --- warm-up then cosine -------------------------------------------------------------------------

def test_warmup_cosine_rises_linearly_then_follows_the_cosine_over_the_rest():
    cfg = make_config("modern", epochs=10, lr=0.01, lr_schedule="warmup-cosine", warmup_epochs=2)
    rates = [config.lr_at(cfg, e) for e in range(1, 11)]
    assert rates[:3] == pytest.approx([0.005, 0.01, 0.01])      # 1/2, 2/2, then the cosine's top
    rest = make_config("modern", epochs=8, lr=0.01)              # the cosine over the 8 left
    assert rates[2:] == pytest.approx([config.lr_at(rest, e) for e in range(1, 9)])
    no_warmup = dataclasses.replace(cfg, warmup_epochs=0)
    assert [config.lr_at(no_warmup, e) for e in range(1, 11)] == \
        pytest.approx([config.lr_at(dataclasses.replace(cfg, lr_schedule="cosine",
                                                        warmup_epochs=0), e)
                       for e in range(1, 11)])
    with pytest.raises(ConfigError, match="warm-up epochs apply to lr schedule warmup-cosine"):
        make_config("modern", warmup_epochs=2)
    with pytest.raises(ConfigError, match="warm-up epochs \\(10\\) must be fewer than the epochs"):
        make_config("modern", epochs=10, lr_schedule="warmup-cosine", warmup_epochs=10)
    with pytest.raises(ConfigError, match="warm-up epochs must be an integer >= 0"):
        make_config("modern", lr_schedule="warmup-cosine", warmup_epochs=-1)


def test_a_presets_dependent_settings_follow_what_the_caller_changes():
    """The default preset's warm-up, label smoothing and weight decay give way to flags that
    make them inapplicable; given explicitly, they are still refused with the reason."""
    acc = config.ACCURATE
    assert acc.warmup_epochs == 2 and acc.epochs == 30
    assert [make_config(epochs=e).warmup_epochs for e in (1, 2, 15, 30, 60)] == [0, 0, 1, 2, 4]
    for e in range(1, 40):                                      # always a valid run
        assert make_config(epochs=e).warmup_epochs < e
    off = make_config(loss="mse", output="tanh", optimizer="sgd", lr_schedule="cosine")
    assert (off.label_smoothing, off.weight_decay, off.warmup_epochs) == (0, 0, 0)
    assert make_config(optimizer="momentum").weight_decay == 0
    assert make_config(optimizer="adam").weight_decay == acc.weight_decay   # still applies
    with pytest.raises(ConfigError, match="label smoothing applies to the cross_entropy loss"):
        make_config(loss="mse", output="tanh", label_smoothing=0.1)
    with pytest.raises(ConfigError, match="weight decay is AdamW's decoupled decay"):
        make_config(optimizer="sgd", weight_decay=0.01)
    with pytest.raises(ConfigError, match="warm-up epochs \\(3\\) must be fewer than the epochs"):
        make_config(epochs=3, warmup_epochs=3)


# --- dropout -------------------------------------------------------------------------------------

def test_dropout_is_checked_refused_by_per_sample_engines_and_bitwise_at_1_and_2_threads():
    for bad in (1.0, -0.5):
        with pytest.raises(ConfigError, match="dropout rate must be a number in \\[0, 1\\)"):
            make_config("modern", dropout=bad)
    with pytest.raises(ConfigError, match="engine serial .*cannot apply --dropout 0.2 to batches"):
        train.fit(make_config("paper", engine="serial", dropout=0.2), synthetic(),
                  progress=False, log=lambda *_: None)
    ds = synthetic(n=256, n_test=32, dtype="float32")

    def weights(**kw):
        cfg = make_config("modern", hidden=(16, 8), epochs=2, batch_size=32,
                          validation_split=0.0, engine="batch", **kw)
        return train.fit(cfg, ds, progress=False, log=lambda *_: None).net.params

    one = weights(dropout=0.2, threads=1)
    assert np.array_equal(one, weights(dropout=0.2, threads=2))
    assert not np.array_equal(one, weights(threads=1))
