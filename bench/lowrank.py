"""Low-rank factorization (``lowrank-svd`` / ``lowrank-tucker``) on real models: size, speed, accuracy.

    python bench/lowrank.py                    # MiniLM SST-2 and EfficientNet-Lite0, the default grid
    python bench/lowrank.py --models minilm    # one model
    python bench/lowrank.py --quick            # fewer variants, fewer latency rounds
    python bench/lowrank.py --no-int8          # skip the "then int8" rows

Needs ``pip install -e '.[bench]'`` (tokenizers, Pillow) and the shared models in ``../shared/models``.

For every variant the table shows: encoder parameters (MiniLM: initializers read by the
``/b/encoder/`` nodes; Lite0: every initializer except the classifier), file size, latency (batch 1, one
thread, ORT_ENABLE_ALL, median over interleaved rounds: each round times every variant in turn, so
the machine's load drifts equally over all of them), accuracy (SST-2 dev, 872 sentences / ImageNet
val, 650 images), agreement of the argmax with fp32, and the median per-layer output error the pass
reports on the calibration activations.

"+ int8" rows: the float variant, then calibrate + quantize-qdq (Lite0: as in the int8 preset; MiniLM: the
MatMuls with constant weights only, see ``minilm_int8``); their params are those of the float model.

Calibration data (tokenized sentences, preprocessed images) is written as .npz under --work
(default /tmp/onnxopt-bench-lowrank), never inside the repository. Data-aware variants use
``sst2_calib.tsv`` (1,000 sentences) / ``imagenet/calib`` (200 images); nothing of the dev/val sets.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "models"
TEXT = SHARED / "text"
IMAGENET = SHARED / "imagenet"
MAX_LEN = 128


# --------------------------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------------------------
def run_recipe(model: onnx.ModelProto, passes: list[dict], calib=None) -> tuple[onnx.ModelProto, list]:
    from onnxopt.pass_infra import PassContext, PassManager
    from onnxopt.recipe import parse_recipe

    context = PassContext(calibration=calib, cache_dir=None)
    recipe = parse_recipe({"passes": passes})
    out = PassManager(recipe.build_passes(context)).run(model)
    return out.model, out.results


CLEANUP = ["remove-identity", "constant-folding", "fold-pad-into-conv", "fold-batchnorm", "dead-code-elimination",
           "topological-sort"]


def int8_passes() -> list[dict] | None:
    try:
        from onnxopt.registry import get_pass_class

        get_pass_class("calibrate")
        get_pass_class("quantize-qdq")
    except Exception:  # noqa: BLE001 - the int8 passes are optional here
        return None
    return [{"type": "calibrate", "cache": False}, {"type": "quantize-qdq"}]


def session(model: onnx.ModelProto, threads: int | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def param_count(model: onnx.ModelProto, prefix: str | None = None, exclude: tuple[str, ...] = ()) -> int:
    """Elements of the initializers read by nodes whose name starts with ``prefix`` (all nodes if None)."""
    sizes = {t.name: int(np.prod(t.dims, dtype=np.int64)) for t in model.graph.initializer}
    used: set[str] = set()
    for n in model.graph.node:
        if (prefix is None or n.name.startswith(prefix)) and not any(n.name.startswith(e) for e in exclude):
            used.update(x for x in n.input if x in sizes)
    return sum(sizes[x] for x in used)


def latency_ms(sessions: dict[str, tuple[ort.InferenceSession, dict]], rounds: int, per_round: int) -> dict[str, float]:
    """Median ms per run of each session, interleaved: every round times every session in turn."""
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for s, feed in sessions.values():  # warm-up
        for _ in range(3):
            s.run(None, feed)
    order = list(sessions)
    for r in range(rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            s, feed = sessions[name]
            for _ in range(per_round):
                t0 = time.perf_counter()
                s.run(None, feed)
                times[name].append(1000 * (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in times.items()}


@dataclass
class Row:
    model: str
    variant: str
    method: str
    params: int
    file_mb: float
    accuracy: float
    agreement: float
    layers: int = 0
    median_output_error: float | None = None
    latency: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


def layer_errors(results) -> tuple[int, float | None]:
    from onnxopt.passes.lowrank_svd import LowRankResult

    errs, n = [], 0
    for r in results:
        if isinstance(r, LowRankResult):
            n += len(r.layers)
            errs += [c.output_error for c in r.layers.values() if c.output_error is not None]
    return n, (statistics.median(errs) if errs else None)


def file_mb(model: onnx.ModelProto) -> float:
    return model.ByteSize() / 1e6


# --------------------------------------------------------------------------------------------
# MiniLM SST-2
# --------------------------------------------------------------------------------------------
def read_tsv(path: Path) -> tuple[list[str], np.ndarray]:
    with open(path, encoding="utf-8") as fh:
        rows = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    rows = [r for r in rows[1:] if r]
    return [r[0] for r in rows], np.array([int(r[1]) for r in rows], dtype=np.int64)


def tokenize(sentences: list[str]) -> list[list[int]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TEXT / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(MAX_LEN)
    return [e.ids for e in tok.encode_batch(sentences)]


def pad_batch(ids: list[list[int]], length: int | None = None) -> dict[str, np.ndarray]:
    length = length or max(len(x) for x in ids)
    out = np.zeros((len(ids), length), dtype=np.int64)
    mask = np.zeros_like(out)
    for i, x in enumerate(ids):
        out[i, : len(x)] = x
        mask[i, : len(x)] = 1
    return {"input_ids": out, "attention_mask": mask, "token_type_ids": np.zeros_like(out)}


def text_batches(ids: list[list[int]], batch: int) -> list[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Length-sorted batches (padding per batch), with the original positions."""
    order = np.argsort([len(x) for x in ids], kind="stable")
    return [(order[i:i + batch], pad_batch([ids[j] for j in order[i:i + batch]]))
            for i in range(0, len(order), batch)]


