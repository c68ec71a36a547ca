"""Loading and saving models safely.

Loading never follows an external-data reference out of the model's folder (the
CVE-2024-27318 class of bugs) and reports unreadable files in one line. Saving is
atomic: everything is written under a temporary name in the destination folder and
renamed into place, so a failed or interrupted run leaves no partial output.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError, EncodeError
from onnx import external_data_helper

from onnxopt.errors import ModelLoadError, OnnxoptError

# protobuf cannot serialize a single message above 2 GiB.
PROTOBUF_LIMIT = 2**31 - 1
# Above this many serialized bytes a model is saved with external data, checked through a file and
# handed to ONNX Runtime through a file. Tests lower it with ONNXOPT_EXTERNAL_THRESHOLD to exercise
# the large-model paths on small models.
EXTERNAL_THRESHOLD_ENV = "ONNXOPT_EXTERNAL_THRESHOLD"


def large_model_threshold() -> int:
    """Serialized size above which the large-model (external data) paths are used."""
    value = os.environ.get(EXTERNAL_THRESHOLD_ENV, "").strip()
    if not value:
        return PROTOBUF_LIMIT
    try:
        return max(0, min(int(value), PROTOBUF_LIMIT))
    except ValueError:
        raise OnnxoptError(f"{EXTERNAL_THRESHOLD_ENV}={value!r} is not a number of bytes") from None


def _varint_len(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def serialized_size(message) -> int:
    """Serialized size in bytes, also for messages above protobuf's 2 GiB limit.

    ``ByteSize()`` serializes, and fails, above 2 GiB; then the size is added up field by field.
    """
    try:
        return message.ByteSize()
    except EncodeError:
        return _summed_size(message)


def _summed_size(message) -> int:
    """``ByteSize()`` added up field by field (sub-messages through ``serialized_size``)."""
    shell = type(message)()
    total = 0
    for fd, value in message.ListFields():
        tag = _varint_len(fd.number << 3)
        if fd.message_type is not None:
            for item in (value if fd.is_repeated else [value]):
                n = serialized_size(item)
                total += tag + _varint_len(n) + n
        elif fd.type in (fd.TYPE_BYTES, fd.TYPE_STRING) and not fd.is_repeated:
            n = len(value) if isinstance(value, bytes) else len(value.encode("utf-8"))
            total += tag + _varint_len(n) + n
        elif fd.is_repeated:
            getattr(shell, fd.name).extend(value)
        else:
            setattr(shell, fd.name, value)
    return total + shell.ByteSize()


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
        if "\x00" in loc:
            raise ModelLoadError(f"{where} contains a NUL byte; refused")
        offset, length = _int_entry(info, "offset", where), _int_entry(info, "length", where)
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
        offset = offset or 0
        end = offset + length if length is not None else size
        if end > size:
            raise ModelLoadError(f"{where}: bytes {offset}..{end} lie beyond the end of the file ({size} bytes)")
        expected = _expected_bytes(tensor)
        if expected is not None and end - offset != expected:
            raise ModelLoadError(f"{where}: holds {end - offset} bytes but shape {list(tensor.dims)} needs {expected}")


def _int_entry(info: dict[str, str], key: str, where: str) -> int | None:
    value = info.get(key)
    if value is None or value == "":
        return None
    try:
        number = int(value)
    except ValueError:
        raise ModelLoadError(f"{where}: {key} {value!r} is not a whole number") from None
    if number < 0:
        raise ModelLoadError(f"{where}: {key} {number} is negative")
    return number


_SUB_BYTE = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4}
for _name in ("FLOAT4E2M1", "INT2", "UINT2"):
    if hasattr(onnx.TensorProto, _name):
        _SUB_BYTE[getattr(onnx.TensorProto, _name)] = 4 if _name == "FLOAT4E2M1" else 2

# Where a tensor keeps its values when it does not use raw_data (ONNX's TensorProto rules).
_TYPED_FIELD = {
    onnx.TensorProto.FLOAT: "float_data", onnx.TensorProto.COMPLEX64: "float_data",
    onnx.TensorProto.DOUBLE: "double_data", onnx.TensorProto.COMPLEX128: "double_data",
    onnx.TensorProto.INT64: "int64_data", onnx.TensorProto.UINT32: "uint64_data",
    onnx.TensorProto.UINT64: "uint64_data", onnx.TensorProto.STRING: "string_data",
}
_PER_ELEMENT = {onnx.TensorProto.COMPLEX64: 2, onnx.TensorProto.COMPLEX128: 2}


def _element_count(tensor: onnx.TensorProto) -> int:
    return math.prod(int(d) for d in tensor.dims)  # Python ints: no overflow on absurd dims


def _expected_bytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes of raw data the tensor's dims and type need (None for strings and unknown types)."""
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    try:
        np_dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    except Exception:  # noqa: BLE001 - unknown dtype is reported by the checker
        return None
    bits = _SUB_BYTE.get(tensor.data_type, np_dtype.itemsize * 8)
    return (_element_count(tensor) * bits + 7) // 8


def _check_tensor_sizes(model: onnx.ModelProto) -> None:
    """Every tensor's stored values must match its dims (raw bytes, or the typed value list)."""
    for tensor in external_data_helper._get_all_tensors(model):
        if any(d < 0 for d in tensor.dims):
            raise ModelLoadError(f"initializer {tensor.name!r}: negative dimension in shape {list(tensor.dims)}")
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            continue  # checked against the file in _check_external_data
        count = _element_count(tensor)
        if tensor.HasField("raw_data"):
            expected = _expected_bytes(tensor)
            if expected is not None and len(tensor.raw_data) != expected:
                raise ModelLoadError(
                    f"initializer {tensor.name!r}: raw data holds {len(tensor.raw_data)} bytes but shape "
                    f"{list(tensor.dims)} needs {expected}"
                )
            continue
        field = _TYPED_FIELD.get(tensor.data_type, "int32_data")
        if tensor.data_type in _SUB_BYTE or tensor.data_type == onnx.TensorProto.UNDEFINED:
            continue  # packed several to an int32; leave the arithmetic to the checker
        values = len(getattr(tensor, field))
        needed = count * _PER_ELEMENT.get(tensor.data_type, 1)
        if values != needed and not (values == 0 and count == 0):
            raise ModelLoadError(f"initializer {tensor.name!r}: {field} holds {values} values but shape "
                                 f"{list(tensor.dims)} needs {needed}")


