"""graphopt.model: loading untrusted files, lazy external data, and atomic, contained saving.

The security cases follow the ONNX project's own CVEs about external data:
CVE-2022-25882 (`..` in a location), CVE-2024-27318 (absolute location), CVE-2026-27489
(a symlink inside the model's folder leading out), CVE-2025-51480 (save writing outside
the output folder), plus hard links and sizes that do not fit the data file.
"""

from __future__ import annotations

import hashlib
import os
import time
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt import model as model_module
from graphopt.errors import ModelLoadError, ModelSaveError
from graphopt.model import Model, TensorSpec, load_model, save_model

DIGITS = Path(__file__).resolve().parents[1] / "models" / "digits" / "model.onnx"
DIM = 32

# ----------------------------------------------------------------------------- helpers


def _matmul_proto(layers: int = 2, dim: int = DIM) -> onnx.ModelProto:
    """x[N,dim] -> (MatMul -> Relu) * layers -> y[N,dim]; weights big enough to go external."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    current = "x"
    for i in range(layers):
        weight = (rng.standard_normal((dim, dim)) / np.sqrt(dim)).astype(np.float32)
        inits.append(numpy_helper.from_array(weight, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [f"h{i}"], name=f"mm{i}"))
        out = "y" if i == layers - 1 else f"r{i}"
        nodes.append(helper.make_node("Relu", [f"h{i}"], [out], name=f"relu{i}"))
        current = out
    graph = helper.make_graph(
        nodes,
        "matmuls",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", dim])],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return proto


def _save_inline(folder: Path, name: str = "model.onnx") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    onnx.save_model(_matmul_proto(), path)
    return path


def _save_external(folder: Path, name: str = "model.onnx", location: str = "weights.bin") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    onnx.save_model(
        _matmul_proto(),
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=0,
    )
    return path


def _run(path: Path) -> np.ndarray:
    x = np.random.default_rng(1).standard_normal((3, DIM)).astype(np.float32)
    session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    return session.run(["y"], {"x": x})[0]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _snapshot(root: Path) -> dict[str, str]:
    """Every file under root (links not followed) with its content hash."""
    files = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            full = Path(dirpath) / name
            key = os.fspath(full.relative_to(root))
            files[key] = "link" if full.is_symlink() else _sha(full)
    return files


def _external_tensor(name: str, dims: list[int], **entries: object) -> TensorProto:
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=dims)
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in entries.items():
        entry = tensor.external_data.add()
        entry.key = key
        entry.value = str(value)
    return tensor


def _one_tensor_model(folder: Path, tensor: TensorProto, name: str = "model.onnx") -> Path:
    """y = x + W, with W given as a raw TensorProto (inline or external, well formed or not)."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", tensor.name], ["y"], name="add")],
        "one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [tensor],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(proto.SerializeToString())
    return path


def _float_file(path: Path, count: int = 4, value: float = 1.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.full(count, value, np.float32).tobytes())
    return path


def _refused(path: Path, *fragments: str) -> ModelLoadError:
    with pytest.raises(ModelLoadError) as info:
        load_model(path)
    for fragment in fragments:
        assert fragment in info.value.message
    return info.value


def _can_symlink(tmp_path: Path) -> bool:
    try:
        (tmp_path / ".probe").symlink_to(tmp_path)
    except (OSError, NotImplementedError):
        return False
    (tmp_path / ".probe").unlink()
    return True


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("external_data", [False, True])
def test_round_trip_preserves_outputs(tmp_path: Path, external_data: bool) -> None:
    source = _save_inline(tmp_path / "in")
    saved = save_model(load_model(source), tmp_path / "out" / "m.onnx", external_data=external_data)

    np.testing.assert_array_equal(_run(saved.path), _run(source))
    assert (saved.data_path is not None) == external_data
    onnx.checker.check_model(os.fspath(saved.path))
    assert sorted(os.listdir(tmp_path / "out")) == sorted(
        ["m.onnx"] + (["m.onnx.data"] if external_data else [])
    )


