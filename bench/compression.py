"""Pruning and quantization for size: the seeds' MNIST table, and EfficientNet-Lite0 accuracy vs sparsity.

    python bench/compression.py              # both sections
    python bench/compression.py --quick      # fewer images, fewer latency rounds
    python bench/compression.py --only mnist # or lite0

(1) MNIST (``../shared/models/mnist``): every row of the seed table built with onnxopt's presets, with the
file size, its zlib size, the entropy-coded size (Deep Compression's measure, ``onnxopt.compression``),
top-1 on the 10k test set and on the part of it not used for calibration, and ms per inference at batch 1
(one thread, ORT_ENABLE_ALL, interleaved rounds; the ratio is against fp32 measured in the same run),
beside the seed's own figures (a different, smaller CNN: compare the differences, not the bytes). MNIST
ships no training set here, so calibration uses the first 500 test images; the "held-out" column leaves
them out.

(2) EfficientNet-Lite0 (650 val images; all 200 calib images for data-aware): top-1 and top-1 agreement
with fp32 at 0/30/50/70 % unstructured sparsity, magnitude vs data-aware (SparseGPT-style re-fit + bias
correction, ``LITE0_DATA_AWARE``: chosen on val[:200] only), each with and without the statistics correction
(every conv's output channels rescaled to the original mean/variance on the calibration data), the prune-weights pass on the cleaned-up model (depthwise convs are not pruned: the sparsity
is over the other Conv/Gemm weights, 96 % of the parameters). Structured rows come from
``bench/compression_structured.py:lite0_structured_rows`` when that file exists.
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
from common import (  # noqa: E402
    IMAGENET,
    MNIST,
    imagenet_calib_npz,
    imagenet_val,
    interleaved_latency,
    markdown_table,
    mnist_test,
    need,
    run_batched,
    session,
)

from onnxopt import compression  # noqa: E402
from onnxopt.data import from_arrays  # noqa: E402
from onnxopt.optimize import optimize  # noqa: E402
from onnxopt.pass_infra import PassContext, PassManager  # noqa: E402
from onnxopt.recipe import load_preset, parse_recipe  # noqa: E402
from onnxopt.registry import get_pass_class  # noqa: E402

# The seed table (its own MNIST CNN): bytes, top-1 %.
SEED = {
    "fp32": (84_896, 97.95),
    "fp16 weights": (44_716, 97.62),
    "uint8 weights": (24_136, 97.12),
    "uint8 weights + int8 activations": (24_672, 97.08),
    "50 % pruned": (84_820, 96.81),
    "50 % pruned + uint8 weights": (24_064, 96.80),
}
CLEANUP = ["remove-identity", "constant-folding", "fold-pad-into-conv", "fold-batchnorm", "dead-code-elimination"]
TAIL = ["topological-sort", "shape-inference"]
CALIB_N = 500
# Lite0's data-aware options, chosen on the first 200 val images (fp32 agreement; the table reports all 650):
# per-layer sparsity from the output error, each layer's damping picked on held-out calibration rows.
LITE0_DATA_AWARE = {"allocation": "output-error", "damping": 0.1, "holdout": True,
                    "damping_grid": [0.01, 0.03, 0.1, 0.3, 1.0]}


def recipe_of(name: str, passes: list) -> object:
    return parse_recipe({"name": name, "passes": passes})


def prune_step(sparsity: float, method: str | None = None) -> dict:
    step = {"type": "prune-weights", "sparsity": sparsity, "size_report": False}
    if method:
        step["method"] = method
    return step


def weights_uint8_steps() -> list:
    return [p.model_dump() for p in load_preset("weights-uint8").passes if p.type in ("calibrate", "quantize-qdq")]


def fp16_recipe():
    """The fp16 pass when it is installed (another issue), else None."""
    from onnxopt.errors import RecipeError

    try:
        return parse_recipe({"name": "fp16", "passes": [*CLEANUP, "fp16", *TAIL]})
    except RecipeError:
        return None


def fp16_weights_fallback(model: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 storage of the float weights, each read through a Cast to float (what the seed's row measures)."""
    from onnx import helper, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    casts = []
    for t in g.initializer:
        a = numpy_helper.to_array(t)
        if a.dtype == np.float32 and a.size >= 16:
            name = t.name
            t.CopyFrom(numpy_helper.from_array(a.astype(np.float16), name + "_fp16"))
            casts.append(helper.make_node("Cast", [name + "_fp16"], [name], to=onnx.TensorProto.FLOAT,
                                          name=name + "/cast"))
    nodes = casts + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    return out


