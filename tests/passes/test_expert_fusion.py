"""expert-fusion alone: per-expert FFN branches become one moe_experts op; interpreter equality within 1e-5."""

import pytest
import torch
from dsc.frontends.trace import step_feeds
from dsc.ir import Op, interpret, verify
from dsc.passes.expert_fusion import ExpertFusionPass
from dsc.passes.mla_absorb import MlaAbsorbPass
from graphs import hand_built_moe, traced_tiny

RTOL = 1e-5


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_hand_built_layer_fuses_exactly():
    g = hand_built_moe(experts=6, top_k=2)
    verify(g)
    result = ExpertFusionPass().run(g)
    verify(result.graph)
    assert result.modified and result.stats["fused_layers"] == 1 and result.stats["refused"] == {}
    # 6 experts x (gate, up, silu, mul, down) + combine -> one moe_experts node
    assert len(g.nodes) - len(result.graph.nodes) == 6 * 5
    assert result.stats["nodes_removed"] == 6 * 5
    counts = result.graph.op_counts()
    assert counts["moe_experts"] == 1 and "moe_combine" not in counts
    assert counts["linear"] == 3  # the shared expert stays as it was
    fused = next(n for n in result.graph.nodes if n.op == Op.MOE_EXPERTS)
    assert [v.type.shape for v in fused.inputs[3:]] == [(6, 8, 16), (6, 8, 16), (6, 16, 8)]
    assert fused.meta["from_pass"] == "expert-fusion"
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    assert _rel(interpret(result.graph, {"x": x})["y"], interpret(g, {"x": x})["y"]) < RTOL
    # stacked weights are the per-expert ones, in order
    gate = result.graph.weights[fused.inputs[3].name].load()
    assert torch.equal(gate[4], g.weights["e4.gate"].load())


def test_refuses_experts_of_different_shapes():
    g = hand_built_moe(odd_expert=True)
    result = ExpertFusionPass().run(g)
    assert not result.modified
    (reason,) = result.stats["refused"].values()
    assert "differ in shape" in reason
    assert [n.name for n in result.graph.nodes] == [n.name for n in g.nodes]


def test_refuses_a_branch_whose_activation_is_not_silu():
    g = hand_built_moe()
    silu = next(n for n in g.nodes if n.op == Op.SILU)
    g.nodes[g.nodes.index(silu)] = type(silu)(Op.MUL, silu.name, (silu.inputs[0], silu.inputs[0]), silu.outputs)
    result = ExpertFusionPass().run(g)
    assert not result.modified and "activation is not silu" in next(iter(result.stats["refused"].values()))


@pytest.mark.parametrize("q_lora,yarn", [(True, True), (False, False)])
def test_traced_model_fuses_every_moe_layer(q_lora, yarn):
    g = MlaAbsorbPass().run(traced_tiny(q_lora, yarn)).graph
    result = ExpertFusionPass().run(g)
    verify(result.graph)
    assert result.stats["fused_layers"] == 1  # traced_tiny: layer 0 dense, layer 1 MoE with 8 experts
    assert len(g.nodes) - len(result.graph.nodes) == 8 * 5
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(2))
    feeds = step_feeds(g, ids, torch.arange(7).expand(2, 7).contiguous())
    assert _rel(interpret(result.graph, feeds)["logits"], interpret(g, feeds)["logits"]) < RTOL
