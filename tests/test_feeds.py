"""Models that are not batch-first classifiers: complete feeds (scalar and state inputs), -1 dims, sized random data."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.data import FeedSource, from_feeds, model_inputs, open_data, random_data, samples_in
from onnxopt.errors import DataError
from onnxopt.recipe import DataConfig

F = TensorProto.FLOAT


def stateful_model(batch="B") -> onnx.ModelProto:
    """x [B, 8], state [2, B, 4], gain (a scalar) -> y [B, 4] and the next state [2, B, 4] (a recurrent cell)."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((8, 4)) * 0.5).astype(np.float32), "w")
    zero, one, axis0 = (numpy_helper.from_array(np.array(v, np.int64), n)
                        for n, v in (("zero", 0), ("one", 1), ("axis0", [0])))
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["xw"], name="proj"),
        helper.make_node("Gather", ["state", "zero"], ["s0"], axis=0, name="s0"),
        helper.make_node("Gather", ["state", "one"], ["s1"], axis=0, name="s1"),
        helper.make_node("Add", ["xw", "s0"], ["pre"], name="add"),
        helper.make_node("Tanh", ["pre"], ["h"], name="tanh"),
        helper.make_node("Mul", ["h", "gain"], ["y"], name="gain"),
        helper.make_node("Unsqueeze", ["h", "axis0"], ["h_"], name="h_"),
        helper.make_node("Unsqueeze", ["s0", "axis0"], ["s0_"], name="s0_"),
        helper.make_node("Concat", ["h_", "s0_"], ["next_state"], axis=0, name="next"),
        helper.make_node("Add", ["s1", "y"], ["y2"], name="residual"),
    ]
    graph = helper.make_graph(nodes, "cell", [helper.make_tensor_value_info("x", F, [batch, 8]),
                                              helper.make_tensor_value_info("state", F, [2, batch, 4]),
                                              helper.make_tensor_value_info("gain", F, [])],
                              [helper.make_tensor_value_info("y2", F, [batch, 4]),
                               helper.make_tensor_value_info("next_state", F, [2, batch, 4])],
                              initializer=[w, zero, one, axis0])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def feeds(n=8, seed=1, batch=1):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((batch, 8)).astype(np.float32),
             "state": rng.standard_normal((2, batch, 4)).astype(np.float32) * 0.3,
             "gain": np.float32(rng.uniform(0.5, 2.0))} for _ in range(n)]


def write_feeds(folder, items):
    folder.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(items):
        np.savez(folder / f"feed_{i:03d}.npz", **f)
    return folder


def cli(*args, timeout=300):
    r = subprocess.run([sys.executable, "-c", "from onnxopt.cli import main; main()", *map(str, args)],
                       capture_output=True, text=True, timeout=timeout)
    return r.returncode, r.stdout, r.stderr


# --------------------------------------------------------------------------------------------
def test_feeds_are_checked_per_input_and_file(tmp_path):
    model = stateful_model()
    src = open_data(write_feeds(tmp_path / "ok", feeds(3)), model, DataConfig(layout="feeds"))
    assert isinstance(src, FeedSource) and len(src) == 3
    batches = list(src.batches(16))  # a feed is never stacked with another, whatever the batch size
    assert len(batches) == 3 and all(samples_in(b) == 1 for b in batches) and batches[0]["gain"].ndim == 0
    bad = feeds(2)
    bad[1]["state"] = bad[1]["state"][0]  # rank 2 instead of 3
    with pytest.raises(DataError, match=r"feed_001\.npz: input 'state' has shape \[1, 4\] \(rank 2\)"):
        open_data(write_feeds(tmp_path / "rank", bad), model, DataConfig(layout="feeds"))
    bad = feeds(2)
    bad[0]["x"] = np.zeros((1, 9), np.float32)
    with pytest.raises(DataError, match=r"feed_000\.npz: input 'x' .* \(axis 1: 9 != 8\)"):
        open_data(write_feeds(tmp_path / "dim", bad), model, DataConfig(layout="feeds"))
    bad = feeds(2)
    del bad[1]["gain"]
    with pytest.raises(DataError, match=r"feed_001\.npz: missing input\(s\) 'gain'"):
        open_data(write_feeds(tmp_path / "missing", bad), model, DataConfig(layout="feeds"))
    bad = feeds(1)
    bad[0]["gain"] = np.float32(np.nan)
    with pytest.raises(DataError, match=r"input 'gain' contains 1 NaN"):
        from_feeds(bad, model)
    # stacked layout still refuses a scalar, with the hint
    with pytest.raises(DataError, match="scalar"):
        np.savez(tmp_path / "stacked.npz", **feeds(1)[0])
        open_data(tmp_path / "stacked.npz", model)


