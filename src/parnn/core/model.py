"""The network: a Spec, ONE flat parameter buffer, and a walk over its layers.

Every parameter lives in ONE contiguous flat buffer; each layer's arrays are views into it.
Gradients use a second buffer with the same layout. Engines, optimizers, MPI allreduce and
checkpoints therefore all handle a single array. Layout, layer after layer (l = 0 .. L-1,
n_in = sizes[l], n_out = sizes[l+1]):

    [ W_0 (n_out x n_in, row-major: row j = the weights of neuron j) | b_0 (n_out) | W_1 | b_1 | ... ]

A network with a layer list (Spec.arch, parnn.core.conv) lays out its layers the same way, in
list order: a conv layer's W is (C_out, k, k, C_in), then its b (C_out); pooling and flatten
layers have no parameters and take no room.

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

from parnn.core.conv import parse_layers
from parnn.core.layers import ACTIVATIONS, Dense, param_views
from parnn.core.losses import LOSSES as LOSS_KINDS
from parnn.errors import ConfigError

HIDDEN_ACTIVATIONS = ("tanh", "sigmoid", "relu")
OUTPUT_ACTIVATIONS = ("tanh", "sigmoid", "softmax", "identity")   # identity: regression
LOSSES = tuple(LOSS_KINDS)
INITS = ("paper", "xavier", "he")
DTYPES = ("float32", "float64")
# Rows a network with a layer list scores at a time: its layers' outputs are images, and with
# the im2col columns a few hundred KB per sample.
IMAGE_ROWS = 256


# --- architecture --------------------------------------------------------------------------

@dataclass(frozen=True)
class Spec:
    """What a network is: enough to rebuild it from a model file.

    arch: "" for an MLP of dense layers of `sizes`; or a layer list such as
    "conv32:3,pool,conv64:3,pool,dense128" (parnn.core.conv.parse_layers), with sizes then just
    (inputs, outputs): the list runs from the inputs (a square image) to a linear dense layer
    of `outputs`, which it does not spell."""

    sizes: tuple[int, ...] = (784, 256, 128, 10)
    hidden: str = "tanh"
    output: str = "tanh"
    loss: str = "mse"
    dtype: str = "float64"
    arch: str = ""

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
        if not isinstance(self.arch, str):
            raise ConfigError(f"the layer list must be a string like conv32:3,pool,dense128, "
                              f"got {self.arch!r}")
        if self.arch:
            if len(self.sizes) != 2:
                raise ConfigError("a layer list replaces the hidden sizes: the sizes are then "
                                  f"(inputs, outputs), got {','.join(map(str, self.sizes))}")
            parse_layers(self.arch, *self.sizes, self.hidden, compiled=False)

    @property
    def n_layers(self):
        return len(self.layers(compiled=False)) if self.arch else len(self.sizes) - 1

    def activation(self, layer):
        return self.output if layer == self.n_layers - 1 else self.hidden

    def shapes(self):
        """The shape of each W: (n_out, n_in) of a dense layer, (C_out, k, k, C_in) of a conv
        layer (layers without parameters have none)."""
        if not self.arch:
            return [(self.sizes[l + 1], self.sizes[l]) for l in range(self.n_layers)]
        return [layer.shapes[0] for layer in self.layers(compiled=False) if layer.shapes]

    def offsets(self):
        """Start of each W and b in the flat buffer (as shapes() lists them), and the total size."""
        starts, o = [], 0
        for shape in self.shapes():
            n_w = int(np.prod(shape))
            starts.append((o, o + n_w))
            o += n_w + shape[0]
        return starts, o

    @property
    def n_params(self):
        return self.offsets()[1]

    def layers(self, compiled=True):
        """The network as layer objects: Dense layers with the hidden activation, the last one
        linear (its output activation goes with the loss, see parnn.core.losses); or arch's
        (compiled=False: conv layers that run the NumPy reference, and Numba is not imported)."""
        if self.arch:
            return parse_layers(self.arch, *self.sizes, self.hidden, compiled)
        return [Dense(n_in, n_out, self.hidden if l < self.n_layers - 1 else "identity")
                for l, (n_out, n_in) in enumerate(self.shapes())]

    def rows_at_once(self, rows):
        """Rows to score at a time, at most `rows`: fewer (IMAGE_ROWS) for a layer list."""
        return min(rows, IMAGE_ROWS) if self.arch else rows

    def shape_text(self):
        """How the architecture reads: 784-256-128-10, or 784-[conv32:3,pool,dense128]-10."""
        if self.arch:
            return f"{self.sizes[0]}-[{self.arch}]-{self.sizes[-1]}"
        return "-".join(map(str, self.sizes))

    def to_dict(self):
        d = asdict(self)
        d["sizes"] = list(self.sizes)
        if not self.arch:       # an MLP's dict as before layer lists: old readers load it
            del d["arch"]
        return d


def _choice(what, value, allowed):
    if value not in allowed:
        raise ConfigError(f"unknown {what} {value!r}: choose one of {', '.join(allowed)}")


def views(spec, flat):
    """Per-layer (W, b) views into a flat buffer of spec's layout (layers with parameters).
    No copies."""
    Ws, bs = zip(*[p for p in param_views(spec.layers(compiled=False), flat) if p])
    return list(Ws), list(bs)


def soft_vote(outputs):
    """An ensemble's output: the mean of its members' output layers (each (n, classes), any
    iterable of them, used one at a time), summed in float64 in member order and returned in
    the members' dtype. Every path that votes (a loaded ensemble, `parnn evaluate`, an MPI
    ensemble, members trained in one process) calls this, so they agree to the bit; one
    member's output comes back unchanged."""
    total, count, dtype = None, 0, None
    for out in outputs:
        if total is None:
            total, dtype = out.astype(np.float64), out.dtype
        else:
            total += out
        count += 1
    if total is None:
        raise ConfigError("a vote needs at least one member's outputs")
    return (total / count).astype(dtype, copy=False)


