"""Checkpoints and resume of --distributed runs under a real `mpiexec` (docs/MPI.md).

Each run goes through tests/mpi_driver.py, which does what `parnn train --distributed` does
after parsing. A kill point is made exact with the test hook PARNN_TEST_FAIL=0:stop@S (rank 0
stops itself after the first chunk that ends at step S or later, the others wait in their next
collective); the test then SIGKILLs mpiexec, its proxy and every rank at once, as a crashed
node or a scheduler would.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from parnn import io

BIN = Path(sys.executable).parent
MPIEXEC = BIN / "mpiexec"
REAL = Path("/usr/share/datasets/fashion-mnist")
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

pytestmark = [pytest.mark.mpi,
              pytest.mark.skipif(not MPIEXEC.exists(), reason="no mpiexec next to the interpreter"),
              pytest.mark.skipif(not REAL.is_dir(), reason="Fashion-MNIST not installed")]

# 1000 samples, batch 128: 8 steps an epoch; checkpoints every 3 steps and after each epoch.
SETTINGS = {"preset": "modern", "epochs": 3, "hidden": [24]}
SMALL = {"data": str(REAL), "limit_train": 1000, "limit_test": 300, "progress": False}
# the ensemble's second member trains on shifted images: its own augmentation draws resumed
EXTRA = {"allreduce": {}, "average": {"average_every": 2}, "ensemble": {"member_recipe": "shift1"}}


def _env(**more):
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", **more)
    for k in ("PARNN_TEST_FAIL", "PARNN_DATA"):
        if k not in more:
            env.pop(k, None)
    return env


def command(n, options, settings=None):
    spec = {"settings": SETTINGS if settings is None else settings, "options": options}
    return [str(MPIEXEC), "-n", str(n), sys.executable, str(TESTS / "mpi_driver.py"),
            json.dumps(spec)]


def mpirun(n, options, settings=None, timeout=90, **env):
    return subprocess.run(command(n, options, settings), capture_output=True, text=True,
                          timeout=timeout, env=_env(**env), cwd=ROOT)


def _children():
    """pid -> parent pid of every process."""
    tree = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            tree[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return tree


def _descendants(pid):
    tree, found, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, parent in tree.items() if parent == p]
        found += kids
        todo += kids
    return found


def _state(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def killed_at(n, options, step, timeout=60):
    """Start the job, wait until rank 0 has stopped itself at `step`, then SIGKILL the whole job
    (mpiexec, its proxy and every rank at once)."""
    job = subprocess.Popen(command(n, options), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env=_env(PARNN_TEST_FAIL=f"0:stop@{step}"), cwd=ROOT)
    deadline = time.monotonic() + timeout
    try:
        while not any(_state(p) == "T" for p in _descendants(job.pid)):
            assert job.poll() is None, job.communicate()
            assert time.monotonic() < deadline, "rank 0 never reached the kill point"
            time.sleep(0.05)
        for p in [job.pid, *_descendants(job.pid)]:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
    finally:
        job.kill()
        job.communicate()


def params_of(out):
    nets, _ = io.load_any(Path(out) / "model.safetensors")
    return [net.params for net in nets]


def same_bits(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


# Where rank 0 is stopped and the job killed: the first chunk ending at that step or later,
# before its checkpoint. 1000 samples in batches of 128 are 8 steps an epoch (an ensemble
# member's 500, 4), in chunks of 3 steps.
KILLS = {"allreduce": (4, 13), "average": (4, 13), "ensemble": (5, 10)}


@pytest.mark.parametrize("mode", ["allreduce", pytest.param("average", marks=pytest.mark.slow),
                                  pytest.param("ensemble", marks=pytest.mark.slow)])
def test_resume_after_the_whole_job_was_killed_twice_gives_the_uninterrupted_bits(tmp_path, mode):
    opts = {"mode": mode, "checkpoint_every": 3, **SMALL, **EXTRA[mode]}
    whole = mpirun(2, {**opts, "out": str(tmp_path / "whole")})
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "killed"
    ckdir = out / "checkpoints"
    first, second = KILLS[mode]
    killed_at(2, {**opts, "out": str(out)}, first)              # between two checkpoints
    killed_at(2, {"mode": mode, **SMALL, "resume": str(ckdir)}, second)   # resumed, again
    done = mpirun(2, {"mode": mode, **SMALL, "resume": str(ckdir)})
    assert done.returncode == 0, done.stderr
    assert "resumed at epoch 2" in done.stdout or "resumed at epoch 3" in done.stdout
    assert same_bits(params_of(out), params_of(tmp_path / "whole"))
    rows = json.loads((out / "history.json").read_text())["history"]
    ref = json.loads((tmp_path / "whole" / "history.json").read_text())["history"]
    assert [r["test_acc"] for r in rows] == [r["test_acc"] for r in ref]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in ref], rel=1e-6)


def test_sigint_to_mpiexec_checkpoints_every_rank_and_prints_the_resume_command(tmp_path):
    out = tmp_path / "run"
    opts = {"mode": "allreduce", "checkpoint_every": 3, **SMALL, "out": str(out)}
    job = subprocess.Popen(command(2, opts), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env=_env(PARNN_TEST_FAIL="0:stop@10"), cwd=ROOT)
    deadline = time.monotonic() + 60
    while not any(_state(p) == "T" for p in _descendants(job.pid)):
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()
        time.sleep(0.05)
    job.send_signal(signal.SIGINT)   # mpiexec forwards it to every rank
    time.sleep(1.0)                  # rank 1 has it; rank 0 gets it when continued
    for p in _descendants(job.pid):
        os.kill(p, signal.SIGCONT)
    stdout, stderr = job.communicate(timeout=60)
    assert job.returncode == 128 + signal.SIGINT, stderr
    lines = [l for l in stderr.splitlines() if l.startswith("parnn")]
    command_line = (f"mpiexec -n 2 parnn train --distributed allreduce --resume "
                    f"{out / 'checkpoints'}")
    assert len(lines) == 1 and "stopped by SIGINT" in lines[0] and command_line in lines[0]
    assert not (out / "model.safetensors").exists()
    done = mpirun(2, {"mode": "allreduce", **SMALL, "resume": str(out / "checkpoints")})
    assert done.returncode == 0, done.stderr
    whole = mpirun(2, {**opts, "out": str(tmp_path / "whole")})
    assert whole.returncode == 0, whole.stderr
    assert same_bits(params_of(out), params_of(tmp_path / "whole"))


def test_another_rank_count_or_a_single_process_is_refused_saying_what_would_change(tmp_path):
    runs = {}
    for mode in ("allreduce", "ensemble"):
        out = tmp_path / mode
        first = mpirun(2, {"mode": mode, **SMALL, "out": str(out)}, {**SETTINGS, "epochs": 1})
        assert first.returncode == 0, first.stderr
        runs[mode] = out / "checkpoints"
    p = mpirun(3, {"mode": "allreduce", **SMALL, "resume": str(runs["allreduce"]),
                   "out": str(tmp_path / "more")}, {"epochs": 2})
    assert p.returncode == 2
    assert "trained on 2 ranks, this job has 3" in p.stderr
    assert "summed in another order" in p.stderr
    assert f"mpiexec -n 2 parnn train --distributed allreduce --resume {runs['allreduce']}" \
        in p.stderr
    assert len([l for l in p.stderr.splitlines() if l.startswith("parnn")]) == 1
    p = mpirun(2, {"mode": "allreduce", **SMALL, "resume": str(runs["ensemble"])}, {})
    assert p.returncode == 2 and "not allreduce" in p.stderr
    p = mpirun(2, {"mode": "allreduce", **SMALL, "dataset": "mnist",
                   "resume": str(runs["allreduce"])}, {})
    assert p.returncode == 2 and "--dataset mnist (it has fashion-mnist)" in p.stderr
    for mode, ckdir in runs.items():   # one process, no mpiexec
        p = subprocess.run([str(BIN / "parnn"), "train", "--resume", str(ckdir), "--epochs", "2"],
                           capture_output=True, text=True, timeout=60, env=_env(), cwd=ROOT)
        assert p.returncode == 2, p.stderr
        assert f"mpiexec -n 2 parnn train --distributed {mode} --resume" in p.stderr
        assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr
        # --show-config of the mpiexec command: the checkpoint's settings, no MPI needed
        shown = subprocess.run([str(BIN / "parnn"), "train", "--distributed", mode, "--resume",
                                str(ckdir), "--epochs", "5", "--show-config"],
                               capture_output=True, text=True, timeout=60, env=_env(), cwd=ROOT)
        assert shown.returncode == 0, shown.stderr
        lines = [l.split() for l in shown.stdout.splitlines()]
        assert ["hidden", "24"] in lines and ["epochs", "5"] in lines and ["preset", "modern"] in lines
        other = "ensemble" if mode == "allreduce" else "allreduce"
        wrong = subprocess.run([str(BIN / "parnn"), "train", "--distributed", other, "--resume",
                                str(ckdir), "--show-config"],
                               capture_output=True, text=True, timeout=60, env=_env(), cwd=ROOT)
        assert wrong.returncode == 2 and f"not {other}" in wrong.stderr
        assert wrong.stderr.count("\n") == 1 and not wrong.stdout


def test_an_ensemble_checkpoint_whose_members_drew_the_old_way_is_refused_with_augment(tmp_path):
    """Before an MPI ensemble's members were those of `parnn train --members`, every rank drew
    its augmentation and dropout from the run's seed: such a checkpoint of several ranks (no
    members_scheme in its record) cannot carry on the same with them, and says so; without
    them, or on one rank (which drew from its own seed), it can."""
    for ranks, augment, refused in ((2, "shift1", True), (2, "none", False), (1, "shift1", False)):
        out = tmp_path / f"{ranks}{augment}"
        first = mpirun(ranks, {"mode": "ensemble", **SMALL, "out": str(out)},
                       {**SETTINGS, "epochs": 1, "augment": augment})
        assert first.returncode == 0, first.stderr
        ck = out / "checkpoints" / "checkpoint.safetensors"
        arrays, meta = io.load_checkpoint(ck)
        del meta["distributed"]["members_scheme"]          # as the older parnn wrote it
        ck.write_bytes(io.checkpoint_bytes(arrays, meta))
        shown = subprocess.run([str(BIN / "parnn"), "train", "--distributed", "ensemble",
                                "--resume", str(out / "checkpoints"), "--epochs", "2",
                                "--show-config"],
                               capture_output=True, text=True, timeout=60, env=_env(), cwd=ROOT)
        if refused:
            assert shown.returncode == 2 and shown.stderr.count("\n") == 1
            assert "draws this parnn makes differently" in shown.stderr
        else:
            assert shown.returncode == 0, shown.stderr


def test_a_resumed_ensemble_keeps_each_members_settings_and_takes_the_runs_given_again(tmp_path):
    """Member r has seed + r and its recipe's settings: the run's seed (or any setting) given
    again is checked against the run's, not refused because member 1's differs; --show-config
    says how the members differ; the finished file's `parnn info` too."""
    out = tmp_path / "mixed"
    first = mpirun(2, {"mode": "ensemble", "member_recipe": "shift1", **SMALL, "out": str(out)},
                   {**SETTINGS, "epochs": 1})
    assert first.returncode == 0, first.stderr
    ckdir = out / "checkpoints"
    shown = subprocess.run([str(BIN / "parnn"), "train", "--distributed", "ensemble", "--resume",
                            str(ckdir), "--epochs", "2", "--seed", "1", "--augment", "none",
                            "--show-config"],
                           capture_output=True, text=True, timeout=60, env=_env(), cwd=ROOT)
    assert shown.returncode == 0, shown.stderr
    settings = dict(line.split(None, 1) for line in shown.stdout.splitlines())
    assert settings["member-seed"] == "1,2" and settings["member-augment"] == "none,shift1"
    assert (settings["seed"], settings["augment"], settings["epochs"]) == ("1", "none", "2")
    done = mpirun(2, {"mode": "ensemble", **SMALL, "resume": str(ckdir)},
                  {"epochs": 2, "seed": 1, "augment": "none"})
    assert done.returncode == 0, done.stderr
    info = subprocess.run([str(BIN / "parnn"), "info", str(out / "model.safetensors"), "--json"],
                          capture_output=True, text=True, timeout=60, env=_env(), cwd=ROOT)
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["member_settings"] == {"augment": ["none", "shift1"],
                                                          "seed": [1, 2]}
    wrong = mpirun(2, {"mode": "ensemble", **SMALL, "resume": str(ckdir)}, {"seed": 2})
    assert wrong.returncode == 2 and "--seed 2 (it has 1)" in wrong.stderr