def test_round_trip_of_the_sample_model(tmp_path: Path) -> None:
    if not DIGITS.exists():
        pytest.skip("models/digits/model.onnx is not built")
    saved = save_model(load_model(DIGITS), tmp_path / "digits.onnx")
    x = np.random.default_rng(0).standard_normal((5, 1, 8, 8)).astype(np.float32)
    want = ort.InferenceSession(os.fspath(DIGITS)).run(None, {"image": x})[0]
    got = ort.InferenceSession(os.fspath(saved.path)).run(None, {"image": x})[0]
    np.testing.assert_array_equal(got, want)


def test_external_data_loads_lazily(tmp_path: Path) -> None:
    source = _save_external(tmp_path / "in")
    model = load_model(source)

    tensors = [v.const_value for v in model.graph.initializers.values()]
    assert len(tensors) == 2
    assert all(isinstance(t, ir.ExternalTensor) for t in tensors)
    assert all(t.raw is None for t in tensors), "nothing is mapped before a pass touches it"

    expected = numpy_helper.to_array(_matmul_proto().graph.initializer[0])
    np.testing.assert_array_equal(tensors[0].numpy(), expected)
    assert tensors[0].raw is not None
    assert tensors[1].raw is None


@pytest.mark.parametrize("external_data", [False, True])
def test_model_with_external_data_saves_inline_and_external(
    tmp_path: Path, external_data: bool
) -> None:
    source = _save_external(tmp_path / "in")
    before = _snapshot(tmp_path / "in")
    out = tmp_path / "out" / "m.onnx"

    saved = save_model(load_model(source), out, external_data=external_data)

    np.testing.assert_array_equal(_run(saved.path), _run(source))
    assert _snapshot(tmp_path / "in") == before
    proto = onnx.load(os.fspath(out), load_external_data=False)
    locations = {
        entry.value
        for tensor in proto.graph.initializer
        for entry in tensor.external_data
        if entry.key == "location"
    }
    if external_data:
        assert saved.data_path == out.parent / "m.onnx.data"
        assert locations == {"m.onnx.data"}
        assert sorted(os.listdir(out.parent)) == ["m.onnx", "m.onnx.data"]
    else:
        assert saved.data_path is None
        assert locations == set()
        assert os.listdir(out.parent) == ["m.onnx"]


def test_inline_save_removes_a_stale_data_file_of_its_own_name(tmp_path: Path) -> None:
    model = load_model(_save_inline(tmp_path / "in"))
    out = tmp_path / "out" / "m.onnx"
    save_model(model, out, external_data=True)
    save_model(model, out, external_data=False)
    assert os.listdir(out.parent) == ["m.onnx"]
    np.testing.assert_array_equal(_run(out), _run(tmp_path / "in" / "model.onnx"))


def test_save_overwrites_an_earlier_output(tmp_path: Path) -> None:
    model = load_model(_save_external(tmp_path / "in"))
    out = tmp_path / "out" / "m.onnx"
    save_model(model, out, external_data=True)
    save_model(model, out, external_data=True)
    assert sorted(os.listdir(out.parent)) == ["m.onnx", "m.onnx.data"]
    np.testing.assert_array_equal(_run(out), _run(tmp_path / "in" / "model.onnx"))


# ----------------------------------------------------------------------------- Model API


