"""Channel removal over a corpus of architectures exported from PyTorch.

For every architecture of `tests/channels_corpus.py` (ResNet basic and bottleneck, ResNeXt,
MobileNetV2/V3, DenseNet, Inception, a YOLO-style neck, a UNet, a ViT encoder, a GQA
decoder block), exported with torch.onnx.export and cleaned up with `cleanup` as users run it:

- coverage: the share of Conv/Gemm/MatMul weight parameters in prunable groups (defined in
  `channels_corpus`) is at least what it is today, and at least Torch-Pruning's share on
  the same module where Torch-Pruning's pruned module still runs;
- after `channels` at ratio 0.3 and 0.5 (round_to 1 and 8): the model passes the full ONNX
  checker, runs on ONNX Runtime, keeps its output shapes, and has fewer parameters and FLOPs.

Needs torch (skipped without it); the comparison also needs torch_pruning. The table with
every number is `benchmarks/bench_channels_coverage.py`.
"""

from __future__ import annotations

import functools
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

pytest.importorskip("torch")

from graphopt.context import Context  # noqa: E402
from graphopt.model import Model  # noqa: E402
from graphopt.passes.channels.handlers import HANDLERS  # noqa: E402
from graphopt.pipeline import run_pipeline  # noqa: E402
from graphopt.recipe import inline_recipe  # noqa: E402
from tests import channels_corpus as corpus  # noqa: E402

ARCHS = list(corpus.CORPUS)

# Handlers another change adds: with them the transformers' runtime-computed Reshape shapes
# (Shape -> Slice -> Concat, as the TorchScript exporter writes them) are followed.
SHAPE_HANDLER = "Shape" in HANDLERS

# Today's share of weight parameters in prunable groups (after cleanup); a floor, so a new
# handler that covers more keeps the test green. Below 1: the refused groups and why.
MIN_SHARE = dict.fromkeys(ARCHS, 1.0) | {
    # without a Shape handler the residual stream (patch conv, out-projections, fc2, head
    # input) is refused: Flatten and head Reshapes take their shapes from Shape at run time
    "vit": 1.0 if SHAPE_HANDLER else 0.94,
    # the residual stream is a graph input and RMSNorm is written out with ReduceMean over
    # the channels (the LM head's weight is then uncovered); without a Shape handler the
    # q/k/v/out heads are refused too
    "gqa-decoder": 0.90 if SHAPE_HANDLER else 0.74,
}


@functools.cache
def _exported(name: str) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return corpus.export(corpus.CORPUS[name]).SerializeToString()


def _model(name: str) -> Model:
    return Model(ir=ir.serde.deserialize_model(onnx.load_from_string(_exported(name))))


@functools.cache
def _cleaned(name: str) -> bytes:
    model = _model(name)
    run_pipeline(model, inline_recipe(["cleanup"]), Context(workdir=Path(tempfile.gettempdir())))
    return model.to_proto().SerializeToString()


@functools.cache
def _our_coverage(name: str) -> corpus.Coverage:
    model = Model(ir=ir.serde.deserialize_model(onnx.load_from_string(_cleaned(name))))
    return corpus.graphopt_coverage(model)


def _run(proto: bytes, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(proto, options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _feeds(name: str) -> dict[str, np.ndarray]:
    return {"x": corpus.CORPUS[name].example().numpy()}


@pytest.mark.parametrize("name", ARCHS)
def test_coverage_is_at_least_todays(name: str) -> None:
    coverage = _our_coverage(name)
    assert coverage.total > 0
    assert coverage.share >= MIN_SHARE[name], (coverage.share, coverage.uncovered())


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("round_to", [1, 8])
@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_pruned_model_is_valid_runs_and_keeps_shapes(
    name: str, ratio: float, round_to: int, tmp_path: Path
) -> None:
    model = _model(name)
    recipe = inline_recipe(["cleanup", f"channels:ratio={ratio},round_to={round_to}"])
    result = run_pipeline(model, recipe, Context(workdir=tmp_path))
    cleaned, pruned_step = result.steps[1], result.steps[2]
    assert pruned_step.modified and pruned_step.pass_stats["channels_removed"] > 0
    assert pruned_step.model_stats.params < cleaned.model_stats.params
    assert pruned_step.model_stats.flops < cleaned.model_stats.flops
    pruned = model.to_proto()
    onnx.checker.check_model(pruned, full_check=True)
    feeds = _feeds(name)
    before = _run(_exported(name), feeds)
    after = _run(pruned.SerializeToString(), feeds)
    assert [o.shape for o in after] == [o.shape for o in before]
    assert all(np.isfinite(o).all() for o in after)


# ---------------------------------------------------------------------------- Torch-Pruning


def _their_usable_share(name: str) -> tuple[float, str]:
    """Torch-Pruning's share, or 0 when its dependency graph fails or the module it pruned
    at ratio 0.5 (attention heads declared and written back) no longer runs with the
    original output shapes: then its groups are not usable as they are."""
    arch = corpus.CORPUS[name]
    coverage = corpus.torch_pruning_coverage(arch)
    if isinstance(coverage, str):
        return 0.0, coverage
    _, shapes, _, _ = corpus.torch_pruning_prune(arch, 0.5)
    expected = [tuple(o.shape) for o in _run(_exported(name), _feeds(name))]
    if shapes != expected:
        return 0.0, f"pruned module: {shapes}"
    return coverage.share, "ok"


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(
            n,
            marks=pytest.mark.xfail(
                not SHAPE_HANDLER,
                strict=True,
                reason="ViT: Torch-Pruning prunes the residual stream (embedding width), "
                "graphopt refuses it: no handler for the Shape that feeds the patch "
                "Flatten's runtime Reshape (Shape/Gather handlers are being added)",
            ),
        )
        if n == "vit"
        else n
        for n in ARCHS
    ],
)
def test_coverage_at_least_torch_pruning(name: str) -> None:
    pytest.importorskip("torch_pruning")
    theirs, why = _their_usable_share(name)
    ours = _our_coverage(name).share
    assert ours >= theirs - 1e-9, (ours, theirs, why)


# ---------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("name", ARCHS)
def test_removing_dead_channels_is_exact(name: str) -> None:
    """As test_channels_exact, on the exported corpus: zero about a third of the channels of
    every prunable, non-normalized group, remove exactly those, same outputs."""
    from graphopt.passes.channels import remove_channels
    from tests.passes.channels_check import kill

    model = Model(ir=ir.serde.deserialize_model(onnx.load_from_string(_cleaned(name))))
    removal = kill(model)
    assert removal
    feeds = _feeds(name)
    reference = _run(model.to_proto().SerializeToString(), feeds)
    remove_channels(model, removal)
    pruned = model.to_proto()
    onnx.checker.check_model(pruned, full_check=True)
    for want, got in zip(reference, _run(pruned.SerializeToString(), feeds), strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
