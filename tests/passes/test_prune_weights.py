import numpy as np
import pytest
from helpers import init, make_model, ort_run, rand, run, vi
from onnx import helper, numpy_helper
from onnxopt.passes.prune_weights import (
    PruneWeights,
    PruneWeightsConfig,
    PruneWeightsResult,
    load_masks,
    obs_prune,
)

from onnxopt.data import from_arrays
from onnxopt.errors import PassError, PreconditionError, RecipeError
from onnxopt.pass_infra import PassContext
from onnxopt.recipe import load_preset, parse_recipe

node = helper.make_node


def prune(model, calib=None, **cfg):
    out = run(model, PruneWeights(PruneWeightsConfig(**cfg), PassContext(calibration=calib)))
    assert isinstance(out.results[0], PruneWeightsResult)
    return out.model, out.results[0]


def inits(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def two_layer_model(seed=0, scale2=1.0):
    """x[B,16] -> Gemm(transB=1, w1 [12,16], b1) -> Relu -> MatMul(w2 [12, 8]) -> y."""
    nodes = [node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1), node("Relu", ["h"], ["r"], name="relu"),
             node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    return make_model(nodes, [vi("x", ["B", 16])], [vi("y", ["B", 8])],
                      [init("w1", rand(12, 16, seed=seed)), init("b1", rand(12, seed=seed + 1)),
                       init("w2", scale2 * rand(12, 8, seed=seed + 2))])


def conv_model(c_in=8, c_out=6, k=3, seed=0, bias=True):
    inputs = ["x", "w", "b"] if bias else ["x", "w"]
    nodes = [node("Conv", inputs, ["y"], name="conv", pads=[1, 1, 1, 1])]
    inits_ = [init("w", rand(c_out, c_in, k, k, seed=seed))] + ([init("b", rand(c_out, seed=seed + 1))] if bias else [])
    return make_model(nodes, [vi("x", ["B", c_in, 6, 6])], [vi("y", ["B", c_out, 6, 6])], inits_)


def correlated(n, k, latent=4, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, latent)) @ rng.standard_normal((latent, k))
            + 0.1 * rng.standard_normal((n, k)) + 0.3).astype(np.float32)


# --- mask patterns ----------------------------------------------------------------------------
def test_magnitude_per_layer_exact_and_smallest_zeroed():
    model = two_layer_model()
    out, res = prune(model, sparsity=0.4)
    before, after = inits(model), inits(out)
    for name in ("w1", "w2"):
        w, p = before[name], after[name]
        zeroed = p == 0
        assert zeroed.sum() == round(0.4 * w.size)
        assert np.abs(w[zeroed]).max() <= np.abs(w[~zeroed]).min()
        np.testing.assert_array_equal(p[~zeroed], w[~zeroed])  # magnitude keeps the rest as they were
        np.testing.assert_array_equal(res.masks[name], ~zeroed)
    assert res.details["layers"]["fc1"]["sparsity"] == pytest.approx(round(0.4 * 192) / 192)
    np.testing.assert_array_equal(after["b1"], before["b1"])  # biases are not pruned
    # numbers: ORT on the pruned model equals numpy with the masked weights
    x = rand(5, 16, seed=9)
    h = np.maximum(x @ after["w1"].T + after["b1"], 0)
    np.testing.assert_allclose(ort_run(out, {"x": x})[0], h @ after["w2"], rtol=1e-5, atol=1e-5)


def test_layer_map_wins_and_is_exact():
    out, res = prune(two_layer_model(), sparsity=0.5, layers={"fc2": 0.25, "w1": 0.75})
    assert res.details["layers"]["fc1"]["pruned"] == 144
    assert res.details["layers"]["fc2"]["pruned"] == 24
    assert res.details["zeroed"] == 168 and res.details["sparsity"] == pytest.approx(168 / 288)


