"""Cleanup: lossless tidying that every later pass and every backend benefits from.

What it does, repeated until nothing changes:

- removes nodes, initializers, functions and opset imports that nothing uses, and unused
  optional outputs (onnx-ir's passes);
- removes Identity nodes, and Dropout nodes that run in inference mode (own rules, because
  onnx-ir's IdentityEliminationPass can rename a graph output away when one value feeds two
  outputs, and rewrites the declared shape of graph inputs);
- folds constant subgraphs with onnxscript's constant folder, bounded in size so it never
  loads a huge external tensor or grows the model, and never turns a graph output into an
  initializer (it becomes a Constant node instead);
- folds an inference-mode BatchNormalization into the Conv, ConvTranspose or Gemm before it
  where that is exact;
- folds a per-channel `x * c + d` (Mul and/or Add by constants) after a Conv, or before one,
  into the Conv's weights and bias (before a padding Conv only the scale moves);
- fuses hard-sigmoid and hard-swish written out as Add/Clip/Mul/Div into HardSigmoid (and a
  Mul), one pass over the tensor instead of three or four;
- merges initializers with identical dtype, shape and bytes.

Lossless: outputs equal within float rounding. Preserves the names, types and shapes of the
graph inputs and outputs, and subgraphs (If, Loop, Scan). Models of IR version 3 get no
constant or BatchNormalization folding, because there every new weight would have to become a
graph input.

`CleanupPass.explain(model)` lists every BatchNormalization, Dropout and Identity a rule leaves
alone, with the reason (for `--explain`).

One module per rule family: `trivial` (Identity, Dropout), `constants` (folding, with
`bounded_folder` the one place onnxscript's private API is used), `batchnorm`, `affine`,
`activations`, `dedup`,
`unused`; `bookkeeping` measures and guards the model around them, `common` holds the IR
helpers they share.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import onnx_ir as ir

from graphopt.context import Context
from graphopt.model import Model
from graphopt.passes.base import Pass, PassResult, option, register_pass
from graphopt.passes.cleanup import activations, affine, batchnorm, constants, trivial
from graphopt.passes.cleanup.bookkeeping import (
    count_initializers,
    count_nodes,
    fingerprint,
    io_signature,
    restore_io,
)
from graphopt.passes.cleanup.common import ONNX_DOMAINS, node_label, nodes_with_opset
from graphopt.passes.cleanup.dedup import deduplicate
from graphopt.passes.cleanup.unused import remove_unused, remove_unused_opsets

# A fixed point is usually reached in two rounds; more means two rules undo each other.
_MAX_ROUNDS = 8


@dataclass(frozen=True, kw_only=True)
class CleanupOptions:
    """Which cleanup rules run; unused-node, Identity and opset removal always do."""

    fold_constants: bool = option(
        True, "evaluate nodes whose inputs are all constants and keep the results as weights"
    )
    fold_batchnorm: bool = option(
        True,
        "fold inference-mode BatchNormalization into the Conv, ConvTranspose or Gemm before it",
    )
    deduplicate: bool = option(True, "merge initializers with identical dtype, shape and bytes")
    remove_dropout: bool = option(True, "remove Dropout nodes that run in inference mode")
    fold_affine: bool = option(
        True, "fold per-channel Mul/Add by constants next to a Conv into its weights and bias"
    )
    fuse_activations: bool = option(
        True, "rewrite hard-sigmoid/hard-swish spelled as Add, Clip, Mul, Div into HardSigmoid"
    )
    fold_size_limit: int = option(
        1 << 20,
        "largest tensor (in elements) constant folding may read or create",
        range=(0, None),
    )


@dataclass(frozen=True)
class Refusal:
    """A node a rule left alone, and why (for `--explain`)."""

    node: str
    op_type: str
    rule: str
    reason: str

    def __str__(self) -> str:
        return f"{self.op_type} '{self.node}' kept by {self.rule}: {self.reason}"


@register_pass
class CleanupPass(Pass[CleanupOptions]):
    """Removes dead and redundant nodes, folds constants and BatchNormalization, fuses
    written-out hard-sigmoid/hard-swish.

    Changes: node and initializer counts, weights of Conv/ConvTranspose/Gemm that absorb a
    BatchNormalization or a per-channel Mul/Add, Add/Clip/Mul/Div chains that become
    HardSigmoid. Preserves: graph input/output names, types and shapes; subgraphs.
    Lossless: outputs equal within float rounding.
    """

    name = "cleanup"
    options_type = CleanupOptions
    summary = (
        "remove unused/Identity/Dropout nodes, fold constants, BatchNorm and per-channel affines "
        "into convs, fuse hard-swish, dedupe weights"
    )
    lossless = True

    def run(self, model: Model, ctx: Context) -> PassResult:
        del ctx  # needs no data
        m = model.ir
        opts = self.options
        warnings: list[str] = []
        # IR 3 requires every initializer to be a graph input: new weights would change the
        # model's signature, so the rules that create weights stay off there.
        can_add_weights = m.ir_version is None or m.ir_version >= 4
        if not can_add_weights and (opts.fold_constants or opts.fold_batchnorm):
            warnings.append(
                f"IR version {m.ir_version} model: constant and BatchNormalization folding "
                "skipped, because every new weight would have to become a graph input. "
                "Export with a newer IR version to enable them."
            )
        signature = io_signature(m.graph)
        start = fingerprint(m)
        nodes, initializers = count_nodes(m), count_initializers(m)
        stats: Counter[str] = Counter()
        reported = False
        for _ in range(_MAX_ROUNDS):
            stats["rounds"] += 1
            before = fingerprint(m)
            reported |= self._round(m, stats, can_add_weights)
            if fingerprint(m) == before:
                break
        else:
            warnings.append(f"cleanup still changed the model after {_MAX_ROUNDS} rounds")
        if opts.deduplicate:
            # Once, after the rounds: it reads every weight, and merging enables no other rule.
            before = count_initializers(m)
            reported |= deduplicate(m)
            stats["initializers_deduplicated"] = before - count_initializers(m)
            reported |= remove_unused(m, stats)
        restore_io(m.graph, signature)
        stats["nodes_removed"] = nodes - count_nodes(m)
        stats["initializers_removed"] = initializers - count_initializers(m)
        stats["batchnorms_kept"] = sum(
            1 for node, _ in nodes_with_opset(m) if node.op_type == "BatchNormalization"
        )
        modified = reported or fingerprint(m) != start
        return PassResult(modified=modified, stats=dict(stats), warnings=warnings)

    def _round(self, m: ir.Model, stats: Counter[str], can_add_weights: bool) -> bool:
        """One round of every enabled rule; True if any of them reported a change."""
        opts = self.options
        modified = remove_unused(m, stats)
        if opts.remove_dropout:
            count = trivial.remove_all(m, "Dropout")
            stats["dropouts_removed"] += count
            modified |= count > 0
        count = trivial.remove_all(m, "Identity")
        stats["identities_removed"] += count
        modified |= count > 0
        if opts.fold_constants and can_add_weights:
            before = count_nodes(m)
            modified |= constants.fold_constants(m, opts.fold_size_limit)
            stats["constants_folded"] += before - count_nodes(m)
            modified |= remove_unused(m, stats)
        if opts.fold_batchnorm and can_add_weights:
            count = batchnorm.fold_all(m)
            stats["batchnorms_folded"] += count
            modified |= count > 0
        if opts.fold_affine and can_add_weights:
            count = affine.fold_all(m)
            stats["affines_folded"] += count
            modified |= count > 0
        if opts.fuse_activations:
            count = activations.fuse_hard_sigmoid(m)
            stats["activations_fused"] += count
            modified |= count > 0
        modified |= remove_unused(m, stats)
        modified |= remove_unused_opsets(m, stats)
        return modified

    def explain(self, model: Model) -> list[Refusal]:
        """Every BatchNormalization, Dropout and Identity the rules would leave alone, and why."""
        m = model.ir
        checks = {"Identity": ("remove-identity", trivial.identity_refusal)}
        if self.options.remove_dropout:
            checks["Dropout"] = ("remove-dropout", trivial.dropout_refusal)
        if self.options.fold_batchnorm:
            checks["BatchNormalization"] = ("fold-batchnorm", batchnorm.refusal)
        main_graph_nodes = {id(n) for n in ir.traversal.RecursiveGraphIterator(m.graph)}
        refusals = []
        for node, opset in nodes_with_opset(m):
            if node.op_type not in checks or node.domain not in ONNX_DOMAINS:
                continue
            rule, check = checks[node.op_type]
            if rule == "fold-batchnorm" and id(node) not in main_graph_nodes:
                reason: str | None = "it is inside a function body"
            else:
                reason = check(node, opset)
            if reason is not None:
                refusals.append(Refusal(node_label(node), node.op_type, rule, reason))
        return refusals
