"""Pass infrastructure: passes, their results, and the manager that runs a pipeline.

Shaped after onnx_ir's pass infra: a pass is a small class with one ``call(model: ir.Model)``
returning a ``PassResult``; optional ``requires``/``ensures`` checks; pass-specific outputs
(ranges, scores, bit assignments) travel in subclasses of ``PassResult``.

Passes edit the IR in place. The manager hands them its own structural copy of the caller's model
(nodes and values copied, tensors shared: passes never write into a tensor, see ``onnxopt.graph``), so
the caller's model is left as it was at the cost of the graph, not of the weights. After each pass it
runs the cheap ``check_ir``; the full checker and strict shape inference run at load and before saving,
and after every pass only in strict mode (``strict=True`` or ``ONNXOPT_STRICT=1``).

A pass or pipeline given an ``onnx.ModelProto`` returns one: convenient for tests and for callers
that hold protobufs, at the cost of one conversion each way.
"""

from __future__ import annotations

import abc
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import onnx
import onnx_ir as ir
from pydantic import BaseModel, ConfigDict

from onnxopt.checks import check_ir, check_model
from onnxopt.errors import OnnxoptError, PassError, PreconditionError
from onnxopt.graph import all_nodes, clone_model, initializer_bytes, op_histogram
from onnxopt.model_io import from_proto, to_proto
from onnxopt.progress import SILENT, Progress

STRICT_ENV = "ONNXOPT_STRICT"


class PassConfig(BaseModel):
    """Base of every pass's static config; subclasses fix ``type`` to their pass name."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: str


@dataclass
class PassResult:
    model: ir.Model
    modified: bool
    # JSON-serialisable summary for the report (counts, names); keep it small.
    details: dict[str, Any] = field(default_factory=dict)


R = TypeVar("R", bound=PassResult)


@dataclass
class PassContext:
    """What a run provides to passes beyond the model: data, caches, progress."""

    calibration: Any = None  # onnxopt.data.DataSource, when --calib is given
    validation: Any = None
    labels: Any = None  # labels of ``validation``
    calibration_labels: Any = None  # labels of ``calibration`` (--calib-labels), for label-aware passes
    cache_dir: Path | None = None
    workers: int = 1
    seed: int = 0
    progress: Progress = field(default_factory=lambda: SILENT)
    # Results of the passes that already ran in this pipeline, in order: a pass that consumes
    # another's output (e.g. QDQ insertion reading calibration ranges) asks for it explicitly.
    results: list[PassResult] = field(default_factory=list)

    def latest(self, kind: type[R]) -> R | None:
        """The most recent result of type ``kind`` from an earlier pass, if any."""
        for r in reversed(self.results):
            if isinstance(r, kind):
                return r
        return None


class Pass(abc.ABC):
    """A graph pass. Subclasses set ``name``, ``summary`` and ``Config`` and implement ``call``."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    Config: ClassVar[type[PassConfig]]
    # Things the run must provide, e.g. {"calibration"}; checked before the pass runs.
    needs: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, config: PassConfig | None = None, context: PassContext | None = None):
        self.config = config if config is not None else self.Config(type=self.name)
        if self.config.type != self.name:
            raise ValueError(f"config of type {self.config.type!r} given to pass {self.name!r}")
        self.context = context if context is not None else PassContext()

    def requires(self, model: ir.Model) -> None:
        """Raise ``PreconditionError`` if the pass cannot run on ``model``."""
        for need in sorted(self.needs):
            if getattr(self.context, need, None) is None:
                raise PreconditionError(f"needs {need} data (pass it with --calib)" if need == "calibration"
                                        else f"needs {need} data")

    def ensures(self, model: ir.Model) -> None:
        """Raise ``PreconditionError`` if the pass's promise does not hold on its output."""
        return None

    @abc.abstractmethod
    def call(self, model: ir.Model) -> PassResult:
        """Rewrite ``model`` in place (or return another model) and say what changed."""

    def __call__(self, model: ir.Model | onnx.ModelProto) -> PassResult:
        if isinstance(model, onnx.ModelProto):  # protobuf in, protobuf out; the caller's proto is untouched
            result = self(from_proto(model))
            result.model = to_proto(result.model)
            return result
        self.requires(model)
        result = self.call(model)
        self.ensures(result.model)
        return result

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


