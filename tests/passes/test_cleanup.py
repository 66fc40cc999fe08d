"""CleanupPass: each rewrite changes the model, outputs match ORT on the original model,
refusals carry their reason, a second run changes nothing, and graph I/O is preserved."""

from __future__ import annotations

import hashlib
import os
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.context import Context
from graphopt.errors import GraphoptError
from graphopt.model import Model, load_model, save_model
from graphopt.passes.base import PassResult, build_options, get_pass
from graphopt.passes.cleanup import CleanupOptions, CleanupPass
from tests import models

RTOL = ATOL = 1e-5


# ---------------------------------------------------------------------------- helpers


def _ort(model: onnx.ModelProto | Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    source = os.fspath(model) if isinstance(model, Path) else model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _cleanup(
    proto: onnx.ModelProto, tmp_path: Path, **options: object
) -> tuple[onnx.ModelProto, PassResult, Model]:
    """Write `proto`, load it, run cleanup, save it; return the saved proto and the result."""
    source = tmp_path / "in" / "model.onnx"
    source.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, os.fspath(source))
    model = load_model(source)
    result = CleanupPass(CleanupOptions(**options)).run(model, Context(workdir=tmp_path))
    saved = save_model(model, tmp_path / "out" / "model.onnx")
    cleaned = onnx.load(os.fspath(saved.path))
    onnx.checker.check_model(cleaned, full_check=True)
    return cleaned, result, model


def _ops(model: onnx.ModelProto) -> Counter[str]:
    """Op types of every node, subgraphs included."""
    counts: Counter[str] = Counter()

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            counts[node.op_type] += 1
            for attr in node.attribute:
                if attr.HasField("g"):
                    visit(attr.g)
                for g in attr.graphs:
                    visit(g)

    visit(model.graph)
    return counts


def _signature(model: onnx.ModelProto) -> list[tuple[str, str, bytes]]:
    initializers = {t.name for t in model.graph.initializer}
    return [
        ("in", v.name, v.type.SerializeToString())
        for v in model.graph.input
        if v.name not in initializers
    ] + [("out", v.name, v.type.SerializeToString()) for v in model.graph.output]


