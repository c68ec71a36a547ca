"""Structured channel pruning: remove whole output channels of Conv/Gemm/MatMul layers, for real.

A *source* is a Conv (group 1), Gemm or MatMul with constant weights; its output channels are followed
forward through ops that keep channels apart -- unary element-wise ops (Relu, Clip, Sigmoid ...), Add/Sub/
Mul/Div with a per-channel (or scalar) constant, BatchNormalization, depthwise Convs (group == channels,
which follow their producer: weights, bias and ``group`` shrink), pooling, Concat on the channel axis,
and Flatten (or a Reshape that flattens) into a Gemm, where a channel is a contiguous block of features --
up to the *sinks*, the Conv/Gemm/MatMul layers that read them and lose the matching input channels.

Values combined element-wise from two sources (a residual Add, a squeeze-excite Mul) tie the sources'
channels together: the same channel set is removed from all of them, ranked by their summed scores
(``tied: prune``), or the whole group is left alone (``tied: skip``). A group whose channels reach
anything the pass cannot follow (a graph output, Transpose, a Reshape that is not a flatten, Shape,
a Softmax over channels, an Add with a non-source value ...) is left alone; the details say why.

Which channels go (``criterion``): ``l1``/``l2`` norms of each channel's weights (summed over the tied
sources, each normalised by its mean so wide and narrow layers weigh alike; with ``downstream``, times what
the followers and consumers multiply the channel by, since folded BatchNorms split a channel's scale
arbitrarily between layers), or ``output``: the energy the channel contributes to the sinks' outputs on the
calibration data, ``E[x_c^2] * ||W_sink[:, c]||^2`` (needs ``--calib``; far better on Lite0).
How many: ``ratio`` of every group's channels (``ratios`` overrides per source node), or with ``scope:
global`` one threshold on the normalised scores across groups; the kept count is rounded up to a multiple
of ``round_to`` (kernels like multiples of 8) and never below ``min_channels``.

With ``bias_correction`` a removed channel's mean contribution moves into each consumer's bias: its mean
on the calibration data, or without data the value it holds with its weights zeroed (its bias pushed
through the followers), and with ``refit`` (default when calibration data is given) every 1x1 Conv or Gemm
whose input lost channels is refitted by least squares to reproduce the original model's outputs: with
``x`` the consumer's input in the original model, ``t`` its kept input in the pruned model (``refit_inputs:
pruned``, so the fit also absorbs what pruning upstream layers did to ``t``; or ``original``: the kept part
of ``x``), ``W' = W S_xt (S_tt + lambda I)^-1`` with centred covariances and ``b' = b + W E[x] - W' E[t]``.
``refit_rounds`` passes repeat this on the model the previous pass left. Only moments are kept (Gram and
cross-product matrices of at most ``max_refit_dim`` inputs, over at most ``max_positions`` positions per
sample), never the activations; a refit is used only when it lowers the layer's output error on the
calibration data, and both errors are reported per layer. Convs with spatial kernels are sliced only.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx
import onnx_ir as ir
from pydantic import Field, NonNegativeFloat, PositiveInt

from onnxopt import graph as irg
from onnxopt.activations import activation_session
from onnxopt.checks import infer
from onnxopt.data import first, samples_in, subset
from onnxopt.errors import PreconditionError
from onnxopt.graph import (
    Namer,
    clone_model,
    constant_tensor,
    constant_value,
    drop_unused_initializers,
    initializer_bytes,
    parameter_count,
    tensor_bytes,
)
from onnxopt.pass_infra import Pass, PassConfig, PassResult
from onnxopt.stat_correction import (
    StatisticsCorrectionOptions,
    correct_channel_statistics,
    correction_details,
)

DEFAULT_DOMAINS = ("", "ai.onnx")


# The channel analysis reasons about values by name (flows, groups and masks are keyed by the value a channel
# set lives in); these views give it names over the IR, and every write goes through the IR's use-def.
class _V:
    """A node of the IR seen through the names of its inputs and outputs (read live from the node)."""

    __slots__ = ("ir",)

    def __init__(self, node: ir.Node):
        self.ir = node

    @property
    def input(self) -> list[str]:
        return [x.name if x is not None else "" for x in self.ir.inputs]

    @property
    def output(self) -> list[str]:
        return [o.name or "" for o in self.ir.outputs]

    @property
    def op_type(self) -> str:
        return self.ir.op_type

    @property
    def domain(self) -> str:
        return self.ir.domain

    @property
    def name(self) -> str:
        return self.ir.name or ""


class _Index:
    """Name-level reads of the main graph: values, constants, readers (as ``_V`` views, one per node)."""

    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self._views: dict[int, _V] = {}
        self.refresh()

    def view(self, node: ir.Node) -> _V:
        v = self._views.get(id(node))
        if v is None:
            v = self._views[id(node)] = _V(node)
        return v

    def refresh(self) -> None:
        g = self.graph
        self.nodes = [self.view(n) for n in g]
        self.values = irg.values_by_name(g)
        self.initializers = {k: v for k, v in g.initializers.items() if not v.is_graph_input()}
        self.graph_outputs = {o.name for o in g.outputs}

    def constant(self, name: str) -> np.ndarray | None:
        return constant_value(self.values.get(name)) if name else None

    def meta(self, name: str) -> _Meta | None:
        """A constant's shape and dtype, its values unread (None where ``constant`` gives None)."""
        tensor = constant_tensor(self.values.get(name)) if name else None
        if tensor is None:
            return None
        try:
            dtype = tensor.dtype.numpy()
        except Exception:  # noqa: BLE001 - a dtype numpy cannot hold: not a constant the analysis uses
            return None
        return _Meta(tuple(int(d) for d in tensor.shape), dtype, tensor)

    def release(self, name: str) -> None:
        """Let go of a mapped weight this pass read and keeps."""
        try:
            irg.release(self.values.get(name))
        except BufferError:  # still viewed somewhere: the mapping closes with that view
            pass


@dataclass(frozen=True)
class _Meta:
    """A constant weight as the channel analysis sees it before reading it: shape, dtype and its tensor."""

    shape: tuple[int, ...]
    dtype: np.dtype
    tensor: ir.TensorProtocol

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def uses(self, name: str) -> list[_V]:
        v = self.values.get(name)
        return [self.view(u.node) for u in v.uses()] if v is not None else []


def attr(node, name: str, default=None):
    return irg.attr(node.ir if isinstance(node, _V) else node, name, default)


def set_attr(node, name: str, value) -> None:
    irg.set_attr(node.ir if isinstance(node, _V) else node, name, value)


UNARY = {"Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "LeakyRelu", "Tanh", "Elu", "Selu", "Softplus",
         "Softsign", "Identity", "Dropout", "Neg", "Abs", "Exp", "Log", "Sqrt", "Erf", "Gelu", "Mish",
         "Cast", "Floor", "Ceil", "Round", "Sign", "Reciprocal", "ThresholdedRelu", "Celu"}
