"""The multilayer perceptron, written once in plain NumPy: the readable reference.

Every parameter lives in ONE contiguous flat buffer; each layer's weights and biases are views
into it. Gradients use a second buffer with the same layout. Engines, optimizers, MPI allreduce
and checkpoints therefore all handle a single array.

Layout of the flat buffer, layer after layer (l = 0 .. L-1, n_in = sizes[l], n_out = sizes[l+1]):

    [ W_0 (n_out x n_in, row-major: row j = the weights of neuron j) | b_0 (n_out) | W_1 | b_1 | ... ]

Row j of W holds neuron j's incoming weights, as in the paper's `weights_jk`.

Math conventions (B = samples in the batch):
    forward   z = a_prev @ W.T + b          (B, n_out)
              a = act(z)
    loss      mse:            L = 1/B * sum_samples 0.5 * sum_j (a_j - t_j)^2
              cross_entropy:  L = 1/B * sum_samples -sum_j t_j log p_j    (softmax output only)
    backward  delta = dL/dz                  (B, n_out)
              dW = delta.T @ a_prev          (n_out, n_in)
              db = delta.sum(0)
              delta_prev = (delta @ W) * act'(a_prev)

The 0.5 in the MSE makes dL/da = (a - t), the error the paper's Algorithm 2 uses
(`mse_der`), so lr means the same thing as in the paper and the C reference.

The paper's Algorithm 4 updates `weights_jk += prev_layer_err_k * error_j * lr`: it multiplies by
the previous layer's *error*. Back-propagation needs the previous layer's *activation*
(dL/dW_jk = delta_j * a_prev_k); we implement the correct update (see docs/PAPER.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from parnn.errors import ConfigError

HIDDEN_ACTIVATIONS = ("tanh", "sigmoid", "relu")
OUTPUT_ACTIVATIONS = ("tanh", "sigmoid", "softmax")
LOSSES = ("mse", "cross_entropy")
INITS = ("paper", "xavier", "he")
DTYPES = ("float32", "float64")


# --- activations: forward and backward side by side ----------------------------------------
# Each backward takes the activation's OUTPUT a (not z): the derivative of all three can be
# written from a, so the forward pass only has to keep the activations.

def tanh_forward(z, out=None):
    return np.tanh(z, out=out)


def tanh_backward(a, da):
    """da * (1 - a^2), in place on da."""
    da *= 1.0 - a * a
    return da


def sigmoid_forward(z, out=None):
    # 0.5 * (1 + tanh(z/2)) is the logistic function without overflow in exp(-z).
    out = np.multiply(z, 0.5, out=out)
    np.tanh(out, out=out)
    out += 1.0
    out *= 0.5
    return out


def sigmoid_backward(a, da):
    da *= a * (1.0 - a)
    return da


def relu_forward(z, out=None):
    return np.maximum(z, 0.0, out=out)


def relu_backward(a, da):
    da *= a > 0
    return da


def softmax_forward(z, out=None):
    out = np.subtract(z, z.max(axis=1, keepdims=True), out=out)
    np.exp(out, out=out)
    out /= out.sum(axis=1, keepdims=True)
    return out


def softmax_backward(a, da):
    """Jacobian-vector product of softmax: a * (da - sum(da * a))."""
    s = np.einsum("ij,ij->i", da, a)[:, None]
    da -= s
    da *= a
    return da


FORWARD = {"tanh": tanh_forward, "sigmoid": sigmoid_forward, "relu": relu_forward,
           "softmax": softmax_forward}
BACKWARD = {"tanh": tanh_backward, "sigmoid": sigmoid_backward, "relu": relu_backward,
            "softmax": softmax_backward}


# --- losses: value and gradient side by side -----------------------------------------------

def loss_value(out, Y, loss):
    """Sum over the batch (callers divide by B when they want the mean)."""
    if loss == "mse":
        d = out - Y
        return 0.5 * float(np.einsum("ij,ij->", d, d))
    tiny = np.finfo(out.dtype).tiny
    return -float(np.einsum("ij,ij->", Y, np.log(np.maximum(out, tiny))))


def output_delta(out, Y, output, loss, scale, delta=None):
    """dL/dz of the output layer, times `scale` (1/B for a mean over the batch).

    softmax + cross-entropy collapses to p - t; every other pair goes through dL/da then the
    output activation's backward.
    """
    delta = np.subtract(out, Y, out=delta)
    if not (output == "softmax" and loss == "cross_entropy"):
        if loss == "cross_entropy":  # pragma: no cover - Spec.validate refuses this
            raise ConfigError("cross_entropy needs the softmax output")
        BACKWARD[output](out, delta)
    delta *= scale
    return delta


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

    def to_dict(self):
        d = asdict(self)
        d["sizes"] = list(self.sizes)
        return d


def _choice(what, value, allowed):
    if value not in allowed:
        raise ConfigError(f"unknown {what} {value!r}: choose one of {', '.join(allowed)}")


def views(spec, flat):
    """Per-layer (W, b) views into a flat buffer of spec's layout. No copies."""
    if flat.shape != (spec.n_params,):
        raise ValueError(f"flat buffer has shape {flat.shape}, expected ({spec.n_params},)")
    starts, _ = spec.offsets()
    Ws, bs = [], []
    for (w0, b0), (n_out, n_in) in zip(starts, spec.shapes()):
        Ws.append(flat[w0:b0].reshape(n_out, n_in))
        bs.append(flat[b0:b0 + n_out])
    return Ws, bs


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
    """A network = a Spec + one flat parameter buffer (W, b are views into it)."""

    def __init__(self, spec, params=None, init="xavier", seed=0):
        self.spec = spec
        self.params = init_params(spec, init, seed) if params is None else params
        if self.params.dtype != np.dtype(spec.dtype) or not self.params.flags.c_contiguous:
            raise ValueError("params must be a contiguous buffer of the spec's dtype")
        self.W, self.b = views(spec, self.params)

    @property
    def dtype(self):
        return self.params.dtype

    def forward(self, X):
        """Activations of every layer, input first: [X, a_1, ..., a_L]."""
        acts = [X]
        for l, (W, b) in enumerate(zip(self.W, self.b)):
            z = acts[-1] @ W.T            # (B, n_in) @ (n_in, n_out)
            z += b
            acts.append(FORWARD[self.spec.activation(l)](z, out=z))
        return acts

    def backward(self, acts, Y, grad, scale=None):
        """Fill the flat `grad` buffer with dL/dparams for the batch; return the summed loss.

        scale defaults to 1/B (the mean loss); engines pass other scales when they split a batch.
        """
        B = len(Y)
        scale = 1.0 / B if scale is None else scale
        out = acts[-1]
        loss = loss_value(out, Y, self.spec.loss)
        gW, gb = views(self.spec, grad)
        delta = output_delta(out, Y, self.spec.output, self.spec.loss, scale)
        for l in reversed(range(self.spec.n_layers)):
            np.matmul(delta.T, acts[l], out=gW[l])        # (n_out, B) @ (B, n_in)
            np.sum(delta, axis=0, out=gb[l])
            if l > 0:
                delta = delta @ self.W[l]                  # (B, n_out) @ (n_out, n_in)
                BACKWARD[self.spec.hidden](acts[l], delta)
        return loss

    def output(self, X, batch=4096):
        """The output layer for X, in chunks so a test set needs little memory."""
        outs = [self.forward(X[i:i + batch])[-1] for i in range(0, len(X), batch)]
        return np.concatenate(outs) if outs else np.empty((0, self.spec.sizes[-1]), self.dtype)

    def predict(self, X):
        """Class = argmax of the output layer (the paper's prediction)."""
        return self.output(X).argmax(axis=1)

    def copy(self):
        return MLP(self.spec, self.params.copy())
