"""``onnxopt tune``: give a gate, get the fastest (or smallest) model that passes it.

The search runs in rounds; each round's trials run on an executor (``onnxopt.executors``) and come back in
order, so the same inputs give the same trials and the same answer whatever runs them:

1. **Presets that fit the model**: ``cleanup`` (float: passes any gate it defines, the answer of last
   resort), the ``int8`` family (``int8``, ``int8-accurate`` where installed, and ``int8`` with percentile
   ranges), the fused float model and ``int8-dynamic`` for attention models; for ``--objective size`` also
   ``mixed``/``w4a8``.
2. **Layers out of int8, guided by where the error starts**: the fastest quantized trial that failed is
   localized against the original on calibration data (``onnxopt.localize``); the layers where the error
   jumps most go to 16-bit activations, or float, a growing number at a time (1, 2, 4, 8, 16).

Every trial is validated in ONNX Runtime against the original on ``val`` with the user's gate. With
``confidence``, an accuracy-drop or top-1-agreement gate counts as passed only if it holds at that one-sided
confidence given the rows that changed (``within_noise``): a search keeps the luckiest of many trials, and
a 0.1-pt gate on 300 rows is decided by one row. Latency is measured here, one model after the other (ORT's
kernel times at batch 1, one thread: ``onnxopt.timing``), size from the file. Results are cached under the
cache folder by the content of the model, recipe, data and gate: a re-run reuses every trial (and its
latency) and says so.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any

from onnxopt.errors import DataError, OnnxoptError
from onnxopt.progress import SILENT, Progress
from onnxopt.recipe import GateConfig, TuneConfig

LATENCY_TIE = 0.03  # latencies this close are a tie, settled by the smaller file, then trial order


@dataclass
class Trial:
    index: int
    label: str
    recipe: dict[str, Any]
    round: int
    key: str = ""
    result: dict[str, Any] = field(default_factory=dict)
    latency_ms: float | None = None
    cached: bool = False
    z: float | None = None  # with confidence: the gates must hold by this many standard errors of their noise

    @property
    def noise(self) -> list[str]:
        """The gates passed on val only by less than their noise (none without confidence)."""
        return within_noise(self.result, self.z) if self.z is not None else []

    @property
    def passed(self) -> bool:
        return self.result.get("status") == "ok" and bool(self.result.get("passed")) and not self.noise

    def row(self) -> dict[str, Any]:
        r = self.result
        return {"trial": self.index, "round": self.round, "config": self.label,
                "status": "pass" if self.passed else ("fail" if r.get("status") == "ok" else "error"),
                "latency_ms": None if self.latency_ms is None else round(self.latency_ms, 3),
                "size_mb": round(r["size_bytes"] / 1e6, 3) if r.get("size_bytes") else None,
                "metrics": {k: v for k, v in (r.get("metrics") or {}).items() if v is not None},
                "failed_checks": [c["name"] for c in r.get("checks", []) if c.get("status") == "fail"],
                **({"within_noise": self.noise} if self.noise else {}),
                "error": r.get("error"), "seconds": (r.get("build_s") or 0) + (r.get("validate_s") or 0),
                "cached": self.cached}


@dataclass
class TuneResult:
    trials: list[Trial]
    winner: Trial | None
    why: str
    baseline_ms: float | None
    output: Path | None = None
    precision: dict[str, str] = field(default_factory=dict)
    interrupted: bool = False
    confidence: float | None = None
    notes: list[str] = field(default_factory=list)
    reports: list[Path] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.winner is not None

    def to_dict(self) -> dict[str, Any]:
        w = self.winner
        return {"winner": None if w is None else {**w.row(), "recipe": w.recipe}, "why": self.why,
                "baseline_fp32_ms": self.baseline_ms, "trials": [t.row() for t in self.trials],
                "precision_map": self.precision, "interrupted": self.interrupted,
                "cached_trials": sum(t.cached for t in self.trials), "seconds": round(self.seconds, 1),
                "confidence": self.confidence, "notes": list(self.notes),
                "output": str(self.output) if self.output else None}


# -- inputs -----------------------------------------------------------------------------------------------
def _digest_path(p: str | None) -> str:
    if p is None:
        return "-"
    if p.startswith("random:"):
        return p
    path = Path(p)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _check_gate(gate: GateConfig, model, val, labels) -> None:
    """Refuse before any trial: a gate that names a missing output, or needs labels that were not given."""
    outputs = [o.name for o in model.graph.outputs]
    missing = [o for o in gate.outputs or [] if o not in outputs]
    if missing:
        raise OnnxoptError(f"the gate names output(s) {', '.join(map(repr, missing))} the model does not have "
                           f"(outputs: {', '.join(map(repr, outputs))})")
    if gate.max_accuracy_drop_pt is not None and labels is None:
        raise DataError("--max-accuracy-drop needs --labels for the validation data")
    if gate.is_empty():
        raise OnnxoptError("tune needs a gate: give --max-accuracy-drop, --min-top1-agreement, --min-sqnr-db, "
                           "--min-cosine, ... (or gate: in the recipe)")


def _resolution_notes(gate: GateConfig, rows: int, labels) -> list[str]:
    """Gates finer than one validation row: any single changed row decides them."""
    out = []
    if gate.max_accuracy_drop_pt is not None and labels is not None and len(labels):
        one = 100.0 / len(labels)
        if gate.max_accuracy_drop_pt < one:
            out.append(f"--max-accuracy-drop {gate.max_accuracy_drop_pt:g} is less than one of the {len(labels)} "
                       f"labelled rows ({one:.2f} pt): a pass is decided by single rows, and the search keeps "
                       f"the luckiest trial; --confidence 0.9 (or more --val data) makes a pass hold beyond the noise")
    if gate.min_top1_agreement_pct is not None and rows and 0 < 100.0 - gate.min_top1_agreement_pct < 100.0 / rows:
        out.append(f"--min-top1-agreement {gate.min_top1_agreement_pct:g} allows no disagreement on {rows} rows")
    return out


# -- the search -------------------------------------------------------------------------------------------
def _preset_recipe(name: str, qdq: dict | None = None, calibrate: dict | None = None) -> dict[str, Any]:
    from onnxopt.recipe import load_preset

    rec = load_preset(name).to_dict()
    for p in rec["passes"]:
        if p["type"] == "quantize-qdq" and qdq:
            p.update(qdq)
        if p["type"] == "calibrate" and calibrate:
            p.update(calibrate)
    rec["gate"] = {}
    return rec


def first_round(model, objective: str, presets: list[str] | None) -> list[tuple[str, dict]]:
    from onnxopt.activations import has_attention
    from onnxopt.recipe import preset_names

    have = set(preset_names())
    if presets:
        unknown = [p for p in presets if p not in have]
        if unknown:
            raise OnnxoptError(f"tune: unknown preset(s) {', '.join(map(repr, unknown))}")
        return [(p, _preset_recipe(p)) for p in presets]
    out = [("cleanup (float)", _preset_recipe("cleanup")), ("int8", _preset_recipe("int8"))]
    if "int8-accurate" in have:
        out.append(("int8-accurate", _preset_recipe("int8-accurate")))
    out.append(("int8, percentile ranges", _preset_recipe("int8", calibrate={"observer": "percentile"})))
    if has_attention(model):
        # the fused float model: lossless, and a little faster than the export where ORT runs the fused
        # attention better (MiniLM-L6 on AMD Zen 3: 1.06x) -- the answer when no quantized trial holds
        out.append(("float, fused", _fused_float_recipe()))
        out.append(("int8-dynamic", _preset_recipe("int8-dynamic")))
    if objective == "size":
        out += [(p, _preset_recipe(p)) for p in ("mixed", "w4a8") if p in have]
    return out


def _fused_float_recipe() -> dict[str, Any]:
    rec = _preset_recipe("int8-dynamic")
    keep = ("transformer-fusion", "transformer-layout")
    return {**rec, "name": "float-fused", "description": "transformer fusions, float compute",
            "passes": [p for p in rec["passes"] if p["type"] in keep]}


def _is_float(t: Trial) -> bool:
    return t.label.startswith(("cleanup", "float"))


def layer_round(base: Trial, layers: list[str], max_layers: int) -> list[tuple[str, dict]]:
    """The failing trial's recipe with its worst layers moved to 16-bit activations, then to float."""
    out = []
    k = 1
    while k <= min(max_layers, len(layers)):
        nodes = layers[:k]
        for how, rule in (("int16", {"activation_type": "int16"}), ("float", {"exclude": True})):
            rec = json.loads(json.dumps(base.recipe))
            for p in rec["passes"]:
                if p["type"] == "quantize-qdq":
                    p["overrides"] = list(p.get("overrides") or []) + [{"nodes": nodes, **rule}]
            out.append((f"{base.label}; {k} layer(s) {how}: {', '.join(nodes[:3])}{' ...' if k > 3 else ''}", rec))
        k *= 2
    return out


