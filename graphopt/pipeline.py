"""Runs a recipe's passes over a model, checking (and optionally validating) after each one.

After every pass the pipeline removes what became unused, sorts the graph topologically and
runs `onnx.checker` (with shape inference when the original model passes it), then, when
validation data is present, compares the current model with the *original* on ONNX Runtime.
A pass that raises or breaks the model is reported as `PassFailed`, naming the pass, the
passes that ran before it and, where the checker says, the node.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
from onnx_ir.passes import common as ir_passes

from graphopt.analysis import ModelStats, analyze
from graphopt.context import Context
from graphopt.errors import GraphoptError, PassFailed
from graphopt.model import Model
from graphopt.recipe import Recipe
from graphopt.validate import FidelityReport, compare


@dataclass
class StepRecord:
    """One row of the report: the model as it stood after a pass (or the original)."""

    name: str
    seconds: float
    modified: bool
    model_stats: ModelStats
    pass_stats: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    fidelity: FidelityReport | None = None


@dataclass
class PipelineResult:
    """The optimized model, a record per step, and the final fidelity with gates applied."""

    model: Model
    steps: list[StepRecord]
    fidelity: FidelityReport | None
    full_check: bool

    @property
    def passed(self) -> bool:
        return self.fidelity is None or bool(self.fidelity)


def run_pipeline(
    model: Model,
    recipe: Recipe,
    ctx: Context,
    *,
    metric: Callable[..., float] | None = None,
    on_step: Callable[[StepRecord], None] | None = None,
) -> PipelineResult:
    """Run every pass of `recipe` on `model` (edited in place) and return the record.

    The original model is the reference for validation: its file when it was loaded from
    one (graphopt never changes input files), otherwise a copy taken before the first pass.

    Raises:
        PassFailed: a pass raised an unexpected error or left a model that fails the check.
        GraphoptError: bad data or a runtime failure while validating.
    """
    if metric is None:
        metric = ctx.metric
    reference: Model | Path = model.path if model.path is not None else model.copy()
    if ctx.original is None:
        ctx.original = reference
    full_check = _passes_full_check(model)
    original = StepRecord(name="original", seconds=0.0, modified=False, model_stats=analyze(model))
    steps = [original]
    if on_step:
        on_step(original)
    fidelity: FidelityReport | None = None
    done: list[str] = []
    for spec in recipe.passes:
        the_pass = spec.instantiate()
        start = time.perf_counter()
        try:
            result = the_pass.run(model, ctx)
        except GraphoptError:
            raise
        except Exception as exc:
            raise PassFailed(
                f"Pass '{spec.name}' failed with {type(exc).__name__}: {exc}" + _after(done),
                pass_name=spec.name,
                previous=done,
                hint="This is a bug in the pass (or the user function it ran); please report "
                "it with the model if you can.",
            ) from exc
        _settle(model, spec.name, done, full_check)
        seconds = time.perf_counter() - start
        if ctx.val_data is not None:
            fidelity = compare(
                reference,
                model,
                ctx.val_data,
                gates=recipe.gates,
                batch_size=ctx.batch_size,
                device=ctx.device,
                threads=ctx.threads,
                metric=metric,
                workdir=ctx.workdir,
            )
            if original.fidelity is None:
                original.fidelity = fidelity
        record = StepRecord(
            name=spec.name,
            seconds=seconds,
            modified=result.modified,
            model_stats=analyze(model),
            pass_stats=dict(result.stats),
            warnings=list(result.warnings),
            fidelity=fidelity,
        )
        steps.append(record)
        if on_step:
            on_step(record)
        done.append(spec.name)
    return PipelineResult(model=model, steps=steps, fidelity=fidelity, full_check=full_check)


def _after(done: list[str]) -> str:
    return f" (after {', '.join(done)})." if done else " (it was the first pass)."


def _passes_full_check(model: Model) -> bool:
    """Whether the original model passes the checker with strict shape inference.

    Models from the wild sometimes do not (custom domains, exporter quirks); for those the
    pipeline checks later models without it, rather than blaming the first pass.
    """
    try:
        ir_passes.CheckerPass(full_check=True)(model.ir)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ir.passes.PassError):
        return False
    return True


# The checker names nodes as "Node (name)" or "node: name: X OpType: Y".
_NODE_IN_MESSAGE = re.compile(r"[Nn]ode \(([^)]*)\)|node: name: (\S+) OpType")


def _settle(model: Model, pass_name: str, done: list[str], full_check: bool) -> None:
    """Clean up, sort and check the model after a pass; blame the pass if it is broken."""
    try:
        ir_passes.RemoveUnusedNodesPass()(model.ir)
        ir_passes.TopologicalSortPass()(model.ir)
    except Exception as exc:
        raise PassFailed(
            f"Pass '{pass_name}' left a graph that cannot be sorted: {exc}" + _after(done),
            pass_name=pass_name,
            previous=done,
        ) from exc
    try:
        ir_passes.CheckerPass(full_check=full_check)(model.ir)
    except (
        onnx.checker.ValidationError,
        onnx.shape_inference.InferenceError,
        ir.passes.PassError,
    ) as exc:
        cause = exc.__cause__ or exc
        message = " ".join(str(cause).split())
        node_match = _NODE_IN_MESSAGE.search(message)
        node = (node_match.group(1) or node_match.group(2)) if node_match else None
        where = f" at node '{node}'" if node else ""
        raise PassFailed(
            f"Pass '{pass_name}' produced an invalid model{where}: {message}" + _after(done),
            pass_name=pass_name,
            previous=done,
            node=node,
        ) from exc
