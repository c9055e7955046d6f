"""MPI training: real `mpiexec` subprocesses on small data, plus the pure helpers.

The venv's mpiexec (the `mpich` wheel's Hydra) runs 2 ranks on this machine with no extra flags;
see docs/MPI.md for system MPIs.
"""

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import synthetic_data
import pytest

from parnn import cli, io
from parnn.data import load_dataset
from parnn.distributed import DistributedOptions, combine_outputs, shard_indices
from parnn.errors import ConfigError
from parnn.run import train
from parnn.run.config import make_config

BIN = Path(sys.executable).parent
MPIEXEC = BIN / "mpiexec"
REAL = Path("/usr/share/datasets/fashion-mnist")
ROOT = Path(__file__).resolve().parents[1]

needs_mpi = pytest.mark.skipif(not MPIEXEC.exists(), reason="no mpiexec next to the interpreter")
needs_data = pytest.mark.skipif(not REAL.is_dir(), reason="Fashion-MNIST not installed")
mpi = [pytest.mark.mpi, needs_mpi]

# The preset the comparisons below train with in one process (not the CLI's default).
SMALL = ["--preset", "modern", "--limit-train", "2000", "--limit-test", "500", "--hidden", "32",
         "--no-progress", "--data", str(REAL)]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    env.pop("PARNN_TEST_FAIL", None)
    env.pop("PARNN_DATA", None)
    return env


def run(cmd, timeout=60, **env):
    """Run a command; a hang fails the test (TimeoutExpired) instead of blocking the suite."""
    t0 = time.monotonic()
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                       env={**_env(), **env}, cwd=ROOT)
    p.seconds = time.monotonic() - t0
    return p


def parnn_mpi(n, *args, **env):
    return run([MPIEXEC, "-n", n, BIN / "parnn", "train", *args], **env)


# --- pure helpers ------------------------------------------------------------------------------

def test_soft_vote_is_the_mean_of_the_outputs():
    a = np.array([[0.9, 0.1], [0.2, 0.8]])
    b = np.array([[0.3, 0.7], [0.4, 0.6]])
    np.testing.assert_allclose(combine_outputs([a, b], "soft"), (a + b) / 2)


def test_hard_vote_is_the_majority_and_ties_go_to_the_soft_score():
    outs = [np.array([[0.6, 0.4, 0.0], [0.9, 0.1, 0.0]]),
            np.array([[0.6, 0.4, 0.0], [0.0, 0.1, 0.9]]),
            np.array([[0.0, 0.1, 0.9], [0.1, 0.5, 0.4]])]
    # sample 0: two votes for class 0, one for class 2
    hard = combine_outputs(outs, "hard")
    assert hard[0].argmax() == 0
    # sample 1: one vote each for 0, 2, 1 -> a tie, broken by the soft mean (0.333 for class 0,
    # 0.233 for 1, 0.433 for 2)
    assert hard[1].argmax() == 2
    # a majority wins even when the soft mean disagrees
    outs = [np.array([[0.51, 0.49]]), np.array([[0.51, 0.49]]), np.array([[0.0, 1.0]])]
    assert combine_outputs(outs, "soft")[0].argmax() == 1
    assert combine_outputs(outs, "hard")[0].argmax() == 0


def test_disjoint_shards_partition_the_training_set_and_bootstrap_draws_n_over_k():
    parts = [shard_indices(1003, r, 4, "disjoint", seed=5) for r in range(4)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(1003))
    assert {len(p) for p in parts} == {250, 251}
    assert not np.array_equal(parts[0], np.arange(250))        # shuffled before cutting
    boot = [shard_indices(1003, r, 4, "bootstrap", seed=5) for r in range(4)]
    assert all(len(b) == 250 and b.max() < 1003 for b in boot)
    assert len(np.unique(boot[0])) < 250                        # with replacement
    assert not np.array_equal(boot[0], boot[1])                 # one stream per rank
    every = [shard_indices(1003, r, 4, "all", seed=5) for r in range(4)]
    assert all(np.array_equal(e, np.arange(1003)) for e in every)   # members differ by seed


