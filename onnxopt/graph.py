"""Use-def helpers over the in-memory IR (``onnx_ir``).

Passes rewrite through these and through onnx_ir's own methods (``Value.uses()``,
``Value.replace_all_uses_with``, ``Node.replace_input_with``, ``Graph.insert_before``, ...), never by
patching names. Two rules every pass follows:

* **Tensors are immutable.** A pass that changes a weight assigns a new tensor
  (``set_constant``); it never writes into the array it read. The pass manager's copy of the
  caller's model shares tensors with it, and a lazy (memory-mapped) tensor is read-only anyway.
* **Read weights only when needed, one at a time.** ``constant_value`` reads the values
  (memory-mapped for external data); shapes and dtypes (``constant_tensor(v).shape``) cost nothing.
  ``release`` drops a lazy tensor's mapping once a pass is done with it.

Values captured by subgraphs (If/Loop/Scan bodies reading an outer value) are ordinary uses in
the IR: ``value.uses()`` lists the reading node inside the body.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator

import numpy as np
import onnx_ir as ir

DEFAULT_DOMAINS = ("", "ai.onnx")


# --------------------------------------------------------------------------------------------
# Nodes and attributes
# --------------------------------------------------------------------------------------------
def is_op(node: ir.Node | None, op_types: str | Iterable[str], domain: str = "") -> bool:
    """``node`` is one of ``op_types`` in ``domain`` (the default domain has two spellings)."""
    if node is None:
        return False
    if isinstance(op_types, str):
        op_types = (op_types,)
    domains = DEFAULT_DOMAINS if domain in DEFAULT_DOMAINS else (domain,)
    return node.op_type in op_types and node.domain in domains


def attr(node: ir.Node, name: str, default=None):
    """An attribute's value as plain Python: int, float, str, list, ``ir.Graph``, or a numpy array for tensors."""
    a = node.attributes.get(name)
    if a is None or a.is_ref():
        return default
    value = a.value
    if a.type == ir.AttributeType.TENSOR:
        return value.numpy()
    if a.type in (ir.AttributeType.INTS, ir.AttributeType.FLOATS, ir.AttributeType.STRINGS):
        return list(value)
    return value


def set_attr(node: ir.Node, name: str, value) -> None:
    """Set (or replace) an attribute; the type is inferred from the Python value (ints stay ints)."""
    if isinstance(value, np.ndarray):
        value = ir.tensor(value)
    node.attributes[name] = ir.convenience.convert_attribute(name, value)


def subgraphs(node: ir.Node) -> Iterator[ir.Graph]:
    for a in node.attributes.values():
        if a.is_ref():
            continue
        if a.type == ir.AttributeType.GRAPH:
            yield a.value
        elif a.type == ir.AttributeType.GRAPHS:
            yield from a.value


def all_nodes(graph: ir.Graph) -> Iterator[ir.Node]:
    """Every node of ``graph`` and of its subgraphs, outer nodes before the bodies they hold."""
    for node in graph:
        yield node
        for body in subgraphs(node):
            yield from all_nodes(body)


def opset_version(model: ir.Model, domain: str = "") -> int:
    imports = model.opset_imports
    if domain in DEFAULT_DOMAINS:
        return imports.get("", imports.get("ai.onnx", 0))
    return imports.get(domain, 0)


def clone_model(model: ir.Model) -> ir.Model:
    """A structural copy (nodes and values new, tensors shared), tolerating values nothing defines (a
    broken model must still reach the checks that name the problem)."""
    graph = model.graph.clone(allow_outer_scope_values=True)
    return ir.Model(graph, ir_version=model.ir_version, producer_name=model.producer_name,
                    producer_version=model.producer_version, domain=model.domain,
                    model_version=model.model_version, doc_string=model.doc_string,
                    functions=[f.clone() for f in model.functions.values()],
                    metadata_props=dict(model.metadata_props))


