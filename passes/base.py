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
