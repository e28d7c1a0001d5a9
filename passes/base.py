"""What every pass shares: the result record and the protocol a pass class follows (STYLE.md)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from dsc.ir.graph import Graph, WeightSource


@dataclass
class PassResult:
    graph: Graph
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)


class Pass(Protocol):
    name: ClassVar[str]
    requires: ClassVar[tuple[str, ...]]

    def run(self, graph: Graph) -> PassResult: ...


@dataclass(frozen=True)
class QuantizedWeight:
    """What a quantization pass did to one weight, for ``--report``: where it came from and how to read it back."""

    name: str
    layer: int | None
    format: str
    original: WeightSource
    restore: Callable[[], torch.Tensor]  # the float32 weight the engine computes with


class Quantized:
    """A weight's quantization ``quantize(source.load()) -> (values, scales)``, computed once however its two
    halves are read: the half not yet read is kept until it is (the writer reads values, then scales)."""

    __slots__ = ("source", "quantize", "label", "_pending")

    def __init__(self, source: WeightSource, quantize: Callable[[torch.Tensor], tuple], label: str) -> None:
        self.source, self.quantize, self.label = source, quantize, label
        self._pending: dict[int, torch.Tensor] = {}

    def part(self, index: int) -> torch.Tensor:
        if index in self._pending:
            return self._pending.pop(index)
        halves = self.quantize(self.source.load())
        self._pending[1 - index] = halves[1 - index]
        return halves[index]


@dataclass(frozen=True)
class QuantizedPart:
    """One half (0 = quantized values, 1 = their block scales) of a ``Quantized`` weight, as a weight source."""

    quantized: Quantized
    part: int

    def load(self) -> torch.Tensor:
        return self.quantized.part(self.part)

    def describe(self) -> str:
        what = "values" if self.part == 0 else "scales"
        return f"{self.quantized.label}_{what}({self.quantized.source.describe()})"
