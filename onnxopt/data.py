"""The data format used for calibration and validation everywhere.

A data source is one of:

* a ``.npz`` file whose keys are the model's input names, samples stacked on axis 0;
* a folder of such ``.npz`` files (read in name order, one file at a time, same keys in all);
* a folder of images (jpg/jpeg/png/bmp/webp, in file-name order) turned into one input by an
  ``ImageSpec`` (needs Pillow: ``pip install onnxopt[images]``);
* with ``layout: feeds`` (``--data-layout feeds``), a ``.npz`` or a folder of them where each file is one
  complete feed, arrays exactly as the model takes them: scalars, recurrent state, batch on any axis
  (``FeedSource``). A feed counts as one sample; ``samples_in(batch)`` says how many samples a batch holds
  whatever the layout.

Everything is checked against the model's real inputs (graph inputs that are not initializers)
when the source is opened, so a mismatch is reported in one line before any model runs:
missing or extra keys, dtype, rank, static dims, sample counts, NaN/Inf, unreadable files.

Sources stream: ``batches()`` holds at most one file (or one image) plus one batch in memory and
always yields the same batches in the same order. A model whose batch dim is static (often 1) is
fed batches of exactly that size: ``DataSource.batch_limit`` says so and ``effective_batch_size()``
applies it.
"""

from __future__ import annotations

import csv
import itertools
import math
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt.errors import DataError
from onnxopt.recipe import DataConfig, ImageSpec

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})


# --------------------------------------------------------------------------------------------
# The model's inputs
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InputSpec:
    """One real model input: name, numpy dtype and shape (ints, dim names, or None if unknown)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...] | None  # None: rank unknown

    @property
    def static_batch(self) -> int | None:
        if self.shape and isinstance(self.shape[0], int):
            return self.shape[0]
        return None

    def shape_text(self) -> str:
        if self.shape is None:
            return "[any rank]"
        return "[" + ", ".join("?" if d is None else str(d) for d in self.shape) + "]"


def model_inputs(model: ir.Model | onnx.ModelProto) -> list[InputSpec]:
    """The graph inputs the caller must feed (inputs that are also initializers are excluded).

    A dim that is ``-1``, ``0`` or unset is dynamic (``None``), whatever exporter wrote it.
    """
    from onnxopt.model_io import as_ir

    specs = []
    for v in as_ir(model).graph.inputs:
        if v.is_initializer():
            continue
        if v.type is not None and not isinstance(v.type, ir.TensorType):
            kind = type(v.type).__name__.replace("Type", "").lower()
            raise DataError(f"model input {v.name!r} is not a tensor ({kind}); only tensor inputs can be fed "
                            "from data")
        try:
            dtype = np.dtype(v.dtype.numpy())
        except Exception:  # noqa: BLE001 - unknown/unsupported element type
            what = v.dtype.name if v.dtype is not None else "undefined"
            raise DataError(f"model input {v.name!r} has an element type numpy cannot hold ({what})") from None
        shape: tuple[int | str | None, ...] | None = None
        if v.shape is not None:
            shape = tuple((d if d > 0 else None) if isinstance(d, int) else (d.value or None) for d in v.shape)
        specs.append(InputSpec(v.name, dtype, shape))
    return specs


def _fmt_shape(shape) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def _names(items) -> str:
    return ", ".join(repr(x) for x in items)


# --------------------------------------------------------------------------------------------
# Checking and conforming arrays to the model
# --------------------------------------------------------------------------------------------
def _cast_plan(where: str, spec: InputSpec, got: np.dtype) -> tuple[np.dtype | None, str | None]:
    """(dtype to cast to or None, note) for data of dtype ``got`` fed to ``spec``; raises if unsafe."""
    want = spec.dtype
    if got == want:
        return None, None
    if got == np.float64 and want == np.float32:
        return want, f"{where}: input {spec.name!r} is float64, cast to float32"
    if got.kind == want.kind and np.can_cast(got, want, "safe"):
        # widening within one kind (int32 -> int64, float16 -> float32, uint8 -> uint16): exact
        return want, f"{where}: input {spec.name!r} is {got}, cast to {want}"
    if got.kind == "u" and want.kind == "i" and np.can_cast(got, want, "safe"):
        return want, f"{where}: input {spec.name!r} is {got}, cast to {want}"
    what = "float data for an integer input" if got.kind == "f" and want.kind in "iub" else "an unsafe cast"
    raise DataError(f"{where}: input {spec.name!r} is {got} but the model expects {want} "
                    f"(refusing {what}; convert the data to {want})")


def _check_shape(where: str, spec: InputSpec, shape: tuple[int, ...]) -> None:
    if spec.shape is None:
        return
    if len(shape) != len(spec.shape):
        raise DataError(f"{where}: input {spec.name!r} has shape {_fmt_shape(shape)} (rank {len(shape)}) but the "
                        f"model expects rank {len(spec.shape)} {spec.shape_text()} with samples on axis 0")
    for axis, (want, got) in enumerate(zip(spec.shape, shape, strict=True)):
        if axis == 0:
            continue  # the sample axis; a static batch dim is handled by batching
        if isinstance(want, int) and want > 0 and want != got:
            raise DataError(f"{where}: input {spec.name!r} has shape {_fmt_shape(shape)} but the model expects "
                            f"{spec.shape_text()} (axis {axis}: {got} != {want})")


def _check_finite(where: str, name: str, arr: np.ndarray, offset: int = 0) -> None:
    if arr.dtype.kind not in "fc" or arr.size == 0:
        return
    bad = ~np.isfinite(arr)
    if bad.any():
        count = int(bad.sum())
        first = int(np.argmax(bad.reshape(arr.shape[0], -1).any(axis=1))) + offset
        raise DataError(f"{where}: input {name!r} contains {count} NaN/Inf value(s) (first in sample {first})")


def _conform(where: str, specs: dict[str, InputSpec], arrays: dict[str, np.ndarray],
             notes: list[str] | None = None) -> tuple[dict[str, np.ndarray], int]:
    """Check keys, dtypes, shapes, counts and values of one file's arrays; cast safely. Returns (arrays, n)."""
    keys = set(arrays)
    missing = [n for n in specs if n not in keys]
    extra = sorted(keys - set(specs))
    if missing:
        raise DataError(f"{where}: missing input(s) {_names(missing)} (model inputs: {_names(specs)}; "
                        f"data has: {_names(sorted(keys)) or 'nothing'})")
    if extra:
        raise DataError(f"{where}: unexpected key(s) {_names(extra)} (model inputs: {_names(specs)})")
    out: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for name, spec in specs.items():
        arr = arrays[name]
        if not isinstance(arr, np.ndarray):
            arr = np.asarray(arr)
        if arr.dtype.kind in "OSUV":
            raise DataError(f"{where}: input {name!r} holds {arr.dtype} data; expected numbers of {spec.dtype}")
        if arr.ndim == 0:
            raise DataError(f"{where}: input {name!r} is a scalar; expected samples stacked on axis 0 "
                            f"with the model's shape {spec.shape_text()}")
        _check_shape(where, spec, arr.shape)
        target, note = _cast_plan(where, spec, arr.dtype)
        if target is not None:
            with np.errstate(over="ignore", invalid="ignore"):  # float64 -> float32 overflow shows as Inf below
                arr = arr.astype(target)
            if notes is not None and note and note not in notes:
                notes.append(note)
        _check_finite(where, name, arr)
        out[name] = arr
        counts[name] = arr.shape[0]
    if len(set(counts.values())) > 1:
        detail = ", ".join(f"{k}: {v}" for k, v in counts.items())
        raise DataError(f"{where}: inputs have different sample counts ({detail})")
    n = next(iter(counts.values()))
    return out, n