@pytest.mark.parametrize("options,words", [
    (dict(mode="allreduce", shards="bootstrap"), "--shards only applies to --distributed ensemble"),
    (dict(mode="ensemble", shards="random"), "unknown shards 'random': choose one of disjoint"),
    (dict(mode="gossip"), "unknown distributed mode 'gossip': choose one of ensemble, allreduce"),
])
def test_distributed_options_are_checked_when_made(options, words):
    with pytest.raises(ConfigError, match=words):
        DistributedOptions(**options)


# --- allreduce: identical ranks, same result as one process ------------------------------------

def blobs(n=310, n_test=60, seed=0):
    return synthetic_data.blobs(n, n_test, seed)


SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from mpi4py import MPI
    from parnn.run import train
    from parnn.run.config import make_config
    from parnn.engines.allreduce import AllreduceEngine
    from parnn.io import params_sha256
    sys.path.insert(0, sys.argv[2])
    from test_distributed import blobs

    comm = MPI.COMM_WORLD
    results = {}
    for name, over in [("sgd7", dict(optimizer="sgd", lr=0.1, batch_size=7)),
                       ("adam50", dict(optimizer="adam", lr=1e-3, batch_size=50)),
                       ("momentum2", dict(optimizer="momentum", lr=0.05, batch_size=2))]:
        cfg = make_config("modern", hidden=(16, 8), dtype="float64", epochs=2,
                          engine="batch", threads=1, **over)
        res = train.fit(cfg, blobs(), progress=False, log=lambda *_: None,
                        engine=AllreduceEngine(comm))
        hashes = comm.gather(params_sha256(res.net.params))
        if comm.rank == 0:
            results[name] = res.net.params
            results[name + "_hashes"] = np.array(hashes)
            results[name + "_loss"] = np.array([r["loss"] for r in res.history])
            results[name + "_acc"] = np.array([r["train_acc"] for r in res.history])
    if comm.rank == 0:
        np.savez(sys.argv[1], **results)
