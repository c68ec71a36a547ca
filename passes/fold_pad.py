"""Fold a zero constant Pad into the Conv that reads it: the Conv pads by itself for free.

Only spatial padding folds (N and C pads must be zero), never negative (cropping) pads,
and only when the Conv is the Pad's one consumer and takes it as X.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxopt.graph import (
    attr,
    constant_value,
    drop_unused_initializers,
    is_op,
    only_use,
    opset_version,
    set_attr,
)
from onnxopt.pass_infra import Pass, PassConfig, PassResult


class FoldPadIntoConvConfig(PassConfig):
    type: Literal["fold-pad-into-conv"] = "fold-pad-into-conv"


def _pad_amounts(pad: ir.Node, opset: int, rank: int) -> list[int] | None:
    """The Pad's [x1_begin, ..., x1_end, ...] over all ``rank`` axes if it pads zeros, else None."""
    if attr(pad, "mode", "constant") != "constant":
        return None
    if opset < 11:
        pads, value = attr(pad, "pads", attr(pad, "paddings")), attr(pad, "value", 0.0)
        axes = None
    else:
        inputs = list(pad.inputs) + [None] * (4 - len(pad.inputs))
        pads = constant_value(inputs[1]) if inputs[1] is not None else None
        value = constant_value(inputs[2]) if inputs[2] is not None else 0
        axes = constant_value(inputs[3]) if inputs[3] is not None else None
        if value is None or (inputs[3] is not None and axes is None):
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


class FoldPadIntoConv(Pass):
    name = "fold-pad-into-conv"
    summary = "Fold zero constant Pad nodes into the pads of the Conv that consumes them."
    Config = FoldPadIntoConvConfig

    def call(self, model: ir.Model) -> PassResult:
        g, opset, folded = model.graph, opset_version(model), 0
        while True:  # a second round catches Pad -> Pad -> Conv chains
            doomed = [pad for pad in list(g) if self._fold(pad, opset)]
            if not doomed:
                break
            orphans = {x.name for pad in doomed for x in pad.inputs[1:] if x is not None}
            g.remove(doomed, safe=True)
            drop_unused_initializers(g, orphans)
            folded += len(doomed)
        return PassResult(model, folded > 0, {"folded": folded})

    @staticmethod
    def _fold(pad: ir.Node, opset: int) -> bool:
        if not is_op(pad, "Pad") or not pad.inputs or pad.inputs[0] is None:
            return False
        out = pad.outputs[0]
        conv = only_use(out)
        if not is_op(conv, "Conv") or conv.inputs[0] is not out:
            return False
        auto_pad = attr(conv, "auto_pad", "NOTSET")
        if auto_pad not in ("NOTSET", "VALID"):
            return False
        kernel = attr(conv, "kernel_shape")
        weight = conv.inputs[1] if len(conv.inputs) > 1 else None
        wshape = weight.shape if weight is not None else None
        rank = len(kernel) + 2 if kernel else len(wshape) if wshape is not None else 0
        pads = _pad_amounts(pad, opset, rank) if rank > 2 else None
        if pads is None or min(pads) < 0 or pads[0] or pads[1] or pads[rank] or pads[rank + 1]:
            return False
        spatial = rank - 2
        old = [0] * (2 * spatial) if auto_pad == "VALID" else attr(conv, "pads", [0] * (2 * spatial))
        new = [old[i] + pads[2 + i] for i in range(spatial)] + [old[spatial + i] + pads[rank + 2 + i]
                                                                for i in range(spatial)]
        # rewritten attributes move to the end, as the protobuf version of this pass wrote them
        conv.attributes.pop("pads", None)
        set_attr(conv, "pads", new)
        if auto_pad == "VALID":
            conv.attributes.pop("auto_pad", None)
            set_attr(conv, "auto_pad", "NOTSET")
        conv.replace_input_with(0, pad.inputs[0])
        return True
