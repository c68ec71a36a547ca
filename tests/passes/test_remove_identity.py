import numpy as np
from helpers import F, assert_idempotent, assert_same, init, make_model, ops, run, vi
from onnx import TensorProto, helper
from onnxopt.passes.remove_identity import RemoveIdentity

node = helper.make_node


def clean(model):
    result = run(model, RemoveIdentity())
    assert_idempotent(result.model, RemoveIdentity)
    return result.model, result.records[0]


def test_identity_chain_inside_the_graph():
    model = make_model([node("Relu", ["x"], ["a"]), node("Identity", ["a"], ["b"]), node("Identity", ["b"], ["c"]),
                        node("Add", ["c", "b"], ["y"])],
                       [vi("x", ["N", 3])], [vi("y", ["N", 3])])
    out, rec = clean(model)
    assert rec.details == {"identity": 2, "dropout": 0, "cast": 0, "kept": 0}
    assert ops(out) == {"Add": 1, "Relu": 1}
    assert list(out.graph.node[1].input) == ["a", "a"]
    assert_same(model, out, exact=True)


def test_identity_writing_a_graph_output_lets_the_producer_write_it():
    model = make_model([node("Relu", ["x"], ["a"]), node("Identity", ["a"], ["y"])],
                       [vi("x", [2, 3])], [vi("y", [2, 3])])
    out, rec = clean(model)
    assert ops(out) == {"Relu": 1} and list(out.graph.node[0].output) == ["y"]
    assert_same(model, out, exact=True)


def test_interface_identities_are_kept():
    model = make_model([node("Identity", ["x"], ["y"]),  # graph input -> graph output
                        node("Relu", ["x"], ["r"]), node("Identity", ["r"], ["r2"]),  # output -> output
                        node("Identity", ["r"], ["r3"])],  # a second Identity reading r too
                       [vi("x", [2])], [vi("y", [2]), vi("r", [2]), vi("r2", [2]), vi("r3", [2])])
    out, rec = clean(model)
    assert not rec.modified and rec.details["kept"] == 3
    assert ops(out) == {"Identity": 3, "Relu": 1}
    assert_same(model, out, exact=True)


def test_inference_dropouts_go_and_training_ones_stay():
    model = make_model(
        [node("Dropout", ["x"], ["d1"]),  # no mask, no training_mode
         node("Dropout", ["d1", "ratio", "off"], ["d2", "unused_mask"]),  # training_mode constant False
         node("Dropout", ["d2", "none", "on"], ["d3"]),  # training_mode True: stays (ratio 0 to compare)
         node("Dropout", ["d3"], ["d4", "mask"]),  # mask is read: stays
         node("Cast", ["mask"], ["m"], to=F), node("Add", ["d4", "m"], ["y"])],
        [vi("x", [4, 4])], [vi("y", [4, 4])],
        [init("ratio", np.array(0.5, np.float32)), init("none", np.array(0.0, np.float32)),
         init("off", np.array(False)), init("on", np.array(True))])
    out, rec = clean(model)
    assert rec.details["dropout"] == 2 and ops(out)["Dropout"] == 2
    assert "off" not in {t.name for t in out.graph.initializer}
    kept = [n for n in out.graph.node if n.op_type == "Dropout"]
    assert kept[0].input[0] == "x"
    assert_same(model, out, exact=True)


def test_same_type_casts_go():
    model = make_model([node("Cast", ["x"], ["a"], to=F), node("Cast", ["a"], ["b"], to=TensorProto.FLOAT16),
                        node("CastLike", ["b", "like"], ["c"]), node("Cast", ["c"], ["y"], to=TensorProto.FLOAT16)],
                       [vi("x", [3]), vi("like", [1], TensorProto.FLOAT16)], [vi("y", [3], TensorProto.FLOAT16)])
    out, rec = clean(model)
    assert rec.details == {"identity": 0, "dropout": 0, "cast": 3, "kept": 0}
    assert ops(out) == {"Cast": 1}
    assert list(out.graph.node[0].input) == ["x"] and list(out.graph.node[0].output) == ["y"]
    assert_same(model, out, exact=True)


def test_identity_in_a_branch_body():
    then = helper.make_graph([node("Identity", ["x"], ["t0"]), node("Neg", ["t0"], ["t"])], "then", [],
                             [vi("t", [2])])
    other = helper.make_graph([node("Identity", ["x"], ["e"])], "else", [], [vi("e", [2])])
    model = make_model([node("If", ["cond"], ["y"], then_branch=then, else_branch=other)],
                       [vi("cond", [], TensorProto.BOOL), vi("x", [2])], [vi("y", [2])])
    out, rec = clean(model)
    assert rec.details["identity"] == 1 and rec.details["kept"] == 1  # else's is its output: kept
    body = next(a.g for a in out.graph.node[0].attribute if a.name == "then_branch")
    assert [n.op_type for n in body.node] == ["Neg"] and list(body.node[0].input) == ["x"]
    for cond in (True, False):
        feeds = {"cond": np.array(cond), "x": np.array([1.0, -2.0], np.float32)}
        assert_same(model, out, feeds=feeds, exact=True)


def test_bypass_keeps_references_to_other_nodes_live():
    import onnx_ir as ir

    from onnxopt.graph import bypass

    model = make_model([node("Relu", ["x"], ["a"]), node("Identity", ["a"], ["b"]), node("Neg", ["b"], ["y"])],
                       [vi("x", [2])], [vi("y", [2])])
    m = ir.serde.deserialize_model(model)
    relu, identity, neg = list(m.graph)
    assert bypass(identity, relu.outputs[0])
    neg.name = "renamed"  # a reference taken before the removal still edits the graph
    assert [n.name or "" for n in m.graph] == ["", "renamed"]
    assert neg.inputs[0] is relu.outputs[0] and relu.outputs[0].name == "a"
