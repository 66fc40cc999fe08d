"""tests calibration/datasets.py: ONNX Runtime's CalibrationDataReader protocol, with and
without rewind(), and the first-n-samples view."""

from __future__ import annotations

import gc

import numpy as np
import pytest

from graphopt.calibration import calibrate, dataset_from_reader
from graphopt.calibration.datasets import HeadDataset, head
from graphopt.errors import DataError
from tests.calibration.nets import ArrayDataset, conv_data, conv_net


class ListReader:
    """An ORT-style reader over a list of feed dicts (no rewind)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds = feeds
        self.position = 0
        self.calls = 0

    def get_next(self):
        self.calls += 1
        if self.position >= len(self.feeds):
            return None
        self.position += 1
        return self.feeds[self.position - 1]


class RewindingReader(ListReader):
    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        super().__init__(feeds)
        self.rewinds = 0

    def rewind(self) -> None:
        self.rewinds += 1
        self.position = 0


def _feeds(x: np.ndarray, sizes: list[int]) -> list[dict[str, np.ndarray]]:
    """x cut into feed dicts of the given sample counts (ORT readers usually give 1)."""
    out, start = [], 0
    for size in sizes:
        out.append({"x": x[start : start + size]})
        start += size
    assert start == len(x)
    return out


def _rows(dataset, batch_size: int) -> tuple[list[int], np.ndarray]:
    batches = list(dataset.batches(batch_size))
    return [b.size for b in batches], np.concatenate([b.feeds["x"] for b in batches])


@pytest.fixture
def x() -> np.ndarray:
    return conv_data(40).arrays["x"]


@pytest.mark.parametrize("reader_type", [ListReader, RewindingReader])
def test_reader_batches_are_cut_anew(reader_type, x, tmp_path) -> None:
    reader = reader_type(_feeds(x, [1] * 10 + [3, 7] + [5] * 4))
    dataset = dataset_from_reader(reader, conv_net().input_specs(), workdir=tmp_path)
    assert len(dataset) == 40
    assert "40 samples" in dataset.description
    for batch_size in (1, 8, 32, 64):
        sizes, rows = _rows(dataset, batch_size)
        assert sum(sizes) == 40 and max(sizes) == min(batch_size, 40)
        np.testing.assert_array_equal(rows, x)
    if reader_type is RewindingReader:
        assert reader.rewinds == 5  # once to count and check, once per pass
    else:
        assert reader.calls == 17  # read once: 16 feed dicts and the closing None


@pytest.mark.parametrize("reader_type", [ListReader, RewindingReader])
def test_reader_gives_the_same_ranges_as_the_dataset(reader_type, x, tmp_path) -> None:
    model = conv_net()
    reader = reader_type(_feeds(x, [1] * 40))
    from_reader = dataset_from_reader(reader, model.input_specs(), workdir=tmp_path)
    direct = ArrayDataset({"x": x})
    for method in ("minmax", "percentile"):
        a = calibrate(model, from_reader, ["c1", "r2"], method=method, device="cpu")
        b = calibrate(model, direct, ["c1", "r2"], method=method, device="cpu")
        for name in ("c1", "r2"):
            np.testing.assert_allclose(a[name].high, b[name].high, rtol=1e-6)


def test_spilled_samples_live_on_disk_until_closed(x, tmp_path) -> None:
    dataset = dataset_from_reader(ListReader(_feeds(x, [4] * 10)), conv_net().input_specs(),
                                  workdir=tmp_path)  # fmt: skip
    folders = list(tmp_path.iterdir())
    assert len(folders) == 1 and folders[0].name.startswith("calib-reader-")
    assert (folders[0] / "input0.bin").stat().st_size == x.nbytes
    dataset.close()
    assert not folders[0].exists()
    with pytest.raises(DataError, match="removed"):
        list(dataset.batches(8))
    other = dataset_from_reader(ListReader(_feeds(x, [40])), conv_net().input_specs(),
                                workdir=tmp_path)  # fmt: skip
    assert len(list(tmp_path.iterdir())) == 1
    del other
    gc.collect()
    assert list(tmp_path.iterdir()) == []


def test_samples_of_different_shapes_are_not_batched_together(tmp_path) -> None:
    """A model with a dynamic sequence axis, fed samples of two lengths."""
    from graphopt.model import TensorSpec

    spec = [TensorSpec("x", np.dtype(np.float32), ("N", "seq"))]
    feeds = [{"x": np.full((1, 3), i, np.float32)} for i in range(3)]
    feeds += [{"x": np.full((2, 5), 9, np.float32)}, {"x": np.full((1, 3), 7, np.float32)}]
    for reader in (ListReader(list(feeds)), RewindingReader(list(feeds))):
        dataset = dataset_from_reader(reader, spec, workdir=tmp_path)
        shapes = [b.feeds["x"].shape for b in dataset.batches(8)]
        assert shapes == [(3, 3), (2, 5), (1, 3)]


def test_fixed_batch_model(tmp_path, x) -> None:
    model = conv_net(batch=4)
    dataset = dataset_from_reader(ListReader(_feeds(x, [1] * 40)), model.input_specs(),
                                  workdir=tmp_path)  # fmt: skip
    assert [b.size for b in dataset.batches(32)] == [4] * 10
    short = dataset_from_reader(ListReader(_feeds(x[:6], [1] * 6)), model.input_specs(),
                                workdir=tmp_path)  # fmt: skip
    with pytest.raises(DataError, match="fixed to 4"):
        list(short.batches(4))


def test_dtypes_are_converted(tmp_path, x) -> None:
    dataset = dataset_from_reader(
        ListReader([{"x": x[:3].astype(np.float64)}]), conv_net().input_specs(), workdir=tmp_path
    )
    (batch,) = dataset.batches(8)
    assert batch.feeds["x"].dtype == np.float32


@pytest.mark.parametrize(
    ("feeds", "message"),
    [
        ([], "yielded no samples"),
        ([[1, 2]], "returned a list, not a dict"),
        ([{"y": np.zeros((1, 3, 8, 8), np.float32)}], "lacks 'x' and has 'y'"),
        ([{"x": np.zeros((1, 3, 9, 8), np.float32)}], "expects"),
        ([{"x": np.zeros((3, 8, 8), np.float32)}], "rank 4"),
        ([{"x": np.zeros((1, 3, 8, 8), np.complex64)}], "complex64"),
    ],
)
@pytest.mark.parametrize("reader_type", [ListReader, RewindingReader])
def test_bad_readers(reader_type, feeds, message: str, tmp_path) -> None:
    with pytest.raises(DataError, match=message):
        dataset_from_reader(reader_type(feeds), conv_net().input_specs(), workdir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing spilled is left behind


def test_not_a_reader() -> None:
    with pytest.raises(DataError, match="no get_next"):
        dataset_from_reader(object(), conv_net().input_specs())  # type: ignore[arg-type]


def test_reader_that_changes_after_rewind(x, tmp_path) -> None:
    reader = RewindingReader(_feeds(x, [10] * 4))
    dataset = dataset_from_reader(reader, conv_net().input_specs(), workdir=tmp_path)
    reader.feeds.pop()
    with pytest.raises(DataError, match="30 samples after rewind"):
        list(dataset.batches(8))


def test_head_cuts_the_last_batch(x) -> None:
    data = ArrayDataset({"x": x})
    limited = head(data, 13, conv_net().input_specs())
    assert isinstance(limited, HeadDataset) and len(limited) == 13
    sizes, rows = _rows(limited, 5)
    assert sizes == [5, 5, 3]
    np.testing.assert_array_equal(rows, x[:13])
    assert head(data, None, conv_net().input_specs()) is data
    assert head(data, 40, conv_net().input_specs()) is data


def test_calibrate_takes_a_reader_directly(x, tmp_path) -> None:
    """Users of ORT's quantize_static switch in one line: pass their reader as it is."""
    model = conv_net()
    from_reader = calibrate(model, ListReader(_feeds(x, [1] * 40)), ["c1"], device="cpu",
                            workdir=tmp_path)  # fmt: skip
    direct = calibrate(model, ArrayDataset({"x": x}), ["c1"], device="cpu")
    np.testing.assert_allclose(from_reader["c1"].high, direct["c1"].high, rtol=1e-6)
    assert from_reader["c1"].samples == 40
