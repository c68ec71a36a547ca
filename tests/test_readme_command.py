"""The README's first command (the main job on the bundled model) runs as written and does what it says."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_first_readme_command_quantizes_the_bundled_model_under_the_gate(tmp_path):
    block = re.search(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S).group(1)
    install, command = (part.strip() for part in block.split("&&", 1))
    assert install == "pip install -e ."
    argv = shlex.split(command)
    assert argv[:2] == ["onnxopt", "tune"]
    (tmp_path / "models").symlink_to(ROOT / "models")
    proc = subprocess.run([sys.executable, "-m", "onnxopt", *argv[1:], "-q"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((tmp_path / "out" / "tune" / "tune.json").read_text())
    winner = doc["winner"]
    assert winner["status"] == "pass" and not winner["config"].startswith("cleanup")  # a quantized model won
    assert winner["metrics"]["accuracy_drop_pt"] <= 1.0
    written = tmp_path / "out" / "digits_small.onnx"
    assert written.stat().st_size < 0.35 * (ROOT / "models" / "digits_cnn.onnx").stat().st_size
