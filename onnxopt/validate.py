"""The validation gate: run reference and candidate on the same data and check the differences.

``validate()`` runs both models with ONNX Runtime (CPU, same graph-optimization level) batch by
batch, accumulates per-output metrics (``onnxopt.metrics``), optional top-1 accuracy against
labels, and turns the ``GateConfig`` thresholds into one ``GateCheck`` per (threshold, output):

* ``max_abs_error``           -> ``<out>.max_abs_error``: max |ref - cand| <= threshold
* ``max_mean_abs_error``      -> ``<out>.mean_abs_error``: mean |ref - cand| <= threshold
* ``min_cosine``              -> ``<out>.cosine_min``: lowest per-sample cosine >= threshold
* ``min_sqnr_db``             -> ``<out>.sqnr_db``: SQNR in dB >= threshold
* ``min_top1_agreement_pct``  -> ``<out>.top1_agreement_pct``: argmax agreement % >= threshold
  (only for [N, C] outputs with C > 1; skipped with a note on others)
* ``max_accuracy_drop_pt``    -> ``accuracy_drop_pt``: reference minus candidate top-1 accuracy,
  in points, <= threshold (needs labels; skipped with a note without them). Scored on the first
  of ``gate.outputs`` (else of the model's outputs) that is [N, C] scores or [N] class ids.

``gate.outputs`` restricts which outputs the per-output thresholds apply to (default: all).

Non-float outputs (int/bool) get one ``<out>.exact_match_pct`` check whenever any output threshold
is set: it must reach ``min_top1_agreement_pct`` if given (an ArgMax-style output disagrees
exactly when top-1 does), else 100 %.

A check has status ``pass``, ``fail`` or ``skip``. Skipped checks (top-1 on a non-[N, C] output,
accuracy without labels) carry a note and have ``passed = False``, but do not fail the gate:
``ValidationReport.passed`` is False iff some check has status ``fail``. NaN/Inf in either
model's output, or a shape difference, fails every check on that output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt.data import DataSource, model_inputs, samples_in
from onnxopt.errors import DataError, OnnxoptError
from onnxopt.metrics import AccuracyStats, OutputMetrics, OutputStats, fmt, json_safe
from onnxopt.model_io import as_ir
from onnxopt.progress import SILENT, Progress
from onnxopt.recipe import GateConfig
from onnxopt.runtime import DEFAULT_OPT_LEVEL, ort_version, run_batch

# (GateConfig field, check/metric name, OutputMetrics attribute, comparison)
OUTPUT_THRESHOLDS: list[tuple[str, str, str, str]] = [
    ("max_abs_error", "max_abs_error", "max_abs", "<="),
    ("max_mean_abs_error", "mean_abs_error", "mean_abs", "<="),
    ("min_cosine", "cosine_min", "cosine_min", ">="),
    ("min_sqnr_db", "sqnr_db", "sqnr_db", ">="),
    ("min_top1_agreement_pct", "top1_agreement_pct", "top1_agreement_pct", ">="),
]


@dataclass
class GateCheck:
    name: str  # e.g. "logits.max_abs_error"
    metric: str  # e.g. "max_abs_error"
    output: str | None  # None for checks not tied to an output
    threshold: float | None
    value: float | None
    passed: bool
    message: str  # one line
    status: str = "pass"  # "pass" | "fail" | "skip"
    comparison: str = "<="  # value <= threshold, or value >= threshold

    @property
    def skipped(self) -> bool:
        return self.status == "skip"

    def to_dict(self) -> dict[str, Any]:
        return json_safe({
            "name": self.name, "metric": self.metric, "output": self.output, "threshold": self.threshold,
            "value": self.value, "comparison": self.comparison, "status": self.status, "passed": self.passed,
            "message": self.message,
        })


@dataclass
class ValidationReport:
    outputs: dict[str, OutputMetrics]
    checks: list[GateCheck]
    passed: bool
    samples: int
    data: str  # the data source's description
    batch_size: int  # effective (after clamping to a static batch dim)
    opt_level: str
    ort_version: str
    accuracy_reference_pct: float | None = None
    accuracy_candidate_pct: float | None = None
    accuracy_drop_pt: float | None = None
    accuracy_output: str | None = None
    # rows right in one model and wrong in the other: the drop's noise (its s.d. is about sqrt of this count)
    accuracy_changed: int | None = None
    accuracy_rows: int | None = None
    labels: bool = False
    gate: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    localization: Any = None  # onnxopt.localize.Localization, when asked for or the gate failed
    runtime: str = "onnxruntime"  # where the numbers were run (e.g. "openvino 2026.4.0")

    @property
    def data_description(self) -> str:
        return self.data

    @property
    def failed_checks(self) -> list[GateCheck]:
        return [c for c in self.checks if c.status == "fail"]

    @property
    def skipped_checks(self) -> list[GateCheck]:
        return [c for c in self.checks if c.status == "skip"]

    def summary(self) -> str:
        """One line for messages: 'gate passed (5 checks)' or 'gate failed: <first failure> (+N more)'."""
        failed = self.failed_checks
        skipped = f", {len(self.skipped_checks)} skipped" if self.skipped_checks else ""
        if not failed:
            if not self.checks:
                return "gate passed (no thresholds set)"
            return f"gate passed ({len(self.checks)} checks{skipped})"
        more = f" (+{len(failed) - 1} more)" if len(failed) > 1 else ""
        return f"gate failed: {failed[0].message}{more}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (non-finite floats are the strings "inf"/"-inf"/"nan")."""
        return json_safe({
            "passed": self.passed,
            "summary": self.summary(),
            "data": self.data,
            "samples": self.samples,
            "batch_size": self.batch_size,
            "onnxruntime": self.ort_version,
            "runtime": self.runtime,
            "opt_level": self.opt_level,
            "gate": self.gate,
            "labels": self.labels,
            "accuracy": {
                "output": self.accuracy_output,
                "reference_pct": self.accuracy_reference_pct,
                "candidate_pct": self.accuracy_candidate_pct,
                "drop_pt": self.accuracy_drop_pt,
                "rows": self.accuracy_rows,
                "changed_rows": self.accuracy_changed,
            },
            "outputs": {name: m.to_dict() for name, m in self.outputs.items()},
            "checks": [c.to_dict() for c in self.checks],
            "notes": list(self.notes),
            **({"localization": self.localization.to_dict()} if self.localization is not None else {}),
        })


