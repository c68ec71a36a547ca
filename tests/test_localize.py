"""Per-layer error localization: the perturbed layer is named, QDQ tensors are compared through their DQ,
and the CLI shows it with --localize and when the gate fails."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from onnxopt.cli import main
from onnxopt.data import from_arrays
from onnxopt.localize import EXACT_DB, SQNR_CAP_DB, localize
from tests.passes.test_bit_assignment import chain_model, pipeline
from tests.passes.test_significance import three_layer_model


def perturbed(model: onnx.ModelProto, weight: str, rel: float) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    t = next(t for t in m.graph.initializer if t.name == weight)
    w = numpy_helper.to_array(t)
    noise = np.random.default_rng(5).standard_normal(w.shape).astype(np.float32) * rel * np.abs(w).mean()
    t.CopyFrom(numpy_helper.from_array((w + noise).astype(np.float32), weight))
    return m


def test_names_the_perturbed_layer_in_graph_order():
    ref = chain_model([6, 8, 8, 8, 4])
    cand = perturbed(ref, "w2", 0.3)
    x = np.random.default_rng(0).standard_normal((12, 6)).astype(np.float32)
    loc = localize(ref, cand, from_arrays({"x": x}, ref), batch_size=5, max_samples=10)
    assert [x.node for x in loc.layers] == ["mm0", "mm1", "mm2", "mm3"] and loc.samples == 10
    assert loc.worst[0].node == "mm2"
    first, second, third, last = loc.layers
    assert first.sqnr_db == second.sqnr_db == SQNR_CAP_DB and first.cosine == pytest.approx(1.0, abs=1e-9)
    assert third.sqnr_db < 40 and third.jump_db == pytest.approx(EXACT_DB - third.sqnr_db)
    # SQNR of mm2's output by hand
    h = x[:10]
    ws = {t.name: numpy_helper.to_array(t) for t in ref.graph.initializer}
    wc = {t.name: numpy_helper.to_array(t) for t in cand.graph.initializer}
    a = h @ ws["w0"] @ ws["w1"] @ ws["w2"]
    b = h @ wc["w0"] @ wc["w1"] @ wc["w2"]
    assert third.sqnr_db == pytest.approx(10 * np.log10((a ** 2).sum() / ((a - b) ** 2).sum()), abs=1e-3)
    assert last.jump_db < third.jump_db / 10  # mm3 only carries the error on
    assert "mm2" in loc.summary() and loc.to_dict()["worst"][0]["node"] == "mm2"


def test_qdq_candidate_compared_through_dequantize():
    model, x = three_layer_model()
    q = pipeline(model, x, average_bits=4.0).model  # every weight int4: the outlier layer breaks
    loc = localize(model, q, from_arrays({"x": x}, model), max_samples=16)
    assert loc.worst[0].node == "hard"
    by = {x.tensor: x for x in loc.layers}
    # the Relu after each Gemm is absorbed: its output is quantized and read through a DequantizeLinear
    assert by["r1"].compared_as == "r1_dequantized" and by["h1"].compared_as == ""
    assert by["h1"].sqnr_db > 35 and by["h2"].sqnr_db < by["r1"].sqnr_db - 15


def _files(tmp_path):
    ref = chain_model([6, 8, 8, 4])
    cand = perturbed(ref, "w1", 0.5)
    onnx.save(ref, tmp_path / "ref.onnx")
    onnx.save(cand, tmp_path / "cand.onnx")
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).standard_normal((20, 6)).astype(np.float32))
    return tmp_path / "ref.onnx", tmp_path / "cand.onnx", tmp_path / "d.npz"


def test_cli_localize_flag_and_gate_failure(tmp_path):
    ref, cand, data = _files(tmp_path)
    run = CliRunner()
    r = run.invoke(main, ["validate", str(ref), str(cand), "--data", str(data), "--localize",
                          "--report", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.stderr
    assert "per-layer error" in r.stdout and "largest error jumps: mm1" in r.stdout
    doc = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert doc["validation"]["localization"]["worst"][0]["node"] == "mm1"
    assert "## Per-layer error" in (tmp_path / "rep" / "report.md").read_text()
    # a failing gate localizes without being asked; --no-localize turns it off
    r = run.invoke(main, ["validate", str(ref), str(cand), "--data", str(data), "--min-sqnr-db", "60"])
    assert r.exit_code == 1 and "largest error jumps: mm1" in r.stdout
    r = run.invoke(main, ["validate", str(ref), str(cand), "--data", str(data), "--min-sqnr-db", "60",
                          "--no-localize"])
    assert r.exit_code == 1 and "per-layer error" not in r.stdout
    r = run.invoke(main, ["validate", str(ref), str(ref), "--data", str(data), "--min-sqnr-db", "60"])
    assert r.exit_code == 0 and "per-layer error" not in r.stdout
