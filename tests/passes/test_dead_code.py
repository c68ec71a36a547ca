import numpy as np
from helpers import I64, assert_idempotent, assert_same, init, make_model, ops, run, vi
from onnx import TensorProto, helper
from onnxopt.passes.dead_code import DeadCodeElimination

node = helper.make_node


def eliminate(model):
    result = run(model, DeadCodeElimination())
    assert_idempotent(result.model, DeadCodeElimination)
    return result.model, result.records[0]


def test_removes_dead_nodes_initializers_value_info_and_opsets():
    model = make_model(
        [node("Relu", ["x"], ["y"]), node("Mul", ["x", "w"], ["dead1"]), node("Neg", ["dead1"], ["dead2"]),
         node("Binarizer", ["dead2"], ["dead3"], domain="ai.onnx.ml")],
        [vi("x", [3]), vi("unused_input", [3])], [vi("y", [3])],
        [init("w", np.ones(3, np.float32)), init("orphan", np.zeros(2, np.float32)),
         init("unused_input", np.zeros(3, np.float32))],
        value_info=[vi("dead1", [3]), vi("y", [3]), vi("never_existed", [1])],
        extra_opsets={"my.domain": 1, "ai.onnx.ml": 3})
    out, rec = eliminate(model)
    # value_info naming no value ("never_existed") is not even read into the IR; dead1's goes with its node
    assert rec.details == {"nodes": 3, "initializers": 2, "value_info": 1, "opsets": 2}
    assert ops(out) == {"Relu": 1}
    # an initializer that is also a graph input is an overridable input: kept, like all inputs
    assert [t.name for t in out.graph.initializer] == ["unused_input"]
    assert [i.name for i in out.graph.input] == ["x", "unused_input"]
    assert [v.name for v in out.graph.value_info] == []  # y's type is on the graph output itself
    assert [op.domain for op in out.opset_import] == [""]  # my.domain unused; ai.onnx.ml only by dead code
    assert_same(model, out, feeds={"x": np.arange(3, dtype=np.float32)}, exact=True)


def test_values_captured_by_subgraphs_are_uses():
    then = helper.make_graph([node("Neg", ["captured"], ["t"]), node("Abs", ["inner_dead_src"], ["inner_dead"])],
                             "then", [], [vi("t", [2])])
    other = helper.make_graph([node("Identity", ["x"], ["e"])], "else", [], [vi("e", [2])])
    model = make_model(
        [node("Relu", ["x"], ["captured"]), node("Sigmoid", ["x"], ["inner_dead_src"]),
         node("If", ["cond"], ["y"], then_branch=then, else_branch=other)],
        [vi("cond", [], TensorProto.BOOL), vi("x", [2])], [vi("y", [2])])
    out, rec = eliminate(model)
    # the dead Abs inside the branch goes first, and with it the only use of the Sigmoid
    assert rec.details["nodes"] == 2
    assert ops(out) == {"If": 1, "Relu": 1}
    for cond in (True, False):
        assert_same(model, out, feeds={"cond": np.array(cond), "x": np.array([1.0, -2.0], np.float32)}, exact=True)


def test_multi_output_node_with_one_live_output_stays():
    model = make_model([node("Split", ["x"], ["a", "b"], axis=0, num_outputs=2), node("Relu", ["a"], ["y"])],
                       [vi("x", [4])], [vi("y", [2])], opset=18)
    out, rec = eliminate(model)
    assert not rec.modified and ops(out) == {"Relu": 1, "Split": 1}


def test_clean_graph_is_not_modified_and_used_custom_domain_stays():
    model = make_model([node("Shape", ["x"], ["s"]), node("Foo", ["s"], ["y"], domain="my.domain")],
                       [vi("x", [2, 3])], [vi("y", [2], I64)], extra_opsets={"my.domain": 1})
    out, rec = eliminate(model)
    assert not rec.modified
    assert [op.domain for op in out.opset_import] == ["", "my.domain"]


def test_unread_initializers_go_but_overridable_inputs_stay():
    import onnx_ir as ir

    from onnxopt.graph import drop_unused_initializers

    model = make_model([node("Add", ["x", "w"], ["y"])], [vi("x", [1]), vi("opt", [1])], [vi("y", [1])],
                       [init("w", np.ones(1, np.float32)), init("w2", np.ones(1, np.float32)),
                        init("opt", np.ones(1, np.float32))])
    m = ir.serde.deserialize_model(model)
    g = m.graph
    g.node(0).replace_input_with(1, g.initializers["w2"])
    assert drop_unused_initializers(g) == 1
    assert list(g.initializers) == ["w2", "opt"]
