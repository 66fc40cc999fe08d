"""Data that feeds a model: an .npz file, a folder of arrays or images, or random arrays.

`open_dataset` checks the data against the model's inputs before any work starts (names,
ranks, fixed dimensions, dtypes, label count) and returns a `Dataset` that streams `Batch`es.

Conventions:

- The leading axis of every array counts samples, and is the model's batch axis: an input
  declared ``N x 3 x 224 x 224`` is fed from an array of shape ``S x 3 x 224 x 224``.
- Inside a folder, a file may also hold a single sample without the leading axis
  (``3 x 224 x 224``); it is read as one sample.
- When the model's batch axis is fixed (``1 x 3 x 224 x 224``), batches always have exactly
  that size, whatever batch size the caller asks for. The number of samples must then be a
  multiple of it (always true for 1); otherwise `open_dataset` raises `DataError` rather
  than dropping or padding samples, since both would silently change calibration statistics
  and accuracy numbers.
- Samples whose non-leading dimensions differ (variable sequence length, images kept at their
  own size) are never stacked together: a change of shape closes the current batch early.

Memory: nothing holds the whole dataset. Arrays inside an .npz are read as streams, one batch
of rows at a time (compressed or not); a .npy file is memory-mapped. Two exceptions, both
bounded by one array: an array stored in Fortran order inside an .npz is read whole (its rows
are not contiguous), and so is a .npy file that cannot be memory-mapped.

All arrays are read with ``allow_pickle=False``: an array of Python objects is refused.
"""

from __future__ import annotations

import abc
import math
import os
import re
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np

from graphopt.console import warn
from graphopt.errors import DataError
from graphopt.model import TensorSpec

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
RANDOM_SOURCE = "random"
RANDOM_INT_HIGH = 10  # random integer inputs are drawn from [0, RANDOM_INT_HIGH)
_LABELS = "\0labels"  # column key of the labels inside a chunk (no input can be named so)


# ---------------------------------------------------------------------------- public types


@dataclass
class Batch:
    """One batch of samples.

    Attributes:
        feeds: model input name -> array; the leading axis counts samples.
        labels: labels aligned with the feeds along axis 0, or None.
    """

    feeds: dict[str, np.ndarray]
    labels: np.ndarray | None = None

    @property
    def size(self) -> int:
        """Number of samples in the batch."""
        for array in self.feeds.values():
            return int(array.shape[0])
        return 0 if self.labels is None else int(self.labels.shape[0])


