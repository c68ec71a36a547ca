"""Static INT8 PTQ on EfficientNet-Lite0: onnxopt's int8 presets against onnxruntime.quantization.

    python bench/ptq_imagenet.py            # 100 calibration images, RSS also at 200, all 650 val images
    python bench/ptq_imagenet.py --quick    # smoke run: 20/40 calibration images, 100 val, no ORT entropy
    python bench/ptq_imagenet.py --work DIR # keep models/measurements in DIR; re-run resumes

One run, one table. Every quantization runs in a fresh child process (wall time and peak RSS are
that process's), on the model as exported (onnxopt's presets clean it first; ORT gets it as is):

* onnxopt ``int8`` as shipped (no options); the same with ``scheme: auto`` told the CPU is the
  issue's class (AVX2 without VNNI: u8u8), for a machine that has VNNI; the same with each other
  observer; and ``int8-fast``;
* ``onnxruntime.quantization.quantize_static`` (QDQ): its defaults (per-tensor, MinMax, u8 activations,
  s8 weights), and per-channel + reduce_range (the best setting found for this CPU class);
* ORT's Percentile and Entropy calibrators alone (calibration time and memory only), with the same
  histogram resolution as onnxopt's (2048 bins, 128 quantized bins, percentile 99.99).

Columns: top-1 on val/ and its change vs fp32; top-1 agreement with fp32; quantization wall time
(everything from loading the model to the quantized model, calibration cold); calibration time and
its speed-up over ORT's calibrator of the same kind (min-max / percentile / entropy, timed in this
run; wall time, and CPU seconds of all threads, which other load on the machine disturbs less);
calibration peak RSS at N and 2N calibration images (a child each; onnxopt: the peak up to the
end of the calibrate pass); model file size; latency (batch 1, one thread, all models interleaved in
one process) relative to fp32; MACs (Conv/Gemm/MatMul at batch 1); inference RAM (peak RSS growth of
a child that loads the model into ONNX Runtime and runs it at batch 1); share of Conv/Gemm/MatMul
that ORT runs on integer kernels (read back from its optimized graph).
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
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    CACHE,
    IMAGENET,
    file_mb,
    imagenet_calib_npz,
    imagenet_val,
    interleaved_latency,
    markdown_table,
    need,
    peak_rss_mb,
    run_batched,
    session,
)

MODEL = IMAGENET / "efficientnet_lite0.onnx"
ORT_BATCH = 20  # divides 20/40/100/200: ORT's histogram collectors fail on a ragged last batch
# The CPU class (AVX2 without VNNI), for scheme=auto when this machine is another one.
AVX2_NO_VNNI = ["sse4_2", "avx", "avx2", "fma", "f16c"]
# (label, preset, calibrate observer or None for the preset's own, the ORT calibrator to compare with,
#  quantize-qdq fields to set)
ONNXOPT = [
    ("onnxopt int8 (default: mse)", "int8", None, None, {}),
    ("onnxopt int8 for AVX2 w/o VNNI (auto: u8u8)", "int8", None, None, {"cpu_flags": AVX2_NO_VNNI}),
    ("onnxopt int8, observer minmax", "int8", "minmax", "minmax", {}),
    ("onnxopt int8, observer percentile", "int8", "percentile", "percentile", {}),
    ("onnxopt int8, observer entropy", "int8", "entropy", "entropy", {}),
    ("onnxopt int8-fast (u8s8-rr)", "int8-fast", None, None, {}),
]
ORT = [
    ("ORT quantize_static default", {"per_channel": False, "reduce_range": False}),
    ("ORT per-channel + reduce_range", {"per_channel": True, "reduce_range": True}),
]
ORT_CALIBRATORS = {"minmax": ("MinMax", {}),
                   "percentile": ("Percentile", {"num_bins": 2048, "percentile": 99.99}),
                   "entropy": ("Entropy", {"num_bins": 2048, "num_quantized_bins": 128})}


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)  # all threads of this process
    return r.ru_utime + r.ru_stime


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def _peak_mb() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux's ru_maxrss starts from the parent's
    peak at fork, so a child would report at least the parent's memory (the val images)."""
    return _status_mb("VmHWM") or peak_rss_mb()


