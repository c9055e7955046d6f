"""The batch engine against the NumPy reference engine, and its gradient-reduce hook."""

import numpy as np
import pytest

from engine_check import (COMBOS, DATA_DIR, PER_SAMPLE, SIZES, TOL_EPOCH, TOL_STEP,  # noqa: F401
                          assert_close_to_numpy, engine, restore_threads, synthetic, train)
from parnn.core.model import MLP, Spec
from parnn.core.optim import make_optimizer
from parnn.engines import make_engine
from parnn.errors import ConfigError


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("combo", COMBOS, ids="-".join)
@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_batch_engine_matches_numpy(optimizer, combo, dtype):
    spec = Spec(SIZES, *combo, dtype)
    X, T, order = synthetic(spec, 500)
    kw = dict(optimizer=optimizer, lr=0.01, threads=2)
    assert_close_to_numpy("batch", spec, X, T, order[:32], TOL_STEP[dtype], batch_size=32, **kw)
    # 500 = 15 batches of 32 and one of 20: several optimizer steps and a ragged last batch
    assert_close_to_numpy("batch", spec, X, T, order, TOL_EPOCH[dtype], batch_size=32, **kw)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_batch_engine_full_batch_and_batch_of_one(dtype):
    spec = Spec(SIZES, "relu", "softmax", "cross_entropy", dtype)
    X, T, order = synthetic(spec, 300)
    # full batch: three Adam steps on all of X, the same net carried on from step to step
    # (the batch engine uses X as it is, numpy gathers it in the shuffled order)
    three_epochs = np.concatenate([order, order[::-1], order])
    assert_close_to_numpy("batch", spec, X, T, three_epochs, TOL_EPOCH[dtype], batch_size=300,
                          optimizer="adam", lr=0.01)
    net, opt, _ = train("batch", spec, X, T, three_epochs, batch_size=300, optimizer="adam",
                        lr=0.01)
    assert opt.t == 3
    assert_close_to_numpy("batch", spec, X, T, order[:50], TOL_EPOCH[dtype], batch_size=1,
                          optimizer="adam", lr=0.01)


class Doubling:
    """A gradient-reduce hook standing in for MPI: this process computes the whole batch, and
    the 'sum over processes' doubles the gradient (as two identical ranks would)."""

    def __init__(self):
        self.calls = 0

    def part(self, idx):
        return idx

    def reduce(self, grad):
        self.calls += 1
        grad *= 2


class Idle(Doubling):
    """This process's part of every batch is empty (a batch smaller than the ranks)."""

    def part(self, idx):
        return idx[:0]


@pytest.mark.parametrize("shards", [1, 2])
def test_batch_engine_reduces_the_gradient_before_each_step(shards):
    spec = Spec(SIZES, "tanh", "tanh", "mse", "float64")
    X, T, order = synthetic(spec, 100)
    hook = Doubling()
    net, opt = MLP(spec, seed=0), make_optimizer("sgd", spec.n_params, spec.dtype, 0.05)
    stats = make_engine("batch", reducer=hook, shards=shards).train(net, opt, X, T, order, 16)
    # lr * (2 g) == (2 lr) * g exactly: doubling is exact in floating point
    ref, ref_opt, ref_stats = train("batch", spec, X, T, order, optimizer="sgd", lr=0.1,
                                    batch_size=16, shards=shards)
    assert hook.calls == opt.t == 7                      # 6 batches of 16 and one of 4
    assert np.array_equal(net.params, ref.params)
    assert (stats.loss_sum, stats.correct, stats.n) == \
        (ref_stats.loss_sum, ref_stats.correct, ref_stats.n)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_batch_engine_with_an_empty_part_adds_a_zero_gradient(optimizer):
    spec = Spec(SIZES, "relu", "softmax", "cross_entropy", "float32")
    X, T, order = synthetic(spec, 10)
    net = MLP(spec, seed=0)
    before = net.params.copy()
    opt = make_optimizer(optimizer, spec.n_params, spec.dtype, 0.1)
    hook = Idle()
    stats = make_engine("batch", reducer=hook).train(net, opt, X, T, order, 4)
    assert (stats.loss_sum, stats.correct, stats.n) == (0.0, 0, 0)
    assert hook.calls == opt.t == 3                      # every rank steps, idle or not
    assert np.array_equal(net.params, before)            # a zero mean gradient moves nothing


def test_batch_engine_refusals():
    spec = Spec(SIZES)
    for opt in ("sgd", "momentum", "adam"):
        make_engine("batch").check(spec, opt, 128)
    with pytest.raises(ConfigError, match="unknown optimizer 'lbfgs'"):
        make_engine("batch").check(spec, "lbfgs", 128)
    with pytest.raises(ConfigError, match="batch size must be"):
        make_engine("batch").check(spec, "sgd", 0)


# --- on-the-fly augmentation (run.config's `augment`) -------------------------------------------