def _assert_same_outputs(
    original: onnx.ModelProto, cleaned: onnx.ModelProto, feeds: dict[str, np.ndarray]
) -> None:
    expected = _ort(original, feeds)
    got = _ort(cleaned, feeds)
    assert len(got) == len(expected)
    for e, g in zip(expected, got, strict=True):
        assert g.dtype == e.dtype and g.shape == e.shape
        np.testing.assert_allclose(g, e, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------- each rewrite

# builder name -> (ops that must be gone, ops that must remain)
REWRITES: dict[str, tuple[set[str], set[str]]] = {
    "conv_bn": ({"BatchNormalization"}, {"Conv", "Relu"}),
    "conv_bn_depthwise": ({"BatchNormalization"}, {"Conv"}),
    "conv_bn_grouped": ({"BatchNormalization"}, {"Conv"}),
    "conv_transpose_bn": ({"BatchNormalization"}, {"ConvTranspose"}),
    "conv_transpose_bn_grouped": ({"BatchNormalization"}, {"ConvTranspose"}),
    "gemm_bn": ({"BatchNormalization"}, {"Gemm"}),
    "gemm_bn_no_c": ({"BatchNormalization"}, {"Gemm"}),
    "gemm_bn_c_matrix": ({"BatchNormalization"}, {"Gemm"}),
    "gemm_bn_c_column": ({"BatchNormalization"}, {"Gemm"}),
    "gemm_bn_c_scalar": ({"BatchNormalization"}, {"Gemm"}),
    "small_cnn": (
        {"BatchNormalization", "Dropout", "Identity", "Sqrt"},
        {"Conv", "ConvTranspose", "Gemm", "Add", "Mul"},
    ),
    "transformer_block": (
        {"Dropout", "Identity", "Sqrt"},
        {"LayerNormalization", "Softmax", "Erf", "MatMul", "Reshape", "Transpose"},
    ),
    "dropout_identity": ({"Identity"}, {"Relu"}),
    "constant_subgraph": ({"Sqrt", "Add", "Reshape"}, {"Mul"}),
    "if_with_subgraphs": ({"BatchNormalization", "Sqrt"}, {"If", "Conv"}),
    "loop_with_body": (set(), {"Loop", "Add"}),
}


@pytest.mark.parametrize("name", sorted(REWRITES))
def test_rewrite_changes_model_and_keeps_outputs(name: str, tmp_path: Path) -> None:
    original = models.ALL_BUILDERS[name]()
    cleaned, result, model = _cleanup(original, tmp_path)

    gone, kept = REWRITES[name]
    ops = _ops(cleaned)
    assert result.modified
    assert sum(ops.values()) < sum(_ops(original).values())
    assert not gone & set(ops), f"{gone & set(ops)} survived cleanup"
    assert kept <= set(ops), f"{kept - set(ops)} went missing"
    assert _signature(cleaned) == _signature(original)
    _assert_same_outputs(original, cleaned, models.feeds(original))

    again = CleanupPass().run(model, Context(workdir=tmp_path))
    assert not again.modified, again.stats


def test_small_cnn_numbers(tmp_path: Path) -> None:
    original = models.small_cnn()
    cleaned, result, _ = _cleanup(original, tmp_path)
    stats = result.stats
    assert stats["batchnorms_folded"] == 5
    assert stats["batchnorms_kept"] == 0
    assert stats["dropouts_removed"] == 1
    assert stats["identities_removed"] == 1
    assert stats["constants_folded"] >= 2
    assert stats["initializers_deduplicated"] == 1
    assert stats["nodes_removed"] == len(original.graph.node) - len(cleaned.graph.node)
    assert stats["initializers_removed"] == len(original.graph.initializer) - len(
        cleaned.graph.initializer
    )
    assert "unused" not in {t.name for t in cleaned.graph.initializer}


def test_residual_and_subgraph_models_for_both_branches(tmp_path: Path) -> None:
    original = models.if_with_subgraphs()
    cleaned, _, _ = _cleanup(original, tmp_path)
    assert _ops(cleaned)["If"] == 1
    x = models.feeds(original)["x"]
    for sign in (1.0, -1.0):  # ReduceSum(x) > 0 picks the branch
        feeds = {"x": sign * np.abs(x)}
        _assert_same_outputs(original, cleaned, feeds)


def test_duplicated_initializers_are_merged(tmp_path: Path) -> None:
    original = models.duplicated_initializers()
    cleaned, result, _ = _cleanup(original, tmp_path)
    assert result.stats["initializers_deduplicated"] == 1
    assert len(cleaned.graph.initializer) == 2  # same bytes in another shape stays
    _assert_same_outputs(original, cleaned, models.feeds(original))


def test_folded_graph_output_is_a_constant_node_not_an_initializer(tmp_path: Path) -> None:
    original = models.constant_subgraph()
    cleaned, _, _ = _cleanup(original, tmp_path)
    outputs = {v.name for v in cleaned.graph.output}
    assert not outputs & {t.name for t in cleaned.graph.initializer}
    producers = {o: n.op_type for n in cleaned.graph.node for o in n.output}
    assert producers["const_out"] == "Constant"
    assert "folded_from" not in str(cleaned), "onnxscript's provenance notes must not stay"
    _assert_same_outputs(original, cleaned, models.feeds(original))


def test_float16_conv_bn_with_float32_statistics(tmp_path: Path) -> None:
    """Folded in float64, stored in the weight's float16; float16 tolerances."""
    original = models.conv_bn(dtype=np.float16)
    cleaned, result, _ = _cleanup(original, tmp_path)
    assert result.stats["batchnorms_folded"] == 1
    assert {t.data_type for t in cleaned.graph.initializer} == {TensorProto.FLOAT16}
    feeds = models.feeds(original)
    (expected,) = _ort(original, feeds)
    (got,) = _ort(cleaned, feeds)
    assert got.dtype == np.float16
    np.testing.assert_allclose(
        got.astype(np.float32), expected.astype(np.float32), rtol=1e-2, atol=1e-2
    )


def test_float16_fold_that_would_overflow_is_skipped(tmp_path: Path) -> None:
    original = models.conv_bn(dtype=np.float16)
    for tensor in original.graph.initializer:
        if tensor.name == "bn_var":
            tensor.CopyFrom(numpy_helper.from_array(np.full(8, 1e-10, np.float32), "bn_var"))
    for attr in original.graph.node[1].attribute:
        if attr.name == "epsilon":
            attr.f = 1e-10  # 1/sqrt(var + eps) ~ 7e4: W * that leaves float16's range
    cleaned, result, _ = _cleanup(original, tmp_path)
    assert _ops(cleaned)["BatchNormalization"] == 1
    assert result.stats["batchnorms_folded"] == 0 and result.stats["batchnorms_kept"] == 1
    assert not result.modified


def test_gemm_bn_folds_alpha_and_beta(tmp_path: Path) -> None:
    original = models.gemm_bn(c_shape=(3, 5), alpha=2.0, beta=0.25)
    cleaned, _, _ = _cleanup(original, tmp_path)
    (gemm,) = cleaned.graph.node
    attrs = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
    assert attrs["alpha"] == pytest.approx(2.0)
    assert attrs["beta"] == pytest.approx(1.0)
    _assert_same_outputs(original, cleaned, models.feeds(original))


def test_chained_batchnorms_and_shared_weight(tmp_path: Path) -> None:
    """Two Convs share one weight, each followed by BN (one by two BNs): all fold, and the
    shared weight is not rewritten in place."""
    rng = np.random.default_rng(3)
    w = numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32), "w")

    def bn_params(prefix: str) -> list[onnx.TensorProto]:
        return [
            numpy_helper.from_array(rng.uniform(0.5, 1.5, 4).astype(np.float32), f"{prefix}_{p}")
            for p in ("s", "b", "m", "v")
        ]

    params = {p: bn_params(p) for p in ("a", "b", "c")}
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c1"]),
        helper.make_node("BatchNormalization", ["c1", *[t.name for t in params["a"]]], ["n1"]),
        helper.make_node("BatchNormalization", ["n1", *[t.name for t in params["b"]]], ["y1"]),
        helper.make_node("Conv", ["x", "w"], ["c2"]),
        helper.make_node("BatchNormalization", ["c2", *[t.name for t in params["c"]]], ["y2"]),
    ]
    vi = helper.make_tensor_value_info
    original = models.make_model(
        nodes,
        [vi("x", TensorProto.FLOAT, [1, 4, 3, 3])],
        [vi("y1", TensorProto.FLOAT, [1, 4, 3, 3]), vi("y2", TensorProto.FLOAT, [1, 4, 3, 3])],
        [w, *params["a"], *params["b"], *params["c"]],
    )
    cleaned, result, _ = _cleanup(original, tmp_path)
    assert result.stats["batchnorms_folded"] == 3
    assert _ops(cleaned) == Counter({"Conv": 2})
    _assert_same_outputs(original, cleaned, models.feeds(original))


