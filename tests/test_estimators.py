"""parnn.MLPClassifier and parnn.MLPRegressor: scikit-learn's own estimator checks, every one of
them, then the estimators in scikit-learn's tools (Pipeline, GridSearchCV, cross_val_score,
clone) and what parnn promises on top: the same weights as parnn.train, coefs_ as views of the
flat buffer, warm starts and partial_fit that carry on exactly, float32 kept float32."""

import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

sklearn = pytest.importorskip("sklearn")

from sklearn.base import clone  # noqa: E402
from sklearn.datasets import make_blobs, make_regression  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.model_selection import GridSearchCV, cross_val_score  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils._param_validation import InvalidParameterError  # noqa: E402
from sklearn.utils.estimator_checks import (check_param_validation,  # noqa: E402
                                            parametrize_with_checks)

import parnn  # noqa: E402
from parnn.estimators import MLPClassifier, MLPRegressor  # noqa: E402

# Small networks on one thread: the whole check suite runs in seconds.
FAST = dict(hidden_layer_sizes=(16,), max_iter=100, learning_rate_init=0.01, n_threads=1)

# Every check passes for both estimators: nothing is listed in expected_failed_checks.
@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@parametrize_with_checks([MLPClassifier(**FAST), MLPRegressor(**FAST)])
def test_scikit_learn_estimator_checks(estimator, check):
    check(estimator)


@pytest.mark.parametrize("Estimator", [MLPClassifier, MLPRegressor])
def test_parameter_constraints(Estimator):
    """scikit-learn's own check that every parameter has a constraint and a bad one raises
    InvalidParameterError (not in parametrize_with_checks' list for other libraries)."""
    check_param_validation(Estimator.__name__, Estimator(**FAST))


@pytest.mark.parametrize("setting", [
    dict(learning_rate_init=0), dict(momentum=1.0), dict(solver="lbfgs"), dict(max_iter=0),
    dict(activation="identity"), dict(batch_size=0), dict(validation_fraction=1.0),
    dict(engine="cuda"), dict(n_threads=0), dict(dtype="float16"), dict(preset="fast"),
    dict(hidden_layer_sizes=0), dict(n_iter_no_change=0),
])
def test_what_parnn_refuses_the_estimator_refuses_in_scikit_learns_words(setting, blobs):
    """_parameter_constraints is parnn's CONSTRAINTS table: its bounds, its names."""
    X, y = blobs
    with pytest.raises(InvalidParameterError, match=f"The '{next(iter(setting))}' parameter"):
        MLPClassifier(**setting).fit(X, y)


def test_combinations_parnn_refuses_are_value_errors(blobs):
    X, y = blobs
    with pytest.raises(ValueError, match="momentum"):   # momentum with Adam: parnn refuses
        MLPClassifier(momentum=0.5, **FAST).fit(X, y)
    with pytest.raises(ValueError, match="validation"):
        MLPClassifier(early_stopping=True, validation_fraction=0.0, **FAST).fit(X, y)


# --- data ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def blobs():
    X, y = make_blobs(300, n_features=5, centers=3, random_state=0)
    return StandardScaler().fit_transform(X), y


def fitted(X, y, **settings):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return MLPClassifier(**{**FAST, "random_state": 0, **settings}).fit(X, y)


# --- scikit-learn's tools ------------------------------------------------------------------------

