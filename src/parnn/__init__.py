"""parnn: parallel training of feedforward neural networks on Fashion-MNIST.

From Python (docs/API.md):

    import parnn
    model, history = parnn.train(X, y, epochs=5)      # arrays in, a Model and its history out
    model.predict(X), model.predict_proba(X)
    model.save("model.safetensors"); parnn.load("model.safetensors")

The names below are imported on first use, so `import parnn` (and `parnn --help`) stays fast.
"""

__version__ = "0.1.0"

# name -> the module that defines it
_LAZY = {
    "train": "parnn.run.api",
    "load": "parnn.run.api",
    "Model": "parnn.run.api",
    "TrainConfig": "parnn.run.config",
    "make_config": "parnn.run.config",
    "PRESETS": "parnn.run.config",
    "ParnnError": "parnn.errors",
    "ConfigError": "parnn.errors",
    "ModelFileError": "parnn.errors",
    "MLPClassifier": "parnn.estimators",    # scikit-learn estimators: the `sklearn` extra
    "MLPRegressor": "parnn.estimators",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value   # once: later lookups do not come here again
        return value
    raise AttributeError(f"module 'parnn' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
