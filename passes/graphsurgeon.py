"""Run a user's own onnx-graphsurgeon function as a pass.

TensorRT users keep graph-editing scripts written against `gs.Graph`; this pass converts the
model to onnx-graphsurgeon only for that step and back afterwards. The function is named
explicitly on the command line (`--pass graphsurgeon:function=my_edits:fuse`); recipe files
may not name it, because nothing in a recipe is executed.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
import onnx_ir as ir

from graphopt.context import Context
from graphopt.errors import PassFailed
from graphopt.model import EXTERNAL_DATA_THRESHOLD_BYTES, Model
from graphopt.passes.base import Pass, PassResult, option, register_pass
from graphopt.usercode import load_callable


@dataclass(frozen=True, kw_only=True)
class GraphSurgeonOptions:
    function: str = option(
        "", "module:function (or file.py:function) that takes a gs.Graph and returns one"
    )

    def __post_init__(self) -> None:
        if ":" not in self.function:
            raise ValueError("'function' must be given as module:function")


@register_pass
class GraphSurgeonPass(Pass[GraphSurgeonOptions]):
    """Calls the user's function on the model as an onnx-graphsurgeon Graph.

    Changes: whatever the function changes. Preserves: nothing is promised; the pipeline's
    check and validation after the pass are what vouch for the result.
    """

    name = "graphsurgeon"
    options_type = GraphSurgeonOptions
    summary = "run a user's onnx-graphsurgeon function (named on the command line)"
    runs_user_code = True

    def run(self, model: Model, ctx: Context) -> PassResult:
        import onnx_graphsurgeon as gs

        if model.initializer_bytes() >= EXTERNAL_DATA_THRESHOLD_BYTES:
            raise PassFailed(
                "onnx-graphsurgeon holds a whole model in one protobuf, which cannot exceed 2 GB.",
                pass_name=self.name,
                hint="Run your edit on a smaller model or port it to a graphopt pass.",
            )
        fn = load_callable(self.options.function, what="graphsurgeon function")
        before = model.to_proto()
        graph = gs.import_onnx(before)
        returned = fn(graph)
        edited = graph if returned is None else returned
        if not isinstance(edited, gs.Graph):
            raise PassFailed(
                f"'{self.options.function}' returned {type(edited).__name__}, not a gs.Graph.",
                pass_name=self.name,
            )
        after = gs.export_onnx(edited.cleanup().toposort(), do_type_check=False)
        after.ir_version = before.ir_version
        del after.metadata_props[:]
        after.metadata_props.extend(before.metadata_props)
        modified = _graph_bytes(before) != _graph_bytes(after)
        if modified:
            model.ir = ir.serde.deserialize_model(after)
        return PassResult(modified=modified, stats={"nodes": len(after.graph.node)})


def _graph_bytes(proto: onnx.ModelProto) -> bytes:
    return proto.graph.SerializeToString(deterministic=True)
