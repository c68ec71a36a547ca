import numpy as np
import pytest
from helpers import I64, F, assert_idempotent, assert_same, init, make_model, ops, rand, run, vi
from onnx import TensorProto, helper, numpy_helper
from onnxopt.passes.constant_folding import ConstantFolding

from onnxopt.recipe import load_recipe

node = helper.make_node


def const(name, array):
    return node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(array)))


def fold(model, **options):
    result = run(model, ConstantFolding(ConstantFolding.Config(**options)))
    assert_idempotent(result.model, lambda: ConstantFolding(ConstantFolding.Config(**options)))
    return result.model, result.records[0]


def initializer_value(model, name):
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def test_folds_constant_arithmetic_exactly_like_ort():
    model = make_model(
        [const("a", rand(4, 5, seed=1)), const("b", np.abs(rand(4, 5, seed=2)) + 0.5),
         node("Div", ["a", "b"], ["q"]), node("Exp", ["q"], ["e"]), node("Sqrt", ["b"], ["r"]),
         node("Mul", ["e", "r"], ["w"]), node("Add", ["x", "w"], ["y"])],
        [vi("x", [4, 5])], [vi("y", [4, 5])])
    out, rec = fold(model)
    assert ops(out) == {"Add": 1}
    assert rec.details == {"constants": 2, "folded": 4, "shape_folded": 0, "reshapes": 0, "removed": 2}
    assert {t.name for t in out.graph.initializer} == {"w"}
    assert_same(model, out, exact=True)


def test_constant_feeding_graph_output_becomes_initializer_with_same_name():
    model = make_model(
        [const("c", np.arange(3, dtype=np.float32)), node("Add", ["c", "c"], ["twice"]),
         node("Relu", ["x"], ["y"])],
        [vi("x", [3])], [vi("y", [3]), vi("c", [3]), vi("twice", [3])])
    out, rec = fold(model)
    assert ops(out) == {"Relu": 1}
    assert [o.name for o in out.graph.output] == ["y", "c", "twice"]
    np.testing.assert_array_equal(initializer_value(out, "twice"), [0, 2, 4])
    assert_same(model, out, exact=True)


def test_initializer_that_is_also_a_graph_input_is_not_constant():
    w = init("w", rand(3, seed=3))
    model = make_model([const("k", np.full(3, 2.0, np.float32)), node("Mul", ["w", "k"], ["y"])],
                       [vi("w", [3])], [vi("y", [3])], [w])
    out, rec = fold(model)
    assert ops(out) == {"Mul": 1}
    assert rec.details["folded"] == 0
    override = {"w": rand(3, seed=4)}
    assert_same(model, out, feeds=override, exact=True)
    assert_same(model, out, feeds={}, exact=True)


def test_empty_optional_inputs_and_multiple_outputs():
    model = make_model(
        [const("c", rand(6, seed=5)), const("hi", np.float32(0.5)),
         node("Clip", ["c", "", "hi"], ["clipped"]),
         const("sizes", np.array([2, 4], np.int64)),
         node("Split", ["clipped", "sizes"], ["s0", "s1"]),
         node("Mul", ["x", "s1"], ["y"])],
        [vi("x", [4])], [vi("y", [4])])
    out, _ = fold(model)
    assert ops(out) == {"Mul": 1}
    assert {t.name for t in out.graph.initializer} == {"s1"}  # s0 is not read by anything
    assert_same(model, out, exact=True)


def test_static_shape_chain_folds_completely():
    model = make_model(
        [node("Shape", ["x"], ["s"]), const("i0", np.array(0, np.int64)),
         node("Gather", ["s", "i0"], ["n"]), const("ax", np.array([0], np.int64)),
         node("Unsqueeze", ["n", "ax"], ["n1"]), const("m1", np.array([-1], np.int64)),
         node("Concat", ["n1", "m1"], ["shape"], axis=0), node("Reshape", ["x", "shape"], ["y"])],
        [vi("x", [2, 3, 4])], [vi("y", [2, 12])])
    out, rec = fold(model)
    assert ops(out) == {"Reshape": 1}
    assert rec.details["shape_folded"] == 4  # Shape, Gather, Unsqueeze, Concat: all known ints
    reshape = out.graph.node[0]
    np.testing.assert_array_equal(initializer_value(out, reshape.input[1]), [2, -1])
    assert_same(model, out, exact=True)


