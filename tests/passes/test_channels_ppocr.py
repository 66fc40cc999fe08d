"""The channels pass on PP-OCRv4 detection and recognition and the mobile text-direction
classifier from the `rapidocr-onnxruntime` wheel, after cleanup as users run it (slow: needs
the wheel in .cache/ppocr, `pip download --no-deps rapidocr-onnxruntime==1.4.4`)."""

from __future__ import annotations

import tempfile
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from graphopt.context import Context
from graphopt.model import Model
from graphopt.passes.channels import analyze_model
from graphopt.passes.cleanup import CleanupOptions, CleanupPass
from tests.passes import channels_check as cc

WHEEL = Path(__file__).parents[2] / ".cache/ppocr/rapidocr_onnxruntime-1.4.4-py3-none-any.whl"
MODELS = {
    # name: (file in the wheel, input shape, coverage at least)
    "det": ("ch_PP-OCRv4_det_infer.onnx", [1, 3, 96, 96], 1.0),
    # the SVTR neck reshapes with targets built from Shape(x) (Concat(Slice(Shape(x)), [-1]))
    "rec": ("ch_PP-OCRv4_rec_infer.onnx", [1, 3, 48, 160], 1.0),
    "cls": ("ch_ppocr_mobile_v2.0_cls_infer.onnx", [1, 3, 48, 192], 1.0),
}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=list(MODELS))
def cleaned(request):
    if not WHEEL.exists():
        pytest.skip(f"{WHEEL.name} not downloaded")
    name, shape, coverage = MODELS[request.param]
    with zipfile.ZipFile(WHEEL) as wheel:
        proto = onnx.load_from_string(wheel.read(f"rapidocr_onnxruntime/models/{name}"))
    model = Model(ir=ir.serde.deserialize_model(proto))
    with tempfile.TemporaryDirectory() as workdir:
        CleanupPass(CleanupOptions()).run(model, Context(workdir=Path(workdir)))
    feeds = {"x": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    return request.param, model, feeds, coverage


def test_coverage(cleaned) -> None:
    name, model, _, coverage = cleaned
    analysis = analyze_model(model)
    assert cc.weight_coverage(model, analysis) >= coverage
    if name == "rec":
        # only the classifier's output channels (read by the output Softmax) are refused;
        # the neck's stream (LayerNorm written out) is lossy, its heads and MLP are not
        assert set(cc.refusal_reasons(analysis)) == {"Softmax '…' normalizes over the channel axis"}
        assert any(g.lossy for g in analysis.prunable())
        assert sum(not g.lossy for g in analysis.prunable()) >= 20


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_pruned_model_runs(cleaned, ratio: float) -> None:
    _, model, feeds, _ = cleaned
    result = cc.prune(model.to_proto(), feeds, ratio)
    assert result.after.params < result.before.params
    assert result.after.flops < result.before.flops


def test_removing_dead_channels_is_exact(cleaned) -> None:
    """PP-LCNet adds learned scalars to every channel (its affine blocks), so a zeroed
    channel is a constant downstream: its readers' weights are zeroed too."""
    _, model, feeds, _ = cleaned
    cc.check_exact(model.to_proto(), feeds, readers=True, min_groups=10)
