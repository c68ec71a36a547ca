"""Layers with constant weights, as the weight-rewriting passes (pruning, low-rank, recovery) see them.

``Geometry`` is a convolution's patch geometry and its im2col (the rows a conv's weights multiply, so a
conv is treated like a matrix layer); ``constant_weight`` reads a float weight; ``fold_into_following_add``
moves a correction into the bias an exporter wrote as a separate Add.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxopt.errors import OnnxoptError
from onnxopt.graph import attr, constant_value, is_initializer, is_op, only_use, set_constant

FLOAT_DTYPES = (np.float16, np.float32, np.float64)


def node_label(node: ir.Node) -> str:
    return node.name or f"{node.op_type}({node.outputs[0].name})"


def constant_weight(value: ir.Value | None) -> np.ndarray | None:
    """A float initializer's (or Constant's) values, else None."""
    w = constant_value(value)
    if w is None or w.dtype.type not in FLOAT_DTYPES:
        return None
    return w


def fold_into_following_add(node: ir.Node, delta: np.ndarray) -> bool:
    """Add ``delta`` to the constant of the Add that alone reads ``node``'s output (the exporters' bias)."""
    out = node.outputs[0]
    add = only_use(out)
    if not is_op(add, "Add") or len(add.inputs) != 2:
        return False
    other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
    if other is out or not is_initializer(other) or other.is_graph_output():
        return False
    if [u.node for u in other.uses()] != [add]:
        return False
    c = constant_value(other)
    if c is None or c.dtype.kind != "f" or c.ndim > 1 and any(d != 1 for d in c.shape[:-1]):
        return False
    if c.ndim and c.shape[-1] not in (1, delta.shape[0]):
        return False
    new_c = (c + delta).astype(c.dtype)  # [N] or [1, .., N]: the Add's output shape does not change
    new_c = new_c.reshape(c.shape[:-1] + (delta.shape[0],)) if c.ndim else new_c
    del c  # no view of the old constant may outlive it: a memory-mapped one is let go when it is replaced
    set_constant(other, new_c)
    return True


@dataclass(frozen=True)
class Geometry:
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    pads: tuple[int, ...]
    dilations: tuple[int, ...]
    auto_pad: str

    @classmethod
    def of(cls, node: ir.Node, kernel: tuple[int, ...]) -> Geometry:
        nd = len(kernel)
        auto_pad = attr(node, "auto_pad", "NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
        return cls(tuple(kernel), tuple(attr(node, "strides", [1] * nd)), tuple(attr(node, "pads", [0] * (2 * nd))),
                   tuple(attr(node, "dilations", [1] * nd)), auto_pad)

    def pads_for(self, spatial: tuple[int, ...]) -> tuple[list[int], list[int]]:
        nd = len(self.kernel)
        if self.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            begin, end = [], []
            for i, size in enumerate(spatial):
                out = -(-size // self.strides[i])
                total = max((out - 1) * self.strides[i] + (self.kernel[i] - 1) * self.dilations[i] + 1 - size, 0)
                small, big = total // 2, total - total // 2
                begin.append(small if self.auto_pad == "SAME_UPPER" else big)
                end.append(big if self.auto_pad == "SAME_UPPER" else small)
            return begin, end
        if self.auto_pad == "VALID":
            return [0] * nd, [0] * nd
        return list(self.pads[:nd]), list(self.pads[nd:])

    def rows(self, c_in: int):
        """x [N, C, *spatial] -> im2col rows [N * out positions, C * prod(k)] (c-major, like W's layout)."""
        nd, kernel = len(self.kernel), self.kernel

        def rows(x: np.ndarray) -> np.ndarray:
            if x.ndim != nd + 2 or x.shape[1] != c_in:
                raise OnnxoptError(f"conv input has shape {list(x.shape)}; expected [N, {c_in}, {nd} spatial dims]")
            begin, end = self.pads_for(x.shape[2:])
            if any(begin) or any(end):
                x = np.pad(x, [(0, 0), (0, 0)] + list(zip(begin, end, strict=True)))
            out = [(x.shape[2 + i] - self.dilations[i] * (kernel[i] - 1) - 1) // self.strides[i] + 1
                   for i in range(nd)]
            cols = np.empty((x.shape[0], *out, c_in, *kernel), dtype=x.dtype)
            for off in np.ndindex(*kernel):
                sl = tuple(slice(off[i] * self.dilations[i], off[i] * self.dilations[i]
                                 + (out[i] - 1) * self.strides[i] + 1, self.strides[i]) for i in range(nd))
                cols[(Ellipsis, *off)] = np.moveaxis(x[(slice(None), slice(None), *sl)], 1, -1)
            return cols.reshape(-1, c_in * math.prod(kernel))

        return rows

    def sampled_rows(self, x: np.ndarray, y: np.ndarray, count: int, rng: np.random.Generator
                     ) -> tuple[np.ndarray, np.ndarray]:
        """At most ``count`` output positions of the conv ``x [N, C, *spatial] -> y [N, O, *out]``, drawn
        without replacement: (im2col rows of ``x`` [R, C * prod(k)], the matching rows of ``y`` [R, O]). Only
        the drawn patches are gathered, padding included without padding ``x`` (a full im2col, or a padded
        copy, of a 112x112 map costs more than the statistics)."""
        nd, kernel = len(self.kernel), self.kernel
        begin, end = self.pads_for(x.shape[2:])
        out = tuple((x.shape[2 + i] + begin[i] + end[i] - self.dilations[i] * (kernel[i] - 1) - 1)
                    // self.strides[i] + 1 for i in range(nd))
        if tuple(y.shape[2:]) != out or y.shape[0] != x.shape[0]:
            raise OnnxoptError(f"conv output has shape {list(y.shape)}; its input {list(x.shape)} gives "
                               f"[{x.shape[0]}, O, {', '.join(map(str, out))}]")
        total = x.shape[0] * math.prod(out)
        idx = np.arange(total) if total <= count else np.sort(rng.choice(total, count, replace=False))
        coords = np.unravel_index(idx, (x.shape[0], *out))
        cols = np.empty((len(idx), x.shape[1], *kernel), dtype=x.dtype)
        for off in np.ndindex(*kernel):
            at = [coords[1 + i] * self.strides[i] + off[i] * self.dilations[i] - begin[i] for i in range(nd)]
            inside = np.ones(len(idx), dtype=bool)
            for i in range(nd):
                inside &= (at[i] >= 0) & (at[i] < x.shape[2 + i])
                at[i] = np.clip(at[i], 0, x.shape[2 + i] - 1)
            patch = x[(coords[0], slice(None), *at)]
            if not inside.all():
                patch[~inside] = 0
            cols[(slice(None), slice(None), *off)] = patch
        return cols.reshape(len(idx), -1), y[(coords[0], slice(None), *coords[1:])]
