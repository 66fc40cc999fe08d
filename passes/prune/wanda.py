"""Wanda's activation norms (Sun et al., 2023): the importance of weight W[j → o] is
|W[j → o]| · ‖X_j‖₂, where X_j is everything input feature j of the layer takes on the
calibration data.

One streamed ONNX Runtime run gives every norm at once: on a copy of the model, each
activation a pruned layer reads gets a `Mul(x, x)`, and `channel_stats.collect` averages that
square per channel (and, for Conv inputs, per position over the samples). We use
`sqrt(E[x_j²])` — ‖X_j‖₂ divided by the square root of the row count, a constant per layer
that changes no ranking inside a layer. A weight read by several ops (a shared initializer)
takes the sum of their E[x²]: Σ_r ‖X_r,j·W_j‖² = W_j²·Σ_r ‖X_r,j‖².

Conv, the im2col-equivalent norm. Unfolded (im2col), Conv `[K, C, R, S]` is a MatMul whose
input row for weight column (c, r, s) holds the zero-padded input channel c at every position
that tap (r, s) reads: `x_pad[n, c, oh·stride + r·dilation, ow·stride + s·dilation]` over all
samples n and output positions (oh, ow). Its squared norm is therefore the sum of the mean
squared input sample `E_n[x²][c]` (padded with zeros) over the strided window of tap (r, s).
This is computed exactly, per tap, borders and padding included, from `sample_mean` of the
squared input; so a 3x3 tap at the border of a padded input sees fewer non-zero rows than the
centre tap. For a grouped Conv, output k of group g reads input channel g·C/G + c. When the
input's spatial size changes between batches there is no mean sample; then every tap takes
the channel's plain mean E[x_c²] (right away from the borders), and the layer is listed
under the stats key ``wanda_approximate``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from graphopt.context import Context
from graphopt.model import Model
from graphopt.passes import channel_stats
from graphopt.passes.conv_geometry import window_means
from graphopt.passes.prune.targets import Reader, Target
from graphopt.passes.quantize.graphutil import NameSource, plain_attr


def importance(
    model: Model, ctx: Context, targets: Sequence[Target], samples: int
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Per target, an array broadcastable to its weight (initializer layout) holding
    sqrt(Σ_readers E[x²]) for each weight's input position; and the approximate layers."""
    probe = model.copy()
    values = {v.name: v for v in probe.graph.inputs}
    values.update({v.name: v for node in probe.graph for v in node.outputs})
    names = NameSource(probe.graph)
    squares: dict[tuple[str, int], str] = {}
    requests: list[tuple[str, int]] = []
    for target in targets:
        for reader in target.readers:
            act = reader.activation
            assert act is not None and act.name
            key = (act.name, reader.act_axis)
            if key not in squares:
                squares[key] = channel_stats.add_square(
                    probe.graph, values[act.name], names, "prune"
                )
                requests.append((squares[key], reader.act_axis))
    measured = channel_stats.collect(
        probe,
        ctx,
        requests,
        samples=samples,
        sample_means=any(r.node.op_type == "Conv" for t in targets for r in t.readers),
    )
    scales: dict[str, np.ndarray] = {}
    approximate: list[str] = []
    for target in targets:
        total: np.ndarray | None = None
        for reader in target.readers:
            act = reader.activation
            assert act is not None and act.name
            stats = measured[(squares[(act.name, reader.act_axis)], reader.act_axis)]
            part, exact = _reader_energy(reader, target, stats)
            if not exact:
                approximate.append(target.name)
            total = part if total is None else total + part
        assert total is not None
        scales[target.name] = np.sqrt(np.maximum(total, 0.0)).astype(np.float32)
    return scales, sorted(set(approximate))


def _reader_energy(
    reader: Reader, target: Target, stats: channel_stats.ChannelStats
) -> tuple[np.ndarray, bool]:
    """E[x²] per weight input position, in the op's view, transposed to the initializer's."""
    view_shape = [target.shape[p] for p in reader.perm]
    rank = len(view_shape)
    op = reader.node.op_type
    exact = True
    if op == "Conv":
        energy = _conv_energy(reader.node, view_shape, stats)
        if energy is None:
            exact = False
            energy = _conv_channel_energy(reader.node, view_shape, stats.mean)
    else:
        reduction = (
            rank - 2 if op == "MatMul" else (1 if plain_attr(reader.node, "transB", 0) else 0)
        )
        shape = [1] * rank
        shape[reduction] = view_shape[reduction]
        energy = np.asarray(stats.mean, np.float64).reshape(shape)
    inverse = np.argsort(reader.perm)
    return np.transpose(energy, inverse), exact


def _conv_channel_energy(node: ir.Node, view_shape: list[int], channel: np.ndarray) -> np.ndarray:
    """E[x_c²] for every weight position, the same for all taps (the approximation)."""
    k, per_group = view_shape[0], view_shape[1]
    groups = int(plain_attr(node, "group", 1) or 1)
    spatial = view_shape[2:]
    by_group = np.asarray(channel, np.float64).reshape(groups, per_group)
    group_of = np.arange(k) // max(k // groups, 1)
    energy = by_group[group_of].reshape(k, per_group, *([1] * len(spatial)))
    return np.broadcast_to(energy, view_shape)


def _conv_energy(
    node: ir.Node, view_shape: list[int], stats: channel_stats.ChannelStats
) -> np.ndarray | None:
    """E over im2col rows of x² for every weight position [K, C/G, R, S, ...], or None."""
    mean = stats.sample_mean  # E_n[x²], [C, H, W, ...]
    kernel = tuple(view_shape[2:])
    if mean is None or mean.ndim != len(view_shape) - 1:
        return None
    taps = window_means(node, mean, kernel)
    if taps is None:
        return None
    k, per_group = view_shape[0], view_shape[1]
    groups = int(plain_attr(node, "group", 1) or 1)
    if groups * per_group != mean.shape[0]:
        return None
    group_of = np.arange(k) // max(k // groups, 1)
    return taps.reshape(groups, per_group, *kernel)[group_of]
