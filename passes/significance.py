"""Significance: how much each component hurts when only it is quantized aggressively.

For every quantizable component (the weight of a Conv/Gemm/MatMul, optionally per channel group;
optionally an activation tensor) the float model is run with *only that component* fake-quantized
to an aggressive width (int4 weights by default, int2 possible), and scored on the scoring data:

* with labels: the increase in cross-entropy over the float model (``S_c = E[L(M'_c)] - E[L(M)]``);
* without: the KL divergence of the softmax outputs from the float model's (or MSE relative to the
  float output's power for outputs that are not class scores).

Semantic mode (``semantic: true``) restricts the data to D_crit: the samples of the *critical*
classes - those of the most confused class pairs in the float model's soft confusion matrix on the
labelled scoring data, or ``critical_classes`` from the recipe. Components that matter for telling
easily confused classes apart then score higher.

Each component costs one ONNX Runtime session (a copy of the model with one initializer replaced;
cheaper than exposing the weights as inputs, which disables ORT's weight prepacking: 6.5 s vs 7.9 s
for 100 Lite0 images) and one pass over the cached scoring inputs. Components run in parallel
worker processes (``workers``, default the run's ``--workers``). Scores go to ``save_scores`` and
can be read back from ``scores_file`` instead of being computed.
"""

from __future__ import annotations

import multiprocessing
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx_ir as ir
from pydantic import Field

from onnxopt.errors import PreconditionError
from onnxopt.graph import Namer, add_initializer, clone_model, constant_value, make_node, release
from onnxopt.mixed import (
    Component,
    ScoreEntry,
    SignificanceResult,
    fake_quantize,
    load_scores,
    pick_output,
    save_scores,
    scoring_data,
    weight_components,
)
from onnxopt.model_io import estimated_size, has_external_data, load_model, save_model
from onnxopt.pass_infra import Pass, PassConfig
from onnxopt.quant import activation_params
from onnxopt.ranges import CalibrationResult
from onnxopt.runtime import FILE_SESSION_BYTES, make_session, run_batch, static_batch


class SignificanceConfig(PassConfig):
    type: Literal["significance"] = "significance"
    weight_bits: int = Field(4, ge=2, le=8, description="width a weight component is fake-quantized to")
    weight_clipping: Literal["auto", "mse", "max"] = Field(
        "auto", description="weight ranges as quantize-qdq sets them (auto: MSE-clipped at 4 bits and below)")
    activations: bool = Field(False, description="also score activation tensors (needs the calibrate pass)")
    activation_bits: int = Field(4, ge=2, le=8, description="width an activation component is fake-quantized to")
    channel_groups: int = Field(1, ge=1, description="score each weight per group of output channels")
    metric: Literal["auto", "cross-entropy", "kl", "mse"] = Field(
        "auto", description="auto: cross-entropy with labels, else KL on class scores, else MSE")
    data: Literal["calibration", "validation"] = Field(
        "calibration", description="scoring data: --calib (labels: --calib-labels) or --val (labels: --labels)")
    labels_file: str | None = Field(None, description="labels (.npy) for the scoring data, if not given on the CLI")
    semantic: bool = Field(False, description="score on the critical classes only (needs labels)")
    critical_classes: list[int] | None = Field(None, description="critical classes (default: from the confusion)")
    critical_pairs: int = Field(10, ge=1, description="most confused class pairs whose classes are critical")
    max_samples: int = Field(100, gt=0, description="scoring samples (before the critical-class filter)")
    batch_size: int = Field(25, gt=0)
    output: str | None = Field(None, description="output to score (default: the first [N, C] float output)")
    workers: int | None = Field(None, ge=1, description="worker processes (default: the run's --workers)")
    scores_file: str | None = Field(None, description="read scores from this JSON instead of computing them")
    save_scores: str | None = Field(None, description="write the scores to this JSON file")


def _batches(feeds: dict[str, np.ndarray], batch_size: int):
    n = next(iter(feeds.values())).shape[0]
    for i in range(0, n, batch_size):
        yield {k: v[i:i + batch_size] for k, v in feeds.items()}


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))


