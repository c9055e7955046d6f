"""Convolutional layer kinds (parnn.core.conv): each forward/backward pair against central finite
differences in float64, the compiled kernels against the NumPy reference bit for bit (at any
thread count), float32 against float64, PyTorch as an independent oracle when installed, and
the layer list's spelling and its one-line refusals."""

import numpy as np
import pytest

from parnn.core import conv
from parnn.core.conv import Conv2D, Flatten, MaxPool2D, parse_layers
from parnn.core.layers import param_views
from parnn.core.model import MLP, Spec, init_params
from parnn.errors import ConfigError
from test_model import numeric_gradient


def _layer_loss_check(layer, x, rng, h=1e-6):
    """L = sum(y * R) for a fixed random R: backward with dy = R must give dL/dx and dL/dp."""
    params = rng.standard_normal(layer.n_params) * 0.5
    p = param_views([layer], params)[0]
    y = layer.forward(p, x.copy())
    R = rng.standard_normal(y.shape)

    def loss():
        return float((layer.forward(p, x.copy()) * R).sum())

    grad = np.empty_like(params)
    g = param_views([layer], grad)[0]
    layer.forward(p, x)                       # backward follows the forward of the same x
    dx = layer.backward(p, x, y, R.copy(), g, propagate=True)
    np.testing.assert_allclose(grad, numeric_gradient(params, loss, h), rtol=1e-5, atol=1e-7)
    xf = x.reshape(-1)                          # dL/dx: perturb the input (a view of x)
    np.testing.assert_allclose(dx.reshape(-1), numeric_gradient(xf, loss, h), rtol=1e-5,
                               atol=1e-7)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("padding,k", [("same", 3), ("valid", 3), ("same", 1), ("valid", 2)])
@pytest.mark.parametrize("activation", ["identity", "tanh", "relu"])
def test_conv2d_gradient_matches_central_differences(padding, k, activation, compiled):
    rng = np.random.default_rng(1)
    layer = Conv2D((5, 6, 2), 3, k, padding, activation, compiled)
    _layer_loss_check(layer, rng.standard_normal((2, 5, 6, 2)), rng)


@pytest.mark.parametrize("compiled", [False, True])
def test_maxpool_gradient_matches_central_differences(compiled):
    rng = np.random.default_rng(2)
    layer = MaxPool2D((4, 6, 3), compiled)
    # distinct values far apart: no window has two maxima within h of each other
    x = rng.permutation(2 * 4 * 6 * 3).reshape(2, 4, 6, 3) * 0.01
    _layer_loss_check(layer, x.astype(np.float64), rng)


def test_flatten_gradient_matches_central_differences():
    rng = np.random.default_rng(3)
    _layer_loss_check(Flatten((3, 2, 4)), rng.standard_normal((2, 3, 2, 4)), rng)


def test_maxpool_sends_the_gradient_to_the_first_of_equal_maxima():
    x = np.zeros((1, 2, 2, 1))
    for compiled in (False, True):
        dx = MaxPool2D((2, 2, 1), compiled).backward((), x, None, np.ones((1, 1, 1, 1)), ())
        assert dx.reshape(-1).tolist() == [1, 0, 0, 0]


TINY = "conv2:3,pool,conv3:3:valid,dense4"      # 6x6 -> 6x6x2 -> 3x3x2 -> 1x1x3 -> 4 -> 3


@pytest.mark.parametrize("hidden,output,loss", [("tanh", "softmax", "cross_entropy"),
                                                ("relu", "softmax", "cross_entropy"),
                                                ("sigmoid", "tanh", "mse")])
def test_a_cnn_gradient_matches_central_differences(hidden, output, loss):
    spec = Spec((36, 3), hidden, output, loss, "float64", TINY)
    net = MLP(spec, init="xavier", seed=3)
    rng = np.random.default_rng(4)
    X, T = rng.random((5, 36)), np.eye(3)[rng.integers(0, 3, 5)]
    grad = np.empty_like(net.params)
    net.backward(net.forward(X), T, grad)

    def mean_loss():
        return net.backward(net.forward(X), T, np.empty_like(net.params)) / len(X)

    np.testing.assert_allclose(grad, numeric_gradient(net.params, mean_loss), rtol=1e-5, atol=1e-8)


def _pair(arch, dtype="float64", seed=5):
    spec = Spec((784, 10), "relu", "softmax", "cross_entropy", dtype, arch)
    params = init_params(spec, "he", seed)
    ref = MLP(spec, params.copy())
    ref.layers = spec.layers(compiled=False)
    ref.layer_params = param_views(ref.layers, ref.params)
    return ref, MLP(spec, params.copy())


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_compiled_kernels_give_the_references_bits_at_any_thread_count(dtype):
    import numba

    ref, fast = _pair("conv4:3,pool,conv6:5:valid,pool,dense8", dtype)
    rng = np.random.default_rng(6)
    X = rng.random((7, 784)).astype(dtype)
    T = np.eye(10, dtype=dtype)[rng.integers(0, 10, 7)]
    want = np.empty_like(ref.params)
    want_loss = ref.backward(ref.forward(X), T, want)
    before = numba.get_num_threads()
    try:
        for threads in sorted({1, before}):
            numba.set_num_threads(threads)
            got = np.empty_like(fast.params)
            assert fast.backward(fast.forward(X), T, got) == want_loss
            np.testing.assert_array_equal(got, want)
    finally:
        numba.set_num_threads(before)


