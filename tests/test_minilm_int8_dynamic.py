"""int8-dynamic on the real MiniLM-L6 SST-2 encoder (skips without ../shared/models): fusion exact,
dynamic int8 + int8 embeddings small and agreeing with fp32 on a few sentences."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxopt.model_io import load_model, to_proto
from onnxopt.pass_infra import PassManager
from onnxopt.recipe import load_preset

TEXT = Path(__file__).resolve().parents[1] / ".." / "shared" / "models" / "text"
MODEL = TEXT / "minilm_l6_sst2.onnx"

pytestmark = [pytest.mark.real_model,
              pytest.mark.skipif(not MODEL.is_file(), reason="needs ../shared/models (MiniLM SST-2)")]

SENTENCES = ["a wonderful , moving and beautifully acted film .",
             "the plot is dull and the jokes are painfully bad .",
             "one of the best movies of the year .",
             "a boring , lifeless and stupid mess ."]


def encode(sentences: list[str]) -> dict[str, np.ndarray]:
    """Whole-word WordPiece lookup: enough for these sentences (all words are in the vocabulary)."""
    vocab = {w: i for i, w in enumerate((TEXT / "vocab.txt").read_text(encoding="utf-8").splitlines())}
    rows = [[vocab["[CLS]"]] + [vocab[w] for w in re.findall(r"\w+|[^\w\s]", s.lower())] + [vocab["[SEP]"]]
            for s in sentences]
    length = max(map(len, rows))
    ids = np.zeros((len(rows), length), np.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
    return {"input_ids": ids, "attention_mask": (ids > 0).astype(np.int64), "token_type_ids": np.zeros_like(ids)}


def run(model, feeds):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return dict(zip(["logits", "sentence_embedding"], s.run(["logits", "sentence_embedding"], feeds), strict=True))


def test_int8_dynamic_preset_on_minilm():
    model = to_proto(load_model(MODEL))
    result = PassManager(load_preset("int8-dynamic").build_passes()).run(model)  # checked after every pass
    fusion, dynamic, embedding, layout = (r.details for r in result.records)
    assert layout["fused"] == {"skip-layernorm": 12, "bias-gelu": 6}
    assert set(layout["decisions"]) == {"skip-layernorm", "bias-gelu"}  # which way is this CPU's measurement
    assert fusion["sdpa_attention"] == 6 and fusion["ort_fusions"]["SkipLayerNormalization"] == 12
    assert fusion["max_abs_error"] <= 1e-4
    assert dynamic["quantized"] == {"Attention": 6, "MatMul": 18}
    assert embedding["tables"] == ["b.embeddings.position_embeddings.weight", "b.embeddings.word_embeddings.weight"]
    out = result.model
    assert out.ByteSize() <= 0.26 * model.ByteSize()
    # padded keys are sliced off before every attention (ORT's CPU attention is slow on masked keys)
    mha = [n for n in out.graph.node if n.op_type == "MultiHeadAttention"]
    sliced = {n.output[0] for n in out.graph.node if n.op_type == "Slice"}
    assert len(mha) == 6 and all(n.input[1] in sliced and n.input[4] in sliced for n in mha)
    feeds = encode(SENTENCES)
    want, got = run(model, feeds), run(out, feeds)
    assert (want["logits"].argmax(1) == [1, 0, 1, 0]).all()
    np.testing.assert_array_equal(got["logits"].argmax(1), want["logits"].argmax(1))
    a, b = want["sentence_embedding"], got["sentence_embedding"]
    cos = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() > 0.98, cos
    # the trimmed keys carry no weight: pointing attention back at the untrimmed K, V and mask changes nothing
    untrimmed = onnx.ModelProto()
    untrimmed.CopyFrom(out)
    source = {n.output[0]: n.input[0] for n in untrimmed.graph.node if n.op_type == "Slice"}
    for n in untrimmed.graph.node:
        if n.op_type == "MultiHeadAttention":
            n.input[1], n.input[2], n.input[4] = (source[n.input[i]] for i in (1, 2, 4))
    padded = {k: np.pad(v, ((0, 0), (0, 32 - v.shape[1]))) for k, v in feeds.items()}  # every row padded
    for want_, got_ in zip(run(untrimmed, padded).values(), run(out, padded).values(), strict=True):
        np.testing.assert_allclose(got_, want_, rtol=1e-5, atol=1e-5)
