"""Streaming range observers: what a calibration run measures per tensor.

Every observer is fed batch by batch (``update(array)``) and answers ``range() -> (lo, hi)``, the
clip range to quantize the tensor to, plus the exact ``observed_min``/``observed_max``. Memory
does not grow with the number of samples:

* ``MinMax`` keeps two floats.
* ``Percentile``, ``Entropy`` and ``MSE`` keep one histogram of ``num_bins`` counts (int64). Their
  ranges always contain 0, as any quantized range must (``MinMax`` reports the raw extremes).

The histogram
-------------
Bins have width ``w`` and are anchored at zero: absolute bin ``k`` covers ``[k*w, (k+1)*w)``, and
the histogram holds the ``num_bins`` consecutive bins ``start .. start+num_bins-1``. Its span
always contains 0 (a quantized range always does), so a non-negative tensor (ReLU, ReLU6) is
binned on ``[0, max]`` and a signed one folds exactly into a histogram of ``|x|`` (bin ``-k-1``
mirrors bin ``k``).

When a batch falls outside the span, the histogram is re-binned in place to a width ``r*w`` for
the smallest integer ``r`` that makes the new span fit: since both grids are anchored at zero,
old bin ``k`` lies entirely inside new bin ``floor(k / r)``, so counts move exactly and nothing
is re-estimated. Bin indices are computed with one multiply, one subtract and a float->int cast
into small reused buffers (cache-sized chunks), then counted with ``np.bincount`` - no sort,
no copy of the activation.

Non-finite values raise ``OnnxoptError`` naming the tensor. A tensor that only ever held one
value ``v`` gets the range ``[min(0, v), max(0, v)]`` (widened to ``MIN_WIDTH`` if that is still
narrower), and the reason is kept in ``note``.
"""

from __future__ import annotations

import math
import threading
from typing import ClassVar

import numpy as np

from onnxopt.errors import OnnxoptError
from onnxopt.ranges import TensorRange

# Width used when a tensor's range is empty (all zeros): at 8 bits its scale, 1/64/255, is still a
# normal float16 number (>= 2**-14), so a float16 QDQ model can store it.
MIN_WIDTH = 1.0 / 64
DEFAULT_BINS = 2048
_MIN_BIN_WIDTH = 1e-30  # keeps 1/w a finite float32; narrower spans are zeros for any quantizer
_CHUNK = 1 << 17  # elements binned per step: the scratch buffers (1 MB) stay in cache

_local = threading.local()


def _scratch() -> tuple[np.ndarray, np.ndarray]:
    """Per-thread scratch buffers (float32 + int32) for binning one chunk.

    int32 indices: float32 -> int32 converts much faster than float32 -> int64, which more than
    pays for the int32 -> intp conversion ``np.bincount`` does on its (cache-resident) input.
    """
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = (np.empty(_CHUNK, np.float32), np.empty(_CHUNK, np.int32))
        _local.bufs = bufs
    return bufs


def _flat(array) -> np.ndarray:
    a = np.asarray(array)
    if a.dtype.kind != "f":
        raise OnnxoptError(f"observers take float tensors (got {a.dtype})")
    return a.reshape(-1)  # a view when contiguous (activations from ORT always are)


