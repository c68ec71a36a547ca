"""Running a model in a hand-off target's runtime, behind ONNX Runtime's session interface.

``open_session`` returns an object with ``get_inputs()``/``get_outputs()`` (``.name``, ``.shape``) and
``run(names, feed)``, so ``onnxopt.runtime.run_batch`` and the gate drive it like an ORT session.

* ``onnxruntime``: ORT's CPU EP (``onnxopt.runtime.make_session``).
* ``openvino``: OpenVINO's CPU plugin, at f32 inference precision (on CPUs with bf16 the plugin would
  otherwise pick bf16 for float layers, and the gate would measure that instead of the quantization).
* ``tensorrt`` / ``qnn``: ORT with the TensorRT / QNN execution provider when this ORT build has it
  (and, for TensorRT, a CUDA GPU answers); otherwise not available here.

``numerical_runtime`` says which runtime checks a target's numbers and why it may be a stand-in. ORT CPU
standing in for another runtime runs at the ``basic`` level: every QuantizeLinear/DequantizeLinear is evaluated
as written and the ops between them in float, which is what the target's integer kernels compute. At ``all``,
ORT fuses the QDQ groups into MLAS integer kernels, whose u8 x s8 pair sums saturate int16 on x86 without VNNI
(full-range weights, as TensorRT and OpenVINO layouts use): 6-8 dB of a tiny conv net's SQNR measured there,
an error of ORT on that CPU that the target runtime does not have.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from onnxopt.errors import OnnxoptError
from onnxopt.model_io import save_model
from onnxopt.runtime import _ort_message, make_session

_EP = {"tensorrt": "TensorrtExecutionProvider", "qnn": "QNNExecutionProvider"}
LABELS = {"onnxruntime": "ONNX Runtime CPU", "openvino": "OpenVINO CPU", "tensorrt": "TensorRT",
          "qnn": "ONNX Runtime QNN EP (HTP)",
          "reference": "ONNX Runtime CPU with QDQ evaluated as written (the ONNX definition, no fused integer kernels)"}


def runtime_version(runtime: str) -> str:
    if runtime == "openvino":
        import openvino

        return f"openvino {openvino.get_version()}"
    return f"onnxruntime {ort.__version__}"


def missing_reason(runtime: str) -> str | None:
    """Why ``runtime`` cannot run here (None: it can)."""
    if runtime in ("onnxruntime", "reference"):
        return None
    if runtime == "openvino":
        try:
            import openvino  # noqa: F401
        except ImportError:
            return "the openvino package is not installed (pip install openvino)"
        return None
    ep = _EP[runtime]
    if ep not in ort.get_available_providers():
        return f"this onnxruntime build has no {ep}"
    if runtime == "tensorrt" and not _cuda_device():
        return "no CUDA GPU found"
    return None


def _cuda_device() -> bool:
    return Path("/dev/nvidia0").exists() or bool(os.environ.get("CUDA_VISIBLE_DEVICES", "").strip("-1 "))


@dataclass
class NumericalRuntime:
    runtime: str  # the one that runs the numbers
    target_runtime: str  # the one the target names
    skipped_reason: str | None = None  # why target_runtime did not run them
    opt_level: str = "all"  # ORT graph optimization level the numbers are measured at

    @property
    def note(self) -> str:
        if self.skipped_reason is None:
            return f"validated in {LABELS[self.target_runtime]} ({runtime_version(self.runtime)})"
        return (f"numerical check in {LABELS[self.target_runtime]} skipped: {self.skipped_reason}; "
                f"{LABELS[self.runtime]} ran as the numerical stand-in (QDQ evaluated as written, optimization level "
                f"{self.opt_level}), structure checked against the target's rules")


def numerical_runtime(target_runtime: str) -> NumericalRuntime:
    if target_runtime == "reference":
        return NumericalRuntime("onnxruntime", target_runtime, opt_level="basic")
    reason = missing_reason(target_runtime)
    if reason is None:
        return NumericalRuntime(target_runtime, target_runtime)
    return NumericalRuntime("onnxruntime", target_runtime, reason, opt_level="basic")


@dataclass
class _Arg:
    name: str
    shape: list


class OpenVINOSession:
    """An OpenVINO CPU compiled model that answers like an ORT session."""

    def __init__(self, model: ir.Model | str | os.PathLike, what: str = "model", threads: int | None = None):
        import openvino as ov

        self._onnxopt_what = what
        self._tmp = None
        path = model
        if isinstance(model, ir.Model):
            self._tmp = tempfile.TemporaryDirectory(prefix="onnxopt-ov-", ignore_cleanup_errors=True)
            path = Path(self._tmp.name) / "model.onnx"
            save_model(model, path, check=False)
        config = {"INFERENCE_PRECISION_HINT": "f32"}
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = str(threads)
        try:
            self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError with multi-line text
            raise OnnxoptError(f"openvino cannot load {what}: {_ort_message(exc)}") from None
        self.request = self.compiled.create_infer_request()

    @staticmethod
    def _arg(port) -> _Arg:
        shape = [d.get_length() if d.is_static else None for d in port.get_partial_shape()]
        return _Arg(port.get_any_name(), shape)

    def get_inputs(self) -> list[_Arg]:
        return [self._arg(p) for p in self.compiled.inputs]

    def get_outputs(self) -> list[_Arg]:
        return [self._arg(p) for p in self.compiled.outputs]

    def run(self, names: list[str] | None, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        result = self.request.infer(feed)
        names = names or [o.name for o in self.get_outputs()]
        return [np.array(result[self.compiled.output(n)]) for n in names]


def open_session(model, runtime: str = "onnxruntime", *, what: str = "model", opt_level: str = "all",
                 threads: int | None = None):
    if runtime == "onnxruntime":
        return make_session(model, opt_level=opt_level, threads=threads, what=what)
    if runtime == "openvino":
        return OpenVINOSession(model, what=what, threads=threads)
    if runtime in _EP:
        so = ort.SessionOptions()
        if threads is not None:
            so.intra_op_num_threads = threads
        src = str(model) if isinstance(model, str | os.PathLike) else None
        if src is None:
            raise OnnxoptError(f"{LABELS[runtime]} validation needs the model on disk")
        try:
            ep = (_EP[runtime], {"backend_path": "QnnHtp.dll" if os.name == "nt" else "libQnnHtp.so"}) \
                if runtime == "qnn" else _EP[runtime]
            sess = ort.InferenceSession(src, so, providers=[ep, "CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001
            raise OnnxoptError(f"{LABELS[runtime]} cannot load {what}: {_ort_message(exc)}") from None
        sess._onnxopt_what = what
        return sess
    raise OnnxoptError(f"unknown runtime {runtime!r} (choose: {', '.join(LABELS)})")
