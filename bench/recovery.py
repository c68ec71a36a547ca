"""Accuracy recovery without training: each preset with and without its recovery steps, against ORT's best
static int8, on EfficientNet-Lite0, the PP-OCR direction classifier and MiniLM (SST-2).

    python bench/recovery.py                  # Lite0 100 calib / 650 val, PP-OCR 100 / 300, MiniLM 128 / 872
    python bench/recovery.py --quick          # Lite0 50 / 200 val, MiniLM 64 / 200 dev, fewer latency rounds
    python bench/recovery.py --models ocr     # a subset: lite0, ocr, minilm
    python bench/recovery.py --reuse          # measure again the models an earlier run built

One table. Rows per model: fp32; each preset of ``PRESETS`` that exists in this tree (``w4a8`` and others are
picked up by name when present) as shipped, and with its recovery steps taken out of the recipe (the passes
``equalize``, ``reconstruct``, ``precision-fallback``, and any ``reconstruct`` option of another pass turned
off) - that row is left out when the preset has no recovery step; ORT's best static config: quantize_static,
QDQ, per-channel int8 weights, u8 activations, each calibration method (MinMax, Percentile, Entropy) built and
the one scoring best on the evaluation data shown (an optimistic peer: it is picked on the data it is scored on).

Columns: accuracy on the evaluation data and its change vs fp32; top-1 agreement with fp32; latency ratio vs
fp32 (fp32 ms / model ms, batch 1, one thread, every model of a table interleaved in rounds, each with the
session options its optimizer recorded); file size ratio vs fp32; build time. The machine may be shared:
interleaving spreads other load over all rows alike, but ratios move by a few percent between runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    CACHE,
    IMAGENET,
    MAX_LEN,
    SHARED,
    TEXT,
    cpu_line,
    file_mb,
    imagenet_arrays,
    imagenet_val,
    interleaved_latency,
    markdown_table,
    need,
    pad_ids,
    read_tsv,
    session,
    tokenize,
    write_text_npz,
)

PRESETS = ["int8", "int8-accurate", "w4a8", "a16w8", "prune", "mixed"]
RECOVERY_PASSES = {"equalize", "reconstruct", "precision-fallback"}
OCR = SHARED / "ocr"


# --------------------------------------------------------------------------------------------
# Models and their data
# --------------------------------------------------------------------------------------------
class Task:
    """One model: where it is, its calibration file, evaluation, and a batch-1 feed for latency."""

    name: str
    model: Path
    calib: Path
    feed: dict

    def predict(self, path: Path) -> np.ndarray: ...  # class scores on the evaluation data

    labels: np.ndarray
    ort_inputs: list[str]


class Lite0(Task):
    name = "EfficientNet-Lite0"

    def __init__(self, work: Path, quick: bool):
        self.model = need(IMAGENET / "efficientnet_lite0.onnx")
        n_cal, n_val = (50, 200) if quick else (100, None)
        self.calib = work / f"lite0_calib_{n_cal}.npz"
        if not self.calib.exists():
            np.savez(self.calib, input=imagenet_arrays(IMAGENET / "calib", n_cal))
        self.x, self.labels = imagenet_val(n_val)
        self.feed = {"input": self.x[:1]}

    def predict(self, path: Path) -> np.ndarray:
        s = _session(path, threads=2)
        return np.concatenate([s.run(None, {"input": self.x[i:i + 25]})[0] for i in range(0, len(self.x), 25)])

    def calib_batches(self):
        with np.load(self.calib) as z:
            x = z["input"]
        return [{"input": x[i:i + 10]} for i in range(0, len(x), 10)]


class PPOCRCls(Task):
    name = "PP-OCR direction cls"

    def __init__(self, work: Path, quick: bool):
        self.model = need(OCR / "ppocr_mobile_v2_cls.onnx")
        d = np.load(need(OCR / "text_lines.npz"))
        x = ((d["x"].astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(0, 3, 1, 2)
        self.calib = work / "ocr_calib_100.npz"
        if not self.calib.exists():
            np.savez(self.calib, x=x[:100])
        self.x, self.labels = x[100:], d["y"][100:]
        self.feed = {"x": self.x[:1]}

    def predict(self, path: Path) -> np.ndarray:
        s = _session(path, threads=2)
        return np.concatenate([s.run(None, {"x": self.x[i:i + 50]})[0] for i in range(0, len(self.x), 50)])

    def calib_batches(self):
        with np.load(self.calib) as z:
            x = z["x"]
        return [{"x": x[i:i + 10]} for i in range(0, len(x), 10)]


class MiniLM(Task):
    name = "MiniLM-L6 SST-2"

    def __init__(self, work: Path, quick: bool):
        self.model = need(TEXT / "minilm_l6_sst2.onnx")
        n_cal, n_dev = (64, 200) if quick else (128, None)
        self.calib = write_text_npz(TEXT / "sst2_calib.tsv", work / f"sst2_calib_{n_cal}.npz", n=n_cal)
        sentences, labels = read_tsv(TEXT / "sst2_dev.tsv")
        self.ids, self.labels = tokenize(sentences[:n_dev]), labels[:n_dev]
        self.feed = pad_ids(self.ids[:1], MAX_LEN)

    def predict(self, path: Path) -> np.ndarray:
        s = _session(path, threads=2)
        return np.array([s.run(["logits"], pad_ids([x]))[0][0] for x in self.ids])  # unpadded, as served

    def calib_batches(self):
        with np.load(self.calib) as z:
            arrays = {k: z[k] for k in z.files}
        n = len(next(iter(arrays.values())))
        return [{k: v[i:i + 16] for k, v in arrays.items()} for i in range(0, n, 16)]


TASKS = {"lite0": Lite0, "ocr": PPOCRCls, "minilm": MiniLM}
HEADERS = ["model", "row", "accuracy %", "vs fp32", "agreement %", "speed vs fp32", "file ratio", "build s",
           "recovery steps (output SQNR on calibration samples)"]


def recorded(path: Path) -> tuple[dict, str]:
    """The ORT session options an optimizer recorded in the model (latency-placement, transformer-layout)."""
    m = onnx.load(str(path), load_external_data=False)
    for p in m.metadata_props:
        if p.key == "onnxopt.ort_session":
            r = json.loads(p.value)
            return r.get("session_config", {}), r.get("graph_optimization_level", "all")
    return {}, "all"


def _session(path: Path, threads: int = 1):
    config, level = recorded(path)
    return session(path, threads, level, config)


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------
def without_recovery(recipe):
    """The recipe with its recovery steps taken out; None when it has none."""
    passes, changed = [], False
    for p in recipe.passes:
        if p.type in RECOVERY_PASSES:
            changed = True
            continue
        fields = type(p).model_fields
        off = {k: (False if isinstance(getattr(p, k), bool) else "off") for k in ("reconstruct", "reconstruction")
               if k in fields and getattr(p, k) not in (False, "off", None)}
        if off:
            p = p.model_copy(update=off)
            changed = True
        passes.append(p)
    return recipe.model_copy(update={"passes": passes}) if changed else None


def build_onnxopt(task: Task, recipe, out: Path) -> float:
    from onnxopt.data import open_data
    from onnxopt.model_io import load_model, save_model
    from onnxopt.pass_infra import PassContext, PassManager

    start = time.perf_counter()
    model = load_model(task.model)
    ctx = PassContext(calibration=open_data(str(task.calib), model, recipe.data))
    result = PassManager(recipe.build_passes(ctx), check=False).run(model)
    save_model(result.model, out, force=True)
    seconds = time.perf_counter() - start
    steps = [summary(r) for r in result.records if r.name in RECOVERY_PASSES]
    for r in result.records:
        if r.name in RECOVERY_PASSES:
            d = {k: v for k, v in r.details.items() if k not in ("layer_sqnr_db", "layers")}
            print(f"  {out.stem} {r.name} ({r.seconds:.1f} s): {json.dumps(d, default=str)[:600]}", file=sys.stderr)
    return seconds, "; ".join(steps)


def summary(record) -> str:
    """One cell: what a recovery step did and what it measured."""
    d = record.details
    if record.name == "equalize":
        if not d.get("pairs"):
            return "equalize: no pairs"
        before, after = d.get("sqnr_db_before"), d.get("sqnr_db_after")
        measured = f" {before}->{after} dB" if before is not None else ""
        return f"equalize {'kept' if d.get('kept') else 'rejected'}{measured}"
    if record.name == "precision-fallback":
        nodes = d.get("nodes") or []
        return (f"fallback {len(nodes)} node(s) {d.get('sqnr_db_before')}->{d.get('sqnr_db_after')} dB" if nodes
                else "fallback: none")
    if record.name == "reconstruct":
        if "output_sqnr_db" not in d:
            return "reconstruct: " + str(d.get("warning") or d.get("note") or "no layers")
        before, after = d["output_sqnr_db"]
        verdict = "reverted" if d.get("reverted") else f"{d.get('reconstructed', 0)} adaround, {d.get('refit', 0)} refit"
        return f"reconstruct ({verdict}) {before}->{after} dB"
    measured = [str(d[k]) for k in ("sqnr_db_before", "sqnr_db_after") if k in d]
    return record.name + (f" {'->'.join(measured)} dB" if measured else "")


def build_ort(task: Task, method: str, out: Path) -> float:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self, batches):
            self.it = iter(batches)

        def get_next(self):
            return next(self.it, None)

    logging.getLogger().setLevel(logging.ERROR)  # one warning per Constant-node bias on PP-OCR
    start = time.perf_counter()
    out, pre = out.resolve(), out.resolve().with_suffix(".pre.onnx")
    here = os.getcwd()
    # ORT's pre-processing leaves its temporary files (sym_shape_infer_temp.onnx, <uuid>.data) in the cwd
    with tempfile.TemporaryDirectory(prefix="onnxopt-bench-ort-") as tmp:
        os.chdir(tmp)
        try:
            try:
                quant_pre_process(str(task.model), str(pre))
                src = pre
            except Exception as exc:  # noqa: BLE001 - optional; quantize the export as is
                print(f"  ORT pre-process failed ({type(exc).__name__}); quantizing the export as is",
                      file=sys.stderr)
                src = task.model
            extra = {"CalibMaxIntermediateOutputs": 10} if method != "MinMax" else {}
            quantize_static(str(src), str(out), Reader(task.calib_batches()), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=getattr(CalibrationMethod, method), extra_options=extra)
        finally:
            os.chdir(here)
    pre.unlink(missing_ok=True)
    return time.perf_counter() - start


# --------------------------------------------------------------------------------------------
def run_task(task: Task, work: Path, presets: list[str], rounds: int, reuse: bool = False) -> list[list]:
    from onnxopt.recipe import load_preset, preset_names

    models: dict[str, Path] = {"fp32": task.model}
    build: dict[str, float] = {}
    steps: dict[str, str] = {}
    available = set(preset_names())
    for preset in presets:
        if preset not in available:
            print(f"[{task.name}] no preset {preset!r} in this tree: row skipped", file=sys.stderr)
            continue
        try:
            recipe = load_preset(preset)
        except Exception as exc:  # noqa: BLE001 - a preset this tree cannot load is a row saying so
            print(f"[{task.name}] {preset}: {str(exc).splitlines()[0][:300]}", file=sys.stderr)
            models[preset], build[preset] = None, float("nan")  # type: ignore[assignment]
            continue
        for label, r in ((preset, recipe), (f"{preset}, no recovery", without_recovery(recipe))):
            if r is None:
                continue
            print(f"[{task.name}] building {label} ...", file=sys.stderr)
            out = work / f"{label.replace(', ', '_').replace(' ', '-')}.onnx"
            if reuse and out.exists() and (work / f"{out.stem}.json").exists():
                models[label] = out
                build[label], steps[label] = json.loads((work / f"{out.stem}.json").read_text())
                continue
            try:
                build[label], steps[label] = build_onnxopt(task, r, out)
                models[label] = out
                (work / f"{out.stem}.json").write_text(json.dumps([build[label], steps[label]]))
            except Exception as exc:  # noqa: BLE001 - a preset that fails on a model is a row saying so
                print(f"[{task.name}] {label} failed: {str(exc).splitlines()[0][:300]}", file=sys.stderr)
                build[label] = float("nan")
                models[label] = None  # type: ignore[assignment]

    print(f"[{task.name}] evaluating ...", file=sys.stderr)
    scores = {k: task.predict(p) for k, p in models.items() if p is not None}
    ref = scores["fp32"].argmax(1)

    best = None
    for method in ("MinMax", "Percentile", "Entropy"):
        out = work / f"ort_static_{method.lower()}.onnx"
        print(f"[{task.name}] ORT quantize_static per-channel {method} ...", file=sys.stderr)
        try:
            if reuse and out.exists() and out.with_suffix(".json").exists():
                seconds = json.loads(out.with_suffix(".json").read_text())
            else:
                seconds = build_ort(task, method, out)
                out.with_suffix(".json").write_text(json.dumps(seconds))
            acc = float((task.predict(out).argmax(1) == task.labels).mean())
        except Exception as exc:  # noqa: BLE001
            print(f"  ORT {method} failed: {str(exc).splitlines()[0][:200]}", file=sys.stderr)
            continue
        if best is None or acc > best[0]:
            best = (acc, method, out, seconds)
    if best is not None:
        label = f"ORT quantize_static per-channel QDQ ({best[1]})"
        models[label], build[label] = best[2], best[3]
        scores[label] = task.predict(best[2])

    print(f"[{task.name}] latency ...", file=sys.stderr)
    live = {k: p for k, p in models.items() if p is not None}
    lat = interleaved_latency({k: (_session(p, threads=1), task.feed) for k, p in live.items()},
                              rounds=rounds, per_round=3)
    fp32_acc = float((ref == task.labels).mean() * 100)
    fp32_mb = file_mb(task.model)
    rows = []
    for k, p in models.items():
        if p is None:
            rows.append([task.name, k, "failed", None, None, None, None, None, None])
            continue
        pred = scores[k].argmax(1)
        acc = float((pred == task.labels).mean() * 100)
        rows.append([task.name, k, f"{acc:.2f}", f"{acc - fp32_acc:+.2f}", f"{(pred == ref).mean() * 100:.2f}",
                     f"{lat['fp32'] / lat[k]:.2f}x ({lat[k]:.2f} ms)", f"{file_mb(p) / fp32_mb:.3f}",
                     f"{build[k]:.0f}" if k in build else None, steps.get(k) or None])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer samples and latency rounds")
    ap.add_argument("--models", default="lite0,ocr,minilm", help="comma-separated: lite0, ocr, minilm")
    ap.add_argument("--presets", default=",".join(PRESETS), help="comma-separated preset names")
    ap.add_argument("--reuse", action="store_true", help="measure the models an earlier run built (same options)")
    ap.add_argument("--rounds", type=int, default=None, help="latency rounds (default 12, --quick 4)")
    args = ap.parse_args()
    rounds = args.rounds or (4 if args.quick else 12)
    rows = []
    for key in args.models.split(","):
        work = CACHE / "recovery" / ("quick" if args.quick else "full") / key
        work.mkdir(parents=True, exist_ok=True)
        task = TASKS[key](work, args.quick)
        task_rows = run_task(task, work, args.presets.split(","), rounds, args.reuse)
        print(markdown_table(HEADERS, task_rows), file=sys.stderr)  # each model's rows as soon as they exist
        rows += task_rows
    print(cpu_line())
    print()
    print(markdown_table(HEADERS, rows))


if __name__ == "__main__":
    main()
