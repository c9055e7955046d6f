"""parnn from Python: parnn.train on arrays, parnn.load, and the Model's predict / predict_proba
/ score / save; every bad input refused with a ValueError that names what was expected."""

import os
import subprocess
import sys

import numpy as np
import pytest
import synthetic_data

import parnn
from parnn import io
from parnn.errors import ConfigError
from parnn.run import api, config

FAST = dict(hidden=(32,), engine="numpy", threads=1)


@pytest.fixture(scope="module")
def blobs():
    return synthetic_data.blobs(400, 200, seed=0, dtype="float32")


@pytest.fixture(scope="module")
def trained(blobs):
    return parnn.train(blobs.X_train, blobs.y_train, epochs=4, **FAST)


# --- training ------------------------------------------------------------------------------------

def test_train_returns_a_model_and_its_history(blobs, trained):
    model, history = trained
    assert isinstance(model, parnn.Model) and model.n_features_in == 784
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    # the modern preset holds out 10% of the training set and watches it
    assert all({"loss", "train_acc", "val_loss", "val_acc"} <= set(r) for r in history)
    assert not any("test_acc" in r for r in history)
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    assert model.score(blobs.X_test, blobs.y_test) > 0.8   # chance is 0.1


def test_predict_and_predict_proba(blobs, trained):
    model, _ = trained
    proba = model.predict_proba(blobs.X_test)
    assert proba.shape == (200, 10) and proba.dtype == np.float32   # float32 stays float32
    np.testing.assert_allclose(proba.sum(axis=1), 1, rtol=1e-5)
    assert (proba >= 0).all()
    pred = model.predict(blobs.X_test)
    assert pred.shape == (200,)
    assert np.array_equal(pred, model.classes[proba.argmax(axis=1)])
    assert np.array_equal(pred, model.nets[0].predict(blobs.X_test))   # the network's own argmax


def test_config_is_a_preset_name_a_train_config_or_none(blobs):
    X, y = blobs.X_train[:100], blobs.y_train[:100]
    logs = []
    api.train(X, y, config="paper", epochs=1, **FAST, log=logs.append)
    assert "tanh/tanh mse float64, sgd lr=0.01 batch=1" in logs[0]
    assert "100 training samples" in logs[0]           # the paper preset holds nothing out
    cfg = config.make_config("modern", epochs=1, validation_split=0.2, batch_size=16, **FAST)
    logs.clear()
    _, history = parnn.train(X, y, config=cfg, log=logs.append)
    assert "80 training samples, 20 validation" in logs[0] and len(history) == 1
    with pytest.raises(ConfigError, match="unknown setting.*: hiden"):
        parnn.train(X, y, hiden=(3,))
    with pytest.raises(ConfigError, match="learning rate must be"):
        parnn.train(X, y, lr=0)
    with pytest.raises(ConfigError, match="config must be a TrainConfig or a preset name"):
        parnn.train(X, y, config={"epochs": 1})


def test_a_validation_set_given_is_used_and_nothing_is_held_out(blobs):
    logs = []
    _, history = parnn.train(blobs.X_train, blobs.y_train, X_val=blobs.X_test,
                             y_val=blobs.y_test, epochs=2, **FAST, log=logs.append)
    assert "400 training samples, 200 validation" in logs[0]
    model, _ = parnn.train(blobs.X_train, blobs.y_train, X_val=blobs.X_test,
                           y_val=blobs.y_test, epochs=2, **FAST)
    # the last row's val_acc is the model's accuracy on that set
    assert history[-1]["val_acc"] == model.score(blobs.X_test, blobs.y_test)
    with pytest.raises(ValueError, match="both X_val and y_val"):
        parnn.train(blobs.X_train, blobs.y_train, X_val=blobs.X_test)


# --- inputs: checked, scaled or refused, never used silently --------------------------------------

def test_uint8_pixels_are_scaled_like_the_datasets(blobs, trained):
    model, _ = trained
    pixels = np.round(blobs.X_test * 255).astype(np.uint8)
    as_float = pixels / np.float32(255)
    assert np.array_equal(model.predict_proba(pixels), model.predict_proba(as_float))
    # trained on uint8: the same network as trained on the scaled floats
    a, _ = parnn.train(pixels, blobs.y_test, epochs=1, **FAST)
    b, _ = parnn.train(as_float, blobs.y_test, epochs=1, **FAST)
    assert np.array_equal(a.nets[0].params, b.nets[0].params)