class Dataset(abc.ABC):
    """Samples for a model, streamed in batches; iterating again gives the same order.

    Attributes:
        description: one line for reports, e.g. "calib.npz (256 samples)".
        is_random: True only for random data, whose accuracy numbers mean nothing.
        has_labels: whether batches carry labels.
    """

    description: str
    is_random: bool = False
    has_labels: bool = False

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of samples."""

    @abc.abstractmethod
    def batches(self, batch_size: int) -> Iterator[Batch]:
        """Stream the samples in batches of `batch_size` (the last one may be smaller).

        A model whose batch axis is fixed gets batches of exactly that size instead.
        """

    def num_batches(self, batch_size: int) -> int:
        """How many batches `batches(batch_size)` yields (for progress bars)."""
        return math.ceil(len(self) / max(batch_size, 1))


# ---------------------------------------------------------------------------- image preprocessing

Layout = Literal["auto", "NCHW", "NHWC"]
ChannelOrder = Literal["RGB", "BGR"]
Resample = Literal["bilinear", "nearest", "bicubic"]
Size = int | tuple[int, int]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ImagePreprocess:
    """How an image file becomes one sample of the model's image input.

    The steps run in this order: resize, center crop, channel conversion (RGB, BGR or
    grayscale), ``pixel * scale``, ``(x - mean) / std``, layout. When neither `resize` nor
    `crop` is given, images are resized straight to the model's fixed height and width (or
    the ones given with ``--shape``); a model with dynamic height and width then gets each
    image at its own size.

    Attributes:
        resize: an int resizes the shorter side to it (keeping the aspect ratio, the longer
            side truncated like torchvision); (height, width) resizes to exactly that.
        crop: center crop to this size (an int is a square) after resizing.
        mean: subtracted per channel after scaling (one value, or one per channel).
        std: divides per channel after subtracting the mean.
        scale: multiplies the 0..255 pixel values first (1/255 gives 0..1).
        layout: NCHW or NHWC; "auto" reads it from the model's input shape.
        channel_order: RGB or BGR (OpenCV-trained models).
        grayscale: convert to a single channel.
        resample: the resize filter.
    """

    resize: Size | None = None
    crop: Size | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    scale: float = 1 / 255
    layout: Layout = "auto"
    channel_order: ChannelOrder = "RGB"
    grayscale: bool = False
    resample: Resample = "bilinear"

    def __post_init__(self) -> None:
        for name in ("resize", "crop"):
            value = getattr(self, name)
            sizes = (value,) if isinstance(value, int) else value or ()
            if value is not None and (
                len(sizes) not in (1, 2) or any(not isinstance(s, int) or s < 1 for s in sizes)
            ):
                raise DataError(
                    f"Image preprocessing option {name}={value!r} is not a size.",
                    hint=f"Give {name} as one positive integer or as HxW, e.g. {name}=224x224.",
                )
        channels = 1 if self.grayscale else 3
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and len(value) not in (1, channels):
                raise DataError(
                    f"Image preprocessing option {name} has {len(value)} values, but the images "
                    f"have {channels} channel(s).",
                    hint=f"Give one value or {channels} values.",
                )
        if self.std is not None and any(s == 0 for s in self.std):
            raise DataError(
                "Image preprocessing option std contains 0.", hint="Use non-zero values."
            )
        if not math.isfinite(self.scale) or self.scale == 0:
            raise DataError(f"Image preprocessing scale={self.scale} must be a non-zero number.")
        _check_choice("layout", self.layout, ("auto", "NCHW", "NHWC"))
        _check_choice("order", self.channel_order, ("RGB", "BGR"))
        _check_choice("resample", self.resample, ("bilinear", "nearest", "bicubic"))

    @classmethod
    def parse(cls, text: str) -> ImagePreprocess:
        """Read the compact CLI form, e.g. ``resize=256,crop=224,imagenet,order=BGR``.

        Keys: ``resize``, ``crop`` (N or HxW), ``mean``, ``std`` (numbers separated by commas
        or slashes), ``scale`` (a number or a fraction like 1/255), ``layout``
        (auto/NCHW/NHWC), ``order`` (RGB/BGR), ``resample`` (bilinear/nearest/bicubic).
        Bare words: ``imagenet`` (ImageNet mean and std), ``gray``/``grayscale``, ``rgb``,
        ``bgr``, ``nchw``, ``nhwc``. A bare number continues the previous key's list, so
        ``mean=0.5,0.5,0.5`` works.
        """
        fields: dict[str, Any] = {}
        lists: dict[str, list[float]] = {}
        last_key: str | None = None
        for raw in text.split(","):
            token = raw.strip()
            if not token:
                continue
            if "=" not in token:
                if last_key in ("mean", "std") and _is_number(token):
                    lists[last_key].append(_parse_float(token, last_key))
                    continue
                last_key = None
                _apply_flag(token, fields, lists)
                continue
            key, _, value = (part.strip() for part in token.partition("="))
            key = _PREPROCESS_ALIASES.get(key.lower(), key.lower())
            last_key = key
            if key in ("resize", "crop"):
                fields[key] = _parse_size(value, key)
            elif key in ("mean", "std"):
                # Lists as 0.5,0.5,0.5 (bare numbers continue), 0.5/0.5/0.5 or 0.5|0.5|0.5.
                parts = value.replace("|", "/").split("/")
                lists[key] = [_parse_float(v, key) for v in parts if v.strip()]
            elif key == "scale":
                fields["scale"] = _parse_fraction(value)
            elif key == "layout":
                fields["layout"] = value.upper() if value.lower() != "auto" else "auto"
            elif key == "channel_order":
                fields["channel_order"] = value.upper()
            elif key == "resample":
                fields["resample"] = value.lower()
            elif key == "grayscale":
                fields["grayscale"] = _parse_bool(value)
            else:
                raise DataError(
                    f"Unknown image preprocessing key '{key}' in '{text}'.",
                    hint="Known keys: resize, crop, mean, std, scale, layout, order, "
                    "resample, grayscale (and the words imagenet, gray, rgb, bgr, nchw, nhwc).",
                )
        for key, values in lists.items():
            fields[key] = tuple(values)
        return cls(**fields)

    def output_size(self, model_size: tuple[int, int] | None) -> tuple[int, int] | None:
        """(height, width) of every processed image, or None when it depends on the image."""
        if self.crop is not None:
            return _pair(self.crop)
        if isinstance(self.resize, tuple):
            return self.resize
        if self.resize is None:
            return model_size
        return None

    def apply(self, image: Any, model_size: tuple[int, int] | None = None) -> np.ndarray:
        """Turn a PIL image into one float32 sample (CHW, or HWC when layout is NHWC).

        `model_size` is the (height, width) to resize to when neither resize nor crop is set.
        Layout "auto" is treated as NCHW here; `open_dataset` resolves it from the model.
        """
        from PIL import Image

        filters = {
            "bilinear": Image.Resampling.BILINEAR,
            "nearest": Image.Resampling.NEAREST,
            "bicubic": Image.Resampling.BICUBIC,
        }
        image = image.convert("L" if self.grayscale else "RGB")
        target = self.resize if self.resize is not None or self.crop is not None else model_size
        if target is not None:
            width, height = image.size
            if isinstance(target, int):
                if width <= height:
                    size = (target, int(target * height / width))
                else:
                    size = (int(target * width / height), target)
            else:
                size = (target[1], target[0])
            if size != image.size:
                image = image.resize(size, filters[self.resample])
        if self.crop is not None:
            crop_h, crop_w = _pair(self.crop)
            width, height = image.size
            if crop_h > height or crop_w > width:
                raise ValueError(
                    f"a {crop_h}x{crop_w} crop does not fit in the {height}x{width} image"
                )
            top = int(round((height - crop_h) / 2.0))
            left = int(round((width - crop_w) / 2.0))
            image = image.crop((left, top, left + crop_w, top + crop_h))
        array = np.asarray(image, dtype=np.float32)
        if array.ndim == 2:
            array = array[:, :, None]
        if self.channel_order == "BGR" and not self.grayscale:
            array = array[:, :, ::-1]
        array = array * np.float32(self.scale)
        if self.mean is not None:
            array = array - np.asarray(self.mean, dtype=np.float32)
        if self.std is not None:
            array = array / np.asarray(self.std, dtype=np.float32)
        if self.layout != "NHWC":
            array = array.transpose(2, 0, 1)
        return np.ascontiguousarray(array, dtype=np.float32)


_PREPROCESS_ALIASES = {"order": "channel_order", "channels": "channel_order", "gray": "grayscale"}


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise DataError(
            f"Image preprocessing {name}={value!r} is not one of {', '.join(allowed)}.",
        )


def _apply_flag(token: str, fields: dict[str, Any], lists: dict[str, list[float]]) -> None:
    word = token.lower()
    if word == "imagenet":
        lists["mean"] = list(IMAGENET_MEAN)
        lists["std"] = list(IMAGENET_STD)
    elif word in ("gray", "grayscale"):
        fields["grayscale"] = True
    elif word in ("rgb", "bgr"):
        fields["channel_order"] = word.upper()
    elif word in ("nchw", "nhwc"):
        fields["layout"] = word.upper()
    else:
        raise DataError(
            f"Unknown image preprocessing word '{token}'.",
            hint="Use key=value pairs (resize=256,crop=224,...) or one of the words "
            "imagenet, gray, rgb, bgr, nchw, nhwc.",
        )


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _parse_float(text: str, key: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise DataError(f"Image preprocessing {key} value '{text}' is not a number.") from None


def _parse_fraction(text: str) -> float:
    try:
        return float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise DataError(
            f"Image preprocessing scale '{text}' is not a number.",
            hint="Write it as a number or a fraction, e.g. scale=1/255.",
        ) from None


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise DataError(f"Image preprocessing grayscale='{text}' is not true or false.")


def _parse_size(text: str, key: str) -> Size:
    parts = re.split(r"[xX]", text.strip())
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        numbers = []
    if len(numbers) not in (1, 2) or any(n < 1 for n in numbers):
        raise DataError(
            f"Image preprocessing {key}='{text}' is not a size.",
            hint=f"Write {key}=224 (shorter side / square) or {key}=224x320 (height x width).",
        )
    return numbers[0] if len(numbers) == 1 else (numbers[0], numbers[1])


def _pair(size: Size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else size


# ---------------------------------------------------------------------------- --shape


def parse_shapes(specs: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Read ``--shape`` values like ``input:1x3x224x224`` into {name: shape}.

    The name is everything before the last colon, so TensorFlow-style names such as
    ``input_1:0:1x3x224x224`` work.

    Raises:
        DataError: a value is not ``name:DIMxDIM...`` with positive integers, or a name
            appears twice.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        name, sep, dims_text = spec.strip().rpartition(":")
        dims: list[int] = []
        ok = bool(sep and name and dims_text)
        if ok:
            for part in re.split(r"[xX,]", dims_text):
                if not part.strip().isdigit() or int(part) < 1:
                    ok = False
                    break
                dims.append(int(part))
        if not ok:
            raise DataError(
                f"--shape '{spec}' is not of the form name:DIMxDIM... with positive integers.",
                hint="Write it like --shape input:1x3x224x224.",
            )
        if name in shapes:
            raise DataError(f"--shape gives input '{name}' twice.", hint="Give each input once.")
        shapes[name] = tuple(dims)
    return shapes


# ---------------------------------------------------------------------------- opening


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
    rules = _input_rules(inputs, shapes or {})
    if not rules:
        raise DataError("The model has no inputs to feed, so it takes no data.")
    if isinstance(source, str) and source == RANDOM_SOURCE:
        _warn_ignored(preprocess is not None, "the image preprocessing", "random data")
        return _open_random(rules, num_samples, seed)
    path = Path(source)
    if not path.exists():
        raise DataError(
            f"Data source '{path}' does not exist.",
            hint="Give an .npz file, a folder of .npy/.npz files or images, or 'random'.",
        )
    if path.is_dir():
        kind = _folder_kind(path)
        if kind == "images":
            return _open_images(path, rules, preprocess)
        _warn_ignored(preprocess is not None, "the image preprocessing", f"the {kind} in '{path}'")
        if kind == "npy":
            return _open_npy_folder(path, rules, labels_key)
        return _open_npz_folder(path, rules, labels_key)
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return _open_images(path, rules, preprocess)
    _warn_ignored(preprocess is not None, "the image preprocessing", f"'{path.name}'")
    if suffix == ".npz":
        return _open_npz_file(path, rules, labels_key)
    if suffix == ".npy":
        return _open_npy_file(path, rules)
    raise DataError(
        f"Data source '{path}' is neither an .npz, an .npy, an image nor a folder.",
        hint="Give an .npz keyed by input name, a folder of .npy/.npz files or images, or "
        "'random'.",
    )


def _warn_ignored(condition: bool, what: str, where: str) -> None:
    if condition:
        warn(f"{what} is ignored for {where}; it applies to image data only.")


# ---------------------------------------------------------------------------- input rules


@dataclass
class _Input:
    """What the data for one model input must look like."""

    name: str
    dtype: np.dtype | None
    dims: tuple[int | str | None, ...] | None  # model dims, dynamic ones filled from --shape

    @property
    def rank(self) -> int | None:
        return None if self.dims is None else len(self.dims)

    def expected_text(self) -> str:
        if self.dims is None:
            return "any shape"
        return _shape_text(tuple(d if isinstance(d, int) else None for d in self.dims))

    def fixed_batch(self) -> int | None:
        if self.dims and isinstance(self.dims[0], int) and self.dims[0] > 0:
            return self.dims[0]
        return None


def _input_rules(
    inputs: Sequence[TensorSpec], shapes: Mapping[str, tuple[int, ...]]
) -> list[_Input]:
    names = [spec.name for spec in inputs]
    unknown = sorted(set(shapes) - set(names))
    if unknown:
        raise DataError(
            f"--shape names {_names(unknown)}, which the model does not have as input(s).",
            hint=f"The model's inputs are {_names(names)}.",
        )
    # A named dynamic dim set for one input (e.g. 'seq') holds for every input that has it.
    symbols: dict[str, int] = {}
    for spec in inputs:
        given = shapes.get(spec.name)
        if given is not None and spec.shape is not None and len(spec.shape) == len(given):
            for dim, size in zip(spec.shape[1:], given[1:], strict=True):
                if isinstance(dim, str):
                    symbols.setdefault(dim, size)
    rules = []
    for spec in inputs:
        dims = spec.shape
        given = shapes.get(spec.name)
        if given is not None:
            dims = _merge_shape(spec, given)
        elif dims is not None:
            dims = (dims[0], *(symbols.get(d, d) if isinstance(d, str) else d for d in dims[1:]))
        if dims is not None and len(dims) == 0:
            raise DataError(
                f"Input '{spec.name}' is a scalar, so it has no axis to count samples along.",
                hint="graphopt feeds data with a leading batch axis; export the model with "
                "a batch axis on every input.",
            )
        rules.append(_Input(spec.name, spec.dtype, dims))
    return rules


def _merge_shape(spec: TensorSpec, given: tuple[int, ...]) -> tuple[int | str | None, ...]:
    """The model's dims with the dynamic ones after the batch axis set from --shape."""
    dims = spec.shape
    if dims is not None and len(dims) != len(given):
        raise DataError(
            f"--shape gives input '{spec.name}' the shape {_shape_text(given)}, but the "
            f"model declares {spec.shape_text()} (rank {len(dims)}).",
            hint=f"Give {len(dims)} dimensions.",
        )
    if dims is None:
        return (None, *given[1:]) if given else ()
    for axis, (dim, size) in enumerate(zip(dims, given, strict=True)):
        if isinstance(dim, int) and dim != size:
            what = "its batch axis" if axis == 0 else f"axis {axis}"
            raise DataError(
                f"--shape gives input '{spec.name}' the shape {_shape_text(given)}, but the "
                f"model fixes {what} to {dim} ({spec.shape_text()}).",
                hint="Only dynamic dimensions can be set with --shape.",
            )
    return (dims[0], *given[1:]) if dims else ()


