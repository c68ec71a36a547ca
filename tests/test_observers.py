import math

import numpy as np
import pytest

from onnxopt.errors import OnnxoptError
from onnxopt.observers import (
    MIN_WIDTH,
    MSE,
    Entropy,
    MinMax,
    Percentile,
    kl_divergences,
    make_observer,
    mse_errors,
)

RNG = np.random.default_rng(1234)
GAUSS = RNG.standard_normal(1_000_000).astype(np.float32)


def _feed(obs, x, parts=10):
    for b in np.array_split(x, parts):
        obs.update(b)
    return obs


def test_minmax_exact_over_batches():
    x = RNG.uniform(-3, 7, (20, 5, 7)).astype(np.float32)
    o = MinMax("t")
    for b in x:
        o.update(b)
    assert o.range() == (float(x.min()), float(x.max()))
    assert (o.observed_min, o.observed_max) == (float(x.min()), float(x.max()))
    assert o.count == x.size
    r = o.tensor_range()
    assert (r.min, r.max, r.observer, r.note) == (float(x.min()), float(x.max()), "minmax", "")


@pytest.mark.parametrize("p", [99.0, 99.99])
def test_percentile_matches_numpy_within_one_bin(p):
    o = _feed(Percentile("t", percentile=p), GAUSS)
    lo, hi = o.range()
    ref_lo, ref_hi = np.percentile(GAUSS, [100 - p, p])
    assert abs(lo - ref_lo) <= o.bin_width
    assert abs(hi - ref_hi) <= o.bin_width
    assert o.observed_min == float(GAUSS.min()) and o.observed_max == float(GAUSS.max())


def test_percentile_100_is_minmax():
    o = _feed(Percentile("t", percentile=100), GAUSS[:10_000])
    assert o.range() == (float(GAUSS[:10_000].min()), float(GAUSS[:10_000].max()))


def test_rebinning_growing_ranges_keeps_every_count():
    # each batch widens the range: 0.01x, 0.1x, 1x, 5x the Gaussian, then one far outlier
    parts = [GAUSS[:1000] * 0.01, GAUSS[1000:20_000] * 0.1, GAUSS[20_000:300_000],
             GAUSS[300_000:] * 5, np.array([120.0], np.float32)]
    o = Percentile("t", num_bins=2048)
    widths = []
    for p in parts:
        o.update(p)
        widths.append(o.bin_width)
    allx = np.concatenate(parts)
    counts, edges = o.histogram()
    assert counts.size == 2048 and edges.size == 2049  # fixed memory
    assert counts.sum() == allx.size
    # every re-binning multiplied the width by an integer: old bins map onto new ones exactly
    for a, b in zip(widths, widths[1:], strict=False):
        assert abs(b / a - round(b / a)) < 1e-9
    assert widths[-1] > widths[0]
    # same as a one-shot histogram on the final bins (up to float rounding at bin edges)
    ref = np.histogram(allx, bins=edges)[0]
    assert np.abs(counts - ref).sum() <= 1e-4 * allx.size
    assert edges[0] <= allx.min() and edges[-1] > allx.max()


def test_histogram_always_spans_zero_and_folds_exactly():
    x = RNG.uniform(2.0, 3.0, 10_000).astype(np.float32)  # positive, far from 0
    o = Percentile("t")
    o.update(x)
    counts, edges = o.histogram()
    assert edges[0] <= 0 < edges[-1]
    folded, w = o.folded()
    assert folded.sum() == x.size and w == o.bin_width
    y = np.concatenate([x, -x])
    o2 = Percentile("t")
    o2.update(y)
    f2, w2 = o2.folded()
    ref = np.histogram(np.abs(y), bins=np.arange(f2.size + 1) * w2)[0]
    assert np.abs(f2 - ref).sum() <= 1e-3 * y.size  # float rounding at bin edges only


def test_leading_zero_batches_are_counted():
    o = Percentile("t")
    o.update(np.zeros(100, np.float32))
    o.update(np.ones(50, np.float32))
    counts, edges = o.histogram()
    assert counts.sum() == 150
    assert counts[np.searchsorted(edges, 0.0, side="right") - 1] == 100
    lo, hi = o.range()
    assert 0.0 <= lo <= o.bin_width and hi == 1.0


def _kl_reference(h, L):
    """Straight loop over candidates (the ORT/MXNet algorithm, even groups, no smoothing)."""
    h = np.asarray(h, float)
    out = []
    for i in range(L, h.size + 1):
        p = h[:i].copy()
        p[-1] += h[i:].sum()
        q = np.zeros(i)
        for j in range(L):
            s, e = math.ceil(j * i / L), math.ceil((j + 1) * i / L)
            nz = p[s:e] > 0
            if nz.any():
                q[s:e][nz] = h[s:e].sum() / nz.sum()
        if np.any((p > 0) & (q == 0)):
            out.append(np.inf)
            continue
        P, Q = p / p.sum(), q / q.sum()
        m = P > 0
        out.append(float(np.sum(P[m] * np.log(P[m] / Q[m]))))
    return np.array(out)


