"""parnn's networks as scikit-learn estimators: MLPClassifier and MLPRegressor.

    from parnn import MLPClassifier
    clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=50).fit(X, y)   # scikit-learn's defaults
    clf.predict(X), clf.predict_proba(X), clf.score(X, y), clf.coefs_, clf.loss_curve_
    clf = MLPClassifier(preset="modern")    # parnn's preset for every parameter left at None

A shell: it needs the `sklearn` extra, and nothing below it imports scikit-learn. The parameters
are scikit-learn's MLPClassifier's where the concept is the same, plus parnn's engine, n_threads,
dtype and preset. `_parameter_constraints` is parnn's table of what each setting allows
(parnn.run.config.CONSTRAINTS) in scikit-learn's terms, and the TrainConfig the parameters become
is checked by that table again.

Training drives parnn's engines one epoch at a time with the run loop's own pieces (run_epoch,
score, watch_best, validation_rows, lr_at). It is its own short loop rather than parnn.train,
because an estimator needs what a run from scratch has no way in for: warm starts, partial_fit's
single epoch on new rows, real-valued targets (the regressor) and scikit-learn's training-loss
convergence test (tol). From scratch it gives parnn.train's weights bit for bit
(tests/test_estimators.py).
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import replace

import numpy as np

try:
    from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin, _fit_context
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import r2_score
    from sklearn.utils import check_random_state
    from sklearn.utils._param_validation import Interval, StrOptions
    from sklearn.utils.multiclass import check_classification_targets, unique_labels
    from sklearn.utils.validation import check_is_fitted, column_or_1d, validate_data
except ImportError as e:   # pragma: no cover - the tests skip without scikit-learn
    raise ImportError(f"parnn's estimators need scikit-learn >= 1.6 ({e}): "
                      "pip install 'parnn[sklearn]'") from e

from parnn.core.model import MLP
from parnn.core.optim import make_optimizer
from parnn.data import one_hot
from parnn.run.api import Model
from parnn.run.arrays import encode_labels, validation_rows
from parnn.run.config import (CONSTRAINTS, OneOf, Sizes, batch_size_for, lr_at, make_config,
                              override, pick_engine)
from parnn.run.train import Position, Subset, epoch_line, run_epoch, score, set_threads, watch_best

# preset=None: scikit-learn's MLPClassifier defaults, on top of the modern preset (whose
# activation, optimizer, learning rate and momentum they share). Glorot's uniform init is
# parnn's "xavier"; the batch size "auto" is min(200, n), see _batch_size.
SCIKIT_LEARN = dict(hidden=(100,), init="xavier", lr_schedule="constant", epochs=200,
                    validation_split=0.0)
SCIKIT_LEARN_TOL = 1e-4
# scikit-learn's name for the logistic function; parnn's is "sigmoid"
ACTIVATION_NAMES = {"logistic": "sigmoid"}


def _allowed(name, *more, options=()):
    """CONSTRAINTS[name], parnn's table of what a setting allows, as scikit-learn's constraints,
    plus `options` (names) and `more` (other constraints, e.g. None)."""
    c = CONSTRAINTS[name]
    if isinstance(c, OneOf):
        return [StrOptions(set(c.names) | set(options)), *more]
    if isinstance(c, Sizes):
        return ["array-like", Interval(numbers.Integral, 1, None, closed="left"), *more]
    kind = numbers.Integral if c.kind is int else numbers.Real
    rule = [Interval(kind, c.low, None if c.high == math.inf else c.high, closed=c.closed)]
    names = {a for a in c.also if isinstance(a, str)} | set(options)
    return rule + ([StrOptions(names)] if names else []) + list(more)


class _MLP(BaseEstimator):
    """What the classifier and the regressor share: parameters, the loop, the weights."""

    # Every parameter left at None takes its preset's value (preset=None: scikit-learn's).
    _parameter_constraints: dict = {
        "hidden_layer_sizes": _allowed("hidden", None),
        "activation": _allowed("activation", None, options=ACTIVATION_NAMES),
        "solver": _allowed("optimizer", None),
        "batch_size": _allowed("batch_size", options={"auto"}),
        "learning_rate": _allowed("lr_schedule", None),
        "learning_rate_init": _allowed("lr", None),
        "momentum": _allowed("momentum", None),
        "max_iter": _allowed("epochs", None),
        "tol": [Interval(numbers.Real, 0, None, closed="left"), None],
        "n_iter_no_change": _allowed("early_stopping"),
        "shuffle": ["boolean"],
        "random_state": ["random_state"],
        "warm_start": ["boolean"],
        "early_stopping": ["boolean"],
        "validation_fraction": _allowed("validation_split", None),
        "verbose": ["verbose"],
        "engine": _allowed("engine"),
        "n_threads": _allowed("threads", None),
        "dtype": _allowed("dtype", None),
        "preset": _allowed("preset", None),
    }
    _head = {}   # the output layer and loss the estimator fixes (the regressor's)

    def __init__(self, hidden_layer_sizes=None, activation=None, *, solver=None,
                 batch_size="auto", learning_rate=None, learning_rate_init=None, momentum=None,
                 max_iter=None, tol=None, n_iter_no_change=10, shuffle=True, random_state=None,
                 warm_start=False, early_stopping=False, validation_fraction=None,
                 verbose=False, engine="auto", n_threads=None, dtype=None, preset=None):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.learning_rate_init = learning_rate_init
        self.momentum = momentum
        self.max_iter = max_iter
        self.tol = tol
        self.n_iter_no_change = n_iter_no_change
        self.shuffle = shuffle
        self.random_state = random_state
        self.warm_start = warm_start
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.verbose = verbose
        self.engine = engine
        self.n_threads = n_threads
        self.dtype = dtype
        self.preset = preset

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.non_deterministic = self.engine == "hogwild"   # lock-free: races decide the bits
        return tags

    # --- the settings ----------------------------------------------------------------------

    def _config(self, X, seed, continuing):
        """The TrainConfig these parameters make (checked by parnn's CONSTRAINTS), before the
        batch size, which needs the training set's size (_batch_size)."""
        base = make_config(self.preset) if self.preset else make_config("modern", **SCIKIT_LEARN)
        hidden = self.hidden_layer_sizes
        if hidden is not None:
            hidden = tuple(int(h) if isinstance(h, numbers.Integral) else h
                           for h in (hidden if np.iterable(hidden) else [hidden]))
        if self.dtype or self.preset:
            dtype = self.dtype
        elif continuing:   # the network keeps its dtype
            dtype = self._spec.dtype
        else:              # scikit-learn's rule: float32 data trains in float32, the rest float64
            dtype = "float32" if X.dtype == np.float32 else "float64"
        fraction = self.validation_fraction
        if fraction is None and not self.preset:
            fraction = 0.1 if self.early_stopping else 0.0
        cfg = override(base, hidden=hidden,
                       activation=ACTIVATION_NAMES.get(self.activation, self.activation),
                       optimizer=self.solver, lr=self.learning_rate_init,
                       lr_schedule=self.learning_rate, momentum=self.momentum,
                       epochs=self.max_iter, validation_split=fraction, seed=seed,
                       engine=self.engine, threads=self.n_threads, dtype=dtype, **self._head)
        return replace(cfg, early_stopping=self.n_iter_no_change if self.early_stopping else None)

    def _batch_size(self, cfg, n_train):
        if self.batch_size == "full":
            return "full"
        if self.batch_size == "auto":
            want = cfg.batch_size if self.preset else 200
            return want if want == "full" else min(want, n_train)
        if self.batch_size > n_train:
            warnings.warn(f"batch_size {self.batch_size} is larger than the {n_train} training "
                          f"samples: clipped to {n_train}", stacklevel=3)
        return min(self.batch_size, n_train)

    def _tol(self):
        """The training-loss convergence test's tolerance; None: off (a preset trains all of
        its epochs, as parnn.train does; early stopping has its own test)."""
        if self.early_stopping:
            return None
        return self.tol if self.tol is not None or self.preset else SCIKIT_LEARN_TOL

    def _seed(self):
        """parnn's seed from random_state: an int is the seed itself (so random_state=1 is
        parnn.train's seed=1); None or a RandomState draw one."""
        if isinstance(self.random_state, numbers.Integral):
            return int(self.random_state)
        return int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))

    # --- training --------------------------------------------------------------------------

    def _fit(self, X, y, incremental, classes=None):
        reset = not hasattr(self, "_params") or not (incremental or self.warm_start)
        X, labels, n_out = self._data(X, y, reset, incremental, classes)
        cfg = self._config(X, self._seed(), continuing=not reset)
        n = len(X)
        rows = held = None
        if cfg.validation_split and not incremental:
            rows, held = validation_rows(labels if self._stratify else np.zeros(n, np.int64),
                                         cfg.validation_split, cfg.seed, self._stratify)
        elif self.early_stopping and incremental:
            raise ValueError("partial_fit does not support early_stopping=True")
        if cfg.early_stopping and held is None:
            raise ValueError("early_stopping watches a validation set: set "
                             "validation_fraction > 0")
        n_train = n if rows is None else len(rows)
        cfg = replace(cfg, batch_size=self._batch_size(cfg, n_train))
        spec = cfg.spec(X.shape[1], n_out)
        if reset:
            net = MLP(spec, init=cfg.init, seed=cfg.seed)
        elif spec != self._spec:
            raise ValueError(f"{'partial_fit' if incremental else 'warm_start'} continues a "
                             f"network {self._spec}, but the parameters and data now make "
                             f"{spec}")
        else:   # trained in place: coefs_ and intercepts_ stay views of the same buffer
            net = MLP(spec, self._params if self._params.flags.writeable
                      else self._params.copy())
        keep = incremental and not reset and self._opt.name == cfg.optimizer
        opt = self._opt if keep else make_optimizer(cfg.optimizer, spec.n_params, spec.dtype,
                                                    cfg.lr, cfg.momentum, cfg.weight_decay)
        # partial_fit carries the order's stream on; fit starts it where parnn.train does
        order_rng = self._order_rng if incremental and not reset \
            else np.random.default_rng(cfg.seed + 1)
        X = np.ascontiguousarray(X, spec.dtype)
        T = self._targets(labels, n_out, spec.dtype)
        history, pos = self._epochs(cfg, net, opt, X, T, labels, rows, held, order_rng,
                                    incremental)

        self._params, self._spec, self._opt, self._order_rng = net.params, spec, opt, order_rng
        self.config_, self.history_ = cfg, history
        if reset:
            self.loss_curve_, self.t_ = [], 0
        self.loss_curve_ += [row["loss"] for row in history]
        self.loss_ = history[-1]["loss"]
        self.n_iter_ = len(history)
        self.t_ += n_train * len(history)
        self.n_layers_ = len(spec.sizes)
        self.n_outputs_ = n_out
        self.out_activation_ = spec.output
        if held is not None:
            self.validation_scores_ = [row[self._score_key] for row in history]
        elif reset or not hasattr(self, "validation_scores_"):
            self.validation_scores_ = None
        self.best_validation_score_ = (history[pos.best_epoch - 1][self._score_key]
                                       if pos.best_epoch else None)
        self.best_loss_ = None if cfg.early_stopping else min(self.loss_curve_)
        return self

    def _epochs(self, cfg, net, opt, X, T, labels, rows, held, order_rng, incremental):
        """The loop: cfg.epochs epochs (partial_fit: one) over the rows (all but the held-out
        ones), each scored on the held-out rows; returns (history, Position)."""
        n_train = len(X) if rows is None else len(rows)
        bs = batch_size_for(cfg, n_train)
        engine = pick_engine(cfg, net.spec, n_train)
        limits, _ = set_threads(cfg.threads, engine)
        epochs = 1 if incremental else cfg.epochs
        tol = None if incremental else self._tol()
        pos, best_loss, no_gain = Position(), math.inf, 0
        with limits, np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            for epoch in range(1, epochs + 1):
                order = order_rng.permutation(n_train) if self.shuffle else np.arange(n_train)
                if rows is not None:
                    order = rows[order]
                opt.lr = lr_at(cfg, epoch)
                stats, seconds = run_epoch(engine, net, opt, X, T, order, bs, epoch, cfg,
                                           False, None)
                row = dict(epoch=epoch, loss=stats.loss, **self._train_score(stats))
                if held is not None:
                    row.update(self._validation(net, X, T, labels, held))
                row.update(seconds=seconds, samples_per_s=stats.n / seconds if seconds else 0.0)
                pos.history.append(row)
                if self.verbose:
                    print(epoch_line(row, epochs))
                if cfg.early_stopping:
                    watch_best(cfg, pos, net, row)
                    if pos.stopped:
                        break
                elif tol is not None:
                    # scikit-learn's test: stop once the training loss has not fallen by more
                    # than tol in more than n_iter_no_change epochs in a row
                    no_gain = no_gain + 1 if row["loss"] > best_loss - tol else 0
                    best_loss = min(best_loss, row["loss"])
                    if no_gain > self.n_iter_no_change:
                        break
            else:
                if tol is not None:
                    warnings.warn(f"Stochastic Optimizer: Maximum iterations ({epochs}) reached "
                                  "and the optimization hasn't converged yet.",
                                  ConvergenceWarning, stacklevel=3)
            if pos.best_params is not None:   # early stopping: the best epoch's weights
                net.params[...] = pos.best_params
        return pos.history, pos

    # --- the weights ---------------------------------------------------------------------

    def _net(self):
        """The network over the estimator's flat parameter buffer (no copy)."""
        return MLP(self._spec, self._params)

    def _fitted_or_raise(self):
        if not hasattr(self, "_params"):   # AttributeError: hasattr() says "not fitted"
            raise AttributeError(f"This {type(self).__name__} instance is not fitted yet")

    @property
    def coefs_(self):
        """Each layer's weights, (n_in, n_out) as scikit-learn's: views (W.T) into the flat
        parameter buffer, so writing into one changes the model."""
        self._fitted_or_raise()
        return [W.T for W in self._net().W]

    @coefs_.setter
    def coefs_(self, values):
        _assign(self.coefs_, values, "coefs_")

    @property
    def intercepts_(self):
        """Each layer's biases: views into the flat parameter buffer."""
        self._fitted_or_raise()
        return self._net().b

    @intercepts_.setter
    def intercepts_(self, values):
        _assign(self.intercepts_, values, "intercepts_")

    def _check_X(self, X):
        check_is_fitted(self)
        return validate_data(self, X, reset=False, dtype=(np.float64, np.float32))


