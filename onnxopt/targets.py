"""Hand-off targets: the runtime that will consume the optimized model, as data.

A target (``onnxopt/targets/<name>.yaml``) says how that runtime wants a quantized model laid out: the
``quantize-qdq`` settings it pins (activation/weight types, symmetry, per-channel, bias type, per-op
overrides) and the ``calibrate`` settings (bit width, observer), which passes are meaningless for it
(``drop_passes``: they measure ONNX Runtime's kernels) and which it cannot run (``forbidden_passes``: they
emit com.microsoft contrib ops), whether it demands a fully integer model, the op domains it accepts, and
the structural ``rules`` the written model is checked against. ``apply_target`` rewrites a recipe for the target; ``check_structure``
checks a model against its rules. The passes themselves know nothing about targets.
"""

from __future__ import annotations

import difflib
from importlib import resources
from typing import Any, Literal

import onnx_ir as ir
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from onnxopt.errors import RecipeError
from onnxopt.graph import constant_tensor, constant_value
from onnxopt.recipe import Recipe

DEFAULT_TARGET = "ort-cpu"
# reference: ONNX Runtime CPU evaluating each QuantizeLinear/DequantizeLinear as written (ONNX's semantics)
Runtime = Literal["onnxruntime", "openvino", "tensorrt", "qnn", "reference"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TargetRules(_Strict):
    """What the written model must look like (checked after the passes ran)."""

    activation_types: list[str] | None = Field(None, description="QuantizeLinear output types allowed")
    weight_types: list[str] | None = Field(None, description="types of quantized weight initializers")
    bias_types: list[str] | None = Field(None, description="types of quantized biases ([]: biases stay float)")
    symmetric_activations: bool = Field(False, description="every activation zero point is 0")
    symmetric_weights: bool = Field(False, description="every weight zero point is 0")
    allowed_ops: list[str] | None = Field(None, description="the only ops allowed outside the default domain")


class Target(_Strict):
    name: str
    description: str = ""
    runtime: Runtime = "onnxruntime"
    allowed_domains: list[str] | None = Field(None, description="op domains allowed ('' = ONNX); None: any")
    full_integer: bool = Field(False, description="a pass that would leave ops float is refused, not dropped")
    quantize: dict[str, Any] = Field(default_factory=dict, description="quantize-qdq fields the target pins")
    calibrate: dict[str, Any] = Field(default_factory=dict, description="calibrate fields the target pins")
    drop_passes: dict[str, str] = Field(default_factory=dict, description="pass type -> why it is skipped")
    forbidden_passes: dict[str, str] = Field(default_factory=dict, description="pass type -> what it emits")
    rules: TargetRules = Field(default_factory=TargetRules)


def target_names() -> list[str]:
    folder = resources.files("onnxopt") / "targets"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_target(name: str | Target) -> Target:
    if isinstance(name, Target):
        return name
    res = resources.files("onnxopt") / "targets" / f"{name}.yaml"
    if not res.is_file():
        names = target_names()
        close = difflib.get_close_matches(str(name), names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise RecipeError(f"unknown target {name!r}{hint} (targets: {', '.join(names)})")
    try:
        return Target.model_validate(yaml.safe_load(res.read_text()))
    except ValidationError as exc:  # a broken package file, not user input
        raise RecipeError(f"target {name}: {exc}") from None


def list_targets() -> list[tuple[str, str]]:
    return [(n, load_target(n).description) for n in target_names()]


def apply_target(recipe: Recipe, target: Target | str) -> tuple[Recipe, list[str]]:
    """``recipe`` rewritten for ``target`` and notes saying what changed; ``recipe`` itself is untouched.

    quantize-qdq gets the target's pinned fields (a recipe value that differs is replaced, with a note);
    calibrate gets the target's pinned fields (bit width, observer); drop_passes are removed; forbidden passes are removed, leaving
    what they would have rewritten float, or refused when the target demands a fully integer model.
    """
    from onnxopt.registry import get_pass_class

    target = load_target(target)
    notes: list[str] = []
    configs = []
    for cfg in recipe.passes:
        if cfg.type in target.drop_passes:
            notes.append(f"target {target.name}: {cfg.type} skipped ({target.drop_passes[cfg.type]})")
            continue
        if cfg.type in target.forbidden_passes:
            why = target.forbidden_passes[cfg.type]
            if target.full_integer:
                raise RecipeError(f"target {target.name} needs a fully integer model but recipe {recipe.name!r} "
                                  f"runs {cfg.type}, which {why}; use a static QDQ recipe (e.g. -r int8)")
            notes.append(f"target {target.name}: {cfg.type} left out, what it rewrites stays float ({why})")
            continue
        update: dict[str, Any] = {}
        if cfg.type == "quantize-qdq":
            for key, value in target.quantize.items():
                if key == "reduce_range" and value == "auto":
                    value = _saturating_cpu_reduce_range(target, notes)
                current = getattr(cfg, key)
                if key in cfg.model_fields_set and _plain(current) != value and key != "overrides":
                    notes.append(f"target {target.name}: quantize-qdq {key} {_plain(current)!r} -> {value!r}")
                update[key] = value
            if "overrides" in target.quantize:
                # the target's rules come first so that the recipe's own per-node rules still win
                update["overrides"] = list(target.quantize["overrides"]) + [_plain(o) for o in cfg.overrides]
        elif cfg.type == "calibrate":
            update.update(target.calibrate)
        if update:
            cls = get_pass_class(cfg.type).Config
            cfg = cls.model_validate({**cfg.model_dump(), **update})
        configs.append(cfg)
    return recipe.model_copy(update={"passes": configs, "target": target.name}), notes


def _saturating_cpu_reduce_range(target: Target, notes: list[str]) -> bool:
    """7-bit weights when this CPU's u8 x s8 pair sums saturate int16 (x86 without VNNI), as NNCF's overflow
    fix does for OpenVINO: its CPU plugin's int8 kernels saturate there like ORT's (a one-layer BERT's output
    15.8 dB with full-range weights vs 33.6 dB with 7-bit ones, which is what the QDQ graph computes)."""
    from onnxopt.isa import detect_cpu

    cpu = detect_cpu()
    if cpu.u8s8_saturates:
        notes.append(f"target {target.name}: 7-bit weights ({cpu.describe()}: u8 x s8 int8 kernels saturate on this "
                     "CPU; build on the deployment CPU class for full-range weights)")
        return True
    return False


def _plain(v: Any) -> Any:
    return v.model_dump(exclude_defaults=True) if isinstance(v, BaseModel) else v


_DTYPE_NAMES = {
    ir.DataType.UINT8: "uint8", ir.DataType.INT8: "int8", ir.DataType.UINT16: "uint16",
    ir.DataType.INT16: "int16", ir.DataType.INT32: "int32", ir.DataType.INT4: "int4",
    ir.DataType.UINT4: "uint4",
}


def _dtype(value: ir.Value | None) -> str | None:
    t = constant_tensor(value)
    dt = t.dtype if t is not None else (value.dtype if value is not None else None)
    return _DTYPE_NAMES.get(dt, str(dt)) if dt is not None else None


def _nonzero(value: ir.Value | None) -> bool:
    zp = constant_value(value)
    return zp is not None and bool((zp.astype("int64") != 0).any())


def check_structure(model: ir.Model, target: Target | str) -> list[str]:
    """Violations of ``target``'s rules in ``model`` (empty: the model is laid out as the target needs).

    Domains of every node (subgraphs included); QuantizeLinear output types and zero points (activations);
    DequantizeLinear of an initializer: weight (8/4-bit) or bias (int32) types and weight zero points.
    """
    target = load_target(target)
    rules = target.rules
    bad: list[str] = []

    def add(msg: str) -> None:
        if len(bad) < 20:
            bad.append(msg)

    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        label = f"{node.op_type} {node.name!r}"
        domain = "" if node.domain in ("", "ai.onnx") else node.domain
        if target.allowed_domains is not None and domain not in target.allowed_domains:
            add(f"{label}: domain {domain!r} not allowed (allowed: {', '.join(map(repr, target.allowed_domains))})")
        elif domain and rules.allowed_ops is not None and node.op_type not in rules.allowed_ops:
            add(f"{label}: {domain} op not allowed (only {', '.join(rules.allowed_ops)})")
        inputs = list(node.inputs)
        zp = inputs[2] if len(inputs) > 2 else None
        if node.op_type == "QuantizeLinear":
            dtype = _dtype(zp) if zp is not None else "uint8"  # ONNX: no zero point means uint8
            if rules.activation_types is not None and dtype not in rules.activation_types:
                add(f"{label}: activation type {dtype} (allowed: {', '.join(rules.activation_types)})")
            if rules.symmetric_activations and _nonzero(zp):
                add(f"{label}: activation zero point is not 0")
        elif node.op_type == "DequantizeLinear" and inputs and constant_tensor(inputs[0]) is not None:
            dtype = _dtype(inputs[0])
            if dtype == "int32":
                if rules.bias_types is not None and dtype not in rules.bias_types:
                    add(f"{label}: int32 bias (allowed bias types: {', '.join(rules.bias_types) or 'float only'})")
                continue
            if rules.weight_types is not None and dtype not in rules.weight_types:
                add(f"{label}: weight type {dtype} (allowed: {', '.join(rules.weight_types)})")
            if rules.symmetric_weights and _nonzero(zp):
                add(f"{label}: weight zero point is not 0")
    return bad
