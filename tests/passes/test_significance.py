"""significance: the sensitive layer scores highest; labels, semantic subsets, workers, score files."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from onnxopt.passes.significance import Significance, SignificanceConfig, critical_classes

from onnxopt.data import from_arrays
from onnxopt.errors import PassError
from onnxopt.mixed import SignificanceResult, fake_quantize, load_scores, weight_components
from onnxopt.pass_infra import PassContext, PassManager
from tests.passes.helpers import init, make_model, ort_run, vi

RNG = np.random.default_rng(0)


def three_layer_model():
    """Gemm -> Relu -> Gemm -> Relu -> Gemm. ``easy1``/``easy3`` hold values in {-1, 0, 1} x c, which
    int4 represents exactly; ``hard``'s columns each have one large outlier, so int4 rounds every
    other weight to zero."""
    w1 = RNG.integers(-1, 2, size=(8, 16)).astype(np.float32) * 0.5
    w2 = RNG.standard_normal((16, 16)).astype(np.float32) * 0.1
    w2[0, :] = 4.0
    w3 = RNG.integers(-1, 2, size=(16, 5)).astype(np.float32) * 0.25
    nodes = [
        helper.make_node("Gemm", ["x", "w1"], ["h1"], name="easy1"),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
        helper.make_node("Gemm", ["r1", "w2"], ["h2"], name="hard"),
        helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
        helper.make_node("Gemm", ["r2", "w3"], ["logits"], name="easy3"),
    ]
    model = make_model(nodes, [vi("x", ["N", 8])], [vi("logits", ["N", 5])],
                       [init("w1", w1), init("w2", w2), init("w3", w3)])
    x = RNG.standard_normal((40, 8)).astype(np.float32)
    return model, x


def with_static_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose input and output batch dim is a literal 1 (as YOLOX-Nano's export has it)."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for v in (fixed.graph.input[0], fixed.graph.output[0]):
        v.type.tensor_type.shape.dim[0].dim_value = 1
    return fixed


def run_significance(model, x, labels=None, **cfg):
    ctx = PassContext(calibration=from_arrays({"x": x}, model), calibration_labels=labels)
    return PassManager([Significance(SignificanceConfig(**cfg), ctx)]).run(model).results[-1]


def test_fake_quantize_matches_int4_grid():
    w = np.array([[1.0, -0.5, 0.26], [7.0, 3.1, -7.0]], np.float32)
    q = fake_quantize(w, 4, axis=0, clipping="max")
    scale = np.abs(w).max(axis=1, keepdims=True) / 7
    np.testing.assert_allclose(q, np.clip(np.rint(w / scale), -7, 7) * scale, rtol=0, atol=1e-7)
    only = fake_quantize(w, 2, axis=0, channels=(1, 2))  # ternary, second row only
    np.testing.assert_array_equal(only[0], w[0])
    np.testing.assert_allclose(only[1], [7.0, 0.0, -7.0], atol=1e-6)


def test_sensitive_layer_gets_top_score_without_labels():
    model, x = three_layer_model()
    res = run_significance(model, x, max_samples=32)
    assert isinstance(res, SignificanceResult) and res.metric == "kl" and res.samples == 32
    s = res.scores
    assert set(s) == {"easy1", "hard", "easy3"}
    assert max(s, key=s.get) == "hard"
    assert s["hard"] > 1e-3
    assert abs(s["easy1"]) < 1e-9 and abs(s["easy3"]) < 1e-9  # exactly representable at int4
    assert res.model is not None and not PassManager([]).run(model).modified


def test_static_batch_model_is_scored_one_sample_at_a_time():
    """An export with a literal batch dim of 1 (YOLOX-Nano's) used to fail: the scoring data was cut into
    batches of ``batch_size`` regardless. Scores equal the dynamic-batch model's."""
    model, x = three_layer_model()
    dynamic = run_significance(model, x, max_samples=12).scores
    static = run_significance(with_static_batch(model), x, max_samples=12).scores
    assert set(static) == {"easy1", "hard", "easy3"} and static["hard"] > 1e-3
    for k, v in dynamic.items():
        assert static[k] == pytest.approx(v, rel=1e-4, abs=1e-9)


def test_kl_score_matches_numpy():
    model, x = three_layer_model()
    res = run_significance(model, x, max_samples=40, metric="kl")
    w2q = fake_quantize(numpy_helper.to_array(model.graph.initializer[1]), 4, axis=1)
    ref = ort_run(model, {"x": x})[0].astype(np.float64)
    m2 = onnx.ModelProto()
    m2.CopyFrom(model)
    m2.graph.initializer[1].CopyFrom(numpy_helper.from_array(w2q, "w2"))
    out = ort_run(m2, {"x": x})[0].astype(np.float64)

    def ls(v):
        v = v - v.max(1, keepdims=True)
        return v - np.log(np.exp(v).sum(1, keepdims=True))

    kl = (np.exp(ls(ref)) * (ls(ref) - ls(out))).sum(1).mean()
    assert res.scores["hard"] == pytest.approx(kl, rel=1e-4, abs=1e-7)


def test_cross_entropy_with_labels_and_semantic_subset():
    model, x = three_layer_model()
    labels = ort_run(model, {"x": x})[0].argmax(1).astype(np.int64)
    res = run_significance(model, x, labels, metric="cross-entropy")
    assert res.metric == "cross-entropy" and max(res.scores, key=res.scores.get) == "hard"
    sem = run_significance(model, x, labels, semantic=True, critical_classes=[int(labels[0])])
    assert sem.critical_classes == [int(labels[0])]
    assert sem.samples == int((labels == labels[0]).sum())
    assert sem.details["critical_classes"] == [int(labels[0])]


def test_critical_classes_from_soft_confusion():
    logits = np.full((4, 4), -10.0)
    logits[0, [0, 1]] = [2.0, 1.9]  # class 0 looks like 1
    logits[1, [1, 0]] = [2.0, 1.5]
    logits[2, 2] = 5.0
    logits[3, [3, 2]] = [3.0, 0.0]
    classes, pairs = critical_classes(logits, np.array([0, 1, 2, 3]), pairs=1)
    assert classes == [0, 1] and pairs[0][:2] == (0, 1)


def test_channel_groups_and_workers_and_score_file(tmp_path):
    model, x = three_layer_model()
    serial = run_significance(model, x, max_samples=16, channel_groups=2)
    assert [c.name for c in weight_components(model, 2)][:2] == ["easy1#0", "easy1#1"]
    assert sum(c.params for c in weight_components(model, 2)) == 8 * 16 + 16 * 16 + 16 * 5
    out = tmp_path / "scores.json"
    parallel = run_significance(model, x, max_samples=16, channel_groups=2, workers=2, save_scores=str(out))
    assert parallel.scores == pytest.approx(serial.scores, rel=1e-6, abs=1e-12)
    assert load_scores(out).scores == pytest.approx(parallel.scores)
    # scores from a file (a user's metric) replace the computation; unlisted components score 0
    (tmp_path / "mine.json").write_text(json.dumps({"easy3": 5.0}))
    mine = run_significance(model, x, scores_file=str(tmp_path / "mine.json"))
    assert mine.scores == {"easy1": 0.0, "hard": 0.0, "easy3": 5.0}
    (tmp_path / "bad.json").write_text(json.dumps({"nosuch": 1.0}))
    with pytest.raises(PassError, match="no weighted node 'nosuch'"):
        run_significance(model, x, scores_file=str(tmp_path / "bad.json"))


def test_workers_read_an_external_data_model_from_one_file(tmp_path):
    """A model whose weights live in external data goes to the workers as one file with external data
    (memory-mapped there); the scores are those of the in-memory model scored in this process."""
    from onnxopt.model_io import has_external_data, load_model, save_model

    rng = np.random.default_rng(1)
    ws = [rng.standard_normal(s).astype(np.float32) * 0.2 for s in ((8, 64), (64, 64), (64, 5))]
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["h1"], name="fc1"),
             helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
             helper.make_node("Gemm", ["r1", "w2"], ["h2"], name="fc2"),
             helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
             helper.make_node("Gemm", ["r2", "w3"], ["logits"], name="fc3")]
    model = make_model(nodes, [vi("x", ["N", 8])], [vi("logits", ["N", 5])],
                       [init(f"w{i + 1}", w) for i, w in enumerate(ws)])
    x = rng.standard_normal((40, 8)).astype(np.float32)
    serial = run_significance(model, x, max_samples=16)
    assert set(serial.scores) == {"fc1", "fc2", "fc3"} and min(serial.scores.values()) > 0
    path = save_model(model, tmp_path / "m.onnx", external_data=True)
    lazy = load_model(path)
    assert has_external_data(lazy)
    parallel = run_significance(lazy, x, max_samples=16, workers=2)
    assert parallel.scores == pytest.approx(serial.scores, rel=1e-6, abs=1e-12)
    in_process = run_significance(lazy, x, max_samples=16)
    assert in_process.scores == pytest.approx(serial.scores, rel=1e-6, abs=1e-12)


def test_activation_components_need_calibration_and_score():
    from onnxopt.passes.calibrate import Calibrate, CalibrateConfig

    model, x = three_layer_model()
    ctx = PassContext(calibration=from_arrays({"x": x}, model))
    with pytest.raises(PassError, match="needs the calibrate pass"):
        PassManager([Significance(SignificanceConfig(activations=True), ctx)]).run(model)
    res = PassManager([Calibrate(CalibrateConfig(observer="minmax", cache=False), ctx),
                       Significance(SignificanceConfig(activations=True, activation_bits=2), ctx)]).run(model)
    acts = {e.tensor: e.score for e in res.results[-1].entries if e.kind == "activation"}
    assert set(acts) == {"h1", "h2"}  # the logits are a graph output: not rounded
    assert all(v > 0 for v in acts.values())


def test_labels_required_errors():
    model, x = three_layer_model()
    with pytest.raises(PassError, match="needs labels for the calibration data"):
        run_significance(model, x, semantic=True)
    with pytest.raises(PassError, match="needs validation data"):
        run_significance(model, x, data="validation")
