"""MSE-optimal weight clipping: lower weight error than max-abs at 4 bits, the QDQ model runs the
same grid that significance scores, and 8-bit weights are untouched unless asked for."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from helpers import initializer, producer
from onnx import TensorProto, helper, numpy_helper
from onnxopt.passes.quantize_qdq import QuantizeQDQ, QuantizeQDQConfig

from onnxopt.checks import check_model
from onnxopt.data import from_arrays
from onnxopt.mixed import fake_quantize
from onnxopt.pass_infra import PassContext
from onnxopt.quant import dequantize, mse_clip_ratios, qrange, quantize, weight_params
from onnxopt.ranges import CalibrationResult, TensorRange


def heavy_tailed(shape, seed=0) -> np.ndarray:
    """Laplace-like weights with a few outliers, as trained conv weights are."""
    rng = np.random.default_rng(seed)
    w = rng.laplace(0.0, 0.1, shape).astype(np.float32)
    flat = w.reshape(shape[0], -1)
    flat[:, 0] = np.where(rng.uniform(size=shape[0]) < 0.5, 1.0, -1.0) * 0.9  # one outlier per channel
    return w


def sq_err(w, scale, zp, qt, axis):
    return ((dequantize(quantize(w, scale, zp, qt, axis=axis), scale, zp, axis=axis) - w).astype(np.float64) ** 2)


def test_mse_clipping_lowers_int4_error_per_channel():
    w = heavy_tailed((16, 8, 3, 3))
    s_max, z_max = weight_params(w, "int4", axis=0)
    s_mse, z_mse = weight_params(w, "int4", axis=0, mse_clip=True)
    e_max = sq_err(w, s_max, z_max, "int4", 0).reshape(16, -1).sum(1)
    e_mse = sq_err(w, s_mse, z_mse, "int4", 0).reshape(16, -1).sum(1)
    assert np.all(e_mse <= e_max * (1 + 1e-9))
    assert e_mse.sum() < 0.9 * e_max.sum()  # outliers cost the max-abs grid levels
    assert np.all(s_mse < s_max)
    # asymmetric int4 (uint4 with zero points): clipped too, zero points inside the type
    s_a, z_a = weight_params(w, "uint4", axis=0, symmetric=False, mse_clip=True)
    s_am, z_am = weight_params(w, "uint4", axis=0, symmetric=False)
    assert np.all((z_a >= 0) & (z_a <= 15))
    assert sq_err(w, s_a, z_a, "uint4", 0).sum() < sq_err(w, s_am, z_am, "uint4", 0).sum()


def test_ratio_search_keeps_exact_grids_and_per_tensor():
    lo, hi = qrange("int4", symmetric=True)
    grid = np.arange(-7, 8, dtype=np.float32)[None].repeat(3, 0) * np.float32([[0.5], [1.0], [2.0]])
    assert np.all(mse_clip_ratios(grid, lo, hi) == 1.0)  # already on a grid: nothing to gain
    s, z = weight_params(grid, "int4", axis=None, mse_clip=True)
    assert s.shape == () and z.shape == ()
    w = heavy_tailed((4, 50), seed=1)
    s_t, z_t = weight_params(w, "int4", axis=None, mse_clip=True)
    s_m, z_m = weight_params(w, "int4", axis=None)
    assert s_t < s_m and sq_err(w, s_t, z_t, "int4", None).sum() < sq_err(w, s_m, z_m, "int4", None).sum()


def test_fake_quantize_clips_at_4_bits_only():
    w = heavy_tailed((6, 40), seed=2)
    err = {(b, c): float(((fake_quantize(w, b, 0, clipping=c) - w) ** 2).sum())
           for b in (2, 4, 8) for c in ("max", "mse")}
    assert err[4, "mse"] < 0.95 * err[4, "max"] and err[2, "mse"] < err[2, "max"]
    np.testing.assert_array_equal(fake_quantize(w, 8, 0), fake_quantize(w, 8, 0, clipping="max"))  # auto
    np.testing.assert_array_equal(fake_quantize(w, 4, 0), fake_quantize(w, 4, 0, clipping="mse"))
    s, z = weight_params(w, "int4", axis=0, mse_clip=True)  # the grid quantize-qdq writes
    np.testing.assert_array_equal(fake_quantize(w, 4, 0), dequantize(quantize(w, s, z, "int4", axis=0), s, z, axis=0))


# --- through quantize-qdq, run by ONNX Runtime --------------------------------------------------------
def conv_gemm_model() -> onnx.ModelProto:
    w1 = heavy_tailed((8, 3, 3, 3), seed=3)
    w2 = heavy_tailed((10, 8 * 4 * 4), seed=4) * np.float32(0.3)
    rng = np.random.default_rng(5)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "w2", "b2"], ["y"], name="fc", transB=1)]
    inits = {"w1": w1, "b1": rng.standard_normal(8), "w2": w2, "b2": rng.standard_normal(10)}
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
                          [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return onnx.shape_inference.infer_shapes(m)


def ort_out(model, x) -> np.ndarray:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]


def ranges(model, x) -> dict[str, TensorRange]:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    names = ["x", "c", "r", "f", "y"]
    del m.graph.output[:]
    m.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    vals = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(names, {"x": x})
    return {n: TensorRange(float(v.min()), float(v.max()), float(v.min()), float(v.max())) for n, v in zip(names, vals, strict=True)}


def quantize_model(model, x, **cfg):
    ctx = PassContext(calibration=from_arrays({"x": x}, model),
                      results=[CalibrationResult(model, False, ranges=ranges(model, x))])
    cfg = {"scheme": "u8s8-rr", "check_kernels": False, "bias_correction": "off", **cfg}
    work = onnx.ModelProto()
    work.CopyFrom(model)
    res = QuantizeQDQ(QuantizeQDQConfig(**cfg), ctx)(work)
    check_model(res.model)
    return res


def dq_weight(model, node) -> tuple[int, np.ndarray]:

    n = next(n for n in model.graph.node if n.name == node)
    dq = producer(model, n.input[1])
    q, s = (numpy_helper.to_array(initializer(model, dq.input[k])) for k in (0, 1))
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    return initializer(model, dq.input[0]).data_type, dequantize(q.astype(np.int64), s, 0, axis=axis)


def test_int4_weight_only_model_matches_ort_and_beats_max_abs():
    model = conv_gemm_model()
    x = np.random.default_rng(6).standard_normal((16, 3, 4, 4)).astype(np.float32)
    ref = ort_out(model, x)
    ov = [{"op_types": ["Conv", "Gemm"], "activation_type": "float", "weight_type": "int4"}]
    res = quantize_model(model, x, overrides=ov)
    assert res.details["mse_clipped_weights"] == 2
    weights = {"conv": ("w1", 0), "fc": ("w2", 0)}
    fq = onnx.ModelProto()
    fq.CopyFrom(model)
    inits = {t.name: t for t in fq.graph.initializer}
    for node, (w, axis) in weights.items():
        dtype, deq = dq_weight(res.model, node)
        assert dtype == TensorProto.INT4
        orig = numpy_helper.to_array(inits[w])
        np.testing.assert_array_equal(deq, fake_quantize(orig, 4, axis))  # the grid significance scores
        inits[w].CopyFrom(numpy_helper.from_array(deq, w))
    out = ort_out(res.model, x)
    np.testing.assert_allclose(out, ort_out(fq, x), rtol=0, atol=1e-5)  # ORT runs exactly that grid
    out_max = ort_out(quantize_model(model, x, overrides=[{**ov[0], "weight_clipping": "max"}]).model, x)
    assert np.abs(out - ref).mean() < 0.8 * np.abs(out_max - ref).mean()


def test_int4_qdq_with_bias_correction_closer_than_max_abs():
    model = conv_gemm_model()
    x = np.random.default_rng(7).standard_normal((32, 3, 4, 4)).astype(np.float32)
    ref = ort_out(model, x)
    res = quantize_model(model, x, weight_type="int4", bias_correction="on")
    assert all(w.mse_clipped and w.bias_corrected for w in res.weights.values())
    res_max = quantize_model(model, x, weight_type="int4", bias_correction="on", weight_clipping="max")
    assert not any(w.mse_clipped for w in res_max.weights.values())
    err, err_max = (float(np.abs(ort_out(r.model, x) - ref).mean()) for r in (res, res_max))
    assert err < 0.9 * err_max


def test_int8_untouched_by_default_and_clippable_on_request():
    model = conv_gemm_model()
    x = np.random.default_rng(8).standard_normal((16, 3, 4, 4)).astype(np.float32)
    auto = quantize_model(model, x)
    off = quantize_model(model, x, weight_clipping="max")
    assert auto.model.SerializeToString() == off.model.SerializeToString()
    assert "mse_clipped_weights" not in auto.details
    w1 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w1"))
    s, _ = weight_params(w1, "int8", axis=0, reduce_range=True)
    np.testing.assert_array_equal(np.float32(auto.weights["conv"].scales), s)
    on = quantize_model(model, x, overrides=[{"nodes": ["conv"], "weight_clipping": "mse"}])
    assert on.weights["conv"].mse_clipped and not on.weights["fc"].mse_clipped
    assert np.all(np.float32(on.weights["conv"].scales) <= s)
