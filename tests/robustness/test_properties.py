"""Property tests: random small graphs through the presets.

Graphs are chains and DAGs of Conv/MatMul/Gemm/Add/Mul/Relu/Clip/Concat/Reshape/BatchNormalization/
Identity/Pad with random but consistent shapes (built with onnx.helper). After ``cleanup`` the model
must pass the checker, load in ONNX Runtime and give the original's outputs (rtol 1e-5, atol 1e-6;
ORT graph optimizations disabled for both). After ``int8`` it must pass the checker, run, and stay
close to the float model (cosine >= 0.99 on inputs from the calibration distribution).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxopt.checks import check_loaded_model
from onnxopt.data import from_arrays
from onnxopt.pass_infra import PassContext, PassManager
from onnxopt.recipe import load_preset, preset_names

F = TensorProto.FLOAT
BATCH = 3


@dataclass
class Builder:
    rng: np.random.Generator
    nodes: list = field(default_factory=list)
    inits: list = field(default_factory=list)
    values: dict = field(default_factory=dict)  # name -> shape without the batch dim
    n: int = 0

    def name(self, base: str) -> str:
        self.n += 1
        return f"{base}{self.n}"

    def const(self, array, base: str) -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def weight(self, *shape, fan_in: int) -> str:
        return self.const((self.rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32), "w")

    def node(self, op: str, inputs: list[str], shape: tuple[int, ...], **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out + "_node", **attrs))
        self.values[out] = shape
        return out


def _same_rank(b: Builder, rank: int) -> list[str]:
    return [v for v, s in b.values.items() if len(s) == rank]


def _step(b: Builder, draw) -> None:
    """Add one node reading existing values (any of them: the graph becomes a DAG, dead ends included)."""
    names = list(b.values)
    x = draw(st.sampled_from(names))
    shape = b.values[x]
    if len(shape) == 3:  # [C, H, W]
        c, h, w = shape
        op = draw(st.sampled_from(["Conv", "Conv", "BatchNormalization", "Pad", "Relu", "Clip", "Identity", "Add",
                                   "Mul", "Concat", "Reshape"]))
    else:
        (f,) = shape
        op = draw(st.sampled_from(["MatMul", "Gemm", "Gemm", "Relu", "Clip", "Identity", "Add", "Mul", "Concat"]))
    if op == "Conv":
        k = draw(st.integers(1, 4))
        ks = draw(st.sampled_from([1, 3])) if min(h, w) >= 3 else 1
        pad = draw(st.sampled_from([0, ks // 2]))
        inputs = [x, b.weight(k, c, ks, ks, fan_in=c * ks * ks)]
        if draw(st.booleans()):
            inputs.append(b.const(b.rng.standard_normal(k).astype(np.float32) * 0.1, "bias"))
        b.node("Conv", inputs, (k, h - ks + 1 + 2 * pad, w - ks + 1 + 2 * pad), kernel_shape=[ks, ks],
               pads=[pad] * 4)
    elif op == "BatchNormalization":
        params = [b.const(b.rng.uniform(0.5, 1.5, c).astype(np.float32), "scale"),
                  b.const(b.rng.standard_normal(c).astype(np.float32) * 0.1, "shift"),
                  b.const(b.rng.standard_normal(c).astype(np.float32) * 0.1, "mean"),
                  b.const(b.rng.uniform(0.5, 2.0, c).astype(np.float32), "var")]
        b.node("BatchNormalization", [x, *params], shape, epsilon=1e-5)
    elif op == "Pad":
        p = [int(v) for v in b.rng.integers(0, 2, 4)]  # top, left, bottom, right
        pads = b.const(np.array([0, 0, p[0], p[1], 0, 0, p[2], p[3]], np.int64), "pads")
        b.node("Pad", [x, pads], (c, h + p[0] + p[2], w + p[1] + p[3]), mode="constant")
    elif op in ("Relu", "Identity"):
        b.node(op, [x], shape)
    elif op == "Clip":
        b.node("Clip", [x, b.const(np.float32(-1.0), "lo"), b.const(np.float32(draw(st.sampled_from([1.0, 6.0]))),
                                                                      "hi")], shape)
    elif op in ("Add", "Mul"):
        partners = [v for v in names if b.values[v] == shape]
        if draw(st.booleans()) and len(partners) > 1:
            y = draw(st.sampled_from(partners))
        else:  # a constant broadcast over the batch (per channel for images)
            cshape = (shape[0], 1, 1) if len(shape) == 3 else shape
            y = b.const(b.rng.uniform(0.5, 1.5, cshape).astype(np.float32), "k")
        b.node(op, [x, y], shape)
    elif op == "Concat":
        partners = [v for v in names if b.values[v][1:] == shape[1:] and len(b.values[v]) == len(shape)]
        y = draw(st.sampled_from(partners))
        b.node("Concat", [x, y], (shape[0] + b.values[y][0], *shape[1:]), axis=1)
    elif op == "Reshape":
        b.node("Reshape", [x, b.const(np.array([0, -1], np.int64), "shape")], (c * h * w,))
    elif op == "MatMul":
        g = draw(st.integers(1, 8))
        b.node("MatMul", [x, b.weight(f, g, fan_in=f)], (g,))
    elif op == "Gemm":
        g = draw(st.integers(1, 8))
        trans = draw(st.booleans())
        w = b.weight(g, f, fan_in=f) if trans else b.weight(f, g, fan_in=f)
        inputs = [x, w] + ([b.const(b.rng.standard_normal(g).astype(np.float32) * 0.1, "c")]
                           if draw(st.booleans()) else [])
        b.node("Gemm", inputs, (g,), transB=int(trans))


@st.composite
def small_models(draw):
    b = Builder(np.random.default_rng(draw(st.integers(0, 2**32 - 1))))
    image = draw(st.booleans())
    shape = (draw(st.integers(1, 3)), draw(st.integers(2, 6)), draw(st.integers(2, 6))) if image \
        else (draw(st.integers(1, 8)),)
    b.values["input"] = shape
    for _ in range(draw(st.integers(1, 8))):
        _step(b, draw)
    produced = [v for v in b.values if v != "input"]
    outputs = [produced[-1]]
    if len(produced) > 2 and draw(st.booleans()):
        extra = draw(st.sampled_from(produced[:-1]))
        outputs.append(extra)
    batch = draw(st.sampled_from(["N", BATCH]))
    graph = helper.make_graph(
        b.nodes, "random",
        [helper.make_tensor_value_info("input", F, [batch, *shape])],
        [helper.make_tensor_value_info(o, F, [batch, *b.values[o]]) for o in outputs],
        initializer=b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", draw(st.sampled_from([13, 17])))])
    model.ir_version = 8
    return model


def _ort(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    """Outputs for ``x``, run in batches of BATCH (some graphs have a static batch dim)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    runs = [sess.run(None, {"input": x[i:i + BATCH]}) for i in range(0, len(x), BATCH)]
    return [np.concatenate(parts) for parts in zip(*runs, strict=True)]


