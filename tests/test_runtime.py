"""ONNX Runtime sessions and batched runs."""

from __future__ import annotations

import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt import runtime
from onnxopt.data import from_arrays
from onnxopt.errors import OnnxoptError
from onnxopt.progress import Progress
from onnxopt.runtime import DEFAULT_OPT_LEVEL, OPT_LEVELS, make_session, run, run_batch

W = np.array([[1, 0, 2], [0, 1, 0], [1, 1, 1], [0, 0, -1]], np.float32)  # [4, 3]
B = np.array([0.5, -1.0, 0.0], np.float32)


def linear_model(batch="N", w=W, b=B) -> onnx.ModelProto:
    """y = x @ W + b, x [batch, 4] -> y [batch, 3]."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "B"], ["y"])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


X = np.arange(20, dtype=np.float32).reshape(5, 4)


def test_opt_levels_and_default():
    assert {"disable", "basic", "extended", "all"} <= set(OPT_LEVELS)
    assert DEFAULT_OPT_LEVEL == "all"
    assert OPT_LEVELS["all"] == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    with pytest.raises(OnnxoptError, match="unknown optimization level 'fast'"):
        make_session(linear_model(), opt_level="fast")


@pytest.mark.parametrize("level", ["disable", "basic", "extended", "all"])
def test_run_values_at_every_level(level):
    session = make_session(linear_model(), opt_level=level, threads=1)
    assert session.get_providers() == ["CPUExecutionProvider"]
    data = from_arrays({"x": X}, linear_model())
    pairs = list(run(session, data, batch_size=2))
    assert [p[0]["x"].shape[0] for p in pairs] == [2, 2, 1]
    y = np.concatenate([out["y"] for _, out in pairs])
    # row 0 is x = [0, 1, 2, 3]: [0+0+2+0, 0+1+2+0, 0+0+2-3] + b = [2.5, 2, -1]
    np.testing.assert_allclose(y[0], [2.5, 2.0, -1.0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(y, X @ W + B, rtol=0, atol=1e-5)


def test_static_batch_one_model_runs_with_large_batch_size():
    model = linear_model(batch=1)
    data = from_arrays({"x": X}, model)
    assert data.batch_limit == 1
    outs = [out["y"] for _, out in run(make_session(model), data, batch_size=32)]
    assert len(outs) == 5 and all(o.shape == (1, 3) for o in outs)


def test_load_failure_is_one_line():
    model = linear_model()
    model.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(OnnxoptError, match="^onnxruntime cannot load candidate: ") as e:
        make_session(model, what="candidate")
    assert "\n" not in str(e.value)
    assert "[ONNXRuntimeError]" not in str(e.value)


def test_run_failure_is_one_line():
    # Reshape to a shape that does not fit the input: fails at run time, not at load time
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])], "bad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array([3, 3], np.int64), "shape")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = make_session(model, what="reference")
    with pytest.raises(OnnxoptError, match=r"^onnxruntime failed running reference on the batch starting at sample 0: ") as e:
        list(run(session, from_arrays({"x": X}, model), batch_size=8))
    assert "\n" not in str(e.value)


def test_unknown_output_name():
    session = make_session(linear_model())
    with pytest.raises(OnnxoptError, match="has no output.* 'z'"):
        list(run(session, from_arrays({"x": X}, linear_model()), batch_size=2, outputs=["z"]))


def test_run_batch_selected_outputs():
    session = make_session(linear_model())
    out = run_batch(session, {"x": X[:1]}, ["y"])
    assert list(out) == ["y"]


def test_large_model_path_uses_external_data(monkeypatch):
    # Pretend the protobuf limit is tiny so the temp-dir / external-data path is exercised.
    monkeypatch.setattr(runtime, "PROTOBUF_LIMIT", 10)
    session = make_session(linear_model())
    assert hasattr(session, "_onnxopt_tmpdir")
    y = run_batch(session, {"x": X})["y"]
    np.testing.assert_allclose(y, X @ W + B, rtol=0, atol=1e-5)


def test_progress_counts_samples():
    stream = io.StringIO()
    progress = Progress(enabled=True, stream=stream)
    list(run(make_session(linear_model()), from_arrays({"x": X}, linear_model()), batch_size=2, progress=progress))
    assert "running model: 5/5" in stream.getvalue()


def test_static_batch_above_one_pads_the_last_batch():
    model = linear_model(batch=2)
    session = make_session(model)
    assert runtime.static_batch(session) == 2
    pairs = list(run(session, from_arrays({"x": X}, model), batch_size=32))
    assert [out["y"].shape for _, out in pairs] == [(2, 3), (2, 3), (1, 3)]  # 5 samples: the pad is cut off
    np.testing.assert_allclose(np.concatenate([out["y"] for _, out in pairs]), X @ W + B, rtol=0, atol=1e-5)