def _worst_layers(model_path: str, candidate: str, calib, limit: int) -> list[str]:
    from onnxopt.localize import localize

    loc = localize(model_path, candidate, calib, max_samples=16, top=limit)
    ranked = sorted((x for x in loc.layers if x.jump_db > 0 and x.node), key=lambda x: (-x.jump_db, x.node))
    seen: list[str] = []
    for x in ranked:
        if x.node not in seen:
            seen.append(x.node)
    return seen[:limit]


def _precision_map(path: str) -> dict[str, str]:
    """Per compute op of the winner: int8 / int16 / weight-only / float, read from its QDQ structure."""
    import onnx

    m = onnx.load(path, load_external_data=False)
    prod = {o: n for n in m.graph.node for o in n.output}
    inits = {t.name: t for t in m.graph.initializer}
    out = {}
    for n in m.graph.node:
        if n.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul", "DynamicQuantizeMatMul", "MatMulNBits"):
            continue
        if n.op_type in ("DynamicQuantizeMatMul", "MatMulNBits"):
            out[n.name] = "int8-dynamic" if n.op_type == "DynamicQuantizeMatMul" else "int4 weights"
            continue
        src = prod.get(n.input[0])
        w = prod.get(n.input[1]) if len(n.input) > 1 else None
        wq = inits.get(w.input[0]) if w is not None and w.op_type == "DequantizeLinear" else None
        wbits = {2: "uint8", 3: "int8", 21: "uint4", 22: "int4", 4: "uint16", 5: "int16"}.get(
            wq.data_type, "?") if wq is not None else None
        if src is not None and src.op_type == "DequantizeLinear":
            zp = inits.get(src.input[2]) if len(src.input) > 2 else None
            act = "int16" if zp is not None and zp.data_type in (4, 5) else "int8"
            out[n.name] = act if wbits in (None, "int8", "uint8") else f"{act}, {wbits} weights"
        elif wbits is not None:
            out[n.name] = f"float ({wbits} weights)"
        else:
            out[n.name] = "float"
    return out


