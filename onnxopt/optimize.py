"""The two jobs users run: optimize a model with a recipe, and validate a candidate against a reference.

The CLI is a thin layer over these functions; they are the Python API as well.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import onnx_ir as ir

from onnxopt.errors import OnnxoptError
from onnxopt.inspect import ModelSummary, summarize
from onnxopt.model_io import has_external_data, load_model, stage_model
from onnxopt.pass_infra import PassContext, PassManager, PipelineResult
from onnxopt.progress import SILENT, Progress
from onnxopt.recipe import DataConfig, GateConfig, Recipe, load_recipe


@dataclass
class OptimizeResult:
    model: ir.Model
    pipeline: PipelineResult
    before: ModelSummary
    after: ModelSummary
    recipe: Recipe
    validation: object | None = None  # onnxopt.validate.ValidationReport
    output: Path | None = None
    reports: list[Path] = field(default_factory=list)
    target: str | None = None  # hand-off target (onnxopt.targets) the recipe was laid out for
    target_notes: list[str] = field(default_factory=list)  # what the target changed, where it was validated
    target_violations: list[str] = field(default_factory=list)  # the written model against the target's rules

    @property
    def passed(self) -> bool:
        return (self.validation is None or self.validation.passed) and not self.target_violations


def _recipe(recipe: Recipe | str | Path | None) -> Recipe:
    if recipe is None:
        return load_recipe("cleanup")
    if isinstance(recipe, Recipe):
        return recipe
    return load_recipe(recipe)


def merge_data(data: DataConfig, layout: str | None = None, dims: dict[str, int] | None = None) -> DataConfig:
    """The recipe's data section with what the command line says (layout, symbolic dim sizes) on top."""
    update: dict = {}
    if layout is not None:
        update["layout"] = layout
    if dims:
        update["dims"] = {**data.dims, **dims}
    if not update:
        return data
    try:
        return DataConfig.model_validate({**data.model_dump(), **update})
    except ValueError as exc:
        raise OnnxoptError(f"data options: {str(exc).splitlines()[-1].strip()}") from None


def merge_gate(gate: GateConfig, overrides: dict | None) -> GateConfig:
    """Thresholds given on the command line win over the recipe's."""
    extra = {k: v for k, v in (overrides or {}).items() if v is not None}
    return gate.model_copy(update=extra) if extra else gate


