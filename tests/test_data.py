"""Data sources: .npz files and folders, image folders, random data, labels, and every DataError."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxopt import data as data_mod
from onnxopt.data import from_arrays, load_labels, model_inputs, open_data, preprocess_image, random_data
from onnxopt.errors import DataError
from onnxopt.recipe import DataConfig, ImageSpec


def make_model(inputs: dict[str, tuple[int, list]], *, initializer_input: bool = False) -> onnx.ModelProto:
    """Identity per input (outputs '<name>_out'); inputs map name -> (elem type, shape)."""
    ins = [helper.make_tensor_value_info(n, t, s) for n, (t, s) in inputs.items()]
    outs = [helper.make_tensor_value_info(f"{n}_out", t, s) for n, (t, s) in inputs.items()]
    nodes = [helper.make_node("Identity", [n], [f"{n}_out"]) for n in inputs]
    inits = []
    if initializer_input:  # an input that is also an initializer is not a "real" input
        ins.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [2]))
        inits.append(onnx.numpy_helper.from_array(np.zeros(2, np.float32), "w"))
    graph = helper.make_graph(nodes, "g", ins, outs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


FLOAT_X = make_model({"x": (TensorProto.FLOAT, ["N", 4])})


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def _x(n, start=0, dim=4):
    return (np.arange(start * dim, (start + n) * dim, dtype=np.float32)).reshape(n, dim)


# --------------------------------------------------------------------------------------------
# model inputs
# --------------------------------------------------------------------------------------------
def test_model_inputs_skip_initializers_and_keep_symbolic_dims():
    m = make_model({"x": (TensorProto.FLOAT, ["batch", 3, None])}, initializer_input=True)
    (spec,) = model_inputs(m)
    assert spec.name == "x" and spec.dtype == np.float32
    assert spec.shape == ("batch", 3, None)
    assert spec.shape_text() == "[batch, 3, ?]"


# --------------------------------------------------------------------------------------------
# .npz file
# --------------------------------------------------------------------------------------------
def test_npz_batches_in_order(tmp_path):
    x = _x(10)
    src = open_data(_npz(tmp_path / "val.npz", x=x), FLOAT_X)
    assert len(src) == 10 and src.input_names == ["x"]
    assert src.description == "val.npz: 10 samples"
    batches = list(src.batches(4))
    assert [b["x"].shape[0] for b in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), x)
    # deterministic: a second pass gives the same batches
    again = list(src.batches(4))
    for a, b in zip(batches, again, strict=True):
        np.testing.assert_array_equal(a["x"], b["x"])


def test_npz_max_samples_caps(tmp_path):
    src = open_data(_npz(tmp_path / "val.npz", x=_x(10)), FLOAT_X, DataConfig(max_samples=3))
    assert len(src) == 3 and src.total_samples == 10
    assert src.description == "val.npz: 3 of 10 samples"
    got = np.concatenate([b["x"] for b in src.batches(2)])
    np.testing.assert_array_equal(got, _x(3))


def test_path_does_not_exist(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        open_data(tmp_path / "nope.npz", FLOAT_X)


def test_unsupported_file(tmp_path):
    p = tmp_path / "data.txt"
    p.write_text("1,2,3")
    with pytest.raises(DataError, match=r"data\.txt: a file is not a data source"):
        open_data(p, FLOAT_X)


def test_missing_input(tmp_path):
    m = make_model({"ids": (TensorProto.INT64, ["N", 8]), "mask": (TensorProto.INT64, ["N", 8])})
    p = _npz(tmp_path / "val.npz", ids=np.zeros((2, 8), np.int64))
    with pytest.raises(DataError, match=r"val\.npz: missing input\(s\) 'mask'") as e:
        open_data(p, m)
    assert "\n" not in str(e.value)


def test_extra_key(tmp_path):
    p = _npz(tmp_path / "val.npz", x=_x(2), labels=np.zeros(2, np.int64))
    with pytest.raises(DataError, match=r"unexpected key\(s\) 'labels'"):
        open_data(p, FLOAT_X)


def test_float64_and_int32_are_cast_with_a_note(tmp_path):
    m = make_model({"x": (TensorProto.FLOAT, ["N", 4]), "ids": (TensorProto.INT64, ["N", 2])})
    p = _npz(tmp_path / "val.npz", x=_x(3).astype(np.float64), ids=np.ones((3, 2), np.int32))
    src = open_data(p, m)
    assert any("'x' is float64, cast to float32" in n for n in src.notes)
    assert any("'ids' is int32, cast to int64" in n for n in src.notes)
    (batch,) = list(src.batches(8))
    assert batch["x"].dtype == np.float32 and batch["ids"].dtype == np.int64


def test_float_for_int_input_is_refused(tmp_path):
    m = make_model({"ids": (TensorProto.INT64, ["N", 2])})
    p = _npz(tmp_path / "val.npz", ids=np.ones((3, 2), np.float32))
    with pytest.raises(DataError, match=r"'ids' is float32 but the model expects int64 \(refusing float data"):
        open_data(p, m)


def test_int64_for_int32_input_is_refused(tmp_path):
    m = make_model({"ids": (TensorProto.INT32, ["N", 2])})
    with pytest.raises(DataError, match="is int64 but the model expects int32"):
        open_data(_npz(tmp_path / "v.npz", ids=np.ones((3, 2), np.int64)), m)


def test_wrong_rank_names_input_expected_and_got(tmp_path):
    m = make_model({"x": (TensorProto.FLOAT, ["batch", 3, 8])})
    p = _npz(tmp_path / "val.npz", x=np.zeros((5, 24), np.float32))
    with pytest.raises(DataError) as e:
        open_data(p, m)
    msg = str(e.value)
    assert "'x'" in msg and "[batch, 3, 8]" in msg and "[5, 24]" in msg and "rank 2" in msg


def test_static_dim_differs(tmp_path):
    m = make_model({"x": (TensorProto.FLOAT, ["N", 3, 8])})
    p = _npz(tmp_path / "val.npz", x=np.zeros((5, 3, 9), np.float32))
    with pytest.raises(DataError, match=r"'x' has shape \[5, 3, 9\] but the model expects \[N, 3, 8\] \(axis 2: 9 != 8\)"):
        open_data(p, m)


def test_symbolic_dims_accept_any_size(tmp_path):
    m = make_model({"x": (TensorProto.FLOAT, ["N", "L"])})
    src = open_data(_npz(tmp_path / "v.npz", x=np.zeros((2, 7), np.float32)), m)
    assert len(src) == 2


def test_zero_samples(tmp_path):
    p = _npz(tmp_path / "val.npz", x=np.zeros((0, 4), np.float32))
    with pytest.raises(DataError, match="no samples"):
        open_data(p, FLOAT_X)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_inf_rejected_with_sample_index(tmp_path, bad):
    x = _x(6)
    x[4, 2] = bad
    with pytest.raises(DataError, match=r"'x' contains 1 NaN/Inf value\(s\) \(first in sample 4\)"):
        open_data(_npz(tmp_path / "val.npz", x=x), FLOAT_X)


def test_float64_overflowing_float32_is_caught(tmp_path):
    x = _x(2).astype(np.float64)
    x[1, 0] = 1e300
    with pytest.raises(DataError, match="NaN/Inf"):
        open_data(_npz(tmp_path / "val.npz", x=x), FLOAT_X)


def test_inconsistent_sample_counts(tmp_path):
    m = make_model({"a": (TensorProto.FLOAT, ["N", 2]), "b": (TensorProto.FLOAT, ["N", 2])})
    p = _npz(tmp_path / "val.npz", a=np.zeros((3, 2), np.float32), b=np.zeros((4, 2), np.float32))
    with pytest.raises(DataError, match=r"different sample counts \(a: 3, b: 4\)"):
        open_data(p, m)


def test_corrupt_npz(tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip archive at all")
    with pytest.raises(DataError, match=r"garbage\.npz: not an \.npz archive"):
        open_data(garbage, FLOAT_X)
    good = _npz(tmp_path / "good.npz", x=_x(50))
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:300])
    with pytest.raises(DataError, match=r"truncated\.npz: unreadable"):
        open_data(truncated, FLOAT_X)


def test_npy_named_npz(tmp_path):
    p = tmp_path / "x.npz"
    with open(p, "wb") as f:
        np.save(f, _x(2))
    with pytest.raises(DataError, match="not an .npz archive"):
        open_data(p, FLOAT_X)


def test_pickled_objects_refused(tmp_path):
    p = tmp_path / "obj.npz"
    np.savez(p, x=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(DataError, match="pickled objects"):
        open_data(p, FLOAT_X)


def test_static_batch_one_clamps(tmp_path):
    m = make_model({"x": (TensorProto.FLOAT, [1, 4])})
    src = open_data(_npz(tmp_path / "val.npz", x=_x(3)), m)
    assert src.batch_limit == 1
    assert src.effective_batch_size(32) == 1
    assert [b["x"].shape for b in src.batches(32)] == [(1, 4)] * 3


# --------------------------------------------------------------------------------------------
# folder of .npz files
# --------------------------------------------------------------------------------------------
def _three_files(folder: Path) -> np.ndarray:
    folder.mkdir()
    parts = [_x(5, 0), _x(7, 5), _x(4, 12)]
    for i, part in enumerate(parts):
        _npz(folder / f"part{i}.npz", x=part)
    return np.concatenate(parts)


def test_npz_folder_streams_file_by_file(tmp_path, monkeypatch):
    full = _three_files(tmp_path / "calib")
    src = open_data(tmp_path / "calib", FLOAT_X)
    assert len(src) == 16 and src.description == "calib/ (3 .npz files): 16 samples"
    reads: list[str] = []
    real_read = data_mod.NpzSource._read

    def spy(self, f):
        reads.append(f.name)
        return real_read(self, f)

    monkeypatch.setattr(data_mod.NpzSource, "_read", spy)
    it = src.batches(3)
    first = next(it)
    assert reads == ["part0.npz"]  # only the first file is in memory for the first batch
    rest = list(it)
    assert reads == ["part0.npz", "part1.npz", "part2.npz"]
    batches = [first, *rest]
    assert all(b["x"].shape[0] <= 3 for b in batches)
    assert [b["x"].shape[0] for b in batches] == [3, 3, 3, 3, 3, 1]  # batches span file boundaries
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), full)


def test_npz_folder_max_samples_counts_remaining_files(tmp_path):
    _three_files(tmp_path / "calib")
    src = open_data(tmp_path / "calib", FLOAT_X, DataConfig(max_samples=6))
    assert len(src) == 6 and src.total_samples == 16
    assert src.files == [tmp_path / "calib" / "part0.npz", tmp_path / "calib" / "part1.npz"]
    assert np.concatenate([b["x"] for b in src.batches(4)]).shape == (6, 4)


def test_npz_folder_bad_second_file_is_named(tmp_path):
    folder = tmp_path / "calib"
    folder.mkdir()
    _npz(folder / "a.npz", x=_x(2))
    _npz(folder / "b.npz", y=_x(2))
    with pytest.raises(DataError, match=r"^b\.npz: missing input\(s\) 'x'"):
        open_data(folder, FLOAT_X)


def test_npz_folder_symbolic_dim_changes_between_files(tmp_path):
    m = make_model({"x": (TensorProto.FLOAT, ["N", "L"])})
    folder = tmp_path / "seq"
    folder.mkdir()
    _npz(folder / "a.npz", x=np.zeros((3, 5), np.float32))
    _npz(folder / "b.npz", x=np.ones((3, 6), np.float32))
    shapes = [b["x"].shape for b in open_data(folder, m).batches(4)]
    assert shapes == [(3, 5), (3, 6)]  # never concatenated across differing lengths


def test_empty_and_mixed_folders(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no .npz or image files"):
        open_data(empty, FLOAT_X)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    _npz(mixed / "a.npz", x=_x(1))
    (mixed / "b.png").write_bytes(b"")
    with pytest.raises(DataError, match="mixes .npz and image files"):
        open_data(mixed, FLOAT_X)


def test_from_arrays():
    src = from_arrays({"x": _x(5)}, FLOAT_X, description="mem")
    assert len(src) == 5 and src.description == "mem: 5 samples"
    with pytest.raises(DataError, match="missing input"):
        from_arrays({"y": _x(5)}, FLOAT_X)


# --------------------------------------------------------------------------------------------
# image folders
# --------------------------------------------------------------------------------------------
try:
    from PIL import Image
except ImportError:  # pragma: no cover - Pillow is in the dev extras
    Image = None
needs_pil = pytest.mark.skipif(Image is None, reason="Pillow not installed")
IMG_MODEL = make_model({"img": (TensorProto.FLOAT, ["N", 3, 4, 6])})


def _solid(path: Path, rgb, size=(6, 4)):  # size is (width, height)
    Image.new("RGB", size, tuple(rgb)).save(path)
    return path


def _image_folder(tmp_path: Path, colors=((10, 20, 30), (40, 50, 60), (70, 80, 90))) -> Path:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, c in enumerate(colors):  # names out of order on purpose; PNG is lossless
        _solid(folder / f"im{2 - i}.png", c)
    return folder


@needs_pil
def test_image_folder_mean_std_nchw(tmp_path):
    folder = _image_folder(tmp_path)
    spec = DataConfig(images=ImageSpec(mean=(10, 20, 30), std=(2, 4, 5)))
    src = open_data(folder, IMG_MODEL, spec)
    assert [f.name for f in src.files] == ["im0.png", "im1.png", "im2.png"]  # sorted by file name
    (batch,) = list(src.batches(8))
    x = batch["img"]
    assert x.shape == (3, 3, 4, 6) and x.dtype == np.float32
    # im0 is (70, 80, 90): ((70-10)/2, (80-20)/4, (90-30)/5) = (30, 15, 12)
    np.testing.assert_allclose(x[0, :, 0, 0], [30.0, 15.0, 12.0], rtol=0, atol=1e-6)
    # im2 is (10, 20, 30): all zero
    np.testing.assert_allclose(x[2], 0.0, atol=1e-6)


@needs_pil
def test_image_bgr_nhwc_scale_offset(tmp_path):
    folder = _image_folder(tmp_path)
    model = make_model({"img": (TensorProto.FLOAT, ["N", 4, 6, 3])})
    spec = DataConfig(images=ImageSpec(channel_order="BGR", layout="NHWC", scale=0.5, offset=-1.0))
    (batch,) = list(open_data(folder, model, spec).batches(8))
    # im0 (70, 80, 90) -> BGR (90, 80, 70) * 0.5 - 1
    np.testing.assert_allclose(batch["img"][0, 1, 2], [44.0, 39.0, 34.0], atol=1e-6)


@needs_pil
def test_image_grayscale_uses_first_mean(tmp_path):
    folder = tmp_path / "g"
    folder.mkdir()
    _solid(folder / "a.png", (100, 100, 100))
    model = make_model({"img": (TensorProto.FLOAT, ["N", 1, 4, 6])})
    spec = DataConfig(images=ImageSpec(grayscale=True, mean=(50, 0, 0), std=(10, 1, 1)))
    (batch,) = list(open_data(folder, model, spec).batches(1))
    np.testing.assert_allclose(batch["img"], 5.0, atol=1e-6)


@needs_pil
def test_image_resize_short_and_center_crop(tmp_path):
    img = Image.new("RGB", (40, 20))
    px = img.load()
    for x in range(40):
        for y in range(20):
            px[x, y] = (x * 6, y * 12, 0)
    img.save(tmp_path / "a.png")
    spec = ImageSpec(resize_short=10, center_crop=(10, 6), interpolation="nearest")
    x = preprocess_image(tmp_path / "a.png", spec)
    assert x.shape == (3, 10, 6)  # 40x20 -> 20x10 (short side 10), crop 10x6 from the centre
    # nearest resize by 2 then crop left = (20 - 6) / 2 = 7: red channel grows along x
    assert x[0, 0, 0] < x[0, 0, 5]


@needs_pil
def test_image_crop_larger_than_image(tmp_path):
    _solid(tmp_path / "a.png", (1, 2, 3), size=(6, 4))
    with pytest.raises(DataError, match="smaller than center_crop"):
        preprocess_image(tmp_path / "a.png", ImageSpec(center_crop=8))


@needs_pil
def test_image_folder_needs_spec(tmp_path):
    folder = _image_folder(tmp_path)
    with pytest.raises(DataError, match=r"imgs/: an image folder needs preprocessing settings: add data\.images"):
        open_data(folder, IMG_MODEL)


@needs_pil
def test_image_shape_mismatch(tmp_path):
    folder = _image_folder(tmp_path)
    model = make_model({"img": (TensorProto.FLOAT, ["N", 3, 224, 224])})
    with pytest.raises(DataError, match=r"im0\.png: preprocessed image has shape \[3, 4, 6\].*\[N, 3, 224, 224\]"):
        open_data(folder, model, DataConfig(images=ImageSpec()))


@needs_pil
def test_corrupt_image_is_named(tmp_path):
    folder = _image_folder(tmp_path)
    (folder / "im1.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match=r"^im1\.png: not a readable image"):
        open_data(folder, IMG_MODEL, DataConfig(images=ImageSpec()))


@needs_pil
def test_images_need_pillow(tmp_path, monkeypatch):
    folder = _image_folder(tmp_path)
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(DataError, match=r"image folders need Pillow: pip install onnxopt\[images\]"):
        open_data(folder, IMG_MODEL, DataConfig(images=ImageSpec()))


@needs_pil
def test_images_multi_input_model(tmp_path):
    folder = _image_folder(tmp_path)
    model = make_model({"img": (TensorProto.FLOAT, ["N", 3, 4, 6]), "scale": (TensorProto.FLOAT, ["N", 1])})
    with pytest.raises(DataError, match="model has 2 inputs"):
        open_data(folder, model, DataConfig(images=ImageSpec()))
    with pytest.raises(DataError, match="not a model input"):
        open_data(folder, model, DataConfig(images=ImageSpec(), input_name="nope"))


@needs_pil
def test_images_max_samples_and_uint8_input(tmp_path):
    folder = _image_folder(tmp_path)
    model = make_model({"img": (TensorProto.UINT8, ["N", 4, 6, 3])})
    src = open_data(folder, model, DataConfig(images=ImageSpec(layout="NHWC"), max_samples=2))
    assert len(src) == 2 and src.description == "imgs/ (3 images): 2 of 3 samples"
    (batch,) = list(src.batches(8))
    assert batch["img"].dtype == np.uint8 and batch["img"][1, 0, 0].tolist() == [40, 50, 60]


# --------------------------------------------------------------------------------------------
# labels
# --------------------------------------------------------------------------------------------
def test_labels_npy(tmp_path):
    src = open_data(_npz(tmp_path / "v.npz", x=_x(4)), FLOAT_X)
    np.save(tmp_path / "y.npy", np.array([3, 1, 0, 2], np.int32))
    y = load_labels(tmp_path / "y.npy", src)
    assert y.dtype == np.int64 and y.tolist() == [3, 1, 0, 2]


def test_labels_npy_follow_max_samples(tmp_path):
    src = open_data(_npz(tmp_path / "v.npz", x=_x(4)), FLOAT_X, DataConfig(max_samples=2))
    np.save(tmp_path / "y.npy", np.array([3, 1, 0, 2]))
    assert load_labels(tmp_path / "y.npy", src).tolist() == [3, 1]


def test_labels_npy_errors(tmp_path):
    src = open_data(_npz(tmp_path / "v.npz", x=_x(4)), FLOAT_X)
    np.save(tmp_path / "short.npy", np.array([1, 2, 3]))
    with pytest.raises(DataError, match=r"short\.npy: 3 labels but the data has 4 samples"):
        load_labels(tmp_path / "short.npy", src)
    np.save(tmp_path / "float.npy", np.zeros(4, np.float32))
    with pytest.raises(DataError, match="must be integers"):
        load_labels(tmp_path / "float.npy", src)
    np.save(tmp_path / "twod.npy", np.zeros((4, 1), np.int64))
    with pytest.raises(DataError, match=r"must be 1-D"):
        load_labels(tmp_path / "twod.npy", src)
    with pytest.raises(DataError, match="does not exist"):
        load_labels(tmp_path / "none.npy", src)
    (tmp_path / "y.csv").write_text("file,class_index\na.png,1\n")
    with pytest.raises(DataError, match="need an image folder"):
        load_labels(tmp_path / "y.csv", src)


@needs_pil
def test_labels_csv_matched_by_file_name(tmp_path):
    folder = _image_folder(tmp_path)
    src = open_data(folder, IMG_MODEL, DataConfig(images=ImageSpec()))
    csv = tmp_path / "labels.csv"
    csv.write_text("file,class_index\nim2.png,7\nim0.png,5\nother.png,1\nim1.png,6\n")
    assert load_labels(csv, src).tolist() == [5, 6, 7]
    headerless = tmp_path / "plain.csv"
    headerless.write_text("im0.png,5\nim1.png,6\nim2.png,7\n")
    assert load_labels(headerless, src).tolist() == [5, 6, 7]


@needs_pil
def test_labels_csv_missing_image_is_named(tmp_path):
    folder = _image_folder(tmp_path)
    src = open_data(folder, IMG_MODEL, DataConfig(images=ImageSpec()))
    csv = tmp_path / "labels.csv"
    csv.write_text("file,class_index\nim0.png,5\nim2.png,7\n")
    with pytest.raises(DataError, match=r"no label for image 'im1\.png'"):
        load_labels(csv, src)
    csv.write_text("file,class_index\nim0.png,five\n")
    with pytest.raises(DataError, match=r"line 2: class_index 'five' is not an integer"):
        load_labels(csv, src)
    csv.write_text("name;label\n")
    with pytest.raises(DataError, match="CSV header must be 'file,class_index'"):
        load_labels(csv, src)


# --------------------------------------------------------------------------------------------
# random data
# --------------------------------------------------------------------------------------------
def test_random_data_warns_and_is_deterministic():
    m = make_model({"x": (TensorProto.FLOAT, ["N", 3, "L"]), "ids": (TensorProto.INT64, ["N", 2])})
    with pytest.warns(UserWarning, match="random data"):
        src = random_data(m, 5, seed=3, batch_dims={"L": 7})
    assert len(src) == 5 and "random data" in src.description
    a = np.concatenate([b["x"] for b in src.batches(2)])
    b = np.concatenate([b["x"] for b in src.batches(5)])
    assert a.shape == (5, 3, 7) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)  # same samples whatever the batch size
    ids = np.concatenate([b["ids"] for b in src.batches(5)])
    assert ids.dtype == np.int64 and ids.min() >= 0 and ids.max() < 10
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = random_data(m, 5, seed=4, batch_dims={"L": 7})
    assert not np.array_equal(a, np.concatenate([b["x"] for b in other.batches(5)]))


def test_random_data_unknown_dim_noted():
    m = make_model({"x": (TensorProto.FLOAT, ["N", "L"])})
    with pytest.warns(UserWarning) as record:
        src = random_data(m, 2)
    assert any("dim 'L' has no size; used 1" in str(w.message) for w in record)
    assert next(src.batches(2))["x"].shape == (2, 1)
