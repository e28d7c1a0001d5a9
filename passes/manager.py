"""The pass manager: runs passes in order, verifies the IR after each, records stats and time."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsc.ir.graph import Graph
from dsc.ir.printer import format_graph
from dsc.ir.verify import VerifyError, verify
from dsc.passes.base import Pass


@dataclass
class PassRecord:
    name: str
    modified: bool
    stats: dict[str, Any]
    seconds: float
    nodes_before: int
    nodes_after: int


@dataclass
class PassManager:
    passes: Sequence[Pass]
    print_ir_after_all: bool = False
    print_ir_after_change: bool = False
    dump_ir_dir: Path | None = None
    emit: Callable[[str], None] = print
    records: list[PassRecord] = field(default_factory=list)

    def run(self, graph: Graph) -> Graph:
        verify(graph)
        done: set[str] = set()
        self._dump(0, "input", graph)
        for index, p in enumerate(self.passes, start=1):
            missing = [r for r in p.requires if r not in done]
            if missing:
                raise ValueError(f"pass {p.name} requires {missing} to run first")
            before = len(graph.nodes)
            start = time.perf_counter()
            result = p.run(graph)
            seconds = time.perf_counter() - start
            try:
                verify(result.graph)
            except VerifyError as exc:
                raise VerifyError(f"after pass {p.name}: {exc}") from exc
            graph = result.graph
            done.add(p.name)
            self.records.append(PassRecord(p.name, result.modified, result.stats, seconds, before, len(graph.nodes)))
            if self.print_ir_after_all or (self.print_ir_after_change and result.modified):
                self.emit(f"// ----- IR after {p.name} ({'changed' if result.modified else 'unchanged'}) -----")
                self.emit(format_graph(graph))
            self._dump(index, p.name, graph)
        graph.meta["passes"] = [r.name for r in self.records if r.modified]
        return graph

    def _dump(self, index: int, name: str, graph: Graph) -> None:
        if self.dump_ir_dir is not None:
            self.dump_ir_dir.mkdir(parents=True, exist_ok=True)
            (self.dump_ir_dir / f"{index:03d}_{name}.txt").write_text(format_graph(graph))
