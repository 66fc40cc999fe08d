"""Every ONNX backend test model, through CleanupPass, on ONNX Runtime.

The corpus is what the installed `onnx` package ships: the node tests (from
`onnx/backend/test/data/node` where the wheel still carries them, otherwise generated in
memory by the package's own `onnx.backend.test.case.node` scripts, which is what writes that
folder) plus the model folders under `onnx/backend/test/data` that hold `model.onnx` and
`test_data_set_*` (simple, pytorch-converted, pytorch-operator).

Each model goes load_model -> CleanupPass -> save_model -> ONNX Runtime (CPU) and must match
its reference outputs with the tolerances of onnx's backend runner (rtol 1e-3, atol 1e-7).
A model ORT cannot run correctly *before* cleanup is skipped, counted by reason; one it runs
correctly before but not after is a failure. A summary line is printed (pytest -s shows it)
and written as JSON to `node_corpus.json` in pytest's base temporary folder.
"""

from __future__ import annotations

import functools
import json
import os
import re
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from graphopt.context import Context
from graphopt.errors import GraphoptError
from graphopt.model import load_model, save_model
from graphopt.passes.cleanup import CleanupPass

DATA_ROOT = Path(onnx.__file__).parent / "backend" / "test" / "data"
DATA_KINDS = ("node", "simple", "pytorch-converted", "pytorch-operator")
RTOL, ATOL = 1e-3, 1e-7


@dataclass
class Case:
    name: str
    model: onnx.ModelProto | None  # in memory (generated node tests) ...
    path: Path | None  # ... or a folder holding model.onnx
    data_sets: list[tuple[list[Any], list[Any]]]
    rtol: float = RTOL
    atol: float = ATOL
    # Feed the inputs as initializers instead, so that constant folding computes everything.
    as_constants: bool = False


@dataclass
class Outcome:
    name: str
    status: str  # "ran", "skipped" or "failed"
    reason: str = ""  # skip category or failure summary
    detail: str = ""
    stats: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------- the corpus


@functools.cache
def _generated_node_cases() -> tuple[Case, ...]:
    """The node tests as `onnx.backend.test.case.node` makes them (one call per process:
    the collector keeps global state)."""
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        cases = collect_testcases()
    return tuple(
        Case(
            f"node/{c.name}",
            c.model,
            None,
            [(list(i), list(o)) for i, o in c.data_sets or []],
            c.rtol,
            c.atol,
        )
        for c in cases
        if c.model is not None
    )


def _folder_cases(kind: str) -> Iterator[Case]:
    root = DATA_ROOT / kind
    if not root.is_dir():
        return
    for folder in sorted(p for p in root.iterdir() if (p / "model.onnx").is_file()):
        yield Case(f"{kind}/{folder.name}", None, folder, [])


def corpus() -> list[Case]:
    """Every model as shipped, plus each node test once more with its inputs as weights."""
    cases = []
    for kind in DATA_KINDS:
        cases.extend(_folder_cases(kind))
    if not (DATA_ROOT / "node").is_dir():
        cases.extend(_generated_node_cases())
    node_cases = [c for c in cases if c.name.startswith("node/")]
    cases.extend(
        replace(c, name=c.name.replace("node/", "node-constant/", 1), as_constants=True)
        for c in node_cases
    )
    return cases


def _inputs_as_initializers(model: onnx.ModelProto, inputs: list[Any]) -> onnx.ModelProto | str:
    """The model with its fed inputs turned into initializers, or why that is not possible."""
    if model.ir_version < 4:
        return "IR version 3 (initializers are graph inputs)"
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph_inputs = list(model.graph.input)
    if len(inputs) != len(graph_inputs):
        return "inputs and graph inputs differ in number"
    for value_info, value in zip(graph_inputs, inputs, strict=True):
        if value_info.type.WhichOneof("value") != "tensor_type" or value is None:
            return "an input is not a tensor"
        if isinstance(value, onnx.TensorProto):
            tensor = onnx.TensorProto.FromString(value.SerializeToString())
            tensor.name = value_info.name
        else:
            array = np.asarray(value)
            if array.dtype == object or array.dtype.kind in "SU":
                return "an input is a string tensor"
            tensor = numpy_helper.from_array(array, value_info.name)
        if tensor.data_type != value_info.type.tensor_type.elem_type:
            return "an input's data differs in type from the graph input"
        model.graph.initializer.append(tensor)
    del model.graph.input[:]
    return model


def _read_pb(path: Path, type_proto: onnx.TypeProto) -> Any:
    """A test_data_set_*/*.pb file, read as the value kind the graph declares."""
    data = path.read_bytes()
    kind = type_proto.WhichOneof("value")
    if kind == "sequence_type":
        proto = onnx.SequenceProto()
        proto.ParseFromString(data)
        return numpy_helper.to_list(proto)
    if kind == "optional_type":
        proto = onnx.OptionalProto()
        proto.ParseFromString(data)
        return numpy_helper.to_optional(proto)
    if kind == "map_type":
        proto = onnx.MapProto()
        proto.ParseFromString(data)
        return numpy_helper.to_dict(proto)
    proto = onnx.TensorProto()
    proto.ParseFromString(data)
    return numpy_helper.to_array(proto)


