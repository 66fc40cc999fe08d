"""ChannelsPass: refusals with their reasons, selection (ratio, round_to, conv groups, global
ratio with a cap), importance scorers, the pass on ORT, metadata, options."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from graphopt.context import Context
from graphopt.errors import GraphoptError, RecipeError
from graphopt.model import Model
from graphopt.passes.base import build_options
from graphopt.passes.channels import ChannelsOptions, ChannelsPass, analyze_model
from graphopt.passes.channels import importance as scorers
from graphopt.passes.channels.select import choose, kept_count, plan
from tests import models
from tests.passes import channels_nets as nets
from tests.passes.channels_nets import Net


def _model(proto: onnx.ModelProto) -> Model:
    return Model(ir=ir.serde.deserialize_model(proto))


def _group_of(model: Model, tensor: str):
    analysis = analyze_model(model)
    return next(g for g in analysis.groups if any(s.name == tensor for s in g.members))


def _run(proto: onnx.ModelProto, feeds):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), options).run(None, feeds)


# ---------------------------------------------------------------------------- refusals


def _between(op_builder) -> Model:
    """conv(3->16) -> <op> -> conv(->8): the first conv's group meets the op."""
    n = Net(0)
    h = n.cbr("x", 3, 16)
    h = op_builder(n, h)
    return _model(n.model({"x": ["N", 3, 8, 8]}, [n.conv(h, 16, 8, k=1)])), "conv3"


@pytest.mark.parametrize(
    ("builder", "reason"),
    [
        (lambda n, h: n.op("LRN", [h], size=3), "no handler for LRN"),
        (lambda n, h: n.op("Einsum", [h], equation="nchw->nchw"), "no handler for Einsum"),
        (lambda n, h: n.op("Softmax", [h], axis=1), "normalizes over the channel axis"),
        (
            lambda n, h: (
                n.op("ReduceMax", [h], axes=[1], keepdims=1)
                and n.op("Mul", [h, n.nodes[-1].output[0]])
            ),
            "reduces over the channel axis",
        ),
        (
            lambda n, h: n.op("Pad", [h, n.const(np.array([0, 1, 0, 0, 0, 1, 0, 0], np.int64))]),
            "pads the channel axis",
        ),
    ],
    ids=["unknown-op", "einsum", "softmax", "reduce", "pad"],
)
def test_refusals_name_their_reason(builder, reason: str) -> None:
    model, stem = _between(builder)
    group = _group_of(model, stem)
    assert not group.prunable
    assert any(reason in r for r in group.refusals), group.refusals


def test_channels_on_gemm_rows_are_refused() -> None:
    n = Net(0)
    flat = n.op("Flatten", [n.op("GlobalAveragePool", [n.cbr("x", 3, 16)])])
    y = n.op("Gemm", [flat, n.weight([2, 5])], transA=1)  # A^T: channels become rows (M)
    group = _group_of(_model(n.model({"x": [2, 3, 8, 8]}, [y])), "conv3")
    assert any("row axis (M) of Gemm" in r for r in group.refusals), group.refusals


def test_custom_domain_refuses_with_domain() -> None:
    n = Net(0)
    h = n.cbr("x", 3, 16)
    n.nodes.append(helper.make_node("MyOp", [h], ["custom"], domain="my.domain", name="mine"))
    graph = helper.make_graph(
        n.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("custom", TensorProto.FLOAT, None)], n.inits,
    )  # fmt: skip
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.domain", 1)]
    )
    proto.ir_version = 9
    group = _group_of(_model(proto), "conv3")
    assert any("custom domain 'my.domain'" in r for r in group.refusals)


def test_graph_output_on_channel_axis_is_refused() -> None:
    n = Net(0)
    h = n.cbr("x", 3, 16)
    model = _model(n.model({"x": ["N", 3, 8, 8]}, [h, n.conv(h, 16, 8, k=1)]))
    group = _group_of(model, "conv3")
    assert any("is a graph output" in r for r in group.refusals)


def test_exclude_refuses_and_leaves_model_alone(tmp_path: Path) -> None:
    proto = nets.resnet_basic()
    model = _model(proto)
    excluded = ChannelsPass(ChannelsOptions(ratio=0.5, round_to=1, exclude=("op:Conv",))).run(
        model, Context(workdir=tmp_path)
    )
    assert not excluded.modified
    assert excluded.stats["groups_prunable"] == 0
    group = analyze_model(model, ("re:^conv3$",)).groups[0]
    assert any("excluded by the user" in r for r in group.refusals)