def lite0_head(allowzero=0):
    """EfficientNet-Lite0's head: Reshape(GAP(x), Concat(Unsqueeze(Gather(Shape(x), 0)), [-1]))."""
    return make_model(
        [node("Shape", ["x"], ["s"]), const("i0", np.array(0, np.int64)),
         node("Gather", ["s", "i0"], ["n"], axis=0), const("ax", np.array([0], np.int64)),
         node("Unsqueeze", ["n", "ax"], ["n1"]), const("m1", np.array([-1], np.int64)),
         node("Concat", ["n1", "m1"], ["shape"], axis=0), node("GlobalAveragePool", ["x"], ["gap"]),
         node("Reshape", ["gap", "shape"], ["y"], allowzero=allowzero)],
        [vi("x", ["N", 8, 5, 5])], [vi("y", ["N", 8])])


def test_dynamic_batch_reshape_target_becomes_zero_minus_one():
    model = lite0_head()
    out, rec = fold(model)
    assert ops(out) == {"GlobalAveragePool": 1, "Reshape": 1}
    assert rec.details["reshapes"] == 1
    reshape = next(n for n in out.graph.node if n.op_type == "Reshape")
    np.testing.assert_array_equal(initializer_value(out, reshape.input[1]), [0, -1])
    assert out.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    for batch in (1, 5):
        assert_same(model, out, dims={"N": batch}, exact=True)


def test_allowzero_reshape_keeps_its_shape_chain():
    model = lite0_head(allowzero=1)
    out, rec = fold(model)
    assert rec.details["reshapes"] == 0
    assert ops(out)["Shape"] == 1 and ops(out)["Concat"] == 1
    assert_same(model, out, dims={"N": 3}, exact=True)


def test_shape_arithmetic_with_slices_and_products():
    # Reshape(x[N, 4, 6], [Shape(x)[0:1], Shape(x)[1] * Shape(x)[2]]) -> [0, 24]
    model = make_model(
        [node("Shape", ["x"], ["s"]), node("Shape", ["x"], ["tail"], start=1),
         const("st", np.array([0], np.int64)), const("en", np.array([1], np.int64)),
         node("Slice", ["s", "st", "en"], ["n"]),
         const("i0", np.array([0], np.int64)), const("i1", np.array([1], np.int64)),
         node("Gather", ["tail", "i0"], ["a"]), node("Gather", ["tail", "i1"], ["b"]),
         node("Mul", ["a", "b"], ["ab"]), node("Concat", ["n", "ab"], ["shape"], axis=0),
         node("Reshape", ["x", "shape"], ["y"])],
        [vi("x", ["N", 4, 6])], [vi("y", ["N", 24])])
    out, _ = fold(model)
    assert ops(out) == {"Reshape": 1}
    np.testing.assert_array_equal(initializer_value(out, out.graph.node[0].input[1]), [0, 24])
    assert_same(model, out, dims={"N": 3}, exact=True)


def test_single_opaque_unknown_becomes_minus_one():
    # [2, N * 6 / 2]: the second element is unknown and not a dim of the data -> -1.
    model = make_model(
        [node("Shape", ["x"], ["s"], end=1), const("six", np.array([6], np.int64)),
         const("two", np.array([2], np.int64)), node("Mul", ["s", "six"], ["n6"]),
         node("Div", ["n6", "two"], ["half"]), node("Concat", ["two", "half"], ["shape"], axis=0),
         node("Reshape", ["x", "shape"], ["y"])],
        [vi("x", ["N", 6])], [vi("y", [2, "M"])])
    out, _ = fold(model)
    assert ops(out) == {"Reshape": 1}
    np.testing.assert_array_equal(initializer_value(out, out.graph.node[0].input[1]), [2, -1])
    assert_same(model, out, dims={"N": 4}, exact=True)