def _fixed_batch(rules: Sequence[_Input]) -> int | None:
    fixed = {rule.name: rule.fixed_batch() for rule in rules if rule.fixed_batch() is not None}
    sizes = set(fixed.values())
    if len(sizes) > 1:
        listing = ", ".join(f"'{name}' {size}" for name, size in fixed.items())
        raise DataError(
            f"The model's inputs fix different batch sizes ({listing}), so graphopt cannot "
            "tell which axis counts samples.",
            hint="Export the model with one batch axis shared by all inputs.",
        )
    return sizes.pop() if sizes else None


def _shape_text(shape: Sequence[int | None]) -> str:
    return "x".join("?" if d is None else str(d) for d in shape) or "scalar"


def _names(names: Sequence[str]) -> str:
    return ", ".join(f"'{n}'" for n in names) if names else "(none)"


def _kind(dtype: np.dtype) -> str:
    if dtype.kind == "b":
        return "bool"
    if dtype.kind in "iu":
        return "int"
    if dtype.kind == "f" or dtype.name.startswith(("float", "bfloat")):
        return "float"
    return dtype.kind


def _check_dtype(rule: _Input, given: np.dtype, where: str) -> None:
    """Raise unless `given` can feed the input: same kind, or a cast that loses nothing."""
    if given.hasobject:
        raise _pickle_error(where)
    target = rule.dtype
    if target is None or given == target:
        return
    want, have = _kind(target), _kind(given)
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


