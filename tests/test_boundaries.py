"""Import boundaries: every module imports without onnxruntime or tensorrt, and only
graphopt/runtime.py mentions onnxruntime (graphopt/engine/ alone may import tensorrt)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import importlib, pkgutil, sys
sys.modules["onnxruntime"] = None   # makes `import onnxruntime` raise ImportError
sys.modules["tensorrt"] = None
import graphopt
names = [m.name for m in pkgutil.walk_packages(graphopt.__path__, "graphopt.")]
import graphopt.passes
names += [m.name for m in pkgutil.walk_packages(graphopt.passes.__path__, "graphopt.passes.")]
for name in sorted(set(names)):
    if name == "graphopt.__main__":
        continue
    importlib.import_module(name)
print(len(names))
"""


def test_every_module_imports_without_onnxruntime_and_tensorrt():
    result = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) >= 15


def test_only_the_runtime_module_imports_onnxruntime():
    offenders = []
    for path in sorted((ROOT / "graphopt").rglob("*.py")) + sorted((ROOT / "passes").rglob("*.py")):
        if path == ROOT / "graphopt" / "runtime.py":
            continue
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith(("import onnxruntime", "from onnxruntime")):
                offenders.append(f"{path.relative_to(ROOT)}: {stripped}")
            if (
                stripped.startswith(("import tensorrt", "from tensorrt"))
                and "engine" not in path.parts
            ):
                offenders.append(f"{path.relative_to(ROOT)}: {stripped}")
    assert offenders == []
