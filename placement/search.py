"""Load-balanced expert placement: which logical expert each physical expert slot holds, per MoE layer.

DESIGN.md §6. Inputs are the routed-token load W[layer, expert], S physical slots spread evenly over R ranks
(slot s lives on rank s // (S / R)), K nodes of R / K ranks each, and G expert groups (group-limited routing).
Every expert gets at least one slot; a replicated expert's load is shared equally by its replicas. The figure
of merit is balance = max rank load / mean rank load (1.0 is perfect).

``eplb_baseline`` is DeepSeek's EPLB as §6 describes it (replicate by highest load per replica, then greedy
balanced packing; hierarchical when K divides G, else global). ``place_experts`` keeps the same node
constraint (when K > 1 divides G, each node holds G / K whole groups and a group's replicas stay on its node)
and searches harder, per node (or over the whole cluster):
- starting layouts: EPLB's own (so the result is never worse than EPLB), and several replica-count choices
  packed heaviest-first with an expert's replicas spread over distinct ranks;
- local search: swaps of one or two replicas between the heaviest rank and another, and handing a slot from
  a replicated expert to another, while that lowers the maximum;
- a best-first search over replica counts (one replica moved from one expert to another per step);
- with nodes: EPLB's group-to-node partition, that partition improved, and the partitions with the lowest
  bounds. Two replicas of one expert on one rank are allowed but lose every tie.
The lower bound (``_flat_bound``, and per node over every group-to-node partition when there are at most
_MAX_PARTITIONS) is what no placement under the same constraints can beat.
"""

from __future__ import annotations

import heapq
import itertools
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from dsc.errors import DscError
from dsc.placement import Placement, derive_tables

_EPS = 1e-12
_CLOSE_ENOUGH = 1e-4  # relative gap to the lower bound at which a search stops
_MAX_PAIR_SWAPS = 250_000  # 2-for-2 swaps examined per step (ranks holding many replicas do fine with 1-for-1)
_COUNT_SEARCH_SLOTS = 20_000  # layouts packed while searching replica counts, x their slots: small layers get more
_DONORS, _TAKERS = 4, 4  # replica-count moves tried per step (all experts as takers when that is <= _ALL_TAKERS)
_ALL_TAKERS = 48
_MAX_PARTITIONS = 2000  # group-to-node partitions enumerated for the bound (DeepSeek-V3's 8 groups: at most 105)
_MAX_PARTITIONS_SOLVED = 8  # of those, the most promising (lowest bound) searched in full


