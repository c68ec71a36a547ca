"""Shared by the bench scripts: the real data sets in ../shared/models, sessions, timing, tables.

Preprocessed arrays are cached under ``bench/.cache`` (git-ignored) because decoding 650 JPEGs or
tokenizing 1,000 sentences costs more than many of the measurements themselves.
"""

from __future__ import annotations

import csv
import gzip
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxopt.profiling import session_options

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ONNXOPT_SHARED_MODELS", ROOT.parent / "shared" / "models"))
CACHE = ROOT / "bench" / ".cache"
IMAGENET = SHARED / "imagenet"
TEXT = SHARED / "text"
MNIST = SHARED / "mnist"
MAX_LEN = 128


def need(path: Path) -> Path:
    """Exit with a one-line message (not a traceback) when a shared file is missing."""
    if not path.exists():
        sys.exit(f"{path} is missing: the benchmarks need ../shared/models (see its README)")
    return path


# --------------------------------------------------------------------------------------------
# text (MiniLM SST-2)
# --------------------------------------------------------------------------------------------
def read_tsv(path: Path) -> tuple[list[str], np.ndarray]:
    """``sentence<TAB>label`` with a header line -> (sentences, int64 labels)."""
    with open(need(Path(path)), encoding="utf-8") as fh:
        rows = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    rows = [r for r in rows[1:] if r]
    return [r[0] for r in rows], np.array([int(r[1]) for r in rows], dtype=np.int64)


def tokenize(sentences: list[str], max_len: int = MAX_LEN) -> list[list[int]]:
    """WordPiece ids with [CLS]/[SEP], truncated to ``max_len``, unpadded."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(need(TEXT / "tokenizer.json")))
    tok.no_padding()  # the shipped tokenizer.json pads to 128 by default
    tok.enable_truncation(max_len)
    return [e.ids for e in tok.encode_batch(sentences)]


def pad_ids(ids: list[list[int]], length: int | None = None) -> dict[str, np.ndarray]:
    length = length or max(len(x) for x in ids)
    out = np.zeros((len(ids), length), dtype=np.int64)
    mask = np.zeros_like(out)
    for i, x in enumerate(ids):
        out[i, : len(x)] = x[:length]
        mask[i, : min(len(x), length)] = 1
    return {"input_ids": out, "attention_mask": mask, "token_type_ids": np.zeros_like(out)}


def text_feeds(ids: list[list[int]], batch: int, pad_to: int | None = None) -> list[dict[str, np.ndarray]]:
    """Feeds of ``batch`` sentences in the given order, padded per batch (or to ``pad_to``)."""
    return [pad_ids(ids[i:i + batch], pad_to) for i in range(0, len(ids), batch)]


def write_text_npz(tsv: Path, out: Path, n: int | None = None, pad_to: int = MAX_LEN) -> Path:
    """The first ``n`` sentences of ``tsv`` as an onnxopt data file (samples on axis 0, fixed length)."""
    out = Path(out)
    if out.exists():
        return out
    sentences, _ = read_tsv(tsv)
    feed = pad_ids(tokenize(sentences[:n]), pad_to)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.npz")
    np.savez(tmp, **feed)
    os.replace(tmp, out)
    return out


def sst2_dev() -> tuple[list[list[int]], np.ndarray]:
    sentences, labels = read_tsv(TEXT / "sst2_dev.tsv")
    return tokenize(sentences), labels


# --------------------------------------------------------------------------------------------
# images (EfficientNet-Lite0)
# --------------------------------------------------------------------------------------------
def _image_files(folder: Path) -> list[Path]:
    return sorted(f for f in need(folder).iterdir() if f.suffix.lower() in (".jpeg", ".jpg", ".png"))


def imagenet_arrays(folder: Path, n: int | None = None) -> np.ndarray:
    """README preprocessing: RGB, short side 256 (bilinear), centre crop 224, (p - 127) / 128, NCHW float32."""
    from onnxopt.data import preprocess_image
    from onnxopt.recipe import ImageSpec

    folder = Path(folder)
    files = _image_files(folder)[:n]
    cache = CACHE / f"{folder.name}_{len(files)}.npy"
    if cache.exists():
        return np.load(cache)
    spec = ImageSpec(resize_short=256, center_crop=224, mean=(127, 127, 127), std=(128, 128, 128))
    x = np.stack([preprocess_image(f, spec) for f in files]).astype(np.float32)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.save(cache, x)
    return x


def imagenet_val(n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The val/ images (sorted by file name) and their labels from val_labels.csv."""
    files = _image_files(IMAGENET / "val")[:n]
    with open(need(IMAGENET / "val_labels.csv"), encoding="utf-8") as fh:
        rows = [r for r in csv.reader(fh) if r and r[0] != "file"]
    by_name = {r[0]: int(r[1]) for r in rows}
    labels = np.array([by_name[f.name] for f in files], dtype=np.int64)
    return imagenet_arrays(IMAGENET / "val", n), labels