# --------------------------------------------------------------------------------------------
ModelRef = ir.Model | onnx.ModelProto | str | Path


def interface_model(model: ModelRef) -> ir.Model:
    """The model's IR, for its inputs and outputs; a path is read without its external data or checks
    (the caller loaded and checked it already, or ONNX Runtime will refuse it)."""
    if isinstance(model, str | Path):
        from onnxopt.model_io import from_proto

        return from_proto(onnx.load(str(model), load_external_data=False))
    return as_ir(model)


def _tensor_outputs(model: ir.Model) -> tuple[list[str], list[str]]:
    tensors, others = [], []
    for o in model.graph.outputs:
        (tensors if o.type is None or isinstance(o.type, ir.TensorType) else others).append(o.name)
    return tensors, others


def _names(items) -> str:
    return ", ".join(repr(x) for x in items) or "none"


def check_interfaces(reference: ir.Model, candidate: ir.Model) -> None:
    """Raise ``OnnxoptError`` unless both models take the same inputs (names, dtypes) and give the same outputs."""
    ref_in = {s.name: s for s in model_inputs(reference)}
    cand_in = {s.name: s for s in model_inputs(candidate)}
    if set(ref_in) != set(cand_in):
        only_ref = [n for n in ref_in if n not in cand_in]
        only_cand = [n for n in cand_in if n not in ref_in]
        raise OnnxoptError(f"candidate inputs differ from the reference: only in reference: {_names(only_ref)}; "
                           f"only in candidate: {_names(only_cand)}")
    for name, spec in ref_in.items():
        if cand_in[name].dtype != spec.dtype:
            raise OnnxoptError(f"input {name!r} is {spec.dtype} in the reference but {cand_in[name].dtype} "
                               "in the candidate")
    ref_out = [o.name for o in reference.graph.outputs]
    cand_out = [o.name for o in candidate.graph.outputs]
    if set(ref_out) != set(cand_out):
        only_ref = [n for n in ref_out if n not in cand_out]
        only_cand = [n for n in cand_out if n not in ref_out]
        raise OnnxoptError(f"candidate outputs differ from the reference: only in reference: {_names(only_ref)}; "
                           f"only in candidate: {_names(only_cand)}")


