"""What every benchmark report records about where it ran: the machine and package versions."""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

PACKAGES = ("graphopt", "onnx", "onnx-ir", "onnxscript", "onnxruntime", "onnxruntime-gpu", "numpy")


def machine() -> dict[str, Any]:
    """Platform, processor, CPU count, memory (GiB) and Python version."""
    memory = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpus": os.cpu_count(),
        "memory_gib": memory,
        "python": platform.python_version(),
    }


def versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Installed versions of the packages that decide the numbers (missing ones left out)."""
    found = {}
    for name in PACKAGES + extra:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found
