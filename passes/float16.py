"""fp16: float16 weights, and float16 compute where it is safe and runs, with float32 model inputs/outputs.

Every float32 constant of at least ``min_constant_elements`` values is stored in float16 (half the
bytes), except those only fragile ops read (LayerNorm's scale and bias: few bytes, kept exact). Nodes are converted to float16 one by one, in graph order; a node stays float32 when

* its op is numerically fragile (``keep_float32_ops``: normalizations, Softmax, reductions, Pow/Exp/
  Log/Sqrt, ...) or named in ``keep_float32_nodes``;
* one of its float values leaves the float16 range in the calibration run (``|x| > overflow_threshold``,
  when ``--calib`` is given), or a constant it reads would overflow or flush to zero in float16;
* ``target: cpu`` (default) and ONNX Runtime's CPU EP has no float16 kernel for it. onnxruntime 1.32's
  CPU EP has float16 kernels for data movement (Gather, Reshape, Transpose, Concat, Slice, ...),
  LayerNormalization and a few contrib ops, but none for MatMul, Gemm, Conv, Add, Mul, Softmax, Erf, ...
  (the pass reads the kernel registry of the installed onnxruntime). On this target a node is also only
  converted when one of its inputs is float16 already (a float16 constant or a float16 node's output):
  converting a lone data-movement op between float32 ops would only add two Casts. ``target: any``
  converts every other node (for EPs with float16 kernels; ORT CPU cannot run such a model).

A float32 consumer of a float16-stored constant reads it through a ``Cast`` (ONNX Runtime folds it at
load time, so such a node computes in float32 on float16-rounded weights). Casts are inserted only at
the boundaries between float32 and float16 regions, one per value and direction, so there are no Cast
pairs: a float16 value that float32 nodes also read is cast back once and float16 consumers keep
reading the float16 value. Graph inputs and outputs keep their names and float32 type.
"""

from __future__ import annotations

import fnmatch
from functools import lru_cache
from typing import Literal

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto
from pydantic import Field

from onnxopt.activations import select_tensors, stream_activations, value_types
from onnxopt.graph import (
    Namer,
    add_initializer,
    captured_values,
    constant_tensor,
    constant_value,
    is_initializer,
    make_node,
    opset_version,
    release,
    subgraphs,
)
from onnxopt.pass_infra import Pass, PassConfig, PassResult

F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16
FP16_MAX = 65504.0
FP16_TINY = 2.0 ** -24  # smallest float16 subnormal: non-zero values below it become 0

