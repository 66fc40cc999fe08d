"""TensorRT build settings, checked without TensorRT."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from graphopt.errors import GraphoptError

HardwareCompat = Literal["none", "ampere+", "same-cc"]


@dataclass(frozen=True, kw_only=True)
class BuildOptions:
    """What trtexec users know as build flags.

    Attributes:
        fp16: allow FP16 kernels (TensorRT 10.x weakly typed networks only).
        bf16: allow BF16 kernels (TensorRT 10.x weakly typed networks only).
        strongly_typed: None: strongly typed for a Q/DQ model without fp16/bf16 on 10.x (always
            on 11.x); True/False to force it on 10.x.
        sparsity: let TensorRT use 2:4 sparse kernels where the weights allow it.
        workspace_mb: the workspace memory pool limit in MiB (None: TensorRT's default).
        opt_level: builder optimization level 0-5 (None: TensorRT's default, 3).
        timing_cache: a timing cache file, read if present and written after the build.
        hardware_compat: "ampere+" or "same-cc" engines run on other GPUs than the build's.
        version_compatible: an engine later TensorRT versions can run (lean runtime).
    """

    fp16: bool = False
    bf16: bool = False
    strongly_typed: bool | None = None
    sparsity: bool = False
    workspace_mb: int | None = None
    opt_level: int | None = None
    timing_cache: Path | None = None
    hardware_compat: HardwareCompat = "none"
    version_compatible: bool = False

    def __post_init__(self) -> None:
        if self.strongly_typed and (self.fp16 or self.bf16):
            raise GraphoptError(
                "A strongly typed network runs in the model's own types, so --fp16/--bf16 "
                "cannot apply to it.",
                hint="Drop --fp16/--bf16, or build weakly typed (--weakly-typed, TensorRT 10).",
            )
        if self.workspace_mb is not None and self.workspace_mb < 1:
            raise GraphoptError(f"--workspace must be at least 1 MiB (got {self.workspace_mb}).")
        if self.opt_level is not None and not 0 <= self.opt_level <= 5:
            raise GraphoptError(
                f"--opt-level must be between 0 and 5 (got {self.opt_level}).",
                hint="TensorRT's default is 3; higher levels build longer for faster engines.",
            )
        if self.hardware_compat not in ("none", "ampere+", "same-cc"):
            raise GraphoptError(
                f"Unknown hardware compatibility '{self.hardware_compat}'.",
                hint="Use none, ampere+ or same-cc.",
            )
        if self.timing_cache is not None and self.timing_cache.is_dir():
            raise GraphoptError(f"The timing cache '{self.timing_cache}' is a folder, not a file.")

    def to_dict(self) -> dict[str, Any]:
        return {
            "fp16": self.fp16,
            "bf16": self.bf16,
            "strongly_typed": self.strongly_typed,
            "sparsity": self.sparsity,
            "workspace_mb": self.workspace_mb,
            "opt_level": self.opt_level,
            "timing_cache": str(self.timing_cache) if self.timing_cache else None,
            "hardware_compat": self.hardware_compat,
            "version_compatible": self.version_compatible,
        }
