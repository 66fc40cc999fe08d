"""Element-wise ops: one input (activations, Cast, Identity, Dropout) or several inputs with
numpy broadcasting (Add, Sub, Mul, Div, Max, Min, Where, PRelu, ...).

A broadcast operand whose dimension on the channel axis is 1 (or that has no such axis) is
not tied to the channels; one whose dimension equals the channel count is, and when it is a
constant (a per-channel scale or bias) it is sliced with them.
"""

from __future__ import annotations

import onnx_ir as ir

from graphopt.passes.channels.handlers.base import GraphView, Handler, Link, Port, Visit, refuse

UNARY_OPS = (
    "Relu", "Sigmoid", "HardSigmoid", "HardSwish", "Clip", "LeakyRelu", "Tanh", "Gelu",
    "Erf", "Softplus", "Softsign", "Mish", "Identity", "Cast", "Dropout", "Elu", "Selu",
    "Celu", "ThresholdedRelu", "Neg", "Abs", "Sqrt", "Exp", "Log", "Reciprocal", "Floor",
    "Ceil", "Round", "Sign", "Sin", "Cos", "Not", "IsNaN", "IsInf",
)  # fmt: skip

BROADCAST_OPS = (
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "PRelu",
    "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor",
)  # fmt: skip


class UnaryHandler(Handler):
    """Output i-th channel is a function of input i-th channel only; every axis carries."""

    def visit(self, node: ir.Node, port: Port, axis: int, g: GraphView) -> Visit:
        del g
        if node.op_type == "Dropout" and len(node.outputs) > 1 and node.outputs[1].uses():
            return refuse("the Dropout mask output is used")
        if port == ("in", 0):
            return Visit(links=[Link(("out", 0), axis)])
        if port == ("out", 0):
            return Visit(links=[Link(("in", 0), axis)])
        return refuse(f"input {port[1]} of {node.op_type} is a scalar parameter")


class BroadcastHandler(Handler):
    """All operands aligned from the right, as numpy broadcasts them."""

    def visit(self, node: ir.Node, port: Port, axis: int, g: GraphView) -> Visit:
        out = node.outputs[0]
        out_shape = g.shape(out)
        if out_shape is None:
            return refuse(f"the output shape of {node.op_type} is unknown")
        rank = len(out_shape)
        if port[0] == "out":
            out_axis = axis
        else:
            in_rank = g.rank(node.inputs[port[1]])
            if in_rank is None:
                return refuse(f"the rank of input {port[1]} of {node.op_type} is unknown")
            out_axis = axis + rank - in_rank
        size = out_shape[out_axis]
        links = []
        for i, value in enumerate(node.inputs):
            if value is None:
                continue
            shape = g.shape(value)
            if shape is None:
                return refuse(f"the shape of input {i} of {node.op_type} is unknown")
            in_axis = out_axis - (rank - len(shape))
            if in_axis < 0:
                continue
            dim = shape[in_axis]
            if dim == 1 and size != 1:
                continue  # broadcast: the same value for every channel
            if dim != size:
                return refuse(
                    f"input {i} of {node.op_type} has dimension {dim} where the output has "
                    f"{size}, so it cannot be proven to broadcast or align"
                )
            if ("in", i) != port:
                links.append(Link(("in", i), in_axis))
        if port[0] != "out":
            links.append(Link(("out", 0), out_axis))
        return Visit(links=links)
