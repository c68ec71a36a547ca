"""Same inputs and recipe -> byte-identical model and reports, across separate processes.

Two fresh processes (different PYTHONHASHSEED, so any dependence on set/dict-of-str order shows) run the
same command from two folders with the same relative paths (the command line is recorded in the report).
The optimized model, junit.xml and report.json must be byte-identical, except report.json's per-pass
``seconds`` (wall time, masked here) and report.md's time column (masked likewise). Nothing else in
the reports or the model carries a timestamp.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from corpus import LABELS, MODEL, VAL

CALIB = MODEL.parent / "digits_calib.npz"


def _start(folder, recipe: str, seed: int, cache) -> subprocess.Popen:
    folder.mkdir()
    args = ["optimize", str(MODEL), "-o", "out.onnx", "-r", recipe, "--val", str(VAL), "--labels", str(LABELS),
            "--report", "rep", "-q"]
    if recipe.startswith("int8"):
        args += ["--calib", str(CALIB)]
    env = {**os.environ, "PYTHONHASHSEED": str(seed), "XDG_CACHE_HOME": str(cache)}
    return subprocess.Popen([sys.executable, "-m", "onnxopt.cli", *args], cwd=folder, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _mask(doc):
    if isinstance(doc, dict):
        return {k: ("<masked>" if k == "seconds" else _mask(v)) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_mask(v) for v in doc]
    return doc


@pytest.mark.parametrize("recipe", ["cleanup", "int8"])
def test_two_processes_give_identical_outputs(tmp_path, recipe):
    if recipe == "int8":
        from onnxopt.recipe import preset_names

        if "int8" not in preset_names():
            pytest.skip("no int8 preset")
    a, b = tmp_path / "a", tmp_path / "b"
    # separate calibration caches: both runs compute their ranges (a cache hit would be reported as such)
    procs = [_start(a, recipe, 1, tmp_path / "cache-a"), _start(b, recipe, 2, tmp_path / "cache-b")]
    for proc in procs:  # run side by side
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    assert (a / "out.onnx").read_bytes() == (b / "out.onnx").read_bytes()
    assert (a / "rep" / "junit.xml").read_bytes() == (b / "rep" / "junit.xml").read_bytes()
    ja, jb = (json.loads((d / "rep" / "report.json").read_text()) for d in (a, b))
    assert _mask(ja) == _mask(jb)
    assert "timestamp" not in ja
    times = re.compile(r"\| [0-9.]+ \|$", re.M)  # the last column of the passes table
    ma, mb = (times.sub("| <masked> |", (d / "rep" / "report.md").read_text()) for d in (a, b))
    assert ma == mb
