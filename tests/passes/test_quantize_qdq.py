"""quantize-qdq: Q/DQ placement, ORT integer kernels, numbers, weights/bias, config, errors.

Ranges are computed here (ORT on random inputs) so the tests do not depend on the calibrate pass.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxopt.passes.quantize_qdq import (
    QuantizeQDQ,
    QuantizeQDQConfig,
    QuantizeQDQResult,
    kernel_share,
)

from onnxopt.checks import check_model
from onnxopt.data import from_arrays
from onnxopt.errors import PassError, PreconditionError, RecipeError
from onnxopt.pass_infra import PassContext, PassManager
from onnxopt.quant import activation_params, dequantize, qrange, quantize, weight_params
from onnxopt.ranges import CalibrationResult, TensorRange
from onnxopt.recipe import load_preset, parse_recipe

RNG = np.random.default_rng(0)


# --- helpers ---------------------------------------------------------------------------------
def make_model(nodes, inputs, outputs, inits, opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        [numpy_helper.from_array(np.asarray(v, dtype=np.float32), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model, full_check=True)
    return model


def session(model, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run(model, feeds, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
    return session(model, level).run(None, feeds)[0]


def run_spec(model, feeds):
    """The QDQ graph as the ONNX spec says: every DQ/op/Q executed literally (no fusion)."""
    return run(model, feeds, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)


def ranges_for(model, feeds) -> dict[str, TensorRange]:
    """Min-max ranges of every float value, from running ``model`` on ``feeds``."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    names = [i.name for i in m.graph.input] + [o for n in m.graph.node for o in n.output]
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output)}
    names = [n for n in dict.fromkeys(names) if types.get(n, 1) == TensorProto.FLOAT]
    del m.graph.output[:]
    m.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names)
    values = session(m, ort.GraphOptimizationLevel.ORT_DISABLE_ALL).run(names, feeds)
    return {n: TensorRange(float(v.min()), float(v.max()), float(v.min()), float(v.max()))
            for n, v in zip(names, values, strict=True)}


def quantize_model(model, feeds=None, *, ranges=None, data=None, **cfg) -> QuantizeQDQResult:
    cfg.setdefault("scheme", "u8s8-rr")
    cfg.setdefault("bias_correction", "off")
    ranges = ranges if ranges is not None else ranges_for(model, feeds)
    ctx = PassContext(calibration=data, results=[CalibrationResult(model, False, ranges=ranges)])
    work = onnx.ModelProto()
    work.CopyFrom(model)
    result = QuantizeQDQ(QuantizeQDQConfig(**cfg), ctx)(work)
    check_model(result.model)
    return result


def ops(model) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def init(model, name) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def node_by_output(model, name):
    return next(n for n in model.graph.node if name in n.output)


def producer_chain(model, tensor):
    """Initializer values (x, scale, zp) behind a DequantizeLinear output."""
    dq = node_by_output(model, tensor)
    assert dq.op_type == "DequantizeLinear"
    return dq


def q_of(model, tensor):
    """The QuantizeLinear reading ``tensor``: (scale, zero point)."""
    q = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == tensor]
    assert len(q) == 1, f"{tensor}: {len(q)} QuantizeLinear"
    return init(model, q[0].input[1]), init(model, q[0].input[2])


def np_conv(x, w, b=None, pads=(0, 0, 0, 0), group=1):
    """2-D convolution, stride 1 (reference)."""
    x = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    n, c, h, wd = x.shape
    m, cg, kh, kw = w.shape
    oh, ow = h - kh + 1, wd - kw + 1
    out = np.zeros((n, m, oh, ow))
    mg = m // group
    for g in range(group):
        xs = x[:, g * cg:(g + 1) * cg]
        ws = w[g * mg:(g + 1) * mg].astype(np.float64)
        for i in range(kh):
            for j in range(kw):
                out[:, g * mg:(g + 1) * mg] += np.einsum("nchw,mc->nmhw", xs[:, :, i:i + oh, j:j + ow], ws[:, :, i, j])
    if b is not None:
        out += np.asarray(b, np.float64)[None, :, None, None]
    return out.astype(np.float32)


def integer_kernels(model) -> tuple[dict, dict]:
    ks = kernel_share(model)
    return ks.integer, ks.float


def x_feed(shape, n=4, seed=1):
    return {"x": np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)}


# --- quant.py helpers ----------------------------------------------------------------------------
def test_activation_params_zero_exact_and_range():
    s, z = activation_params(-1.0, 3.0, "uint8")
    assert s == np.float32(4.0 / 255) and z == 64
    assert dequantize(quantize(np.float32(0), s, z, "uint8"), s, z) == 0.0
    s, z = activation_params(0.5, 6.0, "uint8")  # widened to include 0
    assert z == 0 and s == np.float32(6.0 / 255)
    assert activation_params(0.0, 0.0) == (np.float32(1.0), 0)
    s, z = activation_params(-2.0, 1.0, "int8", symmetric=True)
    assert z == 0 and s == np.float32(2.0 / 127)