@pytest.mark.slow
def test_four_oversubscribed_ranks_write_a_single_runs_files_once(tmp_path):
    out = tmp_path / "run"
    p = mpirun(4, {"mode": "average", "average_every": 2, **SMALL, "out": str(out)},
               {**SETTINGS, "epochs": 2}, timeout=120)
    assert p.returncode == 0, p.stderr
    assert sorted(f.name for f in out.iterdir() if f.name != ".parnn.lock") == \
        ["checkpoints", "history.csv", "history.json", "history.png", "model.safetensors"]
    assert sorted(f.name for f in (out / "checkpoints").iterdir()) == \
        ["checkpoint.prev.safetensors", "checkpoint.safetensors"]
    assert p.stdout.count("model saved to") == 1   # only rank 0 speaks (and writes)
    history = json.loads((out / "history.json").read_text())
    assert history["info"]["distributed"] == "average" and history["info"]["ranks"] == 4
    hybrid = history["info"]["hybrid"]
    assert hybrid["ranks_per_node"] == 4 and hybrid["threads_per_rank"] >= 1
    assert len(history["history"]) == 2
    saved = io.load_checkpoint(out / "checkpoints" / "checkpoint.safetensors")[1]
    assert saved["distributed"] == {"mode": "average", "ranks": 4, "average_every": 2}
    assert len(saved["members"]) == 4


