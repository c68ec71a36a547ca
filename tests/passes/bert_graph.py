"""A tiny BERT encoder built in code, laid out like PyTorch's scaled-dot-product export
(scale split over Q and K^T, mask as Where(mask, 0, -inf), Where(IsNaN(softmax), 0, softmax))."""

from __future__ import annotations

import math

import numpy as np
import onnx
from helpers import I64, init, make_model, vi
from onnx import helper

node = helper.make_node


def bert_model(*, hidden: int = 16, heads: int = 2, ffn: int = 32, vocab: int = 300, layers: int = 1,
               seed: int = 0, outlier: float = 0.0, noop_reshape: bool = False) -> onnx.ModelProto:
    """input_ids, attention_mask [N, L] int64 -> hidden [N, L, hidden] and logits [N, 2].

    ``outlier`` adds that much to one hidden channel of the LayerNorm's beta (the kind of
    activation outlier that makes per-tensor activation quantization coarse). ``noop_reshape`` puts
    the export's [B, -1, L, head] Reshape of the attention context before its Transpose.
    """
    rng = np.random.default_rng(seed)
    d = hidden // heads

    def w(*shape, s=0.3):
        return (rng.standard_normal(shape) * s).astype(np.float32)

    nodes, inits = [], []

    def const(name, value):
        inits.append(init(name, np.asarray(value)))
        return name

    nodes.append(node("Gather", [const("word_emb", w(vocab, hidden, s=1.0)), "input_ids"], ["emb"]))
    beta = w(hidden, s=0.1)
    beta[3] += outlier
    nodes.append(node("LayerNormalization", ["emb", const("ln0_g", 1 + w(hidden, s=0.1)), const("ln0_b", beta)],
                      ["h0"], axis=-1, epsilon=1e-12))
    # mask [N, L] -> bool [N, 1, 1, L] -> additive
    nodes += [node("Cast", ["attention_mask"], ["mask_b"], to=onnx.TensorProto.BOOL),
              node("Unsqueeze", ["mask_b", const("axes12", np.array([1, 2], np.int64))], ["mask4"]),
              node("Where", ["mask4", const("zero", np.array([0.0], np.float32)),
                             const("neg_inf", np.array([-np.inf], np.float32))], ["mask_add"])]
    sqrt_scale = np.array(1 / math.sqrt(math.sqrt(d)), np.float32)
    const("heads_shape", np.array([0, 0, heads, d], np.int64))
    const("merge_shape", np.array([0, 0, hidden], np.int64))
    const("sqrt_scale", sqrt_scale)
    const("half", np.array(0.5, np.float32))
    const("one", np.array(1.0, np.float32))
    const("sqrt2", np.array(math.sqrt(2), np.float32))
    x = "h0"
    for i in range(layers):
        p = f"l{i}_"
        for t in "qkv":
            nodes += [node("MatMul", [x, const(p + f"w{t}", w(hidden, hidden))], [p + f"{t}_mm"]),
                      node("Add", [const(p + f"b{t}", w(hidden, s=0.1)), p + f"{t}_mm"], [p + t]),
                      node("Reshape", [p + t, "heads_shape"], [p + f"{t}_heads"])]
        nodes += [node("Transpose", [p + "q_heads"], [p + "qt"], perm=[0, 2, 1, 3]),
                  node("Transpose", [p + "k_heads"], [p + "kt"], perm=[0, 2, 3, 1]),
                  node("Transpose", [p + "v_heads"], [p + "vt"], perm=[0, 2, 1, 3]),
                  node("Mul", [p + "qt", "sqrt_scale"], [p + "qs"]),
                  node("Mul", [p + "kt", "sqrt_scale"], [p + "ks"]),
                  node("MatMul", [p + "qs", p + "ks"], [p + "scores"]),
                  node("Add", [p + "scores", "mask_add"], [p + "masked"]),
                  node("Softmax", [p + "masked"], [p + "probs"], axis=-1),
                  node("IsNaN", [p + "probs"], [p + "nan"]),
                  node("Where", [p + "nan", "zero", p + "probs"], [p + "probs_ok"]),
                  node("MatMul", [p + "probs_ok", p + "vt"], [p + ("ctx0" if noop_reshape else "ctx")])]
        if noop_reshape:
            nodes.append(node("Reshape", [p + "ctx0", const(p + "ctx_shape", np.array([0, -1, 0, d], np.int64))],
                              [p + "ctx"]))
        nodes += [node("Transpose", [p + "ctx"], [p + "ctx_t"], perm=[0, 2, 1, 3]),
                  node("Reshape", [p + "ctx_t", "merge_shape"], [p + "ctx_m"]),
                  node("MatMul", [p + "ctx_m", const(p + "wo", w(hidden, hidden))], [p + "o_mm"]),
                  node("Add", [p + "o_mm", const(p + "bo", w(hidden, s=0.1))], [p + "o"]),
                  node("Add", [p + "o", x], [p + "res1"]),
                  node("LayerNormalization", [p + "res1", const(p + "ln1_g", 1 + w(hidden, s=0.1)),
                                              const(p + "ln1_b", w(hidden, s=0.1))], [p + "h1"], axis=-1,
                       epsilon=1e-12),
                  node("MatMul", [p + "h1", const(p + "w1", w(hidden, ffn))], [p + "f1_mm"]),
                  node("Add", [p + "f1_mm", const(p + "b1", w(ffn, s=0.1))], [p + "f1"]),
                  node("Div", [p + "f1", "sqrt2"], [p + "g_in"]),
                  node("Erf", [p + "g_in"], [p + "g_erf"]),
                  node("Add", [p + "g_erf", "one"], [p + "g_1"]),
                  node("Mul", [p + "f1", p + "g_1"], [p + "g_2"]),
                  node("Mul", [p + "g_2", "half"], [p + "gelu"]),
                  node("MatMul", [p + "gelu", const(p + "w2", w(ffn, hidden))], [p + "f2_mm"]),
                  node("Add", [p + "f2_mm", const(p + "b2", w(hidden, s=0.1))], [p + "f2"]),
                  node("Add", [p + "f2", p + "h1"], [p + "res2"]),
                  node("LayerNormalization", [p + "res2", const(p + "ln2_g", 1 + w(hidden, s=0.1)),
                                              const(p + "ln2_b", w(hidden, s=0.1))], [p + "out"], axis=-1,
                       epsilon=1e-12)]
        x = p + "out"
    nodes += [node("Identity", [x], ["hidden"]),
              node("ReduceMean", [x], ["pooled"], axes=[1], keepdims=0),
              node("Gemm", ["pooled", const("head_w", w(2, hidden)), const("head_b", w(2, s=0.1))], ["logits"],
                   transB=1)]
    return make_model(nodes, [vi("input_ids", ["N", "L"], I64), vi("attention_mask", ["N", "L"], I64)],
                      [vi("hidden", ["N", "L", hidden]), vi("logits", ["N", 2])], inits, opset=17)


def bert_feeds(n: int = 3, length: int = 12, vocab: int = 300, seed: int = 1) -> dict[str, np.ndarray]:
    """Token ids with per-row padding (every row keeps at least its first token)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, length + 1, n)
    lengths[0] = length
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
    ids = rng.integers(1, vocab, (n, length)).astype(np.int64) * mask
    return {"input_ids": ids, "attention_mask": mask}
