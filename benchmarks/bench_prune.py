"""Benchmark: 2:4-prune a billion weights, and the speed per weight against Polygraphy.

1. Generates (once, into a cache folder) a synthetic model x -> (MatMul -> Relu) x 15 with
   8192x8192 float32 weights: 1,006,632,960 parameters, 4 GB in one external data file.
   In a fresh subprocess: `graphopt.model.load_model` (weights stay memory-mapped), then the
   `prune` pass with pattern=2:4 (magnitude, every layer), which also checks every pruned
   weight against the 2:4 rule (`check_2_4`) and packs the masks. Reports load and prune
   seconds, nanoseconds per weight, peak RSS and the 2:4 compliance it measured.
2. The peer: Polygraphy's 2:4 pruner (`polygraphy.tools.sparse.SparsityPruner`, the code
   behind `polygraphy surgeon prune`; pip install polygraphy) on a smaller model,
   x -> MatMul [2048 x 2560] (5.2 M weights), against graphopt's pass on the same model, both
   in one process with the weights in memory. Each output is checked with `check_2_4` along
   the MatMul's reduction axis (K, axis 0).

Prints a table and writes `report.json` into the folder. Not run by CI. Needs about 4 GB of
free disk and 6 GB of memory.

    python benchmarks/bench_prune.py [--dir .cache/bench_prune] [--layers 15] [--dim 8192]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, os.fspath(Path(__file__).resolve().parent))
import machine_info  # noqa: E402

DEFAULT_DIR = Path(".cache/bench_prune")
MODEL_NAME = "model.onnx"
DATA_NAME = "weights.bin"
ROWS_PER_CHUNK = 512
PEER_SHAPE = (2048, 2560)


def generate(folder: Path, layers: int, dim: int, seed: int = 0) -> Path:
    """Write the big model tensor by tensor, chunk by chunk (never more than a chunk in RAM)."""
    import onnx
    from onnx import TensorProto, helper

    path = folder / MODEL_NAME
    data_path = folder / DATA_NAME
    if path.exists() and data_path.exists() and data_path.stat().st_size == layers * dim * dim * 4:
        return path
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    initializers, nodes = [], []
    offset, current = 0, "x"
    with open(data_path, "wb") as data:
        for layer in range(layers):
            for _ in range(0, dim, ROWS_PER_CHUNK):
                data.write(rng.standard_normal((ROWS_PER_CHUNK, dim), dtype=np.float32).tobytes())
            tensor = TensorProto(name=f"w{layer}", data_type=TensorProto.FLOAT, dims=[dim, dim])
            tensor.data_location = TensorProto.EXTERNAL
            length = dim * dim * 4
            for key, value in (("location", DATA_NAME), ("offset", offset), ("length", length)):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, str(value)
            initializers.append(tensor)
            offset += length
            out = "y" if layer == layers - 1 else f"r{layer}"
            nodes += [
                helper.make_node(
                    "MatMul", [current, f"w{layer}"], [f"h{layer}"], name=f"mm{layer}"
                ),
                helper.make_node("Relu", [f"h{layer}"], [out]),
            ]
            current = out
    graph = helper.make_graph(
        nodes,
        "bench_prune",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", dim])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, path)
    return path


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _prune_options() -> Any:
    from graphopt.passes.prune import PruneOptions

    return PruneOptions(pattern="2:4", min_params=0)


def run_big(path: Path) -> dict[str, Any]:
    """In this (fresh) process: load the big model and 2:4-prune every layer."""
    from graphopt.context import Context
    from graphopt.model import load_model
    from graphopt.passes.prune import PrunePass

    start = time.perf_counter()
    model = load_model(path)
    loaded = time.perf_counter()
    result = PrunePass(_prune_options()).run(model, Context(workdir=path.parent, device="cpu"))
    done = time.perf_counter()
    stats = result.stats
    return {
        "params": stats["params_eligible"],
        "load_s": loaded - start,
        "prune_s": done - loaded,
        "ns_per_weight": (done - loaded) / stats["params_eligible"] * 1e9,
        "peak_rss_mib": _rss_mib(),
        "compliance_2_4": stats["compliance_2_4"],
        "sparsity": stats["sparsity_eligible"],
        "mask_mib": sum(m.nbytes for m in model.metadata["masks"].values()) / 2**20,
    }


def _peer_model() -> Any:
    from onnx import TensorProto, helper, numpy_helper

    k, n = PEER_SHAPE
    w = np.random.default_rng(1).standard_normal((k, n), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "peer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def run_peer() -> dict[str, Any]:
    """Polygraphy's pruner and graphopt's pass on the same 5 M-weight MatMul."""
    import onnx_ir as ir
    from onnx import numpy_helper
    from polygraphy.tools.sparse import SparsityPruner

    from graphopt.context import Context
    from graphopt.model import Model
    from graphopt.passes.prune import PrunePass
    from graphopt.passes.prune.check import check_2_4

    proto = _peer_model()
    size = PEER_SHAPE[0] * PEER_SHAPE[1]
    rows = {}
    start = time.perf_counter()
    pruned = SparsityPruner(proto).prune()
    seconds = time.perf_counter() - start
    weight = next(numpy_helper.to_array(t) for t in pruned.graph.initializer if t.name == "w")
    check = check_2_4(weight, 0)
    rows["polygraphy"] = {
        "params": size,
        "prune_s": seconds,
        "ns_per_weight": seconds / size * 1e9,
        "compliance_2_4": check.fraction,
        "sparsity": float(np.mean(weight == 0)),
    }
    model = Model(ir=ir.from_proto(proto))
    start = time.perf_counter()
    result = PrunePass(_prune_options()).run(model, Context(workdir=Path("."), device="cpu"))
    seconds = time.perf_counter() - start
    weight = model.graph.initializers["w"].const_value.numpy()
    rows["graphopt"] = {
        "params": size,
        "prune_s": seconds,
        "ns_per_weight": seconds / size * 1e9,
        "compliance_2_4": check_2_4(weight, 0).fraction,
        "sparsity": result.stats["sparsity_eligible"],
    }
    return rows


def _subprocess(mode: str, folder: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, "--run", mode, "--dir", os.fspath(folder)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--layers", type=int, default=15)
    parser.add_argument("--dim", type=int, default=8192)
    parser.add_argument("--run", choices=["big", "peer"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run == "big":
        print(json.dumps(run_big(args.dir / MODEL_NAME)))
        return
    if args.run == "peer":
        print(json.dumps(run_peer()))
        return
    start = time.perf_counter()
    generate(args.dir, args.layers, args.dim)
    print(f"model ready in {time.perf_counter() - start:.1f} s: {args.dir / MODEL_NAME}")
    big = _subprocess("big", args.dir)
    peer = _subprocess("peer", args.dir)
    report = {
        "machine": machine_info.machine(),
        "packages": machine_info.versions(("polygraphy",)),
        "big": big,
    }
    report["peer"] = peer
    print(f"\n2:4 magnitude prune of {big['params']:,} weights ({args.layers} x {args.dim}^2)")
    print(f"  load {big['load_s']:.2f} s, prune + check + masks {big['prune_s']:.2f} s "
          f"({big['ns_per_weight']:.1f} ns/weight), peak RSS {big['peak_rss_mib']:,.0f} MiB, "
          f"masks {big['mask_mib']:.0f} MiB, 2:4 compliance {big['compliance_2_4']:.2%}")  # fmt: skip
    print(f"\nSame-run peer, MatMul {PEER_SHAPE[0]}x{PEER_SHAPE[1]}:")
    print(f"{'tool':<12}{'weights':>12}{'time s':>10}{'ns/weight':>12}{'2:4 pass':>10}")
    for tool, row in peer.items():
        print(f"{tool:<12}{row['params']:>12,}{row['prune_s']:>10.3f}{row['ns_per_weight']:>12.1f}"
              f"{row['compliance_2_4']:>10.2%}")  # fmt: skip
    ratio = peer["polygraphy"]["ns_per_weight"] / peer["graphopt"]["ns_per_weight"]
    report["polygraphy_over_graphopt_per_weight"] = ratio
    print(f"polygraphy / graphopt per weight: {ratio:.0f}x")
    (args.dir / "report.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
