"""graphopt's passes: one module (or small folder) per pass, plus the shared `base`.

The registry in `base` imports the modules listed here the first time it is asked for a
pass, so importing `graphopt.passes.base` alone stays cheap and free of cycles.
"""

BUILTIN_PASS_MODULES: tuple[str, ...] = (
    "bias_correction",
    "channels",
    "cleanup",
    "distill",
    "graphsurgeon",
    "prune",
    "quantize",
    "smoothquant",
)