def test_pipeline(blobs):
    X, y = blobs
    pipe = make_pipeline(StandardScaler(), MLPClassifier(**FAST, random_state=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        pipe.fit(X * 100 + 7, y)
    assert pipe.score(X * 100 + 7, y) > 0.9
    assert pipe.predict_proba(X[:5] * 100 + 7).shape == (5, 3)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_grid_search_and_cross_val_score(blobs):
    X, y = blobs
    grid = GridSearchCV(MLPClassifier(**FAST, random_state=0),
                        {"hidden_layer_sizes": [(4,), (16,)], "solver": ["sgd", "adam"]}, cv=3)
    grid.fit(X, y)
    assert set(grid.best_params_) == {"hidden_layer_sizes", "solver"}
    assert len(grid.cv_results_["mean_test_score"]) == 4
    assert grid.best_score_ > 0.9 and grid.best_estimator_.n_features_in_ == 5
    scores = cross_val_score(MLPClassifier(**FAST, random_state=0), X, y, cv=3)
    assert scores.shape == (3,) and scores.min() > 0.85


def test_clone_is_unfitted_with_the_same_parameters_and_trains_the_same(blobs):
    X, y = blobs
    clf = fitted(X, y)
    twin = clone(clf)
    assert twin.get_params() == clf.get_params()
    assert not hasattr(twin, "classes_") and not hasattr(twin, "coefs_")
    twin.set_params(max_iter=FAST["max_iter"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        twin.fit(X, y)
    for a, b in zip(clf.coefs_ + clf.intercepts_, twin.coefs_ + twin.intercepts_):
        assert np.array_equal(a, b)    # random_state=0: the same weights


# --- the same training as parnn.train ------------------------------------------------------------

def without_timing(history):
    return [{k: v for k, v in row.items() if k not in ("seconds", "samples_per_s")}
            for row in history]


@pytest.mark.parametrize("settings", [dict(), dict(early_stopping=True, n_iter_no_change=1)])
def test_a_preset_trains_what_parnn_train_trains(blobs, settings):
    """preset="modern" and random_state=1: parnn.train(config="modern", seed=1), bit for bit:
    the init, the shuffles, the held-out tenth, the cosine schedule (and early stopping's pick)."""
    X, y = blobs
    X = X.astype(np.float32)
    clf = MLPClassifier(preset="modern", hidden_layer_sizes=(8,), max_iter=4, random_state=1,
                        engine="numpy", n_threads=1, **settings).fit(X, y)
    model, history = parnn.train(X, y, config="modern", inputs="features", hidden=(8,),
                                 epochs=4, seed=1,
                                 engine="numpy", threads=1,
                                 early_stopping=settings.get("n_iter_no_change"))
    assert np.array_equal(clf.model_.nets[0].params, model.nets[0].params)
    assert without_timing(clf.history_) == without_timing(history)
    assert clf.validation_scores_ == [row["val_acc"] for row in history]
    assert clf.loss_curve_ == [row["loss"] for row in history]
    assert clf.config_.validation_split == 0.1 and clf.config_.lr_schedule == "cosine"
    np.testing.assert_array_equal(clf.predict_proba(X), model.predict_proba(X))


@pytest.mark.slow
@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="Fashion-MNIST not installed")
def test_a_preset_trains_what_parnn_train_trains_on_fashion_mnist():
    from parnn.data import load_dataset

    ds = load_dataset("fashion-mnist", limit_train=5000, limit_test=1000)
    clf = MLPClassifier(preset="modern", max_iter=2, random_state=1, n_threads=1)
    clf.fit(ds.X_train, ds.y_train)
    model, history = parnn.train(ds.X_train, ds.y_train, config="modern", epochs=2, seed=1,
                                 threads=1)
    assert np.array_equal(clf.model_.nets[0].params, model.nets[0].params)
    assert without_timing(clf.history_) == without_timing(history)
    assert clf.coefs_[0].dtype == np.float32 and clf.coefs_[0].shape == (784, 256)
    assert clf.score(ds.X_test, ds.y_test) == model.score(ds.X_test, ds.y_test) > 0.75


# --- what the estimator holds --------------------------------------------------------------------

def test_coefs_and_intercepts_are_views_of_the_flat_buffer(blobs):
    X, y = blobs
    clf = fitted(X, y, hidden_layer_sizes=(16, 8))
    params = clf.model_.nets[0].params
    assert [c.shape for c in clf.coefs_] == [(5, 16), (16, 8), (8, 3)]   # (n_in, n_out)
    assert [b.shape for b in clf.intercepts_] == [(16,), (8,), (3,)]
    assert all(np.shares_memory(a, params) for a in clf.coefs_ + clf.intercepts_)
    # writing into one changes the model: the last layer made to vote for the second class
    clf.coefs_[-1][...] = 0
    clf.intercepts_[-1][...] = [0, 5, 0]
    assert (clf.predict(X) == clf.classes_[1]).all()
    # and assigning lists copies into the buffer, as scikit-learn's attributes take them
    clf.intercepts_ = [b * 0 for b in clf.intercepts_]
    assert not params[-3:].any()
    with pytest.raises(ValueError, match="shapes"):
        clf.coefs_ = [np.zeros((2, 2))] * 3


def test_pickle_keeps_the_views(blobs):
    X, y = blobs
    clf = pickle.loads(pickle.dumps(fitted(X, y)))
    assert np.array_equal(clf.predict(X), fitted(X, y).predict(X))
    clf.coefs_[-1][...] = 0
    clf.intercepts_[-1][...] = [0, 0, 9]
    assert (clf.predict(X) == 2).all()


@pytest.mark.parametrize("X_dtype, dtype, expected", [
    ("float32", None, "float32"), ("float64", None, "float64"), ("int64", None, "float64"),
    ("float64", "float32", "float32"), ("float32", "float64", "float64"),
])
def test_the_networks_dtype(blobs, X_dtype, dtype, expected):
    """scikit-learn's rule: float32 data trains in float32, other data in float64; dtype= decides
    otherwise (and a preset has its own: the modern one float32)."""
    X, y = blobs
    X = (X * 10).astype(X_dtype)
    clf = fitted(X, y, dtype=dtype, max_iter=2)
    assert clf.coefs_[0].dtype == expected and clf.predict_proba(X).dtype == expected
    assert fitted(X, y, preset="modern", max_iter=1).coefs_[0].dtype == np.float32


def test_random_state(blobs):
    X, y = blobs
    a, b, c = fitted(X, y, max_iter=3), fitted(X, y, max_iter=3), fitted(X, y, max_iter=3,
                                                                            random_state=1)
    assert np.array_equal(a.coefs_[0], b.coefs_[0])
    assert not np.array_equal(a.coefs_[0], c.coefs_[0])
    rng = np.random.RandomState(0)
    d, e = fitted(X, y, max_iter=3, random_state=rng), fitted(X, y, max_iter=3, random_state=rng)
    assert not np.array_equal(d.coefs_[0], e.coefs_[0])   # a RandomState moves on


def test_string_labels_and_predict_proba_columns(blobs):
    X, y = blobs
    names = np.array(["zebra", "ant", "moth"])[y]            # sorted: ant, moth, zebra
    clf = fitted(X, names)
    assert clf.classes_.tolist() == ["ant", "moth", "zebra"]
    proba = clf.predict_proba(X)
    np.testing.assert_allclose(proba.sum(axis=1), 1)
    for j, label in enumerate(clf.classes_):                 # column j is classes_[j]
        assert proba[names == label, j].mean() > 0.8
    assert np.array_equal(clf.predict(X), clf.classes_[proba.argmax(axis=1)])
    assert clf.score(X, names) > 0.95
    np.testing.assert_allclose(clf.predict_log_proba(X), np.log(proba))


def test_a_model_file_from_the_estimator(blobs, tmp_path):
    X, y = blobs
    clf = fitted(X, np.array(["a", "b", "c"])[y])
    clf.model_.save(tmp_path / "m.safetensors")
    model = parnn.load(tmp_path / "m.safetensors")
    assert model.classes.tolist() == ["a", "b", "c"] and model.inputs == "features"
    np.testing.assert_array_equal(model.predict(X), clf.predict(X))


# --- carrying on: warm_start and partial_fit -----------------------------------------------------

@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_warm_start_carries_on_from_the_weights(blobs):
    X, y = blobs
    clf = MLPClassifier(**{**FAST, "max_iter": 3}, warm_start=True, random_state=0)
    clf.fit(X, y)
    first = list(clf.loss_curve_)
    clf.fit(X, y)
    assert clf.n_iter_ == 3 and clf.loss_curve_[:3] == first and len(clf.loss_curve_) == 6
    assert clf.loss_curve_[3] < first[0]     # not a new network
    assert clf.t_ == 6 * len(X)
    with pytest.raises(ValueError, match="warm_start"):
        clf.fit(X[y < 2], y[y < 2])
    clf.set_params(warm_start=False).fit(X, y)
    assert clf.loss_curve_ == first          # a new network again


def test_partial_fit_is_fit_one_epoch_at_a_time(blobs):
    """k calls of partial_fit: one epoch each, the optimizer's state and the order's random
    stream carried on, so the weights are those of fit(max_iter=k), bit for bit."""
    X, y = blobs
    one = MLPClassifier(**{**FAST, "random_state": 3})
    for _ in range(3):
        one.partial_fit(X, y, classes=[0, 1, 2])
        assert one.n_iter_ == 1
    whole = MLPClassifier(**{**FAST, "max_iter": 3, "random_state": 3, "tol": 0.0})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        whole.fit(X, y)
    assert np.array_equal(one.model_.nets[0].params, whole.model_.nets[0].params)
    assert one.loss_curve_ == whole.loss_curve_ and one.t_ == whole.t_ == 3 * len(X)


def test_partial_fit_refusals(blobs):
    X, y = blobs
    with pytest.raises(ValueError, match="classes must be passed"):
        MLPClassifier(**FAST).partial_fit(X, y)
    clf = MLPClassifier(**FAST).partial_fit(X[y < 2], y[y < 2], classes=[0, 1, 2])
    assert clf.classes_.tolist() == [0, 1, 2]     # a batch need not hold every class
    with pytest.raises(ValueError, match="not one of the classes"):
        clf.partial_fit(X, y + 1)
    with pytest.raises(ValueError, match="classes="):
        clf.partial_fit(X, y, classes=[0, 1])
    with pytest.raises(ValueError, match="early_stopping"):
        MLPClassifier(**FAST, early_stopping=True).partial_fit(X, y, classes=[0, 1, 2])


# --- stopping ------------------------------------------------------------------------------------

def test_tol_stops_when_the_training_loss_stops_falling(blobs):
    X, y = blobs
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        clf = MLPClassifier(**FAST, tol=10.0, n_iter_no_change=2).fit(X, y)
    # epoch 1 sets the best loss; 2, 3 and 4 do not beat it by 10: more than 2 in a row, stop
    # (scikit-learn's MLPClassifier stops there too)
    assert clf.n_iter_ == 4
    with pytest.warns(ConvergenceWarning, match="Maximum iterations"):
        MLPClassifier(**{**FAST, "max_iter": 2}).fit(X, y)
    # a preset trains all its epochs, as parnn.train does: no test, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        assert MLPClassifier(preset="modern", max_iter=4, n_threads=1).fit(X, y).n_iter_ == 4


def test_early_stopping_keeps_the_best_epoch(blobs):
    X, y = blobs
    clf = fitted(X, y, early_stopping=True, n_iter_no_change=2, max_iter=30,
                 learning_rate_init=0.2)
    val_loss = [row["val_loss"] for row in clf.history_]
    best = int(np.argmin(val_loss))
    assert len(clf.validation_scores_) == clf.n_iter_ == len(val_loss)
    assert clf.best_validation_score_ == clf.validation_scores_[best]
    assert clf.n_iter_ == best + 1 + 2 or clf.n_iter_ == 30   # stopped after 2 without a lower
    assert clf.best_loss_ is None
    assert clf.score(X, y) > 0.9


# --- the regressor -------------------------------------------------------------------------------

def test_the_regressor_fits_and_carries_on():
    X, y = make_regression(200, n_features=4, noise=1.0, random_state=0)
    X, y = StandardScaler().fit_transform(X), (y - y.mean()) / y.std()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        reg = MLPRegressor(**FAST, random_state=0).fit(X, y)
        two = MLPRegressor(**FAST, random_state=0).fit(X, np.c_[y, -y])
    assert reg.out_activation_ == "identity" and reg.config_.loss == "mse"
    assert reg.predict(X).shape == (200,) and reg.score(X, y) > 0.95
    assert two.predict(X).shape == (200, 2) and two.n_outputs_ == 2
    reg.partial_fit(X, y)
    assert reg.n_iter_ == 1 and len(reg.loss_curve_) == reg.t_ // 200


# --- the package ---------------------------------------------------------------------------------

def test_lazy_exports_and_the_rings_without_scikit_learn():
    import parnn.estimators

    assert parnn.MLPClassifier is parnn.estimators.MLPClassifier
    assert parnn.MLPRegressor is parnn.estimators.MLPRegressor
    code = ("import sys, parnn, parnn.run.api, parnn.cli; parnn.train; "
            "assert not any(m == 'sklearn' or m.startswith('sklearn.') for m in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