def test_copy_is_independent(tmp_path: Path) -> None:
    model = load_model(_save_external(tmp_path / "in"))
    model.metadata["masks"] = {"w0": [1, 0, 1]}
    original_w0 = model.graph.initializers["w0"].const_value.numpy().copy()

    clone = model.copy()
    clone.graph.initializers["w0"].const_value = ir.tensor(np.zeros((DIM, DIM), np.float32))
    relu = next(node for node in clone.graph if node.op_type == "Relu")
    relu.name = "renamed"
    clone.metadata["masks"]["w0"].append(1)
    clone.metadata["channels"] = {}

    assert clone.path == model.path
    np.testing.assert_array_equal(model.graph.initializers["w0"].const_value.numpy(), original_w0)
    assert [node.name for node in model.graph] == ["mm0", "relu0", "mm1", "relu1"]
    assert model.metadata == {"masks": {"w0": [1, 0, 1]}}
    out = save_model(model, tmp_path / "out" / "m.onnx").path
    np.testing.assert_array_equal(_run(out), _run(tmp_path / "in" / "model.onnx"))


def test_input_and_output_specs() -> None:
    bias = numpy_helper.from_array(np.ones(3, np.float32), "bias")
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["x", "bias"], ["sum"]),
            helper.make_node("Shape", ["ids"], ["shape"]),
        ],
        "specs",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, [None, 7]),
            # An initializer also listed as an input (old exporters) is not a user input.
            helper.make_tensor_value_info("bias", TensorProto.FLOAT, [3]),
        ],
        [
            helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("shape", TensorProto.INT64, None),
        ],
        [bias],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = Model(ir=ir.serde.deserialize_model(proto))

    assert model.input_specs() == [
        TensorSpec("x", np.dtype(np.float32), ("N", 3)),
        TensorSpec("ids", np.dtype(np.int64), (None, 7)),
    ]
    assert model.output_specs() == [
        TensorSpec("sum", np.dtype(np.float32), ("N", 3)),
        TensorSpec("shape", np.dtype(np.int64), None),
    ]
    assert [spec.shape_text() for spec in model.input_specs()] == ["Nx3", "?x7"]
    assert model.output_specs()[1].shape_text() == "?"
    assert TensorSpec("s", np.dtype(np.float32), ()).shape_text() == "scalar"


def test_specs_of_the_sample_model() -> None:
    if not DIGITS.exists():
        pytest.skip("models/digits/model.onnx is not built")
    model = load_model(DIGITS)
    assert model.input_specs() == [TensorSpec("image", np.dtype(np.float32), ("N", 1, 8, 8))]
    assert model.output_specs() == [TensorSpec("logits", np.dtype(np.float32), ("N", 10))]


# ----------------------------------------------------------------------------- unsafe external data


@pytest.mark.parametrize(
    "location", ["../secret.bin", "sub/../../secret.bin", "..\\secret.bin", "./../secret.bin"]
)
def test_refuses_location_with_parent_dir(tmp_path: Path, location: str) -> None:
    """CVE-2022-25882: external data that climbs out of the model's folder."""
    _float_file(tmp_path / "secret.bin")
    (tmp_path / "model" / "sub").mkdir(parents=True)
    path = _one_tensor_model(tmp_path / "model", _external_tensor("W", [4], location=location))
    _refused(path, "initializer 'W'", os.fspath(path), "outside the model's folder")


def test_refuses_absolute_location(tmp_path: Path) -> None:
    """CVE-2024-27318: an absolute path to a file elsewhere."""
    secret = _float_file(tmp_path / "secret.bin")
    path = _one_tensor_model(
        tmp_path / "model", _external_tensor("W", [4], location=os.fspath(secret))
    )
    _refused(path, "initializer 'W'", "absolute path", os.fspath(secret))


def test_refuses_symlink_leading_outside(tmp_path: Path) -> None:
    """CVE-2026-27489: a symlink inside the folder that points to a file outside it."""
    if not _can_symlink(tmp_path):
        pytest.skip("symlinks are not available here")
    secret = _float_file(tmp_path / "secret.bin")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "weights.bin").symlink_to(secret)
    path = _one_tensor_model(folder, _external_tensor("W", [4], location="weights.bin"))
    _refused(path, "initializer 'W'", "symbolic link")


