"""`parnn bench` as a tool: runs end to end on a tiny workload and writes readable CSV, JSON and
PNG; bad arguments are one-line errors with exit status 2. A smoke test: nothing here asserts
anything about how fast anything is."""

import csv
import json
import os
import stat

import pytest

from parnn import bench, cli
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
    for name in bench.PER_SAMPLE:
        assert f"engine {name}" in out
    assert "C reference nn_omp" in out and "PREDICTION" in out

    rows = list(csv.DictReader((out_dir / "bench.csv").open()))
    assert tuple(rows[0]) == bench.CSV_COLUMNS
    engines = {r["name"] for r in rows if r["kind"] == "engine"}
    assert engines == set(bench.PER_SAMPLE)
    for r in rows:
        assert float(r["time_s"]) > 0 and float(r["time_min_s"]) <= float(r["time_max_s"])
        assert float(r["gemm_peak_gflops"]) > 0
    c = [r for r in rows if r["kind"] == "c-reference"]
    assert {r["name"] for r in c} == {"nn_serial", "nn_omp"}
    assert all(float(r["time_s"]) == 12.5 for r in c)       # parsed from the RESULT line

    res = json.loads((out_dir / "bench.json").read_text())
    for key in ("command", "machine", "workload", "results", "runs", "gemm_peak_gflops", "sync",
                "breakdown", "model", "paper", "notes"):
        assert key in res, key
    m = res["machine"]
    for key in ("cpu", "cores", "blas", "numba", "numba_threading_layer", "numpy", "python"):
        assert key in m, key
    assert m["blas"] and "kernel" in m["blas"][0]
    assert res["command"].startswith("parnn bench --workload paper")
    assert res["workload"]["sizes"] == [784, 16, 8, 10]
    assert {b["engine"] for b in res["breakdown"]} == {"serial", "neuron", "owner"}
    for b in res["breakdown"]:                      # the phases add up to the measured total
        parts = b["forward_s"] + b["error_s"] + b["update_s"] + b["sync_s"]
        assert parts == pytest.approx(b["total_s"])
    assert [q["threads"] for q in res["model"]["prediction"]] == sorted(bench.PAPER_TIMES)

    bd = list(csv.DictReader((out_dir / "breakdown.csv").open()))
    assert tuple(bd[0]) == bench.BREAKDOWN_COLUMNS
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
    for p in bench.PEERS:                           # measured when installed, a note when not
        assert p in peers or any(p in n for n in res["notes"])
    for r in peers.values():
        assert float(r["parnn_over_this"]) > 0
    assert (out_dir / "time.png").read_bytes()[:8] == PNG


@pytest.mark.parametrize("argv, message", [
    (["--threads", "0"], "--threads must be >= 1"),
    (["--threads", "a,b"], "expected comma-separated integers"),
    (["--workload", "nope"], "invalid choice"),
    (["--repeat", "0"], "--repeat must be >= 1"),
    (["--engines", "serial,warp"], "unknown engine 'warp'"),
    (["--workload", "modern", "--engines", "neuron"], "engine neuron cannot run the modern"),
    (["--peers", "jax"], "unknown peer 'jax'"),
    (["--c-reference", "/nonexistent"], "no executable nn_serial or nn_omp"),
    (["--threads", "4096"], "more than Numba's pool"),
    (["--limit-train", "0"], "--limit-train must be >= 1"),
    (["--quiet-wait", "-1"], "--quiet-wait must be >= 0"),
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


def test_default_threads():
    assert bench.default_threads(1) == (1,)
    assert bench.default_threads(2) == (1, 2)
    assert bench.default_threads(6) == (1, 2, 4, 6)


def test_model_recovers_its_own_parameters():
    """fit_model on times made by the model itself gives them back."""
    regions = 1000
    times = {p: 2.0 + 8.0 / p + regions * (1.0 + 0.5 * p) * 1e-6 for p in (1, 2, 4)}
    m = bench.fit_model(times, {1: 1.5, 2: 2.0, 4: 3.0}, regions)
    assert m["serial_s"] == pytest.approx(2.0) and m["compute_s"] == pytest.approx(8.0)
    assert m["cost_us_intercept"] == pytest.approx(1.0)
    assert bench.predict(m, 8)["time_s"] == pytest.approx(3.0 + regions * 5e-6)


def test_paper_implied_overhead():
    imp = bench.paper_implied_overhead()
    assert imp[28] == pytest.approx((180.97 - 1260 / 28) / 540000 * 1e6)


def test_parse_result():
    kv = bench.parse_result("epoch 1 x\nRESULT build=omp train_s=14.1 test_acc=0.83\n")
    assert kv == {"build": "omp", "train_s": "14.1", "test_acc": "0.83"}
    assert bench.parse_result("nothing") == {}


def test_the_model_fits_the_papers_table():
    f = bench.fit_paper()
    for p, t in bench.PAPER_TIMES.items():
        assert f["fitted_s"][p] == pytest.approx(t, rel=0.1)
