"""Channel removal is exact on channels that are provably dead.

For each architecture, every prunable group that is not normalized over (LayerNorm) gets
about a third of its channels killed: every constant its channels own is zeroed except the
input-channel weights of the ops that read them (which then multiply zeros), so those
channels carry exact zeros wherever they go. Removing exactly those channels must leave the
ONNX Runtime outputs unchanged (1e-5 relative), pass the full ONNX checker, keep the output
shapes, and lower parameters and FLOPs.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from graphopt.analysis import analyze as model_stats
from graphopt.model import Model
from graphopt.passes.channels import analyze_model, remove_channels
from tests import models
from tests.passes import channels_nets as nets
from tests.passes.channels_check import dead_channels, kill


def _run(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, feeds)


def _check_exact(proto: onnx.ModelProto, *, min_groups: int = 1) -> dict[str, object]:
    model = Model(ir=ir.serde.deserialize_model(proto))
    removal = kill(model)
    assert len(removal) >= min_groups
    dead = model.to_proto()
    feeds = models.feeds(proto)
    reference = _run(dead, feeds)
    before = model_stats(model)
    kept = remove_channels(model, removal)
    assert kept and model.metadata["channels"] == kept
    pruned = model.to_proto()
    onnx.checker.check_model(pruned, full_check=True)
    outputs = _run(pruned, feeds)
    for ref, out in zip(reference, outputs, strict=True):
        assert out.shape == ref.shape
        scale = max(float(np.abs(ref).max()), 1e-6)
        assert float(np.abs(out - ref).max()) <= 1e-5 * scale
    after = model_stats(model)
    assert after.params < before.params
    assert after.flops < before.flops
    assert [s.shape for s in after.outputs] == [s.shape for s in before.outputs]
    return {"removal": removal, "kept": kept, "before": before, "after": after, "model": model}


@pytest.mark.parametrize(
    ("build", "min_groups"),
    [
        (nets.resnet_basic, 2),
        (nets.bottleneck, 3),
        (nets.grouped, 2),
        (nets.mobilenet_se, 3),
        (nets.densenet, 3),
        (nets.yolo_neck, 3),
        (nets.flatten_head, 2),
        (nets.ffn, 1),
        (models.transformer_block, 2),
        (models.small_cnn, 2),
    ],
    ids=lambda v: getattr(v, "__name__", str(v)),
)
def test_removing_dead_channels_is_exact(build, min_groups: int) -> None:
    _check_exact(build(), min_groups=min_groups)


def test_removing_live_channels_changes_outputs() -> None:
    """The exactness check can fail: the same removal without killing first is not exact."""
    proto = nets.resnet_basic()
    model = Model(ir=ir.serde.deserialize_model(proto))
    group = analyze_model(model).prunable()[0]
    feeds = models.feeds(proto)
    reference = _run(proto, feeds)
    remove_channels(model, {group.id: dead_channels(group)})
    outputs = _run(model.to_proto(), feeds)
    assert not np.allclose(reference[0], outputs[0], rtol=1e-3, atol=1e-4)


def test_rewritten_constants() -> None:
    """Split sizes, Resize sizes, Slice starts/ends, depthwise group and the heads Reshape
    are rewritten to the new channel counts."""
    result = _check_exact(nets.yolo_neck(), min_groups=3)
    graph = result["model"].ir.graph
    nodes = {n.op_type: n for n in graph}
    split = ir.convenience.get_const_tensor(nodes["Split"].inputs[1]).numpy().tolist()
    assert sum(split) < 16
    sizes = [n for n in graph if n.op_type == "Resize" and len(n.inputs) > 3][0]
    assert ir.convenience.get_const_tensor(sizes.inputs[3]).numpy()[1] == split[0]
    starts = ir.convenience.get_const_tensor(nodes["Slice"].inputs[1]).numpy()
    ends = ir.convenience.get_const_tensor(nodes["Slice"].inputs[2]).numpy()
    assert 0 < ends[0] - starts[0] < 12

    result = _check_exact(nets.mobilenet_se(), min_groups=3)
    depthwise = [
        n
        for n in result["model"].ir.graph
        if n.op_type == "Conv" and n.attributes.get_int("group", 1) > 1
    ]
    assert depthwise[0].attributes.get_int("group") < 24
    assert depthwise[0].attributes.get_int("group") == depthwise[0].inputs[1].const_value.shape[0]

    result = _check_exact(models.transformer_block(), min_groups=2)
    shapes = [
        ir.convenience.get_const_tensor(n.inputs[1]).numpy().tolist()
        for n in result["model"].ir.graph
        if n.op_type == "Reshape"
    ]
    assert [0, 0, 1, 8] in shapes  # one of two heads left
    assert [0, 0, 8] in shapes


@pytest.mark.parametrize(
    "build",
    [
        nets.resnet_basic,
        nets.bottleneck,
        nets.mobilenet_se,
        nets.densenet,
        nets.yolo_neck,
        nets.flatten_head,
        nets.ffn,
        models.transformer_block,
    ],
    ids=lambda v: getattr(v, "__name__", str(v)),
)
def test_staged_regression_compensation_keeps_dead_removals_exact(build, tmp_path) -> None:
    """The default removal with --data: regression compensation in stages, each stage measured
    on the model the earlier stages pruned (the analysis rebuilt in between, groups found
    again by their sources). Dead channels explain nothing and are explained by nothing, so
    the outputs stay as they were, and every group lands where the plan put it."""
    from graphopt.context import Context
    from graphopt.data import open_dataset
    from graphopt.passes.channels.staged import remove_in_stages

    proto = build()
    model = Model(ir=ir.serde.deserialize_model(proto))
    removal = kill(model)
    data = models.feeds(proto, batch=4)
    np.savez(tmp_path / "d.npz", **data)
    reference = _run(model.to_proto(), data)
    analysis = analyze_model(model)
    ctx = Context(
        workdir=tmp_path,
        device="cpu",
        calib_data=open_dataset(tmp_path / "d.npz", model.input_specs()),
    )
    stages = min(3, len(removal))
    kept, done, _ = remove_in_stages(
        model, analysis, removal, ctx, samples=4, method="regression", stages=stages,
        reanalyze=lambda: analyze_model(model),
    )  # fmt: skip
    assert kept
    assert sum(len(v) for v in removal.values()) > 0
    pruned = model.to_proto()
    onnx.checker.check_model(pruned, full_check=True)
    for ref, out in zip(reference, _run(pruned, data), strict=True):
        assert out.shape == ref.shape
        scale = max(float(np.abs(ref).max()), 1e-6)
        assert float(np.abs(out - ref).max()) <= 1e-5 * scale
    # the same removal in one shot keeps the same indices
    once = Model(ir=ir.serde.deserialize_model(proto))
    kill(once)
    assert remove_channels(once, removal) == kept