def test_qrange_and_weight_params():
    assert qrange("int8") == (-128, 127) and qrange("int8", symmetric=True) == (-127, 127)
    assert qrange("int8", symmetric=True, reduce_range=True) == (-63, 63)
    assert qrange("uint8", symmetric=True) == (1, 255) and qrange("int4", symmetric=True) == (-7, 7)
    w = RNG.standard_normal((4, 3, 2)).astype(np.float32)
    w[2] = 0.0
    s, z = weight_params(w, "int8", axis=0)
    expect = (np.abs(w).reshape(4, -1).max(1) / 127).astype(np.float32)
    expect[2] = 1.0
    np.testing.assert_array_equal(s, expect)
    assert (z == 0).all()
    s, z = weight_params(w, "uint8", axis=2)
    assert s.shape == (2,) and (z == 128).all()
    q = quantize(w, s, z, "uint8", axis=2)
    assert q.dtype == np.uint8 and q.min() >= 1


# --- Conv + Relu: structure, weights, bias, kernels, numbers --------------------------------------
def conv_relu_model(act="Relu", group=1, cin=3, cout=4, bias=True, k=3):
    w = (RNG.standard_normal((cout, cin // group, k, k)) * np.linspace(0.2, 2, cout)[:, None, None, None]).astype(np.float32)
    inits = {"w": w}
    ins = ["x", "w"]
    if bias:
        inits["b"] = RNG.standard_normal(cout).astype(np.float32)
        ins.append("b")
    nodes = [helper.make_node("Conv", ins, ["conv"], pads=[1, 1, 1, 1], group=group, name="conv0")]
    if act == "Relu":
        nodes.append(helper.make_node("Relu", ["conv"], ["y"], name="act"))
    elif act == "Clip":
        inits["lo"], inits["hi"] = np.float32(0), np.float32(6)
        nodes.append(helper.make_node("Clip", ["conv", "lo", "hi"], ["y"], name="act"))
    model = make_model(nodes, [("x", ["N", cin, 6, 6])], ["y" if act else "conv"], inits)
    return model, w, inits.get("b")


def test_conv_relu_structure_weights_bias_and_numbers():
    model, w, b = conv_relu_model()
    feeds = x_feed((3, 6, 6))
    res = quantize_model(model, feeds)
    qm = res.model
    # one Q per activation tensor: input x and the Relu output (Relu absorbed), none on the Conv output
    qs = [n.input[0] for n in qm.graph.node if n.op_type == "QuantizeLinear"]
    assert sorted(qs) == ["x", "y_float"] and res.details["absorbed_activations"] == {"Relu": 1}
    assert [o.name for o in qm.graph.output] == ["y"]
    # weights: int8, per channel (axis 0), symmetric 7-bit (u8s8-rr): scale = max|w| / 63 exactly
    conv = next(n for n in qm.graph.node if n.op_type == "Conv")
    wdq = node_by_output(qm, conv.input[1])
    qw, sw, zw = (init(qm, x) for x in wdq.input)
    assert qw.dtype == np.int8 and zw.dtype == np.int8 and (zw == 0).all()
    assert helper.get_attribute_value(wdq.attribute[0]) == 0
    np.testing.assert_array_equal(sw, (np.abs(w).reshape(4, -1).max(1) / 63).astype(np.float32))
    assert np.abs(qw).max() == 63
    assert "w" not in {t.name for t in qm.graph.initializer}  # float weight dropped
    # bias: int32, scale = input scale x weight scale (float32), zero point 0
    s_x, z_x = q_of(qm, "x")
    bdq = node_by_output(qm, conv.input[2])
    qb, sb, zb = (init(qm, x) for x in bdq.input)
    assert qb.dtype == np.int32 and (zb == 0).all()
    np.testing.assert_array_equal(sb, (np.float32(s_x) * sw).astype(np.float32))
    np.testing.assert_array_equal(qb, np.rint(b.astype(np.float64) / sb.astype(np.float64)).astype(np.int32))
    # Relu absorbed: output zero point 0 (uint8)
    s_y, z_y = q_of(qm, "y_float")
    assert z_y == 0 and z_y.dtype == np.uint8
    # ORT runs it as QLinearConv, no float conv left
    integer, flt = integer_kernels(qm)
    assert integer == {"QLinearConv": 1} and flt == {}
    assert res.details["integer_compute_share"] == 1.0
    # numbers: numpy fake-quant reference == ORT integer kernels within 1 output LSB
    x = feeds["x"]
    xq = dequantize(quantize(x, s_x, z_x), s_x, z_x)
    wq = dequantize(qw, sw, zw, axis=0)
    ref = np.maximum(np_conv(xq, wq, dequantize(qb, sb, 0, axis=0), pads=(1, 1, 1, 1)), 0)
    ref = dequantize(quantize(ref, s_y, z_y), s_y, z_y)
    got = run(qm, feeds)
    assert np.abs(got - ref).max() <= s_y * 1.001
    np.testing.assert_allclose(run_spec(qm, feeds), ref, atol=1e-5)
    # and the float model within the error the scales imply
    assert np.abs(got - run(model, feeds)).max() <= error_bound(qm, w, x, "y_float")
    assert res.weights["conv0"].scales == tuple(float(v) for v in sw)
    assert res.activations["y"].zero_point == 0


def error_bound(qm, w, x, out):
    """Worst-case |quantized - float| of one conv: input, weight, bias and output rounding."""
    s_x, _ = q_of(qm, "x")
    s_y, _ = q_of(qm, out)
    conv = next(n for n in qm.graph.node if n.op_type == "Conv")
    sw = init(qm, node_by_output(qm, conv.input[1]).input[1])
    k = w[0].size
    return float(0.5 * s_y + 0.5 * s_x * np.abs(w).reshape(len(w), -1).sum(1).max()
                 + 0.5 * sw.max() * np.abs(x).max() * k + 0.5 * s_x * sw.max() + 1e-5)


def test_conv_clip6_absorbed_and_range_inside_clip():
    model, w, _ = conv_relu_model("Clip")
    feeds = x_feed((3, 6, 6))
    feeds["x"] *= 4  # drive the conv beyond 6 so the Clip matters
    res = quantize_model(model, feeds)
    qm = res.model
    s, z = q_of(qm, "y_float")
    assert z == 0 and 255 * s <= 6.0 * (1 + 1e-6)
    assert res.details["absorbed_activations"] == {"Clip": 1}
    integer, flt = integer_kernels(qm)
    assert integer == {"QLinearConv": 1} and flt == {}
    # ORT deleted the Clip: the optimized graph ends in QLinearConv -> DequantizeLinear
    assert np.abs(run(qm, feeds) - run_spec(qm, feeds)).max() <= s * 1.001
    assert np.abs(run(qm, feeds) - run(model, feeds)).max() <= error_bound(qm, w, feeds["x"], "y_float")


def test_clip_not_redundant_keeps_q_before_it():
    # Clip(0.5, 6): 0 must stay representable, so the Q range cannot sit inside the clip -> Q before Clip
    w = RNG.standard_normal((4, 3, 1, 1)).astype(np.float32)
    model = make_model([helper.make_node("Conv", ["x", "w"], ["c"]),
                        helper.make_node("Clip", ["c", "lo", "hi"], ["y"]),
                        helper.make_node("Conv", ["y", "w2"], ["z"])],
                       [("x", ["N", 3, 4, 4])], ["z"],
                       {"w": w, "lo": np.float32(0.5), "hi": np.float32(6), "w2": RNG.standard_normal((2, 4, 1, 1))})
    res = quantize_model(model, x_feed((3, 4, 4)))
    assert "absorbed_activations" not in res.details or not res.details["absorbed_activations"]
    integer, flt = integer_kernels(res.model)
    assert integer == {"QLinearConv": 2} and flt == {}


def test_depthwise_keeps_8bit_weights_under_reduce_range():
    model, w, _ = conv_relu_model(group=4, cin=4, cout=4)
    res = quantize_model(model, x_feed((4, 6, 6)))
    wq = res.weights["conv0"]
    assert wq.reduce_range is False  # ORT's depthwise kernel accumulates in int32: no saturation
    np.testing.assert_array_equal(np.float32(wq.scales), (np.abs(w).reshape(4, -1).max(1) / 127).astype(np.float32))
    assert integer_kernels(res.model) == ({"QLinearConv": 1}, {})


def test_full_range_u8s8_scale_127():
    model, w, _ = conv_relu_model()
    res = quantize_model(model, x_feed((3, 6, 6)), scheme="u8s8")
    np.testing.assert_array_equal(np.float32(res.weights["conv0"].scales),
                                  (np.abs(w).reshape(4, -1).max(1) / 127).astype(np.float32))


def test_u8u8_weights_zero_point_128():
    model, w, _ = conv_relu_model()
    feeds = x_feed((3, 6, 6))
    res = quantize_model(model, feeds, scheme="u8u8")
    conv = next(n for n in res.model.graph.node if n.op_type == "Conv")
    qw, sw, zw = (init(res.model, x) for x in node_by_output(res.model, conv.input[1]).input)
    assert qw.dtype == np.uint8 and (zw == 128).all() and qw.min() >= 1
    np.testing.assert_array_equal(sw, (np.abs(w).reshape(4, -1).max(1) / 127).astype(np.float32))
    assert integer_kernels(res.model) == ({"QLinearConv": 1}, {})
    s_y, _ = q_of(res.model, "y_float")
    assert np.abs(run(res.model, feeds) - run_spec(res.model, feeds)).max() <= s_y * 1.001


def test_auto_scheme_does_not_saturate_on_avx2():
    """Full-range u8 x s8 operands saturate vpmaddubsw; the AVX2 auto scheme must give the exact result."""
    cin = 16
    w = np.full((4, cin, 1, 1), 1.0, np.float32)
    w[:, ::2] = 0.999  # every weight near max|w| -> full-scale int8 codes
    model = make_model([helper.make_node("Conv", ["x", "w"], ["y"])], [("x", ["N", cin, 2, 2])], ["y"], {"w": w})
    feeds = {"x": np.full((1, cin, 2, 2), 1.0, np.float32)}
    ranges = ranges_for(model, feeds)
    ranges["x"] = TensorRange(0.0, 1.0, 0.0, 1.0)  # x quantizes to 255
    res = quantize_model(model, ranges=ranges, scheme="auto", cpu_flags=["avx2", "fma"])
    assert res.details["scheme"] in ("u8u8", "u8s8-rr")
    s_y, _ = q_of(res.model, "y_float")
    assert np.abs(run(res.model, feeds) - run_spec(res.model, feeds)).max() <= s_y * 1.001


# --- QLinear ops and data movement -----------------------------------------------------------------
def test_residual_add_concat_maxpool_gap_gemm():
    c = 4
    inits = {"w1": RNG.standard_normal((c, c, 3, 3)) * 0.3, "b1": RNG.standard_normal(c),
             "w2": RNG.standard_normal((c, c, 1, 1)), "w3": RNG.standard_normal((c, c, 1, 1)),
             "fc": RNG.standard_normal((10, 2 * c)), "fcb": RNG.standard_normal(10)}
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="c1"),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Add", ["r1", "x"], ["res"], name="add"),  # residual
        helper.make_node("MaxPool", ["res"], ["mp"], kernel_shape=[2, 2], strides=[2, 2], name="mp"),
        helper.make_node("Conv", ["mp", "w2"], ["c2"], name="c2"),
        helper.make_node("Conv", ["mp", "w3"], ["c3"], name="c3"),
        helper.make_node("Concat", ["c2", "c3"], ["cat"], axis=1, name="cat"),
        helper.make_node("GlobalAveragePool", ["cat"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flat"),
        helper.make_node("Gemm", ["flat", "fc", "fcb"], ["logits"], transB=1, name="fc"),
    ]
    model = make_model(nodes, [("x", ["N", c, 8, 8])], ["logits"], inits)
    feeds = x_feed((c, 8, 8), n=8)
    res = quantize_model(model, feeds)
    qm = res.model
    d = res.details
    assert d["quantized_nodes"] == {"Add": 1, "Concat": 1, "Conv": 3, "Flatten": 1, "Gemm": 1,
                                    "GlobalAveragePool": 1, "MaxPool": 1}
    # data-movement ops reuse their input's scale/zero point (ORT drops their Q/DQ)
    assert res.activations["mp"] == res.activations["res"]
    assert res.activations["flat"] == res.activations["gap"]
    # the logits stay float: no Q on the Gemm output
    assert not [n for n in qm.graph.node if n.op_type == "QuantizeLinear" and n.input[0].startswith("logits")]
    opt_integer, opt_float = integer_kernels(qm)
    assert opt_integer == {"QGemm": 1, "QLinearConv": 3} and opt_float == {}
    optimized = _optimized_ops(qm)
    for k in ("QLinearAdd", "QLinearConcat", "QLinearGlobalAveragePool"):
        assert optimized[k] == 1, optimized
    # all integer: only the model input's Q is left, MaxPool/Flatten move uint8 data, QGemm returns float
    assert optimized["MaxPool"] == 1 and optimized["QuantizeLinear"] == 1 and optimized["DequantizeLinear"] == 0
    ref = run(model, feeds)
    got = run(qm, feeds)
    assert np.abs(got - run_spec(qm, feeds)).max() <= 0.05 * np.abs(ref).max()
    assert np.abs(got - ref).max() <= 0.06 * np.abs(ref).max()


def _optimized_ops(model) -> Counter:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(Path(tmp) / "o.onnx")
        so.log_severity_level = 3
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return ops(onnx.load(str(Path(tmp) / "o.onnx")))


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_axis_by_transb(trans_b):
    w = (RNG.standard_normal((6, 5)) * np.linspace(0.1, 3, 5)[None, :]).astype(np.float32)  # [K=6, N=5]
    b_init = w.T.copy() if trans_b else w
    model = make_model([helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=trans_b, alpha=0.5, beta=2.0,
                                         name="fc")],
                       [("x", ["N", 6])], ["y"], {"w": b_init, "b": RNG.standard_normal(5)})
    feeds = {"x": RNG.standard_normal((8, 6)).astype(np.float32)}
    res = quantize_model(model, feeds)
    wq = res.weights["fc"]
    assert wq.axis == (0 if trans_b else 1)
    absmax = np.abs(w * np.float32(0.5)).max(axis=0)  # alpha folded into the weight, one scale per output column
    np.testing.assert_array_equal(np.float32(wq.scales), (absmax / 63).astype(np.float32))
    assert integer_kernels(res.model) == ({"QGemm": 1}, {})
    ref = run(model, feeds)
    assert np.abs(run(res.model, feeds) - ref).max() <= 0.03 * np.abs(ref).max()


def test_matmul_last_axis_qlinear_and_integer_to_float():
    w1 = RNG.standard_normal((8, 6)).astype(np.float32)
    w2 = RNG.standard_normal((6, 3)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
                        helper.make_node("MatMul", ["h", "w2"], ["y"], name="mm2")],
                       [("x", ["N", 4, 8])], ["y"], {"w1": w1, "w2": w2})
    feeds = {"x": RNG.standard_normal((3, 4, 8)).astype(np.float32)}
    res = quantize_model(model, feeds)
    assert res.weights["mm1"].axis == 1 and res.weights["mm2"].axis == 1
    np.testing.assert_array_equal(np.float32(res.weights["mm1"].scales), (np.abs(w1).max(0) / 63).astype(np.float32))
    assert integer_kernels(res.model) == ({"MatMulIntegerToFloat": 1, "QLinearMatMul": 1}, {})
    ref = run(model, feeds)
    assert np.abs(run(res.model, feeds) - ref).max() <= 0.05 * np.abs(ref).max()


def test_conv_output_that_is_a_graph_output_keeps_name_and_fuses():
    model, _, _ = conv_relu_model(act=None)
    res = quantize_model(model, x_feed((3, 6, 6)))
    assert [o.name for o in res.model.graph.output] == ["conv"]
    assert node_by_output(res.model, "conv").op_type == "DequantizeLinear"
    assert integer_kernels(res.model) == ({"QLinearConv": 1}, {})


# --- config: exclusions, overrides, types ---------------------------------------------------------
def two_convs():
    return make_model([helper.make_node("Conv", ["x", "w1"], ["a"], name="first"),
                       helper.make_node("Relu", ["a"], ["r"], name="relu"),
                       helper.make_node("Conv", ["r", "w2"], ["y"], name="second")],
                      [("x", ["N", 3, 4, 4])], ["y"],
                      {"w1": RNG.standard_normal((4, 3, 1, 1)), "w2": RNG.standard_normal((2, 4, 1, 1))})


def test_exclude_nodes_and_op_types():
    model = two_convs()
    feeds = x_feed((3, 4, 4))
    res = quantize_model(model, feeds, exclude_nodes=["second"])
    assert set(res.weights) == {"first"} and res.details["excluded_nodes"] == ["second"]
    assert integer_kernels(res.model)[0] == {"QLinearConv": 1}
    second = next(n for n in res.model.graph.node if n.name == "second")
    assert second.input[1] == "w2"
    res = quantize_model(model, feeds, exclude_op_types=["Conv"])
    assert not res.modified and not res.weights


def test_excluded_conv_between_quantized_ops_really_stays_float():
    """DQ -> float Conv -> Q is a pattern ORT's WeightBiasQuantization turns into an integer conv with
    per-tensor weights of its own; the excluded conv reads a per-channel DQ instead, so ORT keeps it
    float and the fused model computes exactly what the QDQ graph says."""
    r = np.random.default_rng(3)
    model = make_model([helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="first"),
                        helper.make_node("Conv", ["a", "w2", "b2"], ["d"], name="second", group=4, pads=[1, 1, 1, 1]),
                        helper.make_node("Conv", ["d", "w3", "b3"], ["y"], name="third")],
                       [("x", ["N", 3, 6, 6])], ["y"],
                       {"w1": r.standard_normal((4, 3, 1, 1)), "b1": r.standard_normal(4),
                        "w2": r.standard_normal((4, 1, 3, 3)), "b2": r.standard_normal(4),
                        "w3": r.standard_normal((5, 4, 1, 1)), "b3": r.standard_normal(5)})
    feeds = x_feed((3, 6, 6))
    res = quantize_model(model, feeds, exclude_nodes=["second"])
    assert res.details["float_ops_shielded"] == 1
    second = next(n for n in res.model.graph.node if n.name == "second")
    dq = node_by_output(res.model, second.input[0])
    assert dq.op_type == "DequantizeLinear" and init(res.model, dq.input[1]).shape == (4,)
    integer, flt = integer_kernels(res.model)
    assert integer == {"QLinearConv": 2} and sum(flt.values()) == 1
    np.testing.assert_allclose(run(res.model, feeds), run_spec(res.model, feeds), rtol=0, atol=1e-5)


