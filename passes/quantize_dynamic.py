"""Dynamic INT8 quantization: weights int8 ahead of time, activations quantized at run time.

MatMul/Gemm with a constant 2-D weight become ``com.microsoft.DynamicQuantizeMatMul`` (one
kernel: quantize the activation per tensor to uint8, integer GEMM, scale back to float, add the
bias); weights are per output channel (one scale per column) and symmetric. A fused
``com.microsoft.Attention`` (see ``transformer-fusion``) has its packed [H, 3H] Q/K/V weight
quantized the same way: the projection becomes one DynamicQuantizeMatMul and the attention
itself a float ``MultiHeadAttention`` on the Q/K/V split from it (``attention: mha``), or the whole
block ``QAttention`` (``attention: qattention``). In the ``mha`` form, keys past the last position any
row of the batch attends to are sliced off K, V and the mask (``trim_masked_keys``): ORT's CPU
attention is several times slower on masked keys than on real ones (``KEY_TRIM_MEASUREMENT``), and
padded keys carry no weight, so the outputs are the same.

Scheme ``auto`` is u8s8 (uint8 activations x int8 weights, full range) where ORT's kernel is exact, and u8s8-rr
(7-bit weights, same fast kernel) where it saturates: AVX2 without VNNI, found by running the kernel on
full-range operands on this machine (``u8s8_gemm_is_exact``; with ``cpu_flags`` for another target, from its
flags). u8u8 never saturates but is slower than fp32 there (``DYNAMIC_MEASUREMENT``).

With calibration data the activations' per-channel maxima are measured first and SmoothQuant
(Xiao et al. 2023) divides each quantized input by s = amax^alpha / wmax^(1-alpha) (an explicit
Mul) and multiplies the weight rows by s: BERT's LayerNorm outputs have a few outlier channels
that otherwise set the per-tensor activation scale. On MiniLM SST-2 this raised the embedding
cosine to fp32 from 0.992 to 0.997 (alpha 0.7).
"""

from __future__ import annotations

import functools
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper
from pydantic import Field

from onnxopt.errors import OnnxoptError, PreconditionError
from onnxopt.isa import detect_cpu
from onnxopt.legacy_graph import GraphIndex, attr, drop_value_info, eliminate, opset_version
from onnxopt.pass_infra import PassConfig, PassResult, ProtoPass
from onnxopt.quant import quantize, weight_params
from onnxopt.runtime import make_session, run_batch

from .calibrate import exposed_model, limited_batches

MS_DOMAIN = "com.microsoft"
DEFAULT_DOMAINS = ("", "ai.onnx")

# minilm_l6_sst2 (6-layer BERT, hidden 384) after transformer-fusion; sst2_dev (872 sentences, fp32 81.54 %);
# onnxruntime 1.32, AMD EPYC AVX2 without VNNI (2026-12-03, 128 calibration sentences: SmoothQuant on).
# DynamicQuantizeMatMul's u8 x s8 GEMM saturates there (vpmaddubsw int16 pair sums: the full-range probe gives
# 4.02 for 255.0); 7-bit weights (u8s8-rr) cannot, and keep the fast kernel. Speed-ups: bench/text.py, L=128,
# one thread, batch 1 padded / 128 real tokens / batch 8. An earlier note here said u8s8 did not saturate on
# this CPU class (measured without smoothing; likely fewer pairs reach the limit there -- not re-checked).
DYNAMIC_MEASUREMENT = {
    "u8s8": "80.73 %, agreement with fp32 97.1 %, 1.50x / 1.38x / 1.46x (saturating)",
    "u8s8-rr": "81.19 %, agreement 98.5 %, 1.60x / 1.34x / 1.48x",
    "u8u8": "81.19 %, agreement 99.0 % (exact; an earlier run: 0.93x, slower than fp32)",
    "Intel Xeon with AVX512-VNNI, u8s8 (exact there)": "81.42 %, 2.2x / 2.3x / 2.15x",
}


