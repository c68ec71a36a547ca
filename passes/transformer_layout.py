"""Transformer layout chosen by measurement: which fused contrib ops are worth keeping on this CPU.

``transformer-fusion`` writes ORT's fused ops (SkipLayerNormalization, BiasGelu, MultiHeadAttention),
and ORT fuses the same patterns again at load when it finds them unfused. Fused is not always faster:
on an AMD EPYC Zen 4 with ORT 1.32, one SkipLayerNormalization over [1, 128, 384] costs 0.25 ms where
Add + LayerNormalization cost 0.05 ms - twelve of them are 15 % of MiniLM's int8 time. Which layout
wins depends on the CPU and the ORT build, so this pass measures it.

For each fused kind (``skip-layernorm``, ``bias-gelu``) it writes the exact standard-op form - the bias
goes into the producing DynamicQuantizeMatMul when that has none, else an Add - and keeps it only when
ORT's kernel times and interleaved wall-clock time both say it is at least ``min_gain`` faster
(``onnxopt.timing``), with ORT told not to re-fuse it (``optimization.disable_specified_optimizers`` in
the session options recorded in the model's metadata, key ``onnxopt.ort_session``). The outputs must
stay within ``min_sqnr_db`` of the fused model's (the rewrites are exact up to float rounding).

Decisions are cached per model, config, CPU and ORT version (re-runs give the same model without
timing); ``decisions:`` fixes them.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx_ir as ir
from pydantic import Field

from onnxopt.graph import attr, clone_model, is_op, make_node, opset_version, replace_node
from onnxopt.model_io import content_digest
from onnxopt.pass_infra import Pass, PassConfig, PassResult
from onnxopt.timing import Setting, Timed, compare, record_session, recorded_session, timer

Kind = Literal["skip-layernorm", "bias-gelu"]
KINDS: dict[str, tuple[str, str]] = {  # kind -> (fused op in com.microsoft, ORT optimizer that re-fuses it)
    "skip-layernorm": ("SkipLayerNormalization", "SkipLayerNormFusion"),
    "bias-gelu": ("BiasGelu", "BiasGeluFusion"),
}
DISABLE_KEY = "optimization.disable_specified_optimizers"


class TransformerLayoutConfig(PassConfig):
    """Fused vs standard-op layout of transformer blocks, measured on this machine."""

    type: Literal["transformer-layout"] = "transformer-layout"
    enabled: bool = Field(True, description="off: keep the fused layout")
    decisions: dict[Kind, Literal["fused", "unfused"]] | None = Field(
        None, description="kind -> fused / unfused; fixes the layout (nothing is timed)")
    kinds: list[Kind] = Field(default_factory=lambda: list(KINDS), description="kinds to consider, in order")
    sequence_length: int = Field(128, gt=0, description="length of the random timing input when there is no "
                                 "calibration data (symbolic dims other than the batch)")
    threads: int = Field(1, gt=0, description="intra-op threads the layout is timed with")
    runs: int = Field(20, gt=0, description="timed runs per comparison")
    # 5 %: a layout worth changing is clearly faster; a marginal one (MiniLM's BiasGelu: 1-4 %) would flip
    # between runs with the machine's noise
    min_gain: float = Field(0.05, ge=0, lt=1, description="an unfused kind must save this share of the time")
    # the rewrites are exact in real arithmetic; float summation order still moves the last bits, and
    # run-time (dynamic) quantization turns those into rounding flips: MiniLM int8-dynamic 43 dB
    min_sqnr_db: float = Field(35.0, description="the unfused model's outputs vs the fused model's")
    cache: bool = Field(True, description="reuse decisions measured earlier for the same model and config")


class TransformerLayoutResult(PassResult):
    pass


def unfuse(model: ir.Model, kind: str) -> int:
    """Rewrite every fused ``kind`` node of ``model`` into standard ops; returns how many."""
    fused_op = KINDS[kind][0]
    rewrite = _skip_layernorm if kind == "skip-layernorm" else _bias_gelu
    n = 0
    for node in [x for x in model.graph if is_op(x, fused_op, "com.microsoft")]:
        n += rewrite(model, node)
    return n


def _fold_bias(x: ir.Value, bias: ir.Value | None) -> ir.Value | None:
    """Put ``bias`` into the DynamicQuantizeMatMul producing ``x`` if it has none and ``x`` has no other
    reader; returns the Add-free value or None."""
    p = x.producer()
    if bias is None or p is None or not is_op(p, "DynamicQuantizeMatMul", "com.microsoft"):
        return None
    if len(x.uses()) != 1 or x.is_graph_output() or (len(p.inputs) > 4 and p.inputs[4] is not None):
        return None
    if len(p.inputs) < 5:
        p.resize_inputs(5)
    p.replace_input_with(4, bias)
    return x


def _plus_bias(x: ir.Value, bias: ir.Value | None, new: list[ir.Node], name: str) -> ir.Value:
    if bias is None:
        return x
    folded = _fold_bias(x, bias)
    if folded is not None:
        return folded
    add = make_node("Add", [x, bias], name=f"{name}_bias")
    new.append(add)
    return add.outputs[0]


def _skip_layernorm(model: ir.Model, node: ir.Node) -> int:
    ins = list(node.inputs) + [None] * (5 - len(node.inputs))
    x, skip, gamma, beta, bias = ins[:5]
    outs = list(node.outputs)
    if any(o.uses() or o.is_graph_output() for o in outs[1:3]) or opset_version(model) < 17:
        return 0  # mean / inv-std outputs have no LayerNormalization twin of the same shape
    name = node.name or "skip_layernorm"
    new: list[ir.Node] = []
    xb = _plus_bias(x, bias, new, name)
    add = make_node("Add", [xb, skip], name=f"{name}_add")
    ln_inputs = [add.outputs[0], gamma] + ([beta] if beta is not None else [])
    ln = make_node("LayerNormalization", ln_inputs, {"axis": -1, "epsilon": float(attr(node, "epsilon", 1e-12))},
                   name=f"{name}_ln")
    new += [add, ln]
    sums = outs[3] if len(outs) > 3 else None
    if sums is not None and (sums.uses() or sums.is_graph_output()):
        if sums.is_graph_output():
            return 0
        ir.convenience.replace_all_uses_with(sums, add.outputs[0])
    replace_node(node, new, [ln.outputs[0]])
    return 1


def _bias_gelu(model: ir.Model, node: ir.Node) -> int:
    x, bias = node.inputs[0], node.inputs[1] if len(node.inputs) > 1 else None
    name = node.name or "bias_gelu"
    new: list[ir.Node] = []
    xb = _plus_bias(x, bias, new, name)
    gelu = make_node("Gelu", [xb], domain="com.microsoft", name=f"{name}_gelu")
    new.append(gelu)
    replace_node(node, new, [gelu.outputs[0]])
    return 1


class TransformerLayout(Pass):
    name = "transformer-layout"
    summary = ("Keep each fused transformer op (SkipLayerNormalization, BiasGelu) only where ONNX Runtime "
               "runs it faster than its standard ops on this CPU (measured); records the session options.")
    Config = TransformerLayoutConfig

    def call(self, model: ir.Model) -> TransformerLayoutResult:
        cfg: TransformerLayoutConfig = self.config
        present = {k: sum(1 for n in model.graph if is_op(n, KINDS[k][0], "com.microsoft")) for k in cfg.kinds}
        present = {k: c for k, c in present.items() if c}
        details: dict[str, Any] = {"fused": present}
        if not cfg.enabled or not present:
            details["mode"] = "disabled" if not cfg.enabled else "no fused transformer ops"
            return TransformerLayoutResult(model, False, details)
        if cfg.decisions is not None:
            details["mode"] = "fixed (decisions in the recipe)"
            return self._apply(model, {k: cfg.decisions.get(k, "fused") for k in present}, details)
        cache = self._cache_file(model) if cfg.cache else None
        if cache is not None and cache.is_file():
            try:
                decided = {k: v for k, v in json.loads(cache.read_text()).items()
                           if k in present and v in ("fused", "unfused")}
            except (OSError, ValueError, AttributeError):
                decided = None
            if decided is not None and set(decided) == set(present):
                details["mode"] = f"cached ({cache.name})"
                return self._apply(model, decided, details)
        details["mode"] = "measured"
        decided = self._measure(model, present, details)
        if cache is not None:
            try:
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_suffix(".tmp")
                tmp.write_text(json.dumps(decided, sort_keys=True))
                os.replace(tmp, cache)
            except OSError as exc:
                details["cache_error"] = f"could not write {cache} ({type(exc).__name__})"
        return self._apply(model, decided, details)

    # -- measuring ----------------------------------------------------------------------------------
    def _feed(self, model: ir.Model) -> dict[str, np.ndarray]:
        """One sample of the calibration data, else batch 1 of ``sequence_length``: integer inputs all 1
        (a valid token, segment and attention-mask value alike; random ids would overrun an embedding)."""
        from onnxopt.activations import sample_batches
        from onnxopt.data import model_inputs

        if self.context.calibration is not None:
            return sample_batches(model, self.context.calibration, 1)[0]
        rng = np.random.default_rng(0)
        feed = {}
        for s in model_inputs(model):
            shape = [1 if i == 0 and not isinstance(d, int) else d if isinstance(d, int) else self.config.sequence_length
                     for i, d in enumerate(s.shape or ())]
            if np.issubdtype(s.dtype, np.floating):
                feed[s.name] = rng.standard_normal(shape).astype(s.dtype)
            else:
                feed[s.name] = np.ones(shape, s.dtype)
        return feed

    def _measure(self, model: ir.Model, present: dict[str, int], details: dict) -> dict[str, str]:
        from onnxopt.activations import output_sqnr
        from onnxopt.runtime import run_batch

        cfg: TransformerLayoutConfig = self.config
        start = time.perf_counter()
        feed = self._feed(model)
        t = timer(cfg.runs)
        disabled: list[str] = []
        best = Timed(model, Setting.of(cfg.threads))
        ref = [list(run_batch(_session(model), feed).values())]
        decided, steps = {}, []
        for kind in present:
            cand_model = clone_model(best.model)
            unfuse(cand_model, kind)
            trial = disabled + [KINDS[kind][1]]
            cand = Timed(cand_model, Setting.of(cfg.threads, "all", {DISABLE_KEY: ",".join(trial)}))
            sqnr = output_sqnr(ref, [list(run_batch(_session(cand_model, cand.setting), feed).values())])
            step: dict[str, Any] = {"kind": kind, "nodes": present[kind], "sqnr_db": round(min(sqnr, 999.0), 1)}
            if sqnr < cfg.min_sqnr_db:
                step.update(accepted=False, why=f"outputs moved (SQNR {sqnr:.1f} dB < {cfg.min_sqnr_db})")
            else:
                v = compare(t, best, cand, feed, cfg.min_gain)
                step.update(v.as_dict(), fused_kernel_ms=round(best.kernels, 3),
                            unfused_kernel_ms=round(cand.kernels, 3))
                if v.accepted:
                    best, disabled = cand, trial
            decided[kind] = "unfused" if step["accepted"] else "fused"
            steps.append(step)
        details["search"] = steps
        details["search_seconds"] = round(time.perf_counter() - start, 1)
        return decided

    # -- result -------------------------------------------------------------------------------------
    def _apply(self, model: ir.Model, decided: dict[str, str], details: dict) -> TransformerLayoutResult:
        unfused = [k for k in decided if decided[k] == "unfused"]
        counts = {k: unfuse(model, k) for k in unfused}
        details["decisions"] = dict(sorted(decided.items()))
        if counts:
            details["unfused"] = counts
            optimizers = sorted({KINDS[k][1] for k in unfused}
                                | set(filter(None, recorded_session(model).get("session_config", {})
                                             .get(DISABLE_KEY, "").split(","))))
            record_session(model, {DISABLE_KEY: ",".join(optimizers)})
        return TransformerLayoutResult(model, bool(counts), details)

    def _cache_file(self, model: ir.Model) -> Path:
        import onnxruntime as ort

        from onnxopt.isa import detect_cpu

        h = hashlib.sha256()
        h.update(content_digest(model).encode())
        cfg = self.config.model_dump(exclude={"cache", "decisions"})
        h.update(json.dumps([cfg, detect_cpu().describe(), ort.__version__, os.cpu_count()], sort_keys=True).encode())
        base = self.context.cache_dir
        root = Path(base) if base is not None else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "onnxopt"
        return root / "layout" / f"{h.hexdigest()[:32]}.json"


def _session(model: ir.Model, setting: Setting | None = None):
    from onnxopt.profiling import make_session

    s = setting or Setting()
    return make_session(model, s.threads, s.level, s.config_dict)