def text_calibration(work: Path, model: onnx.ModelProto, batch: int = 16):
    """sst2_calib.tsv as a folder of .npz files (length buckets), opened as a DataSource."""
    from onnxopt.data import open_data

    folder = work / "minilm_calib"
    if not folder.is_dir() or not any(folder.iterdir()):
        folder.mkdir(parents=True, exist_ok=True)
        sentences, _ = read_tsv(TEXT / "sst2_calib.tsv")
        for k, (_, feed) in enumerate(text_batches(tokenize(sentences), batch)):
            np.savez(folder / f"{k:04d}.npz", **feed)
    return open_data(folder, model)


def text_predict(model: onnx.ModelProto, batches) -> np.ndarray:
    s = session(model)
    n = sum(len(idx) for idx, _ in batches)
    pred = np.empty(n, dtype=np.int64)
    for idx, feed in batches:
        logits = s.run(["logits"], feed)[0]
        pred[idx] = logits.argmax(1)
    return pred


def text_logits(model: onnx.ModelProto, batches) -> np.ndarray:
    s = session(model)
    n = sum(len(idx) for idx, _ in batches)
    out = np.empty((n, 2), dtype=np.float32)
    for idx, feed in batches:
        out[idx] = s.run(["logits"], feed)[0]
    return out


ENCODER = "/b/encoder/"
FFN_OUT = "*/layer.?/output/dense/*"
QUERY_KEY = ["*/self/query/*", "*/self/key/*"]

# (label, lowrank-svd configs applied in order); param_ratio is per layer
MINILM_VARIANTS = [
    ("FFN-out 0.45 + query/key 0.6", [{"param_ratio": 0.6, "include": QUERY_KEY},
                                      {"param_ratio": 0.45, "include": [FFN_OUT]}]),
    ("all layers, ratio 0.75", [{"param_ratio": 0.75, "include": [ENCODER + "*"]}]),
    ("all layers, ratio 0.9", [{"param_ratio": 0.9, "include": [ENCODER + "*"]}]),
    ("all layers, energy 0.985", [{"energy": 0.985, "include": [ENCODER + "*"]}]),
]
MINILM_QUICK = MINILM_VARIANTS[:1]


