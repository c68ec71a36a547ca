"""Shared helpers for pass tests: build tiny models, run passes, compare with ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxopt.pass_infra import Pass, PassManager, PipelineResult

F = TensorProto.FLOAT
I64 = TensorProto.INT64


def make_model(nodes, inputs, outputs, initializers=(), *, opset: int = 17, value_info=(),
               extra_opsets: dict[str, int] | None = None) -> onnx.ModelProto:
    imports = [helper.make_opsetid("", opset)]
    imports += [helper.make_opsetid(d, v) for d, v in (extra_opsets or {}).items()]
    graph = helper.make_graph(list(nodes), "test", list(inputs), list(outputs),
                              initializer=list(initializers), value_info=list(value_info))
    model = helper.make_model(graph, opset_imports=imports)
    model.ir_version = max(helper.find_min_ir_version_for(imports[:1]), 8)
    return model


def vi(name: str, shape, elem_type: int = F) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, shape)


def init(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def rand(*shape, seed: int = 0, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def run(model: onnx.ModelProto, *passes: Pass) -> PipelineResult:
    """Run passes through the manager (checker with full_check + strict shape inference after each)."""
    return PassManager(list(passes)).run(model)


def ops(model: onnx.ModelProto) -> dict[str, int]:
    return op_histogram(model.graph)


def ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def random_feeds(model: onnx.ModelProto, *, seed: int = 0, dims: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Random values for every graph input that is not an initializer; dim_params from ``dims`` (default 2)."""
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (dims or {}).get(d.dim_param, 2) for d in tt.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if dtype.kind == "f":
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[inp.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            feeds[inp.name] = rng.integers(-5, 6, shape).astype(dtype)
    return feeds


def assert_same(before: onnx.ModelProto, after: onnx.ModelProto, *, rtol: float = 1e-5, atol: float = 1e-6,
                feeds: dict[str, np.ndarray] | None = None, seed: int = 0, dims: dict[str, int] | None = None,
                exact: bool = False) -> None:
    """Same outputs (names, order and values) from ONNX Runtime before and after."""
    assert [o.name for o in before.graph.output] == [o.name for o in after.graph.output]
    assert [i.name for i in before.graph.input] == [i.name for i in after.graph.input]
    feeds = feeds if feeds is not None else random_feeds(before, seed=seed, dims=dims)
    ref, got = ort_run(before, feeds), ort_run(after, feeds)
    for name, r, g in zip([o.name for o in before.graph.output], ref, got, strict=True):
        assert r.shape == g.shape and r.dtype == g.dtype, name
        if exact:
            np.testing.assert_array_equal(g, r, err_msg=name)
        else:
            np.testing.assert_allclose(g, r, rtol=rtol, atol=atol, err_msg=name)


def assert_idempotent(model: onnx.ModelProto, make_pass) -> None:
    """Running the pass again on its own output changes nothing and says so."""
    again = run(model, make_pass())
    assert again.records[0].modified is False, again.records[0].details
    assert again.model.SerializeToString(deterministic=True) == model.SerializeToString(deterministic=True)


# --- reading protobuf results in tests -------------------------------------------------------
def op_histogram(graph: onnx.GraphProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in graph.node:
        key = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def opset_version(model: onnx.ModelProto, domain: str = "") -> int:
    for op in model.opset_import:
        if op.domain in (domain, "ai.onnx" if domain == "" else domain):
            return op.version
    return 0


def producer(model: onnx.ModelProto, name: str) -> onnx.NodeProto | None:
    return next((n for n in model.graph.node if name in n.output), None)


def initializer(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)
