"""AllreduceEngine under a real `mpiexec`: every rank ends bitwise identical, and equal to the
single-process batch engine at the same global batch within the engine tolerances.

The ranks run this module's `run` with the AllreduceEngine (see SCRIPT); the test process runs
the same `run` with the plain batch engine and compares.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from engine_check import TOL_EPOCH
from parnn.core.model import MLP, Spec
from parnn.core.optim import make_optimizer
from parnn.engines import make_engine
from synthetic_data import engine_data

BIN = Path(sys.executable).parent
MPIEXEC = BIN / "mpiexec"
TESTS = Path(__file__).resolve().parent

pytestmark = [pytest.mark.mpi,
              pytest.mark.skipif(not MPIEXEC.exists(), reason="no mpiexec next to the interpreter")]

N, EPOCHS, SIZES = 310, 2, (30, 16, 8, 6)
# name: optimizer, lr, batch size, hidden/output/loss, dtype. With 3 ranks batch 7 splits
# 2+2+3 and batch 2 leaves one rank with nothing to compute.
CASES = {"sgd7": ("sgd", 0.1, 7, ("tanh", "tanh", "mse"), "float64"),
         "momentum2": ("momentum", 0.05, 2, ("sigmoid", "sigmoid", "mse"), "float64"),
         "adam50": ("adam", 1e-3, 50, ("relu", "softmax", "cross_entropy"), "float32"),
         "adam_full": ("adam", 1e-2, N, ("relu", "softmax", "cross_entropy"), "float64")}


def chunks(n, batch):
    """Chunks of three whole batches, as the training loop hands an epoch over."""
    step = 3 * batch
    return [(s, min(s + step, n)) for s in range(0, n, step)]


def run(engine, case, seed=0):
    """Two epochs in chunks; returns the network, the optimizer and each chunk's stats."""
    optimizer, lr, batch, combo, dtype = CASES[case]
    spec = Spec(SIZES, *combo, dtype)
    X, T, _ = engine_data(spec, N)
    net = MLP(spec, seed=seed)
    opt = make_optimizer(optimizer, spec.n_params, spec.dtype, lr)
    rng = np.random.default_rng(5)
    stats = []
    for _ in range(EPOCHS):
        order = rng.permutation(N)
        for s, e in chunks(N, batch):
            got = engine.train(net, opt, X, T, order[s:e], batch)
            stats.append((got.loss_sum, got.correct, got.n))
    return net, opt, np.array(stats)


SCRIPT = textwrap.dedent("""
    import hashlib, sys
    import numpy as np
    from mpi4py import MPI
    sys.path.insert(0, sys.argv[2])
    from test_allreduce import CASES, run
    from parnn.engines.allreduce import AllreduceEngine

    comm = MPI.COMM_WORLD
    out = {}
    for case in CASES:
        engine = AllreduceEngine(comm)
        # a different init on every rank: the first call's broadcast must make them one
        net, opt, stats = run(engine, case, seed=comm.rank)
        digests = comm.gather(hashlib.sha256(net.params.tobytes()).hexdigest())
        if comm.rank == 0:
            out[case] = net.params
            out[case + ".digests"] = np.array(digests)
            out[case + ".stats"] = stats
            out[case + ".counts"] = np.array([engine.calls, opt.t])
            out[case + ".comm_seconds"] = engine.comm_seconds
    if comm.rank == 0:
        np.savez(sys.argv[1], **out)
""")


