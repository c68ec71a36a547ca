"""Embedding tables stored int8 with one scale per row.

A ``Gather`` from a large constant float table along axis 0 (a word-embedding lookup) gathers
int8 rows and their scales, then dequantizes only the rows it looked up:
``Gather(T, ids)`` -> ``DequantizeLinear(Gather(T_q, ids), Gather(scale, ids))`` with the
per-row scale applied block-wise over the whole embedding dimension (opset 21), or
``Cast(Gather(T_q, ids)) * Gather(scale, ids)`` below opset 21. Dequantizing the table first
and gathering after would touch all rows (47 MB for BERT's 30k x 384 table) on every run.

Rows are symmetric (zero point 0, scale max|row| / 127): in a word-embedding table each token's
row has its own magnitude, and a per-table scale would leave rare tokens' small rows with a
few levels.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import onnx_ir as ir
from onnx import TensorProto
from pydantic import Field

from onnxopt.graph import (
    Namer,
    add_initializer,
    attr,
    constant_tensor,
    constant_value,
    drop_if_unused,
    is_initializer,
    is_op,
    make_node,
    opset_version,
    replace_node,
)
from onnxopt.pass_infra import Pass, PassConfig, PassResult
from onnxopt.quant import quantize, weight_params


class QuantizeEmbeddingConfig(PassConfig):
    type: Literal["quantize-embedding"] = "quantize-embedding"
    min_elements: int = Field(65536, ge=1, description="only tables with at least this many values")
    exclude_tensors: list[str] = Field(default_factory=list, description="table initializers left in float")


class QuantizeEmbedding(Pass):
    name = "quantize-embedding"
    summary = "Store large Gather tables (word embeddings) as int8 with per-row scales; dequantize gathered rows."
    Config = QuantizeEmbeddingConfig

    def call(self, model: ir.Model) -> PassResult:
        cfg: QuantizeEmbeddingConfig = self.config
        g = model.graph
        namer = Namer(g)
        use_dq = opset_version(model) >= 21
        tables: dict[str, tuple[ir.Value, ir.Value, int]] = {}
        originals: dict[str, ir.Value] = {}
        gathers = 0
        for node in [n for n in g if is_op(n, "Gather")]:
            table_value = node.inputs[0]
            t = constant_tensor(table_value)
            name = table_value.name if table_value is not None else None
            if (t is None or t.dtype != ir.DataType.FLOAT or len(t.shape) != 2 or t.size < cfg.min_elements
                    or attr(node, "axis", 0) != 0 or name in cfg.exclude_tensors or not is_initializer(table_value)):
                continue
            if name not in tables:
                table = constant_value(table_value)
                scale, _ = weight_params(table, "int8", axis=0, symmetric=True)
                q = quantize(table, scale, 0, "int8", axis=0)
                tables[name] = (add_initializer(g, q, f"{name}_quantized", namer),
                                add_initializer(g, scale.reshape(-1, 1).astype(np.float32), f"{name}_row_scale",
                                                namer), int(table.shape[1]))
                originals[name] = table_value
                del table, q
            q_value, s_value, width = tables[name]
            base = node.name or node.outputs[0].name
            ids = node.inputs[1]
            rows = make_node("Gather", [q_value, ids], {"axis": 0}, outputs=[namer.unique(f"{base}_rows_int8")],
                             name=namer.unique(f"{base}_int8"))
            scales = make_node("Gather", [s_value, ids], {"axis": 0}, outputs=[namer.unique(f"{base}_row_scales")],
                               name=namer.unique(f"{base}_scales"))
            new = [rows, scales]
            if use_dq:
                last = make_node("DequantizeLinear", [rows.outputs[0], scales.outputs[0]],
                                 {"axis": -1, "block_size": width}, name=namer.unique(f"{base}_dequantize"))
                new.append(last)
            else:
                cast = make_node("Cast", [rows.outputs[0]], {"to": TensorProto.FLOAT},
                                 outputs=[namer.unique(f"{base}_rows_float")], name=namer.unique(f"{base}_cast"))
                last = make_node("Mul", [cast.outputs[0], scales.outputs[0]], name=namer.unique(f"{base}_dequantize"))
                new += [cast, last]
            replace_node(node, new, [last.outputs[0]])
            gathers += 1
        for value in originals.values():
            drop_if_unused(g, value)
        details = {"tables": sorted(tables), "gathers": gathers, "form": "DequantizeLinear" if use_dq else "Cast+Mul"}
        return PassResult(model, gathers > 0, details)