def test_global_threshold_across_layers():
    model = two_layer_model(scale2=0.1)  # fc2's weights are 10x smaller: the global threshold prunes them first
    out, res = prune(model, sparsity=0.5, scope="global")
    before, after = inits(model), inits(out)
    total = before["w1"].size + before["w2"].size
    zero1, zero2 = after["w1"] == 0, after["w2"] == 0
    assert zero1.sum() + zero2.sum() == round(0.5 * total)
    kept = np.concatenate([np.abs(before["w1"][~zero1]), np.abs(before["w2"][~zero2])])
    gone = np.concatenate([np.abs(before["w1"][zero1]), np.abs(before["w2"][zero2])])
    assert gone.max() <= kept.min()
    assert res.details["layers"]["fc2"]["sparsity"] > 0.9 > 0.3 > res.details["layers"]["fc1"]["sparsity"]


@pytest.mark.parametrize("method", ["magnitude", "data-aware"])
def test_two_four_along_the_reduction_axis(method):
    gemm, conv = two_layer_model(), conv_model()
    calib_g = from_arrays({"x": rand(64, 16, seed=3)}, gemm)
    calib_c = from_arrays({"x": rand(8, 8, 6, 6, seed=3)}, conv)
    out_g, res_g = prune(gemm, calib_g, pattern="2:4", method=method)
    out_c, res_c = prune(conv, calib_c, pattern="2:4", method=method)
    w1, w2, wc = inits(out_g)["w1"], inits(out_g)["w2"], inits(out_c)["w"]
    # Gemm transB=1: w1 [N, K], groups along K (axis 1); MatMul: w2 [K, N], groups along K (axis 0)
    assert ((w1.reshape(12, 4, 4) != 0).sum(-1) == 2).all()
    assert ((w2.reshape(3, 4, 8) != 0).sum(1) == 2).all()
    # Conv [C_out, C_in, kh, kw]: groups of 4 input channels at every kernel offset
    assert ((wc.reshape(6, 2, 4, 3, 3) != 0).sum(2) == 2).all()
    assert res_g.details["sparsity"] == 0.5 and res_c.details["sparsity"] == 0.5
    np.testing.assert_array_equal(res_c.masks["w"], wc != 0)


def test_two_four_skips_layers_whose_channels_do_not_divide():
    model = make_model([node("MatMul", ["x", "w"], ["y"], name="mm")], [vi("x", ["B", 6])], [vi("y", ["B", 3])],
                       [init("w", rand(6, 3))])
    out, res = prune(model, pattern="2:4")
    assert not res.modified and "multiple of M=4" in res.details["skipped_layers"]["mm"]


def test_grouped_conv_left_alone():
    model = make_model([node("Conv", ["x", "w"], ["y"], name="dw", group=4)], [vi("x", [1, 4, 5, 5])],
                       [vi("y", [1, 4, 3, 3])], [init("w", rand(4, 1, 3, 3))])
    out, res = prune(model, sparsity=0.5)
    assert not res.modified and res.details["skipped_layers"]["dw"].startswith("grouped conv")


# --- sidecar ----------------------------------------------------------------------------------
def test_masks_round_trip_through_the_sidecar(tmp_path):
    model = conv_model()
    path = tmp_path / "masks.npz"
    out, res = prune(model, sparsity=0.6, masks_out=str(path))
    masks = load_masks(path)
    assert set(masks) == {"w"} and masks["w"].dtype == bool and masks["w"].shape == (6, 8, 3, 3)
    np.testing.assert_array_equal(masks["w"], inits(out)["w"] != 0)
    # applying the sidecar to the original model gives the same weights, whatever sparsity says
    again, res2 = prune(model, sparsity=0.1, masks_in=str(path))
    np.testing.assert_array_equal(inits(again)["w"], inits(out)["w"])
    assert res2.details["layers"]["conv"]["pruned"] == int((~masks["w"]).sum())


def test_sidecar_errors_name_the_problem(tmp_path):
    model = conv_model()
    bad = tmp_path / "bad.npz"
    np.savez(bad, w=np.ones((6, 8, 3, 2), dtype=bool))
    with pytest.raises(PassError, match=r"mask 'w' has shape \[6, 8, 3, 2\]"):
        prune(model, masks_in=str(bad))
    np.savez(bad, wx=np.ones((6, 8, 3, 3), dtype=bool))
    with pytest.raises(PassError, match="'wx' names no prunable weight.*did you mean 'w'"):
        prune(model, masks_in=str(bad))
    np.savez(bad, w=np.ones((6, 8, 3, 3), dtype=np.float32))
    with pytest.raises(PassError, match="expected bool"):
        prune(model, masks_in=str(bad))
    with pytest.raises(PassError, match="masks file not found"):
        prune(model, masks_in=str(tmp_path / "none.npz"))


