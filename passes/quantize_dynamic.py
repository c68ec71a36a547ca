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
import onnx_ir as ir
from onnx import TensorProto, helper
from pydantic import Field

from onnxopt.activations import stream_activations
from onnxopt.errors import OnnxoptError, PreconditionError
from onnxopt.graph import (
    Namer,
    add_initializer,
    attr,
    constant_tensor,
    constant_value,
    drop_if_unused,
    is_op,
    make_node,
    opset_version,
    replace_node,
)
from onnxopt.isa import detect_cpu
from onnxopt.pass_infra import Pass, PassConfig, PassResult
from onnxopt.quant import quantize, weight_params

MS_DOMAIN = "com.microsoft"

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


def channel_maxima(model: ir.Model, tensors: list[str], source, batch_size: int,
                   max_samples: int) -> dict[str, np.ndarray]:
    """max |x| per last-axis channel of each tensor over the calibration samples."""
    amax: dict[str, np.ndarray] = {}
    for _, values in stream_activations(model, source, tensors, batch_size=batch_size, max_samples=max_samples,
                                        what="model (smoothing calibration)"):
        for name, v in values.items():
            m = np.abs(v.reshape(-1, v.shape[-1])).max(axis=0)
            amax[name] = m if name not in amax else np.maximum(amax[name], m)
    if not amax:
        raise OnnxoptError(f"quantize-dynamic: no calibration samples in {source.description}")
    return amax


