"""The CLI contract: commands, exit codes (0 pass, 1 gate failed, 2 bad input) and one-line errors."""

import hashlib
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from onnxopt.cli import main

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "digits_cnn.onnx"
VAL = ROOT / "models" / "digits_val.npz"
LABELS = ROOT / "models" / "digits_val_labels.npy"


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _one_line_error(stderr: str) -> None:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr


@pytest.fixture()
def cleaned(tmp_path):
    out = tmp_path / "clean.onnx"
    code, _, err = run("optimize", MODEL, "-o", out, "-r", "cleanup", "-q")
    assert code == 0, err
    return out


def test_optimize_cleanup_with_gate_and_reports(tmp_path):
    before = _sha(MODEL)
    out, rep = tmp_path / "out.onnx", tmp_path / "rep"
    code, stdout, _ = run("optimize", MODEL, "-o", out, "-r", "cleanup", "--val", VAL, "--labels", LABELS,
                          "--report", rep)
    assert code == 0
    assert _sha(MODEL) == before  # input never modified
    ops = {n.op_type for n in onnx.load(out).graph.node}
    assert ops == {"Conv", "Relu", "MaxPool", "Reshape", "Gemm"}
    assert "gate: PASSED" in stdout and "BatchNormalization" in stdout
    report = json.loads((rep / "report.json").read_text())
    assert report["validation"]["passed"] is True
    assert report["validation"]["accuracy"]["candidate_pct"] == pytest.approx(98.99, abs=0.01)
    suite = ET.parse(rep / "junit.xml").getroot()
    assert suite.get("failures") == "0" and len(suite.findall("testcase")) == 1


def test_existing_output_needs_force(tmp_path, cleaned):
    stamp = _sha(cleaned)
    code, _, err = run("optimize", MODEL, "-o", cleaned, "-q")
    assert code == 2 and "--force" in err
    _one_line_error(err)
    assert _sha(cleaned) == stamp
    code, _, _ = run("optimize", MODEL, "-o", cleaned, "-q", "--force")
    assert code == 0


def test_validate_passes_and_reports(tmp_path, cleaned):
    code, stdout, _ = run("validate", MODEL, cleaned, "--data", VAL, "--labels", LABELS, "--max-abs-error", "1e-4",
                          "--min-top1-agreement", "100", "--max-accuracy-drop", "0", "--report", tmp_path / "r")
    assert code == 0, stdout
    suite = ET.parse(tmp_path / "r" / "junit.xml").getroot()
    assert len(suite.findall("testcase")) == 3 and suite.get("failures") == "0"


def test_perturbed_weight_fails_a_tight_gate_with_exit_1(tmp_path, cleaned):
    model = onnx.load(cleaned)
    conv_w = next(t for t in model.graph.initializer if len(t.dims) == 4)
    w = numpy_helper.to_array(conv_w).copy()
    w.flat[0] += 0.5
    conv_w.CopyFrom(numpy_helper.from_array(w, conv_w.name))
    bad = tmp_path / "bad.onnx"
    onnx.save(model, bad)
    code, _, err = run("validate", MODEL, bad, "--data", VAL, "--max-abs-error", "1e-4", "--report", tmp_path / "r",
                       "-q")
    assert code == 1
    assert "gate failed" in err and "logits.max_abs_error" in err
    suite = ET.parse(tmp_path / "r" / "junit.xml").getroot()
    failing = [tc for tc in suite.findall("testcase") if tc.find("failure") is not None]
    assert [tc.get("name") for tc in failing] == ["logits.max_abs_error"]


def test_gate_failure_in_optimize_does_not_write_output(tmp_path):
    out = tmp_path / "out.onnx"
    # cleanup is lossless but not bit-exact, so a zero tolerance must fail
    code, _, err = run("optimize", MODEL, "-o", out, "--val", VAL, "--max-abs-error", "0", "-q")
    assert code == 1 and "not written" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_garbage_candidate_exit_2(tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07 this is not a model \xff\xfe" * 20)
    code, _, err = run("validate", MODEL, garbage, "--data", VAL, "--max-abs-error", "1e-4")
    assert code == 2
    _one_line_error(err)
    assert "garbage.onnx" in err


@pytest.mark.parametrize("args, message", [
    (["optimize", MODEL, "-o", "{tmp}/o.onnx", "-r", "no-such-preset"], "unknown preset"),
    (["optimize", "{tmp}/missing.onnx", "-o", "{tmp}/o.onnx"], "no such file"),
    (["optimize", MODEL, "-o", "{tmp}/o.onnx", "--val", "{tmp}/missing.npz"], "missing.npz"),
    (["optimize", MODEL, "-o", "{tmp}/o.onnx", "--val", "{tmp}/wrong.npz"], "images"),
    (["optimize", MODEL, "-o", "{tmp}/o.onnx", "--val", VAL, "--labels", "{tmp}/short.npy"], "label"),
    (["optimize", MODEL, "-o", "{tmp}/o.onnx", "-r", "{tmp}/bad.yaml"], "unknown pass 'constant-foldin'"),
    (["optimize", MODEL, "-o", MODEL, "--force"], "overwrite the input"),
    (["validate", MODEL, MODEL, "--data", "{tmp}/shape.npz"], "input"),
])
def test_bad_input_is_exit_2_with_one_line(tmp_path, args, message):
    np.savez(tmp_path / "wrong.npz", images=np.zeros((2, 1, 8, 8), np.float32))
    np.savez(tmp_path / "shape.npz", input=np.zeros((2, 1, 9, 9), np.float32))
    np.save(tmp_path / "short.npy", np.zeros(3, np.int64))
    (tmp_path / "bad.yaml").write_text("passes:\n  - type: constant-foldin\n")
    before = _sha(MODEL)
    code, _, err = run(*[str(a).replace("{tmp}", str(tmp_path)) for a in args])
    assert code == 2, err
    _one_line_error(err)
    assert message in err
    assert not (tmp_path / "o.onnx").exists()
    assert _sha(MODEL) == before


def test_usage_error_is_exit_2():
    code, _, _ = run("optimize", MODEL)  # missing -o
    assert code == 2


def test_inspect_and_recipes():
    code, stdout, _ = run("inspect", MODEL)
    assert code == 0 and "input  input: float32 [N, 1, 8, 8]" in stdout and "BatchNormalization 2" in stdout
    code, stdout, _ = run("inspect", MODEL, "--json")
    assert code == 0 and json.loads(stdout)["parameters"] == 38474
    code, stdout, _ = run("recipes")
    assert code == 0 and "cleanup" in stdout and "constant-folding" in stdout
    code, stdout, _ = run("recipes", "--show", "cleanup")
    assert code == 0 and "type: fold-batchnorm" in stdout


def test_every_command_has_help():
    for cmd in ("optimize", "validate", "inspect", "recipes"):
        code, stdout, _ = run(cmd, "--help")
        assert code == 0 and "Usage:" in stdout
