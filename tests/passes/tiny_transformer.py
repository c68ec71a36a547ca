"""A tiny transformer-like encoder built in code for the weight-only and fp16 tests:
embedding Gather -> LayerNorm -> one-head attention (MatMul+bias, Softmax) -> residual -> LayerNorm ->
Erf-GELU FFN -> mean over tokens -> Gemm head."""

from __future__ import annotations

import math

import numpy as np
from helpers import I64, init, make_model, vi
from onnx import helper

node = helper.make_node


def tiny_transformer(*, hidden: int = 64, ffn: int = 128, vocab: int = 100, seed: int = 0, opset: int = 17):
    rng = np.random.default_rng(seed)

    def w(*shape, s=None):
        s = s if s is not None else 1 / math.sqrt(shape[0])
        return (rng.standard_normal(shape) * s).astype(np.float32)

    h, f = hidden, ffn
    inits = [init("emb", w(vocab, h, s=1.0)), init("ln1_g", 1 + w(h, s=0.1)), init("ln1_b", w(h, s=0.1)),
             init("wq", w(h, h)), init("bq", w(h, s=0.1)), init("wk", w(h, h)), init("wv", w(h, h)),
             init("wo", w(h, h)), init("bo", w(h, s=0.1)), init("ln2_g", 1 + w(h, s=0.1)), init("ln2_b", w(h, s=0.1)),
             init("w1", w(h, f)), init("b1", w(f, s=0.1)), init("w2", w(f, h)), init("b2", w(h, s=0.1)),
             init("head", w(2, h)), init("head_b", w(2, s=0.1)), init("scale", np.float32(1 / math.sqrt(h))),
             init("sqrt2", np.float32(math.sqrt(2))), init("one", np.float32(1)), init("half", np.float32(0.5))]
    nodes = [
        node("Gather", ["emb", "input_ids"], ["e"], name="embed"),
        node("LayerNormalization", ["e", "ln1_g", "ln1_b"], ["x"], name="ln1", axis=-1),
        node("MatMul", ["x", "wq"], ["q0"], name="q"), node("Add", ["q0", "bq"], ["q1"]),
        node("MatMul", ["x", "wk"], ["k0"], name="k"), node("Transpose", ["k0"], ["kt"], perm=[0, 2, 1]),
        node("MatMul", ["x", "wv"], ["v0"], name="v"),
        node("MatMul", ["q1", "kt"], ["s0"], name="scores"), node("Mul", ["s0", "scale"], ["s1"]),
        node("Softmax", ["s1"], ["p"], name="softmax", axis=-1),
        node("MatMul", ["p", "v0"], ["c0"], name="context"),
        node("MatMul", ["c0", "wo"], ["o0"], name="o"), node("Add", ["o0", "bo"], ["o1"]),
        node("Add", ["o1", "x"], ["r1"]),
        node("LayerNormalization", ["r1", "ln2_g", "ln2_b"], ["y"], name="ln2", axis=-1),
        node("MatMul", ["y", "w1"], ["f0"], name="ffn1"), node("Add", ["f0", "b1"], ["f1"]),
        node("Div", ["f1", "sqrt2"], ["g0"]), node("Erf", ["g0"], ["g1"]), node("Add", ["g1", "one"], ["g2"]),
        node("Mul", ["f1", "g2"], ["g3"]), node("Mul", ["g3", "half"], ["g4"]),
        node("MatMul", ["g4", "w2"], ["f2"], name="ffn2"), node("Add", ["f2", "b2"], ["f3"]),
        node("Add", ["f3", "y"], ["hidden"]),
        node("ReduceMean", ["hidden"], ["pooled"], axes=[1], keepdims=0, name="pool"),
        node("Gemm", ["pooled", "head", "head_b"], ["logits"], name="head", transB=1),
    ]
    return make_model(nodes, [vi("input_ids", ["B", "L"], I64)],
                      [vi("logits", ["B", 2]), vi("hidden", ["B", "L", h])], inits, opset=opset)


def token_feeds(n: int = 3, length: int = 7, vocab: int = 100, seed: int = 1) -> dict[str, np.ndarray]:
    return {"input_ids": np.random.default_rng(seed).integers(0, vocab, (n, length)).astype(np.int64)}
