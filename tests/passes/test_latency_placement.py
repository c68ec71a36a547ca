"""latency-placement: fixed decisions applied deterministically, measured search, fallbacks, errors.

Tiny CNN: regular conv + Relu -> depthwise conv -> pointwise conv -> residual Add -> GAP -> Gemm.
Pipelines run calibrate -> quantize-qdq -> latency-placement on 16 random samples.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxopt.passes.latency_placement import METADATA_KEY, LatencyPlacementResult, count_macs
from onnxopt.passes.quantize_qdq import kernel_share

from onnxopt.checks import check_model
from onnxopt.data import from_arrays
from onnxopt.errors import PassError
from onnxopt.pass_infra import PassContext, PassManager
from onnxopt.recipe import load_preset, parse_recipe

SHAPE = (8, 16, 16)


def _model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = {
        "w_reg": rng.standard_normal((16, 8, 3, 3)) * 0.2, "b_reg": rng.standard_normal(16) * 0.1,
        "w_dw": rng.standard_normal((16, 1, 3, 3)) * 0.3, "b_dw": rng.standard_normal(16) * 0.1,
        "w_pw": rng.standard_normal((8, 16, 1, 1)) * 0.2, "b_pw": rng.standard_normal(8) * 0.1,
        "w_fc": rng.standard_normal((10, 8)) * 0.3, "b_fc": rng.standard_normal(10) * 0.1,
    }
    nodes = [
        helper.make_node("Conv", ["x", "w_reg", "b_reg"], ["a"], name="conv_regular", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["a_relu"], name="relu"),
        helper.make_node("Conv", ["a_relu", "w_dw", "b_dw"], ["b"], name="conv_dw", group=16, pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["b", "w_pw", "b_pw"], ["c"], name="conv_pw"),
        helper.make_node("Add", ["c", "x"], ["d"], name="residual"),
        helper.make_node("GlobalAveragePool", ["d"], ["e"], name="gap"),
        helper.make_node("Flatten", ["e"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w_fc", "b_fc"], ["y"], name="fc", transB=1),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *SHAPE])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
                          [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


MODEL = _model()
X = np.random.default_rng(1).standard_normal((16, *SHAPE)).astype(np.float32)


def _pipeline(placement: dict | None = None, *, tmp_path=None, scheme: str = "u8u8"):
    passes = [{"type": "calibrate", "observer": "minmax", "cache": False},
              {"type": "quantize-qdq", "scheme": scheme, "check_kernels": False}]
    if placement is not None:
        passes.append({"type": "latency-placement", **placement})
    ctx = PassContext(calibration=from_arrays({"x": X}, MODEL), cache_dir=tmp_path)
    return PassManager(parse_recipe({"passes": passes}).build_passes(ctx)).run(MODEL)


def _run(model: onnx.ModelProto, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": X})[0]


def _weight_of(model: onnx.ModelProto, node_name: str):
    """(initializer array, via DequantizeLinear?) of a node's weight input."""
    node = next(n for n in model.graph.node if n.name == node_name)
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    p = producers.get(node.input[1])
    if p is not None and p.op_type == "DequantizeLinear":
        return numpy_helper.to_array(inits[p.input[0]]), True
    return numpy_helper.to_array(inits[node.input[1]]), False


def _reads_dequantized(model: onnx.ModelProto, node_name: str) -> bool:
    node = next(n for n in model.graph.node if n.name == node_name)
    producer = next((n for n in model.graph.node if node.input[0] in n.output), None)
    return producer is not None and producer.op_type == "DequantizeLinear"


FIXED = {"conv_regular": "int8-rr", "conv_pw": "float", "residual": "float"}


