"""Handlers for run-time shapes (Shape, Gather, Expand, Tile) and GroupNormalization: what
they let through, what they refuse and why, and that removing provably dead channels through
them is exact on ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from graphopt.model import Model
from graphopt.passes.channels import analyze_model
from tests import models
from tests.passes import channels_check as cc
from tests.passes.channels_nets import Net


def _group_of(proto, tensor: str):
    model = Model(ir=ir.serde.deserialize_model(proto))
    return next(g for g in analyze_model(model).groups if any(s.name == tensor for s in g.members))


def _first_conv(proto) -> str:
    return next(n.output[0] for n in proto.graph.node if n.op_type == "Conv")


def _i64(*values: int) -> np.ndarray:
    return np.array(values, np.int64)


def _shape_head(gather: int, reader: str = "reshape"):
    """conv(3->16) -> Relu -> Reshape(x, Concat(Shape(x)[gather], ..)) -> MatMul: PyTorch's
    `x.view(x.shape[0], -1)` (gather 0) or `x.view(n, x.shape[1], -1)` (gather 1)."""
    n = Net(11)
    h = n.op("Relu", [n.conv("x", 3, 16)])
    shape = n.op("Shape", [h])
    picked = n.op("Unsqueeze", [n.op("Gather", [shape, n.const(np.int64(gather))], axis=0),
                                n.const(_i64(0))])  # fmt: skip
    if reader == "constantofshape":
        zero = onnx.helper.make_tensor("v", onnx.TensorProto.FLOAT, [1], [0.0])
        mask = n.op("ConstantOfShape", [picked], value=zero)
        h = n.op("Add", [h, n.op("Unsqueeze", [mask, n.const(_i64(0, 2, 3))])])
    if gather == 0:
        spec = n.op("Concat", [picked, n.const(_i64(-1))], axis=0)
        flat = n.op("Reshape", [h, spec])
        return n.model({"x": ["N", 3, 4, 4]}, [n.op("MatMul", [flat, n.weight([256, 5])])])
    batch = n.op("Unsqueeze", [n.op("Gather", [shape, n.const(np.int64(0))], axis=0),
                               n.const(_i64(0))])  # fmt: skip
    spec = n.op("Concat", [batch, picked, n.const(_i64(-1))], axis=0)
    tokens = n.op("Transpose", [n.op("Reshape", [h, spec])], perm=[0, 2, 1])  # [N, HW, C]
    return n.model({"x": ["N", 3, 4, 4]}, [n.op("MatMul", [tokens, n.weight([16, 5])])])


@pytest.mark.parametrize("gather", [0, 1], ids=["batch-size", "channel-count"])
def test_runtime_reshape_target_is_frozen_and_exact(gather: int) -> None:
    """The Shape -> Gather -> Concat -> Reshape target becomes a constant with the new
    channel count; the batch size it read becomes 0 (copy), so any batch still runs."""
    proto = _shape_head(gather)
    group = _group_of(proto, _first_conv(proto))
    assert group.prunable, group.refusals
    result = cc.check_exact(proto, models.feeds(proto), min_groups=1)
    reshape = next(n for n in result.model.ir.graph if n.op_type == "Reshape")
    spec = ir.convenience.get_const_tensor(reshape.inputs[1]).numpy().tolist()
    kept = 16 - len(cc.dead_channels(group))
    assert spec == ([0, kept * 16] if gather == 0 else [0, kept, 16])
    for batch in (1, 3):  # the frozen target does not pin the batch size
        cc.run_ort(result.model.to_proto(), models.feeds(proto, batch=batch))


def test_channel_count_read_elsewhere_is_refused() -> None:
    """A channel count that reaches a ConstantOfShape (a tensor sized by it) cannot be
    rewritten: the group is refused, naming the op."""
    group = _group_of(
        _shape_head(1, reader="constantofshape"),
        _first_conv(_shape_head(1, reader="constantofshape")),
    )
    assert not group.prunable
    assert any("ConstantOfShape" in r for r in group.refusals), group.refusals


def _gather_net(axis: int):
    """conv(3->16) -> [N, 16, 4, 4] -> Gather(index 0 on `axis`) -> ..."""
    n = Net(12)
    h = n.op("Relu", [n.conv("x", 3, 16)])
    g = n.op("Gather", [h, n.const(np.int64(0))], axis=axis)
    if axis == 2:  # [N, 16, 4]: a row of the map, then a channel-mixing MatMul
        out = n.op("MatMul", [n.op("Transpose", [g], perm=[0, 2, 1]), n.weight([16, 5])])
    else:  # [N, 4, 4]
        out = n.op("MatMul", [g, n.weight([4, 5])])
    return n.model({"x": ["N", 3, 4, 4]}, [out])


def test_gather_of_data() -> None:
    """Gather on another axis carries the channels (x[:, :, 0]); on the channel axis it
    picks channels and refuses."""
    proto = _gather_net(2)
    assert _group_of(proto, _first_conv(proto)).prunable
    cc.check_exact(proto, models.feeds(proto))
    group = _group_of(_gather_net(1), _first_conv(_gather_net(1)))
    assert any("picks entries along the channel axis" in r for r in group.refusals)


def _kv_repeat(op: str):
    """K/V-like heads repeated for grouped-query attention: conv(3->8) -> Expand (via an
    Unsqueeze, like Hugging Face's repeat_kv) or Tile -> conv reading 16 channels."""
    n = Net(13)
    h = n.op("Relu", [n.conv("x", 3, 8)])
    if op == "Expand":
        u = n.op("Unsqueeze", [h, n.const(_i64(2))])  # [N, 8, 1, 4, 4]
        shape = n.op("Concat", [n.op("Shape", [u], end=2), n.const(_i64(2, 4, 4))], axis=0)
        r = n.op("Reshape", [n.op("Expand", [u, shape]), n.const(_i64(0, 16, 4, 4))])
    else:
        r = n.op("Tile", [h, n.const(_i64(1, 2, 1, 1))])
    return n.model({"x": ["N", 3, 4, 4]}, [n.conv(r, 16, 4, k=1)])


@pytest.mark.parametrize("op", ["Expand", "Tile"])
def test_repeated_heads_go_with_their_copies(op: str) -> None:
    """Channel c of the repeated tensor is tied to its copies (2c, 2c+1 for Expand; c and
    c+8 for Tile), so removing it removes them all; exact on ORT."""
    proto = _kv_repeat(op)
    group = _group_of(proto, _first_conv(proto))
    assert group.prunable and group.channels == 8, group.refusals
    copies = max(index.shape[1] for index in group.members.values())
    assert copies == 2
    result = cc.check_exact(proto, models.feeds(proto))
    last = [n for n in result.model.ir.graph if n.op_type == "Conv"][-1]
    assert last.inputs[1].const_value.shape[1] == 2 * (8 - len(cc.dead_channels(group)))


def test_expand_broadcasting_channels_is_refused() -> None:
    n = Net(14)
    h = n.op("Relu", [n.conv("x", 3, 8)])
    pooled = n.op("ReduceMean", [h], axes=[1], keepdims=1)  # [N, 1, 4, 4]
    e = n.op("Expand", [pooled, n.const(_i64(1, 8, 1, 1))])
    proto = n.model({"x": ["N", 3, 4, 4]}, [n.conv(n.op("Add", [h, e]), 8, 4, k=1)])
    group = _group_of(proto, _first_conv(proto))
    assert not group.prunable


def _group_norm(opset: int, groups: int = 4):
    n = Net(15)
    h = n.conv("x", 3, 16)
    size = groups if opset < 21 else 16
    scale = n.const(n.rng.uniform(0.5, 1.5, size).astype(np.float32))
    bias = n.const((n.rng.standard_normal(size) * 0.1).astype(np.float32))
    g = n.op("GroupNormalization", [h, scale, bias], num_groups=groups, epsilon=1e-5)
    y = n.conv(n.op("Relu", [g]), 16, 4, k=1)
    # written out: ONNX shape inference does not infer through GroupNormalization
    float_ = onnx.TensorProto.FLOAT
    graph = onnx.helper.make_graph(
        n.nodes,
        "group_norm",
        [onnx.helper.make_tensor_value_info("x", float_, ["N", 3, 4, 4])],
        [onnx.helper.make_tensor_value_info(y, float_, ["N", 4, 4, 4])],
        n.inits,
        value_info=[onnx.helper.make_tensor_value_info(v, float_, ["N", 16, 4, 4]) for v in (h, g)],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    model.ir_version = 9
    if opset >= 21:  # onnx 1.23's checker refuses the (deprecated) opset-18 op
        onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("opset", [18, 21])
def test_group_norm_loses_whole_groups(opset: int) -> None:
    """A channel of the group is a whole normalization group (scale per group at opset 18,
    per channel at 21); removing dead groups is exact and rewrites num_groups."""
    proto = _group_norm(opset)
    group = _group_of(proto, _first_conv(proto))
    assert group.prunable and group.channels == 4 and not group.lossy, group.refusals
    result = cc.check_exact(proto, models.feeds(proto), checker=opset >= 21)
    node = next(n for n in result.model.ir.graph if n.op_type == "GroupNormalization")
    left = 4 - len(cc.dead_channels(group))
    assert node.attributes.get_int("num_groups") == left
    assert node.inputs[1].const_value.shape[0] == (left if opset < 21 else 4 * left)


def test_head_groups_round_in_tensor_channels() -> None:
    """round_to=8 counts tensor channels: a group whose channels are heads of 16 loses
    whole heads at ratio 0.5 instead of keeping all of them."""
    from graphopt.passes.channels.select import plan

    proto = models.transformer_block()
    model = Model(ir=ir.serde.deserialize_model(proto))
    heads = next(
        g
        for g in analyze_model(model).prunable()
        if max(i.shape[1] for i in g.members.values()) > 1
    )
    scores = {heads.id: np.arange(heads.channels, dtype=float)}
    removal = plan([heads], scores, ratio=0.5, round_to=8, global_ratio=False, max_ratio=0.8)
    assert len(removal.get(heads.id, [])) == heads.channels // 2
