"""Validity checks, at three costs.

* ``check_loaded_model`` runs once when a file is loaded, on its protobuf before any pass: structural
  checks with messages that name the node and value (dangling inputs, values produced twice, cycles,
  names that are not UTF-8), opsets and IR versions this onnx does not know, then ``check_model``.
  Nodes that are merely out of order are sorted, not refused.
* ``check_model`` is the full check: the ONNX checker (full) and strict shape inference, plus a refusal
  of tensors whose static shape is too large to ever allocate. It runs on a *skeleton* (large weights
  turned into typed inputs), so it costs the same for a 10 MB and a 10 GB model. It runs at load, on the
  written file before a save is committed (``check_file``), and after every pass in strict mode.
* ``check_ir`` runs after every pass: linear-time invariants of the IR that read no tensor, plus an
  operator-schema check of the nodes the pass added.
"""

from __future__ import annotations

import functools
import heapq
import math
import os
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir

from onnxopt.errors import InvalidModelError, OnnxoptError

# A static shape above this many bytes is refused before anything tries to allocate it.
MAX_TENSOR_BYTES_ENV = "ONNXOPT_MAX_TENSOR_BYTES"
DEFAULT_MAX_TENSOR_BYTES = 1 << 36  # 64 GiB


def max_tensor_bytes() -> int:
    value = os.environ.get(MAX_TENSOR_BYTES_ENV, "").strip()
    if not value:
        return DEFAULT_MAX_TENSOR_BYTES
    try:
        return int(value)
    except ValueError:
        raise OnnxoptError(f"{MAX_TENSOR_BYTES_ENV}={value!r} is not a number of bytes") from None


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    text = lines[0]
    # onnx's checker puts the offending node on the following lines; keep its name and op.
    if text.endswith(":") and len(lines) > 1:
        text = f"{text} {lines[1]}"
    return text[:300]


