"""The cleanup preset on EfficientNet-Lite0 (real weights, real images): the issue's acceptance test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxopt.graph import op_histogram
from onnxopt.model_io import from_proto
from onnxopt.pass_infra import PassManager
from onnxopt.recipe import load_recipe

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "models"
MODEL = SHARED / "imagenet" / "efficientnet_lite0.onnx"
IMAGES = SHARED / "imagenet" / "val"

pytestmark = [pytest.mark.real_model,
              pytest.mark.skipif(not MODEL.is_file(), reason="needs ../shared/models (EfficientNet-Lite0)")]


def preprocess(path: Path) -> np.ndarray:
    from PIL import Image

    img = Image.open(path).convert("RGB")
    scale = 256 / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BILINEAR)
    left, top = (img.width - 224) // 2, (img.height - 224) // 2
    img = img.crop((left, top, left + 224, top + 224))
    x = (np.asarray(img, dtype=np.float32) - 127.0) / 128.0
    return x.transpose(2, 0, 1)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    files = sorted(IMAGES.glob("*.JPEG"))[:16]
    assert len(files) == 16
    return np.stack([preprocess(f) for f in files])


@pytest.fixture(scope="module")
def original() -> onnx.ModelProto:
    return onnx.load(str(MODEL))


@pytest.fixture(scope="module")
def cleaned(original):
    return PassManager(load_recipe("cleanup").build_passes()).run(original)


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1  # steadier than a contended thread pool on a shared CI box
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def test_shape_and_padding_machinery_is_gone(original, cleaned):
    before, after = op_histogram(from_proto(original).graph), op_histogram(from_proto(cleaned.model).graph)
    assert before["Pad"] == 17 and before["Shape"] == 1
    for op in ("Pad", "Shape", "Slice", "ConstantOfShape", "Cast", "Gather", "Concat", "Unsqueeze", "Constant",
               "Transpose"):
        assert op not in after, op
    assert after == {"Add": 9, "Clip": 33, "Conv": 49, "Gemm": 1, "GlobalAveragePool": 1, "Reshape": 1}
    g = cleaned.model.graph
    reshape = next(n for n in g.node if n.op_type == "Reshape")
    shape = next(t for t in g.initializer if t.name == reshape.input[1])
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(shape), [0, -1])
    for value in (g.input[0], g.output[0]):
        assert value.type.tensor_type.shape.dim[0].dim_param == "N"
    assert [i.name for i in g.input] == ["input"] and [o.name for o in g.output] == ["logits"]


@pytest.mark.parametrize("batch", [1, 8])
def test_matches_the_original_on_real_images(original, cleaned, images, batch):
    ref, cand = session(original), session(cleaned.model)
    worst = 0.0
    for start in range(0, len(images), batch):
        x = images[start:start + batch]
        a, b = ref.run(None, {"input": x})[0], cand.run(None, {"input": x})[0]
        assert a.shape == b.shape == (len(x), 1000)
        worst = max(worst, float(np.abs(a - b).max()))
    assert worst <= 1e-4


def test_second_run_changes_nothing(cleaned):
    again = PassManager(load_recipe("cleanup").build_passes()).run(cleaned.model)
    assert not again.modified, [(r.name, r.details) for r in again.records if r.modified]