@pytest.mark.parametrize("ranks", [2, 3])
def test_allreduce_equals_the_batch_engine_and_ranks_are_bitwise_identical(tmp_path, ranks):
    got = _launch(tmp_path, SCRIPT, ranks)

    for case, (_, _, batch, _, dtype) in CASES.items():
        assert len(set(got[case + ".digests"])) == 1, f"{case}: ranks differ"
        ref, ref_opt, ref_stats = run(make_engine("batch"), case)
        diff = float(np.abs(got[case] - ref.params).max())
        assert diff <= TOL_EPOCH[dtype], f"{case}: max |param - batch engine| = {diff:.3g}"
        stats = got[case + ".stats"]
        assert np.array_equal(stats[:, 1:], ref_stats[:, 1:]), f"{case}: hits or counts differ"
        np.testing.assert_allclose(stats[:, 0], ref_stats[:, 0], rtol=1e3 * TOL_EPOCH[dtype])
        n_batches = EPOCHS * -(-N // batch)
        calls, steps = got[case + ".counts"]
        assert steps == ref_opt.t == n_batches
        assert calls == n_batches + EPOCHS * len(chunks(N, batch))   # + one per chunk (stats)
        assert got[case + ".comm_seconds"] > 0


OVERLAP_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from mpi4py import MPI
    sys.path.insert(0, sys.argv[2])
    from test_allreduce import CASES, run
    from parnn.distributed.watchdog import Watched
    from parnn.engines.allreduce import AllreduceEngine, AverageEngine

    comm = MPI.COMM_WORLD
    out = {}
    for case in CASES:
        for name, engine in (("overlap", AllreduceEngine(comm, overlap=True)),
                             ("blocking", AllreduceEngine(comm, overlap=False)),
                             ("watched", AllreduceEngine(Watched(comm, 30), overlap=True)),
                             ("average1", AverageEngine(comm, 1))):
            net, opt, stats = run(engine, case)
            if comm.rank == 0:
                out[f"{case}.{name}"] = net.params
                out[f"{case}.{name}.stats"] = stats
    if comm.rank == 0:
        np.savez(sys.argv[1], **out)
""")


def _launch(tmp_path, script, ranks):
    tmp_path.mkdir(exist_ok=True)
    path = tmp_path / "script.py"
    path.write_text(script)
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    p = subprocess.run([str(MPIEXEC), "-n", str(ranks), sys.executable, str(path),
                        str(tmp_path / "out.npz"), str(TESTS)],
                       capture_output=True, text=True, timeout=180, env=env)
    assert p.returncode == 0, p.stderr
    return np.load(tmp_path / "out.npz")


@pytest.mark.parametrize("ranks", [2, 4])
def test_overlapped_reduction_is_the_blocking_one_and_average_every_step_is_allreduce(tmp_path,
                                                                                  ranks):
    """Per-layer Iallreduce during backward == one Allreduce after it, bitwise on 2 ranks
    (a + b == b + a whatever the message sizes), within rounding on 4 (MPICH may pick another
    summation tree for another message size); the same through the watchdog. Local SGD
    averaging after every step == allreduce where they coincide: plain SGD and every rank's
    part of every batch the same size (sgd7 on 2 ranks: 7 = 3 + 4 is not; the full batch
    310 = 155 + 155 is, but takes Adam steps: not either)."""
    got = _launch(tmp_path, OVERLAP_SCRIPT, ranks)
    # Where they do not coincide (7 does not split evenly): the averaged steps are other steps.
    assert np.abs(got["sgd7.average1"] - got["sgd7.blocking"]).max() > 1e-9
    for case, (optimizer, _, batch, _, dtype) in CASES.items():
        a, b = got[f"{case}.overlap"], got[f"{case}.blocking"]
        if ranks == 2:
            assert np.array_equal(a, b), f"{case}: overlapped differs from blocking"
            assert np.array_equal(got[f"{case}.overlap.stats"], got[f"{case}.blocking.stats"])
        else:
            assert np.abs(a - b).max() <= TOL_EPOCH[dtype], case
        assert np.array_equal(got[f"{case}.watched"], a), f"{case}: the watchdog changed bits"
    # A case where they coincide: plain SGD, batch 8 split evenly on 2 and 4 ranks, every
    # batch whole (N = 312 = 39 batches of 8).
    got = _launch(tmp_path / "even", OVERLAP_SCRIPT.replace("from test_allreduce import CASES, run",
                                                   "import test_allreduce as t\n"
                                                   "t.N = 312\n"
                                                   "t.CASES = {'sgd8': ('sgd', 0.1, 8, "
                                                   "('tanh', 'tanh', 'mse'), 'float64')}\n"
                                                   "from test_allreduce import CASES, run"),
                  ranks)
    diff = np.abs(got["sgd8.average1"] - got["sgd8.blocking"]).max()
    assert diff <= 1e-12, f"average every step vs allreduce: {diff:.3g}"
    assert np.array_equal(got["sgd8.average1.stats"][:, 1:], got["sgd8.blocking.stats"][:, 1:])


DRAWS_SCRIPT = textwrap.dedent("""
    import hashlib, sys
    import numpy as np
    from mpi4py import MPI
    sys.path.insert(0, sys.argv[2])
    from test_allreduce import draws_run
    from parnn.engines.allreduce import AllreduceEngine, AverageEngine

    comm = MPI.COMM_WORLD
    out = {}
    for name, make in (("allreduce", lambda o: AllreduceEngine(comm, **o)),
                       ("average", lambda o: AverageEngine(comm, 4, **o))):
        for drawn in (True, False):
            net = draws_run(make, drawn)
            digests = comm.gather(hashlib.sha256(net.params.tobytes()).hexdigest())
            if comm.rank == 0:
                out[f"{name}.{drawn}"] = net.params
                out[f"{name}.{drawn}.digests"] = np.array(digests)
    if comm.rank == 0:
        np.savez(sys.argv[1], **out)
""")


def draws_run(make, drawn):
    """Two epochs of a 784-input network with augmentation and dropout (drawn) or without,
    the epoch passed as the training loop passes it: an engine made by make(options)."""
    from parnn.engines.batch import Augmentation, DropoutOption

    spec = Spec((784, 12, 10), "relu", "softmax", "cross_entropy", "float64")
    X, T, _ = engine_data(spec, 120)
    options = dict(augment=Augmentation(3, shift=2, hflip=True),
                   dropout=DropoutOption(0.3, 7)) if drawn else {}
    engine = make(options)
    net = MLP(spec, seed=0)
    opt = make_optimizer("adam", spec.n_params, spec.dtype, 1e-2)
    rng = np.random.default_rng(5)
    for epoch in (1, 2):
        order = rng.permutation(120)
        for s in range(0, 120, 48):
            engine.train(net, opt, X, T, order[s:s + 48], 16, epoch=epoch)
    if hasattr(engine, "average"):        # the epoch's model is the replicas' average
        engine.average(net, opt)
    return net


def test_allreduce_and_average_draw_augmentation_and_dropout_as_one_process_does(tmp_path):
    """Augmentation and dropout draw by (seed, epoch, sample number), so allreduce on 2 ranks
    trains what the batch engine does in one process (within rounding), every rank ends with
    the same bits, and the draws change the result; average takes them too."""
    got = _launch(tmp_path, DRAWS_SCRIPT, 2)
    for name in ("allreduce", "average"):
        for drawn in (True, False):
            assert len(set(got[f"{name}.{drawn}.digests"])) == 1, f"{name}: ranks differ"
        assert np.abs(got[f"{name}.True"] - got[f"{name}.False"]).max() > 1e-3
    one = draws_run(lambda o: make_engine("batch", **o), True)
    assert np.abs(got["allreduce.True"] - one.params).max() <= TOL_EPOCH["float64"]
