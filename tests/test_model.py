import itertools

import numpy as np
import pytest

from parnn.core.layers import ACTIVATIONS, DERIVATIVES, Dense, param_views
from parnn.core.model import MLP, Spec, init_params, soft_vote, views
from parnn.errors import ConfigError

COMBOS = [(h, o, l) for h, o, l in itertools.product(("tanh", "sigmoid", "relu"),
                                                      ("tanh", "sigmoid", "softmax"),
                                                      ("mse", "cross_entropy"))
          if not (l == "cross_entropy" and o != "softmax")]


def tiny_batch(spec, B=5, seed=1):
    rng = np.random.default_rng(seed)
    X = rng.random((B, spec.sizes[0]))
    T = np.eye(spec.sizes[-1])[rng.integers(0, spec.sizes[-1], B)]
    return X, T


def mean_loss(net, X, T):
    return net.backward(net.forward(X), T, np.empty_like(net.params)) / len(X)


def numeric_gradient(params, loss, h=1e-6):
    """Central finite differences of loss() with respect to each entry of params (in place)."""
    numeric = np.empty_like(params)
    for i in range(len(params)):
        old = params[i]
        params[i] = old + h
        up = loss()
        params[i] = old - h
        down = loss()
        params[i] = old
        numeric[i] = (up - down) / (2 * h)
    return numeric


@pytest.mark.parametrize("hidden,output,loss", COMBOS)
def test_gradient_matches_central_differences(hidden, output, loss):
    spec = Spec((6, 5, 4, 3), hidden, output, loss, "float64")
    net = MLP(spec, init="xavier", seed=3)
    X, T = tiny_batch(spec)
    grad = np.empty_like(net.params)
    net.backward(net.forward(X), T, grad)
    numeric = numeric_gradient(net.params, lambda: mean_loss(net, X, T))
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_each_derivative_matches_central_differences_of_its_activation(name):
    """DERIVATIVES[name](A, delta) = delta times the Jacobian of ACTIVATIONS[name] at z, from the
    output A alone (softmax's Jacobian is symmetric, so rows of J delta = J^T delta)."""
    rng = np.random.default_rng(0)
    z = rng.uniform(-2, 2, (4, 5))
    z[np.abs(z) < 0.1] = 0.5                  # keep relu away from its kink
    delta = rng.standard_normal(z.shape)
    got = DERIVATIVES[name](ACTIVATIONS[name](z.copy()), delta.copy())
    h = 1e-6
    numeric = np.zeros_like(z)
    for j in range(z.shape[1]):
        up, down = z.copy(), z.copy()
        up[:, j] += h
        down[:, j] -= h
        dA = (ACTIVATIONS[name](up) - ACTIVATIONS[name](down)) / (2 * h)   # column j of J
        numeric[:, j] = np.einsum("ij,ij->i", dA, delta)
    np.testing.assert_allclose(got, numeric, rtol=1e-6, atol=1e-9)


def test_network_is_a_walk_over_dense_layers_on_the_flat_buffer():
    spec = Spec((6, 5, 4, 3), "relu", "softmax", "cross_entropy")
    net = MLP(spec)
    assert [(l.n_in, l.n_out, l.activation) for l in net.layers] == \
        [(6, 5, "relu"), (5, 4, "relu"), (4, 3, "identity")]
    assert all(isinstance(l, Dense) for l in net.layers)
    assert sum(l.n_params for l in net.layers) == spec.n_params
    for (W, b), W2, b2 in zip(param_views(net.layers, net.params), net.W, net.b):
        assert np.shares_memory(W, net.params) and np.array_equal(W, W2) and np.array_equal(b, b2)
    with pytest.raises(ValueError, match="expected"):
        param_views(net.layers, np.zeros(spec.n_params + 1))


@pytest.mark.parametrize("hidden,output,loss", COMBOS[:3] + COMBOS[-1:])
def test_forward_and_backward_into_preallocated_buffers(hidden, output, loss):
    """An engine's workspace: the same bits as allocating, written into the given buffers."""
    spec = Spec((6, 5, 4, 3), hidden, output, loss, "float32")
    net = MLP(spec, seed=2)
    X, T = (a.astype(np.float32) for a in tiny_batch(spec, B=7))
    acts = net.forward(X)
    grad = np.empty_like(net.params)
    loss_value = net.backward(acts, T, grad)

    out = [np.full((7, n), np.nan, np.float32) for n in spec.sizes[1:]]
    deltas = [np.full((7, n), np.nan, np.float32) for n in spec.sizes[1:]]
    acts2 = net.forward(X, out=out)
    assert all(a is o for a, o in zip(acts2[1:], out))
    grad2 = np.full_like(net.params, np.nan)
    assert net.backward(acts2, T, grad2, deltas=deltas) == loss_value
    assert np.array_equal(grad2, grad)
    for a, a2 in zip(acts, acts2):
        assert np.array_equal(a, a2)


