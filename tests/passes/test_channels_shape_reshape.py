"""Reshape targets computed from the input's own shape, as exporters write them.

paddle2onnx writes `x.flatten(2)` as Reshape(x, Concat(Slice(Shape(x), 0, 2), [-1])) and an
attention block's head split as Reshape(qkv, Concat([0], Slice(Shape(ln), 1, 2), [3, h, d]));
PyTorch writes `x.view(x.shape[0], -1, C)` and `flatten(2).transpose(1, 2)` with Shape ->
Gather -> Unsqueeze -> Concat. With dynamic batch and spatial dims the entries read from a
Shape are names; they copy the input's dim when shape inference proved them equal, so the -1
resolves (to H*W) and the channel axis maps through. Checked: the groups, the refusals with
their reasons, pruning (checker, ORT, output shapes, constant targets with the new counts),
exact removal of dead channels, and a model left alone at ratio 0.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.context import Context
from graphopt.model import Model
from graphopt.passes.channels import ChannelsOptions, ChannelsPass, analyze_model
from graphopt.passes.channels.handlers.base import dim_product, dim_quotient, monomial
from graphopt.passes.channels.handlers.reshape import match_blocks
from tests.passes import channels_check as cc

# more than 3 heads: a leading axis of 2 or 3 reads as the q/k/v stack (see `axis_map`)
C, HEADS, HEAD_DIM, HIDDEN, CLASSES = 16, 4, 4, 32, 10


class _Graph:
    """A graph under construction: nodes, initializers, fresh names."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def const(self, array: np.ndarray | list[int], name: str = "c") -> str:
        array = np.asarray(array)
        if array.dtype == np.float64:
            array = array.astype(np.float32)
        self.count += 1
        full = f"{name}_{self.count}"
        self.inits.append(numpy_helper.from_array(array, full))
        return full

    def ints(self, values: list[int]) -> str:
        return self.const(np.asarray(values, np.int64), "i")

    def weight(self, *shape: int) -> str:
        return self.const(self.rng.standard_normal(shape) / math.sqrt(shape[0]), "w")

    def op(self, op_type: str, *inputs: str, **attrs: object) -> str:
        self.count += 1
        out = f"{op_type.lower()}_{self.count}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def dims(self, value: str, start: int, end: int) -> str:
        """paddle2onnx's Slice(Cast(Shape(value)), start, end)."""
        shape = self.op("Cast", self.op("Shape", value), to=TensorProto.INT64)
        return self.op("Slice", shape, self.ints([start]), self.ints([end]), self.ints([0]))

    def model(
        self, inputs: list[onnx.ValueInfoProto], output: str, out_shape: list
    ) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            "g",
            inputs,
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, out_shape)],
            self.inits,
        )
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)])
        proto.ir_version = 8
        onnx.checker.check_model(proto, full_check=True)
        return proto


def _layer_norm(g: _Graph, x: str) -> str:
    """LayerNorm as paddle2onnx writes it at opset 12."""
    mean = g.op("ReduceMean", x, axes=[-1])
    centred = g.op("Sub", x, mean)
    var = g.op("ReduceMean", g.op("Pow", centred, g.const(np.float32(2.0))), axes=[-1])
    std = g.op("Sqrt", g.op("Add", var, g.const(np.float32(1e-5))))
    scaled = g.op("Mul", g.op("Div", centred, std), g.const(g.rng.uniform(0.5, 1.5, C)))
    return g.op("Add", scaled, g.const(g.rng.uniform(-0.2, 0.2, C)))


def _linear(g: _Graph, x: str, cin: int, cout: int) -> str:
    return g.op("Add", g.op("MatMul", x, g.weight(cin, cout)), g.const(g.rng.uniform(-1, 1, cout)))