@pytest.mark.parametrize("scale,words", [
    (255.0, r"values in \[0, 255\], expected pixel values in \[0, 1\] \(0..255 pixels\? pass "
            r"them as uint8"),
    (-1.0, r"values in \[-1, 0\], expected pixel values")])
def test_floats_outside_0_1_are_refused(blobs, trained, scale, words):
    model, _ = trained
    X = blobs.X_test.copy()
    X[0, :2] = [0, 1]
    with pytest.raises(ValueError, match=words):
        model.predict(X * scale)
    with pytest.raises(ValueError, match=words):
        parnn.train(X * scale, blobs.y_test, epochs=1, **FAST)


def test_features_are_taken_as_they_are_when_asked(blobs):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((120, 5)).astype(np.float32) * 10
    y = (X[:, 0] > 0).astype(int)
    model, _ = parnn.train(X, y, inputs="features", epochs=3, batch_size=16, **FAST)
    assert model.n_features_in == 5 and model.predict(X).shape == (120,)
    with pytest.raises(ValueError, match="expected pixel values"):
        parnn.train(X, y, epochs=1, **FAST)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_infinity_are_refused(blobs, trained, bad):
    model, _ = trained
    X = blobs.X_test.copy()
    X[3, 100] = bad
    with pytest.raises(ValueError, match=r"X contains NaN or infinity \(first in sample 3\)"):
        model.predict_proba(X)
    with pytest.raises(ValueError, match="NaN or infinity"):
        parnn.train(X, blobs.y_test, epochs=1, **FAST)


def test_images_28x28_are_accepted(blobs, trained):
    model, _ = trained
    images = blobs.X_test.reshape(-1, 28, 28)
    assert np.array_equal(model.predict_proba(images), model.predict_proba(blobs.X_test))


@pytest.mark.parametrize("shape,words", [((5, 100), r"shape \(5, 100\), expected \(n, 784\) or "
                                                    r"\(n, 28, 28\)"),
                                         ((5, 28, 27), r"shape \(5, 28, 27\), expected"),
                                         ((784,), r"one sample\? pass X\[None\]"),
                                         ((0, 784), "at least one sample")])
def test_other_shapes_are_refused_naming_the_expected_one(trained, shape, words):
    model, _ = trained
    with pytest.raises(ValueError, match=words):
        model.predict(np.zeros(shape, np.float32))


def test_non_numbers_are_refused(trained):
    with pytest.raises(ValueError, match="must hold numbers"):
        trained[0].predict(np.full((2, 784), "a"))


# --- labels ---------------------------------------------------------------------------------------

def test_string_labels_map_through_sorted_classes(blobs):
    names = np.array([f"c{k}" for k in range(10)])   # sorted as 0..9: the same class indices
    by_name, _ = parnn.train(blobs.X_train, names[blobs.y_train], epochs=2, **FAST)
    by_index, _ = parnn.train(blobs.X_train, blobs.y_train, epochs=2, **FAST)
    assert list(by_name.classes) == list(names) and by_name.class_names == tuple(names)
    assert np.array_equal(by_name.nets[0].params, by_index.nets[0].params)
    assert np.array_equal(by_name.predict(blobs.X_test), names[by_index.predict(blobs.X_test)])


def test_classes_given_fix_the_columns_order(blobs):
    names = np.array(list("abcdefghij"))
    order = names[::-1]
    model, _ = parnn.train(blobs.X_train, names[blobs.y_train], classes=order, epochs=2, **FAST)
    assert list(model.classes) == list(order)
    # label names[k] is column 9 - k: the same training as on the class indices 9 - y
    same, _ = parnn.train(blobs.X_train, 9 - blobs.y_train, epochs=2, **FAST)
    assert np.array_equal(model.nets[0].params, same.nets[0].params)
    proba = model.predict_proba(blobs.X_test)
    assert np.array_equal(model.predict(blobs.X_test), order[proba.argmax(axis=1)])
    assert np.array_equal(model.predict(blobs.X_test), order[same.predict(blobs.X_test)])


