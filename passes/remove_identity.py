"""Remove pass-through nodes: Identity, inference Dropout, and Cast to the type a value already has.

A node stays when removing it would rename the graph's interface: its output is a graph
output and its input is a graph input, another graph output, or read elsewhere too.
"""

from __future__ import annotations

from collections import Counter
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxopt.activations import value_types
from onnxopt.errors import PreconditionError
from onnxopt.graph import (
    DEFAULT_DOMAINS,
    attr,
    bypass,
    constant_value,
    drop_unused_initializers,
    opset_version,
    subgraphs,
)
from onnxopt.pass_infra import Pass, PassConfig, PassResult


class RemoveIdentityConfig(PassConfig):
    type: Literal["remove-identity"] = "remove-identity"
    dropout: bool = True
    cast: bool = True


def _elem_type(types: dict[str, ir.DataType], value: ir.Value | None) -> int | None:
    if value is None:
        return None
    t = types.get(value.name) if value.name else None
    if t is None:
        t = value.dtype
    return int(t) if t is not None else None


class RemoveIdentity(Pass):
    name = "remove-identity"
    summary = "Remove Identity, inference-mode Dropout and same-type Cast nodes."
    Config = RemoveIdentityConfig

    def call(self, model: ir.Model) -> PassResult:
        self.opset = opset_version(model)
        counts: Counter = Counter()
        types = value_types(model) if self.config.cast else {}
        self._clean(model.graph, types, counts)
        details = {k: counts[k] for k in ("identity", "dropout", "cast", "kept")}
        return PassResult(model, any(counts[k] for k in ("identity", "dropout", "cast")), details)

    def ensures(self, model: ir.Model) -> None:
        left = [n.outputs[0].name for n in model.graph if n.op_type == "Identity" and not n.outputs[0].is_graph_output()]
        if left:
            raise PreconditionError(f"Identity nodes left that could have been removed: {left[:3]}")

    def _clean(self, graph: ir.Graph, types: dict[str, ir.DataType], counts: Counter) -> None:
        for node in graph:
            for body in subgraphs(node):
                self._clean(body, {}, counts)
        found = [(n, kind) for n in list(graph) if (kind := self._kind(n, types))]
        orphans: set[str] = set()
        for node, kind in found:
            extra = {x.name for x in node.inputs[1:] if x is not None}
            if bypass(node, node.inputs[0]):
                counts[kind] += 1
                orphans |= extra
            else:
                counts["kept"] += 1
        drop_unused_initializers(graph, orphans)

    def _kind(self, node: ir.Node, types: dict[str, ir.DataType]) -> str | None:
        if node.domain not in DEFAULT_DOMAINS or not node.inputs or node.inputs[0] is None:
            return None
        if node.op_type == "Identity":
            return "identity"
        if node.op_type == "Dropout" and self.config.dropout and self._inference_dropout(node):
            return "dropout"
        if node.op_type in ("Cast", "CastLike") and self.config.cast:
            source = _elem_type(types, node.inputs[0])
            target = attr(node, "to") if node.op_type == "Cast" else _elem_type(types, node.inputs[1])
            return "cast" if source is not None and source == target else None
        return None

    def _inference_dropout(self, node: ir.Node) -> bool:
        if len(node.outputs) > 1 and (node.outputs[1].uses() or node.outputs[1].is_graph_output()):
            return False
        if self.opset < 7:
            return attr(node, "is_test", 0) == 1
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            mode = constant_value(node.inputs[2])
            return mode is not None and not np.any(mode)
        return True
