"""Exceptions that carry a one-line, user-facing message.

The CLI maps them to exit codes: ``OnnxoptError`` (bad input or usage) -> 2,
``GateFailed`` -> 1. Anything else is a bug in onnxopt and is reported as such.
"""

from __future__ import annotations


class OnnxoptError(Exception):
    """Bad input or usage: the message names the problem and is shown as is."""


class ModelLoadError(OnnxoptError):
    """The file is not a loadable ONNX model (missing, not protobuf, truncated, unsafe external data)."""


class InvalidModelError(OnnxoptError):
    """The model loads but fails the ONNX checker or strict shape inference."""


class DataError(OnnxoptError):
    """Calibration/validation data missing or not matching the model's inputs."""


class RecipeError(OnnxoptError):
    """A recipe or preset cannot be parsed or names unknown passes/fields."""


class PassError(OnnxoptError):
    """A pass failed; the message names the pass and the passes that ran before it."""

    def __init__(self, message: str, *, pass_name: str, ran_before: list[str]):
        super().__init__(message)
        self.pass_name = pass_name
        self.ran_before = ran_before


class PreconditionError(OnnxoptError):
    """A pass's ``requires`` or ``ensures`` check did not hold."""


class GateFailed(Exception):
    """The validation gate rejected the candidate (exit code 1)."""
