import pkgutil
from importlib.metadata import entry_points
from typing import Literal

import onnxopt.passes

from onnxopt import registry
from onnxopt.pass_infra import Pass, PassConfig, PassResult
from onnxopt.recipe import parse_recipe
from onnxopt.registry import ENTRY_POINT_GROUP, available_passes, register_pass


def test_every_builtin_module_is_registered_through_the_entry_point_group():
    modules = {m.name for m in pkgutil.iter_modules(onnxopt.passes.__path__)}
    registered = {ep.value.split(":")[0].rsplit(".", 1)[1] for ep in entry_points(group=ENTRY_POINT_GROUP)
                  if ep.value.startswith("onnxopt.passes.")}
    assert modules == registered


def test_every_pass_has_a_summary_and_a_typed_config():
    for name, cls in available_passes().items():
        assert cls.name == name and cls.summary
        assert cls.Config.model_fields["type"].default == name


def test_registered_pass_is_usable_from_a_recipe(monkeypatch):
    monkeypatch.setattr(registry, "_registered", {})

    class _Cfg(PassConfig):
        type: Literal["test-plugin"] = "test-plugin"
        strength: int = 1

    @register_pass
    class Plugin(Pass):
        name = "test-plugin"
        summary = "test"
        Config = _Cfg

        def call(self, model):
            return PassResult(model, False)

    recipe = parse_recipe({"passes": [{"type": "test-plugin", "strength": 3}]})
    (p,) = recipe.build_passes()
    assert isinstance(p, Plugin) and p.config.strength == 3
