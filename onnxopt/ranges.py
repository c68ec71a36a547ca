"""Activation ranges: what calibration produces and QDQ insertion consumes.

Kept apart from both passes so that ranges can also come from a file (computed
elsewhere, or cached from an earlier run) with the same type.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from onnxopt.errors import OnnxoptError
from onnxopt.model_io import atomic_write
from onnxopt.pass_infra import PassResult


@dataclass(frozen=True)
class TensorRange:
    """The clip range [min, max] to quantize a tensor to, and what was actually observed."""

    min: float
    max: float
    observed_min: float
    observed_max: float
    observer: str = "minmax"
    # why the range differs from what the observer chose (e.g. zero-range fallback), if it does
    note: str = ""

    def __post_init__(self):
        for k in ("min", "max", "observed_min", "observed_max"):
            if not math.isfinite(getattr(self, k)):
                raise OnnxoptError(f"range {k}={getattr(self, k)} is not finite")
        if self.min > self.max:
            raise OnnxoptError(f"range min {self.min} > max {self.max}")


@dataclass
class CalibrationResult(PassResult):
    ranges: dict[str, TensorRange] = field(default_factory=dict)


def save_ranges(ranges: dict[str, TensorRange], path: str | Path) -> None:
    with atomic_write(path) as f:
        json.dump({name: asdict(r) for name, r in sorted(ranges.items())}, f, indent=1, sort_keys=True)


def load_ranges(path: str | Path) -> dict[str, TensorRange]:
    try:
        raw = json.loads(Path(path).read_text())
        return {name: TensorRange(**value) for name, value in raw.items()}
    except (OSError, ValueError, TypeError) as exc:
        raise OnnxoptError(f"{path}: not a ranges file ({exc})") from None
