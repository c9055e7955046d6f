"""A CNN does what a model does: model and ensemble files with per-layer (4-D conv) tensors,
`parnn train --model cnn / --layers`, info, evaluate, predict, checkpoints and resume, and the
one-line refusals of what a layer list cannot do yet."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from parnn import io
from parnn.core.model import MLP, Spec
from synthetic_data import parnn, write_dataset

SMALL = "conv4:3,pool,conv6:3:valid,pool,dense16"    # 28x28 -> 14x14x4 -> 12x12x6 -> 6x6x6 -> 16


def cnn(dtype="float32", seed=1, arch=SMALL):
    return MLP(Spec((784, 10), "relu", "softmax", "cross_entropy", dtype, arch), init="he",
               seed=seed)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_cnn_model_file_round_trips_bitwise_with_per_layer_tensors(tmp_path, dtype):
    net = cnn(dtype)
    io.save_model(tmp_path / "m.safetensors", net, {"classes": list(range(10))})
    back, meta = io.load_model(tmp_path / "m.safetensors")
    assert back.spec == net.spec and meta == {"classes": list(range(10))}
    np.testing.assert_array_equal(back.params, net.params)
    X = np.random.default_rng(0).random((5, 784)).astype(dtype)
    np.testing.assert_array_equal(back.output(X), net.output(X))
    tensors = safetensors.numpy.load_file(tmp_path / "m.safetensors")
    # numbered as the layer list: 1 and 3 are pools, 4 the flatten, none with tensors
    assert {k: v.shape for k, v in tensors.items()} == {
        "layers.0.weight": (4, 3, 3, 1), "layers.0.bias": (4,),
        "layers.2.weight": (6, 3, 3, 4), "layers.2.bias": (6,),
        "layers.5.weight": (16, 216), "layers.5.bias": (16,),
        "layers.6.weight": (10, 16), "layers.6.bias": (10,)}
    np.testing.assert_array_equal(tensors["layers.2.weight"], net.W[1])


def test_a_cnn_ensemble_round_trips(tmp_path):
    nets = [cnn(seed=s) for s in (1, 2)]
    io.save_ensemble(tmp_path / "e.safetensors", nets, {})
    back, _ = io.load_any(tmp_path / "e.safetensors")
    for a, b in zip(back, nets):
        np.testing.assert_array_equal(a.params, b.params)


def test_an_mlp_file_header_has_no_arch_and_a_header_without_it_loads(tmp_path):
    net = MLP(Spec((784, 8, 10)))
    io.save_model(tmp_path / "m.safetensors", net, {})
    with open(tmp_path / "m.safetensors", "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(json.loads(f.read(n))["__metadata__"]["parnn"])
    assert set(header["spec"]) == {"sizes", "hidden", "output", "loss", "dtype"}
    assert io.load_model(tmp_path / "m.safetensors")[0].spec == net.spec


def test_a_stored_spec_with_an_empty_arch_is_refused(tmp_path):
    with pytest.raises(io.ModelFileError, match="arch must be a non-empty layer list"):
        io.network_spec(tmp_path / "m", {**Spec().to_dict(), "arch": ""})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"), n_train=400, n_test=60)


def train(data, out, *extra):
    r = parnn("train", "--data", data, "--layers", "conv4:3,pool,dense16", "--epochs", 2,
              "--threads", 1, "--no-progress", "--out", out, "--validation-split", 0, *extra,
              timeout=300)
    assert r.returncode == 0, r.stderr
    return r


def test_train_info_evaluate_and_predict_a_cnn(data, tmp_path):
    train(data, tmp_path / "run")
    model = tmp_path / "run" / "model.safetensors"
    info = parnn("info", model)
    assert info.returncode == 0, info.stderr
    assert "784-[conv4:3,pool,dense16]-10" in info.stdout
    assert "layers.0  conv    28x28x1 -> 28x28x4" in info.stdout
    doc = json.loads(parnn("info", model, "--json").stdout)
    assert [l["kind"] for l in doc["layers"]] == ["conv", "pool", "flatten", "dense", "dense"]
    assert doc["layers"][0]["weight"] == [4, 3, 3, 1] and doc["layers"][1]["weight"] is None
    ev = parnn("evaluate", model, "--data", data, "--json")
    assert ev.returncode == 0, ev.stderr
    acc = json.loads(ev.stdout)["accuracy"]
    net, _ = io.load_model(model)
    from parnn.data import load_dataset
    ds = load_dataset("fashion-mnist", data, "float32")
    X = np.asarray(ds.X_test, np.float32) / (255 if ds.X_test.dtype == np.uint8 else 1)
    assert acc == pytest.approx((net.predict(X) == ds.y_test).mean())
    np.save(tmp_path / "x.npy", X[:3].reshape(3, 28, 28))
    pr = parnn("predict", model, tmp_path / "x.npy", "--invert", "no")
    assert pr.returncode == 0, pr.stderr
    assert [int(l.split("\t")[1]) for l in pr.stdout.splitlines()] == net.predict(X[:3]).tolist()


def test_a_resumed_cnn_run_ends_with_the_bits_of_an_uninterrupted_one(data, tmp_path):
    # a constant learning rate: a cosine over 2 epochs is not the first 2 of one over 3
    train(data, tmp_path / "straight", "--epochs", 3, "--lr-schedule", "constant")
    train(data, tmp_path / "split", "--epochs", 2, "--lr-schedule", "constant")
    r = parnn("train", "--resume", tmp_path / "split", "--epochs", 3, "--no-progress",
              timeout=300)
    assert r.returncode == 0, r.stderr
    a, _ = io.load_model(tmp_path / "straight" / "model.safetensors")
    b, _ = io.load_model(tmp_path / "split" / "model.safetensors")
    np.testing.assert_array_equal(a.params, b.params)


@pytest.mark.parametrize("args,words", [
    (("--model", "cnn", "--engine", "serial"), "engine serial trains dense layers"),
    (("--model", "cnn", "--dropout", "0.2"), "--dropout follows each hidden dense layer"),
    (("--layers", "conv8:3,pool,pool,pool"), "needs an even height and width, got 7x7"),
    (("--layers", "conv8"), "a convolution is spelled convC:K"),
])
def test_what_a_layer_list_cannot_do_is_one_line(args, words, tmp_path):
    r = parnn("train", *args, "--out", tmp_path / "x")
    assert r.returncode != 0 and words in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_model_cnn_sets_the_default_layer_list_and_layers_wins():
    shown = parnn("train", "--model", "cnn", "--show-config").stdout
    assert "conv32:3,pool,conv64:3,pool,dense128" in shown
    assert "\nhidden " not in shown     # a layer list spells its own sizes
    assert "\nhidden " in parnn("train", "--preset", "modern", "--show-config").stdout
    for order in (("--layers", "conv8:3,pool", "--model", "cnn"),
                  ("--model", "cnn", "--layers", "conv8:3,pool")):
        assert "conv8:3,pool\n" in parnn("train", *order, "--show-config").stdout


MPIEXEC = Path(sys.executable).parent / "mpiexec"


@pytest.mark.mpi
@pytest.mark.skipif(not MPIEXEC.exists(), reason="no mpiexec next to the interpreter")
def test_a_cnn_trains_under_mpi_allreduce_like_one_process(data, tmp_path):
    import os
    import subprocess

    one = ("--data", data, "--layers", "conv4:3,pool,dense16", "--epochs", 1, "--threads", 1,
           "--no-progress", "--preset", "modern", "--limit-train", 384, "--optimizer", "sgd",
           "--lr", 0.05)    # not Adam, whose first steps are lr * sign(g), rounding or not
    train(data, tmp_path / "one", *one[4:])
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    r = subprocess.run([str(MPIEXEC), "-n", "2", str(MPIEXEC.parent / "parnn"), "train",
                        *map(str, one), "--distributed", "allreduce", "--out", str(tmp_path / "mpi")],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert "weights identical on all 2 ranks" in r.stdout + r.stderr
    a, _ = io.load_model(tmp_path / "one" / "model.safetensors")
    b, _ = io.load_model(tmp_path / "mpi" / "model.safetensors")
    assert a.spec == b.spec
    # the same batches, each gradient summed over two halves: equal but for rounding
    np.testing.assert_allclose(b.params, a.params, rtol=0, atol=1e-6)


def test_a_checkpoint_from_before_layer_lists_still_loads(data, tmp_path):
    """Checkpoints written before the `layers` setting have no such key: an MLP's."""
    from parnn.run import checkpoint

    r = parnn("train", "--data", data, "--hidden", 8, "--epochs", 1, "--threads", 1,
              "--no-progress", "--out", tmp_path, "--validation-split", 0, timeout=300)
    assert r.returncode == 0, r.stderr
    path = tmp_path / "checkpoints" / "checkpoint.safetensors"
    arrays, meta = io.load_checkpoint(path)
    assert meta["config"].pop("layers") == ""
    io.save_checkpoint(path, arrays, meta)
    ck = checkpoint.read(path)
    assert ck.config.layers == "" and not ck.config.spec().arch
