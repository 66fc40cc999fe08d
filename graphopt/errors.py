"""The errors graphopt reports to users.

A `GraphoptError` is the user's problem to fix (bad input, a failed gate, a missing optional
dependency): the CLI prints it as one paragraph and exits 1. Anything else that escapes is a
bug in graphopt and keeps its traceback.
"""

from __future__ import annotations


class GraphoptError(Exception):
    """Base class: what went wrong, where, and (in `hint`) what to do about it."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def paragraph(self) -> str:
        """The error as the one paragraph the CLI prints."""
        text = self.message.rstrip()
        if self.hint:
            if not text.endswith((".", "!", "?")):
                text += "."
            text += " " + self.hint.strip()
        return " ".join(text.split())


class ModelLoadError(GraphoptError):
    """The model file is missing, unreadable, corrupt, truncated or unsafe."""


class ModelSaveError(GraphoptError):
    """The model could not be written where it was asked to go."""


class RecipeError(GraphoptError):
    """The recipe names an unknown pass or option, or a value of the wrong type or range."""


class DataError(GraphoptError):
    """The data does not fit the model: names, shapes, dtypes, or an unreadable file."""


class PassFailed(GraphoptError):
    """A pass raised, or left a model that no longer checks or runs."""

    def __init__(
        self,
        message: str,
        *,
        pass_name: str,
        previous: list[str] | None = None,
        node: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.pass_name = pass_name
        self.previous = list(previous or [])
        self.node = node


class GateFailed(GraphoptError):
    """A validation gate (min_cosine, max_accuracy_drop, ...) did not hold."""


class RuntimeFailed(GraphoptError):
    """ONNX Runtime refused to create a session for, or to run, a model."""


class EngineUnavailable(GraphoptError):
    """TensorRT (or the GPU it needs) is not available on this machine."""
