"""Topological sort: order nodes so every value is produced before it is used.

Stable: nodes already in a valid order keep it, so the pass is a no-op on sorted graphs. Values a
node's subgraphs capture from the outer graph count as its inputs.
"""

from __future__ import annotations

import heapq
from typing import Literal

import onnx_ir as ir

from onnxopt.errors import InvalidModelError
from onnxopt.graph import captured_values
from onnxopt.pass_infra import Pass, PassConfig, PassResult


class TopologicalSortConfig(PassConfig):
    type: Literal["topological-sort"] = "topological-sort"


def _label(node: ir.Node) -> str:
    return node.name or node.op_type


def sort_nodes(graph: ir.Graph) -> bool:
    """Sort ``graph``'s nodes in place (smallest original position first among the ready ones); return
    True if the order changed."""
    nodes = list(graph)
    position = {id(n): i for i, n in enumerate(nodes)}
    waiting: list[set[int]] = []
    dependents: list[list[int]] = [[] for _ in nodes]
    for idx, n in enumerate(nodes):
        deps = set()
        for x in [*n.inputs, *captured_values(n)]:
            if x is None or x.is_graph_input() or x.is_initializer():
                continue
            producer = x.producer()
            if producer is None or id(producer) not in position:
                if producer is None or producer.graph is not graph:
                    if producer is None:
                        raise InvalidModelError(f"node {_label(n)!r} reads {x.name!r}, which nothing produces")
                    continue  # an outer-scope value (this graph is a body)
            deps.add(position[id(producer)])
        waiting.append(deps)
        for d in deps:
            dependents[d].append(idx)
    ready = [i for i, d in enumerate(waiting) if not d]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for j in dependents[i]:
            waiting[j].discard(i)
            if not waiting[j]:
                heapq.heappush(ready, j)
    if len(order) != len(nodes):
        stuck = [_label(nodes[i]) for i in range(len(nodes)) if waiting[i]][:3]
        raise InvalidModelError(f"graph has a cycle (involving {', '.join(stuck)})")
    if order == list(range(len(nodes))):
        return False
    graph.remove(nodes)  # unlink only: uses stay as they are
    graph.extend(nodes[i] for i in order)
    return True


class TopologicalSort(Pass):
    name = "topological-sort"
    summary = "Order nodes so every value is produced before it is used (stable)."
    Config = TopologicalSortConfig

    def call(self, model: ir.Model) -> PassResult:
        changed = sort_nodes(model.graph)
        return PassResult(model, changed, {"reordered": changed})

    def ensures(self, model: ir.Model) -> None:
        seen: set[int] = set()
        for n in model.graph:
            missing = [x.name for x in n.inputs if x is not None and x.producer() is not None
                       and id(x.producer()) not in seen]
            if missing:
                raise InvalidModelError(f"node {_label(n)!r} uses {missing} before they are produced")
            seen.add(id(n))
