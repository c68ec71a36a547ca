"""report.json / report.md / junit.xml, and the CLI tables."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.data import from_arrays
from onnxopt.errors import OnnxoptError
from onnxopt.inspect import summarize
from onnxopt.metrics import OutputMetrics
from onnxopt.pass_infra import PassRecord, PipelineResult
from onnxopt.recipe import GateConfig
from onnxopt.report import gate_table, summary_table, write_reports
from onnxopt.validate import GateCheck, ValidationReport, validate

W = np.array([[1, 0, 2], [0, 1, 0], [1, 1, 1], [0, 0, -1]], np.float32)
X = np.arange(20, dtype=np.float32).reshape(5, 4)


def linear_model(w=W, *, with_identity=False) -> onnx.ModelProto:
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y0" if with_identity else "y"])]
    if with_identity:
        nodes.append(helper.make_node("Identity", ["y0"], ["y"]))
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                              [numpy_helper.from_array(w, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


BEFORE = linear_model(with_identity=True)
AFTER = linear_model()


def pipeline() -> PipelineResult:
    rec = PassRecord(name="remove-identity", config={"type": "remove-identity"}, modified=True, seconds=0.0125,
                     nodes_before=2, nodes_after=1, ops_before={"Identity": 1, "MatMul": 1}, ops_after={"MatMul": 1},
                     initializer_bytes_before=48, initializer_bytes_after=48, details={"removed": 1})
    rec2 = PassRecord(name="topological-sort", config={"type": "topological-sort"}, modified=False, seconds=0.001,
                      nodes_before=1, nodes_after=1, ops_before={"MatMul": 1}, ops_after={"MatMul": 1},
                      initializer_bytes_before=48, initializer_bytes_after=48, details={})
    return PipelineResult(model=AFTER, records=[rec, rec2], results=[])


def failing_validation() -> ValidationReport:
    w = W.copy()
    w[0, 0] -= 0.1
    gate = GateConfig(max_abs_error=1e-5, min_sqnr_db=10, max_accuracy_drop_pt=1)
    return validate(AFTER, linear_model(w), from_arrays({"x": X}, AFTER), gate=gate)


def strict_json(path):
    def no_constants(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=no_constants)


def test_write_reports_creates_all_three(tmp_path):
    out = tmp_path / "nested" / "reports"
    v = failing_validation()
    paths = write_reports(out, validation=v, pipeline=pipeline(), before=summarize(BEFORE), after=summarize(AFTER),
                          recipe={"name": "cleanup", "passes": []}, command="onnxopt optimize m.onnx -o o.onnx")
    assert [p.name for p in paths] == ["report.json", "report.md", "junit.xml"]
    assert all(p.is_file() for p in paths)
    assert sorted(p.name for p in out.iterdir()) == ["junit.xml", "report.json", "report.md"]  # no temp files left

    doc = strict_json(out / "report.json")
    assert doc["schema"] == "onnxopt.report/1"
    assert set(doc["versions"]) >= {"onnxopt", "onnx", "onnxruntime"}
    assert doc["result"] == {"gate": "failed", "modified": True}
    assert doc["validation"]["opt_level"] == "all"
    assert doc["validation"]["data"] == "arrays: 5 samples"
    assert doc["validation"]["outputs"]["y"]["max_abs"] == pytest.approx(1.6, abs=1e-5)
    assert [p["name"] for p in doc["pipeline"]] == ["remove-identity", "topological-sort"]
    assert doc["model"]["before"]["nodes"] == 2 and doc["model"]["after"]["nodes"] == 1
    assert doc["recipe"]["name"] == "cleanup" and doc["command"].startswith("onnxopt optimize")
    assert "timestamp" not in doc
    text = (out / "report.json").read_text()
    assert text == json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"  # sorted keys


def test_report_json_is_deterministic_and_inf_is_a_string(tmp_path):
    v = validate(AFTER, AFTER, from_arrays({"x": X}, AFTER), gate=GateConfig(min_sqnr_db=100))
    write_reports(tmp_path / "a", validation=v, pipeline=pipeline(), before=summarize(BEFORE), after=summarize(AFTER))
    write_reports(tmp_path / "b", validation=v, pipeline=pipeline(), before=summarize(BEFORE), after=summarize(AFTER))
    assert (tmp_path / "a" / "report.json").read_bytes() == (tmp_path / "b" / "report.json").read_bytes()
    doc = strict_json(tmp_path / "a" / "report.json")
    assert doc["validation"]["outputs"]["y"]["sqnr_db"] == "inf"
    assert doc["validation"]["checks"][0]["value"] == "inf"
    paths = write_reports(tmp_path / "c", validation=v, timestamp="2024-01-01T00:00:00Z")
    assert strict_json(paths[0])["timestamp"] == "2024-01-01T00:00:00Z"


def test_junit_has_a_failure_per_failed_check(tmp_path):
    v = failing_validation()
    write_reports(tmp_path, validation=v)
    root = ET.parse(tmp_path / "junit.xml").getroot()
    assert root.tag == "testsuite" and root.get("name") == "onnxopt.gate"
    cases = root.findall("testcase")
    assert [c.get("name") for c in cases] == ["y.max_abs_error", "y.sqnr_db", "accuracy_drop_pt"]
    assert root.get("tests") == "3" and root.get("failures") == "1" and root.get("skipped") == "1"
    failure = cases[0].find("failure")
    assert failure is not None and failure.get("message") == "y.max_abs_error = 1.6 exceeds the limit 1e-05"
    assert cases[1].find("failure") is None and cases[1].find("skipped") is None  # sqnr 21.7 dB >= 10
    assert cases[2].find("skipped") is not None


def test_junit_escapes_awkward_names(tmp_path):
    name = 'a<b>&"c\'\x01'
    m = OutputMetrics(kind="float", dtype="float32", samples=1, elements=1, max_abs=2.0)
    check = GateCheck(f"{name}.max_abs_error", "max_abs_error", name, 1.0, 2.0, False,
                      f"{name}.max_abs_error = 2 exceeds the limit 1", "fail")
    v = ValidationReport(outputs={name: m}, checks=[check], passed=False, samples=1, data="d <&>", batch_size=1,
                         opt_level="all", ort_version="x")
    write_reports(tmp_path, validation=v)
    root = ET.parse(tmp_path / "junit.xml").getroot()  # parses: valid XML
    case = root.find("testcase")
    assert case.get("name") == 'a<b>&"c\'.max_abs_error'  # control character dropped, the rest intact
    assert case.find("failure").get("message").startswith('a<b>&"c\'.max_abs_error')
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "a&lt;b&gt;&amp;" in md


def test_junit_without_validation_is_a_skipped_case(tmp_path):
    write_reports(tmp_path, pipeline=pipeline(), before=summarize(BEFORE), after=summarize(AFTER))
    root = ET.parse(tmp_path / "junit.xml").getroot()
    (case,) = root.findall("testcase")
    assert case.get("name") == "gate" and case.find("skipped") is not None
    assert strict_json(tmp_path / "report.json")["result"]["gate"] == "not run"


def test_markdown_for_a_pr(tmp_path):
    write_reports(tmp_path, validation=failing_validation(), pipeline=pipeline(), before=summarize(BEFORE),
                  after=summarize(AFTER), command="onnxopt optimize m.onnx")
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "**Gate: ❌ FAILED** (3 checks, 1 failed, 1 skipped)" in md
    assert "| nodes | 2 | 1 | -1 (-50.0%) |" in md
    assert "| Identity | 1 | 0 | -1 |" in md  # op counts that changed
    assert "| MatMul |" not in md.split("Op counts that changed")[1].split("## Passes")[0]
    assert "| 1 | remove-identity | yes | 2 → 1 | 0.013 |" in md
    assert "| ❌ | y.max_abs_error |" in md and "| ✅ | y.sqnr_db |" in md and "| ⏭️ | accuracy_drop_pt |" in md
    assert "graph optimization `all`" in md


def test_summary_table():
    text = summary_table(summarize(BEFORE), summarize(AFTER), pipeline())
    lines = text.splitlines()
    assert lines[0].split() == ["before", "after", "change"]
    assert lines[1].split() == ["nodes", "2", "1", "-1", "(-50.0%)"]
    assert any(line.split()[:2] == ["parameters", "12"] for line in lines)
    assert any(line.split() == ["*", "Identity", "1", "0", "1", "->", "0"] for line in lines)
    assert any(line.split() == ["MatMul", "1", "1"] for line in lines)
    assert any(line.startswith("1. remove-identity") and "0.013s" in line and "modified" in line for line in lines)
    assert any(line.startswith("2. topological-sort") and "unchanged" in line for line in lines)


def test_gate_table():
    text = gate_table(failing_validation())
    assert "FAIL  y.max_abs_error = 1.6 exceeds the limit 1e-05" in text
    assert "PASS  y.sqnr_db = " in text
    assert "SKIP  accuracy_drop_pt: skipped, no labels given" in text
    assert text.splitlines()[-1] == "gate: FAILED (3 checks, 1 failed, 1 skipped)"
    assert "opt level all" in text.splitlines()[0]


def test_report_dir_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OnnxoptError, match="cannot create report folder"):
        write_reports(f)
