"""16-bit activations: biases that would overflow int32 at a 16-bit input scale stay float, in an Add after the
op (ORT quantizes a float Conv/Gemm bias between DequantizeLinears to int32 itself at load, saturating it:
640 off on this model); the model keeps its name and outputs, and ORT runs it at every optimization level
with the error of 16-bit rounding. Biases that fit stay on the op."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from helpers import init, make_model, rand, vi
from onnx import helper

from onnxopt.data import from_arrays
from onnxopt.pass_infra import PassContext, PassManager
from onnxopt.recipe import load_preset, parse_recipe


def _model():
    # input in [-1, 1]: a uint16 scale of ~3e-5; weight scale ~1e-3: int32 bias step ~3e-8, so a bias of
    # 500 needs 1.6e10 steps - far past int32
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "w2", "b2"], ["y"], transB=1, name="fc")]
    inits = [init("w", rand(8, 3, 3, 3, seed=1) * 0.1), init("b", np.linspace(-500, 500, 8).astype(np.float32)),
             init("w2", rand(4, 8 * 6 * 6, seed=2) * 0.01), init("b2", np.array([3e3, -2e3, 1e3, 7.0], np.float32))]
    return make_model(nodes, [vi("x", ["N", 3, 6, 6])], [vi("y", ["N", 4])], inits)


X = np.clip(np.random.default_rng(0).standard_normal((16, 3, 6, 6)).astype(np.float32) * 0.4, -1, 1)


def _quantize(**qdq):
    passes = [{"type": "calibrate", "observer": "minmax", "cache": False},
              {"type": "quantize-qdq", "activation_type": "uint16", "weight_type": "int8", "check_kernels": False,
               **qdq}]
    ctx = PassContext(calibration=from_arrays({"x": X}, _model()))
    return PassManager(parse_recipe({"passes": passes}).build_passes(ctx)).run(_model())


def _run(model, x):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_uint16_activations_keep_large_biases_float_and_run_in_ort():
    out = _quantize().model
    producers = {o: n for n in out.graph.node for o in n.output}
    inits = {t.name: t for t in out.graph.initializer}
    conv = next(n for n in out.graph.node if n.op_type == "Conv")
    gemm = next(n for n in out.graph.node if n.op_type == "Gemm")
    for node in (conv, gemm):
        assert producers[node.input[0]].op_type == "DequantizeLinear"  # 16-bit activation
        assert producers[node.input[1]].op_type == "DequantizeLinear"  # int8 weight
        # no bias on the op (ORT would quantize a float one to int32 at load and saturate it): a float Add
        assert len(node.input) == 2
        add = next(x for x in out.graph.node if x.op_type == "Add" and node.output[0] in x.input)
        bias = next(i for i in add.input if i in inits)
        assert inits[bias].data_type == 1
    q_types = {inits[n.input[2]].data_type for n in out.graph.node if n.op_type == "QuantizeLinear"}
    assert q_types == {4}  # uint16 zero points
    ref, got = _run(_model(), X), _run(out, X)
    noise = np.sum((ref.astype(np.float64) - got) ** 2)
    assert 10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / noise) > 45.0
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-3 * np.abs(ref).max())


def test_forcing_an_int32_bias_at_16_bits_coarsens_the_weights_and_says_so():
    forced, default = _quantize(bias_type="int32"), _quantize()
    raised = forced.records[-1].details["weight_scales_raised_for_int32_bias"]
    assert set(raised) == {"conv", "fc"}
    ref = _run(_model(), X)
    err = {k: float(np.abs(_run(r.model, X) - ref).max()) for k, r in (("forced", forced), ("default", default))}
    assert err["default"] < err["forced"]


def test_a16w8_preset_is_16_bit_with_float_bias():
    qdq = next(p for p in load_preset("a16w8").passes if p.type == "quantize-qdq")
    assert (qdq.activation_type, qdq.weight_type, qdq.bias_type) == ("uint16", "int8", "float")


def test_small_biases_stay_on_the_op():
    passes = [{"type": "calibrate", "observer": "minmax", "cache": False},
              {"type": "quantize-qdq", "activation_type": "uint16", "weight_type": "int8", "check_kernels": False}]
    m = _model()
    for t in m.graph.initializer:
        if t.name in ("b", "b2"):
            t.CopyFrom(init(t.name, np.full(t.dims, 0.05, np.float32)))
    out = PassManager(parse_recipe({"passes": passes}).build_passes(
        PassContext(calibration=from_arrays({"x": X}, m)))).run(m).model
    assert all(len(n.input) == 3 for n in out.graph.node if n.op_type in ("Conv", "Gemm"))
    assert not any(n.op_type == "Add" for n in out.graph.node)
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        got = ort.InferenceSession(out.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": X})[0]
        ref = _run(m, X)
        np.testing.assert_allclose(got, ref, rtol=0, atol=2e-2 * np.abs(ref).max())  # int8 weights
