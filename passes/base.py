"""What every pass is made of: typed options, a result, and the registry.

A pass is a class with a kebab-case `name`, an options dataclass and `run(model, ctx)`. The
options dataclass is the single source of truth: recipes, `graphopt passes`, the CLI's
`--pass name:key=value` and the docs are all generated from its fields, and values are
validated (type, choices, range) when a recipe is read, before any work starts.
"""

from __future__ import annotations

import dataclasses
import importlib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeVar, get_args, get_origin

from graphopt.errors import RecipeError

if TYPE_CHECKING:
    from graphopt.model import Model
    from graphopt.pipeline import Context


def option(
    default: Any,
    help: str,
    *,
    range: tuple[float | None, float | None] | None = None,  # noqa: A002 - reads best here
) -> Any:
    """Declare an option field: its default, a one-line help, and an optional closed range."""
    return field(default=default, metadata={"help": help, "range": range})


@dataclass(frozen=True)
class OptionInfo:
    """One option as users see it in `graphopt passes` and recipes."""

    name: str
    type_text: str
    default: Any
    help: str
    choices: tuple[Any, ...] | None
    range: tuple[float | None, float | None] | None


@dataclass
class PassResult:
    """What a pass did: whether it changed the model, its numbers for the report, warnings."""

    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


OptionsT = TypeVar("OptionsT")


class Pass(Generic[OptionsT]):
    """Base class of all passes.

    Subclasses set `name`, `options_type` and `summary`, and implement `run`. The docstring
    says what the pass changes and what it preserves.
    """

    name: ClassVar[str]
    options_type: ClassVar[type]
    summary: ClassVar[str]
    #: True when the pass changes outputs only within float rounding.
    lossless: ClassVar[bool] = False
    #: True when the pass imports and runs the user's Python code (command line only).
    runs_user_code: ClassVar[bool] = False

    def __init__(self, options: OptionsT | None = None) -> None:
        self.options: OptionsT = options if options is not None else self.options_type()

    def run(self, model: Model, ctx: Context) -> PassResult:
        raise NotImplementedError

    @classmethod
    def option_infos(cls) -> list[OptionInfo]:
        return describe_options(cls.options_type)


_REGISTRY: dict[str, type[Pass[Any]]] = {}

PassT = TypeVar("PassT", bound=type)


def register_pass(cls: PassT) -> PassT:
    """Class decorator: make a pass available to recipes and the CLI under its `name`."""
    name = cls.name  # type: ignore[attr-defined]
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"two passes are registered as {name!r}")
    _REGISTRY[name] = cls  # type: ignore[assignment]
    return cls


def _load_builtin_passes() -> None:
    from graphopt.passes import BUILTIN_PASS_MODULES

    for module in BUILTIN_PASS_MODULES:
        importlib.import_module(f"graphopt.passes.{module}")


def registered_passes() -> dict[str, type[Pass[Any]]]:
    """All registered passes by name, in name order."""
    _load_builtin_passes()
    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> type[Pass[Any]]:
    _load_builtin_passes()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise RecipeError(
            f"Unknown pass '{name}'.",
            hint=f"Known passes: {known}. Run 'graphopt passes' to see their options.",
        ) from None


# ---------------------------------------------------------------------------- options


def _resolved_hints(options_type: type) -> dict[str, Any]:
    return typing.get_type_hints(options_type)


def _type_text(hint: Any) -> str:
    origin = get_origin(hint)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_text(a) for a in get_args(hint))
    if origin in (tuple, list):
        args = [a for a in get_args(hint) if a is not Ellipsis]
        return f"list of {_type_text(args[0])}" if args else "list"
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))


def describe_options(options_type: type) -> list[OptionInfo]:
    hints = _resolved_hints(options_type)
    infos = []
    for f in dataclasses.fields(options_type):
        hint = hints[f.name]
        choices = get_args(hint) if get_origin(hint) is Literal else None
        default = f.default if f.default is not dataclasses.MISSING else None
        infos.append(
            OptionInfo(
                name=f.name,
                type_text=_type_text(hint),
                default=default,
                help=f.metadata.get("help", ""),
                choices=choices,
                range=f.metadata.get("range"),
            )
        )
    return infos