def _folder_data_sets(folder: Path, model: onnx.ModelProto) -> list[tuple[list[Any], list[Any]]]:
    initializers = {t.name for t in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in initializers]
    sets = []
    for data_dir in sorted(folder.glob("test_data_set_*")):
        n_in = len(list(data_dir.glob("input_*.pb")))
        n_out = len(list(data_dir.glob("output_*.pb")))
        ins = [_read_pb(data_dir / f"input_{i}.pb", inputs[i].type) for i in range(n_in)]
        outs = [
            _read_pb(data_dir / f"output_{i}.pb", model.graph.output[i].type) for i in range(n_out)
        ]
        sets.append((ins, outs))
    return sets


# ---------------------------------------------------------------------------- comparing


def _as_array(value: Any) -> Any:
    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value)
    if isinstance(value, np.generic):  # ORT takes arrays, not numpy scalars
        return np.asarray(value)
    return value


def _mismatch(ref: Any, out: Any, rtol: float, atol: float, where: str) -> str | None:
    """Why `out` differs from `ref` (None when it matches), like onnx's backend runner."""
    ref = _as_array(ref)
    if ref is None or out is None:
        return None if ref is None and out is None else f"{where}: one side is empty"
    if isinstance(ref, dict):
        if not isinstance(out, dict) or set(ref) != set(out):
            return f"{where}: map keys differ"
        for key in ref:
            if (why := _mismatch(ref[key], out[key], rtol, atol, f"{where}[{key!r}]")) is not None:
                return why
        return None
    if isinstance(ref, list | tuple):
        if not isinstance(out, list | tuple) or len(out) != len(ref):
            return f"{where}: sequence of {len(ref)} expected, got {type(out).__name__}"
        for j, (r, o) in enumerate(zip(ref, out, strict=True)):
            if (why := _mismatch(r, o, rtol, atol, f"{where}[{j}]")) is not None:
                return why
        return None
    ref, out = np.asarray(ref), np.asarray(out)
    if out.dtype == np.uint8 and ref.dtype.kind == "V" and ref.dtype.itemsize == 1:
        out = out.view(ref.dtype)  # ORT hands float8 outputs back as their bytes
    if ref.shape != out.shape:
        return f"{where}: shape {out.shape}, expected {ref.shape}"
    if ref.dtype == object or ref.dtype.kind in "SU":
        return (
            None if np.array_equal(ref.astype(str), out.astype(str)) else f"{where}: strings differ"
        )
    if ref.dtype != out.dtype:
        return f"{where}: dtype {out.dtype}, expected {ref.dtype}"
    if ref.dtype.name == "bfloat16":
        rtol = max(rtol, 2**-6)
    if ref.dtype.kind in "biu":
        return None if np.array_equal(ref, out) else f"{where}: values differ"
    r, o = ref.astype(np.float64), out.astype(np.float64)
    close = np.isclose(o, r, rtol=rtol, atol=atol, equal_nan=True)
    if close.all():
        return None
    worst = float(np.nanmax(np.abs(np.where(close, 0.0, o - r))))
    return f"{where}: {int((~close).sum())} of {close.size} values differ (max abs {worst:.3g})"


# ---------------------------------------------------------------------------- running


def _first_line(exc: BaseException) -> str:
    text = re.sub(r"Load model from \S+ failed:", "", str(exc)).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:400]


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])


def _run_all(
    session: ort.InferenceSession, data_sets: list[tuple[list[Any], list[Any]]]
) -> list[list[Any]]:
    names = [i.name for i in session.get_inputs()]
    results = []
    for inputs, _ in data_sets:
        feed = {
            name: _as_array(value)
            for name, value in zip(names, inputs, strict=False)
            if value is not None
        }
        results.append(session.run(None, feed))
    return results


def _compare_all(case: Case, results: list[list[Any]]) -> str | None:
    for (_, expected), got in zip(case.data_sets, results, strict=True):
        if len(got) != len(expected):
            return f"{len(got)} outputs, expected {len(expected)}"
        for i, (ref, out) in enumerate(zip(expected, got, strict=True)):
            if (why := _mismatch(ref, out, case.rtol, case.atol, f"output {i}")) is not None:
                return why
    return None


def _io(model: onnx.ModelProto) -> list[tuple[str, bytes]]:
    initializers = {t.name for t in model.graph.initializer}
    values = [v for v in model.graph.input if v.name not in initializers] + list(model.graph.output)
    return [(v.name, v.type.SerializeToString(deterministic=True)) for v in values]


