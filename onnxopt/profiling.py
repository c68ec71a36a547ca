"""Where a model's time goes in ONNX Runtime: kernel times attributed to the model's own nodes.

ORT profiles the nodes of its *optimized* graph, whose names are not the model's: fusions keep
the name of the node they start from plus a suffix (the NHWC layout transformer appends
``_token_N``), the NCHWc transformer names a conv after its output tensor plus ``_nchwc``, and
layout changes add ``Transpose``/``ReorderInput``/``ReorderOutput`` nodes of their own. ``resolve``
maps a kernel name back to a node of the model (by name, by output tensor name, or by the
longest node name it starts with); what cannot be mapped is reported as unattributed.

Timing uses one thread by default so that a profile measures the kernels, not the scheduler.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt.errors import OnnxoptError
from onnxopt.graph import attr
from onnxopt.model_io import as_ir

# Suffixes ORT's graph transformers append to the names of the nodes they create.
_SUFFIXES = re.compile(r"(_token_\d+|_nchwc|_fused|_Fused\w*|_kernel_time)$")
LEVELS = ("disable", "basic", "extended", "all")


def session_options(threads: int = 1, opt_level: str = "all", config: dict[str, str] | None = None,
                    profile_prefix: str | None = None):
    """The core's session options plus session config entries and, if asked, ORT's profiler."""
    from onnxopt.runtime import session_options as base_options

    so = base_options(opt_level, threads)
    for k, v in (config or {}).items():
        so.add_session_config_entry(k, v)
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return so


def make_session(model: ir.Model | onnx.ModelProto, threads: int = 1, opt_level: str = "all",
                 config: dict[str, str] | None = None, profile_prefix: str | None = None):
    from onnxopt.runtime import make_session as runtime_session

    so = session_options(threads, opt_level, config, profile_prefix)
    return runtime_session(model, options=so, what="the model to profile")


def conv_kind(node: ir.Node, weight_shape: tuple[int, ...] | None) -> str:
    """depthwise / pointwise / grouped / regular conv, from the weight shape [M, C/group, k...]."""
    group = int(attr(node, "group", 1))
    if weight_shape is None or len(weight_shape) < 3:
        return "conv"
    if group > 1:
        return "depthwise-conv" if weight_shape[1] == 1 and weight_shape[0] == group else "grouped-conv"
    return "pointwise-conv" if all(k == 1 for k in weight_shape[2:]) else "conv"


def op_kinds(model: ir.Model | onnx.ModelProto) -> dict[str, str]:
    """Node name -> kind: conv kinds split as in ``conv_kind``, ``gemm``/``matmul``, else the op type.

    In a QDQ model the weight comes through a DequantizeLinear; its initializer gives the shape.
    """
    g = as_ir(model).graph
    out: dict[str, str] = {}
    for n in g:
        name = n.name or ""
        if n.op_type in ("Conv", "ConvTranspose"):
            w = n.inputs[1] if len(n.inputs) > 1 else None
            p = w.producer() if w is not None else None
            if p is not None and p.op_type == "DequantizeLinear":
                w = p.inputs[0]
            t = w.const_value if w is not None and w.is_initializer() else None
            kind = conv_kind(n, tuple(t.shape.numpy()) if t is not None else None)
            out[name] = kind if n.op_type == "Conv" else "conv-transpose"
        else:
            out[name] = n.op_type.lower() if n.op_type in ("Gemm", "MatMul") else n.op_type
    return out


@dataclass
class Profile:
    """Kernel time per run (microseconds, median over the runs) of every node ORT ran, keyed by ORT's node name."""

    kernels: dict[str, float]
    kernel_ops: dict[str, str]  # ORT node name -> kernel op (QLinearConv, FusedConv, ...)
    run_us: float  # median time of a whole run as ORT measured it
    runs: int
    # filled by ``attribute``
    by_node: dict[str, float] = field(default_factory=dict)
    kernels_of: dict[str, list[str]] = field(default_factory=dict)
    unattributed: dict[str, float] = field(default_factory=dict)

    @property
    def kernel_us(self) -> float:
        return sum(self.kernels.values())

    def attribute(self, model: ir.Model | onnx.ModelProto) -> Profile:
        """Attribute every kernel's time to a node of ``model`` (the model that was profiled)."""
        by_node: dict[str, float] = defaultdict(float)
        kernels_of: dict[str, list[str]] = defaultdict(list)
        unattributed: dict[str, float] = {}
        resolver = Resolver(model)
        for k, us in self.kernels.items():
            node = resolver.resolve(k)
            if node is None:
                unattributed[k] = us
            else:
                by_node[node] += us
                kernels_of[node].append(f"{self.kernel_ops.get(k, '?')} {k}")
        self.by_node, self.kernels_of, self.unattributed = dict(by_node), dict(kernels_of), unattributed
        return self

    def by_kind(self, model: ir.Model | onnx.ModelProto) -> dict[str, float]:
        """Attributed time per node kind (``op_kinds``); unattributed kernels by their kernel op."""
        model = as_ir(model)
        kinds = op_kinds(model)
        # a fused activation carries its conv's time when ORT names the fused kernel after it
        for n in model.graph:
            x = n.inputs[0] if n.inputs else None
            p = x.producer() if x is not None else None
            if n.op_type in ("Relu", "Clip") and p is not None and (p.name or "") in kinds:
                kinds[n.name or ""] = kinds[p.name or ""]
        out: dict[str, float] = defaultdict(float)
        for node, us in self.by_node.items():
            out[kinds.get(node, "?")] += us
        for k, us in self.unattributed.items():
            out[f"(ORT {self.kernel_ops.get(k, k)})"] += us
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


