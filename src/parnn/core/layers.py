"""Layer kinds and activations: each forward written next to its backward.

A network is a sequence of layer objects over ONE flat parameter buffer. A layer kind is a class
that says which parameter arrays it owns (`shapes`, laid out one after the other in its slice of
the flat buffer) and how big its output is per sample (`out_shape`), and defines the pair

    forward(p, x, y=None)                         -> y, the layer's output for input x
    backward(p, x, y, dy, g, dx=None, propagate=True) -> dx = dL/dx (None if not propagate)

p are the layer's parameter views (see `param_views`), g the same views into the gradient
buffer, which backward fills. dy = dL/dy arrives in a scratch buffer that backward may overwrite.
y and dx, when given, are preallocated buffers to write into (an engine's workspace); otherwise
they are allocated. The network's forward and backward only walk this list, so a new kind
(convolution, pooling) is one new class here.

Activations follow scikit-learn's tables: ACTIVATIONS[name](Z) works in place on Z, and
DERIVATIVES[name](A, delta) multiplies delta in place by act'(z), written from the activation's
OUTPUT A = act(z) (all of them can be), so the forward pass only has to keep its outputs.
Two of them are loops compiled by Numba on first use (parnn.core.jit), where NumPy was clearly
slower on the default preset: relu_derivative and softmax.
"""

from __future__ import annotations

import numpy as np

from parnn.core.jit import compiled


# --- activations: in place, forward and derivative side by side ------------------------------

def identity(Z):
    return Z


def identity_derivative(A, delta):
    return delta


def tanh(Z):
    return np.tanh(Z, out=Z)


def tanh_derivative(A, delta):
    delta *= 1.0 - A * A
    return delta


def sigmoid(Z):
    # 0.5 * (1 + tanh(z/2)) is the logistic function without overflow in exp(-z).
    Z *= 0.5
    np.tanh(Z, out=Z)
    Z += 1.0
    Z *= 0.5
    return Z


def sigmoid_derivative(A, delta):
    delta *= A * (1.0 - A)
    return delta


def relu(Z):
    return np.maximum(Z, 0.0, out=Z)


@compiled(cache=True)
def relu_derivative(A, delta):
    """delta *= (A > 0), 2-d, in one compiled pass: NumPy's bool-times-float pass is about three
    times slower, visible in the default preset's epoch (docs/ENGINES.md)."""
    one, zero = delta.dtype.type(1), delta.dtype.type(0)
    for r in range(delta.shape[0]):
        for j in range(delta.shape[1]):
            delta[r, j] *= one if A[r, j] > 0 else zero
    return delta


@compiled(cache=True)
def softmax(Z):
    """Row by row: exp(z - max z) / sum exp(z - max z). Compiled: on rows of 10 outputs NumPy's
    row reductions cost more than the arithmetic (docs/ENGINES.md)."""
    for r in range(Z.shape[0]):
        z = Z[r]
        z -= z.max()
        np.exp(z, z)
        z /= z.sum()
    return Z


def softmax_derivative(A, delta):
    """The Jacobian-vector product of softmax, row by row: a * (delta - sum(delta * a))."""
    delta -= np.einsum("ij,ij->i", delta, A)[:, None]
    delta *= A
    return delta


ACTIVATIONS = {"identity": identity, "tanh": tanh, "sigmoid": sigmoid, "relu": relu,
               "softmax": softmax}
DERIVATIVES = {"identity": identity_derivative, "tanh": tanh_derivative,
               "sigmoid": sigmoid_derivative, "relu": relu_derivative,
               "softmax": softmax_derivative}


# --- layer kinds ---------------------------------------------------------------------------------

class Dense:
    """Fully connected: y = act(x @ W.T + b). Row j of W holds neuron j's incoming weights (the
    paper's weights_jk), so the flat buffer holds W row-major, then b.

        x (B, n_in)    W (n_out, n_in)    b (n_out)    z, y (B, n_out)

    The paper's Algorithm 4 updates weights_jk with the previous layer's *error*; the gradient
    needs its *activation*, dL/dW_jk = delta_j * x_k (see docs/PAPER.md). We use the gradient.
    """

    def __init__(self, n_in, n_out, activation="identity"):
        self.n_in, self.n_out, self.activation = n_in, n_out, activation
        self.shapes = ((n_out, n_in), (n_out,))
        self.n_params = n_out * n_in + n_out
        self.out_shape = (n_out,)

    def __repr__(self):
        return f"Dense({self.n_in}, {self.n_out}, {self.activation!r})"

    def forward(self, p, x, y=None):
        W, b = p
        y = np.matmul(x, W.T, out=y)              # z = x @ W.T: (B, n_in) @ (n_in, n_out)
        y += b
        return ACTIVATIONS[self.activation](y)    # y = act(z), over z

    def backward(self, p, x, y, dy, g, dx=None, propagate=True):
        W, _ = p
        dW, db = g
        dz = DERIVATIVES[self.activation](y, dy)  # dz = dy * act'(z), over dy: (B, n_out)
        np.matmul(dz.T, x, out=dW)                # dW = dz.T @ x: (n_out, B) @ (B, n_in)
        dz.sum(axis=0, out=db)                    # db = sum of dz over the batch
        if not propagate:
            return None
        return np.matmul(dz, W, out=dx)           # dx = dz @ W: (B, n_out) @ (n_out, n_in)


