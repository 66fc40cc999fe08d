"""A placement plan: which tensors get a QuantizeLinear -> DequantizeLinear pair, which of
their readers switch to the dequantized value, which tensors share one scale, and which
compute ops get int8 (or fp8) weights. Profiles (`tensorrt`, `ortcpu`) make plans; `insert` applies
them; nothing here touches the graph."""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_ir as ir

from graphopt.passes.quantize.qparams import Precision
from graphopt.passes.quantize.sites import Site

#: Readers of a quantized tensor: a set of (node, input index), or ALL of them.
ALL = None
Readers = set[tuple[ir.Node, int]] | None


@dataclass
class Plan:
    """Where Q/DQ go.

    Attributes:
        sites: compute ops whose weights are quantized (and whose biases, with
            `quantize_bias`).
        readers: tensor name -> the readers switched to its dequantized value (ALL: every
            reader, as ONNX Runtime's fusions need).
        symmetric: int8 with zero point 0 (TensorRT); otherwise uint8 with a zero point.
        precision: "int8", or "fp8" (float8 e4m3fn, symmetric, zero point 0, scale
            amax / 448) for activations and weights alike.
        quantize_bias: store Conv/Gemm biases as int32 (ONNX Runtime's QLinearConv, QGemm).
        unsigned_weights: store int8 weights as uint8 with zero point 128 (the same values;
            ONNX Runtime then runs U8U8 kernels).
        weight_limit: int8 weights are rounded into [-weight_limit, weight_limit] (127; 63
            for 7-bit weights that ONNX Runtime's U8S8 kernels sum without saturating).
        full_range: ops whose int8 weights keep [-127, 127] whatever `weight_limit` says
            (depthwise convolutions, which ONNX Runtime accumulates in int32).
        float_readers: nodes that keep reading the float value of a quantized tensor even
            when `readers` is ALL (ops the user excluded).
        values: tensor name -> its value.
        forbidden: tensors that must stay float (calibration could not range them); `add`
            refuses them.
    """

    sites: list[Site] = field(default_factory=list)
    readers: dict[str, Readers] = field(default_factory=dict)
    symmetric: bool = True
    precision: Precision = "int8"
    quantize_bias: bool = False
    unsigned_weights: bool = False
    weight_limit: int = 127
    full_range: set[ir.Node] = field(default_factory=set)
    float_readers: set[ir.Node] = field(default_factory=set)
    values: dict[str, ir.Value] = field(default_factory=dict)
    forbidden: frozenset[str] = frozenset()
    _parent: dict[str, str] = field(default_factory=dict)
    _extra_ranges: dict[str, set[str]] = field(default_factory=dict)

    # -------------------------------------------------------------- tensors and readers

    def add(self, value: ir.Value, reader: tuple[ir.Node, int] | None = None) -> bool:
        """Quantize `value` for `reader` (None: for every reader); True if anything is new."""
        name = value.name
        assert name is not None
        if name in self.forbidden:
            return False
        self.values[name] = value
        if name not in self.readers:
            self.readers[name] = ALL if reader is None else {reader}
            self._parent.setdefault(name, name)
            return True
        current = self.readers[name]
        if current is ALL:
            return False
        if reader is None:
            self.readers[name] = ALL
            return True
        if reader in current:
            return False
        current.add(reader)
        return True

    def __contains__(self, name: object) -> bool:
        return name in self.readers

    @property
    def tensors(self) -> list[str]:
        return list(self.readers)

    # -------------------------------------------------------------- shared scales

    def group(self, name: str) -> str:
        """The representative of the tensors sharing `name`'s quantization parameters."""
        root = name
        while self._parent.setdefault(root, root) != root:
            root = self._parent[root]
        while name != root:  # path compression
            following = self._parent[name]
            self._parent[name] = root
            name = following
        return root

    def share(self, a: str, b: str) -> bool:
        """Give `a` and `b` (both planned) the same quantization parameters; True if they
        did not share them before."""
        root_a, root_b = self.group(a), self.group(b)
        if root_a == root_b:
            return False
        self._parent[root_b] = root_a
        return True

    def cover(self, name: str, extra: str) -> None:
        """Calibrate `extra` too and widen `name`'s group range to include it (Concat)."""
        self._extra_ranges.setdefault(name, set()).add(extra)

    def groups(self) -> dict[str, list[str]]:
        """Representative -> every tensor whose range sets the group's parameters."""
        out: dict[str, list[str]] = {}
        for name in self.readers:
            members = out.setdefault(self.group(name), [])
            members.append(name)
            members.extend(sorted(self._extra_ranges.get(name, ())))
        return {root: list(dict.fromkeys(members)) for root, members in out.items()}

    def range_tensors(self) -> list[str]:
        """Every tensor calibration must measure."""
        names: list[str] = []
        for members in self.groups().values():
            names.extend(members)
        return list(dict.fromkeys(names))

    def is_empty(self) -> bool:
        return not self.sites and not self.readers