# ---------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("bn_shared_output", "the Conv output also feeds 1 other node(s)"),
        ("bn_training", "it runs in training mode"),
        ("bn_params_from_inputs", "its mean is a graph input"),
    ],
)
def test_batchnorm_left_alone_with_reason(name: str, reason: str, tmp_path: Path) -> None:
    original = models.ALL_BUILDERS[name]()
    cleaned, result, model = _cleanup(original, tmp_path)
    assert _ops(cleaned)["BatchNormalization"] == 1
    assert result.stats["batchnorms_folded"] == 0
    assert result.stats["batchnorms_kept"] == 1
    refusals = [r for r in CleanupPass().explain(model) if r.rule == "fold-batchnorm"]
    assert [r.reason for r in refusals] == [reason]
    assert refusals[0].node == "bn" and reason in str(refusals[0])
    if name != "bn_training":  # ORT's training-mode BN is not deterministic across builds
        _assert_same_outputs(original, cleaned, models.feeds(original))


def test_bn_after_conv_that_is_a_graph_output_is_refused(tmp_path: Path) -> None:
    original = models.conv_bn()
    original.graph.output.append(
        helper.make_tensor_value_info("c", TensorProto.FLOAT, ["N", 8, 8, 8])
    )
    cleaned, _, model = _cleanup(original, tmp_path)
    assert _ops(cleaned)["BatchNormalization"] == 1
    (refusal,) = [r for r in CleanupPass().explain(model) if r.rule == "fold-batchnorm"]
    assert refusal.reason == "the Conv output is also a graph output"
    _assert_same_outputs(original, cleaned, models.feeds(original))


