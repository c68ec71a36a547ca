"""Dead-code elimination: drop what no graph output depends on.

A node is live when one of its outputs is read (directly, or as a value captured by an
If/Loop/Scan body) on the way to a graph output. Subgraph bodies are cleaned first, so
values that only dead nodes of a body captured stop counting as uses outside it.
Initializers that are also graph inputs are overridable inputs: they are kept.
"""

from __future__ import annotations

from collections import Counter
from typing import Literal

import onnx_ir as ir

from onnxopt.errors import PreconditionError
from onnxopt.graph import DEFAULT_DOMAINS, all_nodes, ancestors, drop_unused_initializers, subgraphs
from onnxopt.pass_infra import Pass, PassConfig, PassResult


class DeadCodeEliminationConfig(PassConfig):
    type: Literal["dead-code-elimination"] = "dead-code-elimination"


def dead_nodes(graph: ir.Graph) -> list[ir.Node]:
    live = ancestors(graph, graph.outputs)
    return [n for n in graph if n not in live]


def eliminate(graph: ir.Graph) -> Counter:
    """Remove dead nodes and unread initializers from ``graph`` and its subgraphs; returns counts (nodes,
    initializers, and value_info: type/shape annotations that went away with the values)."""
    counts: Counter = Counter()
    for node in graph:
        for body in subgraphs(node):
            counts += eliminate(body)
    dead = dead_nodes(graph)
    counts["value_info"] += sum(1 for n in dead for o in n.outputs
                                if (o.type is not None or o.shape is not None) and not o.is_graph_output())
    if dead:
        graph.remove(dead, safe=True)
    counts["nodes"] += len(dead)
    counts["initializers"] += drop_unused_initializers(graph)
    return counts


def drop_unused_opsets(model: ir.Model) -> int:
    used = {n.domain for n in all_nodes(model.graph)}
    for f in model.functions.values():
        used.add(f.domain)
        used.update(n.domain for n in f)
    doomed = [d for d in model.opset_imports if d not in DEFAULT_DOMAINS and d not in used]
    for d in doomed:
        del model.opset_imports[d]
    return len(doomed)


class DeadCodeElimination(Pass):
    name = "dead-code-elimination"
    summary = "Remove nodes, initializers, value_info and opset imports no graph output depends on."
    Config = DeadCodeEliminationConfig

    def call(self, model: ir.Model) -> PassResult:
        counts = eliminate(model.graph)
        counts["opsets"] += drop_unused_opsets(model)
        details = {k: counts[k] for k in ("nodes", "initializers", "value_info", "opsets")}
        return PassResult(model, any(details.values()), details)

    def ensures(self, model: ir.Model) -> None:
        if dead_nodes(model.graph):
            raise PreconditionError("dead nodes remain after dead-code elimination")
