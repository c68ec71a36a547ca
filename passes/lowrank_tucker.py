"""Tucker-2 decomposition of Conv layers (groups=1) with constant weights.

A k x k conv with weight ``W`` [C_out, C_in, k...] becomes three convs::

    1x1 (C_in -> r_in)  ->  k x k core (r_in -> r_out)  ->  1x1 (r_out -> C_out, carries the bias)

with ``W ~= G x_0 U_out x_1 A^T``: ``A`` [r_in, C_in] the first conv, ``G`` [r_out, r_in, k...] the core,
``U_out`` [C_out, r_out] the last. The core keeps the original strides, pads, dilations and auto_pad (zero
padding commutes with the linear, bias-free first conv). A 1x1 conv is a matrix: it gets two 1x1 convs
(the truncated SVD of ``lowrank-svd``), the first carrying the stride/pads, the second the bias.

Factors (sequentially truncated HOSVD, input mode first):

* input mode: SVD of the mode-1 unfolding ``W_(1)`` [C_in, C_out*k*k]; ``method: data-aware`` whitens it
  with the input-*channel* covariance ``C_x = S_x S_x^T`` (SVD of ``S_x^T W_(1)``), so the input factor
  keeps the channel directions the real activations use. With ``Q`` the top right singular vectors, the
  truncation is ``W_(1) Q Q^T``: first conv ``A = Q^T W_(1)^T``, core input side ``Q^T`` (no inverse of
  ``S_x``, exact for a singular covariance).
* output mode: left singular vectors of the input-truncated weights' mode-0 unfolding [C_out, C_in*k*k];
  data-aware: of that matrix times ``S_p``, the square root of the exact im2col *patch* Gram matrix (the
  conv's own strides/pads/dilations), which is the optimal output factor for the data given the input one.

Data-aware extras as in ``lowrank-svd``: the mean output change goes into the last conv's bias and the
covariances are centred (``bias_correction``), and they are shrunk towards the identity (``damping``).

Errors per layer: ``weight_error = ||W - W_hat||_F / ||W||_F`` (weight-only: exactly
``sqrt(sum of discarded s_in^2 + sum of discarded s_out^2) / ||W||``) and, with calibration data, the exact
``output_error = ||(W - W_hat) * x||_F / ||W * x||_F`` on the calibration activations from the patch Gram.

Ranks: ``rank`` (both modes, capped at each), ``energy`` (per mode, from that mode's -- whitened when
data-aware -- spectrum), ``param_ratio`` (r_in = a*C_in, r_out = a*C_out with ``a`` solving the
parameter budget) or ``ranks`` (node/weight name -> r or [r_in, r_out]; 1x1 convs take one r). A layer is
left alone when the factors save neither parameters nor multiply-adds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
import onnx_ir as ir
from pydantic import AfterValidator, Field

from onnxopt.activations import GramRequest, InputStats, single_threaded_blas
from onnxopt.errors import OnnxoptError
from onnxopt.graph import Namer, add_initializer, attr, constant_value, make_node, release
from onnxopt.layers import Geometry, node_label
from onnxopt.lowrank import (
    LayerChoice,
    LowRankConfigBase,
    LowRankPassBase,
    LowRankResult,
    balance,
    energy_kept,
    energy_rank,
    float_weight,
    layer_gram,
    matrix_choice,
    output_error,
    rel_error,
    spectrum_of,
)

TUCKER_MARK = "/lowrank_tucker/"
CONV_GEOMETRY = ("kernel_shape", "strides", "pads", "dilations", "auto_pad")


def _positive_ranks(value):
    if any(r < 1 for r in ([value] if isinstance(value, int) else value)):
        raise ValueError(f"ranks must be at least 1 (got {list(value) if isinstance(value, tuple) else value})")
    return value


TuckerRank = Annotated[int | tuple[int, int], AfterValidator(_positive_ranks)]


class LowRankTuckerConfig(LowRankConfigBase):
    type: Literal["lowrank-tucker"] = "lowrank-tucker"
    ranks: dict[str, TuckerRank] = Field(
        default_factory=dict,
        description="per layer (node or weight name): r for both modes, or [r_in, r_out]; wins over the rule")


@dataclass
class LowRankTuckerResult(LowRankResult):
    pass


# --------------------------------------------------------------------------------------------
# Conv geometry and im2col rows
# --------------------------------------------------------------------------------------------
def channel_stats(patch: InputStats, c_in: int, p: int) -> InputStats:
    """Input-channel moments from the im2col patch moments (averaged over the kernel offsets)."""
    g = patch.gram.reshape(c_in, p, c_in, p)
    # the P diagonal blocks are nearly the same matrix: their average is about as noisy as one of them
    # (the P*P blocks share the patch Gram's estimation noise)
    return InputStats(np.einsum("apbp->ab", g) / p, patch.mean.reshape(c_in, p).mean(axis=1), patch.rows * p,
                      patch.noise / (p * p))


# --------------------------------------------------------------------------------------------
# Factorization
# --------------------------------------------------------------------------------------------
@dataclass
class TuckerFactors:
    a: np.ndarray  # [r_in, C_in]  first 1x1 conv
    g: np.ndarray  # [r_out, r_in, k...]  core
    u: np.ndarray  # [C_out, r_out]  last 1x1 conv
    s_in: np.ndarray  # input-mode spectrum
    s_out: np.ndarray  # output-mode spectrum (after the input truncation)

    def weight(self) -> np.ndarray:
        gw = np.tensordot(self.g, self.a, axes=([1], [0]))  # [r_out, k..., C_in]
        gw = np.moveaxis(gw, -1, 1)  # [r_out, C_in, k...]
        return np.tensordot(self.u, gw, axes=([1], [0]))


def tucker2(w: np.ndarray, c_in: np.ndarray | None, c_patch: np.ndarray | None, choose_in,
            choose_out) -> TuckerFactors:
    """Sequentially truncated HOSVD of ``w`` in modes 1 then 0; ``choose_*(spectrum) -> rank``.

    ``c_in`` (channel Gram) whitens the input mode, ``c_patch`` (patch Gram) the output mode; None: weight-only.
    """
    c_out, n_in = w.shape[:2]
    kernel = w.shape[2:]
    w1 = np.moveaxis(w, 1, 0).reshape(n_in, -1)  # mode-1 unfolding [C_in, C_out * P], columns (o, k...)
    f_in = spectrum_of(w1, c_in)  # right singular vectors of S_x^T W_(1)
    r_in = choose_in(f_in.s)
    q = f_in.qt[:r_in]  # [r_in, C_out * P]
    a = q @ w1.T  # [r_in, C_in]: the first conv
    h = np.moveaxis(q.reshape(r_in, c_out, *kernel), 0, 1)  # [C_out, r_in, k...]
    w_hat0 = np.moveaxis((w1 @ q.T @ q).reshape(n_in, c_out, *kernel), 0, 1).reshape(c_out, -1)
    f_out = spectrum_of(w_hat0.T, c_patch)  # right singular vectors of (W_hat_(0) S_p)^T: output directions
    r_out = choose_out(f_out.s)
    u = f_out.qt[:r_out].T  # [C_out, r_out]: the last conv
    g = np.tensordot(u.T, h, axes=([1], [0]))  # [r_out, r_in, k...]
    # balance (exact in float): z channels (rows of a vs g[:, j]), then outputs (columns of u vs rows of g)
    a_t, gm = balance(a.T, np.moveaxis(g, 1, 0).reshape(r_in, -1))
    a, g = a_t.T, np.moveaxis(gm.reshape(r_in, r_out, *kernel), 0, 1)
    u, g2 = balance(u, g.reshape(r_out, -1))
    return TuckerFactors(a, g2.reshape(g.shape), u, f_in.s, f_out.s)


def _alpha_for_ratio(c_in: int, c_out: int, p: int, ratio: float) -> float:
    """alpha with c_in*(a c_in) + (a c_in)(a c_out) p + (a c_out)*c_out = ratio * c_out c_in p."""
    qa, qb, qc = c_in * c_out * p, c_in * c_in + c_out * c_out, ratio * c_in * c_out * p
    return (-qb + math.sqrt(qb * qb + 4 * qa * qc)) / (2 * qa)


@dataclass
class _Conv:
    node: ir.Node
    label: str
    weight: str
    value: ir.Value  # the weight's initializer (read when needed)
    shape: tuple[int, ...]  # [C_out, C_in, k...]
    dtype: np.dtype
    geometry: Geometry

    @property
    def w(self) -> np.ndarray:
        """The weights as float64 [C_out, C_in, k...]."""
        return constant_value(self.value).astype(np.float64)

    @property
    def pointwise(self) -> bool:
        return all(k == 1 for k in self.shape[2:])


class LowRankTucker(LowRankPassBase):
    name = "lowrank-tucker"
    summary = ("Tucker-2 factorization of Conv layers (1x1 -> kxk core -> 1x1; 1x1 convs by SVD); "
               "data-aware with --calib.")
    Config = LowRankTuckerConfig

    def _targets(self, graph: ir.Graph, skipped: dict[str, str]) -> list[_Conv]:
        out = []
        for node in graph:
            if node.domain not in ("", "ai.onnx") or node.op_type != "Conv" or len(node.inputs) < 2:
                continue
            wv, xv = node.inputs[1], node.inputs[0]
            w = float_weight(wv)  # shape and dtype only: the values are read when the layer is factored
            if w is None or len(w.shape) < 3 or xv is None or constant_value(xv) is not None:
                continue
            label = node_label(node)
            if TUCKER_MARK in (node.name or ""):
                skipped[label] = "already factorized"
                continue
            if attr(node, "group", 1) != 1:
                skipped[label] = f"grouped conv (group={attr(node, 'group', 1)})"
                continue
            others = [u for u in wv.consumers() if u is not node]
            if others:
                skipped[label] = f"weight {wv.name!r} is shared with {len(others)} other node(s)"
                continue
            shape = tuple(int(d) for d in w.shape)
            out.append(_Conv(node, label, wv.name, wv, shape, w.dtype.numpy(), Geometry.of(node, shape[2:])))
        return out

    def call(self, model: ir.Model) -> LowRankTuckerResult:
        method = self.resolved_method()
        self.graph = model.graph
        self.namer = Namer(model.graph)
        result = LowRankTuckerResult(model, False, method=method)
        chosen = self.choose(self._targets(model.graph, result.skipped), result)

        def request(t: _Conv):
            c_in = t.shape[1]
            x = t.node.inputs[0].name
            return ((x, c_in, t.geometry),
                    GramRequest(x, c_in * math.prod(t.geometry.kernel), t.geometry.rows(c_in)))

        grams = self.gather(model, chosen, request, result)
        with single_threaded_blas():
            for t in chosen:
                gram = grams.get(t.label)
                outcome = (self._pointwise if t.pointwise else self._tucker)(t, method, gram)
                if isinstance(outcome, str):
                    result.skipped[t.label] = outcome
                    release(t.value)  # left as it is (a factored weight is released when it is dropped)
                else:
                    result.layers[t.label] = outcome
        return self.finish(result)

    # --- 1x1 convs: two factors -------------------------------------------------------------
    def _pointwise(self, t: _Conv, method: str, stats: InputStats | None) -> LayerChoice | str:
        c_out, c_in = t.shape[:2]
        w = t.w.reshape(c_out, c_in).T  # as a matrix layer on im2col rows: y = x @ w
        corrected = self.corrects_bias(method, stats)
        c, alpha = layer_gram(stats, method, corrected, self.config.damping)
        f = spectrum_of(w, c)
        r = self.matrix_rank(t.label, t.weight, c_in, c_out, f.s)
        new = r * (c_in + c_out)
        if new >= c_in * c_out and self.config.skip_unprofitable:
            return f"rank {r} saves nothing: r*(C_in+C_out) = {new} >= C_in*C_out = {c_in * c_out}"
        m = matrix_choice(w, f, r, stats, method, corrected)
        choice = LayerChoice(
            node=t.label, op_type="Conv", weight=t.weight, shape=list(t.shape), form="svd", rank=r, method=method,
            params_before=c_in * c_out, params_after=new, macs_before=c_in * c_out, macs_after=new,
            weight_error=m.weight_error, output_error=m.output_error,
            weight_only_output_error=m.weight_only_output_error, energy_kept=energy_kept(f.s, r),
            bias_corrected=corrected, shrinkage=alpha)
        ones = [1] * (len(t.shape) - 2)
        self._emit(t, [(m.u.T.reshape(r, c_in, *ones), "0", True), (m.v.T.reshape(c_out, r, *ones), "1", False)],
                   m.delta)
        return choice

    # --- k x k convs: Tucker-2 ---------------------------------------------------------------
    def _tucker_ranks(self, t: _Conv):
        """(choose_in, choose_out) callables taking a spectrum."""
        c_out, c_in = t.shape[:2]
        p = math.prod(t.shape[2:])
        mapped = self.mapped_rank(t.label, t.weight)
        if mapped is not None:
            if isinstance(mapped, int):
                r_in, r_out = min(mapped, c_in), min(mapped, c_out)
            else:
                r_in, r_out = mapped
                if r_in > c_in or r_out > c_out:
                    raise OnnxoptError(f"{self.name}: ranks [{r_in}, {r_out}] for layer {t.label!r} exceed its "
                                       f"channels [C_in={c_in}, C_out={c_out}]")
            return (lambda s: r_in), (lambda s: r_out)
        rule, value = self.config.rule()
        if rule == "rank":
            return (lambda s: min(int(value), c_in)), (lambda s: min(int(value), c_out))
        if rule == "energy":
            return (lambda s: energy_rank(s, value)), (lambda s: energy_rank(s, value))
        alpha = _alpha_for_ratio(c_in, c_out, p, value)
        r_in = min(max(1, round(alpha * c_in)), c_in)
        r_out = min(max(1, round(alpha * c_out)), c_out)
        return (lambda s: r_in), (lambda s: r_out)

    def _tucker(self, t: _Conv, method: str, stats: InputStats | None) -> LayerChoice | str:
        c_out, c_in = t.shape[:2]
        p = math.prod(t.shape[2:])
        w64 = t.w
        choose_in, choose_out = self._tucker_ranks(t)
        corrected = self.corrects_bias(method, stats)
        channels = channel_stats(stats, c_in, p) if stats is not None else None
        damping = self.config.damping
        c_patch, alpha = layer_gram(stats, method, corrected, damping)
        f = tucker2(w64, layer_gram(channels, method, corrected, damping)[0], c_patch, choose_in, choose_out)
        r_in, r_out = f.a.shape[0], f.u.shape[1]
        stride = math.prod(t.geometry.strides)
        before = c_out * c_in * p
        params = c_in * r_in + r_in * r_out * p + r_out * c_out
        macs = c_in * r_in * stride + r_in * r_out * p + r_out * c_out
        if params >= before and macs >= before and self.config.skip_unprofitable:
            return (f"ranks [{r_in}, {r_out}] save nothing: {params} parameters and {macs} multiply-adds per "
                    f"output pixel vs {before}")
        approx = f.weight()
        choice = LayerChoice(
            node=t.label, op_type="Conv", weight=t.weight, shape=list(t.shape), form="tucker2",
            rank=[r_in, r_out], method=method, params_before=before, params_after=params, macs_before=before,
            macs_after=macs, weight_error=rel_error(w64 - approx, w64), bias_corrected=corrected, shrinkage=alpha)
        delta = None
        if stats is not None:
            w0 = w64.reshape(c_out, -1).T  # [C_in * P, C_out]: the conv as a matrix on im2col rows
            d0 = w0 - approx.reshape(c_out, -1).T
            choice.output_error = output_error(d0, w0, stats, corrected)
            delta = stats.mean @ d0 if corrected else None
            if method == "data-aware":
                wo = tucker2(w64, None, None, lambda s: r_in, lambda s: r_out).weight()
                choice.weight_only_output_error = output_error(w0 - wo.reshape(c_out, -1).T, w0, stats, False)
        ones = [1] * (len(t.shape) - 2)
        self._emit(t, [(f.a.reshape(r_in, c_in, *ones), "in", False), (f.g, "core", True),
                       (f.u.reshape(c_out, r_out, *ones), "out", False)], delta)
        return choice

    def _emit(self, t: _Conv, convs: list[tuple[np.ndarray, str, bool]], delta: np.ndarray | None) -> None:
        """Chain ``convs`` (weight, name suffix, keeps the geometry) in place of ``t.node``; the last gets the
        bias, plus ``delta`` (the mean output change) when given."""
        g, namer = self.graph, self.namer
        node = t.node
        base = node.name or node.outputs[0].name
        bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] is not None else None
        dropped, extra = [t.value], []
        add_after = None
        if delta is not None and np.any(delta):
            b = constant_value(bias) if bias is not None else np.zeros(len(delta), dtype=t.dtype)
            if b is not None:
                if bias is not None:
                    dropped.append(bias)
                bias = add_initializer(g, (b + delta).astype(b.dtype), f"{base}_lowrank_bias", namer)
            else:  # a computed bias: add the correction after the last conv
                add_after = add_initializer(g, delta.reshape(-1, *[1] * (len(t.shape) - 2)).astype(t.dtype),
                                            f"{base}_lowrank_bias", namer)
        nodes, current = [], node.inputs[0]
        for i, (w, suffix, geometric) in enumerate(convs):
            last = i == len(convs) - 1
            w_value = add_initializer(g, w.astype(t.dtype), f"{t.weight}_tucker_{suffix}", namer)
            inputs = [current, w_value] + ([bias] if last and bias is not None else [])
            out = None if last and add_after is None else [namer.unique(
                f"{base}{TUCKER_MARK}{'out' if last else suffix + '_out'}")]
            kwargs = {"kernel_shape": list(w.shape[2:])}
            if geometric:
                for name in CONV_GEOMETRY:
                    if name != "kernel_shape" and name in node.attributes:
                        kwargs[name] = attr(node, name)
            conv = make_node("Conv", inputs, kwargs, outputs=out, name=namer.unique(f"{base}{TUCKER_MARK}{suffix}"))
            nodes.append(conv)
            current = conv.outputs[0]
        final = nodes[-1]
        if add_after is not None:
            final = make_node("Add", [current, add_after], name=namer.unique(f"{base}{TUCKER_MARK}bias"))
            extra.append(final)
        self.replace_nodes(node, nodes + extra, final.outputs[0], dropped)
