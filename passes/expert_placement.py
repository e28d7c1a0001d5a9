"""The expert-placement pass: records a load-balanced placement (placement/search.py, DESIGN.md §6) for
a profiled expert load in the IR, refusing when the load does not fit the graph's MoE layers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from dsc.ir.graph import Graph, Op
from dsc.passes.base import PassResult
from dsc.placement.search import Placement, eplb_baseline, load_from_file, place_experts

__all__ = ["ExpertPlacementPass", "Placement", "eplb_baseline", "load_from_file", "place_experts"]  # re-exported


@dataclass(frozen=True)
class ExpertPlacementPass:
    """Records graph.meta["placement"] (Placement.to_json()) for a profiled load; the graph is unchanged."""

    name: ClassVar[str] = "expert-placement"
    requires: ClassVar[tuple[str, ...]] = ()
    load: tuple[tuple[float, ...], ...]
    slots: int
    ranks: int
    nodes: int = 1
    groups: int = 1

    @classmethod
    def from_load(cls, load: Any, **options: int) -> ExpertPlacementPass:
        return cls(tuple(tuple(float(v) for v in row) for row in np.asarray(load, dtype=np.float64)), **options)

    def run(self, graph: Graph) -> PassResult:
        routes = [n for n in graph.nodes if n.op == Op.MOE_ROUTE]
        layers, experts = len(self.load), len(self.load[0]) if self.load else 0
        found = sorted({int(n.attrs["num_experts"]) for n in routes})
        if len(routes) != layers:
            return PassResult(graph, False, {"refused": f"graph has {len(routes)} MoE layers, the load {layers}"})
        if found != [experts]:
            return PassResult(graph, False, {"refused": f"graph's MoE layers have {found} experts, load {experts}"})
        placement = place_experts(self.load, slots=self.slots, ranks=self.ranks, nodes=self.nodes, groups=self.groups)
        g = graph.clone()
        g.meta["placement"] = placement.to_json()
        stats = {"layers": layers, "balance": placement.balance, "lower_bound": placement.lower_bound}
        return PassResult(g, True, stats)
