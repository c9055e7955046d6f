"""Shared by the engine tests (test_persample.py, test_batch.py): the networks, tolerances and
the train-and-compare helpers.

Stated tolerances (max |difference| of any parameter, parameters are O(0.1-1)):
  per-sample engines vs numpy, batch size 1:   float64 1e-13 after one step, 1e-11 after an epoch
                                                float32 2e-6  after one step, 5e-5  after an epoch
  batch engine vs numpy (sgd, momentum, adam): float64 1e-13 / 1e-11, float32 2e-6 / 5e-5
The differences come only from rounding: FMAs, a vectorized dot product (different summation
order), libm vs numpy's SIMD tanh/exp. serial, neuron and owner (at 1 and 2 threads) and hogwild
(1 thread) must agree BITWISE: they run the same arithmetic in the same order.
"""

import numba
import numpy as np
import pytest

from parnn.engines import make_engine
from parnn.errors import ConfigError
from synthetic_data import engine_data
from parnn.core.model import MLP, Spec
from parnn.core.optim import make_optimizer

PER_SAMPLE = ("serial", "neuron", "hogwild", "owner")
ENGINES = PER_SAMPLE + ("batch",)
COMBOS = [("tanh", "tanh", "mse"),                 # the paper
          ("relu", "softmax", "cross_entropy"),    # modern
          ("sigmoid", "sigmoid", "mse"),
          ("relu", "softmax", "mse")]
# odd sizes on purpose: tails of the 4-way unrolled input loop and of the 16-neuron blocks
SIZES = (30, 40, 24, 6)
TOL_STEP = {"float64": 1e-13, "float32": 2e-6}
TOL_EPOCH = {"float64": 1e-11, "float32": 5e-5}
DATA_DIR = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(autouse=True)
def restore_threads():
    n = numba.get_num_threads()
    yield
    numba.set_num_threads(n)


def engine(name, **options):
    return make_engine(name, **options)


synthetic = engine_data


def train(name, spec, X, T, order, threads=1, optimizer="sgd", lr=0.05, batch_size=1, seed=0,
          **options):
    numba.set_num_threads(threads)
    net = MLP(spec, seed=seed)
    opt = make_optimizer(optimizer, spec.n_params, spec.dtype, lr)
    stats = engine(name, **options).train(net, opt, X, T, order, batch_size)
    return net, opt, stats


def assert_close_to_numpy(name, spec, X, T, order, tol, **kw):
    ref, ref_opt, ref_stats = train("numpy", spec, X, T, order, **kw)
    net, opt, stats = train(name, spec, X, T, order, **kw)
    diff = float(np.abs(net.params - ref.params).max())
    assert diff <= tol, f"{name}: max |param - numpy| = {diff:.3g} > {tol:g}"
    assert stats.n == ref_stats.n == len(order)
    assert stats.correct == ref_stats.correct
    assert stats.loss_sum == pytest.approx(ref_stats.loss_sum, rel=1e3 * tol, abs=1e3 * tol)
    assert opt.t == ref_opt.t