@pytest.mark.parametrize("y,words", [
    ([-1] + [0] * 99, "integer label -1: integer labels are class indices"),
    ([0] * 100, "at least 2 classes"),
    ([0, 1] * 49, "100 samples but y has 98 labels"),
    (np.zeros((100, 1), int), r"shape \(100, 1\), expected \(n,\)"),
    ([np.nan] + [1.0] * 99, "contains NaN"),
])
def test_bad_labels_are_refused(blobs, y, words):
    with pytest.raises(ValueError, match=words):
        parnn.train(blobs.X_train[:100], y, epochs=1, **FAST)


def test_a_validation_label_outside_the_classes_is_refused(blobs):
    names = np.array(list("abcdefghij"))
    y_val = names[blobs.y_test].copy()
    y_val[7] = "z"
    with pytest.raises(ValueError, match=r"y_val\[7\] = 'z' is not one of the classes"):
        parnn.train(blobs.X_train, names[blobs.y_train], X_val=blobs.X_test, y_val=y_val,
                    epochs=1, **FAST)


# --- files ---------------------------------------------------------------------------------------

def test_save_and_load_round_trip_with_string_labels(blobs, tmp_path):
    names = np.array(["shirt", "bag", "boot", "coat", "dress", "pullover", "sandal", "sneaker",
                      "tee", "trouser"])
    model, history = parnn.train(blobs.X_train, names[blobs.y_train], epochs=2, **FAST)
    model.save(tmp_path / "m.safetensors")
    back = parnn.load(tmp_path / "m.safetensors")
    assert list(back.classes) == sorted(names) and back.class_names == model.class_names
    assert np.array_equal(back.predict_proba(blobs.X_test), model.predict_proba(blobs.X_test))
    assert np.array_equal(back.predict(blobs.X_test), model.predict(blobs.X_test))
    assert back.history == history and back.meta["config"]["epochs"] == 2
    assert back.inputs == "pixels" and back.meta["dataset"]["name"] == "arrays"


def test_an_older_model_file_loads_with_class_indices(tmp_path, blobs, trained):
    """Files written before classes were saved: class indices, the saved class names."""
    model, _ = trained
    io.save_model(tmp_path / "old.safetensors", model.nets[0], {"class_names": ["x"] * 10})
    back = parnn.load(tmp_path / "old.safetensors")
    assert list(back.classes) == list(range(10)) and back.class_names == ("x",) * 10
    assert np.array_equal(back.predict(blobs.X_test), model.predict(blobs.X_test))


def test_an_ensemble_file_soft_votes(tmp_path, blobs):
    from parnn.distributed import combine_outputs

    members = [parnn.train(blobs.X_train, blobs.y_train, epochs=1, seed=s, **FAST)[0]
               for s in (1, 2, 3)]
    io.save_ensemble(tmp_path / "ens.safetensors", [m.nets[0] for m in members],
                     {"class_names": list(members[0].class_names)})
    ensemble = parnn.load(tmp_path / "ens.safetensors")
    assert len(ensemble.nets) == 3 and "ensemble of 3" in repr(ensemble)
    vote = combine_outputs([m.nets[0].output(blobs.X_test) for m in members], "soft")
    np.testing.assert_array_equal(ensemble.predict_proba(blobs.X_test), vote)
    # every path that votes gives these bits: `parnn evaluate`'s and parnn.train(members=K)'s
    from parnn.cli.models import outputs
    from parnn.run.members import soft_vote

    np.testing.assert_array_equal(outputs(ensemble, blobs.X_test, "ens"), vote)
    np.testing.assert_array_equal(soft_vote(ensemble.nets, blobs.X_test), vote)
    assert np.array_equal(ensemble.predict(blobs.X_test), vote.argmax(axis=1))
    ensemble.save(tmp_path / "again.safetensors")   # and it saves as an ensemble again
    assert np.array_equal(parnn.load(tmp_path / "again.safetensors").predict(blobs.X_test),
                          ensemble.predict(blobs.X_test))


