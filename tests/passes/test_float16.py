from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import init, make_model, ops, ort_run, rand, run, vi
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnxopt.passes.float16 import Float16, Float16Config, has_cpu_fp16_kernel
from tiny_transformer import tiny_transformer, token_feeds

from onnxopt.data import from_arrays
from onnxopt.pass_infra import PassContext
from onnxopt.recipe import load_preset

node = helper.make_node
SHARED = Path(__file__).resolve().parents[3] / "shared" / "models"
F16 = TensorProto.FLOAT16


def fp16(calib=None, **cfg):
    return Float16(Float16Config(**cfg), PassContext(calibration=calib))


def by_op(model, op):
    return [n for n in model.graph.node if n.op_type == op]


def elem_types(model):
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {t.name: t.data_type for t in inferred.graph.initializer}
    for v in list(inferred.graph.input) + list(inferred.graph.output) + list(inferred.graph.value_info):
        types[v.name] = v.type.tensor_type.elem_type
    return types


def assert_no_cast_pairs(model):
    producer = {o: n for n in model.graph.node for o in n.output}
    for n in by_op(model, "Cast"):
        src = producer.get(n.input[0])
        assert not (src is not None and src.op_type == "Cast"), f"Cast pair {src.name} -> {n.name}"


def assert_float32_io(before, after):
    for a, b in zip(list(before.graph.input) + list(before.graph.output),
                    list(after.graph.input) + list(after.graph.output), strict=True):
        assert a.name == b.name and a.type.tensor_type.elem_type == b.type.tensor_type.elem_type


