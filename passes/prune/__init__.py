"""Weight pruning: set the least important weights of Conv/Gemm/MatMul layers to zero.

Patterns: ``unstructured`` (a fraction `sparsity` of each layer, or of all layers together
with ``scope=global``) and N:M (``2:4``, or ``n:m`` with the `n`/`m` options): in every group
of M consecutive weights along the reduction axis, exactly M−N are zeroed — the 2:4 layout
TensorRT's sparse tensor cores run, grouped exactly as TensorRT checks it (see `targets`).

Criteria: ``magnitude`` (|W|) and ``wanda`` (|W|·‖X_j‖₂ from one streamed calibration run,
see `wanda`). With ``wanda`` and ``unstructured``, weights compete within each output (the
Wanda paper's choice); with ``magnitude``, within the layer (or the model, scope=global).

Modules: `targets` (which initializers, which axis, why not), `weights` (read and write
float, fp16 and quantized weights), `wanda` (activation norms), `select` (the vectorised
selection), `masks` (the keep-masks in `model.metadata["masks"]`), `check` (the N:M rule,
counted independently of `select`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from graphopt.context import Context
from graphopt.model import Model
from graphopt.passes import channel_stats
from graphopt.passes.base import Pass, PassResult, option, register_pass
from graphopt.passes.prune import masks, select, wanda, weights
from graphopt.passes.prune.check import NMCheck, check_nm
from graphopt.passes.prune.targets import Rules, Target, find
from graphopt.passes.quantize.sites import Excluder, parse_exclude

DEFAULT_SPARSITY = 0.5


@dataclass(frozen=True, kw_only=True)
class PruneOptions:
    """How many weights go, in which pattern, by which criterion, and which layers stay."""

    sparsity: float | None = option(
        None,
        "fraction of each layer's weights set to zero (unstructured; default 0.5); with an "
        "N:M pattern it is 1 - n/m and may be left out",
        range=(0.0, 1.0),
    )
    pattern: Literal["unstructured", "2:4", "n:m"] = option(
        "unstructured",
        "unstructured, 2:4 (TensorRT sparse tensor cores), or n:m with the n and m options",
    )
    n: int = option(2, "weights kept in every group (pattern=n:m)", range=(1, None))
    m: int = option(4, "group size along the reduction axis (pattern=n:m)", range=(2, 64))
    criterion: Literal["magnitude", "wanda"] = option(
        "magnitude", "|W|, or Wanda's |W|·‖X‖ from the calibration data (needs --data)"
    )
    scope: Literal["layer", "global"] = option(
        "layer", "unstructured magnitude: one threshold per layer, or one for all layers"
    )
    samples: int = option(128, "calibration samples for wanda (the first N)", range=(1, None))
    min_params: int = option(
        1024, "layers with fewer weights are left alone (reason small)", range=(0, None)
    )
    include_first: bool = option(False, "also prune a Conv that reads the graph input")
    include_depthwise: bool = option(False, "also prune depthwise Convs")
    exclude: tuple[str, ...] = option(
        (), "ops left alone: node names, 're:<regex>' on names, or 'op:<OpType>'"
    )

    def __post_init__(self) -> None:
        if self.pattern == "n:m" and not self.n < self.m:
            raise ValueError(f"n ({self.n}) must be smaller than m ({self.m})")
        if self.pattern != "unstructured":
            n, m = self.group
            if self.sparsity is not None and abs(self.sparsity - (1 - n / m)) > 1e-9:
                raise ValueError(
                    f"pattern {n}:{m} zeroes {1 - n / m:g} of the weights; sparsity="
                    f"{self.sparsity:g} contradicts it (leave sparsity out)"
                )
            if self.scope == "global":
                raise ValueError("scope=global applies to pattern=unstructured only")
        if self.scope == "global" and self.criterion != "magnitude":
            raise ValueError(
                "scope=global needs criterion=magnitude (Wanda's scores compare within a layer)"
            )
        for entry in self.exclude:
            parse_exclude(entry)

    @property
    def group(self) -> tuple[int, int]:
        """(n, m) of the N:M pattern (2:4 for pattern=2:4)."""
        return (2, 4) if self.pattern == "2:4" else (self.n, self.m)

    @property
    def target_sparsity(self) -> float:
        if self.pattern == "unstructured":
            return DEFAULT_SPARSITY if self.sparsity is None else self.sparsity
        n, m = self.group
        return 1 - n / m


@register_pass
class PrunePass(Pass[PruneOptions]):
    """Zeroes weights of Conv, Gemm and MatMul layers (unstructured or N:M such as 2:4).

    Changes: weight values (shapes and graph unchanged); records each pruned initializer's
    keep-mask in `model.metadata["masks"]` so later passes keep the zeros (an existing mask's
    zeros are kept). Preserves: the graph, input/output names and shapes. Lossy: validate,
    then recover with distillation.
    """

    name = "prune"
    options_type = PruneOptions
    summary = "weight sparsity: unstructured or TensorRT 2:4, by magnitude or Wanda"

    def run(self, model: Model, ctx: Context) -> PassResult:
        opts = self.options
        excluder = Excluder(opts.exclude)
        n, m = opts.group
        rules = Rules(
            excluder=excluder,
            min_params=opts.min_params,
            include_first=opts.include_first,
            include_depthwise=opts.include_depthwise,
            group_size=None if opts.pattern == "unstructured" else m,
        )
        targets, skips = find(model.graph, rules)
        warnings = [f"exclude entry '{entry}' matched no node" for entry in excluder.unused()]
        scales: dict[str, np.ndarray] = {}
        approximate: list[str] = []
        if opts.criterion == "wanda" and targets:
            channel_stats.require_data(ctx, self.name, "for Wanda's activation norms")
            scales, approximate = wanda.importance(model, ctx, targets, opts.samples)
        keeps = self._select(model, targets, scales)
        layers: list[dict[str, Any]] = []
        changed = False
        checks: list[NMCheck] = []
        nm_checks: list[NMCheck] = []
        for target, keep in zip(targets, keeps, strict=True):
            changed |= masks.store(model.metadata, target.name, keep)
            newly, zeros = weights.write(target, keep)
            del keep
            changed |= newly > 0
            layer, check_24, check_nm_ = self._layer_stats(target, newly, zeros)
            layers.append(layer)
            if check_24.applicable:
                checks.append(check_24)
            if check_nm_ is not None:
                nm_checks.append(check_nm_)
        stats = self._stats(model, layers, skips, checks, nm_checks, approximate)
        return PassResult(modified=changed, stats=stats, warnings=warnings)

    def _select(
        self, model: Model, targets: list[Target], scales: dict[str, np.ndarray]
    ) -> Iterator[np.ndarray]:
        """One keep-mask per target, made when asked for (scope=global makes all at once)."""
        opts = self.options
        n, m = opts.group

        def scores(target: Target) -> tuple[np.ndarray, np.ndarray | None]:
            # NaN weights compare as neither larger nor smaller; nothing here depends on them.
            values = np.abs(weights.float_values(target))
            if target.name in scales:
                values *= scales[target.name]
            old = masks.existing_keep(model.metadata, target.name, target.shape)
            if old is not None:
                values[~old] = -1.0
            return values, old

        if opts.scope == "global":
            pairs = [scores(t) for t in targets]
            keeps = select.global_keep([s for s, _ in pairs], opts.target_sparsity)
            for keep, (_, old) in zip(keeps, pairs, strict=True):
                yield keep if old is None else keep & old
            return
        for target in targets:
            if opts.pattern != "unstructured" and target.name not in scales:
                # Magnitude N:M ranks |W| chunk by chunk: no full-size score array.
                old = masks.existing_keep(model.metadata, target.name, target.shape)
                values = weights.float_values(target)
                keep = select.nm_keep(values, target.axis, n, m, absolute=True, forced=old)
            else:
                values, old = scores(target)
                if opts.pattern != "unstructured":
                    keep = select.nm_keep(values, target.axis, n, m)
                elif opts.criterion == "wanda":
                    keep = select.rows_keep(values, target.out_axes, opts.target_sparsity)
                else:
                    keep = select.fraction_keep(values, opts.target_sparsity)
            del values
            yield keep if old is None else keep & old

    def _layer_stats(
        self, target: Target, newly: int, zeros: int
    ) -> tuple[dict[str, Any], NMCheck, NMCheck | None]:
        values = weights.float_values(target)
        check_24 = check_nm(values, target.axis, n=2, m=4)
        check_nm_ = None
        if self.options.pattern != "unstructured":
            n, m = self.options.group
            check_nm_ = check_24 if (n, m) == (2, 4) else check_nm(values, target.axis, n=n, m=m)
        layer: dict[str, Any] = {
            "weight": target.name,
            "nodes": list(target.labels()),
            "op": target.readers[0].node.op_type,
            "shape": list(target.shape),
            "axis": target.axis,
            "params": target.size,
            "zeros": zeros,
            "sparsity": round(zeros / max(target.size, 1), 6),
            "newly_zeroed": newly,
        }
        if check_24.applicable:
            layer["compliance_2_4"] = round(check_24.fraction, 6)
        if check_nm_ is not None:
            layer["nm_compliance"] = round(check_nm_.fraction, 6)
        return layer, check_24, check_nm_

    def _stats(
        self,
        model: Model,
        layers: list[dict[str, Any]],
        skips: list[Any],
        checks: list[NMCheck],
        nm_checks: list[NMCheck],
        approximate: list[str],
    ) -> dict[str, Any]:
        opts = self.options
        eligible = sum(layer["params"] for layer in layers)
        zeros = sum(layer["zeros"] for layer in layers)
        all_params = sum(
            int(v.const_value.size)
            for graph in model.ir.graphs()
            for v in graph.initializers.values()
            if v.const_value is not None
        )
        skipped = [s.to_dict() for s in skips]
        stats: dict[str, Any] = {
            "criterion": opts.criterion,
            "pattern": opts.pattern if opts.pattern != "n:m" else f"{opts.n}:{opts.m}",
            "scope": opts.scope,
            "target_sparsity": opts.target_sparsity,
            "layers_pruned": len(layers),
            "layers_skipped": len(skipped),
            "skipped_by_reason": dict(sorted(Counter(s["reason"] for s in skipped).items())),
            "params_eligible": eligible,
            "zeros_eligible": zeros,
            "sparsity_eligible": round(zeros / eligible, 6) if eligible else 0.0,
            "sparsity_all_params": round(zeros / all_params, 6) if all_params else 0.0,
            "compliance_2_4": _fraction(checks),
            "masks": len(model.metadata.get(masks.METADATA_KEY, {})),
            "layers": layers,
            "skipped": skipped,
        }
        if opts.pattern != "unstructured":
            stats["nm_compliance"] = _fraction(nm_checks)
        if approximate:
            stats["wanda_approximate"] = approximate
        return stats


def _fraction(checks: list[NMCheck]) -> float | None:
    """Passing groups over all groups, or None when no layer could be checked."""
    groups = sum(c.groups for c in checks)
    if not checks:
        return None
    return round(sum(c.passing for c in checks) / groups, 6) if groups else 1.0
