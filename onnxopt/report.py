"""Reports of a run: ``report.json`` (everything), ``report.md`` (for a PR) and ``junit.xml`` (for CI).

``report.json`` has sorted keys and no timestamp unless one is passed in, so two runs of the same
command on the same inputs differ only in measured times. Non-finite floats (an SQNR of +inf for
identical outputs, a NaN metric) are written as the strings ``"inf"``, ``"-inf"`` and ``"nan"`` so
the file is strict JSON.

``junit.xml`` is one ``<testsuite name="onnxopt.gate">`` with a ``<testcase>`` per gate check: a
failed check has a ``<failure>``, a skipped one a ``<skipped>``. Without validation it holds one
skipped ``gate`` test case, so a CI job that expects the file does not silently pass.

Everything is written through ``model_io.atomic_write``.
"""

from __future__ import annotations

import json
import platform
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from onnxopt.errors import OnnxoptError
from onnxopt.inspect import ModelSummary
from onnxopt.metrics import OutputMetrics, fmt, json_safe
from onnxopt.model_io import atomic_write
from onnxopt.pass_infra import PipelineResult
from onnxopt.validate import ValidationReport

SCHEMA = "onnxopt.report/1"
_MB = 1024 * 1024


def versions() -> dict[str, str]:
    import numpy
    import onnx
    import onnxruntime

    import onnxopt

    return {
        "onnxopt": getattr(onnxopt, "__version__", "?"),
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


# --------------------------------------------------------------------------------------------
# report.json
# --------------------------------------------------------------------------------------------
def report_dict(*, validation: ValidationReport | None = None, pipeline: PipelineResult | None = None,
                before: ModelSummary | None = None, after: ModelSummary | None = None,
                recipe: dict | None = None, command: str | None = None,
                timestamp: str | None = None, extra: dict | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "command": command,
        "versions": versions(),
        "result": {
            "gate": "not run" if validation is None else ("passed" if validation.passed else "failed"),
            "modified": pipeline.modified if pipeline is not None else None,
        },
        "recipe": recipe,
        "model": {
            "before": before.to_dict() if before is not None else None,
            "after": after.to_dict() if after is not None else None,
        },
        "pipeline": [r.to_dict() for r in pipeline.records] if pipeline is not None else None,
        "validation": validation.to_dict() if validation is not None else None,
    }
    if timestamp is not None:
        doc["timestamp"] = timestamp
    if extra:
        doc["extra"] = extra
    return json_safe(doc)


def _json_text(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, sort_keys=True, allow_nan=False, ensure_ascii=False) + "\n"


# --------------------------------------------------------------------------------------------
# Plain-text tables (CLI)
# --------------------------------------------------------------------------------------------
def _text_table(headers: list[str], rows: list[list[str]], right: set[int] | None = None) -> str:
    right = right if right is not None else set(range(1, len(headers)))
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells):
        parts = [str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(parts).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)])


def _mb_value(n: int) -> str:
    """Megabytes: two decimals, or three significant digits below 1 MB so small models do not show 0.00."""
    mb = n / _MB
    return f"{mb:.2f}" if mb >= 1 or mb == 0 else f"{mb:.3g}"


def _human_bytes(n: int) -> str:
    a = abs(n)
    for unit, size in (("GB", 1024**3), ("MB", _MB), ("KB", 1024)):
        if a >= size:
            return f"{n / size:+.2f} {unit}"
    return f"{n:+d} B"


def _bytes_change(a: int, b: int) -> str:
    if a == b:
        return "0"
    rel = f" ({100.0 * (b - a) / a:+.1f}%)" if a else ""
    return _human_bytes(b - a) + rel


def _change(a: int | float, b: int | float) -> str:
    d = b - a
    if d == 0:
        return "0"
    rel = f" ({100.0 * d / a:+.1f}%)" if a else ""
    return f"{d:+,}{rel}" if isinstance(d, int) else f"{d:+.2f}{rel}"


def _op_rows(before: ModelSummary, after: ModelSummary, changed_only: bool) -> list[tuple[str, int, int]]:
    ops = sorted(set(before.ops) | set(after.ops))
    rows = [(op, before.ops.get(op, 0), after.ops.get(op, 0)) for op in ops]
    return [r for r in rows if r[1] != r[2]] if changed_only else rows