def test_excluded_ops_may_share_a_dq_between_quantized_neighbours():
    """Squeeze-excitation with the pooling and the scaling Mul excluded (a latency-placement candidate on
    the PP-OCR classifier): both read the Relu's one shared DQ, and the pooling's output is quantized for
    the conv after it (DQ -> op -> Q). The postcondition took that for a quantized op on a shared DQ and
    failed the pass; an op the plan left float is not one. (ORT 1.32 gives each node its own copy of a
    shared DQ and still fuses such weightless ops into integer kernels: the same numbers as the QDQ graph.)"""
    r = np.random.default_rng(5)
    model = make_model([helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="first"),
                        helper.make_node("Relu", ["a"], ["r"], name="relu"),
                        helper.make_node("GlobalAveragePool", ["r"], ["g"], name="squeeze"),
                        helper.make_node("Conv", ["g", "w2", "b2"], ["e"], name="excite"),
                        helper.make_node("Sigmoid", ["e"], ["s"], name="gate"),
                        helper.make_node("Mul", ["r", "s"], ["m"], name="scale"),
                        helper.make_node("Conv", ["m", "w3", "b3"], ["y"], name="project")],
                       [("x", ["N", 3, 6, 6])], ["y"],
                       {"w1": r.standard_normal((4, 3, 1, 1)), "b1": r.standard_normal(4),
                        "w2": r.standard_normal((4, 4, 1, 1)), "b2": r.standard_normal(4),
                        "w3": r.standard_normal((5, 4, 1, 1)), "b3": r.standard_normal(5)})
    feeds = x_feed((3, 6, 6))
    res = quantize_model(model, feeds, exclude_nodes=["squeeze", "scale"])
    assert res.details["excluded_nodes"] == ["squeeze", "scale"]
    dq = node_by_output(res.model, next(n for n in res.model.graph.node if n.name == "squeeze").input[0])
    readers = sorted(n.name for n in res.model.graph.node if dq.output[0] in n.input)
    assert dq.op_type == "DequantizeLinear" and readers == ["scale", "squeeze"]
    assert integer_kernels(res.model)[0] == {"QLinearConv": 3}
    out = run(res.model, feeds)
    np.testing.assert_allclose(out, run_spec(res.model, feeds), rtol=0, atol=1e-5)
    ref = run(model, feeds)
    assert 10 * np.log10(np.sum(ref ** 2) / np.sum((out - ref) ** 2)) > 30  # int8 of a 3-conv net: ~41 dB


