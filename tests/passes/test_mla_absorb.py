"""mla-absorb alone: a hand-built MLA block and traced tiny models; interpreter equality within 1e-5 rel."""

import itertools

import pytest
import torch
from dsc.ir import Constant, DType, Graph, GraphBuilder, Op, interpret, verify
from dsc.passes.cleanup import CleanupPass
from dsc.passes.mla_absorb import MlaAbsorbPass

N, NOPE, ROPE, V, KV_LORA, Q_LORA, H = 4, 8, 4, 6, 12, 10, 16
RTOL = 1e-5


def _w(b: GraphBuilder, name: str, *shape: int, seed: int):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) / shape[-1] ** 0.5
    return b.weight(name, DType.F32, shape, Constant(t, name))


def hand_built_mla(q_lora: bool = True, scale: float = 0.3) -> Graph:
    """The naive MLA block of DESIGN.md §4, built op by op (cache in, present cache out)."""
    b = GraphBuilder(Graph("mla"))
    x = b.input("x", DType.F32, ("batch", "seq", H))
    pos = b.input("position_ids", DType.I64, ("batch", "seq"))
    past_k = b.input("past_key_values.0.key", DType.F32, ("batch", "past", N, NOPE + ROPE))
    past_v = b.input("past_key_values.0.value", DType.F32, ("batch", "past", N, V))
    rope = {"inv_freq": (1.0, 0.1), "scaling": 1.0, "interleaved": True}
    if q_lora:
        z = b.op(Op.LINEAR, [x, _w(b, "q_a", Q_LORA, H, seed=1)]).output
        z = b.op(Op.RMS_NORM, [z, _w(b, "q_a_norm", Q_LORA, seed=2)], {"eps": 1e-6}).output
        q = b.op(Op.LINEAR, [z, _w(b, "q_b", N * (NOPE + ROPE), Q_LORA, seed=3)]).output
    else:
        q = b.op(Op.LINEAR, [x, _w(b, "q_proj", N * (NOPE + ROPE), H, seed=3)]).output
    q = b.op(Op.RESHAPE, [q], {"shape": (0, 0, N, NOPE + ROPE)}).output
    q_nope, q_pe = b.op(Op.SPLIT, [q], {"axis": -1, "sizes": (NOPE, ROPE)}).outputs
    q_pe = b.op(Op.ROPE, [q_pe, pos], rope).output
    c, k_pe = b.op(
        Op.SPLIT,
        [b.op(Op.LINEAR, [x, _w(b, "kv_a", KV_LORA + ROPE, H, seed=4)]).output],
        {"axis": -1, "sizes": (KV_LORA, ROPE)},
    ).outputs
    k_pe = b.op(Op.ROPE, [b.op(Op.RESHAPE, [k_pe], {"shape": (0, 0, 1, ROPE)}).output, pos], rope).output
    c = b.op(Op.RMS_NORM, [c, _w(b, "kv_a_norm", KV_LORA, seed=5)], {"eps": 1e-6}).output
    kv = b.op(Op.LINEAR, [c, _w(b, "kv_b", N * (NOPE + V), KV_LORA, seed=6)]).output
    kv = b.op(Op.RESHAPE, [kv], {"shape": (0, 0, N, NOPE + V)}).output
    k_nope, v = b.op(Op.SPLIT, [kv], {"axis": -1, "sizes": (NOPE, V)}).outputs
    k = b.op(Op.CONCAT, [k_nope, b.op(Op.EXPAND, [k_pe], {"axis": 2, "size": N}).output], {"axis": -1}).output
    q = b.op(Op.CONCAT, [q_nope, q_pe], {"axis": -1}).output
    k_all = b.op(Op.CONCAT, [past_k, k], {"axis": 1}, out_names=["present.0.key"]).output
    v_all = b.op(Op.CONCAT, [past_v, v], {"axis": 1}, out_names=["present.0.value"]).output
    o = b.op(Op.ATTENTION, [q, k_all, v_all], {"scale": scale}).output
    o = b.op(Op.RESHAPE, [o], {"shape": (0, 0, N * V)}).output
    y = b.op(Op.LINEAR, [o, _w(b, "o_proj", H, N * V, seed=7)], out_names=["y"]).output
    b.graph.outputs = [y, k_all, v_all]
    return b.graph


def run_two_steps(g: Graph, seed: int = 0) -> list[torch.Tensor]:
    """Prefill 5 tokens then decode 2, feeding each step's present cache back; returns every output y."""
    gen = torch.Generator().manual_seed(seed)
    cache = {
        v.name: torch.zeros([2 if d == "batch" else 0 if d == "past" else d for d in v.type.shape])
        for v in g.inputs
        if v.name.startswith("past_key_values.")
    }
    ys, start = [], 0
    for length in (5, 1, 1):
        feeds = {
            "x": torch.randn(2, length, H, generator=gen),
            "position_ids": torch.arange(start, start + length).expand(2, length).contiguous(),
            **cache,
        }
        out = interpret(g, feeds)
        ys.append(out["y"])
        cache = {k: out[k.replace("past_key_values.", "present.")] for k in cache}
        start += length
    return ys


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("q_lora,fold_q,fold_o", list(itertools.product([True, False], repeat=3)))
def test_hand_built_block_absorbs_exactly(q_lora, fold_q, fold_o):
    g = hand_built_mla(q_lora)
    verify(g)
    result = MlaAbsorbPass(fold_q=fold_q, fold_o=fold_o).run(g)
    assert result.modified and result.stats["absorbed"] == 1 and result.stats["refused"] == {}
    assert result.stats["folded_q"] == int(fold_q) and result.stats["folded_o"] == int(fold_o)
    after = CleanupPass().run(result.graph).graph
    verify(after)
    # The cache is the latent: one [batch, past, kv_lora + rope] tensor, nothing per head.
    caches = [v for v in after.inputs if v.name.startswith("past_key_values.")]
    assert [(v.name, v.type.shape) for v in caches] == [("past_key_values.0.latent", ("batch", "past", KV_LORA + ROPE))]
    assert [v.name for v in after.outputs] == ["y", "present.0.latent"]
    # No kv_b_proj product touches the cache path: kv_b is only used through sliced per-head weights.
    assert "kv_b" not in {v.name for n in after.nodes for v in n.inputs}
    assert after.op_counts()["attention"] == 1
    for a, b in zip(run_two_steps(after), run_two_steps(g), strict=True):
        assert _rel(a, b) < RTOL


def test_refuses_attention_without_a_cache_and_says_why():
    b = GraphBuilder(Graph("plain"))
    q = b.input("q", DType.F32, ("batch", "seq", 2, 4))
    k = b.input("k", DType.F32, ("batch", "seq", 2, 4))
    b.output(b.op(Op.ATTENTION, [q, k, k], {"scale": 1.0}).output)
    result = MlaAbsorbPass().run(b.graph)
    assert not result.modified
    assert result.stats["absorbed"] == 0
    (reason,) = result.stats["refused"].values()
    assert "expected concat" in reason
    assert result.graph.nodes == b.graph.nodes