def svtr_like(seed: int = 0) -> onnx.ModelProto:
    """PP-OCR's SVTR neck as paddle2onnx exports it: convs, [N, C, H, W] -> [N, C, H*W]
    through Concat(Slice(Shape(x), 0, 2), [-1]), a transformer block (LayerNorm written out,
    q/k/v heads split with Concat([0], Shape(ln)[1:2], [3, h, d]), an MLP), back to
    [N, 1, W, C] with Concat([0], [1], Shape(x)[3:4], [C]) (which holds only for H = 1), a
    conv head. Input [N, 3, H, W] with H and W named."""
    g = _Graph(seed)
    a = g.op("Relu", g.op("Conv", "x", g.weight(8, 3, 3, 3), pads=[1, 1, 1, 1]))
    s = g.op("Conv", a, g.weight(C, 8, 1, 1), g.const(g.rng.uniform(-1, 1, C)))
    flat = g.op("Reshape", s, g.op("Concat", g.dims(s, 0, 2), g.ints([-1]), axis=0))
    t = g.op("Transpose", flat, perm=[0, 2, 1])
    ln = _layer_norm(g, t)
    seq = g.dims(ln, 1, 2)
    qkv = _linear(g, ln, C, 3 * C)
    split = g.op("Concat", g.ints([0]), seq, g.ints([3, HEADS, HEAD_DIM]), axis=0)
    heads = g.op("Transpose", g.op("Reshape", qkv, split), perm=[2, 0, 3, 1, 4])
    q, k, v = (
        g.op("Squeeze", g.op("Slice", heads, g.ints([i]), g.ints([i + 1]), g.ints([0])), axes=[0])
        for i in range(3)
    )
    scores = g.op(
        "MatMul",
        g.op("Mul", q, g.const(np.float32(HEAD_DIM**-0.5))),
        g.op("Transpose", k, perm=[0, 1, 3, 2]),
    )
    attn = g.op("MatMul", g.op("Softmax", scores, axis=3), v)
    merged = g.op("Transpose", attn, perm=[0, 2, 1, 3])
    merge = g.op("Concat", g.ints([0]), seq, g.ints([C]), axis=0)
    res = g.op("Add", t, _linear(g, g.op("Reshape", merged, merge), C, C))
    hidden = g.op("Relu", _linear(g, _layer_norm(g, res), C, HIDDEN))
    res = g.op("Add", res, _linear(g, hidden, HIDDEN, C))
    back = g.op("Concat", g.ints([0, 1]), g.dims(s, 3, 4), g.ints([C]), axis=0)
    image = g.op("Transpose", g.op("Reshape", res, back), perm=[0, 3, 1, 2])
    y = g.op("Conv", image, g.weight(CLASSES, C, 1, 1))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])
    return g.model([x], y, ["N", CLASSES, 1, "W"])


def _feeds(batch: int = 2, width: int = 6) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {"x": rng.standard_normal((batch, 3, 1, width)).astype(np.float32)}


def _model(proto: onnx.ModelProto) -> Model:
    return Model(ir=ir.serde.deserialize_model(proto))


# --------------------------------------------------------------------------- shape algebra


def test_symbolic_dims_multiply_and_divide() -> None:
    assert monomial("W*H*2") == (2, ("H", "W"))
    assert monomial("floor(H/2)") == (1, ("floor(H/2)",))  # not a plain product: one name
    assert dim_product(["N", 16, "H", "W"]) == "16*H*N*W"
    assert dim_quotient("16*H*N*W", dim_product(["N", 16])) == "H*W"
    assert dim_quotient("H*N", "W") is None
    assert dim_quotient(48, 5) is None
    assert dim_product([3, None]) is None


def test_blocks_match_over_products_of_names() -> None:
    assert match_blocks(("N", 16, "H", "W"), ("N", 16, "H*W")) == [
        ([0], [0]),
        ([1], [1]),
        ([2, 3], [2]),
    ]
    assert match_blocks(("N", "H*W", 16), ("N", "H", "W", 2, 8)) == [
        ([0], [0]),
        ([1], [1, 2]),
        ([2], [3, 4]),
    ]
    assert match_blocks(("N", "H"), ("N", "W")) is None


# --------------------------------------------------------------------------- paddle2onnx


