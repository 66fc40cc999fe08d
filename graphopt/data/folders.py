"""A folder of .npy files (single-input models) or of .npz files, read in natural order."""

from __future__ import annotations

import re
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from graphopt.data.base import Dataset
from graphopt.data.checks import single_input
from graphopt.data.npy import npy_chunk, npy_column
from graphopt.data.npyformat import npy_header
from graphopt.data.npz import npz_chunk
from graphopt.data.rules import Input
from graphopt.data.stream import LABELS, Chunk, Column, StreamingDataset
from graphopt.errors import DataError


def _files(folder: Path, suffix: str) -> list[Path]:
    """The folder's files with this suffix (hidden ones left out), 2 before 10."""
    return sorted(
        (p for p in folder.iterdir() if p.suffix.lower() == suffix and not p.name.startswith(".")),
        key=_natural_key,
    )


def _natural_key(path: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def open_npy_folder(folder: Path, rules: Sequence[Input], labels_key: str) -> Dataset:
    rule = single_input(rules, f"A folder of .npy files ('{folder}')")
    files = _files(folder, ".npy")
    labels_file = folder / f"{labels_key}.npy"
    has_labels = labels_file in files and rule.name != labels_key
    if has_labels:
        files.remove(labels_file)
    if not files:
        raise DataError(f"Folder '{folder}' holds no .npy sample files.")
    chunks = [
        npy_chunk(path, f"'{folder.name}/{path.name}'", rule, single_ok=True) for path in files
    ]
    if has_labels:
        chunks = _attach_labels(labels_file, folder, chunks)
    return StreamingDataset(
        description=f"{folder.name}/, {len(files)} .npy files",
        rules=rules,
        chunks=chunks,
        has_labels=has_labels,
    )


def _attach_labels(labels_file: Path, folder: Path, chunks: list[Chunk]) -> list[Chunk]:
    """Give each file's chunk its slice of `labels.npy` (labels in natural file order)."""
    where = f"'{folder.name}/{labels_file.name}'"
    header = npy_header(labels_file, where)
    total = sum(c.count for c in chunks)
    if not header.shape or header.shape[0] != total:
        held = header.shape[0] if header.shape else "a scalar"
        raise DataError(
            f"{where} holds {held} labels, but the folder holds {total} samples.",
            hint="Give one label per sample, in the files' natural order (2 before 10).",
        )
    out = []
    start = 0
    for chunk in chunks:

        def open_columns(
            stack: ExitStack, chunk: Chunk = chunk, start: int = start
        ) -> dict[str, Column]:
            columns = chunk.open_columns(stack)
            labels = npy_column(labels_file, where)
            labels.pos = start
            columns[LABELS] = labels
            return columns

        out.append(Chunk(chunk.where, chunk.count, chunk.shapes, open_columns))
        start += chunk.count
    return out


def open_npz_folder(folder: Path, rules: Sequence[Input], labels_key: str) -> Dataset:
    files = _files(folder, ".npz")
    chunks = []
    labelled: list[bool] = []
    for path in files:
        where = f"'{folder.name}/{path.name}'"
        chunk, has_labels = npz_chunk(path, where, rules, labels_key, single_ok=True)
        chunks.append(chunk)
        labelled.append(has_labels)
    if any(labelled) and not all(labelled):
        without = [f.name for f, has in zip(files, labelled, strict=True) if not has][:3]
        raise DataError(
            f"Some .npz files in '{folder}' have '{labels_key}' and others do not "
            f"(e.g. {', '.join(without)}).",
            hint="Give labels in every file or in none.",
        )
    return StreamingDataset(
        description=f"{folder.name}/, {len(files)} .npz files",
        rules=rules,
        chunks=chunks,
        has_labels=bool(labelled) and all(labelled),
    )