# --- data-aware reconstruction ------------------------------------------------------------------
def _rel_err(ref_model, model, feeds):
    ref, got = ort_run(ref_model, feeds)[0], ort_run(model, feeds)[0]
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def test_reconstruction_beats_magnitude_on_gemm():
    model = make_model([node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)], [vi("x", ["B", 32])],
                       [vi("y", ["B", 16])], [init("w", rand(16, 32, seed=4)), init("b", rand(16, seed=5))])
    rows = correlated(768, 32)
    x, held = rows[:512], {"x": rows[512:]}
    calib = from_arrays({"x": x}, model)
    mag, _ = prune(model, sparsity=0.5, method="magnitude")
    fit, res = prune(model, calib, sparsity=0.5, method="data-aware", batch_size=128)
    feeds = {"x": x}
    e_mag, e_fit = _rel_err(model, mag, feeds), _rel_err(model, fit, feeds)
    assert e_fit < 0.5 * e_mag, (e_fit, e_mag)
    # the reported errors are those ORT measures on the calibration rows (bias excluded from ||Y||: close)
    layer = res.details["layers"]["fc"]
    assert layer["output_error"] < 0.5 * layer["magnitude_output_error"]
    assert (inits(fit)["w"] == 0).sum() == 256 and layer["bias_corrected"]
    # held-out rows from the same distribution still gain
    assert _rel_err(model, fit, held) < _rel_err(model, mag, held)


def test_reconstruction_beats_magnitude_on_conv_and_matmul_without_bias():
    conv = conv_model(bias=False)
    rng = np.random.default_rng(1)
    # 8 input channels that are copies of 3 (plus noise): pruned weights can move to their twins
    xc = np.repeat(rng.standard_normal((16, 3, 6, 6)), [3, 3, 2], axis=1).astype(np.float32)
    xc += 0.05 * rng.standard_normal(xc.shape).astype(np.float32)
    calib = from_arrays({"x": xc}, conv)
    mag, _ = prune(conv, sparsity=0.5, method="magnitude")
    fit, res = prune(conv, calib, sparsity=0.5, method="data-aware")
    assert _rel_err(conv, fit, {"x": xc}) < 0.6 * _rel_err(conv, mag, {"x": xc})
    assert "b" not in inits(conv) and len([n for n in fit.graph.node if n.op_type == "Conv"][0].input) == 3

    mm = make_model([node("MatMul", ["x", "w"], ["y"], name="mm")], [vi("x", ["B", 4, 24])], [vi("y", ["B", 4, 8])],
                    [init("w", rand(24, 8, seed=2))])
    xm = correlated(128, 24, seed=3).reshape(32, 4, 24)
    fit_m, res_m = prune(mm, from_arrays({"x": xm}, mm), sparsity=0.5)
    mag_m, _ = prune(mm, sparsity=0.5, method="magnitude")
    assert res_m.method == "data-aware"  # the default with calibration data
    assert _rel_err(mm, fit_m, {"x": xm}) < 0.5 * _rel_err(mm, mag_m, {"x": xm})
    assert [n.op_type for n in fit_m.graph.node] == ["MatMul", "Add"]  # the bias correction needed an Add


def test_obs_with_the_identity_hessian_is_magnitude_pruning():
    w = rand(6, 20, seed=7).astype(np.float64)
    new, keep = obs_prune(w, np.eye(20), sparsity=0.5, block=8)
    # with H = I no kept weight moves, and per block the smallest |w| go
    np.testing.assert_array_equal(new[keep], w[keep])
    assert (~keep).sum() == 60 and not new[~keep].any()


