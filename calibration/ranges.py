"""What calibration returns: one `TensorRange` per tensor, and the error it raises."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from graphopt.errors import GraphoptError

Method = Literal["minmax", "percentile", "entropy", "mse"]
METHODS: tuple[str, ...] = get_args(Method)
HISTOGRAM_METHODS = ("percentile", "entropy", "mse")


class CalibrationError(GraphoptError, ValueError):
    """A request calibration cannot serve: an unknown or non-float tensor, a bad option.

    It is a `GraphoptError` (the CLI prints it as one paragraph) and a `ValueError` (callers
    that validate arguments catch it as such). `tensors` names the tensors at fault, if any,
    so a caller can leave them out and try again.
    """

    def __init__(
        self, message: str, *, hint: str | None = None, tensors: tuple[str, ...] = ()
    ) -> None:
        super().__init__(message, hint=hint)
        self.tensors = tensors


@dataclass(frozen=True, eq=False)
class TensorRange:
    """The calibrated range of one tensor.

    Attributes:
        name: the tensor's name in the model.
        low: float64; shape () per tensor, (C,) per channel. For symmetric ranges
            ``low == -high``.
        high: float64, same shape as `low`.
        axis: the channel axis (non-negative) of a per-channel range, else None.
        method: the calibration method that produced it.
        samples: how many data samples it was computed from.
    """

    name: str
    low: np.ndarray
    high: np.ndarray
    axis: int | None
    method: str
    samples: int

    def __post_init__(self) -> None:
        # Always float64 arrays (numpy turns 0-d results into scalars along the way).
        object.__setattr__(self, "low", np.array(self.low, dtype=np.float64))
        object.__setattr__(self, "high", np.array(self.high, dtype=np.float64))
        if self.low.shape != self.high.shape:
            raise ValueError(
                f"Range of '{self.name}': low {self.low.shape} and high {self.high.shape} "
                "differ in shape."
            )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TensorRange):
            return NotImplemented
        return (
            (self.name, self.axis, self.method, self.samples)
            == (other.name, other.axis, other.method, other.samples)
            and np.array_equal(self.low, other.low)
            and np.array_equal(self.high, other.high)
        )

    def amax(self) -> np.ndarray:
        """``max(|low|, |high|)``: the symmetric bound (shape of `low`)."""
        return np.maximum(np.abs(self.low), np.abs(self.high))

    @property
    def per_channel(self) -> bool:
        return self.axis is not None

    def to_dict(self) -> dict[str, object]:
        """Plain JSON data (floats round-trip exactly through Python's json)."""
        return {
            "name": self.name,
            "low": np.asarray(self.low, dtype=np.float64).tolist(),
            "high": np.asarray(self.high, dtype=np.float64).tolist(),
            "axis": self.axis,
            "method": self.method,
            "samples": self.samples,
        }

    @classmethod
    def from_dict(cls, data: dict[str, object], *, name: str | None = None) -> TensorRange:
        axis = data["axis"]
        return cls(
            name=str(data["name"] if name is None else name),
            low=np.asarray(data["low"], dtype=np.float64),
            high=np.asarray(data["high"], dtype=np.float64),
            axis=None if axis is None else int(axis),  # type: ignore[call-overload]
            method=str(data["method"]),
            samples=int(data["samples"]),  # type: ignore[call-overload]
        )


def symmetric_range(
    name: str, amax: np.ndarray | float, *, axis: int | None, method: str, samples: int
) -> TensorRange:
    bound = np.asarray(amax, dtype=np.float64)
    return TensorRange(name, -bound, bound, axis, method, samples)
