"""One timed run of each kind: a parnn engine, PyTorch, scikit-learn, the C reference.

Every runner takes the shared `Work` (settings, data, the epochs' sample orders) and a thread
count, and returns {"time_s", "others", "test_acc", ...} for a timed run, or None when called
with warm_up=True (compile, start thread pools: never timed).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from parnn.bench.harness import Timer, c_reference_command, run_c_reference

WARMUP_SAMPLES = 256


@dataclass
class Work:
    """What every run shares: settings, data, the epochs' sample orders."""

    cfg: object
    spec: object
    X: np.ndarray
    T: np.ndarray
    y: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    orders: list = field(default_factory=list)

    @property
    def samples(self):
        return len(self.X) * len(self.orders)      # samples trained per run


def make_work(cfg, ds):
    """The Work of a config on a loaded dataset; the epochs' orders come from the training
    loop's order stream (seed + 1), so a run trains what `parnn train` would."""
    from parnn.data import one_hot

    spec = cfg.spec()
    rng = np.random.default_rng(cfg.seed + 1)
    return Work(cfg, spec, ds.X_train, one_hot(ds.y_train, spec.sizes[-1], spec.dtype),
                ds.y_train, ds.X_test, ds.y_test,
                [rng.permutation(len(ds.X_train)) for _ in range(cfg.epochs)])


# --- parnn's engines ----------------------------------------------------------------------------

def train_run(engine, w, threads, warm_up=False):
    """One run: a new network from the seed, every epoch in the training loop's chunks.
    Returns (the trained network, {"time_s", "others", "test_acc"}), or None for a warm-up."""
    from parnn.core.model import MLP
    from parnn.core.optim import make_optimizer
    from parnn.run.config import lr_at
    from parnn.run.train import chunk_size, set_threads

    cfg = w.cfg
    net = MLP(w.spec, init=cfg.init, seed=cfg.seed)
    opt = make_optimizer(cfg.optimizer, w.spec.n_params, w.spec.dtype, cfg.lr, cfg.momentum)
    step = chunk_size(engine, cfg.batch_size, len(w.X))
    limits, _ = set_threads(threads, engine)
    with limits, np.errstate(all="ignore"):
        if warm_up:
            n = WARMUP_SAMPLES if cfg.batch_size == 1 else 2 * cfg.batch_size
            engine.train(net, opt, w.X, w.T, w.orders[0][:n], cfg.batch_size)
            return None
        with Timer() as t:
            for epoch, order in enumerate(w.orders, 1):
                opt.lr = lr_at(cfg, epoch)
                for start in range(0, len(order), step):
                    engine.train(net, opt, w.X, w.T, order[start:start + step], cfg.batch_size)
        acc = float(np.mean(net.predict(w.X_test) == w.y_test))
    return net, {"time_s": t.seconds, "others": t.others, "test_acc": acc}


def engine_run(engine, w, threads, warm_up=False):
    out = train_run(engine, w, threads, warm_up)
    return None if out is None else out[1]


def profiled_run(engine, w, threads):
    """A warm-up and one run of a per-sample engine made with profile=True: the run's time, and
    where that time went by the engine's own timers. Returns time_s, others, test_acc, phases
    (their names) and seconds (a row per participating thread, a column per phase)."""
    train_run(engine, w, threads, warm_up=True)
    before = engine.phase_seconds()["seconds"]          # the engine sums over all its calls
    _, out = train_run(engine, w, threads)
    prof = engine.phase_seconds()
    seconds = np.array(prof["seconds"], float)
    seconds[:len(before)] -= before
    return {**out, "phases": tuple(prof["phases"]), "seconds": seconds}


# --- peers --------------------------------------------------------------------------------------

