"""Streaming comparison metrics: memory does not grow with the number of samples.

For float outputs (``ref`` = reference, ``cand`` = candidate; sums in float64 over all batches):

* ``max_abs``     = max |ref - cand| over all elements
* ``mean_abs``    = mean |ref - cand| over all elements
* ``cosine``      per sample (axis 0; each sample flattened): ref.cand / (|ref| |cand|), clipped to
  [-1, 1]; 1.0 when both vectors are zero, 0.0 when exactly one is. ``cosine_mean``/``cosine_min``
  are over samples. A 0-d output counts as one sample.
* ``sqnr_db``     = 10 log10(sum ref^2 / sum (ref - cand)^2); +inf when identical, -inf when the
  reference is all zeros but the candidate is not.
* ``top1_agreement_pct`` = % of samples whose argmax over axis 1 agrees; only for outputs that are
  2-D [N, C] with C > 1 in every batch (otherwise None).

Non-float outputs (int/bool) get ``exact_match_pct`` (% of equal elements) instead.

NaN/Inf propagate into the metrics (a NaN is never hidden), and their counts are kept so the
gate can fail the output with a clear message. In JSON, non-finite floats are written as the
strings ``"inf"``, ``"-inf"`` and ``"nan"`` (see ``json_safe``), so reports stay valid JSON.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass
class OutputMetrics:
    kind: str  # "float" or "exact" (int/bool outputs)
    dtype: str
    samples: int
    elements: int
    max_abs: float | None = None
    mean_abs: float | None = None
    cosine_mean: float | None = None
    cosine_min: float | None = None
    sqnr_db: float | None = None
    top1_agreement_pct: float | None = None
    exact_match_pct: float | None = None
    nonfinite_reference: int = 0  # NaN/Inf element counts
    nonfinite_candidate: int = 0
    nan_candidate: int = 0
    error: str | None = None  # e.g. a shape mismatch: the output could not be compared

    def to_dict(self) -> dict[str, Any]:
        return json_safe(asdict(self))

    def value(self, metric: str) -> float | None:
        return getattr(self, metric)


class OutputStats:
    """Accumulates the comparison of one output over batches; ``result()`` gives ``OutputMetrics``."""

    def __init__(self, name: str = "output"):
        self.name = name
        self.kind: str | None = None
        self.dtype = "?"
        self.error: str | None = None
        self.samples = 0
        self.elements = 0
        self.max_abs = 0.0
        self.sum_abs = 0.0
        self.sum_ref2 = 0.0
        self.sum_err2 = 0.0
        self.cos_sum = 0.0
        self.cos_min = math.inf
        self.top1_ok = True
        self.top1_agree = 0
        self.top1_rows = 0
        self.exact = 0
        self.nonfinite_ref = 0
        self.nonfinite_cand = 0
        self.nan_cand = 0

    def update(self, ref: np.ndarray, cand: np.ndarray, *, one_sample: bool = False) -> None:
        """Add a batch (samples on axis 0), or with ``one_sample`` a whole feed's output as one sample (its
        cosine over all elements; top-1 agreement still per row of a 2-D output)."""
        if self.error is not None:
            return
        ref, cand = np.asarray(ref), np.asarray(cand)
        rows_2d = ref.ndim == 2
        if ref.dtype.kind in "OSUV" or cand.dtype.kind in "OSUV":
            self.error = f"not a numeric tensor ({ref.dtype} / {cand.dtype}); cannot compare"
            return
        if ref.shape != cand.shape:
            self.error = (f"shape differs: candidate {list(cand.shape)} vs reference {list(ref.shape)} "
                          f"(after {self.samples} samples)")
            return
        kind = "float" if (ref.dtype.kind in "fc" or cand.dtype.kind in "fc") else "exact"
        if self.kind is None:
            self.kind = kind
            self.dtype = str(cand.dtype) if cand.dtype == ref.dtype else f"{ref.dtype}->{cand.dtype}"
        if ref.ndim == 0:
            ref, cand = ref.reshape(1), cand.reshape(1)
        top1_ref, top1_cand = ref, cand
        if one_sample:
            ref, cand = ref.reshape(1, -1), cand.reshape(1, -1)
        n = ref.shape[0]
        self.samples += n
        self.elements += ref.size
        if self.kind == "exact":
            self.exact += int(np.count_nonzero(ref == cand))
            return
        r = ref.astype(np.float64)
        c = cand.astype(np.float64)
        self.nonfinite_ref += int(r.size - np.count_nonzero(np.isfinite(r)))
        self.nonfinite_cand += int(c.size - np.count_nonzero(np.isfinite(c)))
        self.nan_cand += int(np.count_nonzero(np.isnan(c)))
        if r.size == 0:
            return
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            err = r - c
            diff = np.abs(err)
            self.max_abs = float(np.maximum(self.max_abs, diff.max()))  # np.maximum propagates NaN
            self.sum_abs += float(diff.sum())
            self.sum_ref2 += float(np.square(r).sum())
            self.sum_err2 += float(np.square(err).sum())
            rf, cf = r.reshape(n, -1), c.reshape(n, -1)
            dot = np.einsum("ij,ij->i", rf, cf)
            nr = np.sqrt(np.einsum("ij,ij->i", rf, rf))
            nc = np.sqrt(np.einsum("ij,ij->i", cf, cf))
            cos = dot / (nr * nc)
            finite = np.isfinite(nr) & np.isfinite(nc)  # a NaN/Inf sample keeps its NaN cosine
            cos = np.where(finite & (nr == 0) & (nc == 0), 1.0, cos)
            cos = np.where(finite & ((nr == 0) ^ (nc == 0)), 0.0, cos)
            cos = np.clip(cos, -1.0, 1.0)  # keeps NaN
            self.cos_sum += float(cos.sum())
            self.cos_min = float(np.minimum(self.cos_min, cos.min()))
        if rows_2d and top1_ref.shape[1] > 1 and self.top1_ok:
            agree = int(np.count_nonzero(np.argmax(top1_ref, axis=1) == np.argmax(top1_cand, axis=1)))
            self.top1_agree += agree
            self.top1_rows += top1_ref.shape[0]
        else:
            self.top1_ok = False

    def result(self) -> OutputMetrics:
        kind = self.kind or "float"
        m = OutputMetrics(kind=kind, dtype=self.dtype, samples=self.samples, elements=self.elements,
                          nonfinite_reference=self.nonfinite_ref, nonfinite_candidate=self.nonfinite_cand,
                          nan_candidate=self.nan_cand, error=self.error)
        if self.error is not None or self.samples == 0:
            return m
        if kind == "exact":
            m.exact_match_pct = 100.0 * self.exact / self.elements if self.elements else 100.0
            return m
        if self.elements:
            m.max_abs = self.max_abs
            m.mean_abs = self.sum_abs / self.elements
            m.cosine_mean = self.cos_sum / self.samples
            m.cosine_min = self.cos_min
            m.sqnr_db = sqnr_db(self.sum_ref2, self.sum_err2)
        if self.top1_ok and self.top1_rows:
            m.top1_agreement_pct = 100.0 * self.top1_agree / self.top1_rows
        return m


def sqnr_db(signal_power: float, noise_power: float) -> float:
    """10 log10(signal / noise) with the edge cases spelt out (NaN in, NaN out)."""
    if math.isnan(signal_power) or math.isnan(noise_power):
        return math.nan
    if noise_power == 0:
        return math.inf
    if signal_power == 0:
        return -math.inf
    if math.isinf(noise_power):
        return math.nan if math.isinf(signal_power) else -math.inf
    if math.isinf(signal_power):
        return math.inf
    return 10.0 * math.log10(signal_power / noise_power)


class AccuracyStats:
    """Top-1 accuracy: ``update(logits [N, C] or class ids [N], labels [N])``; ``result()`` -> % or None."""

    def __init__(self):
        self.correct = 0
        self.samples = 0

    def update(self, logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Counts the batch; returns which of its rows are right (to pair a reference's with a candidate's)."""
        logits, labels = np.asarray(logits), np.asarray(labels).reshape(-1)
        if logits.ndim == 2:
            pred = np.argmax(logits, axis=1)
        elif logits.ndim == 1 and logits.dtype.kind in "iub":
            pred = logits
        else:
            raise ValueError(f"accuracy needs [N, C] scores or [N] class ids, got shape {list(logits.shape)}")
        if pred.shape[0] != labels.shape[0]:
            raise ValueError(f"{pred.shape[0]} predictions but {labels.shape[0]} labels")
        right = pred == labels
        self.correct += int(np.count_nonzero(right))
        self.samples += int(labels.shape[0])
        return right

    def result(self) -> float | None:
        return 100.0 * self.correct / self.samples if self.samples else None


def json_safe(obj: Any) -> Any:
    """Recursively turn ``obj`` into JSON-ready data: numpy scalars/arrays to Python, non-finite floats
    to the strings "inf"/"-inf"/"nan", paths and other objects to ``str``, tuples to lists."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=str) if isinstance(obj, (set, frozenset)) else obj
        return [json_safe(v) for v in items]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        if math.isnan(f):
            return "nan"
        if math.isinf(f):
            return "inf" if f > 0 else "-inf"
        return f
    if obj is None or isinstance(obj, str):
        return obj
    if hasattr(obj, "to_dict"):
        return json_safe(obj.to_dict())
    return str(obj)


def fmt(value: Any, digits: int = 4) -> str:
    """Compact human formatting: None -> '-', floats with ``digits`` significant digits, inf/nan spelt out."""
    if value is None:
        return "-"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        f = float(value)
        if math.isnan(f):
            return "nan"
        if math.isinf(f):
            return "inf" if f > 0 else "-inf"
        return f"{f:.{digits}g}"
    return str(value)
