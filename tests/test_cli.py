"""The command line, through its real entry points.

Every bad input (flags and files) must end as exactly one line `parnn: error: ...` on stderr,
a non-zero exit status, no traceback, and no existing file touched. The good paths: --version,
--help of every subcommand, train -> evaluate -> predict on small synthetic data.
"""

import dataclasses
import json
import gzip
import hashlib
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from parnn import __version__, cli, io
from parnn.run.checkpoint import NEWEST, PREVIOUS
from parnn.run.config import TrainConfig
from parnn.core.model import MLP, Spec
from synthetic_data import idx_bytes, parnn, write_dataset

TRAIN = ["--hidden", "16", "--epochs", "2", "--engine", "numpy", "--threads", "1",
         "--no-progress", "--batch-size", "32", "--checkpoint-every", "3"]


# --- a workspace of good and bad files, built once ----------------------------------------------

@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Files every case may point at. `run` is a finished run made by the real CLI."""
    w = tmp_path_factory.mktemp("ws")
    data = write_dataset(w / "data", n_train=300, n_test=60)
    write_dataset(w / "other_data", n_train=300, n_test=60, seed=1)
    r = parnn("train", "--data", data, "--out", w / "run", *TRAIN)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    model = w / "run" / "model.safetensors"

    # An unfinished run: the finished run's mid-epoch checkpoint on its own.
    (w / "unfinished").mkdir()
    shutil.copy(w / "run" / "checkpoints" / PREVIOUS, w / "unfinished" / NEWEST)

    # Damaged data directories, each with one bad file among good ones.
    def bad_data(name, role, content):
        d = w / name
        shutil.copytree(data, d)
        (d / f"{role}.gz").write_bytes(content)
    images = gzip.decompress((data / "train-images-idx3-ubyte.gz").read_bytes())
    bad_data("data_truncated", "train-images-idx3-ubyte", gzip.compress(images[:-100]))
    bad_data("data_badgzip", "train-images-idx3-ubyte", (data / "train-images-idx3-ubyte.gz").read_bytes()[:-30])
    bad_data("data_label10", "t10k-labels-idx1-ubyte", gzip.compress(idx_bytes(np.full(60, 10))))
    bad_data("data_count", "train-labels-idx1-ubyte", gzip.compress(idx_bytes(np.zeros(299))))
    bad_data("data_magic", "train-labels-idx1-ubyte", gzip.compress(b"\x00\x00\x08\x03" + bytes(20)))
    (w / "empty").mkdir()

    # Bad model and checkpoint files.
    raw = model.read_bytes()
    (w / "garbage.safetensors").write_bytes(b"this is not a model at all" * 10)
    (w / "truncated.safetensors").write_bytes(raw[: len(raw) // 2])
    (w / "empty.safetensors").write_bytes(b"")
    flipped = bytearray(raw)
    flipped[-100] ^= 0x04
    (w / "flipped.safetensors").write_bytes(bytes(flipped))
    io.save_model(w / "six_inputs.safetensors", MLP(Spec((6, 5, 3)), seed=0), {})
    for name, content in (("ck_garbage", b"\x00" * 100), ("ck_model", raw)):
        (w / name).mkdir()
        (w / name / NEWEST).write_bytes(content)
    (w / "ck_both_bad").mkdir()
    for f in (NEWEST, PREVIOUS):
        (w / "ck_both_bad" / f).write_bytes(raw[:500])

    # Images: good ones, and bad ones.
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(w / "good.png")
    Image.fromarray(rng.integers(0, 256, (200, 200), dtype=np.uint8)).save(w / "noise.png")
    png = (w / "noise.png").read_bytes()
    (w / "truncated.png").write_bytes(png[: len(png) // 2])
    (w / "text.png").write_text("not a picture")
    np.save(w / "good.npy", rng.random((28, 28)))
    np.save(w / "wrong_size.npy", np.zeros((10, 10)))
    np.save(w / "nan.npy", np.full((28, 28), np.nan))
    np.save(w / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (w / "a_file").write_text("x")
    return w


def snapshot(root):
    """Every file under root: its bytes' hash and mtime."""
    return {p.relative_to(root): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


# --- the catalogue of bad inputs -----------------------------------------------------------------
# (args with {placeholders} under the workspace, words the message must contain). "@" marks the
# cases that also run as a real subprocess.

# A fresh --out: a refused run must not create it (`run` holds a model: see its own case).
T = ["train", "--data", "{w}/data", "--out", "{w}/fresh"] + TRAIN
BAD = [
    (["train", "--data", "{w}/data", "--out", "{w}/run"] + TRAIN,
     "already holds a trained model (model.safetensors): pass --overwrite"),
    # flags
    (T + ["--lr", "0"], "learning rate must be a number > 0"),
    (T + ["--lr", "-1"], "learning rate must be"),
    (T + ["--lr", "nan"], "learning rate must be"),
    (T + ["--lr", "fast"], "invalid float value"),
    (T + ["--hidden", "16,0"], "hidden layer sizes must be >= 1"),
    (T + ["--hidden", "16,x"], "comma-separated integers"),
    (T + ["--threads", "0"], "threads must be >= 1"),
    (T + ["--batch-size", "0"], "batch size must be"),
    (T + ["--batch-size", "271"], "larger than the training set (270 samples after 30 set aside "
                                  "for validation)"),
    (T + ["--batch-size", "301", "--validation-split", "0"], "larger than the training set (300 "
                                                           "samples)"),
    (T + ["--validation-split", "1"], "validation split must be a number in [0, 1), got 1.0"),
    (T + ["--validation-split", "-0.1"], "validation split must be a number in [0, 1)"),
    (T + ["--early-stopping", "0"], "early-stopping patience must be an integer >= 1"),
    (T + ["--validation-split", "0", "--early-stopping", "2"], "there is no validation set"),
    (["train", "--data", "{w}/data", "--out", "{w}/run", "--distributed", "ensemble",
      "--early-stopping", "2"], "--early-stopping and --test-every-epoch do not work with "
     "--distributed"),
    (["train", "--data", "{w}/data", "--out", "{w}/run", "--distributed", "allreduce",
      "--validation-split", "0.2"], "--validation-split does not work with --distributed "
     "allreduce: it trains one network on the whole training set"),
    (T + ["--batch-size", "lots"], "an integer or 'full'"),
    (T + ["--engine", "gpu"], "choose one of numpy"),
    # refused before the data loads (the data directory does not exist)
    (T + ["--engine", "serial", "--optimizer", "adam", "--data", "{w}/missing"],
     "engine serial does the paper's per-sample plain SGD update"),
    (T + ["--preset", "fast"], "invalid choice"),
    (T + ["--optimizer", "rmsprop"], "sgd, momentum, adam"),
    (T + ["--momentum", "0.5"], "only applies to optimizer momentum"),
    (T + ["--optimizer", "momentum", "--momentum", "1.5"], "momentum must be in [0, 1)"),
    (T + ["--output", "tanh", "--loss", "cross_entropy"], "needs output softmax"),
    (T + ["--activation", "swish"], "tanh, sigmoid, relu"),
    (T + ["--dtype", "float16"], "float32, float64"),
    (T + ["--init", "zeros"], "paper, xavier, he"),
    (T + ["--limit-train", "0"], "--limit-train must be >= 1"),
    (T + ["--limit-test", "-5"], "--limit-test must be >= 1"),
    (T + ["--epochs", "0"], "epochs must be >= 1"),
    (T + ["--shards", "bootstrap"], "--shards only applies to --distributed ensemble"),
    (["train", "--data", "{w}/data", "--out", "{w}/run", "--distributed", "allreduce", "--shards",
      "bootstrap"], "--shards only applies to --distributed ensemble"),
    (T + ["--average-every", "4"], "--average-every only applies to --distributed average"),
    (T + ["--lr-schedule", "step"], "constant, cosine"),
    (T + ["--seed", "-1"], "seed must be an integer >= 0"),
    (T + ["--checkpoint-every", "0"], "--checkpoint-every must be >= 1"),
    (T + ["--dataset", "cifar"], "invalid choice"),
    (T + ["--frobnicate"], "unrecognized arguments"),
    (["@", "train", "--epochs", "many"], "invalid int value"),
    # output paths and data directories
    (["@"] + T + ["--out", "{w}/a_file"], "is a file, not a directory"),
    (T + ["--out", "{w}/a_file/sub"], "cannot be created"),
    (T + ["--checkpoint-dir", "{w}/a_file"], "is a file"),
    (T + ["--data", "{w}/missing"], "does not exist"),
    (T + ["--data", "{w}/a_file"], "is not a directory"),
    (T + ["--data", "{w}/empty"], "missing train-images-idx3-ubyte"),
    (["@"] + T + ["--data", "{w}/data_truncated"], "truncated"),
    (T + ["--data", "{w}/data_badgzip"], "damaged gzip data"),
    (T + ["--data", "{w}/data_label10"], "labels must be 0..9"),
    (T + ["--data", "{w}/data_count"], "300 images but"),
    (T + ["--data", "{w}/data_magic"], "expected a label file"),
    (["@"] + T + ["--out", "{w}/new", "--lr", "1e30"], "training diverged"),
    (T + ["--out", "{w}/new", "--checkpoint-dir", "{w}/unfinished"], "holds the checkpoint of an unfinished run"),
    # --resume
    (["train", "--resume", "{w}/missing"], "no such checkpoint directory"),
    (["train", "--resume", "{w}/a_file"], "not a directory"),
    (["train", "--resume", "{w}/empty"], "no checkpoint here"),
    (["@", "train", "--resume", "{w}/ck_garbage"], "no usable checkpoint"),
    (["train", "--resume", "{w}/ck_model"], "expected checkpoint"),
    (["train", "--resume", "{w}/ck_both_bad"], "no usable checkpoint"),
    (["train", "--resume", "{w}/run", "--lr", "0.5"], "--lr 0.5 (it has 0.001)"),
    (["@", "train", "--resume", "{w}/run", "--hidden", "64", "--preset", "paper"], "--hidden 64 (it has 16)"),
    (["train", "--resume", "{w}/run", "--limit-train", "100"], "--limit-train 100 (it has none)"),
    (["train", "--resume", "{w}/run", "--epochs", "1"], "--epochs 1 is fewer than the 2 epoch(s)"),
    (["train", "--resume", "{w}/run", "--checkpoint-dir", "{w}/x"], "cannot be combined with --resume"),
    (["train", "--resume", "{w}/run", "--data", "{w}/other_data"], "differs from the data"),
    (["train", "--resume", "{w}/run", "--epochs", "3", "--out", "{w}/a_file"], "is a file"),
    # evaluate
    (["evaluate", "{w}/missing.safetensors", "--data", "{w}/data"], "no such file"),
    (["evaluate", "{w}/empty", "--data", "{w}/data"], "is a directory"),
    (["@", "evaluate", "{w}/garbage.safetensors", "--data", "{w}/data"], "not a safetensors file"),
    (["evaluate", "{w}/truncated.safetensors", "--data", "{w}/data"], "truncated"),
    (["evaluate", "{w}/empty.safetensors", "--data", "{w}/data"], "only 0 bytes"),
    (["evaluate", "{w}/flipped.safetensors", "--data", "{w}/data"], "checksum"),
    (["evaluate", "{w}/run/checkpoints/" + NEWEST, "--data", "{w}/data"], "expected model"),
    (["evaluate", "{w}/six_inputs.safetensors", "--data", "{w}/data"], "takes 6 inputs"),
    (["evaluate", "{w}/run/model.safetensors", "--data", "{w}/data", "--limit-test", "0"], "must be >= 1"),
    # predict
    (["predict", "{w}/garbage.safetensors", "{w}/good.png"], "not a safetensors file"),
    (["@", "predict", "{w}/run/model.safetensors", "{w}/text.png"], "not an image parnn can read"),
    (["predict", "{w}/run/model.safetensors", "{w}/truncated.png"], "not an image parnn can read"),
    (["predict", "{w}/run/model.safetensors", "{w}/wrong_size.npy"], "expected 28x28"),
    (["predict", "{w}/run/model.safetensors", "{w}/nan.npy"], "pixel values must be"),
    (["predict", "{w}/run/model.safetensors", "{w}/pickled.npy"], "not a readable .npy"),
    (["predict", "{w}/run/model.safetensors", "{w}/missing.png"], "no such file"),
    (["predict", "{w}/run/model.safetensors", "{w}/empty"], "a directory with no picture files"),
    (["predict", "{w}/run/model.safetensors", "{w}/good.png", "--invert", "maybe"], "invalid choice"),
    # data
    (["data", "info", "--data", "{w}/missing"], "does not exist"),
    (["data", "info", "--data", "{w}/data_truncated"], "truncated"),
    (["data", "fetch", "--dest", "{w}/a_file/sub"], "cannot create directory"),
]


def ids(case):
    args = [a for a in case[0] if a != "@"]
    if args[:len(T)] == T:
        args = ["train", *args[len(T):]]
    return " ".join(args).replace("{w}/", "")[:60]


def run_in_process(args, capsys):
    try:
        status = cli.main(args)
    except SystemExit as e:  # argparse
        status = e.code
    out, err = capsys.readouterr()
    return status, err


@pytest.mark.parametrize("case", BAD, ids=[ids(c) for c in BAD])
def test_bad_input_is_one_clean_line(case, ws, capsys, monkeypatch):
    raw, words = case
    args = [a.replace("{w}", str(ws)) for a in raw if a != "@"]
    monkeypatch.chdir(ws)  # default outputs (runs/...) would land here, and be noticed
    monkeypatch.setenv("PARNN_DATA", str(ws / "data"))
    before = snapshot(ws)
    runs = [run_in_process(args, capsys)]
    if "@" in raw:
        r = parnn(*args, cwd=ws, env={**os.environ, "PARNN_DATA": str(ws / "data")})
        runs.append((r.returncode, r.stderr))
    for status, err in runs:
        assert status not in (0, None), err
        assert "Traceback" not in err
        lines = err.splitlines()
        assert len(lines) == 1, err
        assert lines[0].startswith("parnn") and "error:" in lines[0], err
        assert words in lines[0], lines[0]
    assert snapshot(ws) == before, "a failed command changed or created files"


# --- good paths -----------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,listed", [([], "train"), (["data"], "fetch")])
def test_bare_parnn_and_parnn_data_print_their_help(argv, listed):
    """Not argparse's internal names ('the following arguments are required: command')."""
    r = parnn(*argv)
    assert r.returncode == 2 and r.stderr == ""
    assert r.stdout.startswith(f"usage: parnn {' '.join(argv)}".rstrip()) and listed in r.stdout
    assert "command" not in r.stdout.replace("COMMAND", "")


def test_an_unforeseen_os_error_is_one_line_naming_the_path(monkeypatch, capsys):
    """main's last resort: whatever OSError escapes a command is one line, the path escaped."""
    import errno

    def broken(args):
        raise OSError(errno.EIO, "Input/output error", "/mnt/da\nta")
    monkeypatch.setitem(cli.COMMANDS, "data", broken)
    assert cli.main(["data", "info"]) == 2
    assert capsys.readouterr().err == "parnn: error: /mnt/da\\nta: Input/output error\n"


def test_an_error_message_with_a_newline_is_one_line(monkeypatch, capsys):
    from parnn.errors import DataError

    def broken(args):
        raise DataError("class name 'a\nb' is odd")
    monkeypatch.setitem(cli.COMMANDS, "data", broken)
    assert cli.main(["data", "info"]) == 2
    assert capsys.readouterr().err.splitlines() == ["parnn: error: class name 'a\\nb' is odd"]


def test_version():
    r = parnn("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"parnn {__version__}"


def subcommands(parser, prefix=()):
    """Every (sub)command path of the parser, for --help."""
    import argparse

    yield prefix
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from subcommands(sub, prefix + (name,))


def test_help_of_every_subcommand(capsys):
    paths = list(subcommands(cli.build_parser()))
    assert {("train",), ("evaluate",), ("predict",), ("data", "fetch"), ("data", "info")} <= set(paths)
    for path in paths:
        with pytest.raises(SystemExit) as e:
            cli.main([*path, "--help"])
        out, err = capsys.readouterr()
        assert e.value.code == 0 and "usage: parnn" in out and err == "", path
    r = parnn("train", "--help")
    assert r.returncode == 0 and "--resume" in r.stdout and "--checkpoint-every" in r.stdout


def test_train_writes_model_history_plot_and_checkpoints(ws):
    run = ws / "run"
    for name in ("model.safetensors", "history.json", "history.csv", "history.png",
                 "checkpoints/" + NEWEST, "checkpoints/" + PREVIOUS):
        assert (run / name).is_file(), name
    net, meta = io.load_model(run / "model.safetensors")
    assert net.spec.sizes == (784, 16, 10) and len(meta["history"]) == 2
    with Image.open(run / "history.png") as im:
        assert im.format == "PNG"
    assert not list(run.rglob("*.tmp"))


def test_evaluate_and_predict(ws):
    r = parnn("evaluate", ws / "run" / "model.safetensors", "--data", ws / "data")
    assert r.returncode == 0 and "accuracy" in r.stdout.lower(), r.stderr
    r = parnn("predict", ws / "run" / "model.safetensors", ws / "good.png", ws / "good.npy")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith(str(ws / "good.png"))
    assert all(line.split("\t")[2] in {"T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                       "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"}
               for line in lines)


def test_a_resumed_auto_run_keeps_its_engine(ws, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["--data", str(ws / "data"), "--hidden", "8", "--batch-size", "30", "--threads", "1",
            "--no-progress"]
    assert cli.main(["train", "--out", str(out), "--epochs", "1", *base]) == 0
    assert io.load_model(out / "model.safetensors")[1]["config"]["engine"] == "auto"
    assert cli.main(["train", "--resume", str(out), "--epochs", "2", "--no-progress"]) == 0
    meta = io.load_model(out / "model.safetensors")[1]
    assert meta["config"]["engine"] == meta["engine"] != "auto"
    capsys.readouterr()


def test_resume_takes_a_run_directory_and_extends_it(ws, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(ws / "run", run)
    ck = run / "checkpoints" / NEWEST
    # the copied checkpoint remembers the original --out: say where the results go now
    assert cli.main(["train", "--resume", str(run), "--epochs", "3", "--out", str(run)]) == 0
    assert "after 3 epoch(s)" in capsys.readouterr().out
    net, meta = io.load_model(run / "model.safetensors")
    assert len(meta["history"]) == 3 and meta["config"]["epochs"] == 3
    assert ck.is_file()


def test_data_info(ws):
    r = parnn("data", "info", "--data", ws / "data")
    assert r.returncode == 0 and "train:    300 samples" in r.stdout


def test_no_pickle_anywhere_in_parnn():
    import re
    from pathlib import Path

    import parnn

    src = Path(parnn.__file__).parent
    for path in src.rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+(c?pickle|dill|joblib)\b", text, re.M), path
        assert "allow_pickle=True" not in text, path
        assert "torch.load" not in text, path


# --- settings, validation, early stopping, the live history ---------------------------------------

def test_train_help_groups_the_flags_and_shows_each_presets_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    raw = capsys.readouterr().out
    for group in ("model", "training", "data", "output", "distributed"):
        assert f"\n{group}:" in raw, group
    out = " ".join(raw.split())   # argparse wraps lines where it likes
    assert "learning rate (paper: 0.01; modern: 0.001; accurate: 0.001)" in out
    assert "(paper: 0.0; modern: 0.1; accurate: 0.1)" in out        # --validation-split
    assert "hidden layer sizes (paper: 256,128; modern: 256,128; accurate: 512,256)" in out
    assert "(every preset: 1)" in out                               # --seed
    assert "owner" in out and "--test-every-epoch" in out


@pytest.mark.parametrize("args,shown", [
    (["--preset", "modern"], {"preset": "modern", "validation-split": "0.1",
                              "early-stopping": "off", "epochs": "15", "hidden": "256,128"}),
    (["--preset", "paper"], {"preset": "paper", "validation-split": "0.0", "batch-size": "1"}),
    (["--lr", "0.5", "--early-stopping", "3", "--hidden", "64,32"],
     {"preset": "accurate", "lr": "0.5", "early-stopping": "3", "hidden": "64,32",
      "epochs": "30", "label-smoothing": "0.1"}),
    (["--epochs", "15", "--loss", "mse", "--output", "tanh"],
     {"preset": "accurate", "warmup-epochs": "1", "label-smoothing": "0.0"}),
])
def test_show_config_prints_the_resolved_settings_and_trains_nothing(args, shown, tmp_path,
                                                                     monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", *args, "--show-config"]) in (0, None)
    out = capsys.readouterr().out
    settings = dict(line.split(None, 1) for line in out.splitlines())
    assert {k: settings[k] for k in shown} == shown
    picked = "engine-picked" in settings                  # beside engine auto
    assert len(settings) == len(dataclasses.fields(TrainConfig)) + picked
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("args, picked", [
    ([], "batch"),
    (["--preset", "paper", "--threads", "1"], "serial"),
    (["--preset", "paper", "--threads", "1", "--augment", "shift1"], "numpy"),
    (["--preset", "paper", "--engine", "owner"], None),
    (["--distributed", "allreduce"], None),         # its mode brings its own engine
])
def test_show_config_names_the_engine_auto_picks(args, picked, capsys):
    """Before: only `engine auto`, while the run then trained on batch, serial or numpy."""
    assert cli.main(["train", *args, "--show-config"]) in (0, None)
    settings = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert settings.get("engine-picked") == picked
    assert settings["engine"] == ("owner" if "owner" in args else
                                  "batch" if "--distributed" in args else "auto")


def test_show_config_picks_for_the_threads_a_run_gets(monkeypatch, capsys):
    """--threads beyond the cores is capped before auto picks (owner needs exactly 2)."""
    from parnn.run import config

    monkeypatch.setattr(config, "usable_cores", lambda: 2)
    assert cli.main(["train", "--preset", "paper", "--threads", "4", "--show-config"]) in (0, None)
    settings = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert settings["engine-picked"] == "owner"


def test_show_config_of_a_distributed_mode_is_what_the_mode_trains(capsys):
    """allreduce and average train one network with the batch engine on the whole training
    set; an ensemble's members hold the preset's validation split out, as parnn train does."""
    for mode, split, engine in (("allreduce", "0.0", "batch"), ("average", "0.0", "batch"),
                                ("ensemble", "0.1", "auto")):
        assert cli.main(["train", "--distributed", mode, "--show-config"]) in (0, None)
        settings = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
        assert (settings["validation-split"], settings["engine"]) == (split, engine), mode
    assert cli.main(["train", "--distributed", "allreduce", "--engine", "owner",
                     "--show-config"]) == 2
    assert "cannot be combined with it" in capsys.readouterr().err


def test_show_config_json_and_members(capsys):
    assert cli.main(["train", "--members", "3", "--member-recipe", "shift1", "--show-config",
                     "--json"]) in (0, None)
    shown = json.loads(capsys.readouterr().out)
    assert (shown["members"], shown["member-recipe"], shown["preset"]) == (3, "shift1", "accurate")
    assert shown["hidden"] == [512, 256] and shown["engine"] == "auto"
    assert shown["engine-picked"] in ("batch", "numpy")


def test_show_config_of_a_resumed_run_is_the_checkpoints(ws, capsys):
    assert cli.main(["train", "--resume", str(ws / "run"), "--epochs", "4", "--show-config"]) \
        in (0, None)
    settings = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert (settings["hidden"], settings["epochs"], settings["batch-size"]) == ("16", "4", "32")
    assert cli.main(["train", "--resume", str(ws / "run"), "--show-config", "--json"]) in (0, None)
    assert json.loads(capsys.readouterr().out)["hidden"] == [16]


EARLY = ["--hidden", "16", "--lr", "0.01", "--lr-schedule", "constant", "--batch-size", "8",
         "--engine", "numpy", "--threads", "1", "--no-progress", "--validation-split", "0.2"]


def read_csv(path):
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_validation_and_early_stopping_from_the_command_line(ws, tmp_path):
    r = parnn("train", "--data", ws / "data", "--out", tmp_path, *EARLY, "--epochs", "12",
              "--early-stopping", "1")
    assert r.returncode == 0, r.stderr
    epochs = [line for line in r.stdout.splitlines() if line.startswith("epoch ")]
    assert epochs and all("val_loss" in line and "val_acc" in line for line in epochs)
    assert not any("test_acc" in line for line in epochs)       # the test set waits for the end
    model = parnn_load(tmp_path / "model.safetensors")
    history, best = model.meta["history"], model.meta["best_epoch"]
    assert len(history) == best + 1 < 12                        # stopped: patience 1
    assert best == 1 + int(np.argmin([row["val_loss"] for row in history]))
    assert f"early stopping: no lower validation loss in the 1 epochs after epoch {best}" \
        in r.stdout
    assert f"after {best + 1} epoch(s) (early stopping: the weights of epoch {best})" in r.stdout
    rows = read_csv(tmp_path / "history.csv")
    assert list(rows[0]) == ["epoch", "loss", "train_acc", "val_loss", "val_acc", "test_acc",
                             "seconds", "samples_per_s"]
    assert [row["test_acc"] != "" for row in rows] == [e == best for e in range(1, best + 2)]
    assert float(rows[best - 1]["test_acc"]) == model.meta["test_acc"]


def test_test_every_epoch_scores_the_test_set_after_each(ws, tmp_path):
    r = parnn("train", "--data", ws / "data", "--out", tmp_path, *EARLY, "--epochs", "2",
              "--test-every-epoch")
    assert r.returncode == 0, r.stderr
    assert all("test_acc" in row for row in parnn_load(tmp_path / "model.safetensors").history)
    assert all(row["test_acc"] for row in read_csv(tmp_path / "history.csv"))


def test_a_resumed_run_keeps_its_early_stopping_state(ws, tmp_path, capsys):
    """Three epochs, then three more from the checkpoint: the run the six would have been."""
    common = ["--data", str(ws / "data"), *EARLY, "--early-stopping", "4"]
    assert cli.main(["train", "--out", str(tmp_path / "a"), *common, "--epochs", "3"]) == 0
    assert cli.main(["train", "--resume", str(tmp_path / "a"), "--epochs", "6",
                     "--no-progress"]) == 0
    assert cli.main(["train", "--out", str(tmp_path / "b"), *common, "--epochs", "6"]) == 0
    capsys.readouterr()
    a, b = (parnn_load(tmp_path / d / "model.safetensors") for d in ("a", "b"))
    assert np.array_equal(a.nets[0].params, b.nets[0].params)
    assert a.meta["best_epoch"] == b.meta["best_epoch"] and a.meta["test_acc"] == b.meta["test_acc"]
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("seconds", "samples_per_s")}
                       for r in h]
    assert strip(a.history) == strip(b.history) and len(a.history) == 6


def test_history_csv_grows_a_row_per_epoch_while_the_run_goes(ws, tmp_path):
    """Read at each epoch's log line (logged before its row is written): epoch k finds the
    k - 1 rows before it; nothing exists before the first epoch ends."""
    from parnn.run import config, session

    csv_path, seen = tmp_path / "history.csv", {}

    def log(line):
        if line.startswith("epoch "):
            k = int(line.split()[1].split("/")[0])
            seen[k] = len(read_csv(csv_path)) if csv_path.exists() else None

    cfg = config.make_config("modern", hidden=(8,), epochs=3, batch_size=32, engine="numpy",
                             threads=1)
    session.start(cfg, session.RunOptions(data=ws / "data", out=tmp_path, progress=False), log)
    assert seen == {1: None, 2: 1, 3: 2}
    rows = read_csv(csv_path)   # rewritten at the end, with the test accuracy
    assert [r["epoch"] for r in rows] == ["1", "2", "3"] and rows[-1]["test_acc"]


def parnn_load(path):
    import parnn

    return parnn.load(path)


# --- issue 10's CLI defects -----------------------------------------------------------------------

def test_a_new_run_does_not_replace_a_model_without_overwrite(ws, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "--data", str(ws / "data"), "--out", str(out), "--hidden", "8",
            "--epochs", "1", "--engine", "numpy", "--threads", "1", "--no-progress"]
    assert cli.main([*base, "--checkpoint-every", "2"]) == 0
    model = (out / "model.safetensors").read_bytes()
    assert len(list((out / "checkpoints").iterdir())) == 2
    assert cli.main([*base, "--seed", "5"]) == 2
    assert "already holds a trained model" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == model
    assert cli.main([*base, "--seed", "5", "--overwrite"]) == 0
    assert (out / "model.safetensors").read_bytes() != model
    # the old run's checkpoints went with it: only the new run's (one, after its epoch) remain
    assert [p.name for p in (out / "checkpoints").iterdir()] == [NEWEST]
    assert io.load_checkpoint(out / "checkpoints" / NEWEST)[1]["config"]["seed"] == 5


def test_history_plot_of_a_one_epoch_run(ws):
    """A 1-epoch run (the paper preset's default) had a fractional epoch axis (0.945-1.050),
    and the right panel's y label was drawn over the left panel."""
    from parnn import plots

    history = parnn_load(ws / "run" / "model.safetensors").history[:1]
    history[0].pop("test_acc", None)          # rows may lack it (scored at the end only)
    fig = plots.history_figure(history)
    fig.canvas.draw()
    left, right = fig.axes
    for ax in (left, right):
        lo, hi = ax.get_xlim()
        shown_ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert shown_ticks == [1.0], shown_ticks
    renderer = fig.canvas.get_renderer()
    label = right.yaxis.label.get_window_extent(renderer)
    assert label.x0 > left.get_window_extent(renderer).x1, "the label overlaps the left panel"
    assert [line.get_label() for line in right.get_lines()] == ["train", "validation"]


def test_no_progress_bar_frames_in_a_redirected_log(ws, tmp_path):
    """stderr is a pipe here: no bar (each frame would be a line of the log), a line per epoch."""
    r = parnn("train", "--data", ws / "data", "--out", tmp_path / "out", "--hidden", "8",
              "--epochs", "2", "--engine", "numpy", "--threads", "1", "--batch-size", "1",
              "--optimizer", "sgd")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert [line.split()[1] for line in r.stdout.splitlines() if line.startswith("epoch ")] == \
        ["1/2", "2/2"]


def test_train_json_is_one_object_on_stdout(ws, tmp_path):
    import json

    r = parnn("train", "--data", ws / "data", "--out", tmp_path / "out", "--hidden", "8",
              "--epochs", "2", "--engine", "numpy", "--threads", "1", "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    model = parnn_load(tmp_path / "out" / "model.safetensors")
    assert result["test_acc"] == model.meta["test_acc"] and result["epochs"] == 2
    assert result["files"]["model"] == str(tmp_path / "out" / "model.safetensors")
    assert [row["epoch"] for row in result["history"]] == [1, 2]
    assert "epoch 2/2" in r.stderr   # the log went to stderr


def test_evaluate_reports_precision_recall_f1_and_draws_the_confusion_matrix(ws, tmp_path):
    import json

    from parnn import metrics

    model = ws / "run" / "model.safetensors"
    r = parnn("evaluate", model, "--data", ws / "data", "--json", "--figure", tmp_path / "cm.png")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    cm = np.array(report["confusion_matrix"])
    precision, recall, f1 = metrics.precision_recall_f1(cm)
    assert [c["recall"] for c in report["classes"]] == pytest.approx(
        [None if np.isnan(v) else v for v in recall])
    assert report["accuracy"] == pytest.approx(np.trace(cm) / cm.sum()) and cm.sum() == 60
    with Image.open(tmp_path / "cm.png") as im:
        assert im.format == "PNG"
    r = parnn("evaluate", model, "--data", ws / "data")
    assert "precision" in r.stdout and "F1" in r.stdout and "macro average" in r.stdout


def test_evaluate_refuses_another_dataset_than_the_models(ws, tmp_path):
    """Before: MNIST's test set was scored with the model's Fashion-MNIST classes relabelled as
    digits."""
    r = parnn("evaluate", ws / "run" / "model.safetensors", "--data", ws / "data", "--dataset",
              "mnist")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [
        f"parnn: error: {ws / 'run' / 'model.safetensors'} was trained on fashion-mnist, but "
        "this is mnist: its classes are fashion-mnist's (T-shirt/top, Trouser, Pullover, ...), "
        "so the scores would mean nothing; pass --dataset fashion-mnist"]


def test_evaluate_warns_when_the_test_files_differ(ws):
    r = parnn("evaluate", ws / "run" / "model.safetensors", "--data", ws / "other_data")
    assert r.returncode == 0 and "accuracy" in r.stdout
    assert r.stderr.startswith("parnn: warning: the test files in") and \
        len(r.stderr.splitlines()) == 1, r.stderr


def test_predict_shows_names_probabilities_top_k_directories_and_stacks(ws, tmp_path):
    import json

    from parnn.images import load_images

    model = ws / "run" / "model.safetensors"
    m = parnn_load(model)
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    shutil.copy(ws / "good.png", pictures / "a.png")
    shutil.copy(ws / "good.npy", pictures / "b.npy")
    (pictures / "notes.txt").write_text("not a picture: skipped")
    rng = np.random.default_rng(1)
    stack = rng.integers(0, 256, (3, 28, 28)).astype(np.uint8)
    np.save(tmp_path / "stack.npy", stack)
    np.save(tmp_path / "flat.npy", stack.reshape(3, 784))

    r = parnn("predict", model, pictures, tmp_path / "stack.npy", tmp_path / "flat.npy",
              "--top-k", "3")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    lines = [line.split("\t") for line in r.stdout.splitlines()]
    assert [f[0] for f in lines] == [str(pictures / "a.png"), str(pictures / "b.npy"),
                                     *(f"{tmp_path / 'stack.npy'}[{i}]" for i in range(3)),
                                     *(f"{tmp_path / 'flat.npy'}[{i}]" for i in range(3))]
    assert [f[1:] for f in lines[2:5]] == [f[1:] for f in lines[5:8]]   # (N,28,28) = (N,784)
    # each line: three (class, name, probability), most likely first, as the model says
    X = load_images([pictures / "a.png"], 784, m.dtype)
    p = m.predict_proba(X)[0]
    best = np.argsort(-p, kind="stable")[:3]
    assert lines[0][1:] == [x for c in best for x in (str(c), m.class_names[c], f"{p[c]:.4f}")]
    # a stack's pictures are the same pictures as single files
    for i in range(3):
        np.save(tmp_path / f"one{i}.npy", stack[i])
    r = parnn("predict", model, *(tmp_path / f"one{i}.npy" for i in range(3)), "--top-k", "3")
    assert [line.split("\t")[1:] for line in r.stdout.splitlines()] == [f[1:] for f in lines[2:5]]

    r = parnn("predict", model, pictures / "a.png", "--json", "--top-k", "2")
    obj = json.loads(r.stdout)
    assert obj["file"] == str(pictures / "a.png") and obj["class"] == int(best[0])
    assert obj["name"] == m.class_names[best[0]] and len(obj["top"]) == 2
    assert obj["probability"] == pytest.approx(float(p[best[0]]))


def test_predict_refuses_a_top_k_below_1(ws):
    r = parnn("predict", ws / "run" / "model.safetensors", ws / "good.png", "--top-k", "0")
    assert r.returncode == 2
    assert r.stderr.splitlines() == ["parnn: error: --top-k must be >= 1, got 0"]


def test_bench_says_what_it_did_and_no_more(ws, tmp_path, capsys):
    """Issue 10 defect 8, on synthetic data: the modern workload without a breakdown printed the
    paper workload's model lines; serial at 1 thread only, unexplained; times scaled from
    --limit-train to a 60k epoch, unlabelled in the figures."""
    import json

    common = ["--repeat", "1", "--limit-train", "200", "--data", str(ws / "data"),
              "--no-progress"]
    assert cli.main(["bench", "--workload", "modern", "--engines", "numpy", "--hidden", "8",
                     "--threads", "1", "--no-breakdown", "--out", str(tmp_path / "m"),
                     *common]) == 0
    out = capsys.readouterr().out
    assert "The paper's table implies" not in out and "fitted to the paper's table" not in out
    assert cli.main(["bench", "--workload", "paper", "--engines", "serial", "--hidden", "8",
                     "--threads", "1,2", "--no-breakdown", "--out", str(tmp_path / "p"),
                     *common]) == 0
    out = capsys.readouterr().out
    assert "note: engine serial starts no threads: it runs at 1 thread only" in out
    notes = json.loads((tmp_path / "p" / "bench.json").read_text())["notes"]
    assert any("scales its time" in n for n in notes)


def test_bench_figures_say_their_times_are_scaled(monkeypatch, tmp_path):
    from parnn import plots
    from parnn.bench import report

    titles = []
    monkeypatch.setattr(plots, "plot_bench_time", lambda s, p, path, title: titles.append(title))
    monkeypatch.setattr(plots, "plot_bench_speedup", lambda s, p, path, title: None)
    res = {"workload": {"id": "W1", "name": "paper", "sizes": [784, 8, 10], "dtype": "float64",
                        "samples": 200, "epochs": 1},
           "machine": {"cpu": "cpu", "usable_cores": 2}, "started_utc": "2025-01-01T00:00",
           "results": []}
    report.write_results(res, tmp_path)
    assert "times of 1 epoch(s) x 200 samples, scaled to one epoch of 60000" in titles[0]


def test_data_fetch_leaves_no_empty_directory_when_it_fails(tmp_path):
    """Issue 10 defect 4: offline, `data fetch` left an empty cache directory behind."""
    env = {**os.environ, "PARNN_MIRROR": (tmp_path / "nowhere").as_uri(),
           "XDG_CACHE_HOME": str(tmp_path / "cache")}
    env.pop("PARNN_DATA", None)
    r = parnn("data", "fetch", "--dataset", "mnist", env=env)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert not (tmp_path / "cache").exists()


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"),
                    reason="Fashion-MNIST is not installed system-wide")
def test_data_fetch_does_not_download_what_is_installed(tmp_path):
    env = {**os.environ, "PARNN_MIRROR": (tmp_path / "nowhere").as_uri(),
           "XDG_CACHE_HOME": str(tmp_path / "cache")}
    env.pop("PARNN_DATA", None)
    r = parnn("data", "fetch", env=env)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout.startswith("fashion-mnist is already in /usr/share/datasets/fashion-mnist")
    assert not (tmp_path / "cache").exists()


def test_info_and_export_of_a_trained_model(tmp_path):
    """`parnn info` summarises a model file; `parnn export` writes an ONNX graph of it."""
    data = write_dataset(tmp_path / "data")
    run = parnn("train", "--data", data, "--epochs", "1", "--hidden", "16", "--no-progress",
                "--out", tmp_path / "run")
    assert run.returncode == 0, run.stderr
    model = tmp_path / "run" / "model.safetensors"
    info = parnn("info", model)
    assert info.returncode == 0, info.stderr
    assert "784-16-10" in info.stdout and "layers.1  dense    16 -> 10" in info.stdout
    as_json = json.loads(parnn("info", model, "--json").stdout)
    assert as_json["sizes"] == [784, 16, 10] and as_json["n_params"] == 784 * 16 + 16 + 16 * 10 + 10
    bad = parnn("info", tmp_path / "nope.safetensors")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    pytest.importorskip("onnx")
    out = parnn("export", model, tmp_path / "m.onnx")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "m.onnx").stat().st_size > 4 * as_json["n_params"]


def test_export_and_figure_never_destroy_a_file(ws, tmp_path):
    """Before: `parnn export M M` replaced the model with its ONNX graph, and `evaluate
    --figure` drew over any file (the model, history.json), exit 0."""
    model = tmp_path / "model.safetensors"
    model.write_bytes((ws / "run" / "model.safetensors").read_bytes())
    before = model.read_bytes()
    other = tmp_path / "notes.txt"
    other.write_text("keep me")
    for args in (["evaluate", model, "--data", ws / "data", "--figure", model, "--overwrite"],
                 ["evaluate", model, "--data", ws / "data", "--figure", other],
                 ["export", model, model, "--overwrite"], ["export", model, other],
                 ["export", model, tmp_path]):
        r = parnn(*args)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
        assert r.stdout == ""
    assert model.read_bytes() == before and other.read_text() == "keep me"
    assert "reads" in parnn("export", model, model).stderr
    assert "--overwrite" in parnn("export", model, other).stderr
    r = parnn("evaluate", model, "--data", ws / "data", "--figure", other, "--overwrite")
    assert r.returncode == 0, r.stderr
    with Image.open(other) as im:
        assert im.format == "PNG"