# --------------------------------------------------------------------------------------------
# Data sources
# --------------------------------------------------------------------------------------------
class Feed(dict):
    """One complete feed of a ``FeedSource`` (arrays as the model takes them): one sample, never sliced or
    stacked with another."""


def subset(batch: dict[str, np.ndarray], names) -> dict[str, np.ndarray]:
    """The entries of ``batch`` named in ``names``, keeping a feed a feed."""
    return type(batch)((k, v) for k, v in batch.items() if k in names)


def first(batch: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """The first ``n`` samples of a batch (a feed is one sample: kept whole)."""
    if isinstance(batch, Feed) or samples_in(batch) <= n:
        return batch
    return {k: v[:n] for k, v in batch.items()}


def samples_in(batch: dict[str, np.ndarray]) -> int:
    """How many samples a batch holds: 1 for a feed, else the length of axis 0."""
    if isinstance(batch, Feed):
        return 1
    for v in batch.values():
        return int(v.shape[0]) if np.ndim(v) else 1
    return 0


class DataSource:
    """Samples for a model, streamed in batches in a fixed order.

    Attributes: ``input_names``; ``description`` (e.g. ``"val.npz: 650 samples"``); ``total_samples``
    (before ``max_samples``); ``batch_limit`` (the model's static batch dim, or None); ``notes`` (casts,
    clamping, random data: things a report should mention).
    """

    input_names: list[str]
    description: str
    layout = "stacked"

    def __init__(self, specs: list[InputSpec], n: int, total: int, description: str, notes: list[str]):
        self.specs = {s.name: s for s in specs}
        self.input_names = [s.name for s in specs]
        self._n = n
        self.total_samples = total
        self.description = description
        self.notes = notes
        limits = [s.static_batch for s in specs if s.static_batch]
        self.batch_limit: int | None = min(limits) if limits else None

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.description}>"

    def effective_batch_size(self, batch_size: int) -> int:
        """``batch_size`` clamped to the model's static batch dim (if it has one)."""
        if batch_size < 1:
            raise DataError(f"batch size must be at least 1 (got {batch_size})")
        if self.batch_limit is not None:
            return min(batch_size, self.batch_limit)
        return batch_size

    def _chunks(self) -> Iterator[dict[str, np.ndarray]]:
        """Consecutive pieces of the data (a file, an image, a sample), already conformed."""
        raise NotImplementedError

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Batches of ``effective_batch_size(batch_size)`` samples (the last may be smaller)."""
        bs = self.effective_batch_size(batch_size)
        if bs < 1:  # never reached (effective_batch_size refuses it): a loop without progress is a hang
            raise DataError(f"batch size must be at least 1 (got {bs})")
        left = self._n
        pending: list[dict[str, np.ndarray]] = []
        pending_n = 0

        def flush():
            if len(pending) == 1:
                return pending[0]
            return {k: np.concatenate([p[k] for p in pending], axis=0) for k in self.input_names}

        for chunk in self._chunks():
            if left <= 0:
                break
            n = min(_count(chunk), left)
            left -= n
            start = 0
            while start < n:
                if pending and any(pending[0][k].shape[1:] != chunk[k].shape[1:] for k in self.input_names):
                    # a symbolic dim changes between files/images: they cannot share a batch
                    yield flush()
                    pending, pending_n = [], 0
                take = min(bs - pending_n, n - start)
                pending.append({k: v[start:start + take] for k, v in chunk.items()})
                pending_n += take
                start += take
                if pending_n == bs:
                    yield flush()
                    pending, pending_n = [], 0
        if pending:
            yield flush()


def _count(chunk: dict[str, np.ndarray]) -> int:
    return next(iter(chunk.values())).shape[0]


def _describe(base: str, n: int, total: int) -> str:
    return f"{base}: {n} samples" if n == total else f"{base}: {n} of {total} samples"


class ArraySource(DataSource):
    """In-memory arrays (for tests and programmatic use)."""

    def __init__(self, arrays: dict[str, np.ndarray], model: onnx.ModelProto, *, description: str = "arrays",
                 max_samples: int | None = None):
        specs = model_inputs(model)
        notes: list[str] = []
        arrays, total = _conform(description, {s.name: s for s in specs}, dict(arrays), notes)
        if total == 0:
            raise DataError(f"{description}: no samples (axis 0 has length 0)")
        n = min(total, max_samples) if max_samples else total
        self.arrays = arrays
        super().__init__(specs, n, total, _describe(description, n, total), notes)

    def _chunks(self):
        yield self.arrays


class NpzSource(DataSource):
    """One ``.npz`` file or a folder of them, streamed file by file."""

    def __init__(self, path: Path, files: list[Path], model: onnx.ModelProto, max_samples: int | None = None):
        specs = model_inputs(model)
        self.path = path
        self.npz_files = files
        self._spec_map = {s.name: s for s in specs}
        notes: list[str] = []
        self.counts: list[int] = []  # samples per file, for the files that are used
        total = 0
        # Every used file is read and checked up front, one at a time (keys, dtypes, shapes, counts,
        # NaN/Inf, corruption). Files past max_samples are only counted from their headers.
        for f in files:
            if max_samples and total >= max_samples:
                total += self._peek_count(f)
                continue
            arrays = self._read(f)
            _, n = _conform(self._where(f), self._spec_map, arrays, notes)
            del arrays
            self.counts.append(n)
            total += n
        used = sum(self.counts)
        if used == 0:
            raise DataError(f"{self._base()}: no samples (axis 0 has length 0)")
        self.files = files[: len(self.counts)]
        n = min(used, max_samples) if max_samples else used
        super().__init__(specs, n, total, _describe(self._base(), n, total), notes)

    def _base(self) -> str:
        if self.path.is_dir():
            return f"{self.path.name}/ ({len(self.npz_files)} .npz files)"
        return self.path.name

    def _where(self, f: Path) -> str:
        return f.name if self.path.is_dir() else self.path.name

    def _read(self, f: Path) -> dict[str, np.ndarray]:
        """Load every array of one file (the most a source ever holds at once)."""
        where = self._where(f)
        try:
            z = np.load(f, allow_pickle=False)
        except ValueError as exc:
            if "pickle" in str(exc).lower():  # numpy's guess for bytes that are neither zip nor .npy
                raise DataError(f"{where}: not an .npz archive (unrecognised content)") from None
            raise DataError(f"{where}: unreadable .npz ({_first_line(exc)})") from None
        except (OSError, EOFError, zipfile.BadZipFile) as exc:
            raise DataError(f"{where}: unreadable or corrupt .npz ({_first_line(exc)})") from None
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise DataError(f"{where}: not an .npz archive (a single .npy array?); save with np.savez")
        try:
            with z:
                _check_npz_claims(f, where)  # before numpy allocates what a header claims
                return {k: z[k] for k in z.files}
        except DataError:
            raise
        except ValueError as exc:
            if "pickle" in str(exc).lower():
                raise DataError(f"{where}: holds pickled objects; refused (save plain numeric arrays)") from None
            raise DataError(f"{where}: unreadable .npz ({_first_line(exc)})") from None
        except MemoryError:
            raise DataError(f"{where}: an array is too large to load into memory; split the data into a "
                            "folder of smaller .npz files") from None
        except Exception as exc:  # noqa: BLE001 - numpy's header parser raises SyntaxError, TokenError, ...
            raise DataError(f"{where}: unreadable or corrupt .npz ({_first_line(exc)})") from None

    def _peek_count(self, f: Path) -> int:
        """Samples in a file, from the first array's header (no data read)."""
        try:
            with zipfile.ZipFile(f) as zf:
                names = [m for m in zf.namelist() if m.endswith(".npy")]
                if names:
                    with zf.open(names[0]) as fh:
                        shape = _npy_header(fh)[0]
                    if shape:
                        return int(shape[0])
        except Exception:  # noqa: BLE001 - any problem: read the file properly, which reports it
            pass
        arrays = self._read(f)
        return _count(arrays) if arrays else 0

    def _chunks(self):
        for f in self.files:
            arrays, _ = _conform(self._where(f), self._spec_map, self._read(f))
            yield arrays
            del arrays