# -- inputs ---------------------------------------------------------------------------------------------
def _matrix(load: Any) -> np.ndarray:
    try:
        w = np.asarray(load, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise DscError(f"expert load is not a numeric [layers][experts] matrix: {e}") from None
    if w.ndim != 2 or w.size == 0:
        raise DscError(f"expert load must be a non-empty [layers][experts] matrix, got shape {w.shape}")
    if not np.isfinite(w).all():
        raise DscError("expert load has non-finite values (nan or inf)")
    if (w < 0).any():
        raise DscError("expert load has negative values")
    return w


def _checked(load: Any, slots: int, ranks: int, nodes: int, groups: int) -> np.ndarray:
    w = _matrix(load)
    experts = w.shape[1]
    if min(slots, ranks, nodes, groups) < 1:
        raise DscError(f"slots, ranks, nodes and groups must be positive, got {slots}, {ranks}, {nodes}, {groups}")
    if slots % ranks:
        raise DscError(f"{slots} expert slots do not divide evenly over {ranks} ranks")
    if slots < experts:
        raise DscError(f"{slots} expert slots cannot hold {experts} experts")
    if ranks % nodes:
        raise DscError(f"{ranks} ranks do not divide evenly over {nodes} nodes")
    if experts % groups:
        raise DscError(f"{experts} experts do not divide into {groups} groups")
    return w


def load_from_file(path: str | Path) -> np.ndarray:
    """A [layers][experts] load from JSON (a matrix, or {"load": matrix} as a profiler writes it) or .npy."""
    path = Path(path)
    try:
        if path.suffix == ".npy":
            raw: Any = np.load(path, allow_pickle=False)
        else:
            raw = json.loads(path.read_text())
            raw = raw.get("load") if isinstance(raw, dict) else raw
    except (OSError, ValueError) as e:
        raise DscError(f"{path}: cannot read expert load: {e}") from None
    try:
        return _matrix(raw)
    except DscError as e:
        raise DscError(f"{path}: {e}") from None


# -- shared pieces: replica counts, packing -------------------------------------------------------------
def _greedy_counts(w: np.ndarray, counts: np.ndarray, extra: int, eligible: np.ndarray, cap: int) -> np.ndarray:
    """Give ``extra`` slots one by one to the eligible expert with the highest load per replica (lowest index on
    ties, as EPLB), never past ``cap`` replicas; what is left when none qualifies goes to any expert."""
    counts = counts.copy()
    heap = [(-w[e] / counts[e], int(e)) for e in np.flatnonzero(eligible & (counts < cap))]
    heapq.heapify(heap)
    while extra and heap:
        _, e = heapq.heappop(heap)
        counts[e] += 1
        extra -= 1
        if counts[e] < cap:
            heapq.heappush(heap, (-w[e] / counts[e], e))
    if extra:
        return _greedy_counts(w, counts, extra, np.ones(len(w), dtype=bool), int(counts.max()) + extra + 1)
    return counts


def _flat_bound(w: np.ndarray, slots: int, ranks: int) -> float:
    """A lower bound on the max rank load: the mean, and the rank holding the heaviest replica (at least the
    min-max apportionment's) with per - 1 other replicas, each at least w_e / (extra slots + 1)."""
    per, copies = slots // ranks, slots - len(w) + 1
    light = np.repeat(np.sort(w)[:per], copies)[: per - 1].sum() / copies
    return max(w.sum() / ranks, _minimax_replica(w, slots) + light)


def _minimax_replica(w: np.ndarray, slots: int) -> float:
    """The least possible heaviest replica load with ``slots`` replicas, each expert at least one (the greedy
    is optimal for this min-max apportionment)."""
    counts = _greedy_counts(w, np.ones(len(w), dtype=np.int64), slots - len(w), np.ones(len(w), bool), slots)
    return float((w / counts).max())


def _lpt(p: np.ndarray, x: np.ndarray, packs: int, distinct: bool) -> np.ndarray:
    """Heaviest item first into the lightest pack with room (first on ties): EPLB's balanced packing. With
    ``distinct``, a pack already holding the item's expert is passed over while another has room.
    Returns the item indices of each pack, [packs, len(p) // packs]."""
    per = len(p) // packs
    loads, fill = np.zeros(packs), np.zeros(packs, dtype=np.int64)
    held = np.zeros((packs, int(x.max()) + 1), dtype=bool)
    out = np.empty((packs, per), dtype=np.int64)
    for i in np.argsort(-p, kind="stable"):
        room = fill < per
        if distinct and (room & ~held[:, x[i]]).any():
            room &= ~held[:, x[i]]
        b = np.flatnonzero(room)[np.argmin(loads[room])]
        out[b, fill[b]] = i
        loads[b] += p[i]
        fill[b] += 1
        held[b, x[i]] = True
    return out


# -- EPLB, the bar to beat -------------------------------------------------------------------------------
def _eplb_slots(p: np.ndarray, packs: int) -> np.ndarray:
    """Items by pack, then by arrival in the pack (EPLB's rank_in_pack); EPLB keeps the order when each pack
    holds one item."""
    if len(p) == packs:
        return np.arange(packs)
    return _lpt(p, np.zeros(len(p), dtype=np.int64), packs, distinct=False).ravel()


def _eplb_layer(w: np.ndarray, slots: int, groups: int, nodes: int, ranks: int) -> np.ndarray:
    gsize, per_node = len(w) // groups, len(w) // nodes
    node_groups = _eplb_slots(w.reshape(groups, gsize).sum(1), nodes).reshape(nodes, -1)
    phy2log = []
    for n in range(nodes):
        local = (node_groups[n][:, None] * gsize + np.arange(gsize)).ravel()
        counts = np.ones(per_node, dtype=np.int64)
        phy = list(range(per_node))
        for _ in range(slots // nodes - per_node):  # EPLB's replicate_experts: one extra replica at a time
            e = int(np.argmax(w[local] / counts))
            phy.append(e)
            counts[e] += 1
        phy = np.asarray(phy)
        order = _eplb_slots(w[local][phy] / counts[phy], ranks // nodes)
        phy2log.append(local[phy[order]])
    return np.concatenate(phy2log)


# -- this pass's search -----------------------------------------------------------------------------------
def _improve(w: np.ndarray, x: np.ndarray, reassign: bool = True) -> np.ndarray:
    """Swap one or two replicas between the heaviest rank and another (or, with ``reassign``, hand a slot to
    another expert) while that lowers the maximum and adds no second replica of an expert to a rank.
    ``x``: [ranks, per rank] expert ids."""
    x = x.copy()
    counts = np.bincount(x.ravel(), minlength=len(w))
    ranks, per = x.shape
    combos = [np.arange(per)[:, None]]
    if per >= 2 and (per * (per - 1) // 2) ** 2 * ranks <= _MAX_PAIR_SWAPS:
        combos.append(np.asarray(list(itertools.combinations(range(per), 2))))
    for _ in range(8 * x.size):
        p = w[x] / counts[x]
        loads = p.sum(1)
        a = int(np.argmax(loads))
        for c in combos:
            sums = p[:, c].sum(-1)  # [ranks, combos]
            d = sums[a][:, None, None] - sums[None]  # load moved from a to b
            new_max = np.maximum(loads[a] - d, loads[None, :, None] + d)
            ok = (d > _EPS) & (new_max < loads[a] - _EPS * max(loads[a], 1.0))
            if ok.any() and _apply_best(x, a, c, np.where(ok, new_max, np.inf)):
                break
        else:
            if not reassign or not _reassign(w, x, counts, loads, a):
                return x
        counts = np.bincount(x.ravel(), minlength=len(w))
    return x


def _reassign(w: np.ndarray, x: np.ndarray, counts: np.ndarray, loads: np.ndarray, a: int) -> bool:
    """Give one slot of a replicated expert f to another expert e, where the slot is on the heaviest rank ``a``
    or e is: f's other replicas get heavier, e's lighter. Applies the change that lowers the maximum most."""
    ranks, per = x.shape
    held = np.zeros((ranks, len(w)), dtype=np.int64)
    np.add.at(held, (np.repeat(np.arange(ranks), per), x.ravel()), 1)
    slot_a = a * per + np.arange(per)
    s = np.concatenate([np.repeat(np.arange(x.size), per), np.repeat(slot_a, len(w))])
    e = np.concatenate([np.tile(x[a], x.size), np.tile(np.arange(len(w)), per)])
    f = x.ravel()[s]
    keep = (counts[f] >= 2) & (e != f)
    s, e, f = s[keep], e[keep], f[keep]
    if not len(s):
        return False
    wf, we, cf, ce = w[f], w[e], counts[f], counts[e]
    d_f, d_e = wf / (cf - 1) - wf / cf, we / (ce + 1) - we / ce
    new = loads[None] + held[:, f].T * d_f[:, None] + held[:, e].T * d_e[:, None]
    new[np.arange(len(s)), s // per] += we / (ce + 1) - wf / (cf - 1)
    peak = new.max(1)
    if peak.min() >= loads[a] - _EPS * max(loads[a], 1.0):
        return False
    # among the best, prefer no extra replica of e on the slot's rank (unless the slot held a second f there)
    twin = (held[s // per, e] > 0) & (held[s // per, f] < 2)
    i = int(np.argmin(peak + np.where(twin, _EPS * max(loads[a], 1.0), 0.0)))
    x.flat[s[i]] = e[i]
    return True


def _apply_best(x: np.ndarray, a: int, c: np.ndarray, score: np.ndarray) -> bool:
    """Apply the lowest-scoring swap of position sets c[i] of rank ``a`` and c[j] of rank b (score [i, b, j]);
    among swaps scoring as low, one that puts no second replica of an expert on a rank."""

    def swapped(flat: int) -> tuple[int, np.ndarray, np.ndarray]:
        i, b, j = np.unravel_index(flat, score.shape)
        ra, rb = x[a].copy(), x[b].copy()
        ra[c[i]], rb[c[j]] = x[b, c[j]], x[a, c[i]]
        return b, ra, rb

    def no_twins(b: int, ra: np.ndarray, rb: np.ndarray) -> bool:
        return _dups(ra) + _dups(rb) <= _dups(x[a]) + _dups(x[b])

    first = int(np.argmin(score))
    if not np.isfinite(score.flat[first]):
        return False
    choice = swapped(first)
    if not no_twins(*choice):
        tol = _EPS * max(score.flat[first], 1.0)
        for flat in np.argsort(score, axis=None, kind="stable")[:32]:
            if score.flat[flat] > score.flat[first] + tol:
                break
            if no_twins(*swapped(flat)):
                choice = swapped(flat)
                break
    b, x[a], x[b] = choice
    return True


def _dups(row: np.ndarray) -> int:
    return len(row) - len(np.unique(row))


def _count_choices(w: np.ndarray, slots: int, ranks: int) -> list[np.ndarray]:
    """Replica counts to try: the min-max apportionment (EPLB's), the same capped at one replica per rank, and
    k extra slots by min-max followed by the rest spread over the experts that got none (finer filler)."""
    experts, extra = len(w), slots - len(w)
    ones, every = np.ones(experts, dtype=np.int64), np.ones(experts, dtype=bool)
    choices = [_greedy_counts(w, ones, extra, every, slots), _greedy_counts(w, ones, extra, every, ranks)]
    for k in sorted(set(np.linspace(0, extra, 13, dtype=np.int64)[:-1])) if extra else []:
        head = _greedy_counts(w, ones, int(k), every, slots)
        choices.append(_greedy_counts(w, head, extra - int(k), head == 1, slots))
    unique = {tuple(c): c for c in choices}
    return list(unique.values())


def _pack(w: np.ndarray, counts: np.ndarray, ranks: int, reassign: bool = True) -> np.ndarray:
    x = np.repeat(np.arange(len(w)), counts)
    return _improve(w, x[_lpt(w[x] / counts[x], x, ranks, distinct=True)], reassign)


def _score(w: np.ndarray, x: np.ndarray) -> tuple[float, int, float]:
    """Max rank load, replicas sharing a rank with their twin, sum of squared rank loads: lower is better."""
    counts = np.bincount(x.ravel(), minlength=len(w))
    loads = (w[x] / counts[x]).sum(1)
    return float(loads.max()), sum(_dups(r) for r in x), float(loads @ loads)


def _better(a: tuple[float, int, float], b: tuple[float, int, float]) -> bool:
    tol = _EPS * max(a[0], b[0], 1.0)
    return a[0] < b[0] - tol or (a[0] <= b[0] + tol and a[1:] < b[1:])


def _solve_flat(w: np.ndarray, ranks: int, seed: np.ndarray, target: float) -> tuple[np.ndarray, float]:
    """Best [ranks, per rank] expert layout found for one node (or the whole cluster), and its max rank load.
    ``seed`` (EPLB's layout) is the first starting point; the search stops early once it reaches ``target``
    (the lower bound)."""
    reached = target * (1 + _CLOSE_ENOUGH)
    best = _improve(w, seed.reshape(ranks, -1))
    key = _score(w, best)
    for counts in _count_choices(w, seed.size, ranks):
        if key[0] <= reached:
            break
        x = _pack(w, counts, ranks)
        if _better(_score(w, x), key):
            best, key = x, _score(w, x)
    # Best-first search over replica counts: expand the best layout not yet expanded, whatever its neighbours
    # scored, so the search leaves a local optimum once its neighbourhood is used up.
    budget, tie = max(8, _COUNT_SEARCH_SLOTS // seed.size), itertools.count()
    frontier = [(key, next(tie), best)]
    seen = {tuple(np.bincount(best.ravel(), minlength=len(w)))}
    while key[0] > reached and budget > 0 and frontier:
        _, _, x = heapq.heappop(frontier)
        moves = [c for c in _count_moves(w, np.bincount(x.ravel(), minlength=len(w)), x) if tuple(c) not in seen]
        for c in moves[:budget]:
            seen.add(tuple(c))
            budget -= 1
            layout = _pack(w, c, ranks, reassign=False)  # keep each layout on its counts
            score = _score(w, layout)
            heapq.heappush(frontier, (score, next(tie), layout))
            if _better(score, key):
                best, key = layout, score
    polished = _improve(w, best)
    polished_key = _score(w, polished)
    return (polished, polished_key[0]) if _better(polished_key, key) else (best, key[0])


def _count_moves(w: np.ndarray, counts: np.ndarray, x: np.ndarray) -> list[np.ndarray]:
    """Replica counts one move away: a replica of f (one that would stay light with one fewer) given to e (one
    heavy per replica, or on the heaviest rank)."""
    share = w / counts
    heaviest = x[int(np.argmax(share[x].sum(1)))]
    donors = np.flatnonzero(counts >= 2)
    donors = donors[np.argsort(w[donors] / (counts[donors] - 1), kind="stable")][:_DONORS]
    takers = list(dict.fromkeys([*heaviest.tolist(), *np.argsort(-share, kind="stable")[:_TAKERS].tolist()]))
    if len(w) * len(donors) <= _ALL_TAKERS:
        takers = range(len(w))
    moves = []
    for f, e in itertools.product(donors, takers):
        if e != f:
            c = counts.copy()
            c[f] -= 1
            c[e] += 1
            moves.append(c)
    return moves


def _partitions(items: tuple[int, ...], size: int) -> Iterator[tuple[tuple[int, ...], ...]]:
    """Every partition of ``items`` into unordered blocks of ``size``."""
    if not items:
        yield ()
        return
    for mates in itertools.combinations(items[1:], size - 1):
        rest = tuple(i for i in items[1:] if i not in mates)
        for tail in _partitions(rest, size):
            yield ((items[0], *mates), *tail)


def _partition_count(groups: int, nodes: int) -> int:
    per = groups // nodes
    return math.factorial(groups) // (math.factorial(per) ** nodes * math.factorial(nodes))


class _Layer:
    """One layer under the node constraint: candidate group-to-node partitions, their bounds and solutions."""

    def __init__(self, w: np.ndarray, slots: int, ranks: int, nodes: int, groups: int) -> None:
        self.w, self.nodes, self.groups = w, nodes, groups
        self.gsize = len(w) // groups
        self.node_slots, self.node_ranks = slots // nodes, ranks // nodes
        self.gload = w.reshape(groups, self.gsize).sum(1)
        self._bounds: dict[tuple[int, ...], float] = {}
        self._ranked: list[tuple[tuple[int, ...], ...]] | None = None
        self._solved: dict[tuple, tuple[np.ndarray, float, float]] = {}  # layout, peak, target searched for

    def experts(self, block: tuple[int, ...]) -> np.ndarray:
        return np.concatenate([np.arange(g * self.gsize, (g + 1) * self.gsize) for g in block])

    def block_bound(self, block: tuple[int, ...]) -> float:
        if block not in self._bounds:
            self._bounds[block] = _flat_bound(self.w[self.experts(block)], self.node_slots, self.node_ranks)
        return self._bounds[block]

    def bound(self, part: Sequence[tuple[int, ...]]) -> float:
        return max(self.block_bound(b) for b in part)

    def solve(self, block: tuple[int, ...], seed: np.ndarray | None, target: float) -> tuple[np.ndarray, float]:
        """The node holding ``block``: its phy2log (global expert ids) and max rank load, searched until it
        reaches ``target``. Without a ``seed`` the search starts from EPLB's layout of this node alone."""
        key = (block, seed is None)
        done = self._solved.get(key)
        if done is None or (done[1] > target and done[2] > target):
            local = self.experts(block)
            if seed is None:
                start = _eplb_layer(self.w[local], self.node_slots, 1, 1, self.node_ranks)
            else:
                start = np.searchsorted(local, seed)
            x, peak = _solve_flat(self.w[local], self.node_ranks, start, target)
            self._solved[key] = done = (local[x].ravel(), peak, target)
        return done[0], done[1]

    def solve_partition(self, part: Sequence[tuple[int, ...]], seeds: Sequence[np.ndarray | None]):
        """Phy2log (node by node, in ``part``'s order) and max rank load; a node is searched only until it is
        no worse than the node found worst so far."""
        peak, layouts = 0.0, [np.empty(0)] * len(part)
        for n in sorted(range(len(part)), key=lambda n: -self.block_bound(part[n])):
            layouts[n], node_peak = self.solve(part[n], seeds[n], max(self.block_bound(part[n]), peak))
            peak = max(peak, node_peak)
        return np.concatenate(layouts), peak

    def ranked_partitions(self) -> list[tuple[tuple[int, ...], ...]]:
        """Every group-to-node partition, lowest bound first; none when there are too many to enumerate."""
        if _partition_count(self.groups, self.nodes) > _MAX_PARTITIONS:
            return []
        if self._ranked is None:
            self._ranked = sorted(_partitions(tuple(range(self.groups)), self.groups // self.nodes), key=self.bound)
        return self._ranked

    def improve_partition(self, part: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        """Swap groups between the block with the highest bound and another while that lowers the highest."""
        part = [tuple(sorted(b)) for b in part]
        while True:
            bounds = [self.block_bound(b) for b in part]
            a = int(np.argmax(bounds))
            best = (bounds[a], None)
            for b, (ga, gb) in itertools.product(range(len(part)), itertools.product(part[a], range(self.groups))):
                if b == a or gb not in part[b]:
                    continue
                na = tuple(sorted((*(g for g in part[a] if g != ga), gb)))
                nb = tuple(sorted((*(g for g in part[b] if g != gb), ga)))
                peak = max(self.block_bound(na), self.block_bound(nb))
                if peak < best[0] - _EPS * max(best[0], 1.0):
                    best = (peak, (b, na, nb))
            if best[1] is None:
                return part
            b, part[a], part[b] = best[1][0], best[1][1], best[1][2]


def _place_hierarchical(w: np.ndarray, slots: int, ranks: int, nodes: int, groups: int) -> np.ndarray:
    """Phy2log when each node holds whole groups: EPLB's group-to-node partition, that partition improved, and
    the partitions with the lowest bounds, each node searched from EPLB's layout."""
    layer = _Layer(w, slots, ranks, nodes, groups)
    eplb = _eplb_layer(w, slots, groups, nodes, ranks).reshape(nodes, -1)
    eplb_part = [tuple(sorted({int(e) // layer.gsize for e in row})) for row in eplb]
    candidates = [eplb_part, layer.improve_partition(list(eplb_part)), *layer.ranked_partitions()]
    best, best_peak = eplb.ravel(), math.inf
    for i, part in enumerate(candidates[: 2 + _MAX_PARTITIONS_SOLVED]):
        if i >= 2 and layer.bound(part) >= best_peak * (1 - _CLOSE_ENOUGH):
            break
        p2l, peak = layer.solve_partition(part, list(eplb) if i == 0 else [None] * nodes)
        if peak < best_peak - _EPS * max(peak, 1.0):
            best, best_peak = p2l, peak
    return best


def _lower_bound(w: np.ndarray, slots: int, ranks: int, nodes: int, groups: int) -> float:
    """No placement under the constraints place_experts keeps has a lower max rank load."""
    if not _hierarchical(nodes, groups):
        return _flat_bound(w, slots, ranks)
    layer = _Layer(w, slots, ranks, nodes, groups)
    ranked = layer.ranked_partitions()
    return layer.bound(ranked[0]) if ranked else _hierarchical_bound(layer, slots, ranks)


def _hierarchical_bound(layer: _Layer, slots: int, ranks: int) -> float:
    """Valid for any partition: whichever node holds group g gives it at most node_slots minus one slot per
    other expert there, and carries g plus the lightest other groups that fill the node."""
    w, per = layer.w, layer.groups // layer.nodes
    bound = _flat_bound(w, slots, ranks)
    for g in range(layer.groups):
        wg = w[layer.experts((g,))]
        room = layer.node_slots - (per - 1) * layer.gsize
        others = np.sort(np.delete(layer.gload, g))[: per - 1].sum()
        bound = max(bound, _minimax_replica(wg, room), (layer.gload[g] + others) / layer.node_ranks)
    return bound


def _place_global(w: np.ndarray, slots: int, ranks: int, nodes: int, groups: int) -> np.ndarray:
    seed = _eplb_layer(w, slots, *_eplb_policy(nodes, groups), ranks)  # EPLB's own layout, whichever policy
    x, _ = _solve_flat(w, ranks, seed, _flat_bound(w, slots, ranks))
    return x.ravel()


# -- results ----------------------------------------------------------------------------------------------
def _hierarchical(nodes: int, groups: int) -> bool:
    return nodes > 1 and groups % nodes == 0


def _eplb_policy(nodes: int, groups: int) -> tuple[int, int]:
    """(groups, nodes) as EPLB runs: hierarchical whenever nodes divide groups (one node included), else global."""
    return (groups, nodes) if groups % nodes == 0 else (1, 1)


def _peak_over_mean(w: np.ndarray, phy2log: np.ndarray, ranks: int) -> tuple[np.ndarray, float]:
    counts = np.bincount(phy2log, minlength=len(w))
    rank_load = (w[phy2log] / counts[phy2log]).reshape(ranks, -1).sum(1)
    mean = w.sum() / ranks
    return rank_load, float(rank_load.max() / mean) if mean > 0 else 1.0


def _build(w: np.ndarray, phy2log: list[np.ndarray], ranks: int, nodes: int, groups: int) -> Placement:
    layers, experts = w.shape
    slots = len(phy2log[0])
    rank_load, balance, unbalanced, lower = [], [], [], []
    round_robin = np.arange(slots) % experts
    for layer, p2l in enumerate(phy2log):
        loads, peak = _peak_over_mean(w[layer], p2l, ranks)
        mean = w[layer].sum() / ranks
        rank_load.append(loads.tolist())
        balance.append(peak)
        unbalanced.append(_peak_over_mean(w[layer], round_robin, ranks)[1])
        lower.append(float(_lower_bound(w[layer], slots, ranks, nodes, groups) / mean) if mean > 0 else 1.0)
    p2l_lists = [p.tolist() for p in phy2log]
    log2phy, logcnt = derive_tables(p2l_lists, experts)
    return Placement(p2l_lists, log2phy, logcnt, ranks, slots, nodes, groups, rank_load, balance, unbalanced, lower)


def eplb_baseline(load: Any, *, slots: int, ranks: int, nodes: int = 1, groups: int = 1) -> Placement:
    """DeepSeek's EPLB (DESIGN.md §6): hierarchical when ``nodes`` divides ``groups``, else global.
    Its lower_bound is place_experts' (the same constraints)."""
    w = _checked(load, slots, ranks, nodes, groups)
    return _build(w, [_eplb_layer(row, slots, *_eplb_policy(nodes, groups), ranks) for row in w], ranks, nodes, groups)


def place_experts(load: Any, *, slots: int, ranks: int, nodes: int = 1, groups: int = 1) -> Placement:
    """The best placement this search finds; never worse than ``eplb_baseline`` on the same inputs."""
    w = _checked(load, slots, ranks, nodes, groups)
    if _hierarchical(nodes, groups):
        phy2log = [_place_hierarchical(row, slots, ranks, nodes, groups) for row in w]
    else:
        phy2log = [_place_global(row, slots, ranks, nodes, groups) for row in w]
    return _build(w, phy2log, ranks, nodes, groups)