def critical_classes(logits: np.ndarray, labels: np.ndarray, pairs: int) -> tuple[list[int], list[tuple]]:
    """Classes of the ``pairs`` most confused class pairs of the soft confusion matrix.

    The confusion of (a, b) is the softmax mass the model puts on b for samples of a, plus on a for
    samples of b. Soft rather than argmax counts: with few samples per class (ImageNet) hard
    counts are mostly ties at 1.
    """
    p = np.exp(log_softmax(logits))
    conf: dict[tuple[int, int], float] = {}
    for i, y in enumerate(labels):
        row = p[i].copy()
        row[y] = 0.0
        for k in np.argsort(-row, kind="stable")[:5]:
            key = (min(int(y), int(k)), max(int(y), int(k)))
            conf[key] = conf.get(key, 0.0) + float(row[k])
    top = sorted(conf.items(), key=lambda kv: (-kv[1], kv[0]))[:pairs]
    classes = sorted({c for (a, b), _ in top for c in (a, b)})
    return classes, [(a, b, round(v, 4)) for (a, b), v in top]


# --- scoring (runs in worker processes) ------------------------------------------------------------
def loss(metric: str, out: np.ndarray, ref: np.ndarray, labels: np.ndarray | None) -> float:
    """Mean loss of ``out`` over the batch (cross-entropy vs labels, KL vs ``ref``, relative MSE)."""
    if metric == "cross-entropy":
        return float(-log_softmax(out)[np.arange(len(labels)), labels].mean())
    if metric == "kl":
        lp, lq = log_softmax(ref), log_softmax(out)
        return float((np.exp(lp) * (lp - lq)).sum(axis=1).mean())
    d = out.astype(np.float64) - ref
    return float((d * d).mean() / max(float((ref.astype(np.float64) ** 2).mean()), 1e-30))


class _Scorer:
    """Scores components of one model; in a worker process the model comes by path (written once by the pass,
    weights memory-mapped from its external data), never as bytes per task."""

    def __init__(self, model: ir.Model | str, feeds, output: str, metric: str, labels, batch_size: int,
                 weight_bits: int, activation_bits: int, ranges: dict[str, tuple[float, float]],
                 reference: np.ndarray | None = None, weight_clipping: str = "auto"):
        self.model = load_model(model, check=False) if isinstance(model, str) else model
        self.inits = self.model.graph.initializers
        self.batches = list(_batches(feeds, batch_size))
        self.labels = ([labels[i:i + batch_size] for i in range(0, len(labels), batch_size)]
                       if labels is not None else [None] * len(self.batches))
        self.output, self.metric = output, metric
        self.weight_bits, self.activation_bits, self.ranges = weight_bits, activation_bits, ranges
        self.weight_clipping = weight_clipping
        self.reference = ([reference[i:i + batch_size] for i in range(0, len(reference), batch_size)]
                          if reference is not None else self._outputs(self.model))
        self.base = self._loss(self.reference)

    def _outputs(self, model: ir.Model) -> list[np.ndarray]:
        sess = make_session(model, threads=1, what="model (significance)")
        return [run_batch(sess, b, [self.output])[self.output] for b in self.batches]

    def _loss(self, outs: list[np.ndarray]) -> float:
        n = sum(len(o) for o in outs)
        return sum(loss(self.metric, o, r, y) * len(o)
                   for o, r, y in zip(outs, self.reference, self.labels, strict=True)) / n

    def score(self, c: Component) -> float:
        if c.kind == "weight":
            value = self.inits[c.tensor]
            saved = value.const_value
            fq = fake_quantize(constant_value(value), self.weight_bits, c.axis, c.channels, self.weight_clipping)
            value.const_value = ir.tensor(fq, name=value.name)  # the model's own tensor is not written to
            try:
                outs = self._outputs(self.model)
            finally:
                value.const_value = saved
                release(value)  # a memory-mapped weight: unmapped until the next read
        else:
            outs = self._outputs(self._with_fake_quant(c.tensor))
        # KL/MSE of the float model to itself are 0; cross-entropy has a baseline
        return self._loss(outs) - (self.base if self.metric == "cross-entropy" else 0.0)

    def _with_fake_quant(self, tensor: str) -> ir.Model:
        """The model with ``tensor`` rounded to the activation width (float ops, any opset)."""
        m = clone_model(self.model)
        g = m.graph
        namer = Namer(g)
        value = next(o for n in g for o in n.outputs if o.name == tensor)
        lo, hi = self.ranges[tensor]
        qt = "uint8" if self.activation_bits == 8 else None
        if qt is None:  # any width: asymmetric over [lo, hi] with an exact zero
            levels = (1 << self.activation_bits) - 1
            lo, hi = min(lo, 0.0), max(hi, 0.0)
            scale = np.float32((hi - lo) / levels) if hi > lo else np.float32(1.0)
            zp = float(np.rint(-lo / scale))
        else:
            scale, zp_i = activation_params(lo, hi, qt)
            zp, levels = float(zp_i), 255
        c = {k: add_initializer(g, np.array(v, np.float32), f"{tensor}_fq_{k}", namer)
             for k, v in (("scale", scale), ("zp", zp), ("lo", 0.0), ("hi", float(levels)))}
        readers = list(value.uses())
        nodes, x = [], value
        for i, (op, extra) in enumerate([("Div", [c["scale"]]), ("Round", []), ("Add", [c["zp"]]),
                                          ("Clip", [c["lo"], c["hi"]]), ("Sub", [c["zp"]])]):
            name = namer.unique(f"{tensor}_fq{i}")
            nodes.append(make_node(op, [x, *extra], outputs=[name], name=name))
            x = nodes[-1].outputs[0]
        out = namer.unique(f"{tensor}_fq")
        nodes.append(make_node("Mul", [x, c["scale"]], outputs=[out], name=out))
        for u in readers:
            u.node.replace_input_with(u.idx, nodes[-1].outputs[0])
        producer = value.producer()
        if producer is not None:
            g.insert_after(producer, nodes)
        else:
            g.insert_before(g.node(0), nodes)
        return m