def _npy_header(fh) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from a .npy stream's header (nothing else is read)."""
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
    else:
        raise ValueError(f"unsupported .npy format version {version}")
    return tuple(int(d) for d in shape), np.dtype(dtype)


def _check_claim(where: str, what: str, shape, dtype: np.dtype, available: int) -> None:
    """Refuse a header whose shape needs more bytes than the file holds (corrupt, or a memory bomb)."""
    if dtype.hasobject:
        return  # pickled objects are refused when read
    need = math.prod(shape) * dtype.itemsize
    if need > available:
        raise DataError(f"{where}: {what} claims shape {_fmt_shape(shape)} {dtype} ({need:,} bytes) but the file "
                        f"holds {available:,} bytes for it; corrupt or truncated")


def _check_npz_claims(f: Path, where: str) -> None:
    with zipfile.ZipFile(f) as zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            try:
                with zf.open(info) as fh:
                    shape, dtype = _npy_header(fh)
                    header = fh.tell()
            except Exception as exc:  # noqa: BLE001 - numpy's header parser raises SyntaxError, TokenError, ...
                raise DataError(f"{where}: array {info.filename[:-4]!r} has a corrupt .npy header "
                                f"({_first_line(exc)})") from None
            _check_claim(where, f"array {info.filename[:-4]!r}", shape, dtype, info.file_size - header)


