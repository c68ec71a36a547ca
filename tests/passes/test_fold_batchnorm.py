import numpy as np
import pytest
from helpers import assert_idempotent, assert_same, attr, init, make_model, ops, rand, run, vi
from onnx import helper, numpy_helper
from onnxopt.passes.fold_batchnorm import FoldBatchNorm

node = helper.make_node
TOL = {"rtol": 1e-5, "atol": 1e-5}


def bn_params(c, seed=10, prefix="bn"):
    rng = np.random.default_rng(seed)
    values = {"scale": rng.uniform(0.5, 2.0, c), "bias": rng.standard_normal(c),
              "mean": rng.standard_normal(c), "var": rng.uniform(0.1, 2.0, c)}
    return [init(f"{prefix}_{k}", v.astype(np.float32)) for k, v in values.items()]


def bn(x, y, prefix="bn", **attrs):
    return node("BatchNormalization", [x] + [f"{prefix}_{k}" for k in ("scale", "bias", "mean", "var")], [y],
                **attrs)


def fold(model):
    result = run(model, FoldBatchNorm())
    assert_idempotent(result.model, FoldBatchNorm)
    return result.model, result.records[0]


def inits(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("with_bias", [True, False])
def test_conv_bn(with_bias):
    conv_inputs = ["x", "w", "b"] if with_bias else ["x", "w"]
    weights = [init("w", rand(4, 3, 3, 3, seed=1))] + ([init("b", rand(4, seed=2))] if with_bias else [])
    model = make_model([node("Conv", conv_inputs, ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
                        bn("c", "y", epsilon=1e-3), node("Relu", ["y"], ["out"])],
                       [vi("x", ["N", 3, 6, 6])], [vi("out", ["N", 4, 6, 6])], weights + bn_params(4))
    out, rec = fold(model)
    assert rec.details == {"folded": 1} and ops(out) == {"Conv": 1, "Relu": 1}
    conv = out.graph.node[0]
    assert len(conv.input) == 3 and conv.output[0] in {"c", "y"}
    assert set(inits(out)) == {"w", conv.input[2]}  # BN parameters are gone
    for batch in (1, 4):
        assert_same(model, out, dims={"N": batch}, **TOL)


def test_bn_output_that_is_a_graph_output_keeps_its_name():
    model = make_model([node("Conv", ["x", "w"], ["c"], kernel_shape=[1, 1]), bn("c", "y")],
                       [vi("x", [2, 3, 4, 4])], [vi("y", [2, 4, 4, 4])],
                       [init("w", rand(4, 3, 1, 1, seed=1)), *bn_params(4)])
    out, _ = fold(model)
    assert ops(out) == {"Conv": 1}
    assert out.graph.node[0].output[0] == "y"
    assert_same(model, out, **TOL)


@pytest.mark.parametrize("group", [1, 2])
def test_conv_transpose_bn(group):
    c_in, c_out = 4, 6
    model = make_model([node("ConvTranspose", ["x", "w", "b"], ["c"], kernel_shape=[2, 2], strides=[2, 2],
                             group=group), bn("c", "y")],
                       [vi("x", [2, c_in, 3, 3])], [vi("y", [2, c_out, 6, 6])],
                       [init("w", rand(c_in, c_out // group, 2, 2, seed=3)), init("b", rand(c_out, seed=4)),
                        *bn_params(c_out)])
    out, _ = fold(model)
    assert ops(out) == {"ConvTranspose": 1}
    assert_same(model, out, **TOL)


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [None, (5,), (1, 5), (3, 1), ()])
def test_gemm_bn(trans_b, c_shape):
    b = rand(5, 7, seed=5) if trans_b else rand(7, 5, seed=5)
    inputs = ["a", "b"] + ([] if c_shape is None else ["cc"])
    extra = [] if c_shape is None else [init("cc", rand(*c_shape, seed=6))]
    model = make_model([node("Gemm", inputs, ["g"], alpha=0.7, beta=1.3, transB=trans_b), bn("g", "y")],
                       [vi("a", [3, 7])], [vi("y", [3, 5])], [init("b", b), *extra, *bn_params(5)])
    out, _ = fold(model)
    assert ops(out) == {"Gemm": 1}
    gemm = out.graph.node[0]
    assert attr(gemm, "beta") == 1.0 and attr(gemm, "alpha") == pytest.approx(0.7)
    assert len(gemm.input) == 3
    assert_same(model, out, **TOL)


def test_shared_weight_is_copied_not_modified():
    w = rand(4, 3, 1, 1, seed=1)
    model = make_model([node("Conv", ["x", "w"], ["c1"], kernel_shape=[1, 1]), bn("c1", "y1"),
                        node("Conv", ["x", "w"], ["y2"], kernel_shape=[1, 1])],
                       [vi("x", [1, 3, 2, 2])], [vi("y1", [1, 4, 2, 2]), vi("y2", [1, 4, 2, 2])],
                       [init("w", w), *bn_params(4)])
    out, _ = fold(model)
    assert ops(out) == {"Conv": 2}
    conv1, conv2 = out.graph.node
    assert conv2.input[1] == "w" and conv1.input[1] != "w"
    np.testing.assert_array_equal(inits(out)["w"], w)
    assert_same(model, out, **TOL)


def test_must_not_fold():
    params = bn_params(4)
    w = init("w", rand(4, 3, 1, 1, seed=1))
    cases = {
        # the Conv's output is read by something else too
        "second_consumer": ([node("Conv", ["x", "w"], ["c"], kernel_shape=[1, 1]), bn("c", "y"),
                             node("Relu", ["c"], ["r"])], [vi("y", [1, 4, 2, 2]), vi("r", [1, 4, 2, 2])], []),
        # the mean is an overridable graph input
        "params_not_constant": ([node("Conv", ["x", "w"], ["c"], kernel_shape=[1, 1]), bn("c", "y")],
                                [vi("y", [1, 4, 2, 2])], [vi("bn_mean", [4])]),
        "not_after_conv": ([node("Conv", ["x", "w"], ["c"], kernel_shape=[1, 1]), node("Relu", ["c"], ["r"]),
                            bn("r", "y")], [vi("y", [1, 4, 2, 2])], []),
        "conv_output_is_graph_output": ([node("Conv", ["x", "w"], ["c"], kernel_shape=[1, 1]), bn("c", "y")],
                                        [vi("y", [1, 4, 2, 2]), vi("c", [1, 4, 2, 2])], []),
    }
    for name, (nodes, outputs, more_inputs) in cases.items():
        model = make_model(nodes, [vi("x", [1, 3, 2, 2]), *more_inputs], outputs, [w, *params])
        out, rec = fold(model)
        assert not rec.modified and ops(out) == ops(model), name
        assert_same(model, out, exact=True)


def test_training_mode_bn_is_left_alone():
    training = node("BatchNormalization", ["c", "bn_scale", "bn_bias", "bn_mean", "bn_var"],
                    ["y", "running_mean", "running_var"], training_mode=1)
    model = make_model([node("Conv", ["x", "w"], ["c"], kernel_shape=[1, 1]), training],
                       [vi("x", [1, 3, 2, 2])], [vi("y", [1, 4, 2, 2])],
                       [init("w", rand(4, 3, 1, 1, seed=1)), *bn_params(4)])
    out, rec = fold(model)
    assert not rec.modified and ops(out) == {"BatchNormalization": 1, "Conv": 1}


def test_bn_chain_folds_in_one_run():
    model = make_model([node("Conv", ["x", "w"], ["c"], kernel_shape=[1, 1]), bn("c", "m"),
                        bn("m", "y", prefix="bn2")],
                       [vi("x", [1, 3, 2, 2])], [vi("y", [1, 4, 2, 2])],
                       [init("w", rand(4, 3, 1, 1, seed=1)), *bn_params(4), *bn_params(4, 11, "bn2")])
    out, rec = fold(model)
    assert rec.details == {"folded": 2} and ops(out) == {"Conv": 1}
    assert_same(model, out, **TOL)
