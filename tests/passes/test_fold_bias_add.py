import numpy as np
import pytest
from helpers import assert_idempotent, assert_same, init, make_model, ops, rand, run, vi
from onnx import helper, numpy_helper
from onnxopt.passes.fold_bias_add import FoldBiasAdd

node = helper.make_node
TOL = {"rtol": 1e-5, "atol": 1e-5}


def fold(model):
    result = run(model, FoldBiasAdd())
    assert_idempotent(result.model, FoldBiasAdd)
    return result.model, result.records[0]


def conv_add(shift, *, with_bias=True, swap=False, extra=(), outputs=None):
    conv_in = ["x", "w", "b"] if with_bias else ["x", "w"]
    inits = [init("w", rand(4, 3, 3, 3, seed=1)), init("shift", shift)] + ([init("b", rand(4, seed=2))] if with_bias else [])
    add_in = ["shift", "c"] if swap else ["c", "shift"]
    return make_model([node("Conv", conv_in, ["c"], kernel_shape=[3, 3]), node("Add", add_in, ["y"]), *extra],
                      [vi("x", ["N", 3, 7, 7])], outputs or [vi("y", ["N", 4, 5, 5])], inits)


@pytest.mark.parametrize("shape", [(1, 4, 1, 1), (4, 1, 1), (1,), ()])
@pytest.mark.parametrize("with_bias", [True, False])
def test_per_channel_and_scalar_constants_become_the_bias(shape, with_bias):
    shift = rand(*shape, seed=3) if shape else np.float32(0.7)
    model = conv_add(np.asarray(shift, np.float32), with_bias=with_bias, swap=shape == (4, 1, 1))
    out, rec = fold(model)
    assert rec.modified and rec.details == {"folded": 1}
    assert ops(out) == {"Conv": 1}
    conv = out.graph.node[0]
    assert conv.output[0] == "y" and len(conv.input) == 3
    bias = numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == conv.input[2]))
    expected = (rand(4, seed=2) if with_bias else 0) + np.broadcast_to(np.asarray(shift).reshape(-1), (4,))
    np.testing.assert_allclose(bias, expected, rtol=1e-6, atol=1e-7)
    assert "shift" not in {t.name for t in out.graph.initializer}
    for batch in (1, 3):
        assert_same(model, out, dims={"N": batch}, **TOL)


@pytest.mark.parametrize("shape", [(1, 4, 5, 5), (1, 1, 5, 1), (2, 1, 1, 1, 1), (5, 1)])
def test_constants_varying_along_other_axes_stay(shape):
    model = conv_add(rand(*shape, seed=3), outputs=[vi("y", None)])
    out, rec = fold(model)
    assert not rec.modified and ops(out) == {"Conv": 1, "Add": 1}


def test_layer_with_a_second_reader_or_graph_output_stays():
    model = conv_add(rand(1, 4, 1, 1, seed=3), extra=[node("Relu", ["c"], ["r"])],
                     outputs=[vi("y", ["N", 4, 5, 5]), vi("r", ["N", 4, 5, 5])])
    out, rec = fold(model)
    assert not rec.modified and ops(out) == {"Conv": 1, "Add": 1, "Relu": 1}


def test_shared_bias_is_copied_not_changed():
    inits = [init("w", rand(4, 3, 1, 1, seed=1)), init("b", rand(4, seed=2)), init("shift", rand(1, 4, 1, 1, seed=3))]
    model = make_model([node("Conv", ["x", "w", "b"], ["c"]), node("Add", ["c", "shift"], ["y"]),
                        node("Conv", ["x", "w", "b"], ["z"])],
                       [vi("x", ["N", 3, 4, 4])], [vi("y", ["N", 4, 4, 4]), vi("z", ["N", 4, 4, 4])], inits)
    out, rec = fold(model)
    assert rec.details == {"folded": 1} and ops(out) == {"Conv": 2}
    first, second = out.graph.node
    assert second.input[2] == "b" and first.input[2] != "b"
    np.testing.assert_array_equal(numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == "b")),
                                  rand(4, seed=2))
    assert_same(model, out, **TOL)


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [None, (5,), (1, 5)])
def test_gemm(trans_b, c_shape):
    w = rand(5, 6, seed=1) if trans_b else rand(6, 5, seed=1)
    inits = [init("w", w), init("shift", rand(5, seed=3))] + ([init("cb", rand(*c_shape, seed=2))] if c_shape else [])
    gemm_in = ["x", "w"] + (["cb"] if c_shape else [])
    model = make_model([node("Gemm", gemm_in, ["g"], transB=trans_b, beta=0.5), node("Add", ["g", "shift"], ["y"])],
                       [vi("x", [3, 6])], [vi("y", [3, 5])], inits)
    out, rec = fold(model)
    assert rec.details == {"folded": 1} and ops(out) == {"Gemm": 1}
    assert_same(model, out, **TOL)


def test_gemm_with_a_full_matrix_c_stays():
    inits = [init("w", rand(6, 5, seed=1)), init("cb", rand(3, 5, seed=2)), init("shift", rand(5, seed=3))]
    model = make_model([node("Gemm", ["x", "w", "cb"], ["g"]), node("Add", ["g", "shift"], ["y"])],
                       [vi("x", [3, 6])], [vi("y", [3, 5])], inits)
    out, rec = fold(model)
    assert not rec.modified


def test_add_of_two_activations_stays():
    inits = [init("w", rand(4, 3, 1, 1, seed=1))]
    model = make_model([node("Conv", ["x", "w"], ["c"]), node("Add", ["c", "x2"], ["y"])],
                       [vi("x", ["N", 3, 4, 4]), vi("x2", ["N", 4, 4, 4])], [vi("y", ["N", 4, 4, 4])], inits)
    out, rec = fold(model)
    assert not rec.modified
