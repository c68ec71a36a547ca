"""MiniLM-L6 SST-2 (../shared/models/text): onnxopt's transformer presets against ONNX Runtime's quantize_dynamic.

    python bench/text.py            # all 872 dev sentences, 128 calibration sentences
    python bench/text.py --quick    # 200 dev sentences, fewer latency rounds

One table. Rows: fp32 as exported; onnxopt ``int8-dynamic`` (calibrated on sst2_calib.tsv, which turns on
SmoothQuant) and the same without calibration data; ``int4-weight-only`` and ``fp16`` when those presets
exist; ``onnxruntime.quantization.quantize_dynamic`` with its defaults (int8 weights, per tensor).
Columns: accuracy on sst2_dev.tsv (each sentence alone, unpadded: batch 1 as served) and its change vs
fp32; agreement of predictions with fp32; mean cosine of ``sentence_embedding`` to fp32; file size and
its ratio to fp32; latency at L=128 (padded), batch 1 and batch 8, one thread, every model interleaved in
one process, as speed-up over fp32.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    CACHE,
    MAX_LEN,
    TEXT,
    file_mb,
    interleaved_latency,
    markdown_table,
    need,
    pad_ids,
    read_tsv,
    session,
    tokenize,
    write_text_npz,
)

MODEL = TEXT / "minilm_l6_sst2.onnx"
# (row label, preset, use calibration data); presets from part B are skipped when absent.
PRESETS = [
    ("onnxopt int8-dynamic", "int8-dynamic", True),
    ("onnxopt int8-dynamic, no --calib", "int8-dynamic", False),
    ("onnxopt int4-weight-only", "int4-weight-only", True),
    ("onnxopt fp16", "fp16", True),
]


def build_preset(preset: str, calib: Path | None, out: Path) -> tuple[Path, float]:
    from onnxopt.data import open_data
    from onnxopt.model_io import load_model, save_model
    from onnxopt.pass_infra import PassContext, PassManager
    from onnxopt.recipe import load_preset

    start = time.perf_counter()
    recipe = load_preset(preset)
    model = load_model(MODEL)
    ctx = PassContext(calibration=open_data(str(calib), model, recipe.data) if calib else None)
    result = PassManager(recipe.build_passes(ctx), check=False).run(model)
    save_model(result.model, out, force=True)  # rebuilt every run: the cache must not go stale
    return out, time.perf_counter() - start


def build_ort_dynamic(out: Path) -> tuple[Path, float]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    start = time.perf_counter()
    quantize_dynamic(str(MODEL), str(out), weight_type=QuantType.QInt8)
    return out, time.perf_counter() - start


def predict(path: Path, ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    s = session(path, threads=1)
    logits, emb = [], []
    for x in ids:
        lg, e = s.run(["logits", "sentence_embedding"], pad_ids([x]))
        logits.append(lg[0])
        emb.append(e[0])
    return np.array(logits), np.array(emb)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="200 dev sentences, fewer latency rounds")
    ap.add_argument("--calib", type=int, default=128, help="calibration sentences from sst2_calib.tsv")
    args = ap.parse_args()
    from onnxopt.recipe import preset_names

    need(MODEL)
    work = CACHE / "text"
    work.mkdir(parents=True, exist_ok=True)
    calib = write_text_npz(TEXT / "sst2_calib.tsv", work / f"sst2_calib_{args.calib}.npz", n=args.calib)
    sentences, labels = read_tsv(TEXT / "sst2_dev.tsv")
    n = 200 if args.quick else len(sentences)
    ids, labels = tokenize(sentences[:n]), labels[:n]

    models: dict[str, Path] = {"fp32": MODEL}
    build_s: dict[str, float] = {}
    available = set(preset_names())
    for label, preset, use_calib in PRESETS:
        if preset not in available:
            print(f"skipping {label}: no preset {preset!r}", file=sys.stderr)
            continue
        print(f"building {label} ...", file=sys.stderr)
        out = work / f"{preset}{'' if use_calib else '-nocalib'}.onnx"
        models[label], build_s[label] = build_preset(preset, calib if use_calib else None, out)
    print("building ORT quantize_dynamic ...", file=sys.stderr)
    label = "ORT quantize_dynamic (defaults)"
    models[label], build_s[label] = build_ort_dynamic(work / "ort_dynamic.onnx")

    print(f"evaluating on {n} dev sentences ...", file=sys.stderr)
    preds = {k: predict(p, ids) for k, p in models.items()}
    ref_logits, ref_emb = preds["fp32"]

    one = pad_ids(ids[:1], MAX_LEN)
    eight = pad_ids(ids[:8], MAX_LEN)
    # 128 real tokens (no padding): attention over every key, the case padding tricks cannot help
    body = [t for x in ids for t in x[1:-1]][: MAX_LEN - 2]
    full = pad_ids([[ids[0][0], *body, ids[0][-1]]], MAX_LEN)
    rounds = 5 if args.quick else 15
    print("latency ...", file=sys.stderr)
    lat1 = interleaved_latency({k: (session(p), one) for k, p in models.items()}, rounds=rounds, per_round=3)
    lat_full = interleaved_latency({k: (session(p), full) for k, p in models.items()}, rounds=rounds, per_round=3)
    lat8 = interleaved_latency({k: (session(p), eight) for k, p in models.items()}, rounds=max(rounds // 3, 2),
                               per_round=2)

    fp32_acc = float((ref_logits.argmax(1) == labels).mean() * 100)
    fp32_mb = file_mb(MODEL)
    rows = []
    for k, p in models.items():
        logits, emb = preds[k]
        acc = float((logits.argmax(1) == labels).mean() * 100)
        cos = np.sum(emb * ref_emb, 1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(ref_emb, axis=1))
        mb = file_mb(p)
        rows.append([k, f"{acc:.2f}", f"{acc - fp32_acc:+.2f}", f"{(logits.argmax(1) == ref_logits.argmax(1)).mean() * 100:.2f}",
                     f"{cos.mean():.5f}", f"{mb:.1f}", f"{mb / fp32_mb:.3f}",
                     f"{lat1[k]:.1f}", f"{lat1['fp32'] / lat1[k]:.2f}x",
                     f"{lat_full[k]:.1f}", f"{lat_full['fp32'] / lat_full[k]:.2f}x", f"{lat8[k]:.0f}", f"{lat8['fp32'] / lat8[k]:.2f}x",
                     f"{build_s[k]:.0f}" if k in build_s else "–"])
    import onnxruntime

    print(f"MiniLM-L6 SST-2: {n} dev sentences (batch 1, unpadded), {args.calib} calibration sentences; "
          f"latency L={MAX_LEN} (b1: a dev sentence padded to {MAX_LEN}; b1 full: {MAX_LEN} real tokens; b8: 8 padded), one thread, interleaved; onnxruntime {onnxruntime.__version__}, onnx {onnx.__version__}")
    print(markdown_table(["model", "acc %", "Δ pt", "agree %", "emb cos", "MB", "size ×", "b1 ms", "b1 speed-up",
                          "b1 full ms", "b1 full speed-up", "b8 ms", "b8 speed-up", "build s"], rows))


if __name__ == "__main__":
    main()
