"""A model's vital statistics: what `onnxopt inspect` prints and reports compare before/after."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import onnx

from onnxopt.graph import initializer_bytes, op_histogram, parameter_count
from onnxopt.model_io import serialized_size

QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
             "MatMulInteger", "ConvInteger", "MatMulNBits", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
             "QGemm", "QLinearAdd", "QLinearMul", "QLinearConcat"}
_QUANT_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16,
                onnx.TensorProto.INT4, onnx.TensorProto.UINT4}


@dataclass
class TensorSpec:
    name: str
    dtype: str
    shape: list[int | str | None]


@dataclass
class ModelSummary:
    opset: dict[str, int]
    ir_version: int
    producer: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    nodes: int
    ops: dict[str, int]
    parameters: int
    initializer_bytes: int
    serialized_bytes: int
    # weights stored in an integer type, and the op that consumes them (QDQ or integer kernel)
    quantized_tensors: dict[str, str] = field(default_factory=dict)
    dtypes: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _spec(vi: onnx.ValueInfoProto) -> TensorSpec:
    t = vi.type.tensor_type
    dims: list[int | str | None] = []
    for d in t.shape.dim:
        dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
    return TensorSpec(vi.name, _dtype_name(t.elem_type), dims)


def _dtype_name(elem_type: int) -> str:
    if not elem_type:
        return "?"
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(elem_type).name
    except Exception:  # noqa: BLE001 - a type numpy has no name for
        return onnx.TensorProto.DataType.Name(elem_type).lower() if elem_type in onnx.TensorProto.DataType.values() \
            else f"type {elem_type}"


def summarize(model: onnx.ModelProto) -> ModelSummary:
    g = model.graph
    init_names = {t.name for t in g.initializer}
    consumers: dict[str, str] = {}
    for n in g.node:
        for x in n.input:
            consumers.setdefault(x, n.op_type)
    quantized = {}
    dtypes: dict[str, int] = {}
    for t in g.initializer:
        tname = _dtype_name(t.data_type)
        dtypes[tname] = dtypes.get(tname, 0) + 1
        if t.data_type in _QUANT_TYPES and len(t.dims) >= 1 and consumers.get(t.name) in QUANT_OPS:
            quantized[t.name] = f"{tname} -> {consumers[t.name]}"
    return ModelSummary(
        opset={(op.domain or "ai.onnx"): op.version for op in model.opset_import},
        ir_version=model.ir_version,
        producer=f"{model.producer_name} {model.producer_version}".strip(),
        inputs=[_spec(i) for i in g.input if i.name not in init_names],
        outputs=[_spec(o) for o in g.output],
        nodes=len(g.node),
        ops=op_histogram(g),
        parameters=parameter_count(g),
        initializer_bytes=initializer_bytes(g),
        serialized_bytes=serialized_size(model),
        quantized_tensors=dict(sorted(quantized.items())),
        dtypes=dict(sorted(dtypes.items())),
    )