def test_two_unknowns_are_left_alone():
    # x[N, M] reshaped to [M, N]: neither element is the data's own dim at that position.
    model = make_model(
        [node("Shape", ["x"], ["s"]), const("perm", np.array([1, 0], np.int64)),
         node("Gather", ["s", "perm"], ["shape"]), node("Reshape", ["x", "shape"], ["y"])],
        [vi("x", ["N", "M"])], [vi("y", ["M", "N"])])
    out, rec = fold(model)
    assert rec.details["reshapes"] == 0 and ops(out)["Shape"] == 1
    assert_same(model, out, dims={"N": 2, "M": 3}, exact=True)


def test_nondeterministic_subgraph_and_foreign_domain_nodes_are_not_folded():
    then = helper.make_graph([node("Identity", ["c"], ["t"])], "then", [], [vi("t", [2])])
    other = helper.make_graph([node("Neg", ["c"], ["e"])], "else", [], [vi("e", [2])])
    model = make_model(
        [const("c", np.ones(2, np.float32)), const("cond", np.array(True)),
         node("RandomUniformLike", ["c"], ["r"], seed=1.0), node("If", ["cond"], ["branch"], then_branch=then,
                                                                else_branch=other),
         node("Foo", ["c"], ["foo"], domain="my.domain"), node("Add", ["r", "branch"], ["y"])],
        [], [vi("y", [2]), vi("foo", [2])], extra_opsets={"my.domain": 1})
    out, rec = fold(model)
    assert ops(out) == {"Add": 1, "If": 1, "RandomUniformLike": 1, "my.domain.Foo": 1}
    assert rec.details["constants"] == 2 and rec.details["folded"] == 0


def test_big_outputs_only_fold_when_they_replace_as_many_bytes():
    big = rand(64, 64, seed=6)  # 16 KiB
    model = make_model(
        [const("shape", np.array([64, 64], np.int64)), node("ConstantOfShape", ["shape"], ["ones"],
                                                           value=numpy_helper.from_array(np.ones(1, np.float32))),
         node("Add", ["x", "ones"], ["a"]),
         node("Transpose", ["w"], ["wt"]), node("MatMul", ["a", "wt"], ["b"]),
         node("Transpose", ["shared"], ["st"]), node("MatMul", ["b", "st"], ["c"]),
         node("MatMul", ["c", "shared"], ["y"])],
        [vi("x", [64, 64])], [vi("y", [64, 64])], [init("w", big), init("shared", rand(64, 64, seed=7))])
    out, _ = fold(model, max_output_bytes=1024)
    # the ones tensor and the transpose of a weight still read elsewhere would add 16 KiB each
    assert ops(out) == {"Add": 1, "ConstantOfShape": 1, "MatMul": 3, "Transpose": 1}
    assert "w" not in {t.name for t in out.graph.initializer}  # its transpose replaced it
    assert_same(model, out, exact=True)
    unlimited, _ = fold(model)
    assert ops(unlimited) == {"Add": 1, "MatMul": 3}


