"""Structured channel pruning (``prune-channels``) on EfficientNet-Lite0: accuracy, size and speed.

    python bench/compression_structured.py            # 0/10/25/50 %, 650 val images, 100 calib images
    python bench/compression_structured.py --quick    # 200 val images, 32 calib images, fewer rounds

Every ratio is run two ways (and 25 % also without the statistics correction, without the refit, and with
the residual-tied channels left alone, ``tied: skip``): *magnitude* (l2 norms of the weights, no data) and
*data-aware*, the preset's setting (channels ranked by their contribution to the next layers' outputs on the
calibration images, the removed channels' mean moved into the next layer's bias, the next layers refitted by
least squares, then every conv's kept output channels rescaled to the original mean and variance on the
calibration images). No fine-tuning.
Latency: batch 1, one thread, ORT_ENABLE_ALL, median over interleaved rounds (every round times every
variant in turn), as a ratio to the fp32 model (the original file) measured in the same run; > 1 is faster.
``lite0_structured_rows`` is also called by ``bench/compression.py`` (part A's table).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import (  # noqa: E402
    IMAGENET,
    file_mb,
    imagenet_calib_npz,
    imagenet_val,
    interleaved_latency,
    markdown_table,
    need,
    run_batched,
    session,
)

from onnxopt.data import from_arrays  # noqa: E402
from onnxopt.pass_infra import PassContext, PassManager  # noqa: E402
from onnxopt.recipe import parse_recipe  # noqa: E402

CLEANUP = ["remove-identity", "constant-folding", "fold-pad-into-conv", "fold-batchnorm", "dead-code-elimination"]
TAIL = ["topological-sort", "shape-inference"]
METHODS = {
    "magnitude": {"criterion": "l2"},
    # the prune-channels preset's setting with --calib
    "data-aware": {"criterion": "output", "refit": True, "statistics_correction": True},
    "data-aware, no statistics correction": {"criterion": "output", "refit": True},
    "data-aware, no refit": {"criterion": "output", "refit": False, "statistics_correction": True},
    "data-aware, residuals kept": {"criterion": "output", "refit": True, "tied": "skip",
                                   "statistics_correction": True},
}
# (ratio, method) pairs measured besides the 0 % row
GRID = ([(r, m) for r in (0.10, 0.25, 0.50) for m in ("magnitude", "data-aware")]
        + [(0.25, "data-aware, no statistics correction"), (0.25, "data-aware, no refit"),
           (0.25, "data-aware, residuals kept")])


def prune(model: onnx.ModelProto, ratio: float, method: str, calib_x: np.ndarray | None):
    """The pruned model (cleanup, prune-channels, tail) and the prune pass's result."""
    data = method.startswith("data-aware")
    ctx = PassContext(calibration=from_arrays({"input": calib_x}, model) if data else None)
    step = {"type": "prune-channels", "ratio": ratio, **METHODS[method]}
    out = PassManager(parse_recipe({"passes": CLEANUP + [step] + TAIL}).build_passes(ctx)).run(model)
    return out.model, out.results[len(CLEANUP)]


def lite0_structured_rows(*, work: Path | None = None, quick: bool = False, val_x=None, val_y=None,
                          fp32_pred=None, calib_npz: Path | None = None, grid=None,
                          rounds: int | None = None) -> str:
    """The structured-pruning table (markdown, with a title line) for EfficientNet-Lite0."""
    src = need(IMAGENET / "efficientnet_lite0.onnx")
    work = Path(work or tempfile.mkdtemp(prefix="onnxopt-bench-structured-"))
    if val_x is None:
        val_x, val_y = imagenet_val(200 if quick else None)
    n_calib = 32 if quick else 100
    calib_npz = calib_npz or imagenet_calib_npz(work / f"lite0_calib_{n_calib}.npz", n=n_calib)
    calib_x = np.load(calib_npz)["input"]
    model = onnx.load(str(src))
    fp32 = session(model)
    ref_logits = run_batched(fp32, val_x)
    ref_pred = ref_logits.argmax(1) if fp32_pred is None else fp32_pred
    variants = {"fp32": (model, None, 0.0)}
    for r, m in [(0.0, "magnitude")] + list(grid or GRID):
        t0 = time.perf_counter()
        pruned, result = prune(model, r, m, calib_x)
        name = "cleanup (0 %)" if r == 0 else f"{m}, {100 * r:.0f} %"
        variants[name] = (pruned, result, time.perf_counter() - t0)
        print(f"[structured] {name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    sessions = {k: session(v[0]) for k, v in variants.items()}
    feed = {"input": val_x[:1]}
    lat = interleaved_latency({k: (s, feed) for k, s in sessions.items()},
                              rounds=rounds or (8 if quick else 20), per_round=3 if quick else 5)
    rows = []
    for name, (m, result, secs) in variants.items():
        pred = ref_pred if name == "fp32" else run_batched(sessions[name], val_x).argmax(1)
        refits = [v for v in (result.refits.values() if result else []) if "refit_output_error" in v]
        err = (f"{np.median([v['sliced_output_error'] for v in refits]):.3f} → "
               f"{np.median([v['refit_output_error'] for v in refits]):.3f}") if refits else "–"
        rows.append([name, f"{100 * np.mean(pred == val_y):.2f}", f"{100 * np.mean(pred == ref_pred):.2f}",
                     f"{sum(int(np.prod(t.dims)) for t in m.graph.initializer) / 1e6:.2f} M", f"{file_mb(m):.2f}", f"{lat[name]:.1f}",
                     f"{lat['fp32'] / lat[name]:.2f}×", err, "–" if result is None else f"{secs:.0f}"])
    headers = ["variant", "top-1 %", "agree with fp32 %", "params", "file MB", "ms (b1, 1 thr)",
               "speed vs fp32", "median refit error (sliced → refit)", "prune s"]
    title = (f"### EfficientNet-Lite0: structured channel pruning ({len(val_y)} val images, {len(calib_x)} "
             f"calib images, no fine-tuning)")
    return title + "\n\n" + markdown_table(headers, rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="onnxopt-bench-structured-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        print(lite0_structured_rows(work=work, quick=args.quick))


if __name__ == "__main__":
    main()