def test_layernorm_stream_is_one_lossy_group() -> None:
    model = _model(models.transformer_block())
    group = _group_of(model, "ln1")
    assert {"h1", "h2", "ln2", "x"} <= {s.name for s in group.members}
    assert group.lossy and "LayerNormalization" in group.lossy[0]


# ---------------------------------------------------------------------------- selection


@pytest.mark.parametrize(
    ("channels", "remove", "round_to", "blocks", "keep"),
    [
        (64, 19, 8, 1, 48),  # 45 rounded up to 48
        (64, 19, 1, 1, 45),
        (10, 3, 8, 1, 8),
        (6, 2, 8, 1, 6),  # no multiple of 8 below 6: all kept
        (32, 31, 8, 1, 8),
        (32, 10, 1, 4, 24),  # multiple of the 4 conv groups
        (32, 10, 8, 4, 24),
        (5, 5, 1, 1, 1),  # at least one
    ],
)
def test_kept_count(channels, remove, round_to, blocks, keep) -> None:
    assert kept_count(channels, remove, round_to, blocks) == keep


def test_choose_lowest_scores_equal_per_conv_group() -> None:
    scores = np.array([5.0, 1.0, 3.0, 0.5, 9.0, 2.0, 8.0, 7.0])
    assert choose(scores, 6, None).tolist() == [1, 3]
    blocks = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    assert choose(scores, 4, blocks).tolist() == [1, 3, 5, 7]


def test_global_ratio_respects_cap() -> None:
    model = _model(nets.resnet_basic())
    groups = analyze_model(model).prunable()
    scores = {g.id: np.linspace(1, 2, g.channels) for g in groups}
    skewed = np.full(groups[0].channels, 1e-3)
    skewed[0] = 100.0  # against its group's mean, every other channel of group 0 looks useless
    scores[groups[0].id] = skewed
    out = plan(groups, scores, ratio=0.4, round_to=1, global_ratio=True, max_ratio=0.5)
    assert len(out[groups[0].id]) == groups[0].channels // 2  # capped
    total = sum(g.channels for g in groups)
    assert sum(len(v) for v in out.values()) == int(0.4 * total)


# ---------------------------------------------------------------------------- importance


def test_l2_and_bn_importance_see_the_weights() -> None:
    model = _model(nets.resnet_basic())
    analysis = analyze_model(model)
    group = _group_of(model, "conv12")  # 24 inner channels: conv12 out, consumer conv21
    conv = next(n for n in model.graph if n.outputs[0].name == "conv12")
    w = conv.inputs[1].const_value.numpy().copy()
    w[5] *= 100
    conv.inputs[1].const_value = ir.tensor(w, name=conv.inputs[1].name)
    analysis = analyze_model(model)
    group = analysis.groups[group.id]
    l2 = scorers.weight_norm(group, analysis, 2)
    assert int(np.argmax(l2)) == 5
    bn = next(
        n for n in model.graph if n.op_type == "BatchNormalization" and n.inputs[0].name == "conv12"
    )
    gamma = bn.inputs[1].const_value.numpy().copy()
    gamma[7] = 0.0
    bn.inputs[1].const_value = ir.tensor(gamma, name=bn.inputs[1].name)
    analysis = analyze_model(model)
    assert int(np.argmin(scorers.bn_scale(analysis.groups[group.id], analysis))) == 7


# ---------------------------------------------------------------------------- the pass


def test_pass_prunes_keeps_signature_and_runs(tmp_path: Path) -> None:
    proto = nets.mobilenet_se()
    model = _model(proto)
    result = ChannelsPass(ChannelsOptions(ratio=0.5, round_to=4)).run(
        model, Context(workdir=tmp_path)
    )
    assert result.modified and result.stats["channels_removed"] > 0
    pruned = model.to_proto()
    onnx.checker.check_model(pruned, full_check=True)
    feeds = models.feeds(proto)
    assert [o.shape for o in _run(pruned, feeds)] == [o.shape for o in _run(proto, feeds)]
    for axes in model.metadata["channels"].values():
        for kept in axes.values():
            assert len(kept) % 4 == 0 or len(kept) < 4


