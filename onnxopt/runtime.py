"""Running models with ONNX Runtime (CPU execution provider only).

Default graph-optimization level: ``"all"`` (``ORT_ENABLE_ALL``), for two reasons:

* it is ONNX Runtime's own default for ``InferenceSession``, so the gate measures the numbers a
  deployment of the optimized model will actually produce;
* a quantized (QDQ) candidate only runs on integer kernels when ORT fuses its
  DequantizeLinear -> op -> QuantizeLinear groups, which happens in the *extended* level and
  above. With optimizations off, ORT dequantizes and runs the float op, which simulates
  quantization but hides the integer kernels' rounding/saturation (e.g. u8s8 overflow on
  AVX2 without VNNI) that a deployment would see.

Levels: ``disable``, ``basic``, ``extended``, ``layout`` (onnxruntime >= 1.22) and ``all``.
Reference and candidate always run at the same level, and the level is written in the report.
``"disable"`` is useful to compare against the ONNX spec semantics when debugging a pass (ORT's
own fusions can hide, or cause, small differences).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnxopt.errors import OnnxoptError
from onnxopt.model_io import (
    PROTOBUF_LIMIT,
    estimated_size,
    has_external_data,
    large_model_threshold,
    save_model,
    serialized_size,
    to_proto,
)
from onnxopt.progress import SILENT

OPT_LEVELS: dict[str, ort.GraphOptimizationLevel] = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
if hasattr(ort.GraphOptimizationLevel, "ORT_ENABLE_LAYOUT"):  # onnxruntime >= 1.22
    OPT_LEVELS = {**dict(list(OPT_LEVELS.items())[:3]),
                  "layout": ort.GraphOptimizationLevel.ORT_ENABLE_LAYOUT, "all": OPT_LEVELS["all"]}
DEFAULT_OPT_LEVEL = "all"
PROVIDERS = ["CPUExecutionProvider"]


def ort_version() -> str:
    return ort.__version__


def _ort_message(exc: BaseException) -> str:
    """First meaningful line of an onnxruntime error, without the '[ONNXRuntimeError] : 1 : FAIL :' prefix."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    text = lines[0] if lines else type(exc).__name__
    if text.startswith("[ONNXRuntimeError]"):
        parts = text.split(" : ", 3)
        if len(parts) == 4:
            text = f"{parts[2]}: {parts[3]}"
    return text[:400]


def session_options(opt_level: str = DEFAULT_OPT_LEVEL, threads: int | None = None) -> ort.SessionOptions:
    if opt_level not in OPT_LEVELS:
        raise OnnxoptError(f"unknown optimization level {opt_level!r} (choose: {', '.join(OPT_LEVELS)})")
    if threads is not None and threads < 1:
        raise OnnxoptError(f"threads must be at least 1 (got {threads})")
    so = ort.SessionOptions()
    so.graph_optimization_level = OPT_LEVELS[opt_level]
    so.log_severity_level = 3  # errors only; warnings about unused initializers etc. are noise here
    if threads is not None:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    return so


# Above this many bytes of weights a model goes to ONNX Runtime through a file with external data, never as
# one serialized buffer (which would copy every weight twice more in this process).
FILE_SESSION_BYTES = 256 << 20


def make_session(model: ir.Model | onnx.ModelProto | str | os.PathLike, *, opt_level: str = DEFAULT_OPT_LEVEL,
                 threads: int | None = None, what: str = "model",
                 options: ort.SessionOptions | None = None) -> ort.InferenceSession:
    """An ORT CPU session for ``model``: a path (ORT reads the file and its external data itself), an IR
    model or a ``ModelProto``.

    An in-memory model whose weights live in external data, or above ``FILE_SESSION_BYTES`` (or
    ``ONNXOPT_EXTERNAL_THRESHOLD`` when that is set), is written to a temporary file with external data
    and handed over by path; weights still in the input's data file are copied file to file.
    ``what`` names the model in errors ("onnxruntime cannot load candidate: ..."); ``options`` replaces the
    session options built from ``opt_level`` and ``threads``.
    """
    so = options if options is not None else session_options(opt_level, threads)
    tmp = None
    try:
        if isinstance(model, str | os.PathLike):
            session = ort.InferenceSession(str(model), so, providers=PROVIDERS)
        elif _through_file(model):
            tmp = tempfile.TemporaryDirectory(prefix="onnxopt-ort-", ignore_cleanup_errors=True)
            path = Path(tmp.name) / "model.onnx"
            if isinstance(model, onnx.ModelProto):
                save_model(model, path, external_data=True, check=False)
            else:
                save_model(model, path, external_data=True, check=False)
            session = ort.InferenceSession(str(path), so, providers=PROVIDERS)
        else:
            proto = model if isinstance(model, onnx.ModelProto) else to_proto(model)
            session = ort.InferenceSession(proto.SerializeToString(), so, providers=PROVIDERS)
    except OnnxoptError:
        if tmp is not None:
            tmp.cleanup()
        raise
    except Exception as exc:  # noqa: BLE001 - ORT raises its own pybind exception types
        if tmp is not None:
            tmp.cleanup()
        raise OnnxoptError(f"onnxruntime cannot load {what}: {_ort_message(exc)}") from None
    if tmp is not None:
        session._onnxopt_tmpdir = tmp  # external data must outlive the session on some platforms
    session._onnxopt_what = what
    session._onnxopt_opt_level = opt_level
    return session