def check_case(case: Case, workdir: Path) -> Outcome:
    """Run one model before and after cleanup; the outcome says which of the three it was."""
    workdir.mkdir(parents=True, exist_ok=True)
    if case.path is not None:
        source = case.path / "model.onnx"
        original = onnx.load(os.fspath(source))
        try:
            case.data_sets = _folder_data_sets(case.path, original)
        except Exception as exc:  # malformed or exotic data files
            return Outcome(case.name, "skipped", "unreadable-data", _first_line(exc))
    else:
        assert case.model is not None
        original = case.model
        source = workdir / "model.onnx"
        onnx.save(original, os.fspath(source))
    if not case.data_sets:
        return Outcome(case.name, "skipped", "no-data")
    if case.as_constants:
        inputs, outputs = case.data_sets[0]
        folded = _inputs_as_initializers(original, inputs)
        if isinstance(folded, str):
            return Outcome(case.name, "skipped", "inputs-not-foldable", folded)
        original = folded
        source = workdir / "model.onnx"
        onnx.save(original, os.fspath(source))
        case = replace(case, path=None, data_sets=[([], outputs)])

    # Before: does ONNX Runtime run the untouched file correctly?
    try:
        session = _session(source)
    except Exception as exc:
        return Outcome(case.name, "skipped", "ort-session-fails", _first_line(exc))
    try:
        before = _run_all(session, case.data_sets)
    except Exception as exc:
        return Outcome(case.name, "skipped", "ort-run-fails", _first_line(exc))
    if (why := _compare_all(case, before)) is not None:
        return Outcome(case.name, "skipped", "ort-mismatch", why)

    # After: everything that goes wrong from here on is cleanup's fault.
    try:
        model = load_model(source)
    except GraphoptError as exc:
        return Outcome(case.name, "failed", "load_model refused a model ORT runs", exc.paragraph())
    cleanup = CleanupPass()
    ctx = Context(workdir=workdir)
    try:
        result = cleanup.run(model, ctx)
        again = cleanup.run(model, ctx)
        saved = save_model(model, workdir / "out" / "model.onnx")
    except Exception as exc:
        return Outcome(
            case.name, "failed", "cleanup raised", f"{type(exc).__name__}: {_first_line(exc)}"
        )
    if again.modified:
        return Outcome(case.name, "failed", "second run reported modified=True", str(again.stats))
    if _io(onnx.load(os.fspath(saved.path), load_external_data=False)) != _io(original):
        return Outcome(case.name, "failed", "graph inputs/outputs changed")
    try:
        after = _run_all(_session(saved.path), case.data_sets)
    except Exception as exc:
        return Outcome(case.name, "failed", "ORT fails on the cleaned model", _first_line(exc))
    if (why := _compare_all(case, after)) is not None:
        return Outcome(case.name, "failed", "outputs changed", why)
    return Outcome(
        case.name, "ran", "modified" if result.modified else "unchanged", stats=result.stats
    )


# ---------------------------------------------------------------------------- the test


def test_backend_corpus(tmp_path_factory: pytest.TempPathFactory) -> None:
    start = time.perf_counter()
    root = tmp_path_factory.mktemp("corpus")
    outcomes = [check_case(case, root / f"{i:05d}") for i, case in enumerate(corpus())]
    seconds = time.perf_counter() - start

    ran = [o for o in outcomes if o.status == "ran"]
    skipped = Counter(o.reason for o in outcomes if o.status == "skipped")
    failed = [o for o in outcomes if o.status == "failed"]
    totals: Counter[str] = Counter()
    for outcome in ran:
        totals.update({k: v for k, v in outcome.stats.items() if isinstance(v, int)})
    summary = {
        "total": len(outcomes),
        "ran": len(ran),
        "modified_by_cleanup": sum(1 for o in ran if o.reason == "modified"),
        "skipped": dict(sorted(skipped.items())),
        "failed": len(failed),
        "seconds": round(seconds, 1),
        "cleanup_totals": dict(sorted(totals.items())),
        "failures": [{"name": o.name, "reason": o.reason, "detail": o.detail} for o in failed],
        "skips": [
            {"name": o.name, "reason": o.reason, "detail": o.detail}
            for o in outcomes
            if o.status == "skipped"
        ],
    }
    report = tmp_path_factory.getbasetemp() / "node_corpus.json"
    report.write_text(json.dumps(summary, indent=2))
    print(
        f"\nbackend corpus: {len(outcomes)} models, ran {len(ran)} "
        f"({summary['modified_by_cleanup']} changed by cleanup), skipped {sum(skipped.values())} "
        f"{dict(sorted(skipped.items()))}, failed {len(failed)}, {seconds:.0f} s; details in {report}"
    )
    assert len(outcomes) > 1000, "the onnx package's backend tests were not found"
    assert not failed, "\n".join(f"{o.name}: {o.reason}: {o.detail}" for o in failed[:50])