# --------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------
def is_initializer(value: ir.Value | None) -> bool:
    """A weight: an initializer that is not also an (overridable) graph input."""
    return value is not None and value.is_initializer() and not value.is_graph_input()


def constant_tensor(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The tensor behind an initializer or a ``Constant`` node's output, without reading its values."""
    if value is None:
        return None
    if is_initializer(value):
        return value.const_value
    node = value.producer()
    if node is None or not is_op(node, "Constant") or len(node.attributes) != 1:
        return None
    a = next(iter(node.attributes.values()))
    if a.is_ref():
        return None
    if a.name == "value":
        return a.value
    if a.name in ("value_float", "value_floats"):
        return ir.tensor(np.array(a.value, dtype=np.float32))
    if a.name in ("value_int", "value_ints"):
        return ir.tensor(np.array(a.value, dtype=np.int64))
    return None


def constant_value(value: ir.Value | None) -> np.ndarray | None:
    """Values of an initializer or ``Constant`` output (``None`` if not constant). Read-only: never write to it."""
    tensor = constant_tensor(value)
    if tensor is None:
        return None
    try:
        return tensor.numpy()
    except Exception:  # noqa: BLE001 - a dtype numpy cannot hold is "not a constant we can use"
        return None


def release(value: ir.Value | None) -> None:
    """Drop the memory mapping of a lazily loaded (external) weight once a pass is done reading it."""
    tensor = value.const_value if value is not None else None
    if isinstance(tensor, ir.ExternalTensor):
        tensor.release()


def make_tensor(array: np.ndarray, name: str | None = None) -> ir.Tensor:
    array = np.asarray(array)
    if not array.flags.c_contiguous:  # (np.ascontiguousarray would also turn a scalar into shape [1])
        array = array.copy(order="C")
    return ir.tensor(array, name=name)


def add_initializer(graph: ir.Graph, array: np.ndarray | ir.TensorProtocol, base_name: str,
                    namer: Namer | None = None) -> ir.Value:
    """A new initializer value with a unique name derived from ``base_name``."""
    name = (namer or Namer(graph)).unique(base_name)
    tensor = make_tensor(array, name) if isinstance(array, np.ndarray | np.generic) else array
    tensor.name = name
    value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype),
                     const_value=tensor)
    graph.register_initializer(value)
    return value


def set_constant(value: ir.Value, array: np.ndarray | ir.TensorProtocol) -> None:
    """Give an initializer a new tensor (the old one is never written to); type and shape follow."""
    tensor = make_tensor(array) if isinstance(array, np.ndarray | np.generic) else array
    tensor.name = value.name
    release(value)
    value.const_value = tensor
    value.type = ir.TensorType(tensor.dtype)
    value.shape = ir.Shape(tensor.shape)


def own_initializer(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray, namer: Namer | None = None,
                    base_name: str | None = None) -> ir.Value:
    """Give input ``index`` of ``node`` the value ``array``: in place when only this input reads the old
    initializer, else through a new initializer (other readers keep theirs)."""
    old = node.inputs[index] if index < len(node.inputs) else None
    if (is_initializer(old) and not old.is_graph_output()
            and all(u.node is node and u.idx == index for u in old.uses())):
        set_constant(old, array)
        return old
    base = base_name or (old.name if old is not None and old.name else f"{node.name or node.op_type}_in{index}")
    new = add_initializer(graph, array, base, namer)
    if index >= len(node.inputs):
        node.resize_inputs(index + 1)
    node.replace_input_with(index, new)
    return new


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------
class Namer:
    """Unique, deterministic names derived from a base: ``base``, ``base_1``, ``base_2``...

    Knows every value and node name in the graph and its subgraphs (and the owning graphs' when given a
    subgraph's root), so a new name never shadows or collides with an existing one.
    """

    def __init__(self, graph: ir.Graph):
        root = graph
        self._taken: set[str] = set()
        for v in (*root.inputs, *root.outputs, *root.initializers.values()):
            if v.name:
                self._taken.add(v.name)
        for node in all_nodes(root):
            if node.name:
                self._taken.add(node.name)
            for v in node.outputs:
                if v.name:
                    self._taken.add(v.name)
            for v in node.inputs:
                if v is not None and v.name:
                    self._taken.add(v.name)
        for body in _bodies(root):
            for v in (*body.inputs, *body.outputs, *body.initializers.values()):
                if v.name:
                    self._taken.add(v.name)
        self._counters: Counter[str] = Counter()

    def unique(self, base: str | None) -> str:
        base = base or "v"
        name = base
        while name in self._taken:
            self._counters[base] += 1
            name = f"{base}_{self._counters[base]}"
        self._taken.add(name)
        return name

    def value(self, base: str | None, **kwargs) -> ir.Value:
        return ir.Value(name=self.unique(base), **kwargs)