BINARY = {"Add", "Sub", "Mul", "Div"}
POOLS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"}


class PruneChannelsConfig(PassConfig, StatisticsCorrectionOptions):
    type: Literal["prune-channels"] = "prune-channels"
    ratio: float = Field(0.25, ge=0, lt=1, description="fraction of each group's channels to remove")
    ratios: dict[str, float] = Field(
        default_factory=dict, description="ratio per source node name (wins over ratio; a tied group takes "
                                          "the largest ratio of its sources)")
    scope: Literal["layer", "global"] = Field(
        "layer", description="layer: every group loses `ratio` of its channels; global: one threshold on the "
                             "normalised scores across all groups removes `ratio` of all prunable channels")
    criterion: Literal["l1", "l2", "output"] | None = Field(
        None, description="l1/l2 weight norms, or output: contribution to the next layers' outputs on the "
                          "calibration data. Default: output with --calib, l2 without")
    downstream: bool = Field(
        True, description="l1/l2: weigh each channel's norm by what its followers (depthwise kernels, "
                          "BatchNorm, per-channel factors) and consumers' input weights multiply it by")
    round_to: PositiveInt = Field(8, description="kept channel counts are rounded up to a multiple of this")
    min_channels: PositiveInt = Field(8, description="never keep fewer channels than this in a group")
    tied: Literal["prune", "skip"] = Field(
        "prune", description="channels tied by residual Adds/Concats/Muls: prune them together or leave them")
    include: list[str] | None = Field(None, description="fnmatch patterns of source node names to prune")
    exclude: list[str] = Field(default_factory=list, description="fnmatch patterns of source node names to leave")
    refit: bool | None = Field(
        None, description="refit the consumers' weights by least squares on the calibration activations "
                          "(default: when calibration data is given)")
    refit_inputs: Literal["original", "pruned"] = Field(
        "original", description="refit on the kept part of the original model's activations, or on the pruned "
                                "model's (also corrects what upstream pruning did to a layer's inputs, but "
                                "overfits small calibration sets: on Lite0 it generalised worse)")
    refit_rounds: PositiveInt = Field(
        1, description="pruned inputs: calibration passes; each refits every layer on the activations of the "
                       "model the previous pass left")
    bias_correction: bool = Field(
        True, description="with calibration data, move the removed inputs' mean contribution into the "
                          "consumer's bias")
    min_rows_per_input: PositiveInt = Field(
        2, description="refit a consumer only with at least this many calibration rows per kept input")
    damping: NonNegativeFloat = Field(0.01, description="refit: ridge, as a fraction of the mean input variance")
    max_refit_dim: PositiveInt = Field(4096, description="refit/score only sinks with at most this many inputs")
    max_positions: PositiveInt = Field(
        256, description="statistics: at most this many spatial positions per sample (a fixed random set)")
    batch_size: PositiveInt = Field(8, description="calibration samples per ONNX Runtime run")
    max_samples: PositiveInt | None = Field(None, description="use at most this many calibration samples")


@dataclass
class PruneChannelsResult(PassResult):
    """Groups pruned (``groups``: sources, channels before/after), groups left alone (``skipped``: reason),
    per-layer parameter counts (``layers``) and refit errors (``refits``)."""

    groups: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    layers: dict[str, dict[str, int]] = field(default_factory=dict)
    refits: dict[str, dict[str, float]] = field(default_factory=dict)
    kept: dict[str, list[int]] = field(default_factory=dict)  # source node -> indices of the kept channels
    params_before: int = 0
    params_after: int = 0


# --------------------------------------------------------------------------------------------
# Channel groups
# --------------------------------------------------------------------------------------------
@dataclass
class Group:
    size: int
    sources: list[str]  # node names whose output channels these are
    blocked: list[str] = field(default_factory=list)
    tied: bool = False


@dataclass
class Flow:
    """How a value's channel axis maps to groups: ``segments`` of (group id, features per channel)."""

    segments: tuple[tuple[int, int], ...]
    axis: int
    rank: int

    def length(self, groups: dict[int, Group]) -> int:
        return sum(groups[g].size * b for g, b in self.segments)


@dataclass
class Sink:
    node: _V
    value: str  # the input that loses channels
    kind: str  # conv1x1, conv, gemm, matmul
    tensor: ir.TensorProtocol  # the original model's weight (rewrites assign new tensors: this one stays)
    bias: np.ndarray | None = None  # effective bias [outputs] of the original model
    trans_b: bool = False  # gemm
    alpha: float = 1.0  # gemm
    _columns: dict = field(default_factory=dict, repr=False)

    @property
    def wm(self) -> np.ndarray:
        """Effective weights as [outputs, input features(, kernel positions)], read from the weight when asked."""
        w = self.tensor.numpy()
        if self.kind in ("conv1x1", "conv"):
            wm = w.reshape(w.shape[0], w.shape[1], -1)
            return wm[:, :, 0] if self.kind == "conv1x1" else wm
        if self.kind == "gemm":
            return (w if self.trans_b else w.T) * self.alpha
        return w.T

    @property
    def inputs(self) -> int:
        shape = tuple(self.tensor.shape)
        if self.kind == "gemm":
            return int(shape[1] if self.trans_b else shape[0])
        return int(shape[0] if self.kind == "matmul" else shape[1])

    def wm64(self) -> np.ndarray:
        """``wm`` as a float64 copy (the weight released)."""
        out = self.wm.astype(np.float64)
        self.release()
        return out

    def columns(self, key, fn) -> np.ndarray:
        """``fn(wm)`` (a vector over the inputs), computed once; the weight is released afterwards."""
        if key not in self._columns:
            self._columns[key] = fn(self.wm)
            self.release()
        return self._columns[key]

    def release(self) -> None:
        if isinstance(self.tensor, ir.ExternalTensor):
            try:
                self.tensor.release()
            except BufferError:  # the rewrite still views it: the mapping closes with that view
                pass


def label(node: _V) -> str:
    return node.name or f"{node.op_type}({node.output[0]})"


class _Tracker:
    def __init__(self):
        self.groups: dict[int, Group] = {}
        self.parent: dict[int, int] = {}

    def new(self, size: int, source: str) -> int:
        gid = len(self.groups)
        self.groups[gid] = Group(size, [source])
        self.parent[gid] = gid
        return gid

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        ga, gb = self.groups[a], self.groups[b]
        self.parent[b] = a
        ga.sources += gb.sources
        ga.blocked += gb.blocked
        ga.tied = True

    def block(self, flow: Flow | None, reason: str) -> None:
        if flow is None:
            return
        for g, _ in flow.segments:
            blocked = self.groups[self.find(g)].blocked
            if reason not in blocked:
                blocked.append(reason)