def _check_output_path(output: Path, force: bool, source: Path) -> None:
    if output.resolve() == source.resolve():
        raise OnnxoptError(f"{output}: output would overwrite the input model; choose another path")
    if output.exists() and not force:
        raise OnnxoptError(f"{output}: output exists; pass --force to overwrite")
    if output.is_dir():
        raise OnnxoptError(f"{output}: output is a directory")
    existing = next(p for p in [output.parent, *output.parent.parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise OnnxoptError(f"{output.parent}: cannot write the output there")


def _check_report_dir(report_dir: str | Path | None) -> None:
    """Fail before any work when reports could not be written (they are written after it)."""
    if report_dir is None:
        return
    d = Path(report_dir)
    if d.exists() and not d.is_dir():
        raise OnnxoptError(f"{d}: report path is not a folder")


def optimize(
    model_path: str | Path,
    output: str | Path | None = None,
    *,
    recipe: Recipe | str | Path | None = None,
    calib: str | Path | None = None,
    val: str | Path | None = None,
    labels: str | Path | None = None,
    report_dir: str | Path | None = None,
    gate: dict | None = None,
    force: bool = False,
    keep_failed: bool = False,
    batch_size: int | None = None,
    progress: Progress | None = None,
    command: str | None = None,
    calib_labels: str | Path | None = None,
    workers: int = 1,
    localize: bool | None = None,
    strict: bool | None = None,
    data_layout: str | None = None,
    dims: dict[str, int] | None = None,
    target: str | None = None,
) -> OptimizeResult:
    """Run ``recipe`` on the model at ``model_path``; validate on ``val`` if given; save to ``output``.

    The model is written (checked, under a temporary name beside ``output``) before validation, so the
    gate runs ONNX Runtime on exactly the bytes that will be delivered; it is renamed into place only when
    the gate passes (or ``keep_failed``), so a later pipeline step cannot pick up a rejected model.
    Reports are written either way. ``strict``: the full checker and shape inference after every pass.
    ``data_layout`` ("stacked" or "feeds") and ``dims`` (symbolic dim sizes for ``random:N`` data) override
    the recipe's data section. ``target`` (or the recipe's ``target:``) lays the model out for a hand-off
    runtime (``onnxopt.targets``): the recipe's passes are configured for it, the written model is checked
    against its rules (a violation fails like the gate) and the gate runs in its runtime where installed.
    """
    from onnxopt.data import load_labels, open_data

    progress = progress or SILENT
    model_path = Path(model_path)
    rec = _recipe(recipe)
    tgt, target_notes = None, []
    if target is not None or rec.target is not None:
        from onnxopt.targets import apply_target, load_target

        tgt = load_target(target if target is not None else rec.target)
        rec, target_notes = apply_target(rec, tgt)
    if output is not None:
        _check_output_path(Path(output), force, model_path)
    _check_report_dir(report_dir)
    if labels is not None and val is None:
        raise OnnxoptError("--labels needs --val (the labels belong to the validation data)")
    if calib_labels is not None and calib is None:
        raise OnnxoptError("--calib-labels needs --calib (the labels belong to the calibration data)")
    data_cfg = merge_data(rec.data, data_layout, dims)
    model = load_model(model_path)
    before = summarize(model, model_path)
    # The output keeps the input's layout: weights in external data stay in external data.
    external = True if has_external_data(model) else None
    context = PassContext(progress=progress, workers=workers)
    if calib is not None:
        context.calibration = open_data(calib, model, data_cfg)
        if calib_labels is not None:
            context.calibration_labels = load_labels(calib_labels, context.calibration)
    val_data = open_data(val, model, data_cfg) if val is not None else None
    val_labels = load_labels(labels, val_data) if labels is not None else None
    context.validation = val_data
    context.labels = val_labels

    passes = rec.build_passes(context)
    # The model was loaded for this run alone: the passes rewrite it in place. The original stays on disk,
    # which is where ONNX Runtime reads it from for the gate.
    pipeline = PassManager(passes, progress=progress, strict=strict).run(model, copy=False)
    staged = None
    if output is not None:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        progress.message(f"writing {output}")
        staged = stage_model(pipeline.model, output, force=force, external_data=external)
    with staged if staged is not None else _nothing():
        result = OptimizeResult(
            model=pipeline.model,
            pipeline=pipeline,
            before=before,
            after=summarize(pipeline.model, staged.path if staged is not None else None),
            recipe=rec,
        )
        runtime, opt_level = "onnxruntime", None
        if tgt is not None:
            from onnxopt.target_runtime import numerical_runtime
            from onnxopt.targets import check_structure

            result.target, result.target_notes = tgt.name, list(target_notes)
            result.target_violations = check_structure(pipeline.model, tgt)
            if val_data is not None:
                where = numerical_runtime(tgt.runtime)
                runtime, opt_level = where.runtime, where.opt_level
                result.target_notes.append(where.note)
                if where.skipped_reason is not None:
                    warnings.warn(where.note, stacklevel=2)
        if val_data is not None:
            from onnxopt.validate import validate

            candidate = staged.path if staged is not None else pipeline.model
            result.validation = validate(
                model_path,
                candidate,
                val_data,
                labels=val_labels,
                gate=merge_gate(rec.gate, gate),
                batch_size=batch_size or data_cfg.batch_size,
                progress=progress,
                runtime=runtime,
                **({"opt_level": opt_level} if opt_level is not None else {}),
            )
            if tgt is not None:
                _add_target_check(result)
            _maybe_localize(result.validation, model_path, candidate, val_data, localize, progress)
        if report_dir is not None:
            from onnxopt.report import write_reports

            result.reports = write_reports(
                report_dir,
                validation=result.validation,
                pipeline=pipeline,
                before=result.before,
                after=result.after,
                recipe=rec.to_dict(),
                command=command,
            )
        if staged is not None and (result.passed or keep_failed):
            result.output = staged.commit()
    return result


@contextlib.contextmanager
def _nothing():
    yield


def _add_target_check(result: OptimizeResult) -> None:
    """The target's structural rules as one more gate check (and its notes in the report)."""
    from onnxopt.validate import GateCheck

    v, bad = result.validation, result.target_violations
    msg = (f"laid out as target {result.target} needs" if not bad
           else f"{len(bad)} violation(s) of target {result.target}'s rules, first: {bad[0]}")
    v.checks.append(GateCheck(name=f"target.{result.target}", metric="target_rules", output=None, threshold=0,
                              value=float(len(bad)), passed=not bad, message=msg, status="fail" if bad else "pass"))
    v.passed = v.passed and not bad
    v.notes.extend(result.target_notes + bad)


def validate_files(
    reference: str | Path,
    candidate: str | Path,
    data: str | Path,
    *,
    labels: str | Path | None = None,
    recipe: Recipe | str | Path | None = None,
    gate: dict | None = None,
    report_dir: str | Path | None = None,
    batch_size: int | None = None,
    opt_level: str | None = None,
    progress: Progress | None = None,
    command: str | None = None,
    localize: bool | None = None,
    data_layout: str | None = None,
    dims: dict[str, int] | None = None,
):
    """Compare ``candidate`` with ``reference`` on ``data``; returns a ValidationReport."""
    from onnxopt.data import load_labels, open_data
    from onnxopt.validate import validate

    rec = _recipe(recipe) if recipe is not None else Recipe()
    _check_report_dir(report_dir)
    ref = load_model(reference)
    cand = load_model(candidate)
    data_cfg = merge_data(rec.data, data_layout, dims)
    source = open_data(data, ref, data_cfg)
    before, after = summarize(ref, reference), summarize(cand, candidate)
    reference, candidate = Path(reference), Path(candidate)  # ORT reads the checked files themselves
    lab = load_labels(labels, source) if labels is not None else None
    kwargs = {"opt_level": opt_level} if opt_level else {}
    report = validate(
        reference,
        candidate,
        source,
        labels=lab,
        gate=merge_gate(rec.gate, gate),
        batch_size=batch_size or data_cfg.batch_size,
        progress=progress or SILENT,
        **kwargs,
    )
    _maybe_localize(report, reference, candidate, source, localize, progress or SILENT)
    if report_dir is not None:
        from onnxopt.report import write_reports

        write_reports(report_dir, validation=report, before=before, after=after,
                      recipe=rec.to_dict() if recipe is not None else None, command=command)
    return report


def _maybe_localize(report, reference, candidate, data, localize: bool | None, progress: Progress) -> None:
    """Per-layer errors when asked for (``localize=True``), or by default when the gate failed."""
    if localize is False or (localize is None and report.passed):
        return
    from onnxopt.localize import localize as run_localize

    progress.message("localizing the error per layer")
    try:
        report.localization = run_localize(reference, candidate, data)
    except OnnxoptError as exc:  # diagnostics must not hide the gate's verdict
        report.notes.append(f"per-layer localization failed: {exc}")
