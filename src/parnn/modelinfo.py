"""A model file summarised for people: what `parnn info MODEL` prints.

model_info(path) -> a JSON-able dict (after every check io makes when it loads a model);
info_text(info) -> the lines `parnn info` prints, every name from the file shown on one line.
"""

from __future__ import annotations

import math
import os
import textwrap

import numpy as np

from parnn.atomic import dumps
from parnn.io import _load, params_sha256
from parnn.paths import shown

def model_info(path) -> dict:
    """A summary of a model or ensemble file, after every check load_any makes (a damaged file
    is ModelFileError), as a JSON-able dict:

        path, kind ("model" | "ensemble"), members (1 for a model), format, writer, layout,
        sizes, hidden, output, loss, dtype,
        layers: [{name, kind, inputs, outputs, activation, weight (shape), bias (shape),
                  params}],
        n_params (one network's), n_params_total (all members'),
        classes, class_names, inputs ("pixels" | "features"),
        dataset ({name, sha256}: sha256 one hex digest or one per file, {"t10k-images": ...}),
        config (the training settings), engine, epochs (history rows), best_epoch,
        accuracy ({train_acc, val_acc, test_acc} at the end: the last history row's, test_acc
        the test set's score at the end when the file has one; an ensemble's: its vote's),
        params_sha256 (per member), member_settings ({setting: each member's value} where
        members differ, from the file's member_configs; None without).

    What the writer did not record (a file from parnn.MLPClassifier has no dataset) is None.
    info_text renders it."""
    kind, nets, header = _load(path, ("model", "ensemble"))
    spec, meta = nets[0].spec, header.get("meta", {})
    history = meta.get("history") if isinstance(meta.get("history"), list) else []
    last = history[-1] if history and isinstance(history[-1], dict) else {}
    accuracy = {k: _number(last.get(k)) for k in ("train_acc", "val_acc", "test_acc")}
    if kind == "ensemble" and "member_configs" in meta:
        # --members: the history is member 0's; the vote's own numbers, or none. (An MPI
        # ensemble's history rows are the ensemble's already: the members' mean, the vote.)
        accuracy = {"train_acc": None, "val_acc": _number(meta.get("val_acc")),
                    "test_acc": None}
    if _number(meta.get("test_acc")) is not None:
        accuracy["test_acc"] = _number(meta["test_acc"])
    dataset = meta.get("dataset") if isinstance(meta.get("dataset"), dict) else {}
    return {
        "path": os.fsdecode(path), "kind": kind, "members": len(nets),
        "format": header["format"], "writer": _text(header.get("writer")),
        "layout": header.get("layout", "flat"),
        "sizes": list(spec.sizes), "hidden": spec.hidden, "output": spec.output,
        "loss": spec.loss, "dtype": spec.dtype,
        "arch": spec.arch or None,
        "layers": _layers(spec),
        "n_params": spec.n_params, "n_params_total": spec.n_params * len(nets),
        "classes": meta.get("classes") if isinstance(meta.get("classes"), list) else None,
        "class_names": meta.get("class_names") if isinstance(meta.get("class_names"), list)
        else None,
        "inputs": _text(meta.get("inputs")),
        "dataset": {"name": _text(dataset.get("name")), "sha256": _digests(dataset.get("sha256"))}
        if dataset else None,
        "config": meta.get("config") if isinstance(meta.get("config"), dict) else None,
        "engine": _text(meta.get("engine")),
        "epochs": len(history),
        "best_epoch": _number(meta.get("best_epoch")),
        "accuracy": accuracy,
        "params_sha256": [params_sha256(n.params) for n in nets],
        "member_settings": member_settings(_member_configs(meta), len(nets)),
    }


def _member_configs(meta):
    """Each member's config: a --members file's member_configs, an MPI ensemble's members'
    records (each holding its config); None without."""
    if "member_configs" in meta:
        return meta["member_configs"]
    members = meta.get("members")
    if isinstance(members, list) and all(isinstance(m, dict) for m in members):
        return [m.get("config") for m in members]
    return None


def member_settings(configs, members):
    """{setting: [each member's value]} for the settings in which an ensemble's members differ
    (their seeds, a recipe's augmentation, ...), from their configs (dicts); None without."""
    if not (isinstance(configs, list) and len(configs) == members > 1
            and all(isinstance(c, dict) for c in configs)):
        return None
    keys = dict.fromkeys(k for c in configs for k in c)
    return {k: [c.get(k) for c in configs] for k in keys
            if any(c.get(k) != configs[0].get(k) for c in configs)}


_KINDS = {"Dense": "dense", "Conv2D": "conv", "MaxPool2D": "pool", "Flatten": "flatten"}


def _layers(spec):
    """One entry per layer: inputs and outputs are a dense layer's sizes, an image layer's
    [height, width, channels]; weight and bias shapes, None for a layer without parameters."""
    rows = []
    for l, layer in enumerate(spec.layers(compiled=False)):
        kind = _KINDS.get(type(layer).__name__, type(layer).__name__)
        shapes = [list(s) for s in layer.shapes] or [None, None]
        ins = layer.n_in if kind == "dense" else list(layer.in_shape)
        outs = layer.out_shape[0] if len(layer.out_shape) == 1 else list(layer.out_shape)
        rows.append({"name": f"layers.{l}", "kind": kind, "inputs": ins, "outputs": outs,
                     "activation": spec.activation(l) if kind in ("dense", "conv") else None,
                     "weight": shapes[0], "bias": shapes[1], "params": layer.n_params})
    return rows


