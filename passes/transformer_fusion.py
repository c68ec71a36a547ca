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

Stage 1 is a protobuf boundary (the ORT optimizer takes a ``ModelProto`` with its weights); it is skipped
when the graph holds nothing it could fuse (no Softmax, LayerNormalization or its ReduceMean form, Erf or
Tanh), so a large non-transformer model is never materialized. Stage 2 works on the IR.

The fused model is run against the original on a few inputs (the calibration data when given,
otherwise synthetic token ids with padded masks) and refused beyond ``max_abs_error``. One
difference is deliberate: a row whose keys are *all* masked (an all-zero attention mask) gives
zeros in the export and the mean of the values after fusion; real inputs always keep [CLS].
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Literal

import numpy as np
import onnx_ir as ir
from pydantic import Field

from onnxopt.errors import OnnxoptError
from onnxopt.graph import Namer, add_initializer, attr, clone_model, constant_value, is_op
from onnxopt.model_io import from_proto, to_proto
from onnxopt.pass_infra import Pass, PassConfig, PassResult
from onnxopt.runtime import make_session, ort_version, run_batch

MS_DOMAIN = "com.microsoft"
# Ops the BERT optimizer's fusions start from; without any of them it has nothing to do.
_ORT_FUSION_SEEDS = frozenset({"Softmax", "LayerNormalization", "ReduceMean", "Erf", "Tanh", "Gelu",
                               "SkipLayerNormalization", "FastGelu"})


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


class TransformerFusion(Pass):
    name = "transformer-fusion"
    summary = "Fuse BERT-family attention, GELU, (Skip)LayerNorm and bias adds into ONNX Runtime contrib ops."
    Config = TransformerFusionConfig

    def call(self, model: ir.Model) -> PassResult:
        cfg: TransformerFusionConfig = self.config
        details: dict = {"ort_version": ort_version()}
        before = _op_counts(model)
        if not any(n.op_type in _ORT_FUSION_SEEDS for n in model.graph):
            details["skipped"] = "no attention, normalization or GELU pattern in the graph"
            return PassResult(model, False, details)
        original = clone_model(model) if cfg.verify_samples else None  # the graph; tensors shared
        fused = model
        if cfg.use_ort_optimizer:
            fused, stats = _ort_fusions(model, cfg)
            details["ort_fusions"] = stats
        n_attention = fuse_sdpa_attention(fused, cfg.num_heads)
        details["sdpa_attention"] = n_attention
        if any(n.domain == MS_DOMAIN for n in fused.graph) and MS_DOMAIN not in fused.opset_imports:
            fused.opset_imports[MS_DOMAIN] = 1
        _eliminate(fused.graph)
        modified = before != _op_counts(fused)
        if modified and cfg.verify_samples:
            details["max_abs_error"] = self._verify(original, fused, cfg)
        if not modified:
            return PassResult(model, False, details)
        return PassResult(fused, True, details)

    def _verify(self, original: ir.Model, fused: ir.Model, cfg: TransformerFusionConfig) -> float:
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


def _eliminate(graph: ir.Graph) -> None:
    from onnxopt.graph import ancestors, drop_unused_initializers

    live = ancestors(graph, graph.outputs)
    dead = [n for n in graph if n not in live]
    if dead:
        graph.remove(dead, safe=True)
    drop_unused_initializers(graph)