def test_overrides_weight_type_weight_only_and_exclude():
    model = two_convs()
    feeds = x_feed((3, 4, 4))
    res = quantize_model(model, feeds, overrides=[{"nodes": ["second"], "weight_type": "uint8"},
                                                  {"op_types": ["Conv"], "per_channel": False, "nodes": ["first"]}])
    assert res.weights["second"].dtype == "uint8" and res.weights["second"].reduce_range is False
    assert res.weights["first"].axis is None and len(res.weights["first"].scales) == 1
    assert integer_kernels(res.model)[0] == {"QLinearConv": 2}
    # weight-only: int8 weights, float activations (no Q at all)
    res = quantize_model(model, feeds, overrides=[{"op_types": ["Conv"], "activation_type": "float"}])
    assert ops(res.model)["QuantizeLinear"] == 0 and ops(res.model)["DequantizeLinear"] == 2
    assert res.details["weight_only_nodes"] == ["first", "second"]
    ref = run(model, feeds)
    assert np.abs(run(res.model, feeds) - ref).max() <= 0.05 * np.abs(ref).max()
    # exclude by override, by tensor
    res = quantize_model(model, feeds, overrides=[{"tensors": ["r"], "exclude": True}])
    assert set(res.weights) == {"first"} and "r" not in res.activations  # reader 'second' excluded


