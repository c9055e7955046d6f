"""parnn from Python: train on arrays, load a model file, predict.

    model, history = parnn.train(X, y)                 # a preset's settings, overridable
    model, history = parnn.train(X, y, config="paper", epochs=3, X_val=Xv, y_val=yv)
    model.predict(X), model.predict_proba(X), model.score(X, y), model.save("m.safetensors")
    model = parnn.load("runs/accurate/model.safetensors")   # a model or an ensemble file

`parnn train` goes through run_training too (run/session.py): one training path, not two.
Inputs are checked by run/arrays.py; the loop is run/train.py.
"""

from __future__ import annotations

import os

import numpy as np

from parnn.core.model import soft_vote
from parnn.engines import scaled
from parnn.errors import ConfigError, ModelFileError, ParnnError
from parnn.paths import shown
from parnn.run import outputs, train as loop
from parnn.run.arrays import INPUTS, check_inputs, encode_labels, validation_rows
from parnn.run.config import batch_size_for, resolve


def train(X, y, *, X_val=None, y_val=None, config=None, classes=None, class_names=None,
          inputs="pixels", progress=False, log=None, members=1, member_recipes=None,
          **settings):
    """Train a network on (X, y); returns (Model, history).

    X: (n, features) or (n, 28, 28) images; inputs="pixels" (the default) wants values in
    [0, 1] and scales uint8 0..255 by 1/255; inputs="features" takes any finite numbers as
    they are (see parnn.run.arrays.check_inputs).
    y: integer class indices 0..K-1, or any labels (strings, ...): the classes are then their
    sorted unique values, or `classes` when given (its order is predict_proba's columns).
    X_val, y_val: a validation set scored after every epoch (val_loss, val_acc in the
    history); without one, config.validation_split of (X, y) is held out (stratified, drawn
    from the seed; 0.1 in the modern preset, 0 in the paper's).
    config: a TrainConfig, a preset's name ("modern", the default, or "paper") or None;
    settings override any of its fields (epochs=5, hidden=(64,), early_stopping=3, ...).
    class_names: how the classes read (default: str of each class).
    progress: a progress bar per epoch; log: called with each line of the report (None: quiet).

    members: train an ensemble of this many networks, one after another (seeds seed,
    seed + 1, ...; parnn.run.members), on the same rows; the Model soft-votes.
    member_recipes: settings that differ per member, cycled over them (a list of dicts such
    as [{}, {"augment": "shift1"}], or a name in parnn.run.members.MEMBER_RECIPES).

    history: one dict per epoch: epoch, loss, train_acc, val_loss and val_acc (with a
    validation set), seconds, samples_per_s. With early_stopping the model holds the weights
    of the epoch with the lowest val_loss. With members > 1: a list of each member's history.
    """
    from parnn.data import Dataset

    cfg = resolve(config, **settings)
    X = check_inputs(X, None, cfg.dtype, inputs, keep_uint8=True)   # uint8: scaled as read
    y, classes = encode_labels(y, classes)
    _same_length(X, y, "X", "y")
    validation = None
    if (X_val is None) != (y_val is None):
        raise ValueError("pass both X_val and y_val, or neither")
    if X_val is not None:
        X_val = check_inputs(X_val, X.shape[1], cfg.dtype, inputs, "X_val", keep_uint8=True)
        y_val, _ = encode_labels(y_val, classes, "y_val")
        _same_length(X_val, y_val, "X_val", "y_val")
        validation = loop.Subset(X_val, y_val)
    names = _class_names(class_names, classes)
    data = Dataset(X, y, None, None, names, "arrays", None)
    from parnn.run.members import check_members, train_members

    check_members(members)
    if members == 1 and member_recipes is None:
        result = run_training(cfg, data, validation=validation, progress=progress,
                              log=log or _quiet)
        meta = outputs.model_metadata(result, data, classes, inputs)
        return Model([result.net], classes, names, meta, inputs), result.history
    ens = train_members(cfg, data, members, recipes=member_recipes, validation=validation,
                        progress=progress, log=log or _quiet)
    meta = outputs.model_metadata(ens.results[0], data, classes, inputs)
    meta.update(members=members, seeds=[r.config.seed for r in ens.results],
                val_acc=ens.val_acc)
    histories = [r.history for r in ens.results]     # one member (a recipe given): its own
    return Model(ens.nets, classes, names, meta, inputs), \
        histories if members > 1 else histories[0]


