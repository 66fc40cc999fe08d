"""Convolution geometry shared by the passes that reason about conv windows (Wanda's per-tap
input norms in `prune`, the per-tap input means of `bias-correction`)."""

from __future__ import annotations

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
