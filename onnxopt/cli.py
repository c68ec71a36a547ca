"""`onnxopt` command line: a thin layer over onnxopt.optimize; no logic lives here.

Exit codes: 0 success / gate passed, 1 gate failed, 2 bad input or usage.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
import warnings

import click

from onnxopt.errors import GateFailed, OnnxoptError
from onnxopt.progress import Progress

EXIT_GATE_FAILED = 1
EXIT_BAD_INPUT = 2


_NoArgsIsHelp = getattr(click.exceptions, "NoArgsIsHelpError", ())


def _usage_error(exc: click.UsageError) -> None:
    """A usage error as one line (click's own format spans four), exit code 2."""
    hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
    click.echo(f"error: {' '.join(exc.format_message().split())}{hint}", err=True)
    sys.exit(EXIT_BAD_INPUT)


class _Group(click.Group):
    """Turns every error into one line and an exit code; never a traceback (unless ONNXOPT_DEBUG=1)."""

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except _NoArgsIsHelp:
            raise
        except click.UsageError as exc:
            _usage_error(exc)

    def invoke(self, ctx):
        warnings.showwarning = _show_warning
        try:
            return super().invoke(ctx)
        except _NoArgsIsHelp:
            raise
        except click.UsageError as exc:
            _usage_error(exc)
        except GateFailed as exc:
            click.echo(f"gate failed: {exc}", err=True)
            sys.exit(EXIT_GATE_FAILED)
        except OnnxoptError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_BAD_INPUT)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            click.echo("error: interrupted; no partial output was left behind", err=True)
            sys.exit(EXIT_BAD_INPUT)
        except Exception as exc:  # noqa: BLE001 - last resort: one line, not a traceback
            if os.environ.get("ONNXOPT_DEBUG"):
                traceback.print_exc()
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            click.echo(f"error: internal error ({type(exc).__name__}: {first}); "
                       "set ONNXOPT_DEBUG=1 for the traceback", err=True)
            sys.exit(EXIT_BAD_INPUT)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    click.echo(f"warning: {message}", err=True)


def _progress(quiet: bool) -> Progress:
    return Progress(enabled=not quiet)


def _command_line() -> str:
    return "onnxopt " + " ".join(sys.argv[1:])


_gate_options = [
    click.option("--max-abs-error", type=float, help="Gate: max |reference - candidate|."),
    click.option("--max-mean-abs-error", type=float, help="Gate: mean |reference - candidate|."),
    click.option("--min-cosine", type=float, help="Gate: lowest per-sample cosine similarity."),
    click.option("--min-sqnr-db", type=float, help="Gate: lowest SQNR in dB."),
    click.option("--min-top1-agreement", "min_top1_agreement_pct", type=float,
                 help="Gate: lowest top-1 agreement with the reference, in %."),
    click.option("--max-accuracy-drop", "max_accuracy_drop_pt", type=float,
                 help="Gate: largest accuracy drop in points (needs --labels)."),
]


def _dims(ctx, param, value: str | None) -> dict[str, int] | None:
    """``--dims height=416,width=416`` -> {"height": 416, "width": 416}."""
    if not value:
        return None
    out = {}
    for part in value.split(","):
        name, sep, size = part.partition("=")
        if not sep or not name.strip() or not size.strip().isdigit() or int(size) < 1:
            raise click.BadParameter(f"{part!r}: write NAME=SIZE with SIZE a positive whole number, e.g. height=416")
        out[name.strip()] = int(size)
    return out


def data_options(f):
    f = click.option("--dims", callback=_dims,
                     help="Sizes of symbolic dims for random:N data, e.g. height=416,width=416.")(f)
    return click.option("--data-layout", type=click.Choice(["stacked", "feeds"]),
                        help="stacked: samples on axis 0 (default); feeds: each .npz is one complete feed.")(f)


def gate_options(f):
    for opt in reversed(_gate_options):
        f = opt(f)
    return f


def _gate(kwargs: dict) -> dict:
    keys = ("max_abs_error", "max_mean_abs_error", "min_cosine", "min_sqnr_db", "min_top1_agreement_pct",
            "max_accuracy_drop_pt")
    return {k: kwargs.pop(k) for k in keys}


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="onnxopt")
def main():
    """Optimize trained ONNX models and check them against ONNX Runtime."""


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write the model.")
@click.option("-r", "--recipe", default="cleanup", show_default=True, help="Preset name or recipe file (YAML/JSON).")
@click.option("--calib", type=click.Path(), help="Calibration data: .npz, folder of .npz, or image folder.")
@click.option("--val", type=click.Path(), help="Validation data; runs the gate after optimizing.")
@click.option("--labels", type=click.Path(dir_okay=False), help="Labels for --val (.npy, or CSV file,class_index).")
@click.option("--calib-labels", type=click.Path(dir_okay=False),
              help="Labels for --calib (label-aware passes, e.g. semantic significance).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes for passes that parallelize (significance).")
@click.option("--localize/--no-localize", default=None,
              help="Per-layer error table (default: only when the gate fails).")