# --- config and recipes -------------------------------------------------------------------------
def test_config_errors():
    with pytest.raises(RecipeError, match="N:M"):
        parse_recipe({"passes": [{"type": "prune-weights", "pattern": "4:2"}]})
    with pytest.raises(RecipeError, match="sparsity"):
        parse_recipe({"passes": [{"type": "prune-weights", "sparsity": 1.0}]})
    with pytest.raises(PassError, match="layers names 'fc3'.*did you mean"):
        prune(two_layer_model(), layers={"fc3": 0.5})
    with pytest.raises(PassError) as exc:
        prune(two_layer_model(), method="data-aware")
    assert isinstance(exc.value.__cause__, PreconditionError)


def test_prune_presets_load():
    for name in ("prune", "prune-int8"):
        recipe = load_preset(name)
        cfg = next(p for p in recipe.passes if p.type == "prune-weights")
        assert cfg.sparsity == 0.5 and cfg.method is None


def test_prune_then_int8_keeps_the_zeros():
    from onnxopt.passes.calibrate import Calibrate, CalibrateConfig
    from onnxopt.passes.quantize_qdq import QuantizeQDQ, QuantizeQDQConfig

    model = two_layer_model()
    ctx = PassContext(calibration=from_arrays({"x": rand(64, 16, seed=3)}, model))
    out = run(model, PruneWeights(PruneWeightsConfig(sparsity=0.5), ctx),
              Calibrate(CalibrateConfig(cache=False), ctx), QuantizeQDQ(QuantizeQDQConfig(check_kernels=False), ctx))
    mask = out.results[0].masks["w1"]
    values = inits(out.model)
    dq = next(n for n in out.model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in values
              and values[n.input[0]].shape == (12, 16))
    q, zp = values[dq.input[0]], values[dq.input[2]]
    zp = zp.reshape(-1, 1) if zp.ndim else zp
    np.testing.assert_array_equal(q == zp, ~mask)  # pruned exactly at the zero point, kept ones never



# --- sequential fitting and sparsity allocation -------------------------------------------------
def chain_model(seed=0):
    """x[B,16] -> 3 x (MatMul 16x16 -> Relu) -> y: each layer's input depends on the layers before it."""
    nodes, inits_ = [], []
    src = "x"
    for i in range(3):
        nodes += [node("MatMul", [src, f"w{i}"], [f"h{i}"], name=f"fc{i}"),
                  node("Relu", [f"h{i}"], [f"r{i}"], name=f"relu{i}")]
        inits_.append(init(f"w{i}", rand(16, 16, seed=seed + i) + 0.2))
        src = f"r{i}"
    nodes[-1].output[0] = "y"
    return make_model(nodes, [vi("x", ["B", 16])], [vi("y", ["B", 16])], inits_)


def test_sequential_fits_later_layers_to_the_pruned_inputs():
    model = chain_model()
    x = correlated(256, 16, latent=6, seed=5)
    calib = from_arrays({"x": x}, model)
    errs = {}
    for runs in (0, 3):
        out, res = prune(model, calib, sparsity=0.6, method="data-aware", sequential_runs=runs, batch_size=64)
        assert res.details["zeroed"] == 3 * round(0.6 * 256) and res.details["sequential_runs"] == runs
        errs[runs] = _rel_err(model, out, {"x": x})
        # the first layer sees the same inputs either way; numbers vs numpy with the stored weights
        np.testing.assert_allclose(ort_run(out, {"x": x})[0], _numpy_eval(out, x), rtol=1e-4, atol=1e-3)
    assert errs[3] < errs[0], errs


def _numpy_eval(model, x):
    """MatMul/Add/Relu graph evaluated in float64 numpy (the bias corrections are Adds after the MatMuls)."""
    env = {k: v.astype(np.float64) for k, v in inits(model).items()} | {"x": x.astype(np.float64)}
    ops_ = {"MatMul": np.matmul, "Add": np.add, "Relu": lambda a: np.maximum(a, 0)}
    for n in model.graph.node:
        env[n.output[0]] = ops_[n.op_type](*(env[i] for i in n.input))
    return env["y"]


def test_sequential_groups_cover_the_layers_in_order():
    from onnxopt.passes.prune_weights import sequential_groups

    assert sequential_groups(list(range(7)), 3) == [[0, 1], [2, 3, 4], [5, 6]]
    assert sequential_groups(list(range(3)), 8) == [[0], [1], [2]]
    assert sequential_groups(list(range(3)), 0) == [[0, 1, 2]]


