"""Recipes: an ordered list of pass configs, a validation gate, and how to read data.

A recipe is YAML or JSON::

    name: my-recipe
    description: one line shown by `onnxopt recipes`
    passes:
      - type: constant-folding
      - type: fold-batchnorm
    gate:
      max_abs_error: 1.0e-4
    data:
      images: {resize_short: 256, center_crop: 224, mean: [127, 127, 127], std: [128, 128, 128]}

Each pass entry is validated against that pass's own static config class, selected
by ``type``; unknown passes and misspelt fields are errors that say what was expected.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from onnxopt.errors import RecipeError
from onnxopt.pass_infra import Pass, PassConfig, PassContext


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GateConfig(_Strict):
    """Thresholds that decide pass/fail. Unset thresholds are not checked."""

    max_abs_error: float | None = Field(None, ge=0, description="max |ref - cand| over all elements")
    max_mean_abs_error: float | None = Field(None, ge=0, description="mean |ref - cand|")
    min_cosine: float | None = Field(None, ge=-1, le=1, description="lowest per-sample cosine similarity")
    min_sqnr_db: float | None = Field(None, description="signal-to-quantization-noise ratio, dB")
    min_top1_agreement_pct: float | None = Field(None, ge=0, le=100, description="argmax agreement, %")
    max_accuracy_drop_pt: float | None = Field(None, description="reference minus candidate accuracy, points")
    outputs: list[str] | None = Field(None, description="outputs the error thresholds apply to (default: all)")

    def is_empty(self) -> bool:
        return all(getattr(self, k) is None for k in type(self).model_fields if k != "outputs")


class ImageSpec(_Strict):
    """How to turn an image folder into model input (applied in this order)."""

    resize_short: int | None = Field(None, gt=0, description="resize so the short side has this length")
    resize: tuple[int, int] | None = Field(None, description="resize to exactly (height, width)")
    center_crop: int | tuple[int, int] | None = None
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bilinear"
    channel_order: Literal["RGB", "BGR"] = "RGB"
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    # x = (pixel - mean) / std, pixels in 0..255; or x = pixel * scale + offset
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    scale: float | None = None
    offset: float | None = None
    grayscale: bool = False

    @field_validator("center_crop")
    @classmethod
    def _crop_pair(cls, v):
        return (v, v) if isinstance(v, int) else v


class DataConfig(_Strict):
    images: ImageSpec | None = None
    input_name: str | None = Field(None, description="model input the images feed (default: the only input)")
    batch_size: int = Field(32, gt=0)
    max_samples: int | None = Field(None, gt=0)
    layout: Literal["stacked", "feeds"] = Field(
        "stacked", description="stacked: samples on axis 0 of every input; feeds: each .npz is one complete "
                               "feed, arrays exactly as the model takes them (scalars, state, batch on any axis)")
    dims: dict[str, int] = Field(default_factory=dict, description="sizes of symbolic dims by name, for random "
                                                                   "data (random:N), e.g. {height: 416}")

    @field_validator("dims")
    @classmethod
    def _positive_dims(cls, v: dict[str, int]) -> dict[str, int]:
        bad = [k for k, d in v.items() if d < 1]
        if bad:
            raise ValueError(f"dims must be at least 1 (got {bad[0]}={v[bad[0]]})")
        return v


class TuneConfig(_Strict):
    """The ``tune:`` section: how ``onnxopt tune`` searches (command-line flags win)."""

    objective: Literal["latency", "size"] = "latency"
    time_budget_minutes: float | None = Field(None, gt=0, description="no new round starts after this")
    executor: Literal["local", "ray"] = "local"
    workers: int = Field(1, ge=1, description="trials run at once")
    presets: list[str] | None = Field(None, description="first-round presets (default: chosen from the model)")
    max_layers: int = Field(16, ge=1, description="most layers the search takes out of int8")
    trial_timeout_minutes: float = Field(30.0, gt=0, description="a trial running longer is recorded as failed")
    confidence: float | None = Field(
        None, gt=0.5, lt=1, description="a trial passes the accuracy-drop / top-1-agreement gates only if they "
                                        "hold at this one-sided confidence, given how many validation rows "
                                        "changed (default: the gate as measured)")


class Recipe(_Strict):
    name: str = "custom"
    description: str = ""
    passes: list[PassConfig] = Field(default_factory=list)
    gate: GateConfig = Field(default_factory=GateConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    tune: TuneConfig | None = None
    target: str | None = Field(None, description="hand-off target (onnxopt.targets), e.g. openvino-cpu")

    def build_passes(self, context: PassContext | None = None) -> list[Pass]:
        from onnxopt.registry import get_pass_class

        return [get_pass_class(cfg.type)(cfg, context) for cfg in self.passes]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "passes": [p.model_dump() for p in self.passes],
            "gate": self.gate.model_dump(exclude_none=True),
            "data": self.data.model_dump(exclude_none=True),
            **({"tune": self.tune.model_dump(exclude_none=True)} if self.tune is not None else {}),
            **({"target": self.target} if self.target is not None else {}),
        }


def _format_validation(err: ValidationError, where: str) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top)"
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown field '{loc}'")
        elif e["type"] == "missing":
            parts.append(f"missing field '{loc}'")
        else:
            parts.append(f"'{loc}': {e['msg']}")
    return f"{where}: " + "; ".join(parts)


def _expected_fields(model_cls: type[BaseModel]) -> str:
    return ", ".join(k for k in model_cls.model_fields if k != "type")


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """Build a ``Recipe`` from plain data (as read from YAML/JSON)."""
    from onnxopt.registry import get_pass_class

    if not isinstance(data, dict):
        raise RecipeError(f"{source}: expected a mapping with 'passes' (and optionally 'gate', 'data')")
    data = dict(data)
    raw_passes = data.pop("passes", [])
    if not isinstance(raw_passes, list):
        raise RecipeError(f"{source}: 'passes' must be a list of {{type: <pass>, ...}} entries")
    configs: list[PassConfig] = []
    for i, entry in enumerate(raw_passes, 1):
        if isinstance(entry, str):
            entry = {"type": entry}
        if not isinstance(entry, dict) or "type" not in entry:
            raise RecipeError(f"{source}: step {i}: expected a mapping with a 'type' naming the pass")
        cls = get_pass_class(str(entry["type"]))
        try:
            configs.append(cls.Config.model_validate(entry))
        except ValidationError as exc:
            msg = _format_validation(exc, f"{source}: step {i} ({cls.name})")
            fields = _expected_fields(cls.Config)
            raise RecipeError(f"{msg} (fields of {cls.name}: {fields or 'none'})") from None
    try:
        recipe = Recipe.model_validate({**data, "passes": []})
    except ValidationError as exc:
        raise RecipeError(_format_validation(exc, source)) from None
    return recipe.model_copy(update={"passes": configs})


def _read_structured(path: Path) -> Any:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: cannot read recipe ({exc})") from None
    try:
        if path.suffix.lower() == ".json":
            return json.loads(text)
        return yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise RecipeError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({first})") from None


def preset_names() -> list[str]:
    folder = resources.files("onnxopt") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def list_presets() -> list[tuple[str, str]]:
    return [(name, load_preset(name).description) for name in preset_names()]


def load_preset(name: str) -> Recipe:
    folder = resources.files("onnxopt") / "presets"
    res = folder / f"{name}.yaml"
    if not res.is_file():
        import difflib

        names = preset_names()
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise RecipeError(f"unknown preset {name!r}{hint} (presets: {', '.join(names)}; or give a recipe file)")
    return parse_recipe(yaml.safe_load(res.read_text()), source=f"preset {name}")


def load_recipe(spec: str | Path) -> Recipe:
    """A preset name, or a path to a YAML/JSON recipe file."""
    path = Path(spec)
    if path.suffix.lower() in (".yaml", ".yml", ".json") or path.exists():
        if not path.is_file():
            raise RecipeError(f"{path}: recipe file not found")
        return parse_recipe(_read_structured(path), source=str(path))
    return load_preset(str(spec))
