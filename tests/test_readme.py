"""The README's two commands: the sample run works as written, and CI runs the test command."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def readme_command(prefix: str) -> str:
    """The README line (an indented command) that starts with `prefix`."""
    for line in README.splitlines():
        if line.strip().startswith(prefix):
            return line.strip()
    raise AssertionError(f"the README has no command starting with {prefix!r}")


def test_the_readme_sample_command_runs_and_reports(tmp_path):
    line = readme_command("pip install -e . && graphopt optimize")
    install, _, command = line.partition(" && ")
    assert install == "pip install -e ."
    args = shlex.split(command)
    assert args[0] == "graphopt"
    out = tmp_path / "out"
    args[args.index("-o") + 1] = str(out)
    result = subprocess.run(
        [sys.executable, "-m", "graphopt", *args[1:]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "per-pass report" in result.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] and report["steps"][0]["fidelity"]["reference_accuracy"] > 0.9
    assert (out / "model.onnx").exists()


def test_ci_runs_the_readme_install_and_test_commands():
    line = readme_command('pip install -e ".[test]"')
    install, _, test = line.partition(" && ")
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"pip install .*-e \"\.\[test\]\"", ci), "CI must install as the README says"
    assert "venv" in ci
    assert test == "pytest" and re.search(r"^python -m pytest", ci, re.M)