def _pickle_error(where: str) -> DataError:
    return DataError(
        f"{where} holds Python objects (a pickled object array), which graphopt refuses to "
        "load because unpickling can run code.",
        hint="Save plain numeric arrays (np.savez with numeric dtypes).",
    )


def _convert(rule: _Input, array: np.ndarray, where: str) -> np.ndarray:
    target = rule.dtype
    if target is None or array.dtype == target:
        return array
    if _kind(target) == "int" and _kind(array.dtype) == "int" and array.size:
        info = np.iinfo(target)
        low, high = array.min(), array.max()
        if low < info.min or high > info.max:
            raise DataError(
                f"Input '{rule.name}' takes {target.name}, but {where} holds values from {low} "
                f"to {high}, outside its range.",
                hint=f"Check the data; {target.name} holds {info.min}..{info.max}.",
            )
    return array.astype(target)


def _check_shape(rule: _Input, shape: tuple[int, ...], where: str, *, single_ok: bool) -> int:
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
            f"counts samples), but {where} holds shape {_shape_text(shape)}.",
            hint="Stack the samples along a leading axis and keep the model's other axes.",
        )
    for axis, (dim, size) in enumerate(zip(rule.dims[1:], trailing, strict=True), start=1):
        if isinstance(dim, int) and dim != size:
            raise DataError(
                f"Input '{rule.name}' expects {rule.expected_text()}, but {where} holds shape "
                f"{_shape_text(shape)} (axis {axis if count >= 0 else axis - 1} is {size}, "
                f"not {dim}).",
                hint="Resize or regenerate the data to the model's input shape.",
            )
    return count


