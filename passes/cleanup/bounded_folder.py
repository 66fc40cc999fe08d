"""onnxscript's constant folder, steered away from what cleanup must not do.

The only module that imports onnxscript's private `_constant_folding`. The public
`onnxscript.optimizer.fold_constants(model, input_size_limit=, output_size_limit=,
should_fold=)` (0.7.2) builds the same pass but gives no hook into `process_node`, which this
subclass needs: onnxscript's per-op rewrites (Dropout, CastLike, the sequence ops) run before
`should_fold` is asked, a folded graph output would become an initializer, and an evaluator
that raises fails the whole fold.
"""

from __future__ import annotations

from typing import Any

import onnx_ir as ir

from graphopt.errors import GraphoptError
from graphopt.passes.cleanup.common import is_onnx_op

try:
    from onnxscript.optimizer._constant_folding import FoldConstantsPass
except ImportError as exc:  # private API: gone or moved in a newer onnxscript
    import onnxscript

    raise GraphoptError(
        f"cleanup's constant folding needs FoldConstantsPass from onnxscript's private module "
        f"onnxscript.optimizer._constant_folding, which onnxscript "
        f"{getattr(onnxscript, '__version__', '(unknown version)')} does not provide",
        hint="Install the onnxscript version graphopt is tested with (0.7.2), or run cleanup "
        "with fold_constants: false.",
    ) from exc

# Dropout belongs to the remove_dropout rule. onnxscript's sequence rewrites emit opset-13
# Split/Unsqueeze whatever the model's opset, and its CastLike -> Cast rewrite drops
# `saturate` (all three found by the backend corpus test).
_NOT_FOLDED = ("Dropout", "SplitToSequence", "ConcatFromSequence")


def _not_folded(node: ir.Node) -> bool:
    return is_onnx_op(node, *_NOT_FOLDED) or (
        is_onnx_op(node, "CastLike") and "saturate" in node.attributes
    )


class BoundedFolder(FoldConstantsPass):
    """onnxscript's `FoldConstantsPass`, with three changes.

    It leaves alone the ops in `_not_folded` (Dropout is the `remove_dropout` rule's, so the
    option means what it says), turns a folded graph output into a Constant node rather than
    an initializer (every graph output stays produced by a node, as in the input model), and
    treats an evaluator that raises as "not foldable" rather than failing the pass.
    """

    def process_node(self, node: ir.Node, is_function: bool) -> Any:
        if _not_folded(node):
            return None
        # onnxscript emits Constant nodes instead of initializers inside functions.
        as_constant = is_function or any(out.is_graph_output() for out in node.outputs)
        try:
            return super().process_node(node, is_function=as_constant)
        except RuntimeError:
            # An evaluator that trips over an unusual node: leave that node as it is.
            return None