def top1(sess, x: np.ndarray, y: np.ndarray, batch: int = 100) -> tuple[float, np.ndarray]:
    logits = run_batched(sess, x, batch=batch)
    pred = logits.argmax(1)
    return 100.0 * float(np.mean(pred == y)), pred


# --------------------------------------------------------------------------------------------
# (1) MNIST
# --------------------------------------------------------------------------------------------
def mnist_section(work: Path, quick: bool) -> str:
    src = need(MNIST / "mnist_cnn.onnx")
    x, y = mnist_test()
    calib = work / "mnist_calib.npz"
    np.savez(calib, input=x[:CALIB_N])
    variants: list[tuple[str, str, object]] = [
        ("fp32", "(original)", None),
        ("fp16 weights", "fp16", fp16_recipe()),
        ("uint8 weights", "weights-uint8", "weights-uint8"),
        ("uint8 weights + int8 activations", "weights-uint8-act-int8", "weights-uint8-act-int8"),
        ("50 % pruned (magnitude)", "prune, no --calib", "prune"),
        ("50 % pruned (data-aware)", "prune", "prune"),
        ("50 % pruned + uint8 weights", "prune + weights-uint8",
         recipe_of("prune-uint8w", [*CLEANUP, prune_step(0.5), *TAIL, *weights_uint8_steps()])),
        ("50 % pruned + int8 (+ entropy coding)", "prune-int8", "prune-int8"),
        ("50 % pruned + int8, 7-bit weights", "prune-int8, scheme u8s8-rr",
         recipe_of("prune-int8-rr", [*CLEANUP, prune_step(0.5), *TAIL, "calibrate",
                                     {"type": "quantize-qdq", "scheme": "u8s8-rr"}])),
        ("50 % pruned + int8 + 4-bit sharing", "prune-int8 + share-weights bits 4",
         recipe_of("prune-int8-share4", [*CLEANUP, prune_step(0.5), *TAIL, "calibrate", "quantize-qdq",
                                         {"type": "share-weights", "bits": 4}])),
        ("70 % pruned + int8", "prune-int8, sparsity 0.7",
         recipe_of("prune70-int8", [*CLEANUP, prune_step(0.7), *TAIL, "calibrate", "quantize-qdq"])),
    ]
    paths: dict[str, Path] = {}
    build_s: dict[str, float] = {}
    notes = []
    for label, _, recipe in variants:
        out = work / f"mnist_{len(paths)}.onnx"
        t0 = time.perf_counter()
        if label == "fp32":
            paths[label] = src
            continue
        if label == "fp16 weights" and recipe is None:
            onnx.save(fp16_weights_fallback(onnx.load(str(src))), out)
            notes.append("fp16 row: the `fp16` pass is not installed; fp16 weight storage with Casts (bench-local)")
        else:
            use_calib = None if "magnitude" in label else calib
            optimize(src, out, recipe=recipe, calib=use_calib, force=True)
        build_s[label] = time.perf_counter() - t0
        paths[label] = out
        print(f"[mnist] {label}: {build_s[label]:.0f} s", file=sys.stderr, flush=True)
    sessions = {k: session(p) for k, p in paths.items()}
    ref_size = paths["fp32"].stat().st_size
    feed = {sessions["fp32"].get_inputs()[0].name: x[:1]}
    lat = interleaved_latency({k: (s, feed) for k, s in sessions.items()}, rounds=10 if quick else 30,
                              per_round=10)
    results = {}
    for label, _, _ in variants:
        acc, pred = top1(sessions[label], x, y, batch=500)
        results[label] = (acc, 100.0 * float(np.mean(pred[CALIB_N:] == y[CALIB_N:])))
    rows = []
    for label, preset, _ in variants:
        acc, held = results[label]
        size = compression.size_report(paths[label], use_lzma=False, zstd=False)
        seed = SEED.get(label.split(" (")[0], (None, None))
        rows.append([label, preset, size["bytes"], size["zlib_bytes"], size["total_coded_bytes"],
                     f"{ref_size / size['total_coded_bytes']:.1f}x", f"{acc:.2f}", f"{acc - results['fp32'][0]:+.2f}",
                     f"{held:.2f}", f"{lat[label]:.3f}", f"{lat[label] / lat['fp32']:.2f}", seed[0],
                     f"{seed[1]:.2f}" if seed[1] else None])
    headers = ["variant", "preset", "bytes", "zlib bytes", "entropy-coded bytes", "fp32 file / coded",
               "top-1 % (10k)", "Δ pt", "top-1 % (held-out 9.5k)", "ms (b=1)", "× fp32 ms", "seed bytes",
               "seed top-1 %"]
    text = "### MNIST: the seed table\n\n" + markdown_table(headers, rows)
    text += ("\n\nentropy-coded: initializers of >= 256 values Huffman-coded (8-bit integers: dense or sparse "
             "with relative indices; floats: raw or sparse), everything else raw; 4-bit sharing: each int8 weight tensor's "
             "non-zero values k-means-clustered to 15 integer centroids (share-weights; the codebook is the "
             "Huffman table counted above). Build times (s): "
             + ", ".join(f"{k}: {v:.1f}" for k, v in build_s.items()))
    for n in notes:
        text += f"\n\nnote: {n}"
    return text