def test_refuses_symlinked_folder_leading_outside(tmp_path: Path) -> None:
    if not _can_symlink(tmp_path):
        pytest.skip("symlinks are not available here")
    _float_file(tmp_path / "elsewhere" / "weights.bin")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "data").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    path = _one_tensor_model(folder, _external_tensor("W", [4], location="data/weights.bin"))
    _refused(path, "symbolic link")


def test_accepts_symlink_that_stays_inside(tmp_path: Path) -> None:
    if not _can_symlink(tmp_path):
        pytest.skip("symlinks are not available here")
    folder = tmp_path / "model"
    _float_file(folder / "real" / "weights.bin", value=2.0)
    (folder / "weights.bin").symlink_to(folder / "real" / "weights.bin")
    path = _one_tensor_model(folder, _external_tensor("W", [4], location="weights.bin"))
    model = load_model(path)
    np.testing.assert_array_equal(
        model.graph.initializers["W"].const_value.numpy(), np.full(4, 2.0, np.float32)
    )


def test_refuses_hard_link(tmp_path: Path) -> None:
    """A hard link inside the folder can alias any file on the same file system."""
    secret = _float_file(tmp_path / "secret.bin")
    folder = tmp_path / "model"
    folder.mkdir()
    try:
        os.link(secret, folder / "weights.bin")
    except OSError:
        pytest.skip("hard links are not available here")
    path = _one_tensor_model(folder, _external_tensor("W", [4], location="weights.bin"))
    _refused(path, "initializer 'W'", "hard links")


@pytest.mark.parametrize(
    ("location", "fragment"),
    [
        ("", "names no data file"),
        ("w\0.bin", "NUL"),
        (".", "not a regular file"),
        ("missing.bin", "missing"),
    ],
)
def test_refuses_bad_location(tmp_path: Path, location: str, fragment: str) -> None:
    _float_file(tmp_path / "model" / "w.bin")
    path = _one_tensor_model(tmp_path / "model", _external_tensor("W", [4], location=location))
    _refused(path, fragment)


def test_refuses_external_tensor_in_a_node_attribute(tmp_path: Path) -> None:
    _float_file(tmp_path / "secret.bin")
    value = _external_tensor("c", [4], location="../secret.bin")
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["y"], value=value, name="const")],
        "attr",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    (tmp_path / "model").mkdir()
    path = tmp_path / "model" / "m.onnx"
    path.write_bytes(proto.SerializeToString())
    _refused(path, "attribute 'value'", "outside the model's folder")


# ----------------------------------------------------------------------------- sizes and offsets


@pytest.mark.parametrize(
    ("entries", "fragment"),
    [
        ({"offset": 17}, "holds only 16 bytes"),
        ({"offset": 10**30}, "holds only 16 bytes"),
        ({"offset": 0, "length": 17}, "past its end"),
        ({"offset": 8, "length": 16}, "past its end"),
        ({"offset": -1}, "starts at byte -1"),
        ({"offset": "ten"}, "non-numeric"),
        ({"offset": 4}, "holds 12 bytes"),  # 4 floats declared, 3 left after the offset
        ({"offset": 0, "length": 12}, "holds 12 bytes"),
    ],
)
def test_refuses_offset_or_length_beyond_the_data_file(
    tmp_path: Path, entries: dict[str, object], fragment: str
) -> None:
    _float_file(tmp_path / "model" / "w.bin")  # 16 bytes
    tensor = _external_tensor("W", [4], location="w.bin", **entries)
    path = _one_tensor_model(tmp_path / "model", tensor)
    _refused(path, "initializer 'W'", fragment)


def _absurd_external(folder: Path) -> Path:
    _float_file(folder / "w.bin")
    return _one_tensor_model(folder, _external_tensor("W", [2**40], location="w.bin"))


def _absurd_external_with_length(folder: Path) -> Path:
    _float_file(folder / "w.bin")
    return _one_tensor_model(
        folder, _external_tensor("W", [2**20, 2**20], location="w.bin", length=16)
    )