_WORKER: dict[str, Any] = {}


def _init_worker(args: tuple) -> None:
    _WORKER["scorer"] = _Scorer(*args)


def _score_in_worker(c: Component) -> tuple[str, float]:
    return c.name, _WORKER["scorer"].score(c)


# --- the pass ----------------------------------------------------------------------------------------
class Significance(Pass):
    name = "significance"
    summary = ("Score each weight (optionally activation) by the loss increase when only it is quantized "
               "aggressively; semantic mode scores on the most confused classes.")
    Config = SignificanceConfig

    def requires(self, model: ir.Model) -> None:
        cfg: SignificanceConfig = self.config
        if cfg.scores_file is None:
            if cfg.activations and self.context.latest(CalibrationResult) is None:
                raise PreconditionError("significance with activations: true needs the calibrate pass before it")

    def call(self, model: ir.Model) -> SignificanceResult:
        cfg: SignificanceConfig = self.config
        start = time.perf_counter()
        components = weight_components(model, cfg.channel_groups)
        if cfg.scores_file is not None:
            return self._from_file(model, components)
        if not components:
            return SignificanceResult(model, False, {"components": 0})
        need_labels = cfg.semantic or cfg.metric == "cross-entropy"
        feeds, labels = scoring_data(self.context, cfg.data, cfg.labels_file, cfg.max_samples, cfg.batch_size,
                                     need_labels, "significance")
        output = pick_output(model, feeds, cfg.output)
        metric = cfg.metric
        if metric == "auto":
            metric = "cross-entropy" if labels is not None else "kl"
        sess = make_session(model, threads=1, what="model (significance)")
        # a static batch dim (YOLOX-Nano's export: 1) caps the batch the scoring runs are cut into
        batch_size = min(cfg.batch_size, static_batch(sess) or cfg.batch_size)
        ref = np.concatenate([run_batch(sess, b, [output])[output] for b in _batches(feeds, batch_size)])
        if metric in ("cross-entropy", "kl") and (ref.ndim != 2 or ref.shape[1] < 2):
            if metric == "cross-entropy":
                raise PreconditionError(f"cross-entropy needs [N, C] class scores; output {output!r} is "
                                        f"{list(ref.shape)}")
            metric = "mse"
        details: dict[str, Any] = {"metric": metric, "output": output}
        crit: list[int] = []
        if cfg.semantic:
            if cfg.critical_classes:
                crit, pairs = sorted(set(cfg.critical_classes)), []
            else:
                crit, pairs = critical_classes(ref, labels, cfg.critical_pairs)
                details["confused_pairs"] = [list(p) for p in pairs[:10]]
            keep = np.isin(labels, crit)
            if not keep.any():
                raise PreconditionError(f"no scoring sample belongs to the critical classes {crit[:10]}")
            feeds = {k: v[keep] for k, v in feeds.items()}
            labels = labels[keep]
            ref = ref[keep]
            details["critical_classes"] = crit
        samples = next(iter(feeds.values())).shape[0]
        if metric != "cross-entropy":
            labels = None
        ranges: dict[str, tuple[float, float]] = {}
        if cfg.activations:
            cal = self.context.latest(CalibrationResult)
            graph_outputs = {o.name for o in model.graph.outputs}
            for c in self._activation_components(model):
                if c.tensor in cal.ranges and c.tensor not in graph_outputs:
                    r = cal.ranges[c.tensor]
                    ranges[c.tensor] = (float(r.min), float(r.max))
                    components.append(c)
        args = (model, feeds, output, metric, labels, batch_size, cfg.weight_bits,
                cfg.activation_bits, ranges, ref, cfg.weight_clipping)
        scores = self._run(components, args, cfg.workers or self.context.workers)
        entries = [ScoreEntry(c.name, c.kind, c.op_type, c.tensor, c.params, scores[c.name]) for c in components]
        seconds = time.perf_counter() - start
        result = SignificanceResult(model, False, details, entries=entries, metric=metric,
                                    setting_bits=cfg.weight_bits, samples=samples, critical_classes=crit,
                                    seconds=seconds)
        details.update(self._summary(result))
        if cfg.save_scores:
            save_scores(result, cfg.save_scores)
            details["scores_file"] = cfg.save_scores
        return result

    @staticmethod
    def _activation_components(model: ir.Model) -> list[Component]:
        out = []
        for n in model.graph:
            name = n.outputs[0].name if n.outputs else ""
            if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and name:
                out.append(Component(f"act:{name}", "activation", n.op_type, n.name or "", name, 0))
        return out

    def _run(self, components: list[Component], args: tuple, workers: int) -> dict[str, float]:
        scores: dict[str, float] = {}
        with self.context.progress.task(f"significance ({len(components)} components)", len(components)) as bar:
            if workers <= 1 or len(components) < 2:
                scorer = _Scorer(*args)
                for c in components:
                    scores[c.name] = scorer.score(c)
                    bar.update()
                return scores
            # the workers read the model from one file (weights memory-mapped), written here once
            tmp = Path(tempfile.mkdtemp(prefix="onnxopt-significance-"))
            try:
                path = tmp / "model.onnx"
                model = args[0]
                # external data when ORT gets the model through a file anyway: the workers then map the
                # weights instead of each holding a copy
                large = has_external_data(model) or estimated_size(model) > FILE_SESSION_BYTES
                save_model(model, path, external_data=True if large else None, check=False)
                worker_args = (str(path), *args[1:])
                # spawn: a forked child would inherit ORT's thread pools mid-state
                ctx = multiprocessing.get_context("spawn")
                with ProcessPoolExecutor(min(workers, len(components)), mp_context=ctx,
                                         initializer=_init_worker, initargs=(worker_args,)) as pool:
                    futures = [pool.submit(_score_in_worker, c) for c in components]
                    for f in as_completed(futures):
                        name, s = f.result()
                        scores[name] = s
                        bar.update()
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return scores

    def _from_file(self, model: ir.Model, components: list[Component]) -> SignificanceResult:
        cfg: SignificanceConfig = self.config
        loaded = load_scores(cfg.scores_file)
        known = {c.name: c for c in components}
        unknown = [e.name for e in loaded.entries if e.kind == "weight" and e.name not in known]
        if unknown:
            raise PreconditionError(f"{cfg.scores_file}: no weighted node {unknown[0]!r} in the model "
                                    f"({len(unknown)} unknown component(s))")
        given = {e.name: e for e in loaded.entries}
        entries = []
        for c in components:
            e = given.get(c.name)
            entries.append(ScoreEntry(c.name, "weight", c.op_type, c.tensor, c.params, e.score if e else 0.0))
        entries += [e for e in loaded.entries if e.kind != "weight"]
        result = SignificanceResult(model, False, {"scores_file": cfg.scores_file}, entries=entries,
                                    metric=loaded.metric, setting_bits=loaded.setting_bits, samples=loaded.samples,
                                    critical_classes=loaded.critical_classes)
        result.details.update(self._summary(result))
        missing = sum(1 for c in components if c.name not in given)
        if missing:
            result.details["unscored_components"] = missing
        return result

    @staticmethod
    def _summary(r: SignificanceResult) -> dict[str, Any]:
        top = sorted(r.entries, key=lambda e: (-e.score, e.name))[:5]
        return {"components": len(r.entries), "samples": r.samples,
                "top": [{"name": e.name, "score": round(e.score, 6)} for e in top]}

