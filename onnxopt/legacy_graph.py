"""TRANSITIONAL: use-def helpers over ``onnx.GraphProto`` for passes not yet ported to the IR (``onnxopt.graph``).

Deleted once every built-in pass works on the IR.

Use-def helpers over ``onnx.GraphProto``.

Passes rewrite through these instead of patching names: ``GraphIndex`` knows who
produces and who consumes every value (including values captured by subgraphs of
If/Loop/Scan), hands out unique names, and rewires uses in one place.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator

import numpy as np
import onnx
from onnx import numpy_helper


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def implicit_inputs(node: onnx.NodeProto) -> set[str]:
    """Outer-scope values a node's subgraphs read (they count as uses of those values)."""
    used: set[str] = set()
    for g in subgraphs(node):
        defined = {i.name for i in g.input} | {t.name for t in g.initializer}
        for n in g.node:
            used.update(x for x in n.input if x and x not in defined)
            used.update(x for x in implicit_inputs(n) if x not in defined)
            defined.update(n.output)
        used.update(o.name for o in g.output if o.name not in defined)
    return used


def ancestors(graph: onnx.GraphProto, outputs: Iterable[str]) -> tuple[set[int], set[str]]:
    """Positions of the nodes the values ``outputs`` depend on, and every value name those nodes read (the
    ``outputs`` included)."""
    producer = {out: i for i, n in enumerate(graph.node) for out in n.output if out}
    live: set[int] = set()
    read: set[str] = set()
    stack = list(outputs)
    while stack:
        name = stack.pop()
        if name in read:
            continue
        read.add(name)
        i = producer.get(name)
        if i is None or i in live:
            continue
        live.add(i)
        node = graph.node[i]
        stack.extend(x for x in node.input if x)
        stack.extend(implicit_inputs(node))
    return live, read


def all_names(graph: onnx.GraphProto) -> set[str]:
    names = {i.name for i in graph.input} | {o.name for o in graph.output}
    names |= {t.name for t in graph.initializer} | {v.name for v in graph.value_info}
    for n in graph.node:
        names.add(n.name)
        names.update(n.input)
        names.update(n.output)
        for g in subgraphs(n):
            names |= all_names(g)
    names.discard("")
    return names


class GraphIndex:
    """Producer/consumer maps for one graph, kept current by the mutating methods."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self._taken = all_names(graph)
        self._counters: dict[str, int] = defaultdict(int)
        self.refresh()

    def refresh(self) -> None:
        self.producers: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.graph.node:
            for out in node.output:
                if out:
                    self.producers[out] = node
            for name in list(node.input) + sorted(implicit_inputs(node)):
                if name:
                    self.consumers[name].append(node)
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.graph_inputs = {i.name for i in self.graph.input}
        self.graph_outputs = {o.name for o in self.graph.output}

    # --- queries -------------------------------------------------------------
    def producer(self, name: str) -> onnx.NodeProto | None:
        return self.producers.get(name)

    def uses(self, name: str) -> list[onnx.NodeProto]:
        return list(self.consumers.get(name, ()))

    def only_use(self, name: str) -> onnx.NodeProto | None:
        """The single consuming node, if ``name`` has exactly one and is not a graph output."""
        uses = self.consumers.get(name, ())
        if len(uses) == 1 and name not in self.graph_outputs:
            return uses[0]
        return None

    def is_output(self, name: str) -> bool:
        return name in self.graph_outputs

    def constant(self, name: str) -> np.ndarray | None:
        """Value of an initializer or a ``Constant`` node's output; ``None`` if not constant."""
        if name in self.initializers and name not in self.graph_inputs:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producers.get(name)
        if node is not None and node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            attr = node.attribute[0]
            if attr.name == "value":
                return numpy_helper.to_array(attr.t)
            value = onnx.helper.get_attribute_value(attr)
            if attr.name in ("value_float", "value_int"):
                return np.array(value, dtype=np.float32 if attr.name == "value_float" else np.int64)
            if attr.name in ("value_floats", "value_ints"):
                return np.array(value, dtype=np.float32 if attr.name == "value_floats" else np.int64)
        return None

    # --- names ---------------------------------------------------------------
    def unique_name(self, base: str) -> str:
        """A name not used anywhere in the model, derived from ``base`` (deterministic)."""
        base = base or "v"
        name = base
        while name in self._taken:
            self._counters[base] += 1
            name = f"{base}_{self._counters[base]}"
        self._taken.add(name)
        return name

    # --- mutation ------------------------------------------------------------
    def add_initializer(self, array: np.ndarray, base_name: str) -> str:
        name = self.unique_name(base_name)
        tensor = numpy_helper.from_array(np.asarray(array), name)
        self.graph.initializer.append(tensor)
        self.initializers[name] = self.graph.initializer[-1]
        return name

    def set_initializer(self, name: str, array: np.ndarray) -> None:
        """Replace the value of an existing initializer in place (name and position kept)."""
        tensor = self.initializers[name]
        tensor.CopyFrom(numpy_helper.from_array(np.asarray(array), name))

    def replace_input(self, node: onnx.NodeProto, old: str, new: str) -> None:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        if old in self.consumers and node in self.consumers[old]:
            self.consumers[old] = [n for n in self.consumers[old] if n is not node]
        self.consumers[new].append(node)

    def replace_all_uses(self, old: str, new: str) -> None:
        """Make every consumer of ``old`` read ``new`` instead (graph outputs are left alone)."""
        for node in self.uses(old):
            for i, name in enumerate(node.input):
                if name == old:
                    node.input[i] = new
            for g in subgraphs(node):
                _rename_free_uses(g, old, new)
            self.consumers[new].append(node)
        self.consumers.pop(old, None)

    def bypass(self, node: onnx.NodeProto, kept_input: str) -> bool:
        """Remove a pass-through ``node`` whose first output equals ``kept_input``.

        Returns False (and changes nothing) when it cannot be done without renaming a
        graph input or output.
        """
        out = node.output[0]
        if out in self.graph_outputs:
            # The graph output's name is the interface: let the producer write it directly.
            src = self.producers.get(kept_input)
            if (
                src is None
                or kept_input in self.graph_outputs
                or kept_input in self.graph_inputs
                or any(u is not node for u in self.consumers.get(kept_input, ()))
            ):
                return False
            for i, name in enumerate(src.output):
                if name == kept_input:
                    src.output[i] = out
            self.producers[out] = src
            self.producers.pop(kept_input, None)
            self.remove_nodes([node])
            return True
        self.replace_all_uses(out, kept_input)
        self.remove_nodes([node])
        return True

    def remove_nodes(self, nodes: Iterable[onnx.NodeProto]) -> None:
        doomed = {id(n) for n in nodes}
        if not doomed:
            return
        # Delete in place, from the back: rebuilding the list would copy every node and leave the
        # caller's references to the surviving nodes pointing at detached copies.
        for i in reversed(range(len(self.graph.node))):
            if id(self.graph.node[i]) in doomed:
                del self.graph.node[i]
        self.refresh()

    def insert_before(self, anchor: onnx.NodeProto, new_nodes: list[onnx.NodeProto]) -> None:
        """Insert ``new_nodes`` just before ``anchor`` (keeps the graph topologically sorted)."""
        nodes = list(self.graph.node)
        pos = next(i for i, n in enumerate(nodes) if n is anchor)
        del self.graph.node[:]
        self.graph.node.extend(nodes[:pos] + new_nodes + nodes[pos:])
        self.refresh()

    def prune_unused_initializers(self) -> int:
        """Drop initializers nothing reads; those that are graph inputs are overridable inputs and stay."""
        used = {name for name, nodes in self.consumers.items() if nodes} | self.graph_outputs | self.graph_inputs
        keep = [t for t in self.graph.initializer if t.name in used]
        removed = len(self.graph.initializer) - len(keep)
        if removed:
            del self.graph.initializer[:]
            self.graph.initializer.extend(keep)
            self.initializers = {t.name: t for t in self.graph.initializer}
        return removed


