"""The optimizers against independent oracles over several steps: the textbook update rules written
out here in float64 (Adam with its bias corrections as in Kingma & Ba 2015, Algorithm 1), and
PyTorch's optimizers on the same gradients when torch is installed (the `peers` extra)."""

import numpy as np
import pytest

from parnn.core.optim import OPTIMIZERS, Adam, Momentum, SGD, make_optimizer
from parnn.errors import ConfigError

N, STEPS = 1000, 12


def gradients(seed=0):
    """STEPS gradients of mixed scales, some tiny (there Adam's eps matters) and some exactly 0."""
    rng = np.random.default_rng(seed)
    scale = 10.0 ** rng.uniform(-10, 1, N)
    g = rng.standard_normal((STEPS, N)) * scale
    g[:, :10] = 0.0
    return g


def start(seed=1):
    return np.random.default_rng(seed).standard_normal(N)


def sgd_oracle(p, gs, lr):
    p = p.copy()
    for g in gs:
        p = p - lr * g
    return p


def momentum_oracle(p, gs, lr, mu):
    """Heavy ball: v_t = mu v_{t-1} - lr g_t,  p_t = p_{t-1} + v_t,  v_0 = 0."""
    p, v = p.copy(), np.zeros_like(p)
    for g in gs:
        v = mu * v - lr * g
        p = p + v
    return p


def adam_oracle(p, gs, lr, beta1=0.9, beta2=0.999, eps=1e-8):
    """Kingma & Ba, Algorithm 1: bias-corrected moments, eps added to sqrt(v_hat)."""
    p, m, v = p.copy(), np.zeros_like(p), np.zeros_like(p)
    for t, g in enumerate(gs, start=1):
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        m_hat = m / (1 - beta1 ** t)
        v_hat = v / (1 - beta2 ** t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p


def run(opt, p, gs):
    p = p.copy()
    for g in gs:
        opt.step(p, g.astype(p.dtype))
    return p


ORACLES = {"sgd": lambda p, gs, lr: sgd_oracle(p, gs, lr),
           "momentum": lambda p, gs, lr: momentum_oracle(p, gs, lr, 0.9),
           "adam": lambda p, gs, lr: adam_oracle(p, gs, lr)}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_follows_the_textbook_over_several_steps(name):
    lr = 0.01
    p0, gs = start(), gradients()
    opt = make_optimizer(name, N, "float64", lr)
    got = run(opt, p0, gs)
    np.testing.assert_allclose(got, ORACLES[name](p0, gs, lr), rtol=1e-12, atol=1e-14)
    assert opt.t == STEPS
    assert not np.allclose(got, p0)          # every optimizer moved the parameters


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_float32_optimizer_stays_close_to_the_float64_textbook(name):
    lr = 0.01
    p0, gs = start(), gradients()
    got = run(make_optimizer(name, N, "float32", lr), p0.astype(np.float32), gs)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ORACLES[name](p0, gs, lr), rtol=1e-5, atol=1e-6)


def test_adam_bias_correction_makes_the_first_step_lr_sized():
    """After one step m_hat = g and v_hat = g^2, so every parameter with |g| >> eps moves by lr
    against its gradient's sign, whatever the gradient's scale."""
    p0 = start()
    g = np.sign(start(2)) * 10.0 ** np.linspace(-4, 3, N)
    p = p0.copy()
    Adam(N, "float64", 1e-3).step(p, g)
    np.testing.assert_allclose(p - p0, -1e-3 * np.sign(g), rtol=1e-3)


def test_adam_state_resumes_where_it_stopped():
    """state()/load_state() and t are all a checkpoint needs: a new Adam carries on bit for bit."""
    p0, gs = start(), gradients()
    whole = run(Adam(N, "float32", 1e-3), p0.astype(np.float32), gs)
    first = Adam(N, "float32", 1e-3)
    p = run(first, p0.astype(np.float32), gs[:5])
    second = Adam(N, "float32", 1e-3)
    second.load_state({k: v.copy() for k, v in first.state().items()})
    second.t = first.t
    assert np.array_equal(run(second, p, gs[5:]), whole)


def test_per_sample_steps_are_counted():
    opt = SGD(N, "float64", 0.1)
    opt.count_steps(7)
    assert opt.t == 7


