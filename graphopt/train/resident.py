"""Weights and optimizer state that stay on the session's device between training steps.

With the optimizer inside the training graph (graphopt.train.update), a step reads the
weights and the optimizer state and writes their updated values. Fed as numpy arrays, they
cross to the device and back every step: on CUDA that is the whole model over the PCIe bus
twice per step. `ResidentStep` instead binds them with ONNX Runtime's IOBinding as OrtValues
on the session's device, two buffers per tensor: a step reads one and writes the other, and
the next step swaps them (an op may not read and write one buffer). Only the batch and the
hyperparameters go in, and only the loss and any exposed outputs come out.

The same binding runs on the CPU, which is how it is tested here; on CUDA it has not run
(no GPU was available when it was written).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from graphopt.runtime import Session


class ResidentStep:
    """Runs an update graph with its weights and state held as device OrtValues.

    Args:
        session: the session of the update graph.
        carried: input name -> the output holding its next value (weights and state).
    """

    def __init__(self, session: Session, carried: Mapping[str, str]) -> None:
        self.session = session
        self.carried = dict(carried)
        self.current: dict[str, Any] = {}
        self.spare: dict[str, Any] = {}

    def upload(self, values: Mapping[str, np.ndarray]) -> None:
        """Place every carried input's value on the device (and a second buffer for its
        update); `values` holds one array per carried input."""
        missing = [name for name in self.carried if name not in values]
        if missing:
            raise KeyError(f"no value for the carried input(s) {', '.join(missing)}")
        for name in self.carried:
            array = np.asarray(values[name])
            self.current[name] = self.session.to_device(array)
            self.spare[name] = self.session.device_buffer(array.shape, array.dtype)

    def download(self) -> dict[str, np.ndarray]:
        """Every carried input's current value, copied to numpy."""
        return {name: np.array(value.numpy(), copy=True) for name, value in self.current.items()}

    def run(self, feeds: Mapping[str, np.ndarray], fetch: Sequence[str]) -> dict[str, np.ndarray]:
        """One step: `feeds` (the batch, the hyperparameters) from the host, the carried values
        from the device; returns the `fetch` outputs as numpy and keeps the updated values on
        the device as the next step's inputs."""
        binding = self.session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for name, value in self.current.items():
            binding.bind_ortvalue_input(name, value)
        for name in fetch:
            binding.bind_output(name, "cpu")
        for name, out in self.carried.items():
            binding.bind_ortvalue_output(out, self.spare[name])
        self.session.run_bound(binding)
        fetched = binding.get_outputs()[: len(fetch)]
        results = {name: value.numpy() for name, value in zip(fetch, fetched, strict=True)}
        self.current, self.spare = self.spare, self.current
        return results
