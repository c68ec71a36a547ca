"""The validation gate, end to end on tiny models with hand-computed differences."""

from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.data import from_arrays, open_data
from onnxopt.errors import DataError, OnnxoptError
from onnxopt.recipe import GateConfig
from onnxopt.runtime import ort_version
from onnxopt.validate import validate

W = np.array([[1, 0, 2], [0, 1, 0], [1, 1, 1], [0, 0, -1]], np.float32)
B = np.array([0.5, -1.0, 0.0], np.float32)
X = np.arange(20, dtype=np.float32).reshape(5, 4)  # x[:, 0] = 0, 4, 8, 12, 16
# Reference y = X @ W + B; column 0 minus column 1 is 0.5 on every row, so argmax is 0 everywhere.


def linear_model(w=W, b=B, *, batch="N", argmax=False, out_shape=(3,), input_name="x", output_name="y"):
    nodes = [helper.make_node("MatMul", [input_name, "W"], ["xw"]), helper.make_node("Add", ["xw", "B"], [output_name])]
    outputs = [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [batch, *out_shape] if out_shape else None)]
    if argmax:
        nodes.append(helper.make_node("ArgMax", [output_name], ["cls"], axis=1, keepdims=0))
        outputs.append(helper.make_tensor_value_info("cls", TensorProto.INT64, [batch]))
    graph = helper.make_graph(
        nodes, "linear", [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch, 4])], outputs,
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def perturbed(delta=-0.1, **kw):
    """W[0, 0] += delta: column 0 of y moves by delta * x0, i.e. 0, .4, .8, 1.2, 1.6 for delta=-0.1."""
    w = W.copy()
    w[0, 0] += delta
    return linear_model(w, **kw)


REF = linear_model()
DATA = from_arrays({"x": X}, REF)
GATE = GateConfig(max_abs_error=1e-5, max_mean_abs_error=1e-6, min_cosine=0.9999, min_sqnr_db=60,
                  min_top1_agreement_pct=100)


def test_identical_models_pass():
    rep = validate(REF, linear_model(), DATA, gate=GATE, batch_size=2)
    assert rep.passed and rep.samples == 5 and rep.batch_size == 2
    m = rep.outputs["y"]
    assert m.max_abs == 0.0 and m.mean_abs == 0.0 and m.cosine_min == pytest.approx(1.0, abs=1e-12)
    assert m.sqnr_db == float("inf") and m.top1_agreement_pct == 100.0
    assert [c.name for c in rep.checks] == ["y.max_abs_error", "y.mean_abs_error", "y.cosine_min", "y.sqnr_db",
                                           "y.top1_agreement_pct"]
    assert all(c.status == "pass" and c.passed for c in rep.checks)
    assert rep.opt_level == "all" and rep.ort_version == ort_version()
    assert rep.data == "arrays: 5 samples"
    assert rep.summary() == "gate passed (5 checks)"


def test_perturbed_candidate_fails_with_hand_computed_numbers():
    rep = validate(REF, perturbed(), DATA, gate=GATE, batch_size=2)
    assert not rep.passed
    m = rep.outputs["y"]
    assert m.max_abs == pytest.approx(1.6, abs=1e-5)
    assert m.mean_abs == pytest.approx(4.0 / 15, abs=1e-6)  # (0+.4+.8+1.2+1.6) / 15 elements
    # column-0 minus column-1 becomes .5, .1, -.3, -.7, -1.1: argmax flips on 3 of 5 rows
    assert m.top1_agreement_pct == pytest.approx(40.0, abs=1e-9)
    by_name = {c.name: c for c in rep.checks}
    c = by_name["y.max_abs_error"]
    assert c.status == "fail" and not c.passed and c.threshold == 1e-5 and c.value == pytest.approx(1.6, abs=1e-5)
    assert c.message == "y.max_abs_error = 1.6 exceeds the limit 1e-05"
    assert by_name["y.top1_agreement_pct"].message == "y.top1_agreement_pct = 40 is below the minimum 100"
    assert rep.summary().startswith("gate failed: y.max_abs_error = 1.6 exceeds the limit 1e-05 (+")


def test_loose_gate_passes_perturbed_candidate():
    gate = GateConfig(max_abs_error=2.0, min_top1_agreement_pct=40)
    assert validate(REF, perturbed(), DATA, gate=gate).passed


