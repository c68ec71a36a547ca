"""reconstruct: learned rounding of quantized weights (AdaRound) and a bias refit, after the QDQ passes.

For each Conv (grouped and depthwise included), Gemm and MatMul whose weight is an integer initializer behind a
DequantizeLinear, the rounding of every weight (up or down) is chosen to reproduce the float layer's output:
the float model's layer output is the target, the quantized weights on the inputs the *quantized* model gives
the layer are the candidate, so each layer also absorbs the error of the layers before it. The loss needs only
second moments (``onnxopt.reconstruct``), streamed over the calibration data; then the bias is refit so the mean
output error is zero (AdaQuant's bias correction), and each output channel's weight scale is refit in closed form
for the chosen integers (AdaQuant's scale step; an int32 bias's scale moves with it, as the fused integer kernels
take it to be input scale x weight scale). Zero points and the graph stay as they were.

Layers are fitted in graph order, each on the inputs of the model with every earlier layer already
reconstructed (one pair of runs per group of layers that do not feed each other). Fitting a chain's layers
from one run instead lets each compensate a predecessor's error that the predecessor then removes itself:
EfficientNet-Lite0 int8 dropped from 80.9 % to 58.9 % top-1 that way.

A layer whose output error on held-out calibration batches would not go down keeps its round-to-nearest
weights (reported), as do layers with too few input rows for their Gram matrix (with the samples they need);
``only_if_better`` keeps the whole model's round-to-nearest weights when the model's output SQNR on the
held-out batches does not go up. Put it after the passes that re-quantize from the float model
(precision-fallback, latency-placement): they would start again from round-to-nearest weights.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx_ir as ir
from pydantic import Field

from onnxopt import reconstruct as R
from onnxopt.activations import limited_batches, output_sqnr, stream_paired
from onnxopt.errors import OnnxoptError
from onnxopt.graph import attr, constant_value, is_initializer, is_op, set_constant
from onnxopt.layers import Geometry, node_label
from onnxopt.pass_infra import Pass, PassConfig, PassResult, PreconditionError
from onnxopt.qdq import QuantizeQDQResult
from onnxopt.quant import qrange
from onnxopt.runtime import make_session, run_batch

INT_TYPES = {"int8", "uint8", "int4", "uint4", "int16", "uint16"}


class ReconstructConfig(PassConfig):
    type: str = "reconstruct"
    samples: int = Field(128, description="calibration samples the layer statistics are streamed over")
    min_samples: int = Field(16, description="refuse with fewer calibration samples than this")
    batch_size: int = Field(16, description="samples per run of the two models")
    rows_per_sample: int = Field(512, description="conv output positions drawn per sample and layer (all when "
                                 "fewer)")
    iters: int = Field(400, description="Adam steps per layer")
    lam: float = Field(3.0, description="rounding regulariser weight (reconstruction normalised to 1 at "
                       "round-to-nearest)")
    lr: float = Field(0.05, description="Adam step size on the rounding variables")
    damping: float = Field(0.01, description="fraction of the mean input power added to the Gram diagonal")
    min_rows_ratio: float = Field(2.0, description="a layer needs at least this many input rows per weight "
                                  "column; fewer: round-to-nearest kept, samples needed reported")
    holdout: float = Field(0.25, description="fraction of the calibration batches held out to judge each layer's "
                           "rounding (and the model's) against round-to-nearest")
    only_if_better: bool = Field(True, description="keep round-to-nearest everywhere when the model's output "
                                 "SQNR on the held-out batches does not go up")
    bias: bool = Field(True, description="refit the bias so the layer's mean output error is zero")
    scales: bool = Field(True, description="after the rounding, refit each output channel's weight scale in closed "
                         "form (AdaQuant's scale step; per-channel scales only, the int32 bias rescaled with it), "
                         "kept when the held-out error goes down")
    float_layers: Literal["refit", "skip"] = Field("refit", description="layers whose weight is a float "
                                                   "initializer (pruned, or float islands): refit: ridge least "
                                                   "squares on the same support (zeros stay zero)")
    refit_damping: float = Field(0.05, description="ridge towards the current weights, relative to the mean "
                                 "input power")
    op_types: list[str] = Field(default_factory=lambda: ["Conv", "Gemm", "MatMul"])
    opt_level: str = Field("all", description="ORT optimization level of the statistics runs")
    seed: int = 0


@dataclass
class ReconstructResult(PassResult):
    # per layer (node label): output SQNR before/after (dB) on the held-out batches, what was kept and why
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: ir.Model | None = None  # the model whose layer outputs were the targets


@dataclass
class _Layer:
    index: int
    node: ir.Node
    label: str
    y_f: str  # the layer's output in the float model (W x_f + b)
    x_q: str  # its input in the quantized model
    w: np.ndarray  # float weights [B, O, K]
    q_value: ir.Value  # the integer weight initializer
    scale: np.ndarray  # [B, O]
    zero: np.ndarray  # [B, O]
    qmin: int
    qmax: int
    to_layout: Any  # [B, O, K] -> the initializer's layout
    sample: Any  # (x, y, count, rng) -> (rows of x [n, B * K], rows of y [n, O])
    groups: int
    bias_f: np.ndarray | None  # float model's bias [B, O]
    bias_value: ir.Value | None  # int32 (behind a DequantizeLinear) or float initializer read as the bias
    bias_scale: np.ndarray | None  # int32 bias scale [O], None for a float bias
    bias_now: np.ndarray | None  # the quantized model's bias [B, O]
    per_sample: int = 1  # rows one sample gives (output positions, tokens)
    scale_value: ir.Value | None = None  # the per-channel weight scale, when ours to change
    bias_scale_value: ir.Value | None = None  # the int32 bias's scale (input scale x weight scale)
    mode: str = "round"  # round: integer weights behind a DequantizeLinear; refit: a float initializer


def _own(v: ir.Value | None, size: int) -> ir.Value | None:
    """``v`` when it is a constant of ``size`` values that nothing else reads (so ours to rewrite)."""
    c = constant_value(v) if v is not None else None
    return v if c is not None and c.size == size and len(v.uses()) == 1 else None


def _dq_source(v: ir.Value | None) -> ir.Node | None:
    p = v.producer() if v is not None else None
    if is_op(p, "DequantizeLinear") and constant_value(p.inputs[0]) is not None:
        return p
    return None


def _per_out(a: np.ndarray | None, n: int, groups: int) -> np.ndarray | None:
    if a is None:
        return None
    return np.broadcast_to(np.asarray(a, np.float64).reshape(-1), (n,)).reshape(groups, -1)


class Reconstruct(Pass):
    name = "reconstruct"
    summary = ("Learned up/down rounding of quantized weights (AdaRound) and a bias refit, layer by layer in graph "
               "order, so each quantized layer reproduces the float layer's output on calibration data.")
    Config = ReconstructConfig
    needs = frozenset({"calibration"})

    def requires(self, model: ir.Model) -> None:
        super().requires(model)
        if self._reference() is None:
            raise PreconditionError("reconstruct needs quantize-qdq, or prune-weights with calibration data, to run "
                                    "before it (it fits each layer to the output of the model they started from)")

    def _reference(self) -> tuple[ir.Model, QuantizeQDQResult | None] | None:
        """The model the latest quantize-qdq / prune-weights started from (the targets), and quantize-qdq's
        result when that was the latest."""
        from onnxopt.passes.prune_weights import PruneWeightsResult

        for r in reversed(self.context.results):
            if isinstance(r, QuantizeQDQResult | PruneWeightsResult) and r.source is not None:
                return r.source, (r if isinstance(r, QuantizeQDQResult) else None)
        return None

    def call(self, model: ir.Model) -> ReconstructResult:
        cfg: ReconstructConfig = self.config  # type: ignore[assignment]
        start = time.perf_counter()
        source, q = self._reference()
        samples = min(len(self.context.calibration), cfg.samples)
        if samples < cfg.min_samples:
            raise OnnxoptError(f"reconstruct: {samples} calibration sample(s); it needs at least {cfg.min_samples} "
                               "(learned rounding on fewer fits the noise of the samples)")
        layers, skipped = self._layers(model, source, q)
        groups = R.stages(self._dependencies(model, layers))
        report: dict[str, dict[str, Any]] = {}
        undo: list[tuple[ir.Value, np.ndarray]] = []
        collect_s = 0.0
        with self.context.progress.task("reconstruct: layers", len(layers)) as bar:
            for group in groups:
                stage = [layers[i] for i in group]
                t0 = time.perf_counter()
                stats = self._collect(source, model, stage, samples)
                collect_s += time.perf_counter() - t0
                for layer in stage:
                    t0 = time.perf_counter()
                    entry = self._reconstruct(layer, *stats[layer.label], undo)
                    entry["seconds"] = round(time.perf_counter() - t0, 3)
                    report[layer.label] = entry
                    bar.update(1)
        changed = sorted(k for k, v in report.items() if v["kept"] in ("adaround", "refit"))
        details: dict[str, Any] = {
            "layers": len(layers), "reconstructed": len(changed), "samples": samples, "stages": len(groups),
            "kept_rtn_worse": sorted(k for k, v in report.items() if v.get("why") == "error not lowered"),
            "statistics_seconds": round(collect_s, 2),
        }
        if changed and cfg.only_if_better:
            before, after = self._model_check(source, model, samples, undo)
            details["output_sqnr_db"] = [round(before, 2), round(after, 2)]
            if not after > before:
                for value, old in reversed(undo):
                    set_constant(value, old)
                details["reverted"] = (f"output SQNR on the held-out calibration batches {before:.2f} -> "
                                       f"{after:.2f} dB: round-to-nearest weights kept")
                for k in changed:
                    report[k].update(kept="rtn" if report[k]["kept"] == "adaround" else "unchanged",
                                     why="model output not improved")
                changed = []
        details["reconstructed"] = sum(1 for k in changed if report[k]["kept"] == "adaround")
        details["layer_sqnr_db"] = {v["output"]: v["sqnr_db"] if v["kept"] in ("adaround", "refit")
                                    else [v["sqnr_db"][0]] * 2
                                    for v in report.values() if "sqnr_db" in v}
        for label, why in skipped.items():
            report[label] = {"kept": "rtn", "why": why}
        few = {k: v["samples_needed"] for k, v in report.items() if "samples_needed" in v}
        if few:
            details["too_few_samples"] = few
            details["warning"] = (f"{len(few)} layer(s) kept round-to-nearest: too few calibration samples for their "
                                  f"input size (up to {max(few.values())} needed, {samples} used)")
        details["seconds"] = round(time.perf_counter() - start, 2)
        details["refit"] = sum(1 for v in report.values() if v["kept"] == "refit")
        return ReconstructResult(model, bool(changed), details, layers=report, source=source)

    # -- layers ----------------------------------------------------------------------------------
    def _layers(self, model: ir.Model, source: ir.Model, q: QuantizeQDQResult | None
                ) -> tuple[list[_Layer], dict[str, str]]:
        cfg: ReconstructConfig = self.config  # type: ignore[assignment]
        float_nodes = {n.name: n for n in source.graph if n.name}
        layers: list[_Layer] = []
        skipped: dict[str, str] = {}
        symmetric = q.config.weight_symmetric if q is not None and q.config is not None else True
        for node in model.graph:
            if node.op_type not in cfg.op_types or not node.name or len(node.inputs) < 2:
                continue
            label = node_label(node)
            fnode = float_nodes.get(node.name)
            dq = _dq_source(node.inputs[1])
            refit = (dq is None and cfg.float_layers == "refit" and is_initializer(node.inputs[1])
                     and len(node.inputs[1].uses()) == 1)
            if fnode is None or fnode.op_type != node.op_type or node.inputs[0] is None or (dq is None and not refit):
                continue  # not a weight of the reference model's layer that is ours to change
            ints = constant_value(dq.inputs[0] if dq is not None else node.inputs[1])
            if dq is not None and ints.dtype.name not in INT_TYPES:
                skipped[label] = f"weight stored as {ints.dtype.name}"
                continue
            if dq is None and ints.dtype.kind != "f":
                continue
            op = node.op_type
            if op == "Gemm" and (attr(node, "transA", 0) or attr(node, "alpha", 1.0) != 1.0
                                 or attr(node, "beta", 1.0) != 1.0):
                skipped[label] = "Gemm with transA/alpha/beta"
                continue
            w = constant_value(fnode.inputs[1])
            if w is None:
                skipped[label] = "float weight not a constant"
                continue
            w = w.astype(np.float32)
            if w.shape != ints.shape:
                skipped[label] = f"float weight {list(w.shape)} vs quantized {list(ints.shape)}"
                continue
            lo = hi = 0
            if dq is not None:
                wq = q.weights.get(node.name) if q is not None else None
                # the interval quantize-qdq rounded into (MSE-clipped ranges saturate on the symmetric one)
                lo, hi = qrange(ints.dtype.name, symmetric=bool(symmetric and wq is not None and wq.mse_clipped),
                                reduce_range=bool(wq is not None and wq.reduce_range))
                lo, hi = min(lo, int(ints.min())), max(hi, int(ints.max()))  # never tighter than what is stored
            groups = 1
            if op == "Conv":
                groups = int(attr(node, "group", 1))
                o, cg = w.shape[0], w.shape[1]
                k = cg * math.prod(w.shape[2:])
                w3 = w.reshape(groups, o // groups, k)
                geo = Geometry.of(node, tuple(w.shape[2:]))
                sample = geo.sampled_rows
                to_layout = _Reshape(w.shape)
                per_out = o
            else:
                if w.ndim != 2:
                    skipped[label] = f"{w.ndim}-D weight"
                    continue
                trans = bool(op == "Gemm" and attr(node, "transB", 0))
                w2 = w if trans else w.T
                w3 = w2[None]
                sample = _matrix_rows
                to_layout = _Matrix(trans)
                per_out = w2.shape[0]
            if dq is not None:
                scale = constant_value(dq.inputs[1])
                zero = constant_value(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] is not None else None
                if scale.size not in (1, per_out) or (zero is not None and zero.size not in (1, per_out)):
                    skipped[label] = "blocked or unusual weight scales"
                    continue
                scale = _per_out(scale, per_out, groups).astype(np.float32)
                zero = (_per_out(zero, per_out, groups) if zero is not None
                        else np.zeros_like(scale)).astype(np.float32)
            else:
                scale = zero = np.ones((groups, per_out // groups), np.float32)
            bias_f = bias_now = bias_value = bias_scale = bias_scale_value = None
            if op in ("Conv", "Gemm") and len(fnode.inputs) > 2 and fnode.inputs[2] is not None:
                bias_f = _per_out(constant_value(fnode.inputs[2]), per_out, groups)
                if bias_f is None:
                    skipped[label] = "float bias not a constant"
                    continue
                if bias_f.size != per_out:
                    skipped[label] = "bias not one value per output"
                    continue
            if op in ("Conv", "Gemm") and len(node.inputs) > 2 and node.inputs[2] is not None:
                bdq = _dq_source(node.inputs[2])
                if bdq is not None:
                    bias_value = bdq.inputs[0]
                    bias_scale_value = _own(bdq.inputs[1], per_out)
                    bias_scale = _per_out(constant_value(bdq.inputs[1]), per_out, 1).reshape(-1)
                    bias_now = _per_out(constant_value(bias_value), per_out, groups) * bias_scale.reshape(groups, -1)
                elif constant_value(node.inputs[2]) is not None:
                    bias_value = node.inputs[2]
                    bias_now = _per_out(constant_value(bias_value), per_out, groups)
                if bias_value is not None and (len(bias_value.uses()) != 1 or constant_value(bias_value).size
                                               != per_out):
                    bias_value = bias_scale_value = None  # shared or broadcast: not ours to change
            if bias_f is None and bias_now is not None:
                bias_f = np.zeros_like(bias_now)
            scale_value = _own(dq.inputs[1], per_out) if dq is not None and per_out > 1 else None
            if bias_scale is not None and bias_scale_value is None:
                scale_value = None  # the int32 bias must keep input scale x weight scale, as fused kernels assume
            layers.append(_Layer(len(layers), node, label, fnode.outputs[0].name, node.inputs[0].name, w3,
                                 dq.inputs[0] if dq is not None else node.inputs[1], scale, zero, lo, hi, to_layout,
                                 sample, groups, bias_f, bias_value, bias_scale, bias_now,
                                 mode="round" if dq is not None else "refit", scale_value=scale_value,
                                 bias_scale_value=bias_scale_value))
        return layers, skipped

    @staticmethod
    def _dependencies(model: ir.Model, layers: list[_Layer]) -> list[int]:
        """Per layer, the bit mask of the layers upstream of its input (in the quantized model)."""
        index = {id(x.node): x.index for x in layers}
        mask: dict[int, int] = {}
        deps = [0] * len(layers)
        for node in model.graph:
            m = 0
            for v in node.inputs:
                if v is not None:
                    m |= mask.get(id(v), 0)
            i = index.get(id(node))
            if i is not None:
                x = node.inputs[0]
                deps[i] = mask.get(id(x), 0)
                m |= 1 << i
            for o in node.outputs:
                mask[id(o)] = m
        return deps

    def _collect(self, source_model: ir.Model, model: ir.Model, layers: list[_Layer], samples: int
                 ) -> dict[str, tuple[R.LayerMoments, R.LayerMoments | None]]:
        cfg: ReconstructConfig = self.config  # type: ignore[assignment]
        fit = {x.label: R.Accumulator(x.groups) for x in layers}
        held = {x.label: R.Accumulator(x.groups) for x in layers}
        every = int(round(1 / cfg.holdout)) if cfg.holdout > 0 else 0
        batch_no = 0
        for n, ref, cand in stream_paired(source_model, model, self.context.calibration, [x.y_f for x in layers],
                                          [x.x_q for x in layers], batch_size=cfg.batch_size, max_samples=samples,
                                          what="reconstruct", opt_level=cfg.opt_level):
            batch_no += 1
            check = bool(every) and batch_no % every == 0  # held out: judges the rounding, not fitted on
            for x in layers:
                rng = np.random.default_rng((cfg.seed, x.index, batch_no))
                y = ref[x.y_f]
                try:
                    rows_x, rows_y = x.sample(cand[x.x_q], y, cfg.rows_per_sample * n, rng)
                except (OnnxoptError, ValueError) as exc:
                    raise OnnxoptError(f"reconstruct: layer {x.label}: {exc}") from None
                if x.bias_f is not None:  # the target is W x_f: the float output without its bias
                    rows_y = rows_y - x.bias_f.reshape(1, -1).astype(rows_y.dtype)
                # rows one sample can give: output positions of a conv, tokens of a sequence
                x.per_sample = max(1, math.prod(y.shape[2:]) if x.node.op_type == "Conv"
                                   else math.prod(y.shape[:-1]) // max(n, 1))
                (held if check else fit)[x.label].add(rows_x, rows_y, n)
        return {k: (fit[k].moments(), held[k].moments()) for k in fit}

    # -- one layer -------------------------------------------------------------------------------
    def _reconstruct(self, x: _Layer, m: R.LayerMoments | None, check: R.LayerMoments | None,
                     undo: list[tuple[ir.Value, np.ndarray]]) -> dict[str, Any]:
        cfg: ReconstructConfig = self.config  # type: ignore[assignment]
        entry: dict[str, Any] = {"output": x.node.outputs[0].name}
        keep = "rtn" if x.mode == "round" else "unchanged"  # what a layer left alone keeps
        if m is None:
            entry.update(kept=keep, why="no statistics")
            return entry
        k = x.w.shape[2]
        check = check or m
        q_now = self._current_ints(x)
        db_now = (x.bias_f - x.bias_now) if x.bias_f is not None and x.bias_now is not None else None
        wq_now = R.dequant(q_now, x.scale, x.zero) if x.mode == "round" else q_now
        signal = R.output_power(check, x.bias_f)
        err_now = R.output_error(check, wq_now, db_now)
        before = R.sqnr_db(signal, err_now)
        entry["sqnr_db"] = [round(before, 2), round(before, 2)]
        if m.rows < cfg.min_rows_ratio * k:
            fitted = 1 - cfg.holdout if cfg.holdout > 0 else 1.0  # the held-out batches are not fitted on
            entry.update(kept=keep, why="too few samples",
                         samples_needed=int(math.ceil(cfg.min_rows_ratio * k / x.per_sample / fitted)))
            return entry
        refit = cfg.bias and x.bias_value is not None
        if x.mode == "round":
            q_new = R.adaround(m, x.w, x.scale, x.zero, x.qmin, x.qmax, iters=cfg.iters, lam=cfg.lam, lr=cfg.lr,
                               damping=cfg.damping)
            wq = R.dequant(q_new, x.scale, x.zero)
        else:
            q_new, _ = R.masked_refit(m, q_now, q_now != 0, cfg.refit_damping, centred=refit)
            wq = q_new
        bias_scale = x.bias_scale.reshape(x.groups, -1) if x.bias_scale is not None else None

        def judged(wq: np.ndarray, bias_scale: np.ndarray | None) -> tuple[float, np.ndarray | None]:
            """Held-out output error (the fitted batches would favour any change) with the bias refit."""
            if not refit:
                return R.output_error(check, wq, db_now), None
            b_new = x.bias_f + R.bias_refit(m, wq)
            if bias_scale is not None:  # int32 at input x weight scale: the value the runtime will add
                b_new = np.clip(np.round(b_new / bias_scale), -2 ** 31, 2 ** 31 - 1) * bias_scale
            return R.output_error(check, wq, x.bias_f - b_new), b_new

        err_new, b_new = judged(wq, bias_scale)
        scale_new = None
        if x.mode == "round" and cfg.scales and x.scale_value is not None and (refit or x.bias_now is None):
            s_try = R.refine_scales(m, q_new, x.scale, x.zero, centred=refit).astype(np.float32)
            bs_try = (bias_scale * (s_try / x.scale)).astype(np.float32) if bias_scale is not None else None
            wq_try = R.dequant(q_new, s_try, x.zero)
            err_try, b_try = judged(wq_try, bs_try)
            if err_try < err_new:
                err_new, b_new, scale_new, bias_scale, wq = err_try, b_try, s_try, bs_try, wq_try
        after = R.sqnr_db(signal, err_new)
        if not err_new < err_now:
            entry.update(kept=keep, why="error not lowered", sqnr_db_rejected=round(after, 2))
            return entry
        self._store(undo, x.q_value, x.to_layout(q_new))
        if scale_new is not None:
            self._store(undo, x.scale_value, scale_new)
            if x.bias_scale_value is not None:
                self._store(undo, x.bias_scale_value, bias_scale)
            entry["scale_change"] = round(float(np.max(np.abs(scale_new / x.scale - 1))), 4)
        if refit:
            new_b = np.round(b_new / bias_scale) if bias_scale is not None else b_new
            self._store(undo, x.bias_value, new_b)
        if x.mode == "round":
            entry.update(kept="adaround", changed_fraction=round(float(np.mean(q_new != q_now)), 4))
        else:
            entry.update(kept="refit", sparsity=round(float(np.mean(q_new == 0)), 4))
        entry["sqnr_db"] = [round(before, 2), round(after, 2)]
        return entry

    @staticmethod
    def _store(undo: list[tuple[ir.Value, np.ndarray]], value: ir.Value, new: np.ndarray) -> None:
        old = constant_value(value)
        undo.append((value, old))
        set_constant(value, np.asarray(new).astype(old.dtype).reshape(old.shape))

    @staticmethod
    def _current_ints(x: _Layer) -> np.ndarray:
        q = constant_value(x.q_value).astype(np.float32)
        if x.node.op_type == "Conv":
            return q.reshape(x.groups, -1, x.w.shape[2])
        trans = x.node.op_type == "Gemm" and attr(x.node, "transB", 0)
        return (q if trans else q.T)[None]

    # -- the whole model -------------------------------------------------------------------------
    def _model_check(self, source_model: ir.Model, model: ir.Model, samples: int,
                     undo: list[tuple[ir.Value, np.ndarray]]) -> tuple[float, float]:
        """Output SQNR against the float model on the held-out calibration batches: round-to-nearest, then the
        reconstructed weights (the model is left reconstructed)."""
        cfg: ReconstructConfig = self.config  # type: ignore[assignment]
        every = int(round(1 / cfg.holdout)) if cfg.holdout > 0 else 1
        batches = [b for i, b in enumerate(limited_batches(self.context.calibration, cfg.batch_size, samples),
                                           start=1) if i % every == 0]  # as _collect held them out
        ref_s = make_session(source_model, what="float model")
        ref = [run_batch(ref_s, b, None) for b in batches]
        new_values = [(v, constant_value(v)) for v, _ in undo]

        def sqnr() -> float:
            s = make_session(model, what="quantized model")
            out = [run_batch(s, b, None) for b in batches]
            return output_sqnr([list(r.values()) for r in ref], [[o[k] for k in r] for r, o in zip(ref, out,
                                                                                                  strict=True)])

        after = sqnr()
        for value, old in reversed(undo):
            set_constant(value, old)
        before = sqnr()
        for value, new in new_values:
            set_constant(value, new)
        return before, after


class _Reshape:
    def __init__(self, shape):
        self.shape = tuple(shape)

    def __call__(self, a: np.ndarray) -> np.ndarray:
        return a.reshape(self.shape)


class _Matrix:
    def __init__(self, trans: bool):
        self.trans = trans

    def __call__(self, a: np.ndarray) -> np.ndarray:
        return a[0] if self.trans else a[0].T


def _matrix_rows(x: np.ndarray, y: np.ndarray, count: int, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Rows of a MatMul/Gemm's input [..., K] and output [..., O] (tokens of a sequence are rows too)."""
    xr, yr = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    if xr.shape[0] != yr.shape[0]:
        raise OnnxoptError(f"input rows {xr.shape[0]} vs output rows {yr.shape[0]}")
    if xr.shape[0] > count:
        idx = np.sort(rng.choice(xr.shape[0], count, replace=False))
        xr, yr = xr[idx], yr[idx]
    return xr, yr
