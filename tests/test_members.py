"""An ensemble trained in one process (parnn.run.members, parnn.train(members=K))."""

import dataclasses
import json
import os
import signal
import time

import numpy as np
import pytest
import synthetic_data
from synthetic_data import parnn as run_cli, write_dataset

import parnn
from parnn.errors import ConfigError
from parnn.run import api, config, members, train as loop

FAST = dict(hidden=(32,), engine="numpy", threads=1, epochs=3)


@pytest.fixture(scope="module")
def blobs():
    return synthetic_data.blobs(400, 200, seed=0, noise=0.6, dtype="float32")


@pytest.fixture(scope="module")
def three(blobs):
    cfg = config.make_config("modern", **FAST)
    return cfg, members.train_members(cfg, blobs, 3, progress=False, log=lambda *a: None)


def test_member_k_is_the_run_with_seed_plus_k_on_the_rows_the_first_seed_held_out(blobs, three):
    cfg, ens = three
    rows, validation = api.holdout(cfg, blobs)
    for k, result in enumerate(ens.results):
        alone = loop.fit(dataclasses.replace(cfg, seed=cfg.seed + k), blobs, rows=rows,
                         validation=validation, progress=False, log=lambda *a: None)
        assert result.config.seed == cfg.seed + k
        assert np.array_equal(result.net.params, alone.net.params)
        assert result.history[-1]["val_acc"] == alone.history[-1]["val_acc"]
    a, b = (r.net.params for r in ens.results[:2])
    assert not np.array_equal(a, b)                     # different seeds, different networks


def test_the_vote_is_the_mean_of_the_members_probabilities(blobs, three):
    cfg, ens = three
    probs = [r.net.output(blobs.X_test) for r in ens.results]
    mean = np.mean(probs, axis=0)
    np.testing.assert_allclose(members.soft_vote(ens.nets, blobs.X_test), mean, rtol=1e-6)
    assert ens.test_acc == np.mean(mean.argmax(1) == blobs.y_test)
    _, validation = api.holdout(cfg, blobs)
    held = validation.rows
    assert ens.val_acc == np.mean(np.mean([r.net.output(blobs.X_train[held]) for r in ens.results],
                                          axis=0).argmax(1) == blobs.y_train[held])
    # a noisy problem where the members disagree: the vote is none of them alone
    for p in probs:
        assert (p.argmax(1) != mean.argmax(1)).any()


def test_uint8_pixels_vote_like_their_floats(three, blobs):
    _, ens = three
    X8 = np.round(blobs.X_test * 255).astype(np.uint8)
    np.testing.assert_array_equal(members.soft_vote(ens.nets, X8),
                                  members.soft_vote(ens.nets, X8 / np.float32(255)))


def test_parnn_train_with_members_gives_an_ensemble_that_saves_and_loads(blobs, tmp_path, three):
    cfg, ens = three
    model, histories = parnn.train(blobs.X_train, blobs.y_train, config=cfg, members=3)
    assert len(model.nets) == 3 and len(histories) == 3 and len(histories[0]) == FAST["epochs"]
    for net, result in zip(model.nets, ens.results):       # the same members as train_members
        assert np.array_equal(net.params, result.net.params)
    assert model.meta["members"] == 3 and model.meta["seeds"] == [1, 2, 3]
    assert model.score(blobs.X_test, blobs.y_test) == pytest.approx(ens.test_acc)
    model.save(tmp_path / "ens.safetensors")
    again = parnn.load(tmp_path / "ens.safetensors")
    np.testing.assert_array_equal(again.predict_proba(blobs.X_test),
                                  model.predict_proba(blobs.X_test))


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "3"])
def test_a_bad_member_count_is_refused(blobs, bad):
    with pytest.raises(ConfigError, match="members must be an integer >= 1"):
        parnn.train(blobs.X_train, blobs.y_train, members=bad, **FAST)


# --- members that differ in how they train (recipes) -------------------------------------------

def test_recipes_cycle_over_the_members_each_with_its_own_seed():
    cfg = config.make_config("accurate", epochs=6)
    configs = members.member_configs(cfg, 5, [{}, {"augment": "shift1"}])
    assert [c.seed for c in configs] == [1, 2, 3, 4, 5]
    assert [c.augment for c in configs] == ["none", "shift1", "none", "shift1", "none"]
    for c in configs:      # nothing else changes: the preset's warm-up, decay, ... stay
        assert dataclasses.replace(c, seed=1, augment="none") == cfg
    named = members.member_configs(cfg, 5, "shift1")
    assert named == configs
    assert members.member_configs(cfg, 3) == members.member_configs(cfg, 3, "seeds") == \
        [dataclasses.replace(cfg, seed=s) for s in (1, 2, 3)]