# Why trim_masked_keys: ORT's CPU attention kernels get slow on masked keys (the exp of a masked score is not
# 0 but a tiny value that then runs through the probability x V product; mask_filter_value -60 is 7x slower
# still, so denormals are the likely cause). A 2-D key_padding_mask, 1-D lengths, an additive bias, the fused
# Attention and QAttention are all alike. Keys no row of the batch attends to change nothing: they are sliced
# off K and V (and the mask) before MultiHeadAttention, so the kernel sees only the real keys.
KEY_TRIM_MEASUREMENT = {
    # minilm_l6_sst2 int8, first sst2_dev sentence padded to L=128, batch 1, one thread, ORT 1.32 profile
    "6 MultiHeadAttention nodes": "27.7 ms with the padded keys (11 ms with no mask at all) -> 7.0 ms trimmed",
    "whole model vs fp32, interleaved (no --calib)": "batch 1 1.41x -> 2.28x and 1.83x -> 2.95x (two runs, "
                                                     "different load); batch 8 1.59x -> 2.09x",
    "one MHA node, 118 of 128 keys masked": "1.47 ms (unmasked 0.34 ms)",
}


class QuantizeDynamicConfig(PassConfig):
    type: Literal["quantize-dynamic"] = "quantize-dynamic"
    scheme: Literal["auto", "u8s8", "u8s8-rr", "u8u8"] = Field(
        "auto", description="activation x weight types for the target CPU; auto: chosen from its flags")
    op_types: list[Literal["MatMul", "Gemm", "Attention"]] = Field(
        default_factory=lambda: ["MatMul", "Gemm", "Attention"], description="op types to quantize")
    attention: Literal["mha", "qattention"] = Field(
        "mha", description="form of a quantized Attention: DynamicQuantizeMatMul + MultiHeadAttention, or QAttention")
    trim_masked_keys: bool = Field(
        True, description="MultiHeadAttention form: slice keys/values to the last position any row of the batch "
        "attends to (same outputs; ORT's attention is slow on masked keys, see KEY_TRIM_MEASUREMENT)")
    min_weight_elements: int = Field(
        4096, ge=0, description="leave weights smaller than this in float (e.g. a 384x2 classifier head)")
    exclude_nodes: list[str] = Field(default_factory=list, description="node names left in float")
    cpu_flags: list[str] | None = Field(
        None, description="target CPU flags for scheme=auto (default: this machine's /proc/cpuinfo)")
    smoothing: Literal["auto", "on", "off"] = Field(
        "auto", description="migrate activation outliers into the weights (SmoothQuant) using per-channel "
        "activation maxima from the calibration data (auto: when calibration data is given)")
    smooth_alpha: float = Field(
        0.7, ge=0.0, le=1.0, description="SmoothQuant migration strength (MiniLM SST-2 embedding cosine: 0.5 0.986, "
        "0.7 0.997, 0.8 0.997, 0.9 0.995, none 0.992)")
    max_samples: int = Field(128, gt=0, description="calibration samples used to measure activation maxima")
    batch_size: int = Field(16, gt=0, description="batch size of the calibration run")


def dynamic_scheme(scheme: str, cpu_flags: list[str] | None) -> tuple[str, str]:
    """(scheme, reason) for dynamic quantization: u8s8 where its GEMM is exact, else 7-bit weights (u8s8-rr).

    Without ``cpu_flags`` (the target is this machine) ORT's kernel is probed on full-range operands, so the
    choice rests on what the kernel does here, not on a reading of the flags."""
    if scheme != "auto":
        return scheme, "set in the recipe"
    if cpu_flags is None:
        if u8s8_gemm_is_exact():
            return "u8s8", f"{detect_cpu().describe()}: DynamicQuantizeMatMul's u8 x s8 GEMM is exact here (probed)"
        return "u8s8-rr", (f"{detect_cpu().describe()}: DynamicQuantizeMatMul's u8 x s8 GEMM saturates here (probed "
                           f"with full-range operands); 7-bit weights cannot (see DYNAMIC_MEASUREMENT: "
                           f"{DYNAMIC_MEASUREMENT})")
    caps = detect_cpu(cpu_flags)
    if caps.u8s8_saturates:
        return "u8s8-rr", "AVX2/AVX-512BW without VNNI: the u8 x s8 GEMM saturates int16 pair sums; 7-bit weights"
    return "u8s8", f"{caps.describe()}: u8 x s8 accumulates in 32 bits"