class QuantizeDynamic(Pass):
    name = "quantize-dynamic"
    summary = "Dynamic INT8: MatMul/Gemm/Attention weights int8 per channel, activations quantized at run time."
    Config = QuantizeDynamicConfig

    def call(self, model: ir.Model) -> PassResult:
        cfg: QuantizeDynamicConfig = self.config
        self._trimmed: dict[int, tuple[ir.Value, ir.Value]] = {}  # mask -> (trimmed mask, key count)
        self._consts: dict[str, ir.Value] = {}
        self._shape_slices = opset_version(model) >= 15  # Shape(start, end) in the trimming
        scheme, reason = dynamic_scheme(cfg.scheme, cfg.cpu_flags)
        g = model.graph
        self.graph = g
        self.namer = Namer(g)
        counts: dict[str, int] = {}
        skipped_small = 0
        targets: list[ir.Node] = []
        for node in g:
            if (node.name or "") in cfg.exclude_nodes or node.op_type not in cfg.op_types or not node.outputs:
                continue
            t = constant_tensor(node.inputs[1]) if len(node.inputs) > 1 else None
            if t is None or t.dtype != ir.DataType.FLOAT:
                continue
            if t.size < cfg.min_weight_elements:
                skipped_small += 1
                continue
            targets.append(node)
        smooth = cfg.smoothing == "on" or (cfg.smoothing == "auto" and self.context.calibration is not None)
        if smooth and targets:
            if self.context.calibration is None:
                raise PreconditionError("smoothing: on needs calibration data (pass it with --calib)")
            amax = channel_maxima(model, sorted({n.inputs[0].name for n in targets}), self.context.calibration,
                                  cfg.batch_size, cfg.max_samples)
        else:
            amax = {}
        with self.context.progress.task("quantize-dynamic", len(targets)) as bar:
            for node in targets:  # one weight at a time: read, quantize, rewrite, drop the float weight
                weight = node.inputs[1]
                a = amax.get(node.inputs[0].name)
                if is_op(node, "Attention", MS_DOMAIN):
                    done = self._attention(node, constant_value(weight), scheme, cfg.attention, a, cfg.smooth_alpha,
                                           cfg.trim_masked_keys)
                elif is_op(node, ("MatMul", "Gemm")):
                    done = self._matmul(node, constant_value(weight), scheme, a, cfg.smooth_alpha)
                else:
                    done = None
                if done:
                    counts[done] = counts.get(done, 0) + 1
                    drop_if_unused(g, weight)
                bar.update(1)
        if counts:
            if MS_DOMAIN not in model.opset_imports:
                model.opset_imports[MS_DOMAIN] = 1
            from onnxopt.graph import ancestors, drop_unused_initializers

            live = ancestors(g, g.outputs)
            dead = [n for n in g if n not in live]
            if dead:
                g.remove(dead, safe=True)
            drop_unused_initializers(g)
        details = {"scheme": scheme, "reason": reason, "quantized": counts, "skipped_small": skipped_small,
                   "smoothed": len(amax) > 0}
        return PassResult(model, bool(counts), details)

    def _init(self, array: np.ndarray, base: str) -> ir.Value:
        return add_initializer(self.graph, np.asarray(array), base, self.namer)

    def _node(self, op: str, inputs: list, attributes: dict | None = None, *, outputs: list[str] | None = None,
              domain: str = "", name: str) -> ir.Node:
        return make_node(op, inputs, attributes, outputs=[self.namer.unique(o) for o in outputs] if outputs else None,
                         domain=domain, name=self.namer.unique(name))

    # --- MatMul / Gemm -------------------------------------------------------------------
    def _matmul(self, node: ir.Node, w: np.ndarray, scheme: str, amax: np.ndarray | None,
                alpha: float) -> str | None:
        bias = None
        if node.op_type == "Gemm":
            if attr(node, "transA", 0) or attr(node, "alpha", 1.0) != 1.0 or w.ndim != 2:
                return None
            if attr(node, "transB", 0):
                w = w.T
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                c = constant_value(node.inputs[2])
                if c is None or attr(node, "beta", 1.0) != 1.0 or c.size != w.shape[1]:
                    return None
                bias = c.reshape(-1).astype(np.float32)
        elif w.ndim != 2:
            return None
        base = node.name or node.outputs[0].name
        x, pre, w = self._smooth(node.inputs[0], w, amax, alpha, base)
        q, scale, zp = quantize_weight(w, scheme)
        inputs = [x, self._init(q, f"{base}_w_quantized"), self._init(scale, f"{base}_w_scale"),
                  self._init(zp, f"{base}_w_zero_point")]
        if bias is not None:
            inputs.append(self._init(bias, f"{base}_bias"))
        new = self._node("DynamicQuantizeMatMul", inputs, domain=MS_DOMAIN, name=f"{base}_quant")
        replace_node(node, pre + [new], [new.outputs[0]])
        return node.op_type

    # --- Attention -----------------------------------------------------------------------
    def _attention(self, node: ir.Node, w: np.ndarray, scheme: str, form: str, amax: np.ndarray | None,
                   alpha: float, trim: bool) -> str | None:
        extra = [name for name in node.attributes if name not in ("num_heads", "scale", "mask_filter_value")]
        if extra or len(node.inputs) < 3 or len(node.outputs) != 1 or w.ndim != 2 or w.shape[1] % 3:
            return None  # past state, rotary, unidirectional, qkv_hidden_sizes: keep float
        bias = constant_value(node.inputs[2])
        mask = node.inputs[3] if len(node.inputs) > 3 else None
        if bias is None or (mask is not None and not self._mask_2d(mask)):
            return None
        base = node.name or node.outputs[0].name
        x, pre, w = self._smooth(node.inputs[0], w, amax, alpha, base)
        q, scale, zp = quantize_weight(w, scheme)
        heads = attr(node, "num_heads")
        keep = {k: attr(node, k) for k in ("scale", "mask_filter_value") if k in node.attributes}
        if form == "qattention":
            dql = self._node("DynamicQuantizeLinear", [x], outputs=[f"{base}_input_quantized", f"{base}_input_scale",
                                                                     f"{base}_input_zp"],
                             name=f"{base}_quantize_input")
            xq, xs, xz = dql.outputs
            qa = self._node("QAttention", [xq, self._init(q, f"{base}_w_quantized"), node.inputs[2], xs,
                                           self._init(scale, f"{base}_w_scale"), mask, xz,
                                           self._init(zp, f"{base}_w_zero_point")],
                            {**keep, "num_heads": heads}, domain=MS_DOMAIN, name=f"{base}_quant")
            replace_node(node, pre + [dql, qa], [qa.outputs[0]])
            return "Attention"
        hidden = w.shape[1] // 3
        mm = self._node("DynamicQuantizeMatMul", [x, self._init(q, f"{base}_w_quantized"),
                                                  self._init(scale, f"{base}_w_scale"),
                                                  self._init(zp, f"{base}_w_zero_point")],
                        outputs=[f"{base}_qkv"], domain=MS_DOMAIN, name=f"{base}_qkv_quant")
        split = self._node("Split", [mm.outputs[0], self._init(np.array([hidden] * 3, np.int64), f"{base}_split")],
                           {"axis": -1}, outputs=[f"{base}_{p}" for p in ("q", "k", "v")], name=f"{base}_split")
        parts = list(split.outputs)
        new = pre + [mm, split]
        if mask is not None and trim and self._shape_slices:
            mask, keys = self._trim_mask(mask, new)
            for i in (1, 2):
                sl = self._node("Slice", [parts[i], self._const([0], "trim_start"), keys, self._const([1], "trim_axis")],
                                outputs=[f"{parts[i].name}_trimmed"], name=f"{base}_trim_{'kv'[i - 1]}")
                new.append(sl)
                parts[i] = sl.outputs[0]
        mha_inputs = parts + [node.inputs[2]]
        if mask is not None:
            mha_inputs.append(mask)
        mha = self._node("MultiHeadAttention", mha_inputs, {**keep, "num_heads": heads}, domain=MS_DOMAIN,
                         name=f"{base}_mha")
        new.append(mha)
        replace_node(node, new, [mha.outputs[0]])
        return "Attention"

    def _trim_mask(self, mask: ir.Value, new: list[ir.Node]) -> tuple[ir.Value, ir.Value]:
        """(mask[:, :T], T as a [1] int64) with T = 1 + the last position any row attends to (at least 1).
        Appends the nodes to ``new`` the first time a mask is seen."""
        if id(mask) in self._trimmed:
            return self._trimmed[id(mask)]
        m = mask.name

        def node(op, inputs, out, **kw):
            n = self._node(op, inputs, kw or None, outputs=[f"{m}_{out}"], name=f"{m}_{op}")
            new.append(n)
            return n.outputs[0]

        one = self._const(1, "one", np.int32)
        shape = node("Shape", [mask], "shape", start=1, end=2)
        length = node("Cast", [shape], "length", to=TensorProto.INT32)
        length_1 = node("Add", [length, one], "length_1")
        positions = node("Range", [one, self._squeeze(length_1, new), one], "positions")
        used = node("Mul", [mask, positions], "used")  # 1-based position where attended, else 0
        last = node("ReduceMax", [used], "last", keepdims=0)
        keys32 = node("Max", [last, one], "keys32")
        keys64 = node("Cast", [keys32], "keys", to=TensorProto.INT64)
        reshape = self._node("Reshape", [keys64, self._const([1], "one_dim")], outputs=[f"{m}_key_count"],
                             name=f"{m}_Reshape")
        new.append(reshape)
        keys = reshape.outputs[0]
        trimmed = self._node("Slice", [mask, self._const([0], "trim_start"), keys, self._const([1], "trim_axis")],
                             outputs=[f"{m}_trimmed"], name=f"{m}_Slice")
        new.append(trimmed)
        self._trimmed[id(mask)] = (trimmed.outputs[0], keys)
        return self._trimmed[id(mask)]

    def _squeeze(self, value: ir.Value, new: list[ir.Node]) -> ir.Value:
        n = self._node("Reshape", [value, self._init(np.array([], np.int64), "scalar_shape")],
                       outputs=[f"{value.name}_scalar"], name=f"{value.name}_Reshape")
        new.append(n)
        return n.outputs[0]

    def _const(self, value, base: str, dtype=np.int64) -> ir.Value:
        if base not in self._consts:
            self._consts[base] = self._init(np.array(value, dtype), base)
        return self._consts[base]

    def _smooth(self, x: ir.Value, w: np.ndarray, amax: np.ndarray | None, alpha: float,
                base: str) -> tuple[ir.Value, list[ir.Node], np.ndarray]:
        """SmoothQuant: x @ w == (x / s) @ (s * w); s evens out per-channel activation and weight maxima so
        the per-tensor activation quantization is not set by a few outlier channels."""
        if amax is None or amax.shape != (w.shape[0],):
            return x, [], w
        s = smoothing_factors(amax, np.abs(w).max(axis=1), alpha)
        mul = self._node("Mul", [x, self._init((1.0 / s).astype(np.float32), f"{base}_smooth_inverse")],
                         outputs=[f"{base}_smoothed_input"], name=f"{base}_smooth")
        return mul.outputs[0], [mul], (w * s[:, None]).astype(np.float32)

    @staticmethod
    def _mask_2d(value: ir.Value) -> bool:
        """MultiHeadAttention's key_padding_mask is an int32 [B, L] 0/1 mask, as transformer-fusion writes."""
        node = value.producer()
        src = node.inputs[0] if node is not None and node.inputs else None
        return (is_op(node, "Cast") and attr(node, "to") == TensorProto.INT32 and src is not None
                and src.is_graph_input() and src.shape is not None and len(src.shape) == 2)
