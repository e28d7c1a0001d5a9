"""The expert-placement pass: records which physical slot (and so which rank) holds each routed expert, per MoE
layer, in ``graph.meta["placement"]`` for the expert-parallel backend (DESIGN.md §6, dsc.placement).

Either a ready placement (``dsc place`` output, ``dsc compile --placement FILE``), checked against the graph by
``Placement.check``, or a profiled expert load (``dsc profile`` output) placed here by dsc's search.

    expert-placement{placement=placement.json}
    expert-placement{load=expert_load.json,slots=12,ranks=4}
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from dsc.errors import CompileError
from dsc.ir.graph import Graph, Op
from dsc.passes.base import PassResult
from dsc.placement import Placement, load_placement
from dsc.placement.search import load_from_file, place_experts


@dataclass(frozen=True)
class ExpertPlacementPass:
    """Records graph.meta["placement"] (a Placement); the graph's nodes are unchanged."""

    name: ClassVar[str] = "expert-placement"
    requires: ClassVar[tuple[str, ...]] = ()
    placement: Placement | None = None
    load: tuple[tuple[float, ...], ...] = ()
    slots: int = 0
    ranks: int = 0
    nodes: int = 1
    groups: int = 1

    @classmethod
    def from_load(cls, load: Any, **options: int) -> ExpertPlacementPass:
        return cls(load=tuple(tuple(float(v) for v in row) for row in np.asarray(load, dtype=np.float64)), **options)

    @staticmethod
    def parse_option(field: str, text: str) -> Any:
        """Spec options: ``placement`` and ``load`` name files."""
        if field == "placement":
            return load_placement(Path(text))
        if field == "load":
            return tuple(tuple(float(v) for v in row) for row in load_from_file(text))
        return NotImplemented

    def run(self, graph: Graph) -> PassResult:
        routes = [n for n in graph.nodes if n.op == Op.MOE_ROUTE]
        found = sorted({int(n.attrs["num_experts"]) for n in routes})
        if self.placement is not None:
            if len(found) != 1:
                raise CompileError(f"--placement: the model has {len(routes)} MoE layers, nothing to place")
            self.placement.check(len(routes), found[0], self.placement.ranks, "--placement")
            placement = self.placement
        else:
            if not self.load or self.slots <= 0 or self.ranks <= 0:
                raise CompileError("expert-placement needs placement=FILE, or load=FILE with slots and ranks")
            layers, experts = len(self.load), len(self.load[0])
            if len(routes) != layers:
                return PassResult(graph, False, {"refused": f"graph has {len(routes)} MoE layers, the load {layers}"})
            if found != [experts]:
                return PassResult(graph, False, {"refused": f"graph's MoE layers have {found} experts, load {experts}"})
            placement = place_experts(
                self.load, slots=self.slots, ranks=self.ranks, nodes=self.nodes, groups=self.groups
            )
        g = graph.clone()
        g.meta["placement"] = placement
        stats = {"layers": placement.layers, "balance": placement.balance, "lower_bound": placement.lower_bound}
        return PassResult(g, True, stats)