def _absurd_raw(folder: Path) -> Path:
    tensor = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[2**40], raw_data=b"\0" * 16)
    return _one_tensor_model(folder, tensor)


def _absurd_float_data(folder: Path) -> Path:
    tensor = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[2**40], float_data=[1.0])
    return _one_tensor_model(folder, tensor)


def _absurd_no_data(folder: Path) -> Path:
    return _one_tensor_model(
        folder, TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[2**40])
    )


@pytest.mark.parametrize(
    "make",
    [
        _absurd_external,
        _absurd_external_with_length,
        _absurd_raw,
        _absurd_float_data,
        _absurd_no_data,
    ],
)
def test_refuses_absurd_declared_size_before_allocating(tmp_path: Path, make) -> None:
    """dims x dtype far beyond what the file holds: refused up front, not by a MemoryError."""
    path = make(tmp_path / "model")
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(ModelLoadError) as info:
            load_model(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 5.0
    assert peak < 16 * 2**20, f"loading allocated {peak} bytes before refusing"
    assert "initializer 'W'" in info.value.message
    assert str(2**40) in info.value.message or str(2**20) in info.value.message


def test_refuses_negative_dimension(tmp_path: Path) -> None:
    tensor = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[-4], raw_data=b"\0" * 16)
    _refused(_one_tensor_model(tmp_path, tensor), "negative dimension")


def test_accepts_well_formed_typed_data(tmp_path: Path) -> None:
    """The size checks must not refuse ordinary inline encodings (float_data, packed int4)."""
    floats = helper.make_tensor("W", TensorProto.FLOAT, [2, 2], [1.0, 2.0, 3.0, 4.0])
    model = load_model(_one_tensor_model(tmp_path / "a", floats))
    np.testing.assert_array_equal(
        model.graph.initializers["W"].const_value.numpy(), [[1, 2], [3, 4]]
    )
    packed = helper.make_tensor("W", TensorProto.INT4, [3], [1, -2, 3])
    assert len(packed.int32_data) == 2
    load_model(_one_tensor_model(tmp_path / "b", packed))
    empty = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[0])
    load_model(_one_tensor_model(tmp_path / "c", empty))


# ----------------------------------------------------------------------------- unreadable files


def _sample_bytes(tmp_path: Path) -> bytes:
    if DIGITS.exists():
        return DIGITS.read_bytes()
    return _save_inline(tmp_path / "sample").read_bytes()


@pytest.mark.parametrize("fraction", [0.5, 0.01, 0.1, 0.25, 0.75, 0.9, 0.999])
def test_refuses_truncated_file(tmp_path: Path, fraction: float) -> None:
    data = _sample_bytes(tmp_path)
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: int(len(data) * fraction)])
    error = _refused(path, os.fspath(path))
    assert "truncated" in error.paragraph()


def test_refuses_file_cut_one_byte_short(tmp_path: Path) -> None:
    data = _sample_bytes(tmp_path)
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[:-1])
    _refused(path, os.fspath(path))


