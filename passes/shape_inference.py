"""Shape inference: record inferred shapes and types on the model's values (what later passes and ORT read).

Inference runs on the weight-less skeleton (``onnxopt.checks.infer``: large weights become typed inputs),
so it costs the same whatever the size of the weights, and its results are written back onto the IR's
values, subgraph bodies included.
"""

from __future__ import annotations

from typing import Literal

import onnx
import onnx_ir as ir

from onnxopt.checks import infer
from onnxopt.pass_infra import Pass, PassConfig, PassResult


class ShapeInferenceConfig(PassConfig):
    type: Literal["shape-inference"] = "shape-inference"
    data_prop: bool = True


def _typed(value: ir.Value) -> bool:
    return value.type is not None or value.shape is not None


def _apply(value: ir.Value, tp: onnx.TypeProto) -> bool:
    """Give ``value`` the inferred type and shape; True if that changed anything."""
    new_type = ir.serde.deserialize_type_proto_for_type(tp)
    new_shape = ir.serde.deserialize_type_proto_for_shape(tp)
    changed = False
    if new_type is not None and value.type != new_type:
        value.type = new_type
        changed = True
    if new_shape is not None and (value.shape is None or list(value.shape) != list(new_shape)):
        value.shape = new_shape
        changed = True
    return changed


def write_back(graph: ir.Graph, inferred: onnx.GraphProto) -> int:
    """Copy inferred types/shapes of ``inferred`` (the same graph, serialized) onto ``graph``'s values; returns
    how many values changed."""
    types = {vi.name: vi.type for vi in [*inferred.value_info, *inferred.output] if vi.type.HasField("tensor_type")
             or vi.type.WhichOneof("value")}
    changed = 0
    for value in graph.outputs:
        if value.name in types:
            changed += _apply(value, types[value.name])
    for node, proto in zip(graph, inferred.node, strict=False):
        for out in node.outputs:
            if out.name in types and not out.is_graph_output():
                changed += _apply(out, types[out.name])
        bodies = {a.name: a for a in proto.attribute}
        for name, a in node.attributes.items():
            if a.is_ref() or name not in bodies:
                continue
            if a.type == ir.AttributeType.GRAPH:
                changed += write_back(a.value, bodies[name].g)
            elif a.type == ir.AttributeType.GRAPHS:
                for body, body_proto in zip(a.value, bodies[name].graphs, strict=False):
                    changed += write_back(body, body_proto)
    return changed


class ShapeInference(Pass):
    name = "shape-inference"
    summary = "Infer shapes and types of every value and store them in the graph (value_info)."
    Config = ShapeInferenceConfig

    def call(self, model: ir.Model) -> PassResult:
        g = model.graph
        intermediates = [o for n in g for o in n.outputs if not o.is_graph_output()]
        before = {id(v) for v in intermediates if _typed(v)}
        inferred = infer(model, data_prop=self.config.data_prop)
        changed = write_back(g, inferred.graph)
        after = [v for v in intermediates if _typed(v)]
        added = sum(1 for v in after if id(v) not in before)
        return PassResult(model, changed > 0, {"value_info": len(after), "added": added})