def test_rank_0_reads_and_checks_the_chosen_checkpoint_once(tmp_path, monkeypatch):
    """Resuming, rank 0 reads the checkpoint it chooses from disk once, parses it once, and
    broadcasts exactly those bytes; when the newest file is damaged, the previous one's."""
    from parnn.distributed import DistributedOptions, checkpoints
    from parnn.run import checkpoint

    out = tmp_path / "run"
    p = mpirun(2, {"mode": "ensemble", **SMALL, "out": str(out)}, {**SETTINGS, "epochs": 2})
    assert p.returncode == 0, p.stderr
    ckdir = out / "checkpoints"
    opened, parsed, sent = [], [], []
    real_open, real_parse = io.open_regular, checkpoint.parse

    def counted_open(path, *args, **kw):
        opened.append(Path(path).name)
        return real_open(path, *args, **kw)

    def counted_parse(*args, **kw):
        parsed.append(1)
        return real_parse(*args, **kw)

    monkeypatch.setattr(io, "open_regular", counted_open)
    monkeypatch.setattr(checkpoint, "parse", counted_parse)

    class Rank0:                          # of the checkpoint's 2 ranks, without MPI
        def Get_rank(self):
            return 0

        def Get_size(self):
            return 2

        def bcast_bytes(self, data):
            sent.append(data)
            return data

    opts = DistributedOptions(mode="ensemble", resume=ckdir, data=REAL, limit_train=1000,
                              limit_test=300, progress=False)
    cfg, _, share = checkpoints.resumed(opts, {}, Rank0(), print)
    assert opened == ["checkpoint.safetensors"] and len(parsed) == 2      # 2 members, once
    assert sent[-1] == (ckdir / "checkpoint.safetensors").read_bytes()
    assert cfg.epochs == 2 and share.config is not None
    newest = ckdir / "checkpoint.safetensors"
    newest.write_bytes(newest.read_bytes()[:-100])                        # damaged
    opened.clear(), sent.clear()
    said = []
    checkpoints.resumed(opts, {}, Rank0(), said.append)
    assert opened == ["checkpoint.safetensors", "checkpoint.prev.safetensors"]
    assert len(said) == 1 and said[0].startswith("parnn: warning: ") and \
        "using the previous checkpoint" in said[0]          # one line, as one process says it
    assert sent[-1] == (ckdir / "checkpoint.prev.safetensors").read_bytes()