def summary_table(before: ModelSummary, after: ModelSummary, pipeline: PipelineResult | None = None) -> str:
    """Before/after table for the terminal: totals, per-op counts (changed ones marked '*'), passes."""
    rows = [
        ["nodes", f"{before.nodes:,}", f"{after.nodes:,}", _change(before.nodes, after.nodes)],
        ["parameters", f"{before.parameters:,}", f"{after.parameters:,}", _change(before.parameters, after.parameters)],
        ["initializer bytes", f"{before.initializer_bytes:,}", f"{after.initializer_bytes:,}",
         _change(before.initializer_bytes, after.initializer_bytes)],
        ["file bytes", f"{before.serialized_bytes:,}", f"{after.serialized_bytes:,}",
         _change(before.serialized_bytes, after.serialized_bytes)],
    ]
    out = [_text_table(["", "before", "after", "change"], rows)]
    op_rows = [[("* " if b != a else "  ") + op, str(b), str(a), "" if b == a else f"{b} -> {a}"]
               for op, b, a in _op_rows(before, after, changed_only=False)]
    if op_rows:
        out.append("")
        out.append(_text_table(["ops (* changed)", "before", "after", ""], op_rows))
    if pipeline is not None and pipeline.records:
        prow = []
        for i, r in enumerate(pipeline.records, 1):
            prow.append([f"{i}. {r.name}", f"{r.seconds:.3f}s", "modified" if r.modified else "unchanged",
                         f"{r.nodes_before} -> {r.nodes_after}"])
        total = sum(r.seconds for r in pipeline.records)
        prow.append(["total", f"{total:.3f}s", "modified" if pipeline.modified else "unchanged", ""])
        out.append("")
        out.append(_text_table(["pass", "time", "result", "nodes"], prow, right={1}))
    return "\n".join(out)


_METRIC_COLUMNS = [("max abs", "max_abs"), ("mean abs", "mean_abs"), ("cos min", "cosine_min"),
                   ("cos mean", "cosine_mean"), ("SQNR dB", "sqnr_db"), ("top-1 %", "top1_agreement_pct"),
                   ("exact %", "exact_match_pct")]


def _metric_columns(outputs: dict[str, OutputMetrics]) -> list[tuple[str, str]]:
    """Only columns some output has a value for."""
    cols = [c for c in _METRIC_COLUMNS if any(getattr(m, c[1]) is not None for m in outputs.values())]
    return cols or _METRIC_COLUMNS[:1]


def _output_note(m: OutputMetrics) -> str:
    if m.error:
        return m.error
    bits = []
    if m.nonfinite_candidate:
        bits.append(f"candidate NaN/Inf: {m.nonfinite_candidate}")
    if m.nonfinite_reference:
        bits.append(f"reference NaN/Inf: {m.nonfinite_reference}")
    return "; ".join(bits)


def _accuracy_line(v: ValidationReport) -> str | None:
    if not v.labels:
        return None
    return (f"accuracy on {v.accuracy_output!r} ({v.samples} labels): reference {fmt(v.accuracy_reference_pct)}%, "
            f"candidate {fmt(v.accuracy_candidate_pct)}%, drop {fmt(v.accuracy_drop_pt)} pt")


def _status_counts(v: ValidationReport) -> str:
    failed, skipped = len(v.failed_checks), len(v.skipped_checks)
    parts = [f"{len(v.checks)} checks"]
    if failed:
        parts.append(f"{failed} failed")
    if skipped:
        parts.append(f"{skipped} skipped")
    return ", ".join(parts)


def _localization_rows(loc, limit: int | None = None) -> list[list[str]]:
    worst = {id(x) for x in loc.worst}
    layers = loc.layers if limit is None or len(loc.layers) <= limit else loc.worst
    return [[x.node or x.tensor, x.op_type, f"{x.sqnr_db:.1f}", f"{x.cosine:.4f}",
             f"-{x.jump_db:.1f}" if x.jump_db > 0 else "", "<<" if id(x) in worst else ""] for x in layers]


