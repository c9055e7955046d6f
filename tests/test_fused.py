"""The batch engine's fused kernels (parnn.engines.fused) against core's readable math, and the
fused path against the general one."""

import numpy as np
import pytest

from engine_check import TOL_EPOCH, restore_threads, synthetic, train  # noqa: F401
from parnn.core.layers import relu, relu_derivative, softmax
from parnn.core.losses import CrossEntropy, n_correct
from parnn.core.model import MLP, Spec
from parnn.core.optim import make_optimizer

fused = pytest.importorskip("parnn.engines.fused")
pytestmark = pytest.mark.skipif(not fused.available(), reason="numpy's BLAS has no cblas symbols")

DTYPES = ["float32", "float64"]


def data(rng, shape, dtype, negative_zeros=False):
    a = rng.standard_normal(shape).astype(dtype)
    a[rng.random(shape) < 0.2] = 0           # exact zeros: relu's and relu''s edge
    if negative_zeros:
        a[rng.random(shape) < 0.1] = -0.0
    return a


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ta, tb", [(False, False), (False, True), (True, False)])
def test_gemm_is_numpys_matmul_bit_for_bit(dtype, ta, tb):
    rng = np.random.default_rng(0)
    a = data(rng, (37, 23) if ta else (23, 37), dtype)
    b = data(rng, (19, 37) if tb else (37, 19), dtype)
    c = np.full((23, 19), np.nan, dtype)
    fused.gemm(ta, tb, a, b, c)
    assert np.array_equal(c, np.matmul(a.T if ta else a, b.T if tb else b))


# The fused kernels work feature-major: (features, samples), the transpose of core's arrays.