def test_unchanged_model_reports_not_modified(tmp_path: Path) -> None:
    original = models.bn_shared_output()
    cleaned, result, _ = _cleanup(original, tmp_path)
    assert not result.modified
    assert _ops(cleaned) == _ops(original)


def test_dropout_refusals(tmp_path: Path) -> None:
    """A used mask and a run-time training_mode keep their Dropout."""
    mode = helper.make_tensor_value_info("train", TensorProto.BOOL, [])
    original = models.dropout_identity()
    ratio = "ratio"
    original.graph.input.append(mode)
    original.graph.node.append(
        helper.make_node("Dropout", ["x", ratio, "train"], ["t"], name="drop_t")
    )
    original.graph.output.append(helper.make_tensor_value_info("t", TensorProto.FLOAT, ["N", 6]))
    cleaned, _, model = _cleanup(original, tmp_path)
    reasons = {r.node: r.reason for r in CleanupPass().explain(model) if r.rule == "remove-dropout"}
    assert reasons == {
        "drop_mask": "its mask output is used",
        "drop_t": "its training_mode is not a constant",
    }
    assert _ops(cleaned)["Dropout"] == 2
    feeds = models.feeds(original)
    feeds["train"] = np.array(False)
    _assert_same_outputs(original, cleaned, feeds)


def test_identity_feeding_two_outputs_keeps_both_names(tmp_path: Path) -> None:
    """onnx-ir's IdentityEliminationPass renames `r` to `y1` and then to `y2`, losing `y1`."""
    vi = helper.make_tensor_value_info
    original = models.make_model(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Identity", ["r"], ["y1"]),
            helper.make_node("Identity", ["r"], ["y2"]),
            helper.make_node("Identity", ["x"], ["y3"]),  # input -> output: must stay
        ],
        [vi("x", TensorProto.FLOAT, ["N", 3])],
        [vi(n, TensorProto.FLOAT, ["N", 3]) for n in ("y1", "y2", "y3")],
    )
    cleaned, result, model = _cleanup(original, tmp_path)
    assert result.stats["identities_removed"] == 1
    assert _signature(cleaned) == _signature(original)
    _assert_same_outputs(original, cleaned, models.feeds(original))
    reasons = {r.reason for r in CleanupPass().explain(model)}
    assert reasons == {
        "its input is already a graph output under another name",
        "it passes a graph input or weight straight to a graph output",
    }


def test_dynamic_input_shape_stays_dynamic(tmp_path: Path) -> None:
    """Shape merging across an Identity must not pin the graph input's dynamic batch."""
    vi = helper.make_tensor_value_info
    original = models.make_model(
        [helper.make_node("Identity", ["x"], ["i"]), helper.make_node("Relu", ["i"], ["y"])],
        [vi("x", TensorProto.FLOAT, ["N", 3])],
        [vi("y", TensorProto.FLOAT, ["N", 3])],
    )
    original.graph.value_info.append(vi("i", TensorProto.FLOAT, [2, 3]))
    cleaned, _, _ = _cleanup(original, tmp_path)
    assert _signature(cleaned) == _signature(original)
    assert cleaned.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"


# ---------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("option", "kept_op"),
    [
        ("fold_batchnorm", "BatchNormalization"),
        ("remove_dropout", "Dropout"),
        ("fold_constants", "Sqrt"),
    ],
)
def test_option_off_keeps_its_nodes(option: str, kept_op: str, tmp_path: Path) -> None:
    original = models.small_cnn()
    cleaned, result, model = _cleanup(original, tmp_path, **{option: False})
    assert _ops(cleaned)[kept_op] == _ops(original)[kept_op]
    _assert_same_outputs(original, cleaned, models.feeds(original))
    assert (
        not CleanupPass(CleanupOptions(**{option: False}))
        .run(model, Context(workdir=tmp_path))
        .modified
    )


