from typing import Literal

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.errors import PassError, PreconditionError
from onnxopt.pass_infra import Pass, PassConfig, PassContext, PassManager, PassResult, ProtoPass


def _model() -> onnx.ModelProto:
    nodes = [helper.make_node("Identity", ["x"], ["a"]), helper.make_node("Relu", ["a"], ["y"])]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(np.ones(6, np.float32), "unused")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


class _NoopConfig(PassConfig):
    type: Literal["noop"] = "noop"


class Noop(Pass):
    name = "noop"
    Config = _NoopConfig

    def call(self, model):
        return PassResult(model, False)


class _DropConfig(PassConfig):
    type: Literal["drop-initializers"] = "drop-initializers"


class DropInitializers(Pass):
    name = "drop-initializers"
    Config = _DropConfig

    def call(self, model):
        n = len(model.graph.initializers)
        model.graph.initializers.clear()
        return PassResult(model, n > 0, {"removed": n})


class _BreakConfig(PassConfig):
    type: Literal["break-graph"] = "break-graph"


class BreakGraph(Pass):
    """Leaves a dangling input behind: the manager's checker must catch it."""

    name = "break-graph"
    Config = _BreakConfig

    def call(self, model):
        model.graph.node(1).replace_input_with(0, ir.Value(name="nowhere"))
        return PassResult(model, True)


class _CrashConfig(PassConfig):
    type: Literal["crash"] = "crash"


class Crash(Pass):
    name = "crash"
    Config = _CrashConfig

    def call(self, model):
        raise ZeroDivisionError("boom")


class _NeedsConfig(PassConfig):
    type: Literal["needs-calib"] = "needs-calib"


class NeedsCalib(Pass):
    name = "needs-calib"
    Config = _NeedsConfig
    needs = frozenset({"calibration"})

    def call(self, model):
        return PassResult(model, False)


def test_records_what_each_pass_changed():
    model = _model()
    original = model.SerializeToString()
    result = PassManager([Noop(), DropInitializers()]).run(model)
    assert model.SerializeToString() == original  # the input model is never modified
    noop, drop = result.records
    assert (noop.name, noop.modified, drop.name, drop.modified) == ("noop", False, "drop-initializers", True)
    assert drop.initializer_bytes_before == 24 and drop.initializer_bytes_after == 0
    assert drop.ops_before == drop.ops_after == {"Identity": 1, "Relu": 1}
    assert drop.nodes_before == drop.nodes_after == 2
    assert drop.details == {"removed": 1}
    assert drop.seconds >= 0 and result.modified
    assert len(result.model.graph.initializer) == 0


def test_invalid_model_after_a_pass_names_the_pass_and_history():
    with pytest.raises(PassError) as info:
        PassManager([Noop(), DropInitializers(), BreakGraph()]).run(_model())
    msg = str(info.value)
    assert "pass 'break-graph' (step 3, after noop, drop-initializers)" in msg
    assert "nowhere" in msg
    assert info.value.pass_name == "break-graph"
    assert info.value.ran_before == ["noop", "drop-initializers"]


def test_crash_in_a_pass_is_named():
    with pytest.raises(PassError, match=r"pass 'crash' \(step 1, after nothing\) failed: ZeroDivisionError: boom"):
        PassManager([Crash()]).run(_model())


def test_missing_calibration_is_a_clear_precondition_error():
    with pytest.raises(PassError, match="needs calibration data"):
        PassManager([NeedsCalib()]).run(_model())
    with pytest.raises(PreconditionError):
        NeedsCalib()(_model())
    assert NeedsCalib(context=PassContext(calibration=object()))(_model()).modified is False


def test_check_can_be_disabled():
    result = PassManager([BreakGraph()], check=False).run(_model())
    assert result.model.graph.node[1].input[0] == "nowhere"


def test_config_type_must_match_pass():
    with pytest.raises(ValueError, match="given to pass"):
        Noop(_DropConfig())


class _ReaderConfig(PassConfig):
    type: Literal["reader"] = "reader"


class Reader(Pass):
    """Consumes the result of an earlier pass through the run's context, not a global."""

    name = "reader"
    Config = _ReaderConfig

    def call(self, model):
        earlier = self.context.latest(PassResult)
        return PassResult(model, False, {"saw": earlier.details if earlier else None})