class Observer:
    """Base: tracks exact min/max and the number of values; subclasses choose the clip range."""

    kind: ClassVar[str] = ""

    def __init__(self, name: str = "tensor"):
        self.name = name
        self.count = 0
        self._min = math.inf
        self._max = -math.inf
        self.note = ""

    # --- feeding ---------------------------------------------------------------------------
    def update(self, array) -> None:
        """Observe one batch of values (any shape, float dtype)."""
        flat = _flat(array)
        if flat.size == 0:
            return
        mn, mx = self._minmax(flat)
        self._observe(flat, mn, mx)

    def _minmax(self, flat: np.ndarray) -> tuple[float, float]:
        mn, mx = float(flat.min()), float(flat.max())
        if not (math.isfinite(mn) and math.isfinite(mx)):
            what = "NaN" if math.isnan(mn) or math.isnan(mx) else "Inf"
            bad = int(np.count_nonzero(~np.isfinite(flat)))
            raise OnnxoptError(f"tensor {self.name!r} contains {what} ({bad} non-finite value(s) in this batch); "
                               "cannot calibrate a range for it")
        self.count += flat.size
        self._min = min(self._min, mn)
        self._max = max(self._max, mx)
        return mn, mx

    def _observe(self, flat: np.ndarray, mn: float, mx: float) -> None:
        """Subclass hook: ``flat`` is finite and its min/max are already recorded."""

    # --- results ---------------------------------------------------------------------------
    @property
    def observed_min(self) -> float:
        return self._min

    @property
    def observed_max(self) -> float:
        return self._max

    def range(self) -> tuple[float, float]:
        """The clip range ``(lo, hi)``; sets ``note`` when a fallback was used."""
        if self.count == 0:
            raise OnnxoptError(f"tensor {self.name!r}: no values observed")
        self.note = ""
        mn, mx = self._min, self._max
        if mn == mx:
            lo, hi = min(0.0, mn), max(0.0, mx)
            if hi - lo < MIN_WIDTH:
                lo, hi = (lo, lo + MIN_WIDTH) if mn >= 0 else (hi - MIN_WIDTH, hi)
                self.note = f"constant tensor (always {mn:g}): range widened to [{lo:g}, {hi:g}]"
            else:
                self.note = f"constant tensor (always {mn:g}): range [{lo:g}, {hi:g}] includes 0"
            return lo, hi
        lo, hi = self._choose()
        if not hi > lo:
            chosen = f"[{lo:g}, {hi:g}]"
            lo, hi = min(0.0, mn), max(0.0, mx)
            self.note = f"{self.kind} chose an empty range {chosen}; used min/max [{lo:g}, {hi:g}]"
        return lo, hi

    def _choose(self) -> tuple[float, float]:
        raise NotImplementedError

    def tensor_range(self) -> TensorRange:
        lo, hi = self.range()
        return TensorRange(min=float(lo), max=float(hi), observed_min=float(self._min),
                           observed_max=float(self._max), observer=self.kind, note=self.note)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, n={self.count}, min={self._min:g}, max={self._max:g})"


class MinMax(Observer):
    """The exact observed range. No histogram."""

    kind = "minmax"

    def _choose(self) -> tuple[float, float]:
        return self._min, self._max


