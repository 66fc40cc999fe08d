"""What a pass may use besides the model: data, where to run, a seed, a scratch folder."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import numpy as np

    from graphopt.data import Dataset
    from graphopt.model import Model
    from graphopt.passes.distill.teacher import TeacherSpec

    Metric = Callable[[Mapping[str, np.ndarray], np.ndarray], float]

Device = Literal["auto", "cpu", "cuda"]


@dataclass
class Context:
    """Shared inputs of a pipeline run, handed to every pass.

    Attributes:
        calib_data: calibration data (statistics, importance scores), if given.
        val_data: labelled or unlabelled validation data, if given.
        device: where ONNX Runtime runs ("auto" picks CUDA when it really works).
        threads: ORT intra-op threads, None for ORT's default.
        batch_size: samples per ORT run when streaming data.
        seed: seed for anything random a pass does.
        workdir: a scratch folder that lives as long as the run.
        metric: the user's accuracy metric `fn(outputs, labels) -> float` (batch mean), or
            None for top-1 accuracy; passes with an accuracy budget measure with it.
        teacher: where `distill` gets the teacher's logits (a logits file or a teacher
            model); None: the original model.
        original: the model before the pipeline's first pass (its file, or a copy), set by
            the pipeline; `distill`'s default teacher.
    """

    workdir: Path
    calib_data: Dataset | None = None
    val_data: Dataset | None = None
    device: Device = "auto"
    threads: int | None = None
    batch_size: int = 32
    seed: int = 0
    metric: Metric | None = None
    teacher: TeacherSpec | None = None
    original: Model | Path | None = None