def test_int16_activations_use_ms_domain_below_opset21():
    model = two_convs()
    feeds = x_feed((3, 4, 4))
    res = quantize_model(model, feeds, overrides=[{"nodes": ["second"], "activation_type": "int16"}])
    qm = res.model
    assert res.activations["r"].dtype == "int16" and res.activations["x"].dtype == "uint8"
    q16 = [n for n in qm.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in ("r", "y_float")]
    assert q16 and all(n.domain == "com.microsoft" for n in q16)
    ref = run(model, feeds)
    assert np.abs(run(qm, feeds) - ref).max() <= 0.03 * np.abs(ref).max()


def test_int4_weights_upgrade_opset_and_report():
    model = two_convs()
    feeds = x_feed((3, 4, 4))
    res = quantize_model(model, feeds, overrides=[{"nodes": ["second"], "weight_type": "int4"}])
    assert res.details["opset_upgrade"] == {"from": 17, "to": 21, "why": "4-bit weights"}
    assert res.model.opset_import[0].version == 21
    second = next(n for n in res.model.graph.node if n.name == "second")
    dq = node_by_output(res.model, second.input[1])
    assert next(t for t in res.model.graph.initializer if t.name == dq.input[0]).data_type == TensorProto.INT4
    absmax = np.abs(init(model, "w2")).reshape(2, -1).max(1)
    assert res.weights["second"].mse_clipped and np.all(np.float32(res.weights["second"].scales) * 7 <= absmax + 1e-6)
    res = quantize_model(model, feeds, overrides=[{"nodes": ["second"], "weight_type": "int4",
                                                   "weight_clipping": "max"}])
    assert not res.weights["second"].mse_clipped
    assert np.abs(np.float32(res.weights["second"].scales) * 7 - absmax).max() < 1e-6
    with pytest.raises(PreconditionError, match="allow_opset_upgrade"):
        quantize_model(model, feeds, allow_opset_upgrade=False, weight_type="int4")


