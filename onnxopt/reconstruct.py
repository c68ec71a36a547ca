"""Layer-wise reconstruction of quantized weights (AdaRound, with an AdaQuant-style bias refit), in NumPy.

A layer is a batch of matrices ``W [B, O, K]`` (B groups of a grouped/depthwise conv; 1 otherwise) with one
scale and zero point per output row. The target is the float model's layer output ``y = W x_f`` (bias left
out); the candidate is the quantized weights on the inputs the *quantized* model gives the layer, ``x_q``, so
the rounding compensates the error of the layers before it instead of compounding it. The loss needs only

    E||W x_f - W~ x_q||^2 = E||y||^2 - 2 sum(W~ * C) + tr(W~ G W~^T),   C = E[y x_q^T],  G = E[x_q x_q^T]

accumulated over matching rows (conv output positions with their im2col patches), so the optimisation never
touches activation rows and the float model's inputs are never needed (its layer output already is W x_f + b).

AdaRound (Nagel et al. 2020): each weight rounds to ``floor(W/s) + h(V)`` with the rectified sigmoid ``h``;
Adam on the reconstruction loss plus ``lambda * sum(1 - |2h - 1|^beta)``, beta annealed 20 -> 2 so every ``h``
ends at 0 or 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ZETA, GAMMA = 1.1, -0.1


@dataclass
class LayerMoments:
    """Moments of one layer's quantized inputs ``x_q`` [K] and float outputs ``y`` [O] (bias excluded), per group."""

    gram: np.ndarray  # [B, K, K]  E[x_q x_q^T]
    cross: np.ndarray  # [B, O, K]  E[y x_q^T]
    power: float  # E||y||^2, summed over groups and outputs
    mean_x: np.ndarray  # [B, K]
    mean_y: np.ndarray  # [B, O]
    rows: int
    samples: int = 0


class Accumulator:
    """Running float64 sums over batches of matching rows: ``x`` [n, B * K] and ``y`` [n, B * O]."""

    def __init__(self, groups: int):
        self.groups = groups
        self.sums: dict[str, np.ndarray] | None = None
        self.power = 0.0
        self.rows = 0
        self.samples = 0

    def add(self, x: np.ndarray, y: np.ndarray, samples: int) -> None:
        n, g = x.shape[0], self.groups
        xq = x.reshape(n, g, -1).astype(np.float32, copy=False)
        yf = y.reshape(n, g, -1).astype(np.float32, copy=False)
        if g == 1:
            x2, y2 = xq[:, 0], yf[:, 0]
            gram, cross = (x2.T @ x2)[None], (y2.T @ x2)[None]
        else:  # batched BLAS over the groups
            xt, yt = np.ascontiguousarray(xq.transpose(1, 2, 0)), np.ascontiguousarray(yf.transpose(1, 2, 0))
            gram, cross = xt @ np.swapaxes(xt, 1, 2), yt @ np.swapaxes(xt, 1, 2)
        if self.sums is None:
            self.sums = {"gram": np.zeros(gram.shape), "cross": np.zeros(cross.shape),
                         "x": np.zeros(xq.shape[1:]), "y": np.zeros(yf.shape[1:])}
        self.sums["gram"] += gram
        self.sums["cross"] += cross
        self.sums["x"] += xq.sum(axis=0, dtype=np.float64)
        self.sums["y"] += yf.sum(axis=0, dtype=np.float64)
        self.power += float(np.einsum("ij,ij->", y, y, dtype=np.float64))
        self.rows += n
        self.samples += samples

    def moments(self) -> LayerMoments | None:
        if self.sums is None:
            return None
        n = max(self.rows, 1)
        s = self.sums
        return LayerMoments(s["gram"] / n, s["cross"] / n, self.power / n, s["x"] / n, s["y"] / n, self.rows,
                            self.samples)


def output_error(m: LayerMoments, wq: np.ndarray, db: np.ndarray | None = None) -> float:
    """E||(W x_f + b) - (W~ x_q + b~)||^2 summed over outputs, float64 (``db = b - b~`` [B, O])."""
    wq = wq.astype(np.float64)
    e = m.power - 2 * float(np.sum(wq * m.cross)) + _quad(wq, m.gram)
    if db is not None:
        e += 2 * float(np.sum(db * (m.mean_y - np.einsum("bok,bk->bo", wq, m.mean_x)))) + float(np.sum(db * db))
    return max(float(e), 0.0)