def _check_shared_dims(
    rules: Sequence[_Input], trailing: Mapping[str, tuple[int, ...]], where: str
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


# ---------------------------------------------------------------------------- streaming core


class _Column(abc.ABC):
    """Reads the rows of one array in order, a few at a time."""

    @abc.abstractmethod
    def read(self, n: int) -> np.ndarray: ...


class _SliceColumn(_Column):
    """Rows of an in-memory or memory-mapped array (or a single sample without the axis)."""

    def __init__(self, array: np.ndarray, single: bool = False) -> None:
        self.array = array[None] if single else array
        self.pos = 0

    def read(self, n: int) -> np.ndarray:
        rows = np.ascontiguousarray(self.array[self.pos : self.pos + n])
        self.pos += n
        return rows


class _StreamColumn(_Column):
    """Rows of a C-order .npy stream (an .npz member), read sequentially without seeking."""

    def __init__(self, stream: IO[bytes], header: _Header, where: str, single: bool) -> None:
        self.stream = stream
        self.header = header
        self.where = where
        self.trailing = header.shape if single else header.shape[1:]

    def read(self, n: int) -> np.ndarray:
        out = np.empty((n, *self.trailing), dtype=self.header.dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        filled = 0
        try:
            while filled < len(view):
                got = self.stream.readinto(view[filled:])
                if not got:
                    break
                filled += got
        except (OSError, zipfile.BadZipFile, EOFError) as exc:
            raise _unreadable(self.where, exc) from None
        if filled < len(view):
            raise DataError(
                f"{self.where} ends early: it is truncated or corrupt.",
                hint="Write the file again.",
            )
        return out


@dataclass
class _Chunk:
    """A run of samples from one place (a file, an .npz, an image, the random generator).

    `shapes` are the trailing (per-sample) shapes per input when known before reading; they
    let `open_dataset` check the fixed-batch rule up front.
    """

    where: str
    count: int
    shapes: dict[str, tuple[int, ...]] | None
    open_columns: Callable[[ExitStack], dict[str, _Column]]


class _StreamingDataset(Dataset):
    def __init__(
        self,
        *,
        description: str,
        rules: Sequence[_Input],
        chunks: Sequence[_Chunk],
        has_labels: bool,
        is_random: bool = False,
    ) -> None:
        self._rules = list(rules)
        self._chunks = [c for c in chunks if c.count > 0]
        self._fixed = _fixed_batch(rules)
        self._len = sum(c.count for c in self._chunks)
        self.has_labels = has_labels
        self.is_random = is_random
        self.classes: list[str] | None = None
        if self._fixed is not None and self._fixed > 1:
            self._check_fixed_batch(description, self._fixed)
        note = f"{self._len} samples"
        if self._fixed is not None:
            note += f", batches of {self._fixed} fixed by the model"
        self.description = f"{description} ({note})"

    def __len__(self) -> int:
        return self._len

    def batches(self, batch_size: int) -> Iterator[Batch]:
        size = self._batch_size(batch_size)
        return self._stream(size)

    def num_batches(self, batch_size: int) -> int:
        size = self._batch_size(batch_size)
        total, pending, shapes = 0, 0, None
        for chunk in self._chunks:
            if pending and chunk.shapes is not None and chunk.shapes != shapes:
                total, pending = total + 1, 0
            shapes = chunk.shapes if chunk.shapes is not None else shapes
            pending += chunk.count
            total, pending = total + pending // size, pending % size
        return total + (1 if pending else 0)

    def _batch_size(self, batch_size: int) -> int:
        if self._fixed is not None:
            return self._fixed
        if batch_size < 1:
            raise DataError(f"Batch size {batch_size} must be at least 1.")
        return batch_size

    def _check_fixed_batch(self, description: str, fixed: int) -> None:
        """Runs of same-shaped samples must fill whole batches (a shape change cuts a batch).

        Skipped when some shapes are known only after reading (images kept at their own
        size); `_flush` then raises when a short batch turns up.
        """
        if any(chunk.shapes is None for chunk in self._chunks):
            return
        run, shapes = 0, None
        for chunk in [*self._chunks, None]:
            if chunk is None or chunk.shapes != shapes:
                if run % fixed:
                    raise DataError(
                        f"The model's batch axis is fixed to {fixed}, but {description} "
                        f"holds {run} samples{' of one shape' if len(self._chunks) > 1 else ''}, "
                        f"not a multiple of {fixed}; graphopt neither drops nor pads samples.",
                        hint=f"Give a multiple of {fixed} samples, or export the model "
                        "with a dynamic batch axis.",
                    )
                run = 0
            if chunk is not None:
                shapes = chunk.shapes
                run += chunk.count

    def _stream(self, size: int) -> Iterator[Batch]:
        parts: list[dict[str, np.ndarray]] = []
        pending = 0
        shapes: dict[str, tuple[int, ...]] | None = None
        for chunk in self._chunks:
            with ExitStack() as stack:
                columns = chunk.open_columns(stack)
                left = chunk.count
                while left:
                    take = min(left, size - pending)
                    part = self._read(chunk, columns, take)
                    left -= take
                    part_shapes = {k: v.shape[1:] for k, v in part.items() if k != _LABELS}
                    if pending and part_shapes != shapes:
                        yield self._flush(parts, size, chunk.where)
                        parts, pending = [], 0
                    parts.append(part)
                    pending += take
                    shapes = part_shapes
                    if pending == size:
                        yield self._flush(parts, size, chunk.where)
                        parts, pending = [], 0
        if pending:
            yield self._flush(parts, size, "the end of the data")

    def _read(self, chunk: _Chunk, columns: dict[str, _Column], n: int) -> dict[str, np.ndarray]:
        part = {}
        for rule in self._rules:
            part[rule.name] = _convert(rule, columns[rule.name].read(n), chunk.where)
        if _LABELS in columns:
            part[_LABELS] = columns[_LABELS].read(n)
        return part

    def _flush(self, parts: list[dict[str, np.ndarray]], size: int, where: str) -> Batch:
        count = sum(next(iter(p.values())).shape[0] for p in parts)
        if self._fixed is not None and count != self._fixed:
            raise DataError(
                f"The model's batch axis is fixed to {self._fixed}, but only {count} sample(s) "
                f"of one shape are left before {where}.",
                hint="Give a multiple of the batch size per shape, or export the model with a "
                "dynamic batch axis.",
            )

        def join(key: str) -> np.ndarray:
            arrays = [p[key] for p in parts]
            return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)

        feeds = {rule.name: join(rule.name) for rule in self._rules}
        labels = join(_LABELS) if _LABELS in parts[0] else None
        return Batch(feeds=feeds, labels=labels)


def _unreadable(where: str, exc: BaseException) -> DataError:
    text = str(exc).strip().splitlines()
    detail = text[0] if text else type(exc).__name__
    return DataError(
        f"{where} could not be read ({detail}).",
        hint="The file may be corrupt or truncated; write it again with numpy.",
    )


# ---------------------------------------------------------------------------- .npy / .npz headers


@dataclass(frozen=True)
class _Header:
    shape: tuple[int, ...]
    fortran: bool
    dtype: np.dtype


def _read_header(stream: IO[bytes], where: str) -> _Header:
    fmt = np.lib.format
    try:
        version = fmt.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(stream)
        else:
            from numpy.lib import _format_impl  # the only reader of version 3.0 headers

            shape, fortran, dtype = _format_impl._read_array_header(stream, version)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, ImportError, AttributeError) as e:
        raise _unreadable(where, e) from None
    if dtype.hasobject:
        raise _pickle_error(where)
    return _Header(tuple(int(d) for d in shape), bool(fortran), dtype)