""")


@pytest.mark.mpi
@needs_mpi
def test_allreduce_equals_one_process_and_ranks_are_bitwise_identical(tmp_path):
    """3 ranks, so batches split unevenly (7 -> 2+2+3), and batch 2 leaves one rank idle."""
    script = tmp_path / "allreduce.py"
    script.write_text(SCRIPT)
    p = run([MPIEXEC, "-n", 3, sys.executable, script, tmp_path / "out.npz", ROOT / "tests"])
    assert p.returncode == 0, p.stderr
    got = np.load(tmp_path / "out.npz")

    for name, over in [("sgd7", dict(optimizer="sgd", lr=0.1, batch_size=7)),
                       ("adam50", dict(optimizer="adam", lr=1e-3, batch_size=50)),
                       ("momentum2", dict(optimizer="momentum", lr=0.05, batch_size=2))]:
        assert len(set(got[name + "_hashes"])) == 1, f"{name}: ranks differ"
        cfg = make_config("modern", hidden=(16, 8), dtype="float64", epochs=2,
                          engine="batch", threads=1, **over)
        ref = train.fit(cfg, blobs(), progress=False, log=lambda *_: None)
        np.testing.assert_allclose(got[name], ref.net.params, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(got[name + "_loss"], [r["loss"] for r in ref.history],
                                   rtol=1e-12)
        np.testing.assert_array_equal(got[name + "_acc"], [r["train_acc"] for r in ref.history])


@pytest.mark.mpi
@needs_mpi
@needs_data
@pytest.mark.parametrize("draws", [{}, {"dropout": 0.3, "augment": "shift1"}],
                         ids=["plain", "dropout+augment"])
def test_allreduce_cli_matches_single_process_training(tmp_path, draws):
    """With augmentation and dropout too: they draw by (seed, epoch, sample number), so
    whichever rank trains a sample draws what one process would."""
    args = [*SMALL, "--epochs", "2", "--dtype", "float64", "--threads", "1"]
    for k, v in draws.items():
        args += [f"--{k}", str(v)]
    p = parnn_mpi(2, "--distributed", "allreduce", *args, "--out", tmp_path / "ar")
    assert p.returncode == 0, p.stderr
    assert "weights identical on all 2 ranks" in p.stdout
    assert "parnn 0.1.0" in p.stdout and p.stdout.count("allreduce on 2 rank(s)") == 1  # rank 0 only
    net, meta = io.load_model(tmp_path / "ar" / "model.safetensors")
    hist = json.loads((tmp_path / "ar" / "history.json").read_text())
    assert hist["info"]["ranks"] == 2 and hist["info"]["distributed"] == "allreduce"
    assert all(row["comm_seconds"] > 0 for row in hist["history"])

    cfg = make_config("modern", hidden=(32,), epochs=2, dtype="float64", engine="batch",
                      threads=1, **draws)
    ds = load_dataset("fashion-mnist", REAL, "float64", 2000, 500)
    ref = train.fit(cfg, ds, progress=False, log=lambda *_: None, test_every_epoch=True)
    np.testing.assert_allclose(net.params, ref.net.params, rtol=1e-8, atol=1e-10)
    assert [r["test_acc"] for r in hist["history"]] == [r["test_acc"] for r in ref.history]


# --- ensemble ----------------------------------------------------------------------------------

@pytest.mark.mpi
@needs_mpi
@needs_data
def test_ensemble_reports_members_and_votes_and_evaluate_reads_the_file(tmp_path, capsys):
    out = tmp_path / "ens"
    p = parnn_mpi(2, "--distributed", "ensemble", *SMALL, "--epochs", "1", "--out", out)
    assert p.returncode == 0, p.stderr
    rows = re.findall(r"^\s+(\d)\s+(\d+)\s+(\d+)\s+([\d.]+)$", p.stdout, re.M)
    assert [(r[0], r[1], r[2]) for r in rows] == [("0", "1", "900"), ("1", "2", "900")]
    soft = float(re.search(r"soft vote ([\d.]+), hard vote ([\d.]+)", p.stdout).group(1))

    nets, meta = io.load_any(out / "model.safetensors")
    assert len(nets) == 2 and not np.array_equal(nets[0].params, nets[1].params)
    assert meta["distributed"]["mode"] == "ensemble" and meta["distributed"]["shards"] == "disjoint"
    assert [round(m["test_acc"], 4) for m in meta["members"]] == [float(r[3]) for r in rows]
    assert meta["distributed"]["soft_acc"] == pytest.approx(soft, abs=1e-4)
    hist = json.loads((out / "history.json").read_text())
    assert [m["seed"] for m in hist["members"]] == [1, 2]
    assert hist["test_acc"] == pytest.approx(soft, abs=1e-4)
    assert (out / "history.csv").read_text().startswith("epoch,loss,train_acc,val_acc,test_acc")
    assert not list(out.glob(".*.tmp")) and not list(out.glob(".parnn.lock"))

    # `parnn evaluate` needs no MPI: it loads every member and takes the soft vote
    assert cli.main(["evaluate", str(out / "model.safetensors"), "--limit-test", "500",
                     "--data", str(REAL)]) == 0
    report = capsys.readouterr().out
    assert "(2 networks)" in report
    assert float(re.search(r"accuracy: ([\d.]+)", report).group(1)) == pytest.approx(soft, abs=1e-4)


@pytest.mark.mpi
@needs_mpi
@needs_data
def test_an_ensemble_on_all_the_data_trains_every_member_on_every_sample(tmp_path):
    out = tmp_path / "all"
    p = parnn_mpi(2, "--distributed", "ensemble", "--shards", "all", *SMALL, "--epochs", "1",
                  "--out", out)
    assert p.returncode == 0, p.stderr
    nets, meta = io.load_any(out / "model.safetensors")
    assert [m["n_train"] for m in meta["members"]] == [1800, 1800]   # modern holds out 10 %
    assert [m["seed"] for m in meta["members"]] == [1, 2]
    assert not np.array_equal(nets[0].params, nets[1].params)
    assert meta["distributed"]["shards"] == "all"


@pytest.mark.mpi
@needs_mpi
@needs_data
def test_an_ensemble_on_all_the_data_trains_the_members_of_parnn_train_members(tmp_path):
    """mpiexec -n K ... --shards all trains, side by side, exactly the members `parnn train
    --members K` trains one after another: member r with seed + r (its own augmentation
    draws), every member on the rows left after one validation split drawn from the run's seed,
    the vote validated on those held-out rows. Bit for bit, though each rank has 1 thread and
    the single process 2."""
    extra = ["--validation-split", "0.1", "--augment", "affine", "--epochs", "2"]
    p = parnn_mpi(2, "--distributed", "ensemble", "--shards", "all", *SMALL, *extra,
                  "--out", tmp_path / "mpi")
    assert p.returncode == 0, p.stderr
    assert "validation: soft vote" in p.stdout
    q = run([BIN / "parnn", "train", "--members", "2", "--threads", "2", *SMALL, *extra,
             "--out", tmp_path / "one"])
    assert q.returncode == 0, q.stderr
    mpi_nets, mpi_meta = io.load_any(tmp_path / "mpi" / "model.safetensors")
    nets, meta = io.load_any(tmp_path / "one" / "model.safetensors")
    assert [m["seed"] for m in mpi_meta["members"]] == meta["seeds"] == [1, 2]
    assert [m["n_train"] for m in mpi_meta["members"]] == [1800, 1800]     # 200 held out
    for a, b in zip(mpi_nets, nets, strict=True):
        assert np.array_equal(a.params, b.params)
    assert mpi_meta["val_acc"] == meta["val_acc"] and mpi_meta["test_acc"] == meta["test_acc"]
    rows = json.loads((tmp_path / "mpi" / "history.json").read_text())["history"]
    assert rows[-1]["val_acc"] == meta["val_acc"]      # the vote's, after every epoch


@pytest.mark.mpi
@needs_mpi
@needs_data
def test_an_mpi_ensemble_takes_a_member_recipe_as_parnn_train_members_does(tmp_path):
    p = parnn_mpi(2, "--distributed", "ensemble", "--shards", "all", "--member-recipe",
                  "shift1", *SMALL, "--epochs", "1", "--out", tmp_path / "mpi")
    assert p.returncode == 0, p.stderr
    q = run([BIN / "parnn", "train", "--members", "2", "--member-recipe", "shift1", *SMALL,
             "--epochs", "1", "--out", tmp_path / "one"])
    assert q.returncode == 0, q.stderr
    members = json.loads((tmp_path / "mpi" / "history.json").read_text())["members"]
    assert [m["config"]["augment"] for m in members] == ["none", "shift1"]
    mpi_nets, _ = io.load_any(tmp_path / "mpi" / "model.safetensors")
    nets, _ = io.load_any(tmp_path / "one" / "model.safetensors")
    assert all(np.array_equal(a.params, b.params) for a, b in zip(mpi_nets, nets, strict=True))
    p = parnn_mpi(2, "--distributed", "allreduce", "--member-recipe", "shift1", *SMALL)
    assert p.returncode == 2 and "--member-recipe only applies to an ensemble" in p.stderr


@pytest.mark.mpi
@needs_mpi
@needs_data
def test_disjoint_shards_cut_the_rows_left_after_the_validation_split(tmp_path):
    out = tmp_path / "dis"
    p = parnn_mpi(2, "--distributed", "ensemble", *SMALL, "--validation-split", "0.1",
                  "--epochs", "1", "--out", out)
    assert p.returncode == 0, p.stderr
    nets, meta = io.load_any(out / "model.safetensors")
    assert [m["n_train"] for m in meta["members"]] == [900, 900]
    assert 0 < meta["val_acc"] < 1 and meta["config"]["validation_split"] == 0.1
    # one rank, no mpiexec: the same split and rows as plain `parnn train`, bit for bit
    p = run([sys.executable, "-m", "parnn", "train", "--distributed", "ensemble", *SMALL,
             "--validation-split", "0.1", "--epochs", "1", "--out", tmp_path / "r1"])
    assert p.returncode == 0, p.stderr
    q = run([BIN / "parnn", "train", "--threads", "1", *SMALL, "--validation-split", "0.1",
             "--epochs", "1", "--out", tmp_path / "plain"])
    assert q.returncode == 0, q.stderr
    (one,), _ = io.load_any(tmp_path / "r1" / "model.safetensors")
    (plain,), _ = io.load_any(tmp_path / "plain" / "model.safetensors")
    assert np.array_equal(one.params, plain.params)


@pytest.mark.mpi
@needs_mpi
@needs_data
def test_bootstrap_ensemble_in_one_process_says_it_runs_one_rank(tmp_path):
    """No mpiexec: MPI starts as a singleton; a 1-rank ensemble is plain training."""
    p = run([sys.executable, "-m", "parnn", "train", "--distributed", "ensemble", "--shards",
             "bootstrap", *SMALL, "--epochs", "1", "--out", tmp_path / "one"])
    assert p.returncode == 0, p.stderr
    assert "on 1 rank (not started by mpiexec" in p.stdout
    nets, meta = io.load_any(tmp_path / "one" / "model.safetensors")
    assert len(nets) == 1 and meta["members"][0]["n_train"] == 1800   # 10 % held out
    assert meta["members"][0]["unique_samples"] < 1800


@pytest.mark.mpi
@needs_mpi
def test_allreduce_refuses_an_engine_without_a_gradient_to_reduce(tmp_path):
    """One rank, no mpiexec (MPI starts as a singleton): the set-up refusal is one clean line."""
    data = synthetic_data.write_dataset(tmp_path / "data", n_train=60, n_test=20)
    p = run([sys.executable, "-m", "parnn", "train", "--distributed", "allreduce", "--engine",
             "numpy", "--data", data, "--hidden", "8", "--epochs", "1", "--no-progress",
             "--out", tmp_path / "out"])
    assert p.returncode == 2
    assert p.stderr.splitlines() == ["parnn: error: --distributed allreduce reduces the gradients "
                                     "of the batch engine; --engine numpy cannot be combined with "
                                     "it (use auto or batch)"], p.stderr
    assert not (tmp_path / "out").exists()


# --- failures end the whole job, quickly, naming the rank --------------------------------------

@pytest.mark.mpi
@needs_mpi
@needs_data
def test_bad_data_on_one_rank_is_reported_by_rank_0_and_every_rank_exits(tmp_path):
    """MPMD: rank 1 alone gets a data directory that does not exist."""
    common = ["--distributed", "allreduce", *SMALL[:-2], "--epochs", "1", "--out", tmp_path]
    p = run([MPIEXEC, "-n", 1, BIN / "parnn", "train", *common, "--data", REAL, ":",
             "-n", 1, BIN / "parnn", "train", *common, "--data", tmp_path / "nowhere"])
    assert p.returncode == 2
    assert re.search(r"parnn: error: rank 1 of 2: .*nowhere.* does not exist", p.stderr), p.stderr
    assert p.stderr.count("parnn: error") == 1


@pytest.mark.mpi
@needs_mpi
@needs_data
def test_ranks_that_disagree_on_settings_are_refused(tmp_path):
    common = ["--distributed", "allreduce", *SMALL, "--epochs", "1", "--out", tmp_path]
    p = run([MPIEXEC, "-n", 1, BIN / "parnn", "train", *common, ":",
             "-n", 1, BIN / "parnn", "train", *common, "--lr", "0.5"])
    assert p.returncode == 2
    assert "rank 1 of 2 differs from rank 0 in lr (0.5 vs 0.001)" in p.stderr


@pytest.mark.mpi
@needs_mpi
@needs_data
@pytest.mark.parametrize("mode", ["allreduce", "ensemble"])
def test_a_rank_failing_mid_training_aborts_the_job(tmp_path, mode):
    """Rank 1 raises after its first chunk, while rank 0 goes on into a collective (the next
    Allreduce, or the final Gather) where it would wait forever without MPI Abort."""
    p = parnn_mpi(2, "--distributed", mode, *SMALL, "--epochs", "3", "--out", tmp_path,
                  PARNN_TEST_FAIL="1:raise")
    assert p.returncode != 0
    assert "parnn: error: rank 1 of 2 failed: injected failure" in p.stderr, p.stderr
    assert p.seconds < 30
    assert not (tmp_path / "model.safetensors").exists()


@pytest.mark.mpi
@needs_mpi
@needs_data
def test_a_killed_rank_ends_the_job(tmp_path):
    p = parnn_mpi(2, "--distributed", "allreduce", *SMALL, "--epochs", "3", "--out", tmp_path,
                  PARNN_TEST_FAIL="1:kill")
    assert p.returncode != 0
    assert p.seconds < 30
    assert not (tmp_path / "model.safetensors").exists()


# --- the ensemble's files have a single run's layout, with the vote in them --------------------

@pytest.mark.mpi
@needs_mpi
def test_the_ensembles_history_is_the_voted_accuracy_in_a_single_runs_layout(tmp_path):
    """history.json/.csv and the plot show what the ensemble reports (the soft vote after each
    epoch), not the members' mean; history.json has a single run's keys."""
    from parnn import plots

    data = synthetic_data.write_dataset(tmp_path / "data", n_train=400, n_test=80)
    common = ["--data", data, "--hidden", "16", "--epochs", "3", "--threads", "1",
              "--no-progress"]
    p = parnn_mpi(2, "--distributed", "ensemble", *common, "--out", tmp_path / "ens")
    assert p.returncode == 0, p.stderr
    r = synthetic_data.parnn("train", *common, "--validation-split", "0", "--out",
                             tmp_path / "single")
    assert r.returncode == 0, r.stderr
    ens = json.loads((tmp_path / "ens" / "history.json").read_text())
    single = json.loads((tmp_path / "single" / "history.json").read_text())
    assert set(single) <= set(ens)
    assert set(single["history"][-1]) <= set(ens["history"][-1])
    soft = float(re.search(r"soft vote ([\d.]+)", p.stdout).group(1))
    assert ens["test_acc"] == ens["history"][-1]["test_acc"] == pytest.approx(soft, abs=1e-4)
    members = ens["members"]
    for e, row in enumerate(ens["history"]):
        mean = np.mean([m["history"][e]["test_acc"] for m in members])
        assert row["member_test_acc"] == pytest.approx(mean)
        assert row["loss"] == pytest.approx(np.mean([m["history"][e]["loss"] for m in members]))
    # the vote after each epoch is not the members' mean (it is what the ensemble is for)
    assert any(row["test_acc"] != row["member_test_acc"] for row in ens["history"])
    rows = (tmp_path / "ens" / "history.csv").read_text().splitlines()
    assert rows[0].split(",")[:5] == ["epoch", "loss", "train_acc", "val_acc", "test_acc"] \
        and len(rows) == 4
    fig = plots.history_figure(ens["history"])
    test_line = next(line for line in fig.axes[1].get_lines() if line.get_label() == "test")
    assert list(test_line.get_ydata()) == [row["test_acc"] for row in ens["history"]]


# --- failures before MPI starts, silent ranks: one line, the whole job ends ----------------------

def _one_error_line(p):
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("parnn: error: "), lines[0]
    assert "Traceback" not in p.stderr
    return lines[0]


@pytest.mark.mpi
@needs_mpi
@pytest.mark.parametrize("rank1,words", [
    (["--distributed", "allreduce", "--lr", "abc"], "rank 1 of 2: argument --lr: invalid float"),
    ([], "rank 1 of 2: this process is one of 2 that an MPI launcher started"),
], ids=["bad flag", "no --distributed"])
def test_a_rank_failing_before_mpi_starts_ends_the_job_with_one_line(tmp_path, rank1, words):
    """MPMD (issue 14 item 5): rank 1 fails before MPI starts. Before: rank 0 waited for it
    forever at 100% CPU, and a rank 1 without --distributed trained a whole run into --out."""
    data = synthetic_data.write_dataset(tmp_path / "data", n_train=200, n_test=40)
    common = ["--data", data, "--hidden", "8", "--epochs", "1", "--threads", "1",
              "--no-progress", "--out", tmp_path / "out"]
    p = run([MPIEXEC, "-n", 1, BIN / "parnn", "train", "--distributed", "allreduce", *common,
             ":", "-n", 1, BIN / "parnn", "train", *common, *rank1], timeout=60)
    assert p.returncode == 2
    assert words in _one_error_line(p)
    assert p.seconds < 30 and not (tmp_path / "out").exists()


@pytest.mark.mpi
@needs_mpi
@pytest.mark.parametrize("args,words", [
    (["--distributed", "allreduce", "--lr", "-1"], "on all 2 ranks: learning rate must be"),
    (["--distributed", "ensemble", "--epochs", "x"], "on all 2 ranks: argument --epochs"),
    ([], "on all 2 ranks: this process is one of 2 that an MPI launcher started (PMI_SIZE=2), "
         "but --distributed is not given"),
], ids=["config", "usage", "no --distributed"])
def test_an_error_on_every_rank_is_one_line_from_rank_0(tmp_path, args, words):
    """`mpiexec -n 2 parnn train` with a bad flag printed one line per rank; and without
    --distributed it ran two identical trainings into the same files (issue 10 defect 3)."""
    data = synthetic_data.write_dataset(tmp_path / "data", n_train=200, n_test=40)
    p = run([MPIEXEC, "-n", 2, BIN / "parnn", "train", "--data", data, "--hidden", "8",
             "--epochs", "1", "--no-progress", "--out", tmp_path / "out", *args], timeout=60)
    assert p.returncode == 2
    assert words in _one_error_line(p)
    assert not (tmp_path / "out").exists()


def _cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), fields[0]


def _ranks(marker):
    """{rank: pid} of the processes whose environment holds marker (the job's own ranks)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if env.get(b"PARNN_TEST_MARK") == marker.encode() and b"PMI_RANK" in env:
            found[int(env[b"PMI_RANK"])] = int(pid)
    return found


@pytest.mark.mpi
@needs_mpi
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("mode", ["allreduce", "ensemble"])
def test_a_stopped_rank_ends_the_job_naming_it_and_the_others_wait_idle(tmp_path, mode):
    """Rank 1 SIGSTOPs itself after its first chunk (alive, silent). Before: rank 0 spun at
    100% CPU in its collective forever. Now it sleeps while it waits, and after --rank-timeout
    seconds the job ends with one line naming rank 1."""
    data = synthetic_data.write_dataset(tmp_path / "data", n_train=400, n_test=40)
    marker = f"{os.getpid()}-{mode}"
    env = {**_env(), "PARNN_TEST_FAIL": "1:stop", "PARNN_TEST_MARK": marker}
    timeout = 8
    t0 = time.monotonic()
    job = subprocess.Popen([str(MPIEXEC), "-n", "2", str(BIN / "parnn"), "train",
                            "--distributed", mode, "--data", str(data), "--hidden", "8",
                            "--epochs", "3", "--threads", "1", "--no-progress",
                            "--rank-timeout", str(timeout), "--out", str(tmp_path / "out")],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        ranks, stopped = {}, False
        while time.monotonic() - t0 < 30 and not stopped:
            ranks = _ranks(marker)
            stopped = 1 in ranks and _cpu_seconds(ranks[1])[1] == "T"
            time.sleep(0.05)
        assert stopped and 0 in ranks, "rank 1 never stopped"
        time.sleep(0.5)                          # rank 0 is past its spin, waiting
        before = _cpu_seconds(ranks[0])[0]
        time.sleep(2)
        used = _cpu_seconds(ranks[0])[0] - before
        out, err = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
    seconds = time.monotonic() - t0
    assert used < 0.5, f"rank 0 used {used:.2f} s of CPU in 2 s of waiting"
    assert job.returncode != 0
    line = _one_error_line(subprocess.CompletedProcess([], job.returncode, out, err))
    assert "rank 1 of 2 has been silent for 8 s" in line and "--rank-timeout" in line
    assert seconds < timeout + 15, seconds
    assert not (tmp_path / "out" / "model.safetensors").exists()