@click.option("--report", "report_dir", type=click.Path(file_okay=False), help="Write report.json/.md and junit.xml here.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Batch size for running data (default: recipe's).")
@click.option("-f", "--force", is_flag=True, help="Overwrite the output if it exists.")
@click.option("--keep-failed", is_flag=True, help="Write the output even when the gate fails.")
@click.option("--strict", is_flag=True, default=None,
              help="Full ONNX checker and shape inference after every pass (default: at load and before saving).")
@click.option("--target", metavar="NAME",
              help="Hand-off runtime to lay the model out for and validate in: ort-cpu (default), openvino-cpu, "
                   "tensorrt, qnn-htp, onnx-standard (see 'onnxopt recipes').")
@data_options
@gate_options
@click.option("-q", "--quiet", is_flag=True, help="No progress or tables, only errors.")
def optimize(model, output, recipe, calib, val, labels, calib_labels, workers, localize, report_dir, batch_size, force,
             keep_failed, strict, target, data_layout, dims, quiet, **kw):
    """Run a recipe's passes on MODEL, then the validation gate when --val is given."""
    from onnxopt.optimize import optimize as run
    from onnxopt.report import gate_table, summary_table

    result = run(model, output, recipe=recipe, calib=calib, val=val, labels=labels, report_dir=report_dir,
                 gate=_gate(kw), force=force, keep_failed=keep_failed, batch_size=batch_size,
                 progress=_progress(quiet), command=_command_line(), calib_labels=calib_labels, workers=workers,
                 localize=localize, strict=strict or None, data_layout=data_layout, dims=dims, target=target)
    for line in result.target_notes + result.target_violations if not quiet else result.target_violations:
        click.echo(line, err=True)
    if not quiet:
        click.echo(summary_table(result.before, result.after, result.pipeline))
        if result.validation is not None:
            click.echo(gate_table(result.validation))
        for path in result.reports:
            click.echo(f"report: {path}")
        if result.output is not None:
            click.echo(f"wrote {result.output}")
    if not result.passed:
        note = "" if result.output is not None else f"; {output} not written (--keep-failed writes it anyway)"
        why = (_failed(result.validation) if result.validation is not None
               else f"{len(result.target_violations)} violation(s) of target {result.target}'s rules")
        raise GateFailed(f"{why}{note}")


def _failed(report) -> str:
    bad = [c.name for c in report.failed_checks]
    return f"{len(bad)} check(s) failed: {', '.join(bad)}"


