"""The seed-000 table: fp32 -> int8 size, latency and accuracy for the shared real models, in one run.

    python bench/seed_tables.py            # full evaluation sets
    python bench/seed_tables.py --quick    # smaller evaluation sets and fewer timing rounds

Rows: EfficientNet-Lite0 (static int8, top-1 on the 650 ImageNet val images), MiniLM-L6 SST-2 (static int8
and dynamic int8, accuracy on the 872-sentence dev set), YOLOX-Nano (static int8, mAP@0.5 on the 10 COCO
images, and pseudo mAP@0.5 against fp32 detections on ImageNet val JPEGs), the MNIST CNN (static int8, top-1
on the 10k test set minus the 100 calibration images). Every model is built with the shipped preset
(``int8``: calibrate, quantize-qdq, precision-fallback, latency-placement; ``int8-dynamic``) through the
Python API, as ``onnxopt optimize`` would, from 100 calibration samples (MiniLM: 200 SST-2 training
sentences). Latency: batch 1, one thread, fp32 and int8 timed in interleaved rounds (MiniLM at length 128).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import detection  # noqa: E402
from common import (  # noqa: E402
    CACHE,
    IMAGENET,
    MNIST,
    TEXT,
    cpu_line,
    file_mb,
    imagenet_calib_npz,
    imagenet_val,
    interleaved_latency,
    markdown_table,
    mnist_test,
    need,
    pad_ids,
    run_batched,
    session,
    sst2_dev,
    text_feeds,
    write_text_npz,
)

LITE0 = IMAGENET / "efficientnet_lite0.onnx"
MINILM = TEXT / "minilm_l6_sst2.onnx"
MNIST_MODEL = MNIST / "mnist_cnn.onnx"


def build(model: Path, out: Path, preset: str, calib: Path | None) -> float:
    from onnxopt.optimize import optimize

    t0 = time.perf_counter()
    optimize(str(model), str(out), recipe=preset, calib=str(calib) if calib else None, force=True)
    return time.perf_counter() - t0


def latency(fp32: Path, q: Path, feed: dict, rounds: int) -> tuple[float, float]:
    lat = interleaved_latency({"fp32": (session(fp32, threads=1), feed), "q": (session(q, threads=1), feed)},
                              rounds=rounds)
    return lat["fp32"], lat["q"]


def top1(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    return 100.0 * float((run_batched(session(path, threads=2), x).argmax(1) == y).mean())


def sst2_accuracy(path: Path, ids: list[list[int]], y: np.ndarray) -> float:
    s = session(path, threads=2)
    logits = np.concatenate([s.run(["logits"], f)[0] for f in text_feeds(ids, 32)])
    return 100.0 * float((logits.argmax(1) == y).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    rounds = 8 if args.quick else 25
    work = Path(tempfile.mkdtemp(prefix="onnxopt-seed-"))
    rows = []

    def row(name, method, fp32: Path, q: Path, ms, acc, metric, build_s):
        rows.append([name, method, f"{file_mb(fp32):.2f} → {file_mb(q):.2f}", f"{ms[0]:.2f} → {ms[1]:.2f}",
                     f"{ms[0] / ms[1]:.2f}x", f"{acc[0]:.2f} → {acc[1]:.2f}", metric, round(build_s, 1)])
        print(f"  {name} {method}: done", file=sys.stderr, flush=True)

    # EfficientNet-Lite0
    need(LITE0)
    calib = imagenet_calib_npz(CACHE / "imagenet_calib_100.npz", 100)
    x, y = imagenet_val(150 if args.quick else None)
    q = work / "lite0_int8.onnx"
    t = build(LITE0, q, "int8", calib)
    row("EfficientNet-Lite0", "static", LITE0, q, latency(LITE0, q, {"input": x[:1]}, rounds),
        (top1(LITE0, x, y), top1(q, x, y)), f"top-1 % ({len(x)} val)", t)

    # MiniLM-L6 SST-2: static and dynamic
    need(MINILM)
    ids, labels = sst2_dev()
    if args.quick:
        ids, labels = ids[:300], labels[:300]
    text_calib = write_text_npz(TEXT / "sst2_calib.tsv", CACHE / "sst2_calib_200.npz", n=200)
    feed = pad_ids([ids[0]], 128)
    acc_fp32 = sst2_accuracy(MINILM, ids, labels)
    for method, preset in (("static", "int8"), ("dynamic", "int8-dynamic")):
        q = work / f"minilm_{preset}.onnx"
        t = build(MINILM, q, preset, text_calib)
        row("MiniLM-L6 SST-2", method, MINILM, q, latency(MINILM, q, feed, rounds),
            (acc_fp32, sst2_accuracy(q, ids, labels)), f"accuracy % ({len(ids)} dev, L=128 timing)", t)

    # YOLOX-Nano
    need(detection.MODEL)
    x_coco, r_coco, truth = detection.coco_set()
    x_cal, _ = detection.letterboxed(IMAGENET / "calib", 100, "calib")
    x_val, r_val = detection.letterboxed(IMAGENET / "val", 150 if args.quick else None, "val")
    np.savez(work / "yolox_calib.npz", images=x_cal)
    q = work / "yolox_int8.onnx"
    t = build(detection.MODEL, q, "int8", work / "yolox_calib.npz")
    coco = [detection.mean_ap(detection.detections(p, x_coco, r_coco, detection.EVAL_SCORE), truth)
            for p in (detection.MODEL, q)]
    pseudo_truth = [[(c, b) for c, s, b in d]
                    for d in detection.detections(detection.MODEL, x_val, r_val, detection.PSEUDO_SCORE)]
    pseudo = detection.mean_ap(detection.detections(q, x_val, r_val, detection.EVAL_SCORE), pseudo_truth)
    row("YOLOX-Nano", "static", detection.MODEL, q, latency(detection.MODEL, q, {"images": x_coco[:1]}, rounds),
        (coco[0], coco[1]), f"COCO-10 mAP@0.5 (pseudo mAP vs fp32 on {len(x_val)} imgs: {pseudo:.3f})", t)

    # MNIST CNN
    need(MNIST_MODEL)
    xm, ym = mnist_test()
    name = session(MNIST_MODEL).get_inputs()[0].name
    np.savez(work / "mnist_calib.npz", **{name: xm[:100]})
    q = work / "mnist_int8.onnx"
    t = build(MNIST_MODEL, q, "int8", work / "mnist_calib.npz")
    xe, ye = (xm[100:2100], ym[100:2100]) if args.quick else (xm[100:], ym[100:])
    row("MNIST CNN", "static", MNIST_MODEL, q, latency(MNIST_MODEL, q, {name: xm[:1]}, rounds),
        (top1(MNIST_MODEL, xe, ye), top1(q, xe, ye)), f"top-1 % ({len(xe)} test)", t)

    print(markdown_table(["model", "method", "size MB fp32 → int8", "latency ms fp32 → int8", "speed-up",
                          "accuracy fp32 → int8", "metric", "build s"], rows))
    print(f"\n{cpu_line()}; batch 1, one thread, {rounds} interleaved timing rounds; int8 built with the shipped "
          "presets from 100 calibration samples (MiniLM: 200 sentences)")


if __name__ == "__main__":
    main()