def test_svtr_neck_groups_are_prunable() -> None:
    model = _model(svtr_like())
    analysis = analyze_model(model)
    assert cc.weight_coverage(model, analysis) == 1.0
    # the only refusal: the head conv's output channels are the graph output
    assert set(cc.refusal_reasons(analysis)) == {"'…' is a graph output"}
    sizes = sorted(g.channels for g in analysis.prunable())
    assert sizes == sorted([8, C, HEADS, HIDDEN])
    stream = next(g for g in analysis.prunable() if g.channels == C)
    assert any("LayerNorm written out" in reason for reason in stream.lossy)
    heads = next(g for g in analysis.prunable() if g.channels == HEADS)
    assert not heads.lossy


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_svtr_neck_prunes_and_runs(ratio: float) -> None:
    feeds = _feeds()
    result = cc.prune(svtr_like(), feeds, ratio, round_to=1)
    assert result.after.params < result.before.params
    # ONNX's data propagation loses the Cast(Shape) targets of the original (its MatMul
    # FLOPs are unknown there); the pruned model's targets are constants
    assert not result.after.flops_unknown
    # every Reshape whose channels changed now has a constant target with the new counts
    graph = result.model.graph
    targets = {
        tuple(t.const_value.numpy().tolist())
        for node in graph
        if node.op_type == "Reshape" and (t := node.inputs[1]) is not None and t.const_value
    }
    assert any(len(t) == 3 and t[0] == 0 and 0 < t[1] < C and t[2] == -1 for t in targets)
    assert any(len(t) == 5 and t[:3] == (0, 0, 3) and 0 < t[3] < HEADS for t in targets)
    # other batch and width: the frozen targets still follow the input
    cc.run_ort(result.model.to_proto(), _feeds(batch=3, width=9))


def test_svtr_neck_dead_channels_removed_exactly() -> None:
    # the stream is lossy (LayerNorm written out), so: the first conv, the heads, the MLP
    cc.check_exact(svtr_like(), _feeds(), min_groups=3)


def test_ratio_zero_leaves_the_model_alone(tmp_path: Path) -> None:
    proto = svtr_like()
    model = _model(proto)
    result = ChannelsPass(ChannelsOptions(ratio=0.0)).run(model, Context(workdir=tmp_path))
    assert not result.modified
    feeds = _feeds()
    for a, b in zip(cc.run_ort(proto, feeds), cc.run_ort(model.to_proto(), feeds), strict=True):
        np.testing.assert_array_equal(a, b)


def _flatten_into(g: _Graph, s: str, lead: str) -> str:
    """Reshape(s, Concat(lead, [-1])), then back to s's shape, then a conv."""
    flat = g.op("Reshape", s, g.op("Concat", lead, g.ints([-1]), axis=0))
    image = g.op("Reshape", g.op("Relu", flat), g.op("Shape", s))
    return g.op("Conv", image, g.weight(CLASSES, C, 1, 1))


def test_entry_from_an_unrelated_shape_is_refused() -> None:
    """The batch entry is read from another input's Shape: nothing proves it equals x's, so
    the -1 cannot be resolved."""
    g = _Graph(0)
    s = g.op("Conv", "x", g.weight(C, 3, 1, 1))
    lead = g.op("Concat", g.dims("z", 0, 1), g.ints([C]), axis=0)
    y = _flatten_into(g, s, lead)
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"]),
        helper.make_tensor_value_info("z", TensorProto.FLOAT, ["M", 4]),
    ]
    analysis = analyze_model(_model(g.model(inputs, y, ["N", CLASSES, "H", "W"])))
    group = next(g for g in analysis.groups if g.channels == C)
    assert any("cannot be resolved" in r for r in group.refusals), group.refusals


def test_channels_merged_with_run_time_dims_are_refused() -> None:
    """[N, C, H, W] -> [N, C*H*W] with H and W named: channel c is a block of unknown
    size."""
    g = _Graph(0)
    s = g.op("Conv", "x", g.weight(C, 3, 1, 1))
    y = _flatten_into(g, s, g.dims(s, 0, 1))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])
    analysis = analyze_model(_model(g.model([x], y, ["N", CLASSES, "H", "W"])))
    group = next(g for g in analysis.groups if g.channels == C)
    assert any("only known at run time" in r for r in group.refusals), group.refusals