def test_a_recipe_that_changes_the_network_or_is_unknown_is_refused():
    cfg = config.make_config("modern", **FAST)
    with pytest.raises(ConfigError, match=r"hidden \(64,\) instead of \(32,\).*share one"):
        members.member_configs(cfg, 2, [{}, {"hidden": (64,)}])
    for recipe in ({"dtype": "float64"}, {"loss": "mse"}, {"activation": "tanh"}):
        setting = next(iter(recipe))     # the setting named, not two equal shapes
        with pytest.raises(ConfigError, match=f"{setting} '{recipe[setting]}' instead of"):
            members.member_configs(cfg, 2, [{}, recipe])
    with pytest.raises(ConfigError, match="unknown member recipe 'bagging'"):
        members.member_configs(cfg, 2, "bagging")
    with pytest.raises(ConfigError, match="unknown setting"):
        members.member_configs(cfg, 2, [{"widht": 3}])
    for bad in ([], 42, {"augment": "shift1"}, [{}, "shift1"]):
        with pytest.raises(ConfigError, match="dicts of settings"):
            members.member_configs(cfg, 2, bad)
    with pytest.raises(ConfigError, match="cannot set seed"):
        members.member_configs(cfg, 2, [{}, {"seed": 7}])


def test_every_member_is_checked_before_the_first_trains(blobs):
    """Before: member 1 trained in full, then member 2's recipe was refused by its engine;
    and --members 10**20 built configs until memory ran out."""
    seen = []
    for cfg, recipes, message in [
            (config.make_config("paper", **dict(FAST, engine="owner")), "shift1",
             "cannot apply"),
            (config.make_config("paper", **dict(FAST, engine="serial")), [{}, {"dropout": 0.3}],
             "cannot apply --dropout"),
            (config.make_config("modern", validation_split=0.0, early_stopping=2, **FAST), None,
             "no validation set")]:
        with pytest.raises(ConfigError, match=message):
            parnn.train(blobs.X_train, blobs.y_train, config=cfg, members=2,
                        member_recipes=recipes, log=seen.append)
    assert seen == []                      # not a line of training
    for huge, need in ((10**20, "more than a petabyte"), (10**400, "more than a petabyte"),
                       (10**6, "about 1006.1 GB")):
        with pytest.raises(ConfigError, match=f"members of 235146 parameters each need {need}"):
            members.member_configs(config.make_config("modern"), huge)
    # a validation set of one's own serves early stopping (validation_split 0 then)
    Xv, yv = blobs.X_test[:50], blobs.y_test[:50]
    model, histories = parnn.train(blobs.X_train, blobs.y_train, X_val=Xv, y_val=yv,
                                   validation_split=0.0, early_stopping=2, members=2, **FAST)
    assert len(model.nets) == 2 and all("val_loss" in h[-1] for h in histories)


def test_one_member_with_a_recipe_returns_one_history(blobs):
    model, history = parnn.train(blobs.X_train, blobs.y_train, members=1,
                                 member_recipes="shift1", **FAST)
    assert isinstance(history, list) and isinstance(history[0], dict) and len(model.nets) == 1


def test_a_member_with_a_recipe_is_the_run_of_its_own_config(blobs):
    cfg = config.make_config("modern", **FAST)
    recipes = [{}, {"dropout": 0.3}]
    model, _ = parnn.train(blobs.X_train, blobs.y_train, config=cfg, members=2,
                           member_recipes=recipes)
    rows, validation = api.holdout(cfg, blobs)
    for net, member in zip(model.nets, members.member_configs(cfg, 2, recipes)):
        alone = loop.fit(member, blobs, rows=rows, validation=validation, progress=False,
                         log=lambda *a: None)
        assert np.array_equal(net.params, alone.net.params)
    plain = loop.fit(dataclasses.replace(cfg, seed=2), blobs, rows=rows, validation=validation,
                     progress=False, log=lambda *a: None)
    assert not np.array_equal(model.nets[1].params, plain.net.params)   # the dropout applied


# --- parnn train --members K -------------------------------------------------------------------

CLI = ["--hidden", "16", "--epochs", "2", "--engine", "numpy", "--threads", "1",
       "--no-progress", "--batch-size", "32"]


