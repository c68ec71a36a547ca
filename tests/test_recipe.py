import json

import pytest

from onnxopt.errors import RecipeError
from onnxopt.recipe import load_preset, load_recipe, parse_recipe, preset_names
from onnxopt.registry import get_pass_class


def test_every_preset_parses_and_builds():
    names = preset_names()
    assert "cleanup" in names
    for name in names:
        recipe = load_preset(name)
        assert recipe.description, f"preset {name} needs a one-line description"
        assert "\n" not in recipe.description
        assert recipe.build_passes()


def test_yaml_and_json_recipes(tmp_path):
    y = tmp_path / "r.yaml"
    y.write_text("name: mine\npasses:\n  - type: topological-sort\n  - shape-inference\ngate:\n  max_abs_error: 0.001\n")
    j = tmp_path / "r.json"
    j.write_text(json.dumps({"name": "mine", "passes": [{"type": "topological-sort"}, {"type": "shape-inference"}],
                             "gate": {"max_abs_error": 0.001}}))
    for path in (y, j):
        r = load_recipe(path)
        assert [p.type for p in r.passes] == ["topological-sort", "shape-inference"]
        assert r.gate.max_abs_error == 0.001
        assert type(r.passes[1]) is get_pass_class("shape-inference").Config


def test_unknown_pass_suggests_the_right_one():
    with pytest.raises(RecipeError, match=r"unknown pass 'topological-srot'; did you mean 'topological-sort'\?"):
        parse_recipe({"passes": [{"type": "topological-srot"}]})


def test_misspelt_pass_field_lists_expected_fields():
    with pytest.raises(RecipeError, match=r"step 1 \(shape-inference\): unknown field 'data_propp'.*data_prop"):
        parse_recipe({"passes": [{"type": "shape-inference", "data_propp": True}]})


def test_wrong_type_and_misspelt_gate_field():
    with pytest.raises(RecipeError, match="data_prop"):
        parse_recipe({"passes": [{"type": "shape-inference", "data_prop": "maybe"}]})
    with pytest.raises(RecipeError, match="unknown field 'gate.max_abs_eror'"):
        parse_recipe({"passes": [], "gate": {"max_abs_eror": 1}})


def test_unknown_preset_and_bad_files(tmp_path):
    with pytest.raises(RecipeError, match="did you mean 'cleanup'"):
        load_recipe("cleanpu")
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("passes: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    bad.write_text("- just a list\n")
    with pytest.raises(RecipeError, match="expected a mapping"):
        load_recipe(bad)