def _assign(views, values, what):
    values = list(values)
    if len(values) != len(views) or any(np.shape(v) != w.shape for v, w in zip(values, views)):
        raise ValueError(f"{what} must be {len(views)} arrays of shapes "
                         f"{[w.shape for w in views]}")
    for w, v in zip(views, values):
        w[...] = v


class MLPClassifier(ClassifierMixin, _MLP):
    """A parnn network as a scikit-learn classifier: softmax + cross-entropy (with a preset,
    its output and loss), trained by parnn's engines. docs/API.md, "Estimators".

    Parameters left at None take the preset's value; with preset=None, scikit-learn's
    MLPClassifier default. [Defaults] in brackets.

    hidden_layer_sizes   int or tuple of ints >= 1 [(100,)]
    activation           "relu", "tanh", "logistic" (or "sigmoid") ["relu"]
    solver               parnn's optimizer: "sgd" (plain), "momentum" (heavy ball), "adam" ["adam"]
    batch_size           int (at most n), "full", or "auto": min(200, n), with a preset its
                         batch size (at most n)
    learning_rate        the schedule: "constant", or "cosine" over max_iter ["constant"]
    learning_rate_init   > 0 [0.001]
    momentum             in [0, 1), with solver="momentum" only [0.9]
    max_iter             epochs [200]
    tol                  early_stopping=False: stop once the training loss has not fallen by
                         more than tol in more than n_iter_no_change epochs in a row [1e-4];
                         with a preset off unless given (every epoch runs, as parnn.train's)
    n_iter_no_change     that test's patience, and early stopping's [10]
    shuffle              a new sample order each epoch [True]
    random_state         None, a RandomState, or an int: parnn's seed (random_state=1 trains
                         the network parnn.train(seed=1) does)
    warm_start           fit carries on from the current weights, with a new optimizer [False]
    early_stopping       keep the weights of the epoch with the lowest validation loss; stop
                         after n_iter_no_change epochs without a lower one [False]
    validation_fraction  in [0, 1): held out (stratified) and scored after each epoch
                         [0.1 with early_stopping, else 0; the modern preset 0.1]
    verbose              a line per epoch [False]
    engine               parnn's engine: "auto", "numpy", "batch", "serial", ... ["auto"]
    n_threads            threads for the engine and BLAS [all cores]
    dtype                "float32" or "float64" [X's: float32 stays float32, the rest float64]
    preset               None or a preset's name: "accurate", "modern", "paper" (parnn.PRESETS)

    Attributes as scikit-learn's: classes_, n_features_in_, coefs_ and intercepts_ (views of
    the flat parameter buffer), loss_curve_, loss_, best_loss_, validation_scores_ (the
    validation accuracy of each epoch, None without a validation set), best_validation_score_
    (early stopping: that of the epoch kept), n_iter_, t_, n_layers_, n_outputs_,
    out_activation_. parnn's: config_ (the TrainConfig trained with), history_ (the rows
    parnn.train returns), model_ (a parnn.Model over the same weights).
    """

    _stratify = True
    _score_key = "val_acc"

    def _data(self, X, y, reset, incremental, classes):
        X, y = validate_data(self, X, y, reset=reset, dtype=(np.float64, np.float32))
        check_classification_targets(y)
        if incremental and classes is not None:
            classes = unique_labels(classes)
            if hasattr(self, "classes_") and not np.array_equal(classes, self.classes_):
                raise ValueError(f"classes={classes.tolist()} is not the classes_ of the first "
                                 f"call to partial_fit, {self.classes_.tolist()}")
        if reset and incremental:
            if classes is None:
                raise ValueError("classes must be passed on the first call to partial_fit "
                                 "(np.unique of every label the model will see)")
            self.classes_ = classes
        elif reset:
            self.classes_ = unique_labels(y)
        elif self.warm_start and not incremental and set(unique_labels(y)) != set(self.classes_):
            raise ValueError(f"warm_start needs the classes of the first fit, "
                             f"{self.classes_.tolist()}; y has {unique_labels(y).tolist()}")
        if len(self.classes_) < 2:
            raise ValueError(f"y has 1 class ({self.classes_.tolist()[0]!r}): a classifier "
                             "needs at least 2")
        labels, _ = encode_labels(y, self.classes_)
        return X, labels, len(self.classes_)

    @staticmethod
    def _targets(labels, n_out, dtype):
        return one_hot(labels, n_out, dtype)

    @staticmethod
    def _train_score(stats):
        return {"train_acc": stats.accuracy}

    @staticmethod
    def _validation(net, X, T, labels, held):
        val_loss, val_acc = score(net, Subset(X, labels, held))
        return {"val_loss": val_loss, "val_acc": val_acc}

    @property
    def model_(self):
        """The network as a parnn Model over the same weights (inputs="features"): its save()
        writes a parnn model file, which parnn.load reads back."""
        self._fitted_or_raise()
        meta = {"config": self.config_.to_dict(), "history": self.history_}
        return Model([self._net()], self.classes_, None, meta, inputs="features")

    def predict_proba(self, X):
        """(n, n_classes) probabilities, columns in classes_ order, rows summing to 1
        (parnn.Model.predict_proba: a softmax output as it is; the paper's tanh/MSE outputs
        mapped onto [0, 1] and normalized, which keeps their order but is not calibrated)."""
        X = self._check_X(X)
        return self.model_.predict_proba(X)

    def predict_log_proba(self, X):
        proba = self.predict_proba(X)
        with np.errstate(divide="ignore"):
            return np.log(proba, out=proba)

    def predict(self, X):
        """The class (a label of classes_) of each sample: the argmax of predict_proba."""
        proba = self.predict_proba(X)
        return self.classes_[proba.argmax(axis=1)]

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y):
        """Train on (X, y): from a new network, or from the current one with warm_start."""
        return self._fit(X, y, incremental=False)

    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y, classes=None):
        """One epoch over (X, y), carrying on from the current network and optimizer state.
        classes: every label the model will see; needed on the first call."""
        return self._fit(X, y, incremental=True, classes=classes)