def test_deduplicate_off(tmp_path: Path) -> None:
    original = models.duplicated_initializers()
    cleaned, result, _ = _cleanup(original, tmp_path, deduplicate=False)
    assert len(cleaned.graph.initializer) == 3
    assert not result.modified


def test_fold_size_limit_bounds_what_is_read(tmp_path: Path) -> None:
    """A Transpose of a weight larger than the limit is left to run time (onnxscript alone
    would fold it whatever its size)."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "w")
    vi = helper.make_tensor_value_info
    original = models.make_model(
        [
            helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
            helper.make_node("MatMul", ["x", "wt"], ["y"]),
        ],
        [vi("x", TensorProto.FLOAT, ["N", 32])],
        [vi("y", TensorProto.FLOAT, ["N", 64])],
        [weight],
    )
    small, _, _ = _cleanup(original, tmp_path / "small", fold_size_limit=1000)
    assert _ops(small)["Transpose"] == 1
    large, _, _ = _cleanup(original, tmp_path / "large")
    assert _ops(large)["Transpose"] == 0
    _assert_same_outputs(original, large, models.feeds(original))


def test_options_from_recipe_text() -> None:
    options = build_options(
        CleanupPass, {"fold-batchnorm": "false", "fold_size_limit": "10"}, from_text=True
    )
    assert options == CleanupOptions(fold_batchnorm=False, fold_size_limit=10)
    assert get_pass("cleanup") is CleanupPass
    assert CleanupPass.lossless


# ---------------------------------------------------------------------------- odd inputs


def test_unused_opset_is_removed(tmp_path: Path) -> None:
    original = models.conv_bn()
    original.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    cleaned, result, _ = _cleanup(original, tmp_path)
    assert {o.domain for o in cleaned.opset_import} == {""}
    assert result.stats["opsets_removed"] == 1


def test_ir3_model_gets_structural_cleanup_only(tmp_path: Path) -> None:
    """In IR 3 every initializer is a graph input, so nothing may be folded into new ones."""
    original = models.conv_bn()
    for tensor in original.graph.initializer:
        original.graph.input.append(
            helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
        )
    original.graph.node.append(helper.make_node("Identity", ["y"], ["z"]))
    original.graph.output[0].name = "z"
    original.ir_version = 3
    original.opset_import[0].version = 8
    cleaned, result, _ = _cleanup(original, tmp_path)
    assert result.warnings and "IR version 3" in result.warnings[0]
    assert _ops(cleaned) == Counter({"Conv": 1, "BatchNormalization": 1, "Relu": 1})
    assert len(cleaned.graph.input) == len(original.graph.input)
    feeds = models.feeds(original)
    _assert_same_outputs(original, cleaned, feeds)


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_external_data_model(tmp_path: Path) -> None:
    original = models.small_cnn()
    folder = tmp_path / "ext"
    folder.mkdir()
    onnx.save(
        onnx.ModelProto.FromString(original.SerializeToString()),  # save converts in place
        os.fspath(folder / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    before = _digest(folder)
    model = load_model(folder / "model.onnx")
    result = CleanupPass().run(model, Context(workdir=tmp_path))
    assert result.stats["batchnorms_folded"] == 5
    for external in (True, False):
        saved = save_model(
            model, tmp_path / f"out_{external}" / "model.onnx", external_data=external
        )
        assert (saved.data_path is not None) == external
        _assert_same_outputs(original, onnx.load(os.fspath(saved.path)), models.feeds(original))
    assert _digest(folder) == before, "the input model must not be modified"
    assert not CleanupPass().run(model, Context(workdir=tmp_path)).modified


@pytest.mark.parametrize("builder", [models.small_cnn, models.transformer_block])
def test_cleaned_model_passes_full_checker(
    builder: Callable[[], onnx.ModelProto], tmp_path: Path
) -> None:
    cleaned, _, _ = _cleanup(builder(), tmp_path)
    onnx.checker.check_model(cleaned, full_check=True)
    onnx.shape_inference.infer_shapes(cleaned, check_type=True, strict_mode=True)


def test_custom_domain_nodes_and_their_opset_stay(tmp_path: Path) -> None:
    """Ops cleanup knows nothing about, even with constant inputs, are kept as they are."""
    vi = helper.make_tensor_value_info
    original = models.conv_bn()
    original.opset_import.append(helper.make_opsetid("com.example", 1))
    original.graph.node.append(
        helper.make_node("Mystery", ["y", "bn_scale"], ["z"], domain="com.example", name="m")
    )
    original.graph.node.append(
        helper.make_node("Mystery", ["bn_bias"], ["k"], domain="com.example", name="k")
    )
    original.graph.output[0].CopyFrom(vi("z", TensorProto.FLOAT, None))
    original.graph.output.append(vi("k", TensorProto.FLOAT, None))
    source = tmp_path / "model.onnx"
    onnx.save(original, os.fspath(source))
    model = load_model(source)
    result = CleanupPass().run(model, Context(workdir=tmp_path))
    cleaned = model.to_proto()
    assert result.stats["batchnorms_folded"] == 1
    assert _ops(cleaned)["Mystery"] == 2
    assert {o.domain for o in cleaned.opset_import} == {"", "com.example"}
    assert _signature(cleaned) == _signature(original)


def test_missing_onnxscript_folder_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If onnxscript drops its private FoldConstantsPass, folding says so; the rest runs."""
    from onnxscript.optimizer import _constant_folding

    monkeypatch.delattr(_constant_folding, "FoldConstantsPass")
    monkeypatch.delitem(sys.modules, "graphopt.passes.cleanup.bounded_folder", raising=False)
    with pytest.raises(GraphoptError, match="FoldConstantsPass") as raised:
        _cleanup(models.constant_subgraph(), tmp_path / "fold")
    assert "fold_constants: false" in raised.value.paragraph()
    _, result, _ = _cleanup(models.small_cnn(), tmp_path / "nofold", fold_constants=False)
    assert result.stats["batchnorms_folded"] == 5