def _bodies(graph: ir.Graph) -> Iterator[ir.Graph]:
    for node in graph:
        for body in subgraphs(node):
            yield body
            yield from _bodies(body)


# --------------------------------------------------------------------------------------------
# Uses and rewiring
# --------------------------------------------------------------------------------------------
def consumers(value: ir.Value) -> list[ir.Node]:
    """Distinct nodes reading ``value`` (including nodes inside subgraphs that capture it), in use order."""
    return list(value.consumers())


def only_use(value: ir.Value) -> ir.Node | None:
    """The single node reading ``value`` once, if it has exactly one use and is not a graph output."""
    uses = list(value.uses())
    if len(uses) == 1 and not value.is_graph_output():
        return uses[0].node
    return None


def bypass(node: ir.Node, kept: ir.Value) -> bool:
    """Remove a pass-through ``node`` whose first output carries the same values as ``kept``.

    Readers of the output read ``kept`` instead. When the output is a graph output its name is the
    interface: ``kept``'s producer then writes it directly (``kept`` takes the output's name). Returns
    False, changing nothing, when that cannot be done without renaming a graph input or output or
    touching another reader of ``kept``.
    """
    graph = node.graph
    out = node.outputs[0]
    if out.is_graph_output():
        if (kept.producer() is None or kept.is_graph_output() or kept.is_graph_input()
                or kept.producer().graph is not graph
                or any(u.node is not node for u in kept.uses())
                or sum(1 for o in graph.outputs if o is out) != 1):
            return False
        name, vtype, shape = out.name, out.type, out.shape
        out.replace_all_uses_with(kept, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        out.name = None
        kept.name = name
        kept.type = kept.type or vtype
        kept.shape = kept.shape or shape
        return True
    out.replace_all_uses_with(kept)
    graph.remove(node, safe=True)
    return True


def remove_nodes(graph: ir.Graph, nodes: Iterable[ir.Node]) -> None:
    """Remove nodes whose outputs nothing outside the set reads (inputs are detached)."""
    nodes = list(nodes)
    if nodes:
        graph.remove(nodes, safe=True)


def ancestors(graph: ir.Graph, values: Iterable[ir.Value]) -> set[ir.Node]:
    """The nodes of ``graph`` that ``values`` depend on (subgraph captures included)."""
    live: set[ir.Node] = set()
    stack = [v for v in values if v is not None]
    seen: set[int] = set()
    while stack:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        node = v.producer()
        if node is None or node.graph is not graph or node in live:
            continue
        live.add(node)
        stack.extend(x for x in node.inputs if x is not None)
        stack.extend(captured_values(node))
    return live


def captured_values(node: ir.Node) -> list[ir.Value]:
    """Outer-scope values that the subgraphs of ``node`` read."""
    found: list[ir.Value] = []
    for body in subgraphs(node):
        inner = set(map(id, body.inputs)) | {id(v) for v in body.initializers.values()}
        for n in all_nodes(body):
            inner.update(id(o) for o in n.outputs)
        for n in all_nodes(body):
            found.extend(x for x in n.inputs if x is not None and id(x) not in inner)
        found.extend(o for o in body.outputs if id(o) not in inner)
    return found


def drop_unused_initializers(graph: ir.Graph, candidates: Iterable[str] | None = None) -> int:
    """Remove initializers nothing reads (only among ``candidates`` if given; graph inputs and outputs stay)."""
    allowed = None if candidates is None else set(candidates)
    doomed = [name for name, v in graph.initializers.items()
              if not v.uses() and not v.is_graph_output() and not v.is_graph_input()
              and (allowed is None or name in allowed)]
    for name in doomed:
        release(graph.initializers[name])
        del graph.initializers[name]
    return len(doomed)


# --------------------------------------------------------------------------------------------
# Statistics (no tensor is read)
# --------------------------------------------------------------------------------------------
def op_key(node: ir.Node) -> str:
    return node.op_type if node.domain in DEFAULT_DOMAINS else f"{node.domain}.{node.op_type}"


def op_histogram(graph: ir.Graph) -> dict[str, int]:
    return dict(sorted(Counter(op_key(n) for n in graph).items()))


def tensor_bytes(tensor: ir.TensorProtocol) -> int:
    """Bytes of a tensor's values, from its dtype and shape (never reads an external file)."""
    try:
        return int(tensor.nbytes)
    except Exception:  # noqa: BLE001 - strings and unknown types
        try:
            return sum(len(s) for s in tensor.string_data())
        except Exception:  # noqa: BLE001
            return 0


def initializer_bytes(graph: ir.Graph) -> int:
    total = sum(tensor_bytes(v.const_value) for v in graph.initializers.values() if v.const_value is not None)
    for n in graph:
        if is_op(n, "Constant") and "value" in n.attributes and not n.attributes["value"].is_ref():
            total += tensor_bytes(n.attributes["value"].value)
    return total


def parameter_count(graph: ir.Graph) -> int:
    return sum(int(v.const_value.size) for v in graph.initializers.values() if v.const_value is not None)


def replace_node(old: ir.Node, new_nodes: list[ir.Node], new_outputs: list[ir.Value]) -> None:
    """Put ``new_nodes`` where ``old`` was; ``new_outputs[i]`` takes over ``old.outputs[i]``: its readers, its
    place among the graph outputs, its name, type and shape."""
    graph = old.graph
    ir.convenience.replace_nodes_and_values(graph, old, [old], new_nodes, list(old.outputs[:len(new_outputs)]),
                                            new_outputs)


def make_node(op_type: str, inputs: list[ir.Value | None], attributes: dict | None = None, *,
              outputs: list[str] | None = None, domain: str = "", name: str | None = None) -> ir.Node:
    """``ir.node`` whose outputs carry the given names (one unnamed output when ``outputs`` is None)."""
    node = ir.node(op_type, inputs, attributes or {}, domain=domain, name=name,
                   num_outputs=len(outputs) if outputs else 1)
    for value, out_name in zip(node.outputs, outputs or [], strict=False):
        value.name = out_name
    return node


def drop_if_unused(graph: ir.Graph, value: ir.Value | None) -> bool:
    """Remove an initializer nothing reads any more (releasing its lazily loaded data)."""
    if value is None or not is_initializer(value) or value.uses() or value.is_graph_output():
        return False
    if value.name in graph.initializers and graph.initializers[value.name] is value:
        release(value)
        del graph.initializers[value.name]
        return True
    return False


def values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    """The graph's inputs, initializers and node outputs by name (this graph only, not its bodies): for passes
    that reason about tensors by name (calibration ranges, overrides, channel flows)."""
    out: dict[str, ir.Value] = {v.name: v for v in graph.inputs}
    out.update(graph.initializers)
    for node in graph:
        for o in node.outputs:
            if o.name:
                out[o.name] = o
    return out
