"""Checkpoints: resume to the same bits from any checkpoint, after SIGKILL, SIGINT or SIGTERM;
fall back to the previous file when the newest is damaged; keep the good one on divergence."""

import dataclasses
import os
import signal
import time

import numpy as np
import synthetic_data
import pytest

from parnn import io
from parnn.core.model import MLP, Spec
from parnn.engines import make_engine
from parnn.run import checkpoint, session, train
from parnn.run.checkpoint import NEWEST, PREVIOUS
from parnn.run.config import make_config
from parnn.errors import ConfigError, DivergenceError, ModelFileError
from synthetic_data import parnn, popen, write_dataset

QUIET = dict(progress=False, log=lambda *a: None)
TIMING = ("seconds", "samples_per_s")


def blobs(n=240, n_test=60, seed=0):
    return synthetic_data.blobs(n, n_test, seed, noise=0.3)


def without_timing(history):
    return [{k: v for k, v in row.items() if k not in TIMING} for row in history]


class Crash(Exception):
    """Stands for a SIGKILL right after a checkpoint: what survives is that checkpoint."""


class Recorder(checkpoint.Checkpointer):
    """Records (epoch, done, step) of every save; raises Crash after save number crash_at."""

    def __init__(self, directory, every=None, crash_at=None):
        super().__init__(directory, every)
        self.saves, self.crash_at = [], crash_at

    def save(self, cfg, pos, net, opt):
        super().save(cfg, pos, net, opt)
        self.saves.append((pos.epoch, pos.done, opt.t))
        if len(self.saves) == self.crash_at:
            raise Crash


def config(optimizer="adam", batch=16, epochs=3, **kw):
    lr = {"adam": 1e-3, "momentum": 0.01, "sgd": 0.1}[optimizer]
    return make_config("modern", optimizer=optimizer, batch_size=batch, epochs=epochs,
                       lr=lr, hidden=(16,), engine="numpy", threads=1, dtype="float64",
                       **kw)


# --- resuming in-process from every checkpoint -----------------------------------------------

@pytest.mark.parametrize("optimizer,batch,every", [("adam", 16, 3), ("momentum", 1, 40),
                                                   ("sgd", "full", 1), ("adam", 7, None)])
