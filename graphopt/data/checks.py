"""Data checked against what a model input takes (names, shapes, dtypes), and the messages."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from graphopt.errors import DataError

if TYPE_CHECKING:
    from graphopt.data.npyformat import Header
    from graphopt.data.rules import Input


# ---------------------------------------------------------------------------- message parts


def shape_text(shape: Sequence[int | None]) -> str:
    return "x".join("?" if d is None else str(d) for d in shape) or "scalar"


def names(items: Sequence[str]) -> str:
    return ", ".join(f"'{n}'" for n in items) if items else "(none)"


def error_detail(exc: BaseException) -> str:
    """What an exception says, or its type when it says nothing."""
    return str(exc).strip() or type(exc).__name__


def unreadable(where: str, exc: BaseException) -> DataError:
    return DataError(
        f"{where} could not be read ({error_detail(exc).splitlines()[0]}).",
        hint="The file may be corrupt or truncated; write it again with numpy.",
    )


def pickle_error(where: str) -> DataError:
    return DataError(
        f"{where} holds Python objects (a pickled object array), which graphopt refuses to "
        "load because unpickling can run code.",
        hint="Save plain numeric arrays (np.savez with numeric dtypes).",
    )


# ---------------------------------------------------------------------------- dtypes


def dtype_kind(dtype: np.dtype) -> str:
    """'bool', 'int', 'float', or numpy's kind letter for anything else."""
    if dtype.kind == "b":
        return "bool"
    if dtype.kind in "iu":
        return "int"
    if dtype.kind == "f" or dtype.name.startswith(("float", "bfloat")):
        return "float"
    return dtype.kind


def check_dtype(rule: Input, given: np.dtype, where: str) -> None:
    """Raise unless `given` can feed the input: same kind, or a cast that loses nothing."""
    if given.hasobject:
        raise pickle_error(where)
    target = rule.dtype
    if target is None or given == target:
        return
    want, have = dtype_kind(target), dtype_kind(given)
    if want == "float" and have in ("float", "int", "bool"):
        return
    if want == "int" and have in ("int", "bool"):
        return
    if want == have and want not in ("int", "float", "bool"):
        return
    hint = f"Save the array as {target.name}."
    if want == "int" and have == "float":
        hint = (
            f"graphopt does not round floats into integers; save the array as {target.name} "
            "(e.g. array.astype(np." + target.name + "))."
        )
    raise DataError(
        f"Input '{rule.name}' takes {target.name} values, but {where} holds {given.name}.",
        hint=hint,
    )


def convert(rule: Input, array: np.ndarray, where: str) -> np.ndarray:
    """Cast rows to the input's dtype, refusing integers outside its range."""
    target = rule.dtype
    if target is None or array.dtype == target:
        return array
    if dtype_kind(target) == "int" and dtype_kind(array.dtype) == "int" and array.size:
        info = np.iinfo(target)
        low, high = array.min(), array.max()
        if low < info.min or high > info.max:
            raise DataError(
                f"Input '{rule.name}' takes {target.name}, but {where} holds values from {low} "
                f"to {high}, outside its range.",
                hint=f"Check the data; {target.name} holds {info.min}..{info.max}.",
            )
    return array.astype(target)


# ---------------------------------------------------------------------------- shapes


def check_shape(rule: Input, shape: tuple[int, ...], where: str, *, single_ok: bool) -> int:
    """Check an array's shape against the input; return its sample count (-1: one sample)."""
    if rule.dims is None:
        if not shape:
            raise DataError(
                f"{where} holds a scalar for input '{rule.name}'; it needs a leading axis "
                "that counts samples.",
                hint="Stack the samples along axis 0.",
            )
        return shape[0]
    rank = len(rule.dims)
    if len(shape) == rank:
        count, trailing = shape[0], shape[1:]
    elif single_ok and len(shape) == rank - 1:
        count, trailing = -1, shape
    else:
        raise DataError(
            f"Input '{rule.name}' expects {rule.expected_text()} (rank {rank}, the leading axis "
            f"counts samples), but {where} holds shape {shape_text(shape)}.",
            hint="Stack the samples along a leading axis and keep the model's other axes.",
        )
    for axis, (dim, size) in enumerate(zip(rule.dims[1:], trailing, strict=True), start=1):
        if isinstance(dim, int) and dim != size:
            raise DataError(
                f"Input '{rule.name}' expects {rule.expected_text()}, but {where} holds shape "
                f"{shape_text(shape)} (axis {axis if count >= 0 else axis - 1} is {size}, "
                f"not {dim}).",
                hint="Resize or regenerate the data to the model's input shape.",
            )
    return count


def check_shared_dims(
    rules: Sequence[Input], trailing: Mapping[str, tuple[int, ...]], where: str
) -> None:
    """Inputs that share a named dynamic dim (e.g. 'seq') must agree on its size."""
    seen: dict[str, tuple[int, str]] = {}
    for rule in rules:
        if rule.dims is None or rule.name not in trailing:
            continue
        for dim, size in zip(rule.dims[1:], trailing[rule.name], strict=False):
            if not isinstance(dim, str):
                continue
            if dim in seen and seen[dim][0] != size:
                other_size, other = seen[dim]
                raise DataError(
                    f"Inputs '{other}' and '{rule.name}' share the dimension '{dim}', but "
                    f"{where} gives them {other_size} and {size}.",
                    hint="Make the arrays agree on that dimension.",
                )
            seen.setdefault(dim, (size, rule.name))


def sample_count(
    rules: Sequence[Input],
    headers: Mapping[str, Header],
    where: str,
    *,
    single_ok: bool,
    keyed: bool,
) -> tuple[int, dict[str, bool], dict[str, tuple[int, ...]]]:
    """Check every input's header; return (samples, single-sample flags, trailing shapes)."""
    counts: dict[str, int] = {}
    single: dict[str, bool] = {}
    trailing: dict[str, tuple[int, ...]] = {}
    for rule in rules:
        header = headers[rule.name]
        label = f"array '{rule.name}' of {where}" if keyed else where
        check_dtype(rule, header.dtype, label)
        count = check_shape(rule, header.shape, label, single_ok=single_ok)
        single[rule.name] = count < 0
        counts[rule.name] = 1 if count < 0 else count
        trailing[rule.name] = header.shape if count < 0 else header.shape[1:]
    if len(set(counts.values())) > 1:
        listing = ", ".join(f"'{name}' {n}" for name, n in counts.items())
        raise DataError(
            f"The arrays in {where} hold different numbers of samples ({listing}).",
            hint="Give every input the same number of samples along axis 0.",
        )
    check_shared_dims(rules, trailing, where)
    return next(iter(counts.values())), single, trailing


def single_input(rules: Sequence[Input], what: str) -> Input:
    """The only input of a single-input model; `what` names a source that can feed no other."""
    if len(rules) != 1:
        raise DataError(
            f"{what} can feed only a single-input model, and this one takes "
            f"{names([r.name for r in rules])}.",
            hint="Use an .npz file (or a folder of them) keyed by input name.",
        )
    return rules[0]
