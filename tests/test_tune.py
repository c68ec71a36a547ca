"""onnxopt tune on the bundled digits CNN: exit codes, refusals before any trial, the trial cache, determinism
across executors and worker counts (latency from a stubbed timer), failed and interrupted trials."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from onnxopt.cli import main
from onnxopt.executors import LocalExecutor
from onnxopt.timing import Timer, set_timer
from onnxopt.tune import tune

MODELS = Path(__file__).resolve().parents[1] / "models"
MODEL, VAL, LABELS = MODELS / "digits_cnn.onnx", MODELS / "digits_val.npz", MODELS / "digits_val_labels.npy"
CALIB = MODELS / "digits_calib.npz"


def cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output


class IntegerIsFast(Timer):
    """Latency stand-in: a Conv/Gemm reading a DequantizeLinear costs 1, in float 3, anything else 0.1."""

    def profile_kernels(self, c, feed):
        cost = 0.0
        for n in c.model.graph:
            if n.op_type in ("Conv", "Gemm"):
                p = n.inputs[0].producer()
                cost += 1.0 if p is not None and p.op_type == "DequantizeLinear" else 3.0
            else:
                cost += 0.1
        c.kernel_ms.append(cost)


def test_cli_writes_the_winner_reports_and_reuses_cached_trials(tmp_path):
    args = ["tune", MODEL, "-o", tmp_path / "best.onnx", "--calib", CALIB, "--val", VAL, "--labels", LABELS,
            "--max-accuracy-drop", "1", "--report", tmp_path / "rep", "-q"]
    code, out = cli(*args)
    assert code == 0, out
    onnx.checker.check_model(onnx.load(tmp_path / "best.onnx"), full_check=True)
    doc = json.loads((tmp_path / "rep" / "tune.json").read_text())
    labels = [t["config"] for t in doc["trials"]]
    assert labels[:2] == ["cleanup (float)", "int8"] and doc["cached_trials"] == 0
    assert all(t["status"] == "pass" for t in doc["trials"])
    assert doc["winner"]["trial"] in {t["trial"] for t in doc["trials"]} and doc["why"]
    assert doc["precision_map"] and all(v.split(",")[0].split(" ")[0] in ("float", "int8", "int16")
                                        for v in doc["precision_map"].values())
    junit = (tmp_path / "rep" / "junit.xml").read_text()
    assert junit.count("<testcase") == len(labels)
    # the same inputs again: every trial from the cache, same answer
    code, out = cli(*args[:2], "-o", tmp_path / "again.onnx", *args[4:])
    assert code == 0, out
    again = json.loads((tmp_path / "rep" / "tune.json").read_text())
    assert again["cached_trials"] == len(labels) and again["winner"]["trial"] == doc["winner"]["trial"]
    assert (tmp_path / "again.onnx").read_bytes() == (tmp_path / "best.onnx").read_bytes()
    assert again["seconds"] < 10


def test_bad_gates_are_refused_before_any_trial(tmp_path):
    base = ["tune", MODEL, "-o", tmp_path / "o.onnx", "--calib", CALIB, "--val", VAL,
            "--cache-dir", tmp_path / "cache"]
    code, out = cli(*base, "--max-accuracy-drop", "1")
    assert code == 2 and "--labels" in out
    code, out = cli(*base)
    assert code == 2 and "needs a gate" in out
    recipe = tmp_path / "r.yaml"
    recipe.write_text("gate: {min_sqnr_db: 20, outputs: [nope]}\n")
    code, out = cli(*base, "-r", recipe)
    assert code == 2 and "'nope'" in out
    assert not (tmp_path / "cache" / "trials").exists() and not (tmp_path / "o.onnx").exists()


def test_no_passing_trial_exits_1_and_writes_nothing(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("tune: {presets: [int8], max_layers: 1}\ngate: {min_sqnr_db: 200}\n")
    code, out = cli("tune", MODEL, "-o", tmp_path / "o.onnx", "--calib", CALIB, "--val", VAL, "-r", recipe,
                    "--report", tmp_path / "rep", "-q")
    assert code == 1 and "no trial passed" in out
    assert not (tmp_path / "o.onnx").exists()
    doc = json.loads((tmp_path / "rep" / "tune.json").read_text())
    assert doc["winner"] is None and len(doc["trials"]) == 3  # int8, then its worst layer at int16 / float
    assert all(t["status"] == "fail" and t["failed_checks"] for t in doc["trials"])
    assert doc["trials"][1]["round"] == 2


@pytest.mark.parametrize("executor,workers", [("local", 2), pytest.param("ray", 2, marks=pytest.mark.skipif(
    sys.platform != "linux", reason="local Ray is exercised on Linux CI"))])
def test_same_answer_and_bytes_whatever_the_executor_or_workers(tmp_path, executor, workers):
    pytest.importorskip(executor if executor == "ray" else "onnxopt")
    common = dict(calib=CALIB, val=VAL, labels=LABELS, gate={"max_accuracy_drop_pt": 1.0})
    with set_timer(IntegerIsFast()):
        one = tune(MODEL, tmp_path / "one.onnx", cache_dir=tmp_path / "c1", workers=1, executor="local", **common)
        other = tune(MODEL, tmp_path / "other.onnx", cache_dir=tmp_path / "c2", workers=workers, executor=executor,
                     **common)
    assert one.winner is not None and not one.winner.label.startswith("cleanup")  # integer compute won here
    assert [t.label for t in one.trials] == [t.label for t in other.trials]
    assert [t.passed for t in one.trials] == [t.passed for t in other.trials]
    assert other.winner.index == one.winner.index
    assert (tmp_path / "one.onnx").read_bytes() == (tmp_path / "other.onnx").read_bytes()


def test_a_trial_that_crashes_or_hangs_is_a_failed_trial(tmp_path):
    job = {"model": str(tmp_path / "missing.onnx"), "calib": str(CALIB), "val": str(VAL), "labels": None,
           "data": {}, "gate": {"min_sqnr_db": 10}, "cache_dir": str(tmp_path)}
    trial = {"index": 1, "label": "x", "recipe": {"passes": []}, "output": str(tmp_path / "t.onnx")}
    [r] = LocalExecutor(1).map(job, [trial])
    assert r["status"] == "error" and "missing.onnx" in r["error"]
    [r] = LocalExecutor(1, timeout_s=0.01).map({**job, "model": str(MODEL)}, [trial])
    assert r["status"] == "error" and "timed out" in r["error"]


def test_interrupt_writes_the_report_so_far_and_no_model(tmp_path, monkeypatch):
    import onnxopt.executors as executors

    def interrupted(self, job, trials):
        raise KeyboardInterrupt

    monkeypatch.setattr(executors.LocalExecutor, "map", interrupted)
    r = tune(MODEL, tmp_path / "o.onnx", calib=CALIB, val=VAL, gate={"min_sqnr_db": 10}, cache_dir=tmp_path / "c",
             report_dir=tmp_path / "rep")
    assert r.interrupted and r.winner is None and not (tmp_path / "o.onnx").exists()
    doc = json.loads((tmp_path / "rep" / "tune.json").read_text())
    assert doc["interrupted"] is True


def test_reports_hold_non_finite_metrics(tmp_path):
    from onnxopt.tune import Trial, TuneResult
    from onnxopt.tune_report import write_tune_reports

    t = Trial(1, "cleanup (float)", {"passes": []}, 1, result={
        "status": "ok", "passed": True, "size_bytes": 10, "metrics": {"y.sqnr_db": float("inf")}, "checks": []})
    t.latency_ms = 1.0
    paths = write_tune_reports(tmp_path, TuneResult([t], t, "only one", 1.0))
    doc = json.loads(paths[0].read_text())
    assert doc["trials"][0]["metrics"]["y.sqnr_db"] == "inf" and doc["winner"]["trial"] == 1


def test_latency_is_measured_under_the_models_recorded_session_options(tmp_path):
    # a float-compute model with int8-stored weights runs fast only with session.disable_quant_qdq
    import onnx_ir as ir

    from onnxopt.data import open_data
    from onnxopt.model_io import load_model, save_model
    from onnxopt.timing import record_session
    from onnxopt.tune import _latency

    seen = []

    class Spy(Timer):
        def profile_kernels(self, c, feed):
            seen.append(c.setting)
            c.kernel_ms.append(1.0)

    model = load_model(MODEL)
    val = open_data(str(VAL), model)
    record_session(model, {"session.disable_quant_qdq": "1"}, graph_optimization_level="extended")
    save_model(model, tmp_path / "m.onnx")
    with set_timer(Spy()):
        assert _latency(str(tmp_path / "m.onnx"), val, tmp_path / "cache") == 1.0
        plain = ir.load(str(MODEL))
        save_model(plain, tmp_path / "plain.onnx")
        _latency(str(tmp_path / "plain.onnx"), val, tmp_path / "cache")
    assert seen[0].level == "extended" and seen[0].config_dict == {"session.disable_quant_qdq": "1"}
    assert seen[0].threads == 1
    assert seen[-1].level == "all" and seen[-1].config_dict == {}


def test_confidence_rejects_a_pass_within_the_noise_of_the_rows_that_changed(tmp_path):
    from onnxopt.recipe import parse_recipe

    rec = parse_recipe({"name": "t", "passes": [], "tune": {"presets": ["cleanup", "w4a8", "int4-weight-only"]}})
    common = dict(calib=CALIB, val=VAL, labels=LABELS, gate={"max_accuracy_drop_pt": 0.0}, recipe=rec,
                  cache_dir=tmp_path / "c")
    with set_timer(IntegerIsFast()):
        literal = tune(MODEL, None, **common)
        sure = tune(MODEL, tmp_path / "sure.onnx", confidence=0.9, report_dir=tmp_path / "rep", **common)
    by = {t.label: t for t in literal.trials}
    w4 = by["w4a8"].result["metrics"]
    # on this data w4a8 changes one row of 597 (for the better): a pass as measured, the fastest
    assert (w4["accuracy_rows"], w4["accuracy_changed_rows"]) == (597, 1) and w4["accuracy_drop_pt"] < 0
    assert literal.winner.label == "w4a8" and by["int4-weight-only"].result["metrics"]["accuracy_changed_rows"] == 0
    [note] = literal.notes  # a 0-pt gate is finer than one row: the user is told, and pointed at --confidence
    assert "less than one of the 597 labelled rows (0.17 pt)" in note and "--confidence" in note
    # at 90 %: -0.17 + 1.28 * 100 * sqrt(1) / 597 = +0.05 pt > 0 -> within noise; int4-weight-only changed nothing
    assert all(t.cached for t in sure.trials)
    noisy = {t.label: t.noise for t in sure.trials if t.noise}
    assert list(noisy) == ["w4a8"] and "+ 0.21 (noise of 1 of 597 rows) > 0" in noisy["w4a8"][0]
    assert sure.winner.label == "int4-weight-only" and "90% confidence" in sure.why
    doc = json.loads((tmp_path / "rep" / "tune.json").read_text())
    assert doc["confidence"] == 0.9 and doc["notes"] == [] == sure.notes
    row = next(t for t in doc["trials"] if t["config"] == "w4a8")
    assert row["status"] == "fail" and row["within_noise"] == noisy["w4a8"]


def test_within_noise_bounds_accuracy_drop_and_agreement():
    from onnxopt.tune import within_noise

    def result(metric, value, threshold, cmp, **metrics):
        check = {"name": metric if metric == "accuracy_drop_pt" else f"y.{metric}", "metric": metric,
                 "output": None if metric == "accuracy_drop_pt" else "y", "threshold": threshold, "value": value,
                 "comparison": cmp, "status": "pass"}
        return {"status": "ok", "passed": True, "checks": [check], "metrics": metrics}

    z = 1.2815515655446004  # 90 % one-sided
    drop = result("accuracy_drop_pt", 0.0, 0.1, "<=", accuracy_rows=300, accuracy_changed_rows=7)
    [why] = within_noise(drop, z)  # 0 + 1.28 * 100 * sqrt(7) / 300 = 1.13 pt
    assert "0.00 + 1.13 (noise of 7 of 300 rows) > 0.1" in why
    assert within_noise(result("accuracy_drop_pt", 0.0, 0.1, "<=", accuracy_rows=300, accuracy_changed_rows=0), z) == []
    assert within_noise(result("accuracy_drop_pt", 0.0, 1.2, "<=", accuracy_rows=300, accuracy_changed_rows=7), z) == []
    # one disagreement of 300: 99.67 - 0.43 = 99.24 holds 99, not 99.5
    agree = 100 * 299 / 300
    assert within_noise(result("top1_agreement_pct", agree, 99.0, ">=", **{"y.samples": 300}), z) == []
    [why] = within_noise(result("top1_agreement_pct", agree, 99.5, ">=", **{"y.samples": 300}), z)
    assert "99.67 - 0.43 (noise of 1 of 300 rows) < 99.5" in why
    # results without the counts (cached by an older version) cannot be vouched for; failed trials are left as they are
    assert within_noise(result("accuracy_drop_pt", 0.0, 0.1, "<="), z)
    assert within_noise({"status": "ok", "passed": False, "checks": [], "metrics": {}}, z) == []


def test_attention_models_get_a_fused_float_trial_that_is_lossless():
    import numpy as np
    import onnxruntime as ort
    from bert_graph import bert_feeds, bert_model

    from onnxopt.model_io import as_ir, to_proto
    from onnxopt.pass_infra import PassContext, PassManager
    from onnxopt.recipe import parse_recipe
    from onnxopt.tune import first_round

    proto = bert_model()
    plan = dict(first_round(as_ir(proto), "latency", None))
    assert list(plan)[:2] == ["cleanup (float)", "int8"] and "float, fused" in plan and "int8-dynamic" in plan
    rec = parse_recipe(plan["float, fused"])
    assert [p.type for p in rec.passes] == ["transformer-fusion", "transformer-layout"]
    with set_timer(IntegerIsFast()):  # transformer-layout's measurements: stubbed, deterministic
        fused = to_proto(PassManager(rec.build_passes(PassContext())).run(as_ir(proto)).model)
    assert {n.op_type for n in fused.graph.node} & {"Attention", "SkipLayerNormalization", "BiasGelu", "FastGelu",
                                                     "LayerNormalization"}
    feeds = bert_feeds()
    ref = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = ort.InferenceSession(fused.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    for a, b in zip(ref, got, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    assert "float, fused" not in dict(first_round(as_ir(onnx.load(MODEL)), "latency", None))  # no attention
