"""One handler per ONNX op type, by family; `HANDLERS` is the registry the analysis reads.

An op type missing here refuses every group it touches, with the reason "no handler": the
analysis never assumes an unknown op is element-wise.
"""

from __future__ import annotations

from graphopt.passes.channels.handlers.base import (
    GraphView,
    Handler,
    Link,
    Port,
    Rewriter,
    Visit,
    port_value,
    refuse,
)
from graphopt.passes.channels.handlers.conv import ConvHandler
from graphopt.passes.channels.handlers.elementwise import (
    BROADCAST_OPS,
    UNARY_OPS,
    BroadcastHandler,
    UnaryHandler,
)
from graphopt.passes.channels.handlers.layout import (
    ConcatHandler,
    PadHandler,
    ResizeHandler,
    SliceHandler,
    SplitHandler,
    SqueezeHandler,
    TransposeHandler,
)
from graphopt.passes.channels.handlers.linear import GemmHandler, MatMulHandler
from graphopt.passes.channels.handlers.norm import (
    GroupNormHandler,
    LayerNormHandler,
    PerChannelNormHandler,
)
from graphopt.passes.channels.handlers.quant import QDQHandler
from graphopt.passes.channels.handlers.reduce import (
    POOL_OPS,
    REDUCE_OPS,
    SOFTMAX_OPS,
    PoolHandler,
    ReduceHandler,
    SoftmaxHandler,
)
from graphopt.passes.channels.handlers.reshape import ReshapeHandler
from graphopt.passes.channels.handlers.shape import (
    ExpandHandler,
    GatherHandler,
    ShapeHandler,
    TileHandler,
)

__all__ = [
    "HANDLERS",
    "GraphView",
    "Handler",
    "Link",
    "Port",
    "Rewriter",
    "Visit",
    "port_value",
    "refuse",
]

HANDLERS: dict[str, Handler] = {
    "Conv": ConvHandler(),
    "ConvTranspose": ConvHandler(),
    "BatchNormalization": PerChannelNormHandler(),
    "InstanceNormalization": PerChannelNormHandler(),
    "LayerNormalization": LayerNormHandler(),
    "GroupNormalization": GroupNormHandler(),
    "Gemm": GemmHandler(),
    "MatMul": MatMulHandler(),
    "Concat": ConcatHandler(),
    "Split": SplitHandler(),
    "Slice": SliceHandler(),
    "Transpose": TransposeHandler(),
    "Squeeze": SqueezeHandler(),
    "Unsqueeze": SqueezeHandler(),
    "Pad": PadHandler(),
    "Resize": ResizeHandler(),
    "Upsample": ResizeHandler(),
    "Reshape": ReshapeHandler(),
    "Flatten": ReshapeHandler(),
    "Shape": ShapeHandler(),
    "Gather": GatherHandler(),
    "Expand": ExpandHandler(),
    "Tile": TileHandler(),
    "QuantizeLinear": QDQHandler(),
    "DequantizeLinear": QDQHandler(),
    **{op: UnaryHandler() for op in UNARY_OPS},
    **{op: BroadcastHandler() for op in BROADCAST_OPS},
    **{op: PoolHandler() for op in POOL_OPS},
    **{op: ReduceHandler() for op in REDUCE_OPS},
    **{op: SoftmaxHandler() for op in SOFTMAX_OPS},
}
