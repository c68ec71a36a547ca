"""Calibration speed and memory: onnxopt's ``calibrate`` pass against onnxruntime.quantization.

    python bench/calibration.py                       # EfficientNet-Lite0, N = 100 and 200
    python bench/calibration.py --clean               # run the cleanup preset first (both sides)
    python bench/calibration.py --ort-entropy-default # also ORT's entropy at its own default (128 bins)
    python bench/calibration.py --accuracy            # + top-1 of cleanup -> calibrate -> quantize-qdq

Every measurement runs in a fresh subprocess, so "peak MB" is that process's peak RSS (Python,
the libraries, the model and the data included). Times cover the calibration only (onnxopt:
the pass call, a cold cache included; ORT: create_calibrator + collect_data + compute_data).

ORT's calibrators are given the same data, batch size (16) and, for Percentile/Entropy, the same
histogram resolution as onnxopt (2048 bins, 128 quantized bins, percentile 99.99).

Calibration images are preprocessed once into .npz files under --work (default
/tmp/onnxopt-bench-calibration), never inside the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MODELS = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "imagenet"
DEFAULT_MODEL = MODELS / "efficientnet_lite0.onnx"
CALIB_DIR = MODELS / "calib"
VAL_DIR = MODELS / "val"
OBSERVERS = ["minmax", "percentile", "entropy", "mse"]
ORT_METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}
BATCH = 20  # divides 100 and 200: ORT's Percentile/Entropy collectors fail on a ragged last batch


def _image_spec():
    from onnxopt.recipe import ImageSpec

    return ImageSpec(resize_short=256, center_crop=224, mean=(127, 127, 127), std=(128, 128, 128))


def build_npz(work: Path, n: int) -> Path:
    """The first ``n`` calibration images, preprocessed (RGB, short side 256, crop 224, (p-127)/128, NCHW)."""
    out = work / f"calib{n}.npz"
    if out.exists():
        return out
    from onnxopt.data import preprocess_image

    files = sorted(f for f in CALIB_DIR.iterdir() if f.suffix.lower() in (".jpeg", ".jpg", ".png"))[:n]
    if len(files) < n:
        sys.exit(f"{CALIB_DIR} has {len(files)} images, {n} needed")
    x = np.stack([preprocess_image(f, _image_spec()) for f in files])
    np.savez(out, input=x)
    return out


def clean_model(src: Path, work: Path) -> Path:
    out = work / (src.stem + ".clean.onnx")
    if not out.exists():
        from onnxopt.optimize import optimize

        optimize(src, out, recipe="cleanup", force=True)
    return out


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)  # all threads of this process
    return r.ru_utime + r.ru_stime


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# --------------------------------------------------------------------------------------------
# Children (one measurement each)
# --------------------------------------------------------------------------------------------
def child_onnxopt(model_path: str, data: str, observer: str) -> dict:
    from onnxopt.passes.calibrate import Calibrate, CalibrateConfig

    from onnxopt.data import open_data
    from onnxopt.model_io import load_model
    from onnxopt.pass_infra import PassContext

    model = load_model(model_path)
    source = open_data(data, model)
    with tempfile.TemporaryDirectory(prefix="onnxopt-bench-cache-") as cache:
        ctx = PassContext(calibration=source, cache_dir=Path(cache))
        calib = Calibrate(CalibrateConfig(observer=observer, batch_size=BATCH), ctx)
        t, c = time.perf_counter(), _cpu_s()
        result = calib(model)
        seconds, cpu = time.perf_counter() - t, _cpu_s() - c
        peak = _peak_mb()
        t = time.perf_counter()
        again = Calibrate(CalibrateConfig(observer=observer, batch_size=BATCH), ctx)(model)
        hit_seconds = time.perf_counter() - t
    assert again.details["cache_hit"]
    return {"seconds": seconds, "cpu_s": cpu, "peak_mb": peak, "tensors": result.details["tensors"],
            "samples": result.details["samples"], "clipped": result.details["clipped"], "hit_seconds": hit_seconds}


def child_ort(model_path: str, data: str, method: str, extra: dict) -> dict:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, create_calibrator

    class Reader(CalibrationDataReader):
        def __init__(self, path: str):
            with np.load(path) as z:
                self.x = z["input"]
            self.i = 0

        def get_next(self):
            if self.i >= len(self.x):
                return None
            batch = {"input": self.x[self.i:self.i + BATCH]}
            self.i += BATCH
            return batch

    reader = Reader(data)
    with tempfile.TemporaryDirectory(prefix="onnxopt-bench-ort-") as tmp:
        t, c = time.perf_counter(), _cpu_s()
        cal = create_calibrator(model_path, None, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                calibrate_method=getattr(CalibrationMethod, method), extra_options=extra)
        cal.collect_data(reader)
        ranges = cal.compute_data()
        seconds, cpu = time.perf_counter() - t, _cpu_s() - c
    return {"seconds": seconds, "cpu_s": cpu, "peak_mb": _peak_mb(), "tensors": len(ranges.data)}


def child_accuracy(model_path: str, data: str, observer: str, val_n: int) -> dict:
    """Top-1 on the labelled val images of cleanup -> calibrate(observer) -> quantize-qdq (onnxopt defaults)."""
    import csv

    from onnxopt.passes.calibrate import Calibrate, CalibrateConfig

    from onnxopt.data import open_data, preprocess_image
    from onnxopt.model_io import load_model
    from onnxopt.pass_infra import PassContext, PassManager
    from onnxopt.registry import get_pass_class
    from onnxopt.runtime import make_session

    model = load_model(model_path)
    ctx = PassContext(calibration=open_data(data, model), cache_dir=Path(tempfile.gettempdir()) / "onnxopt-bench-cache")
    qdq_cls = get_pass_class("quantize-qdq")
    pipeline = PassManager([Calibrate(CalibrateConfig(observer=observer), ctx), qdq_cls(None, ctx)], check=False)
    quant = pipeline.run(model).model
    with open(MODELS / "val_labels.csv", newline="") as fh:
        rows = [r for r in csv.reader(fh) if r and r[1].strip().isdigit()][:val_n]  # file,class_index
    x = np.stack([preprocess_image(VAL_DIR / f, _image_spec()) for f, _ in rows])
    labels = np.array([int(c) for _, c in rows])
    logits = {}
    for name, m in (("fp32", model), ("int8", quant)):
        s = make_session(m)
        logits[name] = np.concatenate([s.run(None, {"input": x[i:i + 32]})[0] for i in range(0, len(x), 32)])
    ref, got = logits["fp32"].astype(np.float64), logits["int8"].astype(np.float64)
    sqnr = 10 * np.log10((ref ** 2).sum() / ((ref - got) ** 2).sum())
    top1 = {k: v.argmax(1) for k, v in logits.items()}
    return {"top1_fp32": float((top1["fp32"] == labels).mean() * 100),
            "top1_int8": float((top1["int8"] == labels).mean() * 100),
            "agreement": float((top1["fp32"] == top1["int8"]).mean() * 100),
            "logits_sqnr_db": float(sqnr), "n": len(rows)}


def _spawn(*args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "onnxopt-bench-calibration")
    ap.add_argument("--n", type=int, nargs="+", default=[100, 200], help="sample counts for onnxopt")
    ap.add_argument("--ort-n", type=int, default=100, help="sample count for ORT's calibrators (0: skip)")
    ap.add_argument("--observers", nargs="+", default=OBSERVERS, choices=OBSERVERS)
    ap.add_argument("--clean", action="store_true", help="run the cleanup preset on the model first")
    ap.add_argument("--ort-entropy-default", action="store_true", help="also ORT's Entropy with its default 128 bins")
    ap.add_argument("--accuracy", type=int, nargs="?", const=650, default=0, metavar="VAL_N",
                    help="also top-1 after quantize-qdq on the first VAL_N val images (default 650)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        kind, *rest = args.child
        if kind == "onnxopt":
            out = child_onnxopt(*rest)
        elif kind == "ort":
            out = child_ort(rest[0], rest[1], rest[2], json.loads(rest[3]))
        else:
            out = child_accuracy(rest[0], rest[1], rest[2], int(rest[3]))
        print(json.dumps(out))
        return

    if not args.model.exists():
        sys.exit(f"{args.model}: not found (see ../shared/models/README.md)")
    args.work.mkdir(parents=True, exist_ok=True)
    model = clean_model(args.model, args.work) if args.clean else args.model
    data = {n: build_npz(args.work, n) for n in sorted(set(args.n) | ({args.ort_n} if args.ort_n else set()))}
    print(f"model: {model.name} ({'cleanup preset applied' if args.clean else 'as exported, not cleaned'}); "
          f"batch {BATCH}; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f} at start", flush=True)

    rows = []
    ours: dict[tuple[str, int], dict] = {}
    for obs in args.observers:
        for n in args.n:
            ours[obs, n] = r = _spawn("onnxopt", str(model), str(data[n]), obs)
            print(f"  onnxopt {obs:<10} N={n}: {r}", file=sys.stderr, flush=True)
    theirs: dict[str, dict] = {}
    ort_jobs = []
    if args.ort_n:
        for obs in args.observers:
            if obs in ORT_METHODS:
                extra = {} if obs == "minmax" else {"num_bins": 2048}
                if obs == "percentile":
                    extra["percentile"] = 99.99
                if obs == "entropy":
                    extra["num_quantized_bins"] = 128
                ort_jobs.append((obs, obs, extra))
        if args.ort_entropy_default:
            ort_jobs.append(("entropy (ORT default: 128 bins)", "entropy", {}))
    for label, obs, extra in ort_jobs:
        theirs[label] = r = _spawn("ort", str(model), str(data[args.ort_n]), ORT_METHODS[obs], json.dumps(extra))
        print(f"  ORT     {label:<10} N={args.ort_n}: {r}", file=sys.stderr, flush=True)

    def fmt(r: dict | None, key: str, spec: str) -> str:
        if not r:
            return "-"
        return "error" if "error" in r else format(r[key], spec)

    for obs in args.observers:
        for n in args.n:
            mine = ours[obs, n]
            other = theirs.get(obs) if n == args.ort_n else None
            speed = "-"
            if other and "error" not in other and "error" not in mine:
                speed = f"{other['seconds'] / mine['seconds']:.1f}x"
            rows.append([obs, str(n), fmt(mine, "seconds", ".1f"), fmt(mine, "peak_mb", ".0f"),
                         fmt(other, "seconds", ".1f"), fmt(other, "peak_mb", ".0f"), speed])
    for label, _, _ in ort_jobs:
        if label not in args.observers:
            r = theirs[label]
            rows.append([label, str(args.ort_n), "-", "-", fmt(r, "seconds", ".1f"), fmt(r, "peak_mb", ".0f"), "-"])
    head = ["observer", "N", "onnxopt s", "onnxopt peak MB", "ORT s", "ORT peak MB", "speedup"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")

    print("CPU seconds (user+sys, all threads; less sensitive to other load on the machine than wall time):")
    for obs in args.observers:
        mine, other = ours.get((obs, args.ort_n)), theirs.get(obs)
        if mine and other and "error" not in mine and "error" not in other:
            print(f"  {obs:<10} N={args.ort_n}: onnxopt {mine['cpu_s']:.1f} s, ORT {other['cpu_s']:.1f} s "
                  f"({other['cpu_s'] / mine['cpu_s']:.1f}x)")
    ns = sorted(args.n)
    if len(ns) >= 2:
        for obs in args.observers:
            a, b = ours[obs, ns[0]], ours[obs, ns[-1]]
            if "error" not in a and "error" not in b:
                print(f"RSS(N={ns[-1]}) / RSS(N={ns[0]}) {obs}: {b['peak_mb'] / a['peak_mb']:.3f}; "
                      f"cache hit re-run {b['hit_seconds']:.2f} s")
    if args.accuracy:
        calib = data[max(args.n)]
        for obs in args.observers:
            r = _spawn("accuracy", str(model), str(calib), obs, str(args.accuracy))
            print(f"accuracy {obs}: {r}", flush=True)
    print(f"load average {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