def torch_run(w, threads, warm_up=False):
    """The same network, init, sample order and optimizer in PyTorch: per-sample SGD for the
    paper workload (a Python loop of batch-1 steps, as its users would write it), Adam on
    mini-batches for the modern one. torch.set_num_threads(threads)."""
    import torch

    from parnn.core.model import MLP
    from parnn.run.config import lr_at

    cfg, spec = w.cfg, w.spec
    torch.set_num_threads(threads)
    net = MLP(spec, init=cfg.init, seed=cfg.seed)
    model = torch_model(net) if spec.arch else torch_mlp(net)
    if cfg.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    X, T, y = torch.from_numpy(w.X), torch.from_numpy(w.T), torch.from_numpy(w.y)
    ce = torch.nn.CrossEntropyLoss()

    def loss_of(out, idx):
        if spec.loss == "mse":                   # parnn's: mean over the batch of 0.5 sum (a-t)^2
            return 0.5 * ((out - T[idx]) ** 2).sum() / out.shape[0]
        return ce(out, y[idx])

    bs = cfg.batch_size

    def batches(order):
        if bs == 1:                              # a slice is much cheaper than an index tensor
            return (slice(i, i + 1) for i in order.tolist())
        o = torch.from_numpy(order)
        return (o[s:s + bs] for s in range(0, len(order), bs))

    def steps(order):
        for idx in batches(order):
            opt.zero_grad(set_to_none=True)
            loss_of(model(X[idx]), idx).backward()
            opt.step()

    if warm_up:
        steps(w.orders[0][:64 if bs == 1 else 2 * bs])
        return None
    with Timer() as t:
        for epoch, order in enumerate(w.orders, 1):
            for g in opt.param_groups:
                g["lr"] = lr_at(cfg, epoch)
            steps(order)
    rows = spec.rows_at_once(4096)               # a CNN's test images: 256 at a time
    with torch.no_grad():
        pred = np.concatenate([model(torch.from_numpy(w.X_test[i:i + rows])).argmax(1).numpy()
                               for i in range(0, len(w.X_test), rows)])
    return {"time_s": t.seconds, "others": t.others, "test_acc": float(np.mean(pred == w.y_test))}


def torch_mlp(net):
    """parnn's MLP `net` as a torch.nn.Sequential of Linear layers, with its weights."""
    import torch

    spec = net.spec
    dt = getattr(torch, spec.dtype)
    act = {"tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid, "relu": torch.nn.ReLU}
    layers = []
    for l, (W, b) in enumerate(zip(net.W, net.b)):
        lin = torch.nn.Linear(W.shape[1], W.shape[0], dtype=dt)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(W))
            lin.bias.copy_(torch.from_numpy(b))
        layers.append(lin)
        if spec.activation(l) != "softmax":      # softmax is inside CrossEntropyLoss
            layers.append(act[spec.activation(l)]())
    return torch.nn.Sequential(*layers)


def torch_model(net):
    """parnn's layer-list network `net` (conv, pool, dense) as a torch.nn.Sequential with its
    weights: the same function of the (B, 784) rows. torch is NCHW and parnn NHWC, so a conv
    kernel (C_out, k, k, C_in) becomes (C_out, C_in, k, k), and the flatten before the first
    dense layer goes back to NHWC first, so that dense layer keeps parnn's column order."""
    import torch

    from parnn.core.conv import Conv2D, Flatten, MaxPool2D

    nn = torch.nn
    dt = getattr(torch, net.spec.dtype)
    act = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
    H, W, C = net.layers[0].in_shape
    layers = [nn.Unflatten(1, (H, W, C)), permute(0, 3, 1, 2)]     # rows -> NHWC -> NCHW
    for layer, p in zip(net.layers, net.layer_params):
        if isinstance(layer, Conv2D):
            mod = nn.Conv2d(layer.c_in, layer.c_out, layer.k, padding=layer.pad, dtype=dt)
            weight = torch.from_numpy(np.ascontiguousarray(p[0].transpose(0, 3, 1, 2)))
        elif isinstance(layer, MaxPool2D):
            layers.append(nn.MaxPool2d(2))
            continue
        elif isinstance(layer, Flatten):
            layers += [permute(0, 2, 3, 1), nn.Flatten()]             # NCHW -> NHWC -> rows
            continue
        else:                                                         # Dense
            mod = nn.Linear(layer.n_in, layer.n_out, dtype=dt)
            weight = torch.from_numpy(p[0])
        with torch.no_grad():
            mod.weight.copy_(weight)
            mod.bias.copy_(torch.from_numpy(p[1]))
        layers.append(mod)
        if layer.activation in act:              # the output layer's softmax: in the loss
            layers.append(act[layer.activation]())
    return nn.Sequential(*layers)


def permute(*dims):
    """A torch module that permutes its input's dimensions (torch has none of its own)."""
    import torch

    class _Permute(torch.nn.Module):
        def forward(self, x):
            return x.permute(*dims)

    return _Permute()