def _through_file(model: ir.Model | onnx.ModelProto) -> bool:
    limit = min(PROTOBUF_LIMIT, large_model_threshold(), FILE_SESSION_BYTES)
    if isinstance(model, onnx.ModelProto):
        return serialized_size(model) > min(PROTOBUF_LIMIT, large_model_threshold())
    return has_external_data(model) or estimated_size(model) > limit


def static_batch(session: ort.InferenceSession) -> int | None:
    """The smallest static leading dim among the session's inputs (None if all are symbolic)."""
    dims = [i.shape[0] for i in session.get_inputs() if i.shape and isinstance(i.shape[0], int) and i.shape[0] > 0]
    return min(dims) if dims else None


def run_batch(session: ort.InferenceSession, feed: dict[str, np.ndarray], outputs: list[str] | None = None, *,
              what: str | None = None, first_sample: int | None = None) -> dict[str, np.ndarray]:
    """One ``session.run``; returns {output name: value}. ORT failures become one-line ``OnnxoptError``.

    A model with a static batch dim B > 1 given a final, smaller batch of n samples is run on the
    batch padded to B (the last sample repeated); outputs whose leading dim is B are cut back to n.
    """
    names = outputs if outputs is not None else [o.name for o in session.get_outputs()]
    what = what or getattr(session, "_onnxopt_what", "model")
    from onnxopt.data import Feed

    stacked = not isinstance(feed, Feed) and bool(feed) and all(np.ndim(v) for v in feed.values())
    n = next(iter(feed.values())).shape[0] if stacked else 0
    fixed = static_batch(session)
    pad = fixed - n if stacked and fixed and 0 < n < fixed else 0
    if pad:
        feed = {k: np.concatenate([v, np.repeat(v[-1:], pad, axis=0)]) for k, v in feed.items()}
    try:
        values = session.run(names, feed)
    except Exception as exc:  # noqa: BLE001
        where = f" on the batch starting at sample {first_sample}" if first_sample is not None else ""
        raise OnnxoptError(f"onnxruntime failed running {what}{where}: {_ort_message(exc)}") from None
    if pad:
        values = [v[:n] if isinstance(v, np.ndarray) and v.ndim and v.shape[0] == fixed else v for v in values]
    return dict(zip(names, values, strict=True))


def run(session: ort.InferenceSession, data, *, batch_size: int, outputs: list[str] | None = None,
        progress=None, what: str | None = None) -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """Run ``session`` over ``data`` (a ``DataSource``) batch by batch, yielding (batch inputs, outputs).

    ``batch_size`` is clamped to the model's static batch dim (``data.effective_batch_size``).
    """
    from onnxopt.data import samples_in, subset

    what = what or getattr(session, "_onnxopt_what", "model")
    known = [o.name for o in session.get_outputs()]
    if outputs is not None:
        unknown = [o for o in outputs if o not in known]
        if unknown:
            raise OnnxoptError(f"{what} has no output(s) {', '.join(map(repr, unknown))} "
                               f"(outputs: {', '.join(map(repr, known))})")
    session_inputs = {i.name for i in session.get_inputs()}
    missing = [n for n in session_inputs if n not in data.input_names]
    if missing:
        raise OnnxoptError(f"data ({data.description}) has no values for {what} input(s) "
                           f"{', '.join(map(repr, sorted(missing)))}")
    progress = progress or SILENT
    fixed = static_batch(session)
    if fixed:
        batch_size = min(batch_size, fixed)
    done = 0
    with progress.task(f"running {what}", len(data)) as bar:
        for batch in data.batches(batch_size):
            feed = subset(batch, session_inputs)
            result = run_batch(session, feed, outputs, what=what, first_sample=done)
            n = samples_in(batch)
            done += n
            bar.update(n)
            yield batch, result