FRAGILE_OPS = [
    "LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
    "SkipSimplifiedLayerNormalization", "RMSNormalization", "BatchNormalization", "InstanceNormalization",
    "GroupNormalization", "LpNormalization", "MeanVarianceNormalization", "EmbedLayerNormalization",
    "Softmax", "LogSoftmax", "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2",
    "ReduceLogSum", "ReduceLogSumExp", "ReduceProd", "CumSum", "Pow", "Exp", "Log", "Sqrt", "Reciprocal",
]
# Ops whose output type is set by an attribute or that have float inputs fixed to float32.
NEVER_OPS = frozenset({"Cast", "CastLike", "Constant", "ConstantOfShape", "EyeLike", "RandomNormal", "RandomUniform",
                       "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli", "Resize", "Upsample",
                       "Shape", "Size", "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
DEFAULT_DOMAINS = ("", "ai.onnx")


class Float16Config(PassConfig):
    type: Literal["fp16"] = "fp16"
    target: Literal["cpu", "any"] = Field(
        "cpu", description="cpu: float16 compute only where ONNX Runtime's CPU EP has kernels; any: everywhere safe")
    keep_float32_ops: list[str] = Field(default_factory=lambda: list(FRAGILE_OPS),
                                        description="op types always computed in float32")
    keep_float32_nodes: list[str] = Field(default_factory=list, description="node names (glob) kept float32")
    overflow_threshold: float = Field(
        FP16_MAX / 2, gt=0, le=FP16_MAX, description="calibration: |x| above this keeps the node float32")
    min_constant_elements: int = Field(
        16, ge=0, description="smaller float32 constants read only by float32 nodes stay float32")
    batch_size: int = Field(16, gt=0, description="calibration samples per ONNX Runtime run")
    max_samples: int | None = Field(64, gt=0, description="calibration samples used for the overflow check")


@lru_cache(maxsize=1)
def _cpu_fp16_kernels() -> dict[tuple[str, str], list[tuple[int, int]]]:
    """{(domain, op): [(first, last) opset versions]} of the CPU EP kernels that take float16."""
    from onnxruntime.capi import onnxruntime_pybind11_state as C

    out: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for k in C.get_all_opkernel_def():
        if k.provider != "CPUExecutionProvider":
            continue
        if any("tensor(float16)" in types for types in k.type_constraints.values()):
            out.setdefault((k.domain or "", k.op_name), []).append(tuple(k.version_range))
    return out


def has_cpu_fp16_kernel(op: str, domain: str, opset: int) -> bool:
    ranges = _cpu_fp16_kernels().get((domain if domain not in DEFAULT_DOMAINS else "", op))
    if not ranges:
        return False
    try:
        since = onnx.defs.get_schema(op, opset, domain if domain not in DEFAULT_DOMAINS else "").since_version
    except Exception:  # noqa: BLE001 - contrib ops are not in onnx's registry: any kernel will do
        return True
    return any(lo <= since <= hi for lo, hi in ranges)


def _elem_types(model: ir.Model) -> dict[str, int]:
    types = {name: int(t) for name, t in value_types(model).items()}
    for n in model.graph:
        t = constant_tensor(n.outputs[0]) if n.op_type == "Constant" and n.outputs else None
        if t is not None:
            types[n.outputs[0].name] = int(t.dtype)
    for name, v in model.graph.initializers.items():
        if v.const_value is not None:
            types[name] = int(v.const_value.dtype)
    return types


class _Const:
    """What the pass needs of a float32 constant, from one read of it: its size, whether float16 holds it, and
    (if it does) its float16 values."""

    def __init__(self, value: ir.Value, small: int):
        a = constant_value(value)
        self.size = int(a.size)
        self.nbytes = int(a.nbytes)
        self.fits = _fits_fp16(a, small)
        self.half = a.astype(np.float16) if self.fits else None
        del a
        release(value)


def _fits_fp16(a: np.ndarray, small: int = 16) -> bool:
    """No value overflows float16 and the tensor keeps float16's precision as a whole (relative error
    below 1e-3: values in float16's subnormal range lose digits); a constant of fewer than ``small``
    values (an epsilon, a scale) must also not flush to zero, while weights may lose a few tiny values."""
    a = np.abs(a.astype(np.float32))
    if a.size == 0:
        return True
    if a.max() > FP16_MAX:
        return False
    if a.size < small and np.any((a > 0) & (a < FP16_TINY)):
        return False
    norm = float(np.linalg.norm(a))
    return norm == 0 or float(np.linalg.norm(a.astype(np.float16).astype(np.float32) - a)) <= 1e-3 * norm


class Float16(Pass):
    name = "fp16"
    summary = ("float16 weights and float16 compute where safe (fragile ops and overflowing values stay float32; "
               "on ORT CPU only ops with float16 kernels), float32 model I/O.")
    Config = Float16Config

    def call(self, model: ir.Model) -> PassResult:
        cfg: Float16Config = self.config  # type: ignore[assignment]
        g = model.graph
        namer = Namer(g)
        types = _elem_types(model)
        by_name: dict[str, ir.Value] = {}
        for n in g:
            for o in n.outputs:
                by_name[o.name] = o
        by_name.update({k: v for k, v in g.initializers.items()})
        const_names = [name for name, v in g.initializers.items() if not v.is_graph_input()]
        const_names += [n.outputs[0].name for n in g if n.op_type == "Constant" and n.outputs]
        consts: dict[str, _Const] = {}
        for name in const_names:  # one weight at a time; float16 copies are kept (half the bytes)
            if types.get(name) == F32 and constant_tensor(by_name[name]) is not None:
                consts[name] = _Const(by_name[name], 16)
        hot = self._overflowing(model) if self.context.calibration is not None else {}
        opset = opset_version(model)

        # --- which nodes compute in float16 ----------------------------------------------------
        half: set[int] = set()
        in_half: set[str] = {c for c, v in consts.items() if v.size >= cfg.min_constant_elements and v.fits}
        reasons: dict[str, int] = {}
        for node in g:
            why = self._keep_reason(node, types, consts, hot, opset, in_half)
            if why is None:
                half.add(id(node))
                in_half.update(o.name for o in node.outputs if types.get(o.name) == F32)
            elif why != "no float32 output":
                reasons[why] = reasons.get(why, 0) + 1

        # --- rewrite ---------------------------------------------------------------------------
        graph_outputs = {o.name for o in g.outputs}
        f32_readers: dict[str, int] = {}
        f16_readers: dict[str, int] = {}
        other_readers: set[str] = set()  # read by a node that is not a fragile op
        for node in g:
            readers = f16_readers if id(node) in half else f32_readers
            for x in node.inputs:
                if x is not None:
                    readers[x.name] = readers.get(x.name, 0) + 1
                    if node.op_type not in cfg.keep_float32_ops:
                        other_readers.add(x.name)
            for x in captured_values(node):  # values captured by a subgraph are read in float32
                f32_readers[x.name] = f32_readers.get(x.name, 0) + 1
        first = g.node(0) if len(g) else None
        half_value: dict[str, ir.Value] = {}
        stats = {"constants_fp16": 0, "constant_bytes_saved": 0, "casts_to_fp16": 0, "casts_to_fp32": 0}

        def cast(x: ir.Value, to: int, out_name: str, node_name: str) -> ir.Node:
            c = make_node("Cast", [x], {"to": to}, outputs=[out_name], name=namer.unique(node_name))
            c.outputs[0].type = ir.TensorType(ir.DataType(to))
            c.outputs[0].shape = x.shape
            return c

        # constants: float16 storage; float32 readers go through a Cast that keeps the original name
        for name, info in consts.items():
            value = by_name[name]
            # parameters of fragile ops (LayerNorm's scale and bias) keep their float32 precision
            big = info.size >= cfg.min_constant_elements and info.fits and name in other_readers
            initializer = is_initializer(value)
            if not (f16_readers.get(name) or big and initializer):
                continue  # Constant nodes are left as they are for float32 readers
            if not f16_readers.get(name) and name in graph_outputs:
                continue
            h = add_initializer(g, info.half, f"{name}_fp16", namer)
            half_value[name] = h
            stats["constants_fp16"] += 1
            if f32_readers.get(name) or name in graph_outputs:
                if big and initializer:
                    c = cast(h, F32, namer.unique(f"{name}__f32"), f"{name}/to_fp32")
                    g.insert_before(first, c)
                    value.replace_all_uses_with(c.outputs[0], replace_graph_outputs=True)
                    del g.initializers[name]
                    c.outputs[0].name = name
                    stats["constant_bytes_saved"] += info.nbytes // 2
            elif initializer:
                del g.initializers[name]
                stats["constant_bytes_saved"] += info.nbytes // 2
            info.half = None

        def to_half(x: ir.Value, before: ir.Node | None) -> ir.Value:
            if x.name not in half_value:
                c = cast(x, F16, namer.unique(f"{x.name}_fp16"), f"{x.name}/to_fp16")
                g.insert_before(before if before is not None else g.node(0), c)
                half_value[x.name] = c.outputs[0]
                stats["casts_to_fp16"] += 1
            return half_value[x.name]

        for inp in g.inputs:  # graph inputs read by float16 nodes: one Cast each, at the start
            if types.get(inp.name) == F32 and f16_readers.get(inp.name) and inp.name not in consts:
                to_half(inp, first)
        for node in list(g):
            if id(node) not in half:
                continue
            for i, x in enumerate(node.inputs):
                if x is not None and types.get(x.name) == F32:
                    node.replace_input_with(i, to_half(x, node))
            for o in list(node.outputs):
                if types.get(o.name) != F32:
                    continue
                name = o.name
                f32_uses = [u for u in o.uses() if id(u.node) not in half]
                needs_f32 = bool(f32_uses) or o.is_graph_output()
                o.name = namer.unique(f"{name}_fp16")
                o.type = ir.TensorType(ir.DataType.FLOAT16)
                half_value[name] = o
                if needs_f32:
                    c = cast(o, F32, name, f"{name}/to_fp32")
                    c.outputs[0].shape = o.shape
                    g.insert_after(node, c)
                    for u in f32_uses:
                        u.node.replace_input_with(u.idx, c.outputs[0])
                    for k, out in enumerate(g.outputs):
                        if out is o:
                            g.outputs[k] = c.outputs[0]
                    stats["casts_to_fp32"] += 1
        n_half = len(half)
        details = {
            "target": cfg.target,
            "nodes_fp16": n_half,
            "nodes_fp32": len([n for n in g if n.op_type != "Cast"]) - n_half,
            "kept_fp32": dict(sorted(reasons.items())),
            "overflowing_tensors": sorted(hot)[:20],
            **stats,
        }
        return PassResult(model, bool(n_half or stats["constants_fp16"]), details)

    # --- decisions ----------------------------------------------------------------------------
    def _keep_reason(self, node, types, consts, hot, opset, in_half) -> str | None:
        """Why ``node`` stays float32 (None: it goes float16)."""
        cfg: Float16Config = self.config  # type: ignore[assignment]
        outs = [o.name for o in node.outputs if o.name]
        floats_out = [o for o in outs if types.get(o) in (F32, F16)]
        if not any(types.get(o) == F32 for o in floats_out):
            return "no float32 output"
        if node.domain not in DEFAULT_DOMAINS + ("com.microsoft",) or node.op_type in NEVER_OPS \
                or any(True for _ in subgraphs(node)):
            return "op not convertible"
        if node.op_type in cfg.keep_float32_ops:
            return "fragile op"
        if node.name and any(fnmatch.fnmatchcase(node.name, p) for p in cfg.keep_float32_nodes):
            return "keep_float32_nodes"
        ins = [x.name for x in node.inputs if x is not None]
        values = ins + outs
        if any(types.get(x) is None for x in values):
            return "unknown type"
        if any(types[x] in (TensorProto.DOUBLE, TensorProto.BFLOAT16, F16) for x in values):
            return "not float32"
        if any(x in hot for x in values):
            return "overflows float16"
        if any(x in consts and not consts[x].fits for x in ins):
            return "constant outside float16"
        if cfg.target == "cpu":
            if not has_cpu_fp16_kernel(node.op_type, node.domain, opset):
                return "no float16 CPU kernel"
            if not any(x in in_half for x in ins if types.get(x) == F32):
                return "inputs are float32 (a Cast would cost more)"
        return None

    def _overflowing(self, model: ir.Model) -> dict[str, float]:
        """{tensor: max |x|} of the float activations beyond ``overflow_threshold`` on the calibration data."""
        cfg: Float16Config = self.config  # type: ignore[assignment]
        tensors = select_tensors(model)
        peak: dict[str, float] = {}
        for _, values in stream_activations(model, self.context.calibration, tensors, batch_size=cfg.batch_size,
                                            max_samples=cfg.max_samples, what="model (fp16 range check)"):
            for t in tensors:
                v = values.get(t)
                if v is not None and v.dtype.kind == "f" and v.size:
                    peak[t] = max(peak.get(t, 0.0), float(np.max(np.abs(v))))
        return {t: m for t, m in peak.items() if m > cfg.overflow_threshold}