def output_power(m: LayerMoments, b: np.ndarray | None) -> float:
    """E||W x_f + b||^2 (the SQNR's signal)."""
    p = m.power
    if b is not None:
        p += 2 * float(np.sum(b * m.mean_y)) + float(np.sum(b * b))
    return p


def _quad(a: np.ndarray, g: np.ndarray) -> float:
    """sum_b tr(a_b g_b a_b^T), through BLAS (batched matmul)."""
    return float(np.sum((a @ g) * a))


def sqnr_db(signal: float, noise: float) -> float:
    return float("inf") if noise <= 0 else 10 * float(np.log10(max(signal, 1e-30) / noise))


def bias_refit(m: LayerMoments, wq: np.ndarray) -> np.ndarray:
    """The bias change ``b~ - b`` [B, O] that removes the mean output error (AdaQuant's bias correction):
    ``E[W x_f] - E[W~ x_q]``."""
    return m.mean_y - np.einsum("bok,bk->bo", wq.astype(np.float64), m.mean_x)


def adaround(m: LayerMoments, w: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, qmin: int, qmax: int, *,
             iters: int = 500, lam: float = 0.01, lr: float = 0.01, warmup: float = 0.2,
             damping: float = 0.0) -> np.ndarray:
    """Integer weights [B, O, K] (zero point included) minimising the output error of ``m`` with AdaRound.

    ``w`` [B, O, K] float, ``scale``/``zero_point`` [B, O]. The reconstruction term is normalised by its value
    at round-to-nearest so ``lam`` does not depend on the layer's scale; ``damping`` adds that fraction of the
    mean diagonal of the Gram matrix to it (few rows: a rank-deficient Gram would let the rounding overfit)."""
    w = w.astype(np.float32)
    s = scale.astype(np.float32)[..., None]
    z = zero_point.astype(np.float32)[..., None]
    gram = m.gram.astype(np.float32)
    if damping:
        k = gram.shape[-1]
        d = damping * np.trace(gram, axis1=1, axis2=2) / k
        gram = gram + d[:, None, None] * np.eye(k, dtype=np.float32)
    cross = m.cross.astype(np.float32)
    base = np.floor(w / s)
    lo, hi = qmin - z - base, qmax - z - base  # h is clipped to [lo, hi] in integer steps
    frac = np.clip(w / s - base, 0.01, 0.99)
    v = -np.log((ZETA - GAMMA) / (frac - GAMMA) - 1).astype(np.float32)

    rtn = s * (np.clip(np.round(w / s) + z, qmin, qmax) - z)
    # the rounding's own error at round-to-nearest, tr(D G D^T) for D = W~ - W, sets the loss's scale
    d_rtn = rtn - w
    norm = max(_quad(d_rtn, gram), 1e-30)
    n_w = w.size
    m1 = np.zeros_like(v)
    m2 = np.zeros_like(v)
    b1, b2, eps = 0.9, 0.999, 1e-8
    start = int(warmup * iters)
    for t in range(1, iters + 1):
        sig = 1 / (1 + np.exp(-v))
        raw = sig * (ZETA - GAMMA) + GAMMA
        h = np.clip(raw, 0, 1)
        wq = s * (base + np.clip(h, lo, hi))
        g_w = 2 * (wq @ gram - cross) / norm  # d loss / d W~
        inside = ((raw > 0) & (raw < 1) & (h >= lo) & (h <= hi)).astype(np.float32)
        g_v = g_w * s * inside * sig * (1 - sig) * (ZETA - GAMMA)
        if t > start:
            beta = 20 + (2 - 20) * (t - start) / max(iters - start, 1)
            u = 2 * h - 1
            g_reg = -beta * np.abs(u) ** (beta - 1) * np.sign(u) * 2  # d/dh of (1 - |2h-1|^beta)
            g_v = g_v + (lam / n_w) * g_reg * ((raw > 0) & (raw < 1)) * sig * (1 - sig) * (ZETA - GAMMA)
        m1 = b1 * m1 + (1 - b1) * g_v
        m2 = b2 * m2 + (1 - b2) * g_v * g_v
        v -= lr * (m1 / (1 - b1 ** t)) / (np.sqrt(m2 / (1 - b2 ** t)) + eps)
    h = (v >= 0).astype(np.float32)  # h(V) >= 0.5 exactly where V >= 0
    return np.clip(base + h + z, qmin, qmax)


