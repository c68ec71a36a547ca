"""ONNX Runtime's QDQ conventions, shared by the passes that write or re-write QDQ models.

Which ops are quantized how (op tables), the per-node override schema and config of static QDQ
quantization (``quantize-qdq``, re-run by ``latency-placement`` with extra overrides, fed by
``bit-assignment``), what it reports (``QuantizeQDQResult``), and which kernels ONNX Runtime really runs on
a QDQ model (``kernel_share``).
"""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnx_ir as ir
from pydantic import BaseModel, ConfigDict, Field, model_validator

from onnxopt.errors import OnnxoptError
from onnxopt.isa import SchemeChoice
from onnxopt.pass_infra import PassConfig, PassResult

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
    bias_type: Literal["auto", "int32", "float"] = Field(
        "auto", description="bias of Conv/Gemm/MatMul: int32 at input x weight scale (what ORT's 8-bit integer "
        "kernels take), or float (kept float: 16-bit activations, whose int32 bias would overflow, and targets "
        "that want float biases); auto: int32 for 8-bit activations, float otherwise")
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
    source: ir.Model | None = None
    means: tuple[dict[str, np.ndarray], int] | None = None
    config: QuantizeQDQConfig | None = None


def kernel_share(model: ir.Model, opt_level: str = "all") -> KernelShare:
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
        from onnxopt.model_io import estimated_size, has_external_data, save_model

        big = has_external_data(model) or estimated_size(model) > 1_800_000_000
        save_model(model, src, external_data=big, check=False)
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


