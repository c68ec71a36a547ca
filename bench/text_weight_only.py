"""MiniLM-L6 SST-2 (../shared/models/text): weight-only int4/int8 and fp16 against fp32, measured in one run.

Rows: fp32; the ``fp16`` preset; the ``int4-weight-only`` preset with calibration data (GPTQ) and without
(round-to-nearest); int8 weight-only (RTN, a recipe). Columns: accuracy on sst2_dev (872 sentences,
padded per batch of 32), agreement of predictions with fp32, logits SQNR and the lowest per-sentence
cosine of ``sentence_embedding`` to fp32, file size, and latency at L=128, batch 1, one thread (runs of
all models interleaved in one process; ratios to fp32). ONNX Runtime's own MatMulNBits quantizer needs
``onnx_ir``, which is not a dependency here, so fp32 is the peer.

    python bench/text_weight_only.py [--calib-samples 64] [--rounds 10]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    CACHE,
    TEXT,
    file_mb,
    interleaved_latency,
    markdown_table,
    need,
    pad_ids,
    session,
    sst2_dev,
    text_feeds,
    write_text_npz,
)

INT8_WO = {"name": "int8-weight-only", "passes": ["remove-identity", "constant-folding", "dead-code-elimination",
                                                   {"type": "quantize-weight-only", "bits": 8, "method": "rtn",
                                                    "min_elements": 4096, "embeddings": True}]}


def build(src: Path, out: Path, recipe, calib: Path | None) -> float:
    from onnxopt.optimize import optimize
    from onnxopt.recipe import parse_recipe

    if isinstance(recipe, dict):
        recipe = parse_recipe(recipe, source="bench")
    start = time.perf_counter()
    optimize(src, out, recipe=recipe, calib=calib, force=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    src = need(TEXT / "minilm_l6_sst2.onnx")
    calib = write_text_npz(TEXT / "sst2_calib.tsv", CACHE / f"sst2_calib_{args.calib_samples}.npz",
                           n=args.calib_samples)
    ids, labels = sst2_dev()
    feeds = text_feeds(ids, 32)
    work = Path(tempfile.mkdtemp(prefix="onnxopt-wo-"))
    models: dict[str, Path] = {"fp32": src}
    build_s: dict[str, float | None] = {"fp32": None}
    for label, recipe, use_calib in [("fp16", "fp16", False),
                                     ("int4-weight-only (GPTQ)", "int4-weight-only", True),
                                     ("int4-weight-only (RTN, no calib)", "int4-weight-only", False),
                                     ("int8-weight-only (RTN)", INT8_WO, False)]:
        out = work / f"{len(models)}.onnx"
        print(f"building {label} ...", file=sys.stderr, flush=True)
        build_s[label] = build(src, out, recipe, calib if use_calib else None)
        models[label] = out

    outs = {}
    for label, path in models.items():
        s = session(path)
        res = [s.run(["logits", "sentence_embedding"], f) for f in feeds]
        outs[label] = (np.concatenate([r[0] for r in res]), np.concatenate([r[1] for r in res]))
    ref_logits, ref_emb = outs["fp32"]
    one = pad_ids(ids[:1], 128)
    lat = interleaved_latency({k: (session(p), one) for k, p in models.items()}, rounds=args.rounds, per_round=3)

    rows = []
    acc32 = float((ref_logits.argmax(1) == labels).mean() * 100)
    mb32 = file_mb(src)
    for label, (logits, emb) in outs.items():
        acc = float((logits.argmax(1) == labels).mean() * 100)
        agree = float((logits.argmax(1) == ref_logits.argmax(1)).mean() * 100)
        noise = float(np.sum((logits - ref_logits) ** 2))
        sqnr = 10 * np.log10(float(np.sum(ref_logits ** 2)) / noise) if noise > 0 else float("inf")
        cos = np.sum(emb * ref_emb, 1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(ref_emb, axis=1))
        mb = file_mb(models[label])
        rows.append([label, f"{acc:.2f}", f"{acc - acc32:+.2f}", f"{agree:.2f}",
                     "inf" if label == "fp32" else f"{sqnr:.1f}", f"{float(cos.min()):.4f}", f"{mb:.2f}",
                     f"{mb / mb32:.3f}", f"{lat[label]:.1f}", f"{lat['fp32'] / lat[label]:.2f}",
                     "–" if build_s[label] is None else f"{build_s[label]:.0f}"])
    print(markdown_table(["model", "acc %", "Δ pt", "agree %", "logits SQNR dB", "min cos emb", "MB",
                          "size ×fp32", "ms L128 b1", "speed ×fp32", "build s"], rows))
    print(f"\nsst2_dev {len(labels)} sentences; calibration: first {args.calib_samples} of sst2_calib.tsv "
          "(padded to 128, padded rows masked out of the GPTQ Hessians); latency: median of interleaved "
          f"runs, 1 thread, {args.rounds} rounds.")


if __name__ == "__main__":
    main()
