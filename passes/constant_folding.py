"""Constant folding: precompute what does not depend on the inputs, shape arithmetic included.

Values are computed by ONNX Runtime (the kernels that would run the model), so folding is
exact. Shape tensors are also tracked element by element as known ints or symbols (a
dim_param, or "dim i of T"): a Shape chain whose elements are all known folds to a constant,
and a Reshape target such as [N, -1] becomes [0, -1] when N is the data's own dim 0, so the
chain computing it dies even though the batch dim stays dynamic.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import helper
from pydantic import Field

from onnxopt.checks import infer
from onnxopt.errors import PreconditionError
from onnxopt.graph import (
    DEFAULT_DOMAINS,
    Namer,
    add_initializer,
    ancestors,
    attr,
    constant_tensor,
    is_initializer,
    is_op,
    opset_version,
    subgraphs,
    tensor_bytes,
    values_by_name,
)
from onnxopt.pass_infra import Pass, PassConfig, PassResult

NONDETERMINISTIC = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
                              "Multinomial", "Bernoulli", "Dropout"})
# Outputs can be far larger than inputs: fold only once inference knows how large.
GROWING = frozenset({"ConstantOfShape", "Expand", "Tile", "Range", "Resize", "Upsample", "Pad", "OneHot",
                     "EyeLike", "CenterCropPad"})
INT_TYPES = frozenset({onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.INT16,
                       onnx.TensorProto.INT8, onnx.TensorProto.UINT64, onnx.TensorProto.UINT32,
                       onnx.TensorProto.UINT16, onnx.TensorProto.UINT8})
# Constants up to this many elements are read as shape arithmetic (indices, axes, starts...).
SMALL_ELEMENTS = 1024
MAX_ROUNDS = 8
# A folding plan whose constant inputs exceed this many bytes runs node by node, so that large weights
# (a transposed or scaled weight) are held one at a time, not all at once.
PLAN_FEED_BYTES = 64 << 20


class ConstantFoldingConfig(PassConfig):
    type: Literal["constant-folding"] = "constant-folding"
    # A folded node adding more bytes than this must free at least as many (e.g. transposing a weight).
    max_output_bytes: int = Field(4 * 2**20, ge=0)
    fold_shapes: bool = True


@dataclass(frozen=True)
class Sym:
    """An unknown element of a shape value; equal symbols are equal at run time."""

    key: tuple


def infer_value_types(model: ir.Model) -> dict[str, onnx.TypeProto]:
    """Inferred types of the main graph's values (empty if inference fails), from shape inference on the
    weight-less skeleton (small constants keep their values for data propagation)."""
    try:
        inferred = infer(model, strict=False, data_prop=True).graph
        infos = list(inferred.input) + list(inferred.output) + list(inferred.value_info)
    except Exception:  # noqa: BLE001 - folding still works without shapes, just less of it
        infos = []
    types = {v.name: v.type for v in infos}
    for name, v in model.graph.initializers.items():
        t = v.const_value
        if t is not None:
            types.setdefault(name, helper.make_tensor_type_proto(int(t.dtype), list(t.shape.numpy())))
    return types


def _itemsize(elem_type: int) -> int | None:
    try:
        dtype = helper.tensor_dtype_to_np_dtype(elem_type)
    except (KeyError, ValueError):
        return None
    return None if dtype == np.dtype(object) else dtype.itemsize


def _is_constant_node(node: ir.Node) -> bool:
    """A ``Constant`` node whose value becomes an initializer (sparse values stay: densifying could blow the
    model up)."""
    if not is_op(node, "Constant") or len(node.attributes) != 1:
        return False
    name = next(iter(node.attributes))
    return name in ("value_string", "value_strings") or (name != "sparse_value"
                                                        and constant_tensor(node.outputs[0]) is not None)


def _constant_node_tensor(node: ir.Node) -> ir.TensorProtocol:
    a = next(iter(node.attributes.values()))
    if a.name == "value_string":
        return ir.StringTensor([a.value.encode()], shape=ir.Shape([]))
    if a.name == "value_strings":
        return ir.StringTensor([v.encode() for v in a.value], shape=ir.Shape([len(a.value)]))
    return constant_tensor(node.outputs[0])


def evaluate(model: ir.Model, nodes: list[ir.Node], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run ``nodes`` (of ``model``) on the constant ``feeds`` with ONNX Runtime (onnx.reference if ORT cannot),
    as a model of their own: only these nodes and their inputs are serialized."""
    outputs = [o.name for n in nodes for o in n.outputs if o.name]
    graph = helper.make_graph([ir.serde.serialize_node(n) for n in nodes], "fold", [],
                              [helper.make_empty_tensor_value_info(o) for o in outputs],
                              initializer=[onnx.numpy_helper.from_array(v, k) for k, v in feeds.items()])
    sub = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in model.opset_imports.items()])
    sub.ir_version = model.ir_version
    try:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.log_severity_level = 4
        opts.intra_op_num_threads = 1  # tiny graphs: a thread pool costs more than it saves
        sess = ort.InferenceSession(sub.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        values = sess.run(outputs, {})
    except Exception:  # noqa: BLE001 - e.g. a type ORT has no kernel for
        from onnx.reference import ReferenceEvaluator

        values = ReferenceEvaluator(sub).run(outputs, {})
    return {name: v for name, v in zip(outputs, values, strict=True) if isinstance(v, np.ndarray)}


def _replace_with_initializer(graph: ir.Graph, old: ir.Value, tensor: ir.TensorProtocol, namer: Namer) -> ir.Value:
    """Make ``old`` (a node output) an initializer holding ``tensor``: readers and graph outputs switch to the
    new value, which takes ``old``'s name once ``old`` is gone with its node."""
    new = add_initializer(graph, tensor, namer.unique(f"{old.name}__folded"))
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    return new


def _live_output_names(graph: ir.Graph) -> set[str]:
    live = ancestors(graph, graph.outputs)
    return {o.name for n in graph if n in live for o in n.outputs}


class ConstantFolding(Pass):
    name = "constant-folding"
    summary = "Precompute nodes with constant inputs and static shape arithmetic; Constant nodes become initializers."
    Config = ConstantFoldingConfig

    def call(self, model: ir.Model) -> PassResult:
        stats: Counter = Counter()
        if model.ir_version < 4:  # initializers are graph inputs there, so nothing is constant
            return PassResult(model, False, {"skipped": "ir_version < 4"})
        g = model.graph
        self.namer = Namer(g)
        self.renames: list[tuple[ir.Value, str]] = []
        live_before = _live_output_names(g)
        read_before = {x.name for n in g for x in n.inputs if x is not None} | {o.name for o in g.outputs}
        stats["constants"] = self._constants_to_initializers(g)
        for _ in range(MAX_ROUNDS):
            if not self._round(model, stats):
                break
        # Clear what folding orphaned (the Shape chain of a rewritten Reshape, replaced weights).
        live = ancestors(g, g.outputs)
        orphaned = [n for n in g if n not in live and any(o.name in live_before for o in n.outputs)]
        if orphaned:
            g.remove(orphaned, safe=True)
        stats["removed"] = len(orphaned)
        for name in [k for k, v in g.initializers.items()
                     if k in read_before and not v.uses() and not v.is_graph_input() and not v.is_graph_output()]:
            del g.initializers[name]
            stats["removed"] += 1
        for value, name in self.renames:  # the folded values take their original names back
            if value.name in g.initializers:
                del g.initializers[value.name]
                value.name = name
                g.register_initializer(value)
        details = {k: stats[k] for k in ("constants", "folded", "shape_folded", "reshapes", "removed")}
        return PassResult(model, any(details.values()), details)

    def ensures(self, model: ir.Model) -> None:
        left = [n.outputs[0].name for n in model.graph if _is_constant_node(n)]
        if left:
            raise PreconditionError(f"Constant nodes left after constant folding: {left[:3]}")

    def _constants_to_initializers(self, graph: ir.Graph) -> int:
        doomed = []
        for node in graph:
            if _is_constant_node(node):
                out = node.outputs[0]
                new = _replace_with_initializer(graph, out, _constant_node_tensor(node), self.namer)
                self.renames.append((new, out.name))
                doomed.append(node)
        if doomed:
            graph.remove(doomed, safe=True)
        self._apply_renames(graph)
        return len(doomed)

    def _apply_renames(self, graph: ir.Graph) -> None:
        for value, name in self.renames:
            if value.name != name and value.name in graph.initializers:
                del graph.initializers[value.name]
                value.name = name
                graph.register_initializer(value)
        self.renames = []

    # --- one round: numeric folding, then symbolic shapes, then rewrite -------------------
    def _round(self, model: ir.Model, stats: Counter) -> bool:
        g = model.graph
        self.model = model
        self.by_name = values_by_name(g)
        self.types = infer_value_types(model)
        self.opset = opset_version(model)
        nodes = list(g)
        values = self._fold_numeric(model, nodes)
        folded = {i for i, n in enumerate(nodes) if n.outputs and all(o.name in values for o in n.outputs if o.name)}
        stats["folded"] += len(folded)
        reshapes: list[tuple[ir.Node, np.ndarray]] = []
        if self.config.fold_shapes:
            shape_folded = self._fold_symbolic(nodes, folded, values, reshapes)
            stats["shape_folded"] += len(shape_folded)
            folded |= shape_folded
        stats["reshapes"] += len(reshapes)
        if not folded and not reshapes:
            return False
        doomed = [nodes[i] for i in folded]
        doomed_set = set(doomed)
        for node in doomed:
            for out in node.outputs:
                needed = out.is_graph_output() or any(u.node not in doomed_set for u in out.uses())
                if out.name and needed:
                    new = _replace_with_initializer(g, out, ir.tensor(values[out.name]), self.namer)
                    self.renames.append((new, out.name))
        g.remove(doomed, safe=True)
        self._apply_renames(g)
        # after the folded values have their names back: initializers keep the order folded values, then targets
        for node, shape in reshapes:
            node.replace_input_with(1, add_initializer(g, shape, f"{node.outputs[0].name}_shape", self.namer))
        return True

    def _names(self, node: ir.Node) -> list[str]:
        return [x.name if x is not None else "" for x in node.inputs]

    def _is_constant(self, name: str) -> bool:
        return is_initializer(self.by_name.get(name))

    def _bytes(self, name: str) -> int | None:
        t = self.types.get(name)
        if t is None or not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
            return None
        dims = t.tensor_type.shape.dim
        if not all(d.HasField("dim_value") for d in dims):
            return None
        size = _itemsize(t.tensor_type.elem_type)
        return None if size is None else size * math.prod(d.dim_value for d in dims)

    def _can_fold(self, node: ir.Node) -> bool:
        if node.domain not in DEFAULT_DOMAINS or node.op_type in NONDETERMINISTIC or node.op_type == "Constant":
            return False
        if any(True for _ in subgraphs(node)) or any(a.is_ref() for a in node.attributes.values()):
            return False
        outputs = [self.types.get(o.name) for o in node.outputs if o.name]
        return bool(outputs) and all(t is None or t.HasField("tensor_type") for t in outputs)

    def _affordable(self, node: ir.Node, out_bytes: int, sizes: dict[str, int | None]) -> bool:
        if out_bytes <= self.config.max_output_bytes:
            return True
        freed = 0
        for x in {x for x in node.inputs if x is not None}:
            if not x.is_graph_output() and all(u.node is node for u in x.uses()):
                freed += sizes.get(x.name) or 0
        return out_bytes <= freed

    def _fold_numeric(self, model: ir.Model, nodes: list[ir.Node]) -> dict[str, np.ndarray]:
        known = {name for name in self.by_name if self._is_constant(name)}
        sizes: dict[str, int | None] = {name: self._bytes(name) for name in known}
        plan: list[ir.Node] = []
        for node in nodes:
            if not self._can_fold(node) or not all(x in known for x in self._names(node) if x):
                continue
            outs = [o.name for o in node.outputs if o.name]
            est = [self._bytes(o) for o in outs]
            if None in est:
                if node.op_type in GROWING:
                    continue
            elif not self._affordable(node, sum(est), sizes):
                continue
            plan.append(node)
            known.update(outs)
            sizes.update(zip(outs, est, strict=True))
        if not plan:
            return {}
        produced = {o.name for n in plan for o in n.outputs}
        feeds = sorted({x for n in plan for x in self._names(n) if x and x not in produced})
        values: dict[str, np.ndarray] = {}
        if sum(tensor_bytes(self.by_name[x].const_value) for x in feeds) <= PLAN_FEED_BYTES:
            try:
                values = evaluate(model, plan, {x: self.by_name[x].const_value.numpy() for x in feeds})
            except Exception:  # noqa: BLE001 - one bad node must not stop the others: go node by node
                values = {}
        if not values:
            for node in plan:
                inputs = [x for x in self._names(node) if x]
                if not all(x in values or self._is_constant(x) for x in inputs):
                    continue
                node_feeds = {x: values[x] if x in values else self.by_name[x].const_value.numpy()
                              for x in dict.fromkeys(inputs)}
                try:
                    values.update(evaluate(model, [node], node_feeds))
                except Exception:  # noqa: BLE001
                    continue
                finally:
                    del node_feeds
        # Keep what evaluated and, now that sizes are known, is still affordable.
        kept: dict[str, np.ndarray] = {}
        for node in plan:
            outs = [o.name for o in node.outputs if o.name]
            if not all(o in values for o in outs):
                continue
            if not all(x in kept or self._is_constant(x) for x in self._names(node) if x):
                continue
            sizes.update((o, values[o].nbytes) for o in outs)
            if self._affordable(node, sum(values[o].nbytes for o in outs), sizes):
                kept.update((o, values[o]) for o in outs)
        return kept

    # --- symbolic shape values -----------------------------------------------------------
    def _fold_symbolic(self, nodes, folded, values, reshapes) -> set[int]:
        self.syms: dict[str, np.ndarray] = {}
        self.values = values
        done = set()
        for i, node in enumerate(nodes):
            if i in folded or node.domain not in DEFAULT_DOMAINS:
                continue
            node = _Named(node)
            if node.op_type == "Reshape":
                shape = self._reshape_target(node)
                if shape is not None:
                    reshapes.append((node.node, shape))
                continue
            rule = getattr(self, f"_sym_{node.op_type}", None)
            try:
                out = rule(node) if rule is not None else None
            except (ValueError, IndexError, TypeError):
                out = None
            if out is None:
                continue
            if any(isinstance(e, Sym) for e in out.flat):
                self.syms[node.output[0]] = out
                continue
            try:
                values[node.output[0]] = np.array(out.tolist(), dtype=self._np_type(node.output[0]))
            except OverflowError:
                continue
            done.add(i)
        return done

    def _np_type(self, name: str):
        t = self.types.get(name)
        if t is not None and t.HasField("tensor_type") and t.tensor_type.elem_type in INT_TYPES:
            return helper.tensor_dtype_to_np_dtype(t.tensor_type.elem_type)
        return np.int64

    def _dims(self, name: str) -> list | None:
        t = self.types.get(name)
        if t is None or not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
            return None
        return [d.dim_value if d.HasField("dim_value") else Sym(("param", d.dim_param)) if d.dim_param
                else Sym(("dim", name, i)) for i, d in enumerate(t.tensor_type.shape.dim)]

    def _const(self, name: str) -> np.ndarray | None:
        """A small constant integer value (indices, axes, starts...)."""
        if name in self.values:
            v = self.values[name]
        elif self._is_constant(name) and self.by_name[name].const_value.size <= SMALL_ELEMENTS:
            v = self.by_name[name].const_value.numpy()
        else:
            return None
        return v if v.dtype.kind in "iu" and v.size <= SMALL_ELEMENTS else None

    def _sym(self, name: str) -> np.ndarray | None:
        if name in self.syms:
            return self.syms[name]
        v = self._const(name)
        return None if v is None else _objects(v)

    def _axes(self, node: _Named, since: int) -> tuple[bool, list[int] | None]:
        """(known, axes): axes from the attribute or, from opset ``since``, the constant input."""
        if self.opset < since:
            return True, _attr(node, "axes")
        if len(node.input) < 2 or not node.input[1]:
            return True, None
        v = self._const(node.input[1])
        return (False, None) if v is None else (True, [int(a) for a in v.reshape(-1)])

    def _sym_Shape(self, node):
        dims = self._dims(node.input[0])
        if dims is None:
            return None
        return _objects(dims[_attr(node, "start", 0): _attr(node, "end", len(dims))])

    def _sym_Size(self, node):
        dims = self._dims(node.input[0])
        if dims is None or any(isinstance(d, Sym) for d in dims):
            return None
        return _objects(math.prod(dims))

    def _sym_Identity(self, node):
        return self._sym(node.input[0])

    def _sym_Cast(self, node):
        x = self._sym(node.input[0])
        return x if x is not None and _attr(node, "to") in (onnx.TensorProto.INT64, onnx.TensorProto.INT32) else None

    def _sym_Gather(self, node):
        data, idx = self._sym(node.input[0]), self._const(node.input[1])
        if data is None or idx is None or data.ndim != 1 or _attr(node, "axis", 0) not in (0, -1):
            return None
        if np.any(idx < -len(data)) or np.any(idx >= len(data)):
            return None
        return _objects(np.take(data, idx))

    def _sym_Unsqueeze(self, node):
        x, (known, axes) = self._sym(node.input[0]), self._axes(node, 13)
        return None if x is None or not known or axes is None else np.expand_dims(x, tuple(axes))

    def _sym_Squeeze(self, node):
        x, (known, axes) = self._sym(node.input[0]), self._axes(node, 13)
        if x is None or not known:
            return None
        return np.squeeze(x) if axes is None else np.squeeze(x, tuple(axes))

    def _sym_Concat(self, node):
        parts = [self._sym(x) for x in node.input]
        if not parts or any(p is None for p in parts):
            return None
        return np.concatenate(parts, axis=_attr(node, "axis"))

    def _sym_Slice(self, node):
        x = self._sym(node.input[0])
        if x is None or x.ndim != 1:
            return None
        if self.opset >= 10:
            names = list(node.input[1:5]) + [""] * (5 - len(node.input))
            args = [self._const(n) if n else None for n in names]
            if any(n and a is None for n, a in zip(names, args, strict=True)) or args[0] is None or args[1] is None:
                return None
            starts, ends, axes, steps = args
        else:
            starts, ends, axes, steps = _attr(node, "starts"), _attr(node, "ends"), _attr(node, "axes"), None
        if len(starts) != 1 or (axes is not None and [int(a) for a in axes] not in ([0], [-1])):
            return None
        step = 1 if steps is None else int(steps[0])
        return None if step == 0 else x[int(starts[0]): int(ends[0]): step]

    def _arith(self, node, op):
        a, b = self._sym(node.input[0]), self._sym(node.input[1])
        if a is None or b is None:
            return None
        a, b = np.broadcast_arrays(a, b)
        out = np.empty(a.shape, dtype=object)
        for k, (x, y) in enumerate(zip(a.flat, b.flat, strict=True)):
            value = op(x, y)
            out.flat[k] = Sym(("op", node.output[0], k)) if value is None else value
        return out

    def _sym_Add(self, node):
        return self._arith(node, lambda x, y: _known(x, y, x + y if _ints(x, y) else None, 0))

    def _sym_Sub(self, node):
        return self._arith(node, lambda x, y: x - y if _ints(x, y) else (x if y == 0 else None))

    def _sym_Mul(self, node):
        return self._arith(node, lambda x, y: _known(x, y, x * y if _ints(x, y) else None, 1))

    def _sym_Div(self, node):
        def div(x, y):
            if _ints(x, y):
                return None if y == 0 else (abs(x) // abs(y)) * (1 if (x < 0) == (y < 0) else -1)
            return x if y == 1 else None
        return self._arith(node, div)

    def _reshape_target(self, node: _Named) -> np.ndarray | None:
        """A constant equivalent of a partially known Reshape shape, if there is one."""
        shape = self.syms.get(node.input[1]) if len(node.input) > 1 else None
        if shape is None or shape.ndim != 1:
            return None
        allowzero = _attr(node, "allowzero", 0)
        data = self._dims(node.input[0]) or []
        new = list(shape)
        if not allowzero:
            new = [0 if isinstance(e, Sym) and i < len(data) and data[i] == e else e for i, e in enumerate(new)]
        unknown = [i for i, e in enumerate(new) if isinstance(e, Sym)]
        if len(unknown) == 1 and -1 not in new and not (allowzero and 0 in new):
            new[unknown[0]] = -1
        if any(isinstance(e, Sym) for e in new):
            return None
        return np.array(new, dtype=np.int64)


class _Named:
    """A node seen through its input and output names (the symbolic rules work on names)."""

    def __init__(self, node: ir.Node):
        self.node = node
        self.input = [x.name if x is not None else "" for x in node.inputs]
        self.output = [o.name or "" for o in node.outputs]
        self.op_type = node.op_type


def _attr(node, name: str, default=None):
    return attr(node.node if isinstance(node, _Named) else node, name, default)


def _objects(values) -> np.ndarray:
    arr = np.asarray(values, dtype=object)
    out = np.empty(arr.shape, dtype=object)
    for k, v in enumerate(arr.flat):
        out.flat[k] = v if isinstance(v, Sym) else int(v)
    return out


def _ints(*xs) -> bool:
    return all(not isinstance(x, Sym) for x in xs)


def _known(x, y, value, unit):
    """``value`` if both are known, else the symbol when the other operand is the identity element."""
    if value is not None:
        return value
    if y == unit and isinstance(x, Sym):
        return x
    if x == unit and isinstance(y, Sym):
        return y
    return None