def _shapes(model: ir.Model) -> dict[str, list[int | None]]:
    try:
        g = infer(model, strict=False).graph
    except Exception:  # noqa: BLE001 - shapes only sharpen the analysis; without them ranks come from weights
        g = onnx.GraphProto()
    out = {}
    for v in list(g.value_info) + list(g.input) + list(g.output):
        t = v.type.tensor_type
        if t.HasField("shape"):
            out[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    return out


class PruneChannels(Pass):
    name = "prune-channels"
    summary = "Structured pruning: remove whole output channels of Conv/Gemm/MatMul and the inputs that read them."
    Config = PruneChannelsConfig

    def requires(self, model: ir.Model) -> None:
        super().requires(model)
        cfg = self.config
        if self.context.calibration is None:
            if cfg.criterion == "output":
                raise PreconditionError(f"{self.name}: criterion 'output' needs calibration data (pass it with --calib)")
            if cfg.refit:
                raise PreconditionError(f"{self.name}: refit needs calibration data (pass it with --calib)")

    # ---------------------------------------------------------------------------------------
    def call(self, model: ir.Model) -> PassResult:
        cfg = self.config
        has_data = self.context.calibration is not None
        criterion = cfg.criterion or ("output" if has_data else "l2")
        refit = cfg.refit if cfg.refit is not None else has_data
        g = model.graph
        original = clone_model(model)  # the unpruned graph; weights shared
        index = _Index(g)
        self.namer = Namer(g)
        shapes = _shapes(model)
        tr = _Tracker()
        flows: dict[str, Flow] = {}
        sources: dict[str, tuple[_V, int]] = {}  # node name -> (node, group id)
        sinks: list[Sink] = []
        reshapes: list[_V] = []
        before = parameter_count(g)
        layer_before = {label(n): self._node_params(index, n) for n in index.nodes}

        for node in index.nodes:
            self._visit(node, index, shapes, tr, flows, sources, sinks, reshapes)
        for name in index.graph_outputs:
            tr.block(flows.get(name), f"reaches graph output {name!r}")

        roots = sorted({tr.find(gid) for _, gid in sources.values()})
        skipped: dict[str, str] = {}
        prunable = []
        for r in roots:
            grp = tr.groups[r]
            key = ", ".join(grp.sources)
            names = grp.sources
            if cfg.include is not None and not any(fnmatch.fnmatch(s, p) for s in names for p in cfg.include):
                skipped[key] = "not included"
            elif any(fnmatch.fnmatch(s, p) for s in names for p in cfg.exclude):
                skipped[key] = "excluded"
            elif grp.blocked:
                skipped[key] = "; ".join(grp.blocked[:3])
            elif grp.tied and cfg.tied == "skip":
                skipped[key] = "tied by a residual/concat (tied: skip)"
            elif grp.size <= max(cfg.min_channels, cfg.round_to):
                skipped[key] = f"only {grp.size} channels"
            else:
                prunable.append(r)

        stats = None
        if has_data and (refit or criterion == "output" or cfg.bias_correction) and prunable:
            stats = self._collect(original, [s for s in sinks if self._sink_roots(s, flows, tr) & set(prunable)])
        elif cfg.bias_correction and prunable:
            # no data: a removed channel is taken as what it holds with its weights zeroed (its bias,
            # pushed through the followers), which the consumers' biases absorb
            consts = self._constant_channels(index, flows, sources)
            stats = {s.value: {"mean": np.nan_to_num(consts[s.value]), "gram": None, "sq": None, "rows": 0}
                     for s in sinks if s.value in consts}
        gains = (self._gains(index, flows, sources, 1 if criterion == "l1" else 2)
                 if criterion != "output" and cfg.downstream else None)
        scores = {r: self._scores(r, tr, sources, index, criterion, sinks, flows, stats if has_data else None,
                                  gains) for r in prunable}
        keep = self._select(prunable, scores, tr, sources)

        masks: dict[int, np.ndarray] = {}
        groups_out = []
        for r in prunable:
            k = keep[r]
            if k.all():
                skipped[", ".join(tr.groups[r].sources)] = "nothing to remove after rounding"
                continue
            masks[r] = k
            groups_out.append({"sources": tr.groups[r].sources, "channels": tr.groups[r].size,
                               "kept": int(k.sum()), "tied": tr.groups[r].tied})
        if not masks:
            return PruneChannelsResult(model, False, {"criterion": criterion, "pruned_groups": 0,
                                                      "skipped": skipped}, skipped=skipped,
                                       params_before=before, params_after=before)

        def mask_of(value: str) -> np.ndarray | None:
            f = flows.get(value)
            if f is None:
                return None
            parts = [np.repeat(masks.get(tr.find(gid), np.ones(tr.groups[tr.find(gid)].size, bool)), b)
                     for gid, b in f.segments]
            m = np.concatenate(parts)
            return None if m.all() else m

        pair_refit = refit and stats is not None and cfg.refit_inputs == "pruned"
        refits = self._rewrite(index, sources, sinks, reshapes, flows, mask_of, stats, refit and not pair_refit)
        # shapes recorded for the traced values are stale (shape-inference recomputes them)
        for name in flows:
            v = index.values.get(name)
            if v is not None and not v.is_graph_input() and not v.is_graph_output():
                v.shape = None
        if pair_refit:
            targets = [s for s in sinks if s.kind in ("conv1x1", "gemm") and mask_of(s.value) is not None
                       and s.inputs <= cfg.max_refit_dim]
            for _ in range(cfg.refit_rounds):
                refits = self._pair_refit(original, model, index, targets, mask_of)
        drop_unused_initializers(g)
        index.refresh()
        corrected = {}
        if cfg.statistics_correction and has_data:
            channels = {n.output[0]: np.flatnonzero(m) for n in index.nodes
                        if n.op_type == "Conv" and (m := mask_of(n.output[0])) is not None}
            corrected = correct_channel_statistics(
                model, original, self.context.calibration, channels=channels, batch_size=cfg.batch_size,
                max_samples=cfg.correction_samples, progress=self.context.progress, what=self.name)
        after = parameter_count(g)
        layers = {}
        index.refresh()
        for n in index.nodes:
            name = label(n)
            p = self._node_params(index, n)
            if name in layer_before and p != layer_before[name]:
                layers[name] = {"params_before": layer_before[name][0], "params_after": p[0],
                                "bytes_before": layer_before[name][1], "bytes_after": p[1]}
        details = {"criterion": criterion, "bytes_before": initializer_bytes(original.graph),
                   "bytes_after": initializer_bytes(g), "refit": bool(refit and stats is not None),
                   "pruned_groups": len(groups_out), "groups": groups_out, "skipped": skipped,
                   "params_before": before, "params_after": after, "layers": layers,
                   "refits": {k: {a: round(b, 6) for a, b in v.items()} for k, v in refits.items()}}
        if corrected:
            details["statistics_correction"] = correction_details(corrected)
        kept = {name: np.flatnonzero(m).tolist() for r, m in masks.items() for name in tr.groups[r].sources}
        return PruneChannelsResult(model, True, details, groups=groups_out, skipped=skipped, layers=layers,
                                   refits=refits, kept=kept, params_before=before, params_after=after)

    # ---------------------------------------------------------------------------------------
    @staticmethod
    def _node_params(index: _Index, node: _V) -> tuple[int, int]:
        """(parameters, bytes) of the initializers a node reads."""
        ts = [index.initializers[x].const_value for x in node.input if x in index.initializers]
        return sum(int(t.size) for t in ts), sum(tensor_bytes(t) for t in ts)

    @staticmethod
    def _sink_roots(s: Sink, flows: dict[str, Flow], tr: _Tracker) -> set[int]:
        return {tr.find(gid) for gid, _ in flows[s.value].segments}

    def _visit(self, node, index, shapes, tr: _Tracker, flows, sources, sinks, reshapes) -> None:
        op = node.op_type
        data_in = [x for x in node.input if x]
        ins = {x: flows[x] for x in data_in if x in flows}
        if node.domain not in DEFAULT_DOMAINS:
            for f in ins.values():
                tr.block(f, f"read by {op} {label(node)}")
            return
        out = node.output[0] if node.output else ""
        w = index.meta(node.input[1]) if len(node.input) > 1 and node.input[1] else None  # values not read
        x = node.input[0] if node.input else ""
        fx = flows.get(x)
        # extra inputs (weights, shapes, bounds) that carry channels cannot be followed
        for name, f in ins.items():
            if name != x and op not in BINARY | {"Concat"}:
                tr.block(f, f"read as a parameter by {op} {label(node)}")

        if op == "Conv" and w is not None and w.ndim >= 3 and w.dtype.kind == "f":
            group = attr(node, "group", 1)
            if group > 1:
                if fx is not None and group == w.shape[0] == fx.length(tr.groups) and w.shape[1] == 1 \
                        and fx.axis == 1 and all(b == 1 for _, b in fx.segments):
                    flows[out] = Flow(fx.segments, 1, w.ndim)  # depthwise: follows its producer
                else:
                    tr.block(fx, f"grouped Conv {label(node)}")
                return
            if fx is not None:
                if fx.axis == 1 and all(b == 1 for _, b in fx.segments):
                    k1 = all(d == 1 for d in w.shape[2:])
                    b = index.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
                    sinks.append(Sink(node, x, "conv1x1" if k1 else "conv", w.tensor,
                                      None if b is None else b.astype(np.float64)))
                else:
                    tr.block(fx, f"Conv {label(node)} reads flattened channels")
            self._source(node, w.shape[0], Flow((), 1, w.ndim), tr, flows, sources)
            return
        if op == "Gemm" and w is not None and w.ndim == 2 and w.dtype.kind == "f":
            tb = attr(node, "transB", 0)
            if attr(node, "transA", 0):
                tr.block(fx, f"Gemm {label(node)} with transA")
            elif fx is not None:
                if fx.axis == 1:
                    outputs = w.shape[0] if tb else w.shape[1]
                    c = index.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
                    bias = None
                    if c is not None and c.size in (1, outputs):
                        bias = np.broadcast_to(c.astype(np.float64).ravel() * attr(node, "beta", 1.0),
                                               (outputs,)).copy()
                    sinks.append(Sink(node, x, "gemm", w.tensor, bias, bool(tb), attr(node, "alpha", 1.0)))
                else:
                    tr.block(fx, f"Gemm {label(node)} reads another axis")
            c = index.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            if len(node.input) > 2 and node.input[2] and (c is None or (c.ndim == 2 and c.shape[0] != 1)):
                return  # a bias varying per row or computed at run time: channels stay
            self._source(node, w.shape[0] if tb else w.shape[1], Flow((), 1, 2), tr, flows, sources)
            return
        if op == "MatMul" and w is not None and w.ndim == 2 and w.dtype.kind == "f":
            rank = len(shapes.get(x, [])) or (fx.rank if fx else 0)
            if fx is not None:
                if rank and fx.axis == rank - 1:
                    sinks.append(Sink(node, x, "matmul", w.tensor))
                else:
                    tr.block(fx, f"MatMul {label(node)} reads another axis")
            if rank >= 2:
                self._source(node, w.shape[1], Flow((), rank - 1, rank), tr, flows, sources)
            return
        if not ins:
            return
        if op in UNARY and op not in ("Dropout",) or (op == "Dropout" and len(node.output) == 1):
            if op == "Clip" and any(index.constant(b) is None or index.constant(b).size != 1
                                    for b in node.input[1:] if b):
                tr.block(fx, f"Clip {label(node)} with run-time bounds")
                return
            flows[out] = fx
            return
        if op == "BatchNormalization":
            if fx is not None and fx.axis == 1 and all(b == 1 for _, b in fx.segments) \
                    and all(index.constant(p) is not None for p in node.input[1:5]) and len(node.output) == 1:
                flows[out] = fx
            else:
                tr.block(fx, f"BatchNormalization {label(node)} (training mode or run-time statistics)")
            return
        if op in POOLS:
            if fx is not None and fx.axis == 1 and len(node.output) == 1:
                flows[out] = fx
            else:
                tr.block(fx, f"{op} {label(node)}")
            return
        if op in BINARY and len(data_in) == 2:
            self._binary(node, index, shapes, tr, flows)
            return
        if op == "Concat":
            fs = [flows.get(i) for i in data_in]
            rank = fs[0].rank if fs[0] else 0
            axis = attr(node, "axis", 0)
            axis = axis + rank if axis < 0 else axis
            if all(f is not None and f.axis == axis and f.rank == rank for f in fs):
                flows[out] = Flow(tuple(s for f in fs for s in f.segments), axis, rank)
            else:
                for f in fs:
                    tr.block(f, f"Concat {label(node)} on another axis or with untracked inputs")
            return
        if op in ("Flatten", "Reshape"):
            if self._flatten(node, index, shapes, fx, tr, flows):
                if op == "Reshape":
                    reshapes.append(node)
                return
            tr.block(fx, f"{op} {label(node)} does not flatten [N, C, ...] into [N, C*...]")
            return
        for f in ins.values():
            tr.block(f, f"read by {op} {label(node)}")

    @staticmethod
    def _source(node, channels, flow: Flow, tr: _Tracker, flows, sources) -> None:
        key = label(node) if label(node) not in sources else f"{label(node)}({node.output[0]})"
        gid = tr.new(int(channels), key)
        sources[key] = (node, gid)
        flows[node.output[0]] = Flow(((gid, 1),), flow.axis, flow.rank)

    def _binary(self, node, index, shapes, tr: _Tracker, flows) -> None:
        a, b = node.input[0], node.input[1]
        fa, fb = flows.get(a), flows.get(b)
        out = node.output[0]
        if fa is not None and fb is not None:
            if fa.rank == fb.rank and fa.axis == fb.axis and \
                    [(tr.groups[tr.find(x)].size, bx) for x, bx in fa.segments] == \
                    [(tr.groups[tr.find(y)].size, by) for y, by in fb.segments]:
                for (x, _), (y, _) in zip(fa.segments, fb.segments, strict=True):
                    tr.union(x, y)
                flows[out] = fa
            else:
                reason = f"{node.op_type} {label(node)} combines channel sets of different shapes"
                tr.block(fa, reason)
                tr.block(fb, reason)
            return
        f, other = (fa, b) if fa is not None else (fb, a)
        c = index.constant(other)
        if c is None:
            # a per-sample scale with one channel (e.g. an attention gate) broadcasts and is fine
            oshape = shapes.get(other)
            if oshape and len(oshape) <= f.rank:
                ax = f.axis - (f.rank - len(oshape))
                if ax < 0 or oshape[ax] == 1:
                    flows[out] = f
                    return
            tr.block(f, f"{node.op_type} {label(node)} with a run-time value that is not a traced channel set")
            return
        rank = max(f.rank, c.ndim)
        axis = f.axis + (rank - f.rank)
        ax = axis - (rank - c.ndim)
        n = f.length(tr.groups)
        if ax >= 0 and c.shape[ax] not in (1, n):
            tr.block(f, f"{node.op_type} {label(node)}: constant of shape {list(c.shape)} on {n} channels")
            return
        flows[out] = Flow(f.segments, axis, rank)

    def _flatten(self, node, index, shapes, fx: Flow | None, tr, flows) -> bool:
        if fx is None or fx.axis != 1 or any(b != 1 for _, b in fx.segments):
            return False
        ishape = shapes.get(node.input[0])
        oshape = shapes.get(node.output[0])
        if not ishape or not oshape or len(oshape) != 2 or len(ishape) < 2:
            return False
        spatial = ishape[2:]
        if any(d is None for d in spatial):
            return False
        block = int(np.prod(spatial, dtype=np.int64)) if spatial else 1
        if node.op_type == "Flatten":
            if attr(node, "axis", 1) != 1:
                return False
        else:
            shape = index.constant(node.input[1])
            if shape is None or shape.ndim != 1 or len(shape) != 2 or attr(node, "allowzero", 0):
                return False
            if shape[0] not in (0, -1) and (ishape[0] is None or shape[0] != ishape[0]):
                return False
            if shape[1] not in (-1, fx.length(tr.groups) * block) or (shape[0] == -1 and shape[1] == -1):
                return False
        flows[node.output[0]] = Flow(tuple((gid, b * block) for gid, b in fx.segments), 1, 2)
        return True

    # ---------------------------------------------------------------------------------------
    def _collect(self, model: ir.Model, sinks: list[Sink]) -> dict[str, dict[str, np.ndarray]]:
        """Per sink input: mean, and the Gram matrix (or only its diagonal above ``max_refit_dim``)."""
        from onnxopt.runtime import run_batch

        cfg = self.config
        values = sorted({s.value for s in sinks})
        if not values:
            return {}
        graph_inputs = {i.name for i in model.graph.inputs}
        fetch = [v for v in values if v not in graph_inputs]
        session = activation_session(model, fetch, opt_level="basic", what=f"model ({self.name} calibration)")
        feed_names = {i.name for i in session.get_inputs()}
        strides = {}
        for s in sinks:
            if s.kind == "conv1x1":
                strides.setdefault(s.value, set()).add(tuple(attr(s.node, "strides", [1, 1])))
        acc: dict[str, dict[str, Any]] = {}
        picks: dict[str, np.ndarray] = {}
        rng = np.random.default_rng(self.context.seed)
        done = 0
        source = self.context.calibration
        total = len(source) if cfg.max_samples is None else min(len(source), cfg.max_samples)
        with self.context.progress.task(f"{self.name}: input statistics", total) as bar:
            for batch in source.batches(cfg.batch_size):
                if done >= total:
                    break
                batch = first(batch, total - done)
                feed = subset(batch, feed_names)
                got = run_batch(session, feed, fetch, first_sample=done) if fetch else {}
                for v in values:
                    x = got[v] if v in got else batch[v]
                    if x.ndim >= 3:  # channels first: one row per position, a fixed sample of positions
                        x = x.reshape(x.shape[0], x.shape[1], -1)
                        if x.shape[2] > cfg.max_positions:
                            if v not in picks:
                                picks[v] = np.sort(rng.choice(x.shape[2], cfg.max_positions, replace=False))
                            x = x[:, :, picks[v]]
                        x = np.moveaxis(x, 1, -1)
                    rows = np.ascontiguousarray(x.reshape(-1, x.shape[-1]), dtype=np.float32)
                    dim = rows.shape[1]
                    a = acc.setdefault(v, {"n": 0, "sum": np.zeros(dim), "sq": np.zeros(dim),
                                           "gram": np.zeros((dim, dim)) if dim <= cfg.max_refit_dim else None})
                    a["n"] += rows.shape[0]
                    a["sum"] += rows.sum(axis=0, dtype=np.float64)
                    if a["gram"] is not None:
                        a["gram"] += (rows.T @ rows).astype(np.float64)
                    else:
                        a["sq"] += np.square(rows, dtype=np.float64).sum(axis=0)
                n = samples_in(batch)
                done += n
                bar.update(n)
                del got
        out = {}
        for v, a in acc.items():
            n = max(a["n"], 1)
            gram = None if a["gram"] is None else a["gram"] / n
            out[v] = {"mean": a["sum"] / n, "sq": a["sq"] / n if gram is None else np.diag(gram).copy(),
                      "gram": gram, "rows": a["n"]}
        return out

    def _scores(self, root, tr: _Tracker, sources, index, criterion, sinks, flows, stats, gains=None) -> np.ndarray:
        grp = tr.groups[root]
        total = np.zeros(grp.size)
        if criterion == "output" and stats:
            for s in sinks:
                f = flows[s.value]
                if s.value not in stats or all(tr.find(gid) != root for gid, _ in f.segments):
                    continue
                sq = stats[s.value]["sq"]
                col = s.columns("energy", lambda wm: np.sum(np.square(wm), axis=tuple(i for i in range(wm.ndim)
                                                                                      if i != 1)))
                energy = sq * col
                pos = 0
                for gid, b in f.segments:
                    size = tr.groups[tr.find(gid)].size
                    if tr.find(gid) == root:
                        total += energy[pos:pos + size * b].reshape(size, b).sum(axis=1)
                    pos += size * b
            if total.any():
                return np.sqrt(total)
        p = 1 if criterion == "l1" else 2
        for name in grp.sources:
            node, _ = sources[name]
            w = index.constant(node.input[1]).astype(np.float64)
            index.release(node.input[1])
            if node.op_type == "Gemm":
                w = w if attr(node, "transB", 0) else w.T
            elif node.op_type == "MatMul":
                w = w.T
            norms = np.linalg.norm(w.reshape(w.shape[0], -1), ord=p, axis=1)
            total += norms / max(norms.mean(), 1e-30)
        if gains is None:
            return total
        # with convs carrying folded BatchNorm a channel's scale is split arbitrarily between its producer
        # and what follows: weigh the producer's norm by what the followers and consumers multiply it by
        down = np.zeros(grp.size)
        for s in sinks:
            g = gains.get(s.value)
            if g is None or all(tr.find(gid) != root for gid, _ in flows[s.value].segments):
                continue
            col = s.columns(("norm", p), lambda wm: np.linalg.norm(np.moveaxis(wm, 1, 0).reshape(wm.shape[1], -1),
                                                                   ord=p, axis=1)) * g
            pos = 0
            for gid, b in flows[s.value].segments:
                size = tr.groups[tr.find(gid)].size
                if tr.find(gid) == root:
                    down += col[pos:pos + size * b].reshape(size, b).sum(axis=1)
                pos += size * b
        if down.any():
            total = total * down / max(down.mean(), 1e-30)
        return total

    @staticmethod
    def _gains(index, flows, sources, p: int) -> dict[str, np.ndarray]:
        """Per traced value, how much each channel was scaled since its source (depthwise kernels' norms,
        BatchNorm scales, per-channel constant factors)."""
        source_ids = {id(n) for n, _ in sources.values()}
        val: dict[str, np.ndarray] = {}
        for node in index.nodes:
            if not node.output or node.output[0] not in flows or node.domain not in DEFAULT_DOMAINS:
                continue
            f = flows[node.output[0]]
            op = node.op_type
            x = val.get(node.input[0]) if node.input else None
            if id(node) in source_ids:
                w = index.meta(node.input[1])
                v = np.ones(w.shape[0 if op == "Conv" or attr(node, "transB", 0) else 1])
            elif op in BINARY and all(i in val for i in node.input[:2]):
                v = np.maximum(val[node.input[0]], val[node.input[1]])
            elif op in BINARY:
                x = val.get(node.input[0], val.get(node.input[1]))
                other = node.input[1] if node.input[0] in val else node.input[0]
                c = index.constant(other)
                v = x
                if op in ("Mul", "Div") and c is not None:
                    ax = f.axis - (f.rank - c.ndim)
                    if c.size == 1:
                        factor = np.full(len(x), abs(float(c.ravel()[0])))
                    elif ax >= 0 and all(d == 1 for i, d in enumerate(c.shape) if i != ax):
                        factor = np.abs(np.broadcast_to(c.astype(np.float64).ravel(), (len(x),)))
                    else:
                        factor = np.ones(len(x))
                    v = x * factor if op == "Mul" else x / np.maximum(factor, 1e-30)
            elif x is None:
                continue
            elif op == "Conv":  # depthwise
                w = index.constant(node.input[1]).astype(np.float64)
                v = x * np.linalg.norm(w.reshape(w.shape[0], -1), ord=p, axis=1)
            elif op == "BatchNormalization":
                sc, _, _, var = (index.constant(q).astype(np.float64) for q in node.input[1:5])
                v = x * np.abs(sc) / np.sqrt(var + attr(node, "epsilon", 1e-5))
            elif op == "Concat":
                parts = [val.get(i) for i in node.input]
                if any(q is None for q in parts):
                    continue
                v = np.concatenate(parts)
            elif op in ("Flatten", "Reshape"):
                v = np.repeat(x, f.segments[0][1])
            else:
                v = x
            val[node.output[0]] = v
        return val

    def _ratio(self, root, tr: _Tracker) -> float:
        rs = [self.config.ratios[s] for s in tr.groups[root].sources if s in self.config.ratios]
        return max(rs) if rs else self.config.ratio

    def _select(self, prunable, scores, tr: _Tracker, sources) -> dict[int, np.ndarray]:
        cfg = self.config
        drop_counts = {}
        if cfg.scope == "global" and prunable:
            norm = {r: scores[r] / max(scores[r].mean(), 1e-30) for r in prunable}
            allv = np.sort(np.concatenate([norm[r] for r in prunable]))
            n_drop = int(round(cfg.ratio * len(allv)))
            thr = allv[n_drop - 1] if n_drop > 0 else -np.inf
            drop_counts = {r: int(np.sum(norm[r] <= thr)) for r in prunable}
        keep = {}
        for r in prunable:
            size = tr.groups[r].size
            drop = drop_counts[r] if r in drop_counts else int(math.floor(self._ratio(r, tr) * size))
            kept = size - drop
            kept = min(size, max(cfg.min_channels, int(math.ceil(kept / cfg.round_to)) * cfg.round_to))
            order = np.argsort(-scores[r], kind="stable")
            mask = np.zeros(size, bool)
            mask[order[:kept]] = True
            keep[r] = mask
        return keep

    # ---------------------------------------------------------------------------------------
    def _write(self, index: _Index, node: _V, pos: int, value: np.ndarray) -> None:
        """Give input ``pos`` of ``node`` the value (in place unless another node reads the old one)."""
        irg.own_initializer(index.graph, node.ir, pos, np.asarray(value), self.namer,
                            base_name=None if pos < len(node.input) and node.input[pos]
                            else f"{node.output[0]}_bias")

    def _rewrite(self, index, sources, sinks, reshapes, flows, mask_of, stats, refit) -> dict[str, dict[str, float]]:
        write = self._write
        refits: dict[str, dict[str, float]] = {}
        sink_by_node = {id(s.node): s for s in sinks}
        source_ids = {id(n) for n, _ in sources.values()}
        for node in list(index.nodes):
            op = node.op_type
            out_mask = mask_of(node.output[0]) if node.output and node.output[0] else None
            in_mask = mask_of(node.input[0]) if node.input and node.input[0] else None
            is_source = id(node) in source_ids
            if is_source:
                w = w0 = index.constant(node.input[1])
                b_pos = 2
                b = index.constant(node.input[b_pos]) if len(node.input) > b_pos and node.input[b_pos] else None
                sink = sink_by_node.get(id(node))
                new_b = b
                if sink is not None and in_mask is not None:
                    w, new_b = self._sink_weights(node, sink, w, b, in_mask, stats, refit, refits)
                if out_mask is not None:
                    if op == "Conv":
                        w = w[out_mask]
                    elif op == "Gemm":
                        w = w[out_mask] if attr(node, "transB", 0) else w[:, out_mask]
                    else:
                        w = w[:, out_mask]
                    if new_b is not None and new_b.ndim >= 1 and new_b.shape[-1] == out_mask.size:
                        new_b = new_b[..., out_mask] if op != "Conv" else new_b[out_mask]
                w_changed, dtype, had_b = w is not w0, w0.dtype, b is not None
                b_changed = new_b is not None and (b is None or new_b.shape != b.shape or not np.array_equal(new_b, b))
                # no view of a stored weight may outlive its replacement (a mapped one is let go when replaced)
                del w0, b
                if w_changed:
                    write(index, node, 1, np.ascontiguousarray(w))
                else:
                    del w
                    index.release(node.input[1])
                if b_changed:
                    write(index, node, b_pos, np.ascontiguousarray(new_b.astype(dtype)))
                    if op == "Gemm" and not had_b:
                        set_attr(node, "beta", 1.0)
                elif had_b:
                    del new_b
                    index.release(node.input[b_pos])
                continue
            if op == "Conv" and attr(node, "group", 1) > 1 and in_mask is not None:
                write(index, node, 1, index.constant(node.input[1])[in_mask])
                if len(node.input) > 2 and node.input[2]:
                    write(index, node, 2, index.constant(node.input[2])[in_mask])
                set_attr(node, "group", int(in_mask.sum()))
            elif op == "BatchNormalization" and in_mask is not None:
                for pos in range(1, 5):
                    write(index, node, pos, index.constant(node.input[pos])[in_mask])
            elif op in BINARY and out_mask is not None:
                flow = flows[node.output[0]]
                for pos in (0, 1):
                    c = index.constant(node.input[pos])
                    if c is None or node.input[pos] in flows:
                        continue
                    ax = flow.axis - (flow.rank - c.ndim)
                    if ax >= 0 and c.shape[ax] == out_mask.size and out_mask.size > 1:
                        kept = np.ascontiguousarray(np.compress(out_mask, c, axis=ax))
                        del c
                        write(index, node, pos, kept)
            elif op == "Reshape" and node in reshapes and out_mask is not None:
                shape = index.constant(node.input[1])
                if shape[1] > 0:
                    new_shape = np.array([shape[0], int(out_mask.sum())], dtype=shape.dtype)
                    del shape
                    write(index, node, 1, new_shape)
        return refits

    def _sink_weights(self, node, sink: Sink, w, b, in_mask, stats, refit, refits):
        """The sink's weights without the removed inputs and its bias. With statistics, the removed inputs'
        mean contribution moves into the bias, and with ``refit`` the kept weights are refitted."""
        op = node.op_type
        cfg = self.config
        if op == "Conv":
            new_w = w[:, in_mask]
        elif op == "Gemm":
            new_w = w[:, in_mask] if attr(node, "transB", 0) else w[in_mask]
        else:
            new_w = w[in_mask]
        st = stats.get(sink.value) if stats else None
        if st is None or op == "MatMul":  # a MatMul has no bias to take the mean correction: sliced only
            return new_w, b
        wm = sink.wm64()  # [outputs, inputs(, kernel positions)]
        if wm.ndim == 3:
            wm = wm.sum(axis=2)  # a constant input channel meets the whole kernel (borders aside)
        k = in_mask
        mean = st["mean"]
        wk = wm[:, k]
        refitted = False
        record = {}
        gram = st["gram"]
        if refit and gram is not None and sink.kind in ("conv1x1", "gemm"):
            cov = gram - np.outer(mean, mean)

            def err(wk_):
                d = wm.copy()
                d[:, k] -= wk_
                num = float(np.sum((d @ cov) * d))
                den = float(np.sum((wm @ gram) * wm))
                return math.sqrt(max(num, 0.0) / max(den, 1e-30))

            record["sliced_output_error"] = err(wk)
            if st["rows"] >= cfg.min_rows_per_input * int(k.sum()):
                ckk = cov[np.ix_(k, k)]
                lam = cfg.damping * max(float(np.mean(np.diag(ckk))), 1e-12)
                try:
                    fitted = np.linalg.solve(ckk + lam * np.eye(len(ckk)), cov[k] @ wm.T).T
                except np.linalg.LinAlgError:
                    fitted = None
                if fitted is not None:
                    e = err(fitted)
                    record["refit_output_error"] = e
                    if e < record["sliced_output_error"]:
                        wk, refitted = fitted, True
            else:
                record["refit_skipped_rows"] = float(st["rows"])
        elif not cfg.bias_correction:
            return new_w, b
        delta = wm[:, ~k] @ mean[~k] + (wm[:, k] - wk) @ mean[k]  # mean output change, into the bias
        if record:
            refits[label(node)] = record
        dtype = w.dtype
        if op == "Conv":
            if refitted:
                new_w = wk.reshape(wk.shape + (1,) * (w.ndim - 2)).astype(dtype)
            bias = (b.astype(np.float64) if b is not None else np.zeros(wm.shape[0])) + delta
        else:
            alpha = attr(node, "alpha", 1.0)
            if refitted:
                new_w = (wk / alpha if attr(node, "transB", 0) else wk.T / alpha).astype(dtype)
            beta = attr(node, "beta", 1.0) if b is not None else 1.0
            base = b.astype(np.float64) if b is not None else np.zeros(wm.shape[0])
            bias = base + delta / beta
        return new_w, bias.astype(dtype)

    # ---------------------------------------------------------------------------------------
    def _pair_refit(self, original, model, index, targets: list[Sink], mask_of) -> dict[str, dict[str, float]]:
        """Refit every target on the current model's inputs to reproduce the original model's outputs."""
        cfg = self.config
        stats = self._collect_pairs(original, model, targets)
        refits: dict[str, dict[str, float]] = {}
        for s in targets:
            st = stats.get(s.value)
            k = mask_of(s.value)
            if st is None or k is None:
                continue
            n = st["n"]
            wm = s.wm64()
            mu, mt = st["sx"] / n, st["st"] / n
            gx = st["gx"] / n
            sx = gx - np.outer(mu, mu)
            stt = st["gt"] / n - np.outer(mt, mt)
            stx = st["ct"] / n - np.outer(mt, mu)
            den = max(float(np.sum((wm @ gx) * wm)), 1e-30)
            base = float(np.sum((wm @ sx) * wm))

            def err(wk, stx=stx, stt=stt, wm=wm, base=base, den=den):
                num = base - 2 * float(np.sum((wk @ stx) * wm)) + float(np.sum((wk @ stt) * wk))
                return math.sqrt(max(num, 0.0) / den)

            record = {"sliced_output_error": err(wm[:, k])}
            best = wm[:, k]
            if n >= cfg.min_rows_per_input * int(k.sum()):
                lam = cfg.damping * max(float(np.mean(np.diag(stt))), 1e-12)
                try:
                    fitted = np.linalg.solve(stt + lam * np.eye(len(stt)), stx @ wm.T).T
                except np.linalg.LinAlgError:
                    fitted = None
                if fitted is not None:
                    record["refit_output_error"] = err(fitted)
                    if record["refit_output_error"] < record["sliced_output_error"]:
                        best = fitted
            else:
                record["refit_skipped_rows"] = float(n)
            bias = (s.bias if s.bias is not None else np.zeros(wm.shape[0])) + wm @ mu - best @ mt
            out = mask_of(s.node.output[0])
            if out is not None:
                best, bias = best[out], bias[out]
            refits[label(s.node)] = record
            self._write_sink(index, s.node, best, bias)
        return refits

    def _write_sink(self, index, node, wk: np.ndarray, bias: np.ndarray) -> None:
        write = self._write
        dtype = index.meta(node.input[1]).dtype
        if node.op_type == "Conv":
            write(index, node, 1, wk.reshape(wk.shape + (1, 1)).astype(dtype))
            write(index, node, 2, bias.astype(dtype))
            return
        alpha = attr(node, "alpha", 1.0)
        write(index, node, 1, np.ascontiguousarray((wk if attr(node, "transB", 0) else wk.T) / alpha).astype(dtype))
        write(index, node, 2, bias.astype(dtype))
        set_attr(node, "beta", 1.0)

    def _collect_pairs(self, original, current, targets: list[Sink]) -> dict[str, dict[str, Any]]:
        """Moments of each target's input in the original model (x) and the current one (t): sums, Gram
        matrices of each, and the cross products t^T x, over the same positions of the same samples."""
        from onnxopt.runtime import run_batch

        cfg = self.config
        values = sorted({s.value for s in targets})
        graph_inputs = {i.name for i in original.graph.inputs}
        fetch = [v for v in values if v not in graph_inputs]

        def exposed(m, what):
            return activation_session(m, fetch, opt_level="basic", what=f"{what} model ({self.name} refit)")

        s_orig, s_cur = exposed(original, "original"), exposed(current, "pruned")
        feed_names = {i.name for i in s_orig.get_inputs()}
        rng = np.random.default_rng(self.context.seed + 1)
        picks: dict[str, np.ndarray] = {}
        acc: dict[str, dict[str, Any]] = {}
        source = self.context.calibration
        total = len(source) if cfg.max_samples is None else min(len(source), cfg.max_samples)
        done = 0

        def rows_of(v, x):
            if x.ndim >= 3:
                x = x.reshape(x.shape[0], x.shape[1], -1)
                if x.shape[2] > cfg.max_positions:
                    if v not in picks:
                        picks[v] = np.sort(rng.choice(x.shape[2], cfg.max_positions, replace=False))
                    x = x[:, :, picks[v]]
                x = np.moveaxis(x, 1, -1)
            return np.ascontiguousarray(x.reshape(-1, x.shape[-1]), dtype=np.float32)

        with self.context.progress.task(f"{self.name}: refit statistics", total) as bar:
            for batch in source.batches(cfg.batch_size):
                if done >= total:
                    break
                batch = first(batch, total - done)
                feed = subset(batch, feed_names)
                a = run_batch(s_orig, feed, fetch, first_sample=done) if fetch else {}
                b = run_batch(s_cur, feed, fetch, first_sample=done) if fetch else {}
                for v in values:
                    x = rows_of(v, a[v] if v in a else batch[v])
                    t = rows_of(v, b[v] if v in b else batch[v])
                    st = acc.setdefault(v, {"n": 0, "sx": 0.0, "st": 0.0, "gx": 0.0, "gt": 0.0, "ct": 0.0})
                    st["n"] += x.shape[0]
                    st["sx"] = st["sx"] + x.sum(axis=0, dtype=np.float64)
                    st["st"] = st["st"] + t.sum(axis=0, dtype=np.float64)
                    st["gx"] = st["gx"] + (x.T @ x).astype(np.float64)
                    st["gt"] = st["gt"] + (t.T @ t).astype(np.float64)
                    st["ct"] = st["ct"] + (t.T @ x).astype(np.float64)
                n = samples_in(batch)
                done += n
                bar.update(n)
                del a, b
        return acc

    # ---------------------------------------------------------------------------------------
    @staticmethod
    def _constant_channels(index, flows, sources) -> dict[str, np.ndarray]:
        """Per traced value, what each channel holds when its source's weights are zero: the source's bias
        pushed through the followers (spatial borders of padded depthwise convs aside); NaN where unknown."""
        source_ids = {id(n) for n, _ in sources.values()}
        val: dict[str, np.ndarray] = {}

        def const_of(name):
            return index.constant(name) if name else None

        def per_channel(name, f: Flow, n: int) -> np.ndarray:
            if name in val:
                return val[name]
            c = const_of(name)
            if c is None:
                return np.full(n, np.nan)
            if c.size == 1:
                return np.full(n, float(c.ravel()[0]))
            ax = f.axis - (f.rank - c.ndim)
            if ax < 0 or any(d != 1 for i, d in enumerate(c.shape) if i != ax) or c.shape[ax] not in (1, n):
                return np.full(n, np.nan)
            return np.broadcast_to(c.astype(np.float64).reshape(-1), (n,)).copy()

        for node in index.nodes:
            if not node.output or node.output[0] not in flows or node.domain not in DEFAULT_DOMAINS:
                continue
            f = flows[node.output[0]]
            op = node.op_type
            x = val.get(node.input[0]) if node.input else None
            b = const_of(node.input[2]) if len(node.input) > 2 else None
            if id(node) in source_ids:
                size = index.meta(node.input[1]).shape[0 if op == "Conv" or attr(node, "transB", 0) else 1]
                v = np.zeros(size)
                if b is not None and op == "Conv":
                    v = b.astype(np.float64)
                elif b is not None and op == "Gemm" and b.size in (1, size):
                    v = np.broadcast_to(b.astype(np.float64).ravel() * attr(node, "beta", 1.0), (size,)).copy()
            elif x is None:
                continue
            elif op == "Conv":  # depthwise
                w = index.constant(node.input[1]).astype(np.float64)
                v = x * w.reshape(w.shape[0], -1).sum(axis=1) + (0 if b is None else b)
            elif op == "BatchNormalization":
                sc, bb, mu, var = (index.constant(p).astype(np.float64) for p in node.input[1:5])
                v = sc * (x - mu) / np.sqrt(var + attr(node, "epsilon", 1e-5)) + bb
            elif op in POOLS or op in ("Identity", "Dropout", "Cast"):
                v = x
            elif op == "Relu":
                v = np.maximum(x, 0)
            elif op == "Clip":
                lo, hi = const_of(node.input[1]) if len(node.input) > 1 else None, \
                    const_of(node.input[2]) if len(node.input) > 2 else None
                v = np.clip(x, -np.inf if lo is None else float(lo), np.inf if hi is None else float(hi))
            elif op == "Sigmoid":
                v = 1 / (1 + np.exp(-x))
            elif op == "Tanh":
                v = np.tanh(x)
            elif op == "LeakyRelu":
                v = np.where(x >= 0, x, attr(node, "alpha", 0.01) * x)
            elif op == "HardSigmoid":
                v = np.clip(attr(node, "alpha", 0.2) * x + attr(node, "beta", 0.5), 0, 1)
            elif op == "HardSwish":
                v = x * np.clip(x / 6 + 0.5, 0, 1)
            elif op in BINARY:
                length = len(x)
                a, c = (per_channel(i, f, length) for i in node.input[:2])
                v = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}[op](a, c)
            elif op == "Concat":
                parts = [val.get(i) for i in node.input]
                if any(p is None for p in parts):
                    continue
                v = np.concatenate(parts)
            elif op in ("Flatten", "Reshape"):
                v = np.repeat(x, f.segments[0][1])  # every channel became a block of features
            else:
                continue
            val[node.output[0]] = np.asarray(v, dtype=np.float64)
        return val
