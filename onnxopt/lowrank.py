"""Low-rank factorization: what the low-rank passes share (``lowrank-svd``, ``lowrank-tucker``).

The rank rules and their config, the spectra of (data-aware: output-weighted) weight matrices, rank
allocation under one parameter budget, the factors that keep a layer's outputs on calibration activations,
and the pass base class with selection and bookkeeping. See ``passes/lowrank_svd.py`` for the method.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
import onnx_ir as ir
from pydantic import Field, PositiveInt, model_validator

from onnxopt.activations import InputStats, collect_grams
from onnxopt.errors import OnnxoptError, PreconditionError
from onnxopt.graph import constant_tensor, drop_if_unused, replace_node
from onnxopt.pass_infra import Pass, PassConfig, PassResult

DEFAULT_RULE = ("param_ratio", 0.75)
ALLOC_FLOOR = 1e-3  # allocation: a relative squared error this small counts as done (see allocate_ranks)
FLOAT_TYPES = (ir.DataType.FLOAT16, ir.DataType.FLOAT, ir.DataType.DOUBLE)  # layers.FLOAT_DTYPES


def float_weight(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The tensor of a float initializer or ``Constant`` output (else None), for its shape and dtype: the
    layers ``layers.constant_weight`` accepts, without reading their values."""
    tensor = constant_tensor(value)
    return tensor if tensor is not None and tensor.dtype in FLOAT_TYPES else None


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


class LowRankPassBase(Pass):
    """Selection, rank rules and bookkeeping common to the low-rank passes."""

    def resolved_method(self) -> str:
        m = self.config.method  # type: ignore[attr-defined]
        if m is None:
            return "data-aware" if self.context.calibration is not None else "weight"
        return m

    def requires(self, model: ir.Model) -> None:
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

    @staticmethod
    def replace_nodes(old: ir.Node, new: list[ir.Node], output: ir.Value, dropped: list[ir.Value]) -> None:
        """Put ``new`` where ``old`` is (``output`` takes over ``old``'s output, name included) and drop the
        constants in ``dropped`` nothing reads any more."""
        graph = old.graph
        replace_node(old, new, [output])
        for value in dropped:
            drop_if_unused(graph, value)

    def corrects_bias(self, method: str, stats: InputStats | None) -> bool:
        return method == "data-aware" and stats is not None and self.config.bias_correction

    def choose(self, targets: list, result: LowRankResult) -> list:
        """The targets to factorize (the others go to ``result.skipped`` with the reason)."""
        self.check_map_keys({t.label for t in targets} | {t.weight for t in targets})
        chosen = []
        for t in targets:
            why = self.select(t.label, t.weight, t.shape)
            if why is None:
                chosen.append(t)
            else:
                result.skipped[t.label] = why
        return chosen

    def gather(self, model: ir.Model, chosen: list, request, result: LowRankResult) -> dict[str, InputStats]:
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

    def finish(self, result: LowRankResult) -> LowRankResult:
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


