"""Deciding "is B faster than A?" on a machine other processes share.

Two measures, each wrong in its own way: the sum of ORT's per-kernel times (``onnxopt.profiling``) is
steady under load but misses what happens between kernels (allocation, thread hand-offs, copies ORT
inserts); interleaved wall-clock time sees everything but moves with every other process. A layout or
placement decision is kept only when both say the same thing (``Verdict``), so neither a profile
artefact nor another process's burst makes it.

``Timer`` is the one place models are timed for decisions. Passes take it from ``timer()``, so a test
can swap in a deterministic cost model (``set_timer``) and check that decisions follow measurements.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir


@dataclass(frozen=True)
class Setting:
    """How a model is run: intra-op threads, ORT optimization level and session config entries."""

    threads: int = 1
    level: str = "all"
    config: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, threads: int = 1, level: str = "all", config: dict[str, str] | None = None) -> Setting:
        return cls(threads, level, tuple(sorted((config or {}).items())))

    @property
    def config_dict(self) -> dict[str, str]:
        return dict(self.config)


@dataclass
class Timed:
    """One model under one setting, with what has been measured of it."""

    model: ir.Model
    setting: Setting = field(default_factory=Setting)
    kernel_ms: list[float] = field(default_factory=list)
    wall_ms: list[float] = field(default_factory=list)
    session: Any = None

    @property
    def kernels(self) -> float:
        # the least of several profiles: other processes only ever add time to a kernel
        return min(self.kernel_ms) if self.kernel_ms else float("inf")

    @property
    def wall(self) -> float:
        return statistics.median(self.wall_ms) if self.wall_ms else float("inf")

    def reset(self) -> None:
        self.kernel_ms, self.wall_ms = [], []


@dataclass
class Verdict:
    kernel_gain: float  # share of the time saved by ``new`` according to the kernel sums
    wall_gain: float  # ... and according to interleaved wall-clock time
    accepted: bool

    def as_dict(self) -> dict[str, Any]:
        return {"kernel_gain": round(self.kernel_gain, 4), "wall_gain": round(self.wall_gain, 4),
                "accepted": self.accepted}


class Timer:
    """Measures models with ONNX Runtime on this machine."""

    def __init__(self, runs: int = 20):
        self.runs = runs

    def profile(self, model: ir.Model, feed: dict[str, np.ndarray], setting: Setting, runs: int | None = None,
                warmup: int = 2):
        """ORT's per-kernel profile (``onnxopt.profiling.Profile``) of ``model`` under ``setting``."""
        from onnxopt.profiling import profile

        return profile(model, feed, runs=runs or max(3, self.runs // 2), warmup=warmup, threads=setting.threads,
                       opt_level=setting.level, config=setting.config_dict)

    def profile_kernels(self, c: Timed, feed: dict[str, np.ndarray]) -> None:
        c.kernel_ms.append(self.profile(c.model, feed, c.setting).kernel_us / 1000)

    def race_wall(self, cands: list[Timed], feed: dict[str, np.ndarray]) -> None:
        from onnxopt.profiling import make_session

        for c in cands:
            if c.session is None:
                s = c.setting
                c.session = make_session(c.model, s.threads, s.level, s.config_dict)
            c.session.run(None, feed)
        for r in range(self.runs):
            for c in (cands if r % 2 == 0 else cands[::-1]):
                t0 = time.perf_counter()
                c.session.run(None, feed)
                c.wall_ms.append(1000 * (time.perf_counter() - t0))

    def race_kernels(self, cands: list[Timed], feed: dict[str, np.ndarray], rounds: int = 2) -> None:
        for r in range(rounds):
            for c in (cands if r % 2 == 0 else cands[::-1]):
                self.profile_kernels(c, feed)


_TIMER: Timer | None = None


def timer(runs: int = 20) -> Timer:
    """The timer passes use: ONNX Runtime's, unless a test installed another with ``set_timer``."""
    if _TIMER is not None:
        return _TIMER
    return Timer(runs)


@contextmanager
def set_timer(t: Timer) -> Iterator[Timer]:
    global _TIMER
    old, _TIMER = _TIMER, t
    try:
        yield t
    finally:
        _TIMER = old


def compare(t: Timer, old: Timed, new: Timed, feed: dict[str, np.ndarray], min_gain: float) -> Verdict:
    """Is ``new`` at least ``min_gain`` faster than ``old``? Kernel sums first (cheap to disagree with);
    only a kernel win is confirmed by interleaved wall-clock time, which must show at least half the
    gain (it is the noisier measure). Both measured afresh."""
    old.reset(), new.reset()
    t.race_kernels([old, new], feed)
    kg = 1 - new.kernels / old.kernels
    if kg < min_gain:
        return Verdict(kg, float("nan"), False)
    t.race_wall([old, new], feed)
    wg = 1 - new.wall / old.wall
    return Verdict(kg, wg, wg >= min_gain / 2)


# -- the session options a model asks for -------------------------------------------------------------
METADATA_KEY = "onnxopt.ort_session"


def recorded_session(model: ir.Model) -> dict[str, Any]:
    """The ORT session settings recorded in the model's metadata (empty when none)."""
    import json

    try:
        return dict(json.loads(model.metadata_props.get(METADATA_KEY, "{}")))
    except (ValueError, TypeError):
        return {}


def record_session(model: ir.Model, config: dict[str, str] | None = None, **settings: Any) -> dict[str, Any]:
    """Merge session config entries and settings into the model's recorded session options (passes that
    measure different things - layout, placement, threads - each add theirs)."""
    import json

    rec = recorded_session(model)
    if config:
        rec["session_config"] = {**rec.get("session_config", {}), **config}
    rec.update(settings)
    model.metadata_props[METADATA_KEY] = json.dumps(rec, sort_keys=True)
    return rec