def tune(model_path: str | Path, output: str | Path | None = None, *, calib: str | Path, val: str | Path,
         labels: str | Path | None = None, gate: dict | None = None, recipe=None, objective: str | None = None,
         time_budget_minutes: float | None = None, executor: str | None = None, ray_address: str | None = None,
         workers: int | None = None, report_dir: str | Path | None = None, keep_failed: bool = False,
         force: bool = False, data_layout: str | None = None, dims: dict[str, int] | None = None,
         cache_dir: str | Path | None = None, progress: Progress | None = None, command: str | None = None,
         confidence: float | None = None) -> TuneResult:
    """Search for the fastest (``objective="latency"``) or smallest model passing ``gate``; write it to ``output``.

    Raises ``OnnxoptError`` for bad input before any trial runs; returns a result without a winner when no
    trial passed (nothing written unless ``keep_failed``, which writes the best failing one).
    """
    from onnxopt.data import load_labels, open_data
    from onnxopt.executors import make_executor
    from onnxopt.model_io import content_digest, load_model, save_model
    from onnxopt.optimize import _check_output_path, _recipe, merge_data, merge_gate

    progress = progress or SILENT
    start = time.perf_counter()
    model_path = Path(model_path)
    rec = _recipe(recipe) if recipe is not None else _recipe("cleanup").model_copy(update={"gate": GateConfig()})
    cfg: TuneConfig = getattr(rec, "tune", None) or TuneConfig()
    objective = objective or cfg.objective
    executor = executor or cfg.executor
    workers = workers or cfg.workers
    confidence = confidence if confidence is not None else cfg.confidence
    if confidence is not None and not 0.5 < confidence < 1:
        raise OnnxoptError(f"tune: confidence must be between 0.5 and 1 (got {confidence})")
    z = NormalDist().inv_cdf(confidence) if confidence is not None else None
    budget_s = 60 * (time_budget_minutes or cfg.time_budget_minutes or 1e9)
    if output is not None:
        _check_output_path(Path(output), force, model_path)
    data_cfg = merge_data(rec.data, data_layout, dims)
    model = load_model(model_path)
    calib_data = open_data(str(calib), model, data_cfg)
    val_data = open_data(str(val), model, data_cfg)
    val_labels = load_labels(labels, val_data) if labels is not None else None
    g = merge_gate(rec.gate, gate)
    _check_gate(g, model, val_data, val_labels)
    notes = [] if confidence is not None else _resolution_notes(g, len(val_data), val_labels)
    for n in notes:
        progress.message(f"note: {n}")

    cache = Path(cache_dir) if cache_dir is not None else Path(report_dir or Path(output or model_path).parent) / ".onnxopt-tune"
    cache.mkdir(parents=True, exist_ok=True)
    job = {"model": str(model_path.resolve()), "calib": str(Path(calib).resolve()) if not str(calib).startswith("random:") else str(calib),
           "val": str(Path(val).resolve()) if not str(val).startswith("random:") else str(val),
           "labels": str(Path(labels).resolve()) if labels is not None else None,
           "data": data_cfg.model_dump(), "gate": g.model_dump(exclude_none=True), "cache_dir": str(cache.resolve())}
    base_key = hashlib.sha256(json.dumps([content_digest(model), _digest_path(job["calib"]), _digest_path(job["val"]),
                                          _digest_path(job["labels"]), job["data"], job["gate"]],
                                         sort_keys=True, default=str).encode()).hexdigest()
    ex = make_executor(executor, workers, address=ray_address, timeout_s=60 * cfg.trial_timeout_minutes)
    trials: list[Trial] = []
    interrupted = False
    try:
        plan = first_round(model, objective, cfg.presets)
        _run_round(trials, plan, 1, job, base_key, cache, ex, progress, z)
        best_failed = _fastest_failed_quantized(trials)
        if best_failed is not None and not _has_quantized_pass(trials) and time.perf_counter() - start < budget_s:
            progress.message(f"localizing the error of {best_failed.label!r} to take layers out of int8")
            layers = _worst_layers(str(model_path), best_failed.result["output"], calib_data, cfg.max_layers)
            if layers:
                _run_round(trials, layer_round(best_failed, layers, cfg.max_layers), 2, job, base_key, cache, ex,
                           progress, z)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        ex.close()

    baseline = _latency(str(model_path), val_data, cache) if not interrupted else None
    for t in trials:
        if t.passed and t.latency_ms is None and not interrupted:
            t.latency_ms = _latency(t.result["output"], val_data, cache)
    winner, why = _choose(trials, objective, interrupted)
    if confidence is not None:
        noisy = sum(bool(t.noise) for t in trials)
        why += (f"; gates held at {confidence:.0%} confidence ({noisy} trial(s) passed on val only within the "
                f"noise of the rows that changed)")
    result = TuneResult(trials, winner, why, baseline, interrupted=interrupted, confidence=confidence, notes=notes)
    if winner is not None:
        result.precision = _precision_map(winner.result["output"])
    pick = winner if winner is not None else (_best_failed(trials) if keep_failed else None)
    if output is not None and pick is not None and not interrupted:
        save_model(load_model(pick.result["output"]), output, force=True)
        result.output = Path(output)
    result.seconds = time.perf_counter() - start
    if report_dir is not None:
        from onnxopt.tune_report import write_tune_reports

        result.reports = write_tune_reports(report_dir, result, command=command, objective=objective)
    return result


