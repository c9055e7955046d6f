"""`parnn bench` as a tool: runs end to end on a tiny workload and writes readable CSV, JSON and
PNG; bad arguments are one-line errors with exit status 2; its options round-trip through the
parser generated from them; the per-phase breakdown comes from the engines' own timers and
accounts for the run it profiled. Nothing here asserts how fast anything is."""

import csv
import dataclasses
import json
import shlex
import stat
from pathlib import Path

import numpy as np
import pytest

from parnn import cli
from parnn.bench import Options, harness, options, overhead, report, runners
from parnn.engines import PER_SAMPLE, make_engine
from synthetic_data import write_dataset

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"), n_train=300, n_test=50)


@pytest.fixture(scope="module")
def fake_c(tmp_path_factory):
    """Stand-ins for the C reference binaries: print a RESULT line like nn.c does."""
    d = tmp_path_factory.mktemp("paper_c")
    for name in ("nn_serial", "nn_omp"):
        exe = d / name
        exe.write_text("#!/bin/sh\necho 'epoch 1 train_s 0.5'\n"
                       "echo 'RESULT build=x hidden=16,8 threads=1 epochs=1 init=xavier lr=0.01 "
                       "train_s=12.5 train_s_per_epoch=12.5 test_acc=0.8327 param_sum=1.0'\n")
        exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return d


