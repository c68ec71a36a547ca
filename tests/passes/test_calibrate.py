import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxopt.passes.calibrate import Calibrate, CalibrateConfig

import onnxopt.activations as activations_mod
from onnxopt.activations import select_tensors
from onnxopt.data import from_arrays
from onnxopt.errors import DataError, OnnxoptError, PassError
from onnxopt.pass_infra import PassContext, PassManager
from onnxopt.ranges import CalibrationResult
from onnxopt.registry import get_pass_class
from onnxopt.runtime import make_session

ACTIVATIONS = {"x", "conv", "relu", "mm", "y"}


def _model(sqrt: bool = False) -> onnx.ModelProto:
    """x -> Conv -> Relu -> MatMul -> Add(bias computed from constants) -> y."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((2, 1, 3, 3)).astype(np.float32), "w")
    m = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "m")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Sqrt" if sqrt else "Relu", ["conv"], ["relu"]),
        helper.make_node("MatMul", ["relu", "m"], ["mm"]),
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.float32([0.5]), "cv")),
        helper.make_node("Mul", ["c", "c"], ["bias"]),  # float, but computed from constants only
        helper.make_node("Add", ["mm", "bias"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 4, 3])],
        [w, m],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _data(model, n=40, seed=1, scale=1.0):
    x = (np.random.default_rng(seed).standard_normal((n, 1, 4, 4)) * scale).astype(np.float32)
    return x, from_arrays({"x": x}, model)


def _run(model, source, tmp_path, **cfg):
    ctx = PassContext(calibration=source, cache_dir=tmp_path)
    return Calibrate(CalibrateConfig(**cfg), ctx)(model)


@pytest.fixture
def sessions(monkeypatch):
    """Counts the ORT sessions the pass creates (a cache hit must create none)."""
    made = []

    def counting(*args, **kwargs):
        made.append(kwargs.get("opt_level"))
        return make_session(*args, **kwargs)

    monkeypatch.setattr(activations_mod, "make_session", counting)
    return made


def _reference_minmax(model, x, batch_size):
    """Min/max of every activation, computed with numpy on ORT's outputs for the same batches."""
    exposed = activations_mod.exposed(model, ["conv", "relu", "mm", "y"])
    sess = make_session(exposed, opt_level="basic")
    outs = [sess.run(["conv", "relu", "mm", "y"], {"x": x[i:i + batch_size]}) for i in range(0, len(x), batch_size)]
    ref = {"x": (float(x.min()), float(x.max()))}
    for k, name in enumerate(["conv", "relu", "mm", "y"]):
        ref[name] = (min(float(o[k].min()) for o in outs), max(float(o[k].max()) for o in outs))
    return ref


def test_registered_and_config_defaults():
    assert get_pass_class("calibrate") is Calibrate
    cfg = CalibrateConfig()
    assert (cfg.type, cfg.percentile, cfg.num_bins, cfg.batch_size, cfg.cache) == ("calibrate", 99.99, 2048, 16, True)
    assert cfg.max_samples is None and cfg.tensors is None
    assert Calibrate.needs == frozenset({"calibration"})


def test_selects_float_activations_not_constants():
    assert set(select_tensors(_model())) == ACTIVATIONS  # not w, m, c, bias


def test_minmax_ranges_equal_numpy_through_ort(tmp_path, sessions):
    model = _model()
    before = model.SerializeToString()
    x, source = _data(model)
    result = _run(model, source, tmp_path, observer="minmax", batch_size=16)
    assert isinstance(result, CalibrationResult)
    assert result.modified is False
    assert model.SerializeToString() == before  # input model untouched
    assert result.model.SerializeToString() == before
    assert set(result.ranges) == ACTIVATIONS
    ref = _reference_minmax(model, x, 16)
    # The pass runs ORT at level "all" (fast kernels); exposed outputs are never fused away, so
    # the values are the unfused ones of level "basic" up to float rounding.
    for name, r in result.ranges.items():
        np.testing.assert_allclose((r.observed_min, r.observed_max), ref[name], rtol=1e-5, atol=1e-6, err_msg=name)
        assert (r.min, r.max) == (r.observed_min, r.observed_max), name
        assert r.observer == "minmax"
    assert result.ranges["relu"].min == 0.0
    assert result.ranges["conv"].min < 0.0  # the Conv's own output, not Conv+Relu fused
    d = result.details
    assert (d["tensors"], d["samples"], d["observer"], d["cache_hit"]) == (5, 40, "minmax", False)
    assert sessions == ["all"]