def test_resuming_from_any_checkpoint_gives_the_same_bits(tmp_path, optimizer, batch, every):
    ds, cfg = blobs(), config(optimizer, batch)
    ref_ckpt = Recorder(tmp_path / "ref", every)
    ref = train.fit(cfg, ds, checkpoints=ref_ckpt, **QUIET)
    # Checkpointing changes how the epoch is chunked, never the weights.
    assert np.array_equal(train.fit(cfg, ds, **QUIET).net.params, ref.net.params)
    n = len(ref_ckpt.saves)
    assert n >= cfg.epochs
    for k in sorted({1, 2, n // 3, n // 2, n - 2, n - 1}):
        d = tmp_path / f"crash{k}"
        with pytest.raises(Crash):
            train.fit(cfg, ds, checkpoints=Recorder(d, every, crash_at=k), **QUIET)
        ck = checkpoint.load(d)
        assert (ck.position.epoch, ck.position.done, ck.step) == ref_ckpt.saves[k - 1]
        res = train.fit(cfg, ds, checkpoints=Recorder(d, every), resume=ck, **QUIET)
        assert np.array_equal(res.net.params, ref.net.params), f"resumed after save {k}"
        assert without_timing(res.history) == without_timing(ref.history)


def test_the_checkpoint_records_the_engine_auto_chose(tmp_path):
    cfg = dataclasses.replace(config(), engine="auto")
    res = train.fit(cfg, blobs(), checkpoints=checkpoint.Checkpointer(tmp_path), **QUIET)
    ck = checkpoint.load(tmp_path)
    assert ck.config.engine == "auto" and ck.engine == res.engine


def test_training_reads_the_dataset_in_place(monkeypatch):
    """Memory: the dataset is held once; epochs shuffle an index order, they copy no data."""
    ds = blobs()
    ds.X_train = ds.X_train.astype(np.float64)  # the model's dtype, as load_dataset gives it
    engine, seen = make_engine("numpy"), []
    real = engine.train
    monkeypatch.setattr(engine, "train", lambda net, opt, X, T, order, bs:
                        (seen.append((X, T)), real(net, opt, X, T, order, bs))[1])
    train.fit(config(epochs=2), ds, engine=engine, **QUIET)
    assert all(X is ds.X_train for X, _ in seen)
    assert all(T is seen[0][1] for _, T in seen)  # one-hot targets built once per run


def test_checkpoints_fall_on_batch_boundaries_every_n_steps(tmp_path):
    ds, cfg = blobs(n=240), config("adam", batch=16, epochs=2)  # 15 steps per epoch
    rec = Recorder(tmp_path, every=4)
    train.fit(cfg, ds, checkpoints=rec, **QUIET)
    mid = [(e, done, step) for e, done, step in rec.saves if done]
    assert all(done % 16 == 0 and 0 < done < 240 for _, done, _ in mid)
    # every 4 steps inside an epoch; the epoch's end (step 15, 30) is saved as (next epoch, 0)
    assert rec.saves == [(1, 64, 4), (1, 128, 8), (1, 192, 12), (2, 0, 15),
                         (2, 64, 19), (2, 128, 23), (2, 192, 27), (3, 0, 30)]


def test_more_epochs_after_the_end_equal_a_longer_run(tmp_path):
    # A constant rate: under a cosine schedule more epochs also change the later epochs' rates.
    ds = blobs()
    train.fit(config(epochs=2, lr_schedule="constant"), ds, checkpoints=checkpoint.Checkpointer(tmp_path), **QUIET)
    ck = checkpoint.load(tmp_path)
    assert ck.finished and ck.position.epoch == 3
    longer = dataclasses.replace(ck.config, epochs=4)
    res = train.fit(longer, ds, checkpoints=checkpoint.Checkpointer(tmp_path), resume=ck, **QUIET)
    ref = train.fit(config(epochs=4, lr_schedule="constant"), ds, **QUIET)
    assert np.array_equal(res.net.params, ref.net.params)
    assert without_timing(res.history) == without_timing(ref.history)


def test_a_fresh_run_still_shuffles_with_the_seed_plus_1_stream(tmp_path, monkeypatch):
    """Checkpointing must not change what a run computes: epoch e trains on the e-th
    permutation of default_rng(seed + 1), as before resuming existed."""
    ds, cfg = blobs(), config(epochs=2)
    engine, seen = make_engine("numpy"), []
    real = engine.train
    monkeypatch.setattr(engine, "train", lambda net, opt, X, T, order, bs:
                        (seen.append(order.copy()), real(net, opt, X, T, order, bs))[1])
    train.fit(cfg, ds, checkpoints=checkpoint.Checkpointer(tmp_path, 4), engine=engine,
              **QUIET)
    rng = np.random.default_rng(cfg.seed + 1)
    assert np.array_equal(np.concatenate(seen), np.concatenate([rng.permutation(240),
                                                                rng.permutation(240)]))


# --- damaged files, fallback, rotation ---------------------------------------------------------

def flip(path, offset_from_end=40):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def run_dir(tmp_path):
    train.fit(config(epochs=2), blobs(), checkpoints=checkpoint.Checkpointer(tmp_path, 5), **QUIET)
    return tmp_path


def test_both_files_are_complete_checkpoints(run_dir):
    newest, prev = checkpoint.read(run_dir / NEWEST), checkpoint.read(run_dir / PREVIOUS)
    assert newest.step > prev.step
    assert not list(run_dir.glob("*.tmp"))


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
def test_a_damaged_newest_falls_back_to_the_previous(run_dir, damage):
    prev_step = checkpoint.read(run_dir / PREVIOUS).step
    newest = run_dir / NEWEST
    if damage == "flip":
        flip(newest)
    elif damage == "truncate":
        newest.write_bytes(newest.read_bytes()[:1000])
    else:
        newest.write_bytes(b"\x00" * 64)
    warnings = []
    ck = checkpoint.load(run_dir, warn=warnings.append)
    assert ck.path == run_dir / PREVIOUS and ck.step == prev_step
    assert len(warnings) == 1 and "using the previous checkpoint" in warnings[0]
    # The next save replaces the damaged newest but must keep the good previous one.
    with pytest.raises(Crash):
        train.fit(ck.config, blobs(), checkpoints=Recorder(run_dir, 5, crash_at=1), resume=ck,
                  **QUIET)
    assert checkpoint.read(run_dir / PREVIOUS).step == prev_step
    assert checkpoint.read(run_dir / NEWEST).step > prev_step


def test_newest_missing_uses_the_previous(run_dir):
    """A kill between 'newest -> prev' and the new file's rename leaves only prev."""
    (run_dir / NEWEST).unlink()
    assert checkpoint.load(run_dir).path == run_dir / PREVIOUS


def test_both_damaged_is_a_clean_error_naming_both(run_dir):
    flip(run_dir / NEWEST)
    flip(run_dir / PREVIOUS)
    with pytest.raises(ModelFileError, match="no usable checkpoint") as e:
        checkpoint.load(run_dir)
    assert NEWEST in str(e.value) and PREVIOUS in str(e.value) and "\n" not in str(e.value)


def test_a_model_file_is_not_a_checkpoint(tmp_path):
    net = MLP(Spec((784, 4, 10)), seed=0)
    io.save_model(tmp_path / NEWEST, net, {})
    with pytest.raises(ModelFileError, match="expected checkpoint"):
        checkpoint.load(tmp_path)


def test_checkpoint_meta_is_checked(tmp_path, run_dir):
    arrays, meta = io.load_checkpoint(run_dir / NEWEST)
    for change in ({"done": 5}, {"epoch": 99}, {"order_rng": {"bit_generator": "MT19937"}},
                   {"history": []}, {"config": {"lr": 1}}, {"step": -1}, {"checkpoint": 7}):
        io.save_checkpoint(tmp_path / "x.safetensors", arrays, {**meta, **change})
        with pytest.raises(ModelFileError):
            checkpoint.read(tmp_path / "x.safetensors")
    io.save_checkpoint(tmp_path / "y.safetensors", {**arrays, "optimizer.m": arrays["params"][:3]}, meta)
    with pytest.raises(ModelFileError, match="optimizer state"):
        checkpoint.read(tmp_path / "y.safetensors")



@pytest.mark.parametrize("setting,value,words", [("epochs", 2.0, "epochs must be an integer >= 1"),
                                                 ("hidden", [16, True], "hidden layer sizes"),
                                                 ("lr", "0.001", "learning rate must be a number"),
                                                 ("engine", "gpu", "unknown engine 'gpu'")])
def test_the_saved_settings_pass_the_same_constraints_as_new_ones(tmp_path, run_dir, setting,
                                                                  value, words):
    arrays, meta = io.load_checkpoint(run_dir / NEWEST)
    io.save_checkpoint(tmp_path / NEWEST, arrays,
                       {**meta, "config": {**meta["config"], setting: value}})
    with pytest.raises(ModelFileError, match=words):
        checkpoint.read(tmp_path / NEWEST)


# --- the resume policy (run/resume.py) ------------------------------------------------------------

def test_only_a_checkpoint_that_records_its_data_can_be_resumed(run_dir):
    """fit's own checkpoints (no run record) carry on in Python, not through `parnn train`."""
    with pytest.raises(ModelFileError, match="does not record its data and output directory"):
        session.resume(run_dir, session.RunOptions(), {})


def test_a_resumed_run_keeps_the_checkpoints_arithmetic_and_may_change_the_rest(run_dir):
    from parnn.run.resume import RunRecord, resumed_config

    ck = checkpoint.load(run_dir)
    record = RunRecord("fashion-mnist", "/d", {}, None, None, "/o", None)
    cfg = resumed_config(ck, record, {"lr": ck.config.lr, "epochs": 5, "threads": 1})
    assert cfg == dataclasses.replace(ck.config, epochs=5, threads=1, engine=ck.engine)
    with pytest.raises(ConfigError, match=r"--lr 0\.5 \(it has 0\.001\); --limit-train 9 "
                                          r"\(it has none\): drop those flags"):
        resumed_config(ck, record, {"lr": 0.5, "limit_train": 9})
    with pytest.raises(ConfigError, match="--epochs 1 is fewer than the 2 epoch"):
        resumed_config(ck, record, {"epochs": 1})


def test_every_setting_is_kept_on_resume_or_may_change():
    """A setting that changes the arithmetic and is not kept would be silently ignored."""
    from parnn.run.config import TrainConfig
    from parnn.run.resume import KEPT_ON_RESUME

    may_change = {"epochs", "threads"}
    assert {f.name for f in dataclasses.fields(TrainConfig)} - may_change <= set(KEPT_ON_RESUME)


@pytest.mark.parametrize("setting,value,words", [
    ("validation_split", 0.2, r"--validation-split 0\.2 \(it has 0\.1\)"),
    ("early_stopping", 3, r"--early-stopping 3 \(it has none\)"),
    ("label_smoothing", 0.2, r"--label-smoothing 0\.2 \(it has 0\.0\)"),
    ("layers", "dense8", r"--layers dense8 \(it has "),])
def test_a_resumed_run_refuses_a_changed_validation_split_or_patience(run_dir, setting, value,
                                                                      words):
    """They change which samples train and when the run stops: refused, not ignored."""
    from parnn.run.resume import RunRecord, resumed_config

    ck = checkpoint.load(run_dir)
    record = RunRecord("fashion-mnist", "/d", {}, None, None, "/o", None)
    with pytest.raises(ConfigError, match=words):
        resumed_config(ck, record, {setting: value})
    same = getattr(ck.config, setting)
    assert getattr(resumed_config(ck, record, {setting: same}), setting) == same


# --- divergence --------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_divergence_keeps_the_last_good_checkpoint(tmp_path):
    ds, cfg = blobs(n=300), config("adam", batch=10, epochs=2)
    order = np.random.default_rng(cfg.seed + 1).permutation(300)
    # An overflowing sample (inf * weights of both signs = NaN), met in epoch 1 at position 155:
    # step 16, in the chunk of steps 16..18 (checkpoints every 3 steps: the last at step 15).
    ds.X_train[order[155]] = np.inf
    with pytest.raises(DivergenceError) as e:
        train.fit(cfg, ds, checkpoints=checkpoint.Checkpointer(tmp_path, every=3), **QUIET)
    msg = str(e.value)
    for words in ("epoch 1 at step 18", "lower the learning rate",
                  f"last good checkpoint (epoch 1, step 15) is kept in {tmp_path}",
                  "no model file was written"):
        assert words in msg, msg
    ck = checkpoint.load(tmp_path)
    assert ck.step == 15 and np.isfinite(ck.arrays["params"]).all()


# --- real processes: SIGKILL, SIGINT, SIGTERM ----------------------------------------------------

RUN = ["--hidden", "128", "--batch-size", "8", "--epochs", "4", "--engine", "numpy",
       "--threads", "1", "--no-progress", "--dtype", "float64", "--seed", "3",
       "--checkpoint-every", "10"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"), n_train=2000, n_test=200)


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    r = parnn("train", "--data", data_dir, "--out", out, *RUN)
    assert r.returncode == 0, r.stderr
    return out


def same_run(a, b):
    pa, pb = (io.load_model(d / "model.safetensors")[0].params for d in (a, b))
    ha, hb = (io.load_model(d / "model.safetensors")[1]["history"] for d in (a, b))
    return np.array_equal(pa, pb) and without_timing(ha) == without_timing(hb)


def file_key(path):
    try:
        st = os.stat(path)
        return st.st_ino, st.st_mtime_ns
    except FileNotFoundError:
        return None


def wait_for_a_new_checkpoint(proc, path, before, timeout=60):
    """True once `path` is a checkpoint written by proc; False if proc ended first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            return False
        if file_key(path) not in (None, before):
            return True
        time.sleep(0.002)
    proc.kill()
    raise AssertionError(f"no checkpoint appeared in {timeout}s")


def test_sigkill_at_any_moment_then_resume_gives_the_same_bits(data_dir, reference, tmp_path):
    out = tmp_path / "run"
    newest = out / "checkpoints" / NEWEST
    args = ["train", "--data", data_dir, "--out", out, *RUN]
    landed = 0
    # Kill at varied delays after a checkpoint of each process's own: during computation,
    # during checkpoint writes, during the epoch-end evaluation. Once 4 kills have landed
    # mid-run (or the run got to its end anyway), let it finish.
    for delay in (0.0, 0.17, 0.05, 0.33, 0.011, 0.26, 0.09, 0.02):
        proc = popen(*args)
        if landed < 4 and wait_for_a_new_checkpoint(proc, newest, file_key(newest)):
            time.sleep(delay)
            if proc.poll() is None:
                proc.kill()
                landed += 1
        stdout, stderr = proc.communicate(timeout=60)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, stderr
        args = ["train", "--resume", out / "checkpoints", "--no-progress"]
    else:
        r = parnn(*args)
        assert r.returncode == 0, r.stderr
    assert landed >= 3
    assert same_run(out, reference)
    assert not list(out.rglob("*.tmp"))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_a_checkpoint_and_says_how_to_resume(sig, data_dir, reference, tmp_path):
    out, ckdir = tmp_path / "run", tmp_path / "ck"
    proc = popen("train", "--data", data_dir, "--out", out, "--checkpoint-dir", ckdir, *RUN)
    assert wait_for_a_new_checkpoint(proc, ckdir / NEWEST, None)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig
    lines = stderr.splitlines()
    assert len(lines) == 1 and sig.name in lines[0], stderr
    assert f"parnn train --resume {ckdir}" in lines[0]
    assert not (out / "model.safetensors").exists()
    r = parnn("train", "--resume", ckdir, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert same_run(out, reference)