class ImageFolderSource(DataSource):
    """A folder of images, each read with Pillow and preprocessed by an ``ImageSpec``."""

    def __init__(self, path: Path, files: list[Path], model: onnx.ModelProto, spec: ImageSpec,
                 input_name: str | None = None, max_samples: int | None = None):
        self.Image = _pillow()
        specs = model_inputs(model)
        if input_name is None:
            if len(specs) != 1:
                raise DataError(f"{path.name}/: the model has {len(specs)} inputs ({_names(s.name for s in specs)}); "
                                "say which one the images feed with data.input_name")
            target = specs[0]
        else:
            by_name = {s.name: s for s in specs}
            if input_name not in by_name:
                raise DataError(f"{path.name}/: data.input_name {input_name!r} is not a model input "
                                f"(model inputs: {_names(by_name)})")
            target = by_name[input_name]
            if len(specs) > 1:
                others = [s.name for s in specs if s.name != input_name]
                raise DataError(f"{path.name}/: images feed only {input_name!r}, but the model also needs "
                                f"{_names(others)}; use .npz data for multi-input models")
        if spec.mean is not None or spec.std is not None:
            if spec.scale is not None or spec.offset is not None:
                raise DataError("images: give mean/std or scale/offset, not both")
        if target.dtype.kind not in "fiu":
            raise DataError(f"input {target.name!r} is {target.dtype}; images can only feed numeric inputs")
        normalizes = any(v is not None for v in (spec.mean, spec.std, spec.scale, spec.offset))
        if target.dtype.kind in "iu" and normalizes:
            raise DataError(f"input {target.name!r} is {target.dtype}: normalization (mean/std/scale/offset) "
                            "would produce fractions; drop it or feed a float input")
        self.path = path
        self.image_spec = spec
        self.target = target
        n_total = len(files)
        n = min(n_total, max_samples) if max_samples else n_total
        self.files = files[:n]
        self.all_files = files
        # Check every file opens as an image (header only), and the first fully, before anything runs.
        for f in self.files:
            try:
                with self.Image.open(f) as im:
                    im.size  # noqa: B018 - header parsed
            except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad files
                raise DataError(f"{f.name}: not a readable image ({_first_line(exc)})") from None
        self._check_image(self.files[0], self.load(self.files[0]))
        super().__init__([target], n, n_total, _describe(f"{path.name}/ ({n_total} images)", n, n_total), [])

    def load(self, f: Path) -> np.ndarray:
        """One preprocessed sample (no batch axis), in the model input's dtype."""
        return preprocess_image(f, self.image_spec, self.target.dtype, Image=self.Image)

    def _check_image(self, f: Path, x: np.ndarray) -> None:
        t = self.target
        if t.shape is None:
            return
        ok = len(t.shape) == x.ndim + 1 and all(
            not (isinstance(w, int) and w > 0) or w == g for w, g in zip(t.shape[1:], x.shape, strict=False))
        if not ok:
            raise DataError(f"{f.name}: preprocessed image has shape {_fmt_shape(x.shape)} ({self.image_spec.layout}) "
                            f"but input {t.name!r} expects {t.shape_text()} per batch; check resize/center_crop/"
                            "layout/grayscale in data.images")

    def _chunks(self):
        for f in self.files:
            x = self.load(f)
            self._check_image(f, x)
            yield {self.target.name: x[None]}


