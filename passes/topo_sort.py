"""Topological sort: order nodes so every value is produced before it is used.

Stable: nodes already in a valid order keep it, so the pass is a no-op on sorted graphs.
"""

from __future__ import annotations

import heapq
from typing import Literal

import onnx

from onnxopt.errors import InvalidModelError
from onnxopt.legacy_graph import implicit_inputs
from onnxopt.pass_infra import PassConfig, PassResult, ProtoPass


class TopologicalSortConfig(PassConfig):
    type: Literal["topological-sort"] = "topological-sort"


def sort_nodes(graph: onnx.GraphProto) -> bool:
    """Sort ``graph.node`` in place; return True if the order changed."""
    nodes = list(graph.node)
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    producer_of: dict[str, int] = {}
    for idx, n in enumerate(nodes):
        for out in n.output:
            if out:
                producer_of[out] = idx
    waiting: dict[int, set[int]] = {}
    dependents: dict[int, list[int]] = {i: [] for i in range(len(nodes))}
    for idx, n in enumerate(nodes):
        deps = set()
        for name in list(n.input) + sorted(implicit_inputs(n)):
            if name in available:
                continue
            if name not in producer_of:
                raise InvalidModelError(f"node {n.name or n.op_type!r} reads {name!r}, which nothing produces")
            deps.add(producer_of[name])
        waiting[idx] = deps
        for d in deps:
            dependents[d].append(idx)
    ready = [i for i, d in waiting.items() if not d]
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
        stuck = [nodes[i].name or nodes[i].op_type for i in range(len(nodes)) if waiting[i]][:3]
        raise InvalidModelError(f"graph has a cycle (involving {', '.join(stuck)})")
    if order == list(range(len(nodes))):
        return False
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)
    return True


class TopologicalSort(ProtoPass):
    name = "topological-sort"
    summary = "Order nodes so every value is produced before it is used (stable)."
    Config = TopologicalSortConfig

    def call(self, model: onnx.ModelProto) -> PassResult:
        changed = sort_nodes(model.graph)
        return PassResult(model, changed, {"reordered": changed})

    def ensures(self, model: onnx.ModelProto) -> None:
        seen = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer} | {""}
        for n in model.graph.node:
            missing = [x for x in n.input if x not in seen]
            if missing:
                raise InvalidModelError(f"node {n.name or n.op_type!r} uses {missing} before they are produced")
            seen.update(n.output)
