"""A run's settings: TrainConfig, the presets as TrainConfig instances, ONE table of what each
setting allows, and the engine a run trains with.

Every setting is checked once, where a TrainConfig is made (its __post_init__ walks
CONSTRAINTS, as scikit-learn's `_parameter_constraints`): a TrainConfig that exists is valid,
so nothing downstream checks it again, and `dataclasses.replace` re-checks what it changes.
What needs the data too (a batch larger than the training set, an engine that refuses the run)
is checked by pick_engine, which the training loop calls once per run.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import asdict, dataclass, field, fields, replace
from types import MappingProxyType

import numpy as np

from parnn.core.model import DTYPES, HIDDEN_ACTIVATIONS, INITS, LOSSES, OUTPUT_ACTIVATIONS, Spec
from parnn.core.optim import OPTIMIZERS
from parnn.engines import PER_SAMPLE, available, make_engine
from parnn.errors import ConfigError

PRESET_NAMES = ("paper", "modern", "accurate")
DEFAULT_PRESET = "accurate"
LR_SCHEDULES = ("constant", "cosine", "warmup-cosine")
# On-the-fly augmentation (parnn.engines.augment): whole-pixel shifts of up to 1 or 2 pixels per
# axis, and/or a left-right mirror with probability 1/2; or "affine", a small random rotation,
# zoom and subpixel shift per image (bilinear), of the sizes AFFINE gives.
AUGMENTS = ("none", "shift1", "shift2", "flip", "shift1+flip", "shift2+flip", "affine")
# "affine"'s ranges, chosen on the validation split among a few candidates (docs/ACCURACY.md,
# "Ensembles"): rotations up to `rotate` degrees, zooms of 1 +- `scale`, shifts up to `shift`.
# Runs record only the name, so these values ARE what "affine" means: other ranges need another
# name (a resumed run would otherwise change its transforms part way). Read-only for that reason.
AFFINE = MappingProxyType(dict(shift=0.5, rotate=3.0, scale=0.03, subpixel=True))


# --- what a setting allows ---------------------------------------------------------------------

@dataclass(frozen=True)
class OneOf:
    """One of a few names."""

    what: str
    names: tuple

    def check(self, value):
        if not isinstance(value, str) or value not in self.names:
            raise ConfigError(f"unknown {self.what} {value!r}: choose one of {', '.join(self.names)}")


@dataclass(frozen=True)
class Range:
    """A number of a kind (int: an integer, float: any finite number; never a bool) between
    low and high, bounds included as `closed` says; `also` lists other values allowed."""

    what: str
    kind: type
    low: float
    high: float = math.inf
    closed: str = "left"        # "left" [low, high), "neither" (low, high)
    name_kind: bool = False     # say "an integer"/"a number" even when only the range is wrong
    also: tuple = ()

    def allows(self, value):
        if isinstance(value, str) or value is None:
            return value in self.also
        return self.is_kind(value) and self.within(value)

    def is_kind(self, value):
        number = numbers.Integral if self.kind is int else numbers.Real
        return isinstance(value, number) and not isinstance(value, bool) and math.isfinite(value)

    def within(self, value):
        above = value >= self.low if self.closed == "left" else value > self.low
        return above and value < self.high

    def text(self, value):
        """What is allowed, e.g. 'an integer >= 1', 'in [0, 1)', 'a number > 0'."""
        if self.high == math.inf:
            bounds = f"{'>=' if self.closed == 'left' else '>'} {self.low}"
        else:
            bounds = f"in {'[' if self.closed == 'left' else '('}{self.low}, {self.high})"
        if self.name_kind or self.also or not self.is_kind(value):
            bounds = f"{'an integer' if self.kind is int else 'a number'} {bounds}"
        return " or ".join([bounds, *(_ALSO_TEXT.get(a, repr(a)) for a in self.also)])

    def check(self, value):
        if not self.allows(value):
            raise ConfigError(f"{self.what} must be {self.text(value)}, got {_show(value)}")


@dataclass(frozen=True)
class Sizes:
    """One or more integers >= 1 (the hidden layers' sizes)."""

    what: str

    def check(self, value):
        if not isinstance(value, tuple) or not value:
            raise ConfigError(f"{self.what} must be one or more integers >= 1, got {_show(value)}")
        size = Range(self.what, int, 1)
        for v in value:
            if not size.allows(v):
                raise ConfigError(f"{self.what} must be {size.text(v)}, got {_show(value)}")


@dataclass(frozen=True)
class LayerList:
    """A layer list as parnn.core.conv.parse_layers spells it, or "" (an MLP of --hidden);
    Spec checks the spelling, when TrainConfig makes its spec."""

    what: str

    def check(self, value):
        if not isinstance(value, str):
            raise ConfigError(f"{self.what} must be a string like {CNN_LAYERS}, got {_show(value)}")


# What `--model cnn` trains: two 3x3 conv layers (32 and 64 channels, each followed by 2x2
# max-pooling), a dense layer of 128, then the output layer (Fashion-MNIST's benchmark shape).
CNN_LAYERS = "conv32:3,pool,conv64:3,pool,dense128"


def _show(value):
    return repr(list(value)) if isinstance(value, tuple) else repr(value)


_ALSO_TEXT = {None: "None (off)"}


CONSTRAINTS = {
    "preset":      OneOf("preset", PRESET_NAMES),
    "hidden":      Sizes("hidden layer sizes"),
    "layers":      LayerList("layer list"),
    "activation":  OneOf("hidden activation", HIDDEN_ACTIVATIONS),
    "output":      OneOf("output activation", OUTPUT_ACTIVATIONS),
    "loss":        OneOf("loss", LOSSES),
    "init":        OneOf("init", INITS),
    "dtype":       OneOf("dtype", DTYPES),
    "optimizer":   OneOf("optimizer", OPTIMIZERS),
    "lr":          Range("learning rate", float, 0, closed="neither", name_kind=True),
    "lr_schedule": OneOf("learning-rate schedule", LR_SCHEDULES),
    "warmup_epochs": Range("warm-up epochs", int, 0, name_kind=True),
    "momentum":    Range("momentum", float, 0, 1),
    "weight_decay": Range("weight decay", float, 0, name_kind=True),
    "batch_size":  Range("batch size", int, 1, also=("full",)),   # "full": full-batch GD
    "epochs":      Range("epochs", int, 1),
    "validation_split": Range("validation split", float, 0, 1, name_kind=True),
    "early_stopping":   Range("early-stopping patience", int, 1, name_kind=True, also=(None,)),
    "seed":        Range("seed", int, 0, name_kind=True),
    "augment":     OneOf("augmentation", AUGMENTS),
    "dropout":     Range("dropout rate", float, 0, 1, name_kind=True),
    "label_smoothing": Range("label smoothing", float, 0, 1, name_kind=True),
    "engine":      OneOf("engine", (*available(), "auto")),
    "threads":     Range("threads", int, 1),
}


def usable_cores():
    """The cores this process may run on (its CPU affinity), not all the machine has."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):   # not Linux
        return os.cpu_count() or 1


# --- the settings and the presets ----------------------------------------------------------------

@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run. The field defaults are the modern preset (the default
    preset, `accurate`, is MODERN with a few settings changed); each is checked against
    CONSTRAINTS when the config is made."""

    preset: str = "modern"
    hidden: tuple = (256, 128)
    # A layer list such as CNN_LAYERS ("" = an MLP of `hidden`, which a layer list replaces).
    layers: str = ""
    activation: str = "relu"
    output: str = "softmax"
    loss: str = "cross_entropy"
    init: str = "he"
    dtype: str = "float32"
    optimizer: str = "adam"
    lr: float = 1e-3
    lr_schedule: str = "cosine"
    warmup_epochs: int = 0         # warmup-cosine only: epochs of linear warm-up (see lr_at)
    momentum: float = 0.9          # optimizer momentum only
    weight_decay: float = 0.0      # AdamW's decoupled decay (parnn.core.optim.Adam), adam only
    batch_size: int | str = 128    # int, or "full" for full-batch GD
    epochs: int = 15
    # The fraction of the training set held out, stratified by class and drawn from the seed,
    # to watch each epoch (0: none; parnn.run.api carves it, see validation_rows there).
    validation_split: float = 0.1
    # Patience: stop after this many epochs without a lower validation loss and keep the best
    # epoch's weights (None: off).
    early_stopping: int | None = None
    seed: int = 1
    # On-the-fly augmentation of each training batch, a function of (seed, epoch, sample): see
    # AUGMENTS and augmentation(); the mini-batch engines only.
    augment: str = "none"
    # Inverted dropout after every hidden layer while training, masks drawn from (seed, epoch,
    # layer, sample, unit) (parnn.core.layers.Dropout); the mini-batch engines only.
    dropout: float = 0.0
    # Cross-entropy against targets (1 - eps) one_hot + eps / K (parnn.core.losses.smooth_labels).
    label_smoothing: float = 0.0
    engine: str = "auto"
    threads: int = field(default_factory=usable_cores)

    def __post_init__(self):
        if isinstance(self.hidden, list):   # as JSON and callers may give it
            object.__setattr__(self, "hidden", tuple(self.hidden))
        for name, allowed in CONSTRAINTS.items():
            allowed.check(getattr(self, name))
        self.spec()   # and the pairs Spec refuses (cross-entropy needs a softmax output)
        if self.layers and self.engine in PER_SAMPLE:
            raise ConfigError(f"engine {self.engine} trains dense layers sample by sample; a "
                              "layer list (--layers, --model cnn) trains with --engine batch "
                              "or numpy")
        if self.layers and self.dropout:
            raise ConfigError("--dropout follows each hidden dense layer of an MLP and does not "
                              "apply to a layer list (--layers, --model cnn) yet: drop --dropout")
        if self.warmup_epochs and self.lr_schedule != "warmup-cosine":
            raise ConfigError(f"warm-up epochs apply to lr schedule warmup-cosine (the schedule "
                              f"is {self.lr_schedule}): add --lr-schedule warmup-cosine or drop "
                              "--warmup-epochs")
        if self.lr_schedule == "warmup-cosine" and self.warmup_epochs >= self.epochs:
            raise ConfigError(f"warm-up epochs ({self.warmup_epochs}) must be fewer than the "
                              f"epochs ({self.epochs})")
        if self.weight_decay and self.optimizer != "adam":
            raise ConfigError(f"weight decay is AdamW's decoupled decay and needs optimizer adam "
                              f"(the optimizer is {self.optimizer}): add --optimizer adam or "
                              "drop --weight-decay")
        if self.label_smoothing and self.loss != "cross_entropy":
            raise ConfigError(f"label smoothing applies to the cross_entropy loss (the loss is "
                              f"{self.loss}): add --loss cross_entropy or drop --label-smoothing")

    def spec(self, n_in=784, n_out=10):
        if self.layers:
            return Spec((n_in, n_out), self.activation, self.output, self.loss, self.dtype,
                        self.layers)
        return Spec((n_in, *self.hidden, n_out), self.activation, self.output, self.loss, self.dtype)

    def to_dict(self):
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d


# A good MLP today: ReLU, softmax + cross-entropy, Adam on mini-batches, float32, a cosine decay
# of the learning rate over the run (docs/RESULTS.md, "the modern preset's learning-rate schedule").
MODERN = TrainConfig()
# The paper's system, faithfully, except for the init: its U[0,1) weights saturate every tanh,
# so nothing learns (docs/PAPER.md); `--init paper` still selects it.
PAPER = TrainConfig(preset="paper", hidden=(256, 128), activation="tanh", output="tanh",
                    loss="mse", init="xavier", dtype="float64", optimizer="sgd", lr=0.01,
                    lr_schedule="constant", batch_size=1, epochs=1, validation_split=0.0)
# The default: the modern preset, wider and trained twice as long, with label smoothing, AdamW's
# decay and a warm-up, each chosen on a validation split (docs/ACCURACY.md, "Ablation").
ACCURATE = replace(MODERN, preset="accurate", hidden=(512, 256), epochs=30, label_smoothing=0.1,
                   weight_decay=5e-2, lr_schedule="warmup-cosine", warmup_epochs=2)
PRESETS = {"paper": PAPER, "modern": MODERN, "accurate": ACCURATE}


def make_config(preset=DEFAULT_PRESET, **overrides):
    """A preset with some settings overridden (None means 'keep the preset's'), checked."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    return override(PRESETS[preset], **overrides)


def resolve(config=None, **overrides):
    """The config a caller means: a TrainConfig, a preset's name, or None (the default preset),
    with some settings overridden (None means 'keep'), checked."""
    if config is None or isinstance(config, str):
        return make_config(config or DEFAULT_PRESET, **overrides)
    if not isinstance(config, TrainConfig):
        raise ConfigError(f"config must be a TrainConfig or a preset name "
                          f"({', '.join(PRESETS)}), got {type(config).__name__}")
    return override(config, **overrides)


# Settings that only apply beside another one. When a caller changes what one depends on (the
# default preset's label smoothing meets --loss mse, say), the value cfg had gives way (off);
# a value the caller gives must still fit, and TrainConfig says why when it does not.
APPLIES_ONLY = {
    "warmup_epochs": lambda c: c["lr_schedule"] == "warmup-cosine",
    "weight_decay": lambda c: c["optimizer"] == "adam",
    "label_smoothing": lambda c: c["loss"] == "cross_entropy",
}


def override(cfg, **overrides):
    """cfg with some settings replaced (None means 'keep cfg's'), checked.

    What cfg set and the caller did not follows the caller's changes: settings that no longer
    apply (APPLIES_ONLY) are switched off, and a warm-up keeps its share of the epochs when
    only --epochs changes (2 of 30 becomes 1 of 15, 0 of 3: always fewer than the epochs)."""
    unknown = set(overrides) - {f.name for f in fields(TrainConfig) if f.name != "preset"}
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    given = {k: v for k, v in overrides.items() if v is not None}
    merged = {**asdict(cfg), **given}
    for name, applies in APPLIES_ONLY.items():
        if name not in given and merged[name] and not applies(merged):
            given[name] = type(merged[name])(0)
    if ("epochs" in given and "warmup_epochs" not in given and cfg.warmup_epochs
            and isinstance(given["epochs"], int) and given["epochs"] >= 1):
        share = round(cfg.warmup_epochs * given["epochs"] / cfg.epochs)
        given["warmup_epochs"] = min(share, given["epochs"] - 1)
    cfg = replace(cfg, **given)
    if "momentum" in given and cfg.optimizer != "momentum":
        raise ConfigError(f"a momentum coefficient only applies to optimizer momentum "
                          f"(the optimizer is {cfg.optimizer}): add --optimizer momentum "
                          "or drop --momentum")
    return cfg


def lr_at(cfg, epoch):
    """The learning rate of an epoch (1-based): constant; cosine from lr down towards 0; or
    warmup-cosine: lr * e / W over the first W = warmup_epochs epochs (W = 0: none), then the
    cosine over the epochs left, starting at lr.

    A function of the epoch alone, so a resumed run needs no extra state for it."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    warm = cfg.warmup_epochs if cfg.lr_schedule == "warmup-cosine" else 0
    if epoch <= warm:
        return cfg.lr * epoch / warm
    return cfg.lr * 0.5 * (1.0 + np.cos(np.pi * (epoch - 1 - warm) / (cfg.epochs - warm)))


def augmentation(cfg):
    """The engines' augmentation option for cfg (a parnn.engines.batch.Augmentation), or None."""
    if cfg.augment == "none":
        return None
    from parnn.engines.batch import Augmentation

    parts = cfg.augment.split("+")
    if "affine" in parts:
        return Augmentation(cfg.seed, **AFFINE)
    shift = next((int(p[len("shift"):]) for p in parts if p.startswith("shift")), 0)
    return Augmentation(cfg.seed, shift=shift, hflip="flip" in parts)


def engine_options(cfg, name):
    """The options make_engine gets for cfg; ConfigError if engine `name` cannot take them."""
    from parnn.engines.batch import DropoutOption

    options = {}
    if cfg.augment != "none":
        options["augment"] = augmentation(cfg)
    if cfg.dropout:
        options["dropout"] = DropoutOption(cfg.dropout, cfg.seed)
    if options and name in PER_SAMPLE:
        what = " and ".join(f"--{k} {getattr(cfg, k)}" for k in ("augment", "dropout")
                            if k in options)
        raise ConfigError(f"engine {name} trains sample by sample and cannot apply {what} to "
                          f"batches: use --engine batch or numpy, or drop it")
    return options


# --- with the data: the batch size and the engine ------------------------------------------------

def capped_threads(cfg, warn=None):
    """cfg with at most usable_cores() threads: more only slow every step down (threads that
    wait for a core) and would be recorded as if they had run. warn(message) hears of it."""
    cores = usable_cores()
    if cfg.threads <= cores:
        return cfg
    if warn is not None:
        warn(f"--threads {cfg.threads} is more than the {cores} core(s) this process may use: "
             f"using {cores}")
    return replace(cfg, threads=cores)


def check_engine(cfg, spec):
    """Before the data loads: an explicit engine that refuses the run says so now, for a batch
    size known up front (an int); "full" needs the training set's size, so pick_engine checks
    it then, as it checks "auto"."""
    if cfg.engine != "auto" and cfg.batch_size != "full":
        engine = make_engine(cfg.engine, **engine_options(cfg, cfg.engine))
        engine.check(spec, cfg.optimizer, cfg.batch_size)


def batch_size_for(cfg, n_train, held_out=0):
    """Samples per optimizer step on a training set of n_train samples (held_out: how many the
    validation split set aside, for the message)."""
    if cfg.batch_size == "full":
        return n_train
    if cfg.batch_size > n_train:
        aside = f" after {held_out} set aside for validation" if held_out else ""
        raise ConfigError(f"batch size {cfg.batch_size} is larger than the training set "
                          f"({n_train} samples{aside})")
    return cfg.batch_size


# What "auto" tries, in order, until one accepts the run. For per-sample SGD on 2 threads `owner`
# first: faster on free cores, and about as fast as `serial` when a neighbour takes one, since
# its threads then give up to the serial loop (docs/ENGINES.md, "What --engine auto picks"). At
# other thread counts `serial`: on one thread owner is the same loop with barriers, and more than
# two threads have not been measured.
AUTO_PER_SAMPLE = ("serial", "numpy")
AUTO_PER_SAMPLE_THREADED = ("owner",) + AUTO_PER_SAMPLE
AUTO_BATCH = ("batch", "numpy")


def pick_engine(cfg, spec, n_train):
    """A new engine object for this run, checked to accept it: cfg.engine, or for "auto" the
    first of the preferences that does. The run keeps it (fit picks once, or is handed one)."""
    bs = batch_size_for(cfg, n_train)
    if cfg.engine != "auto":
        engine = make_engine(cfg.engine, **engine_options(cfg, cfg.engine))
        engine.check(spec, cfg.optimizer, bs)
        return engine
    per_sample = bs == 1 and cfg.optimizer == "sgd" and not spec.arch   # dense layers only
    threaded = cfg.threads == 2 <= usable_cores()          # the count owner was measured at
    prefs = ((AUTO_PER_SAMPLE_THREADED if threaded else AUTO_PER_SAMPLE) if per_sample
             else AUTO_BATCH)
    for name in prefs:
        try:
            engine = make_engine(name, **engine_options(cfg, name))
            engine.check(spec, cfg.optimizer, bs)
            return engine
        except ConfigError:
            continue
    return make_engine("numpy", **engine_options(cfg, "numpy"))
