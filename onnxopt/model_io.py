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
import onnx_ir as ir
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


def read_model_proto(path: str | os.PathLike, *, check: bool = True) -> onnx.ModelProto:
    """Parse ``path`` into a ``ModelProto`` whose external data stays on disk, after every safety check.

    Refuses (``ModelLoadError``/``InvalidModelError``, one line naming the file): unreadable, empty,
    truncated or non-model files; external data that leaves the model's folder or disagrees with the
    tensor's shape; and (``check=True``) models that are structurally broken (dangling inputs, a value
    produced twice, cycles), fail the ONNX checker or strict shape inference, use opsets this onnx does
    not know, or declare tensors too large to allocate. Nodes merely out of order are sorted (with a
    warning). No external data file is read.
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
    try:
        _check_tensor_sizes(model)
        _check_external_data(model, path.parent)
        if check:
            from onnxopt.checks import check_loaded_model

            if check_loaded_model(model, path):
                warnings.warn(f"{path.name}: nodes were not in topological order; sorted them", UserWarning,
                              stacklevel=3)
    except OnnxoptError as exc:
        raise type(exc)(f"{path}: {exc}") from None
    return model


def load_model(path: str | os.PathLike, *, check: bool = True) -> ir.Model:
    """Load an ONNX model into the in-memory IR; refuse it in one line if it cannot be used.

    Every check of ``read_model_proto`` runs first. Weights held in external data stay on disk,
    memory-mapped and read only when a pass asks for them; embedded weights are not copied.
    """
    path = Path(path)
    proto = read_model_proto(path, check=check)
    try:
        return from_proto(proto, base_dir=path.parent)
    except OnnxoptError:
        raise
    except Exception as exc:  # noqa: BLE001 - onnx_ir refuses what the proto checks let through
        raise ModelLoadError(f"{path}: cannot read the model ({_short(exc)})") from None


def from_proto(proto: onnx.ModelProto, base_dir: str | os.PathLike | None = None) -> ir.Model:
    """The IR of ``proto``; its tensors are wrapped, not copied (passes never write to them)."""
    model = ir.serde.deserialize_model(proto)
    if base_dir is not None:
        for graph in model.graphs():
            ir.external_data.set_base_dir(graph, os.path.abspath(base_dir))
    return model


def to_proto(model: ir.Model | onnx.ModelProto) -> onnx.ModelProto:
    """A ``ModelProto`` of the model (weights copied in, external references kept as references).

    onnx_ir also describes every initializer in ``value_info``; that repeats the tensor's own type and
    shape, so it is left out: a model read and written unchanged keeps its bytes.
    """
    if isinstance(model, onnx.ModelProto):
        return model
    proto = ir.serde.serialize_model(model)
    _drop_initializer_value_info(proto.graph)
    return proto


def _drop_initializer_value_info(graph: onnx.GraphProto) -> None:
    inits = {t.name: t for t in graph.initializer}
    keep = []
    for vi in graph.value_info:
        t = inits.get(vi.name)
        tt = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
        redundant = (t is not None and tt is not None and tt.elem_type == t.data_type and tt.HasField("shape")
                     and [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim] == list(t.dims)
                     and not vi.doc_string and not vi.metadata_props)
        if not redundant:
            keep.append(vi)
    if len(keep) != len(graph.value_info):
        del graph.value_info[:]
        graph.value_info.extend(keep)
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                _drop_initializer_value_info(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    _drop_initializer_value_info(g)


def _save_external(model: ir.Model, path: Path, data_name: str) -> None:
    """``ir.save`` with external data (weights streamed one at a time; weights already in a data file are
    copied file to file), written through ``to_proto``. The model is left as it was."""
    values = [v for graph in model.graphs() for v in graph.initializers.values()]
    tensors = [v.const_value for v in values]
    try:
        ir.external_data.unload_from_model(model, path.parent, data_name, size_threshold_bytes=1024)
        proto = to_proto(model)
        with open(path, "wb") as f:
            f.write(proto.SerializeToString(deterministic=True))
    finally:
        for value, tensor in zip(values, tensors, strict=True):
            value.const_value = tensor


def as_ir(model: ir.Model | onnx.ModelProto) -> ir.Model:
    return model if isinstance(model, ir.Model) else from_proto(model)


def external_files(model: ir.Model) -> set[Path]:
    """Data files the model's lazily loaded weights live in."""
    found = set()
    for graph in model.graphs():
        for v in graph.initializers.values():
            if isinstance(v.const_value, ir.ExternalTensor):
                found.add(Path(v.const_value.path).resolve())
    return found