# --------------------------------------------------------------------------------------------
# Children: one measurement each, result as one JSON line on stdout
# --------------------------------------------------------------------------------------------
def child_onnxopt(preset: str, observer: str | None, calib: str, out: str, calib_only: bool, qdq: dict) -> dict:
    from onnxopt.data import open_data
    from onnxopt.model_io import load_model, save_model
    from onnxopt.pass_infra import PassContext, PassManager
    from onnxopt.recipe import load_preset, parse_recipe

    start = time.perf_counter()
    rec = load_preset(preset).to_dict()
    for p in rec["passes"]:
        if p["type"] == "calibrate" and observer:
            p["observer"] = observer
        if p["type"] == "quantize-qdq":
            p.update(qdq)
    if calib_only:
        names = [p["type"] for p in rec["passes"]]
        rec["passes"] = rec["passes"][: names.index("calibrate") + 1]
    rec = parse_recipe(rec)
    model = load_model(MODEL)
    marks: dict = {}
    with tempfile.TemporaryDirectory(prefix="onnxopt-bench-ptq-cache-") as cache:
        ctx = PassContext(calibration=open_data(calib, model, rec.data), cache_dir=Path(cache))
        passes = rec.build_passes(ctx)
        for p in passes:
            if p.name == "calibrate":
                inner = p.call

                def timed(m, inner=inner):
                    t, c = time.perf_counter(), _cpu_s()
                    r = inner(m)
                    marks.update(calib_s=time.perf_counter() - t, calib_cpu_s=_cpu_s() - c, calib_rss_mb=_peak_mb())
                    return r

                p.call = timed
        result = PassManager(passes, check=False).run(model)
    out_d = dict(marks)
    if not calib_only:
        save_model(result.model, out)
        out_d["quant_s"] = time.perf_counter() - start
        out_d["scheme"] = [r for r in result.records if r.name == "quantize-qdq"][-1].details.get("scheme")
        out_d["passes"] = [r.name for r in result.records]
    return out_d


def child_ort_quant(calib: str, out: str, options: dict) -> dict:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    start = time.perf_counter()
    quantize_static(str(MODEL), out, _Reader(calib), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, **options)
    return {"quant_s": time.perf_counter() - start, "peak_mb": _peak_mb()}


def child_ort_calib(calib: str, method: str) -> dict:
    from onnxruntime.quantization import CalibrationMethod, create_calibrator

    name, extra = ORT_CALIBRATORS[method]
    with tempfile.TemporaryDirectory(prefix="onnxopt-bench-ort-") as tmp:
        t, c = time.perf_counter(), _cpu_s()
        cal = create_calibrator(str(MODEL), None, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                calibrate_method=getattr(CalibrationMethod, name), extra_options=extra)
        cal.collect_data(_Reader(calib))
        cal.compute_data()
        seconds, cpu = time.perf_counter() - t, _cpu_s() - c
    return {"calib_s": seconds, "calib_cpu_s": cpu, "calib_rss_mb": _peak_mb()}


def child_ram(model: str) -> dict:
    import onnxruntime  # noqa: F401 - the baseline includes the library

    x = np.zeros((1, 3, 224, 224), np.float32)
    base = _status_mb("VmRSS")
    s = session(model, threads=1)
    for _ in range(5):
        s.run(None, {"input": x})
    return {"ram_mb": _peak_mb() - base}


def _Reader(path: str):
    """An ORT CalibrationDataReader over the .npz at ``path``, ``ORT_BATCH`` images at a time."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            with np.load(path) as z:
                self.x = z["input"]
            self.i = 0

        def get_next(self):
            if self.i >= len(self.x):
                return None
            self.i += ORT_BATCH
            return {"input": self.x[self.i - ORT_BATCH:self.i]}

    return Reader()


_DONE: dict[str, dict] = {}  # child results of this run, also in <work>/results.json (for --work resume)
_WORK: list[Path] = []


def _spawn(*args: str) -> dict:
    key = json.dumps(args)
    if key in _DONE:
        return _DONE[key]
    r = _spawn_fresh(*args)
    if _WORK and "error" not in r:
        _DONE[key] = r
        (_WORK[0] / "results.json").write_text(json.dumps(_DONE, indent=1))
    return r


def _spawn_fresh(*args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(args)], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# Measures taken in the parent
# --------------------------------------------------------------------------------------------
def macs(model: onnx.ModelProto) -> int:
    """Multiply-accumulates of Conv/ConvTranspose/Gemm/MatMul at batch 1 (from inferred shapes)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for i in m.graph.input:
        dims = i.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = 1
    m = onnx.shape_inference.infer_shapes(m, data_prop=True)
    shapes = {}
    for vi in list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output):
        d = vi.type.tensor_type.shape.dim
        if d and all(x.HasField("dim_value") for x in d):
            shapes[vi.name] = [x.dim_value for x in d]
    for t in m.graph.initializer:
        shapes[t.name] = list(t.dims)
    # a DequantizeLinear in front of a weight has the weight's shape
    for n in m.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in shapes:
            shapes.setdefault(n.output[0], shapes[n.input[0]])
    total = 0
    for n in m.graph.node:
        out = shapes.get(n.output[0])
        w = shapes.get(n.input[1]) if len(n.input) > 1 else None
        if out is None or w is None:
            continue
        if n.op_type == "Conv":
            total += int(np.prod(out)) * int(np.prod(w[1:]))
        elif n.op_type == "ConvTranspose":
            total += int(np.prod(shapes.get(n.input[0], [0]))) * int(np.prod(w[1:]))
        elif n.op_type in ("Gemm", "MatMul"):
            a = shapes.get(n.input[0])
            if a is not None:
                total += int(np.prod(out)) * a[-1 if not (n.op_type == "Gemm" and _trans_a(n)) else 0]
    return total


