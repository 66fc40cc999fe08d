"""Recipes: files, built-ins, --pass parsing; every mistake caught before any work starts."""

from __future__ import annotations

import json

import pytest
import yaml

from graphopt.errors import RecipeError
from graphopt.recipe import (
    BUILTIN_RECIPES,
    inline_recipe,
    load_recipe,
    parse_pass_arg,
    recipe_from_mapping,
)


def write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", sorted(BUILTIN_RECIPES))
def test_builtin_recipes_load_and_round_trip(name):
    recipe = load_recipe(name)
    assert recipe.passes and recipe.passes[0].name == "cleanup"
    again = recipe_from_mapping(yaml.safe_load(recipe.to_yaml()), source="round trip")
    assert again.to_dict() == recipe.to_dict()


def test_yaml_recipe_with_all_step_forms(tmp_path):
    path = write(
        tmp_path,
        """
description: test
passes:
  - cleanup
  - cleanup: {fold_constants: false}
  - name: cleanup
    options: {deduplicate: false}
validation:
  min_cosine: 0.99
  max_accuracy_drop: 0.02
""",
    )
    recipe = load_recipe(path)
    assert [spec.name for spec in recipe.passes] == ["cleanup"] * 3
    assert recipe.passes[0].options.fold_constants is True
    assert recipe.passes[1].options.fold_constants is False
    assert recipe.passes[2].options.deduplicate is False
    assert recipe.gates.min_cosine == 0.99 and recipe.gates.max_accuracy_drop == 0.02


def test_json_recipe(tmp_path):
    path = write(tmp_path, json.dumps({"passes": ["cleanup"]}), name="r.json")
    assert [s.name for s in load_recipe(path).passes] == ["cleanup"]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("passes: [prune_everything]", ["Unknown pass 'prune_everything'"]),
        ("passes: [{cleanup: {fold_constant: true}}]", ["cleanup", "fold_constant"]),
        ("passes: [{cleanup: {fold_constants: 3}}]", ["fold_constants", "bool"]),
        ("passes: []", ["non-empty 'passes'"]),
        ("passes: [cleanup]\nengines: {}", ["unknown section", "engines"]),
        ("passes: [cleanup]\nvalidation: {min_cosin: 0.9}", ["min_cosin"]),
        ("passes: [cleanup\n", ["not valid YAML"]),
        ("- just a list", ["mapping"]),
        ("passes: [{name: cleanup, opts: {}}]", ["unknown key", "opts"]),
        ("passes: [{graphsurgeon: {function: 'os:system'}}]", ["runs Python code", "--pass"]),
    ],
)
def test_bad_recipes_are_refused_with_a_clear_message(tmp_path, text, words):
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, text))
    message = info.value.paragraph()
    for word in words:
        assert word in message
    assert "\n" not in message


def test_yaml_is_read_with_the_safe_loader(tmp_path):
    path = write(tmp_path, "passes: !!python/object/apply:os.system ['echo hacked']")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(path)


def test_missing_recipe_names_the_builtins(tmp_path):
    with pytest.raises(RecipeError) as info:
        load_recipe(tmp_path / "nope.yaml")
    assert "nope.yaml" in info.value.paragraph() and "default" in info.value.paragraph()


def test_pass_argument_parsing():
    spec = parse_pass_arg("cleanup:fold_constants=false,deduplicate=no")
    assert spec.options.fold_constants is False and spec.options.deduplicate is False
    assert parse_pass_arg("cleanup").options == parse_pass_arg("cleanup:").options
    code = parse_pass_arg("graphsurgeon:function=my_module:edit")
    assert code.options.function == "my_module:edit"


@pytest.mark.parametrize(
    "text", ["cleanup:fold_constants", "cleanup:nope=1", ":x=1", "cleanup:fold_constants=maybe"]
)
def test_bad_pass_arguments(text):
    with pytest.raises(RecipeError):
        parse_pass_arg(text)


def test_inline_recipe_prints_as_yaml_that_loads_back(tmp_path):
    recipe = inline_recipe(["cleanup:fold_batchnorm=false"])
    path = write(tmp_path, recipe.to_yaml())
    assert load_recipe(path).to_dict() == recipe.to_dict()