def _npy_header(path: Path, where: str) -> _Header:
    try:
        with open(path, "rb") as stream:
            return _read_header(stream, where)
    except OSError as exc:
        raise _unreadable(where, exc) from None


def _npz_headers(path: Path, where: str) -> dict[str, _Header]:
    """Header of every array in an .npz, read without reading any data."""
    headers = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                if not member.endswith(".npy"):
                    continue
                with archive.open(member) as stream:
                    headers[member[:-4]] = _read_header(stream, f"array '{member[:-4]}' of {where}")
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise DataError(
            f"{where} is not a readable .npz archive ({str(exc).strip() or type(exc).__name__}).",
            hint="Write it again with numpy.savez or numpy.savez_compressed.",
        ) from None
    return headers


def _npz_column_opener(
    path: Path, where: str, keys: Mapping[str, tuple[str, _Header, bool]]
) -> Callable[[ExitStack], dict[str, _Column]]:
    """Columns reading the given members of an .npz; keys: column -> (member, header, single)."""

    def open_columns(stack: ExitStack) -> dict[str, _Column]:
        try:
            archive = stack.enter_context(zipfile.ZipFile(path))
            columns: dict[str, _Column] = {}
            for column, (member, header, single) in keys.items():
                label = f"array '{member}' of {where}"
                stream = stack.enter_context(archive.open(member + ".npy"))
                _read_header(stream, label)
                if header.fortran:
                    # Rows of a Fortran-order array are not contiguous: read it whole.
                    whole = _StreamColumn(
                        stream,
                        _Header((1, math.prod(header.shape)), False, header.dtype),
                        label,
                        False,
                    ).read(1)
                    array = whole.reshape(header.shape, order="F")
                    columns[column] = _SliceColumn(array, single)
                else:
                    columns[column] = _StreamColumn(stream, header, label, single)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            raise _unreadable(where, exc) from None
        return columns

    return open_columns


def _label_count(header: _Header, where: str, count: int, single: bool) -> None:
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


