import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.errors import ModelLoadError, OnnxoptError
from onnxopt.model_io import load_model, save_model


def _model(weight_size=4) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.arange(weight_size, dtype=np.float32), "w")
    node = helper.make_node("Add", ["x", "w"], ["y"])
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [weight_size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [weight_size])],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_roundtrip_is_atomic_and_leaves_no_temp(tmp_path):
    out = save_model(_model(), tmp_path / "m.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
    loaded = load_model(out)
    np.testing.assert_array_equal(loaded.graph.initializers["w"].const_value.numpy(), np.arange(4, dtype=np.float32))


def test_save_refuses_overwrite_without_force(tmp_path):
    out = save_model(_model(), tmp_path / "m.onnx")
    before = _sha(out)
    with pytest.raises(OnnxoptError, match="exists.*--force"):
        save_model(_model(8), out)
    assert _sha(out) == before
    save_model(_model(8), out, force=True)
    assert load_model(out).graph.initializers["w"].const_value.nbytes == 32


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OnnxoptError, match="disk full"):
        save_model(_model(), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_external_data_above_threshold_roundtrips(tmp_path):
    model = _model(weight_size=1000)
    original = model.SerializeToString()
    out = save_model(model, tmp_path / "big.onnx", external_threshold=1000)
    assert model.SerializeToString() == original  # caller's proto untouched
    assert (tmp_path / "big.onnx.data").stat().st_size == 4000
    loaded = load_model(out)
    np.testing.assert_array_equal(loaded.graph.initializers["w"].const_value.numpy(),
                                  np.arange(1000, dtype=np.float32))


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty file"),
        (b"\x00\xff garbage \x13\x37" * 10, "not an ONNX model"),
        (helper.make_tensor("t", TensorProto.FLOAT, [1], [1.0]).SerializeToString(), "not an ONNX model"),
    ],
)
def test_bad_files_give_one_line_errors(tmp_path, content, message):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=message) as info:
        load_model(path)
    assert "\n" not in str(info.value)


def test_truncated_file(tmp_path):
    data = _model(weight_size=256).SerializeToString()
    path = tmp_path / "trunc.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError):
        load_model(path)


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        load_model(tmp_path / "nope.onnx")


def _with_external(tmp_path: Path, location: str) -> Path:
    model = _model()
    t = model.graph.initializer[0]
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value=location)
    path = tmp_path / "model" / "m.onnx"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.parametrize("location, message", [
    ("/etc/passwd", "absolute"),
    ("../secret.bin", r"'\.\.'"),
    ("missing.bin", "does not exist"),
])
def test_unsafe_external_data_refused(tmp_path, location, message):
    (tmp_path / "secret.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ModelLoadError, match=message):
        load_model(_with_external(tmp_path, location))


def test_symlinked_external_data_refused(tmp_path):
    (tmp_path / "secret.bin").write_bytes(b"\0" * 16)
    path = _with_external(tmp_path, "w.bin")
    (path.parent / "w.bin").symlink_to(tmp_path / "secret.bin")
    with pytest.raises(ModelLoadError, match="symbolic link"):
        load_model(path)


def test_external_data_beyond_file_end_refused(tmp_path):
    path = _with_external(tmp_path, "w.bin")
    (path.parent / "w.bin").write_bytes(b"\0" * 8)  # tensor needs 16
    model = onnx.load(str(path), load_external_data=False)
    model.graph.initializer[0].external_data.add(key="length", value="16")
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ModelLoadError, match="beyond the end"):
        load_model(path)


def test_raw_data_length_mismatch_refused(tmp_path):
    model = _model()
    model.graph.initializer[0].raw_data = b"\0" * 12
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ModelLoadError, match="raw data holds 12 bytes"):
        load_model(path)
