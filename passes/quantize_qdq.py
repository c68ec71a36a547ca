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
import tempfile
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from onnx import TensorProto, helper
from pydantic import BaseModel, ConfigDict, Field, model_validator

from onnxopt.errors import OnnxoptError, PreconditionError
from onnxopt.isa import SCHEME_SPECS, SchemeChoice, choose_scheme, detect_cpu
from onnxopt.legacy_graph import GraphIndex, attr, opset_version, set_attr
from onnxopt.mixed import BitAssignmentResult, clipping_for
from onnxopt.pass_infra import PassConfig, PassResult, ProtoPass
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

# --- op tables -------------------------------------------------------------------------------
COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
BINARY_OPS = ("Add", "Mul")
VARIADIC_OPS = ("Concat",)
UNARY_OPS = ("AveragePool", "GlobalAveragePool", "Sigmoid", "LeakyRelu", "Softmax")
# Ops that only move/select values: quantized with their input's scale and zero point.
TRANSPARENT_OPS = ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Gather",
                   "GatherElements", "Expand", "Tile", "MaxPool", "Resize", "Split", "Pad", "Identity",
                   "ReduceMax", "ReduceMin", "DepthToSpace", "SpaceToDepth")
ANCHOR_OPS = COMPUTE_OPS + BINARY_OPS + VARIADIC_OPS + UNARY_OPS
QUANTIZABLE_OPS = ANCHOR_OPS + TRANSPARENT_OPS
ABSORBED_OPS = ("Relu", "Clip")
# ORT's drop-QDQ rules refuse 16-bit for these (they stay float between DQ and Q, still exact).
NO_16BIT_TRANSPARENT = ("MaxPool", "Resize", "ReduceMax", "ReduceMin")

# Kernels as they appear in ORT's optimized graph.
INTEGER_KERNELS = ("QLinearConv", "NhwcQLinearConv", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat",
                   "ConvInteger", "MatMulInteger", "DynamicQuantizeMatMul", "QAttention",
                   "DynamicQuantizeLSTM", "QLinearConvTranspose")
FLOAT_KERNELS = ("Conv", "FusedConv", "NhwcFusedConv", "ConvTranspose", "Gemm", "FusedGemm", "MatMul",
                 "FusedMatMul", "TransposeMatMul", "Attention", "MultiHeadAttention")
WEIGHT_ONLY_KERNELS = ("MatMulNBits", "MatMulBnb4")

MS_DOMAIN = "com.microsoft"

ActivationType = Literal["uint8", "int8", "uint16", "int16"]
WeightType = Literal["int8", "uint8", "int4", "uint4", "int16"]


