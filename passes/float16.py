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
from onnx import TensorProto, helper
from pydantic import Field

from onnxopt.legacy_graph import GraphIndex, implicit_inputs, subgraphs
from onnxopt.pass_infra import PassConfig, PassResult, ProtoPass

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


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    g = inferred.graph
    types = {t.name: t.data_type for t in g.initializer}
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    for n in g.node:
        if n.op_type == "Constant" and n.domain in DEFAULT_DOMAINS and n.attribute and n.attribute[0].name == "value":
            types[n.output[0]] = n.attribute[0].t.data_type
    return types


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


class Float16(ProtoPass):
    name = "fp16"
    summary = ("float16 weights and float16 compute where safe (fragile ops and overflowing values stay float32; "
               "on ORT CPU only ops with float16 kernels), float32 model I/O.")
    Config = Float16Config

    def call(self, model: onnx.ModelProto) -> PassResult:
        cfg: Float16Config = self.config  # type: ignore[assignment]
        g = model.graph
        index = GraphIndex(g)
        types = _elem_types(model)
        consts: dict[str, np.ndarray] = {}
        for name in list(index.initializers) + [n.output[0] for n in g.node if n.op_type == "Constant"]:
            if name not in index.graph_inputs and types.get(name) == F32:
                value = index.constant(name)
                if value is not None:
                    consts[name] = value
        hot = self._overflowing(model) if self.context.calibration is not None else {}
        opset = next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), 0)

        # --- which nodes compute in float16 ----------------------------------------------------
        half: set[int] = set()
        in_half: set[str] = {c for c, v in consts.items() if v.size >= cfg.min_constant_elements and _fits_fp16(v)}
        reasons: dict[str, int] = {}
        for node in g.node:
            why = self._keep_reason(node, types, consts, hot, opset, in_half)
            if why is None:
                half.add(id(node))
                in_half.update(o for o in node.output if types.get(o) == F32)
            elif why != "no float32 output":
                reasons[why] = reasons.get(why, 0) + 1

        # --- rewrite ---------------------------------------------------------------------------
        graph_outputs = {o.name for o in g.output}
        f32_readers: dict[str, int] = {}
        f16_readers: dict[str, int] = {}
        other_readers: set[str] = set()  # read by a node that is not a fragile op
        for node in g.node:
            readers = f16_readers if id(node) in half else f32_readers
            for x in node.input:
                if x:
                    readers[x] = readers.get(x, 0) + 1
                    if node.op_type not in cfg.keep_float32_ops:
                        other_readers.add(x)
            for x in implicit_inputs(node):  # values captured by a subgraph are read in float32
                f32_readers[x] = f32_readers.get(x, 0) + 1
        head: list[onnx.NodeProto] = []
        half_name: dict[str, str] = {}
        stats = {"constants_fp16": 0, "constant_bytes_saved": 0, "casts_to_fp16": 0, "casts_to_fp32": 0}

        # constants: float16 storage; float32 readers go through a Cast that keeps the original name
        dropped: set[str] = set()
        for name, value in consts.items():
            # parameters of fragile ops (LayerNorm's scale and bias) keep their float32 precision
            big = value.size >= cfg.min_constant_elements and _fits_fp16(value) and name in other_readers
            if not (f16_readers.get(name) or big and name in index.initializers):
                continue  # Constant nodes are left as they are for float32 readers
            if not f16_readers.get(name) and name in graph_outputs:
                continue
            h = index.add_initializer(value.astype(np.float16), f"{name}_fp16")
            half_name[name] = h
            stats["constants_fp16"] += 1
            if f32_readers.get(name) or name in graph_outputs:
                if big and name in index.initializers:
                    dropped.add(name)
                    head.append(helper.make_node("Cast", [h], [name], to=F32, name=index.unique_name(f"{name}/to_fp32")))
                    stats["constant_bytes_saved"] += value.nbytes // 2
            elif name in index.initializers:
                dropped.add(name)
                stats["constant_bytes_saved"] += value.nbytes // 2
        nodes: list[onnx.NodeProto] = []

        def to_half(x: str, where: list[onnx.NodeProto]) -> str:
            if x not in half_name:
                h = index.unique_name(f"{x}_fp16")
                where.append(helper.make_node("Cast", [x], [h], to=F16, name=index.unique_name(f"{x}/to_fp16")))
                half_name[x] = h
                stats["casts_to_fp16"] += 1
            return half_name[x]

        for inp in g.input:  # graph inputs read by float16 nodes: one Cast each, at the start
            if types.get(inp.name) == F32 and f16_readers.get(inp.name) and inp.name not in consts:
                to_half(inp.name, head)
        for node in g.node:
            if id(node) not in half:
                nodes.append(node)
                continue
            for i, x in enumerate(node.input):
                if x and types.get(x) == F32:
                    node.input[i] = to_half(x, nodes)
            nodes.append(node)
            for i, o in enumerate(node.output):
                if not o or types.get(o) != F32:
                    continue
                h = index.unique_name(f"{o}_fp16")
                node.output[i] = h
                half_name[o] = h
                if f32_readers.get(o) or o in graph_outputs:
                    nodes.append(helper.make_node("Cast", [h], [o], to=F32, name=index.unique_name(f"{o}/to_fp32")))
                    stats["casts_to_fp32"] += 1
        del g.node[:]
        g.node.extend(head + nodes)
        index.refresh()
        keep = [t for t in g.initializer if t.name not in dropped]
        del g.initializer[:]
        g.initializer.extend(keep)
        existing = {o for n in g.node for o in n.output} | {i.name for i in g.input} | \
                   {t.name for t in g.initializer}
        keep_vi = [v for v in g.value_info if v.name in existing]
        del g.value_info[:]
        g.value_info.extend(keep_vi)
        n_half = len(half)
        details = {
            "target": cfg.target,
            "nodes_fp16": n_half,
            "nodes_fp32": len([n for n in nodes if n.op_type != "Cast"]) - n_half,
            "kept_fp32": dict(sorted(reasons.items())),
            "overflowing_tensors": sorted(hot)[:20],
            **stats,
        }
        return PassResult(model, bool(n_half or stats["constants_fp16"]), details)

    # --- decisions ----------------------------------------------------------------------------
    def _keep_reason(self, node, types, consts, hot, opset, in_half) -> str | None:
        """Why ``node`` stays float32 (None: it goes float16)."""
        cfg: Float16Config = self.config  # type: ignore[assignment]
        floats_out = [o for o in node.output if o and types.get(o) in (F32, F16)]
        if not any(types.get(o) == F32 for o in floats_out):
            return "no float32 output"
        if node.domain not in DEFAULT_DOMAINS + ("com.microsoft",) or node.op_type in NEVER_OPS \
                or any(True for _ in subgraphs(node)):
            return "op not convertible"
        if node.op_type in cfg.keep_float32_ops:
            return "fragile op"
        if node.name and any(fnmatch.fnmatchcase(node.name, p) for p in cfg.keep_float32_nodes):
            return "keep_float32_nodes"
        values = [x for x in list(node.input) + list(node.output) if x]
        if any(types.get(x) is None for x in values):
            return "unknown type"
        if any(types[x] in (TensorProto.DOUBLE, TensorProto.BFLOAT16, F16) for x in values):
            return "not float32"
        if any(x in hot for x in values):
            return "overflows float16"
        if any(x in consts and not _fits_fp16(consts[x]) for x in node.input):
            return "constant outside float16"
        if cfg.target == "cpu":
            if not has_cpu_fp16_kernel(node.op_type, node.domain, opset):
                return "no float16 CPU kernel"
            if not any(x in in_half for x in node.input if x and types.get(x) == F32):
                return "inputs are float32 (a Cast would cost more)"
        return None

    def _overflowing(self, model: onnx.ModelProto) -> dict[str, float]:
        """{tensor: max |x|} of the float activations beyond ``overflow_threshold`` on the calibration data."""
        from onnxopt.passes.calibrate import exposed_model, limited_batches, select_tensors

        from onnxopt.runtime import make_session, run_batch

        cfg: Float16Config = self.config  # type: ignore[assignment]
        tensors = select_tensors(model)
        graph_inputs = {i.name for i in model.graph.input}
        fetch = [t for t in tensors if t not in graph_inputs]
        session = make_session(exposed_model(model, fetch), opt_level="basic", what="model (fp16 range check)")
        feed_names = {i.name for i in session.get_inputs()}
        peak: dict[str, float] = {}
        done = 0
        for batch in limited_batches(self.context.calibration, cfg.batch_size, cfg.max_samples):
            values = run_batch(session, {k: v for k, v in batch.items() if k in feed_names}, fetch, first_sample=done)
            for t in tensors:
                v = values.get(t, batch.get(t))
                if v is not None and v.dtype.kind == "f" and v.size:
                    peak[t] = max(peak.get(t, 0.0), float(np.max(np.abs(v))))
            done += next(iter(batch.values())).shape[0]
        return {t: m for t, m in peak.items() if m > cfg.overflow_threshold}
