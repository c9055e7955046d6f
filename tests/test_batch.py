"""The batch engine against the NumPy reference engine."""

import numba
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
    for _ in range(3):                            # full batch: several Adam steps on all of X
        assert_close_to_numpy("batch", spec, X, T, order, TOL_STEP[dtype], batch_size=300,
                              optimizer="adam", lr=0.01)
    assert_close_to_numpy("batch", spec, X, T, order[:50], TOL_EPOCH[dtype], batch_size=1,
                          optimizer="adam", lr=0.01)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_batch_engine_fused_adam_is_bitwise_optim_adam(dtype):
    from parnn.engines.batch import optimizer_step
    from parnn.core.optim import Adam
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(1001).astype(dtype)
    ref, fused = Adam(1001, dtype, 1e-3), Adam(1001, dtype, 1e-3)
    pr, pf = p0.copy(), p0.copy()
    numba.set_num_threads(2)
    for _ in range(5):
        g = rng.standard_normal(1001).astype(dtype)
        ref.step(pr, g)
        optimizer_step(fused, pf, g)
    assert fused.t == ref.t
    for a, b in ((pf, pr), (fused.m, ref.m), (fused.v, ref.v)):
        assert np.array_equal(a, b)


def test_batch_engine_refusals():
    spec = Spec(SIZES)
    for opt in ("sgd", "momentum", "adam"):
        make_engine("batch").check(spec, opt, 128)
    with pytest.raises(ConfigError, match="unknown optimizer 'lbfgs'"):
        make_engine("batch").check(spec, "lbfgs", 128)
    with pytest.raises(ConfigError, match="batch size must be"):
        make_engine("batch").check(spec, "sgd", 0)
