"""Shape inference: record inferred shapes and types as value_info (what later passes and ORT read)."""

from __future__ import annotations

from typing import Literal

import onnx

from onnxopt.pass_infra import Pass, PassConfig, PassResult


class ShapeInferenceConfig(PassConfig):
    type: Literal["shape-inference"] = "shape-inference"
    data_prop: bool = True


class ShapeInference(Pass):
    name = "shape-inference"
    summary = "Infer shapes and types of every value and store them in the graph (value_info)."
    Config = ShapeInferenceConfig

    def call(self, model: onnx.ModelProto) -> PassResult:
        before = {v.name: v.SerializeToString(deterministic=True) for v in model.graph.value_info}
        outputs_before = [o.SerializeToString(deterministic=True) for o in model.graph.output]
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True,
                                                     data_prop=self.config.data_prop)
        after = {v.name: v.SerializeToString(deterministic=True) for v in inferred.graph.value_info}
        # Inference also fills in graph outputs declared without a shape.
        outputs_after = [o.SerializeToString(deterministic=True) for o in inferred.graph.output]
        changed = before != after or outputs_before != outputs_after
        return PassResult(inferred, changed, {"value_info": len(after), "added": len(set(after) - set(before))})
