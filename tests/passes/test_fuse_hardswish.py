import numpy as np
import pytest
from helpers import assert_idempotent, assert_same, attr, init, make_model, ops, run, vi
from onnx import helper
from onnxopt.passes.fuse_hardswish import FuseHardSwish

node = helper.make_node
TOL = {"rtol": 1e-6, "atol": 1e-6}
SHAPE = ["N", 4, 5, 5]


def consts(opset):
    c = [init("three", np.float32(3)), init("six", np.float32(6)), init("sixth", np.float32(1 / 6))]
    return c + ([init("zero", np.float32(0))] if opset >= 11 else [])


def relu6(opset, a="a", r="r6"):
    clip = (node("Clip", [a, "zero", "six"], [r]) if opset >= 11 else node("Clip", [a], [r], min=0.0, max=6.0))
    return [node("Add", ["x", "three"], [a]), clip]


FORMS = {
    "div": lambda o: relu6(o) + [node("Mul", ["x", "r6"], ["m"]), node("Div", ["m", "six"], ["y"])],
    "mul-sixth": lambda o: relu6(o) + [node("Mul", ["r6", "x"], ["m"]), node("Mul", ["sixth", "m"], ["y"])],
    "gate-div": lambda o: relu6(o) + [node("Div", ["r6", "six"], ["g"]), node("Mul", ["x", "g"], ["y"])],
    "gate-mul": lambda o: relu6(o) + [node("Mul", ["r6", "sixth"], ["g"]), node("Mul", ["g", "x"], ["y"])],
}


def model_of(nodes, opset, outputs=None, inits=None):
    x = [node("Relu", ["x_in"], ["x"])]  # x is an activation, not the graph input
    return make_model(x + nodes, [vi("x_in", SHAPE)], outputs or [vi("y", SHAPE)],
                      consts(opset) if inits is None else inits, opset=opset)


def fuse(model):
    result = run(model, FuseHardSwish())
    assert_idempotent(result.model, FuseHardSwish)
    return result.model, result.records[0]


def check(model, out):
    feeds = {"x_in": (np.random.default_rng(0).standard_normal((3, 4, 5, 5)) * 4).astype(np.float32)}
    assert_same(model, out, feeds=feeds, **TOL)


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("opset", [17, 13, 9])
def test_forms_fuse(form, opset):
    model = model_of(FORMS[form](opset), opset)
    out, rec = fuse(model)
    assert rec.modified and rec.details["fused"] == 1
    if opset >= 14:
        assert ops(out) == {"Relu": 1, "HardSwish": 1}
    else:
        assert ops(out) == {"Relu": 1, "HardSigmoid": 1, "Mul": 1}
        gate = next(n for n in out.graph.node if n.op_type == "HardSigmoid")
        assert abs(attr(gate, "alpha") - 1 / 6) < 1e-7 and attr(gate, "beta") == 0.5
    assert out.graph.output[0].name == "y"
    assert {t.name for t in out.graph.initializer} <= {"three", "six", "sixth", "zero"}
    check(model, out)


def test_hardsigmoid_mul_becomes_hardswish_from_opset_14():
    nodes = [node("HardSigmoid", ["x"], ["g"], alpha=1 / 6, beta=0.5), node("Mul", ["x", "g"], ["y"])]
    out, rec = fuse(model_of(nodes, 14, inits=[]))
    assert ops(out) == {"Relu": 1, "HardSwish": 1}
    check(model_of(nodes, 14, inits=[]), out)
    out13, rec13 = fuse(model_of(nodes, 13, inits=[]))
    assert not rec13.modified  # already the fused form below opset 14


def test_squeeze_excitation_gate_is_not_hardswish():
    # x * HardSigmoid(z) with alpha 0.2 (paddle's SE gate) is not a hard-swish
    nodes = [node("HardSigmoid", ["x"], ["g"], alpha=0.2, beta=0.5), node("Mul", ["x", "g"], ["y"])]
    out, rec = fuse(model_of(nodes, 17, inits=[]))
    assert not rec.modified


@pytest.mark.parametrize("change", ["other-x", "clip-5", "add-2", "div-5"])
def test_near_misses_stay(change):
    nodes = FORMS["div"](17)
    inputs = [vi("x_in", SHAPE), vi("z", SHAPE)]
    if change == "other-x":
        nodes[2] = node("Mul", ["z", "r6"], ["m"])
    extra = {"clip-5": ("six", 5.0), "add-2": ("three", 2.0), "div-5": ("six", 5.0)}
    inits = consts(17)
    if change in extra:
        name, value = extra[change]
        idx = {"clip-5": 1, "add-2": 0, "div-5": 3}[change]
        nodes[idx].input[list(nodes[idx].input).index(name)] = "alt"
        inits.append(init("alt", np.float32(value)))
    model = make_model([node("Relu", ["x_in"], ["x"])] + nodes, inputs, [vi("y", SHAPE)], inits, opset=17)
    out, rec = fuse(model)
    assert not rec.modified


def test_intermediate_read_elsewhere_stays():
    model = model_of(FORMS["div"](17), 17, outputs=[vi("y", SHAPE), vi("r6", SHAPE)])
    out, rec = fuse(model)
    assert not rec.modified and "Clip" in ops(out)


def test_chain_of_two_fuses_both():
    first = FORMS["div"](17)
    second = [node("Add", ["y", "three"], ["a2"]), node("Clip", ["a2", "zero", "six"], ["c2"]),
              node("Mul", ["y", "c2"], ["m2"]), node("Div", ["m2", "six"], ["y2"])]
    model = model_of(first + second, 17, outputs=[vi("y2", SHAPE)])
    out, rec = fuse(model)
    assert rec.details["fused"] == 2 and ops(out) == {"Relu": 1, "HardSwish": 2}
    check(model, out)
