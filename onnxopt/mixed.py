"""Mixed precision: the components a bit width is chosen for, their scores, and the chosen bits.

Shared by the ``significance`` pass (scores per component), the ``bit-assignment`` pass (bits per
component from scores and a budget) and the ``quantize-qdq`` pass, which reads the latest
``BitAssignmentResult`` and applies its overrides. Kept in the core so that scores from a file
(Hessian traces, a user's own metric) drive the same assignment as scores computed here.

A *weight component* is the constant weight of one Conv/ConvTranspose/Gemm/MatMul node, keyed by
the node's name (the weight's name when the node has none); with channel groups a component is
one slice of output channels (``name#g``). An *activation component* is a node's output tensor.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt.errors import OnnxoptError, PreconditionError
from onnxopt.graph import attr, is_initializer
from onnxopt.model_io import atomic_write
from onnxopt.pass_infra import PassResult
from onnxopt.quant import channel_axis_shape, range_weight_params

WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
SCORES_VERSION = 1
# Weight types the QDQ pass takes for each width (8: the scheme's own type, e.g. uint8 under u8u8).
WEIGHT_TYPE_FOR_BITS = {4: "int4", 8: None, 16: "int16"}
ACTIVATION_TYPE_FOR_BITS = {8: None, 16: "uint16"}


@dataclass(frozen=True)
class Component:
    name: str
    kind: str  # "weight" | "activation"
    op_type: str
    node: str  # node name ("" if the node has none)
    tensor: str  # weight initializer, or activation tensor
    params: int  # weight parameters in this component (0 for activations)
    axis: int | None = None  # output-channel axis of the weight
    group: int | None = None  # channel group index when scoring per group
    channels: tuple[int, int] | None = None  # [start, stop) of the group's output channels


def weight_axis(node: ir.Node, ndim: int) -> int:
    """Output-channel axis of a weight, as the QDQ pass quantizes it per channel."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if attr(node, "transB", 0) else 1
    return ndim - 1


def component_key(node: ir.Node) -> str:
    return node.name or node.inputs[1].name


def weight_components(model: ir.Model | onnx.ModelProto, channel_groups: int = 1) -> list[Component]:
    """Every constant float weight of a compute op in graph order (split into channel groups). Reads only
    the weights' dtypes and shapes."""
    from onnxopt.model_io import as_ir

    out: list[Component] = []
    for n in as_ir(model).graph:
        if n.op_type not in WEIGHTED_OPS or n.domain not in ("", "ai.onnx") or len(n.inputs) < 2:
            continue
        wv = n.inputs[1]
        if not is_initializer(wv):
            continue  # Constant-node weights: constant folding turns them into initializers
        t = wv.const_value
        shape = tuple(t.shape.numpy())
        ndim, size = len(shape), int(np.prod(shape, dtype=np.int64))
        if t.dtype != ir.DataType.FLOAT or ndim < 1 or (n.op_type != "MatMul" and ndim < 2):
            continue
        key = component_key(n)
        axis = weight_axis(n, ndim)
        name = n.name or ""
        if channel_groups <= 1:
            out.append(Component(key, "weight", n.op_type, name, wv.name, size, axis))
            continue
        n_ch = shape[axis]
        bounds = np.linspace(0, n_ch, min(channel_groups, n_ch) + 1).round().astype(int)
        per_channel = size // n_ch
        for g, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            out.append(Component(f"{key}#{g}", "weight", n.op_type, name, wv.name,
                                 int((b - a) * per_channel), axis, g, (int(a), int(b))))
    return out


def layer_of(name: str) -> str:
    """The layer a (possibly per-group) component belongs to."""
    return name.split("#", 1)[0]


def clipping_for(bits: int, clipping: str = "auto") -> bool:
    """Whether weights of this width get MSE-optimal clipping (``auto``: at 4 bits and below), the
    rule the quantize-qdq pass applies too, so scores measure the weights that are deployed."""
    return bits <= 4 if clipping == "auto" else clipping == "mse"


