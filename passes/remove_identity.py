"""Remove pass-through nodes: Identity, inference Dropout, and Cast to the type a value already has.

A node stays when removing it would rename the graph's interface: its output is a graph
output and its input is a graph input, another graph output, or read elsewhere too.
"""

from __future__ import annotations

from collections import Counter
from typing import Literal

import numpy as np
import onnx

from onnxopt.errors import PreconditionError
from onnxopt.legacy_graph import (
    GraphIndex,
    attr,
    drop_initializers,
    drop_value_info,
    opset_version,
    subgraphs,
)
from onnxopt.pass_infra import PassConfig, PassResult, ProtoPass

from .constant_folding import infer_value_types

DEFAULT_DOMAINS = ("", "ai.onnx")


class RemoveIdentityConfig(PassConfig):
    type: Literal["remove-identity"] = "remove-identity"
    dropout: bool = True
    cast: bool = True


def _elem_type(types: dict[str, onnx.TypeProto], name: str) -> int | None:
    t = types.get(name)
    return t.tensor_type.elem_type if t is not None and t.HasField("tensor_type") else None


class RemoveIdentity(ProtoPass):
    name = "remove-identity"
    summary = "Remove Identity, inference-mode Dropout and same-type Cast nodes."
    Config = RemoveIdentityConfig

    def call(self, model: onnx.ModelProto) -> PassResult:
        self.opset = opset_version(model)
        counts: Counter = Counter()
        types = infer_value_types(model) if self.config.cast else {}
        self._clean(model.graph, types, counts)
        details = {k: counts[k] for k in ("identity", "dropout", "cast", "kept")}
        return PassResult(model, any(counts[k] for k in ("identity", "dropout", "cast")), details)

    def ensures(self, model: onnx.ModelProto) -> None:
        outputs = {o.name for o in model.graph.output}
        left = [n.output[0] for n in model.graph.node if n.op_type == "Identity" and n.output[0] not in outputs]
        if left:
            raise PreconditionError(f"Identity nodes left that could have been removed: {left[:3]}")

    def _clean(self, graph: onnx.GraphProto, types: dict[str, onnx.TypeProto], counts: Counter) -> None:
        for node in graph.node:
            for body in subgraphs(node):  # bodies first: removing outer nodes copies them
                self._clean(body, {}, counts)
        index = GraphIndex(graph)
        found = [(n.output[0], kind) for n in graph.node if (kind := self._kind(index, n, types))]
        orphans: set[str] = set()
        gone: set[str] = set()
        for out, kind in found:
            node = index.producer(out)
            extra, names = set(node.input[1:]), {node.input[0], *node.output}
            if index.bypass(node, node.input[0]):
                counts[kind] += 1
                orphans |= extra
                gone |= names
            else:
                counts["kept"] += 1
        drop_initializers(graph, orphans)
        drop_value_info(graph, candidates=gone)

    def _kind(self, index: GraphIndex, node: onnx.NodeProto, types: dict[str, onnx.TypeProto]) -> str | None:
        if node.domain not in DEFAULT_DOMAINS or not node.input or not node.input[0]:
            return None
        if node.op_type == "Identity":
            return "identity"
        if node.op_type == "Dropout" and self.config.dropout and self._inference_dropout(index, node):
            return "dropout"
        if node.op_type in ("Cast", "CastLike") and self.config.cast:
            source = _elem_type(types, node.input[0])
            target = attr(node, "to") if node.op_type == "Cast" else _elem_type(types, node.input[1])
            return "cast" if source is not None and source == target else None
        return None

    def _inference_dropout(self, index: GraphIndex, node: onnx.NodeProto) -> bool:
        if len(node.output) > 1 and node.output[1] and (index.uses(node.output[1]) or index.is_output(node.output[1])):
            return False
        if self.opset < 7:
            return attr(node, "is_test", 0) == 1
        if len(node.input) > 2 and node.input[2]:
            mode = index.constant(node.input[2])
            return mode is not None and not np.any(mode)
        return True
