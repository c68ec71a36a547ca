"""Precision fallback: give back float (or 16-bit activations) to the few places where int8 loses the model.

Some networks lose far more to 8-bit activations than the rest: YOLOX-Nano's stem (BatchNorm folded into
convs whose channels differ by 1000x in range, at full resolution) takes the output SQNR from ~40 dB to 7 dB
and the detections' pseudo mAP@0.5 against fp32 to 0.47, although every later layer is fine. A uniform
fallback (all activations 16-bit) would recover it but costs all of int8's speed.

This pass runs after ``quantize-qdq``: it measures the output SQNR of the quantized model against the
float one on a few calibration samples and, only when it is below ``min_sqnr_db``, localizes where the error
arises (``onnxopt.localize``: per node, how much SQNR it loses) and greedily takes nodes out of int8: each
step re-quantizes the float model with one more candidate island (the node's activation inputs and
outputs kept float, or 16-bit) for each of the ``candidates`` worst remaining nodes, keeps the one that
helps most, and stops at the target, when nothing helps by ``min_gain_db``, or at ``max_nodes``. The
result is a ``QuantizeQDQResult`` (with the islands as overrides), so ``latency-placement`` after it keeps
them.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import onnx_ir as ir
from pydantic import Field

from onnxopt.activations import FLOAT_TYPES, output_sqnr, sample_batches, value_types
from onnxopt.data import samples_in
from onnxopt.errors import PreconditionError
from onnxopt.graph import clone_model
from onnxopt.localize import localize
from onnxopt.pass_infra import Pass, PassConfig
from onnxopt.qdq import COMPUTE_OPS, QuantizeQDQConfig, QuantizeQDQResult, QuantOverride
from onnxopt.registry import get_pass_class
from onnxopt.runtime import make_session, run_batch

_ACTIVATION_OPS = frozenset({"Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Mul", "Tanh", "LeakyRelu",
                             "Gelu", "Erf"})


class PrecisionFallbackConfig(PassConfig):
    type: Literal["precision-fallback"] = "precision-fallback"
    # YOLOX-Nano on 150 ImageNet val JPEGs (pseudo mAP@0.5 vs fp32): 7.4 dB -> 0.47, 11.8 dB -> 0.90,
    # 13 dB -> 0.92; EfficientNet-Lite0 (23 dB), MiniLM (20 dB), PP-OCR (18 dB) are left alone
    min_sqnr_db: float = Field(12.0, description="act only when the model's output SQNR is below this")
    fallback: Literal["float", "int16"] = Field(
        "float", description="what an island becomes: float compute (fast on CPU), or 16-bit activations")
    samples: int = Field(8, gt=0, description="calibration samples for the SQNR measurements")
    max_nodes: int = Field(8, ge=0, description="at most this many nodes taken out of int8")
    candidates: int = Field(4, gt=0, description="worst remaining nodes tried at each step")
    min_gain_db: float = Field(0.3, ge=0, description="stop when the best step gains less than this")


class PrecisionFallbackResult(QuantizeQDQResult):
    pass


class PrecisionFallback(Pass):
    name = "precision-fallback"
    summary = ("Where int8 costs the model most (output SQNR below a target), keep the few worst nodes in "
               "float or 16-bit, found by localizing the error and measuring each step.")
    Config = PrecisionFallbackConfig
    needs = frozenset({"calibration"})

    def requires(self, model: ir.Model) -> None:
        super().requires(model)
        q = self.context.latest(QuantizeQDQResult)
        if q is None or q.source is None or q.config is None:
            raise PreconditionError("precision-fallback needs the quantize-qdq pass to run before it "
                                    "(it re-quantizes from the float model)")

    def call(self, model: ir.Model) -> PrecisionFallbackResult:
        cfg: PrecisionFallbackConfig = self.config  # type: ignore[assignment]
        start = time.perf_counter()
        q = self.context.latest(QuantizeQDQResult)
        batches = sample_batches(q.source, self.context.calibration, cfg.samples)
        ref_sess = make_session(q.source, threads=None, what="float model")
        names = [o.name for o in ref_sess.get_outputs()]
        reference = [list(run_batch(ref_sess, b, names).values()) for b in batches]

        def sqnr(m: ir.Model) -> float:
            s = make_session(m, threads=None, what="candidate")
            return output_sqnr(reference, [list(run_batch(s, b, names).values()) for b in batches])

        before = sqnr(model)
        details: dict[str, Any] = {"sqnr_db_before": round(before, 2), "min_sqnr_db": cfg.min_sqnr_db}
        if before >= cfg.min_sqnr_db or cfg.max_nodes == 0:
            details["action"] = "none (output SQNR at or above the target)" if cfg.max_nodes else "none"
            return self._unchanged(model, q, details, start)

        islands = self._islands(q.source)
        readers = self._readers(q.source)
        # accepted: the best placement so far; probe: where the search stands. A probe may go one step
        # past the accepted one without gaining (two islands can help only together: a float conv whose
        # output still feeds an int8 one)
        accepted = probe = ([], model, before, None)
        trials = 0
        with self.context.progress.task("precision fallback", cfg.max_nodes) as bar:
            while accepted[2] < cfg.min_sqnr_db and len(probe[0]) < cfg.max_nodes:
                chosen, current = probe[0], probe[1]
                ranked = [n for n in self._ranked(q, current, batches) if n not in chosen and islands.get(n)]
                near = [r for n in chosen for t in islands[n] for r in readers.get(t, ())
                        if r not in chosen and islands.get(r)]
                pool = list(dict.fromkeys(ranked[:cfg.candidates] + near[:cfg.candidates]))
                if not pool:
                    break
                step = []
                for node in pool:
                    r = self._requantize(q, chosen + [node], islands)
                    step.append((sqnr(r.model), node, r))
                    trials += 1
                score, node, r = max(step, key=lambda t: t[0])
                probe = (chosen + [node], r.model, score, r)
                bar.update(1)
                if score - accepted[2] >= cfg.min_gain_db * (len(probe[0]) - len(accepted[0])):
                    accepted = probe
                elif len(probe[0]) - len(accepted[0]) > 1:
                    break
        chosen, best_model, best, best_result = accepted
        details.update({"sqnr_db_after": round(best, 2), "nodes": chosen, "trials": trials,
                        "fallback": cfg.fallback, "reached": best >= cfg.min_sqnr_db})
        if not chosen:
            details["action"] = "none helped"
            return self._unchanged(model, q, details, start)
        details["action"] = f"{len(chosen)} node(s) out of int8"
        details["layer_sqnr_db"] = self._layer_sqnr(q, model, best_model, batches)
        details["seconds"] = round(time.perf_counter() - start, 2)
        cfg_q = self._config(q, chosen, islands)
        return PrecisionFallbackResult(best_model, True, details, scheme=q.scheme,
                                       activations=best_result.activations, weights=best_result.weights,
                                       kernels=None, source=q.source, means=q.means, config=cfg_q)

    # -- helpers ---------------------------------------------------------------------------------
    def _unchanged(self, model: ir.Model, q: QuantizeQDQResult, details: dict, start: float):
        details["seconds"] = round(time.perf_counter() - start, 2)
        return PrecisionFallbackResult(model, False, details, scheme=q.scheme, activations=q.activations,
                                       weights=q.weights, kernels=q.kernels, source=q.source, means=q.means,
                                       config=q.config)

    def _ranked(self, q: QuantizeQDQResult, model: ir.Model, batches) -> list[str]:
        """Node names of the float model, the largest SQNR loss first."""
        class Fixed:  # the batches already sampled, as localize's data source
            def batches(self, _size):
                yield from batches

        loc = localize(q.source, model, Fixed(), max_samples=sum(samples_in(b) for b in batches))
        layers = sorted((x for x in loc.layers if x.jump_db > 0 and x.node), key=lambda x: (-x.jump_db, x.node))
        return list(dict.fromkeys(x.node for x in layers))

    @staticmethod
    def _layer_sqnr(q: QuantizeQDQResult, before: ir.Model, after: ir.Model, batches) -> dict[str, list[float]]:
        """Conv/Gemm/MatMul output SQNR (dB) against the float model, before and after the fallback (the report's
        per-layer view of this recovery step)."""
        class Fixed:
            def batches(self, _size):
                yield from batches

        n = sum(samples_in(b) for b in batches)
        out: dict[str, list[float]] = {}
        for i, m in enumerate((before, after)):
            for x in localize(q.source, m, Fixed(), max_samples=n).layers:
                if x.op_type in COMPUTE_OPS:
                    out.setdefault(x.tensor, [float("nan"), float("nan")])[i] = round(x.sqnr_db, 2)
        return out

    @staticmethod
    def _readers(source: ir.Model) -> dict[str, list[str]]:
        """Activation name -> names of the nodes reading it, in graph order."""
        out: dict[str, list[str]] = {}
        for n in source.graph:
            for v in n.inputs:
                if v is not None and v.name and n.name:
                    out.setdefault(v.name, []).append(n.name)
        return out

    @staticmethod
    def _islands(source: ir.Model) -> dict[str, list[str]]:
        """Node name -> the float activations its island keeps out of int8: what it reads and writes, and for
        a Conv/MatMul/Gemm also its activation function's (Relu, Clip, Sigmoid and the Mul of x * sigmoid(x),
        ...): quantizing between a layer and its activation is where the island's error would come back."""
        types = value_types(source)

        def acts(n: ir.Node) -> list[ir.Value]:
            return [v for v in [*n.inputs, *n.outputs] if v is not None and v.name and v.const_value is None
                    and not v.is_initializer() and types.get(v.name) in FLOAT_TYPES]

        out: dict[str, list[str]] = {}
        for n in source.graph:
            if not n.name:
                continue
            values = acts(n)
            if n.op_type in COMPUTE_OPS:
                frontier = [n]
                for _ in range(2):  # layer -> Sigmoid -> Mul (SiLU), layer -> Relu, layer -> HardSigmoid -> Mul
                    frontier = [u for f in frontier for o in f.outputs for u, _ in o.uses()
                                if u.op_type in _ACTIVATION_OPS]
                    values += [v for u in frontier for v in acts(u)]
            out[n.name] = list(dict.fromkeys(v.name for v in values))
        return out

    def _config(self, q: QuantizeQDQResult, nodes: list[str], islands: dict[str, list[str]]) -> QuantizeQDQConfig:
        cfg: PrecisionFallbackConfig = self.config  # type: ignore[assignment]
        tensors = sorted({t for n in nodes for t in islands[n]})
        if cfg.fallback == "float":
            extra = QuantOverride(tensors=tensors, exclude=True)
        else:
            extra = QuantOverride(tensors=tensors, activation_type="uint16")
        return q.config.model_copy(update={"overrides": list(q.config.overrides) + [extra]})

    def _requantize(self, q: QuantizeQDQResult, nodes: list[str], islands: dict[str, list[str]]
                    ) -> QuantizeQDQResult:
        cfg = self._config(q, nodes, islands).model_copy(update={"check_kernels": False})
        p = get_pass_class("quantize-qdq")(cfg, self.context)
        p.precomputed_means = q.means
        return p(clone_model(q.source))
