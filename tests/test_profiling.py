"""onnxopt.profiling: ORT kernel names mapped back to the model's nodes, per node and per op kind."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from onnxopt.profiling import Resolver, conv_kind, op_kinds, parse_events, profile


def _model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = {
        "w_reg": rng.standard_normal((16, 8, 3, 3)).astype(np.float32) * 0.1,
        "w_dw": rng.standard_normal((16, 1, 3, 3)).astype(np.float32) * 0.1,
        "w_pw": rng.standard_normal((8, 16, 1, 1)).astype(np.float32) * 0.1,
    }
    nodes = [
        helper.make_node("Conv", ["x", "w_reg"], ["a"], name="conv_regular", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["a_relu"], name="relu"),
        helper.make_node("Conv", ["a_relu", "w_dw"], ["b"], name="conv_dw", group=16, pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["b", "w_pw"], ["c"], name="conv_pw"),
        helper.make_node("Add", ["c", "x"], ["y"], name="residual"),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 32, 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_conv_kinds():
    node = ir.node("Conv", [ir.Value(name="x"), ir.Value(name="w")], {"group": 16})
    assert conv_kind(node, (16, 1, 3, 3)) == "depthwise-conv"
    assert conv_kind(node, (32, 2, 3, 3)) == "grouped-conv"
    plain = ir.node("Conv", [ir.Value(name="x"), ir.Value(name="w")])
    assert conv_kind(plain, (8, 16, 1, 1)) == "pointwise-conv"
    assert conv_kind(plain, (8, 16, 3, 3)) == "conv"
    assert op_kinds(_model()) == {"conv_regular": "conv", "relu": "Relu", "conv_dw": "depthwise-conv",
                                  "conv_pw": "pointwise-conv", "residual": "Add"}


def test_resolver_maps_fused_and_layout_names():
    r = Resolver(_model())
    assert r.resolve("conv_dw") == "conv_dw"
    assert r.resolve("conv_dw_token_12") == "conv_dw"  # NHWC layout transformer
    assert r.resolve("a_relu_nchwc") == "relu"  # NCHWc conv named after its (fused) output tensor
    assert r.resolve("conv_pw_token_3_kernel_time") == "conv_pw"
    assert r.resolve("Transpose") is None and r.resolve("ReorderOutput") is None
    # the longest node name wins: "conv_pw" must not take "conv_pw2"'s kernels
    m = _model()
    m.graph.node.append(helper.make_node("Relu", ["y"], ["z"], name="conv_pw2"))
    assert Resolver(m).resolve("conv_pw2_token_4") == "conv_pw2"


def test_parse_events_skips_warmup_and_takes_median():
    def run(ts):
        return {"name": "model_run", "cat": "Session", "ts": ts, "dur": 100}

    def k(name, ts, dur):
        return {"name": f"{name}_kernel_time", "cat": "Node", "ts": ts, "dur": dur, "args": {"op_name": "Conv"}}

    events = [run(0), k("c", 1, 999),  # warm-up, dropped
              run(100), k("c", 101, 10), run(200), k("c", 201, 12), run(300), k("c", 301, 500)]  # 500: preempted
    p = parse_events(events, skip_runs=1)
    assert p.runs == 3 and p.kernels == {"c": 12.0} and p.kernel_ops == {"c": "Conv"}


def test_profile_attributes_every_conv_to_its_node():
    m = _model()
    x = {"x": np.random.default_rng(1).standard_normal((1, 8, 32, 32)).astype(np.float32)}
    prof = profile(m, x, runs=3, warmup=1).attribute(m)
    names = {n.name for n in m.graph.node}
    assert set(prof.by_node) <= names
    # each conv's kernel is found under the conv or the activation ORT fused into it
    for conv, alias in (("conv_regular", "relu"), ("conv_dw", None), ("conv_pw", "residual")):
        assert conv in prof.by_node or alias in prof.by_node, (conv, prof.kernels)
    # what is not attributed is ORT's own layout glue only
    assert all(prof.kernel_ops[k] in ("Transpose", "ReorderInput", "ReorderOutput") for k in prof.unattributed)
    kinds = prof.by_kind(m)
    assert {"conv", "depthwise-conv"} <= set(kinds) and all(v >= 0 for v in kinds.values())
    total = sum(prof.by_node.values()) + sum(prof.unattributed.values())
    assert abs(total - prof.kernel_us) < 1e-6 * max(1.0, total)