def human_bytes(n: int) -> str:
    for unit, size in (("PB", 1 << 50), ("TB", 1 << 40), ("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


# --------------------------------------------------------------------------------------------
# The full check: at load, before saving, and after every pass in strict mode
# --------------------------------------------------------------------------------------------
# Initializers up to this size keep their values in the skeleton, so data propagation still sees
# shape tensors, axes and the like; larger ones are weights whose values inference never reads.
KEEP_VALUES_BYTES = 64 * 1024
_ONNX_ERRORS = (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, RuntimeError, ValueError)


def skeleton(model: ir.Model | onnx.ModelProto) -> onnx.ModelProto:
    """The model as a ``ModelProto`` with its large weights turned into graph inputs of the same type and shape.

    What the checker and shape inference need, at a size that does not grow with the weights: no 2 GB
    limit, no copy of every weight. The weights' own bytes were checked when they were loaded (and
    tensors made by passes come from numpy).
    """
    from onnxopt.graph import clone_model, tensor_bytes
    from onnxopt.model_io import as_ir

    light = clone_model(as_ir(model))
    graph = light.graph
    for name, value in list(graph.initializers.items()):
        tensor = value.const_value
        if tensor is None or (not isinstance(tensor, ir.ExternalTensor) and tensor_bytes(tensor) <= KEEP_VALUES_BYTES):
            continue
        del graph.initializers[name]
        value.const_value = None
        value.type = value.type or ir.TensorType(tensor.dtype)
        value.shape = value.shape or ir.Shape(tensor.shape)
        if not value.is_graph_input():
            graph.inputs.append(value)
    return ir.serde.serialize_model(light)


def infer(model: ir.Model | onnx.ModelProto, *, data_prop: bool = True, strict: bool = True) -> onnx.ModelProto:
    """Strict shape inference on the skeleton; returns the inferred skeleton (raises ``InvalidModelError``)."""
    try:
        return onnx.shape_inference.infer_shapes(skeleton(model), check_type=True, strict_mode=strict,
                                                 data_prop=data_prop)
    except _ONNX_ERRORS as exc:
        raise InvalidModelError(_first_line(exc)) from None


def check_model(model: ir.Model | onnx.ModelProto) -> None:
    """Raise ``InvalidModelError`` unless the model passes the ONNX checker (full) and strict shape inference
    and declares no tensor above ``max_tensor_bytes()``. Runs on the skeleton: the cost does not grow
    with the weights."""
    sk = skeleton(model)
    try:
        onnx.checker.check_model(sk, full_check=True)
        inferred = onnx.shape_inference.infer_shapes(sk, check_type=True, strict_mode=True, data_prop=True)
    except _ONNX_ERRORS as exc:
        raise InvalidModelError(_first_line(exc)) from None
    check_value_sizes(inferred)


def check_file(path: str | os.PathLike) -> None:
    """The same on a written file, through onnx's path-based APIs (the file's weights are not loaded)."""
    check_value_sizes(_check_and_infer_path(Path(path)))


def _check_and_infer_path(path: Path) -> onnx.ModelProto:
    """Checker + strict shape inference through onnx's path-based APIs; the inferred model comes back without
    weights."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
        with tempfile.TemporaryDirectory(prefix="onnxopt-infer-") as tmp:
            inferred_path = Path(tmp) / "inferred.onnx"
            onnx.shape_inference.infer_shapes_path(str(path), str(inferred_path), check_type=True,
                                                   strict_mode=True, data_prop=True)
            return onnx.load(str(inferred_path), load_external_data=False)
    except _ONNX_ERRORS as exc:
        raise InvalidModelError(_first_line(exc)) from None


def check_value_sizes(model: onnx.ModelProto) -> None:
    """Refuse any input, output or inferred value whose static shape needs more than ``max_tensor_bytes()``.

    Symbolic dims count as 1: the check is about what the model itself asks for.
    """
    limit = max_tensor_bytes()
    g = model.graph
    for kind, infos in (("input", g.input), ("value", g.value_info), ("output", g.output)):
        for vi in infos:
            if vi.type.WhichOneof("value") != "tensor_type" or not vi.type.tensor_type.HasField("shape"):
                continue
            t = vi.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
            _refuse_if_huge(kind, vi.name, dims, t.elem_type, limit)


def _refuse_if_huge(kind: str, name: str, dims: list[int | None], elem_type: int, limit: int) -> None:
    count = math.prod(max(d, 1) for d in dims if d is not None)
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(elem_type).itemsize
    except Exception:  # noqa: BLE001 - unknown element type: the checker's business
        itemsize = 1
    size = count * max(itemsize, 1)
    if size > limit:
        shape = ", ".join("?" if d is None else str(d) for d in dims)
        dtype = onnx.TensorProto.DataType.Name(elem_type).lower()
        raise InvalidModelError(
            f"{kind} {name!r} has shape [{shape}] {dtype}: {human_bytes(size)}, above the "
            f"{human_bytes(limit)} limit (set {MAX_TENSOR_BYTES_ENV} to raise it); refused before "
            "anything is allocated")


# --------------------------------------------------------------------------------------------
# After every pass: cheap structural invariants of the IR
# --------------------------------------------------------------------------------------------
def check_ir(model: ir.Model, *, known_nodes: set[int] | None = None) -> None:
    """Invariants a pass must keep, in time linear in the nodes and without reading any tensor.

    Every graph (subgraphs too): nodes belong to it and are in topological order; every input a node
    reads is a graph input, an initializer with a value, an earlier node's output or an outer-scope
    value; each value name is defined once; graph outputs are defined; declared static shapes stay
    under ``max_tensor_bytes()``. Nodes not in ``known_nodes`` (ids of the nodes before the pass, i.e.
    what the pass added) are also checked against their operator's schema: the op exists in the
    imported opset, input/output counts fit, required attributes are present.
    """
    limit = max_tensor_bytes()
    _check_graph_ir(model.graph, model.opset_imports, frozenset(), "", known_nodes, limit)


def _check_graph_ir(graph: ir.Graph, opsets: dict[str, int], outer: frozenset[int], where: str,
                    known_nodes: set[int] | None, limit: int) -> None:
    defined: dict[str, str] = {}
    visible: set[int] = set(outer)

    def define(value: ir.Value, what: str) -> None:
        name = value.name
        if name:
            if name in defined and defined[name] != what:
                raise InvalidModelError(f"{where}{name!r} is produced twice (by {defined[name]} and by {what})")
            defined[name] = what
        visible.add(id(value))

    for v in graph.inputs:
        define(v, f"graph input {v.name!r}")
        _size_ok("input", v, limit)
    for name, v in graph.initializers.items():
        if v.const_value is None:
            raise InvalidModelError(f"{where}initializer {name!r} has no value")
        if v.producer() is not None:
            raise InvalidModelError(f"{where}initializer {name!r} is also produced by a node")
        if not v.is_graph_input():
            define(v, f"initializer {name!r}")
    for index, node in enumerate(graph):
        label = f"node {node.name!r}" if node.name else f"node #{index} ({node.op_type})"
        if node.graph is not graph:
            raise InvalidModelError(f"{where}{label} is listed in a graph it does not belong to")
        for i, x in enumerate(node.inputs):
            if x is not None and id(x) not in visible:
                producer = x.producer()
                later = producer is not None and producer.graph is graph
                why = "which is produced later (nodes out of order)" if later else \
                    "which no node, graph input or initializer provides"
                raise InvalidModelError(f"{where}{label} reads {x.name!r} (input {i}), {why}")
        if known_nodes is not None and id(node) not in known_nodes:
            _check_schema(node, label, opsets, where)
        for attr_ in node.attributes.values():
            if attr_.is_ref():
                continue
            bodies = [attr_.value] if attr_.type == ir.AttributeType.GRAPH else \
                list(attr_.value) if attr_.type == ir.AttributeType.GRAPHS else []
            for body in bodies:
                _check_graph_ir(body, opsets, frozenset(visible), f"{where}{label}, subgraph {body.name!r}: ",
                                known_nodes, limit)
        for out in node.outputs:
            if out.producer() is not node:
                raise InvalidModelError(f"{where}{label}: output {out.name!r} names another producer")
            define(out, label)
            _size_ok("value", out, limit)
    for o in graph.outputs:
        if id(o) not in visible:
            raise InvalidModelError(f"{where}graph output {o.name!r} is not produced by any node, graph input "
                                    "or initializer")
        _size_ok("output", o, limit)


def _size_ok(kind: str, value: ir.Value, limit: int) -> None:
    shape, dtype = value.shape, value.dtype
    if shape is None or dtype is None:
        return
    dims = [d if isinstance(d, int) else None for d in shape]
    if all(d is None for d in dims):
        return
    _refuse_if_huge(kind, value.name, dims, int(dtype), limit)


@functools.lru_cache(maxsize=4096)
def _schema(op_type: str, version: int, domain: str):
    try:
        return onnx.defs.get_schema(op_type, version, domain)
    except onnx.defs.SchemaError:
        return None


def _check_schema(node: ir.Node, label: str, opsets: dict[str, int], where: str) -> None:
    domain = "" if node.domain == "ai.onnx" else node.domain
    version = opsets.get(domain, opsets.get("ai.onnx") if domain == "" else None)
    if version is None:
        raise InvalidModelError(f"{where}{label} uses domain {node.domain or 'ai.onnx'!r}, which the model does not "
                                "import")
    if domain not in ("", "ai.onnx.ml"):
        return  # contrib and custom domains: onnx has no schema; the runtime is the judge
    schema = _schema(node.op_type, version, domain)
    if schema is None:
        raise InvalidModelError(f"{where}{label}: no operator {node.op_type!r} in opset {version}")
    n_in = len(node.inputs)
    n_out = len(node.outputs)
    if n_in < schema.min_input or n_in > schema.max_input:
        raise InvalidModelError(f"{where}{label}: {node.op_type} takes {schema.min_input}..{schema.max_input} "
                                f"inputs, got {n_in}")
    if n_out < schema.min_output or n_out > schema.max_output:
        raise InvalidModelError(f"{where}{label}: {node.op_type} gives {schema.min_output}..{schema.max_output} "
                                f"outputs, got {n_out}")
    for name, spec in schema.attributes.items():
        if spec.required and name not in node.attributes:
            raise InvalidModelError(f"{where}{label}: {node.op_type} needs attribute {name!r}")


# --------------------------------------------------------------------------------------------
# Once, on load
# --------------------------------------------------------------------------------------------
def check_loaded_model(model: onnx.ModelProto, path: str | os.PathLike | None = None) -> bool:
    """Everything a loaded model must pass before any pass runs. Sorts out-of-order nodes in place
    (returns True if it did); raises ``InvalidModelError`` naming the problem otherwise.

    The checker and shape inference run on the skeleton (external data files are never read; their
    bytes were checked against the tensors' shapes already).
    """
    check_versions(model)
    reordered = check_structure(model.graph)
    check_model(model)
    return reordered


@functools.cache
def _known_opsets() -> dict[str, int]:
    """Newest opset onnx knows for each of its own domains."""
    known: dict[str, int] = {}
    for schema in onnx.defs.get_all_schemas_with_history():
        known[schema.domain] = max(known.get(schema.domain, 0), schema.since_version)
    known[""] = max(known.get("", 0), onnx.defs.onnx_opset_version())
    return {d: v for d, v in known.items() if d in ("", "ai.onnx.ml")}


def check_versions(model: onnx.ModelProto) -> None:
    known = _known_opsets()
    if model.ir_version > onnx.IR_VERSION:
        raise InvalidModelError(f"IR version {model.ir_version} is newer than onnx {onnx.__version__} supports "
                                f"(up to {onnx.IR_VERSION})")
    seen: set[str] = set()
    for op in model.opset_import:
        domain = "" if op.domain == "ai.onnx" else op.domain  # two spellings of the default domain
        label = f"opset {op.version} of domain {op.domain or 'ai.onnx'!r}"
        if domain in seen:
            raise InvalidModelError(f"domain {op.domain or 'ai.onnx'!r} is imported twice in opset_import")
        seen.add(domain)
        if op.version < 1:
            raise InvalidModelError(f"{label} is not a valid opset version")
        if domain in known and op.version > known[domain]:
            raise InvalidModelError(f"{label} is not supported: onnx {onnx.__version__} knows up to "
                                    f"opset {known[domain]}")


def _node_label(node: onnx.NodeProto, index: int) -> str:
    name = node.name if isinstance(node.name, str) else None
    return f"node {name!r}" if name else f"node #{index} ({node.op_type})"


def _utf8(value, what: str, where: str) -> None:
    if isinstance(value, bytes):  # protobuf hands back bytes for a string field that is not UTF-8
        raise InvalidModelError(f"{where}{what} is not valid UTF-8 text ({value!r})")


def check_structure(graph: onnx.GraphProto, outer: frozenset[str] = frozenset(), where: str = "") -> bool:
    """Single assignment, no dangling reads, no cycles, in this graph and its subgraphs.

    Sorts the nodes (stable: a valid order is kept) and returns True if some order changed.
    """
    produced: dict[str, str] = {}

    def define(name, what: str) -> None:
        _utf8(name, f"a name produced by {what}", where)
        if not name:
            return
        if name in produced:
            raise InvalidModelError(f"{where}{name!r} is produced twice (by {produced[name]} and by {what})")
        produced[name] = what

    for i in graph.input:
        define(i.name, f"graph input {i.name!r}")
    inputs = {i.name for i in graph.input}
    initializers: set[str] = set()
    for t in graph.initializer:
        _utf8(t.name, "an initializer name", where)
        if t.name in initializers:
            raise InvalidModelError(f"{where}{t.name!r} is produced twice (by initializer {t.name!r} and by "
                                    f"initializer {t.name!r})")
        initializers.add(t.name)
        if t.name not in inputs:  # an initializer may give a graph input its default value
            define(t.name, f"initializer {t.name!r}")
    for index, node in enumerate(graph.node):
        label = _node_label(node, index)
        for field in ("name", "op_type", "domain"):
            _utf8(getattr(node, field), f"the {field} of node #{index}", where)
        for name in node.input:
            _utf8(name, f"an input name of {label}", where)
        for name in node.output:
            define(name, label)
    for vi in graph.value_info:
        _utf8(vi.name, "a value_info name", where)

    visible = outer | frozenset(produced)
    for index, node in enumerate(graph.node):
        for name in node.input:
            if name and name not in visible:
                raise InvalidModelError(f"{where}{_node_label(node, index)} reads {name!r}, which no node, "
                                        "graph input or initializer provides")
    for o in graph.output:
        _utf8(o.name, "a graph output name", where)
        if o.name not in visible:
            raise InvalidModelError(f"{where}graph output {o.name!r} is not produced by any node, graph input "
                                    "or initializer")
    changed = False
    for index, node in enumerate(graph.node):
        for body in subgraphs(node):
            changed |= check_structure(body, visible, f"{where}{_node_label(node, index)}, subgraph "
                                                      f"{body.name!r}: ")
    return _sort(graph, where) or changed


def subgraphs(node: onnx.NodeProto):
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            yield from a.graphs


def implicit_inputs(node: onnx.NodeProto) -> set[str]:
    """Outer-scope names a (protobuf) node's subgraphs read: they order the node after their producers."""
    used: set[str] = set()
    for g in subgraphs(node):
        defined = {i.name for i in g.input} | {t.name for t in g.initializer}
        for n in g.node:
            used.update(x for x in n.input if x and x not in defined)
            used.update(x for x in implicit_inputs(n) if x not in defined)
            defined.update(n.output)
        used.update(o.name for o in g.output if o.name not in defined)
    return used


def _sort(graph: onnx.GraphProto, where: str) -> bool:
    nodes = list(graph.node)
    producer = {out: i for i, n in enumerate(nodes) for out in n.output if out}
    deps: list[set[int]] = []
    dependents: list[list[int]] = [[] for _ in nodes]
    for i, n in enumerate(nodes):
        d = {producer[x] for x in list(n.input) + sorted(implicit_inputs(n)) if x in producer}
        deps.append(d)
        for j in d:
            dependents[j].append(i)
    waiting = [len(d) for d in deps]
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for j in dependents[i]:
            waiting[j] -= 1
            if waiting[j] == 0:
                heapq.heappush(ready, j)
    if len(order) != len(nodes):
        stuck = {i for i, w in enumerate(waiting) if w > 0}
        # drop nodes that only hang below the cycle, so the message names the cycle itself
        pruned = True
        while pruned:
            pruned = False
            for i in sorted(stuck):
                if not any(j in stuck for j in dependents[i]):
                    stuck.discard(i)
                    pruned = True
        names = [_node_label(nodes[i], i).removeprefix("node ") for i in sorted(stuck)]
        more = f" and {len(names) - 6} more" if len(names) > 6 else ""
        raise InvalidModelError(f"{where}graph has a cycle through nodes {', '.join(names[:6])}{more}")
    if order == list(range(len(nodes))):
        return False
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)
    return True