_RESAMPLE = {"bilinear": "BILINEAR", "bicubic": "BICUBIC", "nearest": "NEAREST"}


def preprocess_image(f: Path, spec: ImageSpec, dtype: np.dtype | None = None, *, Image=None) -> np.ndarray:
    """Read one image and apply ``spec`` in order: resize_short, resize, center_crop, channel order,
    normalize, layout. ``mean``/``std`` are per channel in the order fed to the model (after a BGR
    swap); a grayscale image uses their first value. Returns one sample without a batch axis."""
    Image = Image or _pillow()
    dtype = np.dtype(np.float32) if dtype is None else np.dtype(dtype)
    resample = getattr(Image.Resampling, _RESAMPLE[spec.interpolation])
    try:
        with Image.open(f) as im:
            im = im.convert("L" if spec.grayscale else "RGB")
            if spec.resize_short:
                w, h = im.size
                s = spec.resize_short
                # torchvision's rule: the long side is truncated, not rounded
                size = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
                if size != im.size:
                    im = im.resize(size, resample)
            if spec.resize:
                rh, rw = spec.resize
                if (rw, rh) != im.size:
                    im = im.resize((rw, rh), resample)
            if spec.center_crop:
                ch, cw = spec.center_crop
                w, h = im.size
                if ch > h or cw > w:
                    raise DataError(f"{f.name}: image is {h}x{w} (HxW) after resizing, smaller than center_crop "
                                    f"{ch}x{cw}; set resize_short or resize")
                top = int(round((h - ch) / 2.0))
                left = int(round((w - cw) / 2.0))
                im = im.crop((left, top, left + cw, top + ch))
            x = np.asarray(im, dtype=np.float32)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - corrupt/truncated image data
        raise DataError(f"{f.name}: cannot read image ({_first_line(exc)})") from None
    if x.ndim == 2:
        x = x[:, :, None]
    if spec.channel_order == "BGR" and not spec.grayscale:
        x = x[:, :, ::-1]
    nch = x.shape[2]
    if spec.mean is not None or spec.std is not None:
        mean = np.asarray(spec.mean if spec.mean is not None else (0.0, 0.0, 0.0), dtype=np.float32)
        std = np.asarray(spec.std if spec.std is not None else (1.0, 1.0, 1.0), dtype=np.float32)
        if nch == 1:  # grayscale: the first value applies
            mean, std = mean[:1], std[:1]
        x = (x - mean) / std
    if spec.scale is not None or spec.offset is not None:
        x = x * np.float32(spec.scale if spec.scale is not None else 1.0) + np.float32(spec.offset or 0.0)
    if spec.layout == "NCHW":
        x = x.transpose(2, 0, 1)
    x = np.ascontiguousarray(x)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.clip(np.rint(x), info.min, info.max).astype(dtype)
    return x.astype(dtype, copy=False)


