"""Weight sharing (Deep Compression's k-means step) on the 8-bit weights of a QDQ model.

For every ``DequantizeLinear`` reading an int8/uint8 initializer of at least ``min_elements`` values, the
values that are not the zero point are clustered into ``2**bits - 1`` integer centroids (1-D k-means,
linear initialisation as Han et al. 2016 recommend, each value weighted by its channel's ``scale**2`` so the
clusters minimise the error of the dequantized float weights); every value is replaced by its centroid. The
zero point stays exact, so pruned weights stay pruned and the tensor holds at most ``2**bits`` distinct
values: entropy coding (``onnxopt.compression``) then pays about ``bits`` or fewer per value, while the graph
stays an ordinary QDQ model every runtime executes (the codebook is implicit in the int8 values, so it costs
nothing extra beyond the Huffman table the size report already counts).

Run after ``quantize-qdq``; without fine-tuning of the centroids, so validate with a gate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx_ir as ir
from pydantic import Field

from onnxopt.errors import PreconditionError
from onnxopt.graph import attr, constant_value, is_initializer, is_op, release, set_constant
from onnxopt.pass_infra import Pass, PassConfig, PassResult

INT8_TYPES = (ir.DataType.INT8, ir.DataType.UINT8)


class ShareWeightsConfig(PassConfig):
    type: Literal["share-weights"] = "share-weights"
    bits: int = Field(4, ge=1, le=7, description="codebook of 2**bits values per tensor (the zero point included)")
    min_elements: int = Field(256, ge=1, description="leave 8-bit weights with fewer values than this")
    iterations: int = Field(50, ge=1, le=1000, description="k-means (Lloyd) iterations at most")


@dataclass
class SharedTensor:
    name: str
    elements: int
    distinct_before: int
    distinct_after: int
    rel_error: float  # ||dequant(new) - dequant(old)|| / ||dequant(old)||


@dataclass
class ShareWeightsResult(PassResult):
    tensors: dict[str, SharedTensor] = field(default_factory=dict)


def kmeans_1d(values: np.ndarray, weights: np.ndarray, k: int, iterations: int) -> np.ndarray:
    """Integer centroids (sorted, distinct, never 0) of a weighted 1-D k-means of non-zero integer ``values``.

    Works on the histogram of the (at most 255) distinct values, so its cost does not grow with the tensor."""
    levels, inverse = np.unique(values, return_inverse=True)
    mass = np.bincount(inverse, weights=weights, minlength=len(levels))
    if len(levels) <= k:
        return levels.astype(np.int64)
    centroids = np.linspace(float(levels[0]), float(levels[-1]), k)
    for _ in range(iterations):
        edges = (centroids[1:] + centroids[:-1]) / 2
        assign = np.searchsorted(edges, levels)
        tot = np.bincount(assign, weights=mass, minlength=k)
        acc = np.bincount(assign, weights=mass * levels, minlength=k)
        new = np.where(tot > 0, acc / np.maximum(tot, 1e-300), centroids)
        if np.allclose(new, centroids):
            break
        centroids = new
    # integers that keep their sign (0 is the zero point's own symbol), distinct
    ints = np.where(centroids < 0, np.minimum(np.rint(centroids), -1), np.maximum(np.rint(centroids), 1))
    return np.unique(ints.astype(np.int64))


def share(q: np.ndarray, zero_point: np.ndarray, scale2: np.ndarray, bits: int,
          iterations: int) -> np.ndarray:
    """``q`` with every non-zero-point value replaced by its nearest centroid (broadcast zp and scale**2)."""
    v = q.astype(np.int64) - zero_point
    kept = v != 0
    if not kept.any():
        return q
    centroids = kmeans_1d(v[kept], np.broadcast_to(scale2, q.shape)[kept], (1 << bits) - 1, iterations)
    edges = (centroids[1:] + centroids[:-1]) / 2
    out = v.copy()
    out[kept] = centroids[np.searchsorted(edges, v[kept])]
    info = np.iinfo(q.dtype)
    return np.clip(out + zero_point, info.min, info.max).astype(q.dtype)


class ShareWeights(Pass):
    name = "share-weights"
    summary = ("Weight sharing: cluster each 8-bit weight tensor of a QDQ model into 2**bits values (k-means, "
               "zero point kept) so entropy coding stores about `bits` per weight.")
    Config = ShareWeightsConfig

    def requires(self, model: ir.Model) -> None:
        super().requires(model)
        if not any(n.op_type == "DequantizeLinear" for n in model.graph):
            raise PreconditionError("share-weights: the model has no DequantizeLinear; run quantize-qdq first")

    def call(self, model: ir.Model) -> ShareWeightsResult:
        cfg: ShareWeightsConfig = self.config  # type: ignore[assignment]
        result = ShareWeightsResult(model, False)
        skipped: dict[str, str] = {}
        for node in list(model.graph):
            if not is_op(node, "DequantizeLinear"):
                continue
            qv = node.inputs[0]
            name = qv.name
            if name in result.tensors or not is_initializer(qv) or qv.const_value is None:
                continue
            # dtype and size from the tensor; its values are read only when it is clustered
            if qv.const_value.dtype not in INT8_TYPES or qv.const_value.size < cfg.min_elements:
                continue
            if attr(node, "block_size", 0):
                skipped[name] = "block quantization"
                continue
            if any(u.op_type != "DequantizeLinear" for u in qv.consumers()):
                skipped[name] = "read by a node other than DequantizeLinear"
                continue
            has_zp = len(node.inputs) > 2 and node.inputs[2] is not None
            scale = constant_value(node.inputs[1])
            zp = constant_value(node.inputs[2]) if has_zp else None
            if scale is None or (has_zp and zp is None):
                skipped[name] = "scale or zero point is not constant"
                continue
            q = constant_value(qv)
            zp = np.zeros((), np.int64) if zp is None else zp.astype(np.int64)
            scale = scale.astype(np.float64)
            if scale.ndim == 1 and scale.size > 1:
                axis = attr(node, "axis", 1) % q.ndim
                shape = [1] * q.ndim
                shape[axis] = -1
                scale, zp = scale.reshape(shape), zp.reshape(shape)
            new = share(q, zp, scale ** 2, cfg.bits, cfg.iterations)
            old_f = (q.astype(np.int64) - zp) * scale
            new_f = (new.astype(np.int64) - zp) * scale
            den = float(np.linalg.norm(old_f))
            result.tensors[name] = SharedTensor(name, int(q.size), int(np.unique(q).size), int(np.unique(new).size),
                                                float(np.linalg.norm(new_f - old_f)) / den if den else 0.0)
            changed = not np.array_equal(new, q)
            del q, old_f, new_f  # no view of the stored tensor outlives it (a mapped one is let go below)
            if changed:
                set_constant(qv, new)
                result.modified = True
            else:
                del new  # (may be the stored tensor itself)
                release(qv)
        result.details = self._details(result, skipped)
        return result

    def _details(self, result: ShareWeightsResult, skipped: dict[str, str]) -> dict[str, Any]:
        return {
            "bits": self.config.bits,
            "tensors": {k: {"elements": v.elements, "distinct_before": v.distinct_before,
                            "distinct_after": v.distinct_after, "rel_error": round(v.rel_error, 6)}
                        for k, v in result.tensors.items()},
            "skipped": skipped,
        }
