import numpy as np
import pytest
from helpers import init, make_model, ort_run, rand, run, vi
from onnx import helper, numpy_helper
from onnxopt.passes.share_weights import ShareWeights, ShareWeightsConfig, ShareWeightsResult, kmeans_1d

from onnxopt import compression
from onnxopt.errors import PassError, PreconditionError

node = helper.make_node


def qdq_model(seed=0, zero_point=0, dtype=np.int8):
    """x[B,32] @ DequantizeLinear(q [32,24], per-column scale, axis 1) -> y, half the weights at the zero point."""
    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype)
    q = np.clip(np.rint(rng.standard_normal((32, 24)) * 30) + zero_point, info.min, info.max)
    q[rng.random(q.shape) < 0.5] = zero_point
    scale = (0.01 + 0.02 * rng.random(24)).astype(np.float32)
    nodes = [node("DequantizeLinear", ["q", "s", "zp"], ["w"], name="dq", axis=1),
             node("MatMul", ["x", "w"], ["y"], name="mm")]
    return make_model(nodes, [vi("x", ["B", 32])], [vi("y", ["B", 24])],
                      [init("q", q.astype(dtype)), init("s", scale), init("zp", np.full(24, zero_point, dtype))])


def values(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("dtype,zero_point", [(np.int8, 0), (np.uint8, 128)])
def test_codebook_of_2_to_the_bits_values_zero_point_exact(dtype, zero_point):
    model = qdq_model(zero_point=zero_point, dtype=dtype)
    out = run(model, ShareWeights(ShareWeightsConfig(bits=3)))
    res = out.results[0]
    assert isinstance(res, ShareWeightsResult)
    before, after = values(model)["q"], values(out.model)["q"]
    assert after.dtype == before.dtype and after.shape == before.shape
    np.testing.assert_array_equal(after == zero_point, before == zero_point)  # pruned stay pruned, kept stay kept
    assert len(np.unique(after)) <= 8 and res.details["tensors"]["q"]["distinct_after"] == len(np.unique(after))
    # every kept value moved to its nearest centroid: at most half the gap to the next centroid
    cents = np.unique(after[after != zero_point]).astype(int)
    moved = np.abs(after.astype(int) - before.astype(int))[after != zero_point]
    assert moved.max() <= np.diff(cents).max()
    rel = res.tensors["q"].rel_error
    assert 0 < rel < 0.3  # Lloyd-Max with 8 levels on a Gaussian: ~0.19 of the norm
    # numbers: ORT on the shared model equals numpy with the dequantized shared weights
    s = values(model)["s"]
    x = rand(5, 32, seed=3)
    w = (after.astype(np.float64) - zero_point) * s
    np.testing.assert_allclose(ort_run(out.model, {"x": x})[0], x @ w, rtol=1e-5, atol=1e-5)
    # and the reported error is the weights' relative change
    w0 = (before.astype(np.float64) - zero_point) * s
    assert rel == pytest.approx(np.linalg.norm(w - w0) / np.linalg.norm(w0), rel=1e-6)
    # entropy coding pays for the smaller alphabet
    sizes = [compression.size_report(m, use_lzma=False, zstd=False)["total_coded_bytes"] for m in (model, out.model)]
    assert sizes[1] < sizes[0]


def test_kmeans_is_weighted_and_never_returns_zero():
    v = np.array([-3, -2, -1, 1, 2, 50, 51])
    c = kmeans_1d(v, np.ones(len(v)), 3, 50)
    assert 0 not in c and len(c) <= 3 and 50 <= c.max() <= 51
    # weights pull the centroid: almost all mass on 51
    c2 = kmeans_1d(np.array([50, 51]), np.array([1e-6, 1.0]), 1, 50)
    assert list(c2) == [51]
    assert list(kmeans_1d(np.array([4, -4, 4]), np.ones(3), 7, 5)) == [-4, 4]  # fewer levels than k: kept


def test_small_tensors_left_and_float_models_refused():
    model = qdq_model()
    out = run(model, ShareWeights(ShareWeightsConfig(bits=2, min_elements=10_000)))
    assert not out.results[0].modified
    np.testing.assert_array_equal(values(out.model)["q"], values(model)["q"])
    plain = make_model([node("MatMul", ["x", "w"], ["y"], name="mm")], [vi("x", ["B", 4])], [vi("y", ["B", 2])],
                       [init("w", rand(4, 2))])
    with pytest.raises(PassError) as exc:
        run(plain, ShareWeights(ShareWeightsConfig()))
    assert isinstance(exc.value.__cause__, PreconditionError) and "quantize-qdq" in str(exc.value.__cause__)
