"""Mixed-precision weights on EfficientNet-Lite0: a Pareto table of bit assignments.

    python bench/mixed_precision.py [--quick] [--workers 2]

Calibration: the first 100 calib/ images (activation ranges, bias correction, and the `mixed`
preset's label-free KL scores). val/ (650, sorted by file name) is split: the first 250 images
score layers (with labels) and pick the critical classes; the other 400 give every accuracy row.

Rows: fp32; uniform int8 (the int8 preset); uniform int4 weights; and at 5 and 6 average weight bits
(4/8/16 per layer, budget never exceeded): a random assignment (random scores, seed 0), generic
sensitivity with the `mixed` preset's scores (KL to fp32, calibration images, no labels), generic
sensitivity with labels (cross-entropy increase on 100 scoring images), and semantic significance
(cross-entropy increase on the scoring images of the critical classes: the classes of the most
confused pairs of fp32's soft confusion matrix on the scoring split). "crit top-1" is top-1 on
the eval images whose label is a critical class. Every model is a real QDQ model from the
quantize-qdq pass (int4 weights: DequantizeLinear + float op in ORT), run in ORT with one thread.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from common import (
    IMAGENET,
    file_mb,
    imagenet_arrays,
    imagenet_val,
    markdown_table,
    need,
    run_batched,
    session,
)

from onnxopt.data import from_arrays
from onnxopt.mixed import ScoreEntry, SignificanceResult, save_scores, weight_components
from onnxopt.pass_infra import PassContext, PassManager
from onnxopt.progress import Progress
from onnxopt.ranges import save_ranges
from onnxopt.recipe import load_preset
from onnxopt.registry import get_pass_class


def run_passes(model, configs, ctx):
    passes = [get_pass_class(c["type"]).Config.model_validate(c) for c in configs]
    return PassManager([get_pass_class(c.type)(c, ctx) for c in passes]).run(model)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few images, budget 5 only (a smoke run)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=40, help="confused pairs whose classes are critical")
    args = ap.parse_args()
    n_cal, n_score, n_eval, n_generic = (16, 40, 60, 16) if args.quick else (100, 250, 400, 100)
    budgets = (5.0,) if args.quick else (5.0, 6.0)
    progress = Progress(enabled=True, stream=sys.stderr)

    fp32 = onnx.load(str(need(IMAGENET / "efficientnet_lite0.onnx")))
    clean = PassManager(load_preset("cleanup").build_passes()).run(fp32).model
    x_cal = imagenet_arrays(IMAGENET / "calib", n_cal)
    x_val, y_val = imagenet_val()
    x_score, y_score = x_val[:n_score], y_val[:n_score]
    x_eval, y_eval = x_val[n_score:n_score + n_eval], y_val[n_score:n_score + n_eval]
    tmp = Path(tempfile.mkdtemp(prefix="mixed-bench-"))

    cal_ctx = PassContext(calibration=from_arrays({"input": x_cal}, clean), progress=progress, workers=args.workers)
    cal = run_passes(clean, [{"type": "calibrate", "max_samples": n_cal}], cal_ctx).results[-1]
    save_ranges(cal.ranges, tmp / "ranges.json")

    # --- scores ---------------------------------------------------------------------------------
    scores: dict[str, tuple[Path, float]] = {}

    def score(name, ctx, cfg):
        t0 = time.perf_counter()
        res = run_passes(clean, [{"type": "significance", "save_scores": str(tmp / f"{name}.json"), **cfg}],
                         ctx).results[-1]
        scores[name] = (tmp / f"{name}.json", time.perf_counter() - t0)
        progress.message(f"{name}: {res.samples} samples, {time.perf_counter() - t0:.0f} s")
        return res

    score("generic (KL, calib)", cal_ctx, {"metric": "kl", "max_samples": n_generic})
    lab_ctx = PassContext(calibration=from_arrays({"input": x_score}, clean), calibration_labels=y_score,
                          progress=progress, workers=args.workers)
    score("generic (CE, labels)", lab_ctx, {"metric": "cross-entropy", "max_samples": n_generic})
    sem = score("semantic (CE, critical)", lab_ctx, {"semantic": True, "metric": "cross-entropy",
                                                     "critical_pairs": args.pairs, "max_samples": n_score})
    crit = sem.critical_classes
    comps = weight_components(clean)
    rng = np.random.default_rng(0)
    rand = SignificanceResult(onnx.ModelProto(), False, entries=[
        ScoreEntry(c.name, "weight", c.op_type, c.tensor, c.params, float(rng.uniform())) for c in comps])
    save_scores(rand, tmp / "random.json")
    scores["random"] = (tmp / "random.json", 0.0)
    params = sum(c.params for c in comps)

    # --- models ---------------------------------------------------------------------------------
    q_ctx = PassContext(calibration=from_arrays({"input": x_cal}, clean), progress=progress)
    qdq = {"type": "quantize-qdq", "ranges_file": str(tmp / "ranges.json"), "check_kernels": False}
    candidates: list[tuple[str, float | None, onnx.ModelProto, float, float]] = []  # name, budget, model, avg, s
    candidates.append(("uniform int8", None, run_passes(clean, [qdq], q_ctx).model, 8.0, 0.0))
    candidates.append(("uniform int4 weights", None,
                       run_passes(clean, [{**qdq, "weight_type": "int4"}], q_ctx).model, 4.0, 0.0))
    for budget in budgets:
        for name, (path, secs) in scores.items():
            out = run_passes(clean, [{"type": "bit-assignment", "scores_file": str(path), "average_bits": budget},
                                     qdq], q_ctx)
            candidates.append((name, budget, out.model, out.results[0].average_bits, secs))

    # --- evaluation -----------------------------------------------------------------------------
    ref = run_batched(session(clean), x_eval).argmax(1)
    crit_mask = np.isin(y_eval, crit)
    rows = []

    def row(name, budget, avg, pred, model, secs):
        top1 = 100 * float((pred == y_eval).mean())
        crit_top1 = 100 * float((pred[crit_mask] == y_eval[crit_mask]).mean()) if crit_mask.any() else None
        rows.append([name, "–" if budget is None else f"{budget:g}", f"{avg:.3f}",
                     f"{avg * params / 8 / 1e6:.2f}", f"{file_mb(model):.2f}", f"{top1:.2f}",
                     f"{top1 - fp32_top1:+.2f}", None if crit_top1 is None else f"{crit_top1:.1f}",
                     f"{100 * float((pred == ref).mean()):.2f}", f"{secs:.0f}" if secs else "–"])

    fp32_top1 = 100 * float((ref == y_eval).mean())
    row("fp32", None, 32.0, ref, clean, 0.0)
    for name, budget, model, avg, secs in candidates:
        progress.message(f"evaluating {name} {budget or ''}")
        row(name, budget, avg, run_batched(session(model), x_eval).argmax(1), model, secs)

    print(f"EfficientNet-Lite0, {len(comps)} weighted layers ({params:,} weight parameters); calibration "
          f"{n_cal} calib/ images; scoring on val[:{n_score}], accuracy on val[{n_score}:{n_score + n_eval}] "
          f"({len(y_eval)} images, {int(crit_mask.sum())} of them in the {len(crit)} critical classes from "
          f"{args.pairs} confused pairs); {args.workers} scoring workers, ORT 1 thread each.\n")
    print(markdown_table(["method", "budget (avg bits)", "avg weight bits", "weight MB", "file MB", "top-1 %",
                          "Δ vs fp32 (pt)", "crit top-1 %", "agree w/ fp32 %", "scoring s"], rows))


if __name__ == "__main__":
    main()
