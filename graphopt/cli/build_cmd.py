"""`graphopt build`: a TensorRT plan (and a JSON sidecar) from an ONNX model."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    required=True,
    help="The plan file to write; OUT.json gets the sidecar (versions, GPU, layer types).",
)
@click.option(
    "--shapes",
    "shape_specs",
    multiple=True,
    metavar="NAME:MIN/OPT/MAX[,...]",
    help="One optimization profile per use, e.g. x:1x3x224x224/8x3x224x224/32x3x224x224.",
)
@click.option(
    "--timing-cache",
    type=click.Path(path_type=Path),
    default=None,
    help="Timing cache file: read if it exists, written after the build.",
)
@click.option("--sparsity", is_flag=True, help="Allow 2:4 sparse kernels (SPARSE_WEIGHTS).")
@click.option("--fp16", is_flag=True, help="Allow FP16 kernels (TensorRT 10, weakly typed).")
@click.option("--bf16", is_flag=True, help="Allow BF16 kernels (TensorRT 10, weakly typed).")
@click.option(
    "--strongly-typed/--weakly-typed",
    "strongly_typed",
    default=None,
    help="TensorRT 10: force the network typing [default: strongly typed for Q/DQ models "
    "without --fp16/--bf16]; TensorRT 11 is always strongly typed.",
)
@click.option(
    "--workspace", "workspace_mb", type=int, default=None, metavar="MB", help="Workspace limit."
)
@click.option("--opt-level", type=int, default=None, help="Builder optimization level 0-5.")
@click.option(
    "--hardware-compat",
    type=click.Choice(["none", "ampere+", "same-cc"]),
    default="none",
    show_default=True,
    help="Build an engine that also runs on other GPUs.",
)
@click.option(
    "--version-compatible", is_flag=True, help="An engine later TensorRT versions can run."
)
def build(
    model_path: Path,
    output: Path,
    shape_specs: tuple[str, ...],
    timing_cache: Path | None,
    sparsity: bool,
    fp16: bool,
    bf16: bool,
    strongly_typed: bool | None,
    workspace_mb: int | None,
    opt_level: int | None,
    hardware_compat: str,
    version_compatible: bool,
) -> None:
    """Build a TensorRT engine from MODEL (needs TensorRT and an NVIDIA GPU)."""
    from graphopt import console
    from graphopt.engine import BuildOptions, build_plan

    options = BuildOptions(
        fp16=fp16,
        bf16=bf16,
        strongly_typed=strongly_typed,
        sparsity=sparsity,
        workspace_mb=workspace_mb,
        opt_level=opt_level,
        timing_cache=str(timing_cache) if timing_cache is not None else None,
        hardware_compat=hardware_compat,  # type: ignore[arg-type]
        version_compatible=version_compatible,
    )
    result = build_plan(model_path, output, shape_specs, options)
    sidecar = result.sidecar
    console.out.print(f"wrote {result.plan_path} ({sidecar['plan_bytes']:,} bytes)")
    console.out.print(f"wrote {result.sidecar_path}")
    console.out.print(
        f"TensorRT {sidecar['tensorrt_version']}, built in {sidecar['build_seconds']:.1f} s; "
        f"layers by type: {sidecar['precision_counts']}"
    )
