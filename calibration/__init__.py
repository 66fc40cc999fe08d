"""Streaming statistics collectors and range calibrators (used by the quantize pass).

    ranges = calibrate(model, dataset, ["conv1_out", "relu2_out"], method="entropy")
    scale = ranges["conv1_out"].amax() / 127

Four methods: `minmax`, `percentile`, `entropy` (TensorRT's KL search) and `mse`; the last
two search thresholds for a number grid, int8 or fp8 (`precision`). Statistics
are reduced inside the graph where possible and streamed, so memory does not grow with the
number of samples; the histogram methods take one pass over histograms whose bins are
powers of two wide (they widen exactly as larger values arrive), so ranges do not depend
on the batch size. Data comes as a graphopt `Dataset` or as an ONNX
Runtime `CalibrationDataReader` (given to `calibrate` as it is, or wrapped once with
`dataset_from_reader`); a `CalibrationCache` serves ranges computed before without running
ONNX Runtime.

Modules (everything but this file's names is internal):

- `ranges`: `TensorRange`, `Method`, `CalibrationError`.
- `calibrate`: the pass (minmax's reductions, or the histograms).
- `reduce`: the tensors checked, and ReduceMin/ReduceMax in the graph (minmax, and the
  element counts the histogram pass sizes its batches from).
- `histogram`: the one-pass histograms and the percentile, entropy and mse thresholds.
- `datasets`: the first n samples of a dataset, and ONNX Runtime's data readers.
- `cache`: the cache and its keys (model fingerprints, data hashes).
"""

from graphopt.calibration.cache import CalibrationCache
from graphopt.calibration.calibrate import DEFAULT_BATCH_BYTES, calibrate
from graphopt.calibration.datasets import CalibrationDataReader, dataset_from_reader
from graphopt.calibration.ranges import METHODS, CalibrationError, Method, TensorRange

__all__ = [
    "DEFAULT_BATCH_BYTES",
    "METHODS",
    "CalibrationCache",
    "CalibrationDataReader",
    "CalibrationError",
    "Method",
    "TensorRange",
    "calibrate",
    "dataset_from_reader",
]