def test_later_passes_see_earlier_results_of_the_same_run_only():
    manager = PassManager([DropInitializers(), Reader()])
    first = manager.run(_model())
    assert first.records[1].details == {"saw": {"removed": 1}}
    alone = PassManager([Reader()]).run(_model())
    assert alone.records[0].details == {"saw": None}


class _AddBadNodeConfig(PassConfig):
    type: Literal["add-bad-node"] = "add-bad-node"


class AddBadNode(Pass):
    """Adds a Relu with two inputs: only the schema check of the nodes a pass added can see it."""

    name = "add-bad-node"
    Config = _AddBadNodeConfig

    def call(self, model):
        g = model.graph
        relu = g.node(1)
        bad = ir.node("Relu", [relu.inputs[0], relu.inputs[0]])
        g.insert_after(relu, bad)
        return PassResult(model, True)


def test_nodes_a_pass_adds_are_checked_against_their_schema():
    with pytest.raises(PassError, match=r"pass 'add-bad-node'.*Relu takes 1..1 inputs, got 2"):
        PassManager([AddBadNode()]).run(_model())


class _ShapeBreakConfig(PassConfig):
    type: Literal["shape-break"] = "shape-break"


class ShapeBreak(Pass):
    """A graph whose structure is fine but whose declared output shape contradicts inference."""

    name = "shape-break"
    Config = _ShapeBreakConfig

    def call(self, model):
        model.graph.outputs[0].shape = ir.Shape([7, 7])
        return PassResult(model, True)


def test_strict_mode_runs_the_full_check_after_every_pass(monkeypatch):
    PassManager([ShapeBreak()]).run(_model())  # cheap checks only: caught later, when saving
    with pytest.raises(PassError, match=r"pass 'shape-break'.*(differ|mismatch)"):
        PassManager([ShapeBreak()], strict=True).run(_model())
    monkeypatch.setenv("ONNXOPT_STRICT", "1")
    with pytest.raises(PassError, match="shape-break"):
        PassManager([ShapeBreak()]).run(_model())


def test_ir_in_ir_out_and_the_callers_model_is_left_alone():
    model = ir.serde.deserialize_model(_model())
    result = PassManager([DropInitializers()]).run(model)
    assert isinstance(result.model, ir.Model) and result.model is not model
    assert len(model.graph.initializers) == 1 and len(result.model.graph.initializers) == 0
    # tensors are shared with the caller's model, not copied
    kept = PassManager([Noop()]).run(model).model
    assert kept.graph.initializers["unused"].const_value is model.graph.initializers["unused"].const_value
    in_place = PassManager([DropInitializers()]).run(model, copy=False)
    assert in_place.model is model and len(model.graph.initializers) == 0


class _ProtoConfig(PassConfig):
    type: Literal["returns-proto"] = "returns-proto"


class ReturnsProto(Pass):
    name = "returns-proto"
    Config = _ProtoConfig

    def call(self, model):
        return PassResult(ir.to_proto(model), False)


def test_a_pass_must_return_the_ir():
    with pytest.raises(PassError, match="returns-proto.*not an ir.Model"):
        PassManager([ReturnsProto()]).run(_model())


class _StripConfig(PassConfig):
    type: Literal["strip-doc-proto"] = "strip-doc-proto"


class StripDocProto(ProtoPass):
    """A third-party pass written against ModelProto (the API before the IR), through the adapter."""

    name = "strip-doc-proto"
    Config = _StripConfig

    def call(self, model):
        assert isinstance(model, onnx.ModelProto)
        changed = any(n.doc_string for n in model.graph.node)
        for n in model.graph.node:
            n.doc_string = ""
        return PassResult(model, changed)


def test_protobuf_passes_run_in_an_ir_pipeline_through_the_adapter():
    model = _model()
    model.graph.node[0].doc_string = "a note"
    result = PassManager([StripDocProto(), DropInitializers()]).run(ir.serde.deserialize_model(model))
    assert isinstance(result.model, ir.Model)
    assert [r.modified for r in result.records] == [True, True]
    assert all(not n.doc_string for n in result.model.graph)
    assert model.graph.node[0].doc_string == "a note"  # the caller's protobuf is untouched