def load_model(path: str | os.PathLike, *, load_external: bool = True, check: bool = True) -> onnx.ModelProto:
    """Load an ONNX model; raise ``ModelLoadError``/``InvalidModelError`` with a one-line reason if it cannot be used.

    Besides parsing, loading refuses external data that leaves the model's folder, tensors whose stored
    bytes disagree with their shape, and (``check=True``, the default) models that are structurally
    broken (dangling inputs, a value produced twice, cycles), fail the ONNX checker or strict shape
    inference, use opsets this onnx does not know, or declare tensors too large to allocate. Nodes that
    are merely out of order are sorted (with a warning), not refused.
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if not path.is_file():
        raise ModelLoadError(f"{path}: not a file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read ({exc.strerror or _short(exc)})") from None
    if not data:
        raise ModelLoadError(f"{path}: empty file, not an ONNX model")
    try:
        model = onnx.ModelProto.FromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not an ONNX model or truncated file ({_short(exc)})") from None
    del data
    if not model.HasField("graph") or model.ir_version == 0:
        raise ModelLoadError(f"{path}: not an ONNX model (protobuf without a graph or IR version)")
    base_dir = path.parent
    try:
        _check_tensor_sizes(model)
        _check_external_data(model, base_dir)
        if load_external and _external_locations(model):
            try:
                external_data_helper.load_external_data_for_model(model, str(base_dir))
            except (OSError, ValueError) as exc:
                raise ModelLoadError(f"cannot read external data ({_short(exc)})") from None
        if check:
            from onnxopt.checks import check_loaded_model

            if check_loaded_model(model, path):
                warnings.warn(f"{path.name}: nodes were not in topological order; sorted them", UserWarning,
                              stacklevel=2)
    except OnnxoptError as exc:
        raise type(exc)(f"{path}: {exc}") from None
    return model


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def model_size(model: onnx.ModelProto) -> int:
    """Serialized size in bytes (works above protobuf's 2 GiB limit too)."""
    return serialized_size(model)


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    force: bool = False,
    external_data: bool | None = None,
    external_threshold: int | None = None,
) -> Path:
    """Write ``model`` to ``path`` atomically.

    External data (``<file>.data`` beside the model) is used when asked, or
    automatically when the model would not fit a protobuf message (above
    ``external_threshold`` bytes; default ``large_model_threshold()``, i.e. 2 GiB unless
    ``ONNXOPT_EXTERNAL_THRESHOLD`` says otherwise). The caller's proto is never modified.

    Everything is written under a temporary folder beside ``path`` and renamed into place; the
    model file is renamed last, so it only ever appears complete and next to its data. If anything
    fails or the run is interrupted, nothing new is left behind and an existing ``<file>.data`` is
    put back.
    """
    path = Path(path)
    if path.is_dir():
        raise OnnxoptError(f"{path}: output is a directory")
    if path.exists() and not force:
        raise OnnxoptError(f"{path}: output exists; pass --force to overwrite")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OnnxoptError(f"{folder}: output folder does not exist")
    if not os.access(folder, os.W_OK):
        raise OnnxoptError(f"{folder}: output folder is not writable")
    threshold = external_threshold if external_threshold is not None else large_model_threshold()
    use_external = external_data if external_data is not None else serialized_size(model) > threshold
    if use_external and any(t.data_location == onnx.TensorProto.EXTERNAL and not t.HasField("raw_data")
                            for t, _ in _external_locations(model)):
        raise OnnxoptError(f"{path}: the model's external data was not loaded (load it with load_external=True)")
    data_name = path.name + ".data"
    final_data = folder / data_name
    tmp_dir: Path | None = None
    moved_aside = placed_data = False
    try:
        tmp_dir = Path(tempfile.mkdtemp(prefix=".onnxopt-", dir=folder))
        tmp_model = tmp_dir / path.name
        if use_external:
            to_write = onnx.ModelProto()
            to_write.CopyFrom(model)
            onnx.save_model(
                to_write,
                str(tmp_model),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_name,
                size_threshold=1024,
            )
            del to_write
            for written in (tmp_model, tmp_dir / data_name):
                if written.exists():
                    _fsync(written)
        else:
            with open(tmp_model, "wb") as f:
                f.write(model.SerializeToString(deterministic=True))
                f.flush()
                os.fsync(f.fileno())
        if use_external and (tmp_dir / data_name).exists():
            if final_data.exists() or final_data.is_symlink():
                os.replace(final_data, tmp_dir / "previous.data")  # put back if the commit fails
                moved_aside = True
            os.replace(tmp_dir / data_name, final_data)
            placed_data = True
        os.replace(tmp_model, path)  # the commit: the model appears complete, next to its data
        placed_data = moved_aside = False
    except BaseException as exc:
        with contextlib.suppress(OSError):
            if placed_data:
                os.unlink(final_data)
            if moved_aside and tmp_dir is not None:
                os.replace(tmp_dir / "previous.data", final_data)
        if isinstance(exc, OSError):
            raise OnnxoptError(f"{path}: cannot write output ({exc.strerror or _short(exc)})") from None
        raise
    finally:
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
