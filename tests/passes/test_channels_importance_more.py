"""The channels pass's data-driven scorers against independent PyTorch computations, and
RMSNorm (LLaMA-style, written out with ReduceMean over the channels) on a PyTorch-exported
model.

- `wanda`: Σ over the readers of |W[:, c]|·‖X_c‖₂, with the Conv norms of every im2col
  column from `torch.nn.functional.unfold` and the MatMul/Gemm norms over every token; a
  channel with tiny weights but a huge activation is kept where `l1` removes it.
- `taylor`: mean over batches of |Σ w·∂L/∂w| against torch autograd on the same net;
  refusals without labels and for an op the gradient engine has no rule for.
- RMSNorm: the residual stream is one prunable group (gammas sliced), ratio 0 changes
  nothing, ratio 0.5 runs with consistent shapes, and removing residual channels equals the
  PyTorch model with those channels zeroed (the ReduceMean keeps its original denominator).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from graphopt.context import Context  # noqa: E402
from graphopt.data import open_dataset  # noqa: E402
from graphopt.errors import DataError, GraphoptError  # noqa: E402
from graphopt.model import Model  # noqa: E402
from graphopt.passes.channels import (  # noqa: E402
    ChannelsOptions,
    ChannelsPass,
    analyze_model,
    remove_channels,
)
from graphopt.passes.channels import importance as scorers  # noqa: E402
from graphopt.passes.channels.groups import Analysis, Group  # noqa: E402
from tests.passes import channels_check as cc  # noqa: E402
from tests.passes import channels_torch_nets as nets  # noqa: E402

BATCH = 8
SAMPLES = 24  # three batches


class ConvNet(nn.Module):
    """conv 3x3 -> act -> conv 3x3 stride 2 (padding: border taps see zeros) -> act ->
    global pool -> linear: the first conv's channels are read by a strided Conv, the
    second's by a Gemm."""

    def __init__(self, act: type[nn.Module] = nn.ReLU, classes: int = 5, groups: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1)
        self.conv2 = nn.Conv2d(16, 8, 3, 2, 1, groups=groups)
        self.fc = nn.Linear(8, classes)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.conv2(self.act(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


class TokenMLP(nn.Module):
    """[N, S, 16] -> linear 32 -> GELU -> linear 16: the hidden channels are read by a MatMul
    over every token."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class RMSNormNet(nn.Module):
    """in-projection to a residual stream of 32, a pre-RMSNorm SwiGLU block, a final RMSNorm
    and a head (LLaMA's RMSNorm: x * rsqrt(mean(x²) + eps) * gamma)."""

    def __init__(self, dim: int = 32, hidden: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.inp = nn.Linear(16, dim, bias=False)
        self.norm1 = nn.Parameter(torch.empty(dim).uniform_(0.5, 1.5))
        self.norm2 = nn.Parameter(torch.empty(dim).uniform_(0.5, 1.5))
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)
        self.head = nn.Linear(dim, classes, bias=False)

    @staticmethod
    def rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        n = self.rms(h, self.norm1)
        h = h + self.down(F.silu(self.gate(n)) * self.up(n))
        return self.head(self.rms(h, self.norm2))


def _export(module: nn.Module, example: torch.Tensor) -> onnx.ModelProto:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nets.export(module, example)


def _model(proto: onnx.ModelProto) -> Model:
    return Model(ir=ir.serde.deserialize_model(proto))


def _context(tmp_path: Path, model: Model, x: np.ndarray, labels: np.ndarray | None = None):
    path = tmp_path / "calib.npz"
    arrays = {"x": x} if labels is None else {"x": x, "labels": labels}
    np.savez(path, **arrays)
    data = open_dataset(str(path), model.input_specs())
    return Context(workdir=tmp_path, calib_data=data, device="cpu", batch_size=BATCH)


def _group(analysis: Analysis, tensor: str) -> Group:
    """The prunable group holding the output of the op whose output is named `tensor`."""
    return next(g for g in analysis.prunable() if any(s.name == tensor for s in g.members))


def _output_of(model: Model, op: str, index: int = 0) -> str:
    return [n for n in model.graph if n.op_type == op][index].outputs[0].name


def _activation_order(group: Group, tensor: str) -> np.ndarray:
    """Tensor channel of each group channel (one per channel here)."""
    slot = next(s for s in group.members if s.name == tensor)
    return group.members[slot][:, 0]


def _images(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((SAMPLES, 3, 8, 8)).astype(np.float32)


# ---------------------------------------------------------------------------- wanda


def _inputs_of(net: nn.Module, layer: nn.Module, x: np.ndarray) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    with torch.no_grad():
        net(torch.from_numpy(x))
    handle.remove()
    return seen[0].double()


def _wanda_conv(net: ConvNet, x: np.ndarray) -> np.ndarray:
    """Σ_o Σ_taps |W2[o, c, tap]|·‖im2col row (c, tap)‖₂ over every sample and position (a
    grouped conv2: only the outputs of c's group read it, through W2[o, c mod 16/G])."""
    cols = F.unfold(_inputs_of(net, net.conv2, x), 3, padding=1, stride=2)  # [N, 16*9, L]
    norms = cols.pow(2).sum(dim=(0, 2)).sqrt().reshape(16, 3, 3)
    w = net.conv2.weight.detach().double().abs()  # [8, 16/G, 3, 3]
    groups = net.conv2.groups
    per_in, per_out = 16 // groups, 8 // groups
    out = np.zeros(16)
    for c in range(16):
        rows = w[(c // per_in) * per_out : (c // per_in + 1) * per_out, c % per_in]
        out[c] = float((rows * norms[c]).sum())
    return out


def _wanda_linear(layer: nn.Linear, inputs: torch.Tensor) -> np.ndarray:
    norms = inputs.reshape(-1, inputs.shape[-1]).pow(2).sum(dim=0).sqrt()
    return (layer.weight.detach().double().abs() * norms).sum(dim=0).numpy()


@pytest.mark.parametrize("groups", [1, 2])
def test_wanda_conv_and_gemm_readers_match_torch(tmp_path: Path, groups: int) -> None:
    torch.manual_seed(0)
    net = ConvNet(groups=groups)
    proto = _export(net, torch.randn(1, 3, 8, 8))
    model = _model(proto)
    x = _images()
    ctx = _context(tmp_path, model, x)
    analysis = analyze_model(model)
    first, second = _output_of(model, "Conv", 0), _output_of(model, "Conv", 1)
    g1, g2 = _group(analysis, first), _group(analysis, second)
    scores, approximate = scorers.wanda(model, ctx, [g1, g2], analysis, SAMPLES)
    assert approximate == []
    np.testing.assert_allclose(
        scores[g1.id], _wanda_conv(net, x)[_activation_order(g1, first)], rtol=1e-4
    )
    fc_in = _inputs_of(net, net.fc, x)
    np.testing.assert_allclose(
        scores[g2.id], _wanda_linear(net.fc, fc_in)[_activation_order(g2, second)], rtol=1e-4
    )


def test_wanda_matmul_reader_counts_every_token(tmp_path: Path) -> None:
    torch.manual_seed(1)
    net = TokenMLP()
    proto = _export(net, torch.randn(1, 6, 16))
    model = _model(proto)
    x = np.random.default_rng(1).standard_normal((SAMPLES, 6, 16)).astype(np.float32)
    ctx = _context(tmp_path, model, x)
    analysis = analyze_model(model)
    hidden = _output_of(model, "MatMul", 0)
    group = _group(analysis, hidden)
    scores, _ = scorers.wanda(model, ctx, [group], analysis, SAMPLES)
    expected = _wanda_linear(net.fc2, _inputs_of(net, net.fc2, x))
    slot = next(s for s in group.members if s.name == hidden)
    np.testing.assert_allclose(scores[group.id], expected[group.members[slot][:, 0]], rtol=1e-4)


def _loud_quiet_channel() -> tuple[ConvNet, int]:
    """Channel 5 of conv1: tiny weights everywhere (the smallest group L1 norm) but a bias
    of 50, so its activation is the largest by far; its readers see it."""
    torch.manual_seed(2)
    net = ConvNet()
    with torch.no_grad():
        net.conv1.weight[5] *= 0.01
        net.conv1.bias[5] = 50.0
        net.conv2.weight[:, 5] *= 0.1
    return net, 5


@pytest.mark.parametrize("importance", ["l1", "wanda"])
def test_wanda_keeps_a_small_but_loud_channel(tmp_path: Path, importance: str) -> None:
    net, loud = _loud_quiet_channel()
    proto = _export(net, torch.randn(1, 3, 8, 8))
    model = _model(proto)
    x = _images(2)
    l1 = (
        net.conv1.weight.detach().abs().sum(dim=(1, 2, 3))
        + net.conv2.weight.detach().abs().sum(dim=(0, 2, 3))
    ).numpy()
    assert int(np.argmin(l1)) == loud
    wanda = _wanda_conv(net, x)
    assert wanda[loud] > np.sort(wanda)[4]  # not among the 4 lowest
    first = _output_of(model, "Conv", 0)
    options = ChannelsOptions(ratio=0.25, importance=importance, round_to=1, samples=SAMPLES)
    result = ChannelsPass(options).run(model, _context(tmp_path, model, x))
    assert result.modified
    kept = model.metadata["channels"][first][1]
    assert len(kept) == 12
    if importance == "l1":
        assert loud not in kept
    else:
        assert loud in kept
        assert sorted(kept) == sorted(np.argsort(wanda, kind="stable")[4:].tolist())
        assert not result.warnings, result.warnings


def test_wanda_needs_calibration_data(tmp_path: Path) -> None:
    model = _model(_export(ConvNet(), torch.randn(1, 3, 8, 8)))
    the_pass = ChannelsPass(ChannelsOptions(importance="wanda"))
    with pytest.raises(GraphoptError, match="needs calibration data"):
        the_pass.run(model, Context(workdir=tmp_path))


# ---------------------------------------------------------------------------- taylor


def _taylor_torch(net: ConvNet, x: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Mean over batches of |Σ w·∂L/∂w| per channel of conv1's and conv2's output groups:
    each output channel's weights and bias, and the reader's input columns."""
    totals = {"conv1": np.zeros(16), "conv2": np.zeros(8)}
    for start in range(0, len(x), BATCH):
        net.zero_grad()
        logits = net(torch.from_numpy(x[start : start + BATCH]))
        F.cross_entropy(logits, torch.from_numpy(labels[start : start + BATCH])).backward()

        def wg(p: torch.Tensor) -> torch.Tensor:
            return (p.detach() * p.grad).double()

        one = wg(net.conv1.weight).sum(dim=(1, 2, 3)) + wg(net.conv1.bias)
        one += wg(net.conv2.weight).sum(dim=(0, 2, 3))
        two = wg(net.conv2.weight).sum(dim=(1, 2, 3)) + wg(net.conv2.bias)
        two += wg(net.fc.weight).sum(dim=0)
        totals["conv1"] += BATCH * one.abs().numpy()
        totals["conv2"] += BATCH * two.abs().numpy()
    return {k: v / len(x) for k, v in totals.items()}


def _labels(seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 5, SAMPLES).astype(np.int64)


def test_taylor_matches_torch_autograd(tmp_path: Path) -> None:
    torch.manual_seed(3)
    net = ConvNet()
    proto = _export(net, torch.randn(1, 3, 8, 8))
    model = _model(proto)
    x, labels = _images(3), _labels()
    ctx = _context(tmp_path, model, x, labels)
    analysis = analyze_model(model)
    first, second = _output_of(model, "Conv", 0), _output_of(model, "Conv", 1)
    g1, g2 = _group(analysis, first), _group(analysis, second)
    scores = scorers.taylor(model, ctx, [g1, g2], SAMPLES)
    expected = _taylor_torch(net, x, labels)
    for group, tensor, key in ((g1, first, "conv1"), (g2, second, "conv2")):
        want = expected[key][_activation_order(group, tensor)]
        np.testing.assert_allclose(scores[group.id], want, rtol=2e-3, atol=1e-5 * want.max())


def test_taylor_pass_removes_the_lowest_scores(tmp_path: Path) -> None:
    torch.manual_seed(4)
    net = ConvNet()
    model = _model(_export(net, torch.randn(1, 3, 8, 8)))
    x, labels = _images(4), _labels(4)
    first = _output_of(model, "Conv", 0)
    options = ChannelsOptions(ratio=0.25, importance="taylor", round_to=1, samples=SAMPLES)
    result = ChannelsPass(options).run(model, _context(tmp_path, model, x, labels))
    assert result.modified and not result.warnings, result.warnings
    expected = _taylor_torch(net, x, labels)["conv1"]
    kept = model.metadata["channels"][first][1]
    assert sorted(kept) == sorted(np.argsort(expected)[4:].tolist())


def test_taylor_samples_bound_the_batches(tmp_path: Path) -> None:
    """With samples=8 only the first batch counts."""
    torch.manual_seed(3)
    net = ConvNet()
    model = _model(_export(net, torch.randn(1, 3, 8, 8)))
    x, labels = _images(3), _labels()
    analysis = analyze_model(model)
    first = _output_of(model, "Conv", 0)
    group = _group(analysis, first)
    scores = scorers.taylor(model, _context(tmp_path, model, x, labels), [group], BATCH)
    want = _taylor_torch(net, x[:BATCH], labels[:BATCH])["conv1"]
    want = want[_activation_order(group, first)]
    np.testing.assert_allclose(scores[group.id], want, rtol=2e-3, atol=1e-5 * want.max())


def test_taylor_without_labels_says_why(tmp_path: Path) -> None:
    model = _model(_export(ConvNet(), torch.randn(1, 3, 8, 8)))
    the_pass = ChannelsPass(ChannelsOptions(importance="taylor"))
    with pytest.raises(DataError) as info:
        the_pass.run(model, _context(tmp_path, model, _images()))
    text = info.value.paragraph()
    assert "labelled calibration data" in text
    assert "gradient is zero" in text


def test_taylor_surfaces_the_gradient_engine_refusal(tmp_path: Path) -> None:
    model = _model(_export(ConvNet(act=nn.Softplus), torch.randn(1, 3, 8, 8)))
    the_pass = ChannelsPass(ChannelsOptions(importance="taylor", samples=BATCH))
    with pytest.raises(GraphoptError) as info:
        the_pass.run(model, _context(tmp_path, model, _images(), _labels()))
    text = info.value.paragraph()
    assert "gradient engine" in text and "Softplus" in text
    assert "importance=wanda" in text


# ---------------------------------------------------------------------------- RMSNorm


def _rms_net() -> tuple[RMSNormNet, onnx.ModelProto, dict[str, np.ndarray]]:
    torch.manual_seed(5)
    net = RMSNormNet()
    proto = _export(net, torch.randn(1, 6, 16))
    x = np.random.default_rng(5).standard_normal((3, 6, 16)).astype(np.float32)
    return net, proto, {"x": x}


def _residual(model: Model) -> tuple[Analysis, Group]:
    analysis = analyze_model(model)
    return analysis, _group(analysis, _output_of(model, "MatMul", 0))


def test_rmsnorm_residual_stream_is_one_exact_group() -> None:
    net, proto, feeds = _rms_net()
    np.testing.assert_allclose(
        cc.run_ort(proto, feeds)[0], net(torch.from_numpy(feeds["x"])).detach(), atol=1e-5
    )
    model = _model(proto)
    _, group = _residual(model)
    assert group.channels == 32 and not group.lossy
    gammas = [s for s in group.members if s.is_constant and s.value.const_value.shape == (32,)]
    assert len(gammas) == 2  # both RMSNorm scales are sliced with the stream
    readers = {n.op_type for s, n in scorers.readers(group, analyze_model(model))}
    assert readers == {"MatMul"}


def _bytes(model: Model) -> bytes:
    """The serialized model, without the names onnx_ir gives Constant nodes' tensors when
    their values are read (a name inside an attribute means nothing)."""
    proto = model.to_proto()
    for node in proto.graph.node:
        for attr in node.attribute:
            attr.t.ClearField("name")
    return proto.SerializeToString()


def test_rmsnorm_ratio_zero_changes_nothing(tmp_path: Path) -> None:
    _, proto, _ = _rms_net()
    model = _model(proto)
    before = _bytes(model)
    result = ChannelsPass(ChannelsOptions(ratio=0.0)).run(model, Context(workdir=tmp_path))
    assert not result.modified
    assert result.stats["channels_prunable"] >= 32 + 64
    assert _bytes(model) == before


def test_rmsnorm_pruned_model_runs_with_consistent_shapes() -> None:
    _, proto, feeds = _rms_net()
    result = cc.prune(proto, feeds, 0.5)
    assert result.stats["channels_removed"] > 0
    graph = result.model.ir.graph
    inp = next(n for n in graph if n.op_type == "MatMul").inputs[1].const_value
    assert inp.shape == (16, 16)  # the residual stream went from 32 to 16 channels
    means = [n for n in graph if n.op_type == "ReduceMean"]
    scales = [use.node for m in means for use in m.outputs[0].uses()]
    assert [s.op_type for s in scales] == ["Mul", "Mul"]
    assert all(float(s.inputs[1].const_value.numpy()) == 0.5 for s in scales)
    assert result.after.params < result.before.params


def test_rmsnorm_removal_equals_torch_with_those_channels_zeroed() -> None:
    """Removing residual channels = zeroing them in PyTorch (their in/out projection rows
    and gammas), the normaliser still dividing by 32: the ReduceMean's rescale."""
    net, proto, feeds = _rms_net()
    model = _model(proto)
    _, group = _residual(model)
    removed = np.arange(1, 32, 3)
    tensor = _output_of(model, "MatMul", 0)
    channels = _activation_order(group, tensor)[removed]
    remove_channels(model, {group.id: removed})
    pruned = model.to_proto()
    onnx.checker.check_model(pruned, full_check=True)
    with torch.no_grad():
        net.inp.weight[channels] = 0
        net.down.weight[channels] = 0
        net.norm1[channels] = 0
        net.norm2[channels] = 0
        want = net(torch.from_numpy(feeds["x"])).numpy()
    np.testing.assert_allclose(cc.run_ort(pruned, feeds)[0], want, rtol=1e-4, atol=1e-5)