def test_cleanup_preset_on_awkward_model():
    """Constant feeding a graph output, empty optional inputs, an overridable initializer, dead code,
    a model-local function; the model's own metadata must come through untouched."""
    twice = helper.make_function("local", "Twice", ["a"], ["b"], [node("Add", ["a", "a"], ["b"])],
                                 [helper.make_opsetid("", 17)])
    model = make_model(
        [const("c", np.arange(4, dtype=np.float32)), const("hi", np.float32(2.0)),
         node("Identity", ["x"], ["xi"]), node("Clip", ["xi", "", "hi"], ["clipped"]),
         node("Mul", ["clipped", "scale"], ["m"]), node("Cast", ["m"], ["cast"], to=F),
         node("Twice", ["cast"], ["y"], domain="local"),
         node("Shape", ["x"], ["unused_shape"]), node("Neg", ["c"], ["unused_neg"])],
        [vi("x", ["N", 4]), vi("scale", [4])], [vi("y", ["N", 4]), vi("c", [4])],
        [init("scale", np.full(4, 3.0, np.float32)), init("dead", np.zeros(8, np.float32))],
        extra_opsets={"local": 1, "ai.onnx.ml": 3})
    model.functions.append(twice)
    model.producer_name, model.producer_version, model.doc_string = "me", "1.2", "model doc"
    model.graph.doc_string = "graph doc"
    helper.set_model_props(model, {"author": "someone"})
    passes = load_recipe("cleanup").build_passes
    result = run(model, *passes())
    out = result.model
    assert ops(out) == {"Clip": 1, "Mul": 1, "local.Twice": 1}
    assert {t.name for t in out.graph.initializer} == {"c", "hi", "scale"}
    assert [i.name for i in out.graph.input] == ["x", "scale"]
    assert [(o.domain, o.version) for o in out.opset_import] == [("", 17), ("local", 1)]
    assert (out.ir_version, out.producer_name, out.producer_version, out.doc_string, out.graph.doc_string) == (
        model.ir_version, "me", "1.2", "model doc", "graph doc")
    assert {p.key: p.value for p in out.metadata_props} == {"author": "someone"}
    assert [f.name for f in out.functions] == ["Twice"]
    for feeds in ({"x": rand(3, 4)}, {"x": rand(3, 4), "scale": rand(4, seed=9)}):
        assert_same(model, out, feeds=feeds, exact=True)
    again = run(out, *passes())
    assert not again.modified, [(r.name, r.details) for r in again.records if r.modified]


def test_constant_attribute_forms():
    model = make_model(
        [node("Constant", [], ["f"], value_float=1.5), node("Constant", [], ["fs"], value_floats=[1.0, 2.0]),
         node("Constant", [], ["i"], value_int=7), node("Constant", [], ["is"], value_ints=[3, 4]),
         node("Constant", [], ["s"], value_strings=["a", "bc"])],
        [], [vi("f", []), vi("fs", [2]), vi("i", [], I64), vi("is", [2], I64), vi("s", [2], TensorProto.STRING)])
    out, rec = fold(model)
    assert ops(out) == {} and rec.details["constants"] == 5
    assert_same(model, out, feeds={}, exact=True)


@pytest.mark.parametrize("dtype", [np.float16, np.int32])
def test_folded_values_keep_their_element_type(dtype):
    model = make_model(
        [const("a", np.arange(6).astype(dtype)), const("b", np.full(6, 3).astype(dtype)),
         node("Mul", ["a", "b"], ["ab"]), node("Add", ["x", "ab"], ["y"])],
        [vi("x", [6], helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))],
        [vi("y", [6], helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))])
    out, _ = fold(model)
    assert ops(out) == {"Add": 1}
    assert initializer_value(out, "ab").dtype == dtype
    assert_same(model, out, exact=True)


def test_int64_shape_values_fold_from_initializers():
    model = make_model([node("Shape", ["x"], ["s"]), node("Add", ["s", "one"], ["y"])],
                       [vi("x", [2, 3])], [vi("y", [2], I64)], [init("one", np.ones(2, np.int64))])
    out, _ = fold(model)
    assert ops(out) == {}
    np.testing.assert_array_equal(initializer_value(out, "y"), [3, 4])
    assert_same(model, out, feeds={"x": rand(2, 3)}, exact=True)


