"""Speed of the quantized EfficientNet-Lite0 against fp32 on this CPU: latency-aware placement vs. the rest.

    python bench/speed.py            # 100 calibration images, 650 val images, 30 rounds per setting
    python bench/speed.py --quick    # 20 calibration images, 100 val images, 8 rounds

Models (all from ../shared/models/imagenet/efficientnet_lite0.onnx):

* fp32                 the original model (ORT_ENABLE_ALL; the reference of every ratio)
* ORT int8 pc+rr       onnxruntime.quantization.quantize_static, QDQ, u8s8, per-channel + reduce_range
* ORT int8 default     quantize_static, QDQ, u8s8 per-tensor (its defaults otherwise)
* onnxopt int8         the ``int8`` preset with ``latency-placement`` turned off
* onnxopt int8 placed  the ``int8`` preset (latency-aware placement, measured on this machine), run
                       with the session options it records in the model's metadata
* ... [avx2 scheme]    on a CPU with VNNI: the same two, quantized with the scheme auto picks for AVX2
                       without VNNI (u8 x u8, the CI's CPU class); the placement still times this CPU

Latency: batch 1 and 8, one and two intra-op threads; for each setting all models are timed in one
process, interleaved (``common.interleaved_latency``); "x fp32" is fp32's time / the model's time
(above 1 = faster). "kernel ms" is the sum of ORT's per-kernel median times at batch 1, one thread
(its profiler; best of two profiles): what the model costs when no other process takes the core. Accuracy: top-1 on the val images and agreement of the top-1 with fp32.
Built models are kept under --work (default /tmp/onnxopt-bench-speed) and rebuilt with --rebuild.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    IMAGENET,
    cpu_line,
    file_mb,
    imagenet_arrays,
    imagenet_calib_npz,
    imagenet_val,
    interleaved_latency,
    markdown_table,
    need,
)
from common import session as common_session  # noqa: E402

from onnxopt.isa import detect_cpu  # noqa: E402

MODEL = IMAGENET / "efficientnet_lite0.onnx"
# On a CPU with VNNI, also quantize as for the CI's CPU class (AVX2, no VNNI: quantize-qdq's auto
# scheme is then u8 x u8) and let the placement work on that model with this machine's kernels.
AVX2_ONLY = ["avx2", "fma", "sse4_1", "sse4_2", "ssse3"]


def ort_quantized(work: Path, n_calib: int, per_channel: bool, reduce_range: bool) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    out = work / f"ort_{'pc_rr' if per_channel else 'default'}_{n_calib}.onnx"
    if out.exists():
        return out
    x = imagenet_arrays(IMAGENET / "calib", n_calib)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(x[i:i + 1] for i in range(len(x)))

        def get_next(self):
            v = next(self.it, None)
            return None if v is None else {"input": v}

    quantize_static(str(MODEL), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    reduce_range=reduce_range, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def onnxopt_int8(work: Path, calib: Path, placement: bool, cpu_flags: list[str] | None = None) -> tuple[Path, dict]:
    from onnxopt.optimize import optimize
    from onnxopt.recipe import load_preset, parse_recipe

    tag = "_avx2" if cpu_flags else ""
    out = work / f"onnxopt_int8{tag}_{'placed' if placement else 'plain'}.onnx"
    info = out.with_suffix(".json")
    if out.exists() and info.exists():
        return out, json.loads(info.read_text())
    d = load_preset("int8").to_dict()
    for p in d["passes"]:
        if p["type"] == "latency-placement":
            p["enabled"] = placement
            p["cache"] = False  # measure in this run
        if p["type"] == "quantize-qdq" and cpu_flags:
            p["cpu_flags"] = cpu_flags
    res = optimize(MODEL, out, recipe=parse_recipe(d), calib=calib, force=True)
    rec = next((r for r in res.pipeline.records if r.name == "latency-placement"), None)
    details = rec.details if rec is not None else {}
    info.write_text(json.dumps(details, default=str))
    return out, details


def session(path: Path, threads: int, config: dict | None = None, level: str = "all") -> ort.InferenceSession:
    return common_session(path, threads, level, config)


def recorded_session(path: Path) -> dict:
    m = onnx.load(str(path), load_external_data=False)
    for p in m.metadata_props:
        if p.key == "onnxopt.ort_session":
            return json.loads(p.value)
    return {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--work", type=Path, default=Path("/tmp/onnxopt-bench-speed"))
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--models", default="lite0,minilm", help="comma-separated: lite0, minilm")
    args = ap.parse_args()
    print(cpu_line())
    if "minilm" in args.models:
        minilm(args.work / ("quick" if args.quick else "full") / "minilm", args.quick)
    if "lite0" not in args.models:
        return
    need(MODEL)
    n_calib, n_val, rounds = (20, 100, 8) if args.quick else (100, 650, 30)
    work = args.work / ("quick" if args.quick else "full")
    if args.rebuild and work.exists():
        for f in work.iterdir():
            if f.is_file():
                f.unlink()
    work.mkdir(parents=True, exist_ok=True)
    calib = imagenet_calib_npz(work / f"calib{n_calib}.npz", n_calib)

    t0 = time.perf_counter()
    paths = {"fp32": MODEL,
             "ORT int8 pc+rr": ort_quantized(work, n_calib, True, True),
             "ORT int8 default": ort_quantized(work, n_calib, False, False)}
    paths["onnxopt int8"], _ = onnxopt_int8(work, calib, placement=False)
    paths["onnxopt int8 placed"], placed = onnxopt_int8(work, calib, placement=True)
    if detect_cpu().vnni:
        # the scheme quantize-qdq picks for AVX2 without VNNI (u8 x u8), placed on this machine
        paths["onnxopt int8 [avx2 scheme]"], _ = onnxopt_int8(work, calib, False, AVX2_ONLY)
        paths["onnxopt placed [avx2 scheme]"], placed_avx2 = onnxopt_int8(work, calib, True, AVX2_ONLY)
    else:
        placed_avx2 = {}
    build_s = time.perf_counter() - t0
    rec = recorded_session(paths["onnxopt int8 placed"])
    configs = {k: ({}, "all") for k in paths}
    for k in paths:
        if "placed" in k:
            r = recorded_session(paths[k])
            configs[k] = (r.get("session_config", {}), r.get("graph_optimization_level", "all"))

    # accuracy (2 threads: it is not what is measured)
    x, labels = imagenet_val(n_val)
    preds = {}
    for name, path in paths.items():
        s = session(path, 2, *configs[name])
        preds[name] = np.concatenate([s.run(None, {"input": x[i:i + 25]})[0].argmax(1) for i in range(0, len(x), 25)])
    top1 = {k: 100 * float(np.mean(p == labels)) for k, p in preds.items()}
    agree = {k: 100 * float(np.mean(p == preds["fp32"])) for k, p in preds.items()}

    # latency, interleaved per setting
    settings = [(1, 1), (1, 2), (8, 1), (8, 2)]
    lat: dict[tuple[int, int], dict[str, float]] = {}
    for batch, threads in settings:
        feed = {"input": x[:batch] if len(x) >= batch else np.repeat(x[:1], batch, 0)}
        sessions = {k: (session(p, threads, *configs[k]), feed) for k, p in paths.items()}
        lat[(batch, threads)] = interleaved_latency(sessions, rounds=rounds, per_round=3 if batch == 1 else 1)

    # steadier on a busy machine: the sum of ORT's per-kernel median times (its profiler), b1 t1
    from onnxopt.profiling import profile

    kernel_ms = {}
    for k, p in paths.items():
        m = onnx.load(str(p))
        kernel_ms[k] = min(profile(m, {"input": x[:1]}, runs=rounds, config=configs[k][0],
                                   opt_level=configs[k][1]).kernel_us for _ in range(2)) / 1000

    headers = ["model", "top-1 %", "agree %"]
    for b, t in settings:
        headers += [f"b{b} t{t} ms", "x fp32"]
    headers += ["b1 t1 kernel ms", "x fp32", "MB"]
    rows = []
    for k, p in paths.items():
        row = [k, round(top1[k], 2), round(agree[k], 2)]
        for s in settings:
            ms = lat[s][k]
            row += [round(ms, 2), f"{lat[s]['fp32'] / ms:.2f}x"]
        row += [round(kernel_ms[k], 2), f"{kernel_ms['fp32'] / kernel_ms[k]:.2f}x", round(file_mb(p), 2)]
        rows.append(row)
    print(markdown_table(headers, rows))
    cpu = detect_cpu()
    print(f"\nCPU: {platform.processor() or platform.machine()}, {cpu.describe()}, {os.cpu_count()} cores; "
          f"onnxruntime {ort.__version__}; {n_calib} calibration / {len(x)} val images; {rounds} rounds per "
          f"setting; models built in {build_s:.0f} s")
    if placed:
        print(f"placement: {placed.get('mode')}; decisions {placed.get('decisions_by_kind')}; SQNR dB "
              f"{placed.get('sqnr_db')}; session {rec}")
    if placed_avx2:
        print(f"placement [avx2 scheme]: decisions {placed_avx2.get('decisions_by_kind')}; SQNR dB "
              f"{placed_avx2.get('sqnr_db')}; session {recorded_session(paths['onnxopt placed [avx2 scheme]'])}")


# -- MiniLM: dynamic int8 against ORT's quantize_dynamic -----------------------------------------------
def minilm(work: Path, quick: bool) -> None:
    """MiniLM-L6 SST-2 at L=128 (128 real tokens, no padding): fp32, ORT's quantize_dynamic with ORT's
    default session and with the session options onnxopt records (the same fusions turned off, so the
    peer gets the same trick), onnxopt int8-dynamic with its measured layout and with every fusion kept."""
    from common import MAX_LEN, TEXT, pad_ids, read_tsv, tokenize, write_text_npz
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from onnxopt.data import open_data
    from onnxopt.model_io import load_model, save_model
    from onnxopt.pass_infra import PassContext, PassManager
    from onnxopt.recipe import load_preset

    model_path = TEXT / "minilm_l6_sst2.onnx"
    if not model_path.exists():
        print(f"skipping MiniLM: {model_path} not found", file=sys.stderr)
        return
    work.mkdir(parents=True, exist_ok=True)
    calib = write_text_npz(TEXT / "sst2_calib.tsv", work / "sst2_calib_128.npz", n=128)
    t0 = time.perf_counter()
    paths: dict[str, Path] = {"fp32": model_path}
    ort_path = work / "ort_dynamic.onnx"
    quantize_dynamic(str(model_path), str(ort_path), weight_type=QuantType.QInt8)
    for label, layout in (("onnxopt int8-dynamic", True), ("onnxopt int8-dynamic, all fused", False)):
        recipe = load_preset("int8-dynamic")
        # measured in this run, on this machine (no cache)
        passes = [p.model_copy(update={"enabled": layout, "cache": False}) if p.type == "transformer-layout" else p
                  for p in recipe.passes]
        recipe = recipe.model_copy(update={"passes": passes})
        m = load_model(model_path)
        ctx = PassContext(calibration=open_data(str(calib), m, recipe.data))
        out = work / f"int8_dynamic{'' if layout else '_fused'}.onnx"
        save_model(PassManager(recipe.build_passes(ctx), check=False).run(m).model, out, force=True)
        paths[label] = out
    build_s = time.perf_counter() - t0
    rec = recorded_session(paths["onnxopt int8-dynamic"])
    ours_cfg = rec.get("session_config", {})
    runs: dict[str, tuple[Path, dict]] = {
        "fp32": (model_path, {}), "ORT quantize_dynamic": (ort_path, {}),
        "ORT quantize_dynamic, onnxopt's session options": (ort_path, ours_cfg),
        "onnxopt int8-dynamic": (paths["onnxopt int8-dynamic"], ours_cfg),
        "onnxopt int8-dynamic, all fused": (paths["onnxopt int8-dynamic, all fused"], {}),
    }

    sentences, labels = read_tsv(TEXT / "sst2_dev.tsv")
    n = 200 if quick else len(sentences)
    ids, labels = tokenize(sentences[:n]), labels[:n]
    preds = {}
    for k, (p, cfg) in runs.items():
        s = session(p, 2, cfg)
        preds[k] = np.array([s.run(["logits"], pad_ids([x]))[0][0].argmax() for x in ids])
    acc = {k: 100 * float(np.mean(v == labels)) for k, v in preds.items()}
    agree = {k: 100 * float(np.mean(v == preds["fp32"])) for k, v in preds.items()}

    body = [t for x in ids for t in x[1:-1]][: MAX_LEN - 2]
    one = pad_ids([[ids[0][0], *body, ids[0][-1]]], MAX_LEN)
    eight = {k: np.repeat(v, 8, 0) for k, v in one.items()}
    rounds = 5 if quick else 15
    settings = [(1, 1), (1, 2), (8, 1), (8, 2)]
    lat = {}
    for batch, threads in settings:
        feed = one if batch == 1 else eight
        lat[(batch, threads)] = interleaved_latency(
            {k: (session(p, threads, cfg), feed) for k, (p, cfg) in runs.items()},
            rounds=rounds if batch == 1 else max(rounds // 3, 2), per_round=3 if batch == 1 else 1)
    from onnxopt.profiling import profile

    kernel_ms = {k: min(profile(onnx.load(str(p)), one, runs=rounds, config=cfg).kernel_us for _ in range(2)) / 1000
                 for k, (p, cfg) in runs.items()}
    headers = ["model", "acc %", "agree %"]
    for b, t in settings:
        headers += [f"b{b} t{t} ms", "x fp32", "x ORT"]
    headers += ["b1 t1 kernel ms", "MB"]
    rows = []
    for k, (p, _) in runs.items():
        row = [k, round(acc[k], 2), round(agree[k], 2)]
        for st in settings:
            ms = lat[st][k]
            row += [round(ms, 2), f"{lat[st]['fp32'] / ms:.2f}x", f"{lat[st]['ORT quantize_dynamic'] / ms:.2f}x"]
        row += [round(kernel_ms[k], 2), round(file_mb(p), 1)]
        rows.append(row)
    print(f"\nMiniLM-L6 SST-2, L=128 (no padding), {n} dev sentences; models built in {build_s:.0f} s")
    print(markdown_table(headers, rows))
    print(f"onnxopt's recorded session options: {rec}")


if __name__ == "__main__":
    main()
