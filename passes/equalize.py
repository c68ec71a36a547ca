"""Cross-layer equalization (data-free quantization, Nagel et al. 2019) before calibration.

Two layers joined through a positively homogeneous function f (f(t x) = t f(x) for t > 0: identity, Relu,
LeakyRelu) compute the same thing when output channel i of the first is divided by s_i and input channel i of
the second multiplied by s_i. With s_i = sqrt(r1_i / r2_i) (r1_i, r2_i: the largest |weight| of channel i in
each layer) both channels end with range sqrt(r1_i r2_i): one channel no longer sets the quantization grid
of a whole tensor while its neighbours are near zero. A depthwise conv between two convs (MobileNet's
expand -> depthwise -> project) is the second layer of one pair and the first of the next; the sweeps over
all pairs are repeated until the scales settle.

Relu6 (Clip(0, 6)) is homogeneous only with a per-channel bound: ``clip: per-channel`` rewrites it as
Relu + Min(bound_i) (exact; but the quantizer then rounds the unbounded Relu output, which costs Lite0 7 dB),
``clip: calibrated`` (with calibration data) scales the channels that reach the bound on the calibration data
to one common bound B and the others to at most B / clip_headroom, so that Clip(0, B) is exact on that data
and stays one op the quantizer fuses into the layer - but not beyond it: on EfficientNet-Lite0 the float
model equalized so from 32 images keeps 13.8 dB on 68 others), ``clip: relu`` replaces it by Relu (what AIMET does; exact only while no value
reaches the bound, so the check below measures it against the original float model), ``clip: skip`` leaves
such pairs alone. Hard-swish, SiLU, Sigmoid and the like are not homogeneous: their pairs are skipped (counted).

High-bias absorption (Relu only, into a consumer without padding): channel i's pre-activation never going
below c_i > 0 on the calibration data means Relu(x - c_i) = Relu(x) - c_i there, so c_i moves from the
first layer's bias into the second's (through its weights), shrinking the activation range. It needs the
calibration data (the paper's BatchNorm-derived bound is gone once BN is folded); without it, it is skipped
with a note.

``only_if_better`` (default): the pass quantizes both the original and the equalized model as the int8
preset would (calibrate on the first ``samples`` calibration samples, quantize-qdq defaults) and keeps the
equalized one only when its output SQNR against the original float model, on the next ``samples`` samples
(held out: the statistics came from the first ones), is higher; per-layer SQNR of both goes into the result.
Measured: the PP-OCR direction classifier (6 Relu pairs) is kept; EfficientNet-Lite0 (34 pairs, all through
Relu6) is not - with per-channel weights and Relu6 bounds it loses (per-channel: 25.4 -> 16.4 dB; calibrated:
24.7 -> 1.5 dB), so the model is left as it was. Without calibration data the criterion is the weights' own: the mean ratio of the largest to the
median channel range of the layers it touches (what per-tensor weight grids suffer from) must go down.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx_ir as ir
from pydantic import Field

from onnxopt.activations import output_sqnr, sample_batches
from onnxopt.data import Feed, samples_in
from onnxopt.graph import (
    Namer,
    add_initializer,
    attr,
    clone_model,
    constant_tensor,
    constant_value,
    drop_unused_initializers,
    is_op,
    make_node,
    only_use,
    own_initializer,
    replace_node,
    set_attr,
)
from onnxopt.pass_infra import Pass, PassConfig, PassContext, PassManager, PassResult
from onnxopt.runtime import make_session, run_batch

HOMOGENEOUS = ("Relu", "LeakyRelu")
NOT_HOMOGENEOUS = ("HardSwish", "Sigmoid", "HardSigmoid", "Tanh", "Gelu", "Elu", "Selu", "Softplus", "Mul",
                   "Swish", "Mish")
LAYERS = ("Conv", "Gemm", "MatMul")
FLOATS = (np.float32, np.float64)


class EqualizeConfig(PassConfig):
    type: Literal["equalize"] = "equalize"
    iterations: int = Field(8, ge=1, le=100, description="sweeps over all pairs (stops earlier when settled)")
    clip: Literal["per-channel", "calibrated", "relu", "skip"] = Field(
        "per-channel", description="Clip(0, M) between a pair: per-channel bound as Relu + Min (exact); "
        "calibrated (needs calibration data): one bound again, the channels that reach M on the calibration "
        "data scaled to the same bound and the others to at most 1/clip_headroom of it - exact on that data "
        "only, and the quantizer fuses it; Relu (drops the bound); or no equalization through it")
    clip_headroom: float = Field(
        2.0, ge=1.0, description="clip: calibrated - a channel that stays below the bound on the calibration data "
        "is scaled to at most 1/headroom of the common bound (values the data did not show are clipped only "
        "beyond headroom x its observed maximum)")
    balance: Literal["auto", "weights", "activations"] = Field(
        "auto", description="what channel i is balanced on: the first layer's weight range (DFQ), or the "
        "activation's range on the calibration data against the second layer's weights (per-channel weight "
        "grids do not see the first layer's scaling); auto: activations when calibration data is given")
    max_scale: float = Field(100.0, gt=1, description="channel scales limited to [1/max_scale, max_scale]")
    absorb_bias: bool = Field(True, description="high-bias absorption through Relu (needs calibration data)")
    only_if_better: bool = Field(True, description="keep the result only when the measured error goes down")
    samples: int = Field(32, gt=0, description="calibration samples for the statistics and the trial "
                         "calibration; the check runs on the next as many (held out) when there are")
    observer: Literal["minmax", "percentile", "entropy", "mse"] = Field(
        "mse", description="the int8 trial's calibration observer (set it to what the recipe's calibrate uses)")
    min_gain_db: float = Field(0.0, ge=0, description="output SQNR gain needed to keep the equalized model")


@dataclass
class _Layer:
    node: ir.Node
    weight: ir.Value
    bias: ir.Value | None  # Conv/Gemm bias input, or the constant of the Add after a MatMul
    bias_node: ir.Node  # the node reading ``bias`` (the layer itself, or that Add)
    bias_slot: int
    out: ir.Value  # pre-activation output (after the bias)


@dataclass
class _Pair:
    first: _Layer
    second: _Layer
    act: ir.Node | None
    scale: np.ndarray = field(default_factory=lambda: np.ones(0))  # t_i: what channel i's activation became
    absorbed: np.ndarray | None = None


@dataclass
class EqualizeResult(PassResult):
    pairs: int = 0


# --------------------------------------------------------------------------------------------
# Weight views (float64 copies; channel axis first)
# --------------------------------------------------------------------------------------------
def _groups(node: ir.Node) -> int:
    return int(attr(node, "group", 1)) if node.op_type == "Conv" else 1


def _out_channels(layer: _Layer, w: np.ndarray) -> np.ndarray:
    """[O, ...]: one row per output channel of the layer."""
    n = layer.node
    if n.op_type == "Conv":
        return w.reshape(w.shape[0], -1)
    if n.op_type == "Gemm" and attr(n, "transB", 0):
        return w
    return w.T  # Gemm [K, N], MatMul [K, N]


def _scale_out(layer: _Layer, w: np.ndarray, s: np.ndarray) -> np.ndarray:
    n = layer.node
    if n.op_type == "Conv":
        return w * s.reshape((-1,) + (1,) * (w.ndim - 1))
    if n.op_type == "Gemm" and attr(n, "transB", 0):
        return w * s[:, None]
    return w * s[None, :]


def _in_ranges(layer: _Layer, w: np.ndarray) -> np.ndarray:
    """Largest |weight| reading each input channel."""
    n = layer.node
    if n.op_type == "Conv":
        g = _groups(n)
        o, cg = w.shape[0], w.shape[1]
        return np.abs(w.reshape(g, o // g, cg, -1)).max(axis=(1, 3)).reshape(g * cg)
    if n.op_type == "Gemm" and attr(n, "transB", 0):
        return np.abs(w).max(axis=0)
    return np.abs(w).max(axis=1)


def _scale_in(layer: _Layer, w: np.ndarray, s: np.ndarray) -> np.ndarray:
    n = layer.node
    if n.op_type == "Conv":
        g = _groups(n)
        o, cg = w.shape[0], w.shape[1]
        return (w.reshape(g, o // g, cg, -1) * s.reshape(g, 1, cg, 1)).reshape(w.shape)
    if n.op_type == "Gemm" and attr(n, "transB", 0):
        return w * s[None, :]
    return w * s[:, None]


def _in_count(layer: _Layer, w: np.ndarray) -> int:
    n = layer.node
    if n.op_type == "Conv":
        return w.shape[1] * _groups(n)
    return w.shape[1] if n.op_type == "Gemm" and attr(n, "transB", 0) else w.shape[0]


def _input_response(layer: _Layer, w: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Output change per output channel when input channel i carries the constant c_i (no padding)."""
    n = layer.node
    if n.op_type == "Conv":
        g = _groups(n)
        o, cg = w.shape[0], w.shape[1]
        per = w.reshape(g, o // g, cg, -1).sum(axis=3)  # [g, O/g, Cg]
        return np.einsum("gok,gk->go", per, c.reshape(g, cg)).reshape(o)
    if n.op_type == "Gemm" and attr(n, "transB", 0):
        return w @ c
    return c @ w


# --------------------------------------------------------------------------------------------
# Finding pairs
# --------------------------------------------------------------------------------------------
def _float_const(v: ir.Value | None) -> bool:
    t = constant_tensor(v)
    return t is not None and t.dtype in (ir.DataType.FLOAT, ir.DataType.DOUBLE)


def _single_reader(v: ir.Value | None, node: ir.Node) -> bool:
    return v is not None and not v.is_graph_output() and not v.is_graph_input() and all(
        u.node is node for u in v.uses())


def _layer(node: ir.Node | None) -> _Layer | None:
    """``node`` as an equalizable layer: float constant weight only it reads, per-output-channel bias."""
    if not is_op(node, LAYERS) or len(node.inputs) < 2 or not _float_const(node.inputs[1]):
        return None
    w = node.inputs[1]
    if not _single_reader(w, node):
        return None
    shape = constant_tensor(w).shape
    if node.op_type == "Conv":
        if len(shape) < 3 or attr(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID", "SAME_UPPER",
                                                                       "SAME_LOWER"):
            return None
        if shape[0] % _groups(node):
            return None
    elif node.op_type == "Gemm":
        if len(shape) != 2 or attr(node, "transA", 0):
            return None
    elif len(shape) != 2:  # MatMul: x[..., K] @ W[K, N]
        return None
    n_out = shape[0] if node.op_type == "Conv" or (node.op_type == "Gemm" and attr(node, "transB", 0)) \
        else shape[1]
    out = node.outputs[0]
    if node.op_type in ("Conv", "Gemm"):
        b = node.inputs[2] if len(node.inputs) > 2 else None
        if b is not None:
            bshape = tuple(constant_tensor(b).shape) if _float_const(b) else None
            if bshape is None or not _single_reader(b, node) or math.prod(bshape) not in (1, n_out) or (
                    len(bshape) > 1 and any(d != 1 for d in bshape[:-1])):
                return None
        return _Layer(node, w, b, node, 2, out)
    add = only_use(out)  # MatMul + Add(bias), the exporters' Gemm
    if is_op(add, "Add") and len(add.inputs) == 2:
        b = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
        bshape = tuple(constant_tensor(b).shape) if _float_const(b) else None
        if (bshape is not None and _single_reader(b, add) and bshape and bshape[-1] == n_out
                and math.prod(bshape) == n_out):
            return _Layer(node, w, b, add, list(add.inputs).index(b), add.outputs[0])
    return _Layer(node, w, None, node, -1, out)


def _clip_bounds(node: ir.Node) -> tuple[float, float] | None:
    if len(node.inputs) > 1:  # opset >= 11: min/max inputs
        lo = constant_value(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
        hi = constant_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        if (len(node.inputs) > 1 and node.inputs[1] is not None and lo is None) or (
                len(node.inputs) > 2 and node.inputs[2] is not None and hi is None):
            return None
        return (float(lo) if lo is not None else -math.inf, float(hi) if hi is not None else math.inf)
    return float(attr(node, "min", -3.4e38)), float(attr(node, "max", 3.4e38))


def _find_pairs(graph: ir.Graph, clip_mode: str) -> tuple[list[_Pair], dict[str, int]]:
    pairs: list[_Pair] = []
    skipped: dict[str, int] = {}
    for node in graph:
        second = _layer(node)
        if second is None or node.op_type == "MatMul" and node.inputs[0] is node.inputs[1]:
            continue
        v = node.inputs[0]
        if v is None or not _single_reader(v, node):
            continue
        act = v.producer()
        if act is not None and (is_op(act, HOMOGENEOUS) or is_op(act, "Clip")):
            if is_op(act, "Clip"):
                bounds = _clip_bounds(act)
                if bounds is None or bounds[0] != 0.0 or (math.isfinite(bounds[1]) and clip_mode == "skip"):
                    skipped["Clip"] = skipped.get("Clip", 0) + 1
                    continue
            v = act.inputs[0]
            if v is None or not _single_reader(v, act):
                continue
        elif act is not None and act.op_type in NOT_HOMOGENEOUS and _layer_behind(act):
            skipped[act.op_type] = skipped.get(act.op_type, 0) + 1
            continue
        else:
            act = None
        producer = v.producer()
        if is_op(producer, "Add") and producer.outputs[0] is v:  # MatMul + Add bias
            producer = next((x.producer() for x in producer.inputs
                             if x is not None and is_op(x.producer(), "MatMul")), None)
        first = _layer(producer)
        if first is None or first.out is not v:
            continue
        if _single_use_chain(first) and _channels_match(first, second):
            pairs.append(_Pair(first, second, act))
    return pairs, skipped


def _layer_behind(act: ir.Node) -> bool:
    x = act.inputs[0] if act.inputs else None
    return x is not None and is_op(x.producer(), LAYERS)


def _single_use_chain(layer: _Layer) -> bool:
    """The layer's raw output goes only to its bias Add (MatMul), nothing else reads the intermediate."""
    if layer.bias_node is layer.node:
        return True
    return _single_reader(layer.node.outputs[0], layer.bias_node)


def _channels_match(first: _Layer, second: _Layer) -> bool:
    w1, w2 = constant_tensor(first.weight).shape, constant_tensor(second.weight).shape
    n = first.node
    o = w1[0] if n.op_type == "Conv" or (n.op_type == "Gemm" and attr(n, "transB", 0)) else w1[1]
    m = second.node
    if m.op_type == "Conv":
        c = w2[1] * _groups(m)
    else:
        c = w2[1] if m.op_type == "Gemm" and attr(m, "transB", 0) else w2[0]
    if first.node.op_type == "Conv" and second.node.op_type != "Conv":
        return False  # a Conv's channels are axis 1; a Gemm/MatMul reads the last axis
    if first.node.op_type != "Conv" and second.node.op_type == "Conv":
        return False
    return o == c


def _one_input_per_output(layer: _Layer, w: np.ndarray) -> bool:
    """Every output channel reads one input channel (depthwise): its weight grid is per input channel too."""
    return layer.node.op_type == "Conv" and w.shape[1] == 1


def _act_range(p: _Pair, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Largest |f(x)| per channel for x in [lo, hi], f the pair's (monotonic) activation."""
    if p.act is None:
        return np.maximum(np.abs(lo), np.abs(hi))
    if is_op(p.act, "LeakyRelu"):
        return np.maximum(np.abs(lo) * abs(float(attr(p.act, "alpha", 0.01))), np.maximum(hi, 0))
    top = _clip_bounds(p.act)[1] if is_op(p.act, "Clip") else math.inf
    return np.minimum(np.maximum(hi, 0), top)


def _bounded(p: _Pair) -> bool:
    return is_op(p.act, "Clip") and math.isfinite(_clip_bounds(p.act)[1])


def _saturated(p: _Pair, top: np.ndarray) -> np.ndarray:
    """Channels whose (original) pre-activation reaches the Clip's bound on the calibration data."""
    return top >= _clip_bounds(p.act)[1]


def _common_bound(p: _Pair, s: np.ndarray, top: np.ndarray, headroom: float, limit: float) -> np.ndarray:
    """``s`` changed so that every saturated channel ends at the same bound B (= the largest post-activation
    range) and every other channel's observed range at or below B / headroom: Clip(0, B) is then exact on the
    calibration data. ``top``: each channel's observed maximum before any scaling."""
    m = _clip_bounds(p.act)[1]
    t = p.scale / s  # each channel's total scale after this step
    sat = _saturated(p, top)
    if not sat.any():
        return s
    seen = np.maximum(top, 0)
    bound = float(max((m * t[sat]).max(), headroom * (seen[~sat] * t[~sat]).max(initial=0.0)))
    t = np.where(sat, bound / m, t)
    t = np.where(~sat & (seen * t * headroom > bound), bound / (headroom * np.maximum(seen, 1e-30)), t)
    return p.scale / (t / max(1.0, float(t.max()) / limit))  # all alike: the common bound survives


def _unpadded(node: ir.Node) -> bool:
    if node.op_type != "Conv":
        return True
    return attr(node, "auto_pad", "NOTSET") in ("NOTSET", "VALID") and not any(attr(node, "pads", []) or [])


# --------------------------------------------------------------------------------------------
# The pass
# --------------------------------------------------------------------------------------------
class Equalize(Pass):
    name = "equalize"
    summary = ("Cross-layer equalization: rescale Conv/Gemm/MatMul pairs through Relu/Relu6/identity "
               "(depthwise included) so per-channel weight ranges are balanced; high-bias absorption; kept only "
               "when the quantized model's measured error goes down.")
    Config = EqualizeConfig

    def call(self, model: ir.Model) -> EqualizeResult:
        cfg: EqualizeConfig = self.config  # type: ignore[assignment]
        start = time.perf_counter()
        notes: list[str] = []
        if any(is_op(n, ("QuantizeLinear", "DequantizeLinear")) for n in model.graph):
            return self._unchanged(model, start, ["the model is already quantized: equalization goes before "
                                                  "calibration and quantization"], 0)
        original = clone_model(model) if cfg.only_if_better else None
        clip_mode = cfg.clip
        if clip_mode == "calibrated" and self.context.calibration is None:
            notes.append("clip: calibrated needs calibration data; per-channel bounds used")
            clip_mode = "per-channel"
        self._clip_mode = clip_mode
        pairs, skipped = _find_pairs(model.graph, clip_mode)
        for op, k in sorted(skipped.items()):
            why = ("Clip that is not Clip(0, M)" if op == "Clip" and cfg.clip != "skip"
                   else "Clip(0, M) (clip: skip)" if op == "Clip" else f"{op} (not positively homogeneous)")
            notes.append(f"{k} pair(s) through {why} skipped")
        if not pairs:
            notes.insert(0, "no foldable layer pairs (Conv/Gemm/MatMul -> Relu/Relu6/identity -> "
                            "Conv/Gemm/MatMul): model unchanged")
            return self._unchanged(model, start, notes, 0)

        arrays: dict[int, np.ndarray] = {}
        values: dict[int, ir.Value] = {}
        for p in pairs:
            for lay in (p.first, p.second):
                for v in (lay.weight, lay.bias):
                    if v is not None and id(v) not in arrays:
                        arrays[id(v)] = np.asarray(constant_value(v), dtype=np.float64)
                        values[id(v)] = v
        self._pairs, self._values = pairs, values
        have_data = self.context.calibration is not None
        balance = cfg.balance if cfg.balance != "auto" else ("activations" if have_data else "weights")
        if balance == "activations" and not have_data:
            notes.append("balance: activations needs calibration data; balanced on weights")
            balance = "weights"
        stats = self._stats(model, pairs) if have_data else {}
        self._stats_seen = stats
        ratio_before = self._range_ratio(pairs, arrays)
        sweeps = self._equalize(pairs, arrays, cfg, stats if balance == "activations" else None,
                                stats if clip_mode == "calibrated" else None)
        ratio_after = self._range_ratio(pairs, arrays)

        absorbed = 0
        if cfg.absorb_bias:
            relu_pairs = [p for p in pairs if is_op(p.act, "Relu") and _unpadded(p.second.node)]
            if not relu_pairs:
                notes.append("high-bias absorption: no Relu pair into an unpadded layer")
            elif self.context.calibration is None:
                notes.append("high-bias absorption skipped: it needs calibration data (--calib) for the "
                             "pre-activation minima")
            else:
                absorbed = self._absorb(model, relu_pairs, arrays, stats)
        self._write(model, pairs, arrays, values, cfg)
        details: dict[str, Any] = {
            "pairs": len(pairs), "balance": balance, "sweeps": sweeps, "absorbed_channels": absorbed,
            "range_ratio_before": round(ratio_before, 3), "range_ratio_after": round(ratio_after, 3)}
        if clip_mode == "relu" and any(is_op(p.act, "Clip") for p in pairs):
            notes.append("Relu6 replaced by Relu between equalized layers (clip: relu)")
        if cfg.only_if_better:
            keep, check = self._check(original, model, ratio_before, ratio_after)
            details.update(check)
            if not keep:
                notes.append(f"equalization did not lower the measured error ({check['criterion']}): "
                             "model unchanged")
                details["notes"] = notes
                details["kept"] = False
                details["seconds"] = round(time.perf_counter() - start, 2)
                return EqualizeResult(original, False, details, pairs=0)
        details["kept"] = True
        details["notes"] = notes
        details["seconds"] = round(time.perf_counter() - start, 2)
        return EqualizeResult(model, True, details, pairs=len(pairs))

    @staticmethod
    def _unchanged(model: ir.Model, start: float, notes: list[str], pairs: int) -> EqualizeResult:
        return EqualizeResult(model, False, {"pairs": pairs, "notes": notes,
                                             "seconds": round(time.perf_counter() - start, 2)}, pairs=pairs)

    # -- scales ----------------------------------------------------------------------------------
    @staticmethod
    def _equalize(pairs: list[_Pair], arrays: dict[int, np.ndarray], cfg: EqualizeConfig,
                  stats: dict[str, tuple[np.ndarray, np.ndarray]] | None,
                  clip_stats: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> int:
        """Sweeps over the pairs until the scales settle; ``stats``: balance activation ranges (per-channel
        [min, max] of each first layer's output) instead of the first layer's weights."""
        for p in pairs:
            p.scale = np.ones(_in_count(p.second, arrays[id(p.second.weight)]))
        lo, hi = 1.0 / cfg.max_scale, cfg.max_scale
        for sweep in range(1, cfg.iterations + 1):
            moved = 0.0
            for p in pairs:
                w1, w2 = arrays[id(p.first.weight)], arrays[id(p.second.weight)]
                r2 = _in_ranges(p.second, w2)
                if stats is None:
                    r1 = np.abs(_out_channels(p.first, w1)).max(axis=1)
                    ok = (r1 > 0) & (r2 > 0)
                    s = np.ones_like(r1)
                    s[ok] = np.sqrt(r1[ok] / r2[ok])  # both ranges become sqrt(r1 r2)
                else:
                    a = _act_range(p, *stats[p.first.out.name]) * p.scale
                    ok = (a > 0) & (r2 > 0)
                    u = np.ones_like(a)  # what channel i's activation is multiplied by
                    if not ok.any():
                        continue
                    if _one_input_per_output(p.second, w2):
                        # a depthwise reader's per-channel weight grid does not care: every channel gets the
                        # activation tensor's full range
                        u[ok] = a[ok].max() / a[ok]
                    else:
                        u[ok] = np.sqrt(r2[ok] / a[ok])  # activation and weight column ranges balanced
                        u[ok] *= a[ok].max() / (a[ok] * u[ok]).max()  # the tensor's range stays put
                    s = 1.0 / u
                s = p.scale / np.clip(p.scale / s, lo, hi)  # the channel's total scale t stays in [lo, hi]
                if clip_stats is not None and _bounded(p):
                    s = _common_bound(p, s, clip_stats[p.first.out.name][1], cfg.clip_headroom, hi)
                arrays[id(p.first.weight)] = _scale_out(p.first, w1, 1.0 / s)
                if p.first.bias is not None:
                    b = arrays[id(p.first.bias)]
                    arrays[id(p.first.bias)] = (np.broadcast_to(b.reshape(-1), s.shape) / s).reshape(
                        b.shape if b.size == s.size else s.shape)
                arrays[id(p.second.weight)] = _scale_in(p.second, w2, s)
                p.scale = p.scale / s
                moved = max(moved, float(np.max(np.abs(np.log(s)))))
            if moved < 1e-4:
                return sweep
        return cfg.iterations

    def _stats(self, model: ir.Model, pairs: list[_Pair]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per-channel minimum and maximum of every first layer's output on ``samples`` calibration samples."""
        from onnxopt.activations import stream_activations

        cfg: EqualizeConfig = self.config  # type: ignore[assignment]
        conv = {p.first.out.name: p.first.node.op_type == "Conv" for p in pairs}
        out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for _, vals in stream_activations(model, self.context.calibration, list(conv), batch_size=8,
                                          max_samples=cfg.samples, what="model (equalize statistics)"):
            for name, is_conv in conv.items():
                x = np.asarray(vals[name])
                axis = 1 if is_conv else x.ndim - 1
                x = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)
                lo, hi = x.min(axis=1).astype(np.float64), x.max(axis=1).astype(np.float64)
                if name in out:
                    lo, hi = np.minimum(out[name][0], lo), np.maximum(out[name][1], hi)
                out[name] = (lo, hi)
        return out

    @staticmethod
    def _range_ratio(pairs: list[_Pair], arrays: dict[int, np.ndarray]) -> float:
        """Mean over the layers touched of (largest / median) per-output-channel |weight| range."""
        ratios = []
        seen: set[int] = set()
        for p in pairs:
            for lay in (p.first, p.second):
                if id(lay.weight) in seen:
                    continue
                seen.add(id(lay.weight))
                r = np.abs(_out_channels(lay, arrays[id(lay.weight)])).max(axis=1)
                med = float(np.median(r))
                if med > 0:
                    ratios.append(float(r.max()) / med)
        return float(np.mean(ratios)) if ratios else 1.0

    # -- high-bias absorption --------------------------------------------------------------------
    def _absorb(self, model: ir.Model, pairs: list[_Pair], arrays: dict[int, np.ndarray],
                stats: dict[str, tuple[np.ndarray, np.ndarray]]) -> int:
        usable = [p for p in pairs if p.first.node.op_type != "MatMul" or p.first.bias is not None]
        usable = [p for p in usable if p.second.node.op_type != "MatMul" or p.second.bias is not None]
        lows = {p.first.out.name: stats[p.first.out.name][0] for p in usable}
        total = 0
        for p in usable:
            c = np.maximum(lows[p.first.out.name] * p.scale, 0.0)  # the equalized channel's minimum
            if not np.any(c > 0):
                continue
            for lay in (p.first, p.second):
                self._ensure_bias(model, lay, arrays)
            if p.first.bias is None or p.second.bias is None:
                continue
            beta1 = float(attr(p.first.node, "beta", 1.0)) if p.first.node.op_type == "Gemm" else 1.0
            beta2 = float(attr(p.second.node, "beta", 1.0)) if p.second.node.op_type == "Gemm" else 1.0
            alpha2 = float(attr(p.second.node, "alpha", 1.0)) if p.second.node.op_type == "Gemm" else 1.0
            b1 = arrays[id(p.first.bias)]
            arrays[id(p.first.bias)] = (b1.reshape(-1) - c / beta1).reshape(b1.shape)
            delta = alpha2 * _input_response(p.second, arrays[id(p.second.weight)], c) / beta2
            b2 = arrays[id(p.second.bias)]
            arrays[id(p.second.bias)] = (np.broadcast_to(b2.reshape(-1), delta.shape) + delta).reshape(
                b2.shape if b2.size == delta.size else delta.shape)
            p.absorbed = c
            total += int(np.count_nonzero(c))
        return total

    def _ensure_bias(self, model: ir.Model, lay: _Layer, arrays: dict[int, np.ndarray]) -> None:
        """A Conv/Gemm without a bias gets a zero one (the absorbed constant needs a place)."""
        if lay.bias is not None or lay.node.op_type == "MatMul":
            return
        if lay.node.op_type == "Gemm" and float(attr(lay.node, "beta", 1.0)) == 0.0:
            return
        w = arrays[id(lay.weight)]
        n = _out_channels(lay, w).shape[0]
        dtype = constant_tensor(lay.weight).dtype.numpy()
        v = add_initializer(model.graph, np.zeros(n, dtype), f"{lay.node.name or lay.node.op_type}_bias")
        if len(lay.node.inputs) < 3:
            lay.node.resize_inputs(3)
        lay.node.replace_input_with(2, v)
        lay.bias, lay.bias_node, lay.bias_slot = v, lay.node, 2
        arrays[id(v)] = np.zeros(n)
        self._values[id(v)] = v
        for p in self._pairs:  # the same node as the other member of another pair
            for other in (p.first, p.second):
                if other.node is lay.node:
                    other.bias, other.bias_node, other.bias_slot = v, lay.node, 2

    # -- writing back ----------------------------------------------------------------------------
    def _write(self, model: ir.Model, pairs: list[_Pair], arrays: dict[int, np.ndarray],
               values: dict[int, ir.Value], cfg: EqualizeConfig) -> None:
        g = model.graph
        namer = Namer(g)
        dead_consts: list[ir.Node] = []
        for key, v in values.items():
            use = next(iter(v.uses()))
            node, slot = use.node, use.idx
            dtype = constant_tensor(v).dtype.numpy()
            producer = v.producer()
            own_initializer(g, node, slot, np.ascontiguousarray(arrays[key]).astype(dtype), namer)
            if producer is not None and not producer.outputs[0].uses():
                dead_consts.append(producer)
        for n in dead_consts:
            g.remove(n, safe=True)
        dead_consts = []
        clip_inputs: set[str] = set()
        for p in pairs:
            if not is_op(p.act, "Clip"):
                continue
            hi = _clip_bounds(p.act)[1]
            if not math.isfinite(hi):
                continue
            clip_inputs |= {x.name for x in p.act.inputs[1:] if x is not None and x.name}
            old_inputs = [x for x in p.act.inputs[1:] if x is not None]
            name = p.act.name or "clip"
            relu = make_node("Relu", [p.act.inputs[0]], outputs=[namer.unique(f"{p.act.outputs[0].name}_relu")],
                             name=namer.unique(f"{name}_relu"))
            if self._clip_mode == "relu":
                replace_node(p.act, [relu], [relu.outputs[0]])
                continue
            bound = self._one_bound(p)
            if bound is not None:  # Clip(0, B), exact on the calibration data
                b = add_initializer(g, np.array(bound, constant_tensor(p.first.weight).dtype.numpy()),
                                    f"{name}_max", namer)
                if len(p.act.inputs) > 1:
                    if len(p.act.inputs) < 3:
                        p.act.resize_inputs(3)
                    p.act.replace_input_with(2, b)
                else:  # opset < 11: attributes
                    set_attr(p.act, "max", float(bound))
                dead_consts += [x.producer() for x in old_inputs if x.producer() is not None and not x.uses()]
                continue
            if np.allclose(p.scale, 1.0, rtol=0, atol=0):
                continue
            rank = len(constant_tensor(p.first.weight).shape) if p.first.node.op_type == "Conv" else 1
            bound = (hi * p.scale).astype(constant_tensor(p.first.weight).dtype.numpy())
            bound = bound.reshape((-1,) + (1,) * (rank - 2)) if rank > 1 else bound
            c = add_initializer(g, bound, f"{name}_bound", namer)
            mn = make_node("Min", [relu.outputs[0], c], outputs=[namer.unique(f"{p.act.outputs[0].name}_min")],
                           name=namer.unique(f"{name}_min"))
            replace_node(p.act, [relu, mn], [mn.outputs[0]])
        for n in dict.fromkeys(dead_consts):
            if n.graph is g and not any(o.uses() or o.is_graph_output() for o in n.outputs):
                g.remove(n, safe=True)
        drop_unused_initializers(g, clip_inputs)

    def _one_bound(self, p: _Pair) -> float | None:
        """The common bound B of a calibrated Clip, when every saturated channel ended exactly at it."""
        if self._clip_mode != "calibrated" or p.first.out.name not in self._stats_seen:
            return None
        m = _clip_bounds(p.act)[1]
        top = self._stats_seen[p.first.out.name][1]
        sat = _saturated(p, top)
        bounds = m * p.scale
        post = np.minimum(np.maximum(top, 0), m) * p.scale
        b = float(bounds[sat].max()) if sat.any() else float(post.max()) if post.size else m
        if sat.any() and not np.allclose(bounds[sat], b, rtol=1e-5, atol=0):
            return None  # a scale limit broke the common bound: per-channel bounds instead
        if np.any(post > b * (1 + 1e-6)):
            return None
        # nothing reached the bound: any B between the largest observed value and the smallest scaled bound
        # is exact on the data; the larger clips less of what the data did not show
        return b if sat.any() else max(b, float((bounds).min()))

    # -- the check -------------------------------------------------------------------------------
    def _check(self, original: ir.Model, model: ir.Model, ratio_before: float, ratio_after: float
               ) -> tuple[bool, dict[str, Any]]:
        cfg: EqualizeConfig = self.config  # type: ignore[assignment]
        if self.context.calibration is None:
            return ratio_after < ratio_before, {
                "criterion": f"weight range ratio {ratio_before:.2f} → {ratio_after:.2f} (no calibration data: "
                             "activation ranges not measured)"}
        from onnxopt.localize import localize

        data = self.context.calibration
        batches, held_out = held_out_batches(original, data, cfg.samples)
        ref = make_session(original, threads=None, what="float model")
        names = [o.name for o in ref.get_outputs()]
        reference = [list(run_batch(ref, b, names).values()) for b in batches]

        class Fixed:  # the sampled batches as a data source
            def batches(self, _size):
                yield from batches

        out: dict[str, Any] = {}
        layer_sqnr: dict[str, list[float]] = {}
        for label, float_model in (("before", original), ("after", model)):
            q = quick_int8(float_model, data, cfg.samples, self.context, cfg.observer)
            s = make_session(q, threads=None, what=f"int8 trial ({label})")
            out[f"sqnr_db_{label}"] = round(output_sqnr(
                reference, [list(run_batch(s, b, names).values()) for b in batches]), 2)
            loc = localize(float_model, q, Fixed(), max_samples=sum(samples_in(b) for b in batches))
            for x in loc.layers:
                if x.op_type in LAYERS:
                    layer_sqnr.setdefault(x.tensor, [math.nan, math.nan])[0 if label == "before" else 1] = round(
                        x.sqnr_db, 2)
        out["layer_sqnr_db"] = layer_sqnr
        gain = out["sqnr_db_after"] - out["sqnr_db_before"]
        n = sum(samples_in(b) for b in batches)
        out["criterion"] = (f"int8 trial output SQNR {out['sqnr_db_before']} → {out['sqnr_db_after']} dB on "
                            + (f"{n} held-out calibration samples" if held_out else
                               f"the {n} calibration samples it was derived from (too few to hold some out)"))
        return gain > cfg.min_gain_db, out


def tail(batch: dict, k: int) -> dict:
    """The last ``k`` samples of a batch (a feed is one sample: whole)."""
    if isinstance(batch, Feed):
        return batch
    return {name: v[-k:] for name, v in batch.items()}


def held_out_batches(model: ir.Model, data, n: int) -> tuple[list[dict], bool]:
    """About ``n`` calibration samples after the first ``n`` (which the statistics and the trial calibration
    use), so the check sees data the equalization was not fitted to; the first ``n`` when there are no more."""
    batches = sample_batches(model, data, 2 * n)
    out, got = [], 0
    for b in batches:
        k = samples_in(b)
        if got >= n:
            out.append(b)
        elif got + k > n:  # a batch across the boundary: its later rows
            out.append(tail(b, got + k - n))
        got += k
    if out:
        return out, True
    return sample_batches(model, data, n), False


def quick_int8(model: ir.Model, data, samples: int, context: PassContext, observer: str = "mse") -> ir.Model:
    """``model`` calibrated on ``samples`` samples and quantized as the int8 preset's quantize-qdq would."""
    from onnxopt.registry import get_pass_class

    ctx = PassContext(calibration=data, cache_dir=context.cache_dir, seed=context.seed)
    calib = get_pass_class("calibrate")
    qdq = get_pass_class("quantize-qdq")
    passes = [calib(calib.Config(max_samples=samples, cache=False, observer=observer), ctx),
              qdq(qdq.Config(check_kernels=False), ctx)]
    return PassManager(passes, check=False).run(model).model
