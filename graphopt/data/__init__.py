"""Data that feeds a model: an .npz file, a folder of arrays or images, or random arrays.

`open_dataset` checks the data against the model's inputs before any work starts (names,
ranks, fixed dimensions, dtypes, label count) and returns a `Dataset` that streams `Batch`es.

Conventions:

- The leading axis of every array counts samples, and is the model's batch axis: an input
  declared ``N x 3 x 224 x 224`` is fed from an array of shape ``S x 3 x 224 x 224``.
- Inside a folder, a file may also hold a single sample without the leading axis
  (``3 x 224 x 224``); it is read as one sample.
- When the model's batch axis is fixed (``1 x 3 x 224 x 224``), batches always have exactly
  that size, whatever batch size the caller asks for. The number of samples must then be a
  multiple of it (always true for 1); otherwise `open_dataset` raises `DataError` rather
  than dropping or padding samples, since both would silently change calibration statistics
  and accuracy numbers.
- Samples whose non-leading dimensions differ (variable sequence length, images kept at their
  own size) are never stacked together: a change of shape closes the current batch early.

Memory: nothing holds the whole dataset. Arrays inside an .npz are read as streams, one batch
of rows at a time (compressed or not); a .npy file is memory-mapped. Two exceptions, both
bounded by one array: an array stored in Fortran order inside an .npz is read whole (its rows
are not contiguous), and so is a .npy file that cannot be memory-mapped.

All arrays are read with ``allow_pickle=False``: an array of Python objects is refused.

Modules (everything but this file's names is internal):

- `base`: the public `Batch` and `Dataset` types.
- `rules`: ``--shape`` and what the data for each model input must look like.
- `checks`: data checked against those rules, and the shared error messages.
- `stream`: columns, chunks and the dataset that batches them.
- `npyformat`: .npy headers and rows read from a stream (the one use of numpy's private API).
- `npy`, `npz`, `folders`, `images`, `random`: one kind of source each.
- `preprocess`: how an image file becomes one sample.
- `source`: `open_dataset`, which picks the source.
"""

from graphopt.data.base import Batch, Dataset
from graphopt.data.images import IMAGE_SUFFIXES
from graphopt.data.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ChannelOrder,
    ImagePreprocess,
    Layout,
    Resample,
    Size,
)
from graphopt.data.random import RANDOM_INT_HIGH
from graphopt.data.rules import parse_shapes
from graphopt.data.source import RANDOM_SOURCE, open_dataset

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_SUFFIXES",
    "RANDOM_INT_HIGH",
    "RANDOM_SOURCE",
    "Batch",
    "ChannelOrder",
    "Dataset",
    "ImagePreprocess",
    "Layout",
    "Resample",
    "Size",
    "open_dataset",
    "parse_shapes",
]
