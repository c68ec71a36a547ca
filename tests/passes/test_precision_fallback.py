"""precision-fallback: float (or 16-bit) islands where int8 activations lose the model, none elsewhere."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import init, make_model, vi
from onnx import helper

from onnxopt.data import from_arrays
from onnxopt.errors import PassError
from onnxopt.model_io import from_proto, to_proto
from onnxopt.pass_infra import PassContext, PassManager
from onnxopt.qdq import QuantizeQDQResult
from onnxopt.recipe import parse_recipe

node = helper.make_node
RNG = np.random.default_rng(0)


def fragile_model() -> onnx.ModelProto:
    """x -> MatMul -> h (7 channels ~100, one ~1) -> MatMul reading mostly the small channel -> Relu ->
    MatMul -> Relu -> MatMul -> y. One 8-bit range for h cannot resolve the small channel, so int8 loses y; the rest is benign."""
    w1 = RNG.standard_normal((4, 8)).astype(np.float32) * 100
    w1[:, 7] = RNG.standard_normal(4)
    w2 = RNG.standard_normal((8, 8)).astype(np.float32) * 0.001
    w2[7, :] = RNG.standard_normal(8) * 10
    w3 = RNG.standard_normal((8, 8)).astype(np.float32)
    w4 = RNG.standard_normal((8, 3)).astype(np.float32)
    nodes = [node("MatMul", ["x", "w1"], ["h"], name="mm1"), node("MatMul", ["h", "w2"], ["g"], name="mm2"),
             node("Relu", ["g"], ["r"], name="relu"), node("MatMul", ["r", "w3"], ["s"], name="mm3"),
             node("Relu", ["s"], ["t"], name="relu2"), node("MatMul", ["t", "w4"], ["y"], name="mm4")]
    return make_model(nodes, [vi("x", ["N", 4])], [vi("y", ["N", 3])],
                      [init("w1", w1), init("w2", w2), init("w3", w3), init("w4", w4)], opset=17)


def benign_model() -> onnx.ModelProto:
    w1 = RNG.standard_normal((4, 8)).astype(np.float32)
    w2 = RNG.standard_normal((8, 3)).astype(np.float32)
    nodes = [node("MatMul", ["x", "w1"], ["h"], name="mm1"), node("Relu", ["h"], ["r"], name="relu"),
             node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    return make_model(nodes, [vi("x", ["N", 4])], [vi("y", ["N", 3])], [init("w1", w1), init("w2", w2)], opset=17)


def quantize(model, fallback: dict | None, n: int = 64):
    passes = [{"type": "calibrate", "cache": False, "observer": "minmax"}, {"type": "quantize-qdq"}]
    if fallback is not None:
        passes.append({"type": "precision-fallback", **fallback})
    x = np.random.default_rng(1).standard_normal((n, 4)).astype(np.float32)
    ctx = PassContext(calibration=from_arrays({"x": x}, from_proto(model)))
    res = PassManager(parse_recipe({"name": "t", "passes": passes}).build_passes(ctx)).run(from_proto(model))
    return to_proto(res.model), res.results, ctx


def sqnr_vs_float(model, q) -> float:
    x = np.random.default_rng(7).standard_normal((32, 4)).astype(np.float32)
    ref, out = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
                for m in (model, q))
    return 10 * math.log10(float((ref ** 2).sum() / ((ref - out) ** 2).sum()))


def quantized_tensors(q: onnx.ModelProto) -> set[str]:
    return {n.input[0] for n in q.graph.node if n.op_type == "QuantizeLinear"}


def test_fragile_node_goes_float_and_the_output_recovers():
    model = fragile_model()
    plain, _, _ = quantize(model, None)
    assert "h" in quantized_tensors(plain)
    before = sqnr_vs_float(model, plain)
    q, results, ctx = quantize(model, {"min_sqnr_db": 30.0})
    fb = results[-1]
    assert fb.modified and fb.details["sqnr_db_before"] < 12  # the small channel is lost
    assert fb.details["nodes"] and set(fb.details["nodes"]) <= {"mm1", "mm2"}
    assert fb.details["reached"] is True and fb.details["sqnr_db_after"] >= 30
    assert "h" not in quantized_tensors(q)  # the island: h stays float
    # per-layer SQNR before/after for the report: the layer writing the small-channel tensor recovers
    layers = fb.details["layer_sqnr_db"]
    assert layers and all(len(v) == 2 for v in layers.values())
    assert max(a - b for b, a in layers.values()) > 10
    assert "t" in quantized_tensors(q)  # the benign tail keeps int8
    after = sqnr_vs_float(model, q)
    assert before < 12 and after > 30  # in ORT (integer kernels), on other samples than the measured ones
    # placement (and anything after) re-quantizes from this result, islands included
    latest = ctx.latest(QuantizeQDQResult)
    assert latest is fb and any(o.exclude and "h" in o.tensors for o in latest.config.overrides)


def test_int16_islands_keep_the_tensors_quantized_at_16_bit():
    model = fragile_model()
    q, results, _ = quantize(model, {"min_sqnr_db": 15.0, "fallback": "int16"})
    assert results[-1].details["reached"] is True  # ~20 dB: 16 bits resolve the small channel, 8 do not
    zp = {t.name: t for t in q.graph.initializer}
    h_q = [n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "h"]
    assert len(h_q) == 1 and zp[h_q[0].input[2]].data_type == onnx.TensorProto.UINT16
    assert sqnr_vs_float(model, q) > 15


def test_a_model_above_the_target_is_left_alone():
    model = benign_model()
    plain, _, _ = quantize(model, None)
    q, results, _ = quantize(model, {})
    fb = results[-1]
    assert not fb.modified and fb.details["sqnr_db_before"] >= 12 and "nodes" not in fb.details
    assert q.SerializeToString() == plain.SerializeToString()


def test_max_nodes_zero_measures_only_and_needs_quantize_qdq_first():
    _, results, _ = quantize(fragile_model(), {"max_nodes": 0})
    assert not results[-1].modified and results[-1].details["action"] == "none"
    recipe = parse_recipe({"name": "t", "passes": [{"type": "calibrate", "cache": False},
                                                    {"type": "precision-fallback"}]})
    model = fragile_model()
    x = np.zeros((4, 4), np.float32)
    ctx = PassContext(calibration=from_arrays({"x": x}, from_proto(model)))
    with pytest.raises(PassError, match="needs the quantize-qdq pass"):
        PassManager(recipe.build_passes(ctx)).run(from_proto(model))