# --- stage 1: onnxruntime.transformers (a protobuf boundary) ------------------------------------
def _ort_fusions(model: ir.Model, cfg: TransformerFusionConfig) -> tuple[ir.Model, dict]:
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions(cfg.model_type)
    options.enable_embed_layer_norm = cfg.embed_layer_norm
    options.enable_shape_inference = cfg.ort_shape_inference
    inputs = [i.name for i in model.graph.inputs]
    # The optimizer needs the weights in the protobuf; it is handed this one copy and edits it in place.
    work = clone_model(model)
    if any(isinstance(v.const_value, ir.ExternalTensor) for v in work.graph.initializers.values()):
        work = ir.external_data.load_to_model(work)
    proto = to_proto(work)
    del work
    # The optimizer logs fusions and skipped checks at INFO/WARNING through loggers named after its modules
    # (imported top-level, e.g. "fusion_skiplayernorm"): silence WARNING and below for the call only.
    previous = logging.root.manager.disable
    logging.disable(max(previous, logging.WARNING))
    # Its symbolic shape inference saves "sym_shape_infer_temp.onnx" and a uuid-named .data file (90 MB for
    # MiniLM) into the current folder and leaves them: run it in a temporary folder instead.
    cwd = os.getcwd()
    try:
        with tempfile.TemporaryDirectory(prefix="onnxopt-fusion-") as tmp:
            os.chdir(tmp)
            try:
                opt = optimizer.optimize_model(proto, model_type=cfg.model_type, num_heads=cfg.num_heads,
                                               hidden_size=cfg.hidden_size, optimization_options=options,
                                               opt_level=0)
            finally:
                os.chdir(cwd)
    finally:
        logging.disable(previous)
    stats = {k: int(v) for k, v in sorted(opt.get_fused_operator_statistics().items()) if v}
    fused = from_proto(opt.model)
    # The optimizer prunes graph inputs nothing reads; the model's interface must not change.
    if [i.name for i in fused.graph.inputs] != inputs:
        by_name = {i.name: i for i in fused.graph.inputs}
        originals = {i.name: i for i in model.graph.inputs}
        fused.graph.inputs.clear()
        for name in inputs:
            if name in by_name:
                fused.graph.inputs.append(by_name[name])
            else:
                src = originals[name]
                fused.graph.inputs.append(ir.Value(name=name, type=src.type, shape=src.shape))
    return fused, stats


def _op_counts(model: ir.Model) -> list[tuple[str, str]]:
    return sorted((n.domain, n.op_type) for n in model.graph)


# --- stage 2: SDPA-style attention (on the IR) ---------------------------------------------------
def _verify_feeds(model: ir.Model, calibration, n: int) -> list[dict[str, np.ndarray]]:
    """The first ``n`` calibration samples, or synthetic ones: 2-D int inputs that index a constant
    table (token ids) get random rows of it, other 2-D int inputs (attention masks) hold 1 up to a
    random length per row and 0 after it, and token ids are 0 where the mask is."""
    if calibration is not None:
        return [next(iter(calibration.batches(n)))]
    rng = np.random.default_rng(0)
    rows: dict[str, int] = {}
    for node in model.graph:
        if is_op(node, "Gather") and len(node.inputs) > 1 and attr(node, "axis", 0) == 0:
            table = node.inputs[0].shape if node.inputs[0] is not None and node.inputs[0].const_value is not None \
                else None
            ids = node.inputs[1]
            if table is not None and len(table) >= 1 and ids is not None and isinstance(table[0], int):
                rows[ids.name] = min(rows.get(ids.name, table[0]), table[0])
    feed: dict[str, np.ndarray] = {}
    valid = None
    for inp in model.graph.inputs:
        if inp.is_initializer():
            continue
        shape = [d if isinstance(d, int) and d > 0 else (n if k == 0 else 16) for k, d in enumerate(inp.shape or [])]
        dtype = np.dtype(inp.dtype.numpy())
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


def _scalar(value: ir.Value | None) -> float | None:
    v = constant_value(value)
    if v is None or v.size != 1 or v.dtype.kind != "f":
        return None
    return float(v.reshape(()))


def _strip_scale(value: ir.Value) -> tuple[ir.Value, float]:
    """Follow ``Mul(x, c)`` / ``Div(x, c)`` by a constant scalar back to x; returns (x, factor)."""
    node = value.producer()
    if is_op(node, ("Mul", "Div")):
        for pos in (1, 0) if is_op(node, "Mul") else (1,):
            c = _scalar(node.inputs[pos])
            if c is not None and c != 0:
                return node.inputs[1 - pos], (c if is_op(node, "Mul") else 1.0 / c)
    return value, 1.0


def _transposed(value: ir.Value | None, perm: list[int]) -> ir.Value | None:
    node = value.producer() if value is not None else None
    if is_op(node, "Transpose") and list(attr(node, "perm", [])) == perm:
        return node.inputs[0]
    return None