@main.command()
@click.argument("reference", type=click.Path(dir_okay=False))
@click.argument("candidate", type=click.Path(dir_okay=False))
@click.option("--data", required=True, type=click.Path(), help=".npz, folder of .npz, or image folder.")
@click.option("--labels", type=click.Path(dir_okay=False), help="Labels (.npy, or CSV file,class_index).")
@click.option("-r", "--recipe", help="Preset or recipe file whose gate/data sections apply.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False), help="Write report.json/.md and junit.xml here.")
@click.option("--batch-size", type=click.IntRange(min=1))
@click.option("--opt-level", type=click.Choice(["disable", "basic", "extended", "all"]),
              help="ONNX Runtime graph-optimization level for both models.")
@click.option("--localize/--no-localize", default=None,
              help="Per-layer error table (default: only when the gate fails).")
@data_options
@gate_options
@click.option("-q", "--quiet", is_flag=True, help="No progress or tables, only the verdict.")
def validate(reference, candidate, data, labels, recipe, report_dir, batch_size, opt_level, localize, data_layout,
             dims, quiet, **kw):
    """Run REFERENCE and CANDIDATE in ONNX Runtime on the same inputs and apply the gate."""
    from onnxopt.optimize import validate_files
    from onnxopt.report import gate_table

    report = validate_files(reference, candidate, data, labels=labels, recipe=recipe, gate=_gate(kw),
                            report_dir=report_dir, batch_size=batch_size, opt_level=opt_level,
                            progress=_progress(quiet), command=_command_line(), localize=localize,
                            data_layout=data_layout, dims=dims)
    if not quiet:
        click.echo(gate_table(report))
        if report_dir:
            click.echo(f"report: {report_dir}")
    if not report.checks and not quiet:
        click.echo("no thresholds given (flags or recipe gate): metrics reported, nothing checked")
    if not report.passed:
        raise GateFailed(_failed(report))


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write the winner.")
@click.option("--calib", required=True, type=click.Path(), help="Calibration data.")
@click.option("--val", required=True, type=click.Path(), help="Validation data every trial is gated on.")
@click.option("--labels", type=click.Path(dir_okay=False), help="Labels for --val.")
@click.option("-r", "--recipe", help="Recipe file whose gate:, data: and tune: sections apply.")
@click.option("--objective", type=click.Choice(["latency", "size"]), help="What 'best' means (default: latency).")
@click.option("--time-budget", "time_budget", type=click.FloatRange(min=0, min_open=True),
              help="Minutes; no new round starts after this.")
@click.option("--executor", type=click.Choice(["local", "ray"]), help="Where trials run (default: local).")
@click.option("--ray-address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray instance).")
@click.option("--workers", type=click.IntRange(min=1), help="Trials run at once (default: 1).")
@click.option("--report", "report_dir", type=click.Path(file_okay=False), help="Write tune.json/.md and junit.xml here.")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Trial cache (default: <report or output folder>/.onnxopt-tune).")
@click.option("--keep-failed", is_flag=True, help="When no trial passes, write the best failing model anyway.")
@click.option("--confidence", type=click.FloatRange(min=0.5, max=1, min_open=True, max_open=True),
              help="Accuracy-drop and top-1-agreement gates must hold at this one-sided confidence given the rows "
                   "that changed (e.g. 0.9); default: as measured on --val.")
@click.option("-f", "--force", is_flag=True, help="Overwrite the output if it exists.")
@data_options
@gate_options
@click.option("-q", "--quiet", is_flag=True, help="No progress or tables, only errors.")
def tune(model, output, calib, val, labels, recipe, objective, time_budget, executor, ray_address, workers, report_dir,
         cache_dir, keep_failed, confidence, force, data_layout, dims, quiet, **kw):
    """Search for the fastest (or smallest) model that passes the gate; write it to OUTPUT."""
    from onnxopt.tune import tune as run
    from onnxopt.tune_report import markdown

    result = run(model, output, calib=calib, val=val, labels=labels, gate=_gate(kw), recipe=recipe,
                 objective=objective, time_budget_minutes=time_budget, executor=executor, ray_address=ray_address,
                 workers=workers, report_dir=report_dir, keep_failed=keep_failed, force=force,
                 data_layout=data_layout, dims=dims, cache_dir=cache_dir, progress=_progress(quiet),
                 command=_command_line(), confidence=confidence)
    if not quiet:
        click.echo(markdown(result, objective or "latency"))
        for path in result.reports:
            click.echo(f"report: {path}")
        if result.output is not None:
            click.echo(f"wrote {result.output}")
    if result.interrupted:
        raise KeyboardInterrupt
    if not result.passed:
        note = "" if result.output is not None else f"; {output} not written (--keep-failed writes the best failing one)"
        raise GateFailed(f"no trial passed the gate{note}")


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(model, as_json):
    """Show MODEL's opset, inputs/outputs, op histogram, parameters, size and quantized tensors."""
    from onnxopt.inspect import summarize
    from onnxopt.model_io import load_model

    s = summarize(load_model(model), model)
    if as_json:
        click.echo(json.dumps(s.to_dict(), indent=2, sort_keys=True))
        return
    click.echo(f"{model}")
    click.echo(f"  ir {s.ir_version}, opset {', '.join(f'{d} {v}' for d, v in s.opset.items())}"
               + (f", producer {s.producer}" if s.producer else ""))
    for kind, specs in (("input", s.inputs), ("output", s.outputs)):
        for t in specs:
            dims = ", ".join("?" if d is None else str(d) for d in t.shape)
            click.echo(f"  {kind:<6} {t.name}: {t.dtype} [{dims}]")
    click.echo(f"  nodes {s.nodes}, parameters {s.parameters:,}, initializers {s.initializer_bytes / 1e6:.2f} MB, "
               f"serialized {s.serialized_bytes / 1e6:.2f} MB")
    click.echo("  ops: " + ", ".join(f"{op} {n}" for op, n in sorted(s.ops.items(), key=lambda kv: -kv[1])))
    click.echo("  initializer dtypes: " + ", ".join(f"{d} {n}" for d, n in s.dtypes.items()))
    if s.quantized_tensors:
        click.echo(f"  quantized tensors ({len(s.quantized_tensors)}):")
        for name, how in s.quantized_tensors.items():
            click.echo(f"    {name}: {how}")
    else:
        click.echo("  quantized tensors: none")


@main.command()
@click.option("--show", metavar="NAME", help="Print one preset's full recipe (YAML).")
def recipes(show):
    """List the built-in presets (one line each) and the available passes."""
    from onnxopt.recipe import list_presets, load_preset
    from onnxopt.registry import available_passes

    if show:
        import yaml

        click.echo(yaml.safe_dump(load_preset(show).to_dict(), sort_keys=False).rstrip())
        return
    presets = list_presets()
    width = max(len(n) for n, _ in presets)
    click.echo("Presets (use with -r NAME):")
    for name, desc in presets:
        click.echo(f"  {name:<{width}}  {desc}")
    from onnxopt.targets import list_targets

    targets = list_targets()
    width = max(len(n) for n, _ in targets)
    click.echo("\nTargets (use with --target NAME, or target: in a recipe):")
    for name, desc in targets:
        click.echo(f"  {name:<{width}}  {desc}")
    passes = available_passes()
    width = max(len(n) for n in passes)
    click.echo("\nPasses (use in a recipe as `- type: NAME`):")
    for name, cls in passes.items():
        click.echo(f"  {name:<{width}}  {cls.summary}")


if __name__ == "__main__":
    main()
