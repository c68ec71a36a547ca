import numpy as np
import pytest
from helpers import assert_idempotent, assert_same, make_model, ort_run, run, vi
from onnx import TensorProto, helper
from onnxopt.passes.topo_sort import TopologicalSort

from onnxopt.errors import PassError

node = helper.make_node


def order(model):
    return [n.output[0] for n in model.graph.node]


def test_reversed_graph_is_sorted():
    nodes = [node("Relu", ["x"], ["a"]), node("Neg", ["a"], ["b"]), node("Add", ["a", "b"], ["c"]),
             node("Mul", ["c", "x"], ["y"])]
    model = make_model(nodes[::-1], [vi("x", [3])], [vi("y", [3])])
    result = run(model, TopologicalSort())
    assert result.records[0].modified and order(result.model) == ["a", "b", "c", "y"]
    assert_idempotent(result.model, TopologicalSort)
    assert_same(make_model(nodes, [vi("x", [3])], [vi("y", [3])]), result.model, exact=True)


def test_sorted_graph_keeps_its_order():
    # two valid orders exist; the given one is kept
    model = make_model([node("Neg", ["x"], ["b"]), node("Relu", ["x"], ["a"]), node("Add", ["a", "b"], ["y"])],
                       [vi("x", [3])], [vi("y", [3])])
    result = run(model, TopologicalSort())
    assert not result.records[0].modified and order(result.model) == ["b", "a", "y"]


def test_value_captured_by_a_subgraph_is_a_dependency():
    then = helper.make_graph([node("Neg", ["captured"], ["t"])], "then", [], [vi("t", [2])])
    other = helper.make_graph([node("Abs", ["captured"], ["e"])], "else", [], [vi("e", [2])])
    model = make_model([node("If", ["cond"], ["y"], then_branch=then, else_branch=other),
                        node("Relu", ["x"], ["captured"])],
                       [vi("cond", [], TensorProto.BOOL), vi("x", [2])], [vi("y", [2])])
    result = run(model, TopologicalSort())
    assert order(result.model) == ["captured", "y"]
    feeds = {"cond": np.array(False), "x": np.array([1.0, -2.0], np.float32)}
    np.testing.assert_array_equal(
        ort_run(result.model, feeds)[0], np.array([1.0, 0.0], np.float32))


def test_cycle_is_reported_with_the_pass_name():
    model = make_model([node("Relu", ["b"], ["a"]), node("Neg", ["a"], ["b"]), node("Add", ["a", "x"], ["y"])],
                       [vi("x", [3])], [vi("y", [3])])
    with pytest.raises(PassError, match="topological-sort.*cycle"):
        run(model, TopologicalSort())