@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_relu_is_dense_forwards_epilogue(dtype):
    rng = np.random.default_rng(1)
    zT, b = data(rng, (40, 24), dtype, negative_zeros=True), data(rng, 40, dtype)
    zT[3, 5] = np.nan
    ref = zT.T.copy()                            # Dense.forward's epilogue: y += b, act(y)
    ref += b
    relu(ref)
    fused.bias_relu(zT, b)
    assert np.array_equal(zT.T, ref, equal_nan=True)
    assert np.array_equal(np.signbit(zT.T), np.signbit(ref))    # -0 became +0, as np.maximum


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_back_is_relu_derivative_then_the_bias_gradient(dtype):
    rng = np.random.default_rng(2)
    a, d = data(rng, (24, 40), dtype), data(rng, (24, 40), dtype)
    ref = relu_derivative(a, d.copy())
    dT, db = np.ascontiguousarray(d.T), np.empty(40, dtype)
    fused.relu_back(np.ascontiguousarray(a.T), dT, db)
    assert np.array_equal(dT.T, ref)
    assert np.array_equal(db, ref.sum(axis=0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_kernels_are_the_dropout_layers_masks_forward_and_backward(dtype):
    """Forward: relu, then the Dropout layer's x * mask (its masks, drawn by sample number).
    Backward: Dropout.backward's dy * mask, then relu'(a) with a the unmasked activations; the
    fused path takes relu' of the masked ones, which differs only where the mask is 0, and
    there d * 0 is what it multiplies: the same bits, signs of zero, inf and NaN included."""
    from parnn.core.layers import Dropout

    rng = np.random.default_rng(3)
    z, dy = data(rng, (40, 24), dtype, negative_zeros=True), data(rng, (40, 24), dtype, True)
    ids = rng.permutation(1000)[:40].astype(np.int64)
    layer = Dropout(24, 0.4, seed=5, layer=1, dtype=dtype)
    mask = layer.draw(3, ids).copy()
    assert 0 < (mask == 0).mean() < 1
    (r0, j0), (r1, j1) = np.argwhere(mask == 0)[:2]
    (r2, j2), (r3, j3) = np.argwhere(mask != 0)[:2]
    dy[r0, j0], dy[r2, j2] = np.inf, -np.inf        # inf * 0 where dropped, kept elsewhere
    z[r1, j1], z[r3, j3] = np.nan, np.inf           # a NaN dropped, an inf kept
    a = relu(z.copy())
    with np.errstate(invalid="ignore"):             # inf * 0
        ref_y = layer.forward((), a)
        ref_d = relu_derivative(a, layer.backward((), a, ref_y, dy.copy(), ()))
    assert np.isnan(ref_d).any() and np.isinf(ref_y).any()
    aT, MT = np.ascontiguousarray(a.T), np.empty((24, 40), dtype)
    rate, scale, keys = fused.dropout_of(0.4, 5, 3, 2, dtype)
    fused._mask(keys[1], ids, rate, scale, MT.T)                  # drawn feature-major
    fused.times_mask(aT, MT)
    assert np.array_equal(MT.T, mask) and np.array_equal(aT.T, ref_y, equal_nan=True)
    dT, db = np.ascontiguousarray(dy.T), np.empty(24, dtype)
    fused.times_mask(dT, MT)
    fused.relu_back(aT, dT, db)
    assert np.array_equal(dT.T, ref_d, equal_nan=True)
    assert np.array_equal(np.signbit(dT.T), np.signbit(ref_d))


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_xent_is_softmax_cross_entropy_delta_and_hits(dtype):
    rng = np.random.default_rng(3)
    zT, b = data(rng, (10, 24), dtype) * 5, data(rng, 10, dtype)
    zT[:, 7] = zT[0, 7]                          # ties: the first maximum is the prediction
    t = np.eye(10, dtype=dtype)[rng.integers(0, 10, 24)]
    scale = 1.0 / 48
    z = zT.T + b                                 # the reference: core's output layer
    p = softmax(z)
    loss_ref, hits_ref = CrossEntropy().value(p, t), n_correct(p, t)
    d_ref = CrossEntropy().delta(p, t, "softmax")
    d_ref *= scale
    dT, db = np.empty((10, 24), dtype), np.empty(10, dtype)
    loss, hits = fused.softmax_xent(zT, b, t, np.dtype(dtype).type(scale),
                                    np.finfo(dtype).tiny, dT, db)
    assert np.array_equal(zT.T, p)
    assert np.array_equal(dT.T, d_ref)
    assert np.array_equal(db, d_ref.sum(axis=0))
    assert hits == hits_ref
    assert loss == pytest.approx(loss_ref, rel=1e-5 if dtype == "float32" else 1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shards", [1, 2, 3])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_adam_sum_is_the_shard_sum_then_adam_step_in_any_parts(dtype, shards, weight_decay):
    rng = np.random.default_rng(4)
    n = 1000
    G = data(rng, (shards, n), dtype) * 1e-2
    ref = make_optimizer("adam", n, dtype, 1e-3, weight_decay=weight_decay)
    opt = make_optimizer("adam", n, dtype, 1e-3, weight_decay=weight_decay)
    p_ref = data(rng, n, dtype)
    p = p_ref.copy()
    f = np.dtype(dtype).type
    for step in range(1, 4):
        grad = G[0].copy()
        for s in range(1, shards):
            grad += G[s]
        ref.step(p_ref, grad)
        eps_t, lr_t = opt.scalars(step)
        for lo, hi in [(0, 336), (336, n)]:      # two threads' parts
            fused.adam_sum(p, G.copy(), opt.m, opt.v, lo, hi, f(0.9), f(1 - 0.9), f(0.999),
                           f(1 - 0.999), f(eps_t), f(lr_t), f(opt.decay()))
        assert np.array_equal(opt.m, ref.m) and np.array_equal(opt.v, ref.v)
        if dtype == "float64":
            assert np.array_equal(p, p_ref)
        else:                                    # float32 throughout: the update rounds apart
            assert np.all(np.abs(p - p_ref) <= np.spacing(np.abs(p_ref)))    # 1 ulp
            assert np.abs(p - p_ref).max() > 0                               # not a copy
            p_ref[...] = p                       # the next step from the same parameters


SPEC = Spec((784, 24, 16, 10), "relu", "softmax", "cross_entropy", "float32")


def pixels(n, seed=4):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, 784)) * (rng.random((n, 784)) < 0.5)).astype(np.uint8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shards", [1, 2, 3])
def test_fused_path_same_bits_at_any_thread_count_and_close_to_the_general_path(dtype, shards):
    from parnn.engines import make_engine

    spec = Spec(SPEC.sizes, "relu", "softmax", "cross_entropy", dtype)
    X8 = pixels(203)
    _, T, order = synthetic(spec, 203)             # 6 batches of 32 and one of 11
    assert make_engine("batch").fuses(MLP(spec), make_optimizer("adam", 1, dtype, 0.1), X8, 32)
    kw = dict(optimizer="adam", lr=0.01, batch_size=32, shards=shards)
    runs = [train("batch", spec, X8, T, order, threads=p, **kw) for p in (1, 2)]
    (one, opt1, s1), (two, _, s2) = runs
    assert np.array_equal(one.params, two.params)
    assert (s1.loss_sum, s1.correct, s1.n) == (s2.loss_sum, s2.correct, s2.n)
    assert s1.n == 203 and opt1.t == 7
    # the general path: the same math; feature-major GEMMs and float32 Adam round apart
    ref, _, ref_stats = train("batch", spec, X8, T, order, threads=1, fused=False, **kw)
    assert np.abs(one.params - ref.params).max() <= TOL_EPOCH[dtype]
    assert s1.correct == ref_stats.correct
    assert s1.loss_sum == pytest.approx(ref_stats.loss_sum, rel=1e-4)
    X = X8.astype(dtype) / np.dtype(dtype).type(255)      # floats: the same bits as pixels
    floats, _, fstats = train("batch", spec, X, T, order, threads=2, **kw)
    assert np.array_equal(floats.params, one.params)
    assert (fstats.loss_sum, fstats.correct) == (s1.loss_sum, s1.correct)


@pytest.mark.parametrize("aug", [dict(shift=2, hflip=True),
                                 dict(shift=0.5, rotate=3.0, scale=0.03, subpixel=True)],
                         ids=["shift2+flip", "affine"])
def test_fused_path_trains_on_the_general_paths_augmented_batches(aug, monkeypatch):
    """Augmented batches, written AUGMENT_BATCHES at a time by the augmentation kernel as the
    general path writes them, then trained on the fused path: the same bits at 1 and 2 threads
    and whatever the block size, and the general path's result up to the paths' rounding."""
    from parnn.engines import batch
    from parnn.engines.batch import Augmentation

    spec = Spec(SPEC.sizes, "relu", "softmax", "cross_entropy", "float64")
    X8 = pixels(203)
    _, T, order = synthetic(spec, 203)             # 6 batches of 32 and one of 11
    kw = dict(optimizer="adam", lr=0.01, batch_size=32, augment=Augmentation(5, **aug))
    one, opt1, s1 = train("batch", spec, X8, T, order, threads=1, **kw)
    two, _, s2 = train("batch", spec, X8, T, order, threads=2, **kw)
    assert np.array_equal(one.params, two.params) and s1.correct == s2.correct
    assert opt1.t == 7 and s1.n == 203
    general, _, gs = train("batch", spec, X8, T, order, threads=2, fused=False, **kw)
    assert np.abs(one.params - general.params).max() <= TOL_EPOCH["float64"]
    assert s1.correct == gs.correct and s1.loss_sum == pytest.approx(gs.loss_sum, rel=1e-9)
    plain, _, _ = train("batch", spec, X8, T, order, threads=1, optimizer="adam", lr=0.01,
                        batch_size=32)
    assert not np.array_equal(plain.params, one.params)          # the batches were augmented
    monkeypatch.setattr(batch, "AUGMENT_BATCHES", 3)             # blocks of 3 batches
    blocks, bopt, bs = train("batch", spec, X8, T, order, threads=2, **kw)
    assert np.array_equal(blocks.params, one.params)
    assert (bs.n, bs.correct, bopt.t) == (s1.n, s1.correct, 7)   # stats summed over blocks
    assert bs.loss_sum == pytest.approx(s1.loss_sum, rel=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("augment", [False, True], ids=["plain", "shift2+flip"])
def test_fused_path_with_dropout_draws_the_general_paths_masks(dtype, augment):
    """Dropout on the fused path: each hidden layer's masks by (seed, epoch, layer, sample
    number), as the general path's Dropout layers draw them, also for augmented batches
    (trained from a block of copies, masked by the samples' own numbers): the same bits at 1
    and 2 threads, the general path's result up to the paths' rounding, and another epoch
    draws other masks."""
    from parnn.engines import make_engine
    from parnn.engines.batch import Augmentation, DropoutOption

    spec = Spec((784, 24, 16, 10), "relu", "softmax", "cross_entropy", dtype)
    X8 = pixels(203)
    _, T, order = synthetic(spec, 203)             # 6 batches of 32 and one of 11
    kw = dict(optimizer="adam", lr=0.01, batch_size=32, dropout=DropoutOption(0.3, 7),
              augment=Augmentation(5, shift=2, hflip=True) if augment else None)
    one, opt1, s1 = train("batch", spec, X8, T, order, threads=1, **kw)
    two, _, s2 = train("batch", spec, X8, T, order, threads=2, **kw)
    assert np.array_equal(one.params, two.params) and (s1.correct, s1.loss_sum) == (
        s2.correct, s2.loss_sum)
    assert opt1.t == 7 and s1.n == 203
    general, _, gs = train("batch", spec, X8, T, order, threads=2, fused=False, **kw)
    assert np.abs(one.params - general.params).max() <= TOL_EPOCH[dtype]
    assert s1.correct == gs.correct and s1.loss_sum == pytest.approx(gs.loss_sum, rel=1e-6)
    plain, _, _ = train("batch", spec, X8, T, order, threads=1,
                        **dict(kw, dropout=None))
    assert np.abs(one.params - plain.params).max() > 1e-3       # the masks did something
    nets = {}
    for fused_path in (True, False):                             # epoch 2's masks
        net = MLP(spec, seed=0)
        engine = make_engine("batch", fused=fused_path, **{k: kw[k] for k in ("dropout",
                                                                              "augment")})
        engine.train(net, make_optimizer("adam", spec.n_params, dtype, 0.01), X8, T, order, 32,
                     epoch=2)
        assert engine.info()["path"] == ("fused" if fused_path else "general")
        nets[fused_path] = net.params
    assert np.abs(nets[True] - nets[False]).max() <= TOL_EPOCH[dtype]
    assert np.abs(nets[True] - one.params).max() > 1e-3


@pytest.mark.parametrize("shards", [2, 3])
def test_a_last_batch_smaller_than_the_shards_leaves_empty_shards_that_add_nothing(shards):
    spec = Spec(SPEC.sizes, "relu", "softmax", "cross_entropy", "float64")
    X8 = pixels(193)
    _, T, order = synthetic(spec, 193)             # 6 batches of 32 and one of 1 sample
    kw = dict(optimizer="adam", lr=0.01, batch_size=32, shards=shards)
    one, opt, s1 = train("batch", spec, X8, T, order, threads=1, **kw)
    two, _, s2 = train("batch", spec, X8, T, order, threads=2, **kw)
    general, _, gs = train("batch", spec, X8, T, order, threads=1, fused=False, **kw)
    assert opt.t == 7 and s1.n == 193 and np.isfinite(one.params).all()
    assert np.array_equal(one.params, two.params) and s1.correct == s2.correct
    assert np.abs(one.params - general.params).max() <= TOL_EPOCH["float64"]
    assert s1.correct == gs.correct and s1.loss_sum == pytest.approx(gs.loss_sum, rel=1e-9)


@pytest.mark.parametrize("sizes", [(784, 10), (784, 12, 10)])
def test_fused_path_without_or_with_one_hidden_layer_is_the_general_paths(sizes):
    spec = Spec(sizes, "relu", "softmax", "cross_entropy", "float64")
    X8 = pixels(150)
    _, T, order = synthetic(spec, 150)
    kw = dict(optimizer="adam", lr=0.01, batch_size=32, threads=2)
    fused_net, _, fs = train("batch", spec, X8, T, order, **kw)
    general, _, gs = train("batch", spec, X8, T, order, fused=False, **kw)
    assert np.abs(fused_net.params - general.params).max() <= TOL_EPOCH["float64"]
    assert fs.correct == gs.correct and fs.loss_sum == pytest.approx(gs.loss_sum, rel=1e-9)


def test_threads_that_give_up_on_each_other_leave_the_same_bits(restore_threads):
    import numba

    from parnn.engines import make_engine

    X8 = pixels(203)
    _, T, order = synthetic(SPEC, 203)
    runs = []
    for threads, patience in [(1, ()), (2, ()), (2, (-1,))]:
        numba.set_num_threads(threads)
        net, opt = MLP(SPEC, seed=0), make_optimizer("adam", SPEC.n_params, SPEC.dtype, 0.01)
        engine = make_engine("batch")
        engine._patience = patience                # -1: give up after the first batch
        stats = engine.train(net, opt, X8, T, order, 32)
        runs.append((net.params, stats, engine.solo_batches))
    (one, s1, _), (two, s2, _), (solo, s3, n_solo) = runs
    assert n_solo == 6                               # 7 batches, the first one on 2 threads
    assert np.array_equal(one, two) and np.array_equal(one, solo)
    assert (s1.loss_sum, s1.correct) == (s2.loss_sum, s2.correct) == (s3.loss_sum, s3.correct)


@pytest.mark.parametrize("failing", [0, 1])
def test_a_thread_that_fails_before_its_chunk_does_not_leave_its_partner_spinning(
        failing, restore_threads, monkeypatch):
    import numba

    from parnn.engines import fused, make_engine
    from synthetic_data import no_hang

    X8 = pixels(203)
    _, T, order = synthetic(SPEC, 203)
    numba.set_num_threads(2)
    real = fused.train

    def train(plan, tid, *args, **kw):
        if tid == failing:
            raise KeyboardInterrupt
        return real(plan, tid, *args, **kw)

    monkeypatch.setattr(fused, "train", train)
    net, opt = MLP(SPEC, seed=0), make_optimizer("adam", SPEC.n_params, SPEC.dtype, 0.01)
    with pytest.raises(KeyboardInterrupt), no_hang(20):
        make_engine("batch").train(net, opt, X8, T, order, 32)


def test_fused_path_is_taken_only_where_it_applies():
    from parnn.engines import make_engine
    from parnn.engines.batch import Augmentation, DropoutOption

    X8, adam = pixels(64), make_optimizer("adam", 1, "float32", 0.1)
    net = MLP(SPEC)
    assert make_engine("batch").fuses(net, adam, X8, 32)
    assert not make_engine("batch", fused=False).fuses(net, adam, X8, 32)
    assert not make_engine("batch").fuses(net, adam, X8, 64)                 # full batch
    assert not make_engine("batch").fuses(net, make_optimizer("sgd", 1, "float32", 0.1), X8, 32)
    assert make_engine("batch", dropout=DropoutOption(0.3, 1)).fuses(net, adam, X8, 32)
    assert make_engine("batch", augment=Augmentation(1, 2)).fuses(net, adam, X8, 32)
    assert not make_engine("batch").fuses(MLP(Spec((784, 24, 10), "tanh", "softmax",
                                                   "cross_entropy", "float32")), adam, X8, 32)
    # a run says which path it took (their bits differ by rounding): the run's info records it
    T = np.eye(10, dtype=np.float32)[np.arange(64) % 10]
    for fused, path in ((True, "fused"), (False, "general")):
        engine = make_engine("batch", fused=fused)
        assert engine.info()["path"] is None
        engine.train(MLP(SPEC), make_optimizer("adam", SPEC.n_params, "float32", 1e-3), X8, T,
                     np.arange(64), 32)
        assert engine.info()["path"] == path and engine.info()["solo_batches"] == 0
