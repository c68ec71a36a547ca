"""Shape inference: record inferred shapes and types as value_info (what later passes and ORT read)."""

from __future__ import annotations

from typing import Literal

import onnx

from onnxopt.legacy_graph import tensor_bytes
from onnxopt.pass_infra import PassConfig, PassResult, ProtoPass

# Initializers up to this size keep their values, so data propagation still sees shape tensors,
# axes and the like; larger ones are weights whose values inference never reads.
KEEP_VALUES_BYTES = 64 * 1024


class ShapeInferenceConfig(PassConfig):
    type: Literal["shape-inference"] = "shape-inference"
    data_prop: bool = True


def _stub(t: onnx.TensorProto) -> onnx.TensorProto:
    """The tensor's name, type and dims without its data, marked external so nothing expects bytes."""
    stub = onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims)
    stub.data_location = onnx.TensorProto.EXTERNAL
    stub.external_data.add(key="location", value="onnxopt-stub")
    return stub


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its large initializers reduced to type and shape.

    onnx's in-memory inference serializes the whole model, which fails above 2 GB and copies every
    weight twice below it; the skeleton is small whatever the model's size.
    """
    out = onnx.ModelProto()
    graph = model.graph
    out.CopyFrom(onnx.ModelProto(ir_version=model.ir_version, opset_import=model.opset_import,
                                 functions=model.functions))
    g = out.graph
    g.name = graph.name
    g.node.extend(graph.node)
    g.input.extend(graph.input)
    g.output.extend(graph.output)
    g.value_info.extend(graph.value_info)
    g.sparse_initializer.extend(graph.sparse_initializer)
    for t in graph.initializer:
        keep = t.data_location != onnx.TensorProto.EXTERNAL and tensor_bytes(t) <= KEEP_VALUES_BYTES
        g.initializer.append(t if keep else _stub(t))
    return out


class ShapeInference(ProtoPass):
    name = "shape-inference"
    summary = "Infer shapes and types of every value and store them in the graph (value_info)."
    Config = ShapeInferenceConfig

    def call(self, model: onnx.ModelProto) -> PassResult:
        before = {v.name: v.SerializeToString(deterministic=True) for v in model.graph.value_info}
        outputs_before = [o.SerializeToString(deterministic=True) for o in model.graph.output]
        inferred = onnx.shape_inference.infer_shapes(skeleton(model), check_type=True, strict_mode=True,
                                                     data_prop=self.config.data_prop).graph
        after = {v.name: v.SerializeToString(deterministic=True) for v in inferred.value_info}
        # Inference also fills in graph outputs declared without a shape.
        outputs_after = [o.SerializeToString(deterministic=True) for o in inferred.output]
        changed = before != after or outputs_before != outputs_after
        if not changed:
            return PassResult(model, False, {"value_info": len(after), "added": 0})
        out = onnx.ModelProto()
        out.CopyFrom(model)
        # Nodes too: inference records value_info inside If/Loop bodies.
        del out.graph.node[:]
        out.graph.node.extend(inferred.node)
        del out.graph.value_info[:]
        out.graph.value_info.extend(inferred.value_info)
        del out.graph.output[:]
        out.graph.output.extend(inferred.output)
        return PassResult(out, changed, {"value_info": len(after), "added": len(set(after) - set(before))})
