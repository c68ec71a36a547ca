"""Weight-only quantization: MatMul/Gemm weights (and optionally Gather embedding tables) stored in 4 or
8 bits, block-wise along the reduction axis; activations and compute stay float.

Each output column of a weight gets one scale (and, asymmetric, one zero point) per ``block_size``
consecutive input rows. The weights are written in the form ONNX Runtime's CPU EP runs directly:

* ``com.microsoft.MatMulNBits`` (2, 4 and 8 bits in onnxruntime 1.32; the kernel refuses 3/5/6/7):
  ``B`` packed ``[N, k_blocks, block_size * bits / 8]`` (low bits first), ``scales`` ``[N * k_blocks]``,
  zero points packed the same way (omitted when symmetric: the kernel's default is ``2^(bits-1)``).
  A Gemm becomes MatMulNBits with its ``beta * C`` as the bias and ``alpha`` folded into the scales.
* ``DequantizeLinear`` (opset 21, ``block_size``; int4/uint4 or int8/uint8) feeding the original node,
  for what MatMulNBits cannot express (Gemm with ``transA``, a bias that is not one row, weights of rank
  3+). The pass upgrades the opset to 21 when it needs this form.
* Embedding tables (``embeddings: true``): ``Gather(table, ids)`` on axis 0 becomes
  ``com.microsoft.GatherBlockQuantized``, which dequantizes only the gathered rows.

Methods: ``rtn`` rounds each block to nearest. ``gptq`` (Frantar et al. 2022) quantizes the input rows
one at a time and spreads each row's rounding error over the rows not yet quantized, weighted by the
inverse of the layer's input Hessian ``X^T X``; ``X^T X`` is accumulated batch by batch over the
calibration data (activations are dropped after each batch), with rows at padded positions left out
when the model has an input from ``mask_inputs`` (``attention_mask``). ``auto`` is ``gptq`` when
calibration data is given, ``rtn`` otherwise. Embedding tables are always RTN (their "input" is one-hot).

Per layer the result records the relative weight error ``||W - Q||_F / ||W||_F`` and, with data, the
relative output error ``sqrt(tr(D H D^T) / tr(W H W^T))`` on the calibration activations.
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import ml_dtypes
import numpy as np
import onnx_ir as ir
from pydantic import Field, field_validator

from onnxopt.activations import GRAM_CHUNK, stream_activations
from onnxopt.data import samples_in
from onnxopt.errors import OnnxoptError, PreconditionError
from onnxopt.graph import (
    DEFAULT_DOMAINS,
    Namer,
    add_initializer,
    attr,
    constant_tensor,
    constant_value,
    is_initializer,
    opset_version,
    release,
    replace_node,
)
from onnxopt.pass_infra import Pass, PassConfig, PassResult

MS_DOMAIN = "com.microsoft"
MARK = "/weight_only"


class QuantizeWeightOnlyConfig(PassConfig):
    type: Literal["quantize-weight-only"] = "quantize-weight-only"
    bits: Literal[4, 8] = Field(4, description="bits per weight of MatMul/Gemm")
    block_size: int = Field(32, ge=16, description="weights per scale along the reduction axis (power of 2)")
    symmetric: bool = Field(True, description="zero point fixed at the middle (no zero-point tensors)")
    method: Literal["auto", "rtn", "gptq"] = Field(
        "auto", description="rtn: round to nearest; gptq: error compensation with calibration data; auto: "
                            "gptq with --calib, rtn otherwise")
    format: Literal["auto", "matmulnbits", "dequantize-linear"] = Field(
        "auto", description="auto: MatMulNBits where it fits, DequantizeLinear (opset 21) otherwise")
    accuracy_level: int = Field(0, ge=0, le=4, description="MatMulNBits accuracy_level (0: float compute)")
    min_elements: int = Field(0, ge=0, description="leave weights with fewer elements in float")
    exclude: list[str] = Field(default_factory=list, description="node or weight names (glob) left in float")
    embeddings: bool = Field(False, description="also quantize Gather tables (axis 0) -> GatherBlockQuantized")
    embedding_bits: Literal[4, 8] = 8
    embedding_block_size: int = Field(32, ge=16, description="table values per scale along a row (power of 2)")
    clip_search: int = Field(
        10, ge=0, le=100, description="shrink steps tried per block for the least-error range (0: min/max)")
    damping: float = Field(0.01, gt=0, le=1, description="gptq: diagonal damping, fraction of mean(diag(H))")
    mask_inputs: list[str] = Field(
        default_factory=lambda: ["attention_mask"],
        description="gptq: a model input [B, L] among these masks out padded rows of the Hessian")
    batch_size: int = Field(8, gt=0, description="gptq: samples per ONNX Runtime run")
    max_samples: int | None = Field(128, gt=0, description="gptq: calibration samples used")

    @field_validator("block_size", "embedding_block_size")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError(f"must be a power of 2 (got {v})")
        return v


@dataclass
class LayerQuant:
    node: str
    op_type: str
    weight: str
    shape: list[int]
    bits: int
    block_size: int
    method: str
    format: str
    weight_error: float
    output_error: float | None
    bytes_before: int
    bytes_after: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class WeightOnlyResult(PassResult):
    layers: dict[str, LayerQuant] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    calibration_samples: int = 0


# --------------------------------------------------------------------------------------------
# Block quantization (numpy); weights as [N, K]: one row per output, blocks along K
# --------------------------------------------------------------------------------------------
def qlimits(bits: int, symmetric: bool) -> tuple[int, int, int]:
    """(qmin, qmax, zero point) of the stored unsigned codes; symmetric keeps +-(2^(b-1) - 1)."""
    mid = 1 << (bits - 1)
    if symmetric:
        return 1, (1 << bits) - 1, mid
    return 0, (1 << bits) - 1, 0


def _extremes(w: np.ndarray, symmetric: bool) -> tuple[np.ndarray, ...]:
    """Per block (last axis): (absmax,) when symmetric, else (min(w, 0), max(w, 0)), in float64."""
    if symmetric:
        return (np.abs(w).max(axis=-1).astype(np.float64),)
    return np.minimum(w.min(axis=-1), 0).astype(np.float64), np.maximum(w.max(axis=-1), 0).astype(np.float64)


def _params_from(extremes: tuple[np.ndarray, ...], bits: int, symmetric: bool,
                 shrink: float) -> tuple[np.ndarray, np.ndarray]:
    lo, hi, mid = qlimits(bits, symmetric)
    if symmetric:
        scale = (extremes[0] * shrink / (mid - 1)).astype(np.float32)
        scale[scale == 0] = 1.0
        return scale, np.full(scale.shape, mid, dtype=np.int64)
    rmin, rmax = extremes[0] * shrink, extremes[1] * shrink
    scale = ((rmax - rmin) / (hi - lo)).astype(np.float32)
    scale[scale == 0] = 1.0
    zp = np.clip(np.rint(lo - rmin / scale.astype(np.float64)), lo, hi).astype(np.int64)
    return scale, zp


def _range_params(w: np.ndarray, bits: int, symmetric: bool, shrink: float) -> tuple[np.ndarray, np.ndarray]:
    return _params_from(_extremes(w, symmetric), bits, symmetric, shrink)


def block_params(w: np.ndarray, bits: int, symmetric: bool, search: int = 0,
                 importance: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """float32 scales and integer zero points of the rows of ``w`` (one block per row, any shape [..., bs]).

    The range is the block's (absolute) min/max; with ``search`` > 0 it is also shrunk by up to 25 % in
    ``search`` steps and each block keeps the range with the least squared error (weighted by
    ``importance`` over the last axis, e.g. the input's second moments): clipping a few outliers buys
    finer steps for the rest, which matters at 4 bits.
    """
    extremes = _extremes(w, symmetric)
    scale, zp = _params_from(extremes, bits, symmetric, 1.0)
    if not search:
        return scale, zp
    wf = np.asarray(w, dtype=np.float32)
    imp = None if importance is None else importance.astype(np.float32)
    lo, hi, _ = qlimits(bits, symmetric)
    best = _block_error(wf, scale, zp, lo, hi, imp)
    for shrink in np.linspace(1.0, 0.75, search + 1)[1:]:
        s, z = _params_from(extremes, bits, symmetric, float(shrink))
        e = _block_error(wf, s, z, lo, hi, imp)
        better = e < best
        scale, zp, best = np.where(better, s, scale), np.where(better, z, zp), np.where(better, e, best)
    return scale.astype(np.float32), zp


def _block_error(wf: np.ndarray, scale: np.ndarray, zp: np.ndarray, lo: int, hi: int,
                 imp: np.ndarray | None) -> np.ndarray:
    """Squared rounding error per block, in float32 and in place: the same numbers as quantizing to integer
    codes and back (the codes are small integers, exact in float32), at a fraction of the memory traffic."""
    s = scale[..., None]
    z = zp.astype(np.float32)[..., None]
    q = wf / s
    np.rint(q, out=q)
    q += z
    np.clip(q, lo, hi, out=q)
    q -= z
    q *= s
    np.subtract(wf, q, out=q)
    np.square(q, out=q)
    if imp is not None:
        q *= imp
    return q.sum(-1)


def quantize_codes(w: np.ndarray, scale: np.ndarray, zp: np.ndarray, bits: int, symmetric: bool) -> np.ndarray:
    lo, hi, _ = qlimits(bits, symmetric)
    q = np.asarray(w, dtype=np.float32) / scale[..., None]
    np.rint(q, out=q)
    q += zp.astype(np.float32)[..., None]
    np.clip(q, lo, hi, out=q)
    return q.astype(np.int64)


def dequantize_codes(q: np.ndarray, scale: np.ndarray, zp: np.ndarray) -> np.ndarray:
    return ((q - zp[..., None]).astype(np.float32) * scale[..., None]).astype(np.float32)


def _blocked(wt: np.ndarray, block: int) -> np.ndarray:
    """[N, K] -> [N, k_blocks, block], K zero-padded (zeros quantize exactly to the zero point)."""
    n, k = wt.shape
    nb = -(-k // block)
    out = np.zeros((n, nb * block), dtype=wt.dtype)
    out[:, :k] = wt
    return out.reshape(n, nb, block)


@dataclass
class Quantized:
    codes: np.ndarray  # [N, k_blocks, block] unsigned codes
    scales: np.ndarray  # [N, k_blocks] float32
    zero_points: np.ndarray  # [N, k_blocks] int
    k: int

    def dequantized(self) -> np.ndarray:
        """[N, K] float32, exactly what the kernels compute from the stored codes."""
        return dequantize_codes(self.codes, self.scales, self.zero_points).reshape(self.codes.shape[0], -1)[:, :self.k]


def rtn(wt: np.ndarray, bits: int, block: int, symmetric: bool, search: int = 0,
        hessian: np.ndarray | None = None) -> Quantized:
    return rtn_rows(wt, bits, block, symmetric, search, hessian)[0]


# Rows quantized per piece: a piece's temporaries stay in cache, and pieces run on all cores (numpy releases the
# GIL in its loops). Results are identical to one piece: every row's arithmetic is the same.
RTN_ROWS = 64


def rtn_rows(wt: np.ndarray, bits: int, block: int, symmetric: bool, search: int = 0,
             hessian: np.ndarray | None = None, workers: int | None = None) -> tuple[Quantized, float]:
    """``rtn`` piece by piece over the rows of ``wt`` ([N, K], any strides: a transposed memory map is read a
    piece at a time), and the relative weight error ``||W - Q||_F / ||W||_F``."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    n, k = wt.shape
    nb = -(-k // block)
    imp = None if hessian is None else _blocked(np.diag(hessian)[None, :], block)[0]
    codes = np.empty((n, nb, block), dtype=np.int16)
    scales = np.empty((n, nb), dtype=np.float32)
    zps = np.empty((n, nb), dtype=np.int64)

    def piece(r0: int) -> tuple[float, float]:
        r1 = min(r0 + RTN_ROWS, n)
        b = _blocked(np.asarray(wt[r0:r1], dtype=np.float32), block)
        s, z = block_params(b, bits, symmetric, search, imp)
        q = quantize_codes(b, s, z, bits, symmetric)
        codes[r0:r1], scales[r0:r1], zps[r0:r1] = q, s, z
        d = b.astype(np.float64) - dequantize_codes(q, s, z)
        return float(np.sum(d * d)), float(np.sum(np.square(b, dtype=np.float64)))

    workers = workers or min(os.cpu_count() or 1, 8)
    with ThreadPoolExecutor(workers) as pool:
        sums = list(pool.map(piece, range(0, n, RTN_ROWS)))
    num, den = sum(x for x, _ in sums), sum(y for _, y in sums)
    return Quantized(codes, scales, zps, k), float(np.sqrt(num / den)) if den > 0 else 0.0


def gptq(wt: np.ndarray, hessian: np.ndarray, bits: int, block: int, symmetric: bool, damping: float,
         search: int = 0) -> Quantized:
    """GPTQ with the block's scales chosen when the block is reached (on the error-updated weights)."""
    w = wt.astype(np.float64).copy()
    n, k = w.shape
    h = hessian.astype(np.float64).copy()
    importance = np.diag(h).copy()
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h[np.diag_indices(k)] += damping * float(np.mean(np.diag(h)))
    try:
        u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: H^-1 = U^T U
    except np.linalg.LinAlgError:
        h[np.diag_indices(k)] += float(np.mean(np.diag(h)))
        u = np.linalg.cholesky(np.linalg.inv(h)).T
    nb = -(-k // block)
    codes = np.zeros((n, nb, block), dtype=np.int64)
    scales = np.ones((n, nb), dtype=np.float32)
    zps = np.zeros((n, nb), dtype=np.int64)
    lo, hi, _ = qlimits(bits, symmetric)
    for b in range(nb):
        g0, g1 = b * block, min((b + 1) * block, k)
        part = np.zeros((n, block), dtype=np.float32)
        part[:, :g1 - g0] = w[:, g0:g1]
        imp = np.zeros(block)
        imp[:g1 - g0] = importance[g0:g1]
        s, z = block_params(part, bits, symmetric, search, imp)
        scales[:, b], zps[:, b] = s, z
        err = np.zeros((n, g1 - g0))
        for j in range(g0, g1):
            col = w[:, j].astype(np.float32)
            q = np.clip(np.rint(col / s) + z, lo, hi).astype(np.int64)
            codes[:, b, j - g0] = q
            deq = ((q - z).astype(np.float32) * s).astype(np.float64)
            e = (w[:, j] - deq) / u[j, j]
            w[:, j + 1:g1] -= np.outer(e, u[j, j + 1:g1])
            err[:, j - g0] = e
        w[:, g1:] -= err @ u[g0:g1, g1:]
    if k % block:  # the zero padding of the last block keeps the zero point
        codes[:, -1, k - g0:] = zps[:, -1:]
    return Quantized(codes, scales, zps, k)


def rel_error(w: np.ndarray, deq: np.ndarray, h: np.ndarray | None = None) -> float:
    d = w.astype(np.float64) - deq
    if h is None:
        den = float(np.sum(w.astype(np.float64) ** 2))
        return float(np.sqrt(np.sum(d * d) / den)) if den > 0 else 0.0
    den = float(np.sum((w @ h) * w))
    return float(np.sqrt(max(float(np.sum((d @ h) * d)), 0.0) / den)) if den > 0 else 0.0


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes [..., m] -> uint8 [..., m * bits / 8], the first value in the low bits."""
    codes = codes.astype(np.uint8)
    if bits == 8:
        return codes
    per = 8 // bits
    m = codes.shape[-1]
    pad = (-m) % per
    if pad:
        codes = np.concatenate([codes, np.zeros(codes.shape[:-1] + (pad,), np.uint8)], axis=-1)
    codes = codes.reshape(codes.shape[:-1] + (-1, per))
    out = np.zeros(codes.shape[:-1], np.uint8)
    for i in range(per):
        out |= (codes[..., i] << (bits * i)).astype(np.uint8)
    return out


# --------------------------------------------------------------------------------------------
# Hessians from calibration data
# --------------------------------------------------------------------------------------------
def collect_hessians(model: ir.Model, source, tensors: dict[str, int], cfg: QuantizeWeightOnlyConfig,
                     progress) -> tuple[dict[str, np.ndarray], int]:
    """{activation: E[x^T x]} over the rows of each activation (masked rows left out), and the samples used."""
    feed_names = {i.name for i in model.graph.inputs if not i.is_initializer()}
    mask_name = next((m for m in cfg.mask_inputs if m in feed_names), None)
    grams = {t: np.zeros((k, k)) for t, k in tensors.items()}
    rows_seen = dict.fromkeys(tensors, 0)
    done = 0
    total = len(source) if cfg.max_samples is None else min(len(source), cfg.max_samples)
    with progress.task("quantize-weight-only: input Hessians", total) as bar:
        for batch, values in stream_activations(model, source, list(tensors), batch_size=cfg.batch_size,
                                                max_samples=cfg.max_samples, what="model (gptq calibration)"):
            mask = np.asarray(batch[mask_name]) != 0 if mask_name else None
            for t, k in tensors.items():
                x = values[t]
                if x.shape[-1] != k:
                    raise OnnxoptError(f"quantize-weight-only: activation {t!r} has {x.shape[-1]} features, "
                                       f"expected {k}")
                rows = x.reshape(-1, k)
                if mask is not None and x.shape[:-1] == mask.shape:
                    rows = rows[mask.reshape(-1)]
                rows = np.ascontiguousarray(rows, dtype=np.float32)
                for start in range(0, rows.shape[0], GRAM_CHUNK):
                    part = rows[start:start + GRAM_CHUNK]
                    grams[t] += (part.T @ part).astype(np.float64)
                rows_seen[t] += rows.shape[0]
            n = samples_in(batch)
            done += n
            bar.update(n)
    if done == 0:
        raise OnnxoptError(f"quantize-weight-only: no calibration samples in {source.description}")
    return {t: g / max(rows_seen[t], 1) for t, g in grams.items()}, done


# --------------------------------------------------------------------------------------------
# The pass
# --------------------------------------------------------------------------------------------
@dataclass
class _Target:
    """A weight to quantize, described without reading it (``matrix`` reads it when its turn comes)."""

    node: ir.Node
    label: str
    weight: ir.Value  # the initializer
    shape: tuple[int, ...]  # as stored
    act: ir.Value  # the activation (GPTQ Hessian) or the Gather ids
    form: str  # "matmulnbits" | "dequantize-linear" | "gather"
    k_axis: int  # reduction axis of the stored weight (dequantize-linear)
    layout: str  # how the stored weight becomes [N, K]: "same" | "T" | "batched"

    @property
    def k(self) -> int:
        if self.layout == "same":
            return self.shape[1]
        return self.shape[-2] if self.layout == "batched" else self.shape[0]

    def matrix(self, w: np.ndarray) -> np.ndarray:
        """The stored weight as a contiguous [N, K] float32 (transB undone; alpha not applied)."""
        return np.ascontiguousarray(self.matrix_view(w))

    def matrix_view(self, w: np.ndarray) -> np.ndarray:
        """The same [N, K] without copying where the layout allows (a transposed view)."""
        if self.layout == "same":
            return w
        if self.layout == "T":
            return w.T
        return np.moveaxis(w, -2, -1).reshape(-1, w.shape[-2])


class QuantizeWeightOnly(Pass):
    name = "quantize-weight-only"
    summary = ("Weight-only int4/int8 block quantization of MatMul/Gemm weights (MatMulNBits or opset-21 "
               "DequantizeLinear) and optionally embedding tables; RTN or GPTQ with --calib.")
    Config = QuantizeWeightOnlyConfig

    def requires(self, model: ir.Model) -> None:
        super().requires(model)
        if self.config.method == "gptq" and self.context.calibration is None:
            raise PreconditionError("method 'gptq' needs calibration data (pass it with --calib)")

    def call(self, model: ir.Model) -> WeightOnlyResult:
        cfg: QuantizeWeightOnlyConfig = self.config  # type: ignore[assignment]
        method = cfg.method if cfg.method != "auto" else ("gptq" if self.context.calibration is not None else "rtn")
        result = WeightOnlyResult(model, False)
        targets = self._targets(model.graph, result.skipped)
        if any(t.form == "dequantize-linear" for t in targets) and opset_version(model) < 21:
            model = self._upgrade(model)
            result.skipped.clear()
            targets = self._targets(model.graph, result.skipped)
        g = model.graph
        self.namer = Namer(g)
        hessians: dict[str, np.ndarray] = {}
        linear = [t for t in targets if t.form != "gather"]
        if method == "gptq" and linear:
            acts = {t.act.name: t.k for t in linear}
            hessians, result.calibration_samples = collect_hessians(
                model, self.context.calibration, acts, cfg, self.context.progress)
        with self.context.progress.task("quantize-weight-only", len(targets)) as bar:
            for t in targets:
                result.layers[t.label] = self._quantize(g, t, hessians.get(t.act.name), method)
                bar.update(1)
        if any(t.form != "dequantize-linear" for t in targets) and MS_DOMAIN not in model.opset_imports:
            model.opset_imports[MS_DOMAIN] = 1
        result.model = model
        result.modified = bool(result.layers)
        layers = result.layers.values()
        result.details = {
            "method": method,
            "bits": cfg.bits,
            "block_size": cfg.block_size,
            "quantized": len(result.layers),
            "skipped": len(result.skipped),
            "calibration_samples": result.calibration_samples,
            "bytes_before": sum(v.bytes_before for v in layers),
            "bytes_after": sum(v.bytes_after for v in layers),
            "layers": {k: v.to_dict() for k, v in result.layers.items()},
            "skipped_layers": dict(result.skipped),
        }
        return result

    def _quantize(self, g: ir.Graph, t: _Target, h: np.ndarray | None, method: str) -> LayerQuant:
        """Read one weight, quantize it, rewrite its node; nothing of the float weight is kept."""
        cfg: QuantizeWeightOnlyConfig = self.config  # type: ignore[assignment]
        bits = cfg.embedding_bits if t.form == "gather" else cfg.bits
        block = cfg.embedding_block_size if t.form == "gather" else cfg.block_size
        h = h if t.form != "gather" else None
        how = "gptq" if h is not None else "rtn"
        w = constant_value(t.weight)
        if how == "gptq":
            wt = t.matrix(w)
            q = gptq(wt, h, bits, block, cfg.symmetric, cfg.damping, cfg.clip_search)
            deq = q.dequantized()
            weight_error, output_error = rel_error(wt, deq), rel_error(wt, deq, h)
            del wt, deq
        else:  # read piece by piece from the (memory-mapped) weight, no float copy of the whole matrix
            q, weight_error = rtn_rows(t.matrix_view(w), bits, block, cfg.symmetric, cfg.clip_search)
            output_error = None
        layer = LayerQuant(
            node=t.label, op_type=t.node.op_type, weight=t.weight.name, shape=list(t.shape), bits=bits,
            block_size=block, method=how, format=t.form, weight_error=weight_error, output_error=output_error,
            bytes_before=int(w.nbytes), bytes_after=0)
        del w
        layer.bytes_after = self._rewrite(g, t, q, bits, block)
        return layer

    # --- which weights --------------------------------------------------------------------------
    def _excluded(self, *names: str) -> bool:
        return any(fnmatch.fnmatchcase(n, pat) for n in names if n for pat in self.config.exclude)

    def _targets(self, graph: ir.Graph, skipped: dict[str, str]) -> list[_Target]:
        cfg: QuantizeWeightOnlyConfig = self.config  # type: ignore[assignment]
        out: list[_Target] = []
        for node in graph:
            if node.domain not in DEFAULT_DOMAINS or len(node.inputs) < 2:
                continue
            kind = node.op_type
            if kind == "Gather" and not cfg.embeddings or kind not in ("MatMul", "Gemm", "Gather"):
                continue
            wv, act = (node.inputs[0], node.inputs[1]) if kind == "Gather" else (node.inputs[1], node.inputs[0])
            tensor = constant_tensor(wv)
            label = node.name or f"{kind}({node.outputs[0].name})"
            if tensor is None or tensor.dtype != ir.DataType.FLOAT or act is None or \
                    constant_tensor(act) is not None:
                continue
            wname = wv.name
            if not is_initializer(wv):
                skipped[label] = f"weight {wname!r} is not an initializer"
                continue
            if self._excluded(node.name or "", wname):
                skipped[label] = "excluded"
                continue
            shape = tuple(tensor.shape.numpy())
            size = int(np.prod(shape, dtype=np.int64))
            if size < cfg.min_elements:
                skipped[label] = f"{size} elements < min_elements {cfg.min_elements}"
                continue
            others = [u for u in wv.consumers() if u is not node]
            if others or wv.is_graph_output() or len(wv.uses()) > 1:
                skipped[label] = f"weight {wname!r} is shared with {len(others)} other node(s)"
                continue
            if kind == "Gather":
                why = self._gather_problem(node, shape)
                if why:
                    skipped[label] = why
                    continue
                out.append(_Target(node, label, wv, shape, act, "gather", 1, "same"))
                continue
            t = self._linear_target(node, label, wv, shape, act, skipped)
            if t is not None:
                out.append(t)
        return out

    def _gather_problem(self, node: ir.Node, shape: tuple[int, ...]) -> str | None:
        if len(shape) != 2:
            return f"table of rank {len(shape)} (GatherBlockQuantized: 2-D tables)"
        if attr(node, "axis", 0) not in (0, -2):
            return "gathers on axis 1"
        if shape[1] % self.config.embedding_block_size:
            return f"row length {shape[1]} is not a multiple of embedding_block_size"
        return None

    def _linear_target(self, node, label, wv, shape, act, skipped) -> _Target | None:
        cfg: QuantizeWeightOnlyConfig = self.config  # type: ignore[assignment]
        ndim = len(shape)
        if node.op_type == "MatMul":
            if ndim < 2:
                skipped[label] = "1-D weight"
                return None
            fits = ndim == 2
            form = "matmulnbits" if fits and cfg.format != "dequantize-linear" else "dequantize-linear"
            if cfg.format == "matmulnbits" and not fits:
                skipped[label] = f"weight of rank {ndim}: MatMulNBits takes 2-D weights"
                return None
            if ndim != 2:  # rank 3+: DequantizeLinear blocked along K, no Hessian
                return _Target(node, label, wv, shape, act, form, ndim - 2, "batched")
            return _Target(node, label, wv, shape, act, form, 0, "T")
        # Gemm
        if ndim != 2:
            return None
        trans_b = bool(attr(node, "transB", 0))
        n = shape[0] if trans_b else shape[1]
        fits = not attr(node, "transA", 0) and self._gemm_bias(node, n) is not False
        form = "matmulnbits" if fits and cfg.format != "dequantize-linear" else "dequantize-linear"
        if cfg.format == "matmulnbits" and not fits:
            skipped[label] = "Gemm with transA or a bias that is not one row: MatMulNBits cannot express it"
            return None
        return _Target(node, label, wv, shape, act, form, 1 if trans_b else 0, "same" if trans_b else "T")

    @staticmethod
    def _gemm_bias(node: ir.Node, n: int):
        """The [N] float32 bias ``beta * C`` of a Gemm (None without C); False if it is not one constant row."""
        if len(node.inputs) < 3 or node.inputs[2] is None:
            return None
        c = constant_value(node.inputs[2])
        if c is None or c.size not in (1, n) or (c.ndim == 2 and c.shape[0] != 1) or c.ndim > 2:
            return False
        return (np.broadcast_to(c.reshape(-1), (n,)) * float(attr(node, "beta", 1.0))).astype(np.float32)

    # --- rewriting ----------------------------------------------------------------------------
    def _const(self, g: ir.Graph, array: np.ndarray, base: str) -> ir.Value:
        return add_initializer(g, np.asarray(array), base, self.namer)

    def _drop(self, g: ir.Graph, value: ir.Value | None) -> None:
        """Remove an initializer the rewrite left unread (the float weight, a Gemm's C now in the kernel)."""
        if value is not None and is_initializer(value) and not value.uses() and not value.is_graph_output():
            release(value)
            del g.initializers[value.name]

    def _rewrite(self, g: ir.Graph, t: _Target, q: Quantized, bits: int, block: int) -> int:
        """Replace ``t.node`` by its quantized form; returns the bytes of the new constants."""
        cfg: QuantizeWeightOnlyConfig = self.config  # type: ignore[assignment]
        node = t.node
        base = node.name or node.outputs[0].name
        sym = cfg.symmetric
        wname = t.weight.name
        if t.form == "gather":
            size = self._gather(g, t, q, bits, block)
            self._drop(g, t.weight)
            return size
        if t.form == "matmulnbits":
            n, k = q.codes.shape[0], q.k
            packed = pack_bits(q.codes, bits)  # [N, k_blocks, blob]
            scales = q.scales
            if node.op_type == "Gemm":
                scales = (scales * np.float32(attr(node, "alpha", 1.0))).astype(np.float32)
            inputs = [node.inputs[0], self._const(g, packed, f"{wname}_q{bits}"),
                      self._const(g, scales.reshape(-1), f"{wname}_scales")]
            size = packed.nbytes + scales.nbytes
            if not sym:
                zp = pack_bits(q.zero_points, bits).reshape(-1)
                inputs.append(self._const(g, zp, f"{wname}_zero_points"))
                size += zp.nbytes
            bias = self._gemm_bias(node, n) if node.op_type == "Gemm" else None
            c_input = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
            if bias is not None:
                if sym:
                    inputs.append(None)
                inputs += [None, self._const(g, bias, f"{wname}_bias")]
                size += bias.nbytes
            new = ir.node("MatMulNBits", inputs, {"K": k, "N": n, "bits": bits, "block_size": block,
                                                  "accuracy_level": cfg.accuracy_level},
                          domain=MS_DOMAIN, name=self.namer.unique(base + MARK))
            replace_node(node, [new], list(new.outputs))
            self._drop(g, t.weight)
            self._drop(g, c_input)
            return size
        # DequantizeLinear (opset 21) in the stored layout, blocked along t.k_axis
        k = t.shape[t.k_axis]
        codes = q.codes.reshape(q.codes.shape[0], -1)[:, :k]  # [rows of wt, K]
        scales, zps = q.scales, q.zero_points
        if len(t.shape) == 2:
            if t.k_axis == 0:  # stored [K, N]; wt [N, K]
                codes, scales, zps = codes.T, scales.T, zps.T
        else:  # stored [..., K, N]; wt [(...) * N, K]
            lead = t.shape[:-2]
            n = t.shape[-1]
            codes = np.moveaxis(codes.reshape(*lead, n, k), -1, -2)
            scales = np.moveaxis(scales.reshape(*lead, n, -1), -1, -2)
            zps = np.moveaxis(zps.reshape(*lead, n, -1), -1, -2)
        mid = 1 << (bits - 1)
        if sym:  # signed codes, zero point 0 (omitted)
            dtype = ml_dtypes.int4 if bits == 4 else np.int8
            data = (codes - mid).astype(dtype)
        else:
            dtype = ml_dtypes.uint4 if bits == 4 else np.uint8
            data = codes.astype(dtype)
        inputs = [self._const(g, data, f"{wname}_q{bits}"), self._const(g, scales, f"{wname}_scales")]
        size = (data.size * bits + 7) // 8 + scales.nbytes
        if not sym:
            z = np.ascontiguousarray(zps.astype(dtype))
            inputs.append(self._const(g, z, f"{wname}_zero_points"))
            size += (z.size * bits + 7) // 8
        dq = ir.node("DequantizeLinear", inputs, {"axis": t.k_axis, "block_size": block},
                     name=self.namer.unique(base + MARK + "/dq"))
        dq.outputs[0].name = self.namer.unique(f"{wname}_dequantized")
        g.insert_before(node, dq)
        node.replace_input_with(1, dq.outputs[0])
        self._drop(g, t.weight)
        return size

    def _gather(self, g: ir.Graph, t: _Target, q: Quantized, bits: int, block: int) -> int:
        node = t.node
        base = node.name or node.outputs[0].name
        sym = self.config.symmetric
        codes = q.codes.reshape(q.codes.shape[0], -1)  # [V, D] (D a multiple of block: no padding)
        mid = 1 << (bits - 1)
        if bits == 4:
            data = (codes - mid).astype(ml_dtypes.int4) if sym else codes.astype(ml_dtypes.uint4)
            zdtype = ml_dtypes.uint4
        else:  # uint8 codes; the kernel's default zero point for uint8 is 128 = the symmetric middle
            data = codes.astype(np.uint8)
            zdtype = np.uint8
        inputs = [self._const(g, data, f"{t.weight.name}_q{bits}"), node.inputs[1],
                  self._const(g, q.scales, f"{t.weight.name}_scales")]
        size = (data.size * bits + 7) // 8 + q.scales.nbytes
        if not sym:
            z = q.zero_points.astype(zdtype)
            inputs.append(self._const(g, z, f"{t.weight.name}_zero_points"))
            size += (z.size * bits + 7) // 8
        new = ir.node("GatherBlockQuantized", inputs, {"gather_axis": 0, "quantize_axis": 1, "block_size": block,
                                                       "bits": bits},
                      domain=MS_DOMAIN, name=self.namer.unique(base + MARK))
        replace_node(node, [new], list(new.outputs))
        return size

    def _upgrade(self, model: ir.Model) -> ir.Model:
        """The model at opset 21 (block-wise DequantizeLinear). onnx's version converter works on a whole
        ``ModelProto``, so this rare path (rank-3 weights, Gemm with transA) holds the weights in memory."""
        from onnx import version_converter

        from onnxopt.graph import clone_model
        from onnxopt.model_io import from_proto, to_proto

        proto = to_proto(ir.external_data.load_to_model(clone_model(model)))
        try:
            converted = version_converter.convert_version(proto, 21)
        except Exception as exc:  # noqa: BLE001 - name what failed in one line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PreconditionError("block-wise DequantizeLinear needs opset 21; onnx.version_converter failed "
                                    f"to upgrade from {opset_version(model)}: {first}") from None
        del proto
        return from_proto(converted)
