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

Each variant runs twice with the same configs: ``method: weight`` (plain SVD) and ``method: data-aware``
(whitened by the calibration activations), so the two rows have the same ranks and parameter count.

Calibration data (tokenized sentences in length buckets, preprocessed images) is written as .npz under
--work (default /tmp/onnxopt-bench-lowrank), never inside the repository; loading, tokenizing, sessions,
timing and the table come from ``bench/common.py``. Data-aware variants use ``sst2_calib.tsv`` (1,000
sentences) / ``imagenet/calib`` (200 images); nothing of the dev/val sets.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from common import (
    IMAGENET,
    MAX_LEN,
    SHARED,
    TEXT,
    file_mb,
    imagenet_arrays,
    imagenet_val,
    interleaved_latency,
    markdown_table,
    read_tsv,
    run_batched,
    session,
    text_feeds,
    tokenize,
)


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


def param_count(model: onnx.ModelProto, prefix: str | None = None, exclude: tuple[str, ...] = ()) -> int:
    """Elements of the initializers read by nodes whose name starts with ``prefix`` (all nodes if None)."""
    sizes = {t.name: int(np.prod(t.dims, dtype=np.int64)) for t in model.graph.initializer}
    used: set[str] = set()
    for n in model.graph.node:
        if (prefix is None or n.name.startswith(prefix)) and not any(n.name.startswith(e) for e in exclude):
            used.update(x for x in n.input if x in sizes)
    return sum(sizes[x] for x in used)


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


def layer_errors(results, key: str = "output_error") -> tuple[int, float | None]:
    """(factorized layers, median of their ``key`` error) over the low-rank results of a pipeline."""
    from onnxopt.lowrank import LowRankResult

    errs, n = [], 0
    for r in results:
        if isinstance(r, LowRankResult):
            n += len(r.layers)
            errs += [getattr(c, key) for c in r.layers.values() if getattr(c, key) is not None]
    return n, (statistics.median(errs) if errs else None)


def run_variant(rows: list[Row], label: str, cfgs: list[dict], run, add) -> list[dict]:
    """Weight-only, then data-aware with the same configs; returns the data-aware passes.

    The weight-only run gets no calibration data (it needs none); its row's output error is the one the
    data-aware run reports for the weight-only factors of the same layers at the same ranks (exact, from
    the same activation statistics), so both rows are measured on the same data."""
    weight = [{**c, "method": "weight"} for c in cfgs]
    model, results = run(weight, False)
    add(label, "weight", model, results)
    weight_row = rows[-1]
    aware = [{**c, "method": "data-aware"} for c in cfgs]
    model, results = run(aware, True)
    add(label, "data-aware", model, results)
    weight_row.median_output_error = layer_errors(results, "weight_only_output_error")[1]
    return aware


# --------------------------------------------------------------------------------------------
# MiniLM SST-2
# --------------------------------------------------------------------------------------------
def text_batches(ids: list[list[int]], batch: int) -> list[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Length-sorted batches (padded per batch, so padding does not dominate), with the original positions."""
    order = np.argsort([len(x) for x in ids], kind="stable")
    feeds = text_feeds([ids[j] for j in order], batch)
    return [(order[i * batch:(i + 1) * batch], f) for i, f in enumerate(feeds)]


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

# (label, lowrank-svd configs applied in order); param_ratio is per layer unless allocation is global
MINILM_VARIANTS = [
    ("FFN-out 0.45 + query/key 0.6", [{"param_ratio": 0.6, "include": QUERY_KEY},
                                      {"param_ratio": 0.45, "include": [FFN_OUT]}]),
    ("all layers, global budget 0.75", [{"param_ratio": 0.75, "allocation": "global", "include": [ENCODER + "*"]}]),
    ("all layers, each 0.75", [{"param_ratio": 0.75, "include": [ENCODER + "*"]}]),
    ("FFN-out 0.3 + query/key 0.4", [{"param_ratio": 0.4, "include": QUERY_KEY},
                                     {"param_ratio": 0.3, "include": [FFN_OUT]}]),
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
        aware = run_variant(rows, label, [{"type": "lowrank-svd", **c} for c in cfgs],
                            lambda passes, data: run_recipe(clean, passes, calib if data else None), add)
        best = best or (label, aware)
    with_int8(rows, "MiniLM", args, best, lambda m, passes: run_recipe(m or clean, passes, calib), add,
              int8_for=minilm_int8)
    latency(rows, "MiniLM", text_feeds([dev_ids[0]], 1, pad_to=MAX_LEN)[0], args)


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
    consts = {t.name for t in model.graph.initializer} | {o for n in model.graph.node if n.op_type == "Constant"
                                                          for o in n.output}
    weighted = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in consts]
    tensors = list(dict.fromkeys(t for n in weighted for t in (n.input[0], n.output[0])))
    others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] not in consts]
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
    ms = interleaved_latency(sessions, rounds=args.rounds, per_round=args.per_round)
    for i, r in enumerate(mine):
        r.latency = ms[str(i)]


# --------------------------------------------------------------------------------------------
# EfficientNet-Lite0
# --------------------------------------------------------------------------------------------
def image_logits(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return run_batched(session(model), x)


LITE0_VARIANTS = [
    ("classifier Gemm, ratio 0.75", [{"type": "lowrank-svd", "param_ratio": 0.75}]),
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
    x, y = imagenet_val()
    calib_npz = work / f"lite0_calib{args.lite0_calib}.npz"
    if not calib_npz.exists():
        np.savez(calib_npz, input=imagenet_arrays(IMAGENET / "calib", args.lite0_calib))
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
        aware = run_variant(rows, label, cfgs, lambda passes, data: run_recipe(clean, passes, calib if data else None),
                            add)
        best = best or (label, aware)
    with_int8(rows, "Lite0", args, best, lambda m, passes: run_recipe(m or clean, passes, calib), add)
    latency(rows, "Lite0", {"input": x[:1]}, args)


# --------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------
def table(rows: list[Row]) -> str:
    base = {r.model: r for r in rows if r.variant.startswith("fp32 (")}
    body = []
    for r in rows:
        b = base.get(r.model)
        body.append([r.model, r.variant, r.method, f"{r.params:,}", f"{b.params / r.params:.2f}x" if b else "",
                     f"{r.file_mb:.1f}", f"{r.latency:.1f}" if r.latency is not None else "",
                     f"{b.latency / r.latency:.2f}x" if b and b.latency and r.latency else "",
                     f"{r.accuracy:.2f}", f"{r.agreement:.2f}", r.layers or "",
                     f"{r.median_output_error:.3f}" if r.median_output_error is not None else ""])
    return markdown_table(["model", "variant", "method", "params", "fewer", "file MB", "latency ms", "speed-up",
                           "top-1 %", "agree %", "layers", "median out err"], body)


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
          "with fp32. median out err: median over factorized layers of ||Y - Y_r|| / ||Y|| on the calibration "
          "activations (weight rows: the weight-only factors at the same ranks, from the data-aware run's statistics). "
          "speed-up: fp32 latency / row latency.")


if __name__ == "__main__":
    main()
