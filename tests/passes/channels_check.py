"""Checks the channels tests run on any model: weight coverage and refusal reasons, pruning
at a ratio (checker, ORT, output shapes, params and FLOPs), and exactness of removing
channels made provably dead (as `test_channels_exact` does, for any inputs)."""

from __future__ import annotations

import re
import tempfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from graphopt.analysis import ModelStats
from graphopt.analysis import analyze as model_stats
from graphopt.context import Context
from graphopt.model import Model
from graphopt.passes.channels import ChannelsOptions, ChannelsPass, analyze_model, remove_channels
from graphopt.passes.channels.groups import Analysis, Group
from graphopt.passes.channels.handlers.base import replace_constant
from graphopt.passes.cleanup.common import constant

WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def run_ort(
    proto: onnx.ModelProto, feeds: Mapping[str, np.ndarray], *, optimize: bool = True
) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 2
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, dict(feeds))


def weight_coverage(model: Model, analysis: Analysis | None = None) -> float:
    """Share of Conv/ConvTranspose/Gemm/MatMul weight parameters that lie in a prunable group
    (on their output or input channel axis)."""
    analysis = analysis or analyze_model(model)
    prunable = {id(s.value) for g in analysis.prunable() for s in g.members}
    total = covered = 0
    for node in model.graph:
        if node.op_type not in WEIGHTED or len(node.inputs) < 2:
            continue
        weight = node.inputs[1]
        tensor = constant(weight) if weight is not None else None
        if tensor is None:
            producer = weight.producer() if weight is not None else None
            if producer is None or producer.op_type != "DequantizeLinear":
                continue
            weight = producer.inputs[0]
            tensor = constant(weight)
            if tensor is None:
                continue
        size = int(np.prod(tensor.shape))
        total += size
        covered += size * (id(weight) in prunable)
    return covered / total if total else 0.0


def refusal_reasons(analysis: Analysis) -> Counter[str]:
    """Refused groups by their first reason, with node and tensor names blanked out."""
    return Counter(re.sub(r"'[^']*'", "'…'", g.refusals[0]) for g in analysis.groups if g.refusals)


def stats(model: Model, feeds: Mapping[str, np.ndarray]) -> ModelStats:
    """Params and FLOPs with the graph inputs fixed to the shapes of `feeds` (dynamic image
    sizes would leave FLOPs unknown)."""
    proto = model.to_proto()
    for value in proto.graph.input:
        if value.name in feeds:
            dims = value.type.tensor_type.shape.dim
            for dim, size in zip(dims, feeds[value.name].shape, strict=True):
                dim.Clear()
                dim.dim_value = int(size)
    del proto.graph.value_info[:]
    proto = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    return model_stats(Model(ir=ir.serde.deserialize_model(proto)))


@dataclass
class Pruned:
    model: Model
    before: ModelStats
    after: ModelStats
    stats: dict[str, object]


def prune(
    proto: onnx.ModelProto, feeds: Mapping[str, np.ndarray], ratio: float, **options: object
) -> Pruned:
    """Run the channels pass; the result passes the full checker, runs on ORT and keeps the
    output shapes of the original."""
    model = Model(ir=ir.serde.deserialize_model(proto))
    before = stats(model, feeds)
    reference = run_ort(proto, feeds)
    with tempfile.TemporaryDirectory() as workdir:
        the_pass = ChannelsPass(ChannelsOptions(ratio=ratio, **options))  # type: ignore[arg-type]
        result = the_pass.run(model, Context(workdir=Path(workdir)))
    pruned = model.to_proto()
    onnx.checker.check_model(pruned, full_check=True)
    outputs = run_ort(pruned, feeds)
    assert [o.shape for o in outputs] == [r.shape for r in reference]
    return Pruned(model, before, stats(model, feeds), dict(result.stats))


def dead_channels(group: Group) -> np.ndarray:
    """About a third of the channels (at least one), the same number in every conv group."""
    if group.block_of is None:
        return np.arange(0, group.channels, 3)[: max(group.channels - 1, 1)]
    out = []
    for b in np.unique(group.block_of):
        members = np.nonzero(group.block_of == b)[0]
        out.append(members[::3][: len(members) - 1])
    return np.concatenate(out)


def kill(model: Model, *, readers: bool = False) -> dict[int, np.ndarray]:
    """Zero every constant the chosen channels own except the input-channel weights of the
    ops reading them, so they carry exact zeros; returns the removal that must be exact.

    With `readers`, zero those input-channel weights too: for models that add a scalar to
    every channel (PP-LCNet's learnable affine blocks), where a zeroed channel becomes a
    constant its readers still see."""
    analysis = analyze_model(model)
    removal: dict[int, np.ndarray] = {}
    arrays: dict[int, tuple[ir.Value, np.ndarray]] = {}
    for group in analysis.prunable():
        if group.lossy or group.channels < 2:
            continue
        dead = dead_channels(group)
        removal[group.id] = dead
        for slot, index in group.members.items():
            if not slot.is_constant or (slot.consumers and not readers):
                continue
            value = slot.value
            _, array = arrays.setdefault(id(value), (value, analysis.view.array(value).copy()))
            moved = np.moveaxis(array, slot.axis, 0)
            moved[index[dead].reshape(-1)] = 0
    for value, array in arrays.values():
        replace_constant(value, array)
    return removal


def check_exact(
    proto: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    *,
    min_groups: int = 1,
    readers: bool = False,
    rtol: float = 1e-5,
    checker: bool = True,
) -> Pruned:
    """Kill channels, then remove exactly them: ORT outputs unchanged (`rtol` of the largest
    output, or twice ORT's own noise between its optimized and unoptimized runs of the same
    model when that is larger), full checker, same output shapes, fewer params and FLOPs."""
    model = Model(ir=ir.serde.deserialize_model(proto))
    removal = kill(model, readers=readers)
    assert len(removal) >= min_groups, f"only {len(removal)} group(s) to kill"
    dead = model.to_proto()
    reference = run_ort(dead, feeds)
    # ORT's own kernel noise: the same model with and without its graph optimizations
    noise = [
        np.abs(a - b).max()
        for a, b in zip(reference, run_ort(dead, feeds, optimize=False), strict=True)
    ]
    before = stats(model, feeds)
    kept = remove_channels(model, removal)
    assert kept and model.metadata["channels"] == kept
    pruned = model.to_proto()
    if checker:
        onnx.checker.check_model(pruned, full_check=True)
    outputs = run_ort(pruned, feeds)
    for ref, out, floor in zip(reference, outputs, noise, strict=True):
        assert out.shape == ref.shape
        tolerance = max(rtol * float(np.abs(ref).max()), 2 * float(floor), 1e-7)
        assert float(np.abs(out - ref).max()) <= tolerance, (np.abs(out - ref).max(), tolerance)
    after = stats(model, feeds)
    assert after.params < before.params
    assert after.flops < before.flops
    return Pruned(model, before, after, {"groups_removed": len(removal)})
