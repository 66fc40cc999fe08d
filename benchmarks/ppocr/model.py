"""The PP-OCRv4 recognition model from the rapidocr-onnxruntime wheel, its dictionary, and
rapidocr's greedy CTC decoding."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

WHEEL_REQUIREMENT = "rapidocr-onnxruntime==1.4.4"
WHEEL_NAME = "rapidocr_onnxruntime-1.4.4-py3-none-any.whl"
MODEL_MEMBER = "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"
MODEL_NAME = "ch_PP-OCRv4_rec_infer.onnx"
DICT_NAME = "characters.txt"
INPUT_NAME = "x"
HEIGHT, WIDTH = 48, 320  # rapidocr's rec_img_shape [3, 48, 320]


def fetch_model(cache: Path) -> Path:
    """Download the wheel once (pip download, no dependencies) and extract the model."""
    cache.mkdir(parents=True, exist_ok=True)
    model = cache / MODEL_NAME
    if model.exists():
        return model
    wheel = cache / WHEEL_NAME
    if not wheel.exists():
        print(f"downloading {WHEEL_REQUIREMENT} into {cache} ...", file=sys.stderr, flush=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--quiet",
                WHEEL_REQUIREMENT,
                "-d",
                os.fspath(cache),
            ],
            check=True,
        )
    with zipfile.ZipFile(wheel) as archive:
        data = archive.read(MODEL_MEMBER)
    partial = model.with_suffix(".part")
    partial.write_bytes(data)
    partial.replace(model)
    return model


def read_characters(model: Path) -> list[str]:
    """The model's own character list (metadata_props "character", one per line), as
    rapidocr reads it: ``blank`` first, the file's characters, then ``' '`` last."""
    import onnx

    proto = onnx.load(os.fspath(model), load_external_data=False)
    meta = {p.key: p.value for p in proto.metadata_props}
    if "character" not in meta:
        raise SystemExit(f"{model} has no 'character' metadata; is it the PP-OCRv4 rec model?")
    return ["blank", *meta["character"].splitlines(), " "]


class CTCDecoder:
    """rapidocr's CTCLabelDecode, greedy: argmax per step, collapse repeats, drop blank (0)."""

    def __init__(self, characters: list[str]) -> None:
        self.characters = characters
        self.index = {c: i for i, c in enumerate(characters) if i > 0}

    def decode_indices(self, indices: np.ndarray) -> list[str]:
        texts = []
        for row in indices:
            keep = np.ones(len(row), dtype=bool)
            keep[1:] = row[1:] != row[:-1]
            keep &= row != 0
            texts.append("".join(self.characters[i] for i in row[keep]))
        return texts

    def __call__(self, probs: np.ndarray) -> list[str]:
        return self.decode_indices(probs.argmax(axis=2))
