"""Object detection: YOLOX-Nano fp32 vs onnxopt int8 vs onnxruntime quantize_static.

    python bench/detection.py            # 100 calibration images, all 650 ImageNet val JPEGs for pseudo-labels
    python bench/detection.py --quick    # 40 calibration images, 150 pseudo-label images, fewer timing rounds

One run, one table. Columns:

* mAP@0.5 on the 10 COCO val2017 images against their boxes (the 80 detection categories; a functional
  check - 10 images is far too few for a real COCO figure);
* pseudo mAP@0.5: each model's detections on the ImageNet val JPEGs scored against fp32's detections
  (score >= 0.3 after NMS) as ground truth - how much of fp32's output the int8 model reproduces;
* latency (batch 1, one thread, interleaved rounds) and the speed-up over fp32; file size.

Preprocessing as the model card says: letterbox to 416 (image at the top-left, pad 114), BGR 0..255, no
normalisation. Decoding (grid, stride, exp of the sizes) and class-wise NMS are done here in NumPy, as the
model's output is raw. Calibration images come from imagenet/calib (letterboxed the same way).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import version_converter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    CACHE,
    IMAGENET,
    SHARED,
    cpu_line,
    file_mb,
    interleaved_latency,
    markdown_table,
    need,
    session,
)

DETECTION = SHARED / "detection"
MODEL = DETECTION / "yolox_nano.onnx"
SIZE = 416
STRIDES = (8, 16, 32)
COCO80 = ("person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant stop_sign "
          "parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella "
          "handbag tie suitcase frisbee skis snowboard sports_ball kite baseball_bat baseball_glove skateboard "
          "surfboard tennis_racket bottle wine_glass cup fork knife spoon bowl banana apple sandwich orange "
          "broccoli carrot hot_dog pizza donut cake chair couch potted_plant bed dining_table toilet tv laptop "
          "mouse remote keyboard cell_phone microwave oven toaster sink refrigerator book clock vase scissors "
          "teddy_bear hair_drier toothbrush").split()
CLASS_ID = {name.replace("_", " "): i for i, name in enumerate(COCO80)}
PSEUDO_SCORE = 0.3  # fp32 detections at least this confident are the pseudo ground truth
EVAL_SCORE = 0.01  # detections kept for AP (the precision-recall curve needs the low-score tail)


# --- pre/post-processing ------------------------------------------------------------------------------
def letterbox(path: Path) -> tuple[np.ndarray, float]:
    from PIL import Image

    img = Image.open(path).convert("RGB")
    r = min(SIZE / img.width, SIZE / img.height)
    resized = img.resize((max(1, round(img.width * r)), max(1, round(img.height * r))), Image.BILINEAR)
    canvas = np.full((SIZE, SIZE, 3), 114, np.uint8)
    canvas[:resized.height, :resized.width] = np.asarray(resized)
    return canvas[:, :, ::-1].transpose(2, 0, 1).astype(np.float32), r  # BGR, CHW


def _grids() -> tuple[np.ndarray, np.ndarray]:
    grids, strides = [], []
    for s in STRIDES:
        n = SIZE // s
        yv, xv = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        grids.append(np.stack([xv, yv], -1).reshape(-1, 2))
        strides.append(np.full((n * n, 1), s))
    return np.concatenate(grids).astype(np.float32), np.concatenate(strides).astype(np.float32)


GRID, STRIDE = _grids()


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    lt = np.maximum(box[:2], boxes[:, :2])
    rb = np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / (area(box) + area(boxes) - inter + 1e-9)


def decode(raw: np.ndarray, ratio: float, min_score: float, iou: float = 0.45) -> list[tuple[int, float, np.ndarray]]:
    """[3549, 85] raw output -> [(class, score, xyxy in original pixels)] after class-wise NMS."""
    xy = (raw[:, :2] + GRID) * STRIDE
    wh = np.exp(np.minimum(raw[:, 2:4], 20.0)) * STRIDE
    boxes = np.concatenate([xy - wh / 2, xy + wh / 2], 1) / ratio
    scores = raw[:, 4:5] * raw[:, 5:]
    cls = scores.argmax(1)
    best = scores[np.arange(len(cls)), cls]
    keep = best >= min_score
    out = []
    for c in np.unique(cls[keep]):
        idx = np.where(keep & (cls == c))[0]
        idx = idx[np.argsort(-best[idx])]
        while len(idx):
            i = idx[0]
            out.append((int(c), float(best[i]), boxes[i]))
            idx = idx[1:][_iou(boxes[i], boxes[idx[1:]]) < iou]
    return out


def mean_ap(dets: list[list[tuple]], truth: list[list[tuple[int, np.ndarray]]], thr: float = 0.5) -> float:
    """mAP at IoU ``thr`` over the classes present in ``truth`` (all-point interpolated AP per class)."""
    classes = sorted({c for t in truth for c, _ in t})
    aps = []
    for c in classes:
        gts = {i: [b for k, b in t if k == c] for i, t in enumerate(truth)}
        n_gt = sum(len(v) for v in gts.values())
        used = {i: np.zeros(len(v), bool) for i, v in gts.items()}
        cand = sorted(((s, i, b) for i, d in enumerate(dets) for k, s, b in d if k == c), key=lambda x: -x[0])
        tp = np.zeros(len(cand))
        for j, (_, i, b) in enumerate(cand):
            if gts[i]:
                ious = _iou(b, np.array(gts[i]))
                m = int(ious.argmax())
                if ious[m] >= thr and not used[i][m]:
                    used[i][m] = True
                    tp[j] = 1
        if not len(cand):
            aps.append(0.0)
            continue
        ctp = np.cumsum(tp)
        recall = ctp / n_gt
        precision = ctp / np.arange(1, len(cand) + 1)
        mrec = np.concatenate([[0], recall, [1]])
        mpre = np.concatenate([[0], precision, [0]])
        mpre = np.maximum.accumulate(mpre[::-1])[::-1]
        steps = np.where(mrec[1:] != mrec[:-1])[0]
        aps.append(float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1])))
    return float(np.mean(aps)) if aps else float("nan")


# --- data -----------------------------------------------------------------------------------------------
def coco_set() -> tuple[np.ndarray, list[float], list[list[tuple[int, np.ndarray]]]]:
    root = need(DETECTION / "coco_val2017_10imgs")
    xs, ratios, truth = [], [], []
    for line in (root / "annotations.jsonl").read_text().splitlines():
        if not line.strip():
            continue
        ann = json.loads(line)
        x, r = letterbox(root / ann["img_fn"])
        xs.append(x)
        ratios.append(r)
        boxes = []
        for b in ann["bboxes"]:
            if b["category"] in CLASS_ID:  # stuff categories are not detection targets
                x0, y0, w, h = b["bbox"]
                boxes.append((CLASS_ID[b["category"]], np.array([x0, y0, x0 + w, y0 + h], np.float32)))
        truth.append(boxes)
    return np.stack(xs), ratios, truth


def letterboxed(folder: Path, n: int | None, name: str) -> tuple[np.ndarray, np.ndarray]:
    files = sorted(p for p in need(folder).iterdir() if p.suffix.lower() in (".jpeg", ".jpg"))[:n]
    cache = CACHE / f"yolox_{name}_{len(files)}.npz"
    if cache.is_file():
        d = np.load(cache)
        return d["x"], d["r"]
    pairs = [letterbox(f) for f in files]
    x, r = np.stack([p[0] for p in pairs]), np.array([p[1] for p in pairs], np.float32)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, x=x, r=r)
    return x, r


# --- models ---------------------------------------------------------------------------------------------
def build_onnxopt(calib: Path, out: Path) -> tuple[float, dict]:
    from onnxopt.optimize import optimize

    t0 = time.perf_counter()
    result = optimize(str(MODEL), str(out), recipe="int8", calib=str(calib), force=True)
    seconds = time.perf_counter() - t0
    details = {}
    for rec in result.pipeline.records:
        if rec.name in ("quantize-qdq", "latency-placement"):
            details[rec.name] = rec.details
    return seconds, details


def build_ort(x_calib: np.ndarray, out: Path) -> float:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(x_calib[i:i + 1] for i in range(len(x_calib)))

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {"images": x}

    t0 = time.perf_counter()
    pre = out.with_name("yolox_pre.onnx")
    # the export is opset 11; ORT's per-channel QDQ needs 13 (DequantizeLinear's axis), as its docs say
    onnx.save(version_converter.convert_version(onnx.load(str(MODEL)), 13), str(pre))
    quant_pre_process(str(pre), str(pre))
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
    return time.perf_counter() - t0


def detections(path: Path, x: np.ndarray, ratios, min_score: float) -> list[list[tuple]]:
    s = session(path, threads=2)
    return [decode(s.run(None, {"images": x[i:i + 1]})[0][0], float(ratios[i]), min_score) for i in range(len(x))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--calib", type=int, default=100)
    ap.add_argument("--images", type=int, default=None, help="pseudo-label images (default: all 650)")
    args = ap.parse_args()
    n_calib = 40 if args.quick else args.calib
    n_img = args.images or (150 if args.quick else None)
    rounds = 10 if args.quick else 30

    need(MODEL)
    x_coco, r_coco, truth = coco_set()
    x_cal, _ = letterboxed(IMAGENET / "calib", n_calib, "calib")
    x_val, r_val = letterboxed(IMAGENET / "val", n_img, "val")
    work = Path(tempfile.mkdtemp(prefix="onnxopt-detection-"))
    calib_npz = work / "calib.npz"
    np.savez(calib_npz, images=x_cal)

    paths = {"fp32": MODEL, "onnxopt int8": work / "onnxopt_int8.onnx", "ORT quantize_static": work / "ort.onnx"}
    build_s = {"fp32": 0.0}
    build_s["onnxopt int8"], details = build_onnxopt(calib_npz, paths["onnxopt int8"])
    build_s["ORT quantize_static"] = build_ort(x_cal, paths["ORT quantize_static"])

    pseudo_truth = [[(c, b) for c, s, b in d] for d in detections(MODEL, x_val, r_val, PSEUDO_SCORE)]
    feed = {"images": x_coco[:1]}
    lat = interleaved_latency({k: (session(p, threads=1), feed) for k, p in paths.items()}, rounds=rounds)
    rows = []
    for k, p in paths.items():
        coco = mean_ap(detections(p, x_coco, r_coco, EVAL_SCORE), truth)
        pseudo = mean_ap(detections(p, x_val, r_val, EVAL_SCORE), pseudo_truth)
        rows.append([k, round(coco, 3), round(pseudo, 3), round(lat[k], 2), f"{lat['fp32'] / lat[k]:.2f}x",
                     round(file_mb(p), 2), round(build_s[k], 1)])
    print(markdown_table(["model", "COCO-10 mAP@0.5", "pseudo mAP@0.5 vs fp32", "latency ms (b1, 1 thread)",
                          "speed-up", "file MB", "build s"], rows))
    print(f"\n{cpu_line()}; {n_calib} calibration images (imagenet/calib), {len(x_val)} pseudo-label images "
          f"(imagenet/val, fp32 detections with score >= {PSEUDO_SCORE} as truth), 10 COCO images; {rounds} "
          "timing rounds")
    q = details.get("quantize-qdq", {})
    if q.get("excluded_nodes"):
        print(f"onnxopt kept float: {', '.join(q['excluded_nodes'][:8])}"
              + (f" (+{len(q['excluded_nodes']) - 8})" if len(q["excluded_nodes"]) > 8 else ""))
    if q.get("output_tail"):
        print(f"output tail: {q['output_tail']}")


if __name__ == "__main__":
    main()