def build_options(
    pass_cls: type[Pass[Any]], values: Mapping[str, Any], *, from_text: bool = False
) -> Any:
    """Validate and convert option values into the pass's options dataclass.

    Args:
        pass_cls: the pass the options are for.
        values: option name to value, as read from a recipe (typed) or the CLI (strings).
        from_text: True when the values are strings from the command line.

    Raises:
        RecipeError: an unknown option, a value of the wrong type, or out of range.
    """
    options_type = pass_cls.options_type
    hints = _resolved_hints(options_type)
    fields = {f.name: f for f in dataclasses.fields(options_type)}
    kwargs: dict[str, Any] = {}
    for key, raw in values.items():
        name = key.replace("-", "_")
        if name not in fields:
            known = ", ".join(fields) or "none"
            raise RecipeError(
                f"Pass '{pass_cls.name}' has no option '{key}'.",
                hint=f"Its options are: {known}.",
            )
        kwargs[name] = _convert(pass_cls.name, name, hints[name], raw, from_text, fields[name])
    try:
        return options_type(**kwargs)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"Options of pass '{pass_cls.name}' are invalid: {exc}.") from None


def _convert(
    pass_name: str, name: str, hint: Any, raw: Any, from_text: bool, f: dataclasses.Field[Any]
) -> Any:
    where = f"Option '{name}' of pass '{pass_name}'"
    value = _coerce(hint, raw, from_text)
    if value is _INVALID:
        raise RecipeError(
            f"{where} must be {_type_text(hint)}, not {raw!r}.",
            hint=f.metadata.get("help") or None,
        )
    bounds = f.metadata.get("range")
    if bounds is not None and isinstance(value, int | float) and not isinstance(value, bool):
        low, high = bounds
        if (low is not None and value < low) or (high is not None and value > high):
            raise RecipeError(
                f"{where} is {value}, outside its range "
                f"[{'-inf' if low is None else low}, {'inf' if high is None else high}].",
                hint=f.metadata.get("help") or None,
            )
    return value


_INVALID = object()
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _coerce(hint: Any, raw: Any, from_text: bool) -> Any:
    origin = get_origin(hint)
    if origin is Literal:
        for choice in get_args(hint):
            if raw == choice or (from_text and isinstance(raw, str) and raw == str(choice)):
                return choice
        return _INVALID
    if origin in (typing.Union, types.UnionType):
        args = get_args(hint)
        if raw is None or (from_text and isinstance(raw, str) and raw.lower() in ("none", "null")):
            return None if type(None) in args else _INVALID
        for arg in args:
            if arg is type(None):
                continue
            value = _coerce(arg, raw, from_text)
            if value is not _INVALID:
                return value
        return _INVALID
    if origin in (tuple, list):
        (item_type, *_) = [a for a in get_args(hint) if a is not Ellipsis] or [str]
        items = raw
        if from_text and isinstance(raw, str):
            items = [part for part in raw.replace(";", "|").split("|") if part]
        if not isinstance(items, list | tuple):
            return _INVALID
        converted = [_coerce(item_type, item, from_text) for item in items]
        if any(v is _INVALID for v in converted):
            return _INVALID
        return tuple(converted)
    if hint is bool:
        if isinstance(raw, bool):
            return raw
        if from_text and isinstance(raw, str) and raw.lower() in _TRUE | _FALSE:
            return raw.lower() in _TRUE
        return _INVALID
    if hint is int:
        if isinstance(raw, bool):
            return _INVALID
        if isinstance(raw, int):
            return raw
        if from_text and isinstance(raw, str):
            try:
                return int(raw)
            except ValueError:
                return _INVALID
        return _INVALID
    if hint is float:
        if isinstance(raw, bool):
            return _INVALID
        if isinstance(raw, int | float):
            return float(raw)
        if from_text and isinstance(raw, str):
            try:
                return float(raw)
            except ValueError:
                return _INVALID
        return _INVALID
    if hint is str:
        return raw if isinstance(raw, str) else _INVALID
    return _INVALID


def options_as_dict(options: Any) -> dict[str, Any]:
    """Options dataclass → plain dict (tuples as lists), for `--print-recipe` and reports."""
    out = {}
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out
