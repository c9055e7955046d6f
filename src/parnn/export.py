"""ONNX export: a parnn model or ensemble as one ONNX graph (the `onnx` extra).

    parnn.export.to_onnx("runs/accurate/model.safetensors", "model.onnx")
    parnn.export.to_onnx(model)              # a parnn.Model; returns the onnx.ModelProto

The graph computes what parnn.run.api.Model.predict_proba and predict do:

    input          (N, n_in) float32, N free. Values as Model.predict_proba takes floats: pixel
                   models want [0, 1] (the graph does not scale uint8 0..255), see "inputs"
    per network    a = Gemm(a, layers.l.weight, layers.l.bias, transB=1): a @ W.T + b, then
                   Relu | Tanh | Sigmoid, the last layer's Softmax | Tanh | Sigmoid; the
                   initializers carry the model file's tensor names (members.k. in front for
                   an ensemble's member k). A layer list (a CNN): Reshape to parnn's NHWC
                   image and Transpose to NCHW, Conv (kernels transposed to OIHW) + its
                   activation, MaxPool 2x2, Transpose back to NHWC + Flatten, then Gemms
    ensemble       soft vote: Sum of the members' outputs / K, before the mapping below
    probabilities  (N, classes) float32. A softmax output as it is; a tanh output + 1, a
                   sigmoid output as it is, each divided by its row's sum, a row summing to
                   0 or less becoming uniform: Model.predict_proba's mapping, op for op
    label          (N,) int64: ArgMax of the probabilities (the first of equal ones, as
                   NumPy's argmax), an index into the "classes" of the metadata

A float64 network computes in double inside the graph (Cast after the input, Cast before the
probabilities), so its labels are parnn's; dtype="float32" exports it in float32 instead, for
runtimes without double kernels. A float64 CNN is exported in float32 unless dtype="float64"
is asked for: onnxruntime has no double Conv. The model's metadata_props hold parnn_version,
classes and class_names (JSON), inputs, spec, members and the parameters' sha256 digests.
"""

from __future__ import annotations

import json
import os

import numpy as np

from parnn import __version__, atomic, io
from parnn.errors import ConfigError, ParnnError
from parnn.paths import shown

MIN_OPSET = 13   # from 13 on, Softmax works over one axis and ReduceSum takes axes as an input
DEFAULT_OPSET = 17
HIDDEN_OPS = {"relu": "Relu", "tanh": "Tanh", "sigmoid": "Sigmoid"}
OUTPUT_OPS = {"softmax": "Softmax", "tanh": "Tanh", "sigmoid": "Sigmoid", "identity": None}


def to_onnx(model_or_path, path=None, opset=DEFAULT_OPSET, dtype=None):
    """The ONNX graph (onnx.ModelProto) of a parnn.Model or of a model file's path (a model
    or an ensemble), written to `path` (atomically) when given.

    opset: the ONNX operator set, 13 to the newest the installed onnx knows (17 by default).
    dtype: None computes in the network's dtype (a CNN's in float32); "float32" casts a float64
    network's weights.
    ParnnError (one line) for a file that is not a model, a path that cannot be written, a
    missing onnx package; ConfigError (also a ValueError) for a bad opset or dtype."""
    onnx = _onnx()
    model = _model(model_or_path)
    opset = _opset(onnx, opset)
    # onnxruntime has no double Conv kernel: a float64 CNN computes in float32 unless asked.
    default = "float32" if model.spec.arch else model.spec.dtype
    compute = _dtype(default if dtype is None else dtype)
    proto = _Graph(onnx, compute).build(model)
    proto = onnx.helper.make_model_gen_version(
        proto, opset_imports=[onnx.helper.make_opsetid("", opset)], producer_name="parnn",
        producer_version=__version__, doc_string=_doc(model, compute))
    onnx.helper.set_model_props(proto, _metadata(model, compute))
    onnx.checker.check_model(proto, full_check=True)   # a bug here, not the user's input
    if path is not None:
        try:
            atomic.atomic_write_bytes(path, proto.SerializeToString())
        except OSError as e:
            raise ParnnError(f"{shown(path)}: cannot write: {e.strerror or e}") from None
    return proto


def _onnx():
    try:
        import onnx
        import onnx.checker
        import onnx.defs
        import onnx.helper
        import onnx.numpy_helper
    except ImportError:
        raise ParnnError("ONNX export needs the onnx package: pip install 'parnn[onnx]'") from None
    return onnx


