"""An ensemble trained in one process (parnn.run.members, parnn.train(members=K))."""

import dataclasses

import numpy as np
import pytest
import synthetic_data

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
