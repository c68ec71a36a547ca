"""Per-layer error localization: where along the graph does the candidate drift from the reference?

Both models run with every intermediate float tensor of the reference exposed as an output
(passes keep tensor names). For a quantized (QDQ) candidate a tensor ``t`` is compared through
the DequantizeLinear of its QuantizeLinear - the rounded value the next layer reads - and as
``t`` itself otherwise. Per tensor, in the reference's graph order: SQNR (dB) over all elements
and the mean per-sample cosine. A node's *jump* is how much SQNR it loses: the lowest SQNR of
its compared inputs minus its output's, where anything above ``EXACT_DB`` (50 dB, finer than
8-bit rounding resolves) counts as 50 dB - so a first layer going from an exact input to 45 dB
does not outrank one going from 40 to 20 dB. The largest jumps name the layers to look at first.

ORT runs at the *basic* level here: exposing a tensor stops ORT fusing the QDQ group around it,
so the candidate is evaluated with float ops on dequantized values (ONNX semantics) rather than
on integer kernels; the rounding of weights and activations is the same.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx import TensorProto

from onnxopt.activations import activation_session
from onnxopt.checks import infer
from onnxopt.data import Feed, first, samples_in
from onnxopt.graph import constant_tensor, is_op, values_by_name
from onnxopt.metrics import json_safe
from onnxopt.model_io import as_ir, load_model
from onnxopt.runtime import run_batch

SQNR_CAP_DB = 120.0  # exact tensors; keeps values finite
EXACT_DB = 50.0


@dataclass
class LayerError:
    tensor: str
    node: str
    op_type: str
    sqnr_db: float
    cosine: float
    jump_db: float = 0.0
    compared_as: str = ""  # the candidate tensor, when it differs (a DequantizeLinear output)


@dataclass
class Localization:
    layers: list[LayerError]
    worst: list[LayerError]
    samples: int
    skipped: int = 0  # reference tensors with no counterpart in the candidate
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return json_safe({"samples": self.samples, "skipped_tensors": self.skipped,
                          "worst": [asdict(x) for x in self.worst],
                          "layers": [asdict(x) for x in self.layers], "notes": list(self.notes)})

    def summary(self) -> str:
        if not self.worst:
            return "no layer loses accuracy"
        return "largest error jumps: " + ", ".join(
            f"{x.node or x.tensor} ({x.op_type}: loses {x.jump_db:.1f} dB, down to {x.sqnr_db:.1f} dB)" for x in self.worst)


def _model(model) -> ir.Model:
    if isinstance(model, str | Path):
        return load_model(model, check=False)  # checked when it was first loaded or written
    return as_ir(model)


def _float_tensors(model: ir.Model) -> dict[str, int]:
    """Element type of every value, from strict-free shape inference on the skeleton (declared types if
    inference fails)."""
    try:
        g = infer(model, strict=False).graph
        infos = list(g.value_info) + list(g.output) + list(g.input)
        return {v.name: v.type.tensor_type.elem_type for v in infos if v.type.HasField("tensor_type")}
    except Exception:  # noqa: BLE001 - fall back to declared types
        return {v.name: int(v.dtype) for n in model.graph for v in n.outputs if v.dtype is not None}


def candidate_names(candidate: ir.Model, wanted: list[str]) -> dict[str, str]:
    """Reference tensor -> candidate tensor holding its (possibly rounded) value."""
    values = values_by_name(candidate.graph)
    out: dict[str, str] = {}
    for t in wanted:
        v = values.get(t)
        if v is None:
            continue
        q = [u.node for u in v.uses() if is_op(u.node, "QuantizeLinear") and u.idx == 0]
        if q:
            dq = [u.node for u in q[0].outputs[0].uses() if is_op(u.node, "DequantizeLinear")]
            if dq:
                out[t] = dq[0].outputs[0].name
                continue
        if v.producer() is not None or v.is_graph_input():
            out[t] = t
    return out


def localize(reference, candidate, data, *, batch_size: int = 8, max_samples: int = 16, top: int = 3,
             threads: int | None = None) -> Localization:
    """Per-layer errors of ``candidate`` against ``reference`` (IR models, ``ModelProto``s or paths)."""
    reference, candidate = _model(reference), _model(candidate)
    types = _float_tensors(reference)
    order: list[tuple[str, ir.Node]] = []
    for n in reference.graph:
        for o in n.outputs:
            if o.name and types.get(o.name) == TensorProto.FLOAT and constant_tensor(o) is None:
                order.append((o.name, n))
    mapping = candidate_names(candidate, [t for t, _ in order])
    compared = [(t, n) for t, n in order if t in mapping]
    ref_s = activation_session(reference, [t for t, _ in compared], opt_level="basic", threads=threads,
                               what="reference (localization)")
    cand_s = activation_session(candidate, [mapping[t] for t, _ in compared], opt_level="basic",
                                threads=threads, what="candidate (localization)")
    sig = dict.fromkeys(mapping, 0.0)
    noise = dict.fromkeys(mapping, 0.0)
    cos = dict.fromkeys(mapping, 0.0)
    done = 0
    for batch in data.batches(batch_size):
        k = min(samples_in(batch), max_samples - done)
        batch = first(batch, k)
        whole = isinstance(batch, Feed)  # a feed is one sample: its tensors are compared as one vector
        r = run_batch(ref_s, batch, [t for t, _ in compared], what="reference (localization)")
        c = run_batch(cand_s, batch, [mapping[t] for t, _ in compared], what="candidate (localization)")
        for t, _ in compared:
            a = np.asarray(r[t], dtype=np.float64)
            b = np.asarray(c[mapping[t]], dtype=np.float64)
            if a.shape != b.shape:
                noise[t] = math.inf
                continue
            # equal values add no noise, -inf included (masked scores); non-finite values add no signal
            with np.errstate(invalid="ignore", over="ignore"):
                d = np.where(a == b, 0.0, a - b)
                noise[t] += float((d * d).sum())
            a, b = np.where(np.isfinite(a), a, 0.0), np.where(np.isfinite(b), b, 0.0)
            sig[t] += float((a * a).sum())
            rows = 1 if whole or not a.ndim else k
            a2, b2 = a.reshape(rows, -1), b.reshape(rows, -1)
            den = np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1)
            per = np.where(den > 0, (a2 * b2).sum(axis=1) / np.where(den > 0, den, 1), 1.0)
            cos[t] += float(per.sum())
        done += k
        if done >= max_samples:
            break

    def sqnr(t: str) -> float:
        if noise[t] == 0:
            return SQNR_CAP_DB
        if not math.isfinite(noise[t]) or sig[t] == 0:
            return -SQNR_CAP_DB
        return min(SQNR_CAP_DB, 10 * math.log10(sig[t] / noise[t]))

    values = {t: sqnr(t) for t, _ in compared}

    layers = []
    for t, n in compared:
        ins = [values[x.name] for x in n.inputs if x is not None and x.name in values]
        before = min(min(ins) if ins else SQNR_CAP_DB, EXACT_DB)
        layers.append(LayerError(t, n.name or "", n.op_type, values[t], cos[t] / max(done, 1),
                                 max(0.0, before - values[t]), mapping[t] if mapping[t] != t else ""))
    worst = sorted((x for x in layers if x.jump_db > 0), key=lambda x: (-x.jump_db, x.tensor))[:top]
    return Localization(layers, worst, done, skipped=len(order) - len(compared))
