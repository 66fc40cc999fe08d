"""tests that calibration streams: peak memory does not grow with the number of samples."""

from __future__ import annotations

import tracemalloc

import pytest

from graphopt.calibration import calibrate, dataset_from_reader
from tests.calibration.nets import CONV_TENSORS, GeneratedDataset, conv_net


def _peak(function) -> int:
    tracemalloc.start()
    try:
        function()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_peak_memory_does_not_grow_with_samples(method: str) -> None:
    model = conv_net()
    names = [n for n in CONV_TENSORS if n != "x"]

    def run(count: int) -> int:
        data = GeneratedDataset(count, (3, 8, 8))
        return _peak(
            lambda: calibrate(model, data, names, method=method, batch_size=16, device="cpu")
        )

    run(16)  # warm up imports and caches
    small, large = run(64), run(512)
    # Activations of all 512 samples would take 512 * 7 tensors * 2 KiB = 7 MiB more.
    assert large < 1.25 * small + 256 * 1024, (small, large)


def test_reader_without_rewind_spills_instead_of_keeping_samples(tmp_path) -> None:
    model = conv_net()

    class Reader:
        def __init__(self, count: int) -> None:
            self.data = GeneratedDataset(count, (3, 8, 8))
            self.index = 0

        def get_next(self):
            if self.index == self.data.count:
                return None
            self.index += 1
            return {"x": self.data.sample(self.index - 1)[None]}

    def run(count: int) -> int:
        def work() -> None:
            data = dataset_from_reader(Reader(count), model.input_specs(), workdir=tmp_path)
            calibrate(model, data, ["c1", "r2"], method="percentile", device="cpu")

        return _peak(work)

    run(16)
    small, large = run(64), run(1024)
    # Keeping 1024 samples in memory would take 1024 * 768 bytes = 768 KiB more.
    assert large < 1.25 * small + 128 * 1024, (small, large)


_CHAIN_CHILD = """
import resource, sys
import numpy as np, onnx_ir as ir
from onnx import TensorProto, helper
from graphopt import runtime
from graphopt.calibration import calibrate
from graphopt.model import Model
from tests.calibration.nets import ArrayDataset

nodes, prev = [], "x"
for i in range(10):
    nodes.append(helper.make_node("Sigmoid", [prev], [f"s{i}"]))
    prev = f"s{i}"
graph = helper.make_graph(
    nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32, 48, 80])],
    [helper.make_tensor_value_info(prev, TensorProto.FLOAT, None)],
)
proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
proto.ir_version = 10
model = Model(ir=ir.from_proto(proto))
data = ArrayDataset({"x": np.random.default_rng(0).standard_normal((32, 32, 48, 80), np.float32)})
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if sys.argv[1] == "forward":
    session = runtime.create_session(model, device="cpu")
    for _ in runtime.run_dataset(session, data, batch_size=32):
        pass
else:
    calibrate(model, data, [f"s{i}" for i in range(10)], batch_size=32, device="cpu")
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_statistics_do_not_keep_every_tensor_of_a_batch_alive() -> None:
    """ONNX Runtime frees each calibrated tensor once its statistics are taken: the peak
    of pass one stays near a plain forward run's, not one batch of every tensor more."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]

    def growth(mode: str) -> int:
        done = subprocess.run(
            [sys.executable, "-c", _CHAIN_CHILD, mode],
            cwd=root, capture_output=True, text=True, check=True, timeout=300,
        )  # fmt: skip
        return int(done.stdout.split()[-1])

    tensor = 32 * 32 * 48 * 80 * 4  # one batch of one tensor: 15 MiB
    forward, statistics = growth("forward"), growth("minmax")
    assert statistics < forward + 4 * tensor, (forward / tensor, statistics / tensor)