def test_flat_buffer_views_share_memory():
    spec = Spec((4, 3, 2))
    net = MLP(spec)
    assert net.params.shape == (4 * 3 + 3 + 3 * 2 + 2,)
    net.W[1][1, 2] = 42.0
    net.b[0][2] = -7.0
    assert net.params[4 * 3 + 3 + 1 * 3 + 2] == 42.0
    assert net.params[4 * 3 + 2] == -7.0
    for W, b in zip(net.W, net.b):
        assert np.shares_memory(W, net.params) and np.shares_memory(b, net.params)


def test_one_sgd_step_by_hand():
    """784-free toy: 2 inputs, 2 hidden tanh, 1 tanh output, MSE, lr 0.5, worked out by hand."""
    spec = Spec((2, 2, 1), "tanh", "tanh", "mse")
    p = np.array([0.1, 0.2, -0.3, 0.4,   # W0 rows: neuron 0, neuron 1
                  0.0, 0.1,              # b0
                  0.5, -0.6,             # W1
                  0.2])                  # b1
    net = MLP(spec, p.copy())
    x = np.array([[1.0, 2.0]])
    t = np.array([[1.0]])
    lr = 0.5
    # forward
    h = np.tanh([0.1 * 1 + 0.2 * 2 + 0.0, -0.3 * 1 + 0.4 * 2 + 0.1])
    o = np.tanh(0.5 * h[0] - 0.6 * h[1] + 0.2)
    # errors (paper's Algorithms 2 and 3, sign: gradient of the loss)
    e_out = (o - 1.0) * (1 - o * o)
    e_h = np.array([e_out * 0.5, e_out * -0.6]) * (1 - h * h)
    # update: W_jk -= lr * err_j * a_prev_k (the activation, not the paper's prev error)
    expect = p.copy()
    expect[0:2] -= lr * e_h[0] * x[0]
    expect[2:4] -= lr * e_h[1] * x[0]
    expect[4:6] -= lr * e_h
    expect[6:8] -= lr * e_out * h
    expect[8] -= lr * e_out
    grad = np.empty_like(p)
    net.backward(net.forward(x), t, grad)
    net.params -= lr * grad
    np.testing.assert_allclose(net.params, expect, rtol=1e-14)


def test_same_seed_same_weights_different_seed_different():
    spec = Spec((20, 8, 4))
    for scheme in ("paper", "xavier", "he"):
        a, b = init_params(spec, scheme, 7), init_params(spec, scheme, 7)
        assert np.array_equal(a, b)
        assert not np.array_equal(a, init_params(spec, scheme, 8))


def test_init_ranges():
    spec = Spec((100, 50, 10))
    p = init_params(spec, "paper", 0)
    assert p.min() >= 0 and p.max() < 1
    Ws, bs = views(spec, init_params(spec, "xavier", 0))
    r = np.sqrt(6 / 150)
    assert np.abs(Ws[0]).max() <= r and np.abs(Ws[0]).max() > 0.9 * r and not bs[0].any()


def test_paper_init_saturates_tanh_and_never_learns():
    spec = Spec((784, 256, 128, 10))
    net = MLP(spec, init="paper", seed=1)
    X, T = tiny_batch(spec, B=8)
    acts = net.forward(X)
    assert np.all(acts[-1] == 1.0)
    grad = np.empty_like(net.params)
    net.backward(acts, T, grad)
    assert not grad.any()


def test_float32_network_stays_float32():
    spec = Spec((6, 4, 3), "relu", "softmax", "cross_entropy", "float32")
    net = MLP(spec, init="he")
    X, T = tiny_batch(spec)
    acts = net.forward(X.astype(np.float32))
    assert all(a.dtype == np.float32 for a in acts[1:])
    np.testing.assert_allclose(acts[-1].sum(1), 1, rtol=1e-6)