def test_fixed_decisions_structure_numbers_and_determinism():
    base = _pipeline()
    qdq = base.model
    a = _pipeline({"decisions": FIXED})
    b = _pipeline({"decisions": FIXED})
    out = a.model
    check_model(out)
    assert out.SerializeToString(deterministic=True) == b.model.SerializeToString(deterministic=True)
    res = a.results[-1]
    assert isinstance(res, LatencyPlacementResult)
    assert res.decisions == {"conv_regular": "int8-rr", "conv_dw": "int8", "conv_pw": "float",
                             "residual": "float", "gap": "int8", "fc": "int8"}
    assert a.records[-1].details["mode"].startswith("fixed")
    assert a.records[-1].details["decisions"] == FIXED

    # int8-rr: int8 weights on 7 bits; int8 (u8u8): uint8 weights; float: float weight, float input
    w, dq = _weight_of(out, "conv_regular")
    assert dq and w.dtype == np.int8 and np.abs(w).max() <= 63
    w, dq = _weight_of(out, "conv_dw")
    assert dq and w.dtype == np.uint8
    w, dq = _weight_of(out, "conv_pw")
    assert not dq and w.dtype == np.float32
    # conv_pw computes in float: it reads conv_dw's int8 output through a DQ, its own output stays float
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] == "c" for n in out.graph.node)
    assert _reads_dequantized(out, "conv_dw") and _reads_dequantized(out, "fc")

    # ORT really computes conv_pw in float: its DQ input has a per-channel scale, so ORT's
    # WeightBiasQuantization does not quantize its weight behind our back
    dq_in = next(n for n in out.graph.node if n.output[0] == next(x for x in out.graph.node if x.name == "conv_pw").input[0])
    assert dq_in.op_type == "DequantizeLinear" and next(a.i for a in dq_in.attribute if a.name == "axis") == 1
    ks = kernel_share(out)
    assert ks.integer.get("QLinearConv", 0) == 2 and sum(ks.float.values()) == 1, ks

    # numbers: close to the float model, as close as the quantize-qdq model is
    ref = _run(MODEL)
    err_qdq = np.abs(_run(qdq) - ref).max()
    err = np.abs(_run(out) - ref).max()
    scale = np.abs(ref).max()
    assert err <= max(2.0 * err_qdq, 0.02 * scale), (err, err_qdq, scale)
    # ORT's fused kernels agree with the literal QDQ semantics of the placed graph
    literal = _run(out, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    assert np.abs(literal - _run(out)).max() <= 0.02 * scale

    session = json.loads(next(p.value for p in out.metadata_props if p.key == METADATA_KEY))
    assert session["graph_optimization_level"] == "all" and "session.disable_quant_qdq" not in session["session_config"]


def test_all_float_decisions_keep_int8_storage_and_say_so():
    r = _pipeline({"decisions": {u: "float" for u in ("conv_regular", "conv_dw", "conv_pw", "residual", "gap", "fc")}})
    out = r.model
    check_model(out)
    ops = {n.op_type for n in out.graph.node}
    assert "QuantizeLinear" not in ops  # no activation is quantized
    for conv in ("conv_regular", "conv_dw", "conv_pw", "fc"):
        w, dq = _weight_of(out, conv)
        assert dq and w.dtype in (np.int8, np.uint8)
    assert "not faster than float anywhere" in r.records[-1].details["verdict"]
    session = json.loads(next(p.value for p in out.metadata_props if p.key == METADATA_KEY))
    assert session["session_config"] == {"session.disable_quant_qdq": "1"}
    ref = _run(MODEL)
    assert np.abs(_run(out) - ref).max() <= 0.02 * np.abs(ref).max()


def test_small_model_keeps_quantize_qdq_placement_without_timing():
    assert count_macs(MODEL) < 50_000_000
    qdq = _pipeline().model
    r = _pipeline({})
    d = r.records[-1].details
    assert d["mode"].startswith("static") and "search" not in d
    assert [n.op_type for n in r.model.graph.node] == [n.op_type for n in qdq.graph.node]
    assert np.array_equal(_run(r.model), _run(qdq))
    assert {row["node"] for row in d["decision_table"]} == {"conv_regular", "conv_dw", "conv_pw", "residual", "gap", "fc"}


def test_measured_search_gives_valid_model_and_caches_decisions(tmp_path):
    cfg = {"min_macs": 0, "runs": 4, "max_rounds": 1, "tune_session": True}
    r = _pipeline(cfg, tmp_path=tmp_path)
    d = r.records[-1].details
    check_model(r.model)
    assert d["mode"] == "measured" and d["search"][0]["step"] == "start"
    rows = {row["node"]: row for row in d["decision_table"]}
    assert set(rows) == {"conv_regular", "conv_dw", "conv_pw", "residual", "gap", "fc"}
    # every conv's kernel time was found in the profiles of both the int8 and the float model
    assert all(rows[c]["us_int8"] > 0 and rows[c]["us_float"] > 0 for c in ("conv_regular", "conv_dw", "conv_pw"))
    assert d["sqnr_db"]["placed"] >= d["sqnr_db"]["floor"] or d["verdict"]
    assert set(d["session"]["measured_ms"]["threads"]) >= {"1", "2"}
    ref = _run(MODEL)
    assert np.abs(_run(r.model) - ref).max() <= 0.05 * np.abs(ref).max()
    # the same model and config again: decisions come from the cache, output identical
    again = _pipeline(cfg, tmp_path=tmp_path)
    assert again.records[-1].details["mode"].startswith("cached")
    assert again.results[-1].decisions == r.results[-1].decisions
    assert again.model.SerializeToString(deterministic=True) == r.model.SerializeToString(deterministic=True)


def test_disabled_passes_model_through():
    qdq = _pipeline().model
    r = _pipeline({"enabled": False})
    assert not r.records[-1].modified and r.records[-1].details == {"enabled": False}
    assert r.model.SerializeToString() == qdq.SerializeToString()


def test_errors_are_clear():
    with pytest.raises(PassError, match="needs the quantize-qdq pass"):
        PassManager(parse_recipe({"passes": ["latency-placement"]}).build_passes()).run(MODEL)
    with pytest.raises(PassError, match=r"'conv_pww' is not a quantized node.*did you mean 'conv_pw'"):
        _pipeline({"decisions": {"conv_pww": "float"}})
    with pytest.raises(PassError, match="cannot take int8-rr"):
        _pipeline({"decisions": {"residual": "int8-rr"}})
    with pytest.raises(Exception, match="decisions"):
        parse_recipe({"passes": [{"type": "latency-placement", "decisions": {"conv_pw": "int4"}}]})


def test_int8_preset_has_placement_after_quantize():
    types = [p.type for p in load_preset("int8").passes]
    # the precision fallback's float islands come first, so placement times the model that ships
    assert types.index("latency-placement") == types.index("precision-fallback") + 1
    assert types.index("precision-fallback") == types.index("quantize-qdq") + 1


class CostTimer:
    """Stand-in for ORT's timings: per-node costs from the QDQ graph (an op reading a DequantizeLinear runs
    as an integer kernel). Depthwise convs are slow in int8 here, by kernel times; ``wall`` may disagree."""

    def __init__(self, dw_int8_wall: float = 3.0):
        self.dw_int8_wall = dw_int8_wall

    @staticmethod
    def _costs(model, dw_int8: float) -> dict[str, float]:
        out = {}
        for i, n in enumerate(model.graph):
            # integer kernel: its weight comes through a DequantizeLinear (a float op keeps a float weight)
            integer = any((p := x.producer()) is not None and p.op_type == "DequantizeLinear"
                          for x in n.inputs[1:2] if x is not None)
            if n.op_type in ("Conv", "Gemm"):
                dw = n.name == "conv_dw"
                out[n.name] = (dw_int8 if dw else 1.0) if integer else (1.0 if dw else 3.0)
            elif n.op_type in ("QuantizeLinear", "DequantizeLinear"):
                out[n.name or f"#{i}"] = 0.0 if n.inputs[0].is_initializer() else 0.1
            else:
                out[n.name or f"#{i}"] = 0.05
        return out

    def profile(self, model, feed, setting, runs=None, warmup=2):
        from onnxopt.profiling import Profile

        costs = {k: 1000 * v for k, v in self._costs(model, 3.0).items()}
        return Profile(kernels=costs, kernel_ops={k: "op" for k in costs}, run_us=sum(costs.values()), runs=1)

    def profile_kernels(self, c, feed):
        c.kernel_ms.append(sum(self._costs(c.model, 3.0).values()))

    def race_wall(self, cands, feed):
        for c in cands:
            c.wall_ms.append(sum(self._costs(c.model, self.dw_int8_wall).values()))


def test_decisions_follow_kernel_times_confirmed_by_wall_and_are_stable(tmp_path):
    from onnxopt.timing import set_timer

    cfg = {"min_macs": 0, "cache": False, "tune_session": False, "max_agreement_drop": 100}
    with set_timer(CostTimer()):
        runs = [_pipeline(cfg, tmp_path=tmp_path) for _ in range(2)]
    first, second = (r.results[-1] for r in runs)
    assert first.decisions == second.decisions  # same measurements, same placement
    # the stub's costs: depthwise float, the pointwise conv and the Gemm integer (1.0 vs 3.0 a kernel)
    assert first.decisions["conv_dw"] == "float" and first.decisions["conv_pw"] == first.decisions["fc"] == "int8"
    assert runs[0].model.SerializeToString(deterministic=True) == runs[1].model.SerializeToString(deterministic=True)
    # whole runs say the int8 depthwise conv is the cheaper one: the kernel-time choice is not confirmed
    with set_timer(CostTimer(dw_int8_wall=0.2)):
        r = _pipeline(cfg, tmp_path=tmp_path)
    d = r.records[-1].details
    assert r.results[-1].decisions["conv_dw"] != "float"
    assert d["search"][0]["wall_gain_vs_quantize_qdq"] < 0
    assert all(not s["accepted"] for s in d["search"][1:] if s.get("move", "").startswith("depthwise-conv -> float"))
