"""Fold a zero constant Pad into the Conv that reads it: the Conv pads by itself for free.

Only spatial padding folds (N and C pads must be zero), never negative (cropping) pads,
and only when the Conv is the Pad's one consumer and takes it as X.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import onnx

from onnxopt.legacy_graph import (
    GraphIndex,
    attr,
    delete_nodes,
    drop_initializers,
    drop_value_info,
    opset_version,
    set_attr,
)
from onnxopt.pass_infra import PassConfig, PassResult, ProtoPass

DEFAULT_DOMAINS = ("", "ai.onnx")


class FoldPadIntoConvConfig(PassConfig):
    type: Literal["fold-pad-into-conv"] = "fold-pad-into-conv"


def _pad_amounts(index: GraphIndex, pad: onnx.NodeProto, opset: int, rank: int) -> list[int] | None:
    """The Pad's [x1_begin, ..., x1_end, ...] over all ``rank`` axes if it pads zeros, else None."""
    if attr(pad, "mode", b"constant") != b"constant":
        return None
    if opset < 11:
        pads, value = attr(pad, "pads", attr(pad, "paddings")), attr(pad, "value", 0.0)
        axes = None
    else:
        inputs = list(pad.input) + [""] * (4 - len(pad.input))
        pads = index.constant(inputs[1]) if inputs[1] else None
        value = index.constant(inputs[2]) if inputs[2] else 0
        axes = index.constant(inputs[3]) if inputs[3] else None
        if value is None or (inputs[3] and axes is None):
            return None
    if pads is None or np.any(np.asarray(value) != 0):
        return None
    pads = [int(p) for p in np.asarray(pads).reshape(-1)]
    if axes is None:
        return pads if len(pads) == 2 * rank else None
    axes = [int(a) % rank for a in np.asarray(axes).reshape(-1) if -rank <= a < rank]
    if len(set(axes)) != len(axes) or len(pads) != 2 * len(axes):
        return None
    full = [0] * (2 * rank)
    for k, axis in enumerate(axes):
        full[axis], full[rank + axis] = pads[k], pads[len(axes) + k]
    return full


class FoldPadIntoConv(ProtoPass):
    name = "fold-pad-into-conv"
    summary = "Fold zero constant Pad nodes into the pads of the Conv that consumes them."
    Config = FoldPadIntoConvConfig

    def call(self, model: onnx.ModelProto) -> PassResult:
        g, opset, folded = model.graph, opset_version(model), 0
        while True:  # a second round catches Pad -> Pad -> Conv chains
            index = GraphIndex(g)
            doomed = [pad for pad in g.node if self._fold(index, pad, opset)]
            if not doomed:
                break
            orphans = {x for pad in doomed for x in pad.input[1:]}
            gone = {pad.output[0] for pad in doomed}
            delete_nodes(g, doomed)
            drop_initializers(g, orphans)
            drop_value_info(g, candidates=gone)
            folded += len(doomed)
        return PassResult(model, folded > 0, {"folded": folded})

    @staticmethod
    def _fold(index: GraphIndex, pad: onnx.NodeProto, opset: int) -> bool:
        if pad.op_type != "Pad" or pad.domain not in DEFAULT_DOMAINS:
            return False
        conv = index.only_use(pad.output[0])
        if conv is None or conv.op_type != "Conv" or conv.domain not in DEFAULT_DOMAINS:
            return False
        if list(conv.input).count(pad.output[0]) != 1 or conv.input[0] != pad.output[0]:
            return False
        auto_pad = attr(conv, "auto_pad", b"NOTSET")
        if auto_pad not in (b"NOTSET", b"VALID"):
            return False
        kernel = attr(conv, "kernel_shape")
        weight = index.initializers.get(conv.input[1])
        rank = len(kernel) + 2 if kernel else len(weight.dims) if weight is not None else 0
        pads = _pad_amounts(index, pad, opset, rank) if rank > 2 else None
        if pads is None or min(pads) < 0 or pads[0] or pads[1] or pads[rank] or pads[rank + 1]:
            return False
        spatial = rank - 2
        old = [0] * (2 * spatial) if auto_pad == b"VALID" else attr(conv, "pads", [0] * (2 * spatial))
        new = [old[i] + pads[2 + i] for i in range(spatial)] + [old[spatial + i] + pads[rank + 2 + i]
                                                                for i in range(spatial)]
        set_attr(conv, "pads", new)
        if auto_pad == b"VALID":
            set_attr(conv, "auto_pad", "NOTSET")
        index.replace_input(conv, pad.output[0], pad.input[0])
        return True
