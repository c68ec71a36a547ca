"""Static int8 (calibrate + quantize-qdq) on attention models: additive masks (-inf or -1e4 where a position is
padded) are found from the graph, left out of calibration and kept float; the residual stream's elementwise ops
stay float by default; localization compares -inf to -inf as equal."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from bert_graph import bert_feeds, bert_model
from helpers import I64, init, make_model, vi
from onnx import helper

from onnxopt.activations import attention_masks, has_attention
from onnxopt.data import from_arrays
from onnxopt.localize import SQNR_CAP_DB, localize
from onnxopt.model_io import from_proto, to_proto
from onnxopt.pass_infra import PassContext, PassManager
from onnxopt.recipe import parse_recipe
from onnxopt.validate import _pick_accuracy_output

node = helper.make_node


def run(model: onnx.ModelProto, feeds) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def static_int8(model: onnx.ModelProto, feeds) -> tuple[onnx.ModelProto, list]:
    recipe = parse_recipe({"name": "t", "passes": [{"type": "calibrate", "cache": False, "observer": "minmax"},
                                                   {"type": "quantize-qdq"}]})
    ctx = PassContext(calibration=from_arrays(feeds, from_proto(model)))
    result = PassManager(recipe.build_passes(ctx)).run(from_proto(model))
    return to_proto(result.model), result.results


def additive_mask_model() -> onnx.ModelProto:
    """HF BERT's older export: mask = (1 - float(mask)) * -10000 added to the scores, and a learned position
    embedding looked up from Range(L) and added to the token embedding (data, not a mask)."""
    rng = np.random.default_rng(3)
    h, vocab, length = 8, 50, 6
    inits = [init("emb", rng.standard_normal((vocab, h)).astype(np.float32)),
             init("pos", rng.standard_normal((length, h)).astype(np.float32)),
             init("wq", rng.standard_normal((h, h)).astype(np.float32)),
             init("one", np.array(1.0, np.float32)), init("big", np.array(-10000.0, np.float32)),
             init("zero_i", np.array(0, np.int64)), init("one_i", np.array(1, np.int64)),
             init("ax1", np.array([1], np.int64)), init("idx1", np.array([1], np.int64))]
    nodes = [node("Gather", ["emb", "input_ids"], ["tok"]),
             node("Shape", ["input_ids"], ["shp"]), node("Gather", ["shp", "one_i"], ["len"]),
             node("Range", ["zero_i", "len", "one_i"], ["positions"]),
             node("Gather", ["pos", "positions"], ["pos_emb"]),
             node("Add", ["tok", "pos_emb"], ["x"]),
             node("MatMul", ["x", "wq"], ["q"]),
             node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
             node("MatMul", ["q", "xt"], ["scores"]),
             node("Cast", ["attention_mask"], ["m_f"], to=onnx.TensorProto.FLOAT),
             node("Sub", ["one", "m_f"], ["inv"]),
             node("Mul", ["inv", "big"], ["m_add0"]),
             node("Unsqueeze", ["m_add0", "ax1"], ["m_add"]),
             node("Add", ["scores", "m_add"], ["masked"]),
             node("Softmax", ["masked"], ["probs"], axis=-1),
             node("MatMul", ["probs", "x"], ["ctx"])]
    return make_model(nodes, [vi("input_ids", ["N", "L"], I64), vi("attention_mask", ["N", "L"], I64)],
                      [vi("ctx", ["N", "L", h])], inits, opset=17)


def test_masks_are_found_from_the_graph():
    assert attention_masks(from_proto(bert_model(layers=2))) == {"mask_add", "l0_masked", "l1_masked"}
    assert has_attention(from_proto(bert_model()))
    # -1e4 masks from (1 - mask) * -10000; the position embedding (Range of a shape) is not a mask
    model = from_proto(additive_mask_model())
    assert attention_masks(model) == {"m_f", "inv", "m_add0", "m_add", "masked"}
    assert has_attention(model)


def test_models_without_attention_have_no_masks():
    nodes = [node("MatMul", ["x", "w"], ["y"]), node("Softmax", ["y"], ["p"], axis=-1)]
    model = from_proto(make_model(nodes, [vi("x", ["N", 4])], [vi("p", ["N", 4])],
                                  [init("w", np.eye(4, dtype=np.float32))], opset=17))
    assert attention_masks(model) == set()
    assert not has_attention(model)


def test_bert_static_int8_keeps_masks_float_and_matches_fp32():
    model = bert_model(layers=2, outlier=6.0)
    calib = bert_feeds(n=48, length=12, seed=5)
    assert (calib["attention_mask"] == 0).any()  # padded rows: the masks hold -inf while calibrating
    q, results = static_int8(model, calib)
    cal, qdq = results
    assert cal.details["attention_masks"] == 3
    assert not {"mask_add", "l0_masked", "l1_masked"} & set(cal.ranges)
    assert qdq.details["attention_masks_float"] == 3

    producers = {o: n for n in q.graph.node for o in n.output}
    readers = {}
    for n in q.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    fed_by_dq = lambda n, k: producers.get(n.input[k]) is not None and producers[n.input[k]].op_type == "DequantizeLinear"  # noqa: E731
    for t in ("mask_add", "l0_masked", "l1_masked"):
        assert all(r.op_type != "QuantizeLinear" for r in readers[t]), t
    softmax = [n for n in q.graph.node if n.op_type == "Softmax"]
    assert len(softmax) == 2 and not any(fed_by_dq(n, 0) for n in softmax)
    matmuls = [n for n in q.graph.node if n.op_type == "MatMul"]
    assert len(matmuls) == 2 * 8 and all(fed_by_dq(n, 0) and fed_by_dq(n, 1) for n in matmuls)
    # the residual Adds and the GELU Muls stay float on an attention model
    residual = [n for n in q.graph.node if n.output[0] in ("l0_res1", "l0_res2", "l1_res1", "l1_res2", "l0_gelu")]
    assert len(residual) == 5 and not any(fed_by_dq(n, k) for n in residual for k in range(2))

    val = bert_feeds(n=16, length=12, seed=9)
    ref_hidden, ref_logits = run(model, val)
    hidden, logits = run(q, val)
    assert np.isfinite(hidden).all()
    err = hidden - ref_hidden
    sqnr = 10 * math.log10(float((ref_hidden ** 2).sum() / (err ** 2).sum()))
    assert sqnr > 28.0  # 34.7 dB measured
    np.testing.assert_allclose(logits, ref_logits, atol=0.06)  # 0.037 measured


def test_without_the_mask_rule_a_finite_mask_ruins_the_scores(monkeypatch):
    """The rule is what keeps the numbers: with a -1e4 mask (finite, so calibration accepts it) and the rule
    switched off, the masked scores get one range spanning [-1e4, max] and every real score rounds away."""
    import onnxopt.passes.calibrate as cal_mod
    import onnxopt.passes.quantize_qdq as q_mod

    model = bert_model(layers=1)
    for t in model.graph.initializer:
        if t.name == "neg_inf":
            t.CopyFrom(init("neg_inf", np.array([-10000.0], np.float32)))
    calib = bert_feeds(n=48, length=12, seed=5)
    val = bert_feeds(n=16, length=12, seed=9)
    recipe = {"name": "t", "passes": [{"type": "calibrate", "cache": False, "observer": "minmax"},
                                      {"type": "quantize-qdq", "op_types": ["MatMul", "Gemm", "Add", "Softmax"]}]}

    def quantized():
        ctx = PassContext(calibration=from_arrays(calib, from_proto(model)))
        return to_proto(PassManager(parse_recipe(recipe).build_passes(ctx)).run(from_proto(model)).model)

    ref = run(model, val)[0]
    kept = quantized()
    monkeypatch.setattr(cal_mod, "attention_masks", lambda m: set())
    monkeypatch.setattr(q_mod, "attention_masks", lambda m: set())
    lost = quantized()
    err_kept, err_lost = (float(np.abs(run(m, val)[0] - ref).mean()) for m in (kept, lost))
    assert err_kept < 0.05
    assert err_lost > 4 * err_kept


def test_localization_compares_minus_inf_as_equal():
    model = bert_model(layers=1)
    q, _ = static_int8(model, bert_feeds(n=48, length=12, seed=5))
    data = from_arrays(bert_feeds(n=8, length=12, seed=9), from_proto(model))
    loc = localize(model, q, data, max_samples=8)
    by_tensor = {x.tensor: x for x in loc.layers}
    assert by_tensor["mask_add"].sqnr_db == SQNR_CAP_DB  # -inf == -inf: no noise
    assert all(math.isfinite(x.sqnr_db) and math.isfinite(x.cosine) for x in loc.layers)
    assert -SQNR_CAP_DB < by_tensor["l0_masked"].sqnr_db < 60  # the finite scores carry the int8 error


@pytest.mark.parametrize("named", [[], ["embedding"]])
def test_labels_score_the_classifier_head_not_an_embedding(named):
    out = {"embedding": np.zeros((4, 384), np.float32), "logits": np.zeros((4, 2), np.float32)}
    labels = np.array([0, 1, 1, 0])
    picked = _pick_accuracy_output(["embedding", "logits"], out, labels, named)
    assert picked == (named[0] if named else "logits")
    # labels beyond the head's classes: the wider output is the only one that can be scored
    assert _pick_accuracy_output(["embedding", "logits"], out, np.array([0, 7]), []) == "embedding"