def imagenet_calib_npz(out: Path, n: int = 100) -> Path:
    """The first ``n`` calib/ images as an onnxopt data file keyed ``input``."""
    out = Path(out)
    if not out.exists():
        x = imagenet_arrays(IMAGENET / "calib", n)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp.npz")
        np.savez(tmp, input=x)
        os.replace(tmp, out)
    return out


# --------------------------------------------------------------------------------------------
# MNIST
# --------------------------------------------------------------------------------------------
def _idx(path: Path) -> np.ndarray:
    with gzip.open(need(path), "rb") as fh:
        data = fh.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def mnist_test(n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The 10k test set as float32 [N,1,28,28] normalised ``(p/255 - 0.5) / 0.5``, and int64 labels."""
    x = _idx(MNIST / "t10k-images-idx3-ubyte.gz")[:n]
    y = _idx(MNIST / "t10k-labels-idx1-ubyte.gz")[:n].astype(np.int64)
    return ((x.astype(np.float32) / 255.0 - 0.5) / 0.5)[:, None], y


# --------------------------------------------------------------------------------------------
# sessions, timing, sizes, tables
# --------------------------------------------------------------------------------------------
def session(model: onnx.ModelProto | str | Path, threads: int = 1, opt_level: str = "all",
            config: dict[str, str] | None = None) -> ort.InferenceSession:
    """A CPU session; ``config``: session config entries (e.g. the ones latency-placement recorded).

    With more than one thread, the pool does not spin between runs: the benches time many sessions
    interleaved in one process, and idle sessions' spinning threads would take the cores from the one
    being timed (Lite0 int8 at two threads: 2.9 ms alone, 9.0 ms interleaved with six spinning sessions)."""
    config = dict(config or {})
    if threads > 1:
        config.setdefault("session.intra_op.allow_spinning", "0")
    so = session_options(threads, opt_level, config)
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def run_batched(sess: ort.InferenceSession, x: np.ndarray, batch: int = 25, output: int = 0) -> np.ndarray:
    """One output of a single-input model over ``x`` in batches."""
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + batch]})[output] for i in range(0, len(x), batch)])


def interleaved_latency(sessions: dict[str, tuple[ort.InferenceSession, dict]], rounds: int = 20,
                        per_round: int = 5, warmup: int = 3) -> dict[str, float]:
    """Median ms per run of each session; every round times every session in turn (alternating order),
    so load from elsewhere on the machine hits all of them alike."""
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for s, feed in sessions.values():
        for _ in range(warmup):
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


def cpu_line() -> str:
    """The CPU these figures were measured on: model name, int8 flags, cores, ONNX Runtime version."""
    from onnxopt.isa import detect_cpu

    name = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    amx = "AMX" if " amx_int8" in flags else "no AMX"
    return (f"CPU: {name}, {detect_cpu().describe()}, {amx}, {os.cpu_count()} cores; "
            f"onnxruntime {ort.__version__}")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def file_mb(model: onnx.ModelProto | str | Path) -> float:
    if isinstance(model, onnx.ModelProto):
        return model.ByteSize() / 1e6
    return Path(model).stat().st_size / 1e6


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    text = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text)) if text else len(h) for i, h in enumerate(headers)]

    def line(vals: list[str]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths, strict=True)) + " |"

    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, text)])
