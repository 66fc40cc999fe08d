"""The channels pass on models exported from PyTorch (TorchScript exporter, opset 17, dynamic
batch): a ResNet-18-like CNN, a MobileNetV3-like CNN (SE, hard-swish), a ViT encoder and a
GQA decoder block. For each: the share of Conv/Gemm/MatMul weights in prunable groups, what
is refused and why, pruning at 0.3 and 0.5 (checker, ORT, output shapes, fewer params and
FLOPs), and removing provably dead channels is exact on ORT."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

from graphopt.model import Model  # noqa: E402
from graphopt.passes.channels import analyze_model  # noqa: E402
from tests import models  # noqa: E402
from tests.passes import channels_check as cc  # noqa: E402
from tests.passes import channels_torch_nets as nets  # noqa: E402

# architecture -> (coverage at least, refusal reasons allowed)
EXPECTED = {
    "resnet18": (1.0, {"'…' is a graph output"}),
    "mobilenetv3": (1.0, {"'…' is a graph output"}),
    "vit": (1.0, {"'…' is a graph output"}),
    # the residual stream goes through RMSNorm's ReduceMean over the channels (rescaled)
    "gqa": (1.0, {"'…' is a graph output"}),
}


@pytest.fixture(scope="module", params=list(nets.ARCHITECTURES))
def exported(request):
    import onnx_ir as ir

    proto = nets.ARCHITECTURES[request.param]()
    feeds = models.feeds(proto)
    if request.param == "gqa":
        feeds = {"ids": np.random.default_rng(0).integers(0, 32, (2, 12)).astype(np.int64)}
    return request.param, proto, feeds, Model(ir=ir.serde.deserialize_model(proto))


def test_coverage_and_refusals(exported) -> None:
    name, _, _, model = exported
    analysis = analyze_model(model)
    coverage, allowed = EXPECTED[name]
    assert cc.weight_coverage(model, analysis) >= coverage
    assert set(cc.refusal_reasons(analysis)) <= allowed, cc.refusal_reasons(analysis)


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_pruned_model_runs(exported, ratio: float) -> None:
    name, proto, feeds, _ = exported
    result = cc.prune(proto, feeds, ratio)
    assert result.stats["channels_removed"] > 0
    assert result.after.params < result.before.params
    assert result.after.flops < result.before.flops
    if ratio == 0.5:
        assert result.after.flops < 0.8 * result.before.flops, name


def test_removing_dead_channels_is_exact(exported) -> None:
    name, proto, feeds, _ = exported
    min_groups = {"resnet18": 10, "mobilenetv3": 10, "vit": 4, "gqa": 2}[name]
    cc.check_exact(proto, feeds, min_groups=min_groups)


def test_heads_and_kv_groups() -> None:
    """ViT: each block's heads are one group of 4 (q, k and v of a head together); GQA: a
    K/V head goes with the 4 query heads that read it (one group of 2 KV groups)."""
    import onnx_ir as ir

    vit = Model(ir=ir.serde.deserialize_model(nets.vit_like()))
    heads = [g for g in analyze_model(vit).prunable() if g.channels == 4]
    assert len(heads) == 2
    qkv = next(s for s in heads[0].members if s.sources and not s.is_constant)
    assert heads[0].members[qkv].shape == (4, 3 * 16)

    gqa = Model(ir=ir.serde.deserialize_model(nets.gqa_decoder()))
    kv = next(g for g in analyze_model(gqa).prunable() if g.channels == 2)
    assert {s.split("'")[1] for s in kv.sources} == {"/q/MatMul", "/k/MatMul", "/v/MatMul"}
    widths = {s.name: idx.shape[1] for s, idx in kv.members.items() if s.sources}
    assert widths["/q/MatMul_output_0"] == 4 * 8 and widths["/k/MatMul_output_0"] == 8