def has_external_data(model: ir.Model | onnx.ModelProto) -> bool:
    if isinstance(model, onnx.ModelProto):
        return bool(_external_locations(model))
    return bool(external_files(model))


def estimated_size(model: ir.Model | onnx.ModelProto) -> int:
    """Serialized size in bytes, without serializing: weights from dtype and shape, plus the graph."""
    if isinstance(model, onnx.ModelProto):
        return serialized_size(model)
    from onnxopt.graph import all_nodes, initializer_bytes

    total = 0
    for graph in model.graphs():
        total += initializer_bytes(graph)
    return total + 200 * sum(1 for _ in all_nodes(model.graph)) + 4096


def content_digest(model: ir.Model) -> str:
    """Content hash of the model: its weight-less skeleton, then the bytes of every large weight, one weight at a
    time (a multi-GB model is never serialized as a whole). Deterministic; a cache key."""
    import hashlib

    from onnxopt.checks import KEEP_VALUES_BYTES, skeleton
    from onnxopt.graph import tensor_bytes

    h = hashlib.sha256()
    h.update(skeleton(model).SerializeToString(deterministic=True))
    for graph in model.graphs():
        for name, value in graph.initializers.items():
            tensor = value.const_value
            if tensor is None or (not isinstance(tensor, ir.ExternalTensor)
                                  and tensor_bytes(tensor) <= KEEP_VALUES_BYTES):
                continue  # small ones are in the skeleton
            h.update(f"{name}|{tensor.dtype}|{tensor.shape}|".encode())
            h.update(tensor.tobytes())
            if isinstance(tensor, ir.ExternalTensor):
                tensor.release()
    return h.hexdigest()


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def model_size(model: ir.Model | onnx.ModelProto) -> int:
    """Serialized size in bytes (estimated for the IR; works above protobuf's 2 GiB limit too)."""
    return estimated_size(model)


def save_model(
    model: ir.Model | onnx.ModelProto,
    path: str | os.PathLike,
    *,
    force: bool = False,
    external_data: bool | None = None,
    external_threshold: int | None = None,
    check: bool = True,
) -> Path:
    """Write ``model`` to ``path`` atomically (``stage_model`` then ``commit``); returns ``path``."""
    staged = stage_model(model, path, force=force, external_data=external_data,
                         external_threshold=external_threshold, check=check)
    return staged.commit()


