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
import onnxruntime as ort
from onnx import helper, numpy_helper
from pydantic import Field

from onnxopt.errors import PreconditionError
from onnxopt.legacy_graph import (
    GraphIndex,
    attr,
    dead_nodes,
    defined_names,
    delete_nodes,
    drop_initializers,
    drop_value_info,
    opset_version,
    read_names,
    subgraphs,
)
from onnxopt.pass_infra import PassConfig, PassResult, ProtoPass

DEFAULT_DOMAINS = ("", "ai.onnx")
NONDETERMINISTIC = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
                              "Multinomial", "Bernoulli", "Dropout"})
# Outputs can be far larger than inputs: fold only once inference knows how large.
GROWING = frozenset({"ConstantOfShape", "Expand", "Tile", "Range", "Resize", "Upsample", "Pad", "OneHot",
                     "EyeLike", "CenterCropPad"})
INT_TYPES = frozenset({onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.INT16,
                       onnx.TensorProto.INT8, onnx.TensorProto.UINT64, onnx.TensorProto.UINT32,
                       onnx.TensorProto.UINT16, onnx.TensorProto.UINT8})
# Initializers up to this many elements stay in the copy used for shape inference (data propagation
# reads small ones); bigger ones become typed inputs so inference does not serialize the weights.
SMALL_ELEMENTS = 1024
MAX_ROUNDS = 8


class ConstantFoldingConfig(PassConfig):
    type: Literal["constant-folding"] = "constant-folding"
    # A folded node adding more bytes than this must free at least as many (e.g. transposing a weight).
    max_output_bytes: int = Field(4 * 2**20, ge=0)
    fold_shapes: bool = True


@dataclass(frozen=True)
class Sym:
    """An unknown element of a shape value; equal symbols are equal at run time."""

    key: tuple


def infer_value_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Inferred types of the main graph's values (empty if inference fails)."""
    g = model.graph
    light = onnx.GraphProto(name=g.name)
    light.node.extend(g.node)
    light.input.extend(g.input)
    light.output.extend(g.output)
    light.value_info.extend(g.value_info)
    declared = {i.name for i in g.input}
    for t in g.initializer:
        if math.prod(t.dims) <= SMALL_ELEMENTS and t.data_location != onnx.TensorProto.EXTERNAL:
            light.initializer.append(t)
        elif t.name not in declared:
            light.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    probe = helper.make_model(light, opset_imports=list(model.opset_import), functions=list(model.functions))
    probe.ir_version = model.ir_version
    try:
        inferred = onnx.shape_inference.infer_shapes(probe, data_prop=True).graph
    except Exception:  # noqa: BLE001 - folding still works without shapes, just less of it
        inferred = light
    types = {v.name: v.type for v in list(inferred.input) + list(inferred.output) + list(inferred.value_info)}
    for t in g.initializer:
        types.setdefault(t.name, helper.make_tensor_type_proto(t.data_type, list(t.dims)))
    return types


def _itemsize(elem_type: int) -> int | None:
    try:
        dtype = helper.tensor_dtype_to_np_dtype(elem_type)
    except (KeyError, ValueError):
        return None
    return None if dtype == np.dtype(object) else dtype.itemsize


def _constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """The value of a ``Constant`` node as an initializer named after its output."""
    if node.op_type != "Constant" or node.domain not in DEFAULT_DOMAINS or len(node.attribute) != 1:
        return None
    a = node.attribute[0]
    if a.name == "value":
        t = onnx.TensorProto()
        t.CopyFrom(a.t)
        t.name = node.output[0]
        return t
    arrays = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64,
              "value_ints": np.int64, "value_string": object, "value_strings": object}
    if a.name not in arrays:
        return None  # sparse_value: densifying could blow the model up
    return numpy_helper.from_array(np.array(helper.get_attribute_value(a), dtype=arrays[a.name]), node.output[0])


def _session_model(model: onnx.ModelProto, nodes: list[onnx.NodeProto],
                   feeds: list[onnx.TensorProto]) -> tuple[onnx.ModelProto, list[str]]:
    outputs = [o for n in nodes for o in n.output if o]
    graph = helper.make_graph(nodes, "fold", [], [helper.make_empty_tensor_value_info(o) for o in outputs],
                              initializer=feeds)
    sub = helper.make_model(graph, opset_imports=list(model.opset_import))
    sub.ir_version = model.ir_version
    return sub, outputs