def sklearn_run(w, threads, warm_up=False):
    """MLPClassifier, configured as close as it allows: same hidden layers and activation, same
    solver (sgd without momentum at batch 1, or adam at batch 128), same lr, no L2 penalty. Its
    output layer is ALWAYS softmax with log-loss (no tanh + MSE), and it draws its own init and
    sample order. The whole fit() call is timed; BLAS threads limited to `threads`."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier
    from threadpoolctl import threadpool_limits

    cfg, spec = w.cfg, w.spec
    act = {"tanh": "tanh", "relu": "relu", "sigmoid": "logistic"}[spec.hidden]
    kw = dict(solver="sgd", momentum=0.0, nesterovs_momentum=False) if cfg.optimizer == "sgd" \
        else dict(solver="adam")
    clf = MLPClassifier(hidden_layer_sizes=spec.sizes[1:-1], activation=act, alpha=0.0,
                        batch_size=cfg.batch_size, learning_rate_init=cfg.lr,
                        max_iter=1 if warm_up else cfg.epochs, shuffle=True,
                        random_state=cfg.seed, tol=0.0, n_iter_no_change=cfg.epochs + 1, **kw)
    X, y = (w.X[:WARMUP_SAMPLES], w.y[:WARMUP_SAMPLES]) if warm_up else (w.X, w.y)
    with threadpool_limits(threads, user_api="blas"), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        with Timer() as t:
            clf.fit(X, y)
    if warm_up:
        return None
    return {"time_s": t.seconds, "others": t.others,
            "test_acc": float(clf.score(w.X_test, w.y_test)), "dtype": str(clf.coefs_[0].dtype)}


def jax_run(w, threads, warm_up=False):
    """The same network, init, sample order and optimizer in JAX, written as JAX is fastest:
    the whole epoch ONE jitted `lax.scan` over the full batches (the gather X[idx], forward,
    `jax.grad`, the optax step; for a CNN a loop of jitted steps instead, see run_epoch), the
    ragged last batch one more jitted step; the data on the
    device (uint8 pixels scaled to floats once, up front). Compiling is timed apart
    (compile_s), ahead of the clock. XLA sizes its thread pool from the cores it sees: run it
    pinned (pinned_run), `threads` says nothing to it."""
    import time

    import jax
    import jax.numpy as jnp
    import optax

    from parnn.core.model import MLP
    from parnn.run.config import lr_at

    cfg, spec = w.cfg, w.spec
    dt = jnp.dtype(spec.dtype)
    if dt == jnp.float64:
        jax.config.update("jax_enable_x64", True)
    net = MLP(spec, init=cfg.init, seed=cfg.seed)
    params, logits = jax_model(net)
    act = {"tanh": jnp.tanh, "sigmoid": jax.nn.sigmoid, "relu": jax.nn.relu,
           "identity": lambda z: z}

    def loss(params, x, t):
        z = logits(params, x)
        if spec.loss == "cross_entropy":         # softmax inside, as parnn's output + loss
            return optax.softmax_cross_entropy(z, t).mean()
        p = act[spec.output](z)                  # parnn's mse: mean of 0.5 sum (p - t)^2
        return 0.5 * jnp.sum((p - t) ** 2) / x.shape[0]

    make = optax.adam if cfg.optimizer == "adam" else optax.sgd
    tx = optax.inject_hyperparams(make)(learning_rate=cfg.lr)   # lr set per epoch, no recompile
    X = jnp.asarray(w.X.astype(spec.dtype) / np.dtype(spec.dtype).type(255)
                    if w.X.dtype == np.uint8 else w.X)
    T = jnp.asarray(w.T)
    bs = cfg.batch_size

    def step(params, state, X, T, idx):
        g = jax.grad(loss)(params, X[idx], T[idx])
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    @jax.jit
    def epoch(params, state, X, T, batches):     # batches: (n_batches, bs) sample indices
        def body(carry, idx):
            return step(*carry, X, T, idx), None
        return jax.lax.scan(body, (params, state), batches)[0]

    tail_step = jax.jit(step)

    def split(order):
        full = len(order) // bs * bs
        return jnp.asarray(order[:full].reshape(-1, bs)), jnp.asarray(order[full:])

    state = tx.init(params)
    batches, tail = split(w.orders[0])
    if warm_up:                                  # nothing to warm: compiling is timed apart
        return None
    t0 = time.perf_counter()
    if spec.arch and len(batches):
        # XLA on CPU runs a convolution inside a loop (lax.scan) far slower than the same
        # one at the top level (docs/RESULTS.md, W3): a CNN's epoch loops over jitted steps
        run_step = jax.jit(step).lower(params, state, X, T, batches[0]).compile()

        def run_epoch(params, state, X, T, batches):
            for idx in batches:
                params, state = run_step(params, state, X, T, idx)
            return params, state
    else:
        run_epoch = epoch.lower(params, state, X, T, batches).compile()
    run_tail = tail_step.lower(params, state, X, T, tail).compile() if len(tail) else None
    compile_s = time.perf_counter() - t0
    epochs = [split(order) for order in w.orders]
    with Timer() as t:
        for e, (batches, tail) in enumerate(epochs, 1):
            state.hyperparams["learning_rate"] = jnp.asarray(lr_at(cfg, e), dt)
            params, state = run_epoch(params, state, X, T, batches)
            if run_tail is not None:
                params, state = run_tail(params, state, X, T, tail)
        jax.block_until_ready(params)
    X_test = jnp.asarray(w.X_test.astype(spec.dtype) / np.dtype(spec.dtype).type(255)
                         if w.X_test.dtype == np.uint8 else w.X_test)
    rows, scores = spec.rows_at_once(4096), jax.jit(logits)     # a CNN's: 256 images at a time
    pred = np.concatenate([np.asarray(scores(params, X_test[i:i + rows]).argmax(1))
                           for i in range(0, len(X_test), rows)])
    return {"time_s": t.seconds, "others": t.others, "test_acc": float(np.mean(pred == w.y_test)),
            "compile_s": round(compile_s, 3), "jax": jax.__version__}


def jax_model(net):
    """parnn's network `net` in JAX: (params, logits(params, x)), x the (B, 784) rows and
    logits the output layer's z. A dense layer is x @ W.T + b; a layer list's conv layers are
    lax.conv_general_dilated in parnn's own layouts (images NHWC, kernels (C_out, k, k, C_in) =
    OHWI), so its flatten needs no reordering; 2x2 max-pooling is a max over a reshape."""
    import jax
    import jax.numpy as jnp

    from parnn.core.conv import Conv2D, Flatten, MaxPool2D

    act = {"tanh": jnp.tanh, "sigmoid": jax.nn.sigmoid, "relu": jax.nn.relu,
           "identity": lambda z: z, "softmax": lambda z: z}     # softmax: in the loss
    spec = net.spec
    if not spec.arch:
        params = [(jnp.asarray(W.T), jnp.asarray(b)) for W, b in zip(net.W, net.b)]

        def mlp_logits(params, x):
            for l, (W, b) in enumerate(params):
                x = x @ W + b
                if l < len(params) - 1:
                    x = act[spec.hidden](x)
            return x
        return params, mlp_logits

    layers = net.layers
    params = [(jnp.asarray(p[0]), jnp.asarray(p[1])) if p else () for p in net.layer_params]

    def cnn_logits(params, x):
        x = x.reshape(len(x), *layers[0].in_shape)                 # (B, 28, 28, 1)
        for layer, p in zip(layers, params):
            if isinstance(layer, Conv2D):
                x = jax.lax.conv_general_dilated(
                    x, p[0], (1, 1), [(layer.pad, layer.pad)] * 2,
                    dimension_numbers=("NHWC", "OHWI", "NHWC")) + p[1]
            elif isinstance(layer, MaxPool2D):
                B, H, W, C = x.shape
                x = x.reshape(B, H // 2, 2, W // 2, 2, C).max(axis=(2, 4))
                continue
            elif isinstance(layer, Flatten):
                x = x.reshape(len(x), -1)
                continue
            else:
                x = x @ p[0].T + p[1]
            x = act[layer.activation](x)
        return x
    return params, cnn_logits


PEER_RUNS = {"torch": torch_run, "sklearn": sklearn_run, "jax": jax_run}


# --- the C reference --------------------------------------------------------------------------

def c_run(cdir, binary, threads, w, data_dir, warm_up=False):
    """One run of the C reference binary on the workload's hidden sizes, epochs, lr and seed.
    (No warm-up: it has nothing to compile and times itself after loading.)"""
    if warm_up:
        return None
    return run_c_reference(c_reference_command(cdir, binary, threads, w.spec.sizes[1:3],
                                               len(w.orders), w.cfg.lr, w.cfg.seed, data_dir))
