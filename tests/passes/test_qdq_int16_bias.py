"""Signed 16-bit activations (int16) with biases far beyond int32 at a 16-bit input scale, and channels whose
weights or inputs have no range at all: the model quantizes without numpy warnings and ORT runs it close to
float."""

from __future__ import annotations

import warnings

import numpy as np
import onnxruntime as ort
import pytest
from helpers import init, make_model, rand, vi
from onnx import helper

from onnxopt.data import from_arrays
from onnxopt.pass_infra import PassContext, PassManager
from onnxopt.recipe import parse_recipe


def _model():
    # input in [-1, 1]: a 16-bit scale of ~3e-5, weight scales ~2e-3: an int32 bias step of ~7e-8, so biases
    # of a few hundred need more than int32 holds - as ORT would quantize them, or with the weight scales
    # raised until they fit (the weights then get a handful of levels)
    w = rand(6, 3, 3, 3, seed=1) * 0.1
    w[2] = 0.0  # a zero-range output channel
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1], name="conv")]
    inits = [init("w", w), init("b", np.array([500.0, -300.0, 400.0, 5.0, -450.0, 40.0], np.float32))]
    return make_model(nodes, [vi("x", ["N", 3, 5, 5])], [vi("y", ["N", 6, 5, 5])], inits)


def _data(n=16, seed=0):
    x = np.random.default_rng(seed).uniform(-1, 1, (n, 3, 5, 5)).astype(np.float32)
    x[:, 1] = 0.0  # an input channel with no range
    return x


def _run(model, x):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("act", ["int16", "uint16"])
def test_16_bit_activations_with_large_biases_and_zero_ranges(act):
    passes = [{"type": "calibrate", "observer": "minmax", "cache": False},
              {"type": "quantize-qdq", "activation_type": act, "weight_type": "int8", "check_kernels": False}]
    model = _model()
    with warnings.catch_warnings(), np.errstate(divide="raise", invalid="raise", over="raise"):
        warnings.simplefilter("error", RuntimeWarning)
        out = PassManager(parse_recipe({"passes": passes}).build_passes(
            PassContext(calibration=from_arrays({"x": _data()}, model)))).run(model).model
    qtypes = {next(t for t in out.graph.initializer if t.name == n.input[2]).data_type
              for n in out.graph.node if n.op_type == "QuantizeLinear"}
    assert qtypes == {5 if act == "int16" else 4}  # INT16 / UINT16 zero points only
    x = _data(8, seed=1)  # other samples than calibration
    ref, got = _run(model, x).astype(np.float64), _run(out, x)
    # error against what the input changes (the bias alone would make any error look small)
    signal = ref - ref.mean(axis=(0, 2, 3), keepdims=True)
    sqnr = 10 * np.log10((signal ** 2).sum() / ((ref - got) ** 2).sum())
    # measured 30.7 dB: 16-bit rounding of an output whose range the biases set (their int32 form with raised
    # weight scales, before 16-bit biases stayed float: 27.3 dB)
    assert sqnr > 29.0, sqnr
    np.testing.assert_allclose(got[:, 2], ref[:, 2], rtol=0, atol=0.02)  # the zero-range channel: its bias
