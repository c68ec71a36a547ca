"""Hand-off targets: EfficientNet-Lite0 and MiniLM-L6 laid out for each target, measured in its runtime.

    python bench/targets.py            # Lite0 100 calib / 650 val, MiniLM 128 calib / 872 dev
    python bench/targets.py --quick    # fewer samples and latency rounds
    python bench/targets.py --only lite0

Every target's model is built by ``onnxopt.optimize(recipe=..., target=...)`` (Lite0: ``int8``; MiniLM:
``int8-transformer``, static QDQ with attention masks float, for every target but ort-cpu, whose
transformer path is ``int8-dynamic``). Columns: top-1 accuracy and
agreement with fp32 in ONNX Runtime, the same in OpenVINO (against OpenVINO-f32: f32 inference precision)
for the targets OpenVINO runs, the structural check against the target's rules, and batch-1 one-thread
latency in the target's runtime (OpenVINO for openvino-cpu/onnx-standard, ONNX Runtime otherwise; TensorRT
and QNN are not on this machine, so ORT CPU stands in and the 16-bit qnn-htp model runs as float kernels).
Peers, same run: NNCF's default ``nncf.quantize`` model (OpenVINO's own quantizer) in OpenVINO and
ORT's ``quantize_static`` (per-channel QDQ, u8/s8, MinMax) in ONNX Runtime. All latencies of one model
family are timed interleaved in one process.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, cpu_line, interleaved_latency, markdown_table  # noqa: E402
from recovery import Lite0, MiniLM, build_ort  # noqa: E402

TARGETS = ["ort-cpu", "openvino-cpu", "tensorrt", "qnn-htp", "onnx-standard"]
OV_TARGETS = ("openvino-cpu", "onnx-standard")


def preset(task, target: str) -> str:
    if isinstance(task, MiniLM):
        return "int8-dynamic" if target == "ort-cpu" else "int8-transformer"
    return "int8"


def build_target(task, target: str, out: Path) -> tuple[float, list[str]]:
    from onnxopt.optimize import optimize

    start = time.perf_counter()
    res = optimize(task.model, out, recipe=preset(task, target), target=target, calib=task.calib, force=True)
    return time.perf_counter() - start, res.target_violations


def build_nncf(task, out: Path) -> float:
    import nncf
    import onnx

    start = time.perf_counter()
    model = onnx.load(str(task.model))
    batches = task.calib_batches()
    single = [{k: v[i:i + 1] for k, v in b.items()} for b in batches for i in range(len(next(iter(b.values()))))]
    q = nncf.quantize(model, nncf.Dataset(single), subset_size=len(single),
                      model_type=nncf.ModelType.TRANSFORMER if isinstance(task, MiniLM) else None)
    onnx.save(q, str(out))
    return time.perf_counter() - start


def predict_ov(task, path: Path) -> np.ndarray:
    from common import pad_ids

    from onnxopt.target_runtime import OpenVINOSession

    s = OpenVINOSession(path, threads=2)
    if isinstance(task, MiniLM):
        return np.array([s.run(["logits"], pad_ids([x]))[0][0] for x in task.ids])
    x = task.x
    return np.concatenate([s.run(None, {"input": x[i:i + 25]})[0] for i in range(0, len(x), 25)])


def top1(scores: np.ndarray) -> np.ndarray:
    return scores.argmax(-1)


def run(task, work: Path, rounds: int) -> list[list]:
    from common import session

    from onnxopt.target_runtime import OpenVINOSession
    from onnxopt.targets import load_target

    models: dict[str, tuple[Path, str, str]] = {"fp32": (task.model, "both", "")}  # label -> path, runtime, note
    for t in TARGETS:
        out = work / f"{task.key}_{t}.onnx"
        secs, bad = build_target(task, t, out)
        runtime = "openvino" if t in OV_TARGETS else "onnxruntime"
        models[t] = (out, "both" if t in OV_TARGETS or t == "ort-cpu" else runtime,
                     f"{len(bad)} violation(s)" if bad else "ok")
        print(f"  built {t} in {secs:.0f} s ({models[t][2]})", file=sys.stderr)
    try:
        p = work / f"{task.key}_nncf.onnx"
        build_nncf(task, p)
        models["NNCF default (peer)"] = (p, "both", "")
    except Exception as exc:  # noqa: BLE001 - the peer is optional
        print(f"  NNCF failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    p = work / f"{task.key}_ort_static.onnx"
    build_ort(task, "MinMax", p)
    models["ORT quantize_static (peer)"] = (p, "both", "")

    ref_ort = top1(task.predict(task.model))
    ref_ov = top1(predict_ov(task, task.model))
    rows, ort_s, ov_s = [], {}, {}
    for label, (path, runtime, note) in models.items():
        pr = top1(task.predict(path))
        acc, agree = 100 * (pr == task.labels).mean(), 100 * (pr == ref_ort).mean()
        ov_acc = ov_agree = None
        if runtime in ("both", "openvino"):
            try:
                po = top1(predict_ov(task, path))
                ov_acc, ov_agree = 100 * (po == task.labels).mean(), 100 * (po == ref_ov).mean()
                ov_s[label] = (OpenVINOSession(path, threads=1), task.feed)
            except Exception as exc:  # noqa: BLE001 - e.g. ORT contrib ops OpenVINO does not read
                print(f"  {label} does not run in OpenVINO: {str(exc)[:200]}", file=sys.stderr)
        if runtime in ("both", "onnxruntime"):
            ort_s[label] = (session(path, threads=1), task.feed)
        where = "" if label not in TARGETS else load_target(label).runtime
        rows.append([f"{label} ({preset(task, label)})" if label in TARGETS else label, acc, agree, ov_acc,
                     ov_agree, note or "–", where])
    ort_ms = interleaved_latency(ort_s, rounds=rounds)
    ov_ms = interleaved_latency(ov_s, rounds=rounds)
    for r, label in zip(rows, models, strict=True):
        r += [ort_ms.get(label), ov_ms.get(label)]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=["lite0", "minilm"])
    args = ap.parse_args()
    work = CACHE / "targets"
    work.mkdir(parents=True, exist_ok=True)
    print(cpu_line())
    print("Batch 1, one thread, median of interleaved rounds; the machine is shared (timings noisy).\n")
    tasks = [("lite0", Lite0), ("minilm", MiniLM)]
    for key, cls in tasks:
        if args.only and key != args.only:
            continue
        task = cls(work, args.quick)
        task.key = key
        print(f"### {task.name}\n")
        rows = run(task, work, rounds=8 if args.quick else 20)
        print(markdown_table(["model", "top-1 % (ORT)", "agree fp32 % (ORT)", "top-1 % (OV)",
                              "agree OV-f32 % (OV)", "target rules", "target runtime", "ORT ms", "OV ms"], rows))
        print()


if __name__ == "__main__":
    main()
