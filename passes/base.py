"""What every pass shares: the result record and the protocol a pass class follows (STYLE.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from dsc.ir.graph import Graph


@dataclass
class PassResult:
    graph: Graph
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)


class Pass(Protocol):
    name: ClassVar[str]
    requires: ClassVar[tuple[str, ...]]

    def run(self, graph: Graph) -> PassResult: ...
