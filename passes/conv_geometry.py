"""Convolution geometry shared by the passes that reason about conv windows (Wanda's per-tap
input norms in `prune`, the per-tap input means of `bias-correction`)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def conv_geometry(
    node: ir.Node, spatial: tuple[int, ...], kernel: tuple[int, ...]
) -> tuple[list[int], list[int], list[int], list[int]] | None:
    """(pads before, pads after, strides, dilations) per spatial axis, auto_pad resolved."""
    rank = len(spatial)

    def ints(name: str, default: list[int]) -> list[int] | None:
        attr = node.attributes.get(name)
        if attr is None:
            return default
        if attr.is_ref() or attr.type != ir.AttributeType.INTS:
            return None
        return list(attr.as_ints())

    strides, dilations = ints("strides", [1] * rank), ints("dilations", [1] * rank)
    pads = ints("pads", [0] * 2 * rank)
    auto_pad = node.attributes.get("auto_pad")
    mode = "NOTSET" if auto_pad is None or auto_pad.is_ref() else auto_pad.as_string()
    if strides is None or dilations is None or pads is None or len(pads) != 2 * rank:
        return None
    if mode == "VALID":
        pads = [0] * 2 * rank
    elif mode in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0] * 2 * rank
        for i, (size, k, s, d) in enumerate(zip(spatial, kernel, strides, dilations, strict=True)):
            total = max((-(-size // s) - 1) * s + d * (k - 1) + 1 - size, 0)
            small, large = total // 2, total - total // 2
            pads[i], pads[i + rank] = (small, large) if mode == "SAME_UPPER" else (large, small)
    elif mode != "NOTSET":
        return None
    return pads[:rank], pads[rank:], strides, dilations


def window_means(node: ir.Node, mean: np.ndarray, kernel: tuple[int, ...]) -> np.ndarray | None:
    """[C, *kernel]: for every input channel c and kernel tap, the mean of the zero-padded map
    `mean[c]` ([C, *spatial], e.g. a per-sample mean or mean square) over the output positions
    that tap reads (the im2col column of that weight). None when the Conv's attributes are
    not plain or it has no output position."""
    spatial = tuple(mean.shape[1:])
    geometry = conv_geometry(node, spatial, kernel)
    if geometry is None:
        return None
    begins, ends, strides, dilations = geometry
    padded = np.pad(mean, [(0, 0), *zip(begins, ends, strict=True)])
    outs = [
        (size + b + e - d * (k - 1) - 1) // s + 1
        for size, b, e, d, k, s in zip(
            spatial, begins, ends, dilations, kernel, strides, strict=True
        )
    ]
    if min(outs) < 1:
        return None
    taps = np.empty((mean.shape[0], *kernel))
    for offset in np.ndindex(*kernel):
        window = tuple(
            slice(d * o, d * o + s * (n - 1) + 1, s)
            for n, s, d, o in zip(outs, strides, dilations, offset, strict=True)
        )
        taps[(slice(None), *offset)] = (
            padded[(slice(None), *window)].reshape(mean.shape[0], -1).mean(axis=1)
        )
    return taps
