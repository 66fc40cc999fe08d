"""`open_dataset`: pick the reader for a source (file, folder or "random") and open it."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from graphopt.console import warn
from graphopt.data.base import Dataset
from graphopt.data.folders import open_npy_folder, open_npz_folder
from graphopt.data.images import IMAGE_SUFFIXES, class_folders, open_images
from graphopt.data.npy import open_npy_file
from graphopt.data.npz import open_npz_file
from graphopt.data.preprocess import ImagePreprocess
from graphopt.data.random import open_random
from graphopt.data.rules import input_rules
from graphopt.errors import DataError
from graphopt.model import TensorSpec

RANDOM_SOURCE = "random"


def open_dataset(
    source: str | os.PathLike[str],
    inputs: Sequence[TensorSpec],
    *,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    labels_key: str = "labels",
    preprocess: ImagePreprocess | None = None,
    num_samples: int = 32,
    seed: int = 0,
) -> Dataset:
    """Open data for a model with these inputs, checking it fits before any work starts.

    Args:
        source: an .npz keyed by input name, a .npy (single-input models), a folder of .npy
            or .npz files, a folder of images (optionally in class sub-folders), one image
            file, or the literal string "random".
        inputs: the model's inputs (`Model.input_specs()`).
        shapes: full shapes for inputs with dynamic dimensions (``--shape``); needed for
            random data and for images of a model with dynamic height and width; checked
            against file data otherwise. Their leading (batch) value is not used.
        labels_key: the array holding labels in .npz files (``labels.npy`` in a folder of
            .npy files). A model input of the same name wins: it is then fed, not a label.
        preprocess: image preprocessing (image sources only).
        num_samples: samples of random data (rounded up to a multiple of a fixed batch size).
        seed: seed of random data.

    Raises:
        DataError: the source is missing, unreadable, or does not fit the model's inputs.
    """
    rules = input_rules(inputs, shapes or {})
    if not rules:
        raise DataError("The model has no inputs to feed, so it takes no data.")
    if isinstance(source, str) and source == RANDOM_SOURCE:
        _warn_ignored(preprocess is not None, "the image preprocessing", "random data")
        dataset = open_random(rules, num_samples, seed)
        warn(
            "using RANDOM data: accuracy and fidelity numbers measured on it say nothing about "
            "the model's real accuracy, and calibration ranges from it are meaningless for real "
            "inputs. Pass real samples with --data for numbers you can trust."
        )
        return dataset
    path = Path(source)
    if not path.exists():
        raise DataError(
            f"Data source '{path}' does not exist.",
            hint="Give an .npz file, a folder of .npy/.npz files or images, or 'random'.",
        )
    if path.is_dir():
        kind = _folder_kind(path)
        if kind == "images":
            return open_images(path, rules, preprocess)
        _warn_ignored(preprocess is not None, "the image preprocessing", f"the {kind} in '{path}'")
        if kind == "npy":
            return open_npy_folder(path, rules, labels_key)
        return open_npz_folder(path, rules, labels_key)
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return open_images(path, rules, preprocess)
    _warn_ignored(preprocess is not None, "the image preprocessing", f"'{path.name}'")
    if suffix == ".npz":
        return open_npz_file(path, rules, labels_key)
    if suffix == ".npy":
        return open_npy_file(path, rules)
    raise DataError(
        f"Data source '{path}' is neither an .npz, an .npy, an image nor a folder.",
        hint="Give an .npz keyed by input name, a folder of .npy/.npz files or images, or "
        "'random'.",
    )


def _warn_ignored(condition: bool, what: str, where: str) -> None:
    if condition:
        warn(f"{what} is ignored for {where}; it applies to image data only.")


def _folder_kind(folder: Path) -> str:
    """'npy', 'npz' or 'images': what a data folder holds (one kind only)."""
    files = [p for p in folder.iterdir() if not p.name.startswith(".") and p.is_file()]
    suffixes = {p.suffix.lower() for p in files}
    kinds = []
    if ".npy" in suffixes:
        kinds.append("npy")
    if ".npz" in suffixes:
        kinds.append("npz")
    if suffixes & set(IMAGE_SUFFIXES) or (not kinds and class_folders(folder)):
        kinds.append("images")
    if len(kinds) > 1:
        raise DataError(
            f"Folder '{folder}' mixes {' and '.join(kinds)} files, so graphopt cannot tell how "
            "to read it.",
            hint="Keep one kind of file per data folder.",
        )
    if not kinds:
        raise DataError(
            f"Folder '{folder}' holds no .npy, .npz or image files.",
            hint="Point --data at a folder of .npy/.npz files or images (png, jpg, bmp), "
            "or at an .npz file.",
        )
    return kinds[0]
