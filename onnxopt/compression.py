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
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt.graph import attr, clone_model, constant_value, is_op, release
from onnxopt.model_io import external_files, from_proto, read_model_proto, to_proto

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


def _zero_points(graph: ir.Graph) -> dict[str, np.ndarray]:
    """{quantized initializer: its zero point shaped to broadcast} from the DequantizeLinear nodes reading it."""
    out: dict[str, np.ndarray] = {}
    for node in graph:
        q = node.inputs[0] if is_op(node, "DequantizeLinear") and node.inputs else None
        if q is None or not q.is_initializer() or q.const_value is None:
            continue
        zp = constant_value(node.inputs[2]) if len(node.inputs) > 2 else None
        if zp is None:
            continue
        if zp.ndim == 1 and zp.size > 1:
            rank = len(q.const_value.shape)
            shape = [1] * rank
            shape[attr(node, "axis", 1) % rank] = zp.size
            zp = zp.reshape(shape)
        out[q.name] = zp
    return out


class _Compressors:
    """zlib (level 9), lzma and zstd sizes of a byte stream fed in pieces (the same bytes as one-shot)."""

    def __init__(self, total: int, zstd: bool, use_lzma: bool):
        self.sizes = {"zlib_bytes": 0}
        self._objs: dict[str, object] = {"zlib_bytes": zlib.compressobj(9)}
        if use_lzma:
            self.sizes["lzma_bytes"] = 0
            self._objs["lzma_bytes"] = lzma.LZMACompressor(preset=9)
        if zstd:
            try:
                import zstandard
            except ImportError:
                pass
            else:  # the pledged size gives the parameters and header of the one-shot call
                self.sizes["zstd_bytes"] = 0
                self._objs["zstd_bytes"] = zstandard.ZstdCompressor(level=19).compressobj(size=total)
        self.fed = 0

    def feed(self, data: bytes) -> None:
        self.fed += len(data)
        for key, obj in self._objs.items():
            self.sizes[key] += len(obj.compress(data))

    def result(self) -> dict[str, int]:
        for key, obj in self._objs.items():
            self.sizes[key] += len(obj.flush())
        return dict(self.sizes)


