"""A model's vital statistics: what `onnxopt inspect` prints and reports compare before/after."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt.graph import initializer_bytes, op_histogram, parameter_count
from onnxopt.model_io import as_ir, estimated_size

QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
             "MatMulInteger", "ConvInteger", "MatMulNBits", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
             "QGemm", "QLinearAdd", "QLinearMul", "QLinearConcat"}
_QUANT_TYPES = {ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT16, ir.DataType.UINT16, ir.DataType.INT4,
                ir.DataType.UINT4}


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


def _spec(value: ir.Value) -> TensorSpec:
    dims: list[int | str | None] = []
    if value.shape is not None:
        for d in value.shape:
            dims.append(d if isinstance(d, int) else (d.value or None))
    return TensorSpec(value.name, _dtype_name(value.dtype), dims)


def _dtype_name(dtype: ir.DataType | None) -> str:
    if dtype is None or dtype == ir.DataType.UNDEFINED:
        return "?"
    try:
        return np.dtype(dtype.numpy()).name
    except Exception:  # noqa: BLE001 - a type numpy has no name for
        return dtype.name.lower()


def file_bytes(path: str | Path) -> int:
    """Bytes on disk of a model file and the external data files it references."""
    path = Path(path)
    total = path.stat().st_size
    return total + sum(f.stat().st_size for f in _data_files(path))


def _data_files(path: Path) -> set[Path]:
    proto = onnx.load(str(path), load_external_data=False)
    files = set()
    for t in onnx.external_data_helper._get_all_tensors(proto):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in t.external_data if e.key == "location"), "")
            if loc and (path.parent / loc).is_file():
                files.add(path.parent / loc)
    return files


def summarize(model: ir.Model | onnx.ModelProto, path: str | Path | None = None) -> ModelSummary:
    """The model's statistics, read from the graph (no weight is read). With ``path`` (the file the model
    is or will be stored in) the file size is measured; otherwise it is estimated from the weights."""
    model = as_ir(model)
    g = model.graph
    first_reader: dict[int, str] = {}
    for n in g:
        for x in n.inputs:
            if x is not None:
                first_reader.setdefault(id(x), n.op_type)
    quantized = {}
    dtypes: dict[str, int] = {}
    for name, v in g.initializers.items():
        t = v.const_value
        if t is None:
            continue
        tname = _dtype_name(t.dtype)
        dtypes[tname] = dtypes.get(tname, 0) + 1
        reader = first_reader.get(id(v))
        if t.dtype in _QUANT_TYPES and len(t.shape) >= 1 and reader in QUANT_OPS:
            quantized[name] = f"{tname} -> {reader}"
    return ModelSummary(
        opset={(d or "ai.onnx"): v for d, v in model.opset_imports.items()},
        ir_version=model.ir_version,
        producer=f"{model.producer_name or ''} {model.producer_version or ''}".strip(),
        inputs=[_spec(i) for i in g.inputs if not i.is_initializer()],
        outputs=[_spec(o) for o in g.outputs],
        nodes=len(g),
        ops=op_histogram(g),
        parameters=parameter_count(g),
        initializer_bytes=initializer_bytes(g),
        serialized_bytes=file_bytes(path) if path is not None else estimated_size(model),
        quantized_tensors=dict(sorted(quantized.items())),
        dtypes=dict(sorted(dtypes.items())),
    )
