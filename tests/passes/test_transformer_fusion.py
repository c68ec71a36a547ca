import numpy as np
import pytest
from bert_graph import bert_feeds, bert_model
from helpers import I64, init, make_model, ops, ort_run, run, vi
from onnx import helper
from onnxopt.passes.transformer_fusion import TransformerFusion, TransformerFusionConfig

from onnxopt.errors import PassError


def attr(node, name):
    return next(helper.get_attribute_value(a) for a in node.attribute if a.name == name)


TOL = {"rtol": 1e-4, "atol": 1e-5}


def fuse(model, **cfg):
    result = run(model, TransformerFusion(TransformerFusionConfig(**cfg)))
    return result.model, result.records[0].details


@pytest.mark.parametrize("layers,noop_reshape", [(1, False), (2, False), (1, True)])
def test_bert_layers_fuse_to_contrib_ops_with_the_same_outputs(layers, noop_reshape):
    model = bert_model(layers=layers, noop_reshape=noop_reshape)
    out, details = fuse(model)
    counts = ops(out)
    assert counts["com.microsoft.Attention"] == layers
    assert counts["com.microsoft.SkipLayerNormalization"] == 2 * layers
    assert counts["com.microsoft.BiasGelu"] == layers
    for gone in ("Softmax", "Erf", "Where", "IsNaN", "Transpose", "Reshape"):
        assert gone not in counts, gone
    assert details["sdpa_attention"] == layers and details["ort_version"]
    assert details["max_abs_error"] <= 1e-4
    attention = next(n for n in out.graph.node if n.op_type == "Attention")
    assert attr(attention, "num_heads") == 2
    np.testing.assert_allclose(attr(attention, "scale"), 1 / np.sqrt(8), rtol=1e-6)
    assert any(o.domain == "com.microsoft" for o in out.opset_import)
    assert [o.name for o in out.graph.output] == ["hidden", "logits"]
    for seed in (1, 2):  # padded rows: the mask reaches the fused Attention
        feeds = bert_feeds(n=4, length=10, seed=seed)
        for want, got in zip(ort_run(model, feeds), ort_run(out, feeds), strict=True):
            np.testing.assert_allclose(got, want, **TOL)


def test_mask_really_masks_after_fusion():
    model = bert_model()
    out, _ = fuse(model)
    feeds = bert_feeds(n=2, length=8)
    feeds["attention_mask"][1, 4:] = 0
    changed = {k: v.copy() for k, v in feeds.items()}
    changed["input_ids"][1, 4:] = 7  # padded tokens must not change the unpadded positions
    a, b = ort_run(out, feeds)[0], ort_run(out, changed)[0]
    np.testing.assert_allclose(a[1, :4], b[1, :4], rtol=1e-5, atol=1e-6)
    assert not np.allclose(a[1, 4:], b[1, 4:])


def test_sdpa_fusion_alone_without_ort_optimizer():
    model = bert_model()
    out, details = fuse(model, use_ort_optimizer=False)
    assert "ort_fusions" not in details and ops(out)["com.microsoft.Attention"] == 1
    assert ops(out)["LayerNormalization"] == 3  # left to ORT's stage
    feeds = bert_feeds()
    for want, got in zip(ort_run(model, feeds), ort_run(out, feeds), strict=True):
        np.testing.assert_allclose(got, want, **TOL)


def test_graph_without_transformer_patterns_is_left_alone():
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [vi("x", ["N", 4])], [vi("y", ["N", 3])],
                       [init("w", np.ones((4, 3), np.float32))])
    result = run(model, TransformerFusion())
    assert result.records[0].modified is False
    assert result.model.SerializeToString() == model.SerializeToString()


def test_attention_whose_mask_is_not_a_2d_input_is_not_fused():
    # A [N, 1, L] mask input: Attention's mask_index wants [N, L], so the block stays unfused.
    model = bert_model()
    for n in model.graph.node:
        if n.output[0] == "mask_b":
            n.input[0] = "mask3"
    for t in model.graph.initializer:
        if t.name == "axes12":
            t.CopyFrom(init("axes12", np.array([1], np.int64)))
    model.graph.input.append(vi("mask3", ["N", 1, "L"], I64))
    out, details = fuse(model)
    assert details["sdpa_attention"] == 0 and "Softmax" in ops(out)
    feeds = bert_feeds()
    feeds["mask3"] = feeds["attention_mask"][:, None, :]
    for want, got in zip(ort_run(model, feeds), ort_run(out, feeds), strict=True):
        np.testing.assert_allclose(got, want, **TOL)


def test_fusion_that_changes_outputs_is_refused(monkeypatch):
    import onnxopt.passes.transformer_fusion as tf

    real = tf._match_block

    def wrong_scale(softmax):
        block = real(softmax)
        return None if block is None else block[:-1] + (block[-1] * 2,)

    monkeypatch.setattr(tf, "_match_block", wrong_scale)
    with pytest.raises(PassError, match="changed output"):
        fuse(bert_model())
