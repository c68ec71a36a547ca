"""The demo model bundled in models/ (made by models/make_digits_cnn.py): valid, runnable, documented.

These tests never retrain; they check the committed files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

ort = pytest.importorskip("onnxruntime")

MODELS = Path(__file__).resolve().parents[1] / "models"
MODEL = MODELS / "digits_cnn.onnx"
VAL = MODELS / "digits_val.npz"
LABELS = MODELS / "digits_val_labels.npy"
CALIB = MODELS / "digits_calib.npz"
META = MODELS / "digits_cnn.json"
README = MODELS / "README.md"


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return onnx.load(str(MODEL))


@pytest.fixture(scope="module")
def meta() -> dict:
    return json.loads(META.read_text())


@pytest.fixture(scope="module")
def session():
    return ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def val() -> tuple[np.ndarray, np.ndarray]:
    with np.load(VAL) as z:
        x = z["input"]
    return x, np.load(LABELS)


def _constant_value(model: onnx.ModelProto, name: str) -> np.ndarray:
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return numpy_helper.to_array(node.attribute[0].t)
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    raise AssertionError(f"{name} is not a constant")


def test_files_exist_and_are_small():
    for path in (MODEL, VAL, LABELS, CALIB, META, README):
        assert path.is_file(), path
    assert MODEL.stat().st_size < 200_000
    for path in (VAL, LABELS, CALIB):
        assert path.stat().st_size < 1_000_000


def test_model_passes_full_check(model):
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 8
    assert {(o.domain, o.version) for o in model.opset_import} == {("", 17)}


def test_io_signature_has_dynamic_batch(model):
    (inp,) = model.graph.input
    (out,) = model.graph.output
    assert inp.name == "input" and out.name == "logits"
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    in_dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    out_dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
    assert in_dims == ["N", 1, 8, 8]
    assert out_dims == ["N", 10]


@pytest.mark.parametrize("batch", [1, 7])
def test_runs_with_dynamic_batch(session, val, batch):
    x, _ = val
    (logits,) = session.run(["logits"], {"input": x[:batch]})
    assert logits.shape == (batch, 10)
    assert logits.dtype == np.float32
    assert np.isfinite(logits).all()
    # Same answers as when the samples are part of a larger batch.
    (ref,) = session.run(["logits"], {"input": x[:16]})
    np.testing.assert_allclose(logits, ref[:batch], rtol=1e-4, atol=1e-4)


def test_data_shapes_and_dtypes(val, meta):
    x, y = val
    n = meta["val_total"]
    assert x.dtype == np.float32 and x.shape == (n, 1, 8, 8)
    assert y.dtype == np.int64 and y.shape == (n,)
    assert set(np.unique(y).tolist()) == set(range(10))
    # (pixels/16 - 0.5)/0.5 with pixels in 0..16 -> multiples of 1/8 in [-1, 1]
    assert x.min() >= -1.0 and x.max() <= 1.0
    np.testing.assert_array_equal(x * 8, np.round(x * 8))
    with np.load(CALIB) as z:
        assert list(z.keys()) == ["input"]
        calib = z["input"]
    assert calib.dtype == np.float32
    assert 128 <= calib.shape[0] <= 256 and calib.shape[1:] == (1, 8, 8)
    assert calib.shape[0] == meta["split"]["calib"]


def test_accuracy_matches_recorded_figure(session, val, meta):
    x, y = val
    (logits,) = session.run(["logits"], {"input": x})
    acc = 100.0 * float((logits.argmax(axis=1) == y).mean())
    assert abs(acc - meta["val_accuracy_percent"]) <= 0.01
    assert acc >= 95.0
    # models/README.md quotes the same figure.
    quoted = re.findall(r"(\d+\.\d+)\s*%", README.read_text())
    assert f"{meta['val_accuracy_percent']:.2f}" in quoted


def test_graph_has_work_for_cleanup(model):
    ops = [n.op_type for n in model.graph.node]
    for op in ("Pad", "BatchNormalization", "Identity", "Dropout", "Shape", "Gather", "Unsqueeze", "Concat"):
        assert op in ops, op
    assert ops.count("BatchNormalization") == 2
    assert ops.count("Conv") == 2 and ops.count("Gemm") == 2

    nodes = {n.name: n for n in model.graph.node}
    producers = {o: n for n in model.graph.node for o in n.output}

    # Pad -> Conv(pads=0): the pad is foldable into the conv.
    pad = nodes["/conv1/pad/Pad"]
    assert onnx.helper.get_attribute_value(next(a for a in pad.attribute if a.name == "mode")) == b"constant"
    assert _constant_value(model, pad.input[1]).tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
    conv1 = nodes["/conv1/Conv"]
    assert conv1.input[0] == pad.output[0]
    assert list(next(a for a in conv1.attribute if a.name == "pads").ints) == [0, 0, 0, 0]

    # Each BatchNormalization directly follows a Conv and carries trained, non-trivial statistics.
    for bn in (n for n in model.graph.node if n.op_type == "BatchNormalization"):
        assert producers[bn.input[0]].op_type == "Conv"
        gamma, beta, mean, var = (_constant_value(model, name) for name in bn.input[1:])
        assert not np.allclose(gamma, 1.0) and not np.allclose(beta, 0.0)
        assert not np.allclose(mean, 0.0) and not np.allclose(var, 1.0)
        assert (var > 0).all()

    # Flatten through x.view(x.size(0), -1).
    reshape = nodes["/Reshape"]
    assert producers[reshape.input[0]].op_type == "Identity"
    assert producers[reshape.input[1]].op_type == "Concat"
    dropout = nodes["/dropout/Dropout"]
    assert dropout.input[0] == reshape.output[0]
    assert len(dropout.input) < 3  # no training_mode input: inference, i.e. a no-op
    for gemm in (n for n in model.graph.node if n.op_type == "Gemm"):
        assert onnx.helper.get_attribute_value(next(a for a in gemm.attribute if a.name == "transB")) == 1
