"""Validity checks run after every pass: the ONNX checker (full) and strict shape inference."""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx

from onnxopt.errors import InvalidModelError
from onnxopt.model_io import PROTOBUF_LIMIT, save_model


def _first_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[0][:300] if lines else type(exc).__name__


def check_model(model: onnx.ModelProto) -> None:
    """Raise ``InvalidModelError`` unless the model passes the checker and strict shape inference."""
    try:
        if model.ByteSize() > PROTOBUF_LIMIT:
            with tempfile.TemporaryDirectory(prefix="onnxopt-check-") as tmp:
                path = Path(tmp) / "model.onnx"
                save_model(model, path, external_data=True)
                onnx.checker.check_model(str(path), full_check=True)
            return
        onnx.checker.check_model(model, full_check=True)
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise InvalidModelError(_first_line(exc)) from None