def test_allocation_keeps_the_budget_and_prunes_the_cheap_layer_more():
    from onnxopt.passes.prune_weights import ALLOCATION_GRID, allocate_sparsity

    g = ALLOCATION_GRID
    curves = {"cheap": 0.1 * g ** 2, "costly": 4.0 * g ** 2}
    out = allocate_sparsity(curves, {"cheap": 1000, "costly": 1000}, 0.5)
    assert out["cheap"] + out["costly"] == pytest.approx(1.0)
    # minimum of 0.1 a^2 + 4 b^2 with a + b = 1 is at a = 40/41 (grid-limited to 0.95)
    assert out["cheap"] == pytest.approx(0.95) and out["costly"] == pytest.approx(0.05)


def test_output_error_allocation_on_a_model():
    model = chain_model(seed=3)
    model.graph.initializer[2].CopyFrom(init("w2", 0.01 * rand(16, 16, seed=9)))  # a layer with little output
    x = correlated(128, 16, latent=6, seed=2)
    out, res = prune(model, from_arrays({"x": x}, model), sparsity=0.5, allocation="output-error",
                     sequential_runs=1, batch_size=64)
    assert res.details["allocation"] == "output-error"
    assert abs(res.details["zeroed"] - 384) <= 3  # the budget, up to per-layer rounding
    assert set(res.allocated) == {"fc0", "fc1", "fc2"}
    sp = {k: v["sparsity"] for k, v in res.details["layers"].items()}
    assert max(sp.values()) > 0.5 > min(sp.values())  # not uniform
    assert _rel_err(model, out, {"x": x}) < 0.5


def test_error_correction_fits_the_original_outputs():
    model = chain_model(seed=1)
    x = correlated(256, 16, latent=6, seed=7)
    calib = from_arrays({"x": x}, model)
    errs = {}
    for ec in (False, True):
        out, res = prune(model, calib, sparsity=0.6, sequential_runs=3, error_correction=ec, batch_size=64)
        errs[ec] = _rel_err(model, out, {"x": x})
        np.testing.assert_allclose(ort_run(out, {"x": x})[0], _numpy_eval(out, x), rtol=1e-4, atol=1e-3)
        if ec:  # the reported error is against the original model's layer output, as ORT measures it
            layer = res.details["layers"]["fc2"]
            assert layer["output_error"] is not None
    assert errs[True] < errs[False], errs


def test_error_correction_target_keeps_directions_the_data_does_not_span():
    from onnxopt.passes.prune_weights import LayerStats

    rng = np.random.default_rng(0)
    rows = rng.standard_normal((4, 12))  # 4 rows, 12 features: rank 4
    g = rows.T @ rows / 4
    w = rng.standard_normal((3, 12))
    same = LayerStats(g, rows.mean(0), 4, cross=g, mean_orig=rows.mean(0), gram_orig=g)
    np.testing.assert_allclose(same.target(w, 0.01), w, atol=1e-12)  # identical inputs: nothing to correct
    assert same.rel_error(w, w, False) == pytest.approx(0.0, abs=1e-6)


