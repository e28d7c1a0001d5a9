"""expert-placement: valid layouts, never worse than EPLB, never below the lower bound; DESIGN.md §6 figures."""

import itertools
import json

import numpy as np
import pytest
import torch
from dsc.errors import DscError
from dsc.ir import Constant, DType, Graph, GraphBuilder, Op, verify
from dsc.passes.expert_placement import ExpertPlacementPass
from dsc.placement import Placement
from dsc.placement.search import eplb_baseline, load_from_file, place_experts

# DESIGN.md §6, DeepSeek EPLB's published example.
W = [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86], [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]]
W_PHY2LOG = [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1], [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]


def zipf(experts: int, exponent: float, layers: int = 2, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, experts + 1) ** exponent
    return np.stack([rng.multinomial(64 * experts, rng.permutation(p / p.sum())) for _ in range(layers)]).astype(float)


def hot(experts: int, share: float) -> np.ndarray:
    row = np.full(experts, 1000 * (1 - share) / (experts - 1))
    row[experts // 3] = 1000 * share
    return np.stack([row, np.roll(row, 5)])


# (name, load, slots, ranks, nodes, groups)
CASES = [
    ("uniform", np.full((2, 16), 100.0), 16, 4, 1, 1),
    ("uniform-extra", np.full((2, 16), 100.0), 24, 8, 1, 1),
    ("zipf0.5", zipf(32, 0.5), 40, 8, 1, 1),
    ("zipf1.0", zipf(32, 1.0), 40, 8, 1, 1),
    ("zipf1.5", zipf(32, 1.5), 48, 16, 1, 1),
    ("zipf2.0", zipf(16, 2.0), 32, 8, 1, 1),
    ("one-hot", hot(16, 0.5), 24, 8, 1, 1),
    ("one-hot-no-spare", hot(16, 0.4), 16, 4, 1, 1),
    ("slots-4x-experts", zipf(8, 1.0), 32, 4, 1, 1),
    ("slots==experts", zipf(32, 1.0), 32, 8, 1, 1),
    ("zipf-groups2-nodes2", zipf(32, 1.0), 48, 8, 2, 8),
    ("zipf-groups8-nodes4", zipf(32, 1.2), 48, 8, 4, 8),
    ("hot-groups4-nodes4", hot(16, 0.3), 24, 8, 4, 4),
    ("groups-not-divisible", zipf(24, 1.0), 32, 8, 8, 4),
    ("design-hierarchical", np.array(W, float), 16, 8, 2, 4),
    ("design-global", np.array(W, float), 16, 8, 1, 1),
]


def check_valid(p: Placement, load: np.ndarray) -> None:
    layers, experts = load.shape
    per = p.slots // p.ranks
    hierarchical = p.nodes > 1 and p.groups % p.nodes == 0
    for layer in range(layers):
        phy2log = np.array(p.phy2log[layer])
        assert phy2log.shape == (p.slots,) and set(phy2log) <= set(range(experts))
        counts = np.bincount(phy2log, minlength=experts)
        assert (counts >= 1).all() and p.logcnt[layer] == counts.tolist()
        for e, row in enumerate(p.log2phy[layer]):
            assert len(row) == p.slots - experts + 1
            assert row[: counts[e]] == np.flatnonzero(phy2log == e).tolist() and set(row[counts[e] :]) <= {-1}
        # each rank holds slots/ranks replicas; rank_load and balance follow from the layout
        share = load[layer] / counts
        rank_load = share[phy2log].reshape(p.ranks, per).sum(1)
        assert len(p.rank_load[layer]) == p.ranks and np.allclose(p.rank_load[layer], rank_load)
        mean = load[layer].sum() / p.ranks
        assert p.balance[layer] == pytest.approx(rank_load.max() / mean if mean > 0 else 1.0)
        if hierarchical:  # each node holds groups/nodes whole groups, replicas on their group's node
            node_of_slot = np.arange(p.slots) // (p.slots // p.nodes)
            gsize = experts // p.groups
            for g in range(p.groups):
                nodes = set(node_of_slot[np.isin(phy2log, np.arange(g * gsize, (g + 1) * gsize))])
                assert len(nodes) == 1, f"group {g} spans nodes {nodes}"
            for n in range(p.nodes):
                assert len(set(phy2log[node_of_slot == n] // gsize)) == p.groups // p.nodes


@pytest.mark.parametrize("name,load,slots,ranks,nodes,groups", CASES, ids=[c[0] for c in CASES])
def test_valid_no_worse_than_eplb_and_not_below_the_bound(name, load, slots, ranks, nodes, groups):
    opts = dict(slots=slots, ranks=ranks, nodes=nodes, groups=groups)
    ours, base = place_experts(load, **opts), eplb_baseline(load, **opts)
    check_valid(ours, load)
    check_valid(base, load)
    assert ours.lower_bound == base.lower_bound
    for layer in range(len(load)):
        assert ours.balance[layer] <= base.balance[layer] + 1e-12
        assert ours.balance[layer] >= ours.lower_bound[layer] - 1e-9
        assert base.balance[layer] >= base.lower_bound[layer] - 1e-9
        assert ours.unbalanced[layer] >= 1.0 - 1e-12


def test_uniform_load_is_perfect():
    p = place_experts(np.full((2, 16), 100.0), slots=24, ranks=8)
    assert p.balance == pytest.approx([1.0, 1.0]) and p.lower_bound == pytest.approx([1.0, 1.0])


def test_design_example_eplb_figures():
    hier = eplb_baseline(W, slots=16, ranks=8, nodes=2, groups=4)
    assert hier.phy2log == W_PHY2LOG
    assert [round(b, 3) for b in hier.balance] == [1.208, 1.242]
    glob = eplb_baseline(W, slots=16, ranks=8)
    assert [round(b, 3) for b in glob.balance] == [1.073, 1.190]
    assert hier.logcnt[0] == np.bincount(W_PHY2LOG[0], minlength=12).tolist()


def _optimum_two_per_rank(w: np.ndarray, slots: int, ranks: int) -> float:
    """Exhaustive best max rank load with two slots per rank: every replica-count vector, replicas paired
    heaviest with lightest (optimal for pairs)."""
    best = np.inf
    for cuts in itertools.combinations(range(1, slots), len(w) - 1):
        counts = np.diff((0, *cuts, slots))
        p = np.sort(np.repeat(w / counts, counts))
        best = min(best, (p[:ranks] + p[::-1][:ranks]).max())
    return best / (w.sum() / ranks)


def test_design_example_global_reaches_the_exhaustive_optimum():
    ours = place_experts(W, slots=16, ranks=8)
    optimum = [_optimum_two_per_rank(np.array(row, float), 16, 8) for row in W]
    assert [round(o, 3) for o in optimum] == [1.053, 1.190]  # EPLB: 1.073, 1.190
    assert ours.balance == pytest.approx(optimum, abs=1e-12)
    assert all(lb <= o + 1e-12 for lb, o in zip(ours.lower_bound, optimum, strict=True))


def test_design_example_hierarchical_reaches_the_exhaustive_optimum():
    ours = place_experts(W, slots=16, ranks=8, nodes=2, groups=4)
    check_valid(ours, np.array(W, float))
    optimum = []
    for row in np.array(W, float):  # 3 ways to put 4 groups of 3 experts on 2 nodes of 4 ranks, 8 slots each
        best = np.inf
        for pair in ((0, 1), (0, 2), (0, 3)):
            rest = tuple(g for g in range(4) if g not in pair)
            peaks = []
            for block in (pair, rest):
                w = row[[e for g in block for e in range(3 * g, 3 * g + 3)]]
                peaks.append(_optimum_two_per_rank(w, 8, 4) * w.sum() / 4)
            best = min(best, max(peaks))
        optimum.append(best / (row.sum() / 8))
    assert [round(o, 3) for o in optimum] == [1.169, 1.242]  # EPLB: 1.208, 1.242
    assert ours.balance == pytest.approx(optimum, abs=1e-12)
    assert all(lb <= o + 1e-12 for lb, o in zip(ours.lower_bound, optimum, strict=True))


@pytest.mark.parametrize("seed", range(6))
def test_bound_is_below_the_exhaustive_optimum(seed):
    rng = np.random.default_rng(seed)
    experts, ranks = 6, 4 + seed % 2
    load = rng.integers(0, 100, size=(1, experts)).astype(float) * rng.choice([1, 10], size=experts)
    p = place_experts(load, slots=2 * ranks, ranks=ranks)
    optimum = _optimum_two_per_rank(load[0], 2 * ranks, ranks)
    assert p.lower_bound[0] <= optimum + 1e-12 <= p.balance[0] + 2e-12
    assert p.balance[0] <= optimum * 1.01


def test_json_round_trip():
    p = place_experts(zipf(16, 1.0), slots=24, ranks=8, nodes=2, groups=4)
    d = json.loads(json.dumps(p.to_json()))
    assert set(d) == {"phy2log", "log2phy", "logcnt", "ranks", "slots", "nodes", "groups"} | {
        "balance",
        "unbalanced",
        "lower_bound",
        "rank_load",
    }
    assert Placement.from_json(d) == p


@pytest.mark.parametrize(
    "load,opts,message",
    [
        (np.ones((1, 8)), dict(slots=10, ranks=4), "divide evenly over 4 ranks"),
        (np.ones((1, 8)), dict(slots=4, ranks=4), "cannot hold 8 experts"),
        (np.ones((1, 8)), dict(slots=8, ranks=4, nodes=3), "over 3 nodes"),
        (np.ones((1, 8)), dict(slots=8, ranks=4, groups=3), "into 3 groups"),
        ([[1.0, -1.0]], dict(slots=2, ranks=2), "negative"),
        ([[1.0, float("nan")]], dict(slots=2, ranks=2), "non-finite"),
        ([[1.0, float("inf")]], dict(slots=2, ranks=2), "non-finite"),
        ([1.0, 2.0], dict(slots=2, ranks=2), "matrix"),
        ([[1.0, 2.0], [3.0]], dict(slots=2, ranks=2), "matrix"),
    ],
)
def test_bad_inputs_raise_one_line(load, opts, message):
    for fn in (place_experts, eplb_baseline):
        with pytest.raises(DscError, match=message) as err:
            fn(load, **opts)
        assert "\n" not in str(err.value)


# -- load files -------------------------------------------------------------------------------------------
def test_load_from_file_formats(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([[1, 2], [3, 4]]))
    (tmp_path / "b.json").write_text(json.dumps({"load": [[1, 2], [3, 4]], "tokens": 10}))
    np.save(tmp_path / "c.npy", np.array([[1, 2], [3, 4]], dtype=np.int64))
    for name in ("a.json", "b.json", "c.npy"):
        assert load_from_file(tmp_path / name).tolist() == [[1.0, 2.0], [3.0, 4.0]]


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("ragged.json", "[[1, 2], [3]]", "matrix"),
        ("flat.json", "[1, 2, 3]", "matrix"),
        ("negative.json", "[[1, -2]]", "negative"),
        ("nan.json", "[[1, NaN]]", "non-finite"),
        ("text.json", '[["a", "b"]]', "matrix"),
        ("nokey.json", '{"counts": [[1, 2]]}', "matrix"),
        ("broken.json", "[[1, 2", "cannot read"),
        ("empty.json", "[]", "matrix"),
        ("missing.json", None, "cannot read"),
    ],
)
def test_load_from_file_errors_name_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(DscError, match=message) as err:
        load_from_file(path)
    assert name in str(err.value) and "\n" not in str(err.value)


def test_load_from_npy_errors(tmp_path):
    np.save(tmp_path / "bad.npy", np.array([[1.0, np.inf]]))
    with pytest.raises(DscError, match="bad.npy: .*non-finite"):
        load_from_file(tmp_path / "bad.npy")


# -- the pass ---------------------------------------------------------------------------------------------
def moe_graph(layers: int, experts: int = 8, hidden: int = 4) -> Graph:
    """Routers only: what the pass reads (one MOE_ROUTE per MoE layer and its num_experts)."""
    b = GraphBuilder(Graph("routers"))
    x = b.input("x", DType.F32, ("batch", "seq", hidden))
    attrs = dict(num_experts=experts, top_k=2, n_group=1, topk_group=1, scoring="sigmoid", method="noaux_tc")
    attrs |= dict(norm_topk_prob=True, scaling=1.0)
    for layer in range(layers):
        t = torch.randn(experts, hidden, generator=torch.Generator().manual_seed(layer))
        gate = b.weight(f"layers.{layer}.gate", DType.F32, (experts, hidden), Constant(t, f"gate{layer}"))
        weights, ids = b.op(Op.MOE_ROUTE, [x, gate], attrs).outputs
        b.output(weights)
        b.output(ids)
    return b.graph


def test_pass_records_the_placement():
    g = moe_graph(2)
    verify(g)
    load = zipf(8, 1.0)
    result = ExpertPlacementPass.from_load(load, slots=12, ranks=4).run(g)
    assert result.modified and result.stats["layers"] == 2
    expected = place_experts(load, slots=12, ranks=4)
    assert result.graph.meta["placement"] == expected
    assert result.stats["balance"] == expected.balance
    verify(result.graph)
    assert result.graph.nodes == g.nodes and "placement" not in g.meta


@pytest.mark.parametrize(
    "layers,experts,reason",
    [(3, 8, "graph has 2 MoE layers, the load 3"), (2, 16, "graph's MoE layers have [8] experts, load 16")],
)
def test_pass_refuses_a_load_of_another_shape(layers, experts, reason):
    g = moe_graph(2)
    result = ExpertPlacementPass.from_load(np.ones((layers, experts)), slots=16, ranks=4).run(g)
    assert not result.modified
    assert result.stats["refused"] == reason
    assert result.graph.nodes == g.nodes and "placement" not in result.graph.meta


def test_pass_refuses_a_graph_without_moe():
    b = GraphBuilder(Graph("dense"))
    b.output(b.op(Op.SILU, [b.input("x", DType.F32, ("batch", 4))]).output)
    result = ExpertPlacementPass.from_load(np.ones((1, 4)), slots=4, ranks=2).run(b.graph)
    assert not result.modified and "0 MoE layers" in result.stats["refused"]


def test_pass_bad_options_raise():
    with pytest.raises(DscError, match="divide evenly"):
        ExpertPlacementPass.from_load(np.ones((2, 8)), slots=10, ranks=4).run(moe_graph(2))
