"""Reports of a tuning run: ``tune.json`` (everything), ``tune.md`` (the trial table, the winner and why, its
per-layer precision) and ``junit.xml`` (one testcase per trial; a failed gate is a failure)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from onnxopt.errors import OnnxoptError
from onnxopt.metrics import json_safe
from onnxopt.report import _json_text, atomic_write


def markdown(result, objective: str, command: str | None = None) -> str:
    d = result.to_dict()
    lines = ["# onnxopt tune", ""]
    if command:
        lines += [f"`{command}`", ""]
    w = d["winner"]
    base = d["baseline_fp32_ms"]
    if w is None:
        lines += [f"**No passing model** ({d['why']}).", ""]
    else:
        speed = f", {base / w['latency_ms']:.2f}x the original's speed" if base and w["latency_ms"] else ""
        lines += [f"**Winner**: trial {w['trial']} `{w['config']}` - {d['why']}{speed}.", ""]
    if d["interrupted"]:
        lines += ["Interrupted: the trials so far; no model written.", ""]
    lines += [f"Note: {n}" for n in d.get("notes", [])] + ([""] if d.get("notes") else [])
    lines += [f"Objective: {objective}; {len(d['trials'])} trials ({d['cached_trials']} cached); "
              f"{d['seconds']} s; original (fp32) kernel time {base if base is None else round(base, 3)} ms.", "",
              "| # | round | config | result | latency ms | size MB | failed checks | s |",
              "|---|---|---|---|---|---|---|---|"]
    for t in d["trials"]:
        res = t["status"] + (" (cached)" if t["cached"] else "")
        fails = ", ".join(t["failed_checks"]) or (t["error"] or "")
        if t.get("within_noise"):
            fails = "within noise: " + "; ".join(t["within_noise"])
        lines.append(f"| {t['trial']} | {t['round']} | {t['config']} | {res} | {t['latency_ms'] or ''} | "
                     f"{t['size_mb'] or ''} | {fails} | {t['seconds']:.1f} |")
    if d["precision_map"]:
        counts: dict[str, int] = {}
        for v in d["precision_map"].values():
            counts[v] = counts.get(v, 0) + 1
        lines += ["", "## Winner's precision per layer", "",
                  ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())), "", "| layer | precision |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in d["precision_map"].items()]
    return "\n".join(lines) + "\n"


def junit(result) -> ET.ElementTree:
    d = result.to_dict()
    suite = ET.Element("testsuite", name="onnxopt.tune", tests=str(len(d["trials"])),
                       failures=str(sum(t["status"] == "fail" for t in d["trials"])),
                       errors=str(sum(t["status"] == "error" for t in d["trials"])))
    for t in d["trials"]:
        case = ET.SubElement(suite, "testcase", classname="onnxopt.tune", name=f"trial {t['trial']}: {t['config']}",
                             time=f"{t['seconds']:.2f}")
        if t["status"] == "fail":
            ET.SubElement(case, "failure", message=", ".join(t["failed_checks"]) or "; ".join(t.get("within_noise", []))
                          or "gate failed")
        elif t["status"] == "error":
            ET.SubElement(case, "error", message=t["error"] or "error")
    return ET.ElementTree(suite)


def write_tune_reports(directory, result, *, command: str | None = None, objective: str = "latency") -> list[Path]:
    d = Path(directory)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OnnxoptError(f"{d}: cannot create report folder ({exc.strerror or exc})") from None
    paths = [d / "tune.json", d / "tune.md", d / "junit.xml"]
    tree = junit(result)
    ET.indent(tree)
    # metrics hold inf (an exact output's SQNR): JSON gets what report.json writes for them
    doc = json_safe({"schema": "onnxopt.tune/1", "command": command, "objective": objective, **result.to_dict()})
    with atomic_write(paths[0], "wb") as fj, atomic_write(paths[1], "wb") as fm, atomic_write(paths[2], "wb") as fx:
        fj.write(_json_text(doc).encode("utf-8"))
        fm.write(markdown(result, objective, command).encode("utf-8"))
        tree.write(fx, encoding="utf-8", xml_declaration=True)
    return paths
