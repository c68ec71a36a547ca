"""Where passes are found: the ``onnxopt.passes`` entry-point group, plus ``register_pass``.

Built-in passes are declared in onnxopt's own pyproject under that group, exactly as a
third-party package declares its passes.
"""

from __future__ import annotations

import difflib
from importlib.metadata import entry_points

from onnxopt.errors import RecipeError
from onnxopt.pass_infra import Pass

ENTRY_POINT_GROUP = "onnxopt.passes"

_registered: dict[str, type[Pass]] = {}
_cache: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Register a pass class programmatically (tests, notebooks); entry points are the normal way."""
    _registered[cls.name] = cls
    return cls


_eps: dict | None = None


def _entry_points() -> dict:
    """The group's entry points, scanned once per process (a scan reads every installed package's metadata)."""
    global _eps
    if _eps is None:
        _eps = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return _eps


def _load(ep) -> type[Pass]:
    if ep.name not in _cache:
        try:
            cls = ep.load()
        except Exception as exc:  # noqa: BLE001 - name the broken plugin instead of crashing
            raise RecipeError(f"pass plugin {ep.name!r} ({ep.value}) failed to load: {exc}") from None
        if not (isinstance(cls, type) and issubclass(cls, Pass)):
            raise RecipeError(f"pass plugin {ep.name!r} ({ep.value}) is not an onnxopt Pass subclass")
        if cls.name != ep.name:
            raise RecipeError(f"pass plugin {ep.name!r} declares name {cls.name!r}; they must match")
        _cache[ep.name] = cls
    return _cache[ep.name]


def pass_names() -> list[str]:
    return sorted(set(_entry_points()) | set(_registered))


def available_passes() -> dict[str, type[Pass]]:
    """Every pass, loaded (a broken plugin raises ``RecipeError`` naming it)."""
    return {name: get_pass_class(name) for name in pass_names()}


def get_pass_class(name: str) -> type[Pass]:
    if name in _registered:
        return _registered[name]
    eps = _entry_points()
    if name in eps:
        return _load(eps[name])
    names = pass_names()
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise RecipeError(f"unknown pass {name!r}{hint} (available: {', '.join(names)})")