def _model(model_or_path):
    from parnn.run.api import Model, load

    if isinstance(model_or_path, Model):
        return model_or_path
    if isinstance(model_or_path, (str, os.PathLike)):
        return load(model_or_path)
    raise ConfigError("to_onnx takes a parnn Model or the path of a model file, got "
                      f"{type(model_or_path).__name__}")


def _dtype(dtype):
    try:
        compute = np.dtype(dtype)
    except TypeError:
        compute = None
    if compute not in (np.float32, np.float64):
        raise ConfigError(f"dtype must be float32, float64 or None (the model's), got {dtype!r}")
    return compute


def _opset(onnx, opset):
    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        raise ConfigError(f"opset must be an integer from {MIN_OPSET} to {newest} (the newest "
                          f"this onnx knows), got {opset!r}")
    return opset


class _Graph:
    """Nodes and initializers, each node named after its one output."""

    def __init__(self, onnx, dtype):
        self.onnx, self.dtype = onnx, dtype
        self.type = onnx.helper.np_dtype_to_tensor_dtype(dtype)
        self.nodes, self.initializers = [], []

    def const(self, name, value, dtype=None):
        array = np.asarray(value, self.dtype if dtype is None else dtype)
        self.initializers.append(self.onnx.numpy_helper.from_array(array, name))
        return name

    def op(self, op_type, inputs, out, **attrs):
        self.nodes.append(self.onnx.helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def network(self, net, x, prefix):
        """The output layer of one network for input x (a name)."""
        spec = net.spec
        for name, array in io.layer_tensors(spec, net.params, prefix).items():
            # a conv kernel: parnn's (C_out, k, k, C_in) as ONNX's (C_out, C_in, k, k)
            self.const(name, array.transpose(0, 3, 1, 2) if array.ndim == 4 else array)
        if spec.arch:
            return self.layer_list(spec, x, prefix)
        for l in range(spec.n_layers):
            layer = f"{prefix}layers.{l}"
            x = self.op("Gemm", [x, f"{layer}.weight", f"{layer}.bias"], f"{layer}.z", transB=1)
            last = l == spec.n_layers - 1
            act = spec.activation(l)
            ops = OUTPUT_OPS if last else HIDDEN_OPS
            if act not in ops:
                raise ConfigError(f"cannot export the {act} {'output' if last else 'hidden'} "
                                  "activation to ONNX")
            op = ops[act]
            if op is not None:
                x = self.op(op, [x], f"{layer}.{act}", **({"axis": -1} if op == "Softmax" else {}))
        return x

    def layer_list(self, spec, x, prefix):
        """A layer list (parnn.core.conv): parnn's images are NHWC, ONNX's Conv and MaxPool
        NCHW, so the rows are reshaped to (N, H, W, C) and transposed to NCHW once, and
        transposed back before Flatten, which must flatten in parnn's (h, w, c) order."""
        layers = spec.layers(compiled=False)
        act = None
        for l, layer in enumerate(layers):
            name = f"{prefix}layers.{l}"
            kind = type(layer).__name__
            if kind in ("Conv2D", "MaxPool2D") and act != "nchw":
                shape = self.const(f"{name}.image_shape", [-1, *layer.in_shape], np.int64)
                x = self.op("Reshape", [x, shape], f"{name}.nhwc")
                x = self.op("Transpose", [x], f"{name}.nchw", perm=[0, 3, 1, 2])
                act = "nchw"
            if kind == "Conv2D":
                x = self.op("Conv", [x, f"{name}.weight", f"{name}.bias"], f"{name}.z",
                            kernel_shape=[layer.k, layer.k], pads=[layer.pad] * 4,
                            strides=[1, 1])
                x = self.activation(x, name, layer.activation, last=False)
            elif kind == "MaxPool2D":
                x = self.op("MaxPool", [x], f"{name}.pool", kernel_shape=[2, 2], strides=[2, 2])
            elif kind == "Flatten":
                x = self.op("Transpose", [x], f"{name}.nhwc", perm=[0, 2, 3, 1])
                x = self.op("Flatten", [x], f"{name}.flat", axis=1)
                act = None
            elif kind == "Dense":
                x = self.op("Gemm", [x, f"{name}.weight", f"{name}.bias"], f"{name}.z", transB=1)
                last = l == len(layers) - 1
                x = self.activation(x, name, spec.output if last else layer.activation, last)
            else:
                raise ConfigError(f"cannot export a {kind} layer to ONNX")
        return x

    def activation(self, x, name, act, last):
        ops = OUTPUT_OPS if last else HIDDEN_OPS
        if act not in ops and not (act == "identity" and not last):
            raise ConfigError(f"cannot export the {act} {'output' if last else 'hidden'} "
                              "activation to ONNX")
        op = ops.get(act)
        if op is None:
            return x
        return self.op(op, [x], f"{name}.{act}", **({"axis": -1} if op == "Softmax" else {}))

    def probabilities(self, out, output, n_classes):
        """parnn.run.api.probabilities, op for op: a softmax output as it is, an identity
        output's softmax; otherwise
        (tanh: + 1) divided by the row's sum where that is > 0, else 1 / n_classes."""
        if output == "softmax":
            return out
        if output == "identity":
            return self.op("Softmax", [out], "identity_softmax", axis=-1)
        one = self.const("one", 1.0)
        if output == "tanh":
            out = self.op("Add", [out, one], "tanh_plus_1")
        total = self.op("ReduceSum", [out, self.const("axis_1", [1], np.int64)], "row_sum",
                        keepdims=1)
        positive = self.op("Greater", [total, self.const("zero", 0.0)], "row_sum_positive")
        divisor = self.op("Where", [positive, total, one], "row_divisor")
        ratio = self.op("Div", [out, divisor], "normalized")
        uniform = self.const("uniform", np.full((1, n_classes), 1.0 / n_classes))
        return self.op("Where", [positive, ratio, uniform], "mapped")

    def build(self, model):
        helper, f32 = self.onnx.helper, self.onnx.TensorProto.FLOAT
        n_in, n_classes = model.spec.sizes[0], model.spec.sizes[-1]
        x = "input"
        if self.dtype != np.float32:
            x = self.op("Cast", [x], "input_cast", to=self.type)
        nets = model.nets
        outs = [self.network(net, x, f"members.{k}." if len(nets) > 1 else "")
                for k, net in enumerate(nets)]
        out = outs[0]
        if len(nets) > 1:   # predict_proba: out += each member's; out /= K
            total = self.op("Sum", outs, "members_sum")
            out = self.op("Div", [total, self.const("n_members", len(nets))], "members_mean")
        p = self.probabilities(out, model.spec.output, n_classes)
        if self.dtype != np.float32:
            self.op("Cast", [p], "probabilities", to=f32)
        else:
            self.op("Identity", [p], "probabilities")
        self.op("ArgMax", [p], "label", axis=1, keepdims=0)
        return helper.make_graph(
            self.nodes, "parnn",
            [helper.make_tensor_value_info("input", f32, ["N", n_in])],
            [helper.make_tensor_value_info("probabilities", f32, ["N", n_classes]),
             helper.make_tensor_value_info("label", self.onnx.TensorProto.INT64, ["N"])],
            self.initializers)


def _doc(model, dtype):
    spec = model.spec
    what = f"an ensemble of {len(model.nets)} networks (soft vote)" if len(model.nets) > 1 \
        else "a network"
    shape = f"{spec.sizes[0]}-[{spec.arch}]-{spec.sizes[-1]}" if spec.arch else \
        '-'.join(map(str, spec.sizes))
    return (f"parnn {__version__}: {what} {shape}, {spec.hidden} "
            f"hidden, {spec.output} output, computed in {dtype.name}. input: (N, {spec.sizes[0]}) "
            f"float32 ({model.inputs}); probabilities: (N, {spec.sizes[-1]}) as "
            "parnn's Model.predict_proba; label: argmax, an index into classes.")


def _metadata(model, dtype):
    classes = model.classes.tolist()
    return {
        "parnn_version": __version__,
        "classes": json.dumps(classes),
        "class_names": json.dumps(list(model.class_names)),
        "inputs": model.inputs,
        "spec": json.dumps(model.spec.to_dict(), sort_keys=True),
        "members": str(len(model.nets)),
        "compute_dtype": dtype.name,
        "params_sha256": json.dumps([io.params_sha256(n.params) for n in model.nets]),
    }
