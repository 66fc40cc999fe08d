"""The public types: a `Batch` of samples, and the `Dataset` that streams them."""

from __future__ import annotations

import abc
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


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
