from pathlib import Path

import numpy as np
import pytest
from helpers import attr, init, make_model, ops, opset_version, ort_run, rand, run, vi
from onnx import helper, numpy_helper
from onnxopt.passes.quantize_weight_only import (
    QuantizeWeightOnly,
    QuantizeWeightOnlyConfig,
    WeightOnlyResult,
    gptq,
    pack_bits,
    rel_error,
    rtn,
)
from tiny_transformer import tiny_transformer, token_feeds

from onnxopt.data import from_arrays
from onnxopt.errors import PassError, RecipeError
from onnxopt.pass_infra import PassContext
from onnxopt.recipe import load_preset, parse_recipe

node = helper.make_node
SHARED = Path(__file__).resolve().parents[3] / "shared" / "models"


def wo(calib=None, **cfg):
    return QuantizeWeightOnly(QuantizeWeightOnlyConfig(**cfg), PassContext(calibration=calib))


def inits(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """MatMulNBits' packing undone: uint8 [..., m] -> codes [..., count], low bits first."""
    if bits == 8:
        return packed.astype(np.int64)[..., :count]
    per = 8 // bits
    parts = [(packed >> (bits * i)) & ((1 << bits) - 1) for i in range(per)]
    return np.stack(parts, axis=-1).reshape(packed.shape[:-1] + (-1,)).astype(np.int64)[..., :count]


def reference_weight(model, node_name: str) -> np.ndarray:
    """The [K, N] float weight a MatMulNBits node computes with, dequantized in numpy from what is stored."""
    n = next(x for x in model.graph.node if x.name == node_name)
    assert n.op_type == "MatMulNBits" and n.domain == "com.microsoft"
    k, nn, bits, block = attr(n, "K"), attr(n, "N"), attr(n, "bits"), attr(n, "block_size")
    values = inits(model)
    packed, scales = values[n.input[1]], values[n.input[2]]
    nb = -(-k // block)
    assert packed.shape == (nn, nb, block * bits // 8) and scales.shape == (nn * nb,)
    codes = unpack(packed, bits, block)  # [N, nb, block]
    if len(n.input) > 3 and n.input[3]:
        zp = unpack(values[n.input[3]].reshape(nn, -1), bits, nb)
    else:
        zp = np.full((nn, nb), 1 << (bits - 1))
    deq = (codes - zp[..., None]).astype(np.float32) * scales.reshape(nn, nb)[..., None]
    return deq.reshape(nn, -1)[:, :k].T


def matmul_model(k=96, n=40, w=None):
    w = rand(k, n, seed=1) if w is None else w
    return make_model([node("MatMul", ["x", "w"], ["y"], name="mm")], [vi("x", ["B", 5, k])],
                      [vi("y", ["B", 5, n])], [init("w", w)])


# --------------------------------------------------------------------------------------------
# Numbers: what ORT computes is exactly the numpy dequantization, within the RTN error bound
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k,block", [(96, 32), (40, 16)], ids=["k96b32", "k40b16-padded"])
def test_matmulnbits_rtn_matches_numpy_dequant_within_half_a_step(bits, symmetric, k, block):
    w = rand(k, 40, seed=1)
    model = matmul_model(k=k, w=w)
    # without the clip search every value is within half a step of its block's grid
    out = run(model, wo(bits=bits, symmetric=symmetric, block_size=block, method="rtn", clip_search=0))
    assert ops(out.model) == {"com.microsoft.MatMulNBits": 1}
    assert "w" not in inits(out.model)
    deq = reference_weight(out.model, "mm/weight_only")
    # RTN error bound: |w - deq| <= scale / 2 in every block (scales from the stored tensor)
    n = next(x for x in out.model.graph.node if x.op_type == "MatMulNBits")
    scales = inits(out.model)[n.input[2]].reshape(40, -1)
    step = np.repeat(scales, block, axis=1)[:, :k].T
    assert np.all(np.abs(w - deq) <= step / 2 * (1 + 1e-5) + 1e-7)
    x = rand(2, 5, k, seed=3)
    got = ort_run(out.model, {"x": x})[0]
    np.testing.assert_allclose(got, x @ deq, rtol=1e-4, atol=1e-4)
    layer = out.results[0].layers["mm"]
    assert layer.format == "matmulnbits" and layer.bits == bits and layer.output_error is None
    assert layer.weight_error == pytest.approx(rel_error(w.T, deq.T), rel=1e-6)
    assert layer.weight_error < (0.01 if bits == 8 else 0.15)


def test_int8_weight_error_is_far_below_int4():
    model = matmul_model()
    e8 = run(model, wo(bits=8, method="rtn")).results[0].layers["mm"].weight_error
    e4 = run(model, wo(bits=4, method="rtn")).results[0].layers["mm"].weight_error
    assert e8 < e4 / 10


def test_clip_search_never_increases_block_error():
    w = rand(64, 24, seed=4)
    w[3, 5] = 8.0  # an outlier that stretches one block's range
    plain, searched = rtn(w.T, 4, 32, True, 0), rtn(w.T, 4, 32, True, 10)
    e_plain = np.square(w.T - plain.dequantized()).reshape(24, 2, 32).sum(-1)
    e_search = np.square(w.T - searched.dequantized()).reshape(24, 2, 32).sum(-1)
    assert np.all(e_search <= e_plain + 1e-9) and e_search.sum() < e_plain.sum()


def test_pack_bits_low_nibble_first():
    assert pack_bits(np.array([[1, 2, 15, 0]]), 4).tolist() == [[0x21, 0x0F]]


def test_dequantize_linear_form_upgrades_to_opset21_and_matches():
    w = rand(96, 40, seed=1)
    model = matmul_model(w=w)
    for symmetric in (True, False):
        out = run(model, wo(bits=4, symmetric=symmetric, format="dequantize-linear", method="rtn"))
        assert opset_version(out.model) == 21
        assert ops(out.model) == {"DequantizeLinear": 1, "MatMul": 1}
        dq = next(x for x in out.model.graph.node if x.op_type == "DequantizeLinear")
        assert attr(dq, "block_size") == 32 and attr(dq, "axis") == 0
        q = out.model.graph.initializer[[t.name for t in out.model.graph.initializer].index(dq.input[0])]
        assert q.data_type == (22 if symmetric else 21)  # INT4 / UINT4
        nbits = run(model, wo(bits=4, symmetric=symmetric, method="rtn")).model
        x = rand(2, 5, 96, seed=3)
        np.testing.assert_allclose(ort_run(out.model, {"x": x})[0], ort_run(nbits, {"x": x})[0], rtol=1e-4, atol=1e-4)


def test_gemm_bias_alpha_beta_trans_b_into_matmulnbits():
    w, c = rand(24, 64, seed=1), rand(24, seed=2)
    model = make_model([node("Gemm", ["x", "w", "c"], ["y"], name="g", transB=1, alpha=0.5, beta=2.0)],
                       [vi("x", ["B", 64])], [vi("y", ["B", 24])], [init("w", w), init("c", c)])
    out = run(model, wo(bits=8, method="rtn"))
    assert ops(out.model) == {"com.microsoft.MatMulNBits": 1}
    assert set(inits(out.model)) & {"w", "c"} == set()
    deq = reference_weight(out.model, "g/weight_only")  # alpha is folded into the scales
    x = rand(3, 64, seed=5)
    np.testing.assert_allclose(ort_run(out.model, {"x": x})[0], x @ deq + 2.0 * c, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(deq, 0.5 * w.T, atol=0.5 * np.abs(w).max() / 127)


def test_gemm_trans_a_uses_dequantize_linear():
    model = make_model([node("Gemm", ["x", "w"], ["y"], name="g", transA=1)], [vi("x", [64, "B"])],
                       [vi("y", ["B", 24])], [init("w", rand(64, 24, seed=1))])
    out = run(model, wo(bits=8, method="rtn"))
    assert ops(out.model) == {"DequantizeLinear": 1, "Gemm": 1}
    x = rand(64, 3, seed=5)
    ref = ort_run(model, {"x": x})[0]
    np.testing.assert_allclose(ort_run(out.model, {"x": x})[0], ref, rtol=0, atol=0.02 * np.abs(ref).max())


def test_embedding_table_to_gather_block_quantized():
    model = tiny_transformer()
    for bits in (4, 8):
        out = run(model, wo(bits=4, method="rtn", embeddings=True, embedding_bits=bits, embedding_block_size=16,
                            min_elements=1000, clip_search=0))
        g = next(x for x in out.model.graph.node if x.op_type == "GatherBlockQuantized")
        assert attr(g, "bits") == bits and attr(g, "block_size") == 16 and "emb" not in inits(out.model)
        values = inits(out.model)
        codes, scales = values[g.input[0]].astype(np.int64), values[g.input[2]]
        if bits == 8:
            codes = codes - 128
        table = codes.astype(np.float32) * np.repeat(scales, 16, axis=1)
        emb = inits(model)["emb"]
        assert np.all(np.abs(table - emb) <= np.repeat(scales, 16, axis=1) / 2 * (1 + 1e-5))
        # probe the Gather alone: the first LayerNorm reads the dequantized rows
        probe = make_model([g], [vi("input_ids", ["B", "L"], 7)], [vi("e", ["B", "L", 64])],
                           [t for t in out.model.graph.initializer if t.name in g.input],
                           opset=17, extra_opsets={"com.microsoft": 1})
        ids = token_feeds()["input_ids"]
        np.testing.assert_array_equal(ort_run(probe, {"input_ids": ids})[0], table[ids])
    assert out.results[0].layers["embed"].format == "gather"


# --------------------------------------------------------------------------------------------
# GPTQ
# --------------------------------------------------------------------------------------------
def correlated(n, k, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 4)) @ rng.standard_normal((4, k)) + 0.1 * rng.standard_normal((n, k))
    return z.astype(np.float32)


def test_gptq_lowers_output_error_on_calibration_activations():
    x = correlated(5 * 64, 96).reshape(64, 5, 96)
    model = matmul_model()
    calib = from_arrays({"x": x}, model)
    res = run(model, wo(calib, bits=4)).results[0]
    assert isinstance(res, WeightOnlyResult) and res.details["method"] == "gptq"
    layer = res.layers["mm"]
    assert layer.method == "gptq" and layer.output_error is not None and res.calibration_samples == 64
    w = inits(model)["w"]
    rows = x.reshape(-1, 96).astype(np.float64)
    h = rows.T @ rows / len(rows)
    err_rtn = rel_error(w.T, rtn(w.T, 4, 32, True, 10).dequantized(), h)
    err_gptq = rel_error(w.T, gptq(w.T, h, 4, 32, True, 0.01, 10).dequantized(), h)
    assert err_gptq < 0.7 * err_rtn
    # what the pass reports is the error of what it wrote: ORT's output against the float layer
    out = run(model, wo(calib, bits=4)).model
    xs = x[:8]
    got, ref = ort_run(out, {"x": xs})[0], xs @ w
    measured = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert measured == pytest.approx(layer.output_error, rel=0.35)
    assert layer.output_error < 0.7 * err_rtn


def test_masked_rows_are_left_out_of_the_hessian():
    model = tiny_transformer()
    feeds = token_feeds(n=8, length=6)
    mask = np.ones((8, 6), np.int64)
    mask[:, 3:] = 0
    m2 = make_model(list(model.graph.node), list(model.graph.input) + [vi("attention_mask", ["B", "L"], 7)],
                    list(model.graph.output), list(model.graph.initializer))
    calib = from_arrays({**feeds, "attention_mask": mask}, m2)
    res = run(m2, wo(calib, bits=4, min_elements=1000)).results[0]
    assert res.layers["q"].method == "gptq"
    # the same rows without padding give the same Hessian, hence the same result
    short = from_arrays({"input_ids": feeds["input_ids"][:, :3], "attention_mask": mask[:, :3]}, m2)
    again = run(m2, wo(short, bits=4, min_elements=1000)).results[0]
    assert res.layers["q"].output_error == pytest.approx(again.layers["q"].output_error, rel=1e-5)


def test_gptq_without_calibration_is_refused():
    with pytest.raises(PassError, match="calibration"):
        run(matmul_model(), wo(method="gptq"))


# --------------------------------------------------------------------------------------------
# Selection, config, preset
# --------------------------------------------------------------------------------------------
def test_tiny_transformer_end_to_end_and_skips():
    model = tiny_transformer()
    out = run(model, wo(bits=4, method="rtn", min_elements=5000, exclude=["ffn2"]))
    res = out.results[0]
    assert sorted(res.layers) == ["ffn1"]
    assert "elements" in res.skipped["q"] and res.skipped["ffn2"] == "excluded" and "head" in res.skipped
    assert "scores" not in res.skipped  # activation x activation MatMuls are not candidates
    assert ops(out.model)["MatMul"] == 7 and ops(out.model)["com.microsoft.MatMulNBits"] == 1
    feeds = token_feeds()
    ref, got = ort_run(model, feeds), ort_run(out.model, feeds)
    cos = np.sum(ref[1] * got[1]) / np.linalg.norm(ref[1]) / np.linalg.norm(got[1])
    assert cos > 0.99


def test_shared_weight_is_skipped():
    w = rand(64, 64, seed=1)
    model = make_model([node("MatMul", ["x", "w"], ["a"], name="a"), node("MatMul", ["a", "w"], ["y"], name="b")],
                       [vi("x", ["B", 64])], [vi("y", ["B", 64])], [init("w", w)])
    res = run(model, wo(method="rtn")).results[0]
    assert res.modified is False and "shared" in res.skipped["a"]


def test_block_size_must_be_a_power_of_two():
    with pytest.raises(RecipeError, match="power of 2"):
        parse_recipe({"passes": [{"type": "quantize-weight-only", "block_size": 48}]})


def test_preset():
    recipe = load_preset("int4-weight-only")
    cfg = next(p for p in recipe.passes if p.type == "quantize-weight-only")
    assert cfg.bits == 4 and cfg.embeddings and cfg.embedding_bits == 4


@pytest.mark.real_model
def test_minilm_int4_rtn_size_and_agreement():
    path = SHARED / "text" / "minilm_l6_sst2.onnx"
    if not path.exists():
        pytest.skip("../shared/models is absent")
    from onnxopt.model_io import load_model, to_proto

    model = to_proto(load_model(path))
    cfg = next(p for p in load_preset("int4-weight-only").passes if p.type == "quantize-weight-only")
    out = run(model, QuantizeWeightOnly(cfg.model_copy(update={"clip_search": 0})))  # RTN, no search: fast
    ratio = out.model.ByteSize() / path.stat().st_size
    assert ratio < 0.17
    assert ops(out.model)["com.microsoft.MatMulNBits"] == 36 and ops(out.model)["com.microsoft.GatherBlockQuantized"] >= 1
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 8000, (4, 16)).astype(np.int64)
    ids[:, 0] = 101
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    which = [o.name for o in model.graph.output].index("sentence_embedding")
    ref, got = ort_run(model, feeds)[which], ort_run(out.model, feeds)[which]
    cos = np.sum(ref * got, 1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    assert cos.min() > 0.9