def param_views(layers, flat):
    """Each layer's parameter arrays as views into `flat`, the layers' slices one after the other
    (each layer's arrays in the order of its `shapes`). No copies."""
    n_params = sum(layer.n_params for layer in layers)
    if flat.shape != (n_params,):
        raise ValueError(f"flat buffer has shape {flat.shape}, expected ({n_params},)")
    views, o = [], 0
    for layer in layers:
        arrays = []
        for shape in layer.shapes:
            n = int(np.prod(shape))
            arrays.append(flat[o:o + n].reshape(shape))
            o += n
        views.append(tuple(arrays))
    return views


class Dropout:
    """Inverted dropout on the previous layer's output, training only: y = x * mask, each
    mask entry 0 with probability `rate`, else 1 / (1 - rate), so E[y] = x and nothing is
    rescaled at inference (where the network has no Dropout layers at all).

        x, y, mask (B, n)      no parameters

    The mask is not a generator's next draws but a function of (seed, epoch, layer, sample
    index, unit) (dropout_mask): it does not depend on the thread count, on which batch a
    sample falls in, or on where a resumed run restarts. `draw(epoch, idx)` sets it for a batch
    before forward; backward reuses it (dL/dx = dL/dy * mask).
    """

    shapes = ()
    n_params = 0

    def __init__(self, n, rate, seed, layer, dtype="float64"):
        self.n, self.rate, self.seed, self.layer = n, rate, seed, layer
        self.out_shape = (n,)
        self.dtype = np.dtype(dtype)
        self.mask = np.empty((0, n), self.dtype)

    def __repr__(self):
        return f"Dropout({self.n}, {self.rate!r})"

    def draw(self, epoch, idx):
        """The mask of the batch of samples idx (int64) in an epoch, into a reused buffer."""
        if self.mask.shape[0] < len(idx):
            self.mask = np.empty((len(idx), self.n), self.dtype)
        mask = self.mask[:len(idx)]
        dropout_mask(np.uint64(dropout_key(self.seed, epoch, self.layer)),
                     np.ascontiguousarray(idx, np.int64), float(self.rate),
                     self.dtype.type(1.0 / (1.0 - self.rate)), mask)
        return mask

    def forward(self, p, x, y=None):
        return np.multiply(x, self.mask[:len(x)], out=y)

    def backward(self, p, x, y, dy, g, dx=None, propagate=True):
        if not propagate:
            return None
        return np.multiply(dy, self.mask[:len(dy)], out=dx)


GOLDEN, MIX1, MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
DROPOUT_SALT = 0xD50D0D0D   # so dropout's stream is not augmentation's, at the same seed
_GOLDEN, _MIX1, _MIX2 = np.uint64(GOLDEN), np.uint64(MIX1), np.uint64(MIX2)


def splitmix64(x):
    """The first output of splitmix64 seeded at x, on Python ints mod 2^64."""
    z = (x + GOLDEN) & (2**64 - 1)
    z = ((z ^ (z >> 30)) * MIX1) & (2**64 - 1)
    z = ((z ^ (z >> 27)) * MIX2) & (2**64 - 1)
    return z ^ (z >> 31)


def dropout_key(seed, epoch, layer):
    """The key of one dropout layer's masks in one epoch (parnn.engines.augment's chain)."""
    return splitmix64(splitmix64(splitmix64(splitmix64(seed ^ DROPOUT_SALT) ^ epoch) ^ layer))


@compiled(cache=True)
def dropout_mask(key, idx, rate, scale, mask):
    """mask[b, j] = 0 if u < rate else scale, u in [0, 1) the top 53 bits of
    splitmix64(splitmix64(key ^ idx[b]) + j * GOLDEN), key = dropout_key(seed, epoch, layer).
    Not parallel: a hash per unit is cheap next to the matrix products, and a Numba pool
    between BLAS calls would fight BLAS's."""
    for b in range(mask.shape[0]):
        z = (key ^ np.uint64(idx[b])) + _GOLDEN            # splitmix64(key ^ idx[b])
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        sample = z ^ (z >> np.uint64(31))
        for j in range(mask.shape[1]):
            z = sample + np.uint64(j) * _GOLDEN + _GOLDEN  # splitmix64(sample + j * GOLDEN)
            z = (z ^ (z >> np.uint64(30))) * _MIX1
            z = (z ^ (z >> np.uint64(27))) * _MIX2
            z = z ^ (z >> np.uint64(31))
            u = np.float64(z >> np.uint64(11)) * (1.0 / 9007199254740992.0)
            mask[b, j] = 0 if u < rate else scale
