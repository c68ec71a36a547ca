"""Bit assignment: choose 4/8/16-bit weights (8/16-bit activations) per layer from significance scores.

Scores come from the ``significance`` pass run earlier (``SignificanceResult``) or from
``scores_file``. A score ``s_c`` is the loss increase when component c alone is quantized at the
scoring width ``b_s`` (4 bits by default); quantization noise power falls by 4x per extra bit, so
the error of c at b bits is modelled as ``s_c * 4^-(b - b_s)``. Starting from every layer at the
lowest width, upgrades are taken greedily by error removed per extra weight bit (a convex knapsack,
so the greedy order is the optimal fractional one); an upgrade that does not fit is skipped and
smaller ones still fill the budget. Per-channel-group scores are summed per layer.

Budgets (exactly one):

* ``average_bits``: mean bits per weight parameter over every scored layer, never exceeded
  (integer arithmetic: sum(bits * params) <= floor(budget * params));
* ``weight_bytes``: total weight payload bytes (bits * params / 8);
* ``max_accuracy_drop_pt``: the cheapest prefix of the greedy upgrade path whose weight-quantized
  model (fake-quantized in float, on labelled scoring data) loses at most that many top-1 points;
  found by bisection, then verified and repaired (walked forward) if the path is not monotone.

The result (``BitAssignmentResult``) carries per-tensor overrides that ``quantize-qdq`` later in the
same pipeline applies (4 bits: int4 weights with MSE-clipped per-channel ranges, which ORT runs
as DequantizeLinear + float op; 16 bits: int16); ``overrides_file`` also writes them as a recipe snippet.
"""

from __future__ import annotations

import heapq
import json
import math
from typing import Any, Literal

import numpy as np
import onnx_ir as ir
import yaml
from pydantic import Field, model_validator

from onnxopt.errors import PreconditionError
from onnxopt.graph import Namer, clone_model, constant_value
from onnxopt.mixed import (
    BitAssignmentResult,
    Component,
    SignificanceResult,
    average_bits,
    fake_quantize,
    layer_of,
    load_scores,
    overrides_for,
    pick_output,
    scoring_data,
    weight_components,
)
from onnxopt.model_io import atomic_write
from onnxopt.pass_infra import Pass, PassConfig
from onnxopt.runtime import make_session, run_batch, static_batch


