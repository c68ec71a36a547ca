"""One tuning trial: build the model a recipe describes, write it, validate it against the original.

Runs in whatever process an executor chose (``python -m onnxopt.tune_trial SPEC RESULT`` for ``local``, a Ray
worker for ``ray``). Inputs and result are JSON-able dicts, so a trial can run anywhere the files are.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


def run_trial(job: dict[str, Any], trial: dict[str, Any]) -> dict[str, Any]:
    from onnxopt.data import load_labels, open_data
    from onnxopt.model_io import load_model, save_model
    from onnxopt.optimize import merge_data
    from onnxopt.pass_infra import PassContext, PassManager
    from onnxopt.recipe import DataConfig, GateConfig, parse_recipe
    from onnxopt.validate import validate

    start = time.perf_counter()
    recipe = parse_recipe(trial["recipe"])
    data_cfg = merge_data(DataConfig.model_validate(job.get("data") or {}))
    model = load_model(job["model"])
    # the tune's cache: measured decisions (placement, layout) and ranges are shared by all trials and re-runs
    ctx = PassContext(cache_dir=Path(job["cache_dir"]) / "passes")
    if job.get("calib"):
        ctx.calibration = open_data(job["calib"], model, data_cfg)
    pipeline = PassManager(recipe.build_passes(ctx)).run(model, copy=False)
    out = Path(trial["output"])
    out.parent.mkdir(parents=True, exist_ok=True)
    save_model(pipeline.model, out, force=True)
    built = time.perf_counter()
    val = open_data(job["val"], model, data_cfg)
    labels = load_labels(job["labels"], val) if job.get("labels") else None
    report = validate(job["model"], out, val, labels=labels, gate=GateConfig.model_validate(job.get("gate") or {}),
                      batch_size=data_cfg.batch_size)
    size = sum(f.stat().st_size for f in out.parent.iterdir() if f.name == out.name or f.name.startswith(out.name + "."))
    metrics = {"accuracy_drop_pt": report.accuracy_drop_pt, "accuracy_pct": report.accuracy_candidate_pct,
               "accuracy_rows": report.accuracy_rows, "accuracy_changed_rows": report.accuracy_changed}
    for name, m in report.outputs.items():
        metrics[f"{name}.sqnr_db"] = m.sqnr_db
        metrics[f"{name}.top1_agreement_pct"] = m.top1_agreement_pct
        metrics[f"{name}.samples"] = m.samples
    return {"status": "ok", "passed": report.passed, "checks": [c.to_dict() for c in report.checks],
            "metrics": metrics, "size_bytes": size, "build_s": round(built - start, 2),
            "validate_s": round(time.perf_counter() - built, 2), "output": str(out),
            "passes": [r.name for r in pipeline.records]}


def main(argv: list[str]) -> int:
    spec, result = Path(argv[0]), Path(argv[1])
    s = json.loads(spec.read_text())
    try:
        r = run_trial(s["job"], s["trial"])
    except Exception as exc:  # noqa: BLE001 - a failed trial is a result, not a crash of the search
        first = str(exc).splitlines()[0] if str(exc) else ""
        r = {"status": "error", "error": f"{type(exc).__name__}: {first}"}
    result.write_text(json.dumps(r, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
