"""Static INT8 post-training quantization: insert QuantizeLinear/DequantizeLinear pairs.

The pass writes a QDQ model laid out for ONNX Runtime's CPU QDQ fusions (its
``QDQSelectorActionTransformer``) so that the quantized ops run on integer kernels:

* **Compute ops** (Conv, Gemm, MatMul; ConvTranspose for size only - ORT's CPU EP has no
  integer ConvTranspose): ``DQ(x) -> op(DQ(w), DQ(b)) -> Q`` becomes QLinearConv / QGemm /
  QLinearMatMul. Weights are int8 (or uint8/int4/uint4) initializers, per channel on the
  output-channel axis (Conv: 0, ConvTranspose: 1, Gemm: 0 with transB=1 else 1, MatMul: last);
  the bias is int32 with scale ``input_scale * weight_scale`` and zero point 0. A Gemm/MatMul
  whose result only feeds float ops keeps a float output (QGemm with float output /
  MatMulIntegerToFloat), so e.g. the logits are not rounded to 8 bits.
* **QLinear ops** Add, Mul (QLinearAdd/Mul), Concat (QLinearConcat), AveragePool,
  GlobalAveragePool, Sigmoid, LeakyRelu, Softmax: every input and the output quantized.
* **Relu/Clip** right after a quantized op is *absorbed*: the Q goes after it with a range
  inside the clip bounds, which is exactly when ORT deletes the Relu/Clip (its
  ``IsClipMadeRedundantByQ``). If the bounds do not allow it, the Q goes before the Relu/Clip.
* **Data-movement ops** (Reshape, Transpose, Flatten, Squeeze, Unsqueeze, Slice, Gather, Expand,
  Tile, MaxPool, Resize, Split, Pad, ...) get ``DQ -> op -> Q`` with the *same* scale and
  zero point on both sides, which ORT drops so the op moves int8 data; no extra rounding.
  They follow their neighbours: quantized when their input comes out of a quantized op, or
  when every consumer of their output is quantized.
* Each quantized tensor gets one QuantizeLinear; every quantized consumer input gets its own
  DequantizeLinear (ORT requires a DQ to feed only its group's node).

Activation ranges come from the ``calibrate`` pass (``CalibrationResult``) run earlier in the
pipeline, or from ``ranges_file``. The scheme (activation x weight types, 7-bit weights) is
chosen for the target CPU by ``onnxopt.isa`` unless set. With calibration data, biases are
corrected for the mean error that weight rounding causes (Nagel et al. 2019); on
EfficientNet-Lite0 this halves the output error. 4-bit weights get per-channel ranges clipped to
minimise the squared weight error (``weight_clipping``; with max-abs ranges a few outliers spread
the 15 levels thin), the rule ``onnxopt.mixed.fake_quantize`` applies when significance is scored.
The share of Conv/Gemm/MatMul that ORT really runs on integer kernels is read back from ORT's
optimized graph and reported.

Only the main graph is quantized (If/Loop bodies stay float).
"""

from __future__ import annotations

import difflib
import math
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper

from onnxopt.activations import attention_masks, exposed, has_attention, value_types
from onnxopt.errors import PreconditionError
from onnxopt.graph import (
    Namer,
    add_initializer,
    attr,
    clone_model,
    constant_tensor,
    constant_value,
    make_node,
    opset_version,
    release,
    set_attr,
    subgraphs,
    values_by_name,
)
from onnxopt.isa import SCHEME_SPECS, SchemeChoice, choose_scheme, detect_cpu
from onnxopt.mixed import BitAssignmentResult, clipping_for
from onnxopt.pass_infra import Pass
from onnxopt.qdq import (
    ABSORBED_OPS,
    ANCHOR_OPS,
    BINARY_OPS,
    COMPUTE_OPS,
    MS_DOMAIN,
    QUANTIZABLE_OPS,
    TRANSPARENT_OPS,
    UNARY_OPS,
    VARIADIC_OPS,
    ActivationQuant,
    QuantizeQDQConfig,
    QuantizeQDQResult,
    QuantOverride,
    WeightQuant,
    kernel_share,
)
from onnxopt.quant import (
    activation_params,
    dequantize,
    fit_weight_scale_for_bias,
    qrange,
    qtype,
    quantize,
    quantize_bias,
    shield_float_ops,
    weight_params,
)
from onnxopt.ranges import CalibrationResult, TensorRange, load_ranges


