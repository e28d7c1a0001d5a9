"""The pass manager: checks the pipeline's order, runs passes, verifies the IR after each, records stats."""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsc.errors import CompileError
from dsc.ir.graph import Graph
from dsc.ir.printer import format_graph
from dsc.ir.verify import VerifyError, verify
from dsc.passes.base import Pass
from dsc.passes.pipeline import check_order


@dataclass
class PassRecord:
    name: str
    modified: bool
    stats: dict[str, Any]
    seconds: float
    nodes_before: int
    nodes_after: int


def _stderr(text: str) -> None:
    print(text, file=sys.stderr)


@dataclass
class PassManager:
    passes: Sequence[Pass]
    print_ir_after_all: bool = False
    print_ir_after_change: bool = False
    dump_ir_dir: Path | None = None
    emit: Callable[[str], None] = _stderr  # where --print-ir-after-* text goes
    records: list[PassRecord] = field(default_factory=list)

    def run(self, graph: Graph) -> Graph:
        names = [p.name for p in self.passes]
        check_order(names)
        for i, p in enumerate(self.passes):
            missing = [r for r in p.requires if r not in names[:i]]
            if missing:
                raise CompileError(f"pass {p.name} requires {', '.join(missing)} to run before it")
        verify(graph)
        self._dump(0, "input", graph)
        for index, p in enumerate(self.passes, start=1):
            before = len(graph.nodes)
            start = time.perf_counter()
            result = p.run(graph)
            seconds = time.perf_counter() - start
            try:
                verify(result.graph)
            except VerifyError as exc:
                raise VerifyError(f"after pass {p.name}: {exc}") from exc
            graph = result.graph
            self.records.append(PassRecord(p.name, result.modified, result.stats, seconds, before, len(graph.nodes)))
            if self.print_ir_after_all or (self.print_ir_after_change and result.modified):
                self.emit(f"// ----- IR after {p.name} ({'changed' if result.modified else 'unchanged'}) -----")
                self.emit(format_graph(graph))
            self._dump(index, p.name, graph)
        graph.meta["passes"] = [r.name for r in self.records if r.modified]
        graph.meta["pass_records"] = [
            {k: v for k, v in dataclasses.asdict(r).items() if k != "seconds"} for r in self.records
        ]
        return graph

    def _dump(self, index: int, name: str, graph: Graph) -> None:
        if self.dump_ir_dir is not None:
            self.dump_ir_dir.mkdir(parents=True, exist_ok=True)
            (self.dump_ir_dir / f"{index:03d}_{name}.txt").write_text(format_graph(graph))
