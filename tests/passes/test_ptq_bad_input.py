"""Issue 3's "Bad input" list, end to end through `onnxopt optimize -r int8 --calib DATA`: a clear one-line
error naming the input or tensor (exit 2), or a documented fallback that the report records."""

import json
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnxopt.cli import main
from onnxopt.observers import MIN_WIDTH


def _model(tmp_path, body: str = "relu") -> str:
    """x[N,1,4,4] -> Conv -> (Relu | Reciprocal | zero map) -> Conv -> y; opset 17."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((3, 1, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((2, 3, 1, 1)).astype(np.float32), "w2")
    b2 = numpy_helper.from_array(np.float32([0.25, -0.5]), "b2")
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1")]
    if body == "relu":
        nodes.append(helper.make_node("Relu", ["c1"], ["h"], name="act"))
    elif body == "reciprocal":  # 1/0 = Inf where the conv output is exactly zero
        nodes.append(helper.make_node("Reciprocal", ["c1"], ["h"], name="act"))
    else:  # "zero": Relu(-|c1|) is 0 everywhere, a constant tensor with zero range
        nodes += [helper.make_node("Abs", ["c1"], ["a"], name="abs"),
                  helper.make_node("Neg", ["a"], ["na"], name="neg"),
                  helper.make_node("Relu", ["na"], ["h"], name="act")]
    nodes.append(helper.make_node("Conv", ["h", "w2", "b2"], ["y"], name="conv2"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 4, 4])], [w1, w2, b2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path / f"{body}.onnx"
    onnx.save(model, path)
    return str(path)


def _x(n=24, seed=1):
    return np.random.default_rng(seed).standard_normal((n, 1, 4, 4)).astype(np.float32)


def _npz(tmp_path, name="calib.npz", **arrays) -> str:
    path = tmp_path / name
    np.savez(path, **arrays)
    return str(path)


def _optimize(tmp_path, model, calib, *extra):
    out = tmp_path / "out.onnx"
    args = ["optimize", model, "-o", str(out), "-r", "int8", "--calib", calib, "--force", "-q", *extra]
    r = CliRunner().invoke(main, args, catch_exceptions=False)
    return r.exit_code, r.stderr, out


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # no range cache shared between tests


def _one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.mark.parametrize(("arrays", "message"), [
    ({"image": _x()}, r"'x'"),  # wrong name: the model's input is missing
    ({"x": _x(), "mask": _x()}, r"'mask'"),  # an extra input the model does not have
    ({"x": np.zeros((8, 1, 5, 4), np.float32)}, r"'x'.*(dim|shape)"),  # wrong static dims
    ({"x": np.zeros((8, 4, 4), np.float32)}, r"'x'.*rank"),  # wrong rank
    ({"x": _x().astype(np.int32)}, r"'x'.*int32"),  # wrong dtype
    ({"x": np.zeros((0, 1, 4, 4), np.float32)}, r"(no|zero|empty).*sample"),  # an empty data set
])
def test_bad_calibration_data_is_exit_2_naming_it(tmp_path, arrays, message):
    model = _model(tmp_path)
    code, err, out = _optimize(tmp_path, model, _npz(tmp_path, **arrays))
    assert code == 2 and not out.exists()
    assert re.search(message, _one_line(err), re.IGNORECASE), err


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_calibration_data_names_input_and_sample(tmp_path, bad):
    x = _x()
    x[5, 0, 1, 2] = bad
    code, err, out = _optimize(tmp_path, _model(tmp_path), _npz(tmp_path, x=x))
    line = _one_line(err)
    assert code == 2 and not out.exists()
    assert "'x'" in line and ("NaN" in line or "Inf" in line) and "5" in line, line


def test_inf_in_an_observed_tensor_names_the_tensor(tmp_path):
    x = _x()
    x[3] = 0.0  # conv1 of an all-zero image is exactly 0 (no bias): its reciprocal is Inf
    code, err, out = _optimize(tmp_path, _model(tmp_path, "reciprocal"), _npz(tmp_path, x=x))
    line = _one_line(err)
    assert code == 2 and not out.exists()
    assert "'h'" in line and "Inf" in line and "calibrate" in line, line


def test_constant_zero_tensor_gets_the_documented_fallback(tmp_path):
    model = _model(tmp_path, "zero")
    x = _x()
    report = tmp_path / "report"
    code, err, out = _optimize(tmp_path, model, _npz(tmp_path, x=x), "--report", str(report))
    assert code == 0, err
    passes = {p["name"]: p for p in json.loads((report / "report.json").read_text())["pipeline"]}
    cal = passes["calibrate"]["details"]
    assert cal["fallbacks"] == 1 and "constant tensor" in cal["fallback_notes"]["h"]
    # The zero tensor is quantized on the fallback range [0, MIN_WIDTH]: a finite, positive scale
    # that still represents 0 exactly, so the quantized model computes what the float one does.
    q = onnx.load(out)
    consts = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    qh = next(n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "h")
    scale, zp = float(consts[qh.input[1]]), int(consts[qh.input[2]])
    assert scale == pytest.approx(MIN_WIDTH / 255, rel=1e-6) and zp == 0
    ref = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ref, atol=0.02, rtol=0)  # y = bias only; bias int32-rounded