def full_range_probe() -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """A DynamicQuantizeMatMul whose exact result needs full-range pair sums (255 * 127 * 2 > 32767), its input
    and the exact output: all weights 127, activations alternating so uint8 values sit at 0 and 255."""
    k, n = 64, 8
    x = np.full((2, k), 4.0, np.float32)
    x[:, ::2] = -4.0
    x[1] = 4.0
    graph = helper.make_graph(
        [helper.make_node("DynamicQuantizeMatMul", ["x", "w", "s", "z"], ["y"], domain=MS_DOMAIN)], "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, n])],
        initializer=[onnx.numpy_helper.from_array(np.full((k, n), 127, np.int8), "w"),
                     onnx.numpy_helper.from_array(np.full(n, 1.0 / 127, np.float32), "s"),
                     onnx.numpy_helper.from_array(np.zeros(n, np.int8), "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS_DOMAIN, 1)])
    model.ir_version = 8
    # uint8 per tensor over [-4, 4]: scale 8/255, zero point 128 (rounded): -4 -> 0, 4 -> 255
    xs, zp = np.float32(8 / 255), 128
    xq = np.clip(np.rint(x / xs) + zp, 0, 255) - zp
    exact = (xq.astype(np.int64) @ np.full((k, n), 127, np.int64)).astype(np.float64) * xs / 127
    return model, x, exact.astype(np.float32)


@functools.lru_cache(maxsize=1)
def u8s8_gemm_is_exact() -> bool:
    """Whether ORT's DynamicQuantizeMatMul (u8 x s8) on this machine gets the full-range probe exactly right."""
    import onnxruntime as ort

    model, x, exact = full_range_probe()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x})[0]
    return bool(np.allclose(got, exact, rtol=1e-4, atol=1e-3))


def quantize_weight(w: np.ndarray, scheme: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-column symmetric quantization of a [K, N] weight: (q, scale[N], zero_point[N])."""
    qt = "uint8" if scheme == "u8u8" else "int8"
    scale, zp = weight_params(w, qt, axis=1, symmetric=True, reduce_range=scheme == "u8s8-rr")
    q = quantize(w, scale, zp, qt, axis=1)
    return q, scale.astype(np.float32), zp.astype(q.dtype)


def smoothing_factors(amax: np.ndarray, wmax: np.ndarray, alpha: float) -> np.ndarray:
    """Per input channel s = amax^alpha / wmax^(1 - alpha) (Xiao et al. 2023), 1 where either is zero."""
    amax, wmax = amax.astype(np.float64), wmax.astype(np.float64)
    s = np.ones_like(amax)
    ok = (amax > 0) & (wmax > 0)
    s[ok] = amax[ok] ** alpha / wmax[ok] ** (1.0 - alpha)
    return np.clip(s, 1e-4, 1e4).astype(np.float32)


def channel_maxima(model: onnx.ModelProto, tensors: list[str], source, batch_size: int,
                   max_samples: int) -> dict[str, np.ndarray]:
    """max |x| per last-axis channel of each tensor over the calibration samples."""
    session = make_session(exposed_model(model, tensors), opt_level="basic", what="model (smoothing calibration)")
    amax: dict[str, np.ndarray] = {}
    for batch in limited_batches(source, batch_size, max_samples):
        values = run_batch(session, batch, tensors)
        for name, v in values.items():
            m = np.abs(v.reshape(-1, v.shape[-1])).max(axis=0)
            amax[name] = m if name not in amax else np.maximum(amax[name], m)
    if not amax:
        raise OnnxoptError(f"quantize-dynamic: no calibration samples in {source.description}")
    return amax


class QuantizeDynamic(ProtoPass):
    name = "quantize-dynamic"
    summary = "Dynamic INT8: MatMul/Gemm/Attention weights int8 per channel, activations quantized at run time."
    Config = QuantizeDynamicConfig

    def call(self, model: onnx.ModelProto) -> PassResult:
        cfg: QuantizeDynamicConfig = self.config
        self._trimmed: dict[str, tuple[str, str]] = {}  # mask -> (trimmed mask, key count), shared by all layers
        self._consts: dict[str, str] = {}
        self._shape_slices = opset_version(model) >= 15  # Shape(start, end) in the trimming
        scheme, reason = dynamic_scheme(cfg.scheme, cfg.cpu_flags)
        g = model.graph
        index = GraphIndex(g)
        counts: dict[str, int] = {}
        skipped_small = 0
        targets = []
        for node in g.node:
            if node.name in cfg.exclude_nodes or node.op_type not in cfg.op_types or not node.output:
                continue
            w = index.constant(node.input[1]) if len(node.input) > 1 else None
            if w is None or w.dtype != np.float32:
                continue
            if w.size < cfg.min_weight_elements:
                skipped_small += 1
                continue
            targets.append(node.output[0])
        smooth = cfg.smoothing == "on" or (cfg.smoothing == "auto" and self.context.calibration is not None)
        if smooth and targets:
            if self.context.calibration is None:
                raise PreconditionError("smoothing: on needs calibration data (pass it with --calib)")
            amax = channel_maxima(model, sorted({index.producer(t).input[0] for t in targets}),
                                  self.context.calibration, cfg.batch_size, cfg.max_samples)
        else:
            amax = {}
        # Rewrites rebuild the node list (detaching old references): find each node again by its output.
        for out in targets:
            node = index.producer(out)
            w = index.constant(node.input[1])
            a = amax.get(node.input[0])
            if node.op_type == "Attention" and node.domain == MS_DOMAIN:
                done = self._attention(index, node, w, scheme, cfg.attention, a, cfg.smooth_alpha,
                                       cfg.trim_masked_keys)
            elif node.domain in DEFAULT_DOMAINS and node.op_type in ("MatMul", "Gemm"):
                done = self._matmul(index, node, w, scheme, a, cfg.smooth_alpha)
            else:
                done = None
            if done:
                counts[done] = counts.get(done, 0) + 1
        if counts:
            if not any(o.domain == MS_DOMAIN for o in model.opset_import):
                model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
            eliminate(g)
            drop_value_info(g)
        details = {"scheme": scheme, "reason": reason, "quantized": counts, "skipped_small": skipped_small,
                   "smoothed": len(amax) > 0}
        return PassResult(model, bool(counts), details)

    # --- MatMul / Gemm -------------------------------------------------------------------
    def _matmul(self, index: GraphIndex, node: onnx.NodeProto, w: np.ndarray, scheme: str,
                amax: np.ndarray | None, alpha: float) -> str | None:
        bias = None
        if node.op_type == "Gemm":
            if attr(node, "transA", 0) or attr(node, "alpha", 1.0) != 1.0 or w.ndim != 2:
                return None
            if attr(node, "transB", 0):
                w = w.T
            if len(node.input) > 2 and node.input[2]:
                c = index.constant(node.input[2])
                if c is None or attr(node, "beta", 1.0) != 1.0 or c.size != w.shape[1]:
                    return None
                bias = c.reshape(-1).astype(np.float32)
        elif w.ndim != 2:
            return None
        base = node.name or node.output[0]
        x, pre, w = self._smooth(index, node.input[0], w, amax, alpha, base)
        q, scale, zp = quantize_weight(w, scheme)
        inputs = [x, index.add_initializer(q, f"{base}_w_quantized"),
                  index.add_initializer(scale, f"{base}_w_scale"), index.add_initializer(zp, f"{base}_w_zero_point")]
        if bias is not None:
            inputs.append(index.add_initializer(bias, f"{base}_bias"))
        new = helper.make_node("DynamicQuantizeMatMul", inputs, list(node.output), domain=MS_DOMAIN,
                               name=index.unique_name(f"{base}_quant"))
        self._replace(index, node, pre + [new])
        return node.op_type

    # --- Attention -----------------------------------------------------------------------
    def _attention(self, index: GraphIndex, node: onnx.NodeProto, w: np.ndarray, scheme: str,
                   form: str, amax: np.ndarray | None, alpha: float, trim: bool) -> str | None:
        extra = [a.name for a in node.attribute if a.name not in ("num_heads", "scale", "mask_filter_value")]
        if extra or len(node.input) < 3 or len(node.output) != 1 or w.ndim != 2 or w.shape[1] % 3:
            return None  # past state, rotary, unidirectional, qkv_hidden_sizes: keep float
        bias = index.constant(node.input[2])
        mask = node.input[3] if len(node.input) > 3 else ""
        if bias is None or (mask and not self._mask_2d(index, mask)):
            return None
        base = node.name or node.output[0]
        x, pre, w = self._smooth(index, node.input[0], w, amax, alpha, base)
        q, scale, zp = quantize_weight(w, scheme)
        heads = attr(node, "num_heads")
        keep = [a for a in node.attribute if a.name in ("scale", "mask_filter_value")]
        if form == "qattention":
            xq, xs, xz = (index.unique_name(f"{base}_{s}") for s in ("input_quantized", "input_scale", "input_zp"))
            dql = helper.make_node("DynamicQuantizeLinear", [x], [xq, xs, xz],
                                   name=index.unique_name(f"{base}_quantize_input"))
            qa = helper.make_node("QAttention", [xq, index.add_initializer(q, f"{base}_w_quantized"), node.input[2],
                                                 xs, index.add_initializer(scale, f"{base}_w_scale"), mask, xz,
                                                 index.add_initializer(zp, f"{base}_w_zero_point")],
                                  list(node.output), domain=MS_DOMAIN, name=index.unique_name(f"{base}_quant"))
            qa.attribute.extend(keep)
            qa.attribute.append(helper.make_attribute("num_heads", heads))
            self._replace(index, node, pre + [dql, qa])
            return "Attention"
        hidden = w.shape[1] // 3
        qkv = index.unique_name(f"{base}_qkv")
        mm = helper.make_node("DynamicQuantizeMatMul",
                              [x, index.add_initializer(q, f"{base}_w_quantized"),
                               index.add_initializer(scale, f"{base}_w_scale"),
                               index.add_initializer(zp, f"{base}_w_zero_point")],
                              [qkv], domain=MS_DOMAIN, name=index.unique_name(f"{base}_qkv_quant"))
        parts = [index.unique_name(f"{base}_{p}") for p in ("q", "k", "v")]
        split = helper.make_node("Split", [qkv, index.add_initializer(np.array([hidden] * 3, np.int64),
                                                                       f"{base}_split")],
                                 parts, axis=-1, name=index.unique_name(f"{base}_split"))
        new = pre + [mm, split]
        if mask and trim and self._shape_slices:
            mask, keys = self._trim_mask(index, mask, new)
            for i in (1, 2):
                sliced = index.unique_name(f"{parts[i]}_trimmed")
                new.append(helper.make_node("Slice", [parts[i], self._const(index, [0], "trim_start"), keys,
                                                      self._const(index, [1], "trim_axis")],
                                            [sliced], name=index.unique_name(f"{base}_trim_{'kv'[i - 1]}")))
                parts[i] = sliced
        mha_inputs = parts + [node.input[2]]
        if mask:
            mha_inputs.append(mask)
        mha = helper.make_node("MultiHeadAttention", mha_inputs, list(node.output), domain=MS_DOMAIN,
                               name=index.unique_name(f"{base}_mha"))
        mha.attribute.extend(keep)
        mha.attribute.append(helper.make_attribute("num_heads", heads))
        new.append(mha)
        self._replace(index, node, new)
        return "Attention"

    def _trim_mask(self, index: GraphIndex, mask: str, new: list[onnx.NodeProto]) -> tuple[str, str]:
        """(mask[:, :T], T as a [1] int64) with T = 1 + the last position any row attends to (at least 1).
        Appends the nodes to ``new`` the first time a mask is seen."""
        if mask in self._trimmed:
            return self._trimmed[mask]
        n = {k: index.unique_name(f"{mask}_{k}") for k in
             ("shape", "length", "length_1", "positions", "used", "last", "keys32", "keys", "trimmed")}

        def node(op, inputs, out, **kw):
            new.append(helper.make_node(op, inputs, [n[out]], name=index.unique_name(f"{mask}_{op}"), **kw))

        one = self._const(index, 1, "one", np.int32)
        node("Shape", [mask], "shape", start=1, end=2)
        node("Cast", [n["shape"]], "length", to=TensorProto.INT32)
        node("Add", [n["length"], one], "length_1")
        node("Range", [one, self._squeeze(index, n["length_1"], new), one], "positions")
        node("Mul", [mask, n["positions"]], "used")  # 1-based position where attended, else 0
        node("ReduceMax", [n["used"]], "last", keepdims=0)
        node("Max", [n["last"], one], "keys32")
        node("Cast", [n["keys32"]], "keys", to=TensorProto.INT64)
        keys = index.unique_name(f"{mask}_key_count")
        new.append(helper.make_node("Reshape", [n["keys"], self._const(index, [1], "one_dim")], [keys],
                                    name=index.unique_name(f"{mask}_Reshape")))
        new.append(helper.make_node("Slice", [mask, self._const(index, [0], "trim_start"), keys,
                                              self._const(index, [1], "trim_axis")], [n["trimmed"]],
                                    name=index.unique_name(f"{mask}_Slice")))
        self._trimmed[mask] = (n["trimmed"], keys)
        return self._trimmed[mask]

    @staticmethod
    def _squeeze(index: GraphIndex, name: str, new: list[onnx.NodeProto]) -> str:
        out = index.unique_name(f"{name}_scalar")
        new.append(helper.make_node("Reshape", [name, index.add_initializer(np.array([], np.int64), "scalar_shape")],
                                    [out], name=index.unique_name(f"{name}_Reshape")))
        return out

    def _const(self, index: GraphIndex, value, base: str, dtype=np.int64) -> str:
        if base not in self._consts:
            self._consts[base] = index.add_initializer(np.array(value, dtype), base)
        return self._consts[base]

    @staticmethod
    def _smooth(index: GraphIndex, x: str, w: np.ndarray, amax: np.ndarray | None, alpha: float,
                base: str) -> tuple[str, list[onnx.NodeProto], np.ndarray]:
        """SmoothQuant: x @ w == (x / s) @ (s * w); s evens out per-channel activation and weight maxima so
        the per-tensor activation quantization is not set by a few outlier channels."""
        if amax is None or amax.shape != (w.shape[0],):
            return x, [], w
        s = smoothing_factors(amax, np.abs(w).max(axis=1), alpha)
        out = index.unique_name(f"{base}_smoothed_input")
        mul = helper.make_node("Mul", [x, index.add_initializer((1.0 / s).astype(np.float32), f"{base}_smooth_inverse")],
                               [out], name=index.unique_name(f"{base}_smooth"))
        return out, [mul], (w * s[:, None]).astype(np.float32)

    @staticmethod
    def _mask_2d(index: GraphIndex, name: str) -> bool:
        """MultiHeadAttention's key_padding_mask is an int32 [B, L] 0/1 mask, as transformer-fusion writes."""
        node = index.producer(name)
        return (node is not None and node.op_type == "Cast" and attr(node, "to") == TensorProto.INT32
                and any(i.name == node.input[0] and len(i.type.tensor_type.shape.dim) == 2
                        for i in index.graph.input))

    @staticmethod
    def _replace(index: GraphIndex, old: onnx.NodeProto, new: list[onnx.NodeProto]) -> None:
        nodes = list(index.graph.node)
        pos = next(i for i, n in enumerate(nodes) if n is old)
        del index.graph.node[:]
        index.graph.node.extend(nodes[:pos] + new + nodes[pos + 1:])
        index.refresh()