def test_float32_forward_agrees_with_float64():
    spec64 = Spec((784, 10), "relu", "softmax", "cross_entropy", "float64",
                  "conv8:3,pool,conv16:3,pool,dense32")
    net64 = MLP(spec64, init="he", seed=7)
    spec32 = Spec((784, 10), "relu", "softmax", "cross_entropy", "float32", spec64.arch)
    net32 = MLP(spec32, net64.params.astype(np.float32))
    X = np.random.default_rng(8).random((20, 784))
    np.testing.assert_allclose(net32.output(X.astype(np.float32)), net64.output(X),
                               rtol=1e-4, atol=1e-5)


def test_batches_larger_than_a_chunk_give_the_same_outputs_and_gradients(monkeypatch):
    ref, _ = _pair("conv3:3,pool,dense5")
    rng = np.random.default_rng(9)
    X, T = rng.random((9, 784)), np.eye(10)[rng.integers(0, 10, 9)]
    want = np.empty_like(ref.params)
    want_out = ref.forward(X)[-1].copy()
    ref.backward(ref.forward(X), T, want)
    monkeypatch.setattr(conv, "CHUNK", 4)           # 9 samples: chunks of 4, 4, 1
    got = np.empty_like(ref.params)
    acts = ref.forward(X)
    np.testing.assert_allclose(acts[-1], want_out, rtol=1e-13)
    ref.backward(acts, T, got)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_conv_matches_pytorch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(10)
    layer = Conv2D((6, 5, 3), 4, 3, "same", "identity")
    params = rng.standard_normal(layer.n_params)
    W, b = param_views([layer], params)[0]
    x = rng.standard_normal((2, 6, 5, 3))
    y = layer.forward((W, b), x)
    want = torch.nn.functional.conv2d(torch.from_numpy(x).permute(0, 3, 1, 2),
                                      torch.from_numpy(W).permute(0, 3, 1, 2),
                                      torch.from_numpy(b), padding=1)
    np.testing.assert_allclose(y, want.permute(0, 2, 3, 1).numpy(), rtol=1e-12, atol=1e-12)


def test_the_default_cnn_layer_list():
    layers = parse_layers("conv32:3,pool,conv64:3,pool,dense128", 784, 10, "relu")
    assert [type(l).__name__ for l in layers] == ["Conv2D", "MaxPool2D", "Conv2D", "MaxPool2D",
                                                  "Flatten", "Dense", "Dense"]
    assert [l.out_shape for l in layers] == [(28, 28, 32), (14, 14, 32), (14, 14, 64),
                                             (7, 7, 64), (3136,), (128,), (10,)]
    spec = Spec((784, 10), "relu", "softmax", "cross_entropy", "float32",
                "conv32:3,pool,conv64:3,pool,dense128")
    assert spec.n_params == 32 * 9 + 32 + 64 * 9 * 32 + 64 + 3136 * 128 + 128 + 128 * 10 + 10
    assert spec.shapes() == [(32, 3, 3, 1), (64, 3, 3, 32), (128, 3136), (10, 128)]


def test_he_init_of_a_conv_kernel_uses_its_fan_in():
    spec = Spec((784, 10), "relu", "softmax", "cross_entropy", "float64", "conv64:3,conv64:3")
    W = MLP(spec, init="he", seed=1).W[1]          # fan_in 9 * 64 = 576
    assert W.shape == (64, 3, 3, 64)
    assert abs(W.std() - np.sqrt(2 / 576)) < 0.003
    assert (MLP(spec, init="he", seed=1).params == MLP(spec, init="he", seed=1).params).all()


@pytest.mark.parametrize("arch,sizes,words", [
    ("conv32:3,pool,bogus", (784, 10), "layer 3 ('bogus'): unknown layer"),
    ("conv32", (784, 10), "spelled convC:K"),
    ("conv32:0", (784, 10), "spelled convC:K"),
    ("conv32:4", (784, 10), "padding same needs an odd kernel"),
    ("conv8:3,pool,pool,pool", (784, 10), "even height and width, got 7x7"),
    ("dense64,conv8:3", (784, 10), "a convolution needs an image"),
    ("conv8:3:valid,conv8:30:valid", (784, 10), "does not fit a 26x26 image"),
    ("conv8:3", (785, 10), "not a square number"),
    ("conv8:3,", (784, 10), "unknown layer"),
    ("conv8:3", (784, 64, 10), "replaces the hidden sizes"),
    ("dense0", (784, 10), "unknown layer"),
])
def test_a_bad_layer_list_is_one_clear_line(arch, sizes, words):
    with pytest.raises(ConfigError) as err:
        Spec(sizes, "relu", "softmax", "cross_entropy", "float32", arch)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_an_mlp_spec_dict_is_unchanged_and_a_cnn_one_round_trips():
    assert "arch" not in Spec().to_dict()
    spec = Spec((784, 10), "relu", "softmax", "cross_entropy", "float32", "conv8:5:valid,pool")
    assert spec.to_dict()["arch"] == "conv8:5:valid,pool"
    assert Spec(**spec.to_dict()) == spec


