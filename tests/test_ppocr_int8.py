"""The PP-OCR text-direction classifier (a paddle2onnx export: literal -1 batch dim, weights in Constant nodes,
BatchNorm left unfolded) through the CLI's int8 preset with calibration, unedited. Before the -1 fix this hung
in the batching loop; the subprocess timeout turns a regression into a failure instead of a stuck CI job."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "models" / "ocr"
MODEL = SHARED / "ppocr_mobile_v2_cls.onnx"
LINES = SHARED / "text_lines.npz"

pytestmark = [pytest.mark.real_model,
              pytest.mark.skipif(not (MODEL.is_file() and LINES.is_file()),
                                 reason="needs ../shared/models/ocr (PP-OCR classifier)")]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = np.load(LINES)
    x = ((d["x"].astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(0, 3, 1, 2)
    root = tmp_path_factory.mktemp("ocr")
    np.savez(root / "calib.npz", x=x[:100])
    np.savez(root / "val.npz", x=x[100:])
    np.save(root / "labels.npy", d["y"][100:])
    return root, x[100:], d["y"][100:]


def test_int8_with_calibration_runs_and_keeps_accuracy(data):
    root, x_val, y_val = data
    assert onnx.load(str(MODEL)).graph.input[0].type.tensor_type.shape.dim[0].dim_value == -1  # the point
    out, report = root / "int8.onnx", root / "report"
    proc = subprocess.run(
        [sys.executable, "-m", "onnxopt", "optimize", str(MODEL), "-o", str(out), "-r", "int8", "-q",
         "--calib", str(root / "calib.npz"), "--val", str(root / "val.npz"), "--labels", str(root / "labels.npy"),
         "--report", str(report)],
        capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr

    q = onnx.load(str(out))
    ops = [n.op_type for n in q.graph.node]
    convs = [n for n in q.graph.node if n.op_type == "Conv"]
    assert len(convs) >= 20 and "BatchNormalization" not in ops and "Constant" not in ops
    producers = {o: n.op_type for n in q.graph.node for o in n.output}
    inits = {i.name for i in q.graph.initializer}
    # every Conv weight is stored int8; its data comes through a DequantizeLinear (an integer kernel) exactly
    # where latency-placement measured integer compute faster on this CPU (the dynamic H/W input is timed
    # on the calibration lines, not skipped as "small")
    assert all(producers.get(c.input[1]) == "DequantizeLinear" for c in convs)
    assert not any(c.input[1] in inits for c in convs)
    rec = json.loads((report / "report.json").read_text())["pipeline"]
    placement = next(r["details"] for r in rec if r["config"]["type"] == "latency-placement")
    assert placement["mode"] == "measured" or placement["mode"].startswith("cached")
    decided = {row["node"]: row["decision"] for row in placement["decision_table"]}
    for c in convs:
        integer = producers.get(c.input[0]) == "DequantizeLinear"
        assert integer == (decided.get(c.name, "int8") != "float"), c.name

    def accuracy(path):
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        probs = np.concatenate([sess.run(None, {"x": x_val[i:i + 50]})[0] for i in range(0, len(x_val), 50)])
        return probs, float((probs.argmax(1) == y_val).mean())

    ref_probs, ref_acc = accuracy(MODEL)
    q_probs, q_acc = accuracy(out)
    assert ref_acc == pytest.approx(0.95, abs=0.005)  # the README's fp32 figure on the last 300 lines
    assert q_acc >= ref_acc - 0.02
    assert float((ref_probs.argmax(1) == q_probs.argmax(1)).mean()) >= 0.97

    val = json.loads((report / "report.json").read_text())["validation"]
    assert val["passed"] is True and val["samples"] == 300
    assert val["accuracy"]["reference_pct"] == pytest.approx(100 * ref_acc, abs=1e-6)
    assert val["accuracy"]["candidate_pct"] == pytest.approx(100 * q_acc, abs=1e-6)