def _fields(message, keep) -> bytes:
    """The serialization of ``message``'s fields whose number passes ``keep`` (fields are written in number
    order, so the pieces of a message concatenate to the whole)."""
    part = type(message)()
    for fd, value in message.ListFields():
        if not keep(fd.number):
            continue
        if fd.is_repeated:
            getattr(part, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(part, fd.name).CopyFrom(value)
        else:
            setattr(part, fd.name, value)
    return part.SerializeToString(deterministic=True)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


_MODEL_GRAPH = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
_GRAPH_INITIALIZER = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number


def _model_pieces(skeleton: onnx.ModelProto, sizes: list[int], tensors) -> tuple[int, Iterator[bytes]]:
    """(size, pieces) of the serialized model: ``skeleton`` (a ModelProto whose graph has no initializers) with
    the initializers that ``tensors`` yields (serialized, ``sizes[i]`` bytes each) in place, one at a time."""
    graph = skeleton.graph
    head = _fields(graph, lambda n: n < _GRAPH_INITIALIZER)
    tail = _fields(graph, lambda n: n > _GRAPH_INITIALIZER)
    tag = _varint(_GRAPH_INITIALIZER << 3 | 2)
    length = len(head) + len(tail) + sum(len(tag) + len(_varint(n)) + n for n in sizes)
    before = _fields(skeleton, lambda n: n < _MODEL_GRAPH)
    after = _fields(skeleton, lambda n: n > _MODEL_GRAPH)
    graph_tag = _varint(_MODEL_GRAPH << 3 | 2) + _varint(length) if skeleton.HasField("graph") else b""
    total = len(before) + len(graph_tag) + (length if graph_tag else 0) + len(after)

    def pieces() -> Iterator[bytes]:
        yield before
        if graph_tag:
            yield graph_tag
            yield head
            for data in tensors:
                yield tag + _varint(len(data)) + data
            yield tail
        yield after

    return total, pieces()


def _embedded(value: ir.Value) -> bytes:
    """An initializer serialized as a protobuf file would hold it (external data read in)."""
    tensor = value.const_value
    if isinstance(tensor, ir.ExternalTensor):
        tensor = ir.Tensor(tensor.numpy(), name=value.name, dtype=tensor.dtype)
    tensor.name = value.name
    return ir.serde.serialize_tensor(tensor).SerializeToString(deterministic=True)


def _embedded_once(value: ir.Value) -> bytes:
    data = _embedded(value)
    release(value)
    return data


def _ir_skeleton(model: ir.Model) -> onnx.ModelProto:
    """What ``to_proto`` writes for the model, without the main graph's initializers (they are added one at a
    time, in the graph's order); nothing is read but the bodies' (small) initializers."""
    light = clone_model(model)
    for value in light.graph.initializers.values():
        tensor = value.const_value
        if tensor is not None:  # a stand-in of the same name, type and shape; its data is never read
            value.const_value = ir.ExternalTensor("size-report", offset=None, length=None, dtype=tensor.dtype,
                                                  shape=ir.Shape(tensor.shape), name=value.name, base_dir="")
    for graph in light.graphs():
        if graph is light.graph:
            continue
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                value.const_value = ir.Tensor(value.const_value.numpy(), name=value.name,
                                              dtype=value.const_value.dtype)
    skeleton = to_proto(light)
    del skeleton.graph.initializer[:]
    return skeleton


def _stream_file(path: Path, sink: _Compressors) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            sink.feed(chunk)


def size_report(model: ir.Model | onnx.ModelProto | str | Path, *, use_lzma: bool = True, zstd: bool = True,
                min_elements: int = MIN_ELEMENTS, index_bits: int = INDEX_BITS) -> dict:
    """Sizes of ``model`` (the IR, a proto or a file): bytes, compressed bytes, and the entropy-coded measure.

    Returns {"bytes", "zlib_bytes", "lzma_bytes", ["zstd_bytes"], "weights_raw_bytes", "weights_coded_bytes",
    "total_coded_bytes", "tensors": [TensorSize as dict, largest first]}. Tensors with fewer than
    ``min_elements`` values and non-float, non-8-bit tensors are counted raw in the total.

    A model in memory is measured as the single protobuf file it would be written as (weights embedded); a
    file as it is on disk (with its external data files, if any). Weights are read one at a time, and the
    bytes reach the compressors in pieces: the model is never serialized as a whole.
    """
    path = None
    if isinstance(model, str | Path):
        path = Path(model)
        proto = read_model_proto(path, check=False)
        ir_model = from_proto(proto, base_dir=path.parent)
    elif isinstance(model, onnx.ModelProto):
        proto, ir_model = model, from_proto(model)
    else:
        proto, ir_model = None, model
    graph = ir_model.graph
    zps = _zero_points(graph)
    tensors: list[TensorSize] = []
    sizes: list[int] = []
    values = [v for v in graph.initializers.values() if v.const_value is not None]
    for value in values:
        tensor = value.const_value
        try:
            dtype = tensor.dtype.numpy()
        except Exception:  # noqa: BLE001 - a type numpy cannot hold is counted raw
            dtype = None
        coded = (dtype is not None and (dtype.kind == "f" or (dtype.kind in "iu" and dtype.itemsize == 1))
                 and int(tensor.size) >= min_elements)
        if coded:
            tensors.append(tensor_size(value.name, tensor.numpy(), zps.get(value.name, 0), index_bits))
        if proto is None:
            sizes.append(len(_embedded(value)))
        release(value)
    if path is not None:  # the file as it is, then the data files its weights live in
        files = [path, *sorted(external_files(ir_model))]
        sink = _Compressors(sum(f.stat().st_size for f in files), zstd, use_lzma)
        for f in files:
            _stream_file(f, sink)
    else:
        if proto is not None:
            skeleton = _without_initializers(proto)
            sizes = [t.ByteSize() for t in proto.graph.initializer]
            pieces = (t.SerializeToString(deterministic=True) for t in proto.graph.initializer)
        else:
            skeleton = _ir_skeleton(ir_model)
            pieces = (_embedded_once(v) for v in values)
        total, stream = _model_pieces(skeleton, sizes, pieces)
        sink = _Compressors(total, zstd, use_lzma)
        for piece in stream:
            sink.feed(piece)
    data_bytes = sink.fed
    raw = sum(s.raw_bytes for s in tensors)
    coded = sum(s.coded_bytes for s in tensors)
    out = {"bytes": data_bytes, **sink.result(), "weights_raw_bytes": raw,
           "weights_coded_bytes": coded, "total_coded_bytes": data_bytes - raw + coded}
    out["tensors"] = [dict(asdict(s), sparsity=round(s.sparsity, 4))
                      for s in sorted(tensors, key=lambda s: (-s.raw_bytes, s.name))]
    return out


def _without_initializers(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``proto`` whose graph has no initializers (the rest of the graph copied, not the weights)."""
    out = onnx.ModelProto()
    for fd, value in proto.ListFields():
        if fd.name == "graph":
            continue
        if fd.is_repeated:
            getattr(out, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(out, fd.name).CopyFrom(value)
        else:
            setattr(out, fd.name, value)
    if proto.HasField("graph"):
        out.graph.SetInParent()
        for fd, value in proto.graph.ListFields():
            if fd.name == "initializer":
                continue
            if fd.is_repeated:
                getattr(out.graph, fd.name).extend(value)
            elif fd.message_type is not None:
                getattr(out.graph, fd.name).CopyFrom(value)
            else:
                setattr(out.graph, fd.name, value)
    return out


def summary(report: dict, top: int = 10) -> dict:
    """The report for a pass's details: totals and the ``top`` largest tensors."""
    keep = {k: v for k, v in report.items() if k != "tensors"}
    keep["tensors"] = {s["name"]: {k: s[k] for k in ("dtype", "elements", "sparsity", "raw_bytes", "coded_bytes",
                                                      "form")} for s in report["tensors"][:top]}
    keep["counts"] = dict(Counter(s["form"] for s in report["tensors"]))
    return keep
