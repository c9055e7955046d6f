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


def test_batch_engine_reduces_the_gradient_before_each_step():
    spec = Spec(SIZES, "tanh", "tanh", "mse", "float64")
    X, T, order = synthetic(spec, 100)
    hook = Doubling()
    net, opt = MLP(spec, seed=0), make_optimizer("sgd", spec.n_params, spec.dtype, 0.05)
    stats = make_engine("batch", reducer=hook).train(net, opt, X, T, order, 16)
    # lr * (2 g) == (2 lr) * g exactly: doubling is exact in floating point
    ref, ref_opt, ref_stats = train("batch", spec, X, T, order, optimizer="sgd", lr=0.1,
                                    batch_size=16)
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


def test_augmented_batches_depend_on_seed_epoch_and_sample_not_threads_or_chunks(
        restore_threads, monkeypatch):
    from parnn.engines import batch

    import numba

    from parnn.engines.batch import Augmentation

    X, T, order = synthetic(AUG_SPEC, 200)

    def run(threads, chunks, epoch=2, seed=3):
        numba.set_num_threads(threads)
        net = MLP(AUG_SPEC, seed=0)
        opt = make_optimizer("adam", AUG_SPEC.n_params, AUG_SPEC.dtype, 0.01)
        eng = make_engine("batch", augment=Augmentation(seed, shift=2, hflip=True))
        for part in np.split(order, chunks):      # whole batches of 20: a resumed epoch's chunks
            eng.train(net, opt, X, T, part, 20, epoch=epoch)
        return net.params

    one = run(threads=1, chunks=1)
    assert np.array_equal(one, run(threads=2, chunks=2))
    assert np.array_equal(one, run(threads=2, chunks=5))
    monkeypatch.setattr(batch, "AUGMENT_BATCHES", 3)    # blocks of 3 batches, a short last one
    assert np.array_equal(one, run(threads=2, chunks=1))
    assert not np.array_equal(one, run(threads=1, chunks=1, epoch=3))
    assert not np.array_equal(one, run(threads=1, chunks=1, seed=4))


def test_batch_engine_drops_out_like_numpy_and_independently_of_threads_and_chunks(restore_threads):
    import numba

    from parnn.engines.batch import DropoutOption

    X, T, order = synthetic(AUG_SPEC, 200)
    drop = DropoutOption(0.3, seed=7)
    kw = dict(optimizer="adam", lr=0.01, batch_size=20, threads=2)
    assert_close_to_numpy("batch", AUG_SPEC, X, T, order, TOL_EPOCH["float64"], dropout=drop, **kw)
    assert_close_to_numpy("batch", AUG_SPEC, X, T, order, TOL_EPOCH["float64"], dropout=drop,
                          **{**kw, "batch_size": 200})

    def run(threads, chunks, epoch=2, seed=7):
        numba.set_num_threads(threads)
        net = MLP(AUG_SPEC, seed=0)
        opt = make_optimizer("adam", AUG_SPEC.n_params, AUG_SPEC.dtype, 0.01)
        eng = make_engine("batch", dropout=DropoutOption(0.3, seed))
        for part in np.split(order, chunks):
            eng.train(net, opt, X, T, part, 20, epoch=epoch)
        return net.params

    one = run(threads=1, chunks=1)
    assert np.array_equal(one, run(threads=2, chunks=5))
    assert not np.array_equal(one, run(threads=1, chunks=1, epoch=3))
    assert not np.array_equal(one, run(threads=1, chunks=1, seed=8))
    plain, _, _ = train("batch", AUG_SPEC, X, T, order, **kw)
    assert not np.array_equal(one, plain.params)
