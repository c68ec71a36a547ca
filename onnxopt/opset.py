"""Opset upgrades of the default domain without holding the weights in a protobuf.

``onnx.version_converter`` works on a whole ``ModelProto``. Its adapters rewrite nodes (attributes that
became inputs, changed defaults) and never read a weight's values, so the conversion runs on the model's
weight-less skeleton (``checks.skeleton``: large weights travel as typed graph inputs) and the weights are
put back afterwards as the very same tensors (shared, not copied; lazy ones stay unread).
"""

from __future__ import annotations

import onnx_ir as ir

from onnxopt.errors import PreconditionError


def upgrade_opset(model: ir.Model, target: int, reason: str | None = None) -> ir.Model:
    """A new model: ``model`` converted to opset ``target`` of the default domain (``model`` is left as it
    is; the result shares its weight tensors). Raises ``PreconditionError`` naming the converter's error,
    after ``reason`` (why the upgrade is needed) when given."""
    from onnx import version_converter

    from onnxopt.checks import KEEP_VALUES_BYTES, skeleton
    from onnxopt.graph import opset_version, tensor_bytes
    from onnxopt.model_io import from_proto

    graph = model.graph
    order = list(graph.initializers)
    lifted: dict[str, tuple[ir.TensorProtocol, bool]] = {}  # weights skeleton() turns into graph inputs
    for name, value in graph.initializers.items():
        tensor = value.const_value
        if tensor is None or (not isinstance(tensor, ir.ExternalTensor) and tensor_bytes(tensor) <= KEEP_VALUES_BYTES):
            continue
        lifted[name] = (tensor, value.is_graph_input())
    try:
        converted = version_converter.convert_version(skeleton(model), target)
    except Exception as exc:  # noqa: BLE001 - the converter raises assorted errors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        why = f"{reason}; " if reason else ""
        raise PreconditionError(f"{why}onnx.version_converter failed to upgrade from {opset_version(model)}: "
                                f"{first[:200]}") from None
    out = from_proto(converted)
    g = out.graph
    inputs = {v.name: v for v in g.inputs}
    for name, (tensor, was_input) in lifted.items():
        value = inputs.get(name)
        if value is None:  # the converter dropped or renamed an input it had no reason to touch
            raise PreconditionError(f"onnx.version_converter lost weight {name!r} while upgrading to opset {target}")
        if not was_input:
            g.inputs.remove(value)
        value.const_value = tensor
        g.register_initializer(value)
    # the initializers in the model's order (new ones, if the converter made any, after them)
    values = dict(g.initializers)
    g.initializers.clear()
    for name in [n for n in order if n in values] + [n for n in values if n not in set(order)]:
        g.register_initializer(values[name])
    return out
