"""How small a model gets on disk: file size, general-purpose compressors, and Deep Compression's measure.

``size_report(model)`` gives the serialized size, its zlib (level 9) and lzma sizes (zstd too when the
``zstandard`` package is installed), and the size of the weights entropy-coded the way Deep Compression
(Han et al. 2016) counts it, per tensor and in total:

* 8-bit integer tensors (the weights of a QDQ model) are coded as symbols: either **dense** (every value
  Huffman-coded) or **sparse** (the values that are not the zero point, Huffman-coded, plus the gap before
  each one -- the number of zero-point values skipped -- Huffman-coded as well; a gap longer than
  ``2**index_bits - 1`` is split with a filler zero value, as in Deep Compression's relative indexing).
  Whichever is smaller counts. Each Huffman table costs ``symbols * (symbol_bits + 8)`` bits (the symbol
  and its code length, enough for a canonical code).
* Float tensors are not quantized: dense they cost their raw bytes; sparse, the non-zero values at full
  width plus the Huffman-coded gaps.
* Everything else (int32 biases, int64 shapes, scales) and the graph itself count at their raw size:
  ``total_coded = model bytes - raw bytes of the coded tensors + their coded bytes``.

Huffman lengths are exact (built with a heap), not the entropy bound; ``entropy_bits`` reports the bound
beside them.
"""

from __future__ import annotations

import heapq
import lzma
import math
import zlib
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

INDEX_BITS = 8  # Deep Compression: 8 bits of relative index for conv layers (5 for fc); one width for all here
MIN_ELEMENTS = 256  # tensors smaller than this are counted raw (biases, scales, shapes)
LENGTH_BITS = 8  # bits per codebook entry for its code length


def huffman_lengths(counts: dict) -> dict:
    """Code length of every symbol of a Huffman code for ``counts`` ({symbol: count > 0}); one symbol: 1 bit."""
    items = [(c, i, s) for i, (s, c) in enumerate(sorted(counts.items(), key=lambda kv: repr(kv[0]))) if c > 0]
    if not items:
        return {}
    if len(items) == 1:
        return {items[0][2]: 1}
    lengths = {s: 0 for _, _, s in items}
    # heap of (count, tie-break, symbols under this node): merging two nodes deepens all their symbols
    heap = [(c, i, [s]) for c, i, s in items]
    heapq.heapify(heap)
    tie = len(heap)
    while len(heap) > 1:
        c1, _, s1 = heapq.heappop(heap)
        c2, _, s2 = heapq.heappop(heap)
        for s in s1 + s2:
            lengths[s] += 1
        heapq.heappush(heap, (c1 + c2, tie, s1 + s2))
        tie += 1
    return lengths


def huffman_bits(symbols: np.ndarray) -> tuple[int, int]:
    """(payload bits, distinct symbols) of ``symbols`` Huffman-coded."""
    values, counts = np.unique(np.asarray(symbols).ravel(), return_counts=True)
    lengths = huffman_lengths({v.item(): int(c) for v, c in zip(values, counts, strict=True)})
    return sum(int(c) * lengths[v.item()] for v, c in zip(values, counts, strict=True)), len(values)


def entropy_bits(symbols: np.ndarray) -> float:
    """Shannon bound: n * H(symbols) bits."""
    _, counts = np.unique(np.asarray(symbols).ravel(), return_counts=True)
    p = counts / counts.sum() if counts.size else counts
    return float(-(counts * np.log2(p)).sum()) if counts.size else 0.0


