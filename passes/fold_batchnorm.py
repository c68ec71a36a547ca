"""Fold an inference BatchNormalization into the Conv, ConvTranspose or Gemm that feeds it.

BN(y) = s * (y - mean) + B with s = scale / sqrt(var + eps) is per output channel, so it
scales that channel's weights and bias. Folding is computed in float64 and rounded once.
Weights another node also reads are not touched: the producer gets its own copy.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxopt.graph import (
    Namer,
    attr,
    bypass,
    constant_value,
    drop_unused_initializers,
    is_op,
    only_use,
    own_initializer,
    set_attr,
)
from onnxopt.pass_infra import Pass, PassConfig, PassResult

PRODUCERS = ("Conv", "ConvTranspose", "Gemm")
BIAS = 2  # position of the bias (Conv, ConvTranspose) or C (Gemm) input


class FoldBatchNormConfig(PassConfig):
    type: Literal["fold-batchnorm"] = "fold-batchnorm"


def _folded_weights(op: ir.Node, w: np.ndarray, bias: np.ndarray | None, s: np.ndarray,
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


class FoldBatchNorm(Pass):
    name = "fold-batchnorm"
    summary = "Fold inference BatchNormalization into the preceding Conv/ConvTranspose/Gemm weights."
    Config = FoldBatchNormConfig

    def call(self, model: ir.Model) -> PassResult:
        g, folded = model.graph, 0
        namer = Namer(g)
        self.orphans: set[str] = set()
        while True:  # BN -> BN chains fold one link per round
            done = [bn for bn in list(g) if self._fold(g, bn, namer)]
            if not done:
                break
            folded += len(done)
        drop_unused_initializers(g, self.orphans)
        return PassResult(model, folded > 0, {"folded": folded})

    def _fold(self, g: ir.Graph, bn: ir.Node, namer: Namer) -> bool:
        if not is_op(bn, "BatchNormalization") or len(bn.inputs) != 5 or bn.graph is not g:
            return False
        if len(bn.outputs) > 1 and any(o.uses() or o.is_graph_output() for o in bn.outputs[1:]):
            return False
        if attr(bn, "training_mode", 0) or attr(bn, "spatial", 1) != 1:
            return False
        y = bn.inputs[0]
        op = y.producer() if y is not None else None
        if not is_op(op, PRODUCERS) or op.outputs[0] is not y or only_use(y) is not bn:
            return False
        params = [constant_value(x) for x in bn.inputs[1:]]
        if any(p is None or p.ndim != 1 for p in params) or len({p.shape for p in params}) != 1:
            return False
        w = constant_value(op.inputs[1])
        has_bias = len(op.inputs) > BIAS and op.inputs[BIAS] is not None
        bias = constant_value(op.inputs[BIAS]) if has_bias else None
        if w is None or w.dtype.kind != "f" or (has_bias and bias is None):
            return False
        scale, offset, mean, var = (p.astype(np.float64) for p in params)
        s = scale / np.sqrt(var + attr(bn, "epsilon", 1e-5))
        new = _folded_weights(op, w.astype(np.float64), None if bias is None else bias.astype(np.float64),
                              s, offset - mean * s)
        if new is None:
            return False
        params_in = {x.name for x in bn.inputs[1:]} | {x.name for x in op.inputs[1:] if x is not None}
        if not bypass(bn, y):
            return False
        self.orphans |= params_in
        own_initializer(g, op, 1, new[0].astype(w.dtype), namer)
        own_initializer(g, op, BIAS, new[1].astype(w.dtype), namer,
                        base_name=None if has_bias else f"{op.outputs[0].name}_bias")
        if op.op_type == "Gemm":
            set_attr(op, "beta", 1.0)
        return True