def bench_minilm(args, rows: list[Row]) -> None:
    work = Path(args.work)
    print("MiniLM SST-2: cleanup ...", file=sys.stderr, flush=True)
    clean = cleaned(TEXT / "minilm_l6_sst2.onnx", work / "minilm_clean.onnx")
    dev_s, dev_y = read_tsv(TEXT / "sst2_dev.tsv")
    dev_ids = tokenize(dev_s)
    batches = text_batches(dev_ids, 32)
    calib = text_calibration(work, clean)
    ref_logits = text_logits(clean, batches)
    ref = ref_logits.argmax(1)
    enc = param_count(clean, ENCODER)

    def add(label, method, model, results, params_of=None):
        logits = text_logits(model, batches)
        pred = logits.argmax(1)
        n, err = layer_errors(results)
        params = param_count(params_of or model, ENCODER)
        rows.append(Row("MiniLM", label, method, params, file_mb(model),
                        100 * float(np.mean(pred == dev_y)), 100 * float(np.mean(pred == ref)), n, err,
                        extra={"model": model, "ratio": enc / params}))
        r = rows[-1]
        print(f"  {label:34s} {method:10s} params {r.params:>9,d} ({r.extra['ratio']:.3f}x) acc {r.accuracy:.2f} "
              f"agree {r.agreement:.2f}", file=sys.stderr, flush=True)

    add("fp32 (cleanup)", "-", clean, [])
    variants = MINILM_QUICK if args.quick else MINILM_VARIANTS
    best = None
    for label, cfgs in variants:
        for method in ("weight", "data-aware"):
            passes = [{"type": "lowrank-svd", "method": method, **c} for c in cfgs]
            model, results = run_recipe(clean, passes, calib if method == "data-aware" else None)
            add(label, method, model, results)
            if method == "data-aware" and best is None:
                best = (label, passes)
    with_int8(rows, "MiniLM", args, best, lambda m, passes: run_recipe(m or clean, passes, calib), add,
              int8_for=minilm_int8)
    latency(rows, "MiniLM", pad_batch([dev_ids[0]], MAX_LEN), args)


NOTES: list[str] = []


def with_int8(rows: list[Row], name: str, args, best, run, add, int8_for=None) -> None:
    """fp32 + int8 and the first data-aware variant + int8 (calibrate + quantize-qdq), when those passes exist.

    ``run(model, passes)`` runs a pipeline; ``int8_for(model)`` gives the int8 passes for a model (default:
    the int8 preset's calibrate + quantize-qdq). Params of an int8 row are those of its float model."""
    from onnxopt.errors import OnnxoptError

    if args.no_int8 or int8_passes() is None or best is None:
        return
    int8_for = int8_for or (lambda model: int8_passes())
    for label, passes, method in (("fp32 + int8", [], "-"), (f"{best[0]} + int8", best[1], "data-aware")):
        try:
            fp, results = run(None, passes)
            model, _ = run(fp, int8_for(fp))
        except OnnxoptError as exc:
            NOTES.append(f"{name} {label}: {str(exc).splitlines()[0]}")
            print(f"  {label}: failed: {exc}", file=sys.stderr, flush=True)
            continue
        add(label, method, model, results, params_of=fp)


def minilm_int8(model: onnx.ModelProto) -> list[dict]:
    """int8 for MiniLM: the MatMuls with constant weights (the factors included) only.

    The int8 preset's calibrate pass refuses MiniLM: the attention-mask Add holds -inf by design. So the
    ranges are measured on the inputs/outputs of the weight MatMuls alone, and the activation x activation
    MatMuls (attention scores) stay in float."""
    from onnxopt.graph import GraphIndex

    index = GraphIndex(model.graph)
    weighted = [n for n in model.graph.node if n.op_type == "MatMul" and index.constant(n.input[1]) is not None]
    tensors = list(dict.fromkeys(t for n in weighted for t in (n.input[0], n.output[0])))
    others = [n.name for n in model.graph.node if n.op_type == "MatMul" and index.constant(n.input[1]) is None]
    return [{"type": "calibrate", "cache": False, "tensors": tensors},
            {"type": "quantize-qdq", "op_types": ["MatMul"], "exclude_nodes": others}]