def test_tanh_networks_give_normalised_scores(blobs):
    model, _ = parnn.train(blobs.X_train, blobs.y_train, config="paper", epochs=1, **FAST)
    out = model.nets[0].output(blobs.X_test)
    proba = model.predict_proba(blobs.X_test)
    expected = (out + 1) / 2
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(proba, expected, rtol=1e-12)
    assert np.array_equal(model.predict(blobs.X_test), out.argmax(axis=1))


# --- the package ---------------------------------------------------------------------------------

def test_import_parnn_is_lazy():
    code = ("import sys, parnn; assert 'numpy' not in sys.modules, 'numpy imported'; "
            "assert callable(parnn.train) and callable(parnn.load); "
            "assert 'parnn.run.api' in sys.modules; print(sorted(parnn.__all__))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "'Model'" in r.stdout and "'train'" in r.stdout


def test_the_cli_trains_through_the_same_path(tmp_path):
    """`parnn train` and parnn.train on the same arrays and settings: the same weights."""
    from parnn.data import load_dataset

    data = synthetic_data.write_dataset(tmp_path / "data", n_train=300, n_test=50)
    flags = ["--hidden", "16", "--epochs", "2", "--engine", "numpy", "--threads", "1",
             "--batch-size", "32", "--early-stopping", "1"]
    r = synthetic_data.parnn("train", "--data", data, "--out", tmp_path / "run", "--no-progress",
                             *flags)
    assert r.returncode == 0, r.stderr
    cli_model = parnn.load(tmp_path / "run" / "model.safetensors")
    ds = load_dataset("fashion-mnist", data)
    model, history = parnn.train(ds.X_train, ds.y_train, class_names=ds.class_names,
                                 hidden=(16,), epochs=2, engine="numpy", threads=1,
                                 batch_size=32, early_stopping=1)
    assert np.array_equal(cli_model.nets[0].params, model.nets[0].params)
    assert cli_model.class_names == model.class_names
    timing = ("seconds", "samples_per_s", "test_acc")
    assert [{k: v for k, v in row.items() if k not in timing} for row in cli_model.history] == \
        [{k: v for k, v in row.items() if k not in timing} for row in history]


@pytest.mark.slow
@pytest.mark.skipif(not __import__("pathlib").Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="Fashion-MNIST not installed")
def test_the_readmes_python_runs(tmp_path):
    """README.md's "From Python" block, as it is, on the real data."""
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = readme.split("## From Python", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert float(lines[0]) > 0.8 and float(lines[1]) > 0.8
    assert (tmp_path / "fashion.safetensors").is_file()


def test_bad_paths_labels_and_empty_images_get_parnns_one_line_errors(tmp_path, trained, blobs):
    """Before: TypeError from deep inside (load(None), score(X, None)), NumPy's reshape
    message for (0, 28, 28), and raw OSErrors from save."""
    from parnn.errors import ParnnError

    model, _ = trained
    for bad in (None, 5, "", "a\0b"):
        with pytest.raises(ConfigError, match="path"):
            parnn.load(bad)
        with pytest.raises(ConfigError, match="path"):
            model.save(bad)
    read_only = tmp_path / "ro.safetensors"
    read_only.write_bytes(b"keep")
    read_only.chmod(0o444)
    (tmp_path / "file").write_bytes(b"")
    for bad in (tmp_path, tmp_path / "file" / "model.safetensors", read_only):
        with pytest.raises(ParnnError, match="cannot write the model file") as e:
            model.save(bad)
        assert "\n" not in str(e.value)
    assert read_only.read_bytes() == b"keep"
    model.save(os.fsencode(tmp_path / "bytes.safetensors"))       # bytes name files, as before
    assert parnn.load(os.fsencode(tmp_path / "bytes.safetensors")).spec == model.spec
    for y in (None, 3, [[1, 2]]):
        with pytest.raises(ValueError, match="y must be a 1-d array of labels"):
            model.score(blobs.X_test, y)
    with pytest.raises(ValueError, match=r"shape \(0, 784\): it needs at least one sample"):
        model.predict(np.zeros((0, 28, 28), np.uint8))
    with pytest.raises(ValueError, match=r"values in \[1.00000012, 1.00000012\]"):
        model.predict(np.full((2, 784), 1.0000001, np.float32))
