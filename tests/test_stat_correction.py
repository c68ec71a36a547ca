import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.data import from_arrays
from onnxopt.model_io import from_proto, to_proto
from onnxopt.stat_correction import (
    channel_moments,
    correct_channel_statistics,
    correctable_convs,
    prefix_model,
)

F = TensorProto.FLOAT
node = helper.make_node


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def cnn(bias2=False, seed=0):
    """x[B,4,6,6] -> Conv 3x3 (bias) -> Clip(0,6) -> Conv 1x1 (bias or not) -> GAP -> Flatten -> Gemm -> z."""
    nodes = [node("Conv", ["x", "w1", "b1"], ["h1"], name="conv1", pads=[1, 1, 1, 1]),
             node("Clip", ["h1", "lo", "hi"], ["r1"], name="relu6"),
             node("Conv", ["r1", "w2"] + (["b2"] if bias2 else []), ["h2"], name="conv2"),
             node("GlobalAveragePool", ["h2"], ["p"], name="gap"),
             node("Flatten", ["p"], ["f"], name="flat"),
             node("Gemm", ["f", "w3", "b3"], ["z"], name="fc", transB=1)]
    inits = [numpy_helper.from_array(a, n) for n, a in [
        ("w1", rand(6, 4, 3, 3, seed=seed)), ("b1", rand(6, seed=seed + 1)), ("lo", np.float32(0)),
        ("hi", np.float32(6)), ("w2", rand(5, 6, 1, 1, seed=seed + 2)), ("w3", rand(3, 5, seed=seed + 3)),
        ("b3", rand(3, seed=seed + 4))]]
    if bias2:
        inits.append(numpy_helper.from_array(rand(5, seed=seed + 5), "b2"))
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", F, ["B", 4, 6, 6])],
                              [helper.make_tensor_value_info("z", F, ["B", 3])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def damaged(model, shrink=0.6):
    """Half of each conv's weights zeroed (smallest |w|) and the rest shrunk: means and variances drift."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.name in ("w1", "w2"):
            w = numpy_helper.to_array(t).copy()
            w[np.abs(w) < np.median(np.abs(w))] = 0
            t.CopyFrom(numpy_helper.from_array((shrink * w).astype(np.float32), t.name))
    return out


def weights(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def data(model, n=48, seed=7):
    return from_arrays({"x": rand(n, 4, 6, 6, seed=seed) + 0.5}, model)


def test_prefix_model_computes_only_the_ancestors_and_the_same_values():
    model = cnn()
    pre = to_proto(prefix_model(model, ["r1"]))
    assert [n.name for n in pre.graph.node] == ["conv1", "relu6"]
    assert {t.name for t in pre.graph.initializer} == {"w1", "b1", "lo", "hi"}
    x = rand(2, 4, 6, 6, seed=3)
    full = onnx.ModelProto()
    full.CopyFrom(model)
    full.graph.output.append(onnx.ValueInfoProto(name="r1"))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    want = ort.InferenceSession(full.SerializeToString(), so).run(["r1"], {"x": x})[0]
    got = ort.InferenceSession(pre.SerializeToString(), so).run(["r1"], {"x": x})[0]
    np.testing.assert_array_equal(got, want)


def test_moments_match_numpy():
    model = cnn()
    src = data(model, n=20)
    [(mean, var)] = channel_moments(model, ["h1"], src, batch_size=6, max_samples=None, what="t")
    pre = to_proto(prefix_model(model, ["h1"]))
    h = ort.InferenceSession(pre.SerializeToString()).run(["h1"], {"x": src.arrays["x"]})[0].astype(np.float64)
    np.testing.assert_allclose(mean, h.mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, h.var(axis=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    # max_samples cuts inside a batch
    [(m8, _)] = channel_moments(model, ["h1"], src, batch_size=6, max_samples=8, what="t")
    np.testing.assert_allclose(m8, h[:8].mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bias2", [True, False])
def test_corrected_channels_match_the_reference_statistics(bias2):
    ref = cnn(bias2=bias2)
    model = from_proto(damaged(ref))
    src = data(ref)
    before = channel_moments(model, ["h1", "h2"], src, batch_size=16, max_samples=None, what="t")
    want = channel_moments(ref, ["h1", "h2"], src, batch_size=16, max_samples=None, what="t")
    report = correct_channel_statistics(model, ref, src, bounds=(1e-3, 1e3), max_samples=None)
    assert set(report) == {"conv1", "conv2"}  # the Gemm is not a conv: left alone
    assert report["conv1"].mean_drift > 0.05 and report["conv1"].clipped == 0
    onnx.checker.check_model(to_proto(model), full_check=True)
    got = channel_moments(model, ["h1", "h2"], src, batch_size=16, max_samples=None, what="t")
    for (m, v), (m0, v0), (mb, vb) in zip(got, want, before, strict=True):
        sd = np.sqrt(v0)
        assert np.max(np.abs(mb - m0) / sd) > 0.1 and np.max(np.abs(np.sqrt(vb) / sd - 1)) > 0.1  # damage visible
        np.testing.assert_allclose(m / sd, m0 / sd, atol=1e-4)
        np.testing.assert_allclose(np.sqrt(v), sd, rtol=1e-4)
    w0, w = weights(damaged(ref)), weights(to_proto(model))
    for name in ("w1", "w2"):
        assert np.array_equal(w[name] == 0, w0[name] == 0)  # zeros (masks) stay zeros
    np.testing.assert_array_equal(w["w3"], w0["w3"])
    np.testing.assert_array_equal(w["b3"], w0["b3"])
    conv2 = next(n for n in to_proto(model).graph.node if n.name == "conv2")
    assert len(conv2.input) == 3 and conv2.input[2] in w  # a bias was added where there was none
    if not bias2:
        assert conv2.input[2] not in weights(ref)


def test_the_reference_itself_is_left_as_it_is():
    ref = cnn(bias2=True)
    model = from_proto(ref)
    report = correct_channel_statistics(model, ref, data(ref), max_samples=None)
    assert all(r.mean_drift < 1e-6 and r.scale_drift < 1e-6 for r in report.values())
    for name, w in weights(to_proto(model)).items():
        np.testing.assert_allclose(w, weights(ref)[name], rtol=1e-5, atol=1e-6)


def test_scales_are_bounded():
    ref = cnn()
    model = from_proto(damaged(ref, shrink=0.1))  # every channel's spread falls ~10x: the scale hits the upper bound
    report = correct_channel_statistics(model, ref, data(ref), bounds=(0.5, 2.0), max_samples=None)
    assert report["conv1"].scale_max == pytest.approx(2.0) and report["conv1"].clipped > 0
    assert all(0.5 - 1e-9 <= r.scale_min and r.scale_max <= 2.0 + 1e-9 for r in report.values())


def test_shared_weights_and_other_graphs_are_not_corrected():
    ref = cnn()
    model = onnx.ModelProto()
    model.CopyFrom(ref)
    model.graph.node.append(node("Conv", ["x", "w1"], ["extra"], name="conv_shared", pads=[1, 1, 1, 1]))
    model.graph.output.append(onnx.ValueInfoProto(name="extra"))
    assert [n.name for n in correctable_convs(model, ref)] == ["conv2"]  # w1 now has two readers
    other = cnn()
    other.graph.node[0].output[0] = "renamed"
    other.graph.node[1].input[0] = "renamed"
    assert [n.name for n in correctable_convs(ref, other)] == ["conv2"]  # h1 is not a conv output there


def test_external_weights_are_rescaled_one_at_a_time(tmp_path, monkeypatch):
    """Weights and biases in an external data file: each conv's are mapped when it is corrected, replaced and
    let go; the numbers are the in-memory model's."""
    import onnx_ir as ir

    from onnxopt.model_io import load_model

    ref = cnn(bias2=True)
    ir.save(from_proto(damaged(ref)), tmp_path / "m.onnx", external_data="m.data", size_threshold_bytes=0)
    mapped, peak, loads = set(), [0], []
    real_load, real_release = ir.ExternalTensor._load, ir.ExternalTensor.release

    def load(self):
        loads.append(self.name)
        mapped.add(self.name)
        peak[0] = max(peak[0], len(mapped))
        return real_load(self)

    def release(self):
        mapped.discard(self.name)
        return real_release(self)

    lazy = load_model(tmp_path / "m.onnx")
    assert isinstance(lazy.graph.initializers["w1"].const_value, ir.ExternalTensor)
    monkeypatch.setattr(ir.ExternalTensor, "_load", load)
    monkeypatch.setattr(ir.ExternalTensor, "release", release)
    report = correct_channel_statistics(lazy, ref, data(ref), max_samples=None)
    assert set(report) == {"conv1", "conv2"}
    # each conv's weight and bias: mapped for the prefix model ORT runs, then to be rescaled; never all at once
    assert not mapped and peak[0] <= 2 and all(loads.count(n) <= 2 for n in ("w1", "b1", "w2", "b2"))
    monkeypatch.undo()
    model = from_proto(damaged(ref))
    correct_channel_statistics(model, ref, data(ref), max_samples=None)
    got, want = weights(to_proto(ir.external_data.load_to_model(lazy))), weights(to_proto(model))
    assert got.keys() == want.keys()
    for name, w in want.items():
        np.testing.assert_array_equal(got[name], w)