def within_noise(result: dict[str, Any], z: float) -> list[str]:
    """The proportion gates (accuracy drop, top-1 agreement) a trial passed on ``val`` by less than ``z`` standard
    errors of their own sampling noise. The s.d. of an accuracy drop is about sqrt(rows whose correctness
    changed) / rows, of an agreement sqrt(rows that disagree) / rows: with 300 rows and 7 flipped, a measured
    0.0-pt drop is 0 +- 0.9 pt, so a 0.1-pt gate "passed" that way is a coin toss the next data set can lose
    (the search makes it likelier still: it keeps the luckiest of many trials)."""
    if result.get("status") != "ok" or not result.get("passed"):
        return []
    metrics = result.get("metrics") or {}
    out = []
    for c in result.get("checks") or []:
        if c.get("status") != "pass" or c.get("metric") not in ("accuracy_drop_pt", "top1_agreement_pct"):
            continue
        if c["metric"] == "accuracy_drop_pt":
            rows, noisy = metrics.get("accuracy_rows"), metrics.get("accuracy_changed_rows")
        else:
            rows = metrics.get(f"{c['output']}.samples")
            noisy = None if rows is None else round((100 - c["value"]) / 100 * rows)
        if not rows or noisy is None:
            out.append(f"{c['name']}: no row counts in this trial's result (cached by an older onnxopt)")
            continue
        margin = z * 100 * math.sqrt(noisy) / rows
        bound = c["value"] + margin if c["comparison"] == "<=" else c["value"] - margin
        if (bound > c["threshold"]) if c["comparison"] == "<=" else (bound < c["threshold"]):
            out.append(f"{c['name']} {c['value']:.2f} {'+' if c['comparison'] == '<=' else '-'} {margin:.2f} "
                       f"(noise of {noisy} of {rows} rows) {'>' if c['comparison'] == '<=' else '<'} "
                       f"{c['threshold']:g}")
    return out


def _has_quantized_pass(trials: list[Trial]) -> bool:
    return any(t.passed and not _is_float(t) for t in trials)


