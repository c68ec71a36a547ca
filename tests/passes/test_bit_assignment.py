"""bit-assignment: budgets respected exactly, greedy order, overrides reaching quantize-qdq, accuracy budget."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from helpers import initializer, producer
from onnx import TensorProto, helper, numpy_helper
from onnxopt.passes.bit_assignment import BitAssignment, BitAssignmentConfig, assign_within, upgrade_path
from onnxopt.passes.calibrate import Calibrate, CalibrateConfig
from onnxopt.passes.quantize_qdq import QuantizeQDQ, QuantizeQDQConfig
from onnxopt.passes.significance import Significance, SignificanceConfig
from pydantic import ValidationError

from onnxopt.data import from_arrays
from onnxopt.errors import PassError
from onnxopt.mixed import BitAssignmentResult, fake_quantize
from onnxopt.pass_infra import PassContext, PassManager
from onnxopt.recipe import load_preset
from tests.passes.helpers import init, make_model, ort_run, vi
from tests.passes.test_significance import three_layer_model, with_static_batch


def chain_model(widths: list[int]):
    """MatMuls of the given widths in a chain: layer i has widths[i] * widths[i + 1] parameters."""
    rng = np.random.default_rng(1)
    nodes, inits = [], []
    prev = "x"
    for i in range(len(widths) - 1):
        inits.append(init(f"w{i}", rng.standard_normal((widths[i], widths[i + 1])).astype(np.float32)))
        out = "y" if i == len(widths) - 2 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [out], name=f"mm{i}"))
        prev = out
    return make_model(nodes, [vi("x", ["N", widths[0]])], [vi("y", ["N", widths[-1]])], inits)


def assign(model, scores: dict[str, float], tmp_path, **cfg) -> BitAssignmentResult:
    path = tmp_path / "scores.json"
    path.write_text(json.dumps({"components": [{"name": k, "score": v} for k, v in scores.items()]}))
    return PassManager([BitAssignment(BitAssignmentConfig(scores_file=str(path), **cfg))]).run(model).results[-1]


def test_average_bits_budget_is_never_exceeded(tmp_path):
    widths = [7, 13, 5, 11, 3, 17, 9]
    model = chain_model(widths)
    params = {f"mm{i}": widths[i] * widths[i + 1] for i in range(len(widths) - 1)}
    total = sum(params.values())
    rng = np.random.default_rng(3)
    for budget in (4.0, 4.3, 5.0, 5.5, 6.0, 7.77, 9.0, 12.0, 16.0):
        scores = {k: float(rng.uniform(0, 1)) for k in params}
        res = assign(model, scores, tmp_path, average_bits=budget)
        used = sum(res.weight_bits[k] * params[k] for k in params)
        assert used <= budget * total + 1e-9, budget
        assert res.average_bits == pytest.approx(used / total)
        # nothing else fits: every layer below 16 bits would break the budget with its next step
        for k, b in res.weight_bits.items():
            if b < 16:
                nxt = {4: 8, 8: 16}[b]
                assert used + (nxt - b) * params[k] > budget * total
        assert res.details["average_bits"] == pytest.approx(res.average_bits, abs=1e-4)
    res = assign(model, dict.fromkeys(params, 1.0), tmp_path, weight_bytes=total * 6 // 8)
    assert sum(res.weight_bits[k] * params[k] for k in params) <= total * 6 // 8 * 8
    assert res.weight_bytes == sum(res.weight_bits[k] * params[k] for k in params) // 8
    with pytest.raises(PassError, match="below the smallest assignment"):
        assign(model, dict.fromkeys(params, 1.0), tmp_path, average_bits=3.9)


def test_greedy_prefers_score_per_bit():
    params = {"a": 100, "b": 100, "c": 400}
    path = upgrade_path({"a": 1.0, "b": 0.1, "c": 1.0}, params, [4, 8, 16], 4)
    assert path[0] == ("a", 8)  # same score as c, a quarter of its size
    assert path.index(("c", 8)) < path.index(("b", 8))  # 1.0/400 per bit beats 0.1/100
    bits = assign_within(path, params, 4, 4 * 600 + 4 * 100)
    assert bits == {"a": 8, "b": 4, "c": 4}


def test_config_needs_exactly_one_budget():
    with pytest.raises(ValidationError, match="exactly one budget"):
        BitAssignmentConfig()
    with pytest.raises(ValidationError, match="exactly one budget"):
        BitAssignmentConfig(average_bits=5, weight_bytes=10)
    with pytest.raises(PassError, match="run the 'significance' pass"):
        PassManager([BitAssignment(BitAssignmentConfig(average_bits=5))]).run(chain_model([2, 3]))


def pipeline(model, x, **assignment):
    ctx = PassContext(calibration=from_arrays({"x": x}, model))
    passes = [Calibrate(CalibrateConfig(observer="minmax", cache=False), ctx),
              Significance(SignificanceConfig(max_samples=32), ctx),
              BitAssignment(BitAssignmentConfig(**assignment), ctx),
              QuantizeQDQ(QuantizeQDQConfig(scheme="u8u8", check_kernels=False, bias_correction="off"), ctx)]
    return PassManager(passes).run(model)


def weight_dq(model: onnx.ModelProto, node: str) -> tuple[int, np.ndarray]:
    n = next(n for n in model.graph.node if n.name == node)
    dq = producer(model, n.input[1])
    assert dq.op_type == "DequantizeLinear"
    t = initializer(model, dq.input[0])
    scale = numpy_helper.to_array(initializer(model, dq.input[1]))
    return t.data_type, numpy_helper.to_array(t).astype(np.float32) * scale


def test_overrides_reach_quantize_qdq(tmp_path):
    model, x = three_layer_model()
    # 16 x 16 sensitive layer at 8 bits, the rest at 4: (128 + 80) * 4 + 256 * 8 = 2880 <= 6.5 * 464
    out = pipeline(model, x, average_bits=6.5, overrides_file=str(tmp_path / "ov.yaml"))
    bits = out.results[2]
    assert bits.weight_bits == {"easy1": 4, "hard": 8, "easy3": 4}
    q = out.model
    assert onnx.defs.onnx_opset_version() >= 21 and q.opset_import[0].version >= 21
    for name, w in (("easy1", "w1"), ("easy3", "w3")):
        dtype, deq = weight_dq(q, name)
        assert dtype == TensorProto.INT4
        orig = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == w))
        np.testing.assert_allclose(deq, fake_quantize(orig, 4, axis=1), rtol=0, atol=1e-7)  # exact grid
    assert weight_dq(q, "hard")[0] == TensorProto.UINT8
    assert out.records[3].details["weight_types"] == {"int4": 2, "uint8": 1}
    assert "int4" in (tmp_path / "ov.yaml").read_text()
    # the mixed model is far closer to fp32 than all-int4 on the same data
    ref = ort_run(model, {"x": x})[0]
    mixed = ort_run(q, {"x": x})[0]
    all4 = ort_run(pipeline(model, x, average_bits=4.0).model, {"x": x})[0]
    err_mixed, err4 = np.abs(mixed - ref).mean(), np.abs(all4 - ref).mean()
    assert err_mixed < 0.5 * err4


def test_sixteen_bit_weights_and_unnamed_nodes(tmp_path):
    model = chain_model([4, 6, 3])
    for n in model.graph.node:
        n.name = ""
    x = np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32)
    out = pipeline(model, x, average_bits=16.0)
    res = out.results[2]
    assert set(res.weight_bits.values()) == {16} and res.details["named_nodes"] == 2
    q = out.model
    assert {weight_dq(q, n)[0] for n in ("w0", "w1")} == {TensorProto.INT16}
    ref = ort_run(model, {"x": x})[0]
    np.testing.assert_allclose(ort_run(q, {"x": x})[0], ref, rtol=0, atol=0.05 * np.abs(ref).max())


@pytest.mark.parametrize("static_batch", [False, True], ids=["dynamic-batch", "batch-1"])
def test_max_accuracy_drop_budget(static_batch):
    """With a literal batch dim of 1 the accuracy checks run one sample at a time, same outcome."""
    model, x = three_layer_model()
    if static_batch:
        model = with_static_batch(model)
    labels = np.concatenate([ort_run(model, {"x": x[i:i + 1]})[0] for i in range(len(x))]).argmax(1)
    ctx = PassContext(calibration=from_arrays({"x": x}, model), calibration_labels=labels.astype(np.int64))
    res = PassManager([Significance(SignificanceConfig(), ctx),
                       BitAssignment(BitAssignmentConfig(max_accuracy_drop_pt=0.0), ctx)]
                      ).run(model).results[-1]
    v = res.details["verification"]
    assert v["reference_top1_pct"] == 100.0 and v["top1_drop_pt"] == 0.0
    # the cheapest exact assignment: only the sensitive layer upgraded (int8 still flips near-tied logits)
    assert res.weight_bits == {"easy1": 4, "hard": 16, "easy3": 4} and v["upgrades"] == 2


def test_presets_parse():
    for name in ("mixed", "mixed-semantic"):
        rec = load_preset(name)
        types = [p.type for p in rec.passes]
        assert types[-3:] == ["significance", "bit-assignment", "quantize-qdq"]
        assert rec.passes[-2].average_bits == 5.0
    assert load_preset("mixed-semantic").passes[-3].semantic
