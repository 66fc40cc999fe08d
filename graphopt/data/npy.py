"""A single .npy file (single-input models), memory-mapped."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from graphopt.data.base import Dataset
from graphopt.data.checks import sample_count, single_input, unreadable
from graphopt.data.npyformat import npy_header
from graphopt.data.rules import Input
from graphopt.data.stream import Chunk, Column, SliceColumn, StreamingDataset


def open_npy_file(path: Path, rules: Sequence[Input]) -> Dataset:
    rule = single_input(rules, "An .npy file")
    chunk = npy_chunk(path, f"'{path.name}'", rule, single_ok=False)
    return StreamingDataset(description=path.name, rules=rules, chunks=[chunk], has_labels=False)


def npy_chunk(path: Path, where: str, rule: Input, *, single_ok: bool) -> Chunk:
    """The samples of one .npy file for `rule`, checked from its header."""
    header = npy_header(path, where)
    count, single, trailing = sample_count(
        [rule], {rule.name: header}, where, single_ok=single_ok, keyed=False
    )
    one = single[rule.name]

    def open_columns(stack: ExitStack) -> dict[str, Column]:
        return {rule.name: npy_column(path, where, one)}

    return Chunk(where, count, trailing, open_columns)


def npy_column(path: Path, where: str, single: bool = False) -> SliceColumn:
    """The rows of an .npy file, memory-mapped when it can be."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError:
        # e.g. an empty array, which cannot be mapped: it is small, read it.
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise unreadable(where, exc) from None
    except (OSError, EOFError) as exc:
        raise unreadable(where, exc) from None
    return SliceColumn(array, single)