def _sample_count(
    rules: Sequence[_Input],
    headers: Mapping[str, _Header],
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
        _check_dtype(rule, header.dtype, label)
        count = _check_shape(rule, header.shape, label, single_ok=single_ok)
        single[rule.name] = count < 0
        counts[rule.name] = 1 if count < 0 else count
        trailing[rule.name] = header.shape if count < 0 else header.shape[1:]
    if len(set(counts.values())) > 1:
        listing = ", ".join(f"'{name}' {n}" for name, n in counts.items())
        raise DataError(
            f"The arrays in {where} hold different numbers of samples ({listing}).",
            hint="Give every input the same number of samples along axis 0.",
        )
    _check_shared_dims(rules, trailing, where)
    return next(iter(counts.values())), single, trailing


def _check_keys(rules: Sequence[_Input], keys: Sequence[str], labels_key: str, where: str) -> bool:
    """Every input present, nothing unknown; return whether labels are there."""
    names = [rule.name for rule in rules]
    has_labels = labels_key in keys and labels_key not in names
    unknown = [k for k in keys if k not in names and not (has_labels and k == labels_key)]
    if unknown:
        raise DataError(
            f"{where} holds {_names(unknown)}, which the model does not take as input.",
            hint=f"The model's inputs are {_names(names)}; labels go under '{labels_key}'.",
        )
    missing = [n for n in names if n not in keys]
    if missing:
        raise DataError(
            f"{where} has no array for input(s) {_names(missing)}.",
            hint=f"The model's inputs are {_names(names)}; save one array per input "
            "(np.savez(path, **{name: array})).",
        )
    return has_labels


# ---------------------------------------------------------------------------- sources


def _open_npz_file(path: Path, rules: Sequence[_Input], labels_key: str) -> Dataset:
    where = f"'{path.name}'"
    headers = _npz_headers(path, where)
    has_labels = _check_keys(rules, list(headers), labels_key, where)
    count, _, trailing = _sample_count(rules, headers, where, single_ok=False, keyed=True)
    keys = {rule.name: (rule.name, headers[rule.name], False) for rule in rules}
    if has_labels:
        _label_count(headers[labels_key], where, count, single=False)
        keys[_LABELS] = (labels_key, headers[labels_key], False)
    chunk = _Chunk(where, count, trailing, _npz_column_opener(path, where, keys))
    return _StreamingDataset(
        description=path.name, rules=rules, chunks=[chunk], has_labels=has_labels
    )


def _mmap_opener(path: Path, where: str, single: bool) -> Callable[[ExitStack], dict[str, _Column]]:
    def load() -> np.ndarray:
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError:
            # e.g. an empty array, which cannot be mapped: it is small, read it.
            try:
                return np.load(path, allow_pickle=False)
            except (ValueError, OSError, EOFError) as exc:
                raise _unreadable(where, exc) from None
        except (OSError, EOFError) as exc:
            raise _unreadable(where, exc) from None

    def open_columns(stack: ExitStack) -> dict[str, _Column]:
        return {"": _SliceColumn(load(), single)}

    return open_columns


def _single_input(rules: Sequence[_Input], what: str) -> _Input:
    if len(rules) != 1:
        raise DataError(
            f"{what} can feed only a single-input model, and this one takes "
            f"{_names([r.name for r in rules])}.",
            hint="Use an .npz file (or a folder of them) keyed by input name.",
        )
    return rules[0]


def _rename(
    opener: Callable[[ExitStack], dict[str, _Column]], name: str
) -> Callable[[ExitStack], dict[str, _Column]]:
    def open_columns(stack: ExitStack) -> dict[str, _Column]:
        return {name: opener(stack)[""]}

    return open_columns


def _open_npy_file(path: Path, rules: Sequence[_Input]) -> Dataset:
    rule = _single_input(rules, "An .npy file")
    where = f"'{path.name}'"
    header = _npy_header(path, where)
    count, _, trailing = _sample_count(
        [rule], {rule.name: header}, where, single_ok=False, keyed=False
    )
    chunk = _Chunk(where, count, trailing, _rename(_mmap_opener(path, where, False), rule.name))
    return _StreamingDataset(description=path.name, rules=rules, chunks=[chunk], has_labels=False)


def _natural_key(path: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def _folder_kind(folder: Path) -> str:
    files = [p for p in folder.iterdir() if not p.name.startswith(".") and p.is_file()]
    suffixes = {p.suffix.lower() for p in files}
    kinds = []
    if ".npy" in suffixes:
        kinds.append("npy")
    if ".npz" in suffixes:
        kinds.append("npz")
    if suffixes & set(IMAGE_SUFFIXES) or (not kinds and _class_folders(folder)):
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


def _open_npy_folder(folder: Path, rules: Sequence[_Input], labels_key: str) -> Dataset:
    rule = _single_input(rules, f"A folder of .npy files ('{folder}')")
    files = sorted(
        (p for p in folder.iterdir() if p.suffix.lower() == ".npy" and not p.name.startswith(".")),
        key=_natural_key,
    )
    labels_file = folder / f"{labels_key}.npy"
    has_labels = labels_file in files and rule.name != labels_key
    if has_labels:
        files.remove(labels_file)
    if not files:
        raise DataError(f"Folder '{folder}' holds no .npy sample files.")
    chunks = []
    for path in files:
        where = f"'{folder.name}/{path.name}'"
        header = _npy_header(path, where)
        count, single, trailing = _sample_count(
            [rule], {rule.name: header}, where, single_ok=True, keyed=False
        )
        opener = _mmap_opener(path, where, single[rule.name])
        chunks.append(_Chunk(where, count, trailing, _rename(opener, rule.name)))
    if has_labels:
        chunks = _attach_folder_labels(labels_file, folder, chunks, rule.name)
    return _StreamingDataset(
        description=f"{folder.name}/, {len(files)} .npy files",
        rules=rules,
        chunks=chunks,
        has_labels=has_labels,
    )


def _attach_folder_labels(
    labels_file: Path, folder: Path, chunks: list[_Chunk], name: str
) -> list[_Chunk]:
    """Give each file's chunk its slice of `labels.npy` (labels in natural file order)."""
    where = f"'{folder.name}/{labels_file.name}'"
    header = _npy_header(labels_file, where)
    total = sum(c.count for c in chunks)
    if not header.shape or header.shape[0] != total:
        held = header.shape[0] if header.shape else "a scalar"
        raise DataError(
            f"{where} holds {held} labels, but the folder holds {total} samples.",
            hint="Give one label per sample, in the files' natural order (2 before 10).",
        )
    labels_opener = _mmap_opener(labels_file, where, False)
    out = []
    start = 0
    for chunk in chunks:

        def open_columns(
            stack: ExitStack, chunk: _Chunk = chunk, start: int = start
        ) -> dict[str, _Column]:
            columns = chunk.open_columns(stack)
            labels = labels_opener(stack)[""]
            labels.pos = start  # type: ignore[attr-defined]
            columns[_LABELS] = labels
            return columns

        out.append(_Chunk(chunk.where, chunk.count, chunk.shapes, open_columns))
        start += chunk.count
    return out


def _open_npz_folder(folder: Path, rules: Sequence[_Input], labels_key: str) -> Dataset:
    files = sorted(
        (p for p in folder.iterdir() if p.suffix.lower() == ".npz" and not p.name.startswith(".")),
        key=_natural_key,
    )
    chunks = []
    labelled: list[bool] = []
    for path in files:
        where = f"'{folder.name}/{path.name}'"
        headers = _npz_headers(path, where)
        has_labels = _check_keys(rules, list(headers), labels_key, where)
        count, single, trailing = _sample_count(rules, headers, where, single_ok=True, keyed=True)
        keys = {r.name: (r.name, headers[r.name], single[r.name]) for r in rules}
        if has_labels:
            one = all(single.values())
            _label_count(headers[labels_key], where, count, single=one)
            keys[_LABELS] = (labels_key, headers[labels_key], one)
        labelled.append(has_labels)
        chunks.append(_Chunk(where, count, trailing, _npz_column_opener(path, where, keys)))
    if any(labelled) and not all(labelled):
        without = [f.name for f, has in zip(files, labelled, strict=True) if not has][:3]
        raise DataError(
            f"Some .npz files in '{folder}' have '{labels_key}' and others do not "
            f"(e.g. {', '.join(without)}).",
            hint="Give labels in every file or in none.",
        )
    return _StreamingDataset(
        description=f"{folder.name}/, {len(files)} .npz files",
        rules=rules,
        chunks=chunks,
        has_labels=bool(labelled) and all(labelled),
    )


# ---------------------------------------------------------------------------- images


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _class_folders(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_dir() and not p.name.startswith(".") and any(_is_image(f) for f in p.rglob("*"))
    )


def _open_images(
    source: Path, rules: Sequence[_Input], preprocess: ImagePreprocess | None
) -> Dataset:
    rule = _single_input(rules, "Image data")
    preprocess = preprocess or ImagePreprocess()
    layout = _resolve_layout(rule, preprocess)
    if layout != preprocess.layout:
        preprocess = _replace(preprocess, layout=layout)
    classes: list[str] | None = None
    if source.is_file():
        files, labels = [source], None
        description = source.name
    else:
        class_dirs = _class_folders(source)
        top = sorted(p for p in source.iterdir() if p.is_file() and _is_image(p))
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
                found = sorted(p for p in directory.rglob("*") if p.is_file() and _is_image(p))
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
        chunks.append(_Chunk(where, 1, shapes, opener))
    dataset = _StreamingDataset(
        description=description, rules=rules, chunks=chunks, has_labels=labels is not None
    )
    dataset.classes = classes
    return dataset


def _replace(preprocess: ImagePreprocess, **changes: Any) -> ImagePreprocess:
    import dataclasses

    return dataclasses.replace(preprocess, **changes)


def _resolve_layout(rule: _Input, preprocess: ImagePreprocess) -> Literal["NCHW", "NHWC"]:
    if preprocess.layout != "auto":
        return preprocess.layout
    dims = rule.dims
    if dims is not None and len(dims) == 4:
        if dims[1] in (1, 3):
            return "NCHW"
        if dims[3] in (1, 3):
            return "NHWC"
    return "NCHW"


def _model_image_size(rule: _Input, layout: str) -> tuple[int, int] | None:
    if rule.dims is None or len(rule.dims) != 4:
        return None
    height, width = rule.dims[1:3] if layout == "NHWC" else rule.dims[2:4]
    if isinstance(height, int) and isinstance(width, int):
        return height, width
    return None


def _sample_shape(layout: str, size: tuple[int, int], channels: int) -> tuple[int, ...]:
    return (*size, channels) if layout == "NHWC" else (channels, *size)


def _check_image_rule(
    rule: _Input,
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
            _check_shape(rule, (1, *sample), "the image preprocessing", single_ok=False)
    if rule.dtype is not None:
        kind = _kind(rule.dtype)
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
    rule: _Input,
    preprocess: ImagePreprocess,
    model_size: tuple[int, int] | None,
    label: int | None,
) -> Callable[[ExitStack], dict[str, _Column]]:
    def open_columns(stack: ExitStack) -> dict[str, _Column]:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as image:
                image.load()
                array = preprocess.apply(image, model_size)
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(
                f"{where} could not be read or preprocessed ({str(e).strip() or type(e).__name__}).",
                hint="Remove or replace the file, or change the preprocessing (resize=, crop=).",
            ) from None
        if rule.dtype is not None and _kind(rule.dtype) == "int":
            info = np.iinfo(rule.dtype)
            array = np.clip(np.rint(array), info.min, info.max).astype(rule.dtype)
        _check_shape(rule, (1, *array.shape), where, single_ok=False)
        columns: dict[str, _Column] = {rule.name: _SliceColumn(array, single=True)}
        if label is not None:
            columns[_LABELS] = _SliceColumn(np.array([label], dtype=np.int64))
        return columns

    return open_columns


# ---------------------------------------------------------------------------- random


def _open_random(rules: Sequence[_Input], num_samples: int, seed: int) -> Dataset:
    if num_samples < 1:
        raise DataError(f"Random data needs at least one sample (got {num_samples}).")
    sample_shapes = {rule.name: _random_sample_shape(rule) for rule in rules}
    for rule in rules:
        if rule.dtype is not None and _kind(rule.dtype) not in ("int", "float", "bool"):
            raise DataError(
                f"Input '{rule.name}' takes {rule.dtype.name} values, which graphopt cannot "
                "draw at random.",
                hint="Give real data with --data.",
            )
    fixed = _fixed_batch(rules)
    if fixed is not None and num_samples % fixed:
        num_samples += fixed - num_samples % fixed
    warn(
        "using RANDOM data: accuracy and fidelity numbers measured on it say nothing about "
        "the model's real accuracy, and calibration ranges from it are meaningless for real "
        "inputs. Pass real samples with --data for numbers you can trust."
    )

    def open_columns(stack: ExitStack) -> dict[str, _Column]:
        return {
            rule.name: _RandomColumn(rule, sample_shapes[rule.name], seed, index)
            for index, rule in enumerate(rules)
        }

    chunk = _Chunk("random data", num_samples, sample_shapes, open_columns)
    return _StreamingDataset(
        description="random", rules=rules, chunks=[chunk], has_labels=False, is_random=True
    )


def _random_sample_shape(rule: _Input) -> tuple[int, ...]:
    if rule.dims is None:
        raise DataError(
            f"Input '{rule.name}' has no declared shape, so random data cannot be drawn for it.",
            hint=f"Give its shape with --shape {rule.name}:1x3x224x224 (your model's sizes).",
        )
    missing = [
        (axis, dim) for axis, dim in enumerate(rule.dims) if axis and not isinstance(dim, int)
    ]
    if missing:
        named = ", ".join(
            f"axis {axis}" + (f" ('{dim}')" if isinstance(dim, str) else "")
            for axis, dim in missing
        )
        example = "x".join(
            str(d) if isinstance(d, int) else ("1" if axis == 0 else (d or "?"))
            for axis, d in enumerate(rule.dims)
        )
        raise DataError(
            f"Input '{rule.name}' ({rule.expected_text()}) has dynamic dimension(s) {named}, "
            "so random data cannot be drawn for it.",
            hint=f"Give the sizes with --shape {rule.name}:{example}, replacing the names by "
            "numbers (e.g. --shape input:1x3x224x224).",
        )
    return tuple(int(d) for d in rule.dims[1:])  # type: ignore[arg-type]


class _RandomColumn(_Column):
    """Sample i of input k comes from its own seeded generator: same data for any batch size."""

    def __init__(self, rule: _Input, shape: tuple[int, ...], seed: int, index: int) -> None:
        self.rule = rule
        self.shape = shape
        self.seed = seed
        self.index = index
        self.pos = 0

    def read(self, n: int) -> np.ndarray:
        dtype = self.rule.dtype if self.rule.dtype is not None else np.dtype(np.float32)
        kind = _kind(dtype)
        out = np.empty((n, *self.shape), dtype=dtype)
        for row in range(n):
            rng = np.random.default_rng([self.seed, self.index, self.pos + row])
            if kind == "bool":
                out[row] = rng.integers(0, 2, size=self.shape).astype(bool)
            elif kind == "int":
                out[row] = rng.integers(0, RANDOM_INT_HIGH, size=self.shape).astype(dtype)
            else:
                out[row] = rng.standard_normal(size=self.shape, dtype=np.float32).astype(dtype)
        self.pos += n
        return out