# --- config ----------------------------------------------------------------------------------
class QuantOverride(BaseModel):
    """One rule of per-node quantization settings; rules apply in order, later ones win.

    Select nodes by name (``nodes``), by op type (``op_types``) or by the activation tensors
    they read or write (``tensors``); a node matches if any selector matches. Then either
    ``exclude`` them (they stay float) or set what to change:

    * ``activation_type``: uint8/int8/uint16/int16 for the node's quantized inputs and output,
      or ``float`` to quantize only its weights (weight-only; e.g. int4 MatMul -> MatMulNBits).
      A tensor shared by nodes asking for different types gets the most precise one.
    * ``weight_type``: int8/uint8/int4/uint4 (4-bit needs opset 21; the pass upgrades).
    * ``per_channel`` / ``reduce_range`` / ``weight_clipping``: per-node versions of the global settings.

    With ``tensors``, ``exclude`` keeps those tensors float, which excludes the nodes that
    produce or read them; ``activation_type`` sets those tensors' type.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    nodes: list[str] = Field(default_factory=list, description="node names")
    op_types: list[str] = Field(default_factory=list, description="op types, e.g. [MatMul]")
    tensors: list[str] = Field(default_factory=list, description="activation tensor names")
    exclude: bool = Field(False, description="leave the selected nodes (or tensors) in float")
    activation_type: ActivationType | Literal["float"] | None = None
    weight_type: WeightType | None = None
    per_channel: bool | None = None
    reduce_range: bool | None = None
    weight_clipping: Literal["auto", "mse", "max"] | None = None

    @model_validator(mode="after")
    def _check(self) -> QuantOverride:
        if not (self.nodes or self.op_types or self.tensors):
            raise ValueError("an override needs nodes, op_types or tensors to select")
        settings = (self.activation_type, self.weight_type, self.per_channel, self.reduce_range,
                    self.weight_clipping)
        if not self.exclude and all(s is None for s in settings):
            raise ValueError("an override must exclude or set activation_type/weight_type/per_channel/"
                             "reduce_range/weight_clipping")
        if self.exclude and any(s is not None for s in settings):
            raise ValueError("an override either excludes or sets types, not both")
        return self


class QuantizeQDQConfig(PassConfig):
    """Static QDQ quantization. Types left unset come from ``scheme``."""

    type: Literal["quantize-qdq"] = "quantize-qdq"
    scheme: Literal["auto", "u8s8", "u8s8-rr", "u8u8", "s8s8"] = Field(
        "auto", description="activation x weight types for the target CPU; auto: chosen from its flags")
    activation_type: ActivationType | None = Field(None, description="default: from scheme")
    weight_type: WeightType | None = Field(None, description="default: from scheme")
    reduce_range: bool | None = Field(
        None, description="7-bit weights where the u8 x s8 kernel saturates (default: from scheme)")
    per_channel: bool = Field(True, description="one weight scale per output channel")
    activation_symmetric: bool = Field(False, description="symmetric activation ranges (zero point mid-type)")
    weight_symmetric: bool = Field(True, description="symmetric weights (zero point 0, or 128 for uint8)")
    weight_clipping: Literal["auto", "mse", "max"] = Field(
        "auto", description="weight range per channel: max-abs, or clipped to the ratio minimising the squared "
        "weight error (mse); auto: mse for 4-bit weights, max otherwise")
    op_types: list[str] | None = Field(
        None, description="op types to quantize (default: all supported); data-movement ops follow their neighbours")
    exclude_nodes: list[str] = Field(default_factory=list, description="node names left in float")
    exclude_op_types: list[str] = Field(default_factory=list, description="op types left in float")
    overrides: list[QuantOverride] = Field(default_factory=list, description="per node/op/tensor rules")
    ranges_file: str | None = Field(None, description="ranges JSON to use instead of the calibrate pass's result")
    cpu_flags: list[str] | None = Field(
        None, description="target CPU flags for scheme=auto (default: this machine's /proc/cpuinfo)")
    allow_opset_upgrade: bool = Field(True, description="upgrade the opset (onnx.version_converter) if needed")
    bias_correction: Literal["auto", "on", "off"] = Field(
        "auto", description="shift biases by the mean error weight rounding causes on the calibration data "
        "(auto: when calibration data is given)")
    check_kernels: bool = Field(True, description="read back ORT's optimized graph and report integer kernels")


# --- results ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ActivationQuant:
    """Quantization of one activation tensor (shared by its data-movement group)."""

    dtype: str
    scale: float
    zero_point: int
    range: tuple[float, float]


@dataclass(frozen=True)
class WeightQuant:
    """Quantization of one node's weight (and bias)."""

    tensor: str
    dtype: str
    axis: int | None
    scales: tuple[float, ...]
    zero_points: tuple[int, ...]
    reduce_range: bool
    bias: str | None = None
    bias_scales_raised: int = 0  # channels whose weight scale was raised to fit the int32 bias
    bias_corrected: bool = False  # bias shifted by the weight rounding's mean effect on calibration data
    mse_clipped: bool = False  # ranges clipped per channel to minimise the weight MSE


@dataclass(frozen=True)
class KernelShare:
    """Which compute kernels ONNX Runtime actually runs, from its optimized graph."""

    integer: dict[str, int]
    float: dict[str, int]
    weight_only: dict[str, int]
    float_nodes: tuple[str, ...]
    opt_level: str

    @property
    def total(self) -> int:
        return sum(self.integer.values()) + sum(self.float.values()) + sum(self.weight_only.values())

    @property
    def share(self) -> float:
        return sum(self.integer.values()) / self.total if self.total else 0.0


@dataclass
class QuantizeQDQResult(PassResult):
    scheme: SchemeChoice | None = None
    activations: dict[str, ActivationQuant] = field(default_factory=dict)
    weights: dict[str, WeightQuant] = field(default_factory=dict)  # by node name
    kernels: KernelShare | None = None
    # The float model this pass quantized and the bias-correction means it used, so a later pass
    # (latency-placement) can re-quantize single nodes differently without re-reading the data.
    source: onnx.ModelProto | None = None
    means: tuple[dict[str, np.ndarray], int] | None = None
    config: QuantizeQDQConfig | None = None