def init_params(spec, scheme="xavier", seed=0):
    """A new flat parameter buffer.

    paper:  weights and biases from U[0,1), like the paper's rand()/RAND_MAX. With tanh this
            saturates every neuron (all pre-activations are large and positive), so 1 - a^2 == 0
            and nothing ever learns; kept to reproduce that.
    xavier: U(+-sqrt(6 / (fan_in + fan_out))), biases 0 (Glorot & Bengio 2010).
    he:     N(0, 2 / fan_in), biases 0 (He et al. 2015), for ReLU.
    A conv layer's fans are k*k*C_in and k*k*C_out (its `fans`), as in PyTorch and Keras.
    """
    _choice("init", scheme, INITS)
    rng = np.random.default_rng(seed)
    flat = np.zeros(spec.n_params, dtype=spec.dtype)
    layers = [layer for layer in spec.layers(compiled=False) if layer.shapes]
    for layer, (W, b) in zip(layers, zip(*views(spec, flat))):
        n_in, n_out = getattr(layer, "fans", (layer.shapes[0][1], layer.shapes[0][0]))
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
        self.W = [p[0] for p in self.layer_params if p]     # layers with parameters
        self.b = [p[1] for p in self.layer_params if p]
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

    def backward(self, acts, Y, grad, scale=None, deltas=None, on_layer=None):
        """Fill the flat `grad` buffer with dL/dparams for the batch; return the summed loss.

        scale defaults to 1/B (the mean loss); engines pass other scales when they split a
        batch. deltas: None, or one preallocated scratch buffer per layer, shaped like `out`
        in forward, for the deltas. on_layer(l, g_l): called as soon as layer l's gradient
        views g_l are final (last layer first), so MPI can start reducing them while the
        layers below are still computed.
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
            if on_layer is not None:
                on_layer(l, g[l])
        return loss

    def _grad_views(self, grad):
        """Per-layer views of `grad`, made once for an engine that passes the same buffer."""
        if self._grad[0] is not grad:
            self._grad = (grad, param_views(self.layers, grad))
        return self._grad[1]

    def output(self, X, batch=4096):
        """The output layer for X, in chunks so a test set needs little memory (a conv net's
        layers are images: 4096 of them would be hundreds of MB, so 256)."""
        batch = self.spec.rows_at_once(batch)
        outs = [self.forward(X[i:i + batch])[-1] for i in range(0, len(X), batch)]
        return np.concatenate(outs) if outs else np.empty((0, self.spec.sizes[-1]), self.dtype)

    def predict(self, X):
        """Class = argmax of the output layer (the paper's prediction)."""
        return self.output(X).argmax(axis=1)

    def copy(self):
        return MLP(self.spec, self.params.copy())