def refine_scales(m: LayerMoments, q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, *, centred: bool,
                  limit: float = 0.25) -> np.ndarray:
    """Per output row, the scale [B, O] minimising the output error of the integer weights ``q`` (AdaQuant's
    scale step, closed form: ``s = u^T C / u^T G u`` for ``u = q - z``). ``centred``: the bias absorbs the mean
    error (it is refit afterwards), so the fit is on covariances. The change is bounded to ``1 +- limit``: a
    large move means the rounding was chosen for another scale."""
    u = (q - zero_point[..., None]).astype(np.float64)
    gram, cross = _covariances(m) if centred else (m.gram, m.cross)
    num = np.einsum("bok,bok->bo", u, cross)
    den = np.sum((u @ gram) * u, axis=2)
    s = scale.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        best = np.where(den > 0, num / den, s)
    ok = np.isfinite(best) & (best > 0)
    return np.where(ok, np.clip(best, s * (1 - limit), s * (1 + limit)), s)


def _covariances(m: LayerMoments) -> tuple[np.ndarray, np.ndarray]:
    """The Gram and cross moments with the means taken out (for fits whose bias absorbs the mean error)."""
    return (m.gram - m.mean_x[:, :, None] * m.mean_x[:, None, :],
            m.cross - m.mean_y[:, :, None] * m.mean_x[:, None, :])


def round_to_nearest(w: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    s = scale[..., None]
    return np.clip(np.round(w / s) + zero_point[..., None], qmin, qmax)


def dequant(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
    return (q - zero_point[..., None]) * scale[..., None]


def stages(deps: list[int]) -> list[list[int]]:
    """Layers (in graph order) grouped so that no layer of a group depends on another of the same group.

    ``deps[i]``: bit mask of the earlier layers whose outputs reach layer ``i``'s input. A group's statistics
    come from one pair of model runs; a layer must see its predecessors' final rounding, so a chain is one
    layer per group, while layers reading the same input (attention's Q/K/V) share one."""
    out: list[list[int]] = []
    members = 0
    for i, d in enumerate(deps):
        if not out or d & members:
            out.append([])
            members = 0
        out[-1].append(i)
        members |= 1 << i
    return out


def masked_refit(m: LayerMoments, w0: np.ndarray, keep: np.ndarray, damping: float, *, centred: bool
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Float weights on the support ``keep`` [B, O, K] (pruned zeros stay zero) fitting the float layer's output
    on the current model's inputs: per output row, ridge least squares towards the current weights ``w0``
    (a ridge towards zero would zero every direction the calibration rows do not span: a 1280-input
    classifier on 100 images). ``damping`` scales the ridge by the mean input power. ``centred``: the fit
    is on covariances, the bias taking the mean (returned as the bias change [B, O] that zeroes the mean error;
    zeros otherwise)."""
    b_, o_, k = w0.shape
    out = w0.astype(np.float64).copy()
    gram, cross = _covariances(m) if centred else (m.gram, m.cross)
    for b in range(b_):
        lam = damping * float(np.trace(gram[b])) / k
        if not lam > 0:  # no input power at all: nothing to fit
            continue
        for o in range(o_):
            s = np.flatnonzero(keep[b, o])
            if s.size == 0:
                continue
            a = gram[b][np.ix_(s, s)]
            a[np.diag_indices_from(a)] += lam
            rhs = cross[b, o, s] + lam * out[b, o, s]
            try:
                out[b, o, s] = np.linalg.solve(a, rhs)
            except np.linalg.LinAlgError:
                out[b, o, s] = np.linalg.lstsq(a, rhs, rcond=None)[0]
    delta = bias_refit(m, out) if centred else np.zeros((b_, o_))
    return out, delta