def test_reshape_that_would_need_two_unknown_dims_is_refused() -> None:
    """[N, C, H*W] -> [N, C, H, W] needs H (or W) from somewhere: a target [0, C, -1, 2]
    (W = 2 nowhere proved) leaves H*W/2, which is not a whole dim for every W."""
    g = _Graph(0)
    s = g.op("Conv", "x", g.weight(C, 3, 1, 1))
    flat = g.op("Reshape", s, g.op("Concat", g.dims(s, 0, 2), g.ints([-1]), axis=0))
    image = g.op("Reshape", flat, g.ints([0, C, -1, 2]))
    y = g.op("Conv", image, g.weight(CLASSES, C, 1, 1))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])
    analysis = analyze_model(_model(g.model([x], y, ["N", CLASSES, "H", "W"])))
    group = next(g for g in analysis.groups if g.channels == C)
    assert any("cannot be resolved" in r for r in group.refusals), group.refusals


# --------------------------------------------------------------------------- PyTorch


def _torch_tokens(back_to_image: bool) -> onnx.ModelProto:
    """Conv features as tokens two ways (flatten(2).transpose(1, 2) and
    x.view(x.shape[0], -1, C)), an MLP and a token mixer, then a pooled linear head, or
    (`back_to_image`) back to [B, C, H, W] through reshape(b, c, h, w) and a conv head.
    Exported with dynamic batch, height and width."""
    torch = pytest.importorskip("torch")
    from torch import nn
    from torch.nn import functional as F

    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv0 = nn.Conv2d(3, 8, 3, padding=1)
            self.conv1 = nn.Conv2d(8, C, 1)
            self.fc1 = nn.Linear(C, HIDDEN)
            self.fc2 = nn.Linear(HIDDEN, C)
            self.mix = nn.Linear(C, C)
            self.head = nn.Conv2d(C, CLASSES, 1) if back_to_image else nn.Linear(C, CLASSES)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            z = self.conv1(F.relu(self.conv0(x)))
            b, c, h, w = z.shape
            t = z.flatten(2).transpose(1, 2)  # [B, H*W, C]
            t = t + self.fc2(F.relu(self.fc1(t)))
            u = z.permute(0, 2, 3, 1).reshape(z.shape[0], -1, C)  # x.view(x.shape[0], -1, C)
            t = t + self.mix(u)
            if back_to_image:
                return self.head(t.transpose(1, 2).reshape(b, c, h, w))
            return self.head(t.mean(1))

    torch.manual_seed(0)
    module = Tokens().eval()
    buffer = io.BytesIO()
    out_axes = {0: "batch", 2: "h", 3: "w"} if back_to_image else {0: "batch"}
    with torch.no_grad():
        torch.onnx.export(
            module,
            (torch.randn(1, 3, 4, 5),),
            buffer,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "batch", 2: "h", 3: "w"}, "y": out_axes},
            opset_version=17,
            dynamo=False,
        )
    return onnx.load_from_string(buffer.getvalue())


def test_torch_view_and_flatten_transpose() -> None:
    proto = _torch_tokens(back_to_image=False)
    model = _model(proto)
    analysis = analyze_model(model)
    assert cc.weight_coverage(model, analysis) == 1.0
    assert set(cc.refusal_reasons(analysis)) == {"'…' is a graph output"}
    assert sorted(g.channels for g in analysis.prunable()) == [8, C, HIDDEN]
    feeds = {"x": np.random.default_rng(2).standard_normal((2, 3, 3, 7)).astype(np.float32)}
    cc.check_exact(proto, feeds, min_groups=3)
    result = cc.prune(proto, feeds, 0.5, round_to=1)
    assert result.after.flops < 0.8 * result.before.flops
    other = {"x": np.random.default_rng(3).standard_normal((1, 3, 5, 4)).astype(np.float32)}
    assert cc.run_ort(result.model.to_proto(), other)[0].shape == (1, CLASSES)


def test_torch_reshape_back_to_run_time_height_and_width_is_refused() -> None:
    """reshape(b, c, h, w) from [B, C, H*W]: c is the pruned count, read from a Shape; the
    target cannot be made constant (H and W both come from run time), and the pass does not
    yet rewrite only the channel entries of a computed target."""
    model = _model(_torch_tokens(back_to_image=True))
    analysis = analyze_model(model)
    stream = next(g for g in analysis.groups if g.channels == C)
    assert any("more than one dim of the target" in r for r in stream.refusals), stream.refusals
    assert sorted(g.channels for g in analysis.prunable()) == [8, HIDDEN]