def evaluate(model: onnx.ModelProto, nodes: list[onnx.NodeProto],
             feeds: list[onnx.TensorProto]) -> dict[str, np.ndarray]:
    """Run ``nodes`` on constant ``feeds`` with ONNX Runtime (onnx.reference if ORT cannot)."""
    sub, outputs = _session_model(model, nodes, feeds)
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


class ConstantFolding(ProtoPass):
    name = "constant-folding"
    summary = "Precompute nodes with constant inputs and static shape arithmetic; Constant nodes become initializers."
    Config = ConstantFoldingConfig

    def call(self, model: onnx.ModelProto) -> PassResult:
        stats: Counter = Counter()
        if model.ir_version < 4:  # initializers are graph inputs there, so nothing is constant
            return PassResult(model, False, {"skipped": "ir_version < 4"})
        g = model.graph
        dead_before = {tuple(n.output) for n in dead_nodes(g)}
        read_before, defined_before = read_names(g), defined_names(g)
        stats["constants"] = self._constants_to_initializers(g)
        for _ in range(MAX_ROUNDS):
            if not self._round(model, stats):
                break
        # Clear what folding orphaned (the Shape chain of a rewritten Reshape, replaced weights).
        stats["removed"] = delete_nodes(g, [n for n in dead_nodes(g) if tuple(n.output) not in dead_before])
        stats["removed"] += drop_initializers(g, read_before)
        drop_value_info(g, candidates=defined_before)
        details = {k: stats[k] for k in ("constants", "folded", "shape_folded", "reshapes", "removed")}
        return PassResult(model, any(details.values()), details)

    def ensures(self, model: onnx.ModelProto) -> None:
        left = [n.output[0] for n in model.graph.node if _constant_tensor(n) is not None]
        if left:
            raise PreconditionError(f"Constant nodes left after constant folding: {left[:3]}")

    @staticmethod
    def _constants_to_initializers(graph: onnx.GraphProto) -> int:
        doomed = []
        for node in graph.node:
            tensor = _constant_tensor(node)
            if tensor is not None:
                graph.initializer.append(tensor)
                doomed.append(node)
        return delete_nodes(graph, doomed)

    # --- one round: numeric folding, then symbolic shapes, then rewrite -------------------
    def _round(self, model: onnx.ModelProto, stats: Counter) -> bool:
        g = model.graph
        self.index = GraphIndex(g)
        self.types = infer_value_types(model)
        self.opset = opset_version(model)
        nodes = list(g.node)
        values = self._fold_numeric(model, nodes)
        folded = {i for i, n in enumerate(nodes) if all(o in values for o in n.output if o) and n.output}
        stats["folded"] += len(folded)
        reshapes: list[tuple[onnx.NodeProto, np.ndarray]] = []
        if self.config.fold_shapes:
            shape_folded = self._fold_symbolic(nodes, folded, values, reshapes)
            stats["shape_folded"] += len(shape_folded)
            folded |= shape_folded
        stats["reshapes"] += len(reshapes)
        if not folded and not reshapes:
            return False
        doomed = [nodes[i] for i in folded]
        doomed_ids = {id(n) for n in doomed}
        for node in doomed:
            for out in node.output:
                needed = self.index.is_output(out) or any(id(u) not in doomed_ids for u in self.index.uses(out))
                if out and needed:
                    g.initializer.append(numpy_helper.from_array(values[out], out))
        for node, shape in reshapes:
            node.input[1] = self.index.add_initializer(shape, f"{node.output[0]}_shape")
        delete_nodes(g, doomed)
        return True

    def _is_constant(self, name: str) -> bool:
        return name in self.index.initializers and name not in self.index.graph_inputs

    def _bytes(self, name: str) -> int | None:
        t = self.types.get(name)
        if t is None or not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
            return None
        dims = t.tensor_type.shape.dim
        if not all(d.HasField("dim_value") for d in dims):
            return None
        size = _itemsize(t.tensor_type.elem_type)
        return None if size is None else size * math.prod(d.dim_value for d in dims)

    def _can_fold(self, node: onnx.NodeProto) -> bool:
        if node.domain not in DEFAULT_DOMAINS or node.op_type in NONDETERMINISTIC or node.op_type == "Constant":
            return False
        if any(True for _ in subgraphs(node)) or any(a.ref_attr_name for a in node.attribute):
            return False
        outputs = [self.types.get(o) for o in node.output if o]
        return bool(outputs) and all(t is None or t.HasField("tensor_type") for t in outputs)

    def _affordable(self, node: onnx.NodeProto, out_bytes: int, sizes: dict[str, int | None]) -> bool:
        if out_bytes <= self.config.max_output_bytes:
            return True
        freed = 0
        for name in {x for x in node.input if x}:
            if not self.index.is_output(name) and all(u is node for u in self.index.uses(name)):
                freed += sizes.get(name) or 0
        return out_bytes <= freed

    def _fold_numeric(self, model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> dict[str, np.ndarray]:
        known = {name for name in self.index.initializers if self._is_constant(name)}
        sizes: dict[str, int | None] = {name: self._bytes(name) for name in known}
        plan: list[onnx.NodeProto] = []
        for node in nodes:
            if not self._can_fold(node) or not all(x in known for x in node.input if x):
                continue
            outs = [o for o in node.output if o]
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
        produced = {o for n in plan for o in n.output}
        feeds = sorted({x for n in plan for x in n.input if x and x not in produced})
        tensors = [self.index.initializers[x] for x in feeds]
        try:
            values = evaluate(model, plan, tensors)
        except Exception:  # noqa: BLE001 - one bad node must not stop the others: go node by node
            values = {}
            for node in plan:
                inputs = [x for x in node.input if x]
                if not all(x in values or x in self.index.initializers for x in inputs):
                    continue
                feeds = [numpy_helper.from_array(values[x], x) if x in values else self.index.initializers[x]
                         for x in dict.fromkeys(inputs)]
                try:
                    values.update(evaluate(model, [node], feeds))
                except Exception:  # noqa: BLE001
                    continue
        # Keep what evaluated and, now that sizes are known, is still affordable.
        kept: dict[str, np.ndarray] = {}
        for node in plan:
            outs = [o for o in node.output if o]
            if not all(o in values for o in outs):
                continue
            if not all(x in kept or self._is_constant(x) for x in node.input if x):
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
            if node.op_type == "Reshape":
                shape = self._reshape_target(node)
                if shape is not None:
                    reshapes.append((node, shape))
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
        elif self._is_constant(name) and math.prod(self.index.initializers[name].dims) <= SMALL_ELEMENTS:
            v = numpy_helper.to_array(self.index.initializers[name])
        else:
            return None
        return v if v.dtype.kind in "iu" and v.size <= SMALL_ELEMENTS else None

    def _sym(self, name: str) -> np.ndarray | None:
        if name in self.syms:
            return self.syms[name]
        v = self._const(name)
        return None if v is None else _objects(v)

    def _axes(self, node: onnx.NodeProto, since: int) -> tuple[bool, list[int] | None]:
        """(known, axes): axes from the attribute or, from opset ``since``, the constant input."""
        if self.opset < since:
            return True, attr(node, "axes")
        if len(node.input) < 2 or not node.input[1]:
            return True, None
        v = self._const(node.input[1])
        return (False, None) if v is None else (True, [int(a) for a in v.reshape(-1)])

    def _sym_Shape(self, node):
        dims = self._dims(node.input[0])
        if dims is None:
            return None
        return _objects(dims[attr(node, "start", 0): attr(node, "end", len(dims))])

    def _sym_Size(self, node):
        dims = self._dims(node.input[0])
        if dims is None or any(isinstance(d, Sym) for d in dims):
            return None
        return _objects(math.prod(dims))

    def _sym_Identity(self, node):
        return self._sym(node.input[0])

    def _sym_Cast(self, node):
        x = self._sym(node.input[0])
        return x if x is not None and attr(node, "to") in (onnx.TensorProto.INT64, onnx.TensorProto.INT32) else None

    def _sym_Gather(self, node):
        data, idx = self._sym(node.input[0]), self._const(node.input[1])
        if data is None or idx is None or data.ndim != 1 or attr(node, "axis", 0) not in (0, -1):
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
        return np.concatenate(parts, axis=attr(node, "axis"))

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
            starts, ends, axes, steps = attr(node, "starts"), attr(node, "ends"), attr(node, "axes"), None
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

    def _reshape_target(self, node: onnx.NodeProto) -> np.ndarray | None:
        """A constant equivalent of a partially known Reshape shape, if there is one."""
        shape = self.syms.get(node.input[1]) if len(node.input) > 1 else None
        if shape is None or shape.ndim != 1:
            return None
        allowzero = attr(node, "allowzero", 0)
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