def fake_quantize(w: np.ndarray, bits: int, axis: int | None,
                  channels: tuple[int, int] | None = None, clipping: str = "auto") -> np.ndarray:
    """Symmetric per-channel quantize-dequantize of ``w`` to ``bits`` (only ``channels`` if given).

    Any width from 2 bits (ternary) up, on [-(2^(b-1) - 1), 2^(b-1) - 1]; the scales are those of
    ``onnxopt.quant.weight_params`` (symmetric, MSE-clipped per ``clipping_for``), so int4 and int8
    land on the grid the quantize-qdq pass writes.
    """
    w = np.asarray(w, dtype=np.float32)
    qmax = (1 << (bits - 1)) - 1
    if w.size == 0:
        return w.copy()
    scale, _ = range_weight_params(w, -qmax, qmax, 0, axis=axis, mse_clip=clipping_for(bits, clipping))
    if axis is not None:
        scale = scale.reshape(channel_axis_shape(w.ndim, axis % w.ndim, scale.size))
    q = (np.clip(np.rint(w / scale), -qmax, qmax) * scale).astype(np.float32)
    if channels is None or axis is None:
        return q
    out = w.copy()
    sl = [slice(None)] * w.ndim
    sl[axis % w.ndim] = slice(*channels)
    out[tuple(sl)] = q[tuple(sl)]
    return out


# --- scoring data ------------------------------------------------------------------------------------------
def scoring_data(context, data: str, labels_file: str | None, max_samples: int, batch_size: int,
                 need_labels: bool, what: str) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """The first ``max_samples`` samples of the chosen data (stacked) and their labels, if any."""
    source = context.calibration if data == "calibration" else context.validation
    if source is None:
        flag = "--calib" if data == "calibration" else "--val"
        raise PreconditionError(f"{what} needs {data} data (pass it with {flag})")
    labels = None
    if labels_file is not None:
        from onnxopt.data import load_labels

        labels = load_labels(labels_file, source)
    elif data == "calibration":
        labels = getattr(context, "calibration_labels", None)
    else:
        labels = context.labels
    if need_labels and labels is None:
        flag = "--calib-labels" if data == "calibration" else "--labels"
        raise PreconditionError(f"{what} needs labels for the {data} data (pass {flag} or set labels_file)")
    parts: dict[str, list[np.ndarray]] = {}
    n = 0
    for batch in source.batches(batch_size):
        k = next(iter(batch.values())).shape[0]
        take = min(k, max_samples - n)
        for name, v in batch.items():
            parts.setdefault(name, []).append(v[:take])
        n += take
        if n >= max_samples:
            break
    feeds = {k: np.concatenate(v) for k, v in parts.items()}
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)[:n].astype(np.int64)
    return feeds, labels


def pick_output(model: ir.Model, sample: dict[str, np.ndarray], wanted: str | None) -> str:
    """The output significance and bit assignment score: ``wanted``, else the first [N, C] float output, else
    the first float one."""
    from onnxopt.runtime import make_session, run_batch

    names = [o.name for o in model.graph.outputs]
    if wanted is not None:
        if wanted not in names:
            raise PreconditionError(f"output {wanted!r} is not a model output ({', '.join(names)})")
        return wanted
    sess = make_session(model, opt_level="basic", threads=1, what="model (significance)")
    outs = run_batch(sess, {k: v[:1] for k, v in sample.items()})
    for name in names:
        v = outs[name]
        if isinstance(v, np.ndarray) and v.ndim == 2 and v.shape[1] > 1 and v.dtype.kind == "f":
            return name
    for name in names:
        if isinstance(outs[name], np.ndarray) and outs[name].dtype.kind == "f":
            return name
    raise PreconditionError("no float output to score")


# --- scores ------------------------------------------------------------------------------------
@dataclass
class ScoreEntry:
    name: str
    kind: str
    op_type: str
    tensor: str
    params: int
    score: float


