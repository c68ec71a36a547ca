import json

import numpy as np
import pytest
from helpers import assert_idempotent, assert_same, attr, init, make_model, ops, ort_run, rand, run, vi
from onnx import helper, numpy_helper
from onnxopt.passes.lowrank_svd import LowRankSVD, LowRankSVDConfig, LowRankSVDResult

from onnxopt.data import from_arrays
from onnxopt.errors import PassError, PreconditionError, RecipeError
from onnxopt.lowrank import ALLOC_FLOOR
from onnxopt.pass_infra import PassContext, PassManager
from onnxopt.recipe import parse_recipe
from onnxopt.registry import get_pass_class

node = helper.make_node
TOL = {"rtol": 1e-5, "atol": 1e-5}


def svd_pass(calib=None, **cfg):
    cfg.setdefault("min_dim", 1)
    return LowRankSVD(LowRankSVDConfig(**cfg), PassContext(calibration=calib))


def factorize(model, calib=None, **cfg):
    out = run(model, svd_pass(calib, **cfg))
    return out.model, out.results[0]


def inits(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def matmul_model(k=24, n=16, shape=("B", "L"), seed=1, name="mm", w=None):
    w = rand(k, n, seed=seed) if w is None else w
    return make_model([node("MatMul", ["x", "w"], ["y"], name=name)], [vi("x", [*shape, k])], [vi("y", [*shape, n])],
                      [init("w", w)])


def decaying(k, n, seed=1):
    """Weights whose singular values decay like a trained layer's (0.85^i)."""
    rng = np.random.default_rng(seed)
    p, _ = np.linalg.qr(rng.standard_normal((k, k)))
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    r = min(k, n)
    return ((p[:, :r] * 0.85 ** np.arange(r)) @ q[:, :r].T).astype(np.float32)


def factors(model, node_name="mm"):
    """(U, V) initializers of the factorized node ``node_name``."""
    values = inits(model)
    by_name = {n.name: n for n in model.graph.node}
    first, second = by_name[f"{node_name}/lowrank_svd/0"], by_name[f"{node_name}/lowrank_svd/1"]
    return values[first.input[1]], values[second.input[1]]


def correlated(n, k, latent=3, noise=0.05, seed=0):
    """Rows that live near a ``latent``-dim subspace of R^k, with a non-zero mean."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, latent)) @ rng.standard_normal((latent, k)) + 0.5
    return (z + noise * rng.standard_normal((n, k))).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Structure and exactness at full rank
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [("B", "L"), ("B",), ()], ids=["3d", "2d", "1d"])
def test_matmul_full_rank_reproduces_the_original(shape):
    model = matmul_model(shape=shape)
    out, res = factorize(model, rank=16, skip_unprofitable=False)
    assert ops(out) == {"MatMul": 2}
    first, second = out.graph.node
    assert first.input[0] == "x" and second.output[0] == "y" and second.input[0] == first.output[0]
    u, v = factors(out)
    assert u.shape == (24, 16) and v.shape == (16, 16) and u.dtype == v.dtype == np.float32
    assert "w" not in inits(out)  # the original weight is gone
    assert res.layers["mm"].rank == 16 and res.layers["mm"].weight_error < 1e-6
    assert_same(model, out, dims={"B": 3, "L": 5}, **TOL)


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias", [None, (16,), (1, 16), (6, 1)])
def test_gemm_full_rank_reproduces_the_original(trans_a, trans_b, bias):
    k, n, m = 20, 16, 6
    a_shape = [k, m] if trans_a else [m, k]
    b = rand(n, k, seed=2) if trans_b else rand(k, n, seed=2)
    inputs = ["a", "b"] + ([] if bias is None else ["c"])
    weights = [init("b", b)] + ([] if bias is None else [init("c", rand(*bias, seed=3))])
    model = make_model([node("Gemm", inputs, ["y"], name="g", transA=trans_a, transB=trans_b, alpha=0.7, beta=1.3)],
                       [vi("a", a_shape)], [vi("y", [m, n])], weights)
    out, res = factorize(model, rank=16, skip_unprofitable=False)
    first, second = out.graph.node
    if trans_a:
        assert first.op_type == "Gemm" and attr(first, "transA") == 1
    else:
        assert first.op_type == "MatMul"
    if bias is None:
        assert second.op_type == "MatMul"
    else:  # the bias (and beta) stay on the second node; alpha went into the factors
        assert second.op_type == "Gemm" and second.input[2] == "c"
        assert attr(second, "beta") == pytest.approx(1.3) and attr(second, "alpha", 1.0) == 1.0
        assert attr(second, "transA", 0) == 0 and attr(second, "transB", 0) == 0
    u = inits(out)[first.input[1]]
    v = inits(out)[second.input[1]]
    assert u.shape == (k, 16) and v.shape == (16, n)
    assert res.layers["g"].shape == [k, n]
    assert_same(model, out, **TOL)


# --------------------------------------------------------------------------------------------
# Low rank: Eckart-Young, rank rules
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k,n,r", [(24, 16, 5), (12, 30, 4)])
def test_weight_only_error_is_the_eckart_young_error(k, n, r):
    model = matmul_model(k, n, shape=("B",))
    w = rand(k, n, seed=1).astype(np.float64)
    out, res = factorize(model, rank=r)
    s = np.linalg.svd(w, compute_uv=False)
    theory = np.sqrt(np.sum(s[r:] ** 2) / np.sum(s ** 2))
    # ONNX Runtime on the identity returns the factorized weights themselves
    w_r = ort_run(out, {"x": np.eye(k, dtype=np.float32)})[0].astype(np.float64)
    measured = np.linalg.norm(w_r - w) / np.linalg.norm(w)
    assert measured == pytest.approx(theory, rel=1e-5)
    assert res.layers["mm"].weight_error == pytest.approx(theory, rel=1e-9)
    p, _, qt = np.linalg.svd(w, full_matrices=False)
    np.testing.assert_allclose(w_r, (p[:, :r] * s[:r]) @ qt[:r], atol=1e-5)  # the truncated SVD itself
    u, v = factors(out)
    assert u.shape == (k, r) and v.shape == (r, n)
    # balanced factors: column j of U and row j of V have the same norm (sqrt of s_j)
    np.testing.assert_allclose(np.linalg.norm(u, axis=0), np.sqrt(s[:r]), rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), np.sqrt(s[:r]), rtol=1e-5)
    assert res.layers["mm"].params_after == r * (k + n) and res.layers["mm"].params_before == k * n


@pytest.mark.parametrize("energy", [0.5, 0.8, 0.95])
def test_energy_rule_keeps_the_smallest_sufficient_rank(energy):
    w = decaying(32, 32)
    model = matmul_model(32, 32, w=w)
    s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    kept = np.cumsum(s ** 2) / np.sum(s ** 2)
    expected = int(np.argmax(kept >= energy)) + 1
    _, res = factorize(model, energy=energy)
    layer = res.layers["mm"]
    assert layer.rank == expected and layer.energy_kept >= energy > kept[expected - 2]


def test_param_ratio_rule():
    model = matmul_model(40, 60)
    _, res = factorize(model, param_ratio=0.5)
    r = res.layers["mm"].rank
    assert r == int(0.5 * 40 * 60 / 100)  # 12
    assert res.layers["mm"].params_after <= 0.5 * 40 * 60


def test_default_rule_is_param_ratio_075():
    _, res = factorize(matmul_model(40, 60))
    assert res.layers["mm"].rank == int(0.75 * 40 * 60 / 100)  # 18


# --------------------------------------------------------------------------------------------
# Data-aware
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias_correction", [True, False])
def test_data_aware_beats_weight_only_and_reports_the_true_output_error(bias_correction):
    k, n, r = 32, 24, 4
    model = matmul_model(k, n)
    x = correlated(40 * 6, k).reshape(40, 6, k)
    calib = from_arrays({"x": x}, model)
    y = ort_run(model, {"x": x})[0].astype(np.float64)
    errors = {}
    for method in ("weight", "data-aware"):
        out, res = factorize(model, calib, rank=r, method=method, bias_correction=bias_correction, damping=0)
        assert res.method == method and res.calibration_samples == 40
        got = ort_run(out, {"x": x})[0].astype(np.float64)
        errors[method] = np.linalg.norm(got - y) / np.linalg.norm(y)
        layer = res.layers["mm"]
        # the error the pass computes from the Gram matrix is the one ORT measures on those activations
        assert layer.output_error == pytest.approx(errors[method], rel=1e-3)
        assert layer.bias_corrected is (bias_correction and method == "data-aware")
        if method == "data-aware":
            assert layer.weight_only_output_error == pytest.approx(errors["weight"], rel=1e-3)
            assert ops(out) == ({"Add": 1, "MatMul": 2} if bias_correction else {"MatMul": 2})
    assert errors["data-aware"] < 0.25 * errors["weight"]
    # and it is the optimum: sqrt(discarded / total) eigenvalues of W^T C W (C centred with the bias correction)
    w = rand(k, n, seed=1).astype(np.float64)
    x2 = x.reshape(-1, k).astype(np.float64)
    c = np.cov(x2.T, bias=True) if bias_correction else x2.T @ x2 / len(x2)
    lam = np.sort(np.linalg.eigvalsh(w.T @ c @ w))[::-1]
    total = np.sum(w * (x2.T @ x2 / len(x2) @ w))
    assert errors["data-aware"] == pytest.approx(np.sqrt(lam[r:].sum() / total), rel=1e-3)


def test_damping_keeps_directions_the_calibration_data_does_not_cover():
    k, n, r = 48, 40, 16
    model = matmul_model(k, n, shape=("B",))
    rng = np.random.default_rng(3)
    mix = rng.standard_normal((k, k)) * np.linspace(1.0, 0.3, k)[:, None]
    calib = from_arrays({"x": (rng.standard_normal((10, k)) @ mix).astype(np.float32)}, model)  # 10 rows, 48 dims
    held_out = (rng.standard_normal((500, k)) @ mix).astype(np.float32)
    y = ort_run(model, {"x": held_out})[0]
    errors = {}
    for name, cfg in {"weight": {"method": "weight"}, "none": {"damping": 0}, "auto": {}}.items():
        out, res = factorize(model, calib, rank=r, **cfg)
        got = ort_run(out, {"x": held_out})[0]
        errors[name] = np.linalg.norm(got - y) / np.linalg.norm(y)
        if name == "none":  # rank 16 fits the 10 calibration rows exactly ... and overfits them
            assert res.layers["mm"].output_error < 1e-3
    # Ledoit-Wolf shrinkage (the default) falls back to about weight-only when the data is this scarce
    assert errors["auto"] < 0.9 * errors["none"] and errors["auto"] < 1.1 * errors["weight"]


def test_bias_correction_goes_into_the_existing_bias():
    k, n = 32, 24
    x = correlated(64, k, noise=0.2)
    b = rand(n, seed=7)
    for bias_shape, build in [
        ("add", lambda: make_model([node("MatMul", ["x", "w"], ["h"], name="fc"), node("Add", ["h", "b"], ["y"])],
                                   [vi("x", ["B", k])], [vi("y", ["B", n])], [init("w", rand(k, n, seed=1)),
                                                                              init("b", b)])),
        ("gemm", lambda: make_model([node("Gemm", ["x", "w", "b"], ["y"], name="fc", beta=0.5)],
                                    [vi("x", ["B", k])], [vi("y", ["B", n])], [init("w", rand(k, n, seed=1)),
                                                                               init("b", b)])),
        ("gemm-no-c", lambda: make_model([node("Gemm", ["x", "w"], ["y"], name="fc")],
                                         [vi("x", ["B", k])], [vi("y", ["B", n])], [init("w", rand(k, n, seed=1))])),
    ]:
        model = build()
        out, res = factorize(model, from_arrays({"x": x}, model), rank=3)
        assert res.layers["fc"].bias_corrected, bias_shape
        assert "Add" not in ops(out) or bias_shape == "add" and ops(out)["Add"] == 1
        y, got = ort_run(model, {"x": x})[0], ort_run(out, {"x": x})[0]
        # the mean output error is gone
        np.testing.assert_allclose(got.mean(axis=0), y.mean(axis=0), atol=1e-4, err_msg=bias_shape)
        assert res.layers["fc"].output_error == pytest.approx(
            np.linalg.norm(got - y) / np.linalg.norm(y - (0 if bias_shape == "gemm-no-c" else
                                                          (0.5 if bias_shape == "gemm" else 1) * b)), rel=1e-3)


def test_data_aware_is_the_default_with_calibration_data_and_handles_a_singular_covariance():
    k, n = 32, 40  # N > K, and rows spanning only 3 dims: the Gram matrix is singular
    model = matmul_model(k, n)
    x = correlated(30 * 4, k, noise=0.0).reshape(30, 4, k)
    out, res = factorize(model, from_arrays({"x": x}, model), rank=4, damping=0)
    assert res.method == "data-aware"
    y = ort_run(model, {"x": x})[0]
    got = ort_run(out, {"x": x})[0]
    # 3 latent dims + the mean: rank 4 is all the data needs
    assert np.linalg.norm(got - y) / np.linalg.norm(y) < 1e-4
    assert res.layers["mm"].output_error < 1e-3


def test_data_aware_gemm_with_trans_a_uses_the_columns_as_rows():
    k, n, m, r = 24, 20, 30, 3
    model = make_model([node("Gemm", ["a", "b", "c"], ["y"], name="g", transA=1, alpha=0.5)], [vi("a", [k, m])],
                       [vi("y", [m, n])], [init("b", rand(k, n, seed=2)), init("c", rand(n, seed=3))])
    a = correlated(m, k, latent=2, noise=0.01).T.copy()  # [K, M]: the Gemm reads its columns as rows
    calib = from_arrays({"a": a}, model)  # the static dim 0 (K) is the "sample" axis: one batch of K
    y = ort_run(model, {"a": a})[0].astype(np.float64) - 0.0
    bias = rand(n, seed=3).astype(np.float64)
    errors = {}
    for method in ("weight", "data-aware"):
        out, res = factorize(model, calib, rank=r, method=method, batch_size=k)
        assert out.graph.node[0].op_type == "Gemm" and attr(out.graph.node[0], "transA") == 1
        got = ort_run(out, {"a": a})[0].astype(np.float64)
        errors[method] = np.linalg.norm(got - y) / np.linalg.norm(y - bias)  # bias excluded
        assert res.layers["g"].output_error == pytest.approx(errors[method], rel=1e-3)
    assert errors["data-aware"] < 0.1 * errors["weight"]


def test_reported_result_is_a_pass_result_subclass_with_json_details():
    model = make_model([node("MatMul", ["x", "w1"], ["h"], name="fc1"), node("Relu", ["h"], ["r"]),
                        node("MatMul", ["r", "w2"], ["y"], name="fc2")],
                       [vi("x", ["B", 32])], [vi("y", ["B", 4])], [init("w1", rand(32, 32, seed=1)),
                                                                   init("w2", rand(32, 4, seed=2))])
    pm = PassManager([svd_pass(rank=4)])
    out = pm.run(model)
    res = out.results[0]
    assert isinstance(res, LowRankSVDResult)
    assert set(res.layers) == {"fc1"} and res.layers["fc1"].rank == 4
    assert "saves nothing" in res.skipped["fc2"]  # rank 4 of a 32x4 weight
    details = json.loads(json.dumps(out.records[0].details))
    assert details["factorized"] == 1 and details["layers"]["fc1"]["rank"] == 4
    assert pm.passes[0].context.latest(LowRankSVDResult) is res


# --------------------------------------------------------------------------------------------
# Selection: skipped layers, maps, idempotence
# --------------------------------------------------------------------------------------------
def test_unprofitable_layers_are_left_untouched_and_said_so():
    model = matmul_model(24, 16)
    before = model.SerializeToString(deterministic=True)
    out = run(model, svd_pass(rank=10))  # 10 * 40 >= 24 * 16
    assert out.records[0].modified is False
    assert out.model.SerializeToString(deterministic=True) == before
    assert "saves nothing" in out.results[0].skipped["mm"]
    assert "r*(K+N) = 400 >= K*N = 384" in out.records[0].details["skipped_layers"]["mm"]


def test_small_and_excluded_and_shared_layers_are_skipped():
    w = init("w", rand(32, 32, seed=1))
    model = make_model([node("MatMul", ["x", "w"], ["a"], name="shared1"), node("MatMul", ["x", "w"], ["b"], name="shared2"),
                        node("MatMul", ["x", "w3"], ["c"], name="tiny"), node("MatMul", ["x", "w4"], ["d"], name="keep"),
                        node("MatMul", ["x", "w5"], ["e"], name="other")],
                       [vi("x", ["B", 32])], [vi(o, ["B", None]) for o in "abcde"],
                       [w, init("w3", rand(32, 4, seed=3)), init("w4", rand(32, 32, seed=4)),
                        init("w5", rand(32, 32, seed=5))])
    out, res = factorize(model, rank=2, min_dim=8, exclude=["oth*"])
    assert set(res.layers) == {"keep"}
    assert "shared" in res.skipped["shared1"] and "shared" in res.skipped["shared2"]
    assert "min_dim" in res.skipped["tiny"] and res.skipped["other"] == "excluded"
    _, res = factorize(model, rank=2, include=["keep"])
    assert set(res.layers) == {"keep"} and res.skipped["other"] == "not matched by include"


def test_rank_map_by_node_or_weight_name_wins_over_the_rule():
    model = make_model([node("MatMul", ["x", "w1"], ["a"], name="fc1"), node("MatMul", ["x", "w2"], ["b"], name="fc2"),
                        node("MatMul", ["x", "w3"], ["c"], name="fc3")],
                       [vi("x", ["B", 32])], [vi(o, ["B", 32]) for o in "abc"],
                       [init(f"w{i}", rand(32, 32, seed=i)) for i in (1, 2, 3)])
    _, res = factorize(model, ranks={"fc1": 3, "w2": 5})  # only the map: fc3 stays
    assert {k: v.rank for k, v in res.layers.items()} == {"fc1": 3, "fc2": 5}
    assert res.skipped == {"fc3": "not in ranks"}
    _, res = factorize(model, ranks={"fc1": 3}, rank=7)
    assert {k: v.rank for k, v in res.layers.items()} == {"fc1": 3, "fc2": 7, "fc3": 7}


def three_layers(decays=(0.5, 0.9, 0.99), size=32):
    """Three independent 32x32 layers whose singular values decay at different speeds."""
    ws = []
    for i, d in enumerate(decays):
        rng = np.random.default_rng(i)
        p_, _ = np.linalg.qr(rng.standard_normal((size, size)))
        q_, _ = np.linalg.qr(rng.standard_normal((size, size)))
        ws.append(((p_ * d ** np.arange(size)) @ q_.T).astype(np.float32))
    return make_model([node("MatMul", ["x", f"w{i}"], [f"y{i}"], name=f"fc{i}") for i in range(3)],
                      [vi("x", ["B", size])], [vi(f"y{i}", ["B", size]) for i in range(3)],
                      [init(f"w{i}", w) for i, w in enumerate(ws)]), ws


def test_global_allocation_spends_one_budget_where_it_cuts_the_error_most():
    model, ws = three_layers()
    out, res = factorize(model, param_ratio=0.3, allocation="global")
    ranks = {k: v.rank for k, v in res.layers.items()}
    budget = 0.3 * 3 * 32 * 32
    spent = sum(v.params_after for v in res.layers.values())
    assert spent <= budget < spent + 64  # the budget is used up to one more direction
    # unlike the even split (4 each): the nearly flat layer gives up rank to the two that decay
    assert ranks["fc2"] < 4 < min(ranks["fc0"], ranks["fc1"])
    # greedy on log(discarded fraction + floor), equal costs: every direction taken (beyond the first, which
    # every layer keeps) cut the objective at least as much as the next direction of any layer does
    taken, heads = [], []
    for i, w in enumerate(ws):
        s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
        tail = np.append(np.cumsum((s ** 2)[::-1])[::-1], 0) / np.sum(s ** 2) + ALLOC_FLOOR
        gain = np.log(tail[1:-1] / tail[2:])  # gain[j - 1]: going from rank j to j + 1
        r = ranks[f"fc{i}"]
        taken += list(gain[:r - 1])
        heads.append(gain[r - 1])
    assert min(taken) >= max(heads) - 1e-3  # fc1 decays geometrically: its gains tie
    _, even = factorize(model, param_ratio=0.3)
    assert sum(v.params_after for v in even.layers.values()) <= budget
    objective = lambda r: sum(np.log(c.weight_error ** 2 + ALLOC_FLOOR) for c in r.layers.values())  # noqa: E731
    assert objective(res) < objective(even) - 1
    x = rand(8, 32, seed=9)
    for got, want, c in zip(ort_run(out, {"x": x}), ort_run(model, {"x": x}), res.layers.values(), strict=True):
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 3 * c.weight_error + 1e-5


def test_global_allocation_keeps_a_layer_dense_when_its_rank_reaches_the_break_even():
    model, _ = three_layers(decays=(0.3, 0.3, 1.0))  # fc2: a flat spectrum, every direction is worth as much
    _, res = factorize(model, param_ratio=0.6, allocation="global")
    assert set(res.layers) == {"fc0", "fc1"} and "saves nothing" in res.skipped["fc2"]
    assert all(v.rank < 8 for v in res.layers.values())


def test_global_allocation_is_data_aware_and_honours_the_rank_map():
    model, _ = three_layers(decays=(0.9, 0.9, 0.9))
    x = correlated(200, 32, latent=4, noise=0.02)
    _, res = factorize(model, from_arrays({"x": x}, model), param_ratio=0.3, allocation="global",
                       ranks={"fc0": 10}, damping=0)
    assert res.method == "data-aware" and res.layers["fc0"].rank == 10
    # the inputs live near 4 dimensions: the outputs of every layer too
    assert all(v.output_error < 0.05 for v in res.layers.values())
    assert sum(v.params_after for k, v in res.layers.items() if k != "fc0") <= 0.3 * 2 * 32 * 32


def test_idempotent():
    model = make_model([node("MatMul", ["x", "w"], ["h"], name="fc"), node("Relu", ["h"], ["y"])],
                       [vi("x", ["B", 64])], [vi("y", ["B", 64])], [init("w", rand(64, 64, seed=1))])
    out, res = factorize(model, energy=0.6)
    assert res.layers["fc"].rank < 32
    assert_idempotent(out, lambda: svd_pass(energy=0.6))


def test_registered_as_a_pass():
    assert get_pass_class("lowrank-svd") is LowRankSVD


# --------------------------------------------------------------------------------------------
# Bad configs
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg,message", [
    ({"rank": 0}, r"'rank': Input should be greater than 0"),
    ({"energy": 1.5}, r"'energy': Input should be less than or equal to 1"),
    ({"energy": 0}, r"'energy': Input should be greater than 0"),
    ({"param_ratio": 1.0}, r"'param_ratio': Input should be less than 1"),
    ({"ranks": {"fc": 0}}, r"'ranks.fc': Input should be greater than 0"),
    ({"rank": 4, "energy": 0.9}, r"at most one of rank, energy, param_ratio \(got rank and energy\)"),
    ({"method": "data"}, r"'method': Input should be 'weight' or 'data-aware'"),
    ({"rnk": 3}, r"unknown field 'rnk'"),
    ({"allocation": "global", "rank": 3}, r"allocation 'global' needs param_ratio"),
])
def test_bad_config_is_a_clear_recipe_error(cfg, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe({"passes": [{"type": "lowrank-svd", **cfg}]})


def test_bad_rank_map_and_missing_data_are_clear_errors():
    model = matmul_model()
    with pytest.raises(PassError, match=r"ranks names 'mmm', which is not a layer .*did you mean 'mm'\?"):
        run(model, svd_pass(ranks={"mmm": 2}))
    with pytest.raises(PassError, match=r"rank 20 for layer 'mm' exceeds its full rank 16"):
        run(model, svd_pass(ranks={"mm": 20}))
    with pytest.raises(PreconditionError, match="data-aware' needs calibration data.*--calib"):
        svd_pass(method="data-aware")(model)


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------
def mlp():
    return make_model([node("MatMul", ["x", "w1"], ["h"], name="fc1"), node("Add", ["h", "b1"], ["a"]),
                       node("Relu", ["a"], ["r"]), node("MatMul", ["r", "w2"], ["y"], name="fc2")],
                      [vi("x", ["B", 64])], [vi("y", ["B", 48])],
                      [init("w1", decaying(64, 64, seed=1)), init("b1", rand(64, seed=2)),
                       init("w2", decaying(64, 48, seed=3))])


@pytest.mark.parametrize("with_data", [False, True])
def test_lowrank_preset(with_data):
    from onnxopt.recipe import load_preset

    model = mlp()
    x = correlated(64, 64, latent=8, noise=0.1)
    calib = from_arrays({"x": x}, model) if with_data else None
    recipe = load_preset("lowrank")
    assert "--calib" in recipe.description and "data-aware" in recipe.description
    out = PassManager(recipe.build_passes(PassContext(calibration=calib))).run(model)
    res = next(r for r in out.results if isinstance(r, LowRankSVDResult))
    assert res.method == ("data-aware" if with_data else "weight")
    assert set(res.layers) == {"fc1", "fc2"}
    assert all(c.params_after <= 0.75 * c.params_before for c in res.layers.values())
    y, got = ort_run(model, {"x": x})[0], ort_run(out.model, {"x": x})[0]
    assert np.linalg.norm(got - y) / np.linalg.norm(y) < 0.2


def test_lowrank_int8_preset_quantizes_the_factors():
    from onnxopt.recipe import load_preset, preset_names

    if "lowrank-int8" not in preset_names():
        pytest.skip("no lowrank-int8 preset")
    model = mlp()
    x = correlated(64, 64, latent=8, noise=0.1)
    recipe = load_preset("lowrank-int8")
    out = PassManager(recipe.build_passes(PassContext(calibration=from_arrays({"x": x}, model)))).run(model)
    assert [r.name for r in out.records][-4:] == ["shape-inference", "calibrate", "quantize-qdq", "precision-fallback"]
    assert ops(out.model).get("DequantizeLinear", 0) >= 4  # the four factor weights at least
    y, got = ort_run(model, {"x": x})[0], ort_run(out.model, {"x": x})[0]
    assert np.linalg.norm(got - y) / np.linalg.norm(y) < 0.25