def cleaned(src: Path, dst: Path) -> onnx.ModelProto:
    """The shared model after the cleanup passes (cached under --work, never in the repository)."""
    if dst.exists() and dst.stat().st_mtime > src.stat().st_mtime:
        return onnx.load(dst)
    model, _ = run_recipe(onnx.load(src), CLEANUP)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, dst)
    return model


def latency(rows: list[Row], name: str, feed: dict[str, np.ndarray], args) -> None:
    """Batch 1, one thread, median over interleaved rounds, for every row of ``name``."""
    mine = [r for r in rows if r.model == name]
    print(f"{name}: latency ({args.rounds} interleaved rounds) ...", file=sys.stderr, flush=True)
    sessions = {}
    for i, r in enumerate(mine):
        s = session(r.extra["model"], threads=1)
        sessions[str(i)] = (s, {k: v for k, v in feed.items() if k in {x.name for x in s.get_inputs()}})
    ms = latency_ms(sessions, rounds=args.rounds, per_round=args.per_round)
    for i, r in enumerate(mine):
        r.latency = ms[str(i)]


# --------------------------------------------------------------------------------------------
# EfficientNet-Lite0
# --------------------------------------------------------------------------------------------
def image_arrays(folder: Path, n: int | None, out: Path) -> np.ndarray:
    """RGB, short side 256 (bilinear), centre crop 224, as uint8 NCHW (cached as .npz under --work)."""
    if out.exists():
        return np.load(out)["x"]
    from onnxopt.data import preprocess_image
    from onnxopt.recipe import ImageSpec

    spec = ImageSpec(resize_short=256, center_crop=224)
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in (".jpeg", ".jpg", ".png"))[:n]
    x = np.stack([np.clip(np.rint(preprocess_image(f, spec)), 0, 255).astype(np.uint8) for f in files])
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, x=x, files=np.array([f.name for f in files]))
    return x


def normalize(x: np.ndarray) -> np.ndarray:
    return (x.astype(np.float32) - 127.0) / 128.0


def image_logits(model: onnx.ModelProto, x: np.ndarray, batch: int = 25) -> np.ndarray:
    s = session(model)
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: normalize(x[i:i + batch])})[0] for i in range(0, len(x), batch)])


LITE0_VARIANTS = [
    ("classifier Gemm, ratio 0.5", [{"type": "lowrank-svd", "param_ratio": 0.5}]),
    ("head 1x1 conv + classifier, ratio 0.5", [{"type": "lowrank-tucker", "param_ratio": 0.5,
                                                "include": ["/_conv_head/*"]},
                                               {"type": "lowrank-svd", "param_ratio": 0.5}]),
    ("every 1x1 conv, ratio 0.9", [{"type": "lowrank-tucker", "param_ratio": 0.9}]),
]
LITE0_QUICK = LITE0_VARIANTS[:1]


