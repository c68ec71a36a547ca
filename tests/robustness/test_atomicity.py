"""Outputs and reports appear complete or not at all; inputs are never modified.

Failures are simulated where they hurt: a pass that raises, an interrupt (KeyboardInterrupt) at the
moment the model is renamed into place, a disk error while writing external data, an interrupt while
writing reports, and a failed gate.
"""

from __future__ import annotations

import os
from typing import Literal

import onnx
import pytest
from clihelp import assert_refused, cli
from corpus import LABELS, MODEL, VAL, file_hashes, listing

import onnxopt.model_io as model_io
from onnxopt import registry
from onnxopt.errors import OnnxoptError
from onnxopt.model_io import load_model, save_model
from onnxopt.pass_infra import Pass, PassConfig

MODELS = MODEL.parent


class ExplodeConfig(PassConfig):
    type: Literal["explode"] = "explode"


class Explode(Pass):
    name = "explode"
    summary = "Raises (tests)."
    Config = ExplodeConfig

    def call(self, model):
        raise RuntimeError("kaboom")


@pytest.fixture()
def explode(monkeypatch):
    monkeypatch.setitem(registry._registered, "explode", Explode)


def _interrupt_when_renaming_to(monkeypatch, target_name: str):
    real = os.replace

    def replace(src, dst, *a, **k):
        if os.path.basename(os.fspath(dst)) == target_name:
            raise KeyboardInterrupt
        return real(src, dst, *a, **k)

    monkeypatch.setattr(model_io.os, "replace", replace)


def test_failing_pass_leaves_nothing(tmp_path, explode):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes: [remove-identity, explode, dead-code-elimination]\n")
    out = tmp_path / "out"
    before = file_hashes(MODELS)
    code, _, err = cli("optimize", MODEL, "-o", out / "m.onnx", "-r", recipe, "--val", VAL, "--report", out / "rep",
                       "-q")
    assert_refused(code, err, r"pass 'explode' \(step 2, after remove-identity\) failed: RuntimeError: kaboom")
    assert listing(out) == []
    assert file_hashes(MODELS) == before


def test_interrupt_while_saving_leaves_no_model(tmp_path, monkeypatch):
    _interrupt_when_renaming_to(monkeypatch, "m.onnx")
    before = file_hashes(MODELS)
    code, _, err = cli("optimize", MODEL, "-o", tmp_path / "m.onnx", "-q")
    assert_refused(code, err, "interrupted")
    assert listing(tmp_path) == []  # neither the model nor the temporary folder
    assert file_hashes(MODELS) == before


def test_interrupt_while_overwriting_external_data_model_restores_the_previous_one(tmp_path, monkeypatch):
    """With --force and external data, the old model and its .data must survive an interrupt at the commit."""
    monkeypatch.setenv("ONNXOPT_EXTERNAL_THRESHOLD", "1000")
    out = tmp_path / "m.onnx"
    code, _, err = cli("optimize", MODEL, "-o", out, "-q")
    assert code == 0, err
    assert sorted(listing(tmp_path)) == ["m.onnx", "m.onnx.data"]
    previous = file_hashes(tmp_path)
    _interrupt_when_renaming_to(monkeypatch, "m.onnx")
    code, _, err = cli("optimize", MODEL, "-o", out, "-r", "cleanup", "--force", "-q")
    assert_refused(code, err, "interrupted")
    assert file_hashes(tmp_path) == previous and sorted(listing(tmp_path)) == ["m.onnx", "m.onnx.data"]
    load_model(out)  # still a complete, consistent pair


def test_disk_error_while_writing_external_data_leaves_nothing(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model_io.os, "fsync", full)
    with pytest.raises(OnnxoptError, match="cannot write output .*No space left"):
        save_model(onnx.load(MODEL), tmp_path / "m.onnx", external_data=True)
    assert listing(tmp_path) == []


def test_interrupt_while_writing_reports_leaves_no_partial_set(tmp_path, monkeypatch):
    rep = tmp_path / "rep"
    code, _, err = cli("validate", MODEL, MODEL, "--data", VAL, "--report", rep, "-q")
    assert code == 0, err
    previous = file_hashes(rep)

    def boom(*a, **k):
        raise KeyboardInterrupt

    import onnxopt.report

    monkeypatch.setattr(onnxopt.report.ET.ElementTree, "write", boom)  # junit.xml is written last
    code, _, err = cli("validate", MODEL, MODEL, "--data", VAL, "--max-abs-error", "1", "--report", rep, "-q")
    assert_refused(code, err, "interrupted")
    assert file_hashes(rep) == previous  # the old set, untouched; no temporary files
    assert sorted(listing(rep)) == ["junit.xml", "report.json", "report.md"]


def test_failed_gate_writes_reports_but_no_model(tmp_path):
    out, rep = tmp_path / "m.onnx", tmp_path / "rep"
    code, _, err = cli("optimize", MODEL, "-o", out, "--val", VAL, "--max-abs-error", "0", "--report", rep, "-q")
    assert code == 1 and "gate failed" in err and "not written" in err
    assert sorted(listing(tmp_path)) == ["rep", "rep/junit.xml", "rep/report.json", "rep/report.md"]


def test_keep_failed_writes_the_model_anyway(tmp_path):
    out = tmp_path / "m.onnx"
    code, _, _ = cli("optimize", MODEL, "-o", out, "--val", VAL, "--max-abs-error", "0", "--keep-failed", "-q")
    assert code == 1 and out.is_file()
    load_model(out)


def test_no_command_modifies_its_inputs(tmp_path):
    """Every command, with every input option, leaves the bytes of every input file unchanged."""
    before = file_hashes(MODELS)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes: [cleanup-does-not-exist]\n")
    runs = [
        ["optimize", MODEL, "-o", tmp_path / "a.onnx", "--calib", MODELS / "digits_calib.npz", "--val", VAL,
         "--labels", LABELS, "--report", tmp_path / "r1", "-q"],
        ["validate", MODEL, tmp_path / "a.onnx", "--data", VAL, "--labels", LABELS, "--max-abs-error", "1e-4",
         "--report", tmp_path / "r2", "-q"],
        ["inspect", MODEL], ["inspect", MODEL, "--json"], ["recipes"], ["recipes", "--show", "cleanup"],
    ]
    for args in runs:
        code, _, err = cli(*args)
        assert code == 0, (args, err)
    candidate = file_hashes(tmp_path / "a.onnx")
    code, _, err = cli("validate", tmp_path / "a.onnx", MODEL, "--data", VAL, "-q")
    assert code == 0, err
    assert file_hashes(tmp_path / "a.onnx") == candidate
    code, _, err = cli("optimize", MODEL, "-o", tmp_path / "b.onnx", "-r", recipe, "-q")
    assert code == 2
    assert file_hashes(MODELS) == before
