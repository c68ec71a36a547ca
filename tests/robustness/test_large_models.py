"""Large models: external data, path-based checks, sizes above protobuf's 2 GiB limit.

In default CI the large-model code paths run on the bundled model with ``ONNXOPT_EXTERNAL_THRESHOLD``
lowered to a few KB: saving with external data, the path-based checker and shape inference, ONNX
Runtime sessions from a file. A real > 2 GB model is generated only with ``ONNXOPT_SLOW=1``.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from clihelp import cli
from corpus import MODEL, VAL, file_hashes, tiny
from onnx import helper

from onnxopt.checks import KEEP_VALUES_BYTES, check_model
from onnxopt.errors import InvalidModelError, OnnxoptError
from onnxopt.graph import initializer_bytes, parameter_count
from onnxopt.inspect import summarize
from onnxopt.model_io import _summed_size, estimated_size, load_model, save_model, serialized_size, to_proto
from onnxopt.pass_infra import PassManager
from onnxopt.recipe import load_preset


@pytest.fixture()
def low_threshold(monkeypatch):
    monkeypatch.setenv("ONNXOPT_EXTERNAL_THRESHOLD", "1000")


@pytest.fixture()
def checker_calls(monkeypatch):
    """What onnx.checker.check_model was given: 'path', or for a protobuf the bytes of its largest tensor."""
    calls: list = []
    real = onnx.checker.check_model

    def spy(model, *a, **k):
        if isinstance(model, str | os.PathLike):
            calls.append("path")
        else:
            calls.append(max((t.ByteSize() for t in model.graph.initializer), default=0))
        return real(model, *a, **k)

    monkeypatch.setattr(onnx.checker, "check_model", spy)
    return calls


def _ort(path, x):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def test_external_data_end_to_end_through_the_cli(tmp_path, low_threshold, checker_calls):
    out = tmp_path / "m.onnx"
    code, _, err = cli("optimize", MODEL, "-o", out, "-r", "cleanup", "--val", VAL, "--max-abs-error", "1e-4", "-q")
    assert code == 0, err
    # every check went through a file or a skeleton: no weight above KEEP_VALUES_BYTES is ever serialized
    assert "path" in checker_calls
    assert all(c == "path" or c <= KEEP_VALUES_BYTES + 64 for c in checker_calls), checker_calls
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert out.stat().st_size < 4096 < (tmp_path / "m.onnx.data").stat().st_size
    x = np.load(VAL)["input"][:32]
    np.testing.assert_allclose(_ort(out, x), _ort(MODEL, x), rtol=1e-5, atol=1e-5)

    before = file_hashes(tmp_path)
    code, _, err = cli("validate", MODEL, out, "--data", VAL, "--max-abs-error", "1e-4", "-q")
    assert code == 0, err
    code, stdout, err = cli("inspect", out, "--json")
    assert code == 0, err
    assert '"parameters": ' in stdout
    # the external-data model is itself a valid input, and stays untouched
    code, _, err = cli("optimize", out, "-o", tmp_path / "again" / "m2.onnx", "-q")
    assert code == 0, err
    assert file_hashes(tmp_path) == {**before, **file_hashes(tmp_path / "again")}
    # same model (weights read in: the two files name different data files)
    assert onnx.load(str(tmp_path / "again" / "m2.onnx")).SerializeToString() == onnx.load(str(out)).SerializeToString()


def test_skeleton_check_still_refuses_broken_models(low_threshold, checker_calls):
    model = onnx.load(MODEL)
    model.graph.node[3].input[0] = "ghost"  # the first Conv reads nothing
    with pytest.raises(InvalidModelError, match="ghost"):
        check_model(model)
    assert len(checker_calls) == 1


def test_skeleton_check_applies_the_size_limit(low_threshold, monkeypatch):
    model = tiny()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 10**7  # 2.6 GB of input, declared
    assert serialized_size(model) > 1000
    monkeypatch.setenv("ONNXOPT_MAX_TENSOR_BYTES", str(1 << 30))
    with pytest.raises(InvalidModelError, match=r"input 'input' has shape \[10000000, 1, 8, 8\] float: 2\.4 GB"):
        check_model(model)


def test_external_weights_stay_on_disk_until_a_pass_reads_them(tmp_path, monkeypatch):
    """Loading, checking, summaries, the pass manager's copy and the cheap checks read no weight; saving
    copies them file to file; a weight is mapped only when a pass asks for its values."""
    original = load_model(MODEL)
    save_model(original, tmp_path / "m.onnx", external_data=True)
    reads = []
    real_load = ir.ExternalTensor._load

    def spy(self):
        reads.append(self.name)
        return real_load(self)

    monkeypatch.setattr(ir.ExternalTensor, "_load", spy)
    lazy = load_model(tmp_path / "m.onnx")
    assert all(isinstance(v.const_value, ir.ExternalTensor) for v in lazy.graph.initializers.values()
               if v.const_value.nbytes > 1024)
    assert initializer_bytes(lazy.graph) == initializer_bytes(original.graph)
    assert parameter_count(lazy.graph) == parameter_count(original.graph)
    assert summarize(lazy).initializer_bytes == summarize(original).initializer_bytes
    copy = PassManager([], strict=True).run(lazy).model
    assert copy is not lazy
    assert to_proto(copy).SerializeToString() == to_proto(lazy).SerializeToString()
    save_model(copy, tmp_path / "again.onnx")  # keeps the input's layout: external data
    assert (tmp_path / "again.onnx.data").stat().st_size == (tmp_path / "m.onnx.data").stat().st_size
    assert reads == []
    name = next(n for n, v in lazy.graph.initializers.items() if isinstance(v.const_value, ir.ExternalTensor))
    lazy.graph.initializers[name].const_value.numpy()
    assert reads == [name]


def test_output_data_file_may_not_be_the_inputs(tmp_path):
    """Writing ``x.onnx`` beside a model whose weights live in ``x.onnx.data`` would overwrite them."""
    save_model(load_model(MODEL), tmp_path / "m.onnx", external_data=True)
    (tmp_path / "m.onnx.data").rename(tmp_path / "x.onnx.data")
    proto = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "x.onnx.data"
    (tmp_path / "m.onnx").write_bytes(proto.SerializeToString())
    before = file_hashes(tmp_path)
    with pytest.raises(OnnxoptError, match="holds the weights of the model being saved"):
        save_model(load_model(tmp_path / "m.onnx"), tmp_path / "x.onnx")
    assert file_hashes(tmp_path) == before


def test_size_above_the_protobuf_limit_is_summed_field_by_field():
    model = onnx.load(MODEL)
    for message in (model, model.graph, model.graph.initializer[0], model.graph.node[0]):
        assert _summed_size(message) == message.ByteSize()


# --------------------------------------------------------------------------------------------
# A real model above 2 GB (opt-in: ONNXOPT_SLOW=1; about 9 GB of RAM, 7 GB of disk and 15 minutes)
# --------------------------------------------------------------------------------------------
def _big_matmul_chain(folder, dim=12_000, layers=4):
    """x[N, dim] -> (MatMul w_i -> Identity) x layers: 4 x 576 MB = 2.3 GB of float32 weights.

    Written straight to an external-data file one weight at a time, so making it needs one weight of RAM.
    """
    nodes, inits, prev = [], [], "input"
    data = folder / "big.onnx.data"
    with open(data, "wb") as f:
        for i in range(layers):
            w = (np.random.default_rng(i).standard_normal((dim, dim), dtype=np.float32)
                 * np.float32(1.0 / np.sqrt(dim)))
            t = onnx.TensorProto(name=f"w{i}", data_type=onnx.TensorProto.FLOAT, dims=[dim, dim],
                                 data_location=onnx.TensorProto.EXTERNAL)
            for key, value in (("location", data.name), ("offset", str(f.tell())), ("length", str(w.nbytes))):
                t.external_data.add(key=key, value=value)
            f.write(w.tobytes())
            del w
            inits.append(t)
            nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"], name=f"mm{i}"))
            nodes.append(helper.make_node("Identity", [f"h{i}"], [f"y{i}"], name=f"id{i}"))
            prev = f"y{i}"
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["N", dim])],
                              [helper.make_tensor_value_info(prev, onnx.TensorProto.FLOAT, ["N", dim])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = folder / "big.onnx"
    path.write_bytes(model.SerializeToString())
    return path


SLOW = [pytest.mark.slow,
        pytest.mark.skipif(os.environ.get("ONNXOPT_SLOW") != "1", reason="generates a 2.3 GB model; set ONNXOPT_SLOW=1")]


@pytest.fixture(scope="module")
def big_model(tmp_path_factory):
    src = tmp_path_factory.mktemp("big")
    return _big_matmul_chain(src)


@pytest.mark.parametrize("mark", [pytest.param(0, marks=SLOW)])
def test_real_model_above_2gb(tmp_path, big_model, mark):
    """Load (external data), every cleanup pass, save (external data), same outputs; then the CLI on it."""
    before = file_hashes(big_model.parent)
    model = load_model(big_model)
    assert estimated_size(model) > 2**31
    result = PassManager(load_preset("cleanup").build_passes()).run(model)
    assert "Identity" not in {n.op_type for n in result.model.graph}
    assert result.records[0].initializer_bytes_before > 2**31
    out = tmp_path / "big_clean.onnx"
    save_model(result.model, out)
    del model, result
    assert (tmp_path / "big_clean.onnx.data").stat().st_size > 2**31
    assert out.stat().st_size < 1 << 20
    x = np.random.default_rng(0).standard_normal((2, 12_000), dtype=np.float32)
    np.testing.assert_allclose(_ort(out, x), _ort(big_model, x), rtol=1e-4, atol=1e-4)
    code, stdout, err = cli("inspect", out, "--json")
    assert code == 0, err
    assert '"parameters": 576000000' in stdout
    assert file_hashes(big_model.parent) == before


@pytest.mark.parametrize("mark", [pytest.param(0, marks=SLOW)])
def test_cleanup_preset_above_2gb(tmp_path, big_model, mark):
    code, _, err = cli("optimize", big_model, "-o", tmp_path / "big_clean.onnx", "-r", "cleanup", "-q")
    assert code == 0, err
    assert (tmp_path / "big_clean.onnx.data").stat().st_size > 2**31


def test_output_keeps_the_inputs_external_data_layout(tmp_path):
    """A pass that replaces every weight (fp16) still writes them to external data when the input had them."""
    save_model(load_model(MODEL), tmp_path / "m.onnx", external_data=True)
    code, _, err = cli("optimize", tmp_path / "m.onnx", "-o", tmp_path / "out" / "h.onnx", "-r", "fp16", "-q")
    assert code == 0, err
    assert (tmp_path / "out" / "h.onnx.data").stat().st_size > 0
    assert (tmp_path / "out" / "h.onnx").stat().st_size < 16 * 1024