def bench_main(argv, capsys):
    code = cli.main(["bench", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_paper_workload_end_to_end(data, fake_c, tmp_path, capsys):
    out_dir = tmp_path / "bench"
    code, out, err = bench_main(["--hidden", "16,8", "--limit-train", "300", "--threads", "1",
                                 "--repeat", "1", "--data", str(data), "--c-reference",
                                 str(fake_c), "--no-progress", "--out", str(out_dir)], capsys)
    assert code == 0, err
    # the paper's table format, one per engine
    assert "Threads | Time (s) | Speedup | Efficiency" in out
    for name in PER_SAMPLE:
        assert f"engine {name}" in out
    assert "C reference nn_omp" in out and "PREDICTION" in out

    rows = list(csv.DictReader((out_dir / "bench.csv").open()))
    assert tuple(rows[0]) == report.CSV_COLUMNS
    engines = {r["name"] for r in rows if r["kind"] == "engine"}
    assert engines == set(PER_SAMPLE)
    for r in rows:
        assert float(r["time_s"]) > 0 and float(r["time_min_s"]) <= float(r["time_max_s"])
        assert float(r["gemm_peak_gflops"]) > 0
    c = [r for r in rows if r["kind"] == "c-reference"]
    assert {r["name"] for r in c} == {"nn_serial", "nn_omp"}
    assert all(float(r["time_s"]) == 12.5 for r in c)       # parsed from the RESULT line

    res = json.loads((out_dir / "bench.json").read_text())
    for key in ("command", "machine", "workload", "results", "runs", "gemm_peak_gflops", "sync",
                "phases", "breakdown", "model", "paper", "notes"):
        assert key in res, key
    m = res["machine"]
    for key in ("cpu", "cores", "blas", "numba", "numba_threading_layer", "numpy", "python"):
        assert key in m, key
    assert m["blas"] and "kernel" in m["blas"][0]
    assert res["command"].startswith("parnn bench --workload paper")
    assert res["workload"]["sizes"] == [784, 16, 8, 10]
    # every per-sample configuration was profiled; the engines that never meet record no wait
    assert {(b["engine"], b["threads"]) for b in res["breakdown"]} == {(n, 1) for n in PER_SAMPLE}
    for b in res["breakdown"]:
        assert b["forward_s"] > 0 and b["output_s"] > 0 and b["backward_s"] > 0, b
        assert (b["wait_s"] > 0) == (b["engine"] == "owner"), b
        # neuron forks and joins, owner meets at barriers, 2 x 3 layers - 1 times per sample
        assert b["sync_per_sample"] == (0 if b["engine"] in ("serial", "hogwild") else 5)
    assert [q["threads"] for q in res["model"]["prediction"]] == sorted(overhead.PAPER_TIMES)

    bd = list(csv.DictReader((out_dir / "breakdown.csv").open()))
    assert tuple(bd[0]) == report.BREAKDOWN_COLUMNS
    for name in ("time.png", "speedup.png", "breakdown.png", "model.png"):
        assert (out_dir / name).read_bytes()[:8] == PNG, name


def test_modern_workload_with_peers(data, tmp_path, capsys):
    out_dir = tmp_path / "bench"
    code, out, err = bench_main(["--workload", "modern", "--hidden", "16", "--limit-train", "300",
                                 "--threads", "1", "--repeat", "1", "--peers", "--quiet-wait",
                                 "1", "--data", str(data), "--no-progress", "--out",
                                 str(out_dir)], capsys)
    assert code == 0, err
    rows = list(csv.DictReader((out_dir / "bench.csv").open()))
    assert {r["name"] for r in rows if r["kind"] == "engine"} == {"batch", "numpy"}
    res = json.loads((out_dir / "bench.json").read_text())
    assert res["workload"]["optimizer"] == "adam" and res["workload"]["dtype"] == "float32"
    assert "breakdown" not in res                   # no per-sample engine
    assert all("quiet_wait_s" in r for r in res["runs"])
    peers = {r["name"]: r for r in rows if r["kind"] == "peer"}
    for p in options.PEERS:                         # measured when installed, a note when not
        assert p in peers or any(p in n for n in res["notes"])
    for r in peers.values():
        assert float(r["parnn_over_this"]) > 0
    assert (out_dir / "time.png").read_bytes()[:8] == PNG


def test_cnn_workload_trains_the_default_cnn(data, tmp_path, capsys):
    from parnn.run.config import CNN_LAYERS

    out_dir = tmp_path / "bench"
    code, out, err = bench_main(["--workload", "cnn", "--limit-train", "300", "--epochs", "4",
                                 "--threads", "1", "--repeat", "2", "--peers", "torch,sklearn",
                                 "--data", str(data), "--no-progress", "--out", str(out_dir)],
                                capsys)
    assert code == 0, err
    assert f"W3 cnn: 784-[{CNN_LAYERS}]-10" in out
    res = json.loads((out_dir / "bench.json").read_text())
    wl = res["workload"]
    assert wl["layers"] == CNN_LAYERS and wl["optimizer"] == "adam" and wl["batch_size"] == 128
    assert wl["n_params"] == 421642
    # multiply-adds per layer: a conv layer's weights at every output pixel, a dense layer's
    # once; x 3 (forward, errors, update) less the first layer's errors, x 2 flops each
    macs = [28 * 28 * 32 * (3 * 3 * 1), 14 * 14 * 64 * (3 * 3 * 32), 3136 * 128, 128 * 10]
    assert wl["flops_per_sample"] == 2 * (3 * sum(macs) - macs[0])
    assert res["command"].startswith("parnn bench --workload cnn")
    assert "peer sklearn has no convolutional layers: skipped" in res["notes"]
    rows = list(csv.DictReader((out_dir / "bench.csv").open()))
    assert {(r["kind"], r["name"], r["workload"]) for r in rows} >= {("engine", "batch", "W3")}
    batch = next(r for r in rows if r["name"] == "batch")
    assert int(batch["repeats"]) == 2 and int(batch["samples"]) == 1200
    # it learned: the synthetic classes are far apart, chance is 0.1; and every run of the
    # same seed trained the same network, whatever it cost
    runs = [r for r in res["runs"] if r["name"] == "batch"]
    assert runs[0]["test_acc"] > 0.2 and runs[0]["test_acc"] == runs[1]["test_acc"]
    torch_rows = [r for r in rows if r["name"] == "torch"]
    if torch_rows:                                  # torch trains the same CNN from parnn's init
        assert abs(float(torch_rows[0]["test_acc"]) - runs[0]["test_acc"]) <= 2 / 50
    else:
        assert any("torch" in n for n in res["notes"])
    assert (out_dir / "time.png").read_bytes()[:8] == PNG


# --- the phases come from the engines' own timers and account for the profiled run ------------

@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """W1 at 784-64-32-10 on 2000 synthetic samples: enough work per run that the time outside
    the sample loop (W0's transposes, starting threads) is a small part of it."""
    from parnn.data import load_dataset
    from parnn.run.config import make_config

    d = write_dataset(tmp_path_factory.mktemp("work"), n_train=2000, n_test=10)
    cfg = make_config("paper", hidden=(64, 32))
    return runners.make_work(cfg, load_dataset("fashion-mnist", d, cfg.dtype))


@pytest.mark.parametrize("name", PER_SAMPLE)
def test_profiled_phases_account_for_the_run(name, work):
    """The phases a thread recorded add up to at most the profiled run's wall time (+2% for
    the cycle counter's calibration) and to at least 60% of it (the rest: W0's transposes
    and the thread starts, outside the loop, and more of them on a busy machine). hogwild's
    threads train separate parts of the order, so only together do they cover the run. Work
    happens in forward, output and backward; only the owner engine's threads wait for each
    other (unless a busy core made it fall back to its serial loop, part way or for whole
    chunks)."""
    threads = min(2, harness.usable_cores())
    engine = make_engine(name, profile=True)
    prof = runners.profiled_run(engine, work, threads)
    assert prof["phases"] == ("forward", "output", "backward", "wait")
    seconds, wall = prof["seconds"], prof["time_s"]
    seconds = seconds[seconds.sum(axis=1) > 0]          # the threads that ran in this run
    meets = name == "owner" and len(seconds) > 1
    if name == "owner" and not meets:                   # every chunk ran serially: it says so
        assert threads == 1 or engine.info()["serial_chunks"] > 0
    assert len(seconds) == (threads if meets or name == "hogwild" else 1)
    per_thread = seconds.sum(axis=1)
    assert np.all(per_thread <= 1.02 * wall), (per_thread, wall)
    fell_back = name == "owner" and (engine.info()["gave_up"] or engine.info()["serial_chunks"])
    # threads that gave up leave thread 0 to carry on alone: only it covers the run then
    covered = (per_thread.sum() if name == "hogwild" else
               per_thread[0] if fell_back else per_thread.min())
    assert covered >= 0.6 * wall, (per_thread, wall)
    assert np.all(seconds[:, :3] > 0)
    assert np.all((seconds[:, 3] > 0) == (name == "owner" and (meets or threads == 1)))


def test_breakdown_row_takes_the_mean_over_threads_and_the_probed_sync():
    prof = {"time_s": 1.0, "phases": ("forward", "output", "backward", "wait"),
            "seconds": np.array([[0.5, 0.1, 0.3, 0.1], [0.3, 0.1, 0.3, 0.3]])}
    sync = {2: {"forkjoin_us": 2.0, "barrier_us": 0.5}}
    b = overhead.breakdown_row("owner", 2, 0.9, prof, sync, n_layers=3, samples=1000)
    assert (b["forward_s"], b["wait_s"]) == pytest.approx((0.4, 0.2))
    assert b["total_s"] == 0.9 and b["profiled_s"] == 1.0
    assert b["sync_kind"] == "barriers" and b["sync_s"] == pytest.approx(5 * 1000 * 0.5e-6)
    n = overhead.breakdown_row("neuron", 2, 0.9, prof, sync, n_layers=3, samples=1000)
    assert n["sync_kind"] == "fork/join" and n["sync_s"] == pytest.approx(5 * 1000 * 2e-6)
    s = overhead.breakdown_row("serial", 2, 0.9, prof, sync, n_layers=3, samples=1000)
    assert s["sync_s"] == 0 and s["sync_kind"] == "none"


# --- options: declared once, parsed by the generated parser -----------------------------------

def parse(argv):
    return Options.from_namespace(cli.build_parser().parse_args(["bench", *argv]))


@pytest.mark.parametrize("opts", [
    Options(),
    Options(workload="modern", engines=("batch",), threads=(1, 2), hidden=(64, 32), epochs=2,
            limit_train=500, repeat=1, peers=("torch",), c_reference=Path("/tmp/c"), seed=7,
            breakdown=False, dense=True, quiet_wait=2.5, out=Path("o"), progress=False,
            data="d", dataset="mnist"),
    Options(peers=("torch", "sklearn"), quiet_wait=0.1234567),
])
def test_options_round_trip_through_the_cli(opts):
    assert parse(opts.argv()) == opts
    # the command of record leaves out what changes no result: the progress bar
    assert parse(shlex.split(opts.command())[2:]) == dataclasses.replace(opts, progress=True)


def test_every_option_is_a_flag_of_the_cli(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    text = capsys.readouterr().out
    for f in dataclasses.fields(Options):
        assert f.metadata["flag"] in text, f.name
    assert parse([]) == Options()
    assert parse(["--peers"]).peers == options.PEERS


@pytest.mark.parametrize("argv, message", [
    (["--threads", "0"], "--threads must be >= 1"),
    (["--threads", "a,b"], "expected comma-separated integers"),
    (["--threads", "1", "--threads", "2"], "--threads given twice"),
    (["--dense", "--dense"], "--dense given twice"),
    (["--workload", "nope"], "invalid choice"),
    (["--repeat", "0"], "--repeat must be >= 1"),
    (["--engines", "serial,warp"], "unknown engine 'warp'"),
    (["--workload", "modern", "--engines", "neuron"], "engine neuron cannot run the modern"),
    (["--peers", "flax"], "unknown peer 'flax'"),
    (["--c-reference", "/nonexistent"], "no executable nn_serial or nn_omp"),
    (["--threads", "4096"], "more than Numba's pool"),
    (["--limit-train", "0"], "--limit-train must be >= 1"),
    (["--quiet-wait", "-1"], "--quiet-wait must be >= 0"),
    (["--workload", "cnn", "--hidden", "16"], "--hidden does not apply to the cnn workload"),
    (["--workload", "cnn", "--engines", "neuron"], "engine neuron cannot run the cnn"),
])
def test_bad_arguments_are_one_line_and_exit_2(argv, message, tmp_path, capsys):
    code = None
    try:
        code = cli.main(["bench", *argv, "--out", str(tmp_path / "o")])
    except SystemExit as e:                         # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()            # refused before any work


# --- the harness and the model ----------------------------------------------------------------

def test_default_threads():
    assert harness.default_threads(1) == (1,)
    assert harness.default_threads(2) == (1, 2)
    assert harness.default_threads(6) == (1, 2, 4, 6)


def test_model_recovers_its_own_parameters():
    """fit_model on times made by the model itself gives them back."""
    regions = 1000
    times = {p: 2.0 + 8.0 / p + regions * (1.0 + 0.5 * p) * 1e-6 for p in (1, 2, 4)}
    m = overhead.fit_model(times, {1: 1.5, 2: 2.0, 4: 3.0}, regions)
    assert m["serial_s"] == pytest.approx(2.0) and m["compute_s"] == pytest.approx(8.0)
    assert m["cost_us_intercept"] == pytest.approx(1.0)
    assert overhead.predict(m, 8)["time_s"] == pytest.approx(3.0 + regions * 5e-6)


def test_paper_implied_overhead_gives_back_the_papers_times():
    """Perfectly scaled compute plus the implied overhead per region is the paper's table."""
    imp = overhead.paper_implied_overhead()
    t1 = overhead.PAPER_TIMES[1]
    regions = overhead.PAPER_REGIONS * overhead.EPOCH
    assert sorted(imp) == sorted(p for p in overhead.PAPER_TIMES if p > 1)
    for p, us in imp.items():
        assert t1 / p + regions * us * 1e-6 == pytest.approx(overhead.PAPER_TIMES[p])


def test_parse_result():
    kv = harness.parse_result("epoch 1 x\nRESULT build=omp train_s=14.1 test_acc=0.83\n")
    assert kv == {"build": "omp", "train_s": "14.1", "test_acc": "0.83"}
    assert harness.parse_result("nothing") == {}


def test_the_model_fits_the_papers_table():
    f = overhead.fit_paper()
    for p, t in overhead.PAPER_TIMES.items():
        assert f["fitted_s"][p] == pytest.approx(t, rel=0.1)


# --- peers run in a child process pinned to their cores ---------------------------------------

@pytest.mark.parametrize("peer", ["jax", "torch"])
def test_a_peer_runs_pinned_in_a_child_and_trains_what_parnn_trains(peer, tmp_path):
    import os

    from parnn.bench import pinned
    from parnn.data import load_dataset
    from parnn.run.config import make_config

    pytest.importorskip(peer)
    d = write_dataset(tmp_path, n_train=700, n_test=300)
    cfg = make_config("modern", hidden=(32,), epochs=2)       # a ragged last batch of 60
    w = runners.make_work(cfg, load_dataset("fashion-mnist", d, cfg.dtype))
    out = pinned.pinned_run(peer, w, 1)
    assert "error" not in out, out
    assert out["pinned_cores"] == sorted(os.sched_getaffinity(0))[:1]
    assert out["time_s"] > 0 and out.get("compile_s", 1) > 0
    # same init, order, optimizer and schedule: the same model up to rounding, so the same
    # test accuracy give or take a sample or two
    _, ours = runners.train_run(make_engine("batch"), w, 1)
    assert abs(out["test_acc"] - ours["test_acc"]) <= 2 / 300
    assert pinned.pinned_run(peer, w, 1, warm_up=True) is None


@pytest.mark.parametrize("peer", ["jax", "torch"])
def test_a_peer_trains_the_same_cnn(peer, tmp_path):
    """The peers' CNN is parnn's: the same layers, layouts (NHWC, flatten order), init and
    steps, so the same test accuracy give or take a sample or two."""
    from parnn.bench import pinned
    from parnn.data import load_dataset
    from parnn.run.config import CNN_LAYERS, make_config

    pytest.importorskip(peer)
    d = write_dataset(tmp_path, n_train=500, n_test=200)
    cfg = make_config("modern", layers=CNN_LAYERS, epochs=2)   # a ragged last batch of 116
    w = runners.make_work(cfg, load_dataset("fashion-mnist", d, cfg.dtype))
    out = pinned.pinned_run(peer, w, 1)
    assert "error" not in out, out
    _, ours = runners.train_run(make_engine("batch"), w, 1)
    assert ours["test_acc"] > 0.3
    assert abs(out["test_acc"] - ours["test_acc"]) <= 2 / 200