def test_cleanup_preset_reads_no_weight_of_a_multi_gb_model(tmp_path, monkeypatch):
    """MatMul -> Relu -> MatMul -> Add blocks with 2.4 GB of external weights (a sparse file: no disk, no RAM)
    and some foldable small things around them: the whole cleanup preset folds those and never reads a weight
    (the lazy tensors stay unloaded), not even one with a constant consumer too large to fold."""
    import onnx_ir as ir

    from onnxopt.model_io import load_model
    from onnxopt.pass_infra import PassManager

    d, blocks = 6144, 8
    data = tmp_path / "m.onnx.data"
    offset, inits, nodes, x = 0, [], [node("Identity", ["x"], ["x0"])], "x0"

    def external(name, shape):
        nonlocal offset
        t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=shape, data_location=TensorProto.EXTERNAL)
        length = 4 * int(np.prod(shape))
        for key, value in (("location", data.name), ("offset", str(offset)), ("length", str(length))):
            t.external_data.add(key=key, value=value)
        offset += length
        inits.append(t)

    for i in range(blocks):
        external(f"b{i}.w1", [d, d]), external(f"b{i}.w2", [d, d]), external(f"b{i}.bias", [d])
        nodes += [node("MatMul", [x, f"b{i}.w1"], [f"b{i}.h"]), node("Relu", [f"b{i}.h"], [f"b{i}.r"]),
                  node("MatMul", [f"b{i}.r", f"b{i}.w2"], [f"b{i}.m"]),
                  node("Add", [f"b{i}.m", f"b{i}.bias"], [f"b{i}.y"])]
        x = f"b{i}.y"
    nodes += [node("Shape", [x], ["s"]), const("zero", np.array([0], np.int64)), node("Gather", ["s", "zero"], ["n"]),
              const("rest", np.array([-1], np.int64)), node("Concat", ["n", "rest"], ["target"], axis=0),
              node("Reshape", [x, "target"], ["flat"]),
              const("c1", np.full(d, 0.5, np.float32)),
              node("Mul", ["c1", "c2"], ["scale"]), node("Mul", ["flat", "scale"], ["scaled"]),
              # constant inputs, but folding would add 151 MB and free nothing (b0.w1 is read elsewhere)
              const("half", np.float32(0.5)), node("Mul", ["b0.w1", "half"], ["w_half"]),
              node("MatMul", ["x0", "w_half"], ["side"]), node("Add", ["scaled", "side"], ["y"])]
    inits.append(init("c2", np.full(d, 3.0, np.float32)))  # small and embedded
    model = make_model(nodes, [vi("x", ["N", d])], [vi("y", ["N", d])], inits)
    with open(data, "wb") as f:
        f.truncate(offset)  # sparse: reads would see zeros
    assert offset > 2**31
    (tmp_path / "m.onnx").write_bytes(model.SerializeToString())

    reads = []
    real_load = ir.ExternalTensor._load

    def spy(self):
        reads.append(self.name)
        return real_load(self)

    monkeypatch.setattr(ir.ExternalTensor, "_load", spy)
    lazy = load_model(tmp_path / "m.onnx")
    result = PassManager(load_recipe("cleanup").build_passes(), strict=True).run(lazy)
    out = result.model
    assert reads == []
    details = {r.name: r.details for r in result.records}
    assert details["remove-identity"]["identity"] == 1
    assert details["constant-folding"]["constants"] == 4
    assert details["constant-folding"]["folded"] == 1 and details["constant-folding"]["reshapes"] == 1
    assert ops_of(out.graph) == {"MatMul": 2 * blocks + 1, "Relu": blocks, "Add": blocks + 1, "Reshape": 1, "Mul": 2}
    big = {n: v for n, v in out.graph.initializers.items() if n.startswith("b")}
    assert len(big) == 3 * blocks and all(isinstance(v.const_value, ir.ExternalTensor) for v in big.values())
    target = next(n for n in out.graph if n.op_type == "Reshape").inputs[1].const_value.numpy()
    assert target.tolist() == [0, -1]
    np.testing.assert_array_equal(out.graph.initializers["scale"].const_value.numpy(), np.full(d, 1.5, np.float32))
    assert reads == []
    out.graph.initializers["b0.bias"].const_value.numpy()  # the spy does see a read
    assert reads == ["b0.bias"]


def ops_of(graph):
    from collections import Counter

    return dict(Counter(n.op_type for n in graph))
