"""Cross-layer equalization: same float outputs, balanced channel ranges, a note when nothing applies."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import init, make_model, ops, ort_run, rand, run, vi
from onnx import helper, numpy_helper
from onnxopt.passes.equalize import Equalize, EqualizeConfig

from onnxopt.activations import exposed
from onnxopt.data import from_arrays
from onnxopt.model_io import to_proto
from onnxopt.pass_infra import PassContext

node = helper.make_node
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _spread(w: np.ndarray, axis: int, seed: int) -> np.ndarray:
    """Channels along ``axis`` scaled by factors 0.01..30: the imbalance equalization removes."""
    f = np.exp(np.random.default_rng(seed).uniform(np.log(0.01), np.log(30), w.shape[axis]))
    shape = [1] * w.ndim
    shape[axis] = -1
    return (w * f.reshape(shape)).astype(np.float32)


def conv_relu_conv():
    nodes = [node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             node("Relu", ["c1"], ["r1"], name="relu"),
             node("Conv", ["r1", "w2", "b2"], ["y"], name="conv2")]
    inits = [init("w1", _spread(rand(8, 3, 3, 3, seed=1), 0, 5)), init("b1", rand(8, seed=2)),
             init("w2", rand(4, 8, 1, 1, seed=3)), init("b2", rand(4, seed=4))]
    return make_model(nodes, [vi("x", ["N", 3, 6, 6])], [vi("y", ["N", 4, 6, 6])], inits)


def mobilenet_block(clip_max: float = 6.0):
    """expand 1x1 -> Relu6 -> depthwise 3x3 -> Relu6 -> project 1x1 (the three-conv pattern)."""
    clip = [init("lo", np.array(0.0, np.float32)), init("hi", np.array(clip_max, np.float32))]
    nodes = [node("Conv", ["x", "we", "be"], ["e"], name="expand"),
             node("Clip", ["e", "lo", "hi"], ["e6"], name="relu6_a"),
             node("Conv", ["e6", "wd", "bd"], ["d"], group=12, pads=[1, 1, 1, 1], name="dw"),
             node("Clip", ["d", "lo", "hi"], ["d6"], name="relu6_b"),
             node("Conv", ["d6", "wp", "bp"], ["y"], name="project")]
    inits = [init("we", _spread(rand(12, 4, 1, 1, seed=1), 0, 7)), init("be", rand(12, seed=2)),
             init("wd", _spread(rand(12, 1, 3, 3, seed=3), 0, 8)), init("bd", rand(12, seed=4)),
             init("wp", rand(5, 12, 1, 1, seed=5)), init("bp", rand(5, seed=6)), *clip]
    return make_model(nodes, [vi("x", ["N", 4, 5, 5])], [vi("y", ["N", 5, 5, 5])], inits)


def gemm_relu_gemm():
    nodes = [node("Gemm", ["x", "w1", "b1"], ["g1"], transB=1, name="fc1"),
             node("Relu", ["g1"], ["r"], name="relu"),
             node("Gemm", ["r", "w2", "b2"], ["y"], alpha=0.5, beta=2.0, name="fc2")]
    inits = [init("w1", _spread(rand(16, 10, seed=1), 0, 9)), init("b1", rand(16, seed=2)),
             init("w2", rand(16, 3, seed=3)), init("b2", rand(3, seed=4))]
    return make_model(nodes, [vi("x", ["N", 10])], [vi("y", ["N", 3])], inits)


def _feeds(model, scale=3.0, n=6, seed=0):
    shape = [n] + [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    return {"x": (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)}


def _equalize(model, calib=None, **cfg):
    ctx = PassContext(calibration=from_arrays(calib, model) if calib is not None else None)
    cfg.setdefault("only_if_better", False)
    result = run(model, Equalize(EqualizeConfig(**cfg), ctx))
    return result.model, result.records[0]


def _weights(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _out_ranges(w):  # per output channel
    return np.abs(w.reshape(w.shape[0], -1)).max(axis=1)


@pytest.mark.parametrize("build", [conv_relu_conv, mobilenet_block, gemm_relu_gemm])
def test_float_outputs_unchanged(build):
    model = build()
    out, rec = _equalize(model)
    assert rec.modified and rec.details["pairs"] == {conv_relu_conv: 1, mobilenet_block: 2, gemm_relu_gemm: 1}[build]
    for seed in range(3):  # large inputs: Relu6's bound is reached on many channels
        feeds = _feeds(model, seed=seed)
        np.testing.assert_allclose(ort_run(out, feeds)[0], ort_run(model, feeds)[0], **TOL)


def test_conv_relu_conv_ranges_balanced():
    model = conv_relu_conv()
    out, rec = _equalize(model)
    w0, w = _weights(model), _weights(out)
    r1, r2 = _out_ranges(w["w1"]), np.abs(w["w2"]).max(axis=(0, 2, 3))
    np.testing.assert_allclose(r1, r2, rtol=1e-5)  # channel i's range is the same in both layers
    # ... and it is the geometric mean of the two ranges before
    np.testing.assert_allclose(r1, np.sqrt(_out_ranges(w0["w1"]) * np.abs(w0["w2"]).max(axis=(0, 2, 3))), rtol=1e-5)
    assert rec.details["range_ratio_after"] < rec.details["range_ratio_before"] / 3


def test_three_conv_pattern_balances_both_pairs_and_bounds_relu6_per_channel():
    model = mobilenet_block()
    out, rec = _equalize(model)
    w = _weights(out)
    re, rd_in, rd_out = _out_ranges(w["we"]), _out_ranges(w["wd"]), _out_ranges(w["wd"])
    rp = np.abs(w["wp"]).max(axis=(0, 2, 3))
    # after the sweeps both pairs are balanced: expand/depthwise and depthwise/project (one filter per channel)
    np.testing.assert_allclose(re, rd_in, rtol=1e-3)
    np.testing.assert_allclose(rd_out, rp, rtol=1e-3)
    assert rec.details["sweeps"] > 1
    # each Relu6 became Relu + Min with a per-channel bound (6 x the channel's scale)
    assert ops(out) == {"Conv": 3, "Relu": 2, "Min": 2}
    bounds = [w[n.input[1]] for n in out.graph.node if n.op_type == "Min"]
    assert all(b.shape == (12, 1, 1) and not np.allclose(b, 6.0) for b in bounds)


def test_clip_modes():
    model = mobilenet_block()
    out, rec = _equalize(model, clip="skip")
    assert not rec.modified and "Clip(0, M) (clip: skip)" in rec.details["notes"][-1]
    out, rec = _equalize(model, clip="relu")
    assert ops(out) == {"Conv": 3, "Relu": 2}
    feeds = _feeds(model)
    assert not np.allclose(ort_run(out, feeds)[0], ort_run(model, feeds)[0], **TOL)  # the bound is gone
    loose = mobilenet_block(clip_max=1e4)  # a bound never reached: Relu is the same function
    out, rec = _equalize(loose, clip="relu")
    np.testing.assert_allclose(ort_run(out, feeds)[0], ort_run(loose, feeds)[0], **TOL)


def test_hard_swish_pairs_are_skipped_with_a_note():
    nodes = [node("Conv", ["x", "w1"], ["c"], name="c1"), node("HardSwish", ["c"], ["h"], name="hs"),
             node("Conv", ["h", "w2"], ["y"], name="c2")]
    model = make_model(nodes, [vi("x", [1, 3, 4, 4])], [vi("y", [1, 2, 4, 4])],
                       [init("w1", rand(6, 3, 1, 1, seed=1)), init("w2", rand(2, 6, 1, 1, seed=2))], opset=17)
    out, rec = _equalize(model)
    assert not rec.modified and out.SerializeToString() == model.SerializeToString()
    assert any("HardSwish (not positively homogeneous)" in n for n in rec.details["notes"])
    assert "no foldable layer pairs" in rec.details["notes"][0]


def test_no_pairs_runs_unchanged_with_a_note():
    nodes = [node("Conv", ["x", "w"], ["c"], name="c"), node("GlobalAveragePool", ["c"], ["y"])]
    model = make_model(nodes, [vi("x", [1, 3, 4, 4])], [vi("y", [1, 2, 1, 1])], [init("w", rand(2, 3, 1, 1))])
    out, rec = _equalize(model, only_if_better=True)
    assert not rec.modified and out.SerializeToString() == model.SerializeToString()
    assert rec.details["notes"] == ["no foldable layer pairs (Conv/Gemm/MatMul -> Relu/Relu6/identity -> "
                                    "Conv/Gemm/MatMul): model unchanged"]


def test_shared_weight_is_not_touched():
    nodes = [node("Conv", ["x", "w1"], ["c1"], name="c1"), node("Relu", ["c1"], ["r"]),
             node("Conv", ["r", "w2"], ["y"], name="c2"), node("Conv", ["x", "w1"], ["z"], name="c3")]
    model = make_model(nodes, [vi("x", [1, 3, 4, 4])], [vi("y", [1, 2, 4, 4]), vi("z", [1, 6, 4, 4])],
                       [init("w1", _spread(rand(6, 3, 1, 1, seed=1), 0, 3)), init("w2", rand(2, 6, 1, 1))])
    out, rec = _equalize(model)
    assert not rec.modified


def test_high_bias_absorption_through_relu_is_exact_on_the_calibration_data():
    model = conv_relu_conv()
    w = _weights(model)
    # positive biases (and small inputs) so that channels stay above zero: their floor moves into conv2's bias
    model.graph.initializer[1].CopyFrom(numpy_helper.from_array(np.abs(w["b1"]) + 20.0, "b1"))
    calib = _feeds(model, scale=0.005, n=16, seed=3)
    out, rec = _equalize(model, calib=calib)
    assert rec.details["absorbed_channels"] > 0
    np.testing.assert_allclose(ort_run(out, calib)[0], ort_run(model, calib)[0], rtol=1e-5, atol=1e-4)
    # the Relu's input no longer sits far above zero
    def floor(m):
        return ort_run(to_proto(exposed(m, ["c1"], keep_outputs=False)), calib)[0].min(axis=(0, 2, 3))

    assert floor(model).min() > 15.0
    np.testing.assert_allclose(floor(out), 0.0, atol=1e-4)  # Relu's input comes down to zero


def test_without_calibration_absorption_is_skipped_and_said():
    _, rec = _equalize(conv_relu_conv())
    assert any("needs calibration data" in n for n in rec.details["notes"])


def compensated():
    """conv1's output channel i scaled by f_i, conv2's input channel i by 1 / f_i (as BatchNorm folding leaves
    them): every channel matters equally to the output, but a per-tensor activation grid sees only the big ones."""
    f = np.exp(np.random.default_rng(7).uniform(np.log(0.01), np.log(30), 8)).astype(np.float32)
    nodes = [node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             node("Relu", ["c1"], ["r1"], name="relu"),
             node("Conv", ["r1", "w2", "b2"], ["y"], name="conv2")]
    inits = [init("w1", rand(8, 3, 3, 3, seed=1) * f[:, None, None, None]), init("b1", rand(8, seed=2) * f),
             init("w2", rand(4, 8, 1, 1, seed=3) / f[None, :, None, None]), init("b2", rand(4, seed=4))]
    return make_model(nodes, [vi("x", ["N", 3, 6, 6])], [vi("y", ["N", 4, 6, 6])], inits)


@pytest.mark.parametrize("balance", ["activations", "weights"])
def test_only_if_better_measures_an_int8_trial_and_reports_layers(balance):
    model = compensated()
    calib = _feeds(model, scale=1.0, n=16, seed=4)
    out, rec = _equalize(model, calib=calib, only_if_better=True, absorb_bias=False, balance=balance)
    d = rec.details
    assert set(d["layer_sqnr_db"]) == {"c1", "y"}
    # the small channels are no longer lost in the activation's grid
    assert d["kept"] and d["sqnr_db_after"] > d["sqnr_db_before"] + 3, d
    assert d["layer_sqnr_db"]["y"][1] > d["layer_sqnr_db"]["y"][0] + 3
    feeds = _feeds(model, seed=1)
    np.testing.assert_allclose(ort_run(out, feeds)[0], ort_run(model, feeds)[0], **TOL)


def test_only_if_better_keeps_the_model_when_nothing_is_gained():
    model = conv_relu_conv()
    calib = _feeds(model, scale=1.0, n=16, seed=4)
    out, rec = _equalize(model, calib=calib, only_if_better=True, min_gain_db=100.0)
    assert not rec.modified and out.SerializeToString() == model.SerializeToString()
    assert "did not lower the measured error" in rec.details["notes"][-1]


def test_without_calibration_the_weight_range_ratio_decides():
    out, rec = _equalize(conv_relu_conv(), only_if_better=True)
    assert rec.modified and "weight range ratio" in rec.details["criterion"]


def test_activation_balance_gives_a_depthwise_reader_equal_channel_ranges():
    model = mobilenet_block()
    calib = _feeds(model, scale=0.2, n=16, seed=5)
    out, rec = _equalize(model, calib=calib, max_scale=1e4, absorb_bias=False, clip="per-channel")
    assert rec.details["balance"] == "activations"
    probe = to_proto(exposed(out, ["e6"], keep_outputs=False))
    e6 = ort_run(probe, calib)[0]
    top = e6.max(axis=(0, 2, 3))
    live = top > 0
    # every live channel of the activation the depthwise conv reads spans the tensor's full range
    np.testing.assert_allclose(top[live], top[live].max(), rtol=1e-4)
    base = ort_run(to_proto(exposed(model, ["e6"], keep_outputs=False)), calib)[0].max(axis=(0, 2, 3))
    assert base[live].min() < 0.25 * base[live].max()  # (it did not before)
    feeds = _feeds(model, seed=2)
    np.testing.assert_allclose(ort_run(out, feeds)[0], ort_run(model, feeds)[0], **TOL)


def test_calibrated_clip_keeps_one_bound_exact_on_the_calibration_data():
    model = mobilenet_block()
    calib = _feeds(model, scale=0.5, n=16, seed=6)
    out, rec = _equalize(model, calib=calib, max_scale=1e4, absorb_bias=False, clip="calibrated")
    assert ops(out) == {"Conv": 3, "Clip": 2}  # still one Clip each, which the quantizer fuses
    np.testing.assert_allclose(ort_run(out, calib)[0], ort_run(model, calib)[0], rtol=1e-4, atol=1e-4)
    w = _weights(out)
    clips = [n for n in out.graph.node if n.op_type == "Clip"]
    pre = ort_run(to_proto(exposed(model, ["e"], keep_outputs=False)), calib)[0].max(axis=(0, 2, 3))
    assert (pre >= 6).any() and (pre < 6).any()  # some channels reach Relu6's bound on this data, some not
    e6 = ort_run(to_proto(exposed(out, ["e6"], keep_outputs=False)), calib)[0].max(axis=(0, 2, 3))
    bound = float(w[clips[0].input[2]])
    # the expand output feeds a depthwise conv: the channels that reach Relu6's bound end at the one bound,
    # the others at half of it (headroom 2: what the data did not show is clipped only beyond 2x its maximum)
    np.testing.assert_allclose(e6[pre >= 6], bound, rtol=1e-4)
    np.testing.assert_allclose(e6[(pre > 0) & (pre < 6)], bound / 2, rtol=1e-4)


def test_the_check_holds_samples_out_when_there_are_enough():
    model = compensated()
    calib = _feeds(model, scale=1.0, n=24, seed=4)
    _, rec = _equalize(model, calib=calib, only_if_better=True, samples=12)
    assert "on 12 held-out calibration samples" in rec.details["criterion"]
    _, rec = _equalize(model, calib={"x": calib["x"][:12]}, only_if_better=True, samples=12)
    assert "too few to hold some out" in rec.details["criterion"]


def test_int8_accurate_preset_keeps_equalization_where_it_helps():
    from onnxopt.pass_infra import PassManager
    from onnxopt.recipe import load_preset

    model = compensated()
    calib = _feeds(model, scale=1.0, n=64, seed=8)
    recipe = load_preset("int8-accurate")
    # up to the quantizer: the fallback would take this two-layer model out of int8 altogether (< 35 dB)
    passes = [p for p in recipe.passes if p.type not in ("latency-placement", "precision-fallback")]
    ctx = PassContext(calibration=from_arrays(calib, model))
    result = PassManager(parse_passes(passes, ctx)).run(model)
    eq = next(r for r in result.records if r.name == "equalize")
    assert eq.modified and eq.details["kept"]
    out = result.model
    assert {n.op_type for n in out.graph.node} >= {"QuantizeLinear", "DequantizeLinear", "Conv"}
    feeds = _feeds(model, scale=1.0, n=16, seed=9)  # not the calibration data
    ref, got = ort_run(model, feeds)[0], ort_run(out, feeds)[0]
    sqnr = 10 * np.log10((ref.astype(np.float64) ** 2).sum() / ((ref - got).astype(np.float64) ** 2).sum())
    plain = PassManager(parse_passes([p for p in passes if p.type != "equalize"], ctx)).run(model).model
    base = ort_run(plain, feeds)[0]
    sqnr_plain = 10 * np.log10((ref.astype(np.float64) ** 2).sum() / ((ref - base).astype(np.float64) ** 2).sum())
    assert sqnr > sqnr_plain + 10 and sqnr > 25, (sqnr, sqnr_plain)  # measured 28.8 vs 2.0 dB


def parse_passes(configs, ctx):
    from onnxopt.registry import get_pass_class

    return [get_pass_class(c.type)(c, ctx) for c in configs]


def test_markdown_report_shows_the_recovery_step_per_layer():
    from onnxopt.pass_infra import PassManager
    from onnxopt.report import markdown_report

    model = compensated()
    calib = _feeds(model, scale=1.0, n=32, seed=4)
    ctx = PassContext(calibration=from_arrays(calib, model))
    pipeline = PassManager([Equalize(EqualizeConfig(samples=16, absorb_bias=False), ctx)]).run(model)
    text = markdown_report(pipeline=pipeline)
    d = pipeline.records[0].details
    assert "## Accuracy recovery" in text
    assert f"**equalize** (kept, {pipeline.records[0].seconds:.1f} s): output SQNR" in text
    # one row per compared layer output with its before / after SQNR
    for tensor, (before, after) in d["layer_sqnr_db"].items():
        assert f"| {tensor} |" in text and f"{after - before:+.2f}" in text
