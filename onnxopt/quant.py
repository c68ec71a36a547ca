"""Numeric helpers for linear (affine) quantization, shared by the quantization passes.

Conventions (those of ONNX ``QuantizeLinear``/``DequantizeLinear``)::

    q = saturate(round_half_to_even(x / scale) + zero_point)
    x ~ (q - zero_point) * scale

Scales are float32 (what the model stores); every function here computes them in float32
so that what a pass writes into the model is exactly what it reasons about.

* ``activation_params``: per-tensor scale/zero point from a float range, asymmetric by
  default, with 0.0 always exactly representable (zero padding, ReLU, ...).
* ``weight_params``: per-tensor or per-channel scales, symmetric by default, optionally on a
  reduced (7-bit) range, optionally with each channel's range clipped to minimise its MSE.
* ``quantize``/``dequantize``: the two ONNX ops in numpy, broadcasting along ``axis``.
* ``quantize_bias``: int32 bias with scale ``input_scale * weight_scale``, after
  ``fit_weight_scale_for_bias`` has made sure it cannot overflow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir
from onnx import TensorProto

QType = Literal["uint8", "int8", "uint16", "int16", "uint4", "int4", "int32"]


@dataclass(frozen=True)
class QTypeInfo:
    name: str
    onnx_type: int
    bits: int
    signed: bool

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    @property
    def numpy_dtype(self) -> np.dtype:
        if self.bits == 4:
            import ml_dtypes  # onnx depends on it; needed only for 4-bit tensors

            return np.dtype(ml_dtypes.int4 if self.signed else ml_dtypes.uint4)
        return np.dtype(f"{'' if self.signed else 'u'}int{self.bits}")


QTYPES: dict[str, QTypeInfo] = {
    "uint8": QTypeInfo("uint8", TensorProto.UINT8, 8, False),
    "int8": QTypeInfo("int8", TensorProto.INT8, 8, True),
    "uint16": QTypeInfo("uint16", TensorProto.UINT16, 16, False),
    "int16": QTypeInfo("int16", TensorProto.INT16, 16, True),
    "uint4": QTypeInfo("uint4", TensorProto.UINT4, 4, False),
    "int4": QTypeInfo("int4", TensorProto.INT4, 4, True),
    "int32": QTypeInfo("int32", TensorProto.INT32, 32, True),
}


def qtype(name: str) -> QTypeInfo:
    try:
        return QTYPES[name]
    except KeyError:
        raise ValueError(f"unknown quantized type {name!r} (choose: {', '.join(QTYPES)})") from None


def qrange(qt: str | QTypeInfo, *, symmetric: bool = False, reduce_range: bool = False) -> tuple[int, int]:
    """The integer interval values are mapped to.

    ``symmetric``: a range symmetric about the zero point (int8: [-127, 127], uint8: [1, 255]
    around 128), so that +a and -a quantize to opposite values. ``reduce_range``: one bit
    less (int8 symmetric: [-63, 63]; uint8: [0, 127]) - for kernels whose pairwise 16-bit
    accumulation saturates with full-range operands (x86 ``vpmaddubsw`` without VNNI).
    """
    info = qt if isinstance(qt, QTypeInfo) else qtype(qt)
    bits = info.bits - 1 if reduce_range else info.bits
    if symmetric:  # same number of steps either side of the zero point
        half = (1 << (bits - 1)) - 1
        centre = symmetric_zero_point(info)
        return centre - half, centre + half
    if info.signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def symmetric_zero_point(qt: str | QTypeInfo) -> int:
    info = qt if isinstance(qt, QTypeInfo) else qtype(qt)
    return 0 if info.signed else 1 << (info.bits - 1)


def activation_params(rmin: float, rmax: float, qt: str = "uint8", *, symmetric: bool = False,
                      reduce_range: bool = False) -> tuple[np.float32, int]:
    """Per-tensor (scale, zero_point) covering [rmin, rmax] (widened to include 0).

    Asymmetric: scale = (rmax - rmin) / (qmax - qmin), zero point = round(qmin - rmin / scale),
    so 0.0 maps exactly to the (integer) zero point. Symmetric: zero point at the middle of
    the type (0 for signed, 128/32768 for unsigned), scale = max(|rmin|, |rmax|) / half-range.
    A degenerate range (all zeros) gets scale 1.0.
    """
    rmin, rmax = min(float(rmin), 0.0), max(float(rmax), 0.0)
    if not (np.isfinite(rmin) and np.isfinite(rmax)):
        raise ValueError(f"range [{rmin}, {rmax}] is not finite")
    lo, hi = qrange(qt, symmetric=symmetric, reduce_range=reduce_range)
    if symmetric:
        zp = symmetric_zero_point(qt)
        absmax = max(-rmin, rmax)
        scale = np.float32(absmax / ((hi - lo) / 2)) if absmax > 0 else np.float32(1.0)
        return scale, zp
    if rmax - rmin <= 0:
        return np.float32(1.0), lo
    scale = np.float32((rmax - rmin) / (hi - lo))
    if scale == 0 or not np.isfinite(scale):  # below float32 resolution
        return np.float32(1.0), lo
    zp = int(np.clip(np.rint(lo - rmin / float(scale)), lo, hi))
    return scale, zp


def channel_axis_shape(ndim: int, axis: int, n: int) -> tuple[int, ...]:
    shape = [1] * ndim
    shape[axis] = n
    return tuple(shape)


def _per_axis(v: np.ndarray | float, ndim: int, axis: int | None) -> np.ndarray:
    v = np.asarray(v)
    if axis is None or v.ndim == 0:
        return v
    return v.reshape(channel_axis_shape(ndim, axis % ndim, v.size))


def weight_params(w: np.ndarray, qt: str = "int8", *, axis: int | None = 0, symmetric: bool = True,
                  reduce_range: bool = False, mse_clip: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Scales (float32) and zero points for a weight tensor: per channel along ``axis``, or per
    tensor (0-d arrays) when ``axis`` is None.

    Symmetric (default): scale = max|w| / qmax_sym, e.g. max|w| / 127 for int8 (/ 63 with
    ``reduce_range``), zero point 0 (signed) or the middle of the type (unsigned). An all-zero
    channel gets scale 1.0 (its values quantize to the zero point whatever the scale).
    ``mse_clip``: each channel's range shrunk by the ratio that minimises its squared rounding +
    clipping error (``mse_clip_ratios``) - worth it at 4 bits, where max-abs wastes levels on outliers.
    """
    info = qtype(qt)
    lo, hi = qrange(info, symmetric=symmetric, reduce_range=reduce_range)
    return range_weight_params(w, lo, hi, symmetric_zero_point(info), axis=axis, symmetric=symmetric,
                               mse_clip=mse_clip)