def _localization_text(loc) -> str:
    """Per-layer SQNR/cosine in graph order (only the worst layers when there are many)."""
    head = f"per-layer error ({loc.samples} samples): {loc.summary()}"
    rows = _localization_rows(loc, limit=40)
    table = _text_table(["layer", "op", "SQNR dB", "cosine", "jump dB", ""], rows, right={2, 3, 4})
    return head + "\n" + table


def gate_table(validation: ValidationReport) -> str:
    """Per-output metrics and one PASS/FAIL/SKIP line per check, for the terminal."""
    v = validation
    where = f"onnxruntime {v.ort_version}, opt level {v.opt_level}" if v.runtime == "onnxruntime" else v.runtime
    out = [f"validation: {v.data}; {where}, batch {v.batch_size}"]
    cols = _metric_columns(v.outputs)
    rows = []
    for name, m in v.outputs.items():
        rows.append([name, *(fmt(getattr(m, attr)) for _, attr in cols), _output_note(m)])
    out.append(_text_table(["output", *(c[0] for c in cols), ""], rows, right=set(range(1, len(cols) + 1))))
    acc = _accuracy_line(v)
    if acc:
        out.append(acc)
    for c in v.checks:
        out.append(f"{c.status.upper():4}  {c.message}")
    for note in v.notes:
        out.append(f"note: {note}")
    if v.localization is not None:
        out.append(_localization_text(v.localization))
    if not v.checks:
        out.append("gate: no thresholds set")
    else:
        out.append(f"gate: {'PASSED' if v.passed else 'FAILED'} ({_status_counts(v)})")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# report.md
# --------------------------------------------------------------------------------------------
def _md_cell(value: Any) -> str:
    text = str(value).replace("\r", " ").replace("\n", " ")
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")