def test_refuses_every_truncation_of_a_small_model(tmp_path: Path) -> None:
    data = _matmul_proto(layers=1, dim=2).SerializeToString()
    path = tmp_path / "cut.onnx"
    for cut in range(len(data)):
        path.write_bytes(data[:cut])
        with pytest.raises(ModelLoadError):
            load_model(path)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("random.onnx", np.random.default_rng(0).bytes(4096)),
        ("text.onnx", b"this is not a model\n" * 20),
        ("empty.onnx", b""),
        ("zeros.onnx", b"\0" * 1000),
        ("model.json", b"{not json"),
        ("model.json", b'{"graph": 5}'),
        ("model.textproto", b"garbage ::"),
    ],
)
def test_refuses_corrupt_file(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    error = _refused(path, os.fspath(path))
    assert "\n" not in error.paragraph()


def test_refuses_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.onnx"
    _refused(path, os.fspath(path), "does not exist")


def test_refuses_a_directory(tmp_path: Path) -> None:
    path = tmp_path / "folder.onnx"
    path.mkdir()
    _refused(path, os.fspath(path), "not a file")


# ----------------------------------------------------------------------------- saving safely


def test_refuses_to_save_onto_the_input_file(tmp_path: Path) -> None:
    source = _save_inline(tmp_path / "in")
    digest = _sha(source)
    model = load_model(source)
    for target in (source, tmp_path / "in" / ".." / "in" / "model.onnx"):
        for external_data in (False, True):
            with pytest.raises(ModelSaveError, match="input model"):
                save_model(model, target, external_data=external_data)
    assert _sha(source) == digest
    assert os.listdir(tmp_path / "in") == ["model.onnx"]


def test_refuses_to_save_onto_the_input_through_a_symlink(tmp_path: Path) -> None:
    if not _can_symlink(tmp_path):
        pytest.skip("symlinks are not available here")
    source = _save_inline(tmp_path / "in")
    digest = _sha(source)
    (tmp_path / "alias.onnx").symlink_to(source)
    with pytest.raises(ModelSaveError):
        save_model(load_model(source), tmp_path / "alias.onnx")
    assert _sha(source) == digest


def test_refuses_to_save_onto_the_input_data_file(tmp_path: Path) -> None:
    # The input's data file happens to carry the name save_model derives for "out.onnx".
    folder = tmp_path / "in"
    source = _save_external(folder, location="out.onnx.data")
    before = _snapshot(folder)
    model = load_model(source)

    with pytest.raises(ModelSaveError, match="input model"):
        save_model(model, folder / "out.onnx", external_data=True)
    with pytest.raises(ModelSaveError, match="input model"):
        save_model(model, folder / "out.onnx.data")
    assert _snapshot(folder) == before

    # Saving inline beside it is fine and must not delete the input's data file.
    save_model(model, folder / "out.onnx", external_data=False)
    assert {k: v for k, v in _snapshot(folder).items() if k != "out.onnx"} == before
    np.testing.assert_array_equal(_run(folder / "out.onnx"), _run(source))


def test_save_derives_the_data_file_name_from_the_output(tmp_path: Path) -> None:
    """CVE-2025-51480: tensor names and old locations never choose where save writes."""
    proto = _matmul_proto()
    proto.graph.initializer[0].name = "../../escaped"
    proto.graph.node[0].input[1] = "../../escaped"
    model = Model(ir=ir.serde.deserialize_model(proto))
    before = _snapshot(tmp_path)

    saved = save_model(model, tmp_path / "a" / "b" / "out" / "m.onnx", external_data=True)

    after = _snapshot(tmp_path)
    assert set(after) - set(before) == {"a/b/out/m.onnx", "a/b/out/m.onnx.data"}
    proto_out = onnx.load(os.fspath(saved.path), load_external_data=False)
    for tensor in proto_out.graph.initializer:
        assert {e.key: e.value for e in tensor.external_data}["location"] == "m.onnx.data"


@pytest.mark.parametrize("external_data", [False, True])
def test_save_never_follows_a_location_out_of_the_folder(
    tmp_path: Path, external_data: bool
) -> None:
    """CVE-2025-51480: a model built in code with a location like '../x' cannot make save
    read or write outside its folders."""
    outside = _float_file(tmp_path / "x.bin", count=DIM * DIM, value=3.0)
    base = tmp_path / "base"
    base.mkdir()
    proto = _matmul_proto()
    weight = proto.graph.initializer[0]
    weight.data_location = TensorProto.EXTERNAL
    weight.raw_data = np.zeros(DIM * DIM, np.float32).tobytes()  # what onnx.save would write
    for key, value in (("location", "../x.bin"), ("offset", "0"), ("length", str(4 * DIM * DIM))):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    model = Model(ir=ir.serde.deserialize_model(proto))
    ir.external_data.set_base_dir(model.graph, os.fspath(base))
    before = _snapshot(tmp_path)

    with pytest.raises(ModelSaveError):
        save_model(model, base / "out" / "m.onnx", external_data=external_data)

    assert _snapshot(tmp_path) == before
    assert _sha(outside) == before["x.bin"]
    assert not (base / "out").exists() or os.listdir(base / "out") == []


def test_save_leaves_the_input_folder_alone(tmp_path: Path) -> None:
    source = _save_external(tmp_path / "in")
    before = _snapshot(tmp_path / "in")
    model = load_model(source)
    model.graph.initializers["w1"].const_value = ir.tensor(np.eye(DIM, dtype=np.float32))
    save_model(model, tmp_path / "out" / "m.onnx", external_data=True)
    save_model(model, tmp_path / "out2" / "m.onnx", external_data=False)
    assert _snapshot(tmp_path / "in") == before


# ----------------------------------------------------------------------------- failed saves


def _leftovers(folder: Path) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.startswith("."))