class RandomSource(DataSource):
    """Seeded random samples shaped like the model's inputs; only for smoke tests (not real data)."""

    def __init__(self, model: onnx.ModelProto, n: int, seed: int = 0, batch_dims: dict | None = None):
        if n < 1:
            raise DataError(f"random data needs at least 1 sample (got {n})")
        specs = model_inputs(model)
        dims = dict(batch_dims or {})
        notes = [f"random data (seed {seed}): metrics on random inputs say little about real accuracy"]
        self.seed = seed
        self.sample_shapes: dict[str, tuple[int, ...]] = {}
        for s in specs:
            if s.shape is None:
                raise DataError(f"input {s.name!r} has unknown rank; random data needs its shape")
            shape = []
            for axis, d in enumerate(s.shape[1:], 1):
                if isinstance(d, int) and d > 0:
                    shape.append(d)
                elif isinstance(d, str) and d in dims:
                    shape.append(int(dims[d]))
                else:
                    label = d or f"axis {axis}"
                    shape.append(1)
                    notes.append(f"random data: input {s.name!r} dim {label!r} has no size; used 1 "
                                 "(pass batch_dims={name: size})")
            self.sample_shapes[s.name] = tuple(shape)
        super().__init__(specs, n, n, f"random data (seed {seed}): {n} samples", notes)
        for note in notes:
            warnings.warn(note, UserWarning, stacklevel=3)

    def _sample(self, i: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, i])  # sample i is the same whatever the batch size
        out = {}
        for name in self.input_names:
            spec, shape = self.specs[name], self.sample_shapes[name]
            if spec.dtype.kind == "f":
                x = rng.standard_normal(shape).astype(spec.dtype)
            elif spec.dtype.kind == "b":
                x = rng.integers(0, 2, shape).astype(bool)
            elif spec.dtype.kind in "iu":
                x = rng.integers(0, 10, shape).astype(spec.dtype)
            else:
                raise DataError(f"input {name!r} is {spec.dtype}; random data cannot fill it")
            out[name] = x[None]
        return out

    def _chunks(self):
        for i in range(self._n):
            yield self._sample(i)


class FeedSource(DataSource):
    """Complete feeds, one per ``.npz`` (or per dict given in the API), checked against the model's inputs
    exactly: every input present, nothing extra, the model's rank, its static dims on every axis (the
    batch axis included: -1, 0 or unset dims are dynamic), a dtype that casts safely, no NaN/Inf. Each
    feed is one sample and one batch."""

    layout = "feeds"

    def __init__(self, items: list[tuple[str, Any]], model, description: str, max_samples: int | None = None):
        specs = model_inputs(model)
        self._spec_map = {s.name: s for s in specs}
        notes: list[str] = []
        self.items = items[: max_samples] if max_samples else items
        if not self.items:
            raise DataError(f"{description}: no feeds")
        for where, load in self.items:  # every feed is read and checked up front, one at a time
            conform_feed(where, self._spec_map, load(), notes)
        n = len(self.items)
        super().__init__(specs, n, len(items), _describe(description, n, len(items)).replace("samples", "feeds"),
                         notes)

    def effective_batch_size(self, batch_size: int) -> int:
        if batch_size < 1:
            raise DataError(f"batch size must be at least 1 (got {batch_size})")
        return 1

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Each feed on its own, whatever ``batch_size``: feeds are never stacked or cut."""
        self.effective_batch_size(batch_size)
        for where, load in self.items:
            yield Feed(conform_feed(where, self._spec_map, load()))

    def _chunks(self):
        for where, load in self.items:
            yield Feed(conform_feed(where, self._spec_map, load()))


def conform_feed(where: str, specs: dict[str, InputSpec], arrays: dict[str, Any],
                 notes: list[str] | None = None) -> dict[str, np.ndarray]:
    """One feed checked against the model's inputs (see ``FeedSource``) and cast safely."""
    keys = set(arrays)
    missing = [n for n in specs if n not in keys]
    extra = sorted(keys - set(specs))
    if missing:
        raise DataError(f"{where}: missing input(s) {_names(missing)} (model inputs: {_names(specs)}; "
                        f"feed has: {_names(sorted(keys)) or 'nothing'})")
    if extra:
        raise DataError(f"{where}: unexpected key(s) {_names(extra)} (model inputs: {_names(specs)})")
    out = {}
    for name, spec in specs.items():
        arr = np.asarray(arrays[name])
        if arr.dtype.kind in "OSUV":
            raise DataError(f"{where}: input {name!r} holds {arr.dtype} data; expected numbers of {spec.dtype}")
        if spec.shape is not None:
            if arr.ndim != len(spec.shape):
                raise DataError(f"{where}: input {name!r} has shape {_fmt_shape(arr.shape)} (rank {arr.ndim}) but "
                                f"the model takes rank {len(spec.shape)} {spec.shape_text()}")
            for axis, (want, got) in enumerate(zip(spec.shape, arr.shape, strict=True)):
                if isinstance(want, int) and want > 0 and want != got:
                    raise DataError(f"{where}: input {name!r} has shape {_fmt_shape(arr.shape)} but the model "
                                    f"takes {spec.shape_text()} (axis {axis}: {got} != {want})")
        target, note = _cast_plan(where, spec, arr.dtype)
        if target is not None:
            with np.errstate(over="ignore", invalid="ignore"):
                arr = arr.astype(target)
            if notes is not None and note and note not in notes:
                notes.append(note)
        if arr.dtype.kind in "fc" and arr.size and not np.all(np.isfinite(arr)):
            bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
            raise DataError(f"{where}: input {name!r} contains {bad} NaN/Inf value(s)")
        out[name] = arr
    return out


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------
def _pillow():
    try:
        from PIL import Image
    except ImportError:
        raise DataError("image folders need Pillow: pip install onnxopt[images]") from None
    return Image


