"""Shared helpers for the robustness tests (the corpus itself lives in corpus.py)."""

from __future__ import annotations

import re

from click.testing import CliRunner

from onnxopt.cli import main


def cli(*args, env: dict | None = None):
    """Run the CLI in-process; returns (exit code, stdout, stderr). Exceptions are not swallowed."""
    result = CliRunner(env=env).invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def assert_refused(code: int, stderr: str, message: str | None = None) -> str:
    """Exit 2, exactly one 'error: ...' line (matching ``message``), no traceback, no internal error."""
    assert "Traceback" not in stderr, stderr
    assert code == 2, f"exit {code}: {stderr}"
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, stderr
    assert "internal error" not in errors[0], errors[0]
    if message is not None:
        assert re.search(message, errors[0]), f"{message!r} not in {errors[0]!r}"
    return errors[0]
