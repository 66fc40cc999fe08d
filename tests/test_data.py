"""Tests for graphopt.data: sources, validation errors, streaming, images, random data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import graphopt.data as data_mod
from graphopt.data import (
    Batch,
    ImagePreprocess,
    open_dataset,
    parse_shapes,
)
from graphopt.errors import DataError
from graphopt.model import TensorSpec

F32 = np.dtype(np.float32)
I64 = np.dtype(np.int64)
I32 = np.dtype(np.int32)


def spec(name: str, shape, dtype=F32) -> TensorSpec:
    return TensorSpec(name=name, dtype=dtype, shape=tuple(shape) if shape is not None else None)


X = [spec("x", ("N", 3, 4))]


def samples(n: int, dtype=np.float32) -> np.ndarray:
    return np.arange(n * 12, dtype=dtype).reshape(n, 3, 4)


def gather(dataset, batch_size: int) -> tuple[list[int], dict[str, np.ndarray], np.ndarray | None]:
    sizes, feeds, labels = [], {}, []
    for batch in dataset.batches(batch_size):
        assert isinstance(batch, Batch)
        sizes.append(batch.size)
        for name, array in batch.feeds.items():
            feeds.setdefault(name, []).append(array)
        if batch.labels is not None:
            labels.append(batch.labels)
    joined = {k: np.concatenate(v) for k, v in feeds.items()}
    return sizes, joined, (np.concatenate(labels) if labels else None)


@pytest.fixture
def warnings(monkeypatch) -> list[str]:
    seen: list[str] = []
    monkeypatch.setattr(data_mod.source, "warn", seen.append)
    return seen


# ---------------------------------------------------------------------------- .npz


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_streams_every_sample_once_in_order(tmp_path: Path, save) -> None:
    path = tmp_path / "calib.npz"
    save(path, x=samples(10), labels=np.arange(10) * 7)
    dataset = open_dataset(path, X)
    assert len(dataset) == 10
    assert dataset.has_labels and not dataset.is_random
    assert "calib.npz" in dataset.description and "10 samples" in dataset.description
    sizes, feeds, labels = gather(dataset, 4)
    assert sizes == [4, 4, 2]
    assert dataset.num_batches(4) == 3
    np.testing.assert_array_equal(feeds["x"], samples(10))
    np.testing.assert_array_equal(labels, np.arange(10) * 7)
    again = [b.feeds["x"] for b in dataset.batches(4)]
    np.testing.assert_array_equal(np.concatenate(again), samples(10))


def test_npz_reads_rows_lazily_not_whole_arrays(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "calib.npz"
    np.savez(path, x=samples(100))
    dataset = open_dataset(path, X)
    requested: list[int] = []
    original = data_mod.npyformat.StreamColumn.read

    def spy(self, n):
        requested.append(n)
        return original(self, n)

    monkeypatch.setattr(data_mod.npyformat.StreamColumn, "read", spy)
    first = next(iter(dataset.batches(8)))
    assert first.size == 8
    assert requested == [8]


def test_npz_fortran_order_array(tmp_path: Path) -> None:
    path = tmp_path / "f.npz"
    np.savez_compressed(path, x=np.asfortranarray(samples(5)))
    _, feeds, _ = gather(open_dataset(path, X), 2)
    np.testing.assert_array_equal(feeds["x"], samples(5))


def test_float64_and_int_data_are_cast_to_float32(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", x=samples(3, np.float64))
    np.savez(tmp_path / "b.npz", x=samples(3, np.int16))
    for name in ("a.npz", "b.npz"):
        _, feeds, _ = gather(open_dataset(tmp_path / name, X), 2)
        assert feeds["x"].dtype == np.float32
        np.testing.assert_array_equal(feeds["x"], samples(3))


def test_int64_data_for_int32_input_is_cast_and_range_checked(tmp_path: Path) -> None:
    ids = [spec("ids", ("N", 5), I32)]
    np.savez(tmp_path / "ok.npz", ids=np.arange(10, dtype=np.int64).reshape(2, 5))
    _, feeds, _ = gather(open_dataset(tmp_path / "ok.npz", ids), 2)
    assert feeds["ids"].dtype == np.int32
    np.savez(tmp_path / "big.npz", ids=np.full((2, 5), 2**40, dtype=np.int64))
    dataset = open_dataset(tmp_path / "big.npz", ids)
    with pytest.raises(DataError, match="'ids'.*int32"):
        list(dataset.batches(2))


def test_multi_input_npz(tmp_path: Path) -> None:
    inputs = [spec("ids", ("batch", "seq"), I64), spec("mask", ("batch", "seq"), I64)]
    ids = np.arange(12, dtype=np.int64).reshape(3, 4)
    np.savez(tmp_path / "d.npz", ids=ids, mask=np.ones_like(ids))
    sizes, feeds, labels = gather(open_dataset(tmp_path / "d.npz", inputs), 2)
    assert sizes == [2, 1] and labels is None
    np.testing.assert_array_equal(feeds["ids"], ids)


# ---------------------------------------------------------------------------- validation errors


def error_of(source, inputs, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        open_dataset(source, inputs, **kwargs)
    return info.value.paragraph()


def test_unknown_input_name_lists_expected(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=samples(2), image=samples(2))
    message = error_of(tmp_path / "d.npz", X)
    assert "'image'" in message and "inputs are 'x'" in message


def test_missing_input_is_named(tmp_path: Path) -> None:
    inputs = [*X, spec("y", ("N", 2))]
    np.savez(tmp_path / "d.npz", x=samples(2))
    message = error_of(tmp_path / "d.npz", inputs)
    assert "no array for input(s) 'y'" in message


def test_wrong_rank_names_input_and_shapes(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 12), np.float32))
    message = error_of(tmp_path / "d.npz", X)
    assert "'x'" in message and "?x3x4" in message and "2x12" in message


def test_wrong_fixed_dim_names_input_and_shapes(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 3, 5), np.float32))
    message = error_of(tmp_path / "d.npz", X)
    assert "'x'" in message and "?x3x4" in message and "2x3x5" in message
    assert "axis 2" in message


def test_float_data_for_int_input_is_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", ids=np.zeros((2, 5), np.float32))
    message = error_of(tmp_path / "d.npz", [spec("ids", ("N", 5), I64)])
    assert "'ids'" in message and "int64" in message and "float32" in message


def test_label_count_must_match(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=samples(4), labels=np.arange(3))
    message = error_of(tmp_path / "d.npz", X)
    assert "4 samples" in message and "3 labels" in message


def test_sample_counts_must_agree(tmp_path: Path) -> None:
    inputs = [*X, spec("y", ("N", 2))]
    np.savez(tmp_path / "d.npz", x=samples(4), y=np.zeros((3, 2), np.float32))
    message = error_of(tmp_path / "d.npz", inputs)
    assert "'x' 4" in message and "'y' 3" in message


def test_object_array_is_refused(tmp_path: Path) -> None:
    objects = np.empty((2, 3, 4), dtype=object)
    np.savez(tmp_path / "d.npz", x=objects)
    message = error_of(tmp_path / "d.npz", X)
    assert "Python objects" in message
    np.save(tmp_path / "o.npy", objects, allow_pickle=True)
    assert "Python objects" in error_of(tmp_path / "o.npy", X)


def test_corrupt_and_truncated_files(tmp_path: Path) -> None:
    (tmp_path / "junk.npz").write_bytes(b"this is not a zip file")
    assert "not a readable .npz" in error_of(tmp_path / "junk.npz", X)
    (tmp_path / "junk.npy").write_bytes(b"\x93NUMPY garbage")
    assert "could not be read" in error_of(tmp_path / "junk.npy", X)
    np.save(tmp_path / "cut.npy", samples(10))
    blob = (tmp_path / "cut.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError):
        list(open_dataset(tmp_path / "cut.npy", X).batches(4))


def test_missing_and_unsupported_sources(tmp_path: Path) -> None:
    assert "does not exist" in error_of(tmp_path / "nope.npz", X)
    (tmp_path / "data.csv").write_text("1,2,3")
    assert "neither" in error_of(tmp_path / "data.csv", X)
    (tmp_path / "empty").mkdir()
    assert "holds no" in error_of(tmp_path / "empty", X)


def test_shape_override_for_unknown_input_is_refused(tmp_path: Path) -> None:
    message = error_of("random", X, shapes={"y": (1, 3, 4)})
    assert "'y'" in message and "'x'" in message


# ---------------------------------------------------------------------------- .npy


def test_single_npy_file_is_memory_mapped(tmp_path: Path, monkeypatch) -> None:
    np.save(tmp_path / "x.npy", samples(5))
    modes = []
    original = np.load

    def spy(*args, **kwargs):
        modes.append(kwargs.get("mmap_mode"))
        return original(*args, **kwargs)

    monkeypatch.setattr(np, "load", spy)
    sizes, feeds, _ = gather(open_dataset(tmp_path / "x.npy", X), 2)
    assert sizes == [2, 2, 1]
    assert modes == ["r"]
    np.testing.assert_array_equal(feeds["x"], samples(5))


def test_folder_of_npy_single_samples_and_stacks(tmp_path: Path) -> None:
    folder = tmp_path / "arrays"
    folder.mkdir()
    all_samples = samples(6)
    np.save(folder / "s2.npy", all_samples[0])  # one sample, no leading axis
    np.save(folder / "s10.npy", all_samples[1:4])  # a stack of three
    np.save(folder / "s11.npy", all_samples[4:6])
    np.save(folder / "labels.npy", np.array([5, 4, 3, 2, 1, 0]))
    dataset = open_dataset(folder, X)
    assert len(dataset) == 6 and dataset.has_labels
    sizes, feeds, labels = gather(dataset, 4)
    assert sizes == [4, 2]
    np.testing.assert_array_equal(feeds["x"], all_samples)  # natural order: s2 before s10
    np.testing.assert_array_equal(labels, [5, 4, 3, 2, 1, 0])


def test_folder_of_npy_needs_single_input(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", samples(1))
    message = error_of(tmp_path, [*X, spec("y", ("N", 2))])
    assert "single-input" in message


def test_folder_labels_length_checked(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", samples(2))
    np.save(tmp_path / "labels.npy", np.arange(3))
    assert "3 labels" in error_of(tmp_path, X)


# ---------------------------------------------------------------------------- folder of .npz


def test_folder_of_npz_with_labels_and_single_samples(tmp_path: Path) -> None:
    inputs = [spec("ids", ("batch", "seq"), I64), spec("mask", ("batch", "seq"), I64)]
    ids = np.arange(15, dtype=np.int64).reshape(5, 3)
    np.savez(tmp_path / "0.npz", ids=ids[0], mask=np.ones(3, np.int64), labels=np.int64(7))
    np.savez(tmp_path / "1.npz", ids=ids[1:5], mask=np.ones((4, 3), np.int64), labels=np.arange(4))
    dataset = open_dataset(tmp_path, inputs)
    assert len(dataset) == 5 and dataset.has_labels
    sizes, feeds, labels = gather(dataset, 3)
    assert sizes == [3, 2]
    np.testing.assert_array_equal(feeds["ids"], ids)
    np.testing.assert_array_equal(labels, [7, 0, 1, 2, 3])


def test_folder_of_npz_labels_all_or_none(tmp_path: Path) -> None:
    np.savez(tmp_path / "0.npz", x=samples(1), labels=np.arange(1))
    np.savez(tmp_path / "1.npz", x=samples(1))
    assert "in every file or in none" in error_of(tmp_path, X)


def test_variable_shapes_are_never_stacked(tmp_path: Path) -> None:
    inputs = [spec("ids", ("batch", "seq"), I64)]
    np.savez(tmp_path / "0.npz", ids=np.zeros((3, 5), np.int64))
    np.savez(tmp_path / "1.npz", ids=np.ones((2, 7), np.int64))
    dataset = open_dataset(tmp_path, inputs)
    shapes = [b.feeds["ids"].shape for b in dataset.batches(4)]
    assert shapes == [(3, 5), (2, 7)]
    assert dataset.num_batches(4) == 2


def test_shared_dynamic_dim_must_agree(tmp_path: Path) -> None:
    inputs = [spec("ids", ("batch", "seq"), I64), spec("mask", ("batch", "seq"), I64)]
    np.savez(tmp_path / "0.npz", ids=np.zeros((2, 5), np.int64), mask=np.zeros((2, 6), np.int64))
    message = error_of(tmp_path, inputs)
    assert "'seq'" in message and "5" in message and "6" in message


# ---------------------------------------------------------------------------- fixed batch axis


def test_fixed_batch_one_yields_single_samples(tmp_path: Path) -> None:
    inputs = [spec("x", (1, 3, 4))]
    np.savez(tmp_path / "d.npz", x=samples(5))
    dataset = open_dataset(tmp_path / "d.npz", inputs)
    sizes, feeds, _ = gather(dataset, 32)
    assert sizes == [1] * 5
    assert dataset.num_batches(32) == 5
    np.testing.assert_array_equal(feeds["x"], samples(5))


def test_fixed_batch_remainder_is_refused_not_dropped(tmp_path: Path) -> None:
    inputs = [spec("x", (2, 3, 4))]
    np.savez(tmp_path / "odd.npz", x=samples(5))
    message = error_of(tmp_path / "odd.npz", inputs)
    assert "fixed to 2" in message and "5 samples" in message
    np.savez(tmp_path / "even.npz", x=samples(6))
    sizes, _, _ = gather(open_dataset(tmp_path / "even.npz", inputs), 32)
    assert sizes == [2, 2, 2]


# ---------------------------------------------------------------------------- random


def test_random_data_follows_model_shapes_and_warns(warnings: list[str]) -> None:
    inputs = [
        spec("x", ("N", 3, 4)),
        spec("ids", ("N", 5), I64),
        spec("flag", ("N",), np.dtype(bool)),
    ]
    dataset = open_dataset("random", inputs, num_samples=7, seed=3)
    assert dataset.is_random and not dataset.has_labels and len(dataset) == 7
    assert any("RANDOM" in w and "accuracy" in w for w in warnings)
    sizes, feeds, _ = gather(dataset, 4)
    assert sizes == [4, 3]
    assert feeds["x"].shape == (7, 3, 4) and feeds["x"].dtype == np.float32
    assert feeds["ids"].dtype == np.int64 and feeds["ids"].min() >= 0 and feeds["ids"].max() < 10
    assert feeds["flag"].dtype == bool
    # Same samples on every pass and for every batch size.
    _, again, _ = gather(dataset, 3)
    for name in feeds:
        np.testing.assert_array_equal(feeds[name], again[name])


def test_random_needs_shape_for_dynamic_dims(warnings: list[str]) -> None:
    inputs = [spec("image", ("N", 3, "height", "width"))]
    message = error_of("random", inputs)
    assert "'image'" in message and "'height'" in message and "--shape image:" in message
    dataset = open_dataset("random", inputs, shapes={"image": (1, 3, 8, 6)}, num_samples=2)
    assert next(iter(dataset.batches(2))).feeds["image"].shape == (2, 3, 8, 6)


def test_random_shape_fills_shared_dims_and_checks_fixed(warnings: list[str]) -> None:
    inputs = [spec("ids", ("N", "seq"), I64), spec("mask", ("N", "seq"), I64)]
    dataset = open_dataset("random", inputs, shapes={"ids": (1, 9)}, num_samples=2)
    batch = next(iter(dataset.batches(2)))
    assert batch.feeds["mask"].shape == (2, 9)
    message = error_of("random", X, shapes={"x": (1, 3, 5)})
    assert "fixes axis 2 to 4" in message


def test_random_with_fixed_batch_rounds_up(warnings: list[str]) -> None:
    dataset = open_dataset("random", [spec("x", (3, 2))], num_samples=7)
    assert len(dataset) == 9
    assert [b.size for b in dataset.batches(32)] == [3, 3, 3]


def test_parse_shapes() -> None:
    assert parse_shapes(["x:1x3x224x224", "input_1:0:2x5"]) == {
        "x": (1, 3, 224, 224),
        "input_1:0": (2, 5),
    }
    for bad in ["x", "x:", ":1x2", "x:1x0", "x:axb", "x:1.5"]:
        with pytest.raises(DataError, match="name:DIM"):
            parse_shapes([bad])
    with pytest.raises(DataError, match="twice"):
        parse_shapes(["x:1", "x:2"])


# ---------------------------------------------------------------------------- images


def write_image(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)


def pixels(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def test_image_preprocessing_matches_hand_computation(tmp_path: Path) -> None:
    image = pixels(6, 8)
    write_image(tmp_path / "imgs" / "a.png", image)
    preprocess = ImagePreprocess(
        crop=(4, 6), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5), channel_order="BGR"
    )
    inputs = [spec("img", ("N", 4, 6, 3))]  # NHWC, inferred
    dataset = open_dataset(tmp_path / "imgs", inputs, preprocess=preprocess)
    (batch,) = list(dataset.batches(8))
    got = batch.feeds["img"]
    assert got.shape == (1, 4, 6, 3) and got.dtype == np.float32
    crop = image[1:5, 1:7, ::-1].astype(np.float64)  # centre 4x6, RGB -> BGR
    expected = (crop / 255.0 - np.array([0.5, 0.4, 0.3])) / np.array([0.2, 0.25, 0.5])
    np.testing.assert_allclose(got[0], expected, rtol=1e-5, atol=1e-5)


def test_image_nchw_grayscale_and_model_size(tmp_path: Path) -> None:
    image = np.full((10, 20, 3), 200, np.uint8)
    write_image(tmp_path / "imgs" / "a.bmp", image)
    inputs = [spec("img", (1, 1, 5, 7))]
    dataset = open_dataset(tmp_path / "imgs", inputs, preprocess=ImagePreprocess(grayscale=True))
    (batch,) = list(dataset.batches(4))
    assert batch.feeds["img"].shape == (1, 1, 5, 7)  # resized to the model's 5x7
    np.testing.assert_allclose(batch.feeds["img"], 200 / 255, rtol=1e-5)


def test_image_resize_shorter_side_then_crop(tmp_path: Path) -> None:
    write_image(tmp_path / "a.jpg", pixels(30, 60))
    inputs = [spec("img", ("N", 3, "h", "w"))]
    dataset = open_dataset(tmp_path / "a.jpg", inputs, preprocess=ImagePreprocess(resize=10))
    assert next(iter(dataset.batches(1))).feeds["img"].shape == (1, 3, 10, 20)
    dataset = open_dataset(
        tmp_path / "a.jpg", inputs, preprocess=ImagePreprocess.parse("resize=10,crop=8")
    )
    assert next(iter(dataset.batches(1))).feeds["img"].shape == (1, 3, 8, 8)


def test_image_class_folders_give_labels(tmp_path: Path) -> None:
    root = tmp_path / "val"
    for name, count in (("dog", 2), ("cat", 3)):
        for i in range(count):
            write_image(root / name / f"{i}.png", pixels(4, 4, seed=i))
    (root / "notes.txt").write_text("not an image")
    inputs = [spec("img", ("N", 3, 4, 4))]
    dataset = open_dataset(root, inputs)
    assert dataset.has_labels and len(dataset) == 5
    assert dataset.classes == ["cat", "dog"]
    sizes, feeds, labels = gather(dataset, 2)
    assert sizes == [2, 2, 1]
    np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1])
    np.testing.assert_allclose(feeds["img"][0], pixels(4, 4, 0).transpose(2, 0, 1) / 255, rtol=1e-5)


def test_image_errors(tmp_path: Path) -> None:
    write_image(tmp_path / "imgs" / "a.png", pixels(4, 4))
    message = error_of(tmp_path / "imgs", [spec("img", ("N", 1, 4, 4))])
    assert "'img'" in message and "channel" in message
    message = error_of(tmp_path / "imgs", [*X, spec("y", ("N", 2))])
    assert "single-input" in message
    (tmp_path / "imgs" / "b.png").write_bytes(b"not a png")
    dataset = open_dataset(tmp_path / "imgs", [spec("img", ("N", 3, 4, 4))])
    with pytest.raises(DataError, match="b.png"):
        list(dataset.batches(2))


def test_integer_image_input(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", pixels(4, 4))
    inputs = [spec("img", ("N", 4, 4, 3), np.dtype(np.uint8))]
    message = error_of(tmp_path / "a.png", inputs)
    assert "scale=1" in message
    dataset = open_dataset(tmp_path / "a.png", inputs, preprocess=ImagePreprocess(scale=1))
    batch = next(iter(dataset.batches(1)))
    assert batch.feeds["img"].dtype == np.uint8
    np.testing.assert_array_equal(batch.feeds["img"][0], pixels(4, 4))


def test_preprocess_parse() -> None:
    parsed = ImagePreprocess.parse("resize=256,crop=224x200,imagenet,scale=1/255,bgr,nhwc")
    assert parsed.resize == 256 and parsed.crop == (224, 200)
    assert parsed.mean == data_mod.IMAGENET_MEAN and parsed.std == data_mod.IMAGENET_STD
    assert parsed.channel_order == "BGR" and parsed.layout == "NHWC"
    assert parsed.scale == pytest.approx(1 / 255)
    parsed = ImagePreprocess.parse("mean=0.5,0.5,0.5,std=0.2/0.2/0.2,gray=false,order=rgb")
    assert parsed.mean == (0.5, 0.5, 0.5) and parsed.std == (0.2, 0.2, 0.2)
    assert parsed.grayscale is False and parsed.channel_order == "RGB"
    assert ImagePreprocess.parse("gray,mean=0.5").grayscale is True
    assert ImagePreprocess.parse("mean=0.1|0.2|0.3").mean == (0.1, 0.2, 0.3)
    for bad, match in [
        ("size=3", "Unknown image preprocessing key"),
        ("fancy", "Unknown image preprocessing word"),
        ("crop=0", "not a size"),
        ("scale=1/0", "scale"),
        ("mean=1,2", "2 values"),
        ("layout=CHWN", "layout"),
    ]:
        with pytest.raises(DataError, match=match):
            ImagePreprocess.parse(bad)


def test_preprocess_ignored_for_arrays_warns(tmp_path: Path, warnings: list[str]) -> None:
    np.savez(tmp_path / "d.npz", x=samples(1))
    open_dataset(tmp_path / "d.npz", X, preprocess=ImagePreprocess())
    assert any("ignored" in w for w in warnings)


def test_scalar_input_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, s=np.ones(4, np.float32))
    for source in (path, "random"):
        with pytest.raises(DataError, match="'s' is a scalar"):
            open_dataset(source, [spec("s", ())])
