"""parnn.export.to_onnx: onnxruntime, running the exported graph, gives parnn's probabilities
(to 1e-5) and labels, for single networks and soft-voting ensembles."""

import json
from pathlib import Path

import numpy as np
import pytest
import safetensors

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import parnn  # noqa: E402
from parnn import export  # noqa: E402
from parnn.core.model import MLP, Spec  # noqa: E402
from parnn.errors import ConfigError, ModelFileError, ParnnError  # noqa: E402
from parnn.run.api import Model  # noqa: E402

FASHION = Path("/usr/share/datasets/fashion-mnist")
TOL = 1e-5
SPECS = {   # name: (spec, init)
    "modern": (Spec((784, 256, 128, 10), "relu", "softmax", "cross_entropy", "float32"), "he"),
    "paper": (Spec((784, 256, 128, 10), "tanh", "tanh", "mse", "float64"), "xavier"),
    "sigmoid": (Spec((784, 64, 10), "relu", "sigmoid", "mse", "float32"), "he"),
    "all-sigmoid": (Spec((784, 32, 16, 5), "sigmoid", "sigmoid", "mse", "float64"), "xavier"),
    "identity": (Spec((784, 32, 10), "relu", "identity", "mse", "float32"), "he"),   # regression
    "cnn": (Spec((784, 10), "relu", "softmax", "cross_entropy", "float32",
                 "conv4:3,pool,conv6:3:valid,pool,dense16"), "he"),
    "cnn64": (Spec((784, 10), "tanh", "softmax", "cross_entropy", "float64",
                   "conv3:5:valid,pool,conv4:1,flatten,dense8"), "xavier"),
}


def networks(name, members=1, seed=0):
    """Networks of SPECS[name] with random weights and biases (init leaves biases at 0)."""
    spec, init = SPECS[name]
    nets = [MLP(spec, init=init, seed=seed + k) for k in range(members)]
    rng = np.random.default_rng(seed)
    for net in nets:
        for b in net.b:
            b[...] = rng.normal(0, 0.1, b.shape)
    return nets


def pixels(n=1000, n_in=784, seed=0):
    return np.random.default_rng(seed).random((n, n_in), dtype=np.float32)


def session(proto_or_path):
    source = proto_or_path if isinstance(proto_or_path, str) else proto_or_path.SerializeToString()
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


def run(proto_or_path, X):
    proba, label = session(proto_or_path).run(["probabilities", "label"], {"input": X})
    assert proba.dtype == np.float32 and label.dtype == np.int64
    return proba, label