def _head_size(reshape: ir.Node) -> int | None:
    """Last dim of a [B, L, heads, head_size] Reshape target (a constant or a Concat ending in one)."""
    shape = constant_value(reshape.inputs[1])
    if shape is not None:
        return int(shape.reshape(-1)[-1]) if shape.size == 4 and shape.reshape(-1)[-1] > 0 else None
    concat = reshape.inputs[1].producer()
    if is_op(concat, "Concat") and len(concat.inputs) == 4:
        last = constant_value(concat.inputs[-1])
        if last is not None and last.size == 1 and int(last.reshape(-1)[0]) > 0:
            return int(last.reshape(-1)[0])
    return None


def _projection(heads: ir.Value) -> tuple[ir.Value, np.ndarray, np.ndarray, int] | None:
    """``Reshape(Add(MatMul(x, W), b))`` -> (x, W, b, head_size)."""
    reshape = heads.producer()
    if not is_op(reshape, "Reshape"):
        return None
    add = reshape.inputs[0].producer()
    if not is_op(add, "Add"):
        return None
    for pos in (0, 1):
        mm = add.inputs[1 - pos].producer()
        bias = constant_value(add.inputs[pos])
        if is_op(mm, "MatMul") and bias is not None and bias.ndim == 1:
            w = constant_value(mm.inputs[1])
            size = _head_size(reshape)
            if w is None or w.ndim != 2 or w.dtype != np.float32 or size is None or bias.shape[0] != w.shape[1]:
                return None
            return mm.inputs[0], w, bias.astype(np.float32), size
    return None


def _mask_input(add_term: ir.Value) -> ir.Value | None:
    """The 2-D graph input behind ``Where(mask, 0, -inf)``, if the additive term is that."""
    where = add_term.producer()
    if not is_op(where, "Where"):
        return None
    keep, drop = constant_value(where.inputs[1]), constant_value(where.inputs[2])
    if keep is None or drop is None or keep.size != 1 or drop.size != 1:
        return None
    if float(keep.reshape(())) != 0.0 or not float(drop.reshape(())) <= -1e4:
        return None
    sources: dict[int, ir.Value] = {}
    seen: set[int] = set()
    stack = [where.inputs[0]]
    while stack:
        v = stack.pop()
        if v is None or id(v) in seen:
            continue
        seen.add(id(v))
        if v.is_graph_input():
            sources[id(v)] = v
            continue
        node = v.producer()
        if node is not None and node.op_type not in ("Shape", "Size"):  # only shapes flow out of these
            stack.extend(x for x in node.inputs if x is not None)
    if len(sources) != 1:
        return None
    return next(iter(sources.values()))


def _input_rank2_int(value: ir.Value) -> bool:
    return (value.shape is not None and len(value.shape) == 2
            and value.dtype in (ir.DataType.INT64, ir.DataType.INT32, ir.DataType.BOOL, ir.DataType.FLOAT))


def fuse_sdpa_attention(model: ir.Model, num_heads: int = 0) -> int:
    """Replace each SDPA-export attention block by one com.microsoft Attention; returns how many."""
    g = model.graph
    namer = Namer(g)
    mask_casts: dict[int, ir.Value] = {}
    fused = 0
    for softmax in [n for n in g if is_op(n, "Softmax")]:
        block = _match_block(softmax)
        if block is None:
            continue
        x, w, b, head, out, mask, scale = block
        heads = num_heads or w.shape[1] // 3 // head
        if heads * head * 3 != w.shape[1]:
            continue
        name = out.name
        inputs = [x, add_initializer(g, w, f"{name}_qkv_weight", namer),
                  add_initializer(g, b, f"{name}_qkv_bias", namer)]
        if mask is not None:
            if id(mask) not in mask_casts:
                cast = ir.node("Cast", [mask], {"to": int(ir.DataType.INT32)}, name=namer.unique(f"{mask.name}_to_int32"))
                cast.outputs[0].name = namer.unique(f"{mask.name}_int32")
                g.insert_before(g.node(0), cast)  # the Cast of a graph input goes first
                mask_casts[id(mask)] = cast.outputs[0]
            inputs.append(mask_casts[id(mask)])
        tail = out.producer()
        attention = ir.node("Attention", inputs, {"num_heads": heads, "scale": float(scale)}, domain=MS_DOMAIN,
                            name=namer.unique(f"Attention_{fused}"))
        g.insert_before(tail, attention)
        # The Attention takes over the block's output (and its name: it may be a graph output); the old
        # tail is left for dead-code removal.
        new_out = attention.outputs[0]
        out.replace_all_uses_with(new_out, replace_graph_outputs=True)
        out.name = namer.unique(f"{name}_unfused")
        new_out.name = name
        new_out.type, new_out.shape = out.type, out.shape
        fused += 1
    return fused


