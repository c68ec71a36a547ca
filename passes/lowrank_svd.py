"""Low-rank factorization of MatMul/Gemm layers with constant weights (truncated SVD).

A layer ``y = x @ W (+ b)`` with ``W`` of shape K x N becomes ``y = (x @ U) @ V (+ b)`` with ``U`` K x r
and ``V`` r x N: ``r * (K + N)`` parameters and multiply-adds per row instead of ``K * N``. Layers where
that saves nothing (``r * (K + N) >= K * N``) are left alone and listed, with the reason, in the details.

Covered: ``MatMul(x, W)`` with a constant 2-D ``W`` and activations of any rank (``[.., K]``, e.g. the
``[B, L, K]`` of a transformer), and ``Gemm(A, B, C)`` with a constant ``B`` (``transA``/``transB`` 0 or 1,
``alpha`` folded into the factors, ``C``/``beta`` kept on the second node).

Two ways to choose the factors (``method``):

* ``weight``: the truncated SVD of ``W`` itself, the best rank-r weights in Frobenius norm (Eckart-Young:
  relative weight error ``sqrt(sum of discarded s^2) / sqrt(sum of s^2)``).
* ``data-aware`` (the default when the run has calibration data): the best rank-r layer *on the layer's
  real inputs*. The pass runs the model once over the calibration data with every target layer's input
  exposed, accumulating the input's mean and second-moment (Gram) matrix ``C = X^T X / n`` in float64 --
  the activations themselves are never kept. Writing ``C = S S^T``, the output error on the calibration
  rows is ``||S^T (W - W_r)||_F``, minimised by the SVD of the whitened weights ``S^T W = P diag(s) Q^T``:
  ``S^T W_r = P_r diag(s_r) Q_r^T``. The same optimum is ``W_r = W Q_r Q_r^T`` (project the layer's
  *outputs* onto their top-r principal directions), which needs no inverse of ``S`` and so stays exact
  and stable when the covariance is singular (dead units, few samples): ``U = W Q_r``, ``V = Q_r^T``.
  ``Q`` comes from a symmetric eigenproblem on the smaller side (``W^T C W``, or ``M M^T`` with
  ``M = L^T W``, ``L`` the Cholesky factor of ``C``), never from a tall SVD.

  With ``bias_correction`` (default) the mean output change ``mean(x) (W - W_r)`` goes into the layer's
  bias (Gemm's C, the Add that follows a MatMul, or a new Add) and ``C`` is the *centred* covariance: the
  rank is spent on the output variance, not on reproducing a constant. With ``damping`` (default "auto",
  Ledoit-Wolf shrinkage estimated from how much the statistics vary between calibration batches) the
  covariance is pulled towards a multiple of the identity, so input directions the calibration data does
  not pin down keep weight-only behaviour instead of being fitted to noise (few samples, wide layers).

Errors in the details (per layer): ``weight_error = ||W - W_r||_F / ||W||_F`` and, with calibration data,
``output_error = ||Y - Y_r||_F / ||Y||_F`` with ``Y = X W`` on the calibration activations (bias excluded,
the bias correction included), computed exactly from the moments; data-aware layers also report what the
weight-only factors of the same rank would have given (``weight_only_output_error``) and the shrinkage used.

The factors are balanced (column j of ``U`` and row j of ``V`` get the same norm), which changes nothing
in float and keeps both factors' ranges alike for a later int8 quantization.

Rank, per layer, from exactly one rule: ``rank`` (fixed), ``energy`` (smallest r keeping that fraction of
the squared singular values: of ``W`` for ``weight``, of ``S^T W`` -- the output energy, or variance with
the bias correction -- for ``data-aware``) or ``param_ratio`` (r = floor(ratio * K * N / (K + N)), at
least 1); ``ranks`` maps node names (or weight names) to ranks and wins over the rule. With no rule and no
map, ``param_ratio: 0.75``. ``allocation: global`` makes ``param_ratio`` one budget for all the selected
layers together (``allocate_ranks``): ranks go where they cut a layer's relative (output, when
data-aware) error by the largest factor per parameter, so layers whose spectrum falls fast give up more.
``include``/``exclude`` (fnmatch patterns on node or weight names) and ``min_dim`` select the layers.

The new nodes are named ``<node>/lowrank_svd/0`` and ``/1``; nodes so named are never factorized again,
so the pass is idempotent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir
from pydantic import Field, PositiveInt, model_validator

from onnxopt.activations import GramRequest, InputStats, single_threaded_blas
from onnxopt.graph import Namer, add_initializer, attr, constant_value, make_node, release
from onnxopt.layers import fold_into_following_add, node_label
from onnxopt.lowrank import (
    LayerChoice,
    LowRankConfigBase,
    LowRankPassBase,
    LowRankResult,
    Spectrum,
    allocate_ranks,
    energy_kept,
    float_weight,
    layer_gram,
    matrix_choice,
    spectrum_of,
    svd_rank_params,
)

SVD_MARK = "/lowrank_svd/"


class LowRankSVDConfig(LowRankConfigBase):
    type: Literal["lowrank-svd"] = "lowrank-svd"
    ranks: dict[str, PositiveInt] = Field(
        default_factory=dict, description="rank per layer, by node name or weight name (wins over the rule)")
    allocation: Literal["per-layer", "global"] = Field(
        "per-layer", description="param_ratio for each layer, or one budget for all the selected layers "
                                 "together: ranks go where they cut a layer's relative error the most per "
                                 "parameter")

    @model_validator(mode="after")
    def _global_needs_ratio(self):
        if self.allocation == "global" and self.param_ratio is None:
            raise ValueError("allocation 'global' needs param_ratio (the budget for all the layers together)")
        return self


@dataclass
class LowRankSVDResult(LowRankResult):
    pass


# --------------------------------------------------------------------------------------------
# The SVD pass
# --------------------------------------------------------------------------------------------
@dataclass
class _Linear:
    node: ir.Node
    label: str
    weight: str
    value: ir.Value  # the weight's initializer (read when needed)
    shape: tuple[int, int]  # effective K x N
    dtype: np.dtype
    act: ir.Value
    trans_a: bool

    @property
    def w(self) -> np.ndarray:
        """The effective K x N weights, float64 (transB and alpha applied)."""
        w = constant_value(self.value).astype(np.float64)
        if self.node.op_type == "Gemm":
            if attr(self.node, "transB", 0):
                w = w.T
            w = w * float(attr(self.node, "alpha", 1.0))
        return w


def _matmul_targets(graph: ir.Graph, skipped: dict[str, str]) -> list[_Linear]:
    out = []
    for node in graph:
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2:
            continue
        wv, xv = node.inputs[1], node.inputs[0]
        w = float_weight(wv)  # shape and dtype only: the values are read when the layer is factored
        if w is None or len(w.shape) != 2 or xv is None or constant_value(xv) is not None:
            continue
        label = node_label(node)
        if SVD_MARK in (node.name or ""):
            skipped[label] = "already factorized"
            continue
        others = [u for u in wv.consumers() if u is not node]
        if others:
            skipped[label] = f"weight {wv.name!r} is shared with {len(others)} other node(s)"
            continue
        trans_a = node.op_type == "Gemm" and bool(attr(node, "transA", 0))
        rows, cols = (int(d) for d in w.shape)
        shape = (cols, rows) if node.op_type == "Gemm" and attr(node, "transB", 0) else (rows, cols)
        out.append(_Linear(node, label, wv.name, wv, shape, w.dtype.numpy(), xv, trans_a))
    return out


def _rows_last(k: int):
    return lambda x: x.reshape(-1, k)


def _rows_transposed(k: int):
    return lambda x: x.reshape(k, -1).T


class LowRankSVD(LowRankPassBase):
    name = "lowrank-svd"
    summary = ("Factorize MatMul/Gemm weights into two rank-r factors (truncated SVD; data-aware with "
               "--calib: preserve outputs on calibration activations).")
    Config = LowRankSVDConfig

    def call(self, model: ir.Model) -> LowRankSVDResult:
        method = self.resolved_method()
        self.graph = model.graph
        self.namer = Namer(model.graph)
        result = LowRankSVDResult(model, False, method=method)
        chosen = self.choose(_matmul_targets(model.graph, result.skipped), result)

        def request(t: _Linear):
            k = t.shape[0]
            return ((t.act.name, k, t.trans_a),
                    GramRequest(t.act.name, k, _rows_transposed(k) if t.trans_a else _rows_last(k)))

        grams = self.gather(model, chosen, request, result)

        def spectrum(t: _Linear, w: np.ndarray) -> tuple[Spectrum, float | None]:
            stats = grams.get(t.label)
            c, alpha = layer_gram(stats, method, self.corrects_bias(method, stats), self.config.damping)
            return spectrum_of(w, c), alpha

        with single_threaded_blas():
            spectra, allocated = {}, {}
            if self.config.allocation == "global":
                # one budget for all the layers: every spectrum first (each held until its layer is factored)
                spectra = {t.label: spectrum(t, t.w) for t in chosen}
                free = [t for t in chosen if self.mapped_rank(t.label, t.weight) is None]
                allocated = allocate_ranks({t.label: (*t.shape, spectra[t.label][0].s) for t in free},
                                           self.config.param_ratio)
            for t in chosen:  # per layer: one weight read, factored, rewritten and released at a time
                w = t.w
                f, alpha = spectra.pop(t.label) if t.label in spectra else spectrum(t, w)
                outcome = self._factor(t, w, method, grams.pop(t.label, None), f, alpha, allocated.get(t.label))
                del w, f
                if isinstance(outcome, str):
                    result.skipped[t.label] = outcome
                    release(t.value)  # left as it is (a factored weight is released when it is dropped)
                else:
                    result.layers[t.label] = outcome
        return self.finish(result)

    def _factor(self, t: _Linear, w: np.ndarray, method: str, stats: InputStats | None, f: Spectrum,
                alpha: float | None, allocated: int | None) -> LayerChoice | str:
        """Factor ``t`` (``w``: its effective K x N weights) and rewrite it; the reason if it is left alone."""
        k, n = t.shape
        corrected = self.corrects_bias(method, stats)
        r = allocated if allocated is not None else self.matrix_rank(t.label, t.weight, k, n, f.s)
        new_params = svd_rank_params(k, n, r)
        if new_params >= k * n and self.config.skip_unprofitable:
            return f"rank {r} saves nothing: r*(K+N) = {new_params} >= K*N = {k * n} (K={k}, N={n})"
        m = matrix_choice(w, f, r, stats, method, corrected)
        choice = LayerChoice(
            node=t.label, op_type=t.node.op_type, weight=t.weight, shape=[k, n], form="svd", rank=r,
            method=method, params_before=k * n, params_after=new_params, macs_before=k * n,
            macs_after=new_params, weight_error=m.weight_error, output_error=m.output_error,
            weight_only_output_error=m.weight_only_output_error, energy_kept=energy_kept(f.s, r),
            bias_corrected=corrected, shrinkage=alpha)
        self._rewrite(t, m.u, m.v, m.delta)
        return choice

    def _rewrite(self, t: _Linear, u: np.ndarray, v: np.ndarray, delta: np.ndarray | None) -> None:
        g, namer = self.graph, self.namer
        node = t.node
        base = node.name or node.outputs[0].name
        u_value = add_initializer(g, u.astype(t.dtype), f"{t.weight}_lowrank_U", namer)
        v_value = add_initializer(g, v.astype(t.dtype), f"{t.weight}_lowrank_V", namer)
        first_name, second_name = namer.unique(f"{base}{SVD_MARK}0"), namer.unique(f"{base}{SVD_MARK}1")
        mid = [namer.unique(f"{base}{SVD_MARK}mid")]
        if t.trans_a:
            first = make_node("Gemm", [t.act, u_value], {"transA": 1}, outputs=mid, name=first_name)
        else:
            first = make_node("MatMul", [t.act, u_value], outputs=mid, name=first_name)
        dropped = [t.value]
        extra: list[ir.Node] = []
        has_c = node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None
        bias = node.inputs[2] if has_c else None
        beta = float(attr(node, "beta", 1.0))
        if delta is not None and not np.any(delta):
            delta = None
        if delta is not None and bias is not None:
            c = constant_value(bias)
            if c is not None and beta != 0:  # C' = C + delta / beta (a new initializer: C may be shared)
                new_c = np.broadcast_to(c, np.broadcast_shapes(c.shape, delta.shape)) + delta / beta
                dropped.append(bias)
                bias = add_initializer(g, new_c.astype(c.dtype), f"{bias.name}_lowrank", namer)
                delta = None
        elif delta is not None and node.op_type == "Gemm":  # Gemm without C: the correction becomes C
            bias, beta = add_initializer(g, delta.astype(t.dtype), f"{base}_lowrank_bias", namer), 1.0
            delta = None
        elif delta is not None and fold_into_following_add(node, delta):
            delta = None
        out_names = [namer.unique(f"{base}{SVD_MARK}out")] if delta is not None else None
        if bias is not None:
            second = make_node("Gemm", [first.outputs[0], v_value, bias], {"beta": beta}, outputs=out_names,
                               name=second_name)
        else:
            second = make_node("MatMul", [first.outputs[0], v_value], outputs=out_names, name=second_name)
        final = second
        if delta is not None:  # no bias to fold into: an explicit Add
            d_value = add_initializer(g, delta.astype(t.dtype), f"{base}_lowrank_bias", namer)
            final = make_node("Add", [second.outputs[0], d_value], name=namer.unique(f"{base}{SVD_MARK}bias"))
            extra.append(final)
        self.replace_nodes(node, [first, second, *extra], final.outputs[0], dropped)