@dataclass
class SignificanceResult(PassResult):
    entries: list[ScoreEntry] = field(default_factory=list)
    metric: str = ""
    setting_bits: int = 4  # the aggressive width the scores were measured at
    samples: int = 0
    critical_classes: list[int] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def scores(self) -> dict[str, float]:
        return {e.name: e.score for e in self.entries}

    def to_json(self) -> dict[str, Any]:
        return {"version": SCORES_VERSION, "metric": self.metric, "setting_bits": self.setting_bits,
                "samples": self.samples, "critical_classes": list(self.critical_classes),
                "components": [asdict(e) for e in self.entries]}


def save_scores(result: SignificanceResult, path: str | Path) -> None:
    with atomic_write(path) as f:
        json.dump(result.to_json(), f, indent=1)


def load_scores(path: str | Path) -> SignificanceResult:
    """Scores written by ``save_scores`` or by hand: ``{"components": [{"name", "score"}, ...]}``
    (optionally ``kind``, ``params``, ...), or a plain ``{name: score}`` mapping."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise OnnxoptError(f"{path}: cannot read scores ({exc})") from None
    if isinstance(raw, dict) and "components" not in raw:
        raw = {"components": [{"name": k, "score": v} for k, v in raw.items()]}
    if not isinstance(raw, dict) or not isinstance(raw.get("components"), list):
        raise OnnxoptError(f"{path}: expected {{\"components\": [{{\"name\": ..., \"score\": ...}}]}} "
                           "or a {name: score} mapping")
    entries = []
    for i, c in enumerate(raw["components"]):
        if not isinstance(c, dict) or "name" not in c or "score" not in c:
            raise OnnxoptError(f"{path}: component {i} needs 'name' and 'score'")
        try:
            score = float(c["score"])
        except (TypeError, ValueError):
            raise OnnxoptError(f"{path}: component {c['name']!r}: score {c['score']!r} is not a number") from None
        if not math.isfinite(score):
            raise OnnxoptError(f"{path}: component {c['name']!r}: score is not finite")
        entries.append(ScoreEntry(str(c["name"]), str(c.get("kind", "weight")), str(c.get("op_type", "")),
                                  str(c.get("tensor", "")), int(c.get("params", 0)), score))
    return SignificanceResult(onnx.ModelProto(), False, {}, entries=entries, metric=str(raw.get("metric", "file")),
                              setting_bits=int(raw.get("setting_bits", 4)), samples=int(raw.get("samples", 0)),
                              critical_classes=[int(c) for c in raw.get("critical_classes", [])])


# --- assignment --------------------------------------------------------------------------------
@dataclass
class BitAssignmentResult(PassResult):
    weight_bits: dict[str, int] = field(default_factory=dict)  # layer key -> bits
    activation_bits: dict[str, int] = field(default_factory=dict)  # tensor -> bits
    # QuantOverride dicts for the quantize-qdq pass (plain data: also written to a file)
    overrides: list[dict[str, Any]] = field(default_factory=list)
    average_bits: float = 0.0
    weight_bytes: int = 0


def average_bits(bits: dict[str, int], params: dict[str, int]) -> float:
    total = sum(params[k] for k in bits)
    return sum(bits[k] * params[k] for k in bits) / total if total else 0.0


def overrides_for(weight_bits: dict[str, int], activation_bits: dict[str, int],
                  components: list[Component]) -> list[dict[str, Any]]:
    """One override per width (nodes listed in graph order); 8-bit layers keep the scheme's type."""
    by_key = {c.name: c for c in components}
    out: list[dict[str, Any]] = []
    for bits in sorted(set(weight_bits.values())):
        wt = WEIGHT_TYPE_FOR_BITS.get(bits)
        if wt is None:
            continue
        nodes = [by_key[k].node for k in by_key if weight_bits.get(k) == bits]
        if nodes:
            out.append({"nodes": nodes, "weight_type": wt})
    for bits in sorted(set(activation_bits.values())):
        at = ACTIVATION_TYPE_FOR_BITS.get(bits)
        tensors = [t for t, b in activation_bits.items() if b == bits]
        if at is not None and tensors:
            out.append({"tensors": tensors, "activation_type": at})
    return out
