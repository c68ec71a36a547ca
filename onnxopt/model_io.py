"""Loading and saving models safely.

Loading never follows an external-data reference out of the model's folder (the
CVE-2024-27318 class of bugs) and reports unreadable files in one line. Saving is
atomic: everything is written under a temporary name in the destination folder and
renamed into place, so a failed or interrupted run leaves no partial output.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from onnxopt.errors import ModelLoadError, OnnxoptError

# protobuf cannot serialize a single message above 2 GiB.
PROTOBUF_LIMIT = 2**31 - 1


def _external_locations(model: onnx.ModelProto) -> list[tuple[onnx.TensorProto, dict[str, str]]]:
    found = []
    for tensor in external_data_helper._get_all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            found.append((tensor, {e.key: e.value for e in tensor.external_data}))
    return found


def _check_external_data(model: onnx.ModelProto, base_dir: Path) -> None:
    root = base_dir.resolve()
    for tensor, info in _external_locations(model):
        loc = info.get("location", "")
        where = f"tensor {tensor.name!r}: external data location {loc!r}"
        if not loc:
            raise ModelLoadError(f"{where} is empty")
        p = Path(loc)
        if p.is_absolute() or loc.startswith(("/", "\\")) or (len(loc) > 1 and loc[1] == ":"):
            raise ModelLoadError(f"{where} is an absolute path; refused (must be relative to the model's folder)")
        if ".." in p.parts or ".." in loc.replace("\\", "/").split("/"):
            raise ModelLoadError(f"{where} contains '..'; refused (must stay inside the model's folder)")
        full = base_dir / p
        if full.is_symlink() or any(q.is_symlink() for q in full.parents if q != base_dir and str(q).startswith(str(base_dir))):
            raise ModelLoadError(f"{where} is a symbolic link; refused")
        try:
            resolved = full.resolve(strict=True)
        except FileNotFoundError:
            raise ModelLoadError(f"{where} does not exist next to the model") from None
        if root != resolved and root not in resolved.parents:
            raise ModelLoadError(f"{where} resolves outside the model's folder; refused")
        if not resolved.is_file():
            raise ModelLoadError(f"{where} is not a regular file")
        size = resolved.stat().st_size
        offset = int(info.get("offset", 0) or 0)
        length = info.get("length")
        end = offset + int(length) if length else size
        if offset < 0 or end > size:
            raise ModelLoadError(f"{where}: bytes {offset}..{end} lie beyond the end of the file ({size} bytes)")


def _check_tensor_sizes(model: onnx.ModelProto) -> None:
    for tensor in external_data_helper._get_all_tensors(model):
        if not tensor.HasField("raw_data") or tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
            continue
        try:
            np_dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        except Exception:  # noqa: BLE001 - unknown dtype is reported by the checker
            continue
        count = int(np.prod(tensor.dims, dtype=np.int64)) if tensor.dims else 1
        bits = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4}.get(tensor.data_type, np_dtype.itemsize * 8)
        expected = (count * bits + 7) // 8
        if len(tensor.raw_data) != expected:
            raise ModelLoadError(
                f"initializer {tensor.name!r}: raw data holds {len(tensor.raw_data)} bytes but shape "
                f"{list(tensor.dims)} needs {expected}"
            )


def load_model(path: str | os.PathLike, *, load_external: bool = True) -> onnx.ModelProto:
    """Load an ONNX model; raise ``ModelLoadError`` with a one-line reason if it cannot be used."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if not path.is_file():
        raise ModelLoadError(f"{path}: not a file")
    data = path.read_bytes()
    if not data:
        raise ModelLoadError(f"{path}: empty file, not an ONNX model")
    try:
        model = onnx.ModelProto.FromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not an ONNX model or truncated file ({_short(exc)})") from None
    if not model.HasField("graph") or model.ir_version == 0:
        raise ModelLoadError(f"{path}: not an ONNX model (protobuf without a graph or IR version)")
    base_dir = path.parent
    _check_external_data(model, base_dir)
    if load_external and _external_locations(model):
        try:
            external_data_helper.load_external_data_for_model(model, str(base_dir))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{path}: cannot read external data ({_short(exc)})") from None
    _check_tensor_sizes(model)
    return model


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def model_size(model: onnx.ModelProto) -> int:
    """Serialized size in bytes (initializers included, wherever they are stored)."""
    return model.ByteSize()


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    force: bool = False,
    external_data: bool | None = None,
    external_threshold: int = PROTOBUF_LIMIT,
) -> Path:
    """Write ``model`` to ``path`` atomically.

    External data (``<file>.data`` beside the model) is used when asked, or
    automatically when the model would not fit a protobuf message (above
    ``external_threshold`` bytes). The caller's proto is never modified.
    """
    path = Path(path)
    if path.exists() and not force:
        raise OnnxoptError(f"{path}: output exists; pass --force to overwrite")
    if path.exists() and path.is_dir():
        raise OnnxoptError(f"{path}: output is a directory")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OnnxoptError(f"{folder}: output folder does not exist")
    if not os.access(folder, os.W_OK):
        raise OnnxoptError(f"{folder}: output folder is not writable")
    use_external = external_data if external_data is not None else model.ByteSize() > external_threshold
    data_name = path.name + ".data"
    tmp_dir = Path(tempfile.mkdtemp(prefix=".onnxopt-", dir=folder))
    try:
        tmp_model = tmp_dir / path.name
        if use_external:
            to_write = onnx.ModelProto()
            to_write.CopyFrom(model)
            # Tensors already external point at files we do not own; bring them in first.
            onnx.save_model(
                to_write,
                str(tmp_model),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_name,
                size_threshold=1024,
            )
        else:
            with open(tmp_model, "wb") as f:
                f.write(model.SerializeToString(deterministic=True))
                f.flush()
                os.fsync(f.fileno())
        if use_external and (tmp_dir / data_name).exists():
            os.replace(tmp_dir / data_name, folder / data_name)
        os.replace(tmp_model, path)
    except OSError as exc:
        raise OnnxoptError(f"{path}: cannot write output ({_short(exc)})") from None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w"):
    """Open a temporary file beside ``path``; rename it into place only if the block succeeds."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
