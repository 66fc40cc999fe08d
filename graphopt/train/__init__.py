"""The gradient engine: train a model's initializers on the ONNX graph itself.

`build_training_graph` turns a model into a graph of standard ONNX ops (forward, loss,
backward) that ONNX Runtime runs; `Trainer` appends the optimizer step to it as ONNX nodes
(graphopt.train.update; numpy optimizers as the fallback) and writes the weights back into
the inference graph (whose node list changes only by Identity nodes of untied initializers).
"""

from graphopt.train.builder import TrainingGraph, build_training_graph
from graphopt.train.graph import GradientError
from graphopt.train.losses import Loss
from graphopt.train.optim import SGD, AdamW
from graphopt.train.rules import RULES
from graphopt.train.session import StepResult, Trainer

SUPPORTED_OPS = tuple(sorted(RULES))

__all__ = [
    "SGD",
    "SUPPORTED_OPS",
    "AdamW",
    "GradientError",
    "Loss",
    "StepResult",
    "Trainer",
    "TrainingGraph",
    "build_training_graph",
]