# --- bias: int32 overflow guard, bias correction -------------------------------------------------------
def test_bias_overflow_raises_weight_scale():
    w = np.full((2, 3, 1, 1), 1e-9, np.float32)
    w[1] = 0.5
    model = make_model([helper.make_node("Conv", ["x", "w", "b"], ["y"], name="c")], [("x", ["N", 3, 2, 2])], ["y"],
                       {"w": w, "b": np.float32([1000.0, 0.1])})
    res = quantize_model(model, x_feed((3, 2, 2)))
    assert res.weights["c"].bias_scales_raised == 1
    conv = next(n for n in res.model.graph.node if n.op_type == "Conv")
    qb = init(res.model, node_by_output(res.model, conv.input[2]).input[0])
    assert np.abs(qb.astype(np.int64)).max() < 2**31 - 1
    ref = run(model, x_feed((3, 2, 2)))
    assert np.abs(run(res.model, x_feed((3, 2, 2))) - ref).max() < 0.05 * np.abs(ref).max()


def test_bias_correction_reduces_mean_error():
    cin, cout = 16, 8
    w = (RNG.standard_normal((cout, cin, 3, 3)) * 0.05 + 0.02).astype(np.float32)
    model = make_model([helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1], name="c")],
                       [("x", ["N", cin, 6, 6])], ["y"], {"w": w, "b": np.zeros(cout)})
    x = (np.abs(RNG.standard_normal((32, cin, 6, 6))) + 1).astype(np.float32)  # positive mean inputs
    feeds = {"x": x}
    ranges = ranges_for(model, feeds)
    data = from_arrays(feeds, model)
    plain = quantize_model(model, ranges=ranges, data=data, bias_correction="off", scheme="u8s8-rr")
    corrected = quantize_model(model, ranges=ranges, data=data, bias_correction="on", scheme="u8s8-rr")
    assert corrected.weights["c"].bias_corrected and corrected.details["bias_correction"] == {"layers": 1, "samples": 32}
    ref = run(model, feeds)
    err_plain = np.abs((run_spec(plain.model, feeds) - ref).mean(axis=(0, 2, 3))).mean()
    err_corr = np.abs((run_spec(corrected.model, feeds) - ref).mean(axis=(0, 2, 3))).mean()
    assert err_corr < 0.5 * err_plain
    with pytest.raises(PreconditionError, match="calibration data"):
        quantize_model(model, ranges=ranges, bias_correction="on")