class MLPRegressor(RegressorMixin, _MLP):
    """A parnn network as a scikit-learn regressor: an identity output and the MSE loss (the
    paper's, 1/2 (p - t)^2 per output; y of shape (n,) or (n, n_outputs)). Parameters and
    attributes: MLPClassifier's, without classes_ and model_; validation_scores_ are R^2,
    and the held-out rows are drawn at random (nothing to stratify)."""

    _stratify = False
    _score_key = "val_r2"
    _head = {"output": "identity", "loss": "mse"}

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags

    def _data(self, X, y, reset, incremental, classes):
        X, y = validate_data(self, X, y, reset=reset, multi_output=True, y_numeric=True,
                             dtype=(np.float64, np.float32))
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        return X, y.reshape(len(y), -1), 1 if y.ndim == 1 else y.shape[1]

    @staticmethod
    def _targets(y, n_out, dtype):
        return np.ascontiguousarray(y, dtype)

    @staticmethod
    def _train_score(stats):
        return {}

    @staticmethod
    def _validation(net, X, T, y, held):
        pred = net.output(X[held])
        return {"val_loss": net.loss.value(pred, T[held]) / len(held),
                "val_r2": float(r2_score(T[held], pred))}

    def predict(self, X):
        """(n,) predictions, or (n, n_outputs) for several targets, in the network's dtype."""
        X = self._check_X(X)
        out = self._net().output(np.ascontiguousarray(X, self._spec.dtype))
        return out.ravel() if self.n_outputs_ == 1 else out

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y):
        """Train on (X, y): from a new network, or from the current one with warm_start."""
        return self._fit(X, y, incremental=False)

    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y):
        """One epoch over (X, y), carrying on from the current network and optimizer state."""
        return self._fit(X, y, incremental=True)
