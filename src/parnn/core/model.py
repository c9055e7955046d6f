"""The network: a Spec, ONE flat parameter buffer, and a walk over its layers.

Every parameter lives in ONE contiguous flat buffer; each layer's arrays are views into it.
Gradients use a second buffer with the same layout. Engines, optimizers, MPI allreduce and
checkpoints therefore all handle a single array. Layout, layer after layer (l = 0 .. L-1,
n_in = sizes[l], n_out = sizes[l+1]):

    [ W_0 (n_out x n_in, row-major: row j = the weights of neuron j) | b_0 (n_out) | W_1 | b_1 | ... ]

The network is the list of layer objects of parnn.core.layers (each kind's forward and backward
side by side) followed by the output activation and loss of parnn.core.losses. B = samples:

    forward   a_0 = X;  a_{l+1} = layer_l.forward(a_l)      hidden layers: act(a_l @ W.T + b)
              p = output(a_L)                              the last layer is linear
    loss      mse:            L = 1/B * sum_samples 0.5 * sum_j (p_j - t_j)^2
              cross_entropy:  L = 1/B * sum_samples -sum_j t_j log p_j    (softmax output only)
    backward  delta = dL/dz of the output (losses.py), then each layer from the last: its
              gradient into the flat gradient buffer, and dL/d(its input) for the one below
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from parnn.core.layers import ACTIVATIONS, Dense, param_views
from parnn.core.losses import LOSSES as LOSS_KINDS
from parnn.errors import ConfigError

HIDDEN_ACTIVATIONS = ("tanh", "sigmoid", "relu")
OUTPUT_ACTIVATIONS = ("tanh", "sigmoid", "softmax", "identity")   # identity: regression
LOSSES = tuple(LOSS_KINDS)
INITS = ("paper", "xavier", "he")
DTYPES = ("float32", "float64")


# --- architecture --------------------------------------------------------------------------

@dataclass(frozen=True)
class Spec:
    """What a network is: enough to rebuild it from a model file."""

    sizes: tuple[int, ...] = (784, 256, 128, 10)
    hidden: str = "tanh"
    output: str = "tanh"
    loss: str = "mse"
    dtype: str = "float64"

    def __post_init__(self):
        object.__setattr__(self, "sizes", tuple(int(s) for s in self.sizes))
        self.validate()

    def validate(self):
        if len(self.sizes) < 2:
            raise ConfigError(f"a network needs at least an input and an output size, got {self.sizes}")
        if any(s < 1 for s in self.sizes):
            raise ConfigError(f"layer sizes must be >= 1, got {','.join(map(str, self.sizes))}")
        _choice("hidden activation", self.hidden, HIDDEN_ACTIVATIONS)
        _choice("output activation", self.output, OUTPUT_ACTIVATIONS)
        _choice("loss", self.loss, LOSSES)
        _choice("dtype", self.dtype, DTYPES)
        if self.loss == "cross_entropy" and self.output != "softmax":
            raise ConfigError(f"loss cross_entropy needs output softmax (got output {self.output}); "
                              "use --loss mse with tanh or sigmoid outputs")

    @property
    def n_layers(self):
        return len(self.sizes) - 1

    def activation(self, layer):
        return self.output if layer == self.n_layers - 1 else self.hidden

    def shapes(self):
        """(n_out, n_in) of each layer's W."""
        return [(self.sizes[l + 1], self.sizes[l]) for l in range(self.n_layers)]

    def offsets(self):
        """Start of each layer's W and b in the flat buffer, and the total size."""
        starts, o = [], 0
        for n_out, n_in in self.shapes():
            starts.append((o, o + n_out * n_in))
            o += n_out * n_in + n_out
        return starts, o

    @property
    def n_params(self):
        return self.offsets()[1]

    def layers(self):
        """The network as layer objects: Dense layers with the hidden activation, the last one
        linear (its output activation goes with the loss, see parnn.core.losses)."""
        return [Dense(n_in, n_out, self.hidden if l < self.n_layers - 1 else "identity")
                for l, (n_out, n_in) in enumerate(self.shapes())]

    def to_dict(self):
        d = asdict(self)
        d["sizes"] = list(self.sizes)
        return d


def _choice(what, value, allowed):
    if value not in allowed:
        raise ConfigError(f"unknown {what} {value!r}: choose one of {', '.join(allowed)}")


def views(spec, flat):
    """Per-layer (W, b) views into a flat buffer of spec's layout. No copies."""
    Ws, bs = zip(*param_views(spec.layers(), flat))
    return list(Ws), list(bs)