def test_stateful_model_calibrates_quantizes_and_validates_from_feeds(tmp_path):
    model = stateful_model()
    onnx.save(model, tmp_path / "cell.onnx")
    calib = write_feeds(tmp_path / "calib", feeds(12, seed=1))
    val = write_feeds(tmp_path / "val", feeds(6, seed=2, batch=3))  # a different batch size per feed is fine
    code, out, err = cli("optimize", tmp_path / "cell.onnx", "-o", tmp_path / "q.onnx", "-r", "int8", "--calib", calib,
                         "--val", val, "--data-layout", "feeds", "--min-sqnr-db", "15", "--report", tmp_path / "rep",
                         "-q")
    assert code == 0, err
    q = onnx.load(tmp_path / "q.onnx")
    assert any(n.op_type == "QuantizeLinear" for n in q.graph.node)
    import json

    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    v = report["validation"]
    assert v["samples"] == 6  # one per feed
    assert v["outputs"]["y2"]["samples"] == 6 and v["outputs"]["y2"]["sqnr_db"] > 15
    # the quantized model really runs each feed as given
    sess = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    ref = ort.InferenceSession(str(tmp_path / "cell.onnx"), providers=["CPUExecutionProvider"])
    for f in feeds(4, seed=1):  # calibration feeds: inside the ranges the quantization was fitted to
        f = {k: np.asarray(v) for k, v in f.items()}
        got, want = sess.run(None, f)[0], ref.run(None, f)[0]
        assert 10 * np.log10(np.sum(want ** 2) / np.sum((got - want) ** 2)) > 15
    # validate accepts the layout too; a wrong feed names the file and the input
    code, _, err = cli("validate", tmp_path / "cell.onnx", tmp_path / "q.onnx", "--data", val, "--data-layout", "feeds",
                       "--min-cosine", "0.99", "-q")
    assert code == 0, err
    bad = feeds(1)
    bad[0]["sr"] = np.int64(16000)
    code, _, err = cli("validate", tmp_path / "cell.onnx", tmp_path / "q.onnx", "--data",
                       write_feeds(tmp_path / "bad", bad), "--data-layout", "feeds", "-q")
    assert code == 2 and "feed_000.npz: unexpected key(s) 'sr'" in err and "Traceback" not in err


# --------------------------------------------------------------------------------------------
# -1, 0 and missing dims are dynamic everywhere
# --------------------------------------------------------------------------------------------
def minus_one_model() -> onnx.ModelProto:
    """x [-1, 3, ?, ?] (a literal -1 batch, as older paddle2onnx/TF exports write it) -> conv -> GAP -> [-1, 4]."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    x = helper.make_tensor_value_info("x", F, [-1, 3, None, None])
    x.type.tensor_type.shape.dim[0].dim_value = -1
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
                               helper.make_node("Relu", ["c"], ["r"], name="relu"),
                               helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
                               helper.make_node("Flatten", ["g"], ["y"], name="flat")], "m1", [x],
                              [helper.make_tensor_value_info("y", F, [-1, 4])], initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_minus_one_dims_are_dynamic_in_every_reader(tmp_path):
    model = minus_one_model()
    [spec] = model_inputs(model)
    assert spec.shape == (None, 3, None, None) and spec.static_batch is None
    x = np.random.default_rng(0).standard_normal((10, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    stacked = open_data(tmp_path / "d.npz", model)
    assert stacked.batch_limit is None and [samples_in(b) for b in stacked.batches(4)] == [4, 4, 2]
    (tmp_path / "folder").mkdir()
    np.savez(tmp_path / "folder" / "a.npz", x=x[:3])
    np.savez(tmp_path / "folder" / "b.npz", x=x[3:])
    assert [samples_in(b) for b in open_data(tmp_path / "folder", model).batches(4)] == [4, 4, 2]
    rnd = random_data(model, 5, batch_dims={})
    assert [samples_in(b) for b in rnd.batches(2)] == [2, 2, 1]
    fs = from_feeds([{"x": x[:2]}, {"x": x[2:7]}], model)
    assert [b["x"].shape[0] for b in fs.batches(3)] == [2, 5]
    images = tmp_path / "img"
    images.mkdir()
    from PIL import Image

    for i in range(3):
        Image.fromarray(np.full((12, 10, 3), 40 * i, np.uint8)).save(images / f"{i}.png")
    img = open_data(images, model, DataConfig(images={"resize": (8, 8), "scale": 1 / 255}))
    assert [b["x"].shape for b in img.batches(2)] == [(2, 3, 8, 8), (1, 3, 8, 8)]


@pytest.mark.parametrize("size", [0, -1, -8])
def test_no_batch_loop_runs_without_progress(tmp_path, size):
    model = minus_one_model()
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 3, 8, 8), np.float32))
    for src in (open_data(tmp_path / "d.npz", model), from_feeds([{"x": np.zeros((1, 3, 8, 8), np.float32)}], model),
                random_data(model, 2)):
        with pytest.raises(DataError, match="batch size must be at least 1"):
            next(iter(src.batches(size)))
    with pytest.raises(Exception, match="greater than 0"):
        DataConfig(batch_size=size)


def test_minus_one_model_goes_through_int8_in_seconds(tmp_path):
    """It used to hang: the static batch limit was read as -1 and the batching loop never advanced."""
    onnx.save(minus_one_model(), tmp_path / "m1.onnx")
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(1).standard_normal((16, 3, 8, 8)).astype(np.float32))
    code, _, err = cli("optimize", tmp_path / "m1.onnx", "-o", tmp_path / "q.onnx", "-r", "int8", "--calib",
                       tmp_path / "c.npz", "--val", tmp_path / "c.npz", "-q", timeout=120)
    assert code == 0, err


def test_random_data_takes_symbolic_dim_sizes(tmp_path):
    model = minus_one_model()
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "height"
    model.graph.input[0].type.tensor_type.shape.dim[3].dim_param = "width"
    src = open_data("random:3", model, DataConfig(dims={"height": 32, "width": 24}))
    assert next(iter(src.batches(8)))["x"].shape == (3, 3, 32, 24)
    onnx.save(model, tmp_path / "m.onnx")
    code, _, err = cli("validate", tmp_path / "m.onnx", tmp_path / "m.onnx", "--data", "random:2",
                       "--dims", "height=16,width=16", "--max-abs-error", "0", "-q")
    assert code == 0, err
    code, _, err = cli("validate", tmp_path / "m.onnx", tmp_path / "m.onnx", "--data", "random:2",
                       "--dims", "height=16,width", "-q")
    assert code == 2 and "NAME=SIZE" in err
