"""Loading a function the user named explicitly on the command line (`module:function`).

Only the command line may name code: recipe files and model files never cause an import.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from graphopt.errors import GraphoptError


def load_callable(spec: str, *, what: str) -> Callable[..., Any]:
    """Import `module:function` or `path/to/file.py:function` and return the callable.

    Args:
        spec: where the function is.
        what: what the function is for, for error messages (e.g. "metric").

    Raises:
        GraphoptError: the spec is malformed, the module cannot be imported, or the
            attribute is missing or not callable.
    """
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise GraphoptError(
            f"The {what} '{spec}' is not of the form module:function.",
            hint="Write e.g. my_package.metrics:top5 or ./my_metrics.py:top5.",
        )
    try:
        if module_name.endswith(".py"):
            module = _import_file(Path(module_name))
        else:
            module = importlib.import_module(module_name)
    except GraphoptError:
        raise
    except Exception as exc:  # any import-time error of the user's module
        raise GraphoptError(
            f"Could not import '{module_name}' for the {what} '{spec}': "
            f"{type(exc).__name__}: {exc}.",
            hint="Check that the module is on PYTHONPATH (or give a .py file path).",
        ) from None
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise GraphoptError(
            f"'{module_name}' has no callable '{attr}' (wanted for the {what} '{spec}')."
        )
    return fn


def _import_file(path: Path) -> Any:
    if not path.is_file():
        raise GraphoptError(f"The Python file '{path}' does not exist.")
    name = f"graphopt_user_{abs(hash(path.resolve()))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise GraphoptError(f"'{path}' cannot be imported as a Python module.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