def test_unknown_optimizer_is_refused():
    with pytest.raises(ConfigError, match="unknown optimizer 'lbfgs': choose one of sgd"):
        make_optimizer("lbfgs", N, "float64", 0.1)


# --- PyTorch on the same gradients ---------------------------------------------------------------

@pytest.mark.parametrize("name", ["sgd", "momentum", "adam"])
def test_optimizer_matches_pytorch(name):
    """torch.optim.SGD(momentum=mu) keeps buf = mu buf + g and steps p -= lr buf; our heavy-ball
    v = mu v - lr g is -lr buf, so the parameters agree (not the state)."""
    torch = pytest.importorskip("torch")
    lr = 0.01
    p0, gs = start(), gradients()
    w = torch.tensor(p0, dtype=torch.float64, requires_grad=True)
    ref = {"sgd": lambda: torch.optim.SGD([w], lr=lr),
           "momentum": lambda: torch.optim.SGD([w], lr=lr, momentum=0.9),
           "adam": lambda: torch.optim.Adam([w], lr=lr, betas=(0.9, 0.999), eps=1e-8)}[name]()
    for g in gs:
        w.grad = torch.tensor(g, dtype=torch.float64)
        ref.step()
    opt = {"sgd": lambda: SGD(N, "float64", lr),
           "momentum": lambda: Momentum(N, "float64", lr, 0.9),
           "adam": lambda: Adam(N, "float64", lr)}[name]()
    np.testing.assert_allclose(run(opt, p0, gs), w.detach().numpy(), rtol=1e-12, atol=1e-14)


# --- AdamW: decoupled weight decay ---------------------------------------------------------------

def adamw_oracle(p, gs, lrs, wd, beta1=0.9, beta2=0.999, eps=1e-8):
    """Loshchilov & Hutter 2019, Algorithm 2 (eta = 1, the schedule in lr_t):
    p_t = p_{t-1} - lr_t (m_hat / (sqrt(v_hat) + eps) + wd p_{t-1})."""
    p, m, v = p.copy(), np.zeros_like(p), np.zeros_like(p)
    for t, (g, lr) in enumerate(zip(gs, lrs), start=1):
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        m_hat = m / (1 - beta1 ** t)
        v_hat = v / (1 - beta2 ** t)
        p = p - lr * (m_hat / (np.sqrt(v_hat) + eps) + wd * p)
    return p


def run_scheduled(opt, p, gs, lrs):
    p = p.copy()
    for g, lr in zip(gs, lrs):
        opt.lr = lr
        opt.step(p, g.astype(p.dtype))
    return p


@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-12), ("float32", 1e-5)])
def test_adamw_follows_the_textbook_over_several_steps_with_a_changing_lr(dtype, rtol):
    wd = 0.05
    p0, gs = start(), gradients()
    lrs = np.linspace(0.01, 0.002, STEPS)
    got = run_scheduled(make_optimizer("adam", N, dtype, 0.01, weight_decay=wd),
                        p0.astype(dtype), gs, lrs)
    np.testing.assert_allclose(got, adamw_oracle(p0, gs, lrs, wd), rtol=rtol, atol=rtol * 1e-2)
    # the decay is decoupled: not the same as Adam on the gradient plus wd * p (L2)
    l2 = Adam(N, "float64", 0.01)
    p = p0.copy()
    for g, lr in zip(gs, lrs):
        l2.lr = lr
        l2.step(p, g + wd * p)
    assert not np.allclose(got, p, rtol=1e-3)
    assert not np.allclose(got, adam_oracle(p0, gs, 0.01), rtol=1e-3)


def test_weight_decay_needs_adam():
    with pytest.raises(ConfigError, match="weight decay .* needs optimizer adam, not sgd"):
        make_optimizer("sgd", N, "float64", 0.1, weight_decay=0.01)


def test_adamw_matches_pytorch():
    torch = pytest.importorskip("torch")
    lr, wd = 0.01, 0.05
    p0, gs = start(), gradients()
    w = torch.tensor(p0, dtype=torch.float64, requires_grad=True)
    ref = torch.optim.AdamW([w], lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)
    for g in gs:
        w.grad = torch.tensor(g, dtype=torch.float64)
        ref.step()
    got = run(Adam(N, "float64", lr, weight_decay=wd), p0, gs)
    np.testing.assert_allclose(got, w.detach().numpy(), rtol=1e-12, atol=1e-14)
