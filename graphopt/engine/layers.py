"""Per-layer precision from TensorRT's engine inspector JSON (10.x and 11.x schemas).

With `ProfilingVerbosity.DETAILED`, `IEngineInspector.get_engine_information(JSON)` gives a
"Layers" list of objects with "Name", "LayerType", "Inputs" and "Outputs". TensorRT 10.x
states each tensor's type inside one "Format/Datatype" text (e.g. "Row major linear FP32
format (kLINEAR)"); 11.x splits it into "Format" and "DataType" ("Float", "Half", "Int8", ...).
With less verbosity a layer is only its name (a string); its precision is then unknown.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

# TensorRT's DataType names (11.x "DataType" field, and the words inside 10.x format texts).
_NAMES = {
    "float": "FP32",
    "fp32": "FP32",
    "half": "FP16",
    "fp16": "FP16",
    "bf16": "BF16",
    "bfloat16": "BF16",
    "int8": "INT8",
    "fp8": "FP8",
    "fp4": "FP4",
    "int4": "INT4",
    "int32": "INT32",
    "int64": "INT64",
    "bool": "BOOL",
    "uint8": "UINT8",
    "e8m0": "E8M0",
}
_WORDS = re.compile(r"\b(" + "|".join(sorted(_NAMES, key=len, reverse=True)) + r")\b", re.I)


@dataclass(frozen=True)
class LayerPrecision:
    """One engine layer and the types of its outputs (empty when the inspector did not say)."""

    name: str
    layer_type: str | None
    output_types: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.layer_type, "outputs": list(self.output_types)}


def tensor_type(tensor: dict[str, Any]) -> str | None:
    """The data type of one inspector tensor entry, normalized (FP32, FP16, INT8, ...)."""
    value = tensor.get("DataType")
    if isinstance(value, str) and value.strip():
        return _NAMES.get(value.strip().lower(), value.strip().upper())
    text = tensor.get("Format/Datatype")
    if isinstance(text, str):
        match = _WORDS.search(text)
        if match:
            return _NAMES[match.group(1).lower()]
    return None


def layer_precisions(info: dict[str, Any]) -> list[LayerPrecision]:
    """The layers of an inspector document with their output types."""
    layers = info.get("Layers", [])
    result = []
    for layer in layers if isinstance(layers, list) else []:
        if isinstance(layer, str):
            result.append(LayerPrecision(layer, None, ()))
            continue
        if not isinstance(layer, dict):
            continue
        outputs = layer.get("Outputs", [])
        types = tuple(
            t for t in (tensor_type(o) for o in outputs if isinstance(o, dict)) if t is not None
        )
        result.append(LayerPrecision(str(layer.get("Name", "?")), layer.get("LayerType"), types))
    return result


def precision_counts(layers: list[LayerPrecision]) -> dict[str, int]:
    """How many layers compute in each type (a layer counts under its first output's type)."""
    counts = Counter(layer.output_types[0] if layer.output_types else "unknown" for layer in layers)
    return dict(sorted(counts.items()))
