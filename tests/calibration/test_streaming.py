"""tests that calibration streams: peak memory does not grow with the number of samples."""

from __future__ import annotations

import tracemalloc

import pytest

from graphopt.calibration import calibrate, dataset_from_reader
from tests.calibration.nets import CONV_TENSORS, GeneratedDataset, conv_net


def _peak(function) -> int:
    tracemalloc.start()
    try:
        function()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_peak_memory_does_not_grow_with_samples(method: str) -> None:
    model = conv_net()
    names = [n for n in CONV_TENSORS if n != "x"]

    def run(count: int) -> int:
        data = GeneratedDataset(count, (3, 8, 8))
        return _peak(
            lambda: calibrate(model, data, names, method=method, batch_size=16, device="cpu")
        )

    run(16)  # warm up imports and caches
    small, large = run(64), run(512)
    # Activations of all 512 samples would take 512 * 7 tensors * 2 KiB = 7 MiB more.
    assert large < 1.25 * small + 256 * 1024, (small, large)


def test_reader_without_rewind_spills_instead_of_keeping_samples(tmp_path) -> None:
    model = conv_net()

    class Reader:
        def __init__(self, count: int) -> None:
            self.data = GeneratedDataset(count, (3, 8, 8))
            self.index = 0

        def get_next(self):
            if self.index == self.data.count:
                return None
            self.index += 1
            return {"x": self.data.sample(self.index - 1)[None]}

    def run(count: int) -> int:
        def work() -> None:
            data = dataset_from_reader(Reader(count), model.input_specs(), workdir=tmp_path)
            calibrate(model, data, ["c1", "r2"], method="percentile", device="cpu")

        return _peak(work)

    run(16)
    small, large = run(64), run(1024)
    # Keeping 1024 samples in memory would take 1024 * 768 bytes = 768 KiB more.
    assert large < 1.25 * small + 128 * 1024, (small, large)