def test_dedup_merges_equal_large_weights_and_leaves_near_twins(tmp_path: Path) -> None:
    """Large weights equal at both ends but different in the middle must not be merged;
    external weights read only for the comparison are unmapped again afterwards."""
    rng = np.random.default_rng(0)
    base = rng.standard_normal((256, 512)).astype(np.float32)  # 512 KiB: beyond the edges
    twin = base.copy()
    twin[128, 256] += 1.0  # same first and last 64 KiB, different middle
    weights = {"w_a": base, "w_b": base.copy(), "w_twin": twin}
    nodes = [
        helper.make_node("MatMul", ["x", name], [f"y_{name}"], name=f"mm_{name}")
        for name in weights
    ]
    graph = helper.make_graph(
        nodes,
        "dedup",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 256])],
        [helper.make_tensor_value_info(f"y_{n}", TensorProto.FLOAT, [2, 512]) for n in weights],
        [numpy_helper.from_array(w, n) for n, w in weights.items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 9
    folder = tmp_path / "ext"
    folder.mkdir()
    onnx.save(
        onnx.ModelProto.FromString(proto.SerializeToString()),
        os.fspath(folder / "model.onnx"),
        save_as_external_data=True,
        location="weights.bin",
        size_threshold=0,
    )
    model = load_model(folder / "model.onnx")
    result = CleanupPass().run(model, Context(workdir=tmp_path))
    assert result.stats["initializers_deduplicated"] == 1
    assert sorted(model.graph.initializers) == ["w_a", "w_twin"]
    for value in model.graph.initializers.values():
        assert value.const_value.raw is None, f"{value.name} was left memory-mapped"
    saved = save_model(model, tmp_path / "out" / "model.onnx")
    x = {"x": rng.standard_normal((2, 256)).astype(np.float32)}
    for got, want in zip(_ort(saved.path, x), _ort(proto, x), strict=True):
        np.testing.assert_array_equal(got, want)