# --- errors -----------------------------------------------------------------------------------------
def test_missing_range_names_tensor():
    model = two_convs()
    ranges = ranges_for(model, x_feed((3, 4, 4)))
    del ranges["r"]
    with pytest.raises(PreconditionError, match=r"no calibrated range for tensor 'r'.*calibrate"):
        quantize_model(model, ranges=ranges)


def test_needs_calibration_result():
    with pytest.raises(PreconditionError, match="run the 'calibrate' pass"):
        QuantizeQDQ(QuantizeQDQConfig(), PassContext())(two_convs())
    with pytest.raises(PassError, match="quantize-qdq.*calibrate"):
        PassManager([QuantizeQDQ(QuantizeQDQConfig(), PassContext())]).run(two_convs())


def test_bad_overrides_are_clear_errors():
    model = two_convs()
    feeds = x_feed((3, 4, 4))
    with pytest.raises(PreconditionError, match=r"Relu 'relu' cannot be quantized"):
        quantize_model(model, feeds, overrides=[{"nodes": ["relu"], "activation_type": "int16"}])
    with pytest.raises(PreconditionError, match="no node named 'secnd'.*did you mean 'second'"):
        quantize_model(model, feeds, overrides=[{"nodes": ["secnd"], "weight_type": "int4"}])
    with pytest.raises(PreconditionError, match="has no weights"):
        quantize_model(model, feeds, overrides=[{"op_types": ["Add"], "weight_type": "int4"}])
    with pytest.raises(PreconditionError, match="'Shape' cannot be quantized"):
        quantize_model(model, feeds, op_types=["Conv", "Shape"])
    with pytest.raises(ValueError, match="needs nodes, op_types or tensors"):
        QuantizeQDQConfig(overrides=[{"weight_type": "int4"}])
    with pytest.raises(RecipeError, match="scheme"):
        parse_recipe({"passes": [{"type": "quantize-qdq", "scheme": "u8s9"}]})


def test_refuses_already_quantized_model():
    res = quantize_model(two_convs(), x_feed((3, 4, 4)))
    with pytest.raises(PreconditionError, match="already quantized"):
        quantize_model(res.model, ranges={})


def test_presets_parse():
    for name in ("int8", "int8-minmax", "int8-fast"):
        recipe = load_preset(name)
        types = [p.type for p in recipe.passes]
        i = types.index("calibrate")  # int8 then runs latency-placement
        assert types[i:i + 2] == ["calibrate", "quantize-qdq"] and "constant-folding" in types


def test_op_types_filter_and_override_precedence():
    model = two_convs()
    feeds = x_feed((3, 4, 4))
    # op_types leaves Conv out, but an override configuring one node brings it back
    res = quantize_model(model, feeds, op_types=["Add"], overrides=[{"nodes": ["second"], "weight_type": "uint8"}])
    assert set(res.weights) == {"second"}
    # exclude_nodes is final; later override rules win over earlier ones
    res = quantize_model(model, feeds, exclude_nodes=["first"], overrides=[
        {"nodes": ["first", "second"], "weight_type": "uint8"},
        {"nodes": ["second"], "exclude": True},
        {"nodes": ["second"], "weight_type": "int8"}])
    assert set(res.weights) == {"second"} and res.weights["second"].dtype == "int8"