def init_params(spec, scheme="xavier", seed=0):
    """A new flat parameter buffer.

    paper:  weights and biases from U[0,1), like the paper's rand()/RAND_MAX. With tanh this
            saturates every neuron (all pre-activations are large and positive), so 1 - a^2 == 0
            and nothing ever learns; kept to reproduce that.
    xavier: U(+-sqrt(6 / (fan_in + fan_out))), biases 0 (Glorot & Bengio 2010).
    he:     N(0, 2 / fan_in), biases 0 (He et al. 2015), for ReLU.
    """
    _choice("init", scheme, INITS)
    rng = np.random.default_rng(seed)
    flat = np.zeros(spec.n_params, dtype=spec.dtype)
    for W, b in zip(*views(spec, flat)):
        n_out, n_in = W.shape
        if scheme == "paper":
            W[...] = rng.random(W.shape)
            b[...] = rng.random(b.shape)
        elif scheme == "xavier":
            r = np.sqrt(6.0 / (n_in + n_out))
            W[...] = rng.uniform(-r, r, W.shape)
        else:
            W[...] = rng.normal(0.0, np.sqrt(2.0 / n_in), W.shape)
    return flat


# --- the network ---------------------------------------------------------------------------

class MLP:
    """A network = a Spec + one flat parameter buffer: its layer objects (spec.layers()), each
    with its (W, b) views into the buffer, then the output activation and the loss."""

    def __init__(self, spec, params=None, init="xavier", seed=0):
        self.spec = spec
        self.params = init_params(spec, init, seed) if params is None else params
        if self.params.dtype != np.dtype(spec.dtype) or not self.params.flags.c_contiguous:
            raise ValueError("params must be a contiguous buffer of the spec's dtype")
        self.layers = spec.layers()
        self.layer_params = param_views(self.layers, self.params)   # each layer's (W, b)
        self.W, self.b = [p[0] for p in self.layer_params], [p[1] for p in self.layer_params]
        self.loss = LOSS_KINDS[spec.loss]
        self._grad = (None, None)                          # the last gradient buffer, its views

    @property
    def dtype(self):
        return self.params.dtype

    def forward(self, X, out=None):
        """Activations of every layer, input first: [X, a_1, ..., a_L], a_L the output layer.

        out: None, or one preallocated buffer per layer, (B, *layer.out_shape), to fill
        instead of allocating (an engine's workspace).
        """
        acts = [X]
        for l, (layer, p) in enumerate(zip(self.layers, self.layer_params)):
            acts.append(layer.forward(p, acts[-1], None if out is None else out[l]))
        ACTIVATIONS[self.spec.output](acts[-1])             # p = output(z), over z
        return acts

    def backward(self, acts, Y, grad, scale=None, deltas=None):
        """Fill the flat `grad` buffer with dL/dparams for the batch; return the summed loss.

        scale defaults to 1/B (the mean loss); engines pass other scales when they split a
        batch. deltas: None, or one preallocated scratch buffer per layer, shaped like `out`
        in forward, for the deltas.
        """
        B = len(Y)
        scale = 1.0 / B if scale is None else scale
        p_out = acts[-1]
        loss = self.loss.value(p_out, Y)
        g = self._grad_views(grad)
        L = len(self.layers)
        dy = self.loss.delta(p_out, Y, self.spec.output, None if deltas is None else deltas[-1])
        dy *= scale
        for l in reversed(range(L)):
            dx = None if deltas is None or l == 0 else deltas[l - 1]
            dy = self.layers[l].backward(self.layer_params[l], acts[l], acts[l + 1], dy, g[l],
                                         dx, propagate=l > 0)
        return loss

    def _grad_views(self, grad):
        """Per-layer views of `grad`, made once for an engine that passes the same buffer."""
        if self._grad[0] is not grad:
            self._grad = (grad, param_views(self.layers, grad))
        return self._grad[1]

    def output(self, X, batch=4096):
        """The output layer for X, in chunks so a test set needs little memory."""
        outs = [self.forward(X[i:i + batch])[-1] for i in range(0, len(X), batch)]
        return np.concatenate(outs) if outs else np.empty((0, self.spec.sizes[-1]), self.dtype)

    def predict(self, X):
        """Class = argmax of the output layer (the paper's prediction)."""
        return self.output(X).argmax(axis=1)

    def copy(self):
        return MLP(self.spec, self.params.copy())