def _fastest_failed_quantized(trials: list[Trial]) -> Trial | None:
    failed = [t for t in trials if t.result.get("status") == "ok" and not t.passed and t.label.startswith("int8")
              and t.label != "int8-dynamic"]
    return failed[0] if failed else None


def _best_failed(trials: list[Trial]) -> Trial | None:
    ok = [t for t in trials if t.result.get("status") == "ok"]
    return ok[-1] if ok else None


def _trial_key(base_key: str, recipe: dict) -> str:
    from importlib.metadata import version

    return hashlib.sha256(json.dumps([base_key, recipe, version("onnxopt")], sort_keys=True).encode()).hexdigest()[:24]


def _run_round(trials: list[Trial], plan: list[tuple[str, dict]], rnd: int, job: dict, base_key: str,
               cache: Path, ex, progress: Progress, z: float | None = None) -> None:
    todo: list[Trial] = []
    for label, recipe in plan:
        t = Trial(len(trials) + 1, label, recipe, rnd, key=_trial_key(base_key, recipe), z=z)
        trials.append(t)
        done = cache / "trials" / t.key / "result.json"
        model = cache / "trials" / t.key / "model.onnx"
        if done.is_file() and (model.is_file() or json.loads(done.read_text()).get("status") != "ok"):
            t.result, t.cached = json.loads(done.read_text()), True
            lat = cache / "trials" / t.key / "latency_ms.json"
            if lat.is_file():
                t.latency_ms = json.loads(lat.read_text())
        else:
            todo.append(t)
    if not todo:
        progress.message(f"round {rnd}: {len(plan)} trial(s), all cached")
        return
    progress.message(f"round {rnd}: {len(todo)} trial(s) to run ({len(plan) - len(todo)} cached) on "
                     f"{ex.name} x{ex.workers}")
    specs = [{"index": t.index, "label": t.label, "recipe": t.recipe,
              "output": str(cache / "trials" / t.key / "model.onnx")} for t in todo]
    for t, r in zip(todo, ex.map(job, specs), strict=True):
        t.result = r
        folder = cache / "trials" / t.key
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "result.json").write_text(json.dumps(r, sort_keys=True, default=str))
        progress.message(f"  trial {t.index} {t.label}: "
                         f"{'pass' if t.passed else r.get('error') or '; '.join(t.noise) or 'gate failed'}")


def _latency(path: str, val_data, cache: Path) -> float:
    """ORT's summed kernel time at batch 1, one thread, under the model's recorded session options (least of two
    profiles); cached by the file's content."""
    from onnxopt.activations import sample_batches
    from onnxopt.model_io import load_model
    from onnxopt.timing import Setting, Timed, recorded_session, timer

    key = _digest_path(path)[:24]
    f = cache / "latency" / f"{key}-recorded-session.json"
    if f.is_file():
        return float(json.loads(f.read_text()))
    model = load_model(path)
    feed = sample_batches(model, val_data, 1)[0]
    # timed as it will be served: with the session options its passes recorded (latency-placement's
    # float-compute fallback needs session.disable_quant_qdq, or ORT runs every weight's DequantizeLinear)
    rec = recorded_session(model)
    t = Timed(model, Setting.of(1, str(rec.get("graph_optimization_level", "all")), rec.get("session_config")))
    tm = timer(20)
    tm.race_kernels([t], feed)
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(t.kernels))
    return t.kernels


def _choose(trials: list[Trial], objective: str, interrupted: bool) -> tuple[Trial | None, str]:
    passing = [t for t in trials if t.passed]
    if not passing:
        why = "interrupted before any trial passed" if interrupted else "no trial passed the gate"
        return None, why
    if objective == "size":
        best = min(passing, key=lambda t: (t.result["size_bytes"], t.latency_ms or 0, t.index))
        return best, f"smallest passing model ({best.result['size_bytes'] / 1e6:.2f} MB)"
    fastest = min(t.latency_ms for t in passing if t.latency_ms is not None) if any(
        t.latency_ms is not None for t in passing) else None
    if fastest is None:
        best = passing[0]
        return best, "first passing trial (latency not measured)"
    near = [t for t in passing if t.latency_ms is not None and t.latency_ms <= fastest * (1 + LATENCY_TIE)]
    best = min(near, key=lambda t: (t.result["size_bytes"], t.index))
    tie = f"; {len(near) - 1} other(s) within {LATENCY_TIE:.0%}: the smaller file wins" if len(near) > 1 else ""
    return best, f"fastest passing model ({best.latency_ms:.3f} ms kernel time at batch 1, one thread{tie})"
