from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import attr, init, make_model, ort_run, rand, run, vi
from onnx import helper, numpy_helper
from onnxopt.passes.prune_channels import PruneChannels, PruneChannelsConfig

from onnxopt.data import from_arrays
from onnxopt.pass_infra import PassContext

node = helper.make_node
TOL = {"rtol": 1e-5, "atol": 1e-5}
LITE0 = Path(__file__).resolve().parents[2].parent / "shared" / "models" / "imagenet" / "efficientnet_lite0.onnx"


def prune(model, context=None, **config):
    config.setdefault("bias_correction", False)  # pure removal unless a test asks for the correction
    result = run(model, PruneChannels(PruneChannelsConfig(**config), context))
    return result.model, result.results[0]


def inits(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def by_name(model, name):
    return next(n for n in model.graph.node if n.name == name)


def weight_shape(model, node_name, pos=1):
    return tuple(inits(model)[by_name(model, node_name).input[pos]].shape)


def zeroed(model, columns: dict[str, np.ndarray], axis: dict[str, int] | None = None):
    """A copy of ``model`` whose named nodes' weights are zero on the given input positions (the reference:
    removing a channel is the same as its consumers ignoring it)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    values = inits(out)
    for name, drop in columns.items():
        n = by_name(out, name)
        w = values[n.input[1]].copy()
        ax = (axis or {}).get(name, 1)
        index = [slice(None)] * w.ndim
        index[ax] = drop
        w[tuple(index)] = 0
        t = next(t for t in out.graph.initializer if t.name == n.input[1])
        t.CopyFrom(numpy_helper.from_array(w, t.name))
    return out


def removed(result, source, size):
    return np.setdiff1d(np.arange(size), result.kept[source])


def assert_close(a, b, feeds):
    for r, g in zip(ort_run(a, feeds), ort_run(b, feeds), strict=True):
        assert r.shape == g.shape
        np.testing.assert_allclose(g, r, **TOL)


def x_feed(shape, seed=5):
    return {"x": rand(*shape, seed=seed)}


def bn_inits(c, prefix="bn"):
    rng = np.random.default_rng(3)
    return [init(f"{prefix}_scale", rng.uniform(0.5, 2, c).astype(np.float32)),
            init(f"{prefix}_bias", rng.standard_normal(c).astype(np.float32)),
            init(f"{prefix}_mean", rng.standard_normal(c).astype(np.float32)),
            init(f"{prefix}_var", rng.uniform(0.5, 2, c).astype(np.float32))]


def conv_bn_relu_conv():
    nodes = [node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             node("BatchNormalization", ["c1", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["n1"], name="bn"),
             node("Relu", ["n1"], ["r1"], name="relu"),
             node("Conv", ["r1", "w2", "b2"], ["y"], name="conv2", kernel_shape=[3, 3], pads=[1, 1, 1, 1])]
    return make_model(nodes, [vi("x", ["N", 3, 8, 8])], [vi("y", ["N", 8, 8, 8])],
                      [init("w1", rand(32, 3, 3, 3, seed=1)), init("b1", rand(32, seed=2)), *bn_inits(32),
                       init("w2", rand(8, 32, 3, 3, seed=4)), init("b2", rand(8, seed=6))])


def test_conv_bn_relu_conv_shapes_and_numbers():
    model = conv_bn_relu_conv()
    out, result = prune(model, ratio=0.25, round_to=8, downstream=False)
    assert weight_shape(out, "conv1") == (24, 3, 3, 3)
    assert weight_shape(out, "conv1", 2) == (24,)
    assert all(inits(out)[x].shape == (24,) for x in by_name(out, "bn").input[1:])
    assert weight_shape(out, "conv2") == (8, 24, 3, 3)
    assert result.params_after < result.params_before
    assert result.layers["conv2"]["params_after"] < result.layers["conv2"]["params_before"]
    assert result.layers["conv2"]["bytes_after"] == 4 * (8 * 24 * 9 + 8)
    assert result.details["bytes_after"] < result.details["bytes_before"]
    gone = removed(result, "conv1", 32)
    assert len(gone) == 8
    # l2 criterion: the weakest output channels go
    norms = np.linalg.norm(rand(32, 3, 3, 3, seed=1).reshape(32, -1), axis=1)
    assert set(gone) == set(np.argsort(norms)[:8])
    assert_close(zeroed(model, {"conv2": gone}), out, x_feed((2, 3, 8, 8)))
    assert model.graph.node[0].name == "conv1" and inits(model)["w1"].shape == (32, 3, 3, 3)  # input untouched


def test_rounding_and_min_channels():
    model = conv_bn_relu_conv()
    out, result = prune(model, ratio=0.1, round_to=8)  # 32 - 3 = 29 kept -> rounded up to 32: nothing to do
    assert not result.modified and "nothing to remove" in result.skipped["conv1"]
    out, result = prune(model, ratio=0.9, round_to=4, min_channels=8)
    assert weight_shape(out, "conv1")[0] == 8


def test_l1_criterion_and_per_layer_ratio():
    model = conv_bn_relu_conv()
    out, result = prune(model, criterion="l1", ratios={"conv1": 0.5}, round_to=1, min_channels=1, downstream=False)
    norms = np.abs(rand(32, 3, 3, 3, seed=1).reshape(32, -1)).sum(axis=1)
    assert set(removed(result, "conv1", 32)) == set(np.argsort(norms)[:16])
    assert weight_shape(out, "conv2") == (8, 16, 3, 3)


def test_downstream_weighting_keeps_channels_the_consumer_amplifies():
    model = conv_bn_relu_conv()
    values = inits(model)
    big = np.argsort(np.linalg.norm(values["w1"].reshape(32, -1), axis=1))[:4]  # weakest producers...
    w2 = values["w2"].copy()
    w2[:, big] *= 100  # ...that the consumer amplifies
    model.graph.initializer[[t.name for t in model.graph.initializer].index("w2")].CopyFrom(init("w2", w2))
    _, plain = prune(model, ratio=0.25, round_to=8, downstream=False)
    _, weighted = prune(model, ratio=0.25, round_to=8)
    assert set(big) <= set(removed(plain, "conv1", 32))
    assert not set(big) & set(removed(weighted, "conv1", 32))


def test_depthwise_chain_follows_its_producer():
    nodes = [node("Conv", ["x", "w1", "b1"], ["c1"], name="expand", kernel_shape=[1, 1]),
             node("Clip", ["c1", "lo", "hi"], ["a1"], name="relu6"),
             node("Conv", ["a1", "wd", "bd"], ["d1"], name="dw", kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=16),
             node("Mul", ["d1", "scale"], ["m1"], name="scale"),
             node("Relu", ["m1"], ["r1"]),
             node("Conv", ["r1", "w2"], ["y"], name="project", kernel_shape=[1, 1])]
    model = make_model(nodes, [vi("x", ["N", 4, 6, 6])], [vi("y", ["N", 4, 6, 6])],
                       [init("w1", rand(16, 4, 1, 1, seed=1)), init("b1", rand(16, seed=2)),
                        init("lo", np.array(0, np.float32)), init("hi", np.array(6, np.float32)),
                        init("wd", rand(16, 1, 3, 3, seed=3)), init("bd", rand(16, seed=4)),
                        init("scale", rand(1, 16, 1, 1, seed=7)), init("w2", rand(4, 16, 1, 1, seed=8))])
    out, result = prune(model, ratio=0.5, round_to=4)
    assert weight_shape(out, "expand") == (8, 4, 1, 1)
    assert weight_shape(out, "dw") == (8, 1, 3, 3) and weight_shape(out, "dw", 2) == (8,)
    assert attr(by_name(out, "dw"), "group") == 8
    assert inits(out)[by_name(out, "scale").input[1]].shape == (1, 8, 1, 1)
    assert weight_shape(out, "project") == (4, 8, 1, 1)
    assert_close(zeroed(model, {"project": removed(result, "expand", 16)}), out, x_feed((2, 4, 6, 6)))


def residual(tied="prune"):
    nodes = [node("Conv", ["x", "wa", "ba"], ["a"], name="conv_a", kernel_shape=[1, 1]),
             node("Conv", ["x", "wb", "bb"], ["b"], name="conv_b", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             node("Add", ["a", "b"], ["s"], name="add"),
             node("Relu", ["s"], ["r"]),
             node("Conv", ["r", "wc"], ["y"], name="conv_c", kernel_shape=[1, 1])]
    return make_model(nodes, [vi("x", ["N", 4, 5, 5])], [vi("y", ["N", 3, 5, 5])],
                      [init("wa", rand(16, 4, 1, 1, seed=1)), init("ba", rand(16, seed=2)),
                       init("wb", rand(16, 4, 3, 3, seed=3)), init("bb", rand(16, seed=4)),
                       init("wc", rand(3, 16, 1, 1, seed=5))])


def test_residual_add_ties_channels():
    model = residual()
    out, result = prune(model, ratio=0.5, round_to=4, downstream=False)
    assert result.kept["conv_a"] == result.kept["conv_b"] and len(result.kept["conv_a"]) == 8
    assert result.groups[0]["tied"] and sorted(result.groups[0]["sources"]) == ["conv_a", "conv_b"]
    assert weight_shape(out, "conv_a")[0] == weight_shape(out, "conv_b")[0] == 8
    assert weight_shape(out, "conv_c") == (3, 8, 1, 1)
    # the summed score: normalised l2 norms of both producers
    na = np.linalg.norm(rand(16, 4, 1, 1, seed=1).reshape(16, -1), axis=1)
    nb = np.linalg.norm(rand(16, 4, 3, 3, seed=3).reshape(16, -1), axis=1)
    score = na / na.mean() + nb / nb.mean()
    assert set(removed(result, "conv_a", 16)) == set(np.argsort(score)[:8])
    assert_close(zeroed(model, {"conv_c": removed(result, "conv_a", 16)}), out, x_feed((2, 4, 5, 5)))


def test_residual_left_alone_when_asked():
    out, result = prune(residual(), ratio=0.5, round_to=4, tied="skip")
    assert not result.modified
    assert "tied" in result.skipped["conv_a, conv_b"]


def test_residual_with_graph_input_is_untouchable():
    nodes = [node("Conv", ["x", "wa"], ["a"], name="conv_a", kernel_shape=[1, 1]),
             node("Add", ["a", "x"], ["s"], name="add"),
             node("Conv", ["s", "wc"], ["y"], name="conv_c", kernel_shape=[1, 1])]
    model = make_model(nodes, [vi("x", ["N", 16, 5, 5])], [vi("y", ["N", 3, 5, 5])],
                       [init("wa", rand(16, 16, 1, 1, seed=1)), init("wc", rand(3, 16, 1, 1, seed=5))])
    out, result = prune(model, ratio=0.5, round_to=4)
    assert weight_shape(out, "conv_a") == (16, 16, 1, 1)
    assert "run-time value" in result.skipped["conv_a"]


def test_concat_keeps_each_part_and_maps_offsets():
    nodes = [node("Conv", ["x", "wa", "ba"], ["a"], name="conv_a", kernel_shape=[1, 1]),
             node("Conv", ["x", "wb", "bb"], ["b"], name="conv_b", kernel_shape=[1, 1]),
             node("Concat", ["a", "b"], ["cat"], name="cat", axis=1),
             node("MaxPool", ["cat"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             node("Conv", ["p", "wc", "bc"], ["y"], name="conv_c", kernel_shape=[3, 3])]
    model = make_model(nodes, [vi("x", ["N", 4, 6, 6])], [vi("y", ["N", 5, 1, 1])],
                       [init("wa", rand(16, 4, 1, 1, seed=1)), init("ba", rand(16, seed=2)),
                        init("wb", rand(24, 4, 1, 1, seed=3)), init("bb", rand(24, seed=4)),
                        init("wc", rand(5, 40, 3, 3, seed=5)), init("bc", rand(5, seed=6))])
    out, result = prune(model, ratio=0.5, round_to=4)
    assert weight_shape(out, "conv_a")[0] == 8 and weight_shape(out, "conv_b")[0] == 12
    assert weight_shape(out, "conv_c") == (5, 20, 3, 3)
    gone = np.concatenate([removed(result, "conv_a", 16), 16 + removed(result, "conv_b", 24)])
    assert_close(zeroed(model, {"conv_c": gone}), out, x_feed((2, 4, 6, 6)))


@pytest.mark.parametrize("flatten", ["Flatten", "Reshape"])
def test_flatten_into_gemm_drops_feature_blocks(flatten):
    extra = [init("shape", np.array([0, 64], np.int64))] if flatten == "Reshape" else []
    flat = (node("Flatten", ["p"], ["f"], name="flat", axis=1) if flatten == "Flatten"
            else node("Reshape", ["p", "shape"], ["f"], name="flat"))
    nodes = [node("Conv", ["x", "w1", "b1"], ["c"], name="conv", kernel_shape=[3, 3]),
             node("Relu", ["c"], ["r"]),
             node("AveragePool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             flat,
             node("Gemm", ["f", "wg", "bg"], ["y"], name="fc", transB=1, alpha=0.5)]
    model = make_model(nodes, [vi("x", ["N", 2, 6, 6])], [vi("y", ["N", 10])],
                       [init("w1", rand(16, 2, 3, 3, seed=1)), init("b1", rand(16, seed=2)),
                        init("wg", rand(10, 64, seed=3)), init("bg", rand(10, seed=4)), *extra])
    out, result = prune(model, ratio=0.5, round_to=4)
    assert weight_shape(out, "conv")[0] == 8
    assert weight_shape(out, "fc") == (10, 32)  # 8 channels x 2x2 features
    if flatten == "Reshape":
        assert inits(out)[by_name(out, "flat").input[1]].tolist() == [0, 32]
    gone = removed(result, "conv", 16)
    features = (gone[:, None] * 4 + np.arange(4)).ravel()
    assert_close(zeroed(model, {"fc": features}), out, x_feed((3, 2, 6, 6)))


def test_data_free_bias_correction_equals_zeroed_source_weights():
    # without data a removed channel is taken as its value with its weights zeroed (bias through Relu and
    # the pooling); here that is exact, so the pruned model equals the one whose weights were zeroed
    nodes = [node("Conv", ["x", "w1", "b1"], ["c"], name="conv", kernel_shape=[3, 3]),
             node("Clip", ["c", "lo", "hi"], ["r"]),
             node("GlobalAveragePool", ["r"], ["p"]),
             node("Flatten", ["p"], ["f"], axis=1),
             node("Gemm", ["f", "wg", "bg"], ["y"], name="fc", transB=1)]
    model = make_model(nodes, [vi("x", ["N", 2, 6, 6])], [vi("y", ["N", 10])],
                       [init("w1", rand(16, 2, 3, 3, seed=1)), init("b1", rand(16, seed=2) * 4),
                        init("lo", np.array(0, np.float32)), init("hi", np.array(6, np.float32)),
                        init("wg", rand(10, 16, seed=3)), init("bg", rand(10, seed=4))])
    out, result = prune(model, ratio=0.5, round_to=4, bias_correction=True)
    assert weight_shape(out, "fc") == (10, 8)
    gone = removed(result, "conv", 16)
    assert_close(zeroed(model, {"conv": gone}, {"conv": 0}), out, x_feed((3, 2, 6, 6)))
    plain, _ = prune(model, ratio=0.5, round_to=4)
    feeds = x_feed((3, 2, 6, 6))
    assert not np.allclose(ort_run(plain, feeds)[0], ort_run(out, feeds)[0], atol=1e-3)


def test_gemm_chain_and_matmul():
    nodes = [node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1"),
             node("Sigmoid", ["h"], ["s"]),
             node("Add", ["s", "shift"], ["t"]),
             node("MatMul", ["t", "w2"], ["y"], name="fc2")]
    model = make_model(nodes, [vi("x", ["N", 6])], [vi("y", ["N", 5])],
                       [init("w1", rand(6, 32, seed=1)), init("b1", rand(32, seed=2)),
                        init("shift", rand(32, seed=3)), init("w2", rand(32, 5, seed=4))])
    out, result = prune(model, ratio=0.25, round_to=8)
    assert weight_shape(out, "fc1") == (6, 24) and weight_shape(out, "fc2") == (24, 5)
    assert_close(zeroed(model, {"fc2": removed(result, "fc1", 32)}, {"fc2": 0}), out, {"x": rand(4, 6, seed=9)})


@pytest.mark.parametrize("blocker, reason", [("Transpose", "Transpose"), ("output", "graph output"),
                                             ("Softmax", "Softmax")])
def test_untraceable_uses_make_the_group_untouchable(blocker, reason):
    nodes = [node("Conv", ["x", "w1"], ["c"], name="conv", kernel_shape=[1, 1]),
             node("Conv", ["c", "w2"], ["y"], name="conv2", kernel_shape=[1, 1])]
    outputs = [vi("y", ["N", 4, 3, 3])]
    if blocker == "output":
        outputs.append(vi("c", ["N", 16, 3, 3]))
    else:
        nodes.append(node(blocker, ["c"], ["z"], **({"perm": [0, 2, 3, 1]} if blocker == "Transpose" else {})))
        outputs.append(vi("z", ["N", 3, 3, 16] if blocker == "Transpose" else ["N", 16, 3, 3]))
    model = make_model(nodes, [vi("x", ["N", 4, 3, 3])], outputs,
                       [init("w1", rand(16, 4, 1, 1, seed=1)), init("w2", rand(4, 16, 1, 1, seed=2))])
    out, result = prune(model, ratio=0.5, round_to=4)
    assert weight_shape(out, "conv") == (16, 4, 1, 1)
    assert reason in result.skipped["conv"]


@pytest.mark.parametrize("inputs", ["pruned", "original"])
def test_refit_reduces_the_output_error(inputs):
    # correlated channels: what a removed channel carried is mostly recoverable from the kept ones
    rng = np.random.default_rng(0)
    mix = rng.standard_normal((32, 6)).astype(np.float32)
    nodes = [node("Conv", ["x", "w1", "b1"], ["c"], name="conv1", kernel_shape=[1, 1]),
             node("Conv", ["c", "w2", "b2"], ["y"], name="conv2", kernel_shape=[1, 1])]
    model = make_model(nodes, [vi("x", ["N", 6, 4, 4])], [vi("y", ["N", 8, 4, 4])],
                       [init("w1", mix.reshape(32, 6, 1, 1)), init("b1", rand(32, seed=2) + 3),
                        init("w2", rand(8, 32, 1, 1, seed=3)), init("b2", rand(8, seed=4))],
                       value_info=[vi("c", ["N", 32, 4, 4])])  # stale after pruning: must not reach ORT
    calib = from_arrays({"x": rand(64, 6, 4, 4, seed=11)}, model)
    test = {"x": rand(16, 6, 4, 4, seed=12)}
    ref = ort_run(model, test)[0]
    errors = {}
    for name, kw in [("slice", {"bias_correction": False, "refit": False}), ("bias", {"refit": False, "bias_correction": True}),
                     ("refit", {"refit": True, "refit_inputs": inputs, "bias_correction": True})]:
        out, result = prune(model, PassContext(calibration=calib), ratio=0.5, round_to=4, criterion="l2", **kw)
        assert weight_shape(out, "conv2") == (8, 16, 1, 1)
        errors[name] = float(np.linalg.norm(ort_run(out, test)[0] - ref) / np.linalg.norm(ref))
    assert errors["refit"] < 0.05 < errors["bias"] < errors["slice"]
    assert result.refits["conv2"]["refit_output_error"] < result.refits["conv2"]["sliced_output_error"]
    assert result.details["refit"] is True


def test_output_criterion_needs_calibration():
    from onnxopt.errors import PassError

    with pytest.raises(PassError, match="needs calibration data"):
        prune(conv_bn_relu_conv(), criterion="output")


def test_preset_parses():
    from onnxopt.recipe import load_recipe

    recipe = load_recipe("prune-channels")
    assert any(p.type == "prune-channels" and p.ratio == 0.25 for p in recipe.passes)


@pytest.mark.real_model
def test_lite0_shrinks_and_runs():
    if not LITE0.exists():
        pytest.skip("../shared/models absent")
    from onnxopt.pass_infra import PassManager
    from onnxopt.recipe import load_recipe

    model = onnx.load(str(LITE0))
    recipe = load_recipe("prune-channels")
    result = PassManager(recipe.build_passes(PassContext())).run(model)
    out = result.model
    pruned = result.results[[r.name for r in result.records].index("prune-channels")]
    assert pruned.params_after < 0.75 * pruned.params_before
    assert pruned.details["pruned_groups"] >= 20
    x = rand(1, 3, 224, 224, seed=1)
    assert ort_run(out, {"input": x})[0].shape == (1, 1000)


def test_duplicate_node_names_stay_apart():
    nodes = [node("Conv", ["x", "w1"], ["c1"], name="dup", kernel_shape=[1, 1]),
             node("Relu", ["c1"], ["r1"]),
             node("Conv", ["r1", "w2"], ["c2"], name="dup", kernel_shape=[1, 1]),
             node("Relu", ["c2"], ["r2"]),
             node("Conv", ["r2", "w3"], ["y"], name="last", kernel_shape=[1, 1])]
    model = make_model(nodes, [vi("x", ["N", 4, 3, 3])], [vi("y", ["N", 2, 3, 3])],
                       [init("w1", rand(16, 4, 1, 1, seed=1)), init("w2", rand(16, 16, 1, 1, seed=2)),
                        init("w3", rand(2, 16, 1, 1, seed=3))])
    out, result = prune(model, ratio=0.5, round_to=4)
    assert sorted(result.kept) == ["dup", "dup(c2)"]
    values = inits(out)
    assert [values[n.input[1]].shape for n in out.graph.node if n.op_type == "Conv"] == \
        [(8, 4, 1, 1), (8, 8, 1, 1), (2, 8, 1, 1)]  # ORT refuses duplicate names; the checker ran


def test_statistics_correction_restores_the_kept_channels_statistics():
    """expand -> relu6 -> depthwise -> project with half the channels removed: the kept channels of every conv
    get the original model's mean and variance back on the calibration data (the removed ones have none)."""
    from onnxopt.stat_correction import channel_moments

    nodes = [node("Conv", ["x", "w1", "b1"], ["c1"], name="expand", kernel_shape=[1, 1]),
             node("Clip", ["c1", "lo", "hi"], ["a1"], name="relu6"),
             node("Conv", ["a1", "wd", "bd"], ["d1"], name="dw", kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=16),
             node("Conv", ["d1", "w2"], ["y"], name="project", kernel_shape=[1, 1])]
    model = make_model(nodes, [vi("x", ["N", 4, 6, 6])], [vi("y", ["N", 4, 6, 6])],
                       [init("w1", rand(16, 4, 1, 1, seed=1)), init("b1", rand(16, seed=2)),
                        init("lo", np.array(0, np.float32)), init("hi", np.array(6, np.float32)),
                        init("wd", rand(16, 1, 3, 3, seed=3)), init("bd", rand(16, seed=4)),
                        init("w2", rand(4, 16, 1, 1, seed=8))])
    calib = from_arrays({"x": rand(24, 4, 6, 6, seed=9)}, model)
    ctx = PassContext(calibration=calib)
    plain, _ = prune(model, ctx, ratio=0.5, round_to=4, criterion="l2", refit=False)
    out, result = prune(model, ctx, ratio=0.5, round_to=4, criterion="l2", refit=False, statistics_correction=True)
    assert set(result.details["statistics_correction"]["layers"]) == {"expand", "dw", "project"}
    assert weight_shape(out, "dw") == (8, 1, 3, 3)  # still pruned
    kept = np.array(result.kept["expand"])
    moments = lambda m: channel_moments(m, ["c1", "d1", "y"], calib, batch_size=8, max_samples=None, what="t")  # noqa: E731
    ref, before, after = moments(model), moments(plain), moments(out)
    for i, idx in enumerate([kept, kept, np.arange(4)]):
        m0, sd = ref[i][0][idx], np.sqrt(ref[i][1][idx])
        np.testing.assert_allclose(after[i][0] / sd, m0 / sd, atol=1e-4)
        assert np.mean(np.abs(np.log(np.sqrt(after[i][1]) / sd))) <= np.mean(
            np.abs(np.log(np.sqrt(before[i][1]) / sd))) + 1e-6
    np.testing.assert_allclose(np.sqrt(after[0][1]), np.sqrt(ref[0][1][kept]), rtol=1e-4)  # expand: exact


@pytest.mark.parametrize("with_data", [False, True])
def test_external_weights_are_read_one_at_a_time(tmp_path, monkeypatch, with_data):
    """The channel analysis reads shapes only; each weight is mapped when it is scored or rewritten and let go;
    the result is the in-memory model's."""
    import onnx_ir as ir

    from onnxopt.model_io import from_proto, load_model, save_model, to_proto
    from onnxopt.pass_infra import PassManager

    model = conv_bn_relu_conv()
    save_model(from_proto(model), tmp_path / "m.onnx", external_data=True)
    mapped, peak = set(), [0]
    real_load, real_release = ir.ExternalTensor._load, ir.ExternalTensor.release

    def load(self):
        mapped.add(self.name)
        peak[0] = max(peak[0], len(mapped))
        return real_load(self)

    def release(self):
        mapped.discard(self.name)
        return real_release(self)

    context = PassContext(calibration=from_arrays({"x": rand(16, 3, 8, 8, seed=9)}, model)) if with_data else None
    config = {"ratio": 0.5, "round_to": 4, "statistics_correction": with_data, "bias_correction": True}
    if with_data:
        config |= {"refit_inputs": "pruned"}
    monkeypatch.setattr(ir.ExternalTensor, "_load", load)
    monkeypatch.setattr(ir.ExternalTensor, "release", release)
    lazy = load_model(tmp_path / "m.onnx")
    assert sum(isinstance(v.const_value, ir.ExternalTensor) for v in lazy.graph.initializers.values()) == 2
    out = PassManager([PruneChannels(PruneChannelsConfig(**config), context)]).run(lazy).model
    assert peak[0] == 1 and not mapped
    monkeypatch.undo()
    want, _ = prune(model, context, **config)
    got = to_proto(ir.external_data.load_to_model(out))
    assert [(n.op_type, list(n.input)) for n in got.graph.node] == [(n.op_type, list(n.input)) for n in want.graph.node]
    assert inits(got).keys() == inits(want).keys()
    for k, v in inits(want).items():
        np.testing.assert_array_equal(inits(got)[k], v)
