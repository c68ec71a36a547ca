"""Calibrate: measure activation ranges for static quantization (post-training, INT8 PTQ).

The model runs in ONNX Runtime on a copy with the observed tensors exposed as extra graph
outputs, batch by batch from ``context.calibration``; every batch feeds one streaming observer
per tensor (``onnxopt.observers``) and is then dropped, so memory stays flat in the number of
samples. The model itself is not changed (``modified=False``): the ranges travel in the
``CalibrationResult`` for the QDQ-insertion pass to read with ``context.latest(CalibrationResult)``.

ORT runs at the *all* optimization level: a node whose output is a graph output is never fused
away (ORT's fusions refuse to remove a graph output), so every exposed tensor keeps its graph name
and its unfused value (a Conv output is the Conv's, not Conv+Clip's), while the convolutions still
get ORT's fast NCHWc kernels (EfficientNet-Lite0: ORT's share of calibration ~35 % faster than at
*basic*; the exposed values agree to float rounding). ORT computes the next batch while the
observers consume the current one, so at most two batches of activations are in memory (about
2 x batch_size x the model's activation bytes per sample: ~2.3 GB for EfficientNet-Lite0 at
batch 20), whatever the number of samples.

Ranges are cached on disk (``<context.cache_dir>/ranges`` or ``$XDG_CACHE_HOME/onnxopt/ranges``,
default ``~/.cache/onnxopt/ranges``) under a key hashing the model's content (``model_io.content_digest``:
its weight-less structure, then the large weights' bytes one tensor at a time, each let go after hashing),
the data content (streamed) and the config; a re-run with the same three skips the model entirely.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx_ir as ir
from pydantic import Field

from onnxopt.activations import activation_session, attention_masks, limited_batches, select_tensors
from onnxopt.data import samples_in, subset
from onnxopt.errors import DataError, OnnxoptError
from onnxopt.model_io import atomic_write, content_digest
from onnxopt.observers import Observer, make_observer
from onnxopt.pass_infra import Pass, PassConfig
from onnxopt.ranges import CalibrationResult, TensorRange
from onnxopt.runtime import run_batch

CALIBRATION_OPT_LEVEL = "all"  # see the module docstring
CACHE_VERSION = 3  # bump when observers change what they compute for the same inputs (3: IR model digest)


class CalibrateConfig(PassConfig):
    type: Literal["calibrate"] = "calibrate"
    # Default "mse": on EfficientNet-Lite0 (cleanup -> calibrate -> quantize-qdq with bias correction,
    # 100 calibration images, 650 val images, fp32 top-1 80.62 %) it gave the best logits SQNR and
    # top-1 (23.3 dB, 81.08 %, agreement with fp32 98.3 %; minmax 22.9 dB, 80.77 %, 98.5 %; percentile
    # 22.9 dB, 80.77 %, 97.8 %; entropy 15.0 dB, 80.15 %, 98.0 %); unlike percentile it follows the
    # target bit width.
    observer: Literal["minmax", "percentile", "entropy", "mse"] = Field(
        "mse", description="how a clip range is chosen from the observed values")
    percentile: float = Field(99.99, gt=50, le=100, description="percentile observer: keep [q(100-p), q(p)]")
    num_bins: int = Field(2048, ge=256, le=1 << 20, description="histogram bins (percentile/entropy/mse)")
    bits: int = Field(8, ge=2, le=16, description="target bit width (entropy levels, mse error model)")
    batch_size: int = Field(16, gt=0, description="samples per ONNX Runtime run")
    max_samples: int | None = Field(None, gt=0, description="use at most this many calibration samples")
    tensors: list[str] | None = Field(None, description="tensors to observe (default: every float activation)")
    cache: bool = Field(True, description="reuse ranges computed earlier for the same model, data and config")


# --------------------------------------------------------------------------------------------
# Data and cache keys
# --------------------------------------------------------------------------------------------
def data_digest(source, batch_size: int, max_samples: int | None) -> tuple[str, int]:
    """(content hash, sample count) of the samples calibration would use, read batch by batch."""
    h = hashlib.sha256()
    n = 0
    for batch in limited_batches(source, batch_size, max_samples):
        for name in sorted(batch):
            a = np.ascontiguousarray(batch[name])
            h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
            h.update(a.data.cast("B") if a.size else b"")
        n += samples_in(batch)
    return h.hexdigest(), n


def _cpu_count() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def default_cache_dir(context_dir: Path | None) -> Path:
    if context_dir is not None:
        return Path(context_dir) / "ranges"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "onnxopt" / "ranges"


# --------------------------------------------------------------------------------------------
# The pass
# --------------------------------------------------------------------------------------------
class Calibrate(Pass):
    name = "calibrate"
    summary = "Measure activation ranges on calibration data (min/max, percentile, entropy or MSE); model unchanged."
    Config = CalibrateConfig
    needs = frozenset({"calibration"})

    def call(self, model: ir.Model) -> CalibrationResult:
        cfg: CalibrateConfig = self.config  # type: ignore[assignment]
        start = time.perf_counter()
        source = self.context.calibration
        tensors = select_tensors(model, cfg.tensors)
        details: dict[str, Any] = {"observer": cfg.observer}
        if cfg.tensors is None:
            masks = attention_masks(model)  # -inf where masked: no range fits; quantize-qdq keeps them float
            if masks:
                tensors = [t for t in tensors if t not in masks]
                details["attention_masks"] = len(masks)
        if not tensors:
            raise OnnxoptError("calibrate: the model has no float activations to observe")

        cache_file = None
        if cfg.cache:
            key = self._cache_key(model, source, tensors)
            cache_file = default_cache_dir(self.context.cache_dir) / f"{key}.json"
            cached = self._read_cache(cache_file, key, details)
            if cached is not None:
                ranges, samples = cached
                details.update(self._summary(ranges, samples, [], start, cache="hit"))
                return CalibrationResult(model, modified=False, details=details, ranges=ranges)

        ranges, samples, skipped = self._observe(model, source, tensors)
        cache_state = "disabled"
        if cache_file is not None:
            cache_state = self._write_cache(cache_file, key, ranges, samples, details.pop("cache_error", None))
        details.update(self._summary(ranges, samples, skipped, start, cache=cache_state))
        return CalibrationResult(model, modified=False, details=details, ranges=ranges)

    # --- running ---------------------------------------------------------------------------
    def _observe(self, model: ir.Model, source, tensors: list[str]):
        """Run the model once over the data, one batch ahead of the observers.

        ORT computes batch k+1 on its own thread while the observers (a pool with one worker
        per core; numpy releases the GIL) consume batch k: on this model ORT's run
        keeps about one core busy whatever its thread count, so overlapping the two fills the
        other cores. At most two batches of activations are alive at any time.
        """
        cfg: CalibrateConfig = self.config  # type: ignore[assignment]
        graph_inputs = {i.name for i in model.graph.inputs}
        from_feed = [t for t in tensors if t in graph_inputs]
        fetch = [t for t in tensors if t not in graph_inputs]
        observers: dict[str, Observer] = {
            t: make_observer(cfg.observer, t, num_bins=cfg.num_bins, percentile=cfg.percentile, bits=cfg.bits)
            for t in tensors
        }
        cores = _cpu_count()
        session = activation_session(model, fetch, opt_level=CALIBRATION_OPT_LEVEL, what="model (calibration)",
                                     threads=max(1, cores // 2))
        feed_names = {i.name for i in session.get_inputs()}
        missing = sorted(feed_names - set(source.input_names))
        if missing:  # the data was opened for the model before earlier passes changed its inputs
            raise DataError(f"calibration data ({source.description}) has no values for model input(s) "
                            f"{', '.join(map(repr, missing))}")
        batches = limited_batches(source, cfg.batch_size, cfg.max_samples)
        done = 0

        def next_batch():
            """Runs on the ORT thread: the next batch and its activations, or None at the end."""
            batch = next(batches, None)
            if batch is None:
                return None
            feed = subset(batch, feed_names)
            values = run_batch(session, feed, fetch, first_sample=done) if fetch else {}
            for t in from_feed:
                values[t] = batch[t]
            return values, samples_in(batch)

        dropped: set[str] = set()
        total = len(source) if cfg.max_samples is None else min(len(source), cfg.max_samples)
        with ThreadPoolExecutor(1) as runner, ThreadPoolExecutor(min(cores, len(tensors))) as pool, \
                self.context.progress.task(f"calibrating ({cfg.observer})", total) as bar:
            ahead = runner.submit(next_batch)
            while (item := ahead.result()) is not None:
                values, n = item
                del item
                for t, v in values.items():
                    if t in observers and v.dtype.kind != "f":
                        dropped.add(t)  # type unknown before running; not float after all
                        del observers[t]
                first = done
                done += n  # read by next_batch for its error messages
                ahead = runner.submit(next_batch)
                jobs = sorted(((t, v) for t, v in values.items() if t in observers), key=lambda tv: -tv[1].size)
                del values
                try:
                    for f in [pool.submit(observers[t].update, v) for t, v in jobs]:
                        f.result()
                except OnnxoptError as exc:
                    ahead.cancel()
                    raise OnnxoptError(f"{exc} (batch starting at sample {first})") from None
                del jobs  # this batch's activations go before the next one is taken
                bar.update(n)
            if done == 0:
                raise OnnxoptError(f"calibrate: no calibration samples in {source.description}")
            empty = [t for t, o in observers.items() if o.count == 0]
            live = [t for t in tensors if t in observers and observers[t].count > 0]
            results = list(pool.map(lambda t: observers[t].tensor_range(), live))
        ranges = dict(zip(live, results, strict=True))
        return ranges, done, sorted(dropped) + empty

    # --- cache -----------------------------------------------------------------------------
    def _cache_key(self, model: ir.Model, source, tensors: list[str]) -> str:
        cfg: CalibrateConfig = self.config  # type: ignore[assignment]
        data_hash, _ = data_digest(source, cfg.batch_size, cfg.max_samples)
        parts = {
            "version": CACHE_VERSION,
            "model": content_digest(model),
            "data": data_hash,
            "config": cfg.model_dump(exclude={"cache"}),
            "tensors": tensors,
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    @staticmethod
    def _read_cache(path: Path, key: str, details: dict) -> tuple[dict[str, TensorRange], int] | None:
        if not path.is_file():
            return None
        try:
            raw = json.loads(path.read_text())
            if raw.get("key") != key or raw.get("version") != CACHE_VERSION:
                raise ValueError("key mismatch")
            ranges = {name: TensorRange(**value) for name, value in raw["ranges"].items()}
            return ranges, int(raw["samples"])
        except (OSError, ValueError, TypeError, KeyError, AttributeError, OnnxoptError) as exc:
            details["cache_error"] = f"ignored unreadable cache entry {path.name} ({type(exc).__name__})"
            return None

    @staticmethod
    def _write_cache(path: Path, key: str, ranges: dict[str, TensorRange], samples: int,
                     replaced: str | None) -> str:
        entry = {"version": CACHE_VERSION, "key": key, "samples": samples,
                 "ranges": {name: asdict(r) for name, r in ranges.items()}}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(path) as f:
                json.dump(entry, f, indent=1)
        except OSError as exc:
            return f"miss (not written: {exc.strerror or exc})"
        return "miss (rewrote corrupt entry)" if replaced else "miss"

    @staticmethod
    def _summary(ranges: dict[str, TensorRange], samples: int, skipped: list[str], start: float,
                 cache: str) -> dict[str, Any]:
        notes = {name: r.note for name, r in ranges.items() if r.note}
        clipped = sum(1 for r in ranges.values() if r.min > r.observed_min or r.max < r.observed_max)
        out: dict[str, Any] = {
            "tensors": len(ranges),
            "samples": samples,
            "clipped": clipped,
            "fallbacks": len(notes),
            "seconds": round(time.perf_counter() - start, 3),
            "cache": cache,
            "cache_hit": cache == "hit",
        }
        if notes:
            out["fallback_notes"] = dict(list(sorted(notes.items()))[:5])
        if skipped:
            out["skipped"] = skipped[:20]
        return out
