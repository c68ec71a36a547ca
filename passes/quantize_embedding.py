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
import onnx
from onnx import TensorProto, helper
from pydantic import Field

from onnxopt.legacy_graph import GraphIndex, attr, drop_initializers, opset_version
from onnxopt.pass_infra import PassConfig, PassResult, ProtoPass
from onnxopt.quant import quantize, weight_params

DEFAULT_DOMAINS = ("", "ai.onnx")


class QuantizeEmbeddingConfig(PassConfig):
    type: Literal["quantize-embedding"] = "quantize-embedding"
    min_elements: int = Field(65536, ge=1, description="only tables with at least this many values")
    exclude_tensors: list[str] = Field(default_factory=list, description="table initializers left in float")


class QuantizeEmbedding(ProtoPass):
    name = "quantize-embedding"
    summary = "Store large Gather tables (word embeddings) as int8 with per-row scales; dequantize gathered rows."
    Config = QuantizeEmbeddingConfig

    def call(self, model: onnx.ModelProto) -> PassResult:
        cfg: QuantizeEmbeddingConfig = self.config
        g = model.graph
        index = GraphIndex(g)
        use_dq = opset_version(model) >= 21
        tables: dict[str, tuple[str, str]] = {}
        gathers = 0
        for out in [n.output[0] for n in g.node if n.op_type == "Gather" and n.domain in DEFAULT_DOMAINS]:
            node = index.producer(out)
            name = node.input[0]
            table = index.constant(name)
            if (table is None or table.dtype != np.float32 or table.ndim != 2 or table.size < cfg.min_elements
                    or attr(node, "axis", 0) != 0 or name in cfg.exclude_tensors or name not in index.initializers):
                continue
            if name not in tables:
                scale, _ = weight_params(table, "int8", axis=0, symmetric=True)
                q = quantize(table, scale, 0, "int8", axis=0)
                tables[name] = (index.add_initializer(q, f"{name}_quantized"),
                                index.add_initializer(scale.reshape(-1, 1).astype(np.float32), f"{name}_row_scale"))
            q_name, s_name = tables[name]
            base = node.name or out
            rows, scales = index.unique_name(f"{base}_rows_int8"), index.unique_name(f"{base}_row_scales")
            new = [helper.make_node("Gather", [q_name, node.input[1]], [rows], axis=0,
                                    name=index.unique_name(f"{base}_int8")),
                   helper.make_node("Gather", [s_name, node.input[1]], [scales], axis=0,
                                    name=index.unique_name(f"{base}_scales"))]
            if use_dq:
                new.append(helper.make_node("DequantizeLinear", [rows, scales], [out], axis=-1,
                                            block_size=table.shape[1], name=index.unique_name(f"{base}_dequantize")))
            else:
                as_float = index.unique_name(f"{base}_rows_float")
                new += [helper.make_node("Cast", [rows], [as_float], to=TensorProto.FLOAT,
                                         name=index.unique_name(f"{base}_cast")),
                        helper.make_node("Mul", [as_float, scales], [out], name=index.unique_name(f"{base}_dequantize"))]
            nodes = list(g.node)
            pos = next(i for i, n in enumerate(nodes) if n is node)
            del g.node[:]
            g.node.extend(nodes[:pos] + new + nodes[pos + 1:])
            index.refresh()
            gathers += 1
        if tables:
            drop_initializers(g, set(tables))
        details = {"tables": sorted(tables), "gathers": gathers, "form": "DequantizeLinear" if use_dq else "Cast+Mul"}
        return PassResult(model, gathers > 0, details)
