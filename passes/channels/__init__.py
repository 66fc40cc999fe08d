"""Channel removal: delete whole channels and every slice of every tensor that depends on
them, so the model really gets smaller and faster.

One module per job: `handlers/` (one handler per ONNX op type, by family: how channels flow
through the op and how to rewrite its count-encoding constants), `groups` (the dependency
analysis: union-find over (tensor, axis) slots, groups, refusals with reasons), `importance`
(scorers), `select` (ratios, caps, rounding, conv-group structure) and `rewrite` (slicing
constants, rewriting Reshape/Split/Slice/Resize constants and `group` attributes, shapes).

What was removed is recorded in `model.metadata["channels"]`: tensor name -> {axis: indices
of the original tensor that were kept}, composed over repeated runs, so later passes
(distillation) can map weights back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

from graphopt.context import Context
from graphopt.model import Model
from graphopt.passes.base import Pass, PassResult, option, register_pass
from graphopt.passes.channels import importance as scorers
from graphopt.passes.channels.compensate import compensate
from graphopt.passes.channels.groups import Analysis, Group, analyze
from graphopt.passes.channels.rewrite import compose, remove
from graphopt.passes.channels.select import plan
from graphopt.passes.channels.staged import remove_in_stages
from graphopt.passes.quantize.sites import Excluder, parse_exclude

__all__ = ["ChannelsOptions", "ChannelsPass", "analyze_model", "remove_channels"]

METADATA_KEY = "channels"


@dataclass(frozen=True, kw_only=True)
class ChannelsOptions:
    ratio: float = option(0.3, "fraction of channels removed from each group", range=(0.0, 0.95))
    importance: Literal["l1", "l2", "bn", "activation", "wanda", "taylor"] = option(
        "l2",
        "how channels are ranked: weight norms (l1, l2), BatchNorm |gamma| (bn), or on --data: "
        "activation RMS (activation), |W|·‖X‖ of the weights reading them (wanda), "
        "first-order loss change |Σ w·∂L/∂w| against the data's labels (taylor)",
    )
    round_to: int = option(
        8, "keep channel counts a multiple of this (tensor cores); 1 turns it off", range=(1, None)
    )
    global_ratio: bool = option(
        False, "remove `ratio` of all channels where they matter least, not of each group"
    )
    max_ratio: float = option(
        0.8, "with global_ratio, the most any one group may lose", range=(0.0, 0.95)
    )
    exclude: tuple[str, ...] = option(
        (), "ops whose channels stay: node names, re:<regex> on names, op:<OpType>"
    )
    samples: int = option(
        128,
        "calibration samples for importance=activation, wanda and taylor, and for compensate",
        range=(1, None),
    )
    compensate: Literal["regression", "mean", "none"] = option(
        "regression",
        "with --data, hand each removed channel to the Conv/Gemm/MatMul that read it: its "
        "least-squares prediction from the kept channels into their weights and bias "
        "(regression), or its mean into their bias (mean); none drops it",
    )
    stages: int = option(
        8,
        "with compensate and --data, remove the planned groups in this many stages in graph "
        "order, each compensated on activations of the model as the stages before left it "
        "(one calibration run per stage); 1 measures everything once, on the unpruned model",
        range=(1, None),
    )

    def __post_init__(self) -> None:
        for pattern in self.exclude:
            parse_exclude(pattern)


def analyze_model(model: Model, exclude: tuple[str, ...] = ()) -> Analysis:
    """The channel groups of `model` (refused ones with their reasons); nothing changes."""
    excluder = Excluder(exclude)
    excluded = [node for node in model.graph if excluder.matches(node)]
    return analyze(model.ir, excluded, "excluded by the user (exclude)")


def remove_channels(
    model: Model, removal: Mapping[int, np.ndarray | list[int]], *, exclude: tuple[str, ...] = ()
) -> dict[str, dict[int, list[int]]]:
    """Remove exactly the given channels: group id (as `analyze_model` numbers them) ->
    positions in the group. Records and returns the kept indices."""
    analysis = analyze_model(model, exclude)
    kept = remove(model.ir, analysis, {k: np.asarray(v) for k, v in removal.items()})
    model.metadata[METADATA_KEY] = compose(model.metadata.get(METADATA_KEY, {}), kept)
    return kept


@register_pass
class ChannelsPass(Pass[ChannelsOptions]):
    """Removes output channels of Conv/ConvTranspose/Gemm/MatMul groups, with every tensor
    slice and count-encoding constant that depends on them.

    Changes: weight shapes, intermediate channel counts, Reshape/Split/Slice/Resize constants,
    depthwise `group` attributes; params and FLOPs. Preserves: graph input/output names and
    shapes. Lossy: validate afterwards, then distill.
    """

    name = "channels"
    options_type = ChannelsOptions
    summary = "remove whole channels (structured pruning) and rewrite what depends on them"

    def run(self, model: Model, ctx: Context) -> PassResult:
        opts = self.options
        excluder = Excluder(opts.exclude)
        excluded = [node for node in model.graph if excluder.matches(node)]
        analysis = analyze(model.ir, excluded, "excluded by the user (exclude)")
        groups = analysis.prunable()
        warnings = [f"exclude entry '{e}' matched no node" for e in excluder.unused()]
        stats: dict[str, object] = {
            "groups": len(analysis.groups),
            "groups_prunable": len(groups),
            "groups_refused": len(analysis.groups) - len(groups),
            "channels_prunable": sum(g.channels for g in groups),
            "channels_removed": 0,
            "groups_pruned": 0,
        }
        if opts.ratio == 0 or not groups:
            return PassResult(modified=False, stats=stats, warnings=warnings)
        scores = self._scores(model, ctx, analysis, groups, warnings)
        removal = plan(
            groups,
            scores,
            ratio=opts.ratio,
            round_to=opts.round_to,
            global_ratio=opts.global_ratio,
            max_ratio=opts.max_ratio,
        )
        if not removal:
            return PassResult(modified=False, stats=stats, warnings=warnings)
        lossy = [analysis.groups[gid] for gid in removal if analysis.groups[gid].lossy]
        if lossy:
            warnings.append(
                f"{len(lossy)} pruned group(s) pass through a normalization over their channels "
                f"(e.g. {lossy[0].lossy[0]}); validate and distill"
            )
        kept = None
        if opts.compensate != "none" and ctx.calib_data is not None:
            if opts.stages > 1 and len(removal) > 1:
                kept, done, skipped = remove_in_stages(
                    model,
                    analysis,
                    removal,
                    ctx,
                    samples=opts.samples,
                    method=opts.compensate,
                    stages=opts.stages,
                    reanalyze=lambda: analyze(model.ir, excluded, "excluded by the user (exclude)"),
                )
                stats["compensation_stages"] = min(opts.stages, len(removal))
            else:
                done, skipped = compensate(
                    model, analysis, removal, ctx, opts.samples, opts.compensate
                )
            stats["readers_compensated"] = done
            if skipped:
                warnings.append(
                    f"{skipped} reader(s) of removed channels could not take their share into "
                    "a bias (a bias of another shape, or a graph output)"
                )
        elif opts.compensate != "none":
            warnings.append(
                "no --data: the removed channels are not handed to the next layers "
                f"(compensate={opts.compensate}), which costs accuracy"
            )
        if kept is None:
            kept = remove(model.ir, analysis, removal)
        model.metadata[METADATA_KEY] = compose(model.metadata.get(METADATA_KEY, {}), kept)
        stats["channels_removed"] = int(sum(len(r) for r in removal.values()))
        stats["groups_pruned"] = len(removal)
        return PassResult(modified=True, stats=stats, warnings=warnings)

    def _scores(
        self,
        model: Model,
        ctx: Context,
        analysis: Analysis,
        groups: list[Group],
        warnings: list[str],
    ) -> dict[int, np.ndarray]:
        kind = self.options.importance
        rms: dict[tuple[str, int], np.ndarray] = {}
        measured: dict[int, np.ndarray] = {}
        if kind == "activation":
            rms = self._activation_rms(model, ctx, groups)
        elif kind == "wanda":
            from graphopt.passes import channel_stats

            channel_stats.require_data(ctx, self.name, "to rank channels by importance=wanda")
            measured, approximate = scorers.wanda(
                model, ctx, groups, analysis, self.options.samples
            )
            if approximate:
                warnings.append(
                    f"importance=wanda: the input size of {len(approximate)} Conv(s) varies over "
                    f"the data (e.g. {approximate[0]}); their per-tap input norms are estimated "
                    "from per-channel means"
                )
        elif kind == "taylor":
            measured = scorers.taylor(model, ctx, groups, self.options.samples)
        scores: dict[int, np.ndarray] = {}
        fallbacks = 0
        for group in groups:
            score = measured.get(group.id)
            if kind == "bn":
                score = scorers.bn_scale(group, analysis)
            elif kind == "activation":
                score = scorers.activation_rms(group, rms)
            elif kind == "l1":
                score = scorers.weight_norm(group, analysis, 1)
            if score is None:
                fallbacks += kind != "l2"
                score = scorers.weight_norm(group, analysis, 2)
            if score is None:
                score = np.zeros(group.channels)
            scores[group.id] = score
        if fallbacks:
            warnings.append(
                f"importance={kind} found nothing to measure in {fallbacks} group(s); "
                "they were ranked by l2 weight norm"
                + (
                    " (BatchNorm already folded? run channels before cleanup)"
                    if kind == "bn"
                    else ""
                )
            )
        return scores

    def _activation_rms(
        self, model: Model, ctx: Context, groups: list[Group]
    ) -> dict[tuple[str, int], np.ndarray]:
        from graphopt.passes import channel_stats

        channel_stats.require_data(
            ctx, self.name, "to rank channels by activation (importance=activation)"
        )
        requests = list(
            dict.fromkeys((s.name, s.axis) for g in groups for s in scorers.activation_slots(g))
        )
        stats = channel_stats.collect(model, ctx, requests, samples=self.options.samples, rows=4096)
        out = {}
        for request, stat in stats.items():
            if stat.rows is not None and len(stat.rows):
                out[request] = np.sqrt(np.mean(np.square(stat.rows, dtype=np.float64), axis=0))
            else:
                out[request] = stat.absmax
        return out