def _md_table(headers: list[str], rows: list[list[Any]], right: set[int] | None = None) -> list[str]:
    right = right if right is not None else set(range(1, len(headers)))
    lines = ["| " + " | ".join(_md_cell(h) for h in headers) + " |",
             "|" + "|".join("---:" if i in right else ":---" for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
    return lines


_ICON = {"pass": "✅", "fail": "❌", "skip": "⏭️"}
RECOVERY_LAYERS = 12  # per-layer rows shown per recovery step (the largest changes)


def _recovery_lines(pipeline: PipelineResult) -> list[str]:
    """Accuracy-recovery steps: a pass whose details hold ``layer_sqnr_db`` ({tensor: [before, after]}) gets its
    output SQNR before/after, its time, and the layers whose SQNR changed most."""
    lines: list[str] = []
    for r in pipeline.records:
        layers = r.details.get("layer_sqnr_db")
        if not isinstance(layers, dict) or not layers:
            continue
        if not lines:
            lines += ["## Accuracy recovery", ""]
        before, after = r.details.get("sqnr_db_before"), r.details.get("sqnr_db_after")
        kept = "kept" if r.modified else "not kept"
        lines.append(f"**{_md_cell(r.name)}** ({kept}, {r.seconds:.1f} s): output SQNR {fmt(before)} → {fmt(after)} dB"
                     + (f"; {_md_cell(r.details['criterion'])}" if r.details.get("criterion") else ""))
        lines.append("")
        rows = sorted(layers.items(), key=lambda kv: -abs(_delta(kv[1])))[:RECOVERY_LAYERS]
        lines += _md_table(["layer output", "SQNR before (dB)", "after (dB)", "change"],
                           [[t, fmt(b), fmt(a), f"{_delta([b, a]):+.2f}"] for t, (b, a) in rows])
        lines.append("")
    return lines


def _delta(pair) -> float:
    b, a = pair
    try:
        d = float(a) - float(b)
    except (TypeError, ValueError):
        return 0.0
    return d if d == d else 0.0  # NaN (a layer one side lacks) sorts last


def markdown_report(*, validation: ValidationReport | None = None, pipeline: PipelineResult | None = None,
                    before: ModelSummary | None = None, after: ModelSummary | None = None,
                    recipe: dict | None = None, command: str | None = None, timestamp: str | None = None) -> str:
    v = validation
    lines = ["# onnxopt report", ""]
    if v is None:
        lines.append("**Gate: not run** (no validation data)")
    else:
        lines.append(f"**Gate: {'✅ PASSED' if v.passed else '❌ FAILED'}** ({_status_counts(v)})"
                     if v.checks else "**Gate: no thresholds set**")
    lines.append("")
    meta = []
    if command:
        cmd = command.replace("`", "'")
        meta.append(f"- Command: `{cmd}`")
    if recipe and recipe.get("name"):
        meta.append(f"- Recipe: {_md_cell(recipe['name'])}")
    ver = versions()
    meta.append(f"- onnxopt {ver['onnxopt']}, onnx {ver['onnx']}, onnxruntime {ver['onnxruntime']}")
    if timestamp:
        meta.append(f"- Time: {timestamp}")
    lines += meta + [""]

    if before is not None and after is not None:
        lines += ["## Model", ""]
        rows = [
            ["nodes", f"{before.nodes:,}", f"{after.nodes:,}", _change(before.nodes, after.nodes)],
            ["parameters", f"{before.parameters:,}", f"{after.parameters:,}", _change(before.parameters, after.parameters)],
            ["initializers (MB)", _mb_value(before.initializer_bytes), _mb_value(after.initializer_bytes),
             _bytes_change(before.initializer_bytes, after.initializer_bytes)],
            ["file (MB)", _mb_value(before.serialized_bytes), _mb_value(after.serialized_bytes),
             _bytes_change(before.serialized_bytes, after.serialized_bytes)],
        ]
        lines += _md_table(["", "before", "after", "change"], rows) + [""]
        changed = _op_rows(before, after, changed_only=True)
        if changed:
            lines += ["Op counts that changed:", ""]
            lines += _md_table(["op", "before", "after", "change"], [[op, b, a, f"{a - b:+d}"] for op, b, a in changed])
            lines.append("")
        else:
            lines += ["No op counts changed.", ""]

    if pipeline is not None:
        lines += ["## Passes", ""]
        if pipeline.records:
            rows = [[i, r.name, "yes" if r.modified else "no", f"{r.nodes_before} → {r.nodes_after}",
                     f"{r.seconds:.3f}"] for i, r in enumerate(pipeline.records, 1)]
            rows.append(["", "**total**", "yes" if pipeline.modified else "no", "",
                         f"{sum(r.seconds for r in pipeline.records):.3f}"])
            lines += _md_table(["#", "pass", "modified", "nodes", "time (s)"], rows, right={0, 4})
        else:
            lines.append("No passes ran.")
        lines.append("")
        lines += _recovery_lines(pipeline)

    if v is not None:
        lines += ["## Validation gate", ""]
        where = (f"onnxruntime {v.ort_version} (CPU), graph optimization `{v.opt_level}`"
                 if v.runtime == "onnxruntime" else f"{v.runtime} (CPU)")
        lines.append(f"Data: {_md_cell(v.data)}; {where}, batch size {v.batch_size}.")
        lines.append("")
        cols = _metric_columns(v.outputs)
        rows = [[name, *(fmt(getattr(m, attr)) for _, attr in cols), _output_note(m)] for name, m in v.outputs.items()]
        lines += _md_table(["output", *(c[0] for c in cols), "notes"], rows,
                           right=set(range(1, len(cols) + 1))) + [""]
        acc = _accuracy_line(v)
        if acc:
            lines += [acc[0].upper() + acc[1:], ""]
        if v.checks:
            rows = [[_ICON[c.status], c.name, fmt(c.value), f"{c.comparison} {fmt(c.threshold)}", c.message]
                    for c in v.checks]
            lines += _md_table(["", "check", "value", "threshold", "detail"], rows, right={2, 3}) + [""]
        else:
            lines += ["No gate thresholds were set: metrics are informational.", ""]
        if v.notes:
            lines += ["Notes:", ""] + [f"- {_md_cell(n)}" for n in v.notes] + [""]
        if v.localization is not None:
            loc = v.localization
            lines += ["## Per-layer error", "", f"{_md_cell(loc.summary())} ({loc.samples} samples; SQNR and "
                      "cosine of each layer's output against the reference, in graph order).", ""]
            lines += _md_table(["layer", "op", "SQNR (dB)", "cosine", "jump (dB)", ""],
                               _localization_rows(loc), right={2, 3, 4}) + [""]
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------------------------
# junit.xml
# --------------------------------------------------------------------------------------------
_XML_BAD = re.compile("[^\u0009\u000a\u000d\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _x(text: Any) -> str:
    """Text safe for XML 1.0 (characters XML cannot hold at all are dropped; etree escapes the rest)."""
    return _XML_BAD.sub("", "" if text is None else str(text))


def junit_tree(validation: ValidationReport | None) -> ET.ElementTree:
    suite = ET.Element("testsuite", name="onnxopt.gate")
    props = ET.SubElement(suite, "properties")
    if validation is None:
        case = ET.SubElement(suite, "testcase", classname="onnxopt.gate", name="gate", time="0")
        ET.SubElement(case, "skipped", message="no validation data given; the gate did not run")
        suite.attrib.update(tests="1", failures="0", errors="0", skipped="1", time="0")
        return ET.ElementTree(suite)
    v = validation
    for key, value in (("data", v.data), ("samples", v.samples), ("onnxruntime", v.ort_version),
                       ("opt_level", v.opt_level), ("batch_size", v.batch_size)):
        ET.SubElement(props, "property", name=key, value=_x(value))
    for c in v.checks:
        case = ET.SubElement(suite, "testcase", classname=_x(f"onnxopt.gate.{c.output}" if c.output else "onnxopt.gate"),
                             name=_x(c.name), time="0")
        detail = (f"value: {fmt(c.value)}\nthreshold: {c.comparison} {fmt(c.threshold)}\n"
                  f"metric: {c.metric}\noutput: {c.output}\n")
        if c.status == "fail":
            el = ET.SubElement(case, "failure", message=_x(c.message), type="GateFailed")
            el.text = _x(detail)
        elif c.status == "skip":
            ET.SubElement(case, "skipped", message=_x(c.message))
        else:
            out = ET.SubElement(case, "system-out")
            out.text = _x(c.message)
    suite.attrib.update(tests=str(len(v.checks)), failures=str(len(v.failed_checks)), errors="0",
                        skipped=str(len(v.skipped_checks)), time="0")
    return ET.ElementTree(suite)


# --------------------------------------------------------------------------------------------
def write_reports(directory, *, validation: ValidationReport | None = None, pipeline: PipelineResult | None = None,
                  before: ModelSummary | None = None, after: ModelSummary | None = None,
                  recipe: dict | None = None, command: str | None = None,
                  timestamp: str | None = None, extra: dict | None = None) -> list[Path]:
    """Write report.json, report.md and junit.xml into ``directory`` (created if missing)."""
    d = Path(directory)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OnnxoptError(f"{d}: cannot create report folder ({exc.strerror or exc})") from None
    if not d.is_dir():
        raise OnnxoptError(f"{d}: report path is not a folder")
    doc = report_dict(validation=validation, pipeline=pipeline, before=before, after=after, recipe=recipe,
                      command=command, timestamp=timestamp, extra=extra)
    md = markdown_report(validation=validation, pipeline=pipeline, before=before, after=after, recipe=recipe,
                         command=command, timestamp=timestamp)
    tree = junit_tree(validation)
    ET.indent(tree)
    paths = [d / "report.json", d / "report.md", d / "junit.xml"]
    try:
        # All three are written to temporary files first and renamed together at the end, so a failure
        # or an interrupt leaves the previous set (or none), never a mix of old and new reports.
        with atomic_write(paths[0], "wb") as fj, atomic_write(paths[1], "wb") as fm, \
                atomic_write(paths[2], "wb") as fx:
            fj.write(_json_text(doc).encode("utf-8"))
            fm.write(md.encode("utf-8"))
            tree.write(fx, encoding="utf-8", xml_declaration=True)
    except OSError as exc:
        raise OnnxoptError(f"{d}: cannot write reports ({exc.strerror or exc})") from None
    return paths
