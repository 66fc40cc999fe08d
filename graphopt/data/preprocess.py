"""How an image file becomes one sample: `ImagePreprocess` and its compact CLI form."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal

import numpy as np

from graphopt.errors import DataError

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