def run_training(cfg, data, *, validation=None, test_every_epoch=False, **options):
    """The training path under parnn.train and `parnn train`: hold out cfg.validation_split of
    data's training set (unless a validation Subset is given), then run the loop
    (parnn.run.train.fit, which takes the other options: progress, log, checkpoints, resume,
    engine, on_epoch, on_chunk). The test set, if data has one, is scored at the end only,
    unless test_every_epoch. Returns fit's Result."""
    memory_check(cfg, data)
    rows, validation = holdout(cfg, data, validation)
    return loop.fit(cfg, data, rows=rows, validation=validation,
                    test_every_epoch=test_every_epoch, **options)


def memory_check(cfg, data):
    """Before anything big is allocated (parnn train checked the same before loading the data)."""
    from parnn.run import memory

    memory.check(cfg, cfg.spec(data.X_train.shape[1], len(data.class_names)),
                 len(data.X_train), 0, data_loaded=True)


def holdout(cfg, data, validation=None):
    """(the rows of data's training set to train on (None: all), the validation Subset):
    cfg.validation_split held out, stratified and drawn from cfg.seed, unless a validation
    Subset is given (or the split is 0: no validation)."""
    if validation is not None or not cfg.validation_split:
        return None, validation
    try:
        rows, held = validation_rows(data.y_train, cfg.validation_split, cfg.seed)
    except ValueError as e:
        raise ConfigError(f"validation split {cfg.validation_split}: {e}") from None
    batch_size_for(cfg, len(rows), held_out=len(held))   # says why the set is smaller
    return rows, loop.Subset(data.X_train, data.y_train, held)


def load(path):
    """The model (or ensemble) in a parnn model file, as a Model; ModelFileError if the file
    is damaged or not a parnn model."""
    from parnn import io

    nets, meta = io.load_any(_model_path(path))
    n_out = nets[0].spec.sizes[-1]
    classes = meta.get("classes")
    if classes is None:   # written before classes were saved: class indices
        classes = list(range(n_out))
    elif not (isinstance(classes, list) and len(classes) == n_out
              and all(isinstance(c, (str, int, float)) for c in classes)):
        raise ModelFileError(f"{path}: 'classes' in the metadata is not a list of {n_out} labels")
    names = meta.get("class_names")
    if not (isinstance(names, list) and len(names) == n_out
            and all(isinstance(n, str) for n in names)):
        names = None   # a model saved without (usable) class names
    inputs = meta.get("inputs", "pixels")
    if inputs not in INPUTS:
        raise ModelFileError(f"{path}: unknown inputs {inputs!r} in the metadata")
    return Model(nets, np.asarray(classes), names, meta, inputs)