def test_kl_divergences_match_the_reference_loop():
    h = RNG.poisson(RNG.uniform(0, 50, 300)).astype(float)
    h[[5, 6, 100, 101, 102, 250]] = 0  # empty bins inside groups and at candidate edges
    i, kl = kl_divergences(h, 16)
    assert list(i) == list(range(16, 301))
    ref = _kl_reference(h, 16)
    finite = np.isfinite(ref)
    assert np.array_equal(finite, np.isfinite(kl))
    np.testing.assert_allclose(kl[finite], ref[finite], rtol=1e-9, atol=1e-12)


def test_entropy_clips_heavy_tails_between_3_sigma_and_max():
    outliers = (RNG.standard_normal(200) * 40).astype(np.float32)
    x = np.concatenate([GAUSS, outliers])
    o = _feed(Entropy("t"), x)
    lo, hi = o.range()
    amax = float(np.abs(x).max())
    assert lo == -hi  # symmetric for a signed tensor
    assert 3.0 < hi < 0.5 * amax


def test_entropy_non_negative_tensor_uses_zero_to_max():
    relu = np.maximum(GAUSS, 0)
    o = _feed(Entropy("t"), relu)
    lo, hi = o.range()
    assert lo == 0.0
    assert 3.0 < hi <= float(relu.max())


def test_mse_keeps_uniform_range_and_clips_laplace():
    u = RNG.uniform(-1, 1, 500_000).astype(np.float32)
    lo, hi = _feed(MSE("u"), u).range()
    assert hi >= 0.97 * float(u.max()) and lo <= 0.97 * float(u.min())
    lap = RNG.laplace(0, 1, 500_000).astype(np.float32)
    lo, hi = _feed(MSE("l"), lap).range()
    assert hi < 0.85 * float(np.abs(lap).max())
    assert 6 < hi < 13  # ACIQ: the MSE-optimal 8-bit clip of Laplace(b=1) is about 9.9


def test_mse_error_model_agrees_with_fake_quantization():
    lap = RNG.laplace(0, 1, 400_000).astype(np.float32)
    o = MSE("l")
    o.update(lap)
    h, w = o.folded()
    lo, hi = min(0.0, o.observed_min), max(0.0, o.observed_max)
    t, err = mse_errors(h, w, lo, hi, 8)
    x = lap.astype(np.float64)
    for frac in (0.3, 0.6, 0.9):
        k = int(frac * t.size)
        a, b = max(lo, -t[k]), min(hi, t[k])
        scale = (b - a) / 255
        zp = np.round(-a / scale)
        q = np.clip(np.round(x / scale) + zp, 0, 255)
        actual = np.mean(((q - zp) * scale - x) ** 2)
        assert err[k] == pytest.approx(actual, rel=0.15)


@pytest.mark.parametrize("kind", ["minmax", "percentile", "entropy", "mse"])
def test_nan_and_inf_raise_naming_the_tensor(kind):
    o = make_observer(kind, "conv1_out")
    o.update(np.ones(10, np.float32))
    with pytest.raises(OnnxoptError, match="'conv1_out'.*NaN"):
        o.update(np.array([1.0, np.nan], np.float32))
    with pytest.raises(OnnxoptError, match="'conv1_out'.*Inf"):
        o.update(np.array([1.0, -np.inf], np.float32))


@pytest.mark.parametrize("kind", ["minmax", "percentile", "entropy", "mse"])
@pytest.mark.parametrize(("value", "expected"), [(0.0, (0.0, MIN_WIDTH)), (3.0, (0.0, 3.0)), (-2.0, (-2.0, 0.0))])
def test_constant_tensor_fallback(kind, value, expected):
    o = make_observer(kind, "c")
    for _ in range(3):
        o.update(np.full((4, 4), value, np.float32))
    assert o.range() == expected
    r = o.tensor_range()
    assert "constant tensor" in r.note
    assert (r.observed_min, r.observed_max) == (value, value)


def test_float16_and_empty_batches():
    x = RNG.standard_normal(10_000).astype(np.float16)
    o = Percentile("h")
    o.update(x)
    o.update(np.zeros((0, 3), np.float16))
    assert o.count == x.size
    assert o.histogram()[0].sum() == x.size
    with pytest.raises(OnnxoptError, match="no values"):
        MinMax("never").range()
    with pytest.raises(OnnxoptError, match="float"):
        MinMax("ints").update(np.arange(3))
