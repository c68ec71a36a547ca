"""Streaming metrics, checked against values computed by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from onnxopt.metrics import AccuracyStats, OutputStats, fmt, json_safe, sqnr_db

TOL = dict(rel=0, abs=1e-12)


def one_shot(ref, cand):
    s = OutputStats()
    s.update(np.asarray(ref), np.asarray(cand))
    return s.result()


def test_hand_computed_2x2():
    # ref = [[1, 0], [0, 1]], cand = [[1, 0], [0, 2]]; errors 0, 0, 0, 1
    m = one_shot(np.array([[1, 0], [0, 1]], np.float32), np.array([[1, 0], [0, 2]], np.float32))
    assert m.kind == "float" and m.samples == 2 and m.elements == 4
    assert m.max_abs == pytest.approx(1.0, **TOL)
    assert m.mean_abs == pytest.approx(0.25, **TOL)
    assert m.cosine_mean == pytest.approx(1.0, **TOL)  # [0, 1] and [0, 2] point the same way
    assert m.cosine_min == pytest.approx(1.0, **TOL)
    assert m.sqnr_db == pytest.approx(10 * math.log10(2 / 1), **TOL)  # 3.0103 dB
    assert m.top1_agreement_pct == pytest.approx(100.0, **TOL)


def test_hand_computed_cosine_and_top1():
    ref = np.array([[3.0, 4.0], [1.0, 0.0], [1.0, 1.0]])
    cand = np.array([[4.0, 3.0], [-1.0, 0.0], [1.0, 1.0]])
    m = one_shot(ref, cand)
    # sample cosines: (12 + 12) / 25 = 0.96, -1, 1
    assert m.cosine_min == pytest.approx(-1.0, **TOL)
    assert m.cosine_mean == pytest.approx((0.96 - 1 + 1) / 3, **TOL)
    # argmax: ref [1, 0, 0] vs cand [0, 1, 0] (ties pick the first) -> 1 of 3 agree
    assert m.top1_agreement_pct == pytest.approx(100 / 3, **TOL)
    # errors: |3-4|, |4-3|, |1+1|, 0, 0, 0 -> max 2, mean 4/6
    assert m.max_abs == pytest.approx(2.0, **TOL)
    assert m.mean_abs == pytest.approx(4 / 6, **TOL)
    # sqnr: sum ref^2 = 25 + 1 + 2 = 28; sum err^2 = 1 + 1 + 4 = 6
    assert m.sqnr_db == pytest.approx(10 * math.log10(28 / 6), **TOL)


def test_cosine_zero_vectors():
    ref = np.array([[0.0, 0.0], [0.0, 0.0], [1.0, 2.0]])
    cand = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    s = OutputStats()
    s.update(ref, cand)
    m = s.result()
    # both zero -> 1.0; one zero -> 0.0 (twice)
    assert m.cosine_min == 0.0
    assert m.cosine_mean == pytest.approx(1 / 3, **TOL)


def test_cosine_flattens_each_sample():
    ref = np.ones((2, 2, 3))
    cand = np.ones((2, 2, 3))
    cand[1] *= -1
    m = one_shot(ref, cand)
    assert m.cosine_min == -1.0 and m.cosine_mean == 0.0
    assert m.top1_agreement_pct is None  # not a 2-D output


def test_sqnr_edge_cases():
    assert sqnr_db(4.0, 0.0) == math.inf
    assert sqnr_db(0.0, 1.0) == -math.inf
    assert sqnr_db(0.0, 0.0) == math.inf  # identical (both zero)
    assert math.isnan(sqnr_db(math.nan, 1.0))
    assert sqnr_db(100.0, 1.0) == pytest.approx(20.0, **TOL)
    m = one_shot(np.arange(6.0).reshape(2, 3), np.arange(6.0).reshape(2, 3))
    assert m.sqnr_db == math.inf and m.max_abs == 0.0


def test_top1_only_for_2d_with_more_than_one_class():
    assert one_shot(np.zeros((3, 1)), np.zeros((3, 1))).top1_agreement_pct is None
    assert one_shot(np.zeros(3), np.zeros(3)).top1_agreement_pct is None
    assert one_shot(np.zeros((3, 2)), np.zeros((3, 2))).top1_agreement_pct == 100.0


def test_scalar_output_is_one_sample():
    m = one_shot(np.float32(2.0), np.float32(2.5))
    assert m.samples == 1 and m.max_abs == 0.5


def test_streaming_equals_one_shot():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((10, 5))
    cand = ref + 0.01 * rng.standard_normal((10, 5))
    whole = one_shot(ref, cand)
    s = OutputStats()
    for a, b in ((0, 3), (3, 4), (4, 10)):
        s.update(ref[a:b], cand[a:b])
    parts = s.result()
    for attr in ("max_abs", "mean_abs", "cosine_mean", "cosine_min", "sqnr_db", "top1_agreement_pct"):
        assert getattr(parts, attr) == pytest.approx(getattr(whole, attr), rel=1e-12, abs=1e-12), attr
    # memory: only scalars are kept, however many batches went in
    for _ in range(50):
        s.update(ref, cand)
    assert all(not isinstance(v, (list, dict, np.ndarray)) for v in vars(s).values())


@settings(max_examples=30, deadline=None)
@given(
    hnp.arrays(np.float64, st.tuples(st.integers(1, 8), st.integers(2, 4)),
               elements=st.floats(-100, 100, allow_nan=False, allow_infinity=False)),
    st.integers(1, 7),
)
def test_streaming_split_property(ref, split):
    cand = ref * 0.9 + 0.1
    split = min(split, ref.shape[0])
    whole = one_shot(ref, cand)
    s = OutputStats()
    s.update(ref[:split], cand[:split])
    s.update(ref[split:], cand[split:])
    parts = s.result()
    assert parts.samples == whole.samples
    assert parts.max_abs == pytest.approx(whole.max_abs, rel=1e-9, abs=1e-9)
    assert parts.mean_abs == pytest.approx(whole.mean_abs, rel=1e-9, abs=1e-9)
    assert parts.cosine_min == pytest.approx(whole.cosine_min, rel=1e-9, abs=1e-9)
    assert parts.top1_agreement_pct == pytest.approx(whole.top1_agreement_pct, abs=1e-9)


def test_integer_outputs_get_exact_match():
    m = one_shot(np.array([1, 2, 3, 4], np.int64), np.array([1, 2, 0, 4], np.int64))
    assert m.kind == "exact" and m.exact_match_pct == 75.0
    assert m.max_abs is None and m.cosine_min is None
    b = one_shot(np.array([[True, False]]), np.array([[True, True]]))
    assert b.kind == "exact" and b.exact_match_pct == 50.0


def test_nan_propagates_and_is_counted():
    ref = np.array([[1.0, 2.0], [3.0, 4.0]])
    cand = np.array([[1.0, np.nan], [3.0, 4.0]])
    s = OutputStats()
    s.update(ref, cand)
    s.update(ref, ref)  # a later clean batch must not hide the NaN
    m = s.result()
    assert m.nonfinite_candidate == 1 and m.nan_candidate == 1
    assert math.isnan(m.max_abs) and math.isnan(m.mean_abs)
    assert math.isnan(m.cosine_min) and math.isnan(m.sqnr_db)


def test_inf_in_candidate_is_counted():
    m = one_shot(np.array([[1.0, 2.0]]), np.array([[1.0, np.inf]]))
    assert m.nonfinite_candidate == 1 and m.nan_candidate == 0
    assert m.max_abs == math.inf


def test_shape_mismatch_is_an_error_not_an_exception():
    s = OutputStats()
    s.update(np.zeros((2, 3)), np.zeros((2, 3)))
    s.update(np.zeros((2, 3)), np.zeros((2, 4)))
    m = s.result()
    assert m.error == "shape differs: candidate [2, 4] vs reference [2, 3] (after 2 samples)"
    assert m.max_abs is None


def test_accuracy_stats():
    acc = AccuracyStats()
    acc.update(np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]]), np.array([1, 1, 1]))  # 2 of 3
    acc.update(np.array([0, 1], np.int64), np.array([0, 0]))  # class ids: 1 of 2
    assert acc.result() == pytest.approx(60.0, **TOL)  # 3 of 5
    assert AccuracyStats().result() is None
    with pytest.raises(ValueError, match="2 predictions but 3 labels"):
        acc.update(np.zeros((2, 2)), np.zeros(3))


def test_json_safe_and_fmt():
    doc = json_safe({"a": math.inf, "b": -math.inf, "c": math.nan, "d": np.float32(1.5), "e": np.int64(3),
                     "f": (1, 2), "g": np.arange(2)})
    assert doc == {"a": "inf", "b": "-inf", "c": "nan", "d": 1.5, "e": 3, "f": [1, 2], "g": [0, 1]}
    json.dumps(doc, allow_nan=False)
    assert fmt(None) == "-" and fmt(math.inf) == "inf" and fmt(math.nan) == "nan"
    assert fmt(1.23456e-6) == "1.235e-06" and fmt(99.5) == "99.5" and fmt(3) == "3"