def _passes(value: float | None, threshold: float, comparison: str) -> bool:
    """NaN (or a missing value) never passes."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return value <= threshold if comparison == "<=" else value >= threshold


def _verdict(name: str, value: float | None, threshold: float, comparison: str) -> tuple[bool, str]:
    ok = _passes(value, threshold, comparison)
    if ok:
        return True, f"{name} = {fmt(value)} {comparison} {fmt(threshold)}"
    if comparison == "<=":
        return False, f"{name} = {fmt(value)} exceeds the limit {fmt(threshold)}"
    return False, f"{name} = {fmt(value)} is below the minimum {fmt(threshold)}"


def _output_problem(m: OutputMetrics) -> str | None:
    if m.error:
        return m.error
    if m.nonfinite_candidate:
        nan = f" ({m.nan_candidate} NaN)" if m.nan_candidate else ""
        return f"candidate output has {m.nonfinite_candidate} NaN/Inf values{nan}"
    if m.nonfinite_reference:
        return f"reference output has {m.nonfinite_reference} NaN/Inf values; cannot compare"
    if m.samples == 0:
        return "no samples compared"
    return None


def build_checks(gate: GateConfig, outputs: dict[str, OutputMetrics], *, labels: bool,
                 accuracy_output: str | None, accuracy_drop_pt: float | None) -> list[GateCheck]:
    checks: list[GateCheck] = []
    scope = list(gate.outputs) if gate.outputs else list(outputs)
    active = [t for t in OUTPUT_THRESHOLDS if getattr(gate, t[0]) is not None]
    for out in scope:
        m = outputs[out]
        problem = _output_problem(m)
        if m.kind == "exact":
            if not active:
                continue
            thr = gate.min_top1_agreement_pct if gate.min_top1_agreement_pct is not None else 100.0
            name = f"{out}.exact_match_pct"
            if problem:
                checks.append(GateCheck(name, "exact_match_pct", out, thr, None, False, f"{name}: {problem}", "fail", ">="))
                continue
            ok, msg = _verdict(name, m.exact_match_pct, thr, ">=")
            checks.append(GateCheck(name, "exact_match_pct", out, thr, m.exact_match_pct, ok, msg,
                                    "pass" if ok else "fail", ">="))
            continue
        for field_name, metric, attr, cmp in active:
            thr = float(getattr(gate, field_name))
            name = f"{out}.{metric}"
            value = getattr(m, attr)
            if problem:
                checks.append(GateCheck(name, metric, out, thr, value, False, f"{name}: {problem}", "fail", cmp))
                continue
            if attr == "top1_agreement_pct" and value is None:
                checks.append(GateCheck(name, metric, out, thr, None, False,
                                        f"{name}: skipped, output is not [N, C] scores with C > 1", "skip", cmp))
                continue
            ok, msg = _verdict(name, value, thr, cmp)
            checks.append(GateCheck(name, metric, out, thr, value, ok, msg, "pass" if ok else "fail", cmp))
    if gate.max_accuracy_drop_pt is not None:
        thr = float(gate.max_accuracy_drop_pt)
        name = "accuracy_drop_pt"
        if not labels:
            checks.append(GateCheck(name, name, None, thr, None, False,
                                    f"{name}: skipped, no labels given (pass labels to check accuracy)", "skip"))
        else:
            problem = _output_problem(outputs[accuracy_output]) if accuracy_output else "no output to score"
            if problem:
                checks.append(GateCheck(name, name, accuracy_output, thr, accuracy_drop_pt, False,
                                        f"{name}: {accuracy_output}: {problem}", "fail"))
            else:
                ok, msg = _verdict(name, accuracy_drop_pt, thr, "<=")
                checks.append(GateCheck(name, name, accuracy_output, thr, accuracy_drop_pt, ok, msg,
                                        "pass" if ok else "fail"))
    return checks


def _pick_accuracy_output(order: list[str], ref_out: dict[str, np.ndarray], labels: np.ndarray,
                          named: list[str]) -> str | None:
    """The output scored against labels: the first of the gate's ``outputs`` that fits, else the [N, C]
    scores with the fewest classes that still cover every label (a classifier head, not an embedding of the
    same shape), else [N] class ids."""
    def fits(name: str) -> bool:
        v = np.asarray(ref_out[name])
        return (v.ndim == 2 and v.shape[1] > 1 and v.dtype.kind in "fc") or (v.ndim == 1 and v.dtype.kind in "iu")

    for name in named:
        if name in ref_out and fits(name):
            return name
    top = int(labels.max()) if labels.size else 0
    scores = [n for n in order if fits(n) and np.asarray(ref_out[n]).ndim == 2]
    covering = [n for n in scores if np.asarray(ref_out[n]).shape[1] > top]
    if covering:
        return min(covering, key=lambda n: np.asarray(ref_out[n]).shape[1])  # stable: first of equals
    ids = [n for n in order if fits(n) and np.asarray(ref_out[n]).ndim == 1]
    return ids[0] if ids else (scores[0] if scores else None)


def validate(reference: ModelRef, candidate: ModelRef, data: DataSource, *,
             labels: np.ndarray | None = None, gate: GateConfig | None = None, batch_size: int = 32,
             opt_level: str = DEFAULT_OPT_LEVEL, progress: Progress | None = None,
             threads: int | None = None, runtime: str = "onnxruntime") -> ValidationReport:
    """Compare ``candidate`` to ``reference`` on ``data`` and apply ``gate``; never raises on a failed gate
    (the caller decides: ``report.passed``). Raises ``OnnxoptError`` for unusable input.
    ``runtime``: where both models run (``onnxopt.target_runtime``: onnxruntime, openvino, tensorrt, qnn)."""
    gate = gate or GateConfig()
    progress = progress or SILENT
    ref_ir, cand_ir = interface_model(reference), interface_model(candidate)
    check_interfaces(ref_ir, cand_ir)
    ref_inputs = [s.name for s in model_inputs(ref_ir)]
    if set(data.input_names) != set(ref_inputs):
        raise DataError(f"data ({data.description}) feeds {_names(data.input_names)} but the models take "
                        f"{_names(ref_inputs)}")
    tensor_outs, other_outs = _tensor_outputs(ref_ir)
    all_outs = [o.name for o in ref_ir.graph.outputs]
    notes = list(getattr(data, "notes", []))
    for o in other_outs:
        notes.append(f"output {o!r} is not a tensor (sequence/map); not compared")
    if gate.outputs:
        unknown = [o for o in gate.outputs if o not in all_outs]
        if unknown:
            raise OnnxoptError(f"gate.outputs names unknown output(s) {_names(unknown)} "
                               f"(model outputs: {_names(all_outs)})")
        non_tensor = [o for o in gate.outputs if o in other_outs]
        if non_tensor:
            raise OnnxoptError(f"gate.outputs names non-tensor output(s) {_names(non_tensor)}; they cannot be compared")
    if not tensor_outs:
        raise OnnxoptError("the model has no tensor outputs to compare")
    feeds = getattr(data, "layout", "stacked") == "feeds"
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        # with feeds the labels follow the rows of the scored output across feeds (checked at the end)
        if not feeds and labels.shape[0] != len(data):
            raise DataError(f"{labels.shape[0]} labels but the data has {len(data)} samples")

    bs = data.effective_batch_size(batch_size)
    cand_limits = [s.static_batch for m in (ref_ir, cand_ir) for s in model_inputs(m) if s.static_batch]
    if cand_limits:
        bs = min(bs, min(cand_limits))
    if bs != batch_size and not feeds:
        notes.append(f"batch size {batch_size} clamped to {bs} (the model's static batch dim)")

    from onnxopt.target_runtime import open_session, runtime_version

    ref_sess = open_session(reference, runtime, opt_level=opt_level, threads=threads, what="reference")
    cand_sess = open_session(candidate, runtime, opt_level=opt_level, threads=threads, what="candidate")
    stats = {name: OutputStats(name) for name in tensor_outs}
    acc_ref, acc_cand = AccuracyStats(), AccuracyStats()
    acc_output: str | None = None
    acc_order = list(gate.outputs or []) + [o for o in tensor_outs if o not in (gate.outputs or [])]
    done = labelled = changed = 0
    with progress.task("validating", len(data)) as bar:
        for batch in data.batches(bs):
            n = samples_in(batch)
            ref_out = run_batch(ref_sess, batch, tensor_outs, what="reference", first_sample=done)
            cand_out = run_batch(cand_sess, batch, tensor_outs, what="candidate", first_sample=done)
            for name in tensor_outs:
                stats[name].update(ref_out[name], cand_out[name], one_sample=feeds)
            if labels is not None:
                if acc_output is None:
                    acc_output = _pick_accuracy_output(acc_order, ref_out, labels, list(gate.outputs or []))
                    if acc_output is None:
                        raise OnnxoptError("labels given but no output is [N, C] scores or [N] class ids "
                                           f"(outputs: {_names(tensor_outs)})")
                rows = np.asarray(ref_out[acc_output]).shape[0] if feeds else n
                y = labels[labelled:labelled + rows]
                labelled += rows
                try:
                    changed += int(np.count_nonzero(acc_ref.update(ref_out[acc_output], y)
                                                    != acc_cand.update(cand_out[acc_output], y)))
                except ValueError as exc:
                    raise OnnxoptError(f"accuracy on output {acc_output!r}: {exc}") from None
            done += n
            bar.update(n)

    if labels is not None and labelled != labels.shape[0]:
        raise DataError(f"{labels.shape[0]} labels but the {'feeds gave' if feeds else 'data has'} {labelled} "
                        f"{'rows of output ' + repr(acc_output) if feeds else 'samples'}")
    outputs = {name: stats[name].result() for name in tensor_outs}
    acc_r = acc_ref.result() if labels is not None else None
    acc_c = acc_cand.result() if labels is not None else None
    drop = acc_r - acc_c if acc_r is not None and acc_c is not None else None
    checks = build_checks(gate, outputs, labels=labels is not None, accuracy_output=acc_output,
                          accuracy_drop_pt=drop)
    return ValidationReport(
        outputs=outputs,
        checks=checks,
        passed=not any(c.status == "fail" for c in checks),
        samples=done,
        data=data.description,
        batch_size=bs,
        opt_level=opt_level,
        ort_version=ort_version(),
        accuracy_reference_pct=acc_r,
        accuracy_candidate_pct=acc_c,
        accuracy_drop_pt=drop,
        accuracy_output=acc_output,
        accuracy_changed=changed if labels is not None else None,
        accuracy_rows=labelled if labels is not None else None,
        labels=labels is not None,
        gate=gate.model_dump(exclude_none=True),
        notes=notes,
        runtime=runtime_version(runtime) if runtime != "onnxruntime" else "onnxruntime",
    )