def _first_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[0][:200] if lines else type(exc).__name__


def open_data(path, model: ir.Model | onnx.ModelProto, spec: DataConfig | None = None) -> DataSource:
    """Open ``path`` (.npz, folder of .npz, or folder of images) as data for ``model``; checks it all first.

    ``random:N`` (or ``random:N:SEED``) asks explicitly for seeded random inputs, with a warning; symbolic
    dims take their sizes from ``spec.dims``. With ``spec.layout == "feeds"`` each .npz is one feed.
    """
    spec = spec or DataConfig()
    if isinstance(path, str) and path.startswith("random:"):
        parts = path.split(":")
        try:
            n, seed = int(parts[1]), int(parts[2]) if len(parts) > 2 else 0
        except (ValueError, IndexError):
            raise DataError(f"{path!r}: random data is written random:N or random:N:SEED") from None
        return random_data(model, n, seed=seed, batch_dims=spec.dims)
    p = Path(path)
    if not p.exists():
        raise DataError(f"data path {str(p)!r} does not exist")
    if spec.layout == "feeds":
        return _feed_files(p, model, spec)
    if p.is_file():
        if p.suffix.lower() != ".npz":
            kind = "an image" if p.suffix.lower() in IMAGE_EXTENSIONS else "a file"
            raise DataError(f"{p.name}: {kind} is not a data source; give a .npz file, a folder of .npz files, "
                            "or a folder of images")
        return NpzSource(p, [p], model, max_samples=spec.max_samples)
    if not p.is_dir():
        raise DataError(f"{p}: not a file or folder")
    entries = sorted((f for f in p.iterdir() if f.is_file() and not f.name.startswith(".")), key=lambda f: f.name)
    npz = [f for f in entries if f.suffix.lower() == ".npz"]
    images = [f for f in entries if f.suffix.lower() in IMAGE_EXTENSIONS]
    if npz and images:
        raise DataError(f"{p.name}/: mixes .npz and image files; keep one kind per folder")
    if npz:  # an images spec (for image folders) does not apply to .npz data
        return NpzSource(p, npz, model, max_samples=spec.max_samples)
    if images:
        if spec.images is None:
            raise DataError(f"{p.name}/: an image folder needs preprocessing settings: add data.images to the "
                            "recipe (e.g. images: {resize_short: 256, center_crop: 224, mean: [123.7, 116.3, "
                            "103.5], std: [58.4, 57.1, 57.4]}) or pass them on the command line")
        return ImageFolderSource(p, images, model, spec.images, input_name=spec.input_name,
                                 max_samples=spec.max_samples)
    sub = " (subfolders are not searched)" if any(f.is_dir() for f in p.iterdir()) else ""
    raise DataError(f"{p.name}/: no .npz or image files (jpg, jpeg, png, bmp, webp) in this folder{sub}")


def _feed_files(p: Path, model, spec: DataConfig) -> FeedSource:
    if p.is_file():
        if p.suffix.lower() != ".npz":
            raise DataError(f"{p.name}: feeds are .npz files (one feed each), or a folder of them")
        files = [p]
    elif p.is_dir():
        files = sorted((f for f in p.iterdir() if f.is_file() and f.suffix.lower() == ".npz"
                        and not f.name.startswith(".")), key=lambda f: f.name)
        if not files:
            raise DataError(f"{p.name}/: no .npz files (one feed each) in this folder")
    else:
        raise DataError(f"{p}: not a file or folder")
    reader = NpzSource.__new__(NpzSource)  # its file reader and checks, without opening it as stacked data
    reader.path = p

    def loader(f: Path):
        return lambda: reader._read(f)

    base = p.name if p.is_file() else f"{p.name}/"
    return FeedSource([(f.name, loader(f)) for f in files], model, base, max_samples=spec.max_samples)


def from_feeds(feeds: list[dict[str, Any]], model, *, description: str = "feeds",
               max_samples: int | None = None) -> FeedSource:
    """A source over in-memory feeds (each a dict of arrays exactly as the model takes them)."""
    return FeedSource([(f"{description}[{i}]", (lambda f=f: f)) for i, f in enumerate(feeds)], model, description,
                      max_samples=max_samples)


def from_arrays(arrays: dict[str, Any], model: onnx.ModelProto, *, description: str = "arrays",
                max_samples: int | None = None) -> DataSource:
    """A source over in-memory arrays, checked like a .npz file."""
    return ArraySource({k: np.asarray(v) for k, v in arrays.items()}, model, description=description,
                       max_samples=max_samples)