AUG_SPEC = Spec((784, 16, 10), "relu", "softmax", "cross_entropy", "float64")


def test_batch_engine_augments_like_numpy_and_augmenting_changes_the_run():
    from parnn.engines.batch import Augmentation

    X, T, order = synthetic(AUG_SPEC, 200)
    aug = Augmentation(seed=3, shift=2, hflip=True)
    kw = dict(optimizer="adam", lr=0.01, batch_size=32, threads=2)
    assert_close_to_numpy("batch", AUG_SPEC, X, T, order, TOL_EPOCH["float64"], augment=aug, **kw)
    # full batch: gathered and transformed too, not X as it is
    assert_close_to_numpy("batch", AUG_SPEC, X, T, order, TOL_EPOCH["float64"], augment=aug,
                          **{**kw, "batch_size": 200})
    plain, _, _ = train("batch", AUG_SPEC, X, T, order, **kw)
    augmented, _, _ = train("batch", AUG_SPEC, X, T, order, augment=aug, **kw)
    assert not np.array_equal(plain.params, augmented.params)


@pytest.mark.parametrize("fused", [True, False], ids=["fused path", "general path"])
def test_augmented_batches_depend_on_seed_epoch_and_sample_not_threads_or_chunks(
        restore_threads, monkeypatch, fused):
    from parnn.engines import batch

    import numba

    from parnn.engines.batch import Augmentation

    X, T, order = synthetic(AUG_SPEC, 200)

    def run(threads, chunks, epoch=2, seed=3):
        numba.set_num_threads(threads)
        net = MLP(AUG_SPEC, seed=0)
        opt = make_optimizer("adam", AUG_SPEC.n_params, AUG_SPEC.dtype, 0.01)
        eng = make_engine("batch", augment=Augmentation(seed, shift=2, hflip=True), fused=fused)
        for part in np.split(order, chunks):      # whole batches of 20: a resumed epoch's chunks
            eng.train(net, opt, X, T, part, 20, epoch=epoch)
        assert eng.info()["path"] == ("fused" if fused and batch.BatchEngine().fuses(
            net, opt, X, 20) else "general")
        return net.params

    one = run(threads=1, chunks=1)
    assert np.array_equal(one, run(threads=2, chunks=2))
    assert np.array_equal(one, run(threads=2, chunks=5))
    monkeypatch.setattr(batch, "AUGMENT_BATCHES", 3)    # blocks of 3 batches, a short last one
    assert np.array_equal(one, run(threads=2, chunks=1))
    assert not np.array_equal(one, run(threads=1, chunks=1, epoch=3))
    assert not np.array_equal(one, run(threads=1, chunks=1, seed=4))


@pytest.mark.parametrize("fused", [True, False], ids=["fused path", "general path"])
def test_batch_engine_drops_out_like_numpy_and_independently_of_threads_and_chunks(
        restore_threads, fused):
    import numba

    from parnn.engines.batch import DropoutOption

    X, T, order = synthetic(AUG_SPEC, 200)
    drop = DropoutOption(0.3, seed=7)
    kw = dict(optimizer="adam", lr=0.01, batch_size=20, threads=2)
    for B in (20, 200):                          # 200: the whole set, the general path's
        ref, _, ref_stats = train("numpy", AUG_SPEC, X, T, order, dropout=drop,
                                  **{**kw, "batch_size": B})
        net, _, stats = train("batch", AUG_SPEC, X, T, order, dropout=drop, fused=fused,
                              **{**kw, "batch_size": B})
        assert np.abs(net.params - ref.params).max() <= TOL_EPOCH["float64"]
        assert stats.correct == ref_stats.correct

    def run(threads, chunks, epoch=2, seed=7):
        numba.set_num_threads(threads)
        net = MLP(AUG_SPEC, seed=0)
        opt = make_optimizer("adam", AUG_SPEC.n_params, AUG_SPEC.dtype, 0.01)
        eng = make_engine("batch", dropout=DropoutOption(0.3, seed), fused=fused)
        for part in np.split(order, chunks):
            eng.train(net, opt, X, T, part, 20, epoch=epoch)
        assert eng.info()["path"] == ("fused" if fused else "general")
        return net.params

    one = run(threads=1, chunks=1)
    assert np.array_equal(one, run(threads=2, chunks=5))
    assert not np.array_equal(one, run(threads=1, chunks=1, epoch=3))
    assert not np.array_equal(one, run(threads=1, chunks=1, seed=8))
    plain, _, _ = train("batch", AUG_SPEC, X, T, order, fused=fused, **kw)
    assert not np.array_equal(one, plain.params)


# --- uint8 pixels: the training set as stored, scaled per batch ---------------------------------

