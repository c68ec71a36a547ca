from helpers import assert_idempotent, make_model, ops, run, vi
from onnx import helper
from onnxopt.passes.shape_inference import ShapeInference

node = helper.make_node


def shapes(model):
    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    return {v.name: dims(v) for v in model.graph.value_info}


def test_records_shapes_and_keeps_symbolic_dims():
    model = make_model([node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], strides=[2, 2]),
                        node("GlobalAveragePool", ["c"], ["g"]), node("Flatten", ["g"], ["y"])],
                       [vi("x", ["N", 3, 9, 9]), vi("w", [8, 3, 3, 3])], [vi("y", ["N", 8])])
    result = run(model, ShapeInference())
    rec = result.records[0]
    assert rec.modified and rec.details == {"value_info": 2, "added": 2}
    assert shapes(result.model) == {"c": ["N", 8, 4, 4], "g": ["N", 8, 1, 1]}
    assert ops(result.model) == ops(model)
    assert_idempotent(result.model, ShapeInference)


def test_nothing_to_add_is_not_a_modification():
    model = make_model([node("Relu", ["x"], ["y"])], [vi("x", ["N", 3])], [vi("y", ["N", 3])])
    result = run(model, ShapeInference())
    assert not result.records[0].modified and shapes(result.model) == {}


def test_filling_in_an_output_shape_is_a_modification():
    model = make_model([node("Relu", ["x"], ["y"])], [vi("x", ["N", 3])], [vi("y", None)])
    result = run(model, ShapeInference())
    assert result.records[0].modified
    assert [d.dim_param or d.dim_value for d in result.model.graph.output[0].type.tensor_type.shape.dim] == ["N", 3]
    assert_idempotent(result.model, ShapeInference)


def test_large_weights_are_not_read_but_small_shape_tensors_are():
    """Inference runs on a skeleton (big weights reduced to type + shape: no 2 GB limit), while a
    small constant shape still drives Reshape's output shape through data propagation."""
    import numpy as np
    from onnx import numpy_helper

    from onnxopt.checks import KEEP_VALUES_BYTES, skeleton

    big = np.ones((KEEP_VALUES_BYTES // 4 + 1, 4), np.float32)  # just above the threshold
    shape = np.array([-1, 2, 2], np.int64)
    model = make_model([node("MatMul", ["x", "w"], ["m"]), node("Reshape", ["m", "s"], ["y"])],
                       [vi("x", ["N", big.shape[0]])], [vi("y", None)],
                       [numpy_helper.from_array(big, "w"), numpy_helper.from_array(shape, "s")])
    sk = skeleton(model)
    assert "w" not in {t.name for t in sk.graph.initializer}  # the weight became a typed input, no data
    w = next(i for i in sk.graph.input if i.name == "w")
    assert [d.dim_value for d in w.type.tensor_type.shape.dim] == list(big.shape)
    assert next(t for t in sk.graph.initializer if t.name == "s").raw_data  # values kept
    result = run(model, ShapeInference())
    assert shapes(result.model)["m"] == ["N", 4]
    # -1 leaves the first dim unknown; the 2, 2 can only come from the kept values of "s"
    assert [d.dim_value for d in result.model.graph.output[0].type.tensor_type.shape.dim][1:] == [2, 2]
    out_w = next(t for t in result.model.graph.initializer if t.name == "w")
    np.testing.assert_array_equal(numpy_helper.to_array(out_w), big)  # the model keeps its weights


def test_values_inside_subgraph_bodies_get_their_shapes():
    """Inferred on the skeleton, written back onto the body values: the same value_info as onnx's inference of
    the whole model puts in the bodies, and that is a modification even when the main graph gains nothing (the
    protobuf version of the pass dropped body shapes in that case)."""
    import onnx
    from onnx import TensorProto

    then = helper.make_graph([node("Neg", ["x"], ["t0"]), node("Relu", ["t0"], ["t"])], "then", [],
                             [vi("t", ["N", 2])])
    other = helper.make_graph([node("Abs", ["x"], ["e0"]), node("Unsqueeze", ["e0", "axes"], ["e1"]),
                               node("Squeeze", ["e1", "axes"], ["e"])], "else", [], [vi("e", ["N", 2])])
    model = make_model([node("If", ["cond"], ["y"], then_branch=then, else_branch=other)],
                       [vi("cond", [], TensorProto.BOOL), vi("x", ["N", 2]), vi("axes", [1], TensorProto.INT64)],
                       [vi("y", ["N", 2])])
    result = run(model, ShapeInference())
    assert result.records[0].modified and result.records[0].details == {"value_info": 0, "added": 0}
    reference = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)

    def bodies(m):
        return {a.name: {v.name: v.SerializeToString() for v in a.g.value_info} for a in m.graph.node[0].attribute}

    assert bodies(result.model) == bodies(reference)
    assert set(bodies(result.model)["then_branch"]) == {"t0"}
    assert set(bodies(result.model)["else_branch"]) == {"e0", "e1"}
    assert_idempotent(result.model, ShapeInference)