class HistogramObserver(Observer):
    """A streamed, zero-anchored histogram of ``num_bins`` bins (see the module docstring)."""

    def __init__(self, name: str = "tensor", num_bins: int = DEFAULT_BINS):
        super().__init__(name)
        if not 16 <= num_bins <= 1 << 22:
            raise ValueError(f"num_bins must be in [16, 2**22] (got {num_bins})")
        self.num_bins = num_bins
        self._counts: np.ndarray | None = None  # int64[num_bins], once the span is non-empty
        self._w = 0.0  # bin width
        self._start = 0  # absolute index of the first bin (always <= 0)
        self._zeros = 0  # values seen while every value so far was 0 (no span to bin them on yet)

    # --- feeding ---------------------------------------------------------------------------
    def _observe(self, flat: np.ndarray, mn: float, mx: float) -> None:
        lo, hi = min(0.0, mn), max(0.0, mx)
        if self._counts is None:
            if lo == hi:  # all zeros so far
                self._zeros += flat.size
                return
            self._init(lo, hi)
        elif lo < self._start * self._w or hi >= (self._start + self.num_bins) * self._w:
            self._widen(lo, hi)
        self._accumulate(flat)

    def _init(self, lo: float, hi: float) -> None:
        B = self.num_bins
        w = max((hi - lo) / (B - 1), _MIN_BIN_WIDTH)
        while math.floor(hi / w) - math.floor(lo / w) > B - 1:  # float rounding at the edges
            w *= 1 + 1e-6
        self._w = w
        self._start = math.floor(lo / w)
        self._counts = np.zeros(B, np.int64)
        if self._zeros:
            self._counts[-self._start] += self._zeros  # the zeros seen earlier go to absolute bin 0
            self._zeros = 0

    def _widen(self, lo: float, hi: float) -> None:
        """Re-bin to width ``r*w`` (smallest integer r that fits); old bins map exactly onto new ones."""
        B, w, start = self.num_bins, self._w, self._start
        a_lo = min(math.floor(lo / w), start)
        a_hi = max(math.floor(hi / w), start + B - 1)
        r = max(2, -(-(a_hi - a_lo + 1) // B))
        while a_hi // r - a_lo // r + 1 > B:
            r += 1
        new_start = a_lo // r
        # Python ints: r can exceed int64 when a range explodes (1e-30 then 1e30)
        idx = np.fromiter(((k // r) - new_start for k in range(start, start + B)), np.intp, B)
        counts = np.zeros(B, np.int64)
        np.add.at(counts, idx, self._counts)
        self._counts = counts
        self._w = w * r
        self._start = new_start

    def _accumulate(self, flat: np.ndarray) -> None:
        B = self.num_bins
        inv = np.float32(1.0 / self._w)
        off = np.float32(self._start)
        fbuf, ibuf = _scratch()
        counts = self._counts
        for s in range(0, flat.size, _CHUNK):
            x = flat[s:s + _CHUNK]
            n = x.size
            f, i = fbuf[:n], ibuf[:n]
            np.multiply(x, inv, out=f, casting="unsafe")  # float16/float64 in, float32 out
            np.subtract(f, off, out=f)
            np.copyto(i, f, casting="unsafe")  # truncation == floor: f >= 0 up to rounding
            c = np.bincount(i, minlength=B + 1)
            counts += c[:B]
            counts[B - 1] += c[B:].sum()  # a value exactly on the top edge (rounding)

    # --- reading ---------------------------------------------------------------------------
    @property
    def bin_width(self) -> float:
        return self._w

    def histogram(self) -> tuple[np.ndarray, np.ndarray]:
        """(counts, edges) of the signed histogram; empty when every value observed was 0."""
        if self._counts is None:
            return np.zeros(0, np.int64), np.zeros(0)
        edges = (self._start + np.arange(self.num_bins + 1)) * self._w
        return self._counts.copy(), edges

    def folded(self) -> tuple[np.ndarray, float]:
        """(counts of ``|x|`` on ``[0, F*w)``, w): the histogram folded at 0 (exact: bins are anchored at 0)."""
        if self._counts is None:
            return np.zeros(1, np.float64), MIN_WIDTH
        B, start, c = self.num_bins, self._start, self._counts
        neg = -start  # bins below zero (start <= 0 < start + B)
        f = np.zeros(max(neg, start + B), np.float64)
        f[: start + B] += c[neg:]
        f[:neg] += c[:neg][::-1]
        return f, self._w

    def _bounds(self) -> tuple[float, float]:
        """Observed range widened to include 0: every clip range lies within it."""
        return min(0.0, self._min), max(0.0, self._max)

    def _clip_to(self, t: float) -> tuple[float, float]:
        """Range for threshold ``t`` on ``|x|``: [-t, t], never wider than what was observed."""
        lo, hi = self._bounds()
        return max(lo, -t), min(hi, t)


class Percentile(HistogramObserver):
    """``[q(100-p), q(p)]``: the two percentiles, interpolated linearly within a bin, widened to include 0."""

    kind = "percentile"

    def __init__(self, name: str = "tensor", num_bins: int = DEFAULT_BINS, percentile: float = 99.99):
        super().__init__(name, num_bins)
        if not 50 < percentile <= 100:
            raise ValueError(f"percentile must be in (50, 100] (got {percentile})")
        self.percentile = percentile

    def quantile(self, q: float) -> float:
        """Value below which a fraction ``q`` of the observed values lie (from the histogram)."""
        counts, edges = self.histogram()
        if counts.size == 0:
            return 0.0
        cum = np.cumsum(counts)
        target = q * cum[-1]
        k = min(int(np.searchsorted(cum, target, side="left")), counts.size - 1)
        before = cum[k - 1] if k > 0 else 0
        frac = (target - before) / counts[k] if counts[k] else 0.0
        v = float(edges[k] + frac * self._w)
        return min(max(v, self._min), self._max)

    def _choose(self) -> tuple[float, float]:
        p = self.percentile / 100.0
        return min(0.0, self.quantile(1.0 - p)), max(0.0, self.quantile(p))


def _cumsum0(a: np.ndarray) -> np.ndarray:
    out = np.zeros(a.size + 1, np.float64)
    np.cumsum(a, out=out[1:])
    return out


def kl_divergences(hist: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """KL(P || Q) for every threshold candidate of the TensorRT entropy calibration, vectorised.

    ``hist`` is a histogram on ``[0, F*w)``. For a candidate keeping the first ``i`` bins
    (``levels <= i <= F``), P is ``hist[:i]`` with the outliers ``hist[i:]`` added to its last bin,
    and Q merges ``hist[:i]`` into ``levels`` groups (group ``j`` holds bins
    ``ceil(j*i/levels) .. ceil((j+1)*i/levels) - 1``, as NVIDIA's pytorch-quantization does) and
    spreads each group's count evenly over the bins of the group where P is non-zero. Both are
    normalised. Returns ``(i, kl)``; ``kl`` is ``inf`` where Q is 0 but P is not.

    Per candidate this is O(levels) with prefix sums instead of the reference's O(F) loop.
    """
    h = np.asarray(hist, np.float64)
    F, L = h.size, int(levels)
    total = h.sum()
    if F <= L or total <= 0:
        return np.array([F]), np.zeros(1)
    i = np.arange(L, F + 1)
    C = _cumsum0(h)
    Z = _cumsum0((h > 0).astype(np.float64))
    pos = h > 0
    hlogh = np.zeros(F)
    hlogh[pos] = h[pos] * np.log(h[pos])
    PL = _cumsum0(hlogh)

    bounds = (np.arange(L + 1)[None, :] * i[:, None] + L - 1) // L  # ceil(j*i/L), (candidates, L+1)
    s, e = bounds[:, :-1], bounds[:, 1:]
    S = C[e] - C[s]  # counts per group (outliers not included)
    nz = Z[e] - Z[s]  # bins with P > 0 per group
    tail = total - C[i]
    last = h[i - 1]
    nz[:, -1] += (tail > 0) & (last == 0)
    pmass = S.copy()
    pmass[:, -1] += tail

    p_last = last + tail
    sum_plogp = PL[i - 1] + np.where(p_last > 0, p_last * np.log(np.where(p_last > 0, p_last, 1.0)), 0.0)
    ok = (nz > 0) & (S > 0)
    logq = np.zeros_like(S)
    logq[ok] = np.log(S[ok] / nz[ok])
    sum_plogq = (pmass * logq).sum(axis=1)
    broken = ((nz > 0) & (S <= 0)).any(axis=1)
    with np.errstate(divide="ignore"):
        kl = sum_plogp / total - np.log(total) - sum_plogq / total + np.log(C[i])
    kl[broken] = np.inf
    return i, kl


class Entropy(HistogramObserver):
    """TensorRT-style KL calibration on the histogram of ``|x|`` (of ``x`` on ``[0, max]`` when non-negative).

    The threshold ``t`` minimises KL(P||Q) (``kl_divergences``) between the histogram and its
    quantization to ``levels`` levels: by default those the tensor really gets at ``bits`` bits,
    ``2**(bits-1)`` per side for a signed tensor quantized on ``[-t, t]`` (128 at 8 bits) and
    ``2**bits`` for a non-negative one on ``[0, t]`` (256), as in NVIDIA's pytorch-quantization.
    Like there, the count of the first bin (the spike of exact zeros after a ReLU) is replaced by
    its neighbour's before comparing, so the zeros - which quantize exactly - do not pull the
    threshold down. The range is ``[-t, t]`` or ``[0, t]``, narrowed to the observed extremes.
    """

    kind = "entropy"

    def __init__(self, name: str = "tensor", num_bins: int = DEFAULT_BINS, bits: int = 8, levels: int | None = None):
        super().__init__(name, num_bins)
        if not 2 <= bits <= 16:
            raise ValueError(f"bits must be in [2, 16] (got {bits})")
        if levels is not None and levels < 2:
            raise ValueError(f"levels must be at least 2 (got {levels})")
        self.bits = bits
        self.levels = levels

    def threshold(self) -> float:
        h, w = self.folded()
        if h.size > 1:
            h[0] = h[1]
        levels = self.levels or (1 << (self.bits - (1 if self._min < 0 else 0)))
        i, kl = kl_divergences(h, levels)
        if not np.isfinite(kl).any():
            return h.size * w
        return float(i[int(np.argmin(kl))]) * w

    def _choose(self) -> tuple[float, float]:
        return self._clip_to(self.threshold())


def mse_errors(hist: np.ndarray, w: float, lo: float, hi: float, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Expected squared error per value for every threshold ``t = i*w`` on a histogram of ``|x|``.

    The range for ``t`` is ``[max(lo, -t), min(hi, t)]`` (``lo <= 0 <= hi``: the observed range
    with 0), quantized to ``2**bits - 1`` steps of ``d``. Values beyond ``t`` cost ``(|x| - t)**2``;
    values inside cost ``d**2 / 12`` (uniform rounding noise), except those within ``d/2`` of 0,
    which round to 0 exactly and cost ``x**2`` (this keeps the zeros of a ReLU output free).
    Bin contents are taken at their centres. Returns ``(t, error)``, all prefix sums: O(bins).
    """
    h = np.asarray(hist, np.float64)
    F = h.size
    i = np.arange(1, F + 1)
    t = i * w
    c = (np.arange(F) + 0.5) * w
    P0, P1, P2 = _cumsum0(h), _cumsum0(h * c), _cumsum0(h * c * c)
    d = (np.minimum(hi, t) - np.maximum(lo, -t)) / (2**bits - 1)
    k = np.clip(np.ceil(d / (2 * w) - 0.5), 0, i).astype(np.intp)  # bins with centre < d/2
    inside = P2[k] + (w * w / 12) * P0[k] + (d * d / 12) * (P0[i] - P0[k])
    clipped = (P2[-1] - P2[i]) - 2 * t * (P1[-1] - P1[i]) + t * t * (P0[-1] - P0[i])
    total = max(P0[-1], 1.0)
    return t, np.maximum(inside + clipped, 0.0) / total


class MSE(HistogramObserver):
    """The clip range minimising expected quantization + clipping MSE at ``bits`` bits (see ``mse_errors``)."""

    kind = "mse"

    def __init__(self, name: str = "tensor", num_bins: int = DEFAULT_BINS, bits: int = 8):
        super().__init__(name, num_bins)
        if not 2 <= bits <= 16:
            raise ValueError(f"bits must be in [2, 16] (got {bits})")
        self.bits = bits

    def threshold(self) -> float:
        h, w = self.folded()
        lo, hi = self._bounds()
        t, err = mse_errors(h, w, lo, hi, self.bits)
        return float(t[int(np.argmin(err))])

    def _choose(self) -> tuple[float, float]:
        return self._clip_to(self.threshold())


OBSERVERS: dict[str, type[Observer]] = {c.kind: c for c in (MinMax, Percentile, Entropy, MSE)}


def make_observer(kind: str, name: str = "tensor", *, num_bins: int = DEFAULT_BINS, percentile: float = 99.99,
                  bits: int = 8) -> Observer:
    """An observer by kind, taking only the parameters that apply to it."""
    if kind == "minmax":
        return MinMax(name)
    if kind == "percentile":
        return Percentile(name, num_bins, percentile)
    if kind == "entropy":
        return Entropy(name, num_bins, bits)
    if kind == "mse":
        return MSE(name, num_bins, bits)
    raise ValueError(f"unknown observer {kind!r} (choose: {', '.join(OBSERVERS)})")
