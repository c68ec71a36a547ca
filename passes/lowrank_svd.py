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

import difflib
import fnmatch
import math
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
import onnx
from onnx import helper
from pydantic import Field, PositiveInt, model_validator

from onnxopt.activations import GramRequest, InputStats, collect_grams, single_threaded_blas
from onnxopt.errors import OnnxoptError, PreconditionError
from onnxopt.legacy_graph import GraphIndex, attr
from onnxopt.pass_infra import PassConfig, PassResult, ProtoPass

DEFAULT_DOMAINS = ("", "ai.onnx")
DEFAULT_RULE = ("param_ratio", 0.75)
FLOAT_DTYPES = (np.float16, np.float32, np.float64)
SVD_MARK = "/lowrank_svd/"
ALLOC_FLOOR = 1e-3  # allocation: a relative squared error this small counts as done (see allocate_ranks)


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------
class LowRankConfigBase(PassConfig):
    """Fields shared by the low-rank passes (``lowrank-svd``, ``lowrank-tucker``)."""

    method: Literal["weight", "data-aware"] | None = Field(
        None, description="weight: SVD of the weights; data-aware: preserve outputs on calibration "
                          "activations (needs --calib). Default: data-aware when calibration data is given")
    rank: PositiveInt | None = Field(None, description="the same rank for every layer (capped at the layer's)")
    energy: float | None = Field(
        None, gt=0, le=1, description="smallest rank keeping this fraction of the squared singular values "
                                      "(of the outputs on the calibration data when data-aware)")
    param_ratio: float | None = Field(
        None, gt=0, lt=1, description="rank so each factorized layer keeps about this fraction of its "
                                      "parameters; the default rule (0.75) when no rule and no ranks are given")
    include: list[str] | None = Field(
        None, description="fnmatch patterns of node (or weight) names to consider (default: every layer)")
    exclude: list[str] = Field(default_factory=list, description="fnmatch patterns of node/weight names to leave")
    min_dim: PositiveInt = Field(16, description="leave layers whose smaller weight dimension is below this")
    skip_unprofitable: bool = Field(
        True, description="leave layers where the factors save neither parameters nor multiply-adds")
    damping: Literal["auto"] | Annotated[float, Field(ge=0, le=1)] = Field(
        "auto", description="data-aware: shrink the input covariance towards the identity by this fraction "
                            "(auto: Ledoit-Wolf, from how much the statistics vary between calibration "
                            "batches), so directions the data barely covers keep weight-only behaviour")
    bias_correction: bool = Field(
        True, description="data-aware: absorb the mean output change into the bias and spend the rank on "
                          "the output variance (centred covariance)")
    batch_size: PositiveInt = Field(16, description="calibration samples per ONNX Runtime run (data-aware)")
    max_samples: PositiveInt | None = Field(None, description="use at most this many calibration samples")

    @model_validator(mode="after")
    def _one_rule(self):
        given = [k for k in ("rank", "energy", "param_ratio") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of rank, energy, param_ratio (got {' and '.join(given)})")
        return self

    def rule(self) -> tuple[str, float] | None:
        """The global rank rule as (name, value); None when only the ``ranks`` map applies."""
        for k in ("rank", "energy", "param_ratio"):
            if getattr(self, k) is not None:
                return k, getattr(self, k)
        if not self.ranks:  # type: ignore[attr-defined]
            return DEFAULT_RULE
        return None


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


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------
@dataclass
class LayerChoice:
    """What was done to one layer."""

    node: str
    op_type: str
    weight: str
    shape: list[int]  # the weight's shape as the layer uses it: [K, N] (SVD) or the conv weight's
    form: str  # "svd" (two factors) or "tucker2" (three)
    rank: int | list[int]  # r, or [r_in, r_out] for Tucker-2
    method: str
    params_before: int
    params_after: int
    macs_before: int  # multiply-adds per output row (per output pixel for convs)
    macs_after: int
    weight_error: float  # ||W - W_r||_F / ||W||_F
    output_error: float | None = None  # on the calibration activations (None without data)
    weight_only_output_error: float | None = None  # same rank, weight-only factors (data-aware only)
    energy_kept: float | None = None  # fraction of the (output, when data-aware) energy kept
    bias_corrected: bool = False  # the mean output change was folded into the bias
    shrinkage: float | None = None  # how far the input covariance was pulled towards the identity (data-aware)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for k in ("weight_error", "output_error", "weight_only_output_error", "energy_kept", "shrinkage"):
            if out[k] is not None:
                out[k] = round(float(out[k]), 6)
        return out


@dataclass
class LowRankResult(PassResult):
    """Per-layer ranks and errors of a low-rank pass (``layers``), and the layers left alone (``skipped``)."""

    method: str = "weight"
    layers: dict[str, LayerChoice] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    calibration_samples: int = 0


@dataclass
class LowRankSVDResult(LowRankResult):
    pass


# --------------------------------------------------------------------------------------------
# Linear algebra
# --------------------------------------------------------------------------------------------
def chol_root(c: np.ndarray) -> np.ndarray:
    """Lower-triangular ``L`` with ``L @ L.T == c`` (a PSD Gram matrix); a singular ``c`` gets the smallest
    diagonal jitter (from 1e-12 of its mean diagonal) that makes the factorization succeed."""
    c = (c + c.T) / 2
    scale = max(float(np.mean(np.diag(c))), 1e-300)
    jitter = 0.0
    for _ in range(12):
        try:
            return np.linalg.cholesky(c + jitter * np.eye(len(c)))
        except np.linalg.LinAlgError:
            jitter = scale * (1e-12 if jitter == 0 else jitter / scale * 100)
    raise OnnxoptError("the activation covariance is not positive semi-definite (NaN/Inf activations?)")


def energy_rank(s: np.ndarray, energy: float) -> int:
    """Smallest r with sum(s[:r]^2) >= energy * sum(s^2)."""
    e = np.cumsum(s.astype(np.float64) ** 2)
    if e[-1] <= 0:
        return 1
    return int(min(np.searchsorted(e / e[-1], energy - 1e-12) + 1, len(s)))


def rel_error(diff: np.ndarray, ref: np.ndarray, gram: np.ndarray | None = None) -> float:
    """||diff||_F / ||ref||_F for K x N matrices, or with the rows weighted by a K x K Gram matrix ``C``:
    sqrt(tr(diff^T C diff) / tr(ref^T C ref)) = ||X diff||_F / ||X ref||_F when C = X^T X."""
    if gram is None:
        num, den = float(np.sum(diff * diff)), float(np.sum(ref * ref))
    else:
        num, den = float(np.sum(diff * (gram @ diff))), float(np.sum(ref * (gram @ ref)))
    return math.sqrt(max(num, 0.0) / den) if den > 0 else 0.0


def balance(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rescale column j of ``u`` and row j of ``v`` to the same norm (u @ v unchanged)."""
    nu, nv = np.linalg.norm(u, axis=0), np.linalg.norm(v, axis=1)
    ok = (nu > 0) & (nv > 0)
    scale = np.ones_like(nu)
    scale[ok] = np.sqrt(nv[ok] / nu[ok])
    return u * scale[None, :], v / scale[:, None]


@dataclass
class Spectrum:
    """Singular values ``s`` (descending) and right singular vectors ``qt`` (rows) of ``M = S^T W``,
    where ``S S^T = C`` (``C = I`` for weight-only)."""

    s: np.ndarray
    qt: np.ndarray


def spectrum_of(w: np.ndarray, gram: np.ndarray | None = None) -> Spectrum:
    """The SVD of ``S^T w`` (w: K x N) that the rank-r truncation needs, from a symmetric eigenproblem on
    the smaller side: ``w^T C w`` (N x N) when N <= K, else ``M M^T`` (K x K, M = L^T w with L the
    Cholesky factor of C). Both avoid the square root of ``C`` and LAPACK's slow tall SVDs."""
    k, n = w.shape
    if n <= k:
        a = w.T @ (w if gram is None else gram @ w)
        lam, q = np.linalg.eigh((a + a.T) / 2)
        order = np.argsort(lam)[::-1]
        return Spectrum(np.sqrt(np.clip(lam[order], 0.0, None)), q[:, order].T)
    m = w if gram is None else chol_root(gram).T @ w
    lam, p = np.linalg.eigh(m @ m.T)
    order = np.argsort(lam)[::-1]
    sv = np.sqrt(np.clip(lam[order], 0.0, None))
    qt = p[:, order].T @ m
    live = sv > sv[0] * 1e-12 if sv.size and sv[0] > 0 else np.zeros_like(sv, dtype=bool)
    qt[live] /= sv[live, None]
    qt[~live] = 0.0  # no energy in that direction: the factor contributes nothing
    return Spectrum(sv, qt)


def truncate(w: np.ndarray, f: Spectrum, r: int) -> tuple[np.ndarray, np.ndarray]:
    """Balanced factors (U K x r, V r x N) of the rank-r truncation ``w Q_r Q_r^T``."""
    qt = f.qt[:r]
    return balance(w @ qt.T, qt)


def energy_kept(s: np.ndarray, r: int) -> float:
    total = float(np.sum(s ** 2))
    return float(np.sum(s[:r] ** 2)) / total if total > 0 else 1.0


def svd_rank_params(k: int, n: int, r: int) -> int:
    return r * (k + n)


def ratio_rank(k: int, n: int, ratio: float) -> int:
    return max(1, int(math.floor(ratio * k * n / (k + n))))


def allocate_ranks(layers: dict[str, tuple[int, int, np.ndarray]], ratio: float) -> dict[str, int]:
    """Ranks for ``layers`` ({label: (K, N, singular values)}) within one budget of ``ratio * sum(K * N)``
    parameters, minimising the sum over layers of ``log(e + ALLOC_FLOOR)``, ``e`` the relative squared error
    (the fraction of the layer's energy discarded): greedily take the singular direction whose reduction of
    that sum per parameter is largest. The log makes halving any layer's error worth about the same, so a
    layer whose energy sits in a few directions is not cut down to those few; the floor stops a layer
    already below ~3 % relative error from taking the budget (a pure log values 1e-6 -> 1e-12 as much as
    0.5 -> 0.25). On MiniLM SST-2 (all 36 encoder matrices, budget 0.75, data-aware) this kept 78.6 % vs
    77.6 % for the plain sum of relative errors, but a hand-picked split (FFN output and query/key only)
    does better at the same size: see bench/lowrank.py.
    A layer whose rank reaches ``K*N / (K+N)`` costs its dense size and its remaining directions are free:
    it stays dense."""
    import heapq

    def cost(k, n, r):  # parameters at rank r (dense once the factors would not be smaller)
        return min(r * (k + n), k * n)

    budget = ratio * sum(k * n for k, n, _ in layers.values())
    rank = dict.fromkeys(layers, 1)
    spent = sum(cost(k, n, 1) for k, n, _ in layers.values())
    tails = {}
    for label, (_, _, s) in layers.items():
        e = np.square(s, dtype=np.float64)
        total = float(e.sum())
        # tails[r]: fraction of the energy discarded at rank r, plus the floor
        tails[label] = np.append(np.cumsum(e[::-1])[::-1], 0.0) / (total if total > 0 else 1.0) + ALLOC_FLOOR
    heap = []

    def push(label):
        k, n, s = layers[label]
        r = rank[label]
        if r >= min(k, n, len(s)):
            return
        gain = math.log(tails[label][r] / tails[label][r + 1])
        step = cost(k, n, r + 1) - cost(k, n, r)
        # ties (and free steps past the break-even) are taken in a fixed order: deterministic ranks
        heapq.heappush(heap, (-(gain / step) if step else -math.inf, label, step))

    for label in sorted(layers):
        push(label)
    while heap:
        _, label, step = heapq.heappop(heap)
        if spent + step > budget:
            continue  # this layer's next direction does not fit; a cheaper layer's may
        spent += step
        rank[label] += 1
        push(label)
    return rank


# --------------------------------------------------------------------------------------------
# Layer discovery shared by the low-rank passes
# --------------------------------------------------------------------------------------------
def node_label(node: onnx.NodeProto) -> str:
    return node.name or f"{node.op_type}({node.output[0]})"


def constant_weight(index: GraphIndex, name: str) -> np.ndarray | None:
    if not name:
        return None
    w = index.constant(name)
    if w is None or w.dtype.type not in FLOAT_DTYPES:
        return None
    return w


def layer_gram(stats: InputStats | None, method: str, corrected: bool,
               damping: float | str = 0.0) -> tuple[np.ndarray | None, float | None]:
    """The second-moment matrix that weighs the truncation: none (weight-only), or the input's Gram matrix
    (centred when the mean error goes into the bias), shrunk towards a multiple of the identity by
    ``damping`` (a fraction, or "auto": Ledoit-Wolf from the number of rows) so that input directions the
    calibration data barely covers fall back to weight-only behaviour.

    Returns (matrix, shrinkage used); (None, None) for weight-only."""
    if stats is None or method != "data-aware":
        return None, None
    c = stats.covariance if corrected else stats.gram
    alpha = stats.shrinkage(c) if damping == "auto" else float(damping)
    if alpha > 0:
        c = (1 - alpha) * c + alpha * max(float(np.mean(np.diag(c))), 0.0) * np.eye(len(c))
    return c, alpha


def output_error(d: np.ndarray, w: np.ndarray, stats: InputStats, corrected: bool) -> float:
    """||Y - Y_hat||_F / ||Y||_F on the calibration rows (bias excluded) for ``Y_hat = X (w - d) (+ mean d)``."""
    num = float(np.sum(d * ((stats.covariance if corrected else stats.gram) @ d)))
    den = float(np.sum(w * (stats.gram @ w)))
    return math.sqrt(max(num, 0.0) / den) if den > 0 else 0.0


@dataclass
class MatrixChoice:
    u: np.ndarray  # K x r
    v: np.ndarray  # r x N
    delta: np.ndarray | None  # [N] added to the output (mean error), or None
    weight_error: float
    output_error: float | None
    weight_only_output_error: float | None


def matrix_choice(w: np.ndarray, f: Spectrum, r: int, stats: InputStats | None, method: str,
                  corrected: bool) -> MatrixChoice:
    """Rank-r factors of ``w`` (K x N) from ``f``, the bias correction and the errors to report."""
    u, v = truncate(w, f, r)
    d = w - u @ v
    delta = stats.mean @ d if corrected else None
    out = MatrixChoice(u, v, delta, rel_error(d, w), None, None)
    if stats is not None:
        out.output_error = output_error(d, w, stats, corrected)
        if method == "data-aware":
            wu, wv = truncate(w, spectrum_of(w), r)
            out.weight_only_output_error = output_error(w - wu @ wv, w, stats, False)
    return out


class LowRankPassBase(ProtoPass):
    """Selection, rank rules and bookkeeping common to the low-rank passes."""

    def __init__(self, config=None, context=None):
        super().__init__(config, context)
        self._pending: list[tuple[onnx.NodeProto, list[onnx.NodeProto], list[str]]] = []

    def resolved_method(self) -> str:
        m = self.config.method  # type: ignore[attr-defined]
        if m is None:
            return "data-aware" if self.context.calibration is not None else "weight"
        return m

    def requires(self, model: onnx.ModelProto) -> None:
        super().requires(model)
        if self.config.method == "data-aware" and self.context.calibration is None:  # type: ignore[attr-defined]
            raise PreconditionError(f"{self.name}: method 'data-aware' needs calibration data (pass it with --calib)")

    def select(self, label: str, weight: str, shape: tuple[int, ...]) -> str | None:
        """None if the layer is to be factorized, else the reason it is left alone."""
        cfg = self.config
        mapped = self.mapped_rank(label, weight) is not None
        names = (label, weight)
        if not mapped:
            if cfg.include is not None and not any(fnmatch.fnmatchcase(x, p) for p in cfg.include for x in names):
                return "not matched by include"
            if any(fnmatch.fnmatchcase(x, p) for p in cfg.exclude for x in names):
                return "excluded"
            if cfg.rule() is None:
                return "not in ranks"
            if min(shape[:2]) < cfg.min_dim:
                return f"smaller weight dimension {min(shape[:2])} < min_dim {cfg.min_dim}"
        return None

    def mapped_rank(self, label: str, weight: str):
        ranks = self.config.ranks
        if label in ranks:
            return ranks[label]
        return ranks.get(weight)

    def check_map_keys(self, known: set[str]) -> None:
        unknown = [k for k in self.config.ranks if k not in known]
        if unknown:
            close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise OnnxoptError(f"{self.name}: ranks names {unknown[0]!r}, which is not a layer this pass can "
                               f"factorize (node or weight name){hint}")

    def matrix_rank(self, label: str, weight: str, k: int, n: int, spectrum: np.ndarray) -> int:
        """Rank for a K x N matrix layer by the map or the rule."""
        full = min(k, n)
        mapped = self.mapped_rank(label, weight)
        if mapped is not None:
            if not isinstance(mapped, int):
                raise OnnxoptError(f"{self.name}: layer {label!r} takes one rank (a {k}x{n} matrix), "
                                   f"got {list(mapped)}")
            if mapped > full:
                raise OnnxoptError(f"{self.name}: rank {mapped} for layer {label!r} exceeds its full rank {full} "
                                   f"(weight {k}x{n})")
            return mapped
        rule, value = self.config.rule()
        if rule == "rank":
            return min(int(value), full)
        if rule == "energy":
            return energy_rank(spectrum, value)
        return min(ratio_rank(k, n, value), full)

    def replace_nodes(self, index: GraphIndex, old: onnx.NodeProto, new: list[onnx.NodeProto],
                      dropped: list[str]) -> None:
        """Queue putting ``new`` where ``old`` is; ``apply_replacements`` rewrites the graph once at the end
        (node references stay valid until then) and drops the constants nothing reads any more."""
        self._pending.append((old, new, dropped))

    def apply_replacements(self, index: GraphIndex) -> None:
        pending, self._pending = self._pending, []
        if not pending:
            return
        g = index.graph
        by_id = {id(old): new for old, new, _ in pending}
        nodes = []
        for n in g.node:
            nodes.extend(by_id.get(id(n), [n]))
        del g.node[:]
        g.node.extend(nodes)
        index.refresh()
        dropped = {name for _, _, names in pending for name in names if name}
        dead = {name for name in dropped if not index.uses(name) and not index.is_output(name)}
        if not dead:
            return
        keep = [t for t in g.initializer if t.name not in dead]
        if len(keep) != len(g.initializer):
            del g.initializer[:]
            g.initializer.extend(keep)
        keep_nodes = [n for n in g.node if not (n.op_type == "Constant" and n.output[0] in dead)]
        if len(keep_nodes) != len(g.node):
            del g.node[:]
            g.node.extend(keep_nodes)
        keep_vi = [v for v in g.value_info if v.name not in dead]
        if len(keep_vi) != len(g.value_info):
            del g.value_info[:]
            g.value_info.extend(keep_vi)
        index.refresh()

    def corrects_bias(self, method: str, stats: InputStats | None) -> bool:
        return method == "data-aware" and stats is not None and self.config.bias_correction

    def choose(self, targets: list, result: LowRankResult) -> list:
        """The targets to factorize (the others go to ``result.skipped`` with the reason)."""
        self.check_map_keys({t.label for t in targets} | {t.weight for t in targets})
        chosen = []
        for t in targets:
            why = self.select(t.label, t.weight, t.w.shape)
            if why is None:
                chosen.append(t)
            else:
                result.skipped[t.label] = why
        return chosen

    def gather(self, model: onnx.ModelProto, chosen: list, request, result: LowRankResult) -> dict[str, InputStats]:
        """{layer label: input statistics} from the calibration data ({} without data);
        ``request(t) -> (key, GramRequest)``, layers with the same key share one matrix."""
        if not chosen or self.context.calibration is None:
            return {}
        cfg = self.config
        keys, requests = {}, {}
        for t in chosen:
            key, req = request(t)
            keys[t.label] = key
            requests[key] = req
        by_key, result.calibration_samples = collect_grams(
            model, self.context.calibration, requests, batch_size=cfg.batch_size, max_samples=cfg.max_samples,
            progress=self.context.progress, what=self.name)
        return {label: by_key[key] for label, key in keys.items()}

    def finish(self, index: GraphIndex, result: LowRankResult) -> LowRankResult:
        self.apply_replacements(index)
        result.modified = bool(result.layers)
        before = sum(c.params_before for c in result.layers.values())
        after = sum(c.params_after for c in result.layers.values())
        result.details = {
            "method": result.method,
            "factorized": len(result.layers),
            "skipped": len(result.skipped),
            "calibration_samples": result.calibration_samples,
            "params_before": before,
            "params_after": after,
            "layers": {k: v.to_dict() for k, v in result.layers.items()},
            "skipped_layers": dict(result.skipped),
        }
        return result


# --------------------------------------------------------------------------------------------
# The SVD pass
# --------------------------------------------------------------------------------------------
@dataclass
class _Linear:
    node: onnx.NodeProto
    label: str
    weight: str
    w: np.ndarray  # effective K x N float64 (transB and alpha applied)
    dtype: np.dtype
    act: str  # the activation input
    trans_a: bool
    rank_of_act: int | None


def _matmul_targets(index: GraphIndex, skipped: dict[str, str]) -> list[_Linear]:
    out = []
    for node in index.graph.node:
        if node.domain not in DEFAULT_DOMAINS or node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        w = constant_weight(index, node.input[1])
        if w is None or w.ndim != 2 or index.constant(node.input[0]) is not None:
            continue
        label = node_label(node)
        if SVD_MARK in node.name:
            skipped[label] = "already factorized"
            continue
        others = [u for u in index.uses(node.input[1]) if u is not node]
        if others:
            skipped[label] = f"weight {node.input[1]!r} is shared with {len(others)} other node(s)"
            continue
        trans_a = False
        eff = w.astype(np.float64)
        if node.op_type == "Gemm":
            trans_a = bool(attr(node, "transA", 0))
            if attr(node, "transB", 0):
                eff = eff.T
            eff = eff * float(attr(node, "alpha", 1.0))
        out.append(_Linear(node, label, node.input[1], eff, w.dtype, node.input[0], trans_a, None))
    return out


def _rows_last(k: int):
    return lambda x: x.reshape(-1, k)


def _rows_transposed(k: int):
    return lambda x: x.reshape(k, -1).T


def fold_into_following_add(index: GraphIndex, node: onnx.NodeProto, delta: np.ndarray) -> bool:
    """Add ``delta`` to the constant of the Add that alone reads ``node``'s output (the exporters' bias)."""
    add = index.only_use(node.output[0])
    if add is None or add.op_type != "Add" or add.domain not in DEFAULT_DOMAINS or len(add.input) != 2:
        return False
    other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
    if other == node.output[0] or other not in index.initializers or other in index.graph_inputs:
        return False
    if index.uses(other) != [add] or index.is_output(other):
        return False
    c = index.constant(other)
    if c is None or c.dtype.kind != "f" or c.ndim > 1 and any(d != 1 for d in c.shape[:-1]):
        return False
    if c.ndim and c.shape[-1] not in (1, delta.shape[0]):
        return False
    new_c = (c + delta).astype(c.dtype)  # [N] or [1, .., N]: the Add's output shape does not change
    index.set_initializer(other, new_c.reshape(c.shape[:-1] + (delta.shape[0],)) if c.ndim else new_c)
    return True


class LowRankSVD(LowRankPassBase):
    name = "lowrank-svd"
    summary = ("Factorize MatMul/Gemm weights into two rank-r factors (truncated SVD; data-aware with "
               "--calib: preserve outputs on calibration activations).")
    Config = LowRankSVDConfig

    def call(self, model: onnx.ModelProto) -> LowRankSVDResult:
        method = self.resolved_method()
        index = GraphIndex(model.graph)
        result = LowRankSVDResult(model, False, method=method)
        chosen = self.choose(_matmul_targets(index, result.skipped), result)

        def request(t: _Linear):
            k = t.w.shape[0]
            return (t.act, k, t.trans_a), GramRequest(t.act, k, _rows_transposed(k) if t.trans_a else _rows_last(k))

        grams = self.gather(model, chosen, request, result)
        with single_threaded_blas():
            spectra = {}
            for t in chosen:
                stats = grams.get(t.label)
                c, alpha = layer_gram(stats, method, self.corrects_bias(method, stats), self.config.damping)
                spectra[t.label] = (spectrum_of(t.w, c), alpha)
            allocated = {}
            if self.config.allocation == "global":
                free = [t for t in chosen if self.mapped_rank(t.label, t.weight) is None]
                allocated = allocate_ranks({t.label: (*t.w.shape, spectra[t.label][0].s) for t in free},
                                           self.config.param_ratio)
            for t in chosen:
                f, alpha = spectra.pop(t.label)
                outcome = self._factor(index, t, method, grams.get(t.label), f, alpha, allocated.get(t.label))
                if isinstance(outcome, str):
                    result.skipped[t.label] = outcome
                else:
                    result.layers[t.label] = outcome
        return self.finish(index, result)

    def _factor(self, index: GraphIndex, t: _Linear, method: str, stats: InputStats | None, f: Spectrum,
                alpha: float | None, allocated: int | None) -> LayerChoice | str:
        k, n = t.w.shape
        corrected = self.corrects_bias(method, stats)
        r = allocated if allocated is not None else self.matrix_rank(t.label, t.weight, k, n, f.s)
        new_params = svd_rank_params(k, n, r)
        if new_params >= k * n and self.config.skip_unprofitable:
            return f"rank {r} saves nothing: r*(K+N) = {new_params} >= K*N = {k * n} (K={k}, N={n})"
        m = matrix_choice(t.w, f, r, stats, method, corrected)
        choice = LayerChoice(
            node=t.label, op_type=t.node.op_type, weight=t.weight, shape=[k, n], form="svd", rank=r,
            method=method, params_before=k * n, params_after=new_params, macs_before=k * n,
            macs_after=new_params, weight_error=m.weight_error, output_error=m.output_error,
            weight_only_output_error=m.weight_only_output_error, energy_kept=energy_kept(f.s, r),
            bias_corrected=corrected, shrinkage=alpha)
        self._rewrite(index, t, m.u, m.v, m.delta)
        return choice

    def _rewrite(self, index: GraphIndex, t: _Linear, u: np.ndarray, v: np.ndarray,
                 delta: np.ndarray | None) -> None:
        node = t.node
        base = node.name or node.output[0]
        u_name = index.add_initializer(u.astype(t.dtype), f"{t.weight}_lowrank_U")
        v_name = index.add_initializer(v.astype(t.dtype), f"{t.weight}_lowrank_V")
        mid = index.unique_name(f"{base}{SVD_MARK}mid")
        first_name, second_name = index.unique_name(f"{base}{SVD_MARK}0"), index.unique_name(f"{base}{SVD_MARK}1")
        if t.trans_a:
            first = helper.make_node("Gemm", [t.act, u_name], [mid], name=first_name, transA=1)
        else:
            first = helper.make_node("MatMul", [t.act, u_name], [mid], name=first_name)
        dropped = [t.weight]
        out = node.output[0]
        extra: list[onnx.NodeProto] = []
        bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
        beta = float(attr(node, "beta", 1.0))
        if delta is not None and not np.any(delta):
            delta = None
        if delta is not None and bias is not None:
            c = index.constant(bias)
            if c is not None and beta != 0:  # C' = C + delta / beta (a new initializer: C may be shared)
                new_c = np.broadcast_to(c, np.broadcast_shapes(c.shape, delta.shape)) + delta / beta
                dropped.append(bias)
                bias = index.add_initializer(new_c.astype(c.dtype), f"{bias}_lowrank")
                delta = None
        elif delta is not None and node.op_type == "Gemm":  # Gemm without C: the correction becomes C
            bias, beta = index.add_initializer(delta.astype(t.dtype), f"{base}_lowrank_bias"), 1.0
            delta = None
        elif delta is not None and fold_into_following_add(index, node, delta):
            delta = None
        if delta is not None:  # no bias to fold into: an explicit Add
            out = index.unique_name(f"{base}{SVD_MARK}out")
            d_name = index.add_initializer(delta.astype(t.dtype), f"{base}_lowrank_bias")
            extra.append(helper.make_node("Add", [out, d_name], [node.output[0]],
                                          name=index.unique_name(f"{base}{SVD_MARK}bias")))
        if bias is not None:
            second = helper.make_node("Gemm", [mid, v_name, bias], [out], name=second_name, beta=beta)
        else:
            second = helper.make_node("MatMul", [mid, v_name], [out], name=second_name)
        self.replace_nodes(index, node, [first, second, *extra], dropped)
