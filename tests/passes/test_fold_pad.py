import numpy as np
import pytest
from helpers import assert_idempotent, assert_same, attr, init, make_model, ops, rand, run, vi
from onnx import helper
from onnxopt.passes.fold_pad import FoldPadIntoConv

node = helper.make_node
W = init("w", rand(4, 3, 3, 3, seed=1))
B = init("b", rand(4, seed=2))


def conv_model(pad_node, extra_inits=(), *, opset=17, conv_attrs=None, extra_nodes=(), outputs=None):
    conv_attrs = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]} if conv_attrs is None else conv_attrs
    conv = node("Conv", ["padded", "w", "b"], ["y"], **conv_attrs)
    return make_model([pad_node, conv, *extra_nodes], [vi("x", ["N", 3, 9, 10])],
                      outputs or [vi("y", ["N", 4, "H", "W"])], [W, B, *extra_inits], opset=opset)


def fold(model):
    result = run(model, FoldPadIntoConv())
    assert_idempotent(result.model, FoldPadIntoConv)
    return result.model, result.records[0]


def conv_of(model):
    return next(n for n in model.graph.node if n.op_type == "Conv")


def check_folded(model, pads, *, auto_pad=None):
    out, rec = fold(model)
    assert rec.modified and rec.details == {"folded": 1}
    assert ops(out) == {"Conv": 1}
    conv = conv_of(out)
    assert conv.input[0] == "x"
    assert attr(conv, "pads") == pads
    assert attr(conv, "auto_pad", b"NOTSET") == (auto_pad or b"NOTSET")
    assert {t.name for t in out.graph.initializer} == {"w", "b"}  # the pads constants went with the Pad
    for batch in (1, 3):
        assert_same(model, out, dims={"N": batch}, rtol=1e-5, atol=1e-5)
    return out


def test_input_form_adds_begin_and_end_pads_per_axis():
    pads = init("pads", np.array([0, 0, 1, 2, 0, 0, 3, 4], np.int64))
    model = conv_model(node("Pad", ["x", "pads"], ["padded"]), [pads])
    check_folded(model, [2, 3, 4, 5])


def test_explicit_zero_value_and_empty_optional_input():
    pads = init("pads", np.array([0, 0, 0, 1, 0, 0, 2, 0], np.int64))
    zero = init("zero", np.array(0.0, np.float32))
    check_folded(conv_model(node("Pad", ["x", "pads", "zero"], ["padded"]), [pads, zero]), [1, 2, 3, 1])
    check_folded(conv_model(node("Pad", ["x", "pads", ""], ["padded"]), [pads]), [1, 2, 3, 1])


@pytest.mark.parametrize("axes", [[2, 3], [-1, -2], [3]])
def test_opset18_axes_input(axes):
    per_axis = {2: (1, 2), 3: (3, 0)}
    norm = [a % 4 for a in axes]
    pads = init("pads", np.array([per_axis[a][0] for a in norm] + [per_axis[a][1] for a in norm], np.int64))
    model = conv_model(node("Pad", ["x", "pads", "", "axes"], ["padded"]),
                       [pads, init("axes", np.array(axes, np.int64))], opset=18)
    h_begin, h_end = per_axis[2] if 2 in norm else (0, 0)
    w_begin, w_end = per_axis[3]
    check_folded(model, [1 + h_begin, 1 + w_begin, 1 + h_end, 1 + w_end])


def test_attribute_form_before_opset_11():
    model = conv_model(node("Pad", ["x"], ["padded"], pads=[0, 0, 2, 1, 0, 0, 0, 3], value=0.0), opset=10)
    check_folded(model, [3, 2, 1, 4])


def test_valid_conv_takes_the_pads_and_becomes_notset():
    pads = init("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))
    model = conv_model(node("Pad", ["x", "pads"], ["padded"]), [pads],
                       conv_attrs={"kernel_shape": [3, 3], "auto_pad": "VALID"})
    check_folded(model, [1, 1, 1, 1])


def test_pad_chain_folds_in_one_run():
    p1 = init("p1", np.array([0, 0, 1, 0, 0, 0, 0, 1], np.int64))
    p2 = init("p2", np.array([0, 0, 0, 2, 0, 0, 2, 0], np.int64))
    model = make_model([node("Pad", ["x", "p1"], ["mid"]), node("Pad", ["mid", "p2"], ["padded"]),
                        node("Conv", ["padded", "w", "b"], ["y"], kernel_shape=[3, 3])],
                       [vi("x", ["N", 3, 9, 10])], [vi("y", ["N", 4, "H", "W"])], [W, B, p1, p2])
    out, rec = fold(model)
    assert rec.details == {"folded": 2} and ops(out) == {"Conv": 1}
    assert attr(conv_of(out), "pads") == [1, 2, 2, 1]
    assert_same(model, out, rtol=1e-5, atol=1e-5)


def not_folded(model):
    out, rec = fold(model)
    assert not rec.modified and ops(out) == ops(model)
    assert_same(model, out, exact=True)


@pytest.mark.parametrize("case", ["nonzero_value", "reflect", "channel_pad", "negative", "same_upper",
                                  "pads_is_graph_input_initializer"])
def test_pads_that_must_not_fold(case):
    pads = np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)
    inputs, extra, attrs = ["x", "pads"], [], {}
    conv_attrs = {"kernel_shape": [3, 3]}
    if case == "nonzero_value":
        inputs.append("v")
        extra.append(init("v", np.array(0.5, np.float32)))
    elif case == "reflect":
        attrs["mode"] = "reflect"
    elif case == "channel_pad":
        pads = np.array([0, 1, 1, 1, 0, 0, 1, 1], np.int64)
    elif case == "negative":
        pads = np.array([0, 0, -1, 1, 0, 0, 1, 1], np.int64)
    elif case == "same_upper":
        conv_attrs = {"kernel_shape": [3, 3], "auto_pad": "SAME_UPPER"}
    model = conv_model(node("Pad", inputs, ["padded"], **attrs), [init("pads", pads), *extra],
                       conv_attrs=conv_attrs)
    if case == "channel_pad":
        model.graph.initializer[0].CopyFrom(init("w", rand(4, 4, 3, 3, seed=1)))
    if case == "pads_is_graph_input_initializer":
        model.graph.input.append(vi("pads", [8], helper.np_dtype_to_tensor_dtype(pads.dtype)))
    not_folded(model)


def test_pad_with_a_second_consumer_or_as_graph_output_stays():
    pads = init("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))
    shared = conv_model(node("Pad", ["x", "pads"], ["padded"]), [pads],
                        extra_nodes=[node("Relu", ["padded"], ["r"])], outputs=[vi("y", ["N", 4, "H", "W"]), vi("r", ["N", 3, "H2", "W2"])])
    not_folded(shared)
    exposed = conv_model(node("Pad", ["x", "pads"], ["padded"]), [pads],
                         outputs=[vi("y", ["N", 4, "H", "W"]), vi("padded", ["N", 3, "H2", "W2"])])
    not_folded(exposed)