class ProtoPass(Pass):
    """Adapter for a (third-party) pass written against ``onnx.ModelProto``, the API before the IR.

    ``requires``, ``call`` and ``ensures`` get a protobuf with every weight read in, so this costs a full
    copy of the model each way; every built-in pass works on the IR.
    """

    def __call__(self, model: ir.Model | onnx.ModelProto) -> PassResult:
        as_proto = isinstance(model, onnx.ModelProto)
        proto = model if as_proto else _materialized_proto(model)
        self.requires(proto)
        result = self.call(proto)
        self.ensures(result.model)
        if not as_proto:
            result.model = from_proto(result.model)
        return result


def _materialized_proto(model: ir.Model) -> onnx.ModelProto:
    from onnxopt.model_io import external_files

    if external_files(model):
        model = ir.external_data.load_to_model(clone_model(model))
    return to_proto(model)


@dataclass
class PassRecord:
    """What one pass did in a pipeline run (goes into the report)."""

    name: str
    config: dict[str, Any]
    modified: bool
    seconds: float
    nodes_before: int
    nodes_after: int
    ops_before: dict[str, int]
    ops_after: dict[str, int]
    initializer_bytes_before: int
    initializer_bytes_after: int
    details: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class PipelineResult:
    model: ir.Model | onnx.ModelProto  # the kind the pipeline was given
    records: list[PassRecord]
    results: list[PassResult]

    @property
    def modified(self) -> bool:
        return any(r.modified for r in self.records)


def strict_from_env() -> bool:
    return os.environ.get(STRICT_ENV, "").strip().lower() in ("1", "true", "yes")


class PassManager:
    """Runs passes in order, checking the model after each and recording what changed."""

    def __init__(self, passes: list[Pass], *, check: bool = True, strict: bool | None = None,
                 progress: Progress | None = None):
        self.passes = list(passes)
        self.check = check
        self.strict = strict_from_env() if strict is None else strict
        self.progress = progress or SILENT

    def run(self, model: ir.Model | onnx.ModelProto, *, copy: bool = True) -> PipelineResult:
        """Run the pipeline. The caller's model is not modified unless ``copy=False`` (an ``ir.Model`` the
        caller hands over, e.g. one just loaded from a file, is then rewritten in place)."""
        proto_in = isinstance(model, onnx.ModelProto)
        if proto_in:
            work = from_proto(model)
        else:
            work = clone_model(model) if copy else model
        records: list[PassRecord] = []
        results: list[PassResult] = []
        for p in self.passes:
            p.context.results = results  # every pass of this run sees the results so far
        ran: list[str] = []
        total = len(self.passes)
        for step, p in enumerate(self.passes, 1):
            ops_before = op_histogram(work.graph)
            nodes_before = len(work.graph)
            bytes_before = initializer_bytes(work.graph)
            known = {id(n) for n in all_nodes(work.graph)} if self.check else None
            self.progress.message(f"[{step}/{total}] {p.name}")
            start = time.perf_counter()
            try:
                result = p(work)
                if not isinstance(result.model, ir.Model):
                    raise TypeError(f"call() returned a {type(result.model).__name__}, not an ir.Model")
                if self.check:
                    check_ir(result.model, known_nodes=known)
                if self.strict:
                    check_model(result.model)
            except OnnxoptError as exc:
                raise self._named(p, step, ran, exc) from exc
            except Exception as exc:  # a bug in a pass must still name the pass
                raise self._named(p, step, ran, exc, internal=True) from exc
            seconds = time.perf_counter() - start
            work = result.model
            records.append(
                PassRecord(
                    name=p.name,
                    config=p.config.model_dump(),
                    modified=result.modified,
                    seconds=seconds,
                    nodes_before=nodes_before,
                    nodes_after=len(work.graph),
                    ops_before=ops_before,
                    ops_after=op_histogram(work.graph),
                    initializer_bytes_before=bytes_before,
                    initializer_bytes_after=initializer_bytes(work.graph),
                    details=result.details,
                )
            )
            results.append(result)
            ran.append(p.name)
        return PipelineResult(model=to_proto(work) if proto_in else work, records=records, results=results)

    @staticmethod
    def _named(p: Pass, step: int, ran: list[str], exc: BaseException, internal: bool = False) -> PassError:
        before = ", ".join(ran) if ran else "nothing"
        what = f"{type(exc).__name__}: " if internal else ""
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return PassError(f"pass '{p.name}' (step {step}, after {before}) failed: {what}{first}",
                         pass_name=p.name, ran_before=list(ran))