@pytest.mark.parametrize("kwargs,words", [
    (dict(sizes=(784, 0, 10)), "sizes must be >= 1"),
    (dict(hidden="gelu"), "tanh, sigmoid, relu"),
    (dict(output="relu"), "tanh, sigmoid, softmax"),
    (dict(loss="hinge"), "mse, cross_entropy"),
    (dict(dtype="float16"), "float32, float64"),
    (dict(output="tanh", loss="cross_entropy"), "needs output softmax"),
])
def test_spec_refuses_bad_settings(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        Spec(**kwargs)


def test_an_identity_output_is_linear_and_its_mse_gradient_checks():
    """The regressor's head: output = the last layer's z, delta = p - t (identity' = 1)."""
    spec = Spec((6, 5, 3), "tanh", "identity", "mse", "float64")
    net = MLP(spec, seed=2)
    X, T = np.random.default_rng(0).random((4, 6)), np.random.default_rng(1).normal(size=(4, 3))
    acts = net.forward(X)
    np.testing.assert_allclose(acts[-1], acts[-2] @ net.W[-1].T + net.b[-1], rtol=1e-12)
    grad = np.empty_like(net.params)
    net.backward(acts, T, grad)
    # the textbook MSE written out, not the loss object under test
    textbook = lambda: 0.5 * float(((net.forward(X)[-1] - T) ** 2).sum()) / len(X)  # noqa: E731
    np.testing.assert_allclose(grad, numeric_gradient(net.params, textbook), rtol=1e-6, atol=1e-9)


# --- label smoothing -----------------------------------------------------------------------------

@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_label_smoothed_cross_entropy_value_and_gradient_match_the_textbook_loss(eps):
    from parnn.core.losses import smooth_labels

    spec = Spec((6, 5, 4), "relu", "softmax", "cross_entropy", "float64")
    net = MLP(spec, init="he", seed=3)
    X, T = tiny_batch(spec)
    K = spec.sizes[-1]

    def textbook(net):   # (1 - eps) * CE(true class) + eps * mean over classes of -log p_j
        log_p = np.log(net.forward(X)[-1])
        return float(-((1 - eps) * (T * log_p).sum() + eps / K * log_p.sum()) / len(X))

    T_smooth = smooth_labels(T, eps)
    np.testing.assert_allclose(T_smooth.sum(axis=1), 1.0)
    assert (T_smooth.argmax(axis=1) == T.argmax(axis=1)).all()
    grad = np.empty_like(net.params)
    value = net.backward(net.forward(X), T_smooth, grad) / len(X)
    assert value == pytest.approx(textbook(net), rel=1e-12)
    numeric = numeric_gradient(net.params, lambda: textbook(net))
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-8)
    assert not np.allclose(grad, np.asarray(_plain_gradient(net, X, T)))


def _plain_gradient(net, X, T):
    grad = np.empty_like(net.params)
    net.backward(net.forward(X), T, grad)
    return grad


# --- dropout -----------------------------------------------------------------------------------

def test_dropout_masks_follow_the_seed_epoch_layer_and_sample_not_the_batch():
    from parnn.core.layers import Dropout

    def mask(idx, seed=1, epoch=1, layer=0, rate=0.25, n=300):
        return Dropout(n, rate, seed, layer, "float32").draw(epoch, np.asarray(idx)).copy()

    whole = mask(np.arange(64))
    assert set(np.unique(whole)) == {0.0, np.float32(1 / 0.75)}
    assert abs((whole == 0).mean() - 0.25) < 0.01
    # a sample's mask is the same in any batch, at any position
    assert np.array_equal(mask([40, 3]), whole[[40, 3]])
    assert np.array_equal(mask(np.arange(64)), whole)
    for other in (dict(seed=2), dict(epoch=2), dict(layer=1)):
        assert (mask(np.arange(64), **other) != whole).mean() > 0.2, other
    assert not (mask(np.arange(64), rate=0.0) == 0).any()


def test_dropout_gradient_matches_central_differences_at_a_fixed_mask():
    from parnn.engines.batch import DropoutOption, draw_masks, training_net

    spec = Spec((6, 5, 4, 3), "tanh", "softmax", "cross_entropy", "float64")
    net = MLP(spec, init="xavier", seed=3)
    X, T = tiny_batch(spec, B=6)
    tnet = training_net(net, DropoutOption(0.4, seed=5))
    assert [type(layer).__name__ for layer in tnet.layers] == \
        ["Dense", "Dropout", "Dense", "Dropout", "Dense"]
    assert tnet.params is net.params
    draw_masks(tnet, epoch=1, idx=np.arange(6))          # fixed from here on
    assert (tnet.layers[1].mask[:6] == 0).any()
    grad = np.empty_like(net.params)
    tnet.backward(tnet.forward(X), T, grad)
    numeric = numeric_gradient(net.params, lambda: mean_loss(tnet, X, T))
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-8)
    assert not np.allclose(grad, _plain_gradient(net, X, T))
    # net itself, for scoring and inference, has no dropout layers
    assert len(net.layers) == 3
    np.testing.assert_array_equal(net.forward(X)[-1], MLP(spec, net.params.copy()).forward(X)[-1])


def test_soft_vote_is_the_float64_mean_in_the_members_dtype():
    rng = np.random.default_rng(0)
    outs = [rng.random((50, 10), dtype=np.float32) for _ in range(7)]
    vote = soft_vote(outs)
    assert vote.dtype == np.float32
    exact = sum(o.astype(np.float64) for o in outs) / 7
    np.testing.assert_array_equal(vote, exact.astype(np.float32))
    assert soft_vote(iter(outs)).tobytes() == vote.tobytes()     # any iterable of outputs
    one = soft_vote(outs[:1])
    assert one.tobytes() == outs[0].tobytes()                    # one member: unchanged
    with pytest.raises(ConfigError, match="at least one"):
        soft_vote([])