def _cleaned(model: onnx.ModelProto) -> onnx.ModelProto:
    """The lossless cleanup preset's model: the export's run-time Pad/Shape arithmetic (kept in the
    fp32 and ORT models) hides the conv shapes from shape inference; the MACs are the same."""
    from onnxopt.pass_infra import PassContext, PassManager
    from onnxopt.recipe import load_preset

    return PassManager(load_preset("cleanup").build_passes(PassContext()), check=False).run(model).model


def _trans_a(n: onnx.NodeProto) -> bool:
    return any(a.name == "transA" and a.i for a in n.attribute)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: N=20 (RSS also at 40), 100 val images, "
                    "no ORT entropy/percentile calibrators")
    ap.add_argument("--n", type=int, default=100, help="calibration images (RSS is also measured at 2N)")
    ap.add_argument("--val", type=int, default=None, help="val images (default: all 650)")
    ap.add_argument("--rounds", type=int, default=20, help="latency rounds (each times every model 5 times)")
    ap.add_argument("--work", type=Path, help="folder for the models and finished measurements; "
                    "re-running with the same folder resumes an interrupted run (default: a new temp folder)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, *rest = json.loads(args.child)
        fn = {"onnxopt": lambda p, o, c, out, co, q: child_onnxopt(p, o or None, c, out, co == "1", json.loads(q)),
              "ort-quant": lambda c, out, opts: child_ort_quant(c, out, json.loads(opts)),
              "ort-calib": child_ort_calib, "ram": child_ram}[kind]
        print(json.dumps(fn(*rest)))
        return

    need(MODEL)
    n = 20 if args.quick else args.n
    val_n = 100 if args.quick and args.val is None else args.val
    rounds = 5 if args.quick else args.rounds
    work = args.work or Path(tempfile.mkdtemp(prefix="onnxopt-bench-ptq-"))
    work.mkdir(parents=True, exist_ok=True)
    _WORK.append(work)
    if (work / "results.json").exists():  # an interrupted run: keep the measurements it finished
        _DONE.update(json.loads((work / "results.json").read_text()))
    calib = {k: str(imagenet_calib_npz(CACHE / f"calib_{k}.npz", k)) for k in (n, 2 * n)}
    x, labels = imagenet_val(val_n)
    load0 = os.getloadavg()[0]
    print(f"EfficientNet-Lite0, calibration N={n} (RSS also at {2 * n}), {len(x)} val images, "
          f"{os.cpu_count()} CPUs, load average {load0:.1f} at start", file=sys.stderr, flush=True)

    def log(label: str, r: dict) -> None:
        print(f"  {label}: {r}", file=sys.stderr, flush=True)

    rows: dict[str, dict] = {"fp32 (as exported)": {"path": str(MODEL)}}
    for k, (label, preset, observer, _, qdq) in enumerate(ONNXOPT):
        out = str(work / f"onnxopt-{k}.onnx")
        r = dict(_spawn("onnxopt", preset, observer or "", calib[n], out, "0", json.dumps(qdq)))
        same = next((rows[lab] for lab, _, o, _, _ in ONNXOPT if (o or "mse") == (observer or "mse") and lab in rows),
                    None)
        if same is not None:  # the same calibration as a row above (mse)
            r["calib_rss_2n_mb"] = same.get("calib_rss_2n_mb")
        else:
            r["calib_rss_2n_mb"] = _spawn("onnxopt", preset, observer or "", calib[2 * n], out + ".unused",
                                          "1", "{}").get("calib_rss_mb")
        r["path"] = out
        rows[label] = r
        log(label, r)
    for label, options in ORT:
        out = str(work / f"ort-{'pc' if options['per_channel'] else 'default'}.onnx")
        rows[label] = r = dict(_spawn("ort-quant", calib[n], out, json.dumps(options)))
        r["path"] = out
        log(label, r)
    # ORT's calibrators alone (the reference for the calibration speed-up); the ~8 GB ones last.
    ort_cal = {}
    for method in ["minmax"] + ([] if args.quick else ["percentile", "entropy"]):
        ort_cal[method] = r = _spawn("ort-calib", calib[n], method)
        log(f"ORT calibrator {method} N={n}", r)
    ort_cal_2n = _spawn("ort-calib", calib[2 * n], "minmax")
    log(f"ORT calibrator minmax N={2 * n}", ort_cal_2n)
    for label, _ in ORT:  # quantize_static calibrates with MinMax
        rows[label].update(calib_s=ort_cal["minmax"].get("calib_s"), calib_rss_mb=ort_cal["minmax"].get("calib_rss_mb"),
                           calib_rss_2n_mb=ort_cal_2n.get("calib_rss_mb"))

    from onnxopt.qdq import kernel_share

    ok = {k: r for k, r in rows.items() if "error" not in r}
    sessions = {k: session(r["path"], threads=1) for k, r in ok.items()}
    logits = {k: run_batched(s, x, batch=25) for k, s in sessions.items()}
    ref = logits["fp32 (as exported)"].argmax(1)
    one = {"input": x[:1]}
    lat = interleaved_latency({k: (s, one) for k, s in sessions.items()}, rounds=rounds, per_round=5)
    fp32_top1 = float((ref == labels).mean() * 100)
    fp32_mb = file_mb(MODEL)

    table = []
    for label, r in rows.items():
        if "error" in r:
            table.append([label, "error: " + r["error"]] + [None] * 13)
            continue
        model = onnx.load(r["path"])
        pred = logits[label].argmax(1)
        top1 = float((pred == labels).mean() * 100)
        # read back from the final model (a pass after quantize-qdq may have kept some ops float)
        share = kernel_share(model).share if label != "fp32 (as exported)" else None
        speedup = None
        ref_kind = next((c for lab, _, _, c, _ in ONNXOPT if lab == label), None)  # same kind of calibrator
        if ref_kind and "error" not in ort_cal.get(ref_kind, {"error": 1}):
            o = ort_cal[ref_kind]
            speedup = f"{o['calib_s'] / r['calib_s']:.1f}x ({o['calib_cpu_s'] / r['calib_cpu_s']:.1f}x cpu)"
        rss = r.get("calib_rss_mb")
        rss2 = r.get("calib_rss_2n_mb")
        table.append([
            label, f"{top1:.2f}", f"{top1 - fp32_top1:+.2f}", f"{float((pred == ref).mean() * 100):.2f}",
            _f(r.get("quant_s"), ".1f"), _f(r.get("calib_s"), ".1f"), speedup,
            _f(rss, ".0f"), f"{rss2:.0f} ({rss2 / rss:.2f}x)" if rss and rss2 else None,
            f"{file_mb(r['path']):.2f} ({file_mb(r['path']) / fp32_mb:.3f}x)",
            f"{lat[label]:.2f}", f"{lat[label] / lat['fp32 (as exported)']:.2f}x",
            f"{(macs(model) or macs(_cleaned(model))) / 1e9:.3f}", _f(_spawn("ram", r["path"]).get("ram_mb"), ".0f"),
            "–" if share is None else f"{share * 100:.0f} %",
        ])
    for method, r in ort_cal.items():
        if method == "minmax":
            continue
        table.append([f"ORT {method} calibrator (calibration only)"] + [None] * 4
                     + [_f(r.get("calib_s"), ".1f"), None, _f(r.get("calib_rss_mb"), ".0f")] + [None] * 7)
    headers = ["method", "top-1 %", "Δ pt", "agree %", "quant s", "calib s", "calib ×ORT",
               f"calib RSS MB N={n}", f"N={2 * n}", "size MB", "ms", "latency ×fp32", "GMACs",
               "infer RAM MB", "int kernels"]
    print(markdown_table(headers, table))
    print(f"\nfp32 top-1 {fp32_top1:.2f} % on {len(x)} val images; calibration N={n}; "
          f"load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end; {os.cpu_count()} CPUs")


def _f(v, spec: str) -> str | None:
    return None if v is None else format(v, spec)


if __name__ == "__main__":
    main()