def test_accuracy_with_labels():
    labels = np.array([0, 0, 0, 0, 1])
    rep = validate(REF, perturbed(), DATA, labels=labels, gate=GateConfig(max_accuracy_drop_pt=10))
    # reference predicts 0 everywhere: 4/5; candidate predicts 0, 0, 1, 1, 1: 3/5
    assert rep.accuracy_output == "y"
    assert rep.accuracy_reference_pct == pytest.approx(80.0, abs=1e-12)
    assert rep.accuracy_candidate_pct == pytest.approx(60.0, abs=1e-12)
    assert rep.accuracy_drop_pt == pytest.approx(20.0, abs=1e-12)
    # rows 2 and 3 became wrong, row 4 right: three changed, net one (the drop's noise is in the count)
    assert (rep.accuracy_changed, rep.accuracy_rows) == (3, 5)
    assert rep.to_dict()["accuracy"]["changed_rows"] == 3
    (check,) = rep.checks
    assert check.name == "accuracy_drop_pt" and check.status == "fail" and not rep.passed


def test_accuracy_without_labels_is_skipped_not_passed():
    rep = validate(REF, linear_model(), DATA, gate=GateConfig(max_abs_error=1e-5, max_accuracy_drop_pt=1))
    skipped = [c for c in rep.checks if c.status == "skip"]
    assert [c.name for c in skipped] == ["accuracy_drop_pt"]
    assert not skipped[0].passed and "no labels" in skipped[0].message
    assert rep.passed  # a skipped check does not fail the gate ...
    assert rep.summary() == "gate passed (2 checks, 1 skipped)"  # ... but it is visible
    assert rep.accuracy_reference_pct is None and rep.accuracy_drop_pt is None


def test_labels_length_mismatch():
    with pytest.raises(DataError, match="3 labels but the data has 5 samples"):
        validate(REF, REF, DATA, labels=np.array([0, 1, 2]))


def test_nan_in_candidate_fails_every_check_on_that_output():
    b = B.copy()
    b[1] = np.nan
    rep = validate(REF, linear_model(b=b), DATA, gate=GATE)
    assert not rep.passed
    assert rep.outputs["y"].nan_candidate == 5
    assert len(rep.checks) == 5 and all(c.status == "fail" for c in rep.checks)
    assert all("candidate output has 5 NaN/Inf values (5 NaN)" in c.message for c in rep.checks)


def test_nan_never_passes_even_on_lenient_thresholds():
    b = B.copy()
    b[:] = np.nan
    gate = GateConfig(min_sqnr_db=-1e9, min_cosine=-1, max_abs_error=1e30)
    assert not validate(REF, linear_model(b=b), DATA, gate=gate).passed


def test_gate_outputs_restrict_and_int_outputs_use_exact_match():
    ref = linear_model(argmax=True)
    cand = perturbed(argmax=True)
    data = from_arrays({"x": X}, ref)
    rep = validate(ref, cand, data, gate=GateConfig(max_abs_error=2.0))
    by_name = {c.name: c for c in rep.checks}
    assert set(by_name) == {"y.max_abs_error", "cls.exact_match_pct"}
    assert rep.outputs["cls"].kind == "exact" and rep.outputs["cls"].exact_match_pct == pytest.approx(40.0)
    assert by_name["cls.exact_match_pct"].threshold == 100.0 and by_name["cls.exact_match_pct"].status == "fail"
    # top-1 threshold is the tolerance for class-id outputs too
    rep = validate(ref, cand, data, gate=GateConfig(max_abs_error=2.0, min_top1_agreement_pct=40))
    assert rep.passed
    # restricting the gate to 'y' leaves 'cls' unchecked (metrics are still reported)
    rep = validate(ref, cand, data, gate=GateConfig(max_abs_error=2.0, outputs=["y"]))
    assert rep.passed and [c.name for c in rep.checks] == ["y.max_abs_error"] and "cls" in rep.outputs


def test_unknown_gate_output():
    with pytest.raises(OnnxoptError, match=r"gate\.outputs names unknown output\(s\) 'logits' \(model outputs: 'y'\)"):
        validate(REF, REF, DATA, gate=GateConfig(max_abs_error=1, outputs=["logits"]))


def test_top1_on_non_classification_output_is_skipped():
    w = np.ones((4, 1), np.float32)
    ref = linear_model(w, np.zeros(1, np.float32), out_shape=(1,))
    rep = validate(ref, ref, from_arrays({"x": X}, ref), gate=GateConfig(min_top1_agreement_pct=99))
    (check,) = rep.checks
    assert check.status == "skip" and "not [N, C]" in check.message and rep.passed