# --- large models: weights read one at a time -------------------------------------------------------
@pytest.mark.parametrize("weight_type", ["int8", "int4"])
def test_external_weights_are_read_one_at_a_time(tmp_path, monkeypatch, weight_type):
    """Planning reads shapes only; each weight is mapped once, when it is quantized, and let go before the next
    one; calibration's cache key streams the weights the same way; the opset upgrade int4 needs reads none (a
    weight left float stays in the data file). The result is the in-memory model's."""
    import onnx_ir as ir
    from onnxopt.passes.calibrate import Calibrate, CalibrateConfig

    from onnxopt.model_io import from_proto, load_model, save_model, to_proto

    c = 16  # weights above the 1 KB external-data threshold, biases below it (embedded)
    inits = {"w1": RNG.standard_normal((c, c, 3, 3)) * 0.3, "b1": RNG.standard_normal(c),
             "w2": RNG.standard_normal((2 * c, c, 1, 1)), "fc": RNG.standard_normal((64, 2 * c)),
             "fcb": RNG.standard_normal(64)}
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="c1"),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="c2"),
        helper.make_node("GlobalAveragePool", ["c2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flat"),
        helper.make_node("Gemm", ["flat", "fc", "fcb"], ["logits"], transB=1, name="fc"),
    ]
    model = make_model(nodes, [("x", ["N", c, 8, 8])], ["logits"], inits)
    save_model(from_proto(model), tmp_path / "m.onnx", external_data=True, external_threshold=0)
    feeds = x_feed((c, 8, 8), n=8)

    def pipeline(m, cache_dir):
        ctx = PassContext(calibration=from_arrays(feeds, model), cache_dir=cache_dir)
        return PassManager([Calibrate(CalibrateConfig(observer="minmax"), ctx),
                            QuantizeQDQ(QuantizeQDQConfig(scheme="u8s8-rr", bias_correction="on",
                                                          weight_type=weight_type, exclude_nodes=["c2"]), ctx)]).run(m)

    loads, mapped, peak = Counter(), set(), [0]
    real_load, real_release = ir.ExternalTensor._load, ir.ExternalTensor.release

    def load(self):
        loads[self.name] += 1
        mapped.add(self.name)
        peak[0] = max(peak[0], len(mapped))
        return real_load(self)

    def release(self):
        mapped.discard(self.name)
        return real_release(self)

    monkeypatch.setattr(ir.ExternalTensor, "_load", load)
    monkeypatch.setattr(ir.ExternalTensor, "release", release)
    lazy = load_model(tmp_path / "m.onnx")
    external = {k for k, v in lazy.graph.initializers.items() if isinstance(v.const_value, ir.ExternalTensor)}
    assert external == {"w1", "w2", "fc"}
    out = pipeline(lazy, tmp_path / "cache").model
    # once for the calibration cache key (the model's content), once when quantized; c2 stays float: its weight
    # is never read by quantize-qdq and stays in the data file
    assert dict(loads) == {"w1": 2, "fc": 2, "w2": 1} and peak[0] == 1 and not mapped
    assert isinstance(out.graph.initializers["w2"].const_value, ir.ExternalTensor)
    monkeypatch.undo()
    want = pipeline(model, tmp_path / "cache2").model
    got = to_proto(ir.external_data.load_to_model(out))
    assert got.opset_import[0].version == (21 if weight_type == "int4" else 17)
    assert [(n.op_type, list(n.input), list(n.output)) for n in got.graph.node] == \
        [(n.op_type, list(n.input), list(n.output)) for n in want.graph.node]
    assert [t.name for t in got.graph.initializer] == [t.name for t in want.graph.initializer]
    for t in want.graph.initializer:
        np.testing.assert_array_equal(init(got, t.name), numpy_helper.to_array(t))


# --- the real model (skipped without ../shared/models) ------------------------------------------------
LITE0 = __import__("pathlib").Path(__file__).resolve().parents[2] / ".." / "shared" / "models" / "imagenet"


@pytest.mark.real_model
@pytest.mark.skipif(not (LITE0 / "efficientnet_lite0.onnx").is_file(), reason="needs ../shared/models")
def test_lite0_integer_share_size_and_agreement():
    from PIL import Image

    from onnxopt.recipe import load_recipe

    def load(path):
        img = Image.open(path).convert("RGB")
        s = 256 / min(img.size)
        img = img.resize((round(img.width * s), round(img.height * s)), Image.BILINEAR)
        left, top = (img.width - 224) // 2, (img.height - 224) // 2
        x = (np.asarray(img.crop((left, top, left + 224, top + 224)), np.float32) - 127.0) / 128.0
        return x.transpose(2, 0, 1)

    calib = np.stack([load(f) for f in sorted((LITE0 / "calib").iterdir())[:16]])
    val = np.stack([load(f) for f in sorted((LITE0 / "val").iterdir())[:32]])
    path = LITE0 / "efficientnet_lite0.onnx"
    model = PassManager(load_recipe("cleanup").build_passes()).run(onnx.load(str(path))).model
    res = quantize_model(model, {"input": calib}, data=from_arrays({"input": calib}, model), scheme="auto",
                         cpu_flags=["avx2"], bias_correction="auto")
    d = res.details
    assert d["integer_compute_share"] >= 0.95 and d["float_kernels"] == {}
    assert d["absorbed_activations"] == {"Clip": 33} and d["bias_correction"]["layers"] == 50
    assert len(res.model.SerializeToString()) <= 0.28 * path.stat().st_size
    ref = run(model, {"input": val})
    got = run(res.model, {"input": val})
    assert (ref.argmax(1) == got.argmax(1)).mean() >= 30 / 32
    assert 10 * np.log10((ref**2).sum() / ((ref - got) ** 2).sum()) >= 15
