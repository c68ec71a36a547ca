import numpy as np
import onnx
import pytest
from bert_graph import bert_feeds, bert_model
from helpers import init, make_model, ops, ort_run, rand, run, vi
from onnx import helper, numpy_helper
from onnxopt.passes.quantize_dynamic import (
    QuantizeDynamic,
    QuantizeDynamicConfig,
    dynamic_scheme,
    full_range_probe,
    quantize_weight,
    smoothing_factors,
    u8s8_gemm_is_exact,
)
from onnxopt.passes.transformer_fusion import TransformerFusion

from onnxopt.data import ArraySource
from onnxopt.errors import PassError
from onnxopt.pass_infra import PassContext, PassManager

node = helper.make_node
AVX2 = ["sse2", "avx2"]


def quantize(model, calibration=None, **cfg):
    cfg.setdefault("min_weight_elements", 0)
    p = QuantizeDynamic(QuantizeDynamicConfig(**cfg), PassContext(calibration=calibration))
    result = PassManager([p]).run(model)
    return result.model, result.records[0].details


def reference_dqmm(x: np.ndarray, q: np.ndarray, scale: np.ndarray, bias=None) -> np.ndarray:
    """DynamicQuantizeMatMul in numpy: x to uint8 per tensor (DynamicQuantizeLinear), exact integer GEMM."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    xs = np.float32((hi - lo) / 255)
    zp = np.clip(np.rint(-lo / xs), 0, 255)
    xq = np.clip(np.rint(x / xs) + zp, 0, 255).astype(np.int64)
    acc = (xq - zp.astype(np.int64)) @ q.astype(np.int64)
    y = acc.astype(np.float64) * (np.float64(xs) * scale.astype(np.float64))
    return (y if bias is None else y + bias).astype(np.float32)


def test_matmul_becomes_dynamic_quantize_matmul_with_per_column_int8_weights():
    w = rand(24, 10, seed=1)
    w[:, 3] *= 20  # one wide column: per-column scales keep the others fine
    model = make_model([node("MatMul", ["x", "w"], ["y"], name="mm")], [vi("x", ["N", 5, 24])], [vi("y", ["N", 5, 10])],
                       [init("w", w)])
    out, details = quantize(model, scheme="u8s8")
    assert ops(out) == {"com.microsoft.DynamicQuantizeMatMul": 1} and details["quantized"] == {"MatMul": 1}
    dq = out.graph.node[0]
    tensors = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    q, scale, zp = (tensors[n] for n in dq.input[1:4])
    assert q.dtype == np.int8 and q.shape == (24, 10) and scale.shape == (10,) and not zp.any()
    np.testing.assert_allclose(scale, np.abs(w).max(axis=0) / 127, rtol=1e-6)
    assert np.abs(q).max() == 127 and "w" not in tensors  # the float weight is gone
    x = rand(2, 5, 24, seed=2)
    got = ort_run(out, {"x": x})[0]
    np.testing.assert_allclose(got, reference_dqmm(x, q, scale), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, x @ w, rtol=0, atol=0.03 * np.abs(x @ w).max())


def exact_scheme():
    """The scheme auto picks on this machine: one whose integer GEMM is exact here."""
    return dynamic_scheme("auto", None)[0]


def test_auto_scheme_follows_what_the_kernel_does_here():
    # full-range u8 activations x int8 weights, where vpmaddubsw pair sums (255 * 127 * 2) clip at 32767
    k, n = 64, 8
    model = make_model([node("MatMul", ["x", "w"], ["y"])], [vi("x", [3, k])], [vi("y", [3, n])],
                       [init("w", np.full((k, n), 0.5, np.float32))])
    x = np.full((3, k), 4.0, np.float32)
    x[1, ::2] = -4.0
    outs = {}
    for scheme in ("u8s8", "u8s8-rr"):
        out, _ = quantize(model, scheme=scheme)
        tensors = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
        dq = out.graph.node[0]
        want = reference_dqmm(x, tensors[dq.input[1]], tensors[dq.input[2]])
        outs[scheme] = np.allclose(ort_run(out, {"x": x})[0], want, rtol=1e-5, atol=1e-4)
    assert outs["u8s8-rr"]  # 7-bit weights: pair sums stay below 32767 on every CPU
    assert outs["u8s8"] == u8s8_gemm_is_exact()  # the probe tells the truth about this machine
    scheme, reason = dynamic_scheme("auto", None)
    assert scheme == ("u8s8" if outs["u8s8"] else "u8s8-rr") and "probed" in reason
    model_p, xp, exact = full_range_probe()
    assert abs(float(exact[1, 0]) - 255.0) < 0.01  # 64 x 127 x 127 in the accumulator


@pytest.mark.parametrize("scheme", ["u8s8", "u8s8-rr", "u8u8"])
def test_schemes_weight_types_and_ranges(scheme):
    q, scale, zp = quantize_weight(rand(16, 4, seed=3), scheme)
    if scheme == "u8u8":
        assert q.dtype == np.uint8 and (zp == 128).all()
    else:
        assert q.dtype == np.int8 and not zp.any()
        assert np.abs(q.astype(int)).max() == (63 if scheme == "u8s8-rr" else 127)


def test_auto_scheme_names_the_cpu():
    scheme, reason = dynamic_scheme("auto", AVX2)
    assert scheme == "u8s8-rr" and "VNNI" in reason
    assert dynamic_scheme("auto", ["asimd", "asimddp"])[0] == "u8s8"
    assert dynamic_scheme("u8u8", AVX2) == ("u8u8", "set in the recipe")


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_with_bias(trans_b):
    w = rand(6, 32, seed=4) if trans_b else rand(32, 6, seed=4)
    b = rand(6, seed=5)
    model = make_model([node("Gemm", ["x", "w", "b"], ["y"], transB=trans_b)], [vi("x", ["N", 32])], [vi("y", ["N", 6])],
                       [init("w", w), init("b", b)])
    out, _ = quantize(model, scheme=exact_scheme())
    dq = out.graph.node[0]
    assert dq.op_type == "DynamicQuantizeMatMul" and len(dq.input) == 5
    tensors = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    x = rand(3, 32, seed=6)
    got = ort_run(out, {"x": x})[0]
    np.testing.assert_allclose(got, reference_dqmm(x, tensors[dq.input[1]], tensors[dq.input[2]], b), rtol=1e-5,
                               atol=1e-5)


def test_small_weights_and_excluded_nodes_stay_float():
    model = make_model([node("MatMul", ["x", "w1"], ["h"], name="big"), node("MatMul", ["h", "w2"], ["y"], name="head")],
                       [vi("x", ["N", 64])], [vi("y", ["N", 2])],
                       [init("w1", rand(64, 64, seed=7)), init("w2", rand(64, 2, seed=8))])
    out, details = quantize(model, min_weight_elements=4096)
    assert [n.op_type for n in out.graph.node] == ["DynamicQuantizeMatMul", "MatMul"]
    assert details["skipped_small"] == 1
    out2, _ = quantize(model, exclude_nodes=["big"], min_weight_elements=0)
    assert [n.op_type for n in out2.graph.node] == ["MatMul", "DynamicQuantizeMatMul"]


@pytest.mark.parametrize("form,ops_expected", [("mha", {"MultiHeadAttention", "Split"}), ("qattention", {"QAttention"})])
def test_fused_bert_quantizes_attention_and_matmuls(form, ops_expected):
    model = bert_model(layers=2)
    fused = run(model, TransformerFusion()).model
    out, details = quantize(fused, attention=form, min_weight_elements=200)
    counts = {k.split(".")[-1] for k in ops(out)}
    assert ops_expected <= counts and "Attention" not in counts
    assert details["quantized"] == {"Attention": 2, "MatMul": 6}  # the 16x2 head Gemm is below the threshold
    assert ops(out)["com.microsoft.DynamicQuantizeMatMul"] == (8 if form == "mha" else 6)
    feeds = bert_feeds(n=4, length=12)
    want, got = ort_run(fused, feeds), ort_run(out, feeds)
    for w_, g_ in zip(want, got, strict=True):
        cos = np.sum(w_ * g_) / (np.linalg.norm(w_) * np.linalg.norm(g_))
        assert cos > 0.999, cos
        assert np.abs(w_ - g_).max() < 0.1 * np.abs(w_).max()


def test_smoothing_moves_activation_outliers_into_weights_and_cuts_the_error():
    model = run(bert_model(outlier=200.0), TransformerFusion()).model
    feeds = bert_feeds(n=6, length=12, seed=3)
    calib = ArraySource(bert_feeds(n=16, length=12, seed=4), model)
    # 8-bit weights with a GEMM that is exact on every CPU (u8u8), so the activation error is what shows
    plain, d0 = quantize(model, smoothing="off", min_weight_elements=200, scheme="u8u8")
    smooth, d1 = quantize(model, calibration=calib, min_weight_elements=200, scheme="u8u8")
    assert d0["smoothed"] is False and d1["smoothed"] is True
    muls = [n for n in smooth.graph.node if n.op_type == "Mul" and n.name.endswith("_smooth")]
    assert len(muls) == 4  # one per quantized input (Attention and three MatMuls)
    for ref, a, b in zip(ort_run(model, feeds), ort_run(plain, feeds), ort_run(smooth, feeds), strict=True):
        err_plain, err_smooth = np.abs(a - ref).mean(), np.abs(b - ref).mean()
        assert err_smooth < 0.7 * err_plain, (err_smooth, err_plain)


def test_smoothing_factors():
    s = smoothing_factors(np.array([4.0, 0.0, 1.0]), np.array([1.0, 2.0, 0.0]), 0.5)
    np.testing.assert_allclose(s, [2.0, 1.0, 1.0])


def test_smoothing_on_without_calibration_is_a_clear_error():
    model = make_model([node("MatMul", ["x", "w"], ["y"])], [vi("x", ["N", 8])], [vi("y", ["N", 4])],
                       [init("w", rand(8, 4))])
    with pytest.raises(PassError, match="calibration"):
        quantize(model, smoothing="on")


def test_input_model_is_not_modified():
    model = make_model([node("MatMul", ["x", "w"], ["y"])], [vi("x", ["N", 8])], [vi("y", ["N", 4])],
                       [init("w", rand(8, 4))])
    before = model.SerializeToString()
    quantize(model)
    assert model.SerializeToString() == before
    assert onnx.load_from_string(before).graph.node[0].op_type == "MatMul"


def _mask(rows: list[list[int]]) -> dict[str, np.ndarray]:
    mask = np.array(rows, np.int64)
    ids = np.random.default_rng(3).integers(1, 300, mask.shape).astype(np.int64) * mask
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("rows", [
    [[1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]],  # right padding: keys 5.. go
    [[1, 0, 1, 0, 0, 1, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0]],  # holes stay masked, keys 6.. go
    [[1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0, 0, 0]],  # a full row: nothing to trim
    [[1, 0, 0, 0, 0, 0, 0, 0]],  # one key left
])
def test_masked_keys_are_trimmed_without_changing_outputs(rows):
    fused = run(bert_model(layers=2), TransformerFusion()).model
    trimmed, _ = quantize(fused, min_weight_elements=200)
    kept, _ = quantize(fused, min_weight_elements=200, trim_masked_keys=False)
    counts = ops(trimmed)
    assert counts["Slice"] == 2 * 2 + 1 and counts["ReduceMax"] == 1  # K and V per layer, the mask once
    assert "Slice" not in ops(kept)
    mha = [n for n in trimmed.graph.node if n.op_type == "MultiHeadAttention"]
    slices = {n.output[0] for n in trimmed.graph.node if n.op_type == "Slice"}
    assert all(n.input[1] in slices and n.input[2] in slices and n.input[4] in slices for n in mha)
    feeds = _mask(rows)
    for want, got in zip(ort_run(kept, feeds), ort_run(trimmed, feeds), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_trimming_keeps_one_key_when_the_whole_batch_is_masked():
    fused = run(bert_model(layers=1), TransformerFusion()).model
    trimmed, _ = quantize(fused, min_weight_elements=200)
    feeds = _mask([[0] * 6, [0] * 6])
    for got in ort_run(trimmed, feeds):
        assert np.isfinite(got).all()
