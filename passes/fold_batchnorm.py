"""Fold an inference BatchNormalization into the Conv, ConvTranspose or Gemm that feeds it.

BN(y) = s * (y - mean) + B with s = scale / sqrt(var + eps) is per output channel, so it
scales that channel's weights and bias. Folding is computed in float64 and rounded once.
Weights another node also reads are not touched: the producer gets its own copy.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import onnx

from onnxopt.legacy_graph import GraphIndex, attr, drop_initializers, drop_value_info, set_attr
from onnxopt.pass_infra import PassConfig, PassResult, ProtoPass

DEFAULT_DOMAINS = ("", "ai.onnx")
PRODUCERS = ("Conv", "ConvTranspose", "Gemm")
BIAS = 2  # position of the bias (Conv, ConvTranspose) or C (Gemm) input


class FoldBatchNormConfig(PassConfig):
    type: Literal["fold-batchnorm"] = "fold-batchnorm"


def _folded_weights(op: onnx.NodeProto, w: np.ndarray, bias: np.ndarray | None, s: np.ndarray,
                    shift: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """New (weight, bias) so that op'(x) == s * op(x) + shift per channel, or None if shapes disagree."""
    c = s.shape[0]
    if op.op_type == "Conv":
        if w.ndim < 3 or w.shape[0] != c:
            return None
        w = w * s.reshape((c,) + (1,) * (w.ndim - 1))
    elif op.op_type == "ConvTranspose":  # weight is [C_in, C_out / group, k...]
        group = attr(op, "group", 1)
        if w.ndim < 3 or w.shape[1] * group != c or w.shape[0] % group:
            return None
        per = (group, w.shape[0] // group, w.shape[1]) + w.shape[2:]
        w = (w.reshape(per) * s.reshape((group, 1, w.shape[1]) + (1,) * (w.ndim - 2))).reshape(w.shape)
    else:  # Gemm: Y = alpha * A' @ B' + beta * C, channels are Y's columns
        if w.ndim != 2 or w.shape[1 - attr(op, "transB", 0)] != c:
            return None
        w = w * (s[:, None] if attr(op, "transB", 0) else s[None, :])
        if bias is not None:
            bias = attr(op, "beta", 1.0) * bias
    bias = shift if bias is None else bias * s + shift
    return w, bias


class FoldBatchNorm(ProtoPass):
    name = "fold-batchnorm"
    summary = "Fold inference BatchNormalization into the preceding Conv/ConvTranspose/Gemm weights."
    Config = FoldBatchNormConfig

    def call(self, model: onnx.ModelProto) -> PassResult:
        g, folded = model.graph, 0
        while True:  # BN -> BN chains fold one link per round
            index = GraphIndex(g)
            pairs = [(bn.output[0], bn.input[0]) for bn in list(g.node) if self._fold(index, bn)]
            if not pairs:
                break
            orphans = set()
            for out, kept in pairs:
                bn = index.producer(out)
                orphans.update(bn.input[1:])
                index.bypass(bn, kept)
            drop_initializers(g, orphans)
            drop_value_info(g, candidates={name for pair in pairs for name in pair})
            folded += len(pairs)
        return PassResult(model, folded > 0, {"folded": folded})

    def _fold(self, index: GraphIndex, bn: onnx.NodeProto) -> bool:
        if bn.op_type != "BatchNormalization" or bn.domain not in DEFAULT_DOMAINS or len(bn.input) != 5:
            return False
        if any(bn.output[1:]) or attr(bn, "training_mode", 0) or attr(bn, "spatial", 1) != 1:
            return False
        op = index.producer(bn.input[0])
        if op is None or op.op_type not in PRODUCERS or op.domain not in DEFAULT_DOMAINS:
            return False
        if index.only_use(bn.input[0]) is not bn or op.output[0] != bn.input[0]:
            return False
        params = [index.constant(x) for x in bn.input[1:]]
        if any(p is None or p.ndim != 1 for p in params) or len({p.shape for p in params}) != 1:
            return False
        w = index.constant(op.input[1])
        has_bias = len(op.input) > BIAS and op.input[BIAS]
        bias = index.constant(op.input[BIAS]) if has_bias else None
        if w is None or w.dtype.kind != "f" or (has_bias and bias is None):
            return False
        scale, offset, mean, var = (p.astype(np.float64) for p in params)
        s = scale / np.sqrt(var + attr(bn, "epsilon", 1e-5))
        new = _folded_weights(op, w.astype(np.float64), None if bias is None else bias.astype(np.float64),
                              s, offset - mean * s)
        if new is None:
            return False
        self._write(index, op, 1, new[0].astype(w.dtype))
        self._write(index, op, BIAS, new[1].astype(w.dtype))
        if op.op_type == "Gemm":
            set_attr(op, "beta", 1.0)
        return True

    @staticmethod
    def _write(index: GraphIndex, op: onnx.NodeProto, pos: int, value: np.ndarray) -> None:
        """Give ``op`` input ``pos`` the value, in place only when nothing else reads the old one."""
        old = op.input[pos] if pos < len(op.input) else ""
        if (old and old in index.initializers and old not in index.graph_inputs
                and not index.is_output(old) and all(u is op for u in index.uses(old))
                and list(op.input).count(old) == 1):
            index.set_initializer(old, value)
            return
        new = index.add_initializer(value, old or f"{op.output[0]}_bias")
        if old:
            index.replace_input(op, old, new)
            return
        if pos < len(op.input):
            op.input[pos] = new
        else:
            op.input.append(new)
        index.consumers[new].append(op)
