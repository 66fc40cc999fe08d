"""Quantize: QuantizeLinear/DequantizeLinear (QDQ) nodes placed for a target runtime, with
activation scales calibrated on data and weights quantized per output channel.

Targets (placement profiles):

- ``tensorrt``: NVIDIA's explicit-quantization rules (`tensorrt` module): int8 symmetric,
  zero point 0, per-tensor activations at the inputs of Conv/ConvTranspose/Gemm/MatMul,
  int8 weights with per-output-channel scales, the skip input of a residual Add, shared
  scales around Concat. The result is checked against TensorRT's constraints (`trtcheck`);
  a violation fails the pass, naming the node. With ``precision=fp8`` (Hopper and later) the
  same places get float8 e4m3fn Q/DQ: zero points 0 of that type, scales amax / 448, weights
  stored as float8 e4m3fn, biases left in float; the model is raised to opset 19.
- ``ort-cpu``: the QDQ patterns ONNX Runtime's CPU provider fuses into integer kernels
  (`ortcpu` module): uint8 activations with zero points, int8 per-channel weights (7-bit for
  GEMM-based ops on x86 without VNNI, where 8-bit ones saturate ORT's U8S8 kernels), int32
  biases, outputs quantized where the fused kernel needs it (QLinearConv, QLinearMatMul,
  MatMulIntegerToFloat, QGemm, QLinearAdd, QLinearConcat, ...).

``precision=int4`` is weight-only (`weightonly`, `blockwise`, `awq`): MatMul/Gemm weights as
blockwise int4 behind opset 21's DequantizeLinear, activations left in float.

With an accuracy budget (``max_accuracy_drop``, ``min_cosine``, ``min_sqnr``) the pass builds
quantized copies and sends the ops that add the most noise back to float, by bisection, until
one meets the bound (`budget`); those ops are listed with reason ``budget``.

Which ops are left in float, and why, is decided in `sites` (reason codes ``user``,
``small-channels``, ``GEMV``, ``attention``, ``LayerNorm``, ``GELU``, ...) and listed in the
pass's stats. Ops that already read quantized inputs are left alone, so a second run changes
nothing. Models below opset 13 are raised to 13 when every op keeps its meaning there
(`opset`; to 19 for fp8), otherwise the pass fails and says which nodes stand in the way.
ONNX Runtime's CPU provider has no fp8 kernels, so ``precision=fp8`` with ``target=ort-cpu``
is refused when the recipe is read (its CPU QuantizeLinear/DequantizeLinear do run float8,
unfused, which is how fp8 models are validated).

Modules: `sites` (which compute ops, exclusions), `plan` (the placement data), `tensorrt` and
`ortcpu` (the profiles), `ranges` (calibration), `qparams` (the numbers), `insert` (the
rewrite), `trtcheck` (TensorRT's constraints), `budget` (the accuracy budget), `weightonly`,
`blockwise` and `awq` (int4), `opset`, `graphutil` (IR helpers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import onnx_ir as ir
from onnx_ir.passes import common as ir_passes

from graphopt.context import Context
from graphopt.errors import GraphoptError, PassFailed
from graphopt.model import Model
from graphopt.passes.base import Pass, PassResult, option, register_pass
from graphopt.passes.quantize import (
    blockwise,
    budget,
    insert,
    opset,
    qparams,
    ranges,
    weightonly,
)
from graphopt.passes.quantize.graphutil import node_label
from graphopt.passes.quantize.ortcpu import SEVEN_BIT_LIMIT, kernels_for_this_cpu, plan_ortcpu
from graphopt.passes.quantize.plan import Plan
from graphopt.passes.quantize.sites import (
    Excluder,
    Exclusion,
    Selection,
    Site,
    exclusion_counts,
    parse_exclude,
    select,
)
from graphopt.passes.quantize.tensorrt import plan_tensorrt
from graphopt.passes.quantize.trtcheck import FP8_MIN_OPSET, MIN_OPSET, check_tensorrt

#: The calibrator when none is named. mse (the int8 clip with the least expected squared
#: error) was the most accurate on PP-OCRv4's recogniser (400 rendered lines, 64 calibration
#: samples, FP32 CER 2.18 %): tensorrt profile CER 2.75 % with mse, 3.18 % percentile,
#: 4.00 % minmax, and 100 % with entropy, whose KL search on |x| clipped hard-swish outputs to
#: a tenth of their range. With the signs searched apart entropy still gives 32-47 % (128
#: samples, 200 lines): KL clips the long tail of one SE-gated tensor (p2o.Mul.141) at 0.3 of
#: its range, where mse keeps it. On the digits sample all four keep the accuracy.
DEFAULT_CALIBRATOR = "mse"
# Placement is redone when calibration leaves tensors out; a few rounds settle it.
_MAX_PLANS = 4


@dataclass(frozen=True, kw_only=True)
class QuantizeOptions:
    """How to quantize, for which runtime, and what to leave in float."""

    precision: Literal["int8", "fp8", "int4"] = option(
        "int8",
        "number format: int8 (weights and activations), fp8 (float8 e4m3fn, scale amax/448; "
        "target=tensorrt only, Hopper and later; opset 19), or int4 (weight-only, blockwise, "
        "MatMul/Gemm; opset 21)",
    )
    calibrator: Literal["minmax", "percentile", "entropy", "mse"] = option(
        DEFAULT_CALIBRATOR,
        "how activation ranges are chosen from the calibration data",
    )
    target: Literal["tensorrt", "ort-cpu"] = option(
        "tensorrt",
        "placement profile: tensorrt (symmetric int8, zero points 0, TensorRT's fusions) or "
        "ort-cpu (uint8 activations, ONNX Runtime's CPU integer kernels)",
    )
    samples: int = option(256, "calibration samples used (the first N)", range=(1, None))
    percentile: float = option(
        99.99, "percentile of the values kept by calibrator=percentile", range=(50.0, 100.0)
    )
    exclude: tuple[str, ...] = option(
        (), "ops left in float: node names, 're:<regex>' on names, or 'op:<OpType>'"
    )
    per_channel: bool = option(
        True, "one weight scale per output channel (else one per weight tensor)"
    )
    min_channels: int = option(
        16,
        "leave in float Conv/Gemm/MatMul with fewer output channels, or shorter dot products, "
        "than this",
        range=(1, None),
    )
    quantize_attention: bool = option(
        False, "also quantize MatMuls of two activations (the attention core)"
    )
    ort_kernels: Literal["auto", "u8s8", "u8s7", "u8u8"] = option(
        "auto",
        "target=ort-cpu: u8s8 (int8 weights) is fastest, but on x86 CPUs without VNNI its "
        "int16 partial sums can saturate; u8s7 rounds the weights of GEMM-based ops to 7 bits "
        "([-63, 63], depthwise convs keep 8) so they cannot, at U8S8 speed; u8u8 stores 8-bit "
        "weights as uint8 (zero point 128): no saturation, full precision, slower; "
        "auto: u8s8 where the CPU running graphopt has VNNI or is not x86, else u8s7",
    )

    block_size: int = option(
        128, "precision=int4: weight rows (of the reduction axis) per scale, a power of two >= 16"
    )
    weight_method: Literal["rtn", "awq"] = option(
        "rtn",
        "precision=int4: rtn (round to nearest) or awq (activation-aware scales searched on "
        "the calibration data and folded into the op before; needs --data)",
    )
    max_accuracy_drop: float | None = option(
        None,
        "accuracy budget: revert the ops that hurt most to float until the metric drops by "
        "at most this (a fraction: 0.01 = one point); needs labelled data",
        range=(0.0, 1.0),
    )
    min_cosine: float | None = option(
        None,
        "accuracy budget: revert ops to float until every output's cosine with the float "
        "model is at least this",
        range=(-1.0, 1.0),
    )
    min_sqnr: float | None = option(
        None,
        "accuracy budget: revert ops to float until every output's SQNR against the float "
        "model is at least this many dB",
    )
    budget_samples: int = option(
        128, "samples the accuracy budget is judged on (the first N)", range=(1, None)
    )
    budget_evals: int = option(
        10, "most candidate models the accuracy budget's bisection evaluates", range=(1, None)
    )

    def __post_init__(self) -> None:
        for entry in self.exclude:
            parse_exclude(entry)
        if self.precision == "int4":
            blockwise.check_block_size(self.block_size)
            if self.budget.active:
                raise ValueError(
                    "the accuracy budget (max_accuracy_drop, min_cosine, min_sqnr) works with "
                    "precision=int8 and fp8, not yet with int4 weight-only quantization"
                )
        if self.precision == "fp8" and self.target == "ort-cpu":
            raise ValueError(
                "precision=fp8 needs target=tensorrt: ONNX Runtime's CPU provider has no "
                "fp8 kernels (it would run every float8 Q/DQ unfused, slower than float); "
                "use precision=int8 for target=ort-cpu"
            )

    @property
    def budget(self) -> budget.Budget:
        return budget.Budget(
            max_accuracy_drop=self.max_accuracy_drop,
            min_cosine=self.min_cosine,
            min_sqnr_db=self.min_sqnr,
            samples=self.budget_samples,
            max_evals=self.budget_evals,
        )


def _infer_types_and_shapes(m: ir.Model) -> Callable[[], None]:
    """Annotate values with inferred types and shapes (GEMV detection and float checks need
    them); returns a function that puts the model back exactly as it was (annotations and
    initializer order: onnx-ir's inference re-adds large initializers at the end). Graph
    inputs and outputs keep their declared types and shapes either way: they are the model's
    contract."""
    saved = {}
    for graph in m.graphs():
        for value in ir.convenience.create_value_mapping(graph).values():
            saved[id(value)] = (
                value,
                value.type,
                None if value.shape is None else value.shape.copy(),
            )
    orders = [(graph, list(graph.initializers)) for graph in m.graphs()]

    def restore(which: list[ir.Value]) -> None:
        for value in which:
            if id(value) in saved:
                _, type_, shape = saved[id(value)]
                value.type, value.shape = type_, shape

    def forget() -> None:
        restore([value for value, _, _ in saved.values()])
        for graph, order in orders:
            if list(graph.initializers) != order:
                values = [graph.initializers.pop(name) for name in order]
                for value in values:
                    graph.initializers.add(value)

    ir_passes.ShapeInferencePass(check_type=False, strict_mode=False)(m)
    restore([*m.graph.inputs, *m.graph.outputs])
    return forget


@register_pass
class QuantizePass(Pass[QuantizeOptions]):
    """Inserts QuantizeLinear/DequantizeLinear nodes calibrated on `--data`.

    Changes: weights of quantized ops become int8 (fp8, or blockwise int4) initializers
    behind DequantizeLinear; activations get QuantizeLinear -> DequantizeLinear pairs (not
    with int4, which is weight-only); models below opset 13 (19 for fp8, 21 for int4) are
    raised to it. Preserves: graph input/output names, types and
    shapes; ops left in float.
    Lossy: validate afterwards (the `trt-int8` and `ort-int8` recipes gate on cosine).
    """

    name = "quantize"
    options_type = QuantizeOptions
    summary = (
        "calibrated int8/fp8 Q/DQ placed for TensorRT or ORT's CPU, or int4 weight-only; "
        "with an optional accuracy budget"
    )

    def run(self, model: Model, ctx: Context) -> PassResult:
        opts = self.options
        if opts.precision == "int4":
            return self._weight_only(model, ctx)
        if ctx.calib_data is None:
            raise GraphoptError(
                "The quantize pass needs calibration data to choose activation scales, and "
                "none was given.",
                hint="Pass --data with a few hundred representative inputs (an .npz keyed by "
                "input name, a folder of arrays or images); --data random runs but gives "
                "meaningless scales.",
            )
        forget_inferred = _infer_types_and_shapes(model.ir)
        excluder = Excluder(opts.exclude)
        selection = self._select(model.graph, excluder)
        plan = self._plan(model.graph, selection, excluder, frozenset())
        warnings = [f"exclude entry '{entry}' matched no node" for entry in excluder.unused()]
        if opts.target == "tensorrt" and opts.ort_kernels != "auto":
            warnings.append("ort_kernels is ignored with target=tensorrt")
        raise_from: int | None = None
        measured: dict[str, Any] = {}
        forbidden: dict[str, str] = {}
        if not plan.is_empty():
            try:
                raise_from = self._opset_to_raise(model)
            except PassFailed:
                forget_inferred()
                raise
            plan = self._calibrate(
                model, ctx, plan, selection, excluder, measured, forbidden, warnings
            )
        stats = self._stats(selection, plan)
        if plan.is_empty():
            forget_inferred()  # leave the model exactly as it came
            return PassResult(modified=False, stats=stats, warnings=warnings)
        if opts.budget.active:
            result = self._within_budget(model, ctx, measured, forbidden, raise_from, warnings)
            if not result.modified:
                forget_inferred()  # nothing met the budget: the model stays as it came
            return result
        self._apply(model, plan, measured, raise_from, stats)
        return PassResult(modified=True, stats=stats, warnings=warnings)

    def _weight_only(self, model: Model, ctx: Context) -> PassResult:
        """precision=int4: blockwise int4 weights for MatMul/Gemm (`weightonly`)."""
        opts = self.options
        forget_inferred = _infer_types_and_shapes(model.ir)
        excluder = Excluder(opts.exclude)
        try:
            result = weightonly.quantize_weights_int4(
                model,
                ctx,
                method=opts.weight_method,
                block_size=opts.block_size,
                excluder=excluder,
                min_channels=opts.min_channels,
                samples=opts.samples,
            )
        except Exception:
            forget_inferred()
            raise
        if not result.modified:
            forget_inferred()
        warnings = [f"exclude entry '{entry}' matched no node" for entry in excluder.unused()]
        if opts.calibrator != DEFAULT_CALIBRATOR:
            warnings.append("calibrator is ignored with precision=int4 (weights only)")
        stats = {"target": opts.target, **result.stats}
        return PassResult(
            modified=result.modified, stats=stats, warnings=[*warnings, *result.warnings]
        )

    def _select(self, graph: ir.Graph, excluder: Excluder) -> Selection:
        opts = self.options
        return select(
            graph,
            target=opts.target,
            excluder=excluder,
            min_channels=opts.min_channels,
            quantize_attention=opts.quantize_attention,
        )

    def _apply(
        self,
        model: Model,
        plan: Plan,
        measured: dict[str, Any],
        raise_from: int | None,
        stats: dict[str, Any],
    ) -> None:
        """Raise the opset if needed, insert the plan's Q/DQ, check TensorRT's rules."""
        m = model.ir
        if raise_from is not None:
            stats["opset_raised_from"] = raise_from
            stats["opset_rewritten_nodes"] = opset.raise_opset(m, self._min_opset())
        inserted = insert.apply(m.graph, plan, measured, per_channel=self.options.per_channel)
        ir_passes.TopologicalSortPass()(m)
        stats.update(
            quantize_linear=inserted.quantize_linear,
            dequantize_linear=inserted.dequantize_linear,
            weights_quantized=inserted.weights,
            biases_quantized=inserted.biases,
        )
        if self.options.target == "tensorrt":
            self._check_tensorrt(model)

    def _within_budget(
        self,
        model: Model,
        ctx: Context,
        measured: dict[str, Any],
        forbidden: dict[str, str],
        raise_from: int | None,
        warnings: list[str],
    ) -> PassResult:
        """Quantize copies of the (calibrated) model, reverting the ops that hurt most to
        float until one meets the budget (`budget` module), and keep that one."""
        limits = self.options.budget
        built: dict[frozenset[str], tuple[dict[str, Any], list[budget.SiteTensors]]] = {}

        def build(reverted: frozenset[str]) -> Model:
            candidate = model.copy()
            excluder = Excluder(self.options.exclude)
            selection = self._select(candidate.graph, excluder)
            _drop_sites(selection, forbidden, reverted)
            plan = self._plan(candidate.graph, selection, excluder, frozenset(forbidden))
            plan = self._calibrate(
                candidate, ctx, plan, selection, excluder, measured, forbidden, warnings
            )
            stats = self._stats(selection, plan)
            sites = [_site_tensors(site) for site in plan.sites]
            if not plan.is_empty():
                self._apply(candidate, plan, measured, raise_from, stats)
            built[reverted] = (stats, sites)
            return candidate

        evalset = budget.EvalSet(model, budget.eval_data(limits, ctx), limits.samples, ctx)
        gates = limits.gates()

        def judge(candidate: Model) -> budget.FidelityReport:
            return evalset.evaluate(candidate, gates, ctx.metric)

        quantized = build(frozenset())
        first = judge(quantized)
        stats, sites = built[frozenset()]
        ranked: list[tuple[budget.SiteTensors, float]] = []
        if not first.passed:
            ranked = budget.rank(model, quantized, sites, evalset, ctx)
        outcome = budget.search(
            ranked, build, judge, max_evals=limits.max_evals, first=(quantized, first)
        )
        outcome.data = evalset.dataset.description
        if outcome.model is None:
            warnings.append(
                f"no quantized model met the accuracy budget ({', '.join(first.failures)}) "
                f"within {len(outcome.evaluations)} evaluation(s); the model is left in float"
            )
            stats = self._stats(Selection([], [], 0), Plan())
            stats["budget"] = outcome.to_dict() | {"met": False}
            return PassResult(modified=False, stats=stats, warnings=warnings)
        reverted = frozenset(site.label for site, _ in outcome.reverted)
        stats, _ = built[reverted]
        stats["budget"] = outcome.to_dict() | {"met": True}
        model.ir = outcome.model.ir
        return PassResult(modified=True, stats=stats, warnings=list(dict.fromkeys(warnings)))

    def _plan(
        self, graph: ir.Graph, selection: Selection, excluder: Excluder, forbidden: frozenset[str]
    ) -> Plan:
        if self.options.target == "tensorrt":
            return plan_tensorrt(
                graph, selection, excluder, forbidden, precision=self.options.precision
            )
        kernels = self._ort_kernels()[0]
        return plan_ortcpu(
            graph,
            selection,
            excluder,
            forbidden,
            unsigned_weights=kernels == "u8u8",
            weight_limit=SEVEN_BIT_LIMIT if kernels == "u8s7" else qparams.INT8_MAX,
        )

    def _ort_kernels(self) -> tuple[str, str]:
        """The ort-cpu kernel flavour and why it was chosen."""
        if self.options.ort_kernels != "auto":
            return self.options.ort_kernels, "asked for"
        return kernels_for_this_cpu()

    def _calibrate(
        self,
        model: Model,
        ctx: Context,
        plan: Plan,
        selection: Selection,
        excluder: Excluder,
        measured: dict[str, Any],
        forbidden: dict[str, str],
        warnings: list[str],
    ) -> Plan:
        """Calibrate the plan's tensors that `measured` lacks into it. Tensors that cannot be
        ranged (inf or NaN on the data, ...) go into `forbidden` and stay float, the ops
        reading them too, and the placement is made again without them (a residual skip or an
        int8 region may depend on them)."""
        opts = self.options
        for _ in range(_MAX_PLANS):
            needed = [t for t in plan.range_tensors() if t not in measured and t not in forbidden]
            if not needed:
                break
            got, reasons = ranges.collect(
                model,
                ctx,
                needed,
                method=opts.calibrator,
                symmetric=plan.symmetric,
                percentile=opts.percentile,
                samples=opts.samples,
                precision=opts.precision,
            )
            measured.update(got)
            missing = {
                t: reasons.get(t, "calibration gave no range") for t in needed if t not in got
            }
            if not missing:
                break
            forbidden.update(missing)
            for name, reason in sorted(missing.items()):
                warnings.append(f"tensor '{name}' left in float: {reason}")
            _drop_sites(selection, forbidden, frozenset())
            plan = self._plan(model.graph, selection, excluder, frozenset(forbidden))
        return plan

    def _stats(self, selection: Selection, plan: Plan) -> dict[str, Any]:
        opts = self.options
        stats = {
            "target": opts.target,
            "precision": opts.precision,
            "calibrator": opts.calibrator,
            "quantized_nodes": len(plan.sites),
            "quantized_tensors": len(plan.readers),
            "quantize_linear": 0,
            "dequantize_linear": 0,
            "weights_quantized": 0,
            "biases_quantized": 0,
            "already_quantized": selection.already_quantized,
            "excluded_count": len(selection.excluded),
            "excluded_by_reason": exclusion_counts(selection.excluded),
            "excluded": [item.to_dict() for item in selection.excluded],
        }
        if opts.target == "ort-cpu":
            stats["ort_kernels"], stats["ort_kernels_reason"] = self._ort_kernels()
        return stats

    def _min_opset(self) -> int:
        """13 for per-channel int8 DequantizeLinear, 19 for float8 Q/DQ."""
        return FP8_MIN_OPSET if self.options.precision == "fp8" else MIN_OPSET

    def _opset_to_raise(self, model: Model) -> int | None:
        """The model's opset if it must be raised to 13 (19 for fp8; None if not); fails the
        pass when raising it would change an op's meaning."""
        current = opset.default_opset(model.ir)
        target = self._min_opset()
        if current >= target:
            return None
        stopped = opset.blockers(model.ir, target)
        if stopped:
            more = f"; and {len(stopped) - 5} more" if len(stopped) > 5 else ""
            needs = "fp8" if target == FP8_MIN_OPSET else "per-channel"
            raise PassFailed(
                f"The model uses opset {current}, and {needs} quantization needs opset {target}, "
                f"but raising it would change these ops: {'; '.join(stopped[:5])}{more}.",
                pass_name=self.name,
                node=stopped[0].split(" (")[0],
                hint=f"Re-export the model at opset {target} or newer (or convert it with "
                "onnx.version_converter) and run again.",
            )
        return current

    def _check_tensorrt(self, model: Model) -> None:
        violations = check_tensorrt(model.ir)
        if not violations:
            return
        shown = "; ".join(str(v) for v in violations[:5])
        more = f"; and {len(violations) - 5} more" if len(violations) > 5 else ""
        raise PassFailed(
            f"The quantized model breaks TensorRT's explicit-quantization rules at node "
            f"'{violations[0].node}': {shown}{more}.",
            pass_name=self.name,
            node=violations[0].node,
            hint="Q/DQ nodes that were in the model before this pass must be symmetric int8 "
            "(or fp8) with zero points 0 and per-channel scales only on weights; fix or "
            "remove them, or use target=ort-cpu.",
        )


def _drop_sites(selection: Selection, forbidden: dict[str, str], reverted: frozenset[str]) -> None:
    """Move to the exclusions the sites reading a tensor calibration could not range
    (reason ``calibration``) and those the accuracy budget sent back (reason ``budget``)."""
    kept = []
    for site in selection.sites:
        label = node_label(site.node)
        inputs = [site.node.inputs[i].name for i in site.activations]  # type: ignore[union-attr]
        bad = next((name for name in inputs if name in forbidden), None)
        if bad is not None:
            detail = f"input '{bad}': {forbidden[bad]}"
            selection.excluded.append(Exclusion(label, site.node.op_type, "calibration", detail))
        elif label in reverted:
            detail = "reverted to float to meet the accuracy budget"
            selection.excluded.append(Exclusion(label, site.node.op_type, "budget", detail))
        else:
            kept.append(site)
    selection.sites = kept


def _site_tensors(site: Site) -> budget.SiteTensors:
    """The site's label and the float tensors around it (before Q/DQ go in)."""
    inputs = tuple(site.node.inputs[i].name or "" for i in site.activations)  # type: ignore[union-attr]
    return budget.SiteTensors(
        label=node_label(site.node),
        op=site.node.op_type,
        inputs=inputs,
        output=site.node.outputs[0].name or "",
    )