def rounded_weights(model, keep=("ln1_g", "ln1_b", "ln2_g", "ln2_b")):
    """The model with the float32 initializers rounded to float16 (still float32): what the CPU form computes."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.data_type == TensorProto.FLOAT and t.name not in keep:
            a = numpy_helper.to_array(t)
            if a.size >= 16:
                t.CopyFrom(numpy_helper.from_array(a.astype(np.float16).astype(np.float32), t.name))
    return out


def test_ort_cpu_kernel_table():
    assert has_cpu_fp16_kernel("Gather", "", 17) and has_cpu_fp16_kernel("LayerNormalization", "", 17)
    assert not has_cpu_fp16_kernel("MatMul", "", 17) and not has_cpu_fp16_kernel("Conv", "", 17)


def test_cpu_target_halves_weights_and_computes_like_rounded_fp32():
    model = tiny_transformer()
    out = run(model, fp16())
    m = out.model
    assert_float32_io(model, m)
    assert_no_cast_pairs(m)
    types = elem_types(m)
    # LayerNorm and Softmax read and write float32; MatMul weights are float16 initializers behind a Cast
    for n in by_op(m, "LayerNormalization") + by_op(m, "Softmax"):
        assert all(types[x] == TensorProto.FLOAT for x in list(n.input) + list(n.output) if x)
    for w in ("wq", "w1", "w2", "head"):
        cast = next(n for n in by_op(m, "Cast") if n.output[0] == w)
        assert types[cast.input[0]] == F16
    # the embedding Gather has a float16 kernel and a float16 table: it runs in float16, cast back once
    gather = by_op(m, "Gather")[0]
    assert types[gather.input[0]] == F16 and types[gather.output[0]] == F16
    assert sum(1 for n in by_op(m, "Cast") if n.input[0] == gather.output[0]) == 1
    d = out.records[0].details
    assert d["nodes_fp16"] == 1 and d["kept_fp32"]["fragile op"] == 4 and d["kept_fp32"]["no float16 CPU kernel"] > 5
    # scalars (scale, sqrt2) stay float32: nothing to gain, and an epsilon could flush to zero
    assert types["scale"] == TensorProto.FLOAT
    assert out.records[0].initializer_bytes_after < 0.52 * out.records[0].initializer_bytes_before
    feeds = token_feeds()
    ref = ort_run(rounded_weights(model), feeds)
    got = ort_run(m, feeds)
    for r, g in zip(ref, got, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_any_target_converts_all_but_fragile_ops():
    model = tiny_transformer()
    m = run(model, fp16(target="any")).model
    assert_float32_io(model, m)
    assert_no_cast_pairs(m)
    types = elem_types(m)
    for n in m.graph.node:
        if n.op_type in ("LayerNormalization", "Softmax", "ReduceMean"):
            assert types[n.output[0]] == TensorProto.FLOAT, n.name
        elif n.op_type in ("MatMul", "Gemm", "Erf", "Gather"):
            assert types[n.output[0]] == F16, n.name
    # activation casts only at region boundaries: into and out of the 2 LayerNorms, Softmax and ReduceMean,
    # and one per graph output that is not one of those (the LayerNorm parameters stay float32: no casts)
    inits = {t.name for t in m.graph.initializer}
    assert sum(1 for n in by_op(m, "Cast") if n.input[0] not in inits) == 9
    assert ops(m)["Cast"] == 9
    assert all(types[x] == TensorProto.FLOAT for x in ("ln1_g", "ln1_b", "ln2_g", "ln2_b"))
    feeds = token_feeds()
    ref = ort_run(model, feeds)
    got = ReferenceEvaluator(m).run(None, feeds)  # ORT's CPU EP has no float16 MatMul
    for r, g in zip(ref, got, strict=True):
        assert g.dtype == np.float32
        np.testing.assert_allclose(g, r, rtol=0, atol=2e-2 * np.abs(r).max())


def test_overflowing_values_stay_float32_with_calibration():
    # y = (x * 1000) * 1000 reaches ~1e6 for |x| ~ 1: the second Mul must stay float32
    big = np.full(32, 1000, np.float32)
    model = make_model([node("Mul", ["x", "a"], ["m1"], name="m1"), node("Mul", ["m1", "a"], ["m2"], name="m2"),
                        node("Mul", ["m2", "b"], ["y"], name="m3")],
                       [vi("x", ["B", 32])], [vi("y", ["B", 32])], [init("a", big), init("b", np.full(32, 1e-6, np.float32))])
    x = rand(16, 32, seed=1)
    without = run(model, fp16(target="any")).model
    assert elem_types(without)["m2_fp16"] == F16  # blind conversion overflows
    with np.errstate(over="ignore", invalid="ignore"):
        assert not np.all(np.isfinite(ReferenceEvaluator(without).run(None, {"x": x})[0]))
    out = run(model, fp16(from_arrays({"x": x}, model), target="any"))
    m = out.model
    assert set(out.records[0].details["overflowing_tensors"]) == {"m2"}
    types = elem_types(m)
    assert types["m2"] == TensorProto.FLOAT and types["m1_fp16"] == F16
    assert_no_cast_pairs(m)
    got = ReferenceEvaluator(m).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ort_run(model, {"x": x})[0], rtol=5e-3, atol=1e-3)


def test_cnn_runs_on_ort_with_half_the_weights():
    w, b = rand(8, 3, 3, 3, seed=1), rand(8, seed=2)
    fc = rand(10, 8 * 6 * 6, seed=3)
    model = make_model([node("Conv", ["x", "w", "b"], ["c"], name="conv"), node("Relu", ["c"], ["r"]),
                        node("Flatten", ["r"], ["f"]), node("Gemm", ["f", "fc"], ["y"], transB=1, name="fc")],
                       [vi("x", ["N", 3, 8, 8])], [vi("y", ["N", 10])], [init("w", w), init("b", b), init("fc", fc)])
    out = run(model, fp16())
    assert ops(out.model) == {"Cast": 2, "Conv": 1, "Flatten": 1, "Gemm": 1, "Relu": 1}  # b has 8 values: float32
    x = rand(2, 3, 8, 8, seed=4)
    np.testing.assert_allclose(ort_run(out.model, {"x": x})[0], ort_run(rounded_weights(model), {"x": x})[0],
                               rtol=1e-5, atol=1e-5)


def test_idempotent_on_its_output():
    m = run(tiny_transformer(), fp16()).model
    again = run(m, fp16())
    assert again.records[0].modified is False
    assert again.records[0].details["nodes_fp16"] == 0 and again.records[0].details["constants_fp16"] == 0
    assert ops(again.model) == ops(m)


def test_preset():
    assert [p.type for p in load_preset("fp16").passes][-2:] == ["fp16", "shape-inference"]


@pytest.mark.real_model
def test_minilm_fp16_half_size_same_predictions():
    path = SHARED / "text" / "minilm_l6_sst2.onnx"
    if not path.exists():
        pytest.skip("../shared/models is absent")
    from onnxopt.model_io import load_model, to_proto

    model = to_proto(load_model(path))
    out = run(model, fp16())
    assert 0.49 < out.model.ByteSize() / path.stat().st_size < 0.51
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 8000, (4, 16)).astype(np.int64)
    ids[:, 0] = 101
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    which = [o.name for o in model.graph.output].index("logits")
    ref, got = ort_run(model, feeds)[which], ort_run(out.model, feeds)[which]
    np.testing.assert_allclose(got, ref, rtol=0, atol=5e-3)