@pytest.mark.parametrize("observer", ["percentile", "entropy", "mse"])
def test_histogram_observers_give_ranges_inside_observed(tmp_path, observer):
    model = _model()
    _, source = _data(model, n=64)
    result = _run(model, source, tmp_path, observer=observer, cache=False)
    assert set(result.ranges) == ACTIVATIONS
    for name, r in result.ranges.items():
        assert min(0.0, r.observed_min) <= r.min < r.max <= max(0.0, r.observed_max), name
        assert r.observer == observer
    assert result.ranges["relu"].min == 0.0
    assert result.details["cache"] == "disabled"


def test_cache_hit_skips_the_model(tmp_path, sessions):
    model = _model()
    _, source = _data(model)
    first = _run(model, source, tmp_path, observer="entropy")
    assert first.details["cache"] == "miss" and len(sessions) == 1
    files = list((tmp_path / "ranges").glob("*.json"))
    assert len(files) == 1
    second = _run(model, source, tmp_path, observer="entropy")
    assert len(sessions) == 1  # the model did not run again
    assert second.details["cache_hit"] is True and second.details["cache"] == "hit"
    assert second.ranges == first.ranges
    assert second.details["samples"] == first.details["samples"]


def test_cache_misses_when_config_or_data_change(tmp_path, sessions):
    model = _model()
    _, source = _data(model)
    _run(model, source, tmp_path, observer="percentile")
    _run(model, source, tmp_path, observer="percentile", percentile=99.9)  # config
    _, other = _data(model, seed=2)
    third = _run(model, other, tmp_path, observer="percentile")  # data content
    assert len(sessions) == 3 and third.details["cache_hit"] is False
    fourth = _run(model, source, tmp_path, observer="percentile", max_samples=20)  # fewer samples
    assert len(sessions) == 4 and fourth.details["samples"] == 20
    changed = _model()
    changed.graph.initializer[1].CopyFrom(numpy_helper.from_array(np.ones((4, 3), np.float32), "m"))
    _run(changed, source, tmp_path, observer="percentile")  # model bytes
    assert len(sessions) == 5
    assert len(list((tmp_path / "ranges").glob("*.json"))) == 5


def test_corrupt_cache_entry_is_ignored_and_rewritten(tmp_path, sessions):
    model = _model()
    _, source = _data(model)
    first = _run(model, source, tmp_path)
    (entry,) = (tmp_path / "ranges").glob("*.json")
    entry.write_text('{"version": 1, "key": "trunc')
    second = _run(model, source, tmp_path)
    assert len(sessions) == 2
    assert second.details["cache"] == "miss (rewrote corrupt entry)"
    assert second.ranges == first.ranges
    assert json.loads(entry.read_text())["ranges"].keys() == first.ranges.keys()
    assert not [p for p in (tmp_path / "ranges").iterdir() if p.name.endswith(".tmp")]
    _run(model, source, tmp_path)
    assert len(sessions) == 2


