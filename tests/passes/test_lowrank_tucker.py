import numpy as np
import pytest
from helpers import assert_idempotent, assert_same, attr, init, make_model, ops, ort_run, rand, run, vi
from onnx import helper, numpy_helper
from onnxopt.passes.lowrank_tucker import LowRankTucker, LowRankTuckerConfig, LowRankTuckerResult

from onnxopt.data import from_arrays
from onnxopt.errors import PassError, RecipeError
from onnxopt.pass_infra import PassContext
from onnxopt.recipe import parse_recipe
from onnxopt.registry import get_pass_class

node = helper.make_node
TOL = {"rtol": 1e-5, "atol": 1e-5}
GEOMETRY = ("strides", "pads", "dilations", "auto_pad")


def tucker_pass(calib=None, **cfg):
    cfg.setdefault("min_dim", 1)
    return LowRankTucker(LowRankTuckerConfig(**cfg), PassContext(calibration=calib))


def factorize(model, calib=None, **cfg):
    out = run(model, tucker_pass(calib, **cfg))
    return out.model, out.results[0]


def inits(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def conv_model(c_in=6, c_out=8, kernel=(3, 3), spatial=(9, 9), bias=True, seed=1, w=None, **attrs):
    w = rand(c_out, c_in, *kernel, seed=seed) if w is None else w
    inputs = ["x", "w"] + (["b"] if bias else [])
    weights = [init("w", w)] + ([init("b", rand(c_out, seed=seed + 1))] if bias else [])
    nd = len(kernel)
    return make_model([node("Conv", inputs, ["y"], name="conv", kernel_shape=list(kernel), **attrs)],
                      [vi("x", ["N", c_in, *spatial])], [vi("y", ["N", c_out] + [None] * nd)], weights)


def chain(model):
    """The factorized convs in order, with their weights."""
    values = inits(model)
    return [(n, values[n.input[1]]) for n in model.graph.node if n.op_type == "Conv"]


def correlated_images(n, c, spatial, latent=2, noise=0.02, seed=0):
    """Images whose channels mix ``latent`` smooth sources (correlated channels and pixels)."""
    rng = np.random.default_rng(seed)
    src = rng.standard_normal((n, latent, *spatial))
    src = (src + np.roll(src, 1, axis=-1) + np.roll(src, 1, axis=-2)) / 3 + 0.3
    x = np.einsum("nl...,lc->nc...", src, rng.standard_normal((latent, c)))
    return (x + noise * rng.standard_normal(x.shape)).astype(np.float32)


def reconstruct(model):
    """The kxk weight the three convs of a Tucker-2 chain compute together."""
    (_, a), (_, g), (_, u) = chain(model)
    a, u = a.reshape(a.shape[:2]).astype(np.float64), u.reshape(u.shape[:2]).astype(np.float64)
    return np.einsum("oi,ij...,jc->oc...", u, g.astype(np.float64), a)


# --------------------------------------------------------------------------------------------
# Structure and exactness at full rank
# --------------------------------------------------------------------------------------------
CASES = {
    "3x3-pad1": dict(pads=[1, 1, 1, 1]),
    "3x3-stride2-asym-pads": dict(strides=[2, 2], pads=[0, 1, 1, 0]),
    "3x3-dilation2": dict(dilations=[2, 2], pads=[2, 2, 2, 2]),
    "same-upper-stride2": dict(auto_pad="SAME_UPPER", strides=[2, 2]),
    "same-lower": dict(auto_pad="SAME_LOWER"),
    "valid": dict(auto_pad="VALID"),
}


@pytest.mark.parametrize("attrs", list(CASES.values()), ids=list(CASES))
@pytest.mark.parametrize("bias", [True, False])
def test_full_rank_tucker2_reproduces_the_original(attrs, bias):
    c_in, c_out = 6, 8
    model = conv_model(c_in, c_out, bias=bias, **attrs)
    out, res = factorize(model, ranks={"conv": (c_in, c_out)}, skip_unprofitable=False)
    assert ops(out) == {"Conv": 3}
    (first, a), (core, g), (last, u) = chain(out)
    assert a.shape == (c_in, c_in, 1, 1) and g.shape == (c_out, c_in, 3, 3) and u.shape == (c_out, c_out, 1, 1)
    assert first.input[0] == "x" and core.input[0] == first.output[0] and last.input[0] == core.output[0]
    assert last.output[0] == "y"
    # geometry on the core only; the 1x1 convs are plain; the bias rides on the last one
    original = model.graph.node[0]
    for name in GEOMETRY:
        assert attr(core, name) == attr(original, name), name
        assert attr(first, name) is None and attr(last, name) is None
    assert attr(core, "kernel_shape") == [3, 3] and attr(first, "kernel_shape") == [1, 1]
    assert attr(core, "group", 1) == 1
    assert len(first.input) == 2 and len(core.input) == 2 and len(last.input) == (3 if bias else 2)
    assert res.layers["conv"].form == "tucker2" and res.layers["conv"].rank == [c_in, c_out]
    assert res.layers["conv"].weight_error < 1e-6
    assert_same(model, out, dims={"N": 2}, **TOL)


def test_1d_and_non_square_kernels():
    for kernel, spatial, attrs in [((3,), (11,), {"pads": [1, 1]}), ((3, 1), (7, 5), {"strides": [1, 2]})]:
        model = conv_model(4, 5, kernel=kernel, spatial=spatial, **attrs)
        out, _ = factorize(model, rank=5, skip_unprofitable=False)
        (_, a), (core, g), (_, u) = chain(out)
        assert g.shape == (5, 4, *kernel) and a.shape == (4, 4, *[1] * len(kernel))
        assert attr(core, "kernel_shape") == list(kernel)
        assert_same(model, out, **TOL)


@pytest.mark.parametrize("attrs", [{}, {"strides": [2, 2], "pads": [1, 0, 0, 1]}, {"auto_pad": "SAME_UPPER",
                                                                                   "strides": [2, 2]}])
def test_pointwise_conv_becomes_two_1x1_convs(attrs):
    c_in, c_out = 12, 10
    model = conv_model(c_in, c_out, kernel=(1, 1), **attrs)
    out, res = factorize(model, rank=c_out, skip_unprofitable=False)
    assert ops(out) == {"Conv": 2}
    (first, u), (second, v) = chain(out)
    assert u.shape == (c_out, c_in, 1, 1) and v.shape == (c_out, c_out, 1, 1)
    for name in GEOMETRY:  # the first carries the stride/pads, the second the bias
        assert attr(first, name) == attr(model.graph.node[0], name)
        assert attr(second, name) is None
    assert len(second.input) == 3 and res.layers["conv"].form == "svd"
    assert_same(model, out, **TOL)


# --------------------------------------------------------------------------------------------
# Low rank errors
# --------------------------------------------------------------------------------------------
def test_pointwise_weight_error_is_eckart_young():
    c_in, c_out, r = 16, 12, 3
    model = conv_model(c_in, c_out, kernel=(1, 1))
    out, res = factorize(model, rank=r)
    w = rand(c_out, c_in, 1, 1, seed=1).reshape(c_out, c_in).astype(np.float64)
    s = np.linalg.svd(w, compute_uv=False)
    theory = np.sqrt(np.sum(s[r:] ** 2) / np.sum(s ** 2))
    (_, u), (_, v) = chain(out)
    w_r = v.reshape(c_out, r).astype(np.float64) @ u.reshape(r, c_in)
    assert np.linalg.norm(w - w_r) / np.linalg.norm(w) == pytest.approx(theory, rel=1e-5)
    assert res.layers["conv"].weight_error == pytest.approx(theory, rel=1e-9)
    assert res.layers["conv"].params_after == r * (c_in + c_out)


def test_tucker2_error_is_the_sequential_hosvd_truncation_error():
    c_in, c_out, r_in, r_out = 10, 12, 4, 5
    model = conv_model(c_in, c_out, pads=[1, 1, 1, 1])
    out, res = factorize(model, ranks={"conv": (r_in, r_out)})
    w = rand(c_out, c_in, 3, 3, seed=1).astype(np.float64)
    # input mode first: discarded s_in^2, then the output mode of the projected tensor: discarded s_out^2
    w1 = np.moveaxis(w, 1, 0).reshape(c_in, -1)
    p, s1, _ = np.linalg.svd(w1, full_matrices=False)
    proj = p[:, :r_in] @ p[:, :r_in].T @ w1
    w_hat0 = np.moveaxis(proj.reshape(c_in, c_out, 3, 3), 0, 1).reshape(c_out, -1)
    s2 = np.linalg.svd(w_hat0, compute_uv=False)
    theory = np.sqrt((np.sum(s1[r_in:] ** 2) + np.sum(s2[r_out:] ** 2)) / np.sum(w ** 2))
    layer = res.layers["conv"]
    assert layer.rank == [r_in, r_out] and layer.weight_error == pytest.approx(theory, rel=1e-6)
    w_r = reconstruct(out)
    assert np.linalg.norm(w - w_r) / np.linalg.norm(w) == pytest.approx(theory, rel=1e-5)
    # ORT runs exactly that weight
    ref = conv_model(c_in, c_out, w=w_r.astype(np.float32), pads=[1, 1, 1, 1])
    assert_same(ref, out, **TOL)
    assert layer.params_after == c_in * r_in + r_in * r_out * 9 + r_out * c_out


@pytest.mark.parametrize("kernel,attrs", [((3, 3), {"strides": [2, 2], "pads": [1, 1, 1, 1]}),
                                          ((3, 3), {"dilations": [2, 2], "pads": [2, 1, 1, 2]}),
                                          ((3, 3), {"auto_pad": "SAME_LOWER"}),
                                          ((1, 1), {"strides": [2, 2]})])
def test_data_aware_beats_weight_only_and_reports_the_true_output_error(kernel, attrs):
    c_in, c_out = 12, 16
    model = conv_model(c_in, c_out, kernel=kernel, spatial=(10, 10), bias=False, **attrs)
    x = correlated_images(24, c_in, (10, 10))
    calib = from_arrays({"x": x}, model)
    y = ort_run(model, {"x": x})[0].astype(np.float64)
    ranks = {"conv": (3, 8) if kernel != (1, 1) else 3}
    errors = {}
    for method in ("weight", "data-aware"):
        out, res = factorize(model, calib, ranks=ranks, method=method, batch_size=8)
        got = ort_run(out, {"x": x})[0].astype(np.float64)
        errors[method] = np.linalg.norm(got - y) / np.linalg.norm(y)
        layer = res.layers["conv"]
        assert res.calibration_samples == 24
        # the exact im2col Gram matrix gives the error ORT measures (strides, pads, dilations included)
        assert layer.output_error == pytest.approx(errors[method], rel=1e-3)
        if method == "data-aware":
            assert layer.weight_only_output_error == pytest.approx(errors["weight"], rel=1e-3)
            # the mean output change became a bias on the last conv (the original had none)
            assert layer.bias_corrected and len(chain(out)[-1][0].input) == 3
    assert errors["data-aware"] < 0.5 * errors["weight"]


# --------------------------------------------------------------------------------------------
# Selection and rank rules
# --------------------------------------------------------------------------------------------
def test_grouped_and_depthwise_convs_are_left_untouched():
    model = make_model([node("Conv", ["x", "w"], ["y"], name="dw", kernel_shape=[3, 3], group=8, pads=[1, 1, 1, 1])],
                       [vi("x", ["N", 8, 6, 6])], [vi("y", ["N", 8, 6, 6])], [init("w", rand(8, 1, 3, 3, seed=1))])
    before = model.SerializeToString(deterministic=True)
    out = run(model, tucker_pass(rank=2))
    assert out.records[0].modified is False and out.model.SerializeToString(deterministic=True) == before
    assert out.results[0].skipped == {"dw": "grouped conv (group=8)"}


def test_unprofitable_layers_are_left_untouched_and_said_so():
    model = conv_model(6, 8)
    before = model.SerializeToString(deterministic=True)
    out = run(model, tucker_pass(rank=8))  # [6, 8]: 36 + 432 + 64 parameters > 432
    assert out.records[0].modified is False and out.model.SerializeToString(deterministic=True) == before
    assert "save nothing" in out.results[0].skipped["conv"]


def test_rank_rules():
    w = rand(32, 24, 3, 3, seed=1)
    model = conv_model(24, 32, w=w, spatial=(6, 6))
    _, res = factorize(model, rank=8)
    assert res.layers["conv"].rank == [8, 8]
    _, res = factorize(model, ranks={"w": 5})
    assert res.layers["conv"].rank == [5, 5]
    _, res = factorize(model, param_ratio=0.3)
    layer = res.layers["conv"]
    assert layer.params_after == pytest.approx(0.3 * layer.params_before, rel=0.1)
    assert layer.rank[0] / 24 == pytest.approx(layer.rank[1] / 32, abs=0.05)
    # energy per mode: a kernel with two input and three output directions needs ranks [2, 3]
    rng = np.random.default_rng(0)
    low = np.einsum("oi,ij...,jc->oc...", rng.standard_normal((32, 3)), rng.standard_normal((3, 2, 3, 3)),
                    rng.standard_normal((2, 24))).astype(np.float32)
    _, res = factorize(conv_model(24, 32, w=low, spatial=(6, 6)), energy=0.999)
    assert res.layers["conv"].rank == [2, 3] and res.layers["conv"].weight_error < 1e-5


def test_rank_map_errors():
    model = conv_model(6, 8)
    with pytest.raises(PassError, match=r"ranks \[7, 4\] for layer 'conv' exceed its channels \[C_in=6, C_out=8\]"):
        run(model, tucker_pass(ranks={"conv": (7, 4)}))
    with pytest.raises(PassError, match=r"layer 'conv' takes one rank"):
        run(conv_model(6, 8, kernel=(1, 1)), tucker_pass(ranks={"conv": (2, 2)}))
    with pytest.raises(RecipeError, match=r"'ranks.conv': Value error, ranks must be at least 1 \(got 0\)"):
        parse_recipe({"passes": [{"type": "lowrank-tucker", "ranks": {"conv": 0}}]})
    with pytest.raises(RecipeError, match=r"'ranks.conv': Value error, ranks must be at least 1 \(got \[2, 0\]\)"):
        parse_recipe({"passes": [{"type": "lowrank-tucker", "ranks": {"conv": [2, 0]}}]})
    with pytest.raises(RecipeError, match=r"'energy': Input should be less than or equal to 1"):
        parse_recipe({"passes": [{"type": "lowrank-tucker", "energy": 1.01}]})


def test_idempotent_and_result_type():
    model = conv_model(16, 16, spatial=(6, 6))
    out = run(model, tucker_pass(rank=4))
    assert isinstance(out.results[0], LowRankTuckerResult)
    assert out.records[0].details["layers"]["conv"]["rank"] == [4, 4]
    assert_idempotent(out.model, lambda: tucker_pass(rank=4))
    assert get_pass_class("lowrank-tucker") is LowRankTucker