# --- helpers -----------------------------------------------------------------------------------
def _hint(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _node_label(node: ir.Node) -> str:
    return f"{node.op_type} {node.name!r}" if node.name else node.op_type


def ins(node: ir.Node) -> list[str]:
    """A node's input names ("" for an omitted input)."""
    return [x.name if x is not None else "" for x in node.inputs]


def outs(node: ir.Node) -> list[str]:
    return [o.name or "" for o in node.outputs]


def _elem_types(model: ir.Model) -> dict[str, int]:
    """Element type (TensorProto code) of every value in the main graph (after ONNX shape inference)."""
    types = {name: int(t) for name, t in value_types(model).items()}
    for name, v in model.graph.initializers.items():
        if v.const_value is not None:
            types[name] = int(v.const_value.dtype)
    for n in model.graph:
        if n.op_type == "Constant" and n.outputs:
            t = constant_tensor(n.outputs[0])
            if t is not None:
                types[n.outputs[0].name] = int(t.dtype)
    return types


class _Index:
    """Name-level reads of the main graph for the planning stage (which reasons about tensors by name): a value's
    producer, its readers (a node inside an If/Loop body counts as the node holding the body, as a subgraph
    reads an outer value for its owner), constants, graph outputs."""

    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self.refresh()

    def refresh(self) -> None:
        g = self.graph
        self.values = values_by_name(g)
        self.owner: dict[int, ir.Node] = {}
        for n in g:
            for body in subgraphs(n):
                for inner in _all(body):
                    self.owner[id(inner)] = n
        self.graph_inputs = {v.name for v in g.inputs}
        self.graph_outputs = {v.name for v in g.outputs}

    def value(self, name: str) -> ir.Value | None:
        return self.values.get(name) if name else None

    def producer(self, name: str) -> ir.Node | None:
        v = self.value(name)
        return v.producer() if v is not None else None

    def uses(self, name: str) -> list[ir.Node]:
        v = self.value(name)
        if v is None:
            return []
        return [self.owner.get(id(u.node), u.node) for u in v.uses()]

    def is_output(self, name: str) -> bool:
        return name in self.graph_outputs

    def constant(self, name: str) -> np.ndarray | None:
        """The values of a constant (read: for a lazy weight, ``release`` it when done)."""
        return constant_value(self.value(name))

    def is_constant(self, name: str) -> bool:
        """A constant whose values numpy can hold, decided without reading them."""
        t = constant_tensor(self.value(name))
        if t is None:
            return False
        try:
            t.dtype.numpy()
        except Exception:  # noqa: BLE001 - a dtype numpy cannot hold is "not a constant we can use"
            return False
        return True

    def constant_shape(self, name: str) -> tuple[int, ...]:
        """The shape of a constant (``is_constant``), without reading its values."""
        return tuple(int(d) for d in constant_tensor(self.value(name)).shape)

    def release(self, name: str) -> None:
        release(self.value(name))


def _all(graph: ir.Graph):
    for n in graph:
        yield n
        for body in subgraphs(n):
            yield from _all(body)


def _conv_mean_shift(node: ir.Node, mean: np.ndarray, dw: np.ndarray) -> np.ndarray:
    """Per output channel, the spatial mean of ``node`` (Conv/ConvTranspose) applied to the mean
    input map ``mean`` with weights ``dw`` and no bias, computed with ONNX Runtime."""
    import onnxruntime as ort

    attrs = {name: attr(node, name) for name in node.attributes}
    g = helper.make_graph([helper.make_node(node.op_type, ["x", "w"], ["y"], **attrs)], "shift",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, None),
                           helper.make_tensor_value_info("w", TensorProto.FLOAT, None)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": mean[None].astype(np.float32), "w": dw.astype(np.float32)})[0]
    return y.reshape(y.shape[0], y.shape[1], -1).mean(axis=(0, 2)).astype(np.float64)


# --- planning ----------------------------------------------------------------------------------
@dataclass
class _Setting:
    excluded: bool = False
    activation_type: str = "uint8"  # or "float" (weight-only)
    weight_type: str = "int8"
    per_channel: bool = True
    reduce_range: bool = False
    weight_clipping: str = "auto"
    why_excluded: str = ""
    explicit_activation: bool = False  # activation_type set by an override


@dataclass
class _Anchor:
    node: ir.Node
    setting: _Setting
    act_slots: list[int]  # inputs read as quantized activations (Q'd at run time)
    const_slots: list[int]  # constant inputs quantized per tensor like activations
    weight_slot: int | None = None
    bias_slot: int | None = None
    absorbed: ir.Node | None = None  # Relu/Clip deleted by ORT after this op
    inputs: list[str] = field(default_factory=list)  # input names before the rewrite

    def __post_init__(self):
        self.inputs = ins(self.node)

    @property
    def qout(self) -> str:
        return (self.absorbed or self.node).outputs[0].name


class QuantizeQDQ(Pass):
    name = "quantize-qdq"
    summary = ("Static INT8 quantization: QuantizeLinear/DequantizeLinear placed for ONNX Runtime's integer "
               "kernels, per-channel weights, scheme chosen for the CPU.")
    Config = QuantizeQDQConfig
    # Bias-correction means computed earlier for the same float model (set by latency-placement).
    precomputed_means: tuple[dict[str, np.ndarray], int] | None = None
    # The anchor ops the last call's plan left float (node ids), for ``ensures``.
    _left_float: frozenset[int] = frozenset()

    # -- entry points ----------------------------------------------------------------------------
    def requires(self, model: ir.Model) -> None:
        super().requires(model)
        if self.config.ranges_file is None and self.context.latest(CalibrationResult) is None:
            raise PreconditionError("quantize-qdq needs activation ranges: run the 'calibrate' pass before it "
                                    "(or set ranges_file)")
        already = sorted({n.op_type for n in model.graph
                          if n.op_type in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")
                          or n.op_type.startswith("QLinear")})
        if already:
            raise PreconditionError(f"the model is already quantized (it has {', '.join(already)} nodes)")
        if opset_version(model) < 10:
            if not self.config.allow_opset_upgrade:
                raise PreconditionError(f"QuantizeLinear needs opset >= 10 (model has {opset_version(model)}) "
                                        "and allow_opset_upgrade is off")

    def _ranges(self) -> dict[str, TensorRange]:
        if self.config.ranges_file is not None:
            return load_ranges(self.config.ranges_file)
        cal = self.context.latest(CalibrationResult)
        return dict(cal.ranges) if cal is not None else {}

    def _caps(self):
        flags = self.config.cpu_flags
        return detect_cpu(flags) if flags is not None else detect_cpu()

    def _scheme(self) -> SchemeChoice:
        cfg: QuantizeQDQConfig = self.config
        caps = self._caps()
        if cfg.scheme == "auto":
            return choose_scheme(caps)
        return SchemeChoice(cfg.scheme, "set in the recipe", caps.describe())

    def call(self, model: ir.Model) -> QuantizeQDQResult:
        cfg: QuantizeQDQConfig = self._with_bit_assignment(self.config)
        ranges = self._ranges()
        choice = self._scheme()
        spec = SCHEME_SPECS[choice.scheme]
        defaults = _Setting(
            activation_type=cfg.activation_type or spec.activation_type,
            weight_type=cfg.weight_type or spec.weight_type,
            per_channel=cfg.per_channel,
            reduce_range=cfg.reduce_range if cfg.reduce_range is not None else spec.reduce_range,
            weight_clipping=cfg.weight_clipping,
        )
        self._validate_names(model, cfg)
        source = clone_model(model)  # the float model (graph copied, weights shared) for latency-placement
        upgrade = self._maybe_upgrade(model, defaults, cfg)
        if upgrade is not None:
            model = upgrade[0]
        work = _Quantizer(model, cfg, defaults, ranges)
        data = self.context.calibration
        if cfg.bias_correction == "on" and data is None:
            raise PreconditionError("bias_correction: on needs calibration data (pass it with --calib)")
        if cfg.bias_correction != "off" and data is not None:
            if self.precomputed_means is not None:
                work.means, work.means_samples = self.precomputed_means
            else:
                work.collect_means(data)
        work.run()
        shielded = shield_float_ops(work.model, work.excluded) if work.excluded else 0
        self._left_float = frozenset(work.excluded_ids)
        details: dict[str, Any] = {
            "scheme": choice.scheme,
            "scheme_reason": choice.reason,
            "cpu": choice.cpu,
            "activation_type": defaults.activation_type,
            "weight_type": defaults.weight_type,
            "reduce_range": defaults.reduce_range,
            "per_channel": defaults.per_channel,
            **work.summary(),
        }
        caps = self._caps()
        if (caps.u8s8_saturates and defaults.weight_type == "int8" and not defaults.reduce_range
                and defaults.activation_type in ("uint8", "int8")):
            details["warning"] = (f"full-range int8 weights saturate ORT's u8 x s8 kernel on this CPU ({caps.describe()}, "
                                  "no VNNI): expect wrong results; use scheme auto, u8u8 or u8s8-rr")
        corrected = sum(1 for w in work.weight_quant.values() if w.bias_corrected)
        if cfg.bias_correction == "off":
            details["bias_correction"] = "off"
        elif data is None:
            details["bias_correction"] = "off (no calibration data)"
        else:
            details["bias_correction"] = {"layers": corrected, "samples": work.means_samples}
        if shielded:
            # excluded ops would otherwise get per-tensor int8 weights from ORT (see shield_float_ops)
            details["float_ops_shielded"] = shielded
        if upgrade is not None:
            details["opset_upgrade"] = {"from": upgrade[1], "to": upgrade[2], "why": upgrade[3]}
        kernels = None
        if cfg.check_kernels and work.modified:
            kernels = kernel_share(work.model)
            details["integer_compute_share"] = round(kernels.share, 4)
            details["integer_kernels"] = kernels.integer
            details["float_kernels"] = kernels.float
            if kernels.weight_only:
                details["weight_only_kernels"] = kernels.weight_only
            if kernels.float_nodes:
                details["float_compute_nodes"] = list(kernels.float_nodes[:10])
        return QuantizeQDQResult(work.model, work.modified or upgrade is not None, details, scheme=choice,
                                 activations=work.activation_quant, weights=work.weight_quant, kernels=kernels,
                                 source=source, config=self.config,
                                 means=(work.means, work.means_samples) if work.means is not None else None)

    def ensures(self, model: ir.Model) -> None:
        # One QuantizeLinear per tensor, and a DequantizeLinear shared by several nodes never feeds
        # a node all of whose inputs are dequantized (a QDQ group: ORT would not fuse it).
        seen: dict[str, str] = {}
        # an op the plan excluded may read a shared DQ and feed a Q (its reader is quantized): it is not a
        # quantized op on a shared DQ. (ORT 1.32 copies shared DQs and may still fuse such a weightless op
        # into an integer kernel; the numbers are the QDQ graph's either way.)
        left_float = self._left_float

        def grouped(node: ir.Node) -> bool:
            # DQ -> op -> Q (or DQ -> MatMul/Conv/Gemm, fused without the Q); an op left float may read
            # dequantized values from a shared DQ
            if id(node) in left_float:
                return False
            xs = [x for x in node.inputs if x is not None]
            requantized = node.op_type in COMPUTE_OPS or any(
                u.node.op_type == "QuantizeLinear" for o in node.outputs for u in o.uses())
            return node.op_type in ANCHOR_OPS and requantized and all(
                (p := x.producer()) is not None and p.op_type == "DequantizeLinear" for x in xs)

        for n in model.graph:
            if n.op_type == "QuantizeLinear":
                x = n.inputs[0].name
                if x in seen:
                    raise PreconditionError(f"tensor {x!r} is quantized twice ({seen[x]!r}, {n.name!r})")
                seen[x] = n.name
            elif n.op_type == "DequantizeLinear":
                uses = [u.node for u in n.outputs[0].uses()]
                if len(uses) > 1 and any(grouped(u) for u in uses):
                    raise PreconditionError(f"DequantizeLinear {n.name!r} feeds {len(uses)} nodes, one of them "
                                            "quantized (ORT fuses a DequantizeLinear into one node only)")

    # -- validation ------------------------------------------------------------------------------
    def _with_bit_assignment(self, cfg: QuantizeQDQConfig) -> QuantizeQDQConfig:
        """The bit-assignment pass's overrides (if it ran earlier) first; the recipe's own win over them."""
        bits = self.context.latest(BitAssignmentResult)
        if bits is None or not bits.overrides:
            return cfg
        extra = [QuantOverride.model_validate(o) for o in bits.overrides]
        return cfg.model_copy(update={"overrides": extra + list(cfg.overrides)})

    def _validate_names(self, model: ir.Model, cfg: QuantizeQDQConfig | None = None) -> None:
        cfg = cfg or self.config
        nodes = {n.name: n for n in model.graph if n.name}
        for op in (cfg.op_types or []):
            if op not in ANCHOR_OPS + TRANSPARENT_OPS:
                raise PreconditionError(f"op_types: {op!r} cannot be quantized{_hint(op, QUANTIZABLE_OPS)} "
                                        f"(quantizable: {', '.join(ANCHOR_OPS)})")
        for name in cfg.exclude_nodes:
            if name not in nodes:
                raise PreconditionError(f"exclude_nodes: no node named {name!r}{_hint(name, nodes)}")
        values = {v for n in model.graph for v in ins(n) + outs(n)} | {i.name for i in model.graph.inputs}
        for k, ov in enumerate(cfg.overrides, 1):
            where = f"overrides[{k}]"
            for name in ov.nodes:
                if name not in nodes:
                    raise PreconditionError(f"{where}: no node named {name!r}{_hint(name, nodes)}")
                node = nodes[name]
                if not ov.exclude:
                    self._check_settable(where, _node_label(node), node.op_type, ov)
            for op in ov.op_types:
                if not ov.exclude:
                    self._check_settable(where, f"op type {op!r}", op, ov)
            for t in ov.tensors:
                if t not in values:
                    raise PreconditionError(f"{where}: no tensor named {t!r}{_hint(t, values)}")
                if (ov.weight_type is not None or ov.per_channel is not None or ov.reduce_range is not None
                        or ov.weight_clipping is not None):
                    raise PreconditionError(f"{where}: tensors can only be excluded or given an activation_type")

    @staticmethod
    def _check_settable(where: str, what: str, op: str, ov: QuantOverride) -> None:
        if op not in ANCHOR_OPS + TRANSPARENT_OPS:
            raise PreconditionError(f"{where}: {what} cannot be quantized{_hint(op, ANCHOR_OPS)} "
                                    f"(quantizable: {', '.join(ANCHOR_OPS)}; data-movement ops follow their inputs)")
        wants_weight = (ov.weight_type is not None or ov.per_channel is not None or ov.reduce_range is not None
                        or ov.weight_clipping is not None)
        if (wants_weight or ov.activation_type == "float") and op not in COMPUTE_OPS:
            raise PreconditionError(f"{where}: {what} has no weights (weight settings apply to "
                                    f"{', '.join(COMPUTE_OPS)})")

    def _maybe_upgrade(self, model: ir.Model, defaults: _Setting, cfg: QuantizeQDQConfig | None = None):
        cfg = cfg or self.config
        current = opset_version(model)
        need, why = 10, "QuantizeLinear/DequantizeLinear"
        if defaults.per_channel or any(ov.per_channel for ov in cfg.overrides):
            need, why = 13, "per-channel DequantizeLinear"
        four_bit = defaults.weight_type in ("int4", "uint4") or any(
            ov.weight_type in ("int4", "uint4") for ov in cfg.overrides)
        if four_bit:
            need, why = 21, "4-bit weights"
        elif defaults.weight_type == "int16" or any(ov.weight_type == "int16" for ov in cfg.overrides):
            need, why = 21, "16-bit weights"
        if current >= need:
            return None
        if not cfg.allow_opset_upgrade:
            raise PreconditionError(f"{why} need opset >= {need} (model has {current}) and allow_opset_upgrade is off")
        from onnxopt.opset import upgrade_opset

        # converted on the weight-less skeleton; the upgraded model shares the weights (lazy ones stay unread)
        return upgrade_opset(model, need, reason=f"{why} need opset >= {need}"), current, need, why


def _quantized_readers(idx: _Index, quantized: dict, t: str) -> list[tuple[ir.Node, int]]:
    """(node, input slot) pairs where a quantized node reads activation ``t``."""
    out = []
    for u in idx.uses(t):
        q = quantized.get(id(u))
        if q is None:
            continue
        slots = q.act_slots if isinstance(q, _Anchor) else [0]
        names = ins(u)
        out.extend((u, i) for i in slots if names[i] == t)
    return out


class _Quantizer:
    """Plans and applies the QDQ rewrite of one model (main graph)."""

    def __init__(self, model: ir.Model, cfg: QuantizeQDQConfig, defaults: _Setting,
                 ranges: dict[str, TensorRange]):
        self.model = model
        self.cfg = cfg
        self.defaults = defaults
        self.ranges = ranges
        self.graph = model.graph
        self.index = _Index(model.graph)
        self.namer = Namer(model.graph)
        self.types = _elem_types(model)
        self.opset = opset_version(model)
        self.modified = False
        self.activation_quant: dict[str, ActivationQuant] = {}
        self.weight_quant: dict[str, WeightQuant] = {}
        self.skipped: dict[str, str] = {}
        self.excluded: list[str] = []
        self.excluded_ids: set[int] = set()  # the anchor ops the plan leaves float (ids of their nodes)
        self.weight_only: list[str] = []
        self._tensor_settings: dict[str, str] = {}  # tensor -> activation type (overrides)
        self._excluded_tensors: set[str] = set()
        self._masks = attention_masks(model)  # stay float: -inf where masked (see attention_masks)
        self.attention = has_attention(model)
        self._replaced: list[str] = []  # float initializers replaced by quantized ones
        self._stats: dict[str, Counter] = {}
        self.means: dict[str, np.ndarray] | None = None  # mean inputs for bias correction
        self.means_samples = 0

    # -- settings -------------------------------------------------------------------------------
    def _settings(self) -> dict[int, _Setting]:
        cfg = self.cfg
        if cfg.op_types is not None:
            wanted = set(cfg.op_types)
        elif self.attention:
            # MiniLM-L6 on SST-2 dev (fp32 81.54 %): every op int8 77.75 %, MatMul/Gemm only 80.96 % -
            # the residual Adds and GELU Muls cannot hold the stream's outlier channels in 8 bits
            wanted = set(COMPUTE_OPS + TRANSPARENT_OPS)
        else:
            wanted = set(QUANTIZABLE_OPS)
        out: dict[int, _Setting] = {}
        for ov in cfg.overrides:
            for t in ov.tensors:
                if ov.exclude:
                    self._excluded_tensors.add(t)
                elif ov.activation_type not in (None, "float"):
                    self._tensor_settings[t] = ov.activation_type
        for n in self.graph:
            s = _Setting(**asdict(self.defaults))
            # not in op_types: left out unless an override configures it; exclude_* lists are final
            filtered = n.op_type in ANCHOR_OPS and n.op_type not in wanted
            hard = n.op_type in cfg.exclude_op_types or (bool(n.name) and n.name in cfg.exclude_nodes)
            touched = set(ins(n)) | set(outs(n))
            for k, ov in enumerate(cfg.overrides, 1):
                if not (n.name in ov.nodes or n.op_type in ov.op_types or touched & set(ov.tensors)):
                    continue
                if ov.exclude:
                    s.excluded, s.why_excluded = True, f"overrides[{k}]"
                    continue
                if ov.tensors and not (n.name in ov.nodes or n.op_type in ov.op_types):
                    continue  # tensor activation types are applied per tensor
                filtered = s.excluded = False  # a later rule wins over an earlier exclude
                if ov.activation_type is not None:
                    s.activation_type = ov.activation_type
                    s.explicit_activation = True
                if ov.weight_type is not None:
                    s.weight_type = ov.weight_type
                if ov.per_channel is not None:
                    s.per_channel = ov.per_channel
                if ov.reduce_range is not None:
                    s.reduce_range = ov.reduce_range
                if ov.weight_clipping is not None:
                    s.weight_clipping = ov.weight_clipping
            if hard:
                s.excluded = True
                s.why_excluded = "exclude_nodes" if n.name in cfg.exclude_nodes else "exclude_op_types"
            elif filtered and not s.excluded:
                s.excluded, s.why_excluded = True, "op type not in op_types"
            out[id(n)] = s
        return out

    # -- structure -------------------------------------------------------------------------------
    def _is_float(self, name: str) -> bool:
        return bool(name) and self.types.get(name) == TensorProto.FLOAT

    def _is_const(self, name: str) -> bool:
        return bool(name) and self.index.is_constant(name)

    def _anchor(self, n: ir.Node, s: _Setting) -> _Anchor | str | None:
        """The quantization plan for an anchor op, why it cannot be quantized, or None when it is
        not a float op at all (shape arithmetic on int64, ...)."""
        ins_ = ins(n)
        op = n.op_type
        if n.domain not in ("", "ai.onnx"):
            return None
        if not any(self._is_float(x) for x in outs(n) + ins_):
            return None
        if not all(self._is_float(o) for o in outs(n) if o):
            return "output is not float32"
        if op in COMPUTE_OPS:
            if len(ins_) < 2 or not self._is_float(ins_[0]) or not self._is_float(ins_[1]):
                return "inputs are not float32"
            w_const = self._is_const(ins_[1])
            if self._is_const(ins_[0]):
                return "input 0 is a constant (fold constants first)"
            if s.activation_type == "float" and not w_const:
                return "weight-only quantization needs a constant weight"
            if op in ("Conv", "ConvTranspose", "Gemm") and not w_const:
                return "weight is not a constant"
            bias_slot = None
            if len(ins_) > 2 and ins_[2]:
                if not self._is_const(ins_[2]):
                    return "bias is not a constant"
                if op == "Gemm":  # shapes only: no weight is read while planning
                    w_shape = self.index.constant_shape(ins_[1])
                    n_out = w_shape[0] if attr(n, "transB", 0) else w_shape[1]
                    c_shape = self.index.constant_shape(ins_[2])
                    if math.prod(c_shape) not in (1, n_out) or (len(c_shape) == 2 and c_shape[0] != 1):
                        return f"bias of shape {list(c_shape)} is not per output column"
                bias_slot = 2
            if op in ("Conv", "ConvTranspose") and len(self.index.constant_shape(ins_[1])) < 3:
                return "weight rank < 3"
            act = [0] if w_const else [0, 1]  # MatMul of two activations: both per tensor
            return _Anchor(n, s, act, [], 1 if w_const else None, bias_slot)
        if op in BINARY_OPS + VARIADIC_OPS + UNARY_OPS:
            slots = [0] if op in UNARY_OPS else list(range(len(ins_)))
            if op in UNARY_OPS and len(n.outputs) != 1:
                return "extra outputs"
            if not all(self._is_float(ins_[i]) for i in slots):
                return "inputs are not float32"
            act = [i for i in slots if not self._is_const(ins_[i])]
            const = [i for i in slots if self._is_const(ins_[i])]
            if not act:
                return "all inputs are constant (fold constants first)"
            return _Anchor(n, s, act, const)
        return "not quantizable"

    def _transparent_ok(self, n: ir.Node) -> bool:
        names = ins(n)
        if n.domain not in ("", "ai.onnx") or not names or not self._is_float(names[0]):
            return False
        if self._is_const(names[0]):
            return False
        produced = [o for o in outs(n) if o]
        if n.op_type == "MaxPool" and len(produced) != 1:
            return False
        if n.op_type == "Pad":
            mode = attr(n, "mode", "constant")
            mode = mode.decode() if isinstance(mode, bytes) else mode
            if mode == "constant":
                value = self.index.constant(names[2]) if len(names) > 2 and names[2] else None
                if len(names) > 2 and names[2] and value is None:
                    return False
                if value is not None and np.any(value != 0):
                    return False
                if attr(n, "value", 0.0) != 0.0:
                    return False
        return all(self._is_float(o) for o in produced)

    def _clip_bounds(self, n: ir.Node) -> tuple[float, float] | None:
        if n.op_type == "Relu":
            return 0.0, math.inf
        names = ins(n)
        if len(names) > 1 or self.opset >= 11:
            lo = hi = None
            if len(names) > 1 and names[1]:
                lo = self.index.constant(names[1])
                if lo is None:
                    return None
            if len(names) > 2 and names[2]:
                hi = self.index.constant(names[2])
                if hi is None:
                    return None
            return (float(lo) if lo is not None else -math.inf, float(hi) if hi is not None else math.inf)
        return float(attr(n, "min", -3.4028234663852886e38)), float(attr(n, "max", 3.4028234663852886e38))

    # -- ranges & params ---------------------------------------------------------------------------
    def _range_of(self, names: list[str], needed_by: str) -> tuple[float, float]:
        for name in names:
            if name in self.ranges:
                r = self.ranges[name]
                return float(r.min), float(r.max)
        missing = names[0]
        raise PreconditionError(f"no calibrated range for tensor {missing!r} ({needed_by}); run the 'calibrate' "
                                "pass on this model before quantize-qdq")

    @staticmethod
    def _clip_redundant(bounds: tuple[float, float], op: str, scale: np.float32, zp: int, dtype: str) -> bool:
        """ORT's IsClipMadeRedundantByQ: may the Relu/Clip before this Q be deleted?"""
        info = qtype(dtype)
        if op == "Relu":
            return zp == info.qmin
        lo, hi = bounds

        def q(v: float) -> float:
            if math.isinf(v):
                return v
            return float(np.rint(np.float32(v) / scale)) + zp

        return q(lo) <= info.qmin and q(hi) >= info.qmax

    # -- main ------------------------------------------------------------------------------------
    def run(self) -> None:
        settings = self._settings()
        idx = self.index
        nodes = list(self.graph)

        # 1. excluded tensors exclude their producers and readers
        for tensors, why in ((self._excluded_tensors, "tensor {!r} excluded"),
                             (self._masks, "attention mask {!r} stays float")):
            for t in tensors:
                p = idx.producer(t)
                for n in ([p] if p is not None else []) + idx.uses(t):
                    settings[id(n)].excluded = True
                    settings[id(n)].why_excluded = settings[id(n)].why_excluded or why.format(t)

        # 2. anchors
        anchors: dict[int, _Anchor] = {}
        weight_only: dict[int, _Anchor] = {}
        for pos, n in enumerate(nodes):
            s = settings[id(n)]
            if n.op_type not in ANCHOR_OPS:
                continue
            label = n.name or f"{n.op_type}#{pos}"
            if s.excluded:
                self.excluded.append(label)
                self.excluded_ids.add(id(n))
                continue
            plan = self._anchor(n, s)
            if plan is None:
                continue
            if isinstance(plan, str):
                self.skipped[label] = plan
                continue
            if s.activation_type == "float":
                weight_only[id(n)] = plan
                self.weight_only.append(label)
            else:
                anchors[id(n)] = plan

        # 3. Relu/Clip absorption (decided from the anchor's own type and the clip output's range)
        for a in anchors.values():
            y = a.node.outputs[0].name
            uses = idx.uses(y)
            if len(uses) != 1 or idx.is_output(y) or uses[0].op_type not in ABSORBED_OPS:
                continue
            r = uses[0]
            r_out = r.outputs[0].name
            if settings[id(r)].excluded or ins(r)[0] != y or not self._is_float(r_out):
                continue
            bounds = self._clip_bounds(r)
            if bounds is None or r_out not in self.ranges:
                continue
            lo, hi = self._range_of([r_out], "")
            lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
            if lo > hi:
                continue
            scale, zp = activation_params(lo, hi, a.setting.activation_type, symmetric=self.cfg.activation_symmetric)
            if self._clip_redundant(bounds, r.op_type, scale, zp, a.setting.activation_type):
                a.absorbed = r

        # 4. data-movement ops follow their neighbours (fixpoint)
        quantized: dict[int, Any] = dict(anchors)  # id(node) -> _Anchor or node (transparent)
        transparent = [n for n in nodes if n.op_type in TRANSPARENT_OPS and not settings[id(n)].excluded
                       and self._transparent_ok(n)]

        def act_readers(t: str) -> list[tuple[ir.Node, int]]:
            return _quantized_readers(idx, quantized, t)

        def emitted() -> set[str]:
            out = set()
            for q in quantized.values():
                if isinstance(q, _Anchor):
                    if q.node.op_type in ("Gemm", "MatMul") and not act_readers(q.qout):
                        continue  # float output: QGemm / MatMulIntegerToFloat
                    out.add(q.qout)
                else:
                    out.update(o for o in outs(q) if o)
            return out

        changed = True
        while changed:
            changed = False
            em = emitted()
            for n in transparent:
                if id(n) in quantized:
                    continue
                produced = [o for o in outs(n) if o]
                forward = ins(n)[0] in em
                backward = all(
                    not idx.is_output(o) and idx.uses(o) and len(act_readers(o)) == len(
                        [(u, i) for u in idx.uses(o) for i, x in enumerate(ins(u)) if x == o])
                    for o in produced)
                if forward or backward:
                    quantized[id(n)] = n
                    changed = True
        em = emitted()

        # 5. quantized tensors and their groups (data-movement ops share their input's params)
        parent: dict[str, str] = {}

        def find(t: str) -> str:
            while parent.get(t, t) != t:
                t = parent[t]
            return t

        qtensors: dict[str, None] = {}  # ordered set
        for q in quantized.values():
            if isinstance(q, _Anchor):
                for i in q.act_slots:
                    qtensors[ins(q.node)[i]] = None
                if q.qout in em:
                    qtensors[q.qout] = None
            else:
                qtensors[ins(q)[0]] = None
                for o in outs(q):
                    if o:
                        qtensors[o] = None
                        parent[find(o)] = find(ins(q)[0])
        members: dict[str, list[str]] = defaultdict(list)
        for t in qtensors:
            members[find(t)].append(t)

        # dtype per group: most precise request among the nodes touching it
        requests: dict[str, list[str]] = defaultdict(list)
        for q in quantized.values():
            if isinstance(q, _Anchor):
                ts = [ins(q.node)[i] for i in q.act_slots] + ([q.qout] if q.qout in em else [])
                for t in ts:
                    requests[find(t)].append(q.setting.activation_type)
            else:
                s = settings[id(q)]
                if s.explicit_activation and s.activation_type != "float":
                    requests[find(ins(q)[0])].append(s.activation_type)
        for t, ty in self._tensor_settings.items():
            if t in qtensors:
                requests[find(t)].insert(0, ty)
        group_type: dict[str, str] = {}
        for root in members:
            req = requests.get(root) or [self.defaults.activation_type]
            group_type[root] = max(req, key=lambda ty: qtype(ty).bits)  # first of the widest

        # params per group
        group_params: dict[str, tuple[np.float32, int, str, tuple[float, float]]] = {}
        clip_of = {a.qout: a.absorbed for a in anchors.values() if a.absorbed is not None}
        for root, ms in members.items():
            order = [root] + [m for m in ms if m != root]
            needed = self._needed_by(root, idx)
            lo, hi = self._range_of(order, needed)
            if root in clip_of:
                b = self._clip_bounds(clip_of[root])
                lo, hi = max(lo, b[0]), min(hi, b[1])
            dtype = group_type[root]
            scale, zp = activation_params(lo, hi, dtype, symmetric=self.cfg.activation_symmetric)
            group_params[root] = (scale, zp, dtype, (lo, hi))
        for t in qtensors:
            scale, zp, dtype, rng = group_params[find(t)]
            self.activation_quant[t] = ActivationQuant(dtype, float(scale), int(zp), rng)

        self._rewrite(nodes, anchors, weight_only, quantized, qtensors, em,
                      {t: group_params[find(t)] for t in qtensors})
        self._stats = {
            "anchors": Counter(a.node.op_type for a in anchors.values()),
            "transparent": Counter(q.op_type for q in quantized.values() if not isinstance(q, _Anchor)),
            "absorbed": Counter(a.absorbed.op_type for a in anchors.values() if a.absorbed is not None),
        }

    def _needed_by(self, t: str, idx: _Index) -> str:
        p = idx.producer(t)
        uses = idx.uses(t)
        what = f"output of {_node_label(p)}" if p is not None else "graph input"
        if uses:
            what += f", read by {_node_label(uses[0])}"
        return what

    # -- rewrite ---------------------------------------------------------------------------------
    def _rewrite(self, nodes, anchors, weight_only, quantized, qtensors, emitted, params) -> None:
        idx = self.index
        g = self.graph
        namer = self.namer
        ms_needed = False
        param_values: dict[str, tuple[ir.Value, ir.Value]] = {}
        first = nodes[0] if nodes else None
        head_last: list[ir.Node] = []  # the last node put at the head of the graph
        after_last: dict[int, ir.Node] = {}  # per producer, the last node put after it

        def qdomain(dtype: str) -> str:
            nonlocal ms_needed
            if qtype(dtype).bits == 16 and self.opset < 21:
                ms_needed = True
                return MS_DOMAIN
            return ""

        def const(array: np.ndarray, base: str) -> ir.Value:
            return add_initializer(g, array, base, namer)

        def scale_zp(t: str) -> tuple[ir.Value, ir.Value]:
            if t not in param_values:
                scale, zp, dtype, _ = params[t]
                param_values[t] = (const(np.array(scale, dtype=np.float32), f"{t}_scale"),
                                   const(np.array(zp, dtype=qtype(dtype).numpy_dtype), f"{t}_zero_point"))
            return param_values[t]

        def dq(src: ir.Value, t: str, out: str | None = None) -> ir.Node:
            s, z = scale_zp(t)
            return make_node("DequantizeLinear", [src, s, z], outputs=[out or namer.unique(f"{t}_dequantized")],
                             name=namer.unique(f"{t}_DequantizeLinear"), domain=qdomain(params[t][2]))

        def place_after(producer: ir.Node | None, new: list[ir.Node]) -> None:
            if producer is None:
                if head_last:
                    g.insert_after(head_last[0], new)
                else:
                    g.insert_before(first, new)
                head_last[:] = [new[-1]]
                return
            g.insert_after(after_last.get(id(producer), producer), new)
            after_last[id(producer)] = new[-1]

        def readers(t: str) -> list[tuple[ir.Node, int]]:
            return _quantized_readers(idx, quantized, t)

        # activations: one Q per tensor, one DQ per quantized reader slot
        for t in qtensors:
            value = idx.value(t)
            producer = value.producer()
            is_emitted = t in emitted
            reading = readers(t)
            reading_nodes = {id(r) for r, _ in reading}
            float_users = [(u.node, u.idx) for u in value.uses()
                           if u.node.graph is g and id(u.node) not in reading_nodes]
            output_slot = is_emitted and value.is_graph_output()
            if output_slot:  # the producer writes t_float; the dequantized value keeps the output's name
                value.name = namer.unique(f"{t}_float")
            qnode = make_node("QuantizeLinear", [value, *scale_zp(t)], outputs=[namer.unique(f"{t}_quantized")],
                              name=namer.unique(f"{t}_QuantizeLinear"), domain=qdomain(params[t][2]))
            q_out = qnode.outputs[0]
            tail = [qnode]
            if is_emitted:
                if output_slot:
                    final = dq(q_out, t, out=t)
                    final.outputs[0].type, final.outputs[0].shape = value.type, value.shape
                    tail.append(final)
                    for k, o in enumerate(g.outputs):
                        if o is value:
                            g.outputs[k] = final.outputs[0]
                elif float_users:
                    shared = dq(q_out, t)
                    tail.append(shared)
                    for u, slot in float_users:
                        u.replace_input_with(slot, shared.outputs[0])
                    # subgraphs reading t implicitly keep the float value
            place_after(producer, tail)
            for u, slot in reading:
                d = dq(q_out, t)
                u.replace_input_with(slot, d.outputs[0])
                g.insert_before(u, d)

        # weights, biases, constant inputs
        for a in list(anchors.values()) + list(weight_only.values()):
            self._quantize_params(a, params, qdomain)

        if ms_needed and MS_DOMAIN not in self.model.opset_imports:
            self.model.opset_imports[MS_DOMAIN] = 1
        idx.refresh()
        self._drop_unused(self._replaced)
        self.modified = bool(qtensors) or bool(weight_only)

    def _drop_unused(self, names: list[str]) -> None:
        g = self.graph
        for name in dict.fromkeys(names):
            v = g.initializers.get(name)
            if v is not None:
                if not v.uses() and not v.is_graph_output() and not v.is_graph_input():
                    del g.initializers[name]
                continue
            v = self.index.value(name)
            node = v.producer() if v is not None else None
            if node is not None and node.op_type == "Constant" and not v.uses() and not v.is_graph_output():
                g.remove(node, safe=True)
        self.index.refresh()

    def _quantize_params(self, a: _Anchor, params, qdomain) -> None:
        idx = self.index
        g = self.graph
        namer = self.namer
        n = a.node
        s = a.setting
        replaced = self._replaced
        label = n.name or n.op_type

        def const(array: np.ndarray, base: str) -> ir.Value:
            return add_initializer(g, array, base, namer)

        def insert_dq(inputs: list[ir.Value], base: str, domain: str = "", **attributes) -> ir.Value:
            d = make_node("DequantizeLinear", inputs, attributes or None, outputs=[namer.unique(f"{base}_dequantized")],
                          name=namer.unique(f"{base}_DequantizeLinear"), domain=domain)
            g.insert_before(n, d)
            return d.outputs[0]

        # constant activation-like inputs (Add/Mul/Concat operands, constant MatMul A): per tensor
        act_type = s.activation_type if s.activation_type != "float" else self.defaults.activation_type
        for i in a.const_slots:
            name = a.inputs[i]
            value = idx.constant(name).astype(np.float32)
            idx.release(name)
            scale, zp = activation_params(float(value.min()), float(value.max()), act_type,
                                          symmetric=self.cfg.activation_symmetric)
            qv = quantize(value, scale, zp, act_type)
            out = insert_dq([const(qv, f"{name}_quantized"), const(np.array(scale, np.float32), f"{name}_scale"),
                             const(np.array(zp, dtype=qtype(act_type).numpy_dtype), f"{name}_zero_point")],
                            name, domain=qdomain(act_type))
            n.replace_input_with(i, out)
            replaced.append(name)

        if a.weight_slot is None:
            return
        op = n.op_type
        wname = a.inputs[a.weight_slot]
        w = idx.constant(wname).astype(np.float32)  # a copy: the float weight is read once, here
        idx.release(wname)
        if op == "Gemm":
            alpha = float(attr(n, "alpha", 1.0))
            if alpha != 1.0:  # QGemm assumes bias scale = a_scale * b_scale: fold alpha into B
                w = (w * np.float32(alpha)).astype(np.float32)
                set_attr(n, "alpha", 1.0)
        axis: int | None
        if op == "Conv":
            axis = 0
        elif op == "ConvTranspose":
            axis = 1
        elif op == "Gemm":
            axis = 0 if attr(n, "transB", 0) else 1
        else:
            axis = w.ndim - 1
        if not s.per_channel or w.ndim < 2:
            axis = None
        group = int(attr(n, "group", 1))
        depthwise = op == "Conv" and group > 1 and w.shape[1] == 1 and w.shape[0] == group
        # ORT's depthwise kernel accumulates in int32 (no saturation); ConvTranspose runs in float.
        # Only the u8/s8 x s8 GEMM kernel saturates (u8 x u8 widens to 16 bits first).
        reduce = bool(s.reduce_range and s.weight_type == "int8" and not depthwise and op != "ConvTranspose"
                      and s.activation_type in ("uint8", "int8", "float"))
        wt = s.weight_type
        mse = clipping_for(qtype(wt).bits, s.weight_clipping)
        scales, zps = weight_params(w, wt, axis=axis, symmetric=self.cfg.weight_symmetric, reduce_range=reduce,
                                    mse_clip=mse)

        # float bias per output channel (Gemm: beta folded, broadcast to [N]); None if absent
        n_out = {"Conv": w.shape[0], "ConvTranspose": w.shape[1] * group,
                 "Gemm": w.shape[0] if attr(n, "transB", 0) else w.shape[1]}.get(op)
        b = None
        # int32 bias only where it fits: at a 16-bit input scale (256x finer) a real bias overflows int32
        int_bias = self.cfg.bias_type == "int32" or (self.cfg.bias_type == "auto"
                                                     and s.activation_type in ("uint8", "int8"))
        quantize_bias_too = s.activation_type != "float" and int_bias
        beta_folded = False
        correct = self._bias_correction(a, w) if n_out is not None else None
        if a.bias_slot is not None:
            b = idx.constant(a.inputs[a.bias_slot]).astype(np.float32).reshape(-1)
            idx.release(a.inputs[a.bias_slot])
            if op == "Gemm":
                beta = float(attr(n, "beta", 1.0))
                if beta != 1.0 and (quantize_bias_too or correct is not None):
                    b = b * np.float32(beta)
                    set_attr(n, "beta", 1.0)
                    beta_folded = True
                b = np.broadcast_to(b, (n_out,)).astype(np.float32)
        act_scale = (np.float32(params[a.inputs[a.act_slots[0]]][0])
                     if s.activation_type != "float" and a.act_slots else None)
        s_in = act_scale if quantize_bias_too else None

        def per_output(sc: np.ndarray) -> np.ndarray:  # weight scales -> one per output channel
            if axis is None:
                return np.full(n_out, sc, dtype=np.float32)
            return np.tile(sc, group) if op == "ConvTranspose" else sc

        raised = 0
        for _ in range(3):  # raising a scale changes the weights' rounding, hence the correction
            # clipped ranges saturate on the symmetric range the search assumed (int4: [-7, 7], as scored)
            qw = quantize(w, scales, zps, wt, axis=axis, clip=qrange(wt, symmetric=self.cfg.weight_symmetric,
                                                                    reduce_range=reduce) if mse else None)
            bias = b
            if correct is not None:
                delta = correct(dequantize(qw, scales, zps, axis=axis) - w)
                bias = (b if b is not None else np.zeros(n_out, np.float32)) - delta.astype(np.float32)
            if bias is None or s_in is None:
                break
            fitted = fit_weight_scale_for_bias(bias, s_in, per_output(scales))
            if axis is None:
                fitted = np.array(fitted.max(), dtype=np.float32)
            elif op == "ConvTranspose":
                fitted = fitted.reshape(group, -1).max(axis=0)
            if np.array_equal(fitted, scales):
                break
            raised = int(np.sum(fitted != scales))
            scales = fitted.astype(np.float32)

        base = wname
        dq_attrs = {"axis": axis} if axis is not None else {}
        out = insert_dq([const(qw, f"{base}_quantized"), const(scales.astype(np.float32), f"{base}_scale"),
                         const(zps.astype(qtype(wt).numpy_dtype), f"{base}_zero_point")], base, **dq_attrs)
        n.replace_input_with(a.weight_slot, out)
        replaced.append(wname)
        w_rank = w.ndim
        del w, qw

        # A float bias on a Conv/Gemm between DequantizeLinears is quantized to int32 by ORT itself at load,
        # saturating where it does not fit (a 16-bit input scale): such a bias goes to an Add after the op.
        if (bias is not None and s_in is None and act_scale is not None and op in ("Conv", "Gemm")
                and np.any(np.abs(bias) >= 0.5 * 2.0 ** 31 * act_scale * per_output(scales))):
            self._bias_after(n, op, bias, label, const, w_rank)
            if a.bias_slot is not None:
                replaced.append(a.inputs[a.bias_slot])
            bias = None
        bias_name = None
        if bias is not None and (s_in is not None or correct is not None or beta_folded):
            bias_name = a.inputs[a.bias_slot] if a.bias_slot is not None else f"{label}_bias"
            if s_in is not None:  # int32, scale = input scale x weight scale, zero point 0
                bq, bscale = quantize_bias(bias, float(s_in), per_output(scales))
                bout = insert_dq([const(bq, f"{bias_name}_quantized"),
                                  const(bscale.astype(np.float32), f"{bias_name}_scale"),
                                  const(np.zeros(bscale.shape, np.int32), f"{bias_name}_zero_point")],
                                 bias_name, axis=0)
            else:  # weight-only: float bias, corrected
                bout = const(bias.astype(np.float32), f"{bias_name}_corrected")
            if a.bias_slot is None:
                if len(n.inputs) < 3:
                    n.resize_inputs(3)
                n.replace_input_with(2, bout)
            else:
                n.replace_input_with(a.bias_slot, bout)
                replaced.append(a.inputs[a.bias_slot])

        self.weight_quant[label] = WeightQuant(
            tensor=wname, dtype=wt, axis=axis, scales=tuple(float(x) for x in np.ravel(scales)),
            zero_points=tuple(int(x) for x in np.ravel(zps)), reduce_range=reduce, bias=bias_name,
            bias_scales_raised=raised, bias_corrected=correct is not None, mse_clipped=mse)

    def _bias_after(self, n: ir.Node, op: str, bias: np.ndarray, label: str, const, w_rank: int) -> None:
        """``op(x, w) + bias`` as the op without its bias followed by an Add (same value, same name)."""
        g = self.graph
        if len(n.inputs) > 2:
            n.replace_input_with(2, None)
            n.resize_inputs(2)
        shape = (-1,) + (1,) * (w_rank - 2) if op == "Conv" else (-1,)
        b = const(bias.astype(np.float32).reshape(shape), f"{label}_bias_float")
        out = n.outputs[0]
        add = make_node("Add", [None, b], outputs=[self.namer.unique(f"{out.name}_before_bias")],
                        name=self.namer.unique(f"{label}_bias_add"))
        g.insert_after(n, add)
        # the Add takes over the op's output value (its readers, graph-output place and name stay put)
        inner = add.outputs[0]
        inner_name, out_name = inner.name, out.name
        ir.convenience.replace_all_uses_with(out, inner, replace_graph_outputs=True)
        out.name, inner.name = f"{out_name}__tmp", out_name
        out.name = inner_name
        add.replace_input_with(0, out)
        self.index.refresh()

    # -- bias correction -------------------------------------------------------------------------
    def _bias_correction(self, a: _Anchor, w: np.ndarray):
        """``delta(dW)``: the mean shift of each output channel that the weight error ``dW`` causes
        on the calibration data (Nagel et al. 2019, "empirical bias correction"), or None.

        The op is linear in its input, so the mean of ``op(x, dW)`` over the data is ``op(E[x], dW)``:
        only the mean input (per position) is needed, computed once by ``_collect_means``.
        """
        if self.means is None:
            return None
        mean = self.means.get(a.inputs[0])
        if mean is None:
            return None
        n = a.node
        if n.op_type == "Gemm":
            if attr(n, "transA", 0) or mean.ndim != 1:
                return None
            trans_b = bool(attr(n, "transB", 0))
            return lambda dw: (dw @ mean.astype(np.float32)) if trans_b else (mean.astype(np.float32) @ dw)
        if n.op_type in ("Conv", "ConvTranspose"):
            return lambda dw: _conv_mean_shift(n, mean, dw)
        return None

    def collect_means(self, data, batch_size: int = 16) -> None:
        """Mean (over the calibration samples) of every weighted op's input, for bias correction."""
        from onnxopt.runtime import make_session, run

        g = self.graph
        wanted: list[str] = []
        for n in g:
            names = ins(n)
            if n.op_type in ("Conv", "ConvTranspose", "Gemm") and len(names) > 1 and self._is_const(names[1]):
                if names[0] and not self._is_const(names[0]) and names[0] not in wanted:
                    wanted.append(names[0])
        if not wanted:
            self.means = {}
            return
        probe = exposed(self.model, wanted, keep_outputs=False)
        # level "all": exposed outputs are never fused away, and the convolutions run on fast kernels
        session = make_session(probe, opt_level="all", what="model (bias-correction statistics)")
        sums: dict[str, np.ndarray] = {}
        bad: set[str] = set()
        count = 0
        for _, outs in run(session, data, batch_size=batch_size, outputs=wanted):
            k = 0
            for t in wanted:
                v = outs[t]
                k = v.shape[0]
                if t in bad:
                    continue
                # float32 within a batch (a few samples: ~1e-6 relative), float64 across batches;
                # no float64 copy of the whole activation batch (that copy was most of the time)
                part = v.sum(axis=0).astype(np.float64)
                if t in sums and sums[t].shape != part.shape:  # varying spatial size: no per-position mean
                    bad.add(t)
                    continue
                sums[t] = sums[t] + part if t in sums else part
            count += k
        self.means = {t: (v / max(count, 1)) for t, v in sums.items() if t not in bad}
        self.means_samples = count

    # -- report ----------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        st = getattr(self, "_stats", {})
        ops = Counter()
        for k in ("anchors", "transparent"):
            ops.update(st.get(k, {}))
        out: dict[str, Any] = {
            "quantized_nodes": dict(sorted(ops.items())),
            "absorbed_activations": dict(st.get("absorbed", {})),
            "quantized_tensors": len(self.activation_quant),
            "quantized_weights": len(self.weight_quant),
            "reduced_range_weights": sum(1 for w in self.weight_quant.values() if w.reduce_range),
        }
        activation_types = Counter(q.dtype for q in self.activation_quant.values())
        if len(activation_types) > 1:
            out["activation_types"] = dict(activation_types)
        weight_types = Counter(w.dtype for w in self.weight_quant.values())
        if len(weight_types) > 1:
            out["weight_types"] = dict(weight_types)
        if self._masks:
            out["attention_masks_float"] = len(self._masks)
        if self.attention and self.cfg.op_types is None:
            out["op_types_default"] = "MatMul/Gemm/Conv (attention model: elementwise ops on the residual stream stay float)"
        clipped = sum(1 for w in self.weight_quant.values() if w.mse_clipped)
        if clipped:
            out["mse_clipped_weights"] = clipped
        raised = {k: w.bias_scales_raised for k, w in self.weight_quant.items() if w.bias_scales_raised}
        if raised:
            out["weight_scales_raised_for_int32_bias"] = raised
        if self.weight_only:
            out["weight_only_nodes"] = self.weight_only[:20]
        if self.excluded:
            out["excluded_nodes"] = self.excluded[:20]
            out["excluded_count"] = len(self.excluded)
        if self.skipped:
            out["skipped_nodes"] = dict(list(self.skipped.items())[:20])
            out["skipped_count"] = len(self.skipped)
        return out
