import lzma
import zlib

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxopt.compression import huffman_lengths, size_report, sparse_streams, tensor_size


def test_huffman_lengths_by_hand():
    # 0:5, 5:2, 7:1 -> merge 7+5 (3), then 0 with that: 0 -> 1 bit, 5 and 7 -> 2 bits
    assert huffman_lengths({0: 5, 5: 2, 7: 1}) == {0: 1, 5: 2, 7: 2}
    assert huffman_lengths({42: 9}) == {42: 1}
    lengths = huffman_lengths({s: 1 for s in range(8)})  # uniform over 8: 3 bits each
    assert set(lengths.values()) == {3}


def test_dense_wins_on_a_short_tensor():
    q = np.array([0, 0, 0, 5, 0, 0, 7, 5], dtype=np.int8)
    s = tensor_size("q", q)
    # dense: 5*1 + 2*2 + 1*2 = 11 bits + 3 codebook entries * (8 + 8) = 59
    assert s.dense_bits == 59
    # sparse: values 5,7,5 (1 bit each, 2 entries) = 3 + 32; gaps 3,2,0 (1+2+2 bits, 3 entries) = 5 + 48
    assert s.sparse_bits == 88
    assert s.coded_bytes == 8 and s.form == "dense" and s.zeros == 5 and s.raw_bytes == 8


def test_sparse_wins_with_long_runs_and_fillers():
    q = np.zeros(1000, dtype=np.int8)
    q[10] = q[600] = 3
    values, gaps = sparse_streams(q, q == 0)
    # 589 zeros before the second value: two fillers of 255 (+1 stored zero each), then a gap of 77
    assert sorted(gaps.tolist()) == [10, 77, 255, 255] and sorted(values.tolist()) == [0, 0, 3, 3]
    s = tensor_size("q", q)
    assert s.dense_bits == 1000 + 32
    assert s.sparse_bits == (4 + 32) + (6 + 48)
    assert s.coded_bytes == 12 and s.form == "sparse"


def test_float_tensors_are_not_quantized_and_zero_points_count():
    f = np.array([0, 0, 1.5, 0], dtype=np.float32)
    s = tensor_size("f", f)
    assert s.dense_bits == 128 and s.sparse_bits == 32 + 1 + 8 and s.coded_bytes == 6
    u = np.array([[128, 128, 3], [7, 7, 7]], dtype=np.uint8)
    per_row = tensor_size("u", u, np.array([[128], [7]], dtype=np.uint8))
    assert per_row.zeros == 5


def test_size_report_totals_and_zero_points_from_the_graph():
    rng = np.random.default_rng(0)
    q = rng.integers(0, 128, (32, 16)).astype(np.uint8)  # never the zero point by chance
    q[:, :8] = 128  # half the weights at the zero point
    nodes = [helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["w"], axis=0),
             helper.make_node("MatMul", ["x", "w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])],
                              [numpy_helper.from_array(q, "q"),
                               numpy_helper.from_array(np.full(32, 0.1, np.float32), "s"),
                               numpy_helper.from_array(np.full(32, 128, np.uint8), "zp")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    data = model.SerializeToString(deterministic=True)
    r = size_report(model, zstd=False)
    assert r["bytes"] == len(data) and r["zlib_bytes"] == len(zlib.compress(data, 9))
    assert [t["name"] for t in r["tensors"]] == ["q"]  # s and zp are below min_elements: raw
    t = r["tensors"][0]
    assert t["zeros"] == 256 and t["sparsity"] == 0.5
    assert t["coded_bytes"] == tensor_size("q", q, 128).coded_bytes
    assert r["total_coded_bytes"] == len(data) - 512 + t["coded_bytes"]
    assert onnx.checker.check_model(model) is None


def _three_layer_model():
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h0"]), helper.make_node("MatMul", ["h0", "w1"], ["h1"]),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["w2"], axis=1),
             helper.make_node("MatMul", ["h1", "w2"], ["y"])]
    w = [rng.standard_normal((64, 64)).astype(np.float32) for _ in range(2)]
    w[1][:, :32] = 0  # half sparse
    q = rng.integers(0, 255, (64, 32)).astype(np.uint8)
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])],
                              [numpy_helper.from_array(w[0], "w0"), numpy_helper.from_array(w[1], "w1"),
                               numpy_helper.from_array(q, "q"), numpy_helper.from_array(np.full(32, 0.1, np.float32), "s"),
                               numpy_helper.from_array(np.full(32, 128, np.uint8), "zp")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_size_report_of_the_ir_reads_one_weight_at_a_time(tmp_path, monkeypatch):
    """An IR model is measured as the protobuf file it would be written as (weights embedded), reading one
    weight at a time from its data file; a file is measured as it is on disk, data file included."""
    import onnx_ir as ir

    from onnxopt.model_io import from_proto, load_model, save_model, to_proto

    proto = _three_layer_model()
    path = tmp_path / "m.onnx"
    save_model(from_proto(proto), path, external_data=True)
    lazy = load_model(path)
    assert sum(isinstance(v.const_value, ir.ExternalTensor) for v in lazy.graph.initializers.values()) == 3
    mapped, peak = set(), [0]
    real_load, real_release = ir.ExternalTensor._load, ir.ExternalTensor.release

    def load(self):
        mapped.add(self.name)
        peak[0] = max(peak[0], len(mapped))
        return real_load(self)

    def release(self):
        mapped.discard(self.name)
        return real_release(self)

    monkeypatch.setattr(ir.ExternalTensor, "_load", load)
    monkeypatch.setattr(ir.ExternalTensor, "release", release)
    r = size_report(lazy, zstd=False)
    assert peak[0] == 1 and not mapped  # each weight mapped alone, and let go
    monkeypatch.undo()
    embedded = to_proto(ir.external_data.load_to_model(load_model(path)))
    assert r == size_report(embedded, zstd=False)
    data = embedded.SerializeToString(deterministic=True)
    assert r["bytes"] == len(data) and r["zlib_bytes"] == len(zlib.compress(data, 9))
    assert [t["name"] for t in r["tensors"]] == ["w0", "w1", "q"]
    assert r["tensors"][2]["zeros"] == int((numpy_helper.to_array(proto.graph.initializer[2]) == 128).sum())
    on_disk = size_report(path, zstd=False)
    files = path.read_bytes() + (tmp_path / "m.onnx.data").read_bytes()
    assert on_disk["bytes"] == len(files) and on_disk["lzma_bytes"] == len(lzma.compress(files, preset=9))
    assert on_disk["tensors"] == r["tensors"]
