"""tests calibration/ranges.py: TensorRange's contract."""

from __future__ import annotations

import json

import numpy as np
import pytest

from graphopt.calibration import TensorRange


def test_values_are_float64_arrays() -> None:
    found = TensorRange("t", -1, np.float32(2.5), None, "minmax", 3)
    assert isinstance(found.low, np.ndarray) and found.low.dtype == np.float64
    assert found.low.shape == () and found.high.shape == ()
    assert float(found.amax()) == 2.5
    channels = TensorRange("w", [-1.0, -3.0], [2.0, 1.0], 0, "minmax", 0)
    np.testing.assert_array_equal(channels.amax(), [2.0, 3.0])
    assert channels.per_channel and not found.per_channel


def test_shapes_must_agree() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        TensorRange("t", [0.0, 1.0], 2.0, 0, "minmax", 1)


def test_equality_and_json_round_trip() -> None:
    found = TensorRange("w", [-0.1, -1 / 3], [0.2, 2 / 3], 1, "entropy", 7)
    again = TensorRange.from_dict(json.loads(json.dumps(found.to_dict())))
    assert again == found
    assert again != TensorRange("w", [-0.1, -1 / 3], [0.2, 0.7], 1, "entropy", 7)
    assert TensorRange.from_dict(found.to_dict(), name="v").name == "v"
    with pytest.raises(TypeError):
        hash(found)