def test_per_sample_engines_refuse_a_layer_list_and_its_shape_reads_as_written():
    from parnn.engines import PER_SAMPLE, make_engine

    spec = Spec((784, 10), "relu", "softmax", "cross_entropy", "float32", "conv4:3,pool,dense8")
    for name in PER_SAMPLE:
        with pytest.raises(ConfigError, match=f"engine {name} trains dense layers sample by "
                                              "sample, not the layer list conv4:3,pool,dense8"):
            make_engine(name).check(spec, "sgd", 1)
    assert spec.shape_text() == "784-[conv4:3,pool,dense8]-10"
    assert Spec((784, 64, 10)).shape_text() == "784-64-10"


def test_an_empty_batch_gives_an_empty_output():
    net = MLP(Spec((784, 10), "relu", "softmax", "cross_entropy", "float32", "conv4:3,pool,dense8"))
    assert net.output(np.empty((0, 784), np.float32)).shape == (0, 10)
    assert net.forward(np.empty((0, 784), np.float32))[-1].shape == (0, 10)


def test_training_a_cnn_gives_the_same_bits_at_1_and_2_threads():
    """Numba's kernels write one sample per iteration; OpenBLAS splits the products' rows and
    columns, not their sums: so the batch engine's steps do not depend on the thread count."""
    import numba
    from threadpoolctl import threadpool_limits

    from parnn.core.optim import make_optimizer
    from parnn.engines.batch import BatchEngine

    spec = Spec((784, 10), "relu", "softmax", "cross_entropy", "float32",
                "conv8:3,pool,conv16:3,pool,dense32")
    rng = np.random.default_rng(0)
    X = rng.random((512, 784), dtype=np.float32)
    T = np.eye(10, dtype=np.float32)[rng.integers(0, 10, 512)]
    order = rng.permutation(512)
    before, params = numba.get_num_threads(), []
    try:
        for threads in (1, 2):
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
            with threadpool_limits(threads):
                net = MLP(spec, init="he", seed=1)
                opt = make_optimizer("adam", spec.n_params, "float32", 1e-3)
                BatchEngine().train(net, opt, X, T, order, 128)
                params.append(net.params)
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(params[0], params[1])


def test_the_memory_estimate_counts_a_cnns_images_and_im2col_columns(monkeypatch):
    """A full batch of a CNN is refused up front, not swapped: every layer's image per sample
    (and a conv layer's k*k*C_in columns per output pixel) counts, not only the dense sizes."""
    from parnn.run import config, memory

    cfg = config.make_config(layers="conv4:3,pool,dense8", batch_size="full")
    per_sample = (784                      # the input
                  + 28 * 28 * 4 + 28 * 28 * 3 * 3 * 1   # conv: its image, its columns
                  + 14 * 14 * 4 + 784      # pool, flatten
                  + 8 + 10)                # dense, output
    assert memory.estimate(cfg, cfg.spec(), 1000)["activations"] == 2 * 1000 * per_sample * 4
    huge = config.make_config(layers=config.CNN_LAYERS, batch_size="full")
    monkeypatch.setattr(memory, "available", lambda: 24 * 2**30)   # this machine's size
    with pytest.raises(ConfigError, match="this run needs about .* GB of memory"):
        memory.check(huge, huge.spec(), 60000, 10000)


def test_a_cnn_trains_in_one_shard_where_numbas_workqueue_layer_forbids_two(tmp_path):
    """Numba's fallback threading layer aborts the process when two threads run parallel
    kernels at once: there the batch engine trains a CNN in one shard, and says so."""
    import subprocess
    import sys

    code = """
import numpy as np
from parnn.core.model import MLP, Spec
from parnn.core.optim import make_optimizer
from parnn.engines.batch import BatchEngine
spec = Spec((784, 10), "relu", "softmax", "cross_entropy", "float32", "conv4:3,pool,dense8")
rng = np.random.default_rng(0)
X = rng.random((256, 784), dtype=np.float32)
T = np.eye(10, dtype=np.float32)[rng.integers(0, 10, 256)]
net = MLP(spec, init="he", seed=1)
engine = BatchEngine()
engine.train(net, make_optimizer("adam", spec.n_params, "float32", 1e-3), X, T,
             rng.permutation(256), 64)
print(engine.shards_for(spec), engine.shards_for(Spec((784, 8, 10))))
"""
    env = dict(__import__("os").environ, NUMBA_THREADING_LAYER="workqueue", NUMBA_NUM_THREADS="2")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["1", "2"]          # a CNN: one shard; an MLP: two