def test_holdout_halves_merge_to_the_full_fit_and_the_grid_picks_the_damping_that_generalises():
    model = make_model([node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)], [vi("x", ["B", 32])],
                       [vi("y", ["B", 16])], [init("w", rand(16, 32, seed=4)), init("b", rand(16, seed=5))])
    rows = correlated(24 + 512, 32, latent=20, seed=6)  # 24 calibration rows < 32 inputs: easy to over-fit
    x, fresh = rows[:24], {"x": rows[24:]}
    calib = from_arrays({"x": x}, model)
    plain, _ = prune(model, calib, sparsity=0.5, method="data-aware", damping=0.3, batch_size=5)
    held, res = prune(model, calib, sparsity=0.5, method="data-aware", damping=0.3, holdout=True, batch_size=5)
    assert res.calibration_samples == 24
    np.testing.assert_allclose(inits(held)["w"], inits(plain)["w"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ort_run(held, fresh)[0], ort_run(plain, fresh)[0], rtol=1e-5, atol=1e-5)

    picked, res_g = prune(model, calib, sparsity=0.5, method="data-aware", holdout=True, damping_grid=[1e-4, 1.0],
                          batch_size=5)
    low, _ = prune(model, calib, sparsity=0.5, method="data-aware", damping=1e-4, batch_size=5)
    assert res_g.details["layers"]["fc"]["damping"] == 1.0
    assert _rel_err(model, picked, fresh) < _rel_err(model, low, fresh)
    with pytest.raises(PassError, match="damping_grid is chosen on held-out calibration rows"):
        prune(model, calib, method="data-aware", damping_grid=[0.1])
    with pytest.raises(RecipeError):
        parse_recipe({"passes": [{"type": "prune-weights", "damping_grid": [0.0]}]})


def test_statistics_correction_matches_the_original_channel_statistics_and_keeps_the_masks():
    """Two convs through a Clip; magnitude pruning at 70 % with the correction: every conv's output channels
    get the original mean and variance back on the calibration data, the masks stay as they were."""
    from onnxopt.stat_correction import channel_moments

    nodes = [node("Conv", ["x", "w1", "b1"], ["h1"], name="c1", pads=[1, 1, 1, 1]),
             node("Clip", ["h1", "lo", "hi"], ["r1"], name="relu6"),
             node("Conv", ["r1", "w2"], ["y"], name="c2")]
    model = make_model(nodes, [vi("x", ["B", 8, 6, 6])], [vi("y", ["B", 6, 6, 6])],
                       [init("w1", rand(12, 8, 3, 3, seed=1)), init("b1", rand(12, seed=2)),
                        init("lo", np.float32(0)), init("hi", np.float32(6)), init("w2", rand(6, 12, 1, 1, seed=3))])
    calib = from_arrays({"x": rand(32, 8, 6, 6, seed=4) + 0.3}, model)
    plain, _ = prune(model, sparsity=0.7, method="magnitude")
    out, res = prune(model, calib, sparsity=0.7, method="magnitude", statistics_correction=True,
                     correction_samples=32)
    corr = res.details["statistics_correction"]
    assert corr["convs"] == 2 and set(corr["layers"]) == {"c1", "c2"}
    want = channel_moments(model, ["h1", "y"], calib, batch_size=16, max_samples=None, what="t")
    for tensor, (m0, v0), (m1, v1), (m2, v2) in zip(
            ["h1", "y"], want, channel_moments(plain, ["h1", "y"], calib, batch_size=16, max_samples=None, what="t"),
            channel_moments(out, ["h1", "y"], calib, batch_size=16, max_samples=None, what="t"), strict=True):
        sd = np.sqrt(v0)
        scale = np.clip(np.sqrt(v0 / v1), 0.5, 2.0)  # the default bounds
        drift = np.mean(np.abs(m1 - m0) / sd) + np.mean(np.abs(np.log(np.sqrt(v1) / sd)))
        assert np.mean(np.abs(m2 - m0) / sd) + np.mean(np.abs(np.log(np.sqrt(v2) / sd))) < 0.5 * drift, tensor
        if tensor == "h1":  # the first conv's inputs are the original ones: exact where the scale is not clipped
            ok = (scale > 0.5) & (scale < 2.0)
            np.testing.assert_allclose(np.sqrt(v2[ok]), sd[ok], rtol=1e-4)
            np.testing.assert_allclose(m2 / sd, m0 / sd, atol=1e-4)
    w = inits(out)
    for name in ("w1", "w2"):
        np.testing.assert_array_equal(w[name] != 0, res.masks[name])
    # without calibration data the option has nothing to measure on: plain magnitude pruning
    again, res2 = prune(model, sparsity=0.7, method="magnitude", statistics_correction=True)
    assert "statistics_correction" not in res2.details
    np.testing.assert_array_equal(inits(again)["w1"], inits(plain)["w1"])


def test_weights_are_read_when_pruned_one_at_a_time(tmp_path, monkeypatch):
    """External weights: each layer's weight is mapped when it is pruned and let go; a layer left alone is never
    read; the sequential error correction (a copy of the original model beside the pruned one) works on it too
    and gives the numbers of the in-memory model."""
    import onnx_ir as ir

    from onnxopt.model_io import from_proto, load_model, save_model, to_proto
    from onnxopt.pass_infra import PassManager

    nodes = [node("MatMul", ["x", "w0"], ["h0"], name="fc0"), node("Relu", ["h0"], ["r0"], name="relu"),
             node("MatMul", ["r0", "w1"], ["h1"], name="fc1"), node("MatMul", ["h1", "w2"], ["y"], name="fc2")]
    model = make_model(nodes, [vi("x", ["B", 64])], [vi("y", ["B", 8])],
                       [init("w0", rand(64, 64, seed=1)), init("w1", rand(64, 64, seed=2)),
                        init("w2", rand(64, 8, seed=3))])
    save_model(from_proto(model), tmp_path / "m.onnx", external_data=True)
    loads, mapped, peak = [], set(), [0]
    real_load, real_release = ir.ExternalTensor._load, ir.ExternalTensor.release

    def load(self):
        loads.append(self.name)
        mapped.add(self.name)
        peak[0] = max(peak[0], len(mapped))
        return real_load(self)

    def release(self):
        mapped.discard(self.name)
        return real_release(self)

    monkeypatch.setattr(ir.ExternalTensor, "_load", load)
    monkeypatch.setattr(ir.ExternalTensor, "release", release)
    for size_report in (False, True):
        loads.clear()
        lazy = load_model(tmp_path / "m.onnx")
        assert all(isinstance(v.const_value, ir.ExternalTensor) for v in lazy.graph.initializers.values())
        cfg = PruneWeightsConfig(sparsity=0.5, min_params=1000, size_report=size_report)
        out = PassManager([PruneWeights(cfg)]).run(lazy).model
        assert peak[0] == 1 and not mapped
        if not size_report:  # fc2 (512 weights) is below min_params: never read
            assert loads == ["w0", "w1"]
        _same_model(to_proto(ir.external_data.load_to_model(out)), prune(model, **cfg.model_dump(exclude={"type"}))[0])
    x = correlated(128, 64, latent=8, seed=3)
    calib = from_arrays({"x": x}, model)
    cfg = PruneWeightsConfig(sparsity=0.6, sequential_runs=3, batch_size=64, size_report=False)
    out = PassManager([PruneWeights(cfg, PassContext(calibration=calib))]).run(load_model(tmp_path / "m.onnx")).model
    _same_model(to_proto(ir.external_data.load_to_model(out)), prune(model, calib, **cfg.model_dump(exclude={"type"}))[0])


def _same_model(got, want):
    assert [(n.op_type, list(n.input), list(n.output)) for n in got.graph.node] == \
        [(n.op_type, list(n.input), list(n.output)) for n in want.graph.node]
    assert inits(got).keys() == inits(want).keys()
    for k, v in inits(want).items():
        np.testing.assert_array_equal(inits(got)[k], v)


def test_bias_correction_into_an_external_add_constant(tmp_path):
    """The exporters' MatMul + Add bias, the bias in an external data file: the correction replaces it (the
    mapped original let go) with the numbers of the in-memory model."""
    import onnx_ir as ir

    from onnxopt.model_io import from_proto, load_model, save_model, to_proto
    from onnxopt.pass_infra import PassManager

    nodes = [node("MatMul", ["x", "w"], ["h"], name="fc"), node("Add", ["h", "b"], ["y"], name="add")]
    model = make_model(nodes, [vi("x", ["B", 64])], [vi("y", ["B", 512])],
                       [init("w", rand(64, 512, seed=1)), init("b", rand(512, seed=2))])
    save_model(from_proto(model), tmp_path / "m.onnx", external_data=True)
    lazy = load_model(tmp_path / "m.onnx")
    assert isinstance(lazy.graph.initializers["b"].const_value, ir.ExternalTensor)
    calib = from_arrays({"x": correlated(64, 64, latent=8, seed=3)}, model)
    cfg = PruneWeightsConfig(sparsity=0.5, size_report=False)
    result = PassManager([PruneWeights(cfg, PassContext(calibration=calib))]).run(lazy)
    assert result.results[0].details["layers"]["fc"]["bias_corrected"]
    want = prune(model, calib, **cfg.model_dump(exclude={"type"}))[0]
    _same_model(to_proto(ir.external_data.load_to_model(result.model)), want)