def bench_lite0(args, rows: list[Row]) -> None:
    work = Path(args.work)
    print("EfficientNet-Lite0: cleanup, images ...", file=sys.stderr, flush=True)
    clean = cleaned(IMAGENET / "efficientnet_lite0.onnx", work / "lite0_clean.onnx")
    x = image_arrays(IMAGENET / "val", None, work / "lite0_val_u8.npz")
    names = np.load(work / "lite0_val_u8.npz")["files"]
    with open(IMAGENET / "val_labels.csv", encoding="utf-8") as fh:
        labels = {r[0]: int(r[1]) for r in csv.reader(fh) if r and r[0] != "file"}
    y = np.array([labels[str(n)] for n in names])
    calib_npz = work / f"lite0_calib{args.lite0_calib}.npz"
    if not calib_npz.exists():
        c = image_arrays(IMAGENET / "calib", args.lite0_calib, work / f"lite0_calib{args.lite0_calib}_u8.npz")
        np.savez(calib_npz, input=normalize(c))
    from onnxopt.data import open_data

    calib = open_data(calib_npz, clean)
    ref = image_logits(clean, x).argmax(1)

    def add(label, method, model, results, params_of=None):
        pred = image_logits(model, x).argmax(1)
        n, err = layer_errors(results)
        rows.append(Row("Lite0", label, method, param_count(params_of or model), file_mb(model),
                        100 * float(np.mean(pred == y)), 100 * float(np.mean(pred == ref)), n, err,
                        extra={"model": model}))
        r = rows[-1]
        print(f"  {label:34s} {method:10s} params {r.params:>9,d} acc {r.accuracy:.2f} agree {r.agreement:.2f}",
              file=sys.stderr, flush=True)

    add("fp32 (cleanup)", "-", clean, [])
    variants = LITE0_QUICK if args.quick else LITE0_VARIANTS
    best = None
    for label, cfgs in variants:
        for method in ("weight", "data-aware"):
            passes = [{**c, "method": method} for c in cfgs]
            model, results = run_recipe(clean, passes, calib if method == "data-aware" else None)
            add(label, method, model, results)
            if method == "data-aware" and best is None:
                best = (label, passes)
    with_int8(rows, "Lite0", args, best, lambda m, passes: run_recipe(m or clean, passes, calib), add)
    latency(rows, "Lite0", {"input": normalize(x[:1])}, args)


# --------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------
def table(rows: list[Row]) -> str:
    head = ("| model | variant | method | params | vs fp32 | file MB | latency ms | top-1 % | agree % | layers "
            "| median out err |")
    lines = [head, "|" + "---|" * 11]
    base = {r.model: r for r in rows if r.variant.startswith("fp32 (")}
    for r in rows:
        b = base.get(r.model)
        ratio = f"{b.params / r.params:.2f}x" if b else ""
        err = f"{r.median_output_error:.3f}" if r.median_output_error is not None else ""
        lat = f"{r.latency:.1f}" if r.latency is not None else ""
        lines.append(f"| {r.model} | {r.variant} | {r.method} | {r.params:,} | {ratio} | {r.file_mb:.1f} | {lat} | "
                     f"{r.accuracy:.2f} | {r.agreement:.2f} | {r.layers or ''} | {err} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="minilm,lite0", help="comma-separated: minilm, lite0")
    ap.add_argument("--quick", action="store_true", help="one variant per model, fewer latency rounds")
    ap.add_argument("--no-int8", action="store_true", help="skip the rows followed by calibrate + quantize-qdq")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "onnxopt-bench-lowrank"))
    ap.add_argument("--rounds", type=int, default=None, help="latency rounds (default 7, quick 3)")
    ap.add_argument("--per-round", type=int, default=5, help="timed runs per variant per round")
    ap.add_argument("--lite0-calib", type=int, default=200, help="calibration images for Lite0 (of 200)")
    args = ap.parse_args()
    args.rounds = args.rounds or (3 if args.quick else 7)
    if not SHARED.is_dir():
        sys.exit(f"{SHARED} not found: the shared models are needed")
    rows: list[Row] = []
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in ("minilm", "lite0"):
            sys.exit(f"unknown model {m!r} (choose minilm, lite0)")
    if "minilm" in models:
        bench_minilm(args, rows)
    if "lite0" in models:
        bench_lite0(args, rows)
    print(table(rows))
    for note in NOTES:
        print(f"note: {note}")
    print("\nparams: MiniLM = initializers of the /b/encoder/ nodes (fp32: 10,646,968); Lite0 = all initializers. "
          "latency: batch 1 (MiniLM L=128), one thread, median of interleaved rounds. agree: argmax agreement "
          "with fp32. median out err: median over factorized layers of the output error on calibration activations.")


if __name__ == "__main__":
    main()
