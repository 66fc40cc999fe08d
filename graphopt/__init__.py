"""graphopt: an ONNX graph-level optimizer."""

__version__ = "0.1.0"
