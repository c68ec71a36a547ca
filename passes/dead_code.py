"""Dead-code elimination: drop what no graph output depends on.

A node is live when one of its outputs is read (directly, or as a value captured by an
If/Loop/Scan body) on the way to a graph output. Subgraph bodies are cleaned first, so
values that only dead nodes of a body captured stop counting as uses outside it.
Initializers that are also graph inputs are overridable inputs: they are kept.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Literal

import onnx

from onnxopt.errors import PreconditionError
from onnxopt.graph import ancestors, implicit_inputs, subgraphs
from onnxopt.pass_infra import Pass, PassConfig, PassResult

DEFAULT_DOMAINS = ("", "ai.onnx")


class DeadCodeEliminationConfig(PassConfig):
    type: Literal["dead-code-elimination"] = "dead-code-elimination"


def _liveness(graph: onnx.GraphProto) -> tuple[set[int], set[str]]:
    """Positions of live nodes, and every value name a live node or a graph output reads."""
    return ancestors(graph, [o.name for o in graph.output])


def dead_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    live, _ = _liveness(graph)
    return [n for i, n in enumerate(graph.node) if i not in live]


def read_names(graph: onnx.GraphProto) -> set[str]:
    """Values some node reads (subgraph captures included) or the graph returns."""
    names = {o.name for o in graph.output}
    for n in graph.node:
        names.update(x for x in n.input if x)
        names.update(implicit_inputs(n))
    return names


def defined_names(graph: onnx.GraphProto) -> set[str]:
    names = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    names.update(o for n in graph.node for o in n.output if o)
    return names


def _delete(items, doomed: list[int]) -> int:
    # Deleting in place (from the back) neither copies the survivors nor invalidates references to them.
    for i in sorted(doomed, reverse=True):
        del items[i]
    return len(doomed)


def delete_nodes(graph: onnx.GraphProto, doomed: Iterable[onnx.NodeProto]) -> int:
    """Remove ``doomed`` nodes from ``graph``; returns how many."""
    ids = {id(n) for n in doomed}
    return _delete(graph.node, [i for i, n in enumerate(graph.node) if id(n) in ids])


def drop_initializers(graph: onnx.GraphProto, candidates: Iterable[str] | None = None) -> int:
    """Remove unread initializers (only among ``candidates`` if given); graph inputs are kept."""
    read = read_names(graph) | {i.name for i in graph.input}
    allowed = None if candidates is None else set(candidates)
    return _delete(graph.initializer, [i for i, t in enumerate(graph.initializer)
                                       if t.name not in read and (allowed is None or t.name in allowed)])


def drop_value_info(graph: onnx.GraphProto, outer: set[str] = frozenset(),
                    candidates: Iterable[str] | None = None) -> int:
    """Remove value_info of values that no longer exist (only among ``candidates`` if given)."""
    exists = defined_names(graph) | outer
    allowed = None if candidates is None else set(candidates)
    return _delete(graph.value_info, [i for i, v in enumerate(graph.value_info)
                                      if v.name not in exists and (allowed is None or v.name in allowed)])


def eliminate(graph: onnx.GraphProto, outer: set[str] = frozenset()) -> Counter:
    counts: Counter = Counter()
    visible = outer | defined_names(graph)
    for node in graph.node:
        for body in subgraphs(node):
            counts += eliminate(body, visible)
    counts["nodes"] += delete_nodes(graph, dead_nodes(graph))
    counts["initializers"] += drop_initializers(graph)
    counts["value_info"] += drop_value_info(graph, outer)
    return counts


def _domains_in(graph: onnx.GraphProto) -> set[str]:
    found = set()
    for n in graph.node:
        found.add(n.domain)
        for body in subgraphs(n):
            found |= _domains_in(body)
    return found


def drop_unused_opsets(model: onnx.ModelProto) -> int:
    used = _domains_in(model.graph)
    for f in model.functions:
        used.add(f.domain)
        used.update(n.domain for n in f.node)
    keep = [op for op in model.opset_import if op.domain in DEFAULT_DOMAINS or op.domain in used]
    removed = len(model.opset_import) - len(keep)
    if removed:
        del model.opset_import[:]
        model.opset_import.extend(keep)
    return removed


class DeadCodeElimination(Pass):
    name = "dead-code-elimination"
    summary = "Remove nodes, initializers, value_info and opset imports no graph output depends on."
    Config = DeadCodeEliminationConfig

    def call(self, model: onnx.ModelProto) -> PassResult:
        counts = eliminate(model.graph)
        counts["opsets"] += drop_unused_opsets(model)
        details = {k: counts[k] for k in ("nodes", "initializers", "value_info", "opsets")}
        return PassResult(model, any(details.values()), details)

    def ensures(self, model: onnx.ModelProto) -> None:
        if dead_nodes(model.graph):
            raise PreconditionError("dead nodes remain after dead-code elimination")
