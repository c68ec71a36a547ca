"""Fuse BERT-family encoders into ONNX Runtime's contrib kernels (com.microsoft domain).

Two stages:

1. ``onnxruntime.transformers.optimizer`` (its version goes into the details): LayerNorm ->
   SkipLayerNormalization, Erf-GELU + bias -> BiasGelu, bias adds, and attention where its
   pattern matcher recognises the export.
2. What it lacks: attention as exported by PyTorch's scaled-dot-product path (the scale split
   as ``sqrt(scale)`` on Q and on K^T, the mask as ``Where(mask, 0, -inf)``, and
   ``Where(IsNaN(softmax), 0, softmax)``). ORT's matcher leaves these unfused; here each one
   becomes an ``Attention`` node with the Q/K/V weights packed into one [H, 3H] GEMM and the
   attention mask (a 2-D graph input) passed as ``mask_index``.

The fused model is run against the original on a few inputs (the calibration data when given,
otherwise synthetic token ids with padded masks) and refused beyond ``max_abs_error``. One
difference is deliberate: a row whose keys are *all* masked (an all-zero attention mask) gives
zeros in the export and the mean of the values after fusion; real inputs always keep [CLS].
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import onnx
from onnx import helper
from pydantic import Field

from onnxopt.errors import OnnxoptError
from onnxopt.legacy_graph import GraphIndex, attr, drop_value_info, eliminate
from onnxopt.pass_infra import PassConfig, PassResult, ProtoPass
from onnxopt.runtime import make_session, ort_version, run_batch

MS_DOMAIN = "com.microsoft"


class TransformerFusionConfig(PassConfig):
    type: Literal["transformer-fusion"] = "transformer-fusion"
    model_type: Literal["bert"] = Field("bert", description="onnxruntime.transformers model type")
    num_heads: int = Field(0, ge=0, description="attention heads (0: read from the graph)")
    hidden_size: int = Field(0, ge=0, description="hidden size (0: read from the graph)")
    use_ort_optimizer: bool = Field(True, description="run onnxruntime.transformers' fusions first")
    embed_layer_norm: bool = Field(
        False, description="let ORT fuse the embeddings into EmbedLayerNormalization (keeps the word-embedding "
        "Gather out of reach of embedding quantization)")
    ort_shape_inference: bool = Field(
        False, description="let ORT's optimizer run symbolic shape inference (5 runs, ~7x slower on MiniLM; same "
        "fusions there; the result is checked against the original either way)")
    max_abs_error: float = Field(1e-4, gt=0, description="refuse the fusion if any output moves more than this")
    verify_samples: int = Field(8, ge=0, description="samples compared with the original (0: no check)")


class TransformerFusion(ProtoPass):
    name = "transformer-fusion"
    summary = "Fuse BERT-family attention, GELU, (Skip)LayerNorm and bias adds into ONNX Runtime contrib ops."
    Config = TransformerFusionConfig

    def call(self, model: onnx.ModelProto) -> PassResult:
        cfg: TransformerFusionConfig = self.config
        details: dict = {"ort_version": ort_version()}
        fused = model
        if cfg.use_ort_optimizer:
            fused, stats = _ort_fusions(model, cfg)
            details["ort_fusions"] = stats
        else:
            fused = onnx.ModelProto()
            fused.CopyFrom(model)
        n_attention = fuse_sdpa_attention(fused, cfg.num_heads)
        details["sdpa_attention"] = n_attention
        _ensure_ms_opset(fused)
        eliminate(fused.graph)
        drop_value_info(fused.graph)
        before, after = _op_counts(model), _op_counts(fused)
        modified = before != after
        if modified and cfg.verify_samples:
            details["max_abs_error"] = self._verify(model, fused, cfg)
        return PassResult(fused if modified else model, modified, details)

    def _verify(self, original: onnx.ModelProto, fused: onnx.ModelProto, cfg: TransformerFusionConfig) -> float:
        feeds = _verify_feeds(original, self.context.calibration, cfg.verify_samples)
        ref = make_session(original, opt_level="disable", what="original model (fusion check)")
        new = make_session(fused, opt_level="disable", what="fused model (fusion check)")
        worst = 0.0
        for feed in feeds:
            a, b = run_batch(ref, feed), run_batch(new, feed)
            for name, value in a.items():
                if value.dtype.kind != "f":
                    continue
                err = float(np.max(np.abs(value.astype(np.float64) - b[name]))) if value.size else 0.0
                if not err <= cfg.max_abs_error:
                    raise OnnxoptError(f"transformer-fusion changed output {name!r} by {err:.3g} (> max_abs_error "
                                       f"{cfg.max_abs_error:g}); the fused pattern is not equivalent here")
                worst = max(worst, err)
        return worst


# --- stage 1: onnxruntime.transformers ------------------------------------------------------
def _ort_fusions(model: onnx.ModelProto, cfg: TransformerFusionConfig) -> tuple[onnx.ModelProto, dict]:
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions(cfg.model_type)
    options.enable_embed_layer_norm = cfg.embed_layer_norm
    options.enable_shape_inference = cfg.ort_shape_inference
    work = onnx.ModelProto()
    work.CopyFrom(model)
    # The optimizer logs fusions and skipped checks at INFO/WARNING through loggers named after its modules
    # (imported top-level, e.g. "fusion_skiplayernorm"): silence WARNING and below for the call only.
    previous = logging.root.manager.disable
    logging.disable(max(previous, logging.WARNING))
    try:
        opt = optimizer.optimize_model(work, model_type=cfg.model_type, num_heads=cfg.num_heads,
                                       hidden_size=cfg.hidden_size, optimization_options=options, opt_level=0)
    finally:
        logging.disable(previous)
    stats = {k: int(v) for k, v in sorted(opt.get_fused_operator_statistics().items()) if v}
    fused = opt.model
    # The optimizer prunes graph inputs nothing reads; the model's interface must not change.
    if [i.name for i in fused.graph.input] != [i.name for i in model.graph.input]:
        del fused.graph.input[:]
        fused.graph.input.extend(model.graph.input)
    return fused, stats


def _ensure_ms_opset(model: onnx.ModelProto) -> None:
    if any(n.domain == MS_DOMAIN for n in model.graph.node) and not any(
            o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def _op_counts(model: onnx.ModelProto) -> list[tuple[str, str]]:
    return sorted((n.domain, n.op_type) for n in model.graph.node)


# --- stage 2: SDPA-style attention ----------------------------------------------------------
def _verify_feeds(model: onnx.ModelProto, calibration, n: int) -> list[dict[str, np.ndarray]]:
    """The first ``n`` calibration samples, or synthetic ones: 2-D int inputs that index a constant
    table (token ids) get random rows of it, other 2-D int inputs (attention masks) hold 1 up to a
    random length per row and 0 after it, and token ids are 0 where the mask is."""
    if calibration is not None:
        return [next(iter(calibration.batches(n)))]
    rng = np.random.default_rng(0)
    index = GraphIndex(model.graph)
    rows: dict[str, int] = {}
    for node in model.graph.node:
        if _is(node, "Gather") and len(node.input) > 1 and attr(node, "axis", 0) == 0:
            table = index.constant(node.input[0])
            if table is not None and table.ndim >= 1:
                rows[node.input[1]] = min(rows.get(node.input[1], table.shape[0]), table.shape[0])
    feed: dict[str, np.ndarray] = {}
    valid = None
    for inp in model.graph.input:
        if inp.name in index.initializers:
            continue
        t = inp.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (n if k == 0 else 16) for k, d in enumerate(t.shape.dim)]
        dtype = helper.tensor_dtype_to_np_dtype(t.elem_type)
        if dtype.kind == "f":
            feed[inp.name] = rng.standard_normal(shape).astype(dtype)
        elif len(shape) != 2:
            feed[inp.name] = np.ones(shape, dtype)
        else:
            if valid is None or valid.shape != tuple(shape):
                lengths = rng.integers(1, shape[1] + 1, shape[0])
                valid = np.arange(shape[1])[None, :] < lengths[:, None]
            values = rng.integers(0, rows[inp.name], shape) * valid if inp.name in rows else valid
            feed[inp.name] = values.astype(dtype)
    return [feed]


def _is(node, op: str) -> bool:
    return node is not None and node.op_type == op and node.domain in ("", "ai.onnx")


def _scalar(index: GraphIndex, name: str) -> float | None:
    value = index.constant(name)
    if value is None or value.size != 1 or value.dtype.kind != "f":
        return None
    return float(value.reshape(()))


def _strip_scale(index: GraphIndex, name: str) -> tuple[str, float]:
    """Follow ``Mul(x, c)`` / ``Div(x, c)`` by a constant scalar back to x; returns (x, factor)."""
    node = index.producer(name)
    if _is(node, "Mul") or _is(node, "Div"):
        for pos in (1, 0) if _is(node, "Mul") else (1,):
            c = _scalar(index, node.input[pos])
            if c is not None and c != 0:
                return node.input[1 - pos], (c if _is(node, "Mul") else 1.0 / c)
    return name, 1.0


def _transposed(index: GraphIndex, name: str, perm: list[int]) -> str | None:
    node = index.producer(name)
    if _is(node, "Transpose") and list(attr(node, "perm", [])) == perm:
        return node.input[0]
    return None


def _head_size(index: GraphIndex, reshape: onnx.NodeProto) -> int | None:
    """Last dim of a [B, L, heads, head_size] Reshape target (a constant or a Concat ending in one)."""
    shape = index.constant(reshape.input[1])
    if shape is not None:
        return int(shape.reshape(-1)[-1]) if shape.size == 4 and shape.reshape(-1)[-1] > 0 else None
    concat = index.producer(reshape.input[1])
    if _is(concat, "Concat") and len(concat.input) == 4:
        last = index.constant(concat.input[-1])
        if last is not None and last.size == 1 and int(last.reshape(-1)[0]) > 0:
            return int(last.reshape(-1)[0])
    return None


def _projection(index: GraphIndex, heads_name: str) -> tuple[str, np.ndarray, np.ndarray, int] | None:
    """``Reshape(Add(MatMul(x, W), b))`` -> (x, W, b, head_size)."""
    reshape = index.producer(heads_name)
    if not _is(reshape, "Reshape"):
        return None
    add = index.producer(reshape.input[0])
    if not _is(add, "Add"):
        return None
    for pos in (0, 1):
        mm = index.producer(add.input[1 - pos])
        bias = index.constant(add.input[pos])
        if _is(mm, "MatMul") and bias is not None and bias.ndim == 1:
            w = index.constant(mm.input[1])
            size = _head_size(index, reshape)
            if w is None or w.ndim != 2 or w.dtype != np.float32 or size is None or bias.shape[0] != w.shape[1]:
                return None
            return mm.input[0], w, bias.astype(np.float32), size
    return None


def _mask_input(index: GraphIndex, add_term: str) -> str | None:
    """The 2-D graph input behind ``Where(mask, 0, -inf)``, if the additive term is that."""
    where = index.producer(add_term)
    if not _is(where, "Where"):
        return None
    keep, drop = index.constant(where.input[1]), index.constant(where.input[2])
    if keep is None or drop is None or keep.size != 1 or drop.size != 1:
        return None
    if float(keep.reshape(())) != 0.0 or not float(drop.reshape(())) <= -1e4:
        return None
    sources: set[str] = set()
    seen: set[str] = set()
    stack = [where.input[0]]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in index.graph_inputs:
            sources.add(name)
            continue
        node = index.producer(name)
        if node is not None and node.op_type not in ("Shape", "Size"):  # only shapes flow out of these
            stack.extend(x for x in node.input if x)
    if len(sources) != 1:
        return None
    return sources.pop()


def _input_rank2_int(graph: onnx.GraphProto, name: str) -> bool:
    for i in graph.input:
        if i.name == name:
            t = i.type.tensor_type
            return len(t.shape.dim) == 2 and t.elem_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32,
                                                             onnx.TensorProto.BOOL, onnx.TensorProto.FLOAT)
    return False


def fuse_sdpa_attention(model: onnx.ModelProto, num_heads: int = 0) -> int:
    """Replace each SDPA-export attention block by one com.microsoft Attention; returns how many."""
    g = model.graph
    index = GraphIndex(g)
    mask_casts: dict[str, str] = {}
    fused = 0
    for softmax in [n for n in g.node if _is(n, "Softmax")]:
        block = _match_block(index, softmax)
        if block is None:
            continue
        x, w, b, head, out, mask, scale = block
        heads = num_heads or w.shape[1] // 3 // head
        if heads * head * 3 != w.shape[1]:
            continue
        inputs = [x, index.add_initializer(w, f"{out}_qkv_weight"), index.add_initializer(b, f"{out}_qkv_bias")]
        new_nodes = []
        if mask is not None:
            if mask not in mask_casts:
                cast_out = index.unique_name(f"{mask}_int32")
                new_nodes.append(helper.make_node("Cast", [mask], [cast_out], to=onnx.TensorProto.INT32,
                                                  name=index.unique_name(f"{mask}_to_int32")))
                mask_casts[mask] = cast_out
            inputs.append(mask_casts[mask])
        # The Attention takes over the block's output name (it may be a graph output); the old tail
        # is renamed and left for dead-code removal.
        tail = index.producer(out)
        tail.output[0] = index.unique_name(f"{out}_unfused")
        new_nodes.append(helper.make_node("Attention", inputs, [out], domain=MS_DOMAIN,
                                          name=index.unique_name(f"Attention_{fused}"),
                                          num_heads=heads, scale=float(scale)))
        index.insert_before(tail, new_nodes)
        fused += 1
    if mask_casts:
        # The Cast of a graph input must come first: move them to the top.
        casts = [n for n in g.node if n.op_type == "Cast" and n.output[0] in mask_casts.values()]
        rest = [n for n in g.node if n.op_type != "Cast" or n.output[0] not in mask_casts.values()]
        del g.node[:]
        g.node.extend(casts + rest)
    return fused


def _rank4_target(index: GraphIndex, reshape: onnx.NodeProto) -> bool:
    shape = index.constant(reshape.input[1])
    if shape is not None:
        return shape.size == 4
    concat = index.producer(reshape.input[1])
    return _is(concat, "Concat") and len(concat.input) == 4


def _data_use(index: GraphIndex, name: str) -> onnx.NodeProto | None:
    """The one consumer of ``name`` apart from Shape nodes (exports read shapes off intermediate values
    to build Reshape targets; those chains die with the block)."""
    if index.is_output(name):
        return None
    uses = [u for u in index.uses(name) if not _is(u, "Shape")]
    return uses[0] if len(uses) == 1 else None


def _match_block(index: GraphIndex, softmax: onnx.NodeProto):
    """(x, W_qkv, b_qkv, head_size, output, mask input or None, scale) for one attention block."""
    if attr(softmax, "axis", -1) not in (-1, 3):
        return None
    probs = softmax.output[0]
    uses = index.uses(probs)
    # Where(IsNaN(p), 0, p): the export's guard for fully masked rows.
    if len(uses) == 2 and {u.op_type for u in uses} == {"IsNaN", "Where"}:
        where = next(u for u in uses if u.op_type == "Where")
        isnan = next(u for u in uses if u.op_type == "IsNaN")
        zero = index.constant(where.input[1])
        if (where.input[0] != isnan.output[0] or where.input[2] != probs or zero is None or zero.size != 1
                or float(zero.reshape(())) != 0.0):
            return None
        probs = where.output[0]
        uses = index.uses(probs)
    if len(uses) != 1 or not _is(uses[0], "MatMul") or uses[0].input[0] != probs:
        return None
    pv = uses[0]
    v_heads = _transposed(index, pv.input[1], [0, 2, 1, 3])
    tail_t = _data_use(index, pv.output[0])
    if _is(tail_t, "Reshape") and _rank4_target(index, tail_t):
        # [B, -1, L, head] of a [B, heads, L, head] value: a no-op reshape the export leaves in
        tail_t = _data_use(index, tail_t.output[0])
    if v_heads is None or not _is(tail_t, "Transpose") or list(attr(tail_t, "perm", [])) != [0, 2, 1, 3]:
        return None
    tail_r = _data_use(index, tail_t.output[0])
    if not _is(tail_r, "Reshape"):
        return None
    # scores (+ mask) -> softmax
    scores, mask = softmax.input[0], None
    add = index.producer(scores)
    if _is(add, "Add"):
        for pos in (0, 1):
            mask = _mask_input(index, add.input[pos])
            if mask is not None:
                scores = add.input[1 - pos]
                break
        else:
            return None
        if not _input_rank2_int(index.graph, mask):
            return None
    scores, post = _strip_scale(index, scores)
    qk = index.producer(scores)
    if not _is(qk, "MatMul"):
        return None
    q_in, q_scale = _strip_scale(index, qk.input[0])
    k_in, k_scale = _strip_scale(index, qk.input[1])
    q_heads = _transposed(index, q_in, [0, 2, 1, 3])
    k_heads = _transposed(index, k_in, [0, 2, 3, 1])
    if k_heads is None:  # K transposed to heads, then its last two axes swapped
        inner = _transposed(index, k_in, [0, 1, 3, 2])
        k_heads = _transposed(index, inner, [0, 2, 1, 3]) if inner else None
    if q_heads is None or k_heads is None:
        return None
    parts = [_projection(index, name) for name in (q_heads, k_heads, v_heads)]
    if any(p is None for p in parts):
        return None
    (xq, wq, bq, hq), (xk, wk, bk, hk), (xv, wv, bv, hv) = parts
    if not (xq == xk == xv and hq == hk == hv and wq.shape == wk.shape == wv.shape and wq.shape[0] == wq.shape[1]):
        return None
    w = np.concatenate([wq, wk, wv], axis=1)
    b = np.concatenate([bq, bk, bv])
    scale = q_scale * k_scale * post
    return xq, w, b, hq, tail_r.output[0], mask, scale