def random_data(model: onnx.ModelProto, n: int, seed: int = 0, batch_dims: dict | None = None) -> DataSource:
    """Seeded random inputs. Warns (and adds a note): metrics on random data are a smoke test only.

    ``batch_dims`` maps symbolic dim names (other than the sample axis) to sizes, e.g. ``{"seq": 128}``.
    """
    return RandomSource(model, n, seed=seed, batch_dims=batch_dims)


def load_labels(path, data: DataSource) -> np.ndarray:
    """Class labels for ``data`` as int64 [len(data)]: a ``.npy`` of ints, or a ``file,class_index`` CSV."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"labels path {str(p)!r} does not exist")
    if not p.is_file():
        raise DataError(f"{p.name}: labels must be a .npy or .csv file, not a folder")
    suffix = p.suffix.lower()
    if suffix == ".npy":
        labels = _labels_npy(p, data)
    elif suffix == ".csv":
        labels = _labels_csv(p, data)
    else:
        raise DataError(f"{p.name}: labels must be a .npy array of ints or a CSV with header file,class_index")
    if labels.size and labels.min() < 0:
        raise DataError(f"{p.name}: negative class index {int(labels.min())}")
    return labels


def _labels_npy(p: Path, data: DataSource) -> np.ndarray:
    try:
        with open(p, "rb") as fh:
            magic = fh.read(6)
            if magic.startswith(b"PK"):
                raise DataError(f"{p.name}: expected one .npy array of ints, got an archive")
            if magic != np.lib.format.MAGIC_PREFIX:
                raise DataError(f"{p.name}: not a .npy file (save labels with np.save)")
            fh.seek(0)
            shape, dtype = _npy_header(fh)
            _check_claim(p.name, "the labels array", shape, dtype, p.stat().st_size - fh.tell())
        arr = np.load(p, allow_pickle=False)
    except DataError:
        raise
    except MemoryError:
        raise DataError(f"{p.name}: labels too large to load") from None
    except Exception as exc:  # noqa: BLE001 - numpy raises ValueError, SyntaxError, TokenError, ... on garbage
        raise DataError(f"{p.name}: unreadable .npy ({_first_line(exc)})") from None
    if not isinstance(arr, np.ndarray):
        raise DataError(f"{p.name}: expected one .npy array of ints, got an archive")
    if arr.ndim != 1:
        raise DataError(f"{p.name}: labels must be 1-D [n] (got shape {_fmt_shape(arr.shape)})")
    if arr.dtype.kind not in "iu":
        raise DataError(f"{p.name}: labels must be integers (got {arr.dtype})")
    n = len(data)
    total = getattr(data, "total_samples", None)
    if len(arr) == n or (total is not None and len(arr) == total):
        return arr[:n].astype(np.int64)
    want = f"{n}" if total in (None, n) else f"{n} (or {total} before max_samples)"
    raise DataError(f"{p.name}: {len(arr)} labels but the data has {want} samples")


def _labels_csv(p: Path, data: DataSource) -> np.ndarray:
    files = getattr(data, "files", None)
    if not isinstance(data, ImageFolderSource) or files is None:
        raise DataError(f"{p.name}: CSV labels match image file names and need an image folder; "
                        "for .npz data give labels as a .npy array")
    mapping: dict[str, int] = {}
    try:
        with open(p, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            first = next(reader, [])
            header = [h.strip().lower() for h in first]
            rows: Any = reader
            if "file" in header and "class_index" in header:
                fi, ci = header.index("file"), header.index("class_index")
                start = 2
            elif len(first) == 2 and first[1].strip().lstrip("-").isdigit():
                # no header line: rows are file,class_index already
                fi, ci, start = 0, 1, 1
                rows = itertools.chain([first], reader)
            else:
                got = ",".join(first) or "nothing"
                raise DataError(f"{p.name}: CSV header must be 'file,class_index' (got {got!r})")
            for line_no, row in enumerate(rows, start):
                if not row or all(not c.strip() for c in row):
                    continue
                if len(row) <= max(fi, ci):
                    raise DataError(f"{p.name}: line {line_no}: expected file,class_index")
                name, value = Path(row[fi].strip()).name, row[ci].strip()
                try:
                    label = int(value)
                except ValueError:
                    raise DataError(f"{p.name}: line {line_no}: class_index {value!r} is not an integer") from None
                if name in mapping and mapping[name] != label:
                    raise DataError(f"{p.name}: line {line_no}: {name!r} labelled twice ({mapping[name]} and {label})")
                mapping[name] = label
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{p.name}: unreadable CSV ({_first_line(exc)})") from None
    out = np.empty(len(data), dtype=np.int64)
    for i, f in enumerate(files[: len(data)]):
        if f.name not in mapping:
            raise DataError(f"{p.name}: no label for image {f.name!r}")
        out[i] = mapping[f.name]
    return out
