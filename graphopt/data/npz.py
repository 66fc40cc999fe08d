"""An .npz file keyed by input name, its arrays streamed a batch of rows at a time."""

from __future__ import annotations

import math
import zipfile
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from graphopt.data.base import Dataset
from graphopt.data.checks import names, sample_count, unreadable
from graphopt.data.npyformat import Header, StreamColumn, npz_headers, read_header, read_into
from graphopt.data.rules import Input
from graphopt.data.stream import LABELS, Chunk, Column, Opener, SliceColumn, StreamingDataset
from graphopt.errors import DataError


def open_npz_file(path: Path, rules: Sequence[Input], labels_key: str) -> Dataset:
    chunk, has_labels = npz_chunk(path, f"'{path.name}'", rules, labels_key, single_ok=False)
    return StreamingDataset(
        description=path.name, rules=rules, chunks=[chunk], has_labels=has_labels
    )


def npz_chunk(
    path: Path, where: str, rules: Sequence[Input], labels_key: str, *, single_ok: bool
) -> tuple[Chunk, bool]:
    """The samples of one .npz, checked from its headers; also whether it holds labels."""
    headers = npz_headers(path, where)
    has_labels = _check_keys(rules, list(headers), labels_key, where)
    count, single, trailing = sample_count(rules, headers, where, single_ok=single_ok, keyed=True)
    keys = {r.name: (r.name, headers[r.name], single[r.name]) for r in rules}
    if has_labels:
        one = all(single.values())
        _check_label_count(headers[labels_key], where, count, single=one)
        keys[LABELS] = (labels_key, headers[labels_key], one)
    return Chunk(where, count, trailing, _opener(path, where, keys)), has_labels


def _check_keys(rules: Sequence[Input], keys: Sequence[str], labels_key: str, where: str) -> bool:
    """Every input present, nothing unknown; return whether labels are there."""
    input_names = [rule.name for rule in rules]
    has_labels = labels_key in keys and labels_key not in input_names
    unknown = [k for k in keys if k not in input_names and not (has_labels and k == labels_key)]
    if unknown:
        raise DataError(
            f"{where} holds {names(unknown)}, which the model does not take as input.",
            hint=f"The model's inputs are {names(input_names)}; labels go under '{labels_key}'.",
        )
    missing = [n for n in input_names if n not in keys]
    if missing:
        raise DataError(
            f"{where} has no array for input(s) {names(missing)}.",
            hint=f"The model's inputs are {names(input_names)}; save one array per input "
            "(np.savez(path, **{name: array})).",
        )
    return has_labels


def _check_label_count(header: Header, where: str, count: int, single: bool) -> None:
    if single:
        return
    if not header.shape:
        raise DataError(
            f"The labels in {where} are a scalar; they need one entry per sample.",
            hint="Save one label per sample along axis 0.",
        )
    if header.shape[0] != count:
        raise DataError(
            f"{where} holds {count} samples but {header.shape[0]} labels.",
            hint="Give exactly one label per sample.",
        )


def _opener(path: Path, where: str, keys: Mapping[str, tuple[str, Header, bool]]) -> Opener:
    """Columns reading the given members of an .npz; keys: column -> (member, header, single)."""

    def open_columns(stack: ExitStack) -> dict[str, Column]:
        try:
            archive = stack.enter_context(zipfile.ZipFile(path))
            columns: dict[str, Column] = {}
            for column, (member, header, single) in keys.items():
                label = f"array '{member}' of {where}"
                stream = stack.enter_context(archive.open(member + ".npy"))
                read_header(stream, label)
                if header.fortran:
                    # Rows of a Fortran-order array are not contiguous: read it whole.
                    flat = np.empty(math.prod(header.shape), dtype=header.dtype)
                    array = read_into(stream, flat, label).reshape(header.shape, order="F")
                    columns[column] = SliceColumn(array, single)
                else:
                    columns[column] = StreamColumn(stream, header, label, single)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            raise unreadable(where, exc) from None
        return columns

    return open_columns