def test_default_cache_dir_follows_xdg(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    model = _model()
    _, source = _data(model, n=8)
    Calibrate(CalibrateConfig(observer="minmax"), PassContext(calibration=source))(model)
    assert len(list((tmp_path / "xdg" / "onnxopt" / "ranges").glob("*.json"))) == 1


def test_explicit_tensors_and_unknown_names(tmp_path):
    model = _model()
    _, source = _data(model, n=8)
    result = _run(model, source, tmp_path, observer="minmax", tensors=["relu", "x"], cache=False)
    assert set(result.ranges) == {"relu", "x"}
    with pytest.raises(OnnxoptError, match="no tensor 'rleu'.*did you mean 'relu'"):
        _run(model, source, tmp_path, tensors=["rleu"], cache=False)
    with pytest.raises(OnnxoptError, match="'w' is an initializer"):
        _run(model, source, tmp_path, tensors=["w"], cache=False)


def test_nan_activation_names_the_tensor(tmp_path):
    model = _model(sqrt=True)  # sqrt of negative conv outputs
    _, source = _data(model, n=8)
    with pytest.raises(OnnxoptError, match="'relu' contains NaN.*batch starting at sample 0"):
        _run(model, source, tmp_path, observer="minmax", cache=False)


def test_nan_in_a_later_batch_names_that_batch(tmp_path):
    model = _model(sqrt=True)
    x = np.zeros((40, 1, 4, 4), np.float32)  # sqrt(conv(0)) = 0 ...
    x[20] = np.random.default_rng(3).standard_normal((1, 4, 4))  # ... except in sample 20
    with pytest.raises(OnnxoptError, match="'relu' contains NaN.*batch starting at sample 16"):
        _run(model, from_arrays({"x": x}, model), tmp_path, observer="entropy", cache=False)


def test_missing_calibration_data_is_a_clear_error():
    model = _model()
    pm = PassManager([Calibrate(CalibrateConfig(), PassContext())])
    with pytest.raises(PassError, match="pass 'calibrate'.*needs calibration data"):
        pm.run(model)


def test_result_reaches_later_passes_through_the_manager(tmp_path):
    model = _model()
    _, source = _data(model, n=8)
    ctx = PassContext(calibration=source, cache_dir=tmp_path)
    pipeline = PassManager([Calibrate(CalibrateConfig(observer="minmax"), ctx)]).run(model)
    assert ctx.latest(CalibrationResult) is pipeline.results[0]
    assert pipeline.records[0].details["tensors"] == 5 and not pipeline.modified


def test_data_for_other_inputs_is_a_data_error(tmp_path):
    model = _model()
    renamed = _model()
    renamed.graph.input[0].name = "image"
    renamed.graph.node[0].input[0] = "image"
    _, source = _data(model, n=8)  # opened for the model with input 'x'
    with pytest.raises(DataError, match="no values for model input.*'image'"):
        _run(renamed, source, tmp_path, cache=False)


def test_cache_key_streams_large_weights(tmp_path, sessions, monkeypatch):
    """The model part of the cache key hashes large weights one tensor at a time (each mapped, hashed, let go)
    and still sees a change of one value in one weight."""
    import onnx_ir as ir

    from onnxopt.model_io import from_proto, load_model, save_model

    def model(big: np.ndarray) -> onnx.ModelProto:
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "big"], ["mm"]), helper.make_node("Relu", ["mm"], ["y"])], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5000])],
            [numpy_helper.from_array(big, "big")])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    big = np.random.default_rng(0).standard_normal((4, 5000)).astype(np.float32)  # 80 KB: external, hashed apart
    changed = big.copy()
    changed[3, 4999] += 1
    for name, w in (("a", big), ("b", changed)):
        save_model(from_proto(model(w)), tmp_path / f"{name}.onnx", external_data=True)
    x = np.random.default_rng(1).standard_normal((8, 4)).astype(np.float32)
    loads, mapped, peak = [], set(), [0]
    real_load, real_release = ir.ExternalTensor._load, ir.ExternalTensor.release

    def load(self):
        loads.append(self.name)
        mapped.add(id(self))
        peak[0] = max(peak[0], len(mapped))
        return real_load(self)

    def release(self):
        mapped.discard(id(self))
        return real_release(self)

    monkeypatch.setattr(ir.ExternalTensor, "_load", load)
    monkeypatch.setattr(ir.ExternalTensor, "release", release)
    results = []
    for name in ("a", "a", "b"):
        lazy = load_model(tmp_path / f"{name}.onnx")
        assert isinstance(lazy.graph.initializers["big"].const_value, ir.ExternalTensor)
        results.append(_run(lazy, from_arrays({"x": x}, lazy), tmp_path / "cache", observer="minmax"))
    assert [r.details["cache"] for r in results] == ["miss", "hit", "miss"] and len(sessions) == 2
    assert loads == ["big"] * 3 and peak[0] == 1 and not mapped  # one read per key, released after hashing
