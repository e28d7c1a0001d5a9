"""Expert placement: which logical expert each physical slot holds, per MoE layer (DESIGN.md §6).

``Placement`` is the one representation used everywhere: written by ``dsc place``, checked and recorded by the
``expert-placement`` pass (``dsc compile --placement``), carried in expert-parallel manifests and read by the
runtime. ``Placement.check`` is its one validator. The search and DeepSeek's EPLB baseline live in
``dsc.placement.search``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsc.errors import DscError


@dataclass(frozen=True)
class Placement:
    phy2log: list[list[int]]  # [layers][slots]: logical expert of physical slot s (on rank s // (slots // ranks))
    log2phy: list[list[list[int]]]  # [layers][experts][max replicas]: the expert's slots, -1 padded
    logcnt: list[list[int]]  # [layers][experts]: replica count
    ranks: int
    slots: int
    nodes: int = 1
    groups: int = 1
    # what the search measured (absent for placements that were not searched)
    rank_load: list[list[float]] = field(default_factory=list)  # [layers][ranks], replicas share load equally
    balance: list[float] = field(default_factory=list)  # per layer: max / mean rank load
    unbalanced: list[float] = field(default_factory=list)  # per layer: max / mean when slot s holds expert s % E
    lower_bound: list[float] = field(default_factory=list)  # per layer: no placement can have a lower max / mean

    @property
    def layers(self) -> int:
        return len(self.phy2log)

    @property
    def slots_per_rank(self) -> int:
        return self.slots // self.ranks

    def local_slots(self, layer: int, rank: int) -> list[int]:
        """The logical experts held by ``rank``'s slots in ``layer``, in slot order."""
        per = self.slots_per_rank
        return self.phy2log[layer][rank * per : (rank + 1) * per]

    def replicas(self, layer: int, expert: int) -> list[int]:
        """The physical slots holding ``expert`` in ``layer``."""
        return [s for s in self.log2phy[layer][expert] if s >= 0]

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_json(cls, data: Any, source: str = "placement") -> Placement:
        """A placement from its JSON form (``dsc place`` output; log2phy / logcnt are derived when absent, as in
        DeepSeek's EPLB layout). Checked for internal consistency."""
        if isinstance(data, dict) and "placement" in data:
            data = data["placement"]
        if not isinstance(data, dict) or not isinstance(data.get("phy2log"), list) or not data["phy2log"]:
            raise DscError(f"{source}: not a placement (needs 'phy2log' [layers][slots])")
        phy2log = data["phy2log"]
        if not all(isinstance(r, list) and r and all(isinstance(e, int) and e >= 0 for e in r) for r in phy2log):
            raise DscError(f"{source}: phy2log must be non-empty lists of non-negative expert ids")
        slots = len(phy2log[0])
        ranks = data.get("ranks")
        if not isinstance(ranks, int) or ranks <= 0:
            raise DscError(f"{source}: 'ranks' must be a positive integer")
        experts = max(max(r) for r in phy2log) + 1
        log2phy, logcnt = derive_tables(phy2log, experts)
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        known.update(phy2log=phy2log, log2phy=log2phy, logcnt=logcnt, ranks=ranks, slots=slots)
        placement = cls(**known)
        placement.check(len(phy2log), experts, ranks, source)
        return placement

    def check(self, layers: int, experts: int, ranks: int, source: str = "placement") -> None:
        """The one validator: the placement fits ``layers`` MoE layers of ``experts`` experts on ``ranks`` ranks."""
        if len(self.phy2log) != layers:
            raise DscError(f"{source}: placement covers {len(self.phy2log)} MoE layers, the model has {layers}")
        if self.ranks != ranks or self.slots % ranks:
            raise DscError(
                f"{source}: placement is for {self.ranks} ranks and {self.slots} slots; --ep-size is {ranks}"
            )
        for layer, row in enumerate(self.phy2log):
            if len(row) != self.slots or set(row) != set(range(experts)):
                raise DscError(f"{source}: layer {layer}: phy2log must give every one of the {experts} experts a slot")

    @classmethod
    def default(cls, layers: int, experts: int, ranks: int) -> Placement:
        """No redundancy: slot s holds expert s, rank r the contiguous block of experts r*E/R ... ."""
        if experts % ranks:
            raise DscError(
                f"--ep-size {ranks} does not divide the {experts} routed experts; give a --placement "
                "with redundant slots (dsc place --slots S --ranks R)"
            )
        phy2log = [list(range(experts)) for _ in range(layers)]
        log2phy, logcnt = derive_tables(phy2log, experts)
        return cls(phy2log, log2phy, logcnt, ranks, experts)


def derive_tables(phy2log: list[list[int]], experts: int) -> tuple[list, list]:
    """log2phy [layers][experts][max replicas] (-1 padded) and logcnt [layers][experts] from phy2log."""
    width = max(1, len(phy2log[0]) - experts + 1)
    log2phy, logcnt = [], []
    for row in phy2log:
        table, counts = [[-1] * width for _ in range(experts)], [0] * experts
        for s, e in enumerate(row):
            if e < experts and counts[e] < width:
                table[e][counts[e]] = s
            if e < experts:
                counts[e] += 1
        log2phy.append(table)
        logcnt.append(counts)
    return log2phy, logcnt


def load_placement(path: Path) -> Placement:
    """A placement file written by ``dsc place`` (or DeepSeek's EPLB layout with 'ranks')."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DscError(f"{path}: cannot read placement: {exc}") from exc
    return Placement.from_json(data, str(path))