def assert_matches(model, proto_or_path, X):
    """Probabilities within TOL of parnn's; labels parnn's, but where parnn's two best
    probabilities are within TOL (a rounding may then order them either way)."""
    proba, label = run(proto_or_path, X)
    ref = model.predict_proba(X)
    assert proba.shape == ref.shape == (len(X), len(model.classes))
    np.testing.assert_allclose(proba, ref, rtol=0, atol=TOL)
    top2 = np.sort(ref, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > TOL
    assert clear.mean() > 0.99
    assert np.array_equal(model.classes[label][clear], model.predict(X)[clear])
    return proba, label


@pytest.mark.parametrize("name", list(SPECS))
def test_a_network_file_gives_parnns_probabilities_and_labels(tmp_path, name):
    model = Model(networks(name))
    model.save(tmp_path / "m.safetensors")
    proto = export.to_onnx(str(tmp_path / "m.safetensors"), tmp_path / "m.onnx")
    onnx.checker.check_model(onnx.load(tmp_path / "m.onnx"), full_check=True)
    assert proto.SerializeToString() == (tmp_path / "m.onnx").read_bytes()
    _, label = assert_matches(parnn.load(tmp_path / "m.safetensors"), str(tmp_path / "m.onnx"),
                              pixels())
    if model.dtype == np.float64 and not model.spec.arch:   # in double: parnn's labels, all
        assert np.array_equal(label, model.predict(pixels()))


@pytest.mark.parametrize("name", ["modern", "paper", "cnn"])
def test_an_ensemble_file_soft_votes_inside_the_graph(tmp_path, name):
    nets = networks(name, members=3)
    Model(nets).save(tmp_path / "e.safetensors")
    model = parnn.load(tmp_path / "e.safetensors")
    proto = export.to_onnx(tmp_path / "e.safetensors")
    X = pixels()
    proba, _ = assert_matches(model, proto, X)
    # The vote is the members' mean output, mapped: not any one member's probabilities.
    for net in nets:
        assert np.abs(proba - Model([net]).predict_proba(X)).max() > 10 * TOL
    with safetensors.safe_open(tmp_path / "e.safetensors", "np") as f:
        assert {i.name for i in proto.graph.initializer} >= set(f.keys())


def test_a_float64_network_exported_in_float32(tmp_path):
    model = Model(networks("paper"))
    proto = export.to_onnx(model, dtype="float32")
    assert {i.data_type for i in proto.graph.initializer if i.name.startswith("layers.")} == \
        {onnx.TensorProto.FLOAT}
    assert not [n for n in proto.graph.node if n.op_type == "Cast"]
    assert_matches(model, proto, pixels())
    assert dict((p.key, p.value) for p in proto.metadata_props)["compute_dtype"] == "float32"


def test_the_graphs_interface_names_and_metadata(tmp_path):
    names = ["cat", "dog", "bird", "fish", "frog"]
    model = Model(networks("all-sigmoid"), classes=np.array(names),
                  class_names=[n.title() for n in names])
    proto = export.to_onnx(model, tmp_path / "m.onnx", opset=17)
    assert proto.opset_import[0].version == 17 and proto.producer_name == "parnn"
    (inp,), outs = proto.graph.input, proto.graph.output
    assert inp.name == "input" and inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == ["N", 784]
    assert [(o.name, [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim])
            for o in outs] == [("probabilities", ["N", 5]), ("label", ["N"])]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["parnn_version"] == parnn.__version__ and meta["members"] == "1"
    assert json.loads(meta["classes"]) == names
    assert json.loads(meta["class_names"]) == ["Cat", "Dog", "Bird", "Fish", "Frog"]
    assert meta["inputs"] == "pixels" and json.loads(meta["spec"]) == model.spec.to_dict()
    ops = {n.op_type for n in proto.graph.node}
    assert {"Gemm", "Sigmoid", "ReduceSum", "Div", "ArgMax"} <= ops and "Softmax" not in ops
    # Any batch size; labels are indices into the classes of the metadata.
    assert_matches(model, str(tmp_path / "m.onnx"), pixels())
    for n in (1, 7):
        X = pixels(n, seed=n)
        proba, label = run(str(tmp_path / "m.onnx"), X)
        np.testing.assert_allclose(proba, model.predict_proba(X), rtol=0, atol=TOL)
        assert label.shape == (n,) and list(np.array(names)[label]) == list(model.predict(X))


def test_saturated_tanh_outputs_give_uniform_rows_not_nan():
    """All outputs -1: the row's sum after + 1 is 0, and predict_proba makes it uniform."""
    net = networks("paper")[0]
    net.W[-1][...] = 0
    net.b[-1][...] = -40.0   # tanh(-40) is -1 in double
    model = Model([net])
    proba, label = run(export.to_onnx(model), pixels(50))
    assert np.array_equal(model.predict_proba(pixels(50)), np.full((50, 10), 0.1))
    np.testing.assert_allclose(proba, 0.1, rtol=0, atol=TOL)
    assert (label == 0).all() and (model.predict(pixels(50)) == 0).all()


@pytest.mark.parametrize("opset", [export.MIN_OPSET, onnx.defs.onnx_opset_version()])
def test_other_opsets_pass_the_checker(opset):
    proto = export.to_onnx(Model(networks("sigmoid")), opset=opset)
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version == opset
    if opset == export.MIN_OPSET:
        assert_matches(Model(networks("sigmoid")), proto, pixels(100))


def one_line(excinfo, *words):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, msg


def test_bad_paths_and_arguments_are_one_line_errors(tmp_path):
    with pytest.raises(ParnnError) as e:
        export.to_onnx(tmp_path / "nope.safetensors")
    one_line(e, str(tmp_path / "nope.safetensors"), "no such file")
    (tmp_path / "text.safetensors").write_text("hello")
    with pytest.raises(ModelFileError) as e:
        export.to_onnx(str(tmp_path / "text.safetensors"))
    one_line(e, "text.safetensors")
    model = Model(networks("sigmoid"))
    with pytest.raises(ParnnError) as e:
        export.to_onnx(model, tmp_path)   # a directory
    one_line(e, str(tmp_path), "cannot write")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ParnnError) as e:
        export.to_onnx(model, tmp_path / "file" / "m.onnx")
    one_line(e, "cannot write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "text.safetensors"]
    for bad in (12, 1000, "17", 17.0, True):
        with pytest.raises(ConfigError) as e:
            export.to_onnx(model, opset=bad)
        one_line(e, "opset")
    for bad in ("float16", "garbage", 3):
        with pytest.raises(ConfigError) as e:
            export.to_onnx(model, dtype=bad)
        one_line(e, "dtype")
    with pytest.raises(ConfigError) as e:
        export.to_onnx(42)
    one_line(e, "Model", "int")


@pytest.mark.slow
@pytest.mark.skipif(not FASHION.is_dir(), reason="Fashion-MNIST not installed")
def test_trained_models_on_real_test_images(tmp_path):
    """Trained networks (peaked outputs) on 1,000 Fashion-MNIST test images."""
    from parnn.data import load_dataset

    ds = load_dataset("fashion-mnist", FASHION, limit_train=6000, limit_test=1000)
    assert len(ds.X_test) == 1000
    settings = dict(class_names=ds.class_names, hidden=(128, 64), engine="numpy", threads=1)
    modern = [parnn.train(ds.X_train, ds.y_train, epochs=2, seed=s, **settings)[0]
              for s in (1, 2)]
    paper, _ = parnn.train(ds.X_train[:3000], ds.y_train[:3000], config="paper", **settings)
    ensemble = Model([m.nets[0] for m in modern], modern[0].classes, ds.class_names)
    for model in (modern[0], paper, ensemble):
        model.save(tmp_path / "m.safetensors")
        export.to_onnx(tmp_path / "m.safetensors", tmp_path / "m.onnx")
        _, label = assert_matches(parnn.load(tmp_path / "m.safetensors"),
                                  str(tmp_path / "m.onnx"), ds.X_test)
        assert np.mean(model.classes[label] == ds.y_test) > 0.6
