"""Image files as samples of a model's image input: one file, a folder, or class sub-folders."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Literal

import numpy as np

from graphopt.data.base import Dataset
from graphopt.data.checks import check_shape, dtype_kind, error_detail, single_input
from graphopt.data.preprocess import ImagePreprocess
from graphopt.data.rules import Input
from graphopt.data.stream import LABELS, Chunk, Column, Opener, SliceColumn, StreamingDataset
from graphopt.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def class_folders(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_dir() and not p.name.startswith(".") and any(is_image(f) for f in p.rglob("*"))
    )


def open_images(
    source: Path, rules: Sequence[Input], preprocess: ImagePreprocess | None
) -> Dataset:
    rule = single_input(rules, "Image data")
    preprocess = preprocess or ImagePreprocess()
    layout = _resolve_layout(rule, preprocess)
    if layout != preprocess.layout:
        preprocess = dataclasses.replace(preprocess, layout=layout)
    files, labels, classes, description = _list_images(source)
    model_size = _model_image_size(rule, layout)
    channels = 1 if preprocess.grayscale else 3
    out_size = preprocess.output_size(model_size)
    _check_image_rule(rule, preprocess, layout, channels, out_size)
    shapes = None
    if out_size is not None:
        shapes = {rule.name: _sample_shape(layout, out_size, channels)}
    chunks = []
    for i, path in enumerate(files):
        label = None if labels is None else labels[i]
        where = f"image '{path}'"
        opener = _image_opener(path, where, rule, preprocess, model_size, label)
        chunks.append(Chunk(where, 1, shapes, opener))
    dataset = StreamingDataset(
        description=description, rules=rules, chunks=chunks, has_labels=labels is not None
    )
    dataset.classes = classes
    return dataset


def _list_images(source: Path) -> tuple[list[Path], list[int] | None, list[str] | None, str]:
    """(files, class index per file or None, class names or None, description)."""
    classes: list[str] | None = None
    if source.is_file():
        files, labels = [source], None
        description = source.name
    else:
        class_dirs = class_folders(source)
        top = sorted(p for p in source.iterdir() if p.is_file() and is_image(p))
        if class_dirs and top:
            raise DataError(
                f"Folder '{source}' holds images both at its top level and in sub-folders, so "
                "graphopt cannot tell whether the sub-folders are classes.",
                hint="Put every image in a class sub-folder, or all of them at the top level.",
            )
        if class_dirs:
            classes = [d.name for d in class_dirs]
            files, labels = [], []
            for index, directory in enumerate(class_dirs):
                found = sorted(p for p in directory.rglob("*") if p.is_file() and is_image(p))
                files += found
                labels += [index] * len(found)
            description = f"{source.name}/, images in {len(classes)} classes"
        else:
            files, labels = top, None
            description = f"{source.name}/, images"
    if not files:
        raise DataError(
            f"'{source}' holds no images.", hint=f"Images end in {', '.join(IMAGE_SUFFIXES)}."
        )
    return files, labels, classes, description


def _resolve_layout(rule: Input, preprocess: ImagePreprocess) -> Literal["NCHW", "NHWC"]:
    if preprocess.layout != "auto":
        return preprocess.layout
    dims = rule.dims
    if dims is not None and len(dims) == 4:
        if dims[1] in (1, 3):
            return "NCHW"
        if dims[3] in (1, 3):
            return "NHWC"
    return "NCHW"


def _model_image_size(rule: Input, layout: str) -> tuple[int, int] | None:
    if rule.dims is None or len(rule.dims) != 4:
        return None
    height, width = rule.dims[1:3] if layout == "NHWC" else rule.dims[2:4]
    if isinstance(height, int) and isinstance(width, int):
        return height, width
    return None


def _sample_shape(layout: str, size: tuple[int, int], channels: int) -> tuple[int, ...]:
    return (*size, channels) if layout == "NHWC" else (channels, *size)


def _check_image_rule(
    rule: Input,
    preprocess: ImagePreprocess,
    layout: str,
    channels: int,
    out_size: tuple[int, int] | None,
) -> None:
    if rule.dims is not None and len(rule.dims) != 4:
        raise DataError(
            f"Input '{rule.name}' has shape {rule.expected_text()}, not a 4-D image batch "
            "(NCHW or NHWC), so image files cannot feed it.",
            hint="Convert the images to arrays yourself and pass an .npz.",
        )
    if rule.dims is not None:
        channel_dim = rule.dims[3] if layout == "NHWC" else rule.dims[1]
        if isinstance(channel_dim, int) and channel_dim != channels:
            raise DataError(
                f"Input '{rule.name}' expects {rule.expected_text()} ({layout}, {channel_dim} "
                f"channel(s)), but the image preprocessing gives {channels} channel(s).",
                hint="Add 'gray' to the preprocessing for one channel, or set layout= if the "
                "layout was guessed wrong.",
            )
        if out_size is not None:
            sample = _sample_shape(layout, out_size, channels)
            check_shape(rule, (1, *sample), "the image preprocessing", single_ok=False)
    if rule.dtype is not None:
        kind = dtype_kind(rule.dtype)
        if kind == "int" and (
            preprocess.scale != 1 or preprocess.mean is not None or preprocess.std is not None
        ):
            raise DataError(
                f"Input '{rule.name}' takes {rule.dtype.name} pixels, but the image "
                "preprocessing scales or normalizes them into fractions.",
                hint="Use scale=1 and no mean/std for an integer image input.",
            )
        if kind not in ("int", "float"):
            raise DataError(
                f"Input '{rule.name}' takes {rule.dtype.name} values, which images cannot give."
            )


def _image_opener(
    path: Path,
    where: str,
    rule: Input,
    preprocess: ImagePreprocess,
    model_size: tuple[int, int] | None,
    label: int | None,
) -> Opener:
    def open_columns(stack: ExitStack) -> dict[str, Column]:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as image:
                image.load()
                array = preprocess.apply(image, model_size)
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(
                f"{where} could not be read or preprocessed ({error_detail(e)}).",
                hint="Remove or replace the file, or change the preprocessing (resize=, crop=).",
            ) from None
        if rule.dtype is not None and dtype_kind(rule.dtype) == "int":
            info = np.iinfo(rule.dtype)
            array = np.clip(np.rint(array), info.min, info.max).astype(rule.dtype)
        check_shape(rule, (1, *array.shape), where, single_ok=False)
        columns: dict[str, Column] = {rule.name: SliceColumn(array, single=True)}
        if label is not None:
            columns[LABELS] = SliceColumn(np.array([label], dtype=np.int64))
        return columns

    return open_columns