class BitAssignmentConfig(PassConfig):
    type: Literal["bit-assignment"] = "bit-assignment"
    average_bits: float | None = Field(None, gt=0, description="budget: mean bits per weight parameter")
    weight_bytes: int | None = Field(None, gt=0, description="budget: total weight bytes (bits x params / 8)")
    max_accuracy_drop_pt: float | None = Field(
        None, ge=0, description="budget: top-1 drop (points) of the weight-quantized model on labelled data")
    weight_bits: list[Literal[4, 8, 16]] = Field([4, 8, 16], description="widths a layer's weights may get")
    activation_16bit_top: int = Field(0, ge=0, description="give 16-bit activations to this many top-scored tensors")
    scores_file: str | None = Field(None, description="scores JSON (default: the significance pass's result)")
    overrides_file: str | None = Field(None, description="also write the quantize-qdq overrides here (YAML/JSON)")
    data: Literal["calibration", "validation"] = Field("calibration", description="data for max_accuracy_drop_pt")
    labels_file: str | None = Field(None, description="labels for that data, if not given on the CLI")
    max_samples: int = Field(200, gt=0)
    batch_size: int = Field(25, gt=0)

    @model_validator(mode="after")
    def _one_budget(self) -> BitAssignmentConfig:
        given = [k for k in ("average_bits", "weight_bytes", "max_accuracy_drop_pt") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("set exactly one budget: average_bits, weight_bytes or max_accuracy_drop_pt"
                             + (f" (got {', '.join(given)})" if given else ""))
        if not self.weight_bits:
            raise ValueError("weight_bits must list at least one width")
        return self


def upgrade_path(scores: dict[str, float], params: dict[str, int], levels: list[int],
                 score_bits: int) -> list[tuple[str, int]]:
    """Every upgrade (layer, new bits) from all-lowest to all-highest, best error removed per bit first."""
    def err(k: str, b: int) -> float:
        return max(scores.get(k, 0.0), 0.0) * 4.0 ** -(b - score_bits)

    heap: list[tuple[float, str, int]] = []
    for k in params:
        if len(levels) > 1:
            gain = (err(k, levels[0]) - err(k, levels[1])) / ((levels[1] - levels[0]) * params[k])
            heapq.heappush(heap, (-gain, k, 1))
    path = []
    while heap:
        _, k, i = heapq.heappop(heap)
        path.append((k, levels[i]))
        if i + 1 < len(levels):
            gain = (err(k, levels[i]) - err(k, levels[i + 1])) / ((levels[i + 1] - levels[i]) * params[k])
            heapq.heappush(heap, (-gain, k, i + 1))
    return path


def assign_within(path: list[tuple[str, int]], params: dict[str, int], lowest: int, cap_bits: int) -> dict[str, int]:
    """Take upgrades in path order while the total stays <= ``cap_bits``; one that does not fit is
    skipped (and the layer's later upgrades with it), smaller ones still fill the rest."""
    bits = dict.fromkeys(params, lowest)
    total = lowest * sum(params.values())
    blocked: set[str] = set()
    for k, b in path:
        if k in blocked:
            continue
        cost = (b - bits[k]) * params[k]
        if total + cost <= cap_bits:
            bits[k] = b
            total += cost
        else:
            blocked.add(k)
    return bits


class BitAssignment(Pass):
    name = "bit-assignment"
    summary = ("Choose 4/8/16-bit weights per layer from significance scores under a budget (average bits, "
               "bytes or accuracy drop); quantize-qdq applies it.")
    Config = BitAssignmentConfig

    def requires(self, model: ir.Model) -> None:
        super().requires(model)
        if self.config.scores_file is None and self.context.latest(SignificanceResult) is None:
            raise PreconditionError("bit-assignment needs scores: run the 'significance' pass before it "
                                    "(or set scores_file)")

    def call(self, model: ir.Model) -> BitAssignmentResult:
        cfg: BitAssignmentConfig = self.config
        model, named = self._name_nodes(model)
        scored = load_scores(cfg.scores_file) if cfg.scores_file else self.context.latest(SignificanceResult)
        layers = weight_components(model)
        params = {c.name: c.params for c in layers}
        scores: dict[str, float] = {}
        for e in scored.entries:
            if e.kind == "weight":
                key = layer_of(e.name)
                if key not in params:
                    raise PreconditionError(f"scores name {e.name!r}, which is not a weighted node of the model")
                scores[key] = scores.get(key, 0.0) + max(e.score, 0.0)
        levels = sorted(set(cfg.weight_bits))
        path = upgrade_path(scores, params, levels, scored.setting_bits)
        total = sum(params.values())
        details: dict[str, Any] = {}
        if cfg.max_accuracy_drop_pt is not None:
            bits, details["verification"] = self._by_accuracy(model, layers, path, levels)
        else:
            cap = (math.floor(cfg.average_bits * total + 1e-9) if cfg.average_bits is not None
                   else cfg.weight_bytes * 8)
            floor_bits = levels[0] * total
            if cap < floor_bits:
                what = (f"average_bits {cfg.average_bits}" if cfg.average_bits is not None
                        else f"weight_bytes {cfg.weight_bytes}")
                raise PreconditionError(f"{what} is below the smallest assignment ({levels[0]} bits everywhere: "
                                        f"{floor_bits / 8:.0f} bytes, {levels[0]} average bits)")
            bits = assign_within(path, params, levels[0], cap)
        act_bits = self._activations(scored)
        overrides = overrides_for(bits, act_bits, layers)
        avg = average_bits(bits, params)
        nbytes = sum(bits[k] * params[k] for k in bits) // 8
        details.update({
            "layers": len(bits), "weight_parameters": total, "average_bits": round(avg, 4), "weight_bytes": nbytes,
            "bits": {str(b): sum(1 for v in bits.values() if v == b) for b in levels},
            "params_by_bits": {str(b): sum(params[k] for k, v in bits.items() if v == b) for b in levels},
        })
        if act_bits:
            details["activation_16bit"] = sorted(act_bits)
        if named:
            details["named_nodes"] = named
        if cfg.overrides_file:
            self._write(cfg.overrides_file, overrides)
            details["overrides_file"] = cfg.overrides_file
        return BitAssignmentResult(model, bool(named), details, weight_bits=bits, activation_bits=act_bits,
                                   overrides=overrides, average_bits=avg, weight_bytes=nbytes)

    @staticmethod
    def _name_nodes(model: ir.Model) -> tuple[ir.Model, int]:
        """Overrides select nodes by name: unnamed weighted nodes get their weight's name (the key
        significance scores them under)."""
        unnamed = [n for n in model.graph if not n.name and n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")
                   and len(n.inputs) > 1 and n.inputs[1] is not None]
        if not unnamed:
            return model, 0
        namer = Namer(model.graph)
        taken = {n.name for n in model.graph if n.name}
        for n in unnamed:
            w = n.inputs[1].name
            n.name = w if w not in taken else namer.unique(w)
            taken.add(n.name)
        return model, len(unnamed)

    def _activations(self, scored: SignificanceResult) -> dict[str, int]:
        k = self.config.activation_16bit_top
        acts = sorted((e for e in scored.entries if e.kind == "activation"), key=lambda e: (-e.score, e.name))
        return {e.tensor: 16 for e in acts[:k] if e.score > 0}

    def _by_accuracy(self, model: ir.Model, layers: list[Component], path: list[tuple[str, int]],
                     levels: list[int]) -> tuple[dict[str, int], dict[str, Any]]:
        cfg: BitAssignmentConfig = self.config
        feeds, labels = scoring_data(self.context, cfg.data, cfg.labels_file, cfg.max_samples, cfg.batch_size,
                                     True, "bit-assignment with max_accuracy_drop_pt")
        by_key = {c.name: c for c in layers}
        inits = model.graph.initializers
        cache: dict[int, float] = {}

        def bits_at(k: int) -> dict[str, int]:
            bits = dict.fromkeys(by_key, levels[0])
            for name, b in path[:k]:
                bits[name] = b
            return bits

        def accuracy(bits: dict[str, int] | None) -> float:
            m = clone_model(model)  # weights shared; the fake-quantized ones replace them in the copy only
            mi = m.graph.initializers
            for name, b in (bits or {}).items():
                c = by_key[name]
                mi[c.tensor].const_value = ir.tensor(fake_quantize(constant_value(inits[c.tensor]), b, c.axis),
                                                     name=c.tensor)
            sess = make_session(m, threads=1, what="model (bit-assignment check)")
            n = labels.shape[0]
            hits = 0
            step = min(cfg.batch_size, static_batch(sess) or cfg.batch_size)  # a static batch dim caps it
            for i in range(0, n, step):
                y = run_batch(sess, {k: v[i:i + step] for k, v in feeds.items()}, [out_name])[out_name]
                hits += int((np.asarray(y).argmax(axis=1) == labels[i:i + step]).sum())
            return 100.0 * hits / n

        def drop(k: int) -> float:
            if k not in cache:
                cache[k] = ref - accuracy(bits_at(k))
            return cache[k]

        out_name = pick_output(model, feeds, None)
        ref = accuracy(None)
        target = cfg.max_accuracy_drop_pt
        lo, hi = 0, len(path)
        if drop(hi) > target:
            raise PreconditionError(f"even {levels[-1]}-bit weights everywhere lose {drop(hi):.2f} points "
                                    f"(max_accuracy_drop_pt {target})")
        while lo < hi:  # smallest k with drop(k) <= target, assuming the path improves monotonically
            mid = (lo + hi) // 2
            if drop(mid) <= target:
                hi = mid
            else:
                lo = mid + 1
        k = lo
        while drop(k) > target and k < len(path):  # repair a non-monotone step
            k += 1
        return bits_at(k), {"reference_top1_pct": round(ref, 3), "top1_drop_pt": round(drop(k), 3),
                            "upgrades": k, "evaluations": len(cache), "samples": int(labels.shape[0])}

    @staticmethod
    def _write(path: str, overrides: list[dict[str, Any]]) -> None:
        doc = {"overrides": overrides}
        with atomic_write(path) as f:
            if path.endswith(".json"):
                json.dump(doc, f, indent=1)
            else:
                yaml.safe_dump(doc, f, sort_keys=False)
