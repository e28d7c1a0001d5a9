"""mla-absorb alone: a hand-built MLA block and traced tiny models; interpreter equality within 1e-5 rel."""

import itertools

import pytest
import torch
from dsc.frontends.trace import step_feeds
from dsc.ir import DType, Graph, GraphBuilder, Op, interpret, verify
from dsc.passes.cleanup import CleanupPass
from dsc.passes.mla_absorb import MlaAbsorbPass
from graphs import KV_LORA, ROPE, H, hand_built_mla, traced_tiny

RTOL = 1e-5


def run_two_steps(g: Graph, seed: int = 0) -> list[torch.Tensor]:
    """Prefill 5 tokens then decode 2, feeding each step's present cache back; returns every output y. Row 1's
    second prompt token is padding (mask 0): the absorbed block must hide it exactly as the naive one does."""
    gen = torch.Generator().manual_seed(seed)
    cache = {
        v.name: torch.zeros([2 if d == "batch" else 0 if d == "past" else d for d in v.type.shape])
        for v in g.inputs
        if v.name.startswith("past_key_values.")
    }
    ys, start = [], 0
    mask = torch.ones(2, 0, dtype=torch.int64)
    for length in (5, 1, 1):
        new = torch.ones(2, length, dtype=torch.int64)
        if start == 0:
            new[1, 1] = 0
        mask = torch.cat([mask, new], dim=1)
        feeds = {
            "x": torch.randn(2, length, H, generator=gen),
            "position_ids": torch.arange(start, start + length).expand(2, length).contiguous(),
            "attention_mask": mask,
            **cache,
        }
        out = interpret(g, feeds)
        ys.append(out["y"])
        cache = {k: out[k.replace("past_key_values.", "present.")] for k in cache}
        start += length
    return ys


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize(
    "q_lora,fold_q,fold_o,kv_lora",
    [(*flags, KV_LORA) for flags in itertools.product([True, False], repeat=3)] + [(True, False, False, 13)],
)
def test_hand_built_block_absorbs_exactly(q_lora, fold_q, fold_o, kv_lora):
    g = hand_built_mla(q_lora, kv_lora=kv_lora)
    verify(g)
    result = MlaAbsorbPass(fold_q=fold_q, fold_o=fold_o).run(g)
    assert result.modified and result.stats["absorbed"] == 1 and result.stats["refused"] == {}
    assert result.stats["folded_q"] == int(fold_q) and result.stats["folded_o"] == int(fold_o)
    after = CleanupPass().run(result.graph).graph
    verify(after)
    # The cache is the latent, nothing per head: its [c | k_pe] row in two halves (an odd row with one zero
    # column), key [batch, 1, past, half] and value of the same shape, under onnxruntime-genai's names.
    half = (kv_lora + ROPE + 1) // 2
    caches = [v for v in after.inputs if v.name.startswith("past_key_values.")]
    assert [(v.name, v.type.shape) for v in caches] == [
        ("past_key_values.0.key", ("batch", 1, "past", half)),
        ("past_key_values.0.value", ("batch", 1, "past", half)),
    ]
    assert [v.name for v in after.outputs] == ["y", "present.0.key", "present.0.value"]
    assert {(c.role, c.past) for c in after.cache_entries()} == {("key", caches[0].name), ("value", caches[1].name)}
    # No kv_b_proj product touches the cache path: kv_b is only used through sliced per-head weights.
    assert "kv_b" not in {v.name for n in after.nodes for v in n.inputs}
    assert after.op_counts()["attention"] == 1
    for a, b in zip(run_two_steps(after), run_two_steps(g), strict=True):
        assert _rel(a, b) < RTOL


def test_refuses_attention_without_a_cache_and_says_why():
    b = GraphBuilder(Graph("plain"))
    q = b.input("q", DType.F32, ("batch", "seq", 2, 4))
    k = b.input("k", DType.F32, ("batch", 2, "seq", 4))
    mask = b.input("attention_mask", DType.I64, ("batch", "seq"))
    b.output(b.op(Op.ATTENTION, [q, k, k, mask], {"scale": 1.0}).output)
    result = MlaAbsorbPass().run(b.graph)
    assert not result.modified
    assert result.stats["absorbed"] == 0
    (reason,) = result.stats["refused"].values()
    assert "expected cache_append" in reason
    assert result.graph.nodes == b.graph.nodes


@pytest.mark.parametrize("q_lora,yarn", list(itertools.product([True, False], repeat=2)))
def test_traced_model_absorbs_exactly(q_lora, yarn):
    g = traced_tiny(q_lora, yarn)
    result = MlaAbsorbPass().run(g)
    assert result.stats["absorbed"] == 2 and not result.stats["refused"]
    verify(result.graph)
    after = CleanupPass().run(result.graph).graph
    assert all(v.type.shape == ("batch", 1, "past", 12) for v in after.inputs if v.name.startswith("past_"))

    def steps(graph: Graph) -> list[torch.Tensor]:
        caches = [v for v in graph.inputs if v.name.startswith("past_key_values.")]
        past = {
            v.name: torch.zeros([1 if d == "batch" else 0 if d == "past" else d for d in v.type.shape]) for v in caches
        }
        ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(1))
        pos = torch.arange(9)[None]
        outs, start = [], 0
        for length in (6, 1, 1, 1):
            out = interpret(
                graph, step_feeds(graph, ids[:, start : start + length], pos[:, start : start + length], past)
            )
            outs.append(out["logits"])
            past = {k: out[k.replace("past_key_values.", "present.")] for k in past}
            start += length
        return outs

    for a, b in zip(steps(after), steps(g), strict=True):
        assert _rel(a, b) < RTOL