# --------------------------------------------------------------------------------------------
# (2) EfficientNet-Lite0
# --------------------------------------------------------------------------------------------
def lite0_section(work: Path, quick: bool, structured: bool = True) -> str:
    src = need(IMAGENET / "efficientnet_lite0.onnx")
    n_val = 200 if quick else None
    x, y = imagenet_val(n_val)
    n_calib = 32 if quick else 200
    calib_npz = imagenet_calib_npz(work / f"lite0_calib_{n_calib}.npz", n=n_calib)
    model = onnx.load(str(src))  # a protobuf in, protobufs out (the sessions below take them)
    clean = PassManager(parse_recipe({"passes": CLEANUP + TAIL}).build_passes()).run(model).model
    calib_x = np.load(calib_npz)["input"]
    ref_sess = session(clean)
    ref_acc, ref_pred = top1(ref_sess, x, y, batch=25)
    rows = [["fp32 (cleanup)", 0, "–", f"{ref_acc:.2f}", "100.00", "–", "–"]]
    sparsities = [0.3, 0.5, 0.7]
    variants = [("magnitude", "magnitude", False), ("magnitude + statistics correction", "magnitude", True),
                ("data-aware re-fit", "data-aware", False),
                ("data-aware + statistics correction (prune preset)", "data-aware", True)]
    for s in sparsities:
        for label, method, correct in variants:
            t0 = time.perf_counter()
            ctx = PassContext(calibration=from_arrays({"input": calib_x}, clean)
                              if method == "data-aware" or correct else None)
            cls = get_pass_class("prune-weights")
            step = prune_step(s, method) | {"statistics_correction": correct}
            if method == "data-aware":
                step |= LITE0_DATA_AWARE
            p = cls(cls.Config(**step), ctx)
            res = PassManager([p]).run(clean)
            secs = time.perf_counter() - t0
            d = res.records[0].details
            acc, pred = top1(session(res.model), x, y, batch=25)
            errs = [v["output_error"] for v in d["layers"].values() if v["output_error"] is not None]
            med = f"{np.median(errs):.3f}" if errs else "–"
            print(f"[lite0] {label}, {100 * s:.0f} %: {secs:.0f} s, top-1 {acc:.2f}", file=sys.stderr, flush=True)
            rows.append([f"unstructured, {label}", f"{100 * d['sparsity']:.0f}", med, f"{acc:.2f}",
                         f"{100 * np.mean(pred == ref_pred):.2f}", f"{acc - ref_acc:+.2f}", f"{secs:.0f}"])
    headers = ["variant", "sparsity %", "median layer output error", "top-1 %", "agree with fp32 %", "Δ pt",
               "prune s"]
    structured = _structured_rows(work, quick, x, y, ref_pred, calib_npz) if structured else None
    text = (f"### EfficientNet-Lite0: accuracy vs sparsity ({len(y)} val images, {n_calib} calib images)\n\n"
            + markdown_table(headers, rows))
    if structured:
        text += "\n\n" + structured
    return text


def _structured_rows(work: Path, quick: bool, x, y, ref_pred, calib_npz) -> str | None:
    """Part B's rows (structured channel pruning, with latency), when its bench module is there."""
    if not (Path(__file__).resolve().parent / "compression_structured.py").exists():
        return "structured rows: bench/compression_structured.py is not there yet (issue 5 part B)"
    import compression_structured

    out = compression_structured.lite0_structured_rows(work=work, quick=quick, val_x=x, val_y=y,
                                                       fp32_pred=ref_pred, calib_npz=calib_npz)
    return out if isinstance(out, str) else "\n".join(map(str, out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=["mnist", "lite0"])
    ap.add_argument("--no-structured", action="store_true", help="leave out part B's structured rows")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="onnxopt-bench-compression-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        parts = []
        if args.only in (None, "mnist"):
            parts.append(mnist_section(work, args.quick))
        if args.only in (None, "lite0"):
            parts.append(lite0_section(work, args.quick, structured=not args.no_structured))
        print("\n\n".join(parts))


if __name__ == "__main__":
    main()