def _size(x):
    return "x".join(map(str, x)) if isinstance(x, list) else str(x)


def _number(x):
    ok = isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
    return x if ok else None


def _text(x):
    return x if isinstance(x, str) else None


def _digests(x):
    """A dataset's sha256: one hex string, or one per file ({"train-images": hex, ...})."""
    if isinstance(x, dict):
        return {k: v for k, v in x.items() if isinstance(v, str)} or None
    return _text(x)


def _setting(value):
    # Compact JSON: no spaces inside a value, so the lines wrap between settings only.
    return shown(value if isinstance(value, str) else dumps(value, separators=(",", ":")))


_INPUTS_TEXT = {"pixels": "pixels: values in [0, 1] (uint8 0..255 scaled by 1/255)",
                "features": "features: any finite numbers, used as given"}


def info_text(info) -> str:
    """model_info's summary as the lines `parnn info` prints (every name from the file shown
    on one line: control characters escaped)."""
    lines = []

    def row(label, text=""):
        lines.append(f"{label:<11} {text}".rstrip())

    members = info["members"]
    what = f"ensemble of {members} networks (soft vote)" if info["kind"] == "ensemble" else "model"
    writer = f", written by {shown(info['writer'])}" if info["writer"] else ""
    lines.append(f"{shown(info['path'])}: parnn {what}, format {info['format']}{writer}")
    prefix = "members.K." if info["kind"] == "ensemble" else ""
    row("tensors", f"per layer: {prefix}layers.L.weight (out, in)"
        f"{' or conv (out, k, k, in)' if info.get('arch') else ''}, {prefix}layers.L.bias (out,)"
        if info["layout"] == "layers" else
        f"one flat buffer per network ({'memberK.' if prefix else ''}params: format 1 or 2)")
    arch = info.get("arch")
    sizes = info["sizes"]
    net = f"{sizes[0]}-[{shown(arch)}]-{sizes[-1]}" if arch else '-'.join(map(str, sizes))
    row("network", f"{net}: {info['hidden']} hidden, "
        f"{info['output']} output, {info['loss']} loss, {info['dtype']}")
    width = max(len(f"{layer['params']:,}") for layer in info["layers"])
    kw = max(len(layer["kind"]) for layer in info["layers"])
    for i, layer in enumerate(info["layers"]):
        if layer["weight"] is None:      # pool, flatten: no parameters
            row("layers" if i == 0 else "",
                f"{layer['name']:<9} {layer['kind']:<{kw}} {_size(layer['inputs']):>5} -> "
                f"{_size(layer['outputs'])}")
            continue
        row("layers" if i == 0 else "",
            f"{layer['name']:<9} {layer['kind']:<{kw}} {_size(layer['inputs']):>5} -> "
            f"{_size(layer['outputs']):<5} "
            f"{layer['activation']:<8} weight {tuple(layer['weight'])!s:<12} "
            f"bias {tuple(layer['bias'])!s:<8} {layer['params']:>{width},}")
    size = info["n_params"] * np.dtype(info["dtype"]).itemsize
    size = f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"
    total = (f" per network, {info['n_params_total']:,} in all" if members > 1 else "")
    row("parameters", f"{info['n_params']:,} ({size} as {info['dtype']}){total}")
    if info["class_names"] is not None:
        names = [shown(n) for n in info["class_names"]]
        shown_names = ", ".join(names[:10]) + (f", ... ({len(names)} in all)"
                                               if len(names) > 10 else "")
        row("classes", f"{len(names)}: {shown_names}")
    if info["inputs"] is not None:
        row("inputs", _INPUTS_TEXT.get(info["inputs"], shown(info["inputs"])))
    if info["dataset"] is not None:
        name, digests = shown(info["dataset"]["name"] or "?"), info["dataset"]["sha256"]
        if isinstance(digests, dict):
            row("dataset", f"{name}, sha256 of its files:")
            for file, digest in digests.items():
                row("", f"  {shown(file)} {shown(digest)}")
        else:
            row("dataset", name + (f", sha256 {shown(digests)}" if digests else ""))
    if info["config"] is not None:
        config = info["config"]   # the preset first: the others are its settings or overrides
        settings = " ".join(f"{shown(k)}={_setting(v)}"
                            for k, v in sorted(config.items(), key=lambda kv: kv[0] != "preset"))
        for i, text in enumerate(textwrap.wrap(settings, 88, break_long_words=False)):
            row("training" if i == 0 else "", text)
        if info.get("member_settings"):   # the settings above are member 0's
            for i, (k, values) in enumerate(info["member_settings"].items()):
                row("members" if i == 0 else "",
                    f"{shown(k)}: {', '.join(_setting(v) for v in values)}")
    if info["engine"] is not None:
        row("engine", shown(info["engine"]))
    if info["epochs"]:
        best = f", best epoch {info['best_epoch']}" if info["best_epoch"] is not None else ""
        row("history", f"{info['epochs']} epoch{'s' * (info['epochs'] != 1)}{best}")
    accuracy = info["accuracy"]
    acc = {"train": accuracy.get("train_acc"), "validation": accuracy.get("val_acc"),
           "test": accuracy.get("test_acc")}
    if any(v is not None for v in acc.values()):
        row("accuracy", ", ".join(f"{k} {v:.4f}" for k, v in acc.items() if v is not None)
            + (" (the soft vote)" if info["kind"] == "ensemble" else ""))
    for k, digest in enumerate(info["params_sha256"]):
        row("checksum" if k == 0 else "",
            f"sha256 {digest}" + (f" (member {k})" if members > 1 else ""))
    return "\n".join(lines)