class Model:
    """A trained network, or an ensemble of networks that soft-votes, ready to predict.

    nets: the networks (parnn.core.model.MLP); classes: the label of each output, in output
    order; class_names: how each reads; meta: the model file's metadata (config, history,
    dataset, ...); inputs: "pixels" (values in [0, 1], uint8 scaled) or "features".
    """

    def __init__(self, nets, classes=None, class_names=None, meta=None, inputs="pixels"):
        self.nets = list(nets)
        if not self.nets or any(n.spec != self.nets[0].spec for n in self.nets):
            raise ValueError("a Model needs one or more networks of one spec")
        n_out = self.spec.sizes[-1]
        self.classes = np.arange(n_out) if classes is None else np.asarray(classes)
        self.class_names = _class_names(class_names, self.classes)
        if len(self.classes) != n_out or len(self.class_names) != n_out:
            raise ValueError(f"the network has {n_out} outputs, but there are "
                             f"{len(self.classes)} classes and {len(self.class_names)} names")
        if inputs not in INPUTS:
            raise ValueError(f"inputs must be one of {', '.join(INPUTS)}, got {inputs!r}")
        self.meta, self.inputs = dict(meta or {}), inputs

    @property
    def spec(self):
        return self.nets[0].spec

    @property
    def n_features_in(self):
        return self.spec.sizes[0]

    @property
    def dtype(self):
        return self.nets[0].dtype

    @property
    def history(self):
        return self.meta.get("history")

    def __repr__(self):
        kind = f"ensemble of {len(self.nets)}" if len(self.nets) > 1 else "network"
        return (f"<parnn.Model: {kind} {self.spec.shape_text()} "
                f"{self.spec.hidden}/{self.spec.output} {self.spec.dtype}>")

    def predict_proba(self, X):
        """(n, classes) class probabilities, columns in `classes` order, each row summing to 1.

        A softmax network's output is returned as it is. The paper's tanh and sigmoid networks
        (MSE against one-hot 0/1 targets) give scores, not probabilities: their outputs are
        mapped onto [0, 1] ((o + 1) / 2 for tanh, as they are for sigmoid) and divided by
        their row's sum (a row of zeros becomes uniform). That keeps their order, so the argmax
        is the network's prediction, but they are not calibrated. An ensemble soft-votes:
        the members' outputs are averaged first (as `parnn evaluate` does), then mapped."""
        X = check_inputs(X, self.n_features_in, self.dtype, self.inputs, keep_uint8=True)
        out = soft_vote(_output(net, X) for net in self.nets)
        return probabilities(out, self.spec.output)

    def predict(self, X):
        """The class of each sample: the argmax of predict_proba, as a label of `classes`."""
        return self.classes[self.predict_proba(X).argmax(axis=1)]

    def score(self, X, y):
        """Accuracy on (X, y), y being labels of `classes`."""
        y = np.asarray(y)
        if y.ndim != 1:
            raise ValueError(f"y must be a 1-d array of labels, got {_described(y)}")
        pred = self.predict(X)
        _same_length(pred, y, "X", "y")
        return float(np.mean(pred == y))

    def save(self, path):
        """Write the model file (safetensors; an ensemble file for several networks)."""
        from parnn import io

        classes = self.classes.tolist()
        if not all(isinstance(c, (str, int, float)) for c in classes):
            raise ValueError("classes must be strings or numbers to be saved, got "
                             f"{self.classes.dtype}")
        meta = {**self.meta, "classes": classes, "class_names": list(self.class_names),
                "inputs": self.inputs}
        path = _model_path(path)
        try:
            if len(self.nets) == 1:
                io.save_model(path, self.nets[0], meta)
            else:
                io.save_ensemble(path, self.nets, meta)
        except OSError as e:     # a directory, a read-only file, no such directory, ...
            raise ParnnError(f"{shown(path)}: cannot write the model file: "
                             f"{e.strerror or e}") from None

    def to_onnx(self, path=None, opset=17):
        """This model as an ONNX graph (parnn.export.to_onnx; the `onnx` extra), written to path
        if given. The one call from run up into a shell, declared in pyproject's contracts."""
        from parnn.export import to_onnx

        return to_onnx(self, path, opset=opset)


def _output(net, X, rows=4096):
    """net.output(X); uint8 pixels are scaled (x / 255) a chunk of rows at a time, never as a
    float copy of all of X (the chunks are net.output's own, so the bits are the same)."""
    if X.dtype != np.uint8:
        return net.output(X)
    return np.concatenate([net.output(scaled(X[i:i + rows], net.dtype))
                           for i in range(0, len(X), rows)])


def probabilities(out, output):
    """The output layer as rows that sum to 1 (see Model.predict_proba); in place."""
    if output == "softmax":
        return out
    if output == "identity":      # unbounded scores: their softmax (the argmax stays the same)
        out -= out.max(axis=1, keepdims=True)
        np.exp(out, out=out)
        out /= out.sum(axis=1, keepdims=True)
        return out
    if output == "tanh":
        out += 1.0   # (o + 1) / 2: the halving cancels in the division by the row's sum
    total = out.sum(axis=1, keepdims=True)
    np.divide(out, total, out=out, where=total > 0)
    out[total[:, 0] <= 0] = 1.0 / out.shape[1]
    return out


def _class_names(names, classes):
    if names is None:
        return tuple(str(c) for c in classes)
    names = tuple(names)
    if not all(isinstance(n, str) for n in names):
        raise ValueError("class_names must be strings")
    if len(names) != len(classes):
        raise ValueError(f"{len(names)} class names for {len(classes)} classes")
    return names


def _model_path(path):
    """path, if it can name a file; ConfigError (one line) for None, a number, "", a NUL."""
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise ConfigError(f"a model file's path must be a str, bytes or a path, got "
                          f"{type(path).__name__}")
    name = os.fsdecode(path)
    if not name:
        raise ConfigError("a model file's path is empty")
    if "\0" in name:
        raise ConfigError(f"a model file's path cannot hold a NUL byte: {shown(name)}")
    return name if isinstance(path, bytes) else path


def _described(a):
    """An array that should not be there, in a few words: "a 0-d array (None)"."""
    return f"a {a.ndim}-d array" + (f" ({a.item()!r:.40})" if a.ndim == 0 else f" of shape {a.shape}")


def _same_length(X, y, x_name, y_name):
    if len(X) != len(y):
        raise ValueError(f"{x_name} has {len(X)} samples but {y_name} has {len(y)} labels")


def _quiet(*args, **kwargs):
    pass