def _rank4_target(reshape: ir.Node) -> bool:
    shape = constant_value(reshape.inputs[1])
    if shape is not None:
        return shape.size == 4
    concat = reshape.inputs[1].producer()
    return is_op(concat, "Concat") and len(concat.inputs) == 4


def _data_use(value: ir.Value) -> ir.Node | None:
    """The one consumer of ``value`` apart from Shape nodes (exports read shapes off intermediate values
    to build Reshape targets; those chains die with the block)."""
    if value.is_graph_output():
        return None
    uses = [u for u in value.consumers() if not is_op(u, "Shape")]
    return uses[0] if len(uses) == 1 else None


def _match_block(softmax: ir.Node):
    """(x, W_qkv, b_qkv, head_size, output, mask input or None, scale) for one attention block."""
    if attr(softmax, "axis", -1) not in (-1, 3):
        return None
    probs = softmax.outputs[0]
    uses = list(probs.consumers())
    # Where(IsNaN(p), 0, p): the export's guard for fully masked rows.
    if len(uses) == 2 and {u.op_type for u in uses} == {"IsNaN", "Where"}:
        where = next(u for u in uses if u.op_type == "Where")
        isnan = next(u for u in uses if u.op_type == "IsNaN")
        zero = constant_value(where.inputs[1])
        if (where.inputs[0] is not isnan.outputs[0] or where.inputs[2] is not probs or zero is None
                or zero.size != 1 or float(zero.reshape(())) != 0.0):
            return None
        probs = where.outputs[0]
        uses = list(probs.consumers())
    if len(uses) != 1 or not is_op(uses[0], "MatMul") or uses[0].inputs[0] is not probs:
        return None
    pv = uses[0]
    v_heads = _transposed(pv.inputs[1], [0, 2, 1, 3])
    tail_t = _data_use(pv.outputs[0])
    if is_op(tail_t, "Reshape") and _rank4_target(tail_t):
        # [B, -1, L, head] of a [B, heads, L, head] value: a no-op reshape the export leaves in
        tail_t = _data_use(tail_t.outputs[0])
    if v_heads is None or not is_op(tail_t, "Transpose") or list(attr(tail_t, "perm", [])) != [0, 2, 1, 3]:
        return None
    tail_r = _data_use(tail_t.outputs[0])
    if not is_op(tail_r, "Reshape"):
        return None
    # scores (+ mask) -> softmax
    scores, mask = softmax.inputs[0], None
    add = scores.producer()
    if is_op(add, "Add"):
        for pos in (0, 1):
            mask = _mask_input(add.inputs[pos])
            if mask is not None:
                scores = add.inputs[1 - pos]
                break
        else:
            return None
        if not _input_rank2_int(mask):
            return None
    scores, post = _strip_scale(scores)
    qk = scores.producer()
    if not is_op(qk, "MatMul"):
        return None
    q_in, q_scale = _strip_scale(qk.inputs[0])
    k_in, k_scale = _strip_scale(qk.inputs[1])
    q_heads = _transposed(q_in, [0, 2, 1, 3])
    k_heads = _transposed(k_in, [0, 2, 3, 1])
    if k_heads is None:  # K transposed to heads, then its last two axes swapped
        inner = _transposed(k_in, [0, 1, 3, 2])
        k_heads = _transposed(inner, [0, 2, 1, 3]) if inner is not None else None
    if q_heads is None or k_heads is None:
        return None
    parts = [_projection(v) for v in (q_heads, k_heads, v_heads)]
    if any(p is None for p in parts):
        return None
    (xq, wq, bq, hq), (xk, wk, bk, hk), (xv, wv, bv, hv) = parts
    if not (xq is xk is xv and hq == hk == hv and wq.shape == wk.shape == wv.shape and wq.shape[0] == wq.shape[1]):
        return None
    w = np.concatenate([wq, wk, wv], axis=1)
    b = np.concatenate([bq, bk, bv])
    scale = q_scale * k_scale * post
    return xq, w, b, hq, tail_r.outputs[0], mask, scale