def _channels(w: np.ndarray, axis: int | None) -> np.ndarray:
    if axis is None:
        return w.reshape(1, -1)
    return np.moveaxis(w, axis % w.ndim, 0).reshape(w.shape[axis], -1)


def _params_at(red: np.ndarray, lo: int, hi: int, zp_sym: int, symmetric: bool,
               ratio: np.ndarray | float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    ratio = np.asarray(ratio, dtype=np.float64)
    if symmetric:
        absmax = np.abs(red).max(axis=1).astype(np.float64) if red.size else np.zeros(red.shape[0])
        if ratio.ndim or ratio != 1.0:
            absmax = absmax * ratio
        scale = (absmax / ((hi - lo) / 2)).astype(np.float32)
        scale[scale == 0] = 1.0
        zp = np.full(scale.shape, zp_sym, dtype=np.int64)
        return scale, zp
    rmin = np.minimum(red.min(axis=1), 0).astype(np.float64)
    rmax = np.maximum(red.max(axis=1), 0).astype(np.float64)
    if ratio.ndim or ratio != 1.0:
        rmin, rmax = rmin * ratio, rmax * ratio
    scale = ((rmax - rmin) / (hi - lo)).astype(np.float32)
    scale[scale == 0] = 1.0
    zp = np.clip(np.rint(lo - rmin / scale.astype(np.float64)), lo, hi).astype(np.int64)
    return scale, zp


# Clipping ratios tried by the MSE search (1.0 first: ties keep the max-abs range).
MSE_CLIP_GRID = tuple(np.round(np.linspace(1.0, 0.4, 61), 4))


def mse_clip_ratios(red: np.ndarray, lo: int, hi: int, zp_sym: int = 0, *, symmetric: bool = True,
                    grid: tuple[float, ...] = MSE_CLIP_GRID) -> np.ndarray:
    """Per row of ``red`` ([channels, values]), the ratio of the max-abs range that minimises
    ``||w - dequantize(quantize(w))||^2`` (rounding plus clipping error), searched on ``grid``.

    Evaluated with the float32 scales the model would store, so the chosen error is the deployed one.
    """
    red = np.asarray(red, dtype=np.float32)
    best = np.full(red.shape[0], np.inf)
    ratio = np.ones(red.shape[0])
    q = np.empty_like(red)
    for r in grid:
        scale, zp = _params_at(red, lo, hi, zp_sym, symmetric, r)
        s, z = scale[:, None], zp[:, None].astype(np.float32)
        np.divide(red, s, out=q)
        np.rint(q, out=q)
        q += z
        np.clip(q, lo, hi, out=q)
        q -= z
        q *= s
        q -= red
        err = np.einsum("ij,ij->i", q, q, dtype=np.float64)
        better = err < best * (1 - 1e-9)  # strictly better: ties keep the wider range
        best[better], ratio[better] = err[better], r
    return ratio


def range_weight_params(w: np.ndarray, lo: int, hi: int, zp_sym: int = 0, *, axis: int | None = 0,
                        symmetric: bool = True, mse_clip: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``weight_params`` for an explicit integer range [lo, hi] (any width, e.g. ternary [-1, 1])."""
    w = np.asarray(w, dtype=np.float32)
    red = _channels(w, axis)
    ratio = mse_clip_ratios(red, lo, hi, zp_sym, symmetric=symmetric) if mse_clip and red.size else 1.0
    scale, zp = _params_at(red, lo, hi, zp_sym, symmetric, ratio)
    if axis is None:
        return scale.reshape(()), zp.reshape(())
    return scale, zp


def quantize(x: np.ndarray, scale, zero_point, qt: str = "uint8", *, axis: int | None = None,
             clip: tuple[int, int] | None = None) -> np.ndarray:
    """ONNX QuantizeLinear in numpy (round half to even, saturate to the type or ``clip``)."""
    info = qtype(qt)
    x = np.asarray(x, dtype=np.float32)
    s = _per_axis(np.asarray(scale, dtype=np.float32), x.ndim, axis)
    z = _per_axis(np.asarray(zero_point, dtype=np.int64), x.ndim, axis)
    lo, hi = clip if clip is not None else (info.qmin, info.qmax)
    q = np.clip(np.rint(x / s) + z, lo, hi)
    return q.astype(info.numpy_dtype)


def dequantize(q: np.ndarray, scale, zero_point=0, *, axis: int | None = None) -> np.ndarray:
    """ONNX DequantizeLinear in numpy (float32)."""
    q = np.asarray(q)
    s = _per_axis(np.asarray(scale, dtype=np.float32), q.ndim, axis)
    z = _per_axis(np.asarray(zero_point, dtype=np.int64), q.ndim, axis)
    return ((q.astype(np.int64) - z).astype(np.float32) * s).astype(np.float32)


INT32_LIMIT = (1 << 31) - 1


def fit_weight_scale_for_bias(bias: np.ndarray, input_scale: float, weight_scale: np.ndarray,
                              *, headroom: float = 0.5) -> np.ndarray:
    """Weight scales raised where needed so the int32 bias ``round(b / (s_in * s_w))`` fits.

    A channel with tiny weights (or a tiny input scale) and a large bias would overflow int32;
    such a channel gets the smallest weight scale for which |b| uses at most ``headroom`` of
    the int32 range. Returns float32 scales of ``weight_scale``'s shape (unchanged channels are
    bit-identical).
    """
    b = np.abs(np.asarray(bias, dtype=np.float64)).reshape(-1)
    s_w = np.asarray(weight_scale, dtype=np.float32).reshape(-1).copy()
    if s_w.size == 1 and b.size > 1:
        s_w = np.full(b.size, s_w[0], dtype=np.float32)
    bias_scale = np.float32(input_scale) * s_w
    need = b / (INT32_LIMIT * headroom)
    low = bias_scale.astype(np.float64) < need
    if np.any(low):
        s_w[low] = np.float32(need[low] / float(input_scale)) * np.float32(1.0 + 1e-6)
    return s_w.reshape(np.shape(weight_scale)) if np.size(weight_scale) == s_w.size else s_w


def quantize_bias(bias: np.ndarray, input_scale: float, weight_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int32 bias and its float32 scale (``float32(input_scale) * weight_scale``, per channel)."""
    b = np.asarray(bias, dtype=np.float32)
    scale = (np.float32(input_scale) * np.asarray(weight_scale, dtype=np.float32)).astype(np.float32)
    if scale.ndim and scale.size != b.size and scale.size == 1:
        scale = np.full(b.shape, scale.reshape(()), dtype=np.float32)
    q = np.rint(b.astype(np.float64) / scale.reshape(b.shape if scale.ndim else ()).astype(np.float64))
    if np.any(np.abs(q) > INT32_LIMIT):
        raise ValueError("bias does not fit int32 at this scale (call fit_weight_scale_for_bias first)")
    return q.astype(np.int32), scale


def shield_float_ops(model: ir.Model, names: list[str]) -> int:
    """Keep ORT from re-quantizing float Conv/ConvTranspose/Gemm that read a quantized activation.

    ORT's ``WeightBiasQuantization`` transformer (basic level) turns any of these ops whose input 0
    comes from a per-tensor DequantizeLinear and whose weight is a float initializer into a QDQ
    group, quantizing the weight per tensor on its own - on EfficientNet-Lite0's depthwise convs
    that drops the output SQNR from 25 to 9 dB. It only matches a *scalar* input scale, so such an
    op gets its own DequantizeLinear with the same scale repeated per channel (axis 1): the same
    numbers, and ORT leaves the op in float. Returns how many ops were shielded.
    """
    from onnxopt.graph import Namer, add_initializer, attr, constant_tensor, constant_value, make_node

    g = model.graph
    namer = Namer(g)
    wanted = set(names)
    count = 0
    old_dqs = []
    for node in list(g):
        if node.name not in wanted or node.op_type not in ("Conv", "ConvTranspose", "Gemm") or len(node.inputs) < 2:
            continue
        x = node.inputs[0]
        dq = x.producer() if x is not None else None
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        has_zp = len(dq.inputs) > 2 and dq.inputs[2] is not None
        scale = constant_value(dq.inputs[1])
        zp = constant_value(dq.inputs[2]) if has_zp else None
        w = constant_tensor(node.inputs[1])
        if scale is None or scale.size != 1 or w is None or (has_zp and zp is None):
            continue
        shape = list(w.shape.numpy())
        if node.op_type == "Gemm":
            channels = shape[1] if attr(node, "transB", 0) else shape[0]
        elif node.op_type == "Conv":
            channels = shape[1] * int(attr(node, "group", 1))
        else:
            channels = shape[0]
        if channels < 2:
            continue  # a [1] scale counts as scalar for ORT
        inputs = [dq.inputs[0], add_initializer(g, np.full(channels, scale.reshape(()), np.float32),
                                                f"{node.name}_input_scale", namer)]
        if zp is not None:
            inputs.append(add_initializer(g, np.full(channels, zp.reshape(()), zp.dtype),
                                          f"{node.name}_input_zero_point", namer))
        new = make_node("DequantizeLinear", inputs, {"axis": 1}, outputs=[namer.unique(f"{node.name}_input_dequantized")],
                        domain=dq.domain, name=namer.unique(f"{node.name}_input_DequantizeLinear"))
        g.insert_before(node, new)
        node.replace_input_with(0, new.outputs[0])
        old_dqs.append(dq)
        count += 1
    if count:  # DQs that only fed the shielded ops
        from onnxopt.graph import drop_unused_initializers

        dead = [d for d in dict.fromkeys(old_dqs) if not d.outputs[0].uses() and not d.outputs[0].is_graph_output()]
        if dead:
            g.remove(dead, safe=True)
        drop_unused_initializers(g)
    return count