class Resolver:
    """Maps ORT's optimized-graph node names back to the nodes of the model it loaded."""

    def __init__(self, model: ir.Model | onnx.ModelProto):
        g = as_ir(model).graph
        self.names = {n.name for n in g if n.name}
        self.tensor_producer = {o.name: n.name for n in g for o in n.outputs if o.name and n.name}
        # longest first, so "/a/Conv_1" wins over "/a/Conv" for "/a/Conv_1_token_3"
        self._by_length = sorted(self.names, key=len, reverse=True)

    def resolve(self, kernel: str) -> str | None:
        name = kernel
        while True:
            if name in self.names:
                return name
            if name in self.tensor_producer:
                return self.tensor_producer[name]
            stripped = _SUFFIXES.sub("", name)
            if stripped == name:
                break
            name = stripped
        for n in self._by_length:
            if name.startswith(n) and len(name) > len(n) and not name[len(n)].isalnum():
                return n
        return None


def profile(model: ir.Model | onnx.ModelProto, feeds: dict[str, np.ndarray], *, runs: int = 20, warmup: int = 3,
            threads: int = 1, opt_level: str = "all", config: dict[str, str] | None = None) -> Profile:
    """Run ``model`` ``warmup + runs`` times with ORT's profiler and return the mean time per kernel
    of the timed runs (the warm-up runs are dropped: they include one-off allocations)."""
    with tempfile.TemporaryDirectory(prefix="onnxopt-profile-") as tmp:
        sess = make_session(model, threads, opt_level, config, profile_prefix=os.path.join(tmp, "p"))
        for _ in range(warmup + runs):
            sess.run(None, feeds)
        path = Path(sess.end_profiling())
        events = json.loads(path.read_text())
    return parse_events(events, skip_runs=warmup)


def parse_events(events: list[dict], skip_runs: int = 0) -> Profile:
    """Per-kernel mean times from ORT's chrome-trace events, ignoring the first ``skip_runs`` runs."""
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    kept = runs[skip_runs:] or runs
    if not kept:
        raise OnnxoptError("the ORT profile has no model_run events")
    start = kept[0]["ts"]
    durs: dict[str, list[float]] = defaultdict(list)
    ops: dict[str, str] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e["ts"] < start:
            continue
        name = e["name"][: -len("_kernel_time")]
        durs[name].append(float(e["dur"]))
        ops[name] = e.get("args", {}).get("op_name", "?")
    n = len(kept)
    # the median run of each kernel: a run preempted by another process must not move one op's cost
    kernels = {k: statistics.median(v) * len(v) / n for k, v in durs.items()}
    return Profile(kernels, ops, statistics.median(e["dur"] for e in kept), n)