def test_ratio_zero_and_refused_models_are_left_alone(tmp_path: Path) -> None:
    proto = nets.resnet_basic()
    model = _model(proto)
    assert (
        not ChannelsPass(ChannelsOptions(ratio=0.0)).run(model, Context(workdir=tmp_path)).modified
    )
    assert model.to_proto().SerializeToString() == _model(proto).to_proto().SerializeToString()
    # groups of 16 and 24 at ratio 0.1 and round_to 8: 16 - 1 -> 16, 24 - 2 -> 24
    result = ChannelsPass(ChannelsOptions(ratio=0.1)).run(model, Context(workdir=tmp_path))
    assert not result.modified


def test_second_run_composes_metadata(tmp_path: Path) -> None:
    model = _model(nets.ffn())
    ChannelsPass(ChannelsOptions(ratio=0.5, round_to=8)).run(model, Context(workdir=tmp_path))
    first = model.metadata["channels"]["matmul5"][2]
    assert len(first) == 32
    ChannelsPass(ChannelsOptions(ratio=0.5, round_to=8)).run(model, Context(workdir=tmp_path))
    second = model.metadata["channels"]["matmul5"][2]
    assert len(second) == 16 and set(second) <= set(first)


def test_activation_importance_needs_data(tmp_path: Path) -> None:
    with pytest.raises(GraphoptError, match="calibration data"):
        ChannelsPass(ChannelsOptions(importance="activation")).run(
            _model(nets.ffn()), Context(workdir=tmp_path)
        )


def test_options_from_text() -> None:
    options = build_options(
        ChannelsPass, {"ratio": "0.5", "importance": "bn", "round_to": "4", "exclude": "op:Gemm"},
        from_text=True,
    )  # fmt: skip
    assert options == ChannelsOptions(ratio=0.5, importance="bn", round_to=4, exclude=("op:Gemm",))
    with pytest.raises(RecipeError):
        build_options(ChannelsPass, {"ratio": 1.5})
    with pytest.raises(RecipeError):
        build_options(ChannelsPass, {"exclude": ["re:("]})


# ---------------------------------------------------------------------------- inspect


def test_inspect_groups(tmp_path: Path) -> None:
    import json

    from click.testing import CliRunner

    from graphopt.cli import main

    path = tmp_path / "m.onnx"
    onnx.save(nets.resnet_basic(), path)
    result = CliRunner().invoke(main, ["inspect", str(path), "--groups", "--json"])
    assert result.exit_code == 0, result.output
    groups = json.loads(result.output)
    assert [g["channels"] for g in groups] == [16, 24, 8]
    assert [g["prunable"] for g in groups] == [True, True, False]
    assert "graph output" in groups[2]["refusals"][0]
    result = CliRunner().invoke(main, ["inspect", str(path), "--groups"])
    assert result.exit_code == 0, result.output
    assert "refused" in result.output and "2 of 3 groups prunable" in result.output


def test_activation_importance_removes_the_silent_channels(tmp_path: Path) -> None:
    """FFN hidden units whose bias keeps them below zero (Relu: always 0) rank lowest."""
    import os

    from graphopt.data import open_dataset

    proto = nets.ffn()
    model = _model(proto)
    mm = next(n for n in model.graph if n.op_type == "MatMul")
    bias_add = mm.outputs[0].uses()[0].node
    bias = bias_add.inputs[1].const_value.numpy().copy()
    silent = np.arange(0, 64, 2)
    bias[silent] = -100.0
    bias[silent + 1] = 5.0  # the others are always active, so never tie at zero
    bias_add.inputs[1].const_value = ir.tensor(bias, name=bias_add.inputs[1].name)
    path = tmp_path / "calib.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.standard_normal((32, 5, 16)).astype(np.float32))
    data = open_dataset(os.fspath(path), model.input_specs())
    ctx = Context(workdir=tmp_path, calib_data=data, device="cpu", batch_size=16)
    result = ChannelsPass(ChannelsOptions(ratio=0.5, importance="activation")).run(model, ctx)
    assert result.modified
    kept = model.metadata["channels"][mm.outputs[0].name][2]
    assert sorted(kept) == list(range(1, 64, 2))