def _inputs(model: onnx.ModelProto, n: int, seed: int) -> np.ndarray:
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    return np.random.default_rng(seed).standard_normal((n, *dims)).astype(np.float32)


FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                         HealthCheck.data_too_large])


@FAST
@given(small_models())
def test_cleanup_keeps_outputs(model):
    check_loaded_model(model)  # the generator makes valid models
    result = PassManager(load_preset("cleanup").build_passes()).run(model).model
    onnx.checker.check_model(result, full_check=True)
    assert [o.name for o in result.graph.output] == [o.name for o in model.graph.output]
    assert len(result.graph.node) <= len(model.graph.node)
    x = _inputs(model, BATCH, 0)
    for want, got in zip(_ort(model, x), _ort(result, x), strict=True):
        assert want.shape == got.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _activation_steps(model: onnx.ModelProto) -> float:
    """Sum of the quantization steps (scales) of every QuantizeLinear in the model."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return float(sum(np.max(np.abs(inits[n.input[1]])) for n in model.graph.node
                     if n.op_type == "QuantizeLinear" and n.input[1] in inits))


@pytest.mark.skipif("int8" not in preset_names(), reason="no int8 preset")
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(small_models())
def test_int8_stays_close(model):
    """The int8 preset with min-max ranges, evaluated on its own calibration samples (so nothing is
    clipped and the only error is rounding): the output keeps its direction (cosine >= 0.99) or, for
    small/low-energy outputs where a cosine over a few values is dominated by noise, its RMS error stays
    within twice the sum of the quantization steps (each quantizer rounds by at most half its step;
    the rest is headroom for weight rounding and gains, weights being scaled to about unit gain)."""
    check_loaded_model(model)
    note(onnx.printer.to_text(model.graph))
    x = _inputs(model, 8 * BATCH, 1)
    context = PassContext(calibration=from_arrays({"input": x}, model))
    passes = load_preset("int8").build_passes(context)
    for p in passes:
        if p.name == "calibrate":
            p.config = p.config.model_copy(update={"cache": False, "observer": "minmax"})
    result = PassManager(passes).run(model).model
    onnx.checker.check_model(result, full_check=True)
    steps = _activation_steps(result)
    for want, got in zip(_ort(model, x), _ort(result, x), strict=True):
        assert want.shape == got.shape and np.isfinite(got).all()
        ref, cand = want.ravel().astype(np.float64), got.ravel().astype(np.float64)
        cosine = ref @ cand / (np.linalg.norm(ref) * np.linalg.norm(cand) + 1e-30)
        rms = float(np.sqrt(np.mean((cand - ref) ** 2)))
        note(f"cosine {cosine:.5f}, rms error {rms:.3g}, sum of steps {steps:.3g}")
        assert cosine >= 0.99 or rms <= 2 * steps