def sparse_streams(flat: np.ndarray, is_zero: np.ndarray, index_bits: int = INDEX_BITS) -> tuple[np.ndarray, np.ndarray]:
    """(values, gaps) of Deep Compression's relative-index format, as multisets (Huffman only needs counts).

    Each kept value is stored with the number of zeros skipped before it; a gap above ``2**index_bits - 1``
    becomes fillers (gap ``cap``, a stored zero value) until the rest fits. Trailing zeros are implied."""
    cap = (1 << index_bits) - 1
    pos = np.flatnonzero(~is_zero)
    gaps = np.diff(np.concatenate([[-1], pos])) - 1
    fillers = int(np.sum(gaps // (cap + 1)))
    zero_value = flat[is_zero][0] if is_zero.any() else flat.dtype.type(0)
    values = np.concatenate([np.full(fillers, zero_value, dtype=flat.dtype), flat[pos]])
    return values, np.concatenate([np.full(fillers, cap, dtype=np.int64), gaps % (cap + 1)]).astype(np.int64)


@dataclass
class TensorSize:
    name: str
    dtype: str
    elements: int
    zeros: int  # values equal to the zero point (0 for floats)
    raw_bytes: int
    dense_bits: int  # Huffman-coded values (quantized) or raw bits (float), with its codebook
    sparse_bits: int  # values + relative indices, each Huffman-coded where quantized, with codebooks
    coded_bytes: int  # ceil(min(dense_bits, sparse_bits) / 8)
    entropy_bits: float  # Shannon bound of the dense symbol stream (quantized only; raw bits for floats)
    form: str  # "dense" or "sparse"

    @property
    def sparsity(self) -> float:
        return self.zeros / self.elements if self.elements else 0.0


def _codebook_bits(symbols: int, symbol_bits: int) -> int:
    return symbols * (symbol_bits + LENGTH_BITS) if symbols > 1 else symbol_bits


def tensor_size(name: str, array: np.ndarray, zero_point: np.ndarray | int = 0,
                index_bits: int = INDEX_BITS) -> TensorSize:
    """Coded size of one tensor; ``zero_point`` broadcasts against ``array`` (per-channel zero points)."""
    a = np.asarray(array)
    flat = a.ravel()
    is_zero = (a == np.broadcast_to(np.asarray(zero_point, dtype=a.dtype), a.shape)).ravel()
    quantized = a.dtype.kind in "iu" and a.dtype.itemsize == 1
    width = a.dtype.itemsize * 8
    raw = a.nbytes
    values, gaps = sparse_streams(flat, is_zero, index_bits)
    g_bits, g_syms = huffman_bits(gaps) if gaps.size else (0, 0)
    gap_cost = g_bits + _codebook_bits(g_syms, index_bits) if gaps.size else 0
    if quantized:
        d_bits, d_syms = huffman_bits(flat) if flat.size else (0, 0)
        dense = d_bits + _codebook_bits(d_syms, width)
        v_bits, v_syms = huffman_bits(values) if values.size else (0, 0)
        sparse = v_bits + (_codebook_bits(v_syms, width) if values.size else 0) + gap_cost
        ent = entropy_bits(flat)
    else:
        dense = raw * 8
        sparse = values.size * width + gap_cost
        ent = float(dense)
    best = min(dense, sparse)
    return TensorSize(name, str(a.dtype), int(a.size), int(is_zero.sum()), raw, int(dense), int(sparse),
                      int(math.ceil(best / 8)), round(ent, 1), "dense" if dense <= sparse else "sparse")


def _zero_points(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """{quantized initializer: its zero point shaped to broadcast} from the DequantizeLinear nodes reading it."""
    inits = {t.name: t for t in model.graph.initializer}
    out: dict[str, np.ndarray] = {}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        q = inits[node.input[0]]
        has_zp = len(node.input) > 2 and node.input[2] in inits
        zp = numpy_helper.to_array(inits[node.input[2]]) if has_zp else None
        if zp is None:
            continue
        if zp.ndim == 1 and zp.size > 1:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            shape = [1] * len(q.dims)
            shape[axis % len(q.dims)] = zp.size
            zp = zp.reshape(shape)
        out[node.input[0]] = zp
    return out


def _compressed(data: bytes, zstd: bool, use_lzma: bool) -> dict[str, int]:
    out = {"zlib_bytes": len(zlib.compress(data, 9))}
    if use_lzma:
        out["lzma_bytes"] = len(lzma.compress(data, preset=9))
    if zstd:
        try:
            import zstandard
        except ImportError:
            pass
        else:
            out["zstd_bytes"] = len(zstandard.ZstdCompressor(level=19).compress(data))
    return out


def size_report(model: ir.Model | onnx.ModelProto | str | Path, *, use_lzma: bool = True, zstd: bool = True,
                min_elements: int = MIN_ELEMENTS, index_bits: int = INDEX_BITS) -> dict:
    """Sizes of ``model`` (a proto or a file): bytes, compressed bytes, and the entropy-coded measure.

    Returns {"bytes", "zlib_bytes", "lzma_bytes", ["zstd_bytes"], "weights_raw_bytes", "weights_coded_bytes",
    "total_coded_bytes", "tensors": [TensorSize as dict, largest first]}. Tensors with fewer than
    ``min_elements`` values and non-float, non-8-bit tensors are counted raw in the total.
    """
    if isinstance(model, str | Path):
        data = Path(model).read_bytes()
        model = onnx.ModelProto.FromString(data)
    else:
        if isinstance(model, ir.Model):  # what the file would hold: the protobuf, weights embedded
            from onnxopt.graph import clone_model
            from onnxopt.model_io import external_files, to_proto

            model = to_proto(ir.external_data.load_to_model(clone_model(model)) if external_files(model) else model)
        data = model.SerializeToString(deterministic=True)
    zps = _zero_points(model)
    tensors: list[TensorSize] = []
    for t in model.graph.initializer:
        a = numpy_helper.to_array(t)
        coded = (a.dtype.kind == "f" or (a.dtype.kind in "iu" and a.dtype.itemsize == 1)) and a.size >= min_elements
        if coded:
            tensors.append(tensor_size(t.name, a, zps.get(t.name, 0), index_bits))
    raw = sum(s.raw_bytes for s in tensors)
    coded = sum(s.coded_bytes for s in tensors)
    out = {"bytes": len(data), **_compressed(data, zstd, use_lzma), "weights_raw_bytes": raw,
           "weights_coded_bytes": coded, "total_coded_bytes": len(data) - raw + coded}
    out["tensors"] = [dict(asdict(s), sparsity=round(s.sparsity, 4))
                      for s in sorted(tensors, key=lambda s: (-s.raw_bytes, s.name))]
    return out


def summary(report: dict, top: int = 10) -> dict:
    """The report for a pass's details: totals and the ``top`` largest tensors."""
    keep = {k: v for k, v in report.items() if k != "tensors"}
    keep["tensors"] = {s["name"]: {k: s[k] for k in ("dtype", "elements", "sparsity", "raw_bytes", "coded_bytes",
                                                      "form")} for s in report["tensors"][:top]}
    keep["counts"] = dict(Counter(s["form"] for s in report["tensors"]))
    return keep
