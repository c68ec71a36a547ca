"""Validity checks.

``check_model`` runs after every pass: the ONNX checker (full) and strict shape inference, plus a
refusal of tensors whose static shape is too large to ever allocate.

``check_loaded_model`` runs once when a file is loaded, before any pass: structural checks with
messages that name the node and value (dangling inputs, values produced twice, cycles, names that
are not UTF-8), opsets and IR versions this onnx does not know, then ``check_model``. Nodes that are
merely out of order are sorted, not refused.

Above ``model_io.large_model_threshold()`` (2 GiB: protobuf's limit) the model is checked through a
temporary file with external data, using onnx's path-based checker and shape inference.
"""

from __future__ import annotations

import functools
import heapq
import math
import os
import tempfile
from pathlib import Path

import onnx

from onnxopt.errors import InvalidModelError, OnnxoptError
from onnxopt.graph import implicit_inputs, subgraphs
from onnxopt.model_io import large_model_threshold, save_model, serialized_size

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
# After every pass
# --------------------------------------------------------------------------------------------
def check_model(model: onnx.ModelProto) -> None:
    """Raise ``InvalidModelError`` unless the model passes the checker and strict shape inference
    and declares no tensor above ``max_tensor_bytes()``."""
    check_value_sizes(_check_and_infer(model))


_ONNX_ERRORS = (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, RuntimeError, ValueError)


def _check_and_infer(model: onnx.ModelProto) -> onnx.ModelProto:
    """Checker (full) + strict shape inference; returns the inferred model (without weights when large)."""
    if serialized_size(model) > large_model_threshold():
        with tempfile.TemporaryDirectory(prefix="onnxopt-check-") as tmp:
            path = Path(tmp) / "model.onnx"
            save_model(model, path, external_data=True)
            return _check_and_infer_path(path)
    try:
        onnx.checker.check_model(model, full_check=True)
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except _ONNX_ERRORS as exc:
        raise InvalidModelError(_first_line(exc)) from None


def _check_and_infer_path(path: Path) -> onnx.ModelProto:
    """The same through onnx's path-based APIs (no 2 GiB limit); the inferred model comes back without weights."""
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
            count = math.prod(max(d, 1) for d in dims if d is not None)
            try:
                itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).itemsize
            except Exception:  # noqa: BLE001 - unknown element type: the checker's business
                itemsize = 1
            size = count * max(itemsize, 1)
            if size > limit:
                shape = ", ".join("?" if d is None else str(d) for d in dims)
                dtype = onnx.TensorProto.DataType.Name(t.elem_type).lower()
                raise InvalidModelError(
                    f"{kind} {vi.name!r} has shape [{shape}] {dtype}: {human_bytes(size)}, above the "
                    f"{human_bytes(limit)} limit (set {MAX_TENSOR_BYTES_ENV} to raise it); refused before "
                    "anything is allocated")


# --------------------------------------------------------------------------------------------
# Once, on load
# --------------------------------------------------------------------------------------------
def check_loaded_model(model: onnx.ModelProto, path: str | os.PathLike | None = None) -> bool:
    """Everything a loaded model must pass before any pass runs. Sorts out-of-order nodes in place
    (returns True if it did); raises ``InvalidModelError`` naming the problem otherwise.

    ``path``: the file the model came from. When its external data was not loaded, the checker and
    shape inference run on that file instead (skipped if the nodes had to be sorted: the file is not
    rewritten; they run when the data is loaded).
    """
    check_versions(model)
    reordered = check_structure(model.graph)
    lazy = any(t.data_location == onnx.TensorProto.EXTERNAL and not t.HasField("raw_data")
               for t in model.graph.initializer)
    if not lazy:
        check_model(model)
    elif path is not None and not reordered:
        check_value_sizes(_check_and_infer_path(Path(path)))
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
