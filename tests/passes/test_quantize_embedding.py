import numpy as np
import pytest
from helpers import I64, init, make_model, ops, ort_run, rand, run, vi
from onnx import helper, numpy_helper
from onnxopt.passes.quantize_embedding import QuantizeEmbedding, QuantizeEmbeddingConfig

node = helper.make_node


def table_model(opset=17, vocab=50, dim=8, second_gather=False):
    table = rand(vocab, dim, seed=1)
    table[7] *= 0.01  # a row far smaller than the others keeps its precision with per-row scales
    nodes = [node("Gather", ["table", "ids"], ["emb"], name="lookup")]
    outputs = [vi("emb", ["N", "L", dim])]
    if second_gather:
        nodes.append(node("Gather", ["table", "ids2"], ["emb2"]))
        outputs.append(vi("emb2", ["N", dim]))
    inputs = [vi("ids", ["N", "L"], I64)] + ([vi("ids2", ["N"], I64)] if second_gather else [])
    return make_model(nodes, inputs, outputs, [init("table", table)], opset=opset), table


def quantize(model, **cfg):
    result = run(model, QuantizeEmbedding(QuantizeEmbeddingConfig(min_elements=100, **cfg)))
    return result.model, result.records[0].details


def per_row_dequantized(table):
    scale = np.abs(table).max(axis=1, keepdims=True) / 127
    return np.clip(np.rint(table / scale), -127, 127) * scale


@pytest.mark.parametrize("opset,form", [(17, "Cast+Mul"), (21, "DequantizeLinear")])
def test_gather_reads_int8_rows_and_dequantizes_only_them(opset, form):
    model, table = table_model(opset)
    out, details = quantize(model)
    assert details == {"tables": ["table"], "gathers": 1, "form": form}
    tensors = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    assert "table" not in tensors
    q = next(v for v in tensors.values() if v.dtype == np.int8)
    assert q.shape == table.shape and np.abs(q.astype(int)).max(axis=1).min() == 127  # every row uses its range
    assert ops(out)["Gather"] == 2
    assert ("DequantizeLinear" in ops(out)) == (form == "DequantizeLinear")
    assert [o.name for o in out.graph.output] == ["emb"]
    ids = np.array([[0, 7, 49], [3, 3, 7]], np.int64)
    got = ort_run(out, {"ids": ids})[0]
    np.testing.assert_allclose(got, per_row_dequantized(table)[ids], rtol=1e-6, atol=1e-7)
    row_step = np.abs(table).max(axis=1) / 254  # half a quantization step per row
    assert (np.abs(got - table[ids]) <= row_step[ids][..., None] * 1.0001).all()


def test_shared_table_is_quantized_once():
    model, table = table_model(second_gather=True)
    out, details = quantize(model)
    assert details["gathers"] == 2 and details["tables"] == ["table"]
    assert sum(numpy_helper.to_array(t).dtype == np.int8 for t in out.graph.initializer) == 1
    ids, ids2 = np.array([[1, 2]], np.int64), np.array([5], np.int64)
    got = ort_run(out, {"ids": ids, "ids2": ids2})
    np.testing.assert_allclose(got[1], per_row_dequantized(table)[ids2], rtol=1e-6, atol=1e-7)


def test_small_excluded_or_non_constant_tables_stay_float():
    model, _ = table_model()
    assert run(model, QuantizeEmbedding()).records[0].modified is False  # 400 values < 65536
    out, details = quantize(model, exclude_tensors=["table"])
    assert details["gathers"] == 0 and ops(out) == {"Gather": 1}
    dynamic = make_model([node("Gather", ["t", "ids"], ["y"])], [vi("t", [50, 8]), vi("ids", [3], I64)],
                         [vi("y", [3, 8])])
    assert quantize(dynamic)[1]["gathers"] == 0
