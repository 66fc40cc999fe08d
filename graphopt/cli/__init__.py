"""The `graphopt` command: a thin root group; one module per verb.

Every command parses its arguments, calls the library and renders the result. A
`GraphoptError` (the user's problem) is printed as one paragraph on stderr with exit code 1;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import click

from graphopt import __version__
from graphopt.errors import GraphoptError


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except GraphoptError as exc:
            click.echo(f"error: {exc.paragraph()}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted: no output was written.", err=True)
            ctx.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="graphopt")
def main() -> None:
    """graphopt: make exported ONNX models smaller and faster, and prove it on ONNX Runtime."""


def _register() -> None:
    from graphopt.cli import (
        bench_cmd,
        build_cmd,
        distill_cmd,
        inspect_cmd,
        optimize,
        passes_cmd,
        triton_cmd,
        validate_cmd,
    )

    main.add_command(optimize.optimize)
    main.add_command(inspect_cmd.inspect)
    main.add_command(validate_cmd.validate)
    main.add_command(passes_cmd.passes)
    main.add_command(bench_cmd.bench)
    main.add_command(triton_cmd.export_triton)
    main.add_command(build_cmd.build)
    main.add_command(distill_cmd.distill)
    main.add_command(distill_cmd.export_logits)


_register()
