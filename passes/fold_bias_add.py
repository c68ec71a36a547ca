"""Fold an Add of a per-channel constant into the bias of the Conv, ConvTranspose or Gemm that feeds it.

Exporters that do not use the bias input (paddle2onnx writes ``Conv`` then ``Add`` of a [1, C, 1, 1]
constant in every squeeze-excitation block) leave one extra elementwise kernel per layer, which ONNX Runtime
does not fuse on its own: on the PP-OCR direction classifier 18 such Adds cost 10 % of the run time.
The constant must vary along the channel axis only (or be a scalar); the Add must be the layer's only
reader. The sum is computed in float64 and rounded once. A bias another node also reads is not touched:
the layer gets its own copy.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxopt.graph import (
    Namer,
    attr,
    bypass,
    constant_tensor,
    constant_value,
    drop_unused_initializers,
    is_op,
    only_use,
    own_initializer,
    set_attr,
)
from onnxopt.pass_infra import Pass, PassConfig, PassResult

PRODUCERS = ("Conv", "ConvTranspose", "Gemm")
BIAS = 2


class FoldBiasAddConfig(PassConfig):
    type: Literal["fold-bias-add"] = "fold-bias-add"


def _channels(op: ir.Node, shape: tuple[int, ...]) -> int | None:
    """Output channels from the weight's shape."""
    if op.op_type == "Conv":
        return shape[0] if len(shape) >= 3 else None
    if op.op_type == "ConvTranspose":
        return shape[1] * attr(op, "group", 1) if len(shape) >= 3 else None
    return shape[0 if attr(op, "transB", 0) else 1] if len(shape) == 2 else None


def _per_channel(c: np.ndarray, channels: int, rank: int, axis: int) -> np.ndarray | None:
    """``c`` as a [channels] vector if broadcasting it onto a rank-``rank`` output varies it along ``axis`` only."""
    if c.ndim > rank:
        return None  # the Add would broadcast the layer's output to a higher rank
    shape = (1,) * (rank - c.ndim) + c.shape
    if any(d != 1 for i, d in enumerate(shape) if i != axis) or shape[axis] not in (1, channels):
        return None
    return np.broadcast_to(c.reshape(-1), (channels,))


class FoldBiasAdd(Pass):
    name = "fold-bias-add"
    summary = "Fold Add of a per-channel constant into the bias of the preceding Conv/ConvTranspose/Gemm."
    Config = FoldBiasAddConfig

    def call(self, model: ir.Model) -> PassResult:
        g, folded = model.graph, 0
        namer = Namer(g)
        self.orphans: set[str] = set()
        while True:  # Conv -> Add -> Add chains fold one link per round
            done = [add for add in list(g) if self._fold(g, add, namer)]
            if not done:
                break
            folded += len(done)
        drop_unused_initializers(g, self.orphans)
        return PassResult(model, folded > 0, {"folded": folded})

    def _fold(self, g: ir.Graph, add: ir.Node, namer: Namer) -> bool:
        if not is_op(add, "Add") or len(add.inputs) != 2 or add.graph is not g or None in add.inputs:
            return False
        for k in (0, 1):
            y, other = add.inputs[k], add.inputs[1 - k]
            op = y.producer()
            if is_op(op, PRODUCERS) and op.outputs[0] is y and only_use(y) is add and constant_tensor(other) is not None:
                break
        else:
            return False
        # the weight's shape and type only: its values are never read
        w = constant_tensor(op.inputs[1]) if len(op.inputs) > 1 else None
        ct = constant_tensor(other)
        if w is None or not w.dtype.is_floating_point() or ct.dtype != w.dtype or ct.size > np.prod(w.shape.numpy()):
            return False
        shape, dtype = tuple(w.shape.numpy()), w.dtype.numpy()
        c = constant_value(other)
        if c is None:
            return False
        has_bias = len(op.inputs) > BIAS and op.inputs[BIAS] is not None
        bias = constant_value(op.inputs[BIAS]) if has_bias else None
        if has_bias and bias is None:
            return False
        channels = _channels(op, shape)
        if channels is None:
            return False
        if op.op_type == "Gemm":
            vec = _per_channel(c, channels, 2, 1)
            if bias is not None:  # Gemm's C broadcasts to [M, N]: only a per-column C folds
                bias = _per_channel(bias, channels, 2, 1)
                if bias is None:
                    return False
                bias = attr(op, "beta", 1.0) * bias.astype(np.float64)
        else:
            rank = len(shape)  # a Conv's output has the weight's rank
            vec = _per_channel(c, channels, rank, 1)
            if bias is not None and bias.shape != (channels,):
                return False
        if vec is None:
            return False
        new_bias = vec.astype(np.float64) + (0.0 if bias is None else bias.astype(np.float64))
        params_in = {other.name} | ({op.inputs[BIAS].name} if has_bias else set())
        if not bypass(add, y):
            return False
        self.orphans |= {n for n in params_in if n}
        own_initializer(g, op, BIAS, new_bias.astype(dtype), namer,
                        base_name=None if has_bias else f"{op.outputs[0].name}_bias")
        if op.op_type == "Gemm":
            set_attr(op, "beta", 1.0)
        return True