@pytest.mark.parametrize("fused", [True, False], ids=["fused path", "general path"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("batch_size, augment", [(32, False), (200, False), (32, True),
                                                 (200, True)])
def test_batch_engine_on_uint8_pixels_matches_the_scaled_float_copy_bitwise(dtype, batch_size,
                                                                          augment, fused):
    from parnn.engines.batch import Augmentation

    spec = Spec(AUG_SPEC.sizes, "relu", "softmax", "cross_entropy", dtype)
    rng = np.random.default_rng(4)
    X8 = (rng.integers(0, 256, (200, 784)) * (rng.random((200, 784)) < 0.5)).astype(np.uint8)
    X = X8.astype(dtype) / np.dtype(dtype).type(255)      # what the data path used to keep
    _, T, order = synthetic(spec, 200)
    kw = dict(optimizer="adam", lr=0.01, batch_size=batch_size, threads=2, fused=fused,
              augment=Augmentation(seed=3, shift=2, hflip=True) if augment else None)
    floats, _, fstats = train("batch", spec, X, T, order, **kw)
    pixels, _, pstats = train("batch", spec, X8, T, order, **kw)
    assert np.array_equal(pixels.params, floats.params)
    assert (pstats.loss_sum, pstats.correct) == (fstats.loss_sum, fstats.correct)
    assert not np.array_equal(pixels.params, MLP(spec, seed=0).params)     # it trained


# --- shards: each thread computes its share of a batch, summed in shard order -----------------

@pytest.mark.parametrize("shards", [2, 3])
@pytest.mark.parametrize("options", [{}, {"dropout": 0.3}, {"dropout": 0.3, "fused": False},
                                     {"augment": True}, {"augment": True, "fused": False}])
def test_sharded_batches_give_the_same_bits_at_any_thread_count(shards, options):
    from parnn.engines.batch import Augmentation, DropoutOption

    spec = Spec(AUG_SPEC.sizes, "relu", "softmax", "cross_entropy", "float32")
    X, T, order = synthetic(spec, 203)               # 6 batches of 32 and one of 11
    kw = dict(optimizer="adam", lr=0.01, batch_size=32, shards=shards)
    if "dropout" in options:
        kw["dropout"] = DropoutOption(options["dropout"], seed=7)
    if "augment" in options:
        kw["augment"] = Augmentation(seed=3, shift=2, hflip=True)
    engine_only = {"fused": options["fused"]} if "fused" in options else {}
    runs = [train("batch", spec, X, T, order, threads=p, **kw, **engine_only) for p in (1, 2)]
    (one, opt1, s1), others = runs[0], runs[1:]
    for net, opt, s in others:
        assert np.array_equal(net.params, one.params)
        assert (s.loss_sum, s.correct, s.n) == (s1.loss_sum, s1.correct, s1.n)
    assert s1.n == 203 and opt1.t == 7
    # and it is the batch's mean gradient all the same: numpy's result up to rounding
    kw.pop("shards")
    ref, _, ref_stats = train("numpy", spec, X, T, order, **kw)
    assert np.abs(one.params - ref.params).max() <= TOL_EPOCH["float32"]
    assert s1.correct == ref_stats.correct


def test_a_shards_error_is_raised_on_the_caller_and_the_threads_end():
    import threading

    spec = Spec(SIZES, "relu", "softmax", "cross_entropy", "float64")
    X, T, order = synthetic(spec, 64)
    net, opt = MLP(spec, seed=0), make_optimizer("sgd", spec.n_params, spec.dtype, 0.1)
    engine = make_engine("batch", shards=2)
    tnet, _ = engine.shard_nets(net, 32, 2)[1]

    def broken(*args, **kw):
        raise FloatingPointError("shard 1 broke")
    tnet.forward = broken                             # shard 1's network only
    before = threading.active_count()
    import numba
    numba.set_num_threads(2)
    with pytest.raises(FloatingPointError, match="shard 1 broke"):
        engine.train(net, opt, X, T, order, 32)
    assert threading.active_count() == before


class Layerwise(Doubling):
    """A hook that also records on_layer: which layers, in what order, and their gradient as it
    was when handed over (it must be final: the sum over the shards)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def on_layer(self, l, g_l):
        self.seen.append((l, [g.copy() for g in g_l]))

    def reduce(self, grad):
        self.final = grad.copy()
        super().reduce(grad)


@pytest.mark.parametrize("shards", [1, 2])
def test_on_layer_hands_over_each_layers_final_gradient_last_layer_first(shards):
    spec = Spec(SIZES, "relu", "softmax", "cross_entropy", "float64")
    X, T, order = synthetic(spec, 16)
    net, opt = MLP(spec, seed=0), make_optimizer("sgd", spec.n_params, spec.dtype, 0.1)
    hook = Layerwise()
    make_engine("batch", reducer=hook, shards=shards).train(net, opt, X, T, order, 16)
    assert [l for l, _ in hook.seen] == [2, 1, 0]
    o = 0
    for _, g_l in reversed(hook.seen):             # layer 0 first: the flat buffer's layout
        for g in g_l:
            assert np.array_equal(g.ravel(), hook.final[o:o + g.size])
            o += g.size
    assert o == spec.n_params