def test_failed_save_into_a_file_as_folder(tmp_path: Path) -> None:
    model = load_model(_save_inline(tmp_path / "in"))
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    with pytest.raises(ModelSaveError, match="blocker"):
        save_model(model, blocker / "m.onnx")
    assert blocker.read_text() == "a file, not a folder"
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("in_the_way", ["m.onnx", "m.onnx.data"])
def test_failed_save_onto_a_folder(tmp_path: Path, in_the_way: str) -> None:
    model = load_model(_save_inline(tmp_path / "in"))
    out = tmp_path / "out"
    (out / in_the_way).mkdir(parents=True)
    (out / in_the_way / "keep.txt").write_text("keep")
    with pytest.raises(ModelSaveError, match="folder"):
        save_model(model, out / "m.onnx", external_data=True)
    assert sorted(os.listdir(out)) == [in_the_way]
    assert (out / in_the_way / "keep.txt").read_text() == "keep"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores modes")
def test_failed_save_into_a_read_only_folder(tmp_path: Path) -> None:
    model = load_model(_save_inline(tmp_path / "in"))
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        with pytest.raises(ModelSaveError):
            save_model(model, out / "m.onnx")
        assert os.listdir(out) == []
    finally:
        out.chmod(0o755)


@pytest.mark.parametrize("external_data", [False, True])
@pytest.mark.parametrize("earlier_output", [False, True])
def test_failure_while_moving_into_place_restores_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, external_data: bool, earlier_output: bool
) -> None:
    """The .onnx rename fails after the data file moved: the data file must not stay behind."""
    model = load_model(_save_inline(tmp_path / "in"))
    out = tmp_path / "out" / "m.onnx"
    if earlier_output:
        earlier = model.copy()
        earlier.graph.initializers["w0"].const_value = ir.tensor(np.eye(DIM, dtype=np.float32))
        save_model(earlier, out, external_data=True)
        earlier_result = _run(out)
    before = _snapshot(out.parent)

    real_replace = os.replace

    def failing_replace(src, dst, *args, **kwargs):
        if Path(dst) == out:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(model_module.os, "replace", failing_replace)
    with pytest.raises(ModelSaveError, match="No space left"):
        save_model(model, out, external_data=external_data)
    monkeypatch.undo()

    if earlier_output:
        assert _snapshot(out.parent) == before
        np.testing.assert_array_equal(_run(out), earlier_result)
    else:
        assert os.listdir(out.parent) == []


def test_failure_while_writing_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = load_model(_save_inline(tmp_path / "in"))
    out = tmp_path / "out" / "m.onnx"
    real_save = ir.save

    def disk_full(ir_model, path, **kwargs):
        real_save(ir_model, path, **kwargs)
        Path(path).write_bytes(Path(path).read_bytes()[:10])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model_module.ir, "save", disk_full)
    with pytest.raises(ModelSaveError, match=os.fspath(out)):
        save_model(model, out, external_data=True)
    assert os.listdir(out.parent) == []