def stage_model(
    model: ir.Model | onnx.ModelProto,
    path: str | os.PathLike,
    *,
    force: bool = False,
    external_data: bool | None = None,
    external_threshold: int | None = None,
    check: bool = True,
) -> StagedModel:
    """Write ``model`` under a temporary folder beside ``path``, checked, ready to be renamed into place.

    External data (``<file>.data`` beside the model) is used when asked, when the model's weights
    already live in external data (the input's layout is kept), or when the model would not fit a
    protobuf message (above ``external_threshold`` bytes; default ``large_model_threshold()``, i.e.
    2 GiB unless ``ONNXOPT_EXTERNAL_THRESHOLD`` says otherwise). Weights are streamed to the data
    file one at a time; weights still in the input's data file are copied file to file.

    ``check``: the written file gets the full ONNX checker and strict shape inference (path-based,
    so no size limit) before it can be committed. The caller's model is never modified.
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
    data_name = path.name + ".data"
    final_data = folder / data_name
    is_proto = isinstance(model, onnx.ModelProto)
    if is_proto and any(t.data_location == onnx.TensorProto.EXTERNAL and not t.HasField("raw_data")
                        for t, _ in _external_locations(model)):
        raise OnnxoptError(f"{path}: the model's external data was not loaded (load it with load_model)")
    if not is_proto and final_data.exists() and final_data.resolve() in external_files(model):
        raise OnnxoptError(f"{path}: would overwrite {data_name}, which holds the weights of the model being "
                           "saved; choose another output name")
    threshold = external_threshold if external_threshold is not None else large_model_threshold()
    if external_data is not None:
        use_external = external_data
    else:
        use_external = has_external_data(model) or estimated_size(model) > threshold
    try:
        tmp_dir = Path(tempfile.mkdtemp(prefix=".onnxopt-", dir=folder))
    except OSError as exc:
        raise OnnxoptError(f"{path}: cannot write output ({exc.strerror or _short(exc)})") from None
    staged = StagedModel(path, tmp_dir, data_name if use_external else None)
    try:
        tmp_model = tmp_dir / path.name
        if use_external:
            _save_external(as_ir(model), tmp_model, data_name)
            for written in (tmp_model, tmp_dir / data_name):
                if written.exists():
                    _fsync(written)
        else:
            proto = model if is_proto else _embedded_proto(model)
            with open(tmp_model, "wb") as f:
                f.write(proto.SerializeToString(deterministic=True))
                f.flush()
                os.fsync(f.fileno())
            del proto
        if check:
            from onnxopt.checks import check_file

            check_file(tmp_model)
    except BaseException as exc:
        staged.discard()
        if isinstance(exc, OSError):
            raise OnnxoptError(f"{path}: cannot write output ({exc.strerror or _short(exc)})") from None
        raise
    return staged


def _embedded_proto(model: ir.Model) -> onnx.ModelProto:
    """The model as one protobuf message, external weights read in (the model itself is left as it is)."""
    if external_files(model):
        from onnxopt.graph import clone_model

        model = ir.external_data.load_to_model(clone_model(model))
    return to_proto(model)


class StagedModel:
    """A checked model written under a temporary folder beside its destination.

    ``commit()`` renames it into place (the data file first, the model last, so the model only ever
    appears complete and next to its data; if the commit fails an existing data file is put back);
    ``discard()`` removes it. Also a context manager that discards whatever was not committed.
    """

    def __init__(self, path: Path, tmp_dir: Path, data_name: str | None):
        self.destination = path
        self.tmp_dir: Path | None = tmp_dir
        self.data_name = data_name
        self.path = tmp_dir / path.name  # the staged model, loadable by path (ONNX Runtime, checks)

    def commit(self) -> Path:
        if self.tmp_dir is None:
            raise OnnxoptError(f"{self.destination}: staged model was already committed or discarded")
        folder = self.destination.parent if str(self.destination.parent) else Path(".")
        final_data = folder / self.data_name if self.data_name else None
        moved_aside = placed_data = False
        try:
            if final_data is not None and (self.tmp_dir / self.data_name).exists():
                if final_data.exists() or final_data.is_symlink():
                    os.replace(final_data, self.tmp_dir / "previous.data")  # put back if the commit fails
                    moved_aside = True
                os.replace(self.tmp_dir / self.data_name, final_data)
                placed_data = True
            os.replace(self.path, self.destination)  # the commit
            placed_data = moved_aside = False
        except BaseException as exc:
            with contextlib.suppress(OSError):
                if placed_data:
                    os.unlink(final_data)
                if moved_aside:
                    os.replace(self.tmp_dir / "previous.data", final_data)
            self.discard()
            if isinstance(exc, OSError):
                raise OnnxoptError(f"{self.destination}: cannot write output ({exc.strerror or _short(exc)})") \
                    from None
            raise
        self.discard()
        return self.destination

    def discard(self) -> None:
        if self.tmp_dir is not None:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
            self.tmp_dir = None

    def __enter__(self) -> StagedModel:
        return self

    def __exit__(self, *exc) -> None:
        self.discard()


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