def test_parnn_train_members_saves_an_ensemble_that_evaluate_reads(tmp_path):
    data = write_dataset(tmp_path / "data", n_train=300, n_test=60)
    r = run_cli("train", "--data", data, "--out", tmp_path / "ens", *CLI, "--members", "3",
                "--member-recipe", "shift1", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [m["config"]["seed"] for m in out["members"]] == [1, 2, 3]
    assert [m["config"]["augment"] for m in out["members"]] == ["none", "shift1", "none"]
    model = parnn.load(tmp_path / "ens" / "model.safetensors")
    assert len(model.nets) == 3 and model.meta["seeds"] == [1, 2, 3]
    from parnn.data import load_dataset

    ds = load_dataset("fashion-mnist", data, "uint8")
    assert model.score(ds.X_test, ds.y_test) == pytest.approx(out["test_acc"])
    e = run_cli("evaluate", tmp_path / "ens" / "model.safetensors", "--data", data, "--json")
    assert e.returncode == 0, e.stderr
    assert json.loads(e.stdout)["accuracy"] == pytest.approx(out["test_acc"])
    again = run_cli("train", "--data", data, "--out", tmp_path / "ens", *CLI, "--members", "2")
    assert again.returncode != 0 and "already holds a trained model" in again.stderr
    # `parnn info`: the vote's accuracies (not member 0's history), and how the members differ
    info = json.loads(run_cli("info", tmp_path / "ens" / "model.safetensors", "--json").stdout)
    assert info["accuracy"] == {"train_acc": None, "val_acc": out["val_acc"],
                                "test_acc": out["test_acc"]}
    assert info["member_settings"] == {"augment": ["none", "shift1", "none"], "seed": [1, 2, 3]}
    text = run_cli("info", tmp_path / "ens" / "model.safetensors").stdout
    assert "augment: none, shift1, none" in text and "(the soft vote)" in text


def test_members_overwrite_replaces_a_single_run_and_leaves_nothing_of_it(tmp_path):
    # Old checkpoints left beside the ensemble would let `--resume` write the old run's model
    # over it; the old run's history would be read as the ensemble's.
    data = write_dataset(tmp_path / "data", n_train=200, n_test=40)
    out = tmp_path / "run"
    first = run_cli("train", "--data", data, "--out", out, *CLI)
    assert first.returncode == 0, first.stderr
    assert (out / "history.csv").exists() and list((out / "checkpoints").iterdir())
    r = run_cli("train", "--data", data, "--out", out, *CLI, "--members", "2", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert not (out / "history.csv").exists() and not (out / "history.png").exists()
    assert not [p for p in (out / "checkpoints").iterdir() if not p.name.startswith(".")]
    assert len(parnn.load(out / "model.safetensors").nets) == 2
    again = run_cli("train", "--resume", out, "--epochs", "5")
    assert again.returncode != 0 and "Traceback" not in again.stderr


@pytest.mark.parametrize("flags, message", [
    (["--members", "0"], "members must be an integer >= 1"),
    (["--member-recipe", "shift1"], "--member-recipe only applies to an ensemble (--members K"),
    (["--members", "2", "--distributed", "ensemble"], "cannot be combined with --resume or"),
    (["--members", "2", "--checkpoint-every", "5"], "--members trains without checkpoints"),
    (["--members", "2", "--member-recipe", "bagging"], "invalid choice"),
])
def test_parnn_train_members_refuses_in_one_line(tmp_path, flags, message):
    data = write_dataset(tmp_path / "data", n_train=100, n_test=20)
    r = run_cli("train", "--data", data, "--out", tmp_path / "ens", *CLI, *flags)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "ens").exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_members_train_is_one_line_and_its_status(signum):
    """Before: SIGTERM killed `parnn train --members` silently, leaving its locks behind."""
    from parnn.run.checkpoint import Interrupted

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted, match=f"stopped by {signum.name} after 1 of 3 members .*"
                       "no ensemble was saved") as caught:
        with members._stopped_by_signals(["member 1"], 3):
            os.kill(os.getpid(), signum)
            time.sleep(5)                       # the handler interrupts this
    assert caught.value.exit_status == 128 + signum
    assert signal.getsignal(signal.SIGTERM) == before      # handlers given back


def test_sigterm_while_members_train_ends_the_command_in_one_line_and_frees_its_locks(tmp_path):
    data = write_dataset(tmp_path / "data", n_train=300, n_test=60)
    out = tmp_path / "ens"
    p = synthetic_data.popen("train", "--data", data, "--out", out, *CLI[:2], "--epochs", "100000",
                             *CLI[4:], "--members", "3",
                             env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        assert "member 1 of 3" in p.stdout.readline()     # training has begun
        time.sleep(0.5)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 128 + signal.SIGTERM
    assert len(err.strip().splitlines()) == 1 and "after 0 of 3 members" in err, err
    assert not (out / "model.safetensors").exists()
    locks = list(out.rglob(".parnn.lock")) if out.exists() else []
    assert locks == []                                    # released, not left behind