# --- helpers -----------------------------------------------------------------------------------
def _hint(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _node_label(node: onnx.NodeProto) -> str:
    return f"{node.op_type} {node.name!r}" if node.name else node.op_type


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every value in the main graph (after ONNX shape inference)."""
    types: dict[str, int] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - types stay unknown where inference fails
        inferred = model
    g = inferred.graph
    for v in list(g.input) + list(g.output) + list(g.value_info):
        if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
            types[v.name] = v.type.tensor_type.elem_type
    for t in g.initializer:
        types[t.name] = t.data_type
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    types[n.output[0]] = a.t.data_type
                elif a.name in ("value_float", "value_floats"):
                    types[n.output[0]] = TensorProto.FLOAT
    return types


def kernel_share(model: onnx.ModelProto, opt_level: str = "all") -> KernelShare:
    """Count the integer vs float compute kernels in ONNX Runtime's optimized version of ``model``.

    ORT optimizes the model as a session would (``opt_level`` "all" = ORT_ENABLE_ALL, or
    "extended") and writes the result to a temporary file, which is read back. Compute kernels
    are the Conv/Gemm/MatMul family; integer ones are QLinearConv, QGemm, QLinearMatMul,
    MatMulIntegerToFloat, ConvInteger, ...
    """
    import onnxruntime as ort

    levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}
    with tempfile.TemporaryDirectory(prefix="onnxopt-kernels-") as tmp:
        src = Path(tmp) / "model.onnx"
        out = Path(tmp) / "optimized.onnx"
        big = model.ByteSize() > 1_800_000_000
        onnx.save_model(model, str(src), save_as_external_data=big)
        so = ort.SessionOptions()
        so.graph_optimization_level = levels[opt_level]
        so.optimized_model_filepath = str(out)
        so.log_severity_level = 3
        so.intra_op_num_threads = 1
        if big:
            so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "opt.data")
        try:
            ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - surface ORT's message as a user error
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise OnnxoptError(f"onnxruntime cannot load the quantized model: {first[:300]}") from None
        opt = onnx.load(str(out), load_external_data=False)
    integer: Counter[str] = Counter()
    flt: Counter[str] = Counter()
    weight_only: Counter[str] = Counter()
    float_nodes: list[str] = []
    for n in opt.graph.node:
        if n.op_type in INTEGER_KERNELS:
            integer[n.op_type] += 1
        elif n.op_type in FLOAT_KERNELS:
            key = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
            flt[key] += 1
            float_nodes.append(n.name)
        elif n.op_type in WEIGHT_ONLY_KERNELS:
            weight_only[n.op_type] += 1
    return KernelShare(dict(sorted(integer.items())), dict(sorted(flt.items())), dict(sorted(weight_only.items())),
                       tuple(float_nodes), opt_level)


def _conv_mean_shift(node: onnx.NodeProto, mean: np.ndarray, dw: np.ndarray) -> np.ndarray:
    """Per output channel, the spatial mean of ``node`` (Conv/ConvTranspose) applied to the mean
    input map ``mean`` with weights ``dw`` and no bias, computed with ONNX Runtime."""
    import onnxruntime as ort

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
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
    node: onnx.NodeProto
    setting: _Setting
    act_slots: list[int]  # inputs read as quantized activations (Q'd at run time)
    const_slots: list[int]  # constant inputs quantized per tensor like activations
    weight_slot: int | None = None
    bias_slot: int | None = None
    absorbed: onnx.NodeProto | None = None  # Relu/Clip deleted by ORT after this op
    inputs: list[str] = field(default_factory=list)  # input names before the rewrite

    def __post_init__(self):
        self.inputs = list(self.node.input)

    @property
    def qout(self) -> str:
        return (self.absorbed or self.node).output[0]


class QuantizeQDQ(ProtoPass):
    name = "quantize-qdq"
    summary = ("Static INT8 quantization: QuantizeLinear/DequantizeLinear placed for ONNX Runtime's integer "
               "kernels, per-channel weights, scheme chosen for the CPU.")
    Config = QuantizeQDQConfig
    # Bias-correction means computed earlier for the same float model (set by latency-placement).
    precomputed_means: tuple[dict[str, np.ndarray], int] | None = None

    # -- entry points ----------------------------------------------------------------------------
    def requires(self, model: onnx.ModelProto) -> None:
        super().requires(model)
        if self.config.ranges_file is None and self.context.latest(CalibrationResult) is None:
            raise PreconditionError("quantize-qdq needs activation ranges: run the 'calibrate' pass before it "
                                    "(or set ranges_file)")
        already = sorted({n.op_type for n in model.graph.node
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

    def call(self, model: onnx.ModelProto) -> QuantizeQDQResult:
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
        source = onnx.ModelProto()
        source.CopyFrom(model)
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

    def ensures(self, model: onnx.ModelProto) -> None:
        # One QuantizeLinear per tensor, and a DequantizeLinear shared by several nodes never feeds
        # a node all of whose inputs are dequantized (a QDQ group: ORT would not fuse it).
        seen: dict[str, str] = {}
        index = GraphIndex(model.graph)

        def grouped(node: onnx.NodeProto) -> bool:
            ins = [x for x in node.input if x]
            return node.op_type in ANCHOR_OPS and all(
                (p := index.producer(x)) is not None and p.op_type == "DequantizeLinear" for x in ins)

        for n in model.graph.node:
            if n.op_type == "QuantizeLinear":
                if n.input[0] in seen:
                    raise PreconditionError(f"tensor {n.input[0]!r} is quantized twice ({seen[n.input[0]]!r}, {n.name!r})")
                seen[n.input[0]] = n.name
            elif n.op_type == "DequantizeLinear":
                uses = index.uses(n.output[0])
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

    def _validate_names(self, model: onnx.ModelProto, cfg: QuantizeQDQConfig | None = None) -> None:
        cfg = cfg or self.config
        nodes = {n.name: n for n in model.graph.node if n.name}
        for op in (cfg.op_types or []):
            if op not in ANCHOR_OPS + TRANSPARENT_OPS:
                raise PreconditionError(f"op_types: {op!r} cannot be quantized{_hint(op, QUANTIZABLE_OPS)} "
                                        f"(quantizable: {', '.join(ANCHOR_OPS)})")
        for name in cfg.exclude_nodes:
            if name not in nodes:
                raise PreconditionError(f"exclude_nodes: no node named {name!r}{_hint(name, nodes)}")
        values = {v for n in model.graph.node for v in list(n.input) + list(n.output)} | {
            i.name for i in model.graph.input}
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

    def _maybe_upgrade(self, model: onnx.ModelProto, defaults: _Setting, cfg: QuantizeQDQConfig | None = None):
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
        from onnx import version_converter

        try:
            upgraded = version_converter.convert_version(model, need)
        except Exception as exc:  # noqa: BLE001 - the converter raises assorted errors
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PreconditionError(f"{why} need opset >= {need}; onnx.version_converter failed to upgrade "
                                    f"from {current}: {first[:200]}") from None
        return upgraded, current, need, why


def _quantized_readers(idx: GraphIndex, quantized: dict, t: str) -> list[tuple[onnx.NodeProto, int]]:
    """(node, input slot) pairs where a quantized node reads activation ``t``."""
    out = []
    for u in idx.uses(t):
        q = quantized.get(id(u))
        if q is None:
            continue
        slots = q.act_slots if isinstance(q, _Anchor) else [0]
        out.extend((u, i) for i in slots if u.input[i] == t)
    return out


class _Quantizer:
    """Plans and applies the QDQ rewrite of one model (main graph)."""

    def __init__(self, model: onnx.ModelProto, cfg: QuantizeQDQConfig, defaults: _Setting,
                 ranges: dict[str, TensorRange]):
        self.model = model
        self.cfg = cfg
        self.defaults = defaults
        self.ranges = ranges
        self.graph = model.graph
        self.index = GraphIndex(model.graph)
        self.types = _elem_types(model)
        self.opset = opset_version(model)
        self.modified = False
        self.activation_quant: dict[str, ActivationQuant] = {}
        self.weight_quant: dict[str, WeightQuant] = {}
        self.skipped: dict[str, str] = {}
        self.excluded: list[str] = []
        self.weight_only: list[str] = []
        self._tensor_settings: dict[str, str] = {}  # tensor -> activation type (overrides)
        self._excluded_tensors: set[str] = set()
        self._replaced: list[str] = []  # float initializers replaced by quantized ones
        self._stats: dict[str, Counter] = {}
        self.means: dict[str, np.ndarray] | None = None  # mean inputs for bias correction
        self.means_samples = 0

    # -- settings -------------------------------------------------------------------------------
    def _settings(self) -> dict[int, _Setting]:
        cfg = self.cfg
        wanted = set(cfg.op_types) if cfg.op_types is not None else set(QUANTIZABLE_OPS)
        out: dict[int, _Setting] = {}
        for ov in cfg.overrides:
            for t in ov.tensors:
                if ov.exclude:
                    self._excluded_tensors.add(t)
                elif ov.activation_type not in (None, "float"):
                    self._tensor_settings[t] = ov.activation_type
        for n in self.graph.node:
            s = _Setting(**asdict(self.defaults))
            # not in op_types: left out unless an override configures it; exclude_* lists are final
            filtered = n.op_type in ANCHOR_OPS and n.op_type not in wanted
            hard = n.op_type in cfg.exclude_op_types or (bool(n.name) and n.name in cfg.exclude_nodes)
            touched = set(n.input) | set(n.output)
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
        return bool(name) and self.index.constant(name) is not None

    def _anchor(self, n: onnx.NodeProto, s: _Setting) -> _Anchor | str | None:
        """The quantization plan for an anchor op, why it cannot be quantized, or None when it is
        not a float op at all (shape arithmetic on int64, ...)."""
        ins = list(n.input)
        op = n.op_type
        if n.domain not in ("", "ai.onnx"):
            return None
        if not any(self._is_float(x) for x in list(n.output) + ins):
            return None
        if not all(self._is_float(o) for o in n.output if o):
            return "output is not float32"
        if op in COMPUTE_OPS:
            if len(ins) < 2 or not self._is_float(ins[0]) or not self._is_float(ins[1]):
                return "inputs are not float32"
            w_const = self._is_const(ins[1])
            if self._is_const(ins[0]):
                return "input 0 is a constant (fold constants first)"
            if s.activation_type == "float" and not w_const:
                return "weight-only quantization needs a constant weight"
            if op in ("Conv", "ConvTranspose", "Gemm") and not w_const:
                return "weight is not a constant"
            bias_slot = None
            if len(ins) > 2 and ins[2]:
                if not self._is_const(ins[2]):
                    return "bias is not a constant"
                if op == "Gemm":
                    w = self.index.constant(ins[1])
                    n_out = w.shape[0] if attr(n, "transB", 0) else w.shape[1]
                    c = self.index.constant(ins[2])
                    if c.size not in (1, n_out) or (c.ndim == 2 and c.shape[0] != 1):
                        return f"bias of shape {list(c.shape)} is not per output column"
                bias_slot = 2
            if op in ("Conv", "ConvTranspose") and self.index.constant(ins[1]).ndim < 3:
                return "weight rank < 3"
            act = [0] if w_const else [0, 1]  # MatMul of two activations: both per tensor
            return _Anchor(n, s, act, [], 1 if w_const else None, bias_slot)
        if op in BINARY_OPS + VARIADIC_OPS + UNARY_OPS:
            slots = [0] if op in UNARY_OPS else list(range(len(ins)))
            if op in UNARY_OPS and len(n.output) != 1:
                return "extra outputs"
            if not all(self._is_float(ins[i]) for i in slots):
                return "inputs are not float32"
            act = [i for i in slots if not self._is_const(ins[i])]
            const = [i for i in slots if self._is_const(ins[i])]
            if not act:
                return "all inputs are constant (fold constants first)"
            return _Anchor(n, s, act, const)
        return "not quantizable"

    def _transparent_ok(self, n: onnx.NodeProto) -> bool:
        if n.domain not in ("", "ai.onnx") or not n.input or not self._is_float(n.input[0]):
            return False
        if self._is_const(n.input[0]):
            return False
        outs = [o for o in n.output if o]
        if n.op_type == "MaxPool" and len(outs) != 1:
            return False
        if n.op_type == "Pad":
            mode = attr(n, "mode", b"constant")
            mode = mode.decode() if isinstance(mode, bytes) else mode
            if mode == "constant":
                value = self.index.constant(n.input[2]) if len(n.input) > 2 and n.input[2] else None
                if len(n.input) > 2 and n.input[2] and value is None:
                    return False
                if value is not None and np.any(value != 0):
                    return False
                if attr(n, "value", 0.0) != 0.0:
                    return False
        return all(self._is_float(o) for o in outs)

    def _clip_bounds(self, n: onnx.NodeProto) -> tuple[float, float] | None:
        if n.op_type == "Relu":
            return 0.0, math.inf
        if len(n.input) > 1 or self.opset >= 11:
            lo = hi = None
            if len(n.input) > 1 and n.input[1]:
                lo = self.index.constant(n.input[1])
                if lo is None:
                    return None
            if len(n.input) > 2 and n.input[2]:
                hi = self.index.constant(n.input[2])
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
        nodes = list(self.graph.node)

        # 1. excluded tensors exclude their producers and readers
        for t in self._excluded_tensors:
            p = idx.producer(t)
            for n in ([p] if p is not None else []) + idx.uses(t):
                settings[id(n)].excluded = True
                settings[id(n)].why_excluded = settings[id(n)].why_excluded or f"tensor {t!r} excluded"

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
            y = a.node.output[0]
            uses = idx.uses(y)
            if len(uses) != 1 or idx.is_output(y) or uses[0].op_type not in ABSORBED_OPS:
                continue
            r = uses[0]
            if settings[id(r)].excluded or r.input[0] != y or not self._is_float(r.output[0]):
                continue
            bounds = self._clip_bounds(r)
            if bounds is None or r.output[0] not in self.ranges:
                continue
            lo, hi = self._range_of([r.output[0]], "")
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

        def act_readers(t: str) -> list[tuple[onnx.NodeProto, int]]:
            return _quantized_readers(idx, quantized, t)

        def emitted() -> set[str]:
            out = set()
            for q in quantized.values():
                if isinstance(q, _Anchor):
                    if q.node.op_type in ("Gemm", "MatMul") and not act_readers(q.qout):
                        continue  # float output: QGemm / MatMulIntegerToFloat
                    out.add(q.qout)
                else:
                    out.update(o for o in q.output if o)
            return out

        changed = True
        while changed:
            changed = False
            em = emitted()
            for n in transparent:
                if id(n) in quantized:
                    continue
                outs = [o for o in n.output if o]
                forward = n.input[0] in em
                backward = all(
                    not idx.is_output(o) and idx.uses(o) and len(act_readers(o)) == len(
                        [(u, i) for u in idx.uses(o) for i, x in enumerate(u.input) if x == o])
                    for o in outs)
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
                    qtensors[q.node.input[i]] = None
                if q.qout in em:
                    qtensors[q.qout] = None
            else:
                qtensors[q.input[0]] = None
                for o in q.output:
                    if o:
                        qtensors[o] = None
                        parent[find(o)] = find(q.input[0])
        members: dict[str, list[str]] = defaultdict(list)
        for t in qtensors:
            members[find(t)].append(t)

        # dtype per group: most precise request among the nodes touching it
        requests: dict[str, list[str]] = defaultdict(list)
        for q in quantized.values():
            if isinstance(q, _Anchor):
                ts = [q.node.input[i] for i in q.act_slots] + ([q.qout] if q.qout in em else [])
                for t in ts:
                    requests[find(t)].append(q.setting.activation_type)
            else:
                s = settings[id(q)]
                if s.explicit_activation and s.activation_type != "float":
                    requests[find(q.input[0])].append(s.activation_type)
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

    def _needed_by(self, t: str, idx: GraphIndex) -> str:
        p = idx.producer(t)
        uses = idx.uses(t)
        what = f"output of {_node_label(p)}" if p is not None else "graph input"
        if uses:
            what += f", read by {_node_label(uses[0])}"
        return what

    # -- rewrite ---------------------------------------------------------------------------------
    def _rewrite(self, nodes, anchors, weight_only, quantized, qtensors, emitted, params) -> None:
        idx = self.index
        before: dict[int, list[onnx.NodeProto]] = defaultdict(list)
        after: dict[int, list[onnx.NodeProto]] = defaultdict(list)
        head: list[onnx.NodeProto] = []
        ms_needed = False
        param_names: dict[str, tuple[str, str]] = {}

        def qdomain(dtype: str) -> str:
            nonlocal ms_needed
            if qtype(dtype).bits == 16 and self.opset < 21:
                ms_needed = True
                return MS_DOMAIN
            return ""

        def scale_zp(t: str) -> tuple[str, str]:
            if t not in param_names:
                scale, zp, dtype, _ = params[t]
                s = idx.add_initializer(np.array(scale, dtype=np.float32), f"{t}_scale")
                z = idx.add_initializer(np.array(zp, dtype=qtype(dtype).numpy_dtype), f"{t}_zero_point")
                param_names[t] = (s, z)
            return param_names[t]

        def dq(src: str, t: str, out: str | None = None) -> onnx.NodeProto:
            s, z = scale_zp(t)
            out = out or idx.unique_name(f"{t}_dequantized")
            return helper.make_node("DequantizeLinear", [src, s, z], [out],
                                    name=idx.unique_name(f"{t}_DequantizeLinear"), domain=qdomain(params[t][2]))

        def readers(t: str) -> list[tuple[onnx.NodeProto, int]]:
            return _quantized_readers(idx, quantized, t)

        # activations: one Q per tensor, one DQ per quantized reader slot
        for t in qtensors:
            producer = idx.producer(t)
            is_emitted = t in emitted
            s, z = scale_zp(t)
            src = t
            reading = readers(t)
            float_users = [u for u in idx.uses(t) if not any(u is r for r, _ in reading)]
            if is_emitted and idx.is_output(t):
                src = idx.unique_name(f"{t}_float")
                for i, o in enumerate(producer.output):
                    if o == t:
                        producer.output[i] = src
            qname = idx.unique_name(f"{t}_quantized")
            qnode = helper.make_node("QuantizeLinear", [src, s, z], [qname],
                                     name=idx.unique_name(f"{t}_QuantizeLinear"), domain=qdomain(params[t][2]))
            tail = [qnode]
            if is_emitted:
                if idx.is_output(t):
                    tail.append(dq(qname, t, out=t))
                elif float_users:
                    shared = dq(qname, t)
                    tail.append(shared)
                    for u in float_users:
                        for i, x in enumerate(u.input):
                            if x == t:
                                u.input[i] = shared.output[0]
                        # subgraphs reading t implicitly keep the float value
            (after[id(producer)] if producer is not None else head).extend(tail)
            for u, i in reading:
                d = dq(qname, t)
                u.input[i] = d.output[0]
                before[id(u)].append(d)

        # weights, biases, constant inputs
        for a in list(anchors.values()) + list(weight_only.values()):
            self._quantize_params(a, params, before, qdomain)

        new_nodes = list(head)
        for n in nodes:
            new_nodes.extend(before.get(id(n), ()))
            new_nodes.append(n)
            new_nodes.extend(after.get(id(n), ()))
        del self.graph.node[:]
        self.graph.node.extend(new_nodes)
        if ms_needed and not any(o.domain == MS_DOMAIN for o in self.model.opset_import):
            self.model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
        idx.refresh()
        self._drop_unused(self._replaced)
        self.modified = bool(qtensors) or bool(weight_only)

    def _drop_unused(self, names: list[str]) -> None:
        idx = self.index
        used = set(idx.consumers) | idx.graph_outputs
        dead = {n for n in names if n not in used}
        if dead:
            keep = [t for t in self.graph.initializer if t.name not in dead]
            del self.graph.initializer[:]
            self.graph.initializer.extend(keep)
            keep_nodes = [n for n in self.graph.node if not (n.op_type == "Constant" and n.output[0] in dead)]
            if len(keep_nodes) != len(self.graph.node):
                del self.graph.node[:]
                self.graph.node.extend(keep_nodes)
            idx.refresh()

    def _quantize_params(self, a: _Anchor, params, before, qdomain) -> None:
        idx = self.index
        n = a.node
        s = a.setting
        replaced = self._replaced
        label = n.name or n.op_type

        # constant activation-like inputs (Add/Mul/Concat operands, constant MatMul A): per tensor
        act_type = s.activation_type if s.activation_type != "float" else self.defaults.activation_type
        for i in a.const_slots:
            name = n.input[i]
            value = idx.constant(name).astype(np.float32)
            scale, zp = activation_params(float(value.min()), float(value.max()), act_type,
                                          symmetric=self.cfg.activation_symmetric)
            qv = quantize(value, scale, zp, act_type)
            qn = idx.add_initializer(qv, f"{name}_quantized")
            sn = idx.add_initializer(np.array(scale, np.float32), f"{name}_scale")
            zn = idx.add_initializer(np.array(zp, dtype=qtype(act_type).numpy_dtype), f"{name}_zero_point")
            out = idx.unique_name(f"{name}_dequantized")
            before[id(n)].append(helper.make_node("DequantizeLinear", [qn, sn, zn], [out],
                                                  name=idx.unique_name(f"{name}_DequantizeLinear"),
                                                  domain=qdomain(act_type)))
            n.input[i] = out
            replaced.append(name)

        if a.weight_slot is None:
            return
        op = n.op_type
        wname = n.input[a.weight_slot]
        w = idx.constant(wname).astype(np.float32)
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
        quantize_bias_too = s.activation_type != "float"
        correct = self._bias_correction(a, w) if n_out is not None else None
        if a.bias_slot is not None:
            b = idx.constant(n.input[a.bias_slot]).astype(np.float32).reshape(-1)
            if op == "Gemm":
                beta = float(attr(n, "beta", 1.0))
                if beta != 1.0 and (quantize_bias_too or correct is not None):
                    b = b * np.float32(beta)
                    set_attr(n, "beta", 1.0)
                b = np.broadcast_to(b, (n_out,)).astype(np.float32)
        s_in = np.float32(params[a.inputs[a.act_slots[0]]][0]) if quantize_bias_too and a.act_slots else None

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
        qn = idx.add_initializer(qw, f"{base}_quantized")
        sn = idx.add_initializer(scales.astype(np.float32), f"{base}_scale")
        zn = idx.add_initializer(zps.astype(qtype(wt).numpy_dtype), f"{base}_zero_point")
        out = idx.unique_name(f"{base}_dequantized")
        dq_attrs = {"axis": axis} if axis is not None else {}
        before[id(n)].append(helper.make_node("DequantizeLinear", [qn, sn, zn], [out],
                                              name=idx.unique_name(f"{base}_DequantizeLinear"), **dq_attrs))
        n.input[a.weight_slot] = out
        replaced.append(wname)

        bias_name = None
        if bias is not None and (s_in is not None or correct is not None):
            bias_name = n.input[a.bias_slot] if a.bias_slot is not None else f"{label}_bias"
            if s_in is not None:  # int32, scale = input scale x weight scale, zero point 0
                bq, bscale = quantize_bias(bias, float(s_in), per_output(scales))
                qb = idx.add_initializer(bq, f"{bias_name}_quantized")
                sb = idx.add_initializer(bscale.astype(np.float32), f"{bias_name}_scale")
                zb = idx.add_initializer(np.zeros(bscale.shape, np.int32), f"{bias_name}_zero_point")
                bout = idx.unique_name(f"{bias_name}_dequantized")
                before[id(n)].append(helper.make_node("DequantizeLinear", [qb, sb, zb], [bout], axis=0,
                                                      name=idx.unique_name(f"{bias_name}_DequantizeLinear")))
            else:  # weight-only: float bias, corrected
                bout = idx.add_initializer(bias.astype(np.float32), f"{bias_name}_corrected")
            if a.bias_slot is None:
                while len(n.input) < 2:
                    n.input.append("")
                n.input.append(bout)
            else:
                n.input[a.bias_slot] = bout
                replaced.append(a.inputs[a.bias_slot])

        self.weight_quant[label] = WeightQuant(
            tensor=wname, dtype=wt, axis=axis, scales=tuple(float(x) for x in np.ravel(scales)),
            zero_points=tuple(int(x) for x in np.ravel(zps)), reduce_range=reduce, bias=bias_name,
            bias_scales_raised=raised, bias_corrected=correct is not None, mse_clipped=mse)

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
        for n in g.node:
            if n.op_type in ("Conv", "ConvTranspose", "Gemm") and len(n.input) > 1 and self._is_const(n.input[1]):
                if n.input[0] and not self._is_const(n.input[0]) and n.input[0] not in wanted:
                    wanted.append(n.input[0])
        if not wanted:
            self.means = {}
            return
        probe = onnx.ModelProto()
        probe.CopyFrom(self.model)
        del probe.graph.output[:]
        probe.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in wanted)
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
