"""transformer-layout: exact unfused forms, decisions that follow measurements (timer stubbed), the cache,
the recorded session options."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from helpers import init, make_model, rand, vi
from onnx import helper
from onnxopt.passes.transformer_layout import DISABLE_KEY, TransformerLayout, unfuse

from onnxopt.model_io import as_ir, to_proto
from onnxopt.pass_infra import PassContext
from onnxopt.timing import METADATA_KEY, Timer, set_timer

H = 16


def _model(dqmm: bool = False):
    """x -> [DynamicQuantizeMatMul] -> SkipLayerNormalization(+bias) -> BiasGelu -> y (com.microsoft ops)."""
    nodes, inits = [], [init("gamma", rand(H, seed=1) + 1), init("beta", rand(H, seed=2)),
                        init("bias", rand(H, seed=3)), init("gbias", rand(H, seed=4))]
    src = "x"
    if dqmm:
        w = np.clip(np.round(rand(H, H, seed=5) * 40), -127, 127).astype(np.int8)
        inits += [init("w", w), init("ws", np.full(H, 0.01, np.float32))]
        nodes.append(helper.make_node("DynamicQuantizeMatMul", ["x", "w", "ws"], ["mm"], domain="com.microsoft",
                                      name="dqmm"))
        src = "mm"
    nodes += [helper.make_node("SkipLayerNormalization", [src, "skip", "gamma", "beta", "bias"], ["sln"],
                               domain="com.microsoft", name="sln", epsilon=1e-5),
              helper.make_node("BiasGelu", ["sln", "gbias"], ["y"], domain="com.microsoft", name="bg")]
    return make_model(nodes, [vi("x", [1, 8, H]), vi("skip", [1, 8, H])], [vi("y", [1, 8, H])], inits,
                      extra_opsets={"com.microsoft": 1})


def _run(model, feed, config=None):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    for k, v in (config or {}).items():
        so.add_session_config_entry(k, v)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feed)[0]


FEED = {"x": rand(1, 8, H, seed=7), "skip": rand(1, 8, H, seed=8)}
NO_REFUSION = {DISABLE_KEY: "SkipLayerNormFusion,BiasGeluFusion"}


@pytest.mark.parametrize("dqmm", [False, True])
def test_unfused_forms_are_exact_and_standard(dqmm):
    proto = _model(dqmm)
    ref = _run(proto, FEED)
    m = as_ir(proto)
    assert unfuse(m, "skip-layernorm") == 1 and unfuse(m, "bias-gelu") == 1
    out = to_proto(m)
    kinds = [(n.domain, n.op_type) for n in out.graph.node]
    assert ("com.microsoft", "SkipLayerNormalization") not in kinds and ("com.microsoft", "BiasGelu") not in kinds
    assert ("", "LayerNormalization") in kinds and ("com.microsoft", "Gelu") in kinds
    if dqmm:  # both biases went into DynamicQuantizeMatMul? only the first: BiasGelu reads the LayerNorm
        dq = next(n for n in out.graph.node if n.op_type == "DynamicQuantizeMatMul")
        assert list(dq.input)[4] == "bias"
        assert sum(n.op_type == "Add" for n in out.graph.node) == 2  # skip add + gelu bias
    else:
        assert sum(n.op_type == "Add" for n in out.graph.node) == 3  # bias, skip, gelu bias
    np.testing.assert_allclose(_run(out, FEED, NO_REFUSION), ref, rtol=0, atol=2e-5)
    np.testing.assert_allclose(_run(out, FEED), ref, rtol=0, atol=2e-5)  # ORT re-fusing it: same numbers


class CostTimer(Timer):
    """Deterministic stand-in for ORT: a model costs the sum of its ops' costs."""

    def __init__(self, kernel: dict[str, float], wall: dict[str, float] | None = None):
        super().__init__(runs=1)
        self.kernel, self.wall = kernel, wall or kernel
        self.calls = 0

    def _cost(self, model, table):
        self.calls += 1
        return sum(table.get(n.op_type, 0.1) for n in model.graph)

    def profile_kernels(self, c, feed):
        c.kernel_ms.append(self._cost(c.model, self.kernel))

    def race_wall(self, cands, feed):
        for c in cands:
            c.wall_ms.append(self._cost(c.model, self.wall))


class Forbidden(Timer):
    def profile_kernels(self, c, feed):
        raise AssertionError("nothing may be timed")

    race_wall = profile_kernels


SLOW_SLN = {"SkipLayerNormalization": 5.0, "LayerNormalization": 1.0, "Add": 0.2, "BiasGelu": 1.0, "Gelu": 1.2}


def _layout(proto, tmp_path, **cfg):
    ctx = PassContext(cache_dir=tmp_path)
    return TransformerLayout(TransformerLayout.Config(**cfg), ctx)(as_ir(proto))


def test_decisions_follow_measurement_and_are_recorded(tmp_path):
    with set_timer(CostTimer(SLOW_SLN)):
        r1 = _layout(_model(True), tmp_path / "a")
        r2 = _layout(_model(True), tmp_path / "b")  # a fresh cache: measured again, same answer
    assert r1.details["decisions"] == r2.details["decisions"] == {"bias-gelu": "fused", "skip-layernorm": "unfused"}
    assert r1.modified and r1.details["mode"] == "measured"
    ops = [n.op_type for n in r1.model.graph]
    assert "SkipLayerNormalization" not in ops and "BiasGelu" in ops
    rec = json.loads(r1.model.metadata_props[METADATA_KEY])
    assert rec["session_config"][DISABLE_KEY] == "SkipLayerNormFusion"
    step = r1.details["search"][0]
    assert step["kind"] == "skip-layernorm" and step["accepted"] and step["kernel_gain"] > 0.5


def test_a_kernel_win_the_wall_clock_does_not_confirm_is_not_taken(tmp_path):
    wall = {**SLOW_SLN, "SkipLayerNormalization": 0.5}  # whole runs say the fused op is cheaper
    with set_timer(CostTimer(SLOW_SLN, wall)):
        r = _layout(_model(), tmp_path)
    assert r.details["decisions"]["skip-layernorm"] == "fused" and not r.modified
    assert r.details["search"][0]["wall_gain"] < 0 and METADATA_KEY not in r.model.metadata_props


def test_cache_and_fixed_decisions_time_nothing(tmp_path):
    with set_timer(CostTimer(SLOW_SLN)) as t:
        _layout(_model(), tmp_path)
        assert t.calls > 0
    with set_timer(Forbidden()):
        cached = _layout(_model(), tmp_path)
        fixed = _layout(_model(), tmp_path / "x", decisions={"bias-gelu": "unfused"})
    assert cached.details["mode"].startswith("cached") and cached.details["decisions"]["skip-layernorm"] == "unfused"
    assert fixed.details["decisions"] == {"bias-gelu": "unfused", "skip-layernorm": "fused"}
    assert [n.op_type for n in fixed.model.graph].count("Gelu") == 1


def test_nothing_fused_is_a_no_op(tmp_path):
    proto = make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [2])], [vi("y", [2])])
    with set_timer(Forbidden()):
        r = _layout(proto, tmp_path)
    assert not r.modified and r.details["mode"] == "no fused transformer ops"
