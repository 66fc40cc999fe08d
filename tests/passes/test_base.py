"""Options parsing and the pass registry (passes/base.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from graphopt.errors import RecipeError
from graphopt.passes import base


@dataclass(frozen=True, kw_only=True)
class ToyOptions:
    ratio: float = base.option(0.3, "fraction removed", range=(0.0, 0.95))
    round_to: int = base.option(8, "multiple of", range=(1, None))
    importance: Literal["l1", "l2"] = base.option("l2", "score")
    enabled: bool = base.option(True, "on or off")
    exclude: tuple[str, ...] = base.option((), "node names")
    limit: int | None = base.option(None, "optional cap")


class ToyPass(base.Pass[ToyOptions]):
    name = "toy"
    options_type = ToyOptions
    summary = "a toy"


def test_typed_values_from_a_recipe_are_accepted():
    options = base.build_options(
        ToyPass, {"ratio": 0.5, "round_to": 4, "importance": "l1", "exclude": ["a", "b"]}
    )
    assert options == ToyOptions(ratio=0.5, round_to=4, importance="l1", exclude=("a", "b"))


def test_int_is_accepted_for_a_float_option():
    assert base.build_options(ToyPass, {"ratio": 0}).ratio == 0.0


def test_text_values_from_the_command_line_are_converted():
    options = base.build_options(
        ToyPass,
        {"ratio": "0.25", "round-to": "16", "enabled": "off", "exclude": "x|y", "limit": "none"},
        from_text=True,
    )
    assert options == ToyOptions(ratio=0.25, round_to=16, enabled=False, exclude=("x", "y"))
    assert base.build_options(ToyPass, {"limit": "3"}, from_text=True).limit == 3


@pytest.mark.parametrize(
    ("values", "words"),
    [
        ({"ratoi": 0.1}, ["toy", "ratoi", "ratio"]),
        ({"ratio": "0.5"}, ["ratio", "toy", "float"]),
        ({"ratio": 0.99}, ["ratio", "0.99", "range"]),
        ({"round_to": 0}, ["round_to", "range"]),
        ({"importance": "l3"}, ["importance", "'l1' | 'l2'"]),
        ({"enabled": 1}, ["enabled", "bool"]),
        ({"round_to": 2.5}, ["round_to", "int"]),
        ({"round_to": True}, ["round_to", "int"]),
    ],
)
def test_bad_values_name_the_pass_the_option_and_what_is_allowed(values, words):
    with pytest.raises(RecipeError) as info:
        base.build_options(ToyPass, values)
    for word in words:
        assert word in info.value.paragraph()


def test_describe_options_is_generated_from_the_dataclass():
    infos = {info.name: info for info in base.describe_options(ToyOptions)}
    assert infos["ratio"].default == 0.3 and infos["ratio"].range == (0.0, 0.95)
    assert infos["importance"].choices == ("l1", "l2")
    assert infos["limit"].type_text == "int | null"
    assert infos["exclude"].help == "node names"


def test_registry_knows_the_builtin_passes_and_refuses_unknown_ones():
    assert "cleanup" in base.registered_passes()
    with pytest.raises(RecipeError) as info:
        base.get_pass("nope")
    assert "Unknown pass 'nope'" in info.value.paragraph()
    assert "cleanup" in info.value.paragraph()


def test_every_registered_pass_has_documented_options():
    for name, cls in base.registered_passes().items():
        assert cls.name == name and cls.summary and cls.__doc__
        for info in cls.option_infos():
            assert info.help, f"{name}.{info.name} has no help text"