def test_interface_differences_are_errors():
    with pytest.raises(OnnxoptError, match=r"candidate inputs differ.*only in reference: 'x'; only in candidate: 'z'"):
        validate(REF, linear_model(input_name="z"), DATA)
    with pytest.raises(OnnxoptError, match=r"candidate outputs differ.*only in reference: 'y'; only in candidate: 'logits'"):
        validate(REF, linear_model(output_name="logits"), DATA)


def test_output_shape_difference_fails_the_output():
    cand = linear_model(np.ones((4, 2), np.float32), np.zeros(2, np.float32), out_shape=None)
    rep = validate(REF, cand, DATA, gate=GateConfig(max_abs_error=1))
    (check,) = rep.checks
    assert check.status == "fail" and "shape differs: candidate [5, 2] vs reference [5, 3]" in check.message


def test_candidate_that_ort_cannot_load():
    bad = linear_model()
    bad.graph.node[1].op_type = "NoSuchOp"
    with pytest.raises(OnnxoptError, match="^onnxruntime cannot load candidate: "):
        validate(REF, bad, DATA)


def test_static_batch_one_is_clamped_and_noted():
    ref = linear_model(batch=1)
    rep = validate(ref, ref, from_arrays({"x": X}, ref), gate=GateConfig(max_abs_error=0), batch_size=32)
    assert rep.passed and rep.batch_size == 1 and rep.samples == 5
    assert any("clamped to 1" in n for n in rep.notes)


def test_no_gate_means_no_checks():
    rep = validate(REF, perturbed(), DATA)
    assert rep.passed and rep.checks == [] and rep.summary() == "gate passed (no thresholds set)"
    assert rep.outputs["y"].max_abs == pytest.approx(1.6, abs=1e-5)


def test_opt_level_is_used_and_recorded():
    rep = validate(REF, perturbed(), DATA, opt_level="disable", gate=GATE)
    assert rep.opt_level == "disable" and rep.outputs["y"].max_abs == pytest.approx(1.6, abs=1e-5)


def test_to_dict_is_strict_json():
    rep = validate(REF, REF, DATA, gate=GATE)
    d = rep.to_dict()
    text = json.dumps(d, allow_nan=False)
    assert d["outputs"]["y"]["sqnr_db"] == "inf"
    assert json.loads(text)["checks"][0]["name"] == "y.max_abs_error"
    assert d["opt_level"] == "all" and d["onnxruntime"] == ort_version()


def test_npz_folder_gives_same_metrics_as_single_file(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((23, 4)).astype(np.float32)
    np.savez(tmp_path / "all.npz", x=x)
    folder = tmp_path / "parts"
    folder.mkdir()
    for i, (a, b) in enumerate(((0, 7), (7, 15), (15, 23))):
        np.savez(folder / f"p{i}.npz", x=x[a:b])
    cand = perturbed(-0.01)
    labels = rng.integers(0, 3, 23)
    gate = GateConfig(max_abs_error=1e-3, min_cosine=0.99, max_accuracy_drop_pt=5)
    one = validate(REF, cand, open_data(tmp_path / "all.npz", REF), labels=labels, gate=gate, batch_size=5)
    many = validate(REF, cand, open_data(folder, REF), labels=labels, gate=gate, batch_size=5)
    assert one.samples == many.samples == 23
    for attr in ("max_abs", "mean_abs", "cosine_min", "cosine_mean", "sqnr_db", "top1_agreement_pct"):
        assert getattr(many.outputs["y"], attr) == pytest.approx(getattr(one.outputs["y"], attr), rel=1e-9, abs=1e-12)
    assert many.accuracy_drop_pt == one.accuracy_drop_pt
    assert [(c.name, c.status) for c in many.checks] == [(c.name, c.status) for c in one.checks]


def test_static_batch_two_with_odd_sample_count():
    ref = linear_model(batch=2)
    rep = validate(ref, perturbed(batch=2), from_arrays({"x": X}, ref), gate=GateConfig(max_abs_error=2))
    assert rep.samples == 5 and rep.batch_size == 2 and rep.passed
    assert rep.outputs["y"].samples == 5 and rep.outputs["y"].max_abs == pytest.approx(1.6, abs=1e-5)