def _rename_free_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    if old in defined:
        return
    for n in graph.node:
        for i, name in enumerate(n.input):
            if name == old:
                n.input[i] = new
        for g in subgraphs(n):
            _rename_free_uses(g, old, new)
        if old in n.output:
            return
    for o in graph.output:
        if o.name == old:
            o.name = new


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(onnx.helper.make_attribute(name, value))


def opset_version(model: onnx.ModelProto, domain: str = "") -> int:
    for op in model.opset_import:
        if op.domain in (domain, "ai.onnx" if domain == "" else domain):
            return op.version
    return 0


def op_histogram(graph: onnx.GraphProto) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for n in graph.node:
        key = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
        counts[key] += 1
    return dict(sorted(counts.items()))


def tensor_bytes(t: onnx.TensorProto) -> int:
    """Bytes of a tensor's values, wherever they are stored (raw, typed fields, or external data that was
    not loaded: then from its recorded length or its shape; the external file is never read)."""
    if t.HasField("raw_data"):
        return len(t.raw_data)
    if t.data_location == onnx.TensorProto.EXTERNAL:
        info = {e.key: e.value for e in t.external_data}
        if info.get("length", "").isdigit():
            return int(info["length"])
    if t.data_type == onnx.TensorProto.STRING:
        return sum(len(s) for s in t.string_data)
    count = 1
    for d in t.dims:
        count *= max(int(d), 0)
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except Exception:  # noqa: BLE001 - unknown type: count elements
        itemsize = 1
    if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return (count + 1) // 2
    return count * itemsize


def initializer_bytes(graph: onnx.GraphProto) -> int:
    total = sum(tensor_bytes(t) for t in graph.initializer)
    for n in graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    total += tensor_bytes(a.t)
    return total


def parameter_count(graph: onnx.GraphProto) -> int:
    return sum(int(np.prod(t.dims, dtype=np.int64)) for t in graph.initializer)


# ---- dead-code helpers on protobuf graphs (were passes/dead_code.py) ----
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




def write_input_value(index: GraphIndex, op: onnx.NodeProto, pos: int, value: np.ndarray) -> None:
    """Give ``op`` input ``pos`` the value, in place only when nothing else reads the old one (was
    FoldBatchNorm._write)."""
    old = op.input[pos] if pos < len(op.input) else ""
    if (old and old in index.initializers and old not in index.graph_inputs
            and not index.is_output(old) and all(u is op for u in index.uses(old))
            and list(op.input).count(old) == 1):
        index.set_initializer(old, value)
        return
    new = index.add_initializer(value, old or f"{op.output[0]}_bias")
    if old:
        index.replace_input(op, old, new)
        return
    if pos < len(op.input):
        op.input[pos] = new
    else:
        op.input.append(new)
    index.consumers[new].append(op)
