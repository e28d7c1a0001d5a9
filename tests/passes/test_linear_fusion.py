"""linear-fusion alone: linears reading one input become one linear + split; interpreter equality within 1e-5."""

import pytest
import torch
from dsc.commands.quant_report import weight_errors
from dsc.errors import CompileError
from dsc.frontends.trace import step_feeds
from dsc.ir import Constant, DType, Graph, GraphBuilder, Op, interpret, verify
from dsc.ir.ops import quantize_fp8
from dsc.passes.expert_fusion import ExpertFusionPass
from dsc.passes.fp8_quantize import Fp8QuantizePass
from dsc.passes.linear_fusion import LinearFusionPass
from dsc.passes.manager import PassManager
from dsc.passes.mla_absorb import MlaAbsorbPass
from dsc.passes.pipeline import build_pipeline
from graphs import KV_LORA, Q_LORA, ROPE, H, hand_built_mla, hand_built_moe, traced_tiny

RTOL = 1e-5


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _random_past(g: Graph, batch: int, past: int, seed: int) -> dict[str, torch.Tensor]:
    """A random cache of ``past`` tokens for every cache input (head-major [batch, heads, past, dim])."""
    gen = torch.Generator().manual_seed(seed)
    return {
        v.name: torch.randn([{"batch": batch, "past": past}.get(d, d) for d in v.type.shape], generator=gen)
        for v in g.inputs
        if v.name.startswith("past_")
    }


def _mla_feeds(g: Graph, seq: int = 5, past: int = 3) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    feeds = {"x": torch.randn(2, seq, H, generator=gen), "position_ids": torch.arange(past, past + seq).expand(2, seq)}
    feeds["attention_mask"] = torch.ones(2, past + seq, dtype=torch.int64)
    return {**feeds, **_random_past(g, 2, past, seed=1)}


def test_mla_q_a_and_kv_a_fuse_exactly():
    g = hand_built_mla(q_lora=True)
    result = LinearFusionPass().run(g)
    verify(result.graph)
    assert result.modified and result.stats["fused"] == 1 and result.stats["refused"] == {}
    assert g.op_counts()["linear"] - result.graph.op_counts()["linear"] == 1
    # the kv_a output's own split [c | k_pe] joins the fused split: 2 linears + 1 split -> 1 linear + 1 split
    assert len(g.nodes) - len(result.graph.nodes) == 1
    fused = next(n for n in result.graph.nodes if n.op == Op.LINEAR and n.meta.get("from_pass") == "linear-fusion")
    split = next(n for n in result.graph.nodes if n.op == Op.SPLIT and n.inputs[0] == fused.output)
    assert split.attrs["sizes"] == (Q_LORA, KV_LORA, ROPE)
    assert fused.inputs[1].name == "q_a+kv_a" and "q_a" not in result.graph.weights
    w = result.graph.weights["q_a+kv_a"].load()
    assert torch.equal(w, torch.cat([g.weights["q_a"].load(), g.weights["kv_a"].load()]))
    feeds = _mla_feeds(g)
    want, got = interpret(g, feeds), interpret(result.graph, feeds)
    for name in want:
        assert _rel(got[name], want[name]) < RTOL, name


def test_without_q_lora_q_proj_fuses_with_kv_a_and_absorb_still_matches():
    g = hand_built_mla(q_lora=False)
    absorbed = MlaAbsorbPass().run(g).graph
    result = LinearFusionPass().run(absorbed)
    verify(result.graph)
    assert result.stats["fused"] == 1
    feeds = _mla_feeds(absorbed)
    want, got = interpret(absorbed, feeds), interpret(result.graph, feeds)
    for name in want:
        assert _rel(got[name], want[name]) < RTOL, name


def test_routed_experts_are_left_to_expert_fusion_and_shared_gate_up_fuse():
    g = hand_built_moe(experts=4)
    result = LinearFusionPass().run(g)
    verify(result.graph)
    assert result.stats["fused"] == 1  # the shared expert's gate + up
    assert result.stats["routed_expert_linears_left"] == 4 * 3
    assert g.op_counts()["linear"] - result.graph.op_counts()["linear"] == 1
    # expert-fusion still finds every expert branch after linear-fusion (order does not matter for it)
    after = ExpertFusionPass().run(result.graph)
    assert after.stats["fused_layers"] == 1 and after.graph.op_counts()["linear"] == 2
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    assert _rel(interpret(after.graph, {"x": x})["y"], interpret(g, {"x": x})["y"]) < RTOL


@pytest.mark.parametrize("q_lora", [True, False])
def test_traced_model_fuses_and_stays_exact(q_lora):
    g = ExpertFusionPass().run(MlaAbsorbPass().run(traced_tiny(q_lora, yarn=True)).graph).graph
    result = LinearFusionPass().run(g)
    verify(result.graph)
    # per layer one attention pair; layer 0's dense MLP and layer 1's shared expert one gate + up pair each
    assert result.stats["fused"] == 4
    assert g.op_counts()["linear"] - result.graph.op_counts()["linear"] == 4
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(2))
    feeds = step_feeds(g, ids, torch.arange(3, 10).expand(2, 7).contiguous(), _random_past(g, 2, 3, seed=3))
    want, got = interpret(g, feeds), interpret(result.graph, feeds)
    for name in want:
        assert _rel(got[name], want[name]) < RTOL, name


def _fp8_pair(rows_a: int, rows_b: int, *, native: bool = True) -> Graph:
    """x -> linear a, linear b (FP8 with block scales when ``native``), outputs added after a projection."""
    b = GraphBuilder(Graph("fp8"))
    x = b.input("x", DType.F32, ("batch", 64))
    outs = []
    for name, rows, seed in (("a", rows_a, 1), ("b", rows_b, 2)):
        w = torch.randn(rows, 64, generator=torch.Generator().manual_seed(seed)) / 8
        if native:
            q, s = quantize_fp8(w)
            wv = b.weight(f"{name}.weight", DType.F8E4M3, q.shape, Constant(q, name))
            sv = b.weight(f"{name}.weight_scale_inv", DType.F32, s.shape, Constant(s, name + "_s"))
            outs.append(b.op(Op.LINEAR, [x, wv, sv], out_names=[name]).output)
        else:
            outs.append(b.op(Op.LINEAR, [x, b.weight(f"{name}.weight", DType.F32, w.shape, Constant(w, name))]).output)
    b.graph.outputs = outs
    return b.graph


@pytest.mark.parametrize("rows", [(128, 64), (64, 128), (256, 100)])
def test_fp8_linears_fuse_when_scales_concatenate_exactly(rows):
    g = _fp8_pair(*rows)
    result = LinearFusionPass().run(g)
    verify(result.graph)
    assert result.stats["fused"] == 1
    fused = next(n for n in result.graph.nodes if n.op == Op.LINEAR)
    assert len(fused.inputs) == 3 and fused.inputs[2].type.shape == (-(-rows[0] // 128) + -(-rows[1] // 128), 1)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(5))
    want, got = interpret(g, {"x": x}), interpret(result.graph, {"x": x})
    for name in want:  # exact: the same FP8 values and scales, one GEMM
        assert _rel(got[name], want[name]) < RTOL


def test_fp8_linears_with_two_ragged_out_dims_are_refused():
    g = _fp8_pair(100, 60)
    result = LinearFusionPass().run(g)
    assert not result.modified and "not a multiple of 128" in next(iter(result.stats["refused"].values()))
    assert [n.name for n in result.graph.nodes] == [n.name for n in g.nodes]


@pytest.mark.parametrize("quantize_first", [True, False])
def test_fp8_quantize_before_or_after_fusion_keeps_the_report(quantize_first):
    g = _fp8_pair(128, 100, native=False)
    passes = [Fp8QuantizePass(), LinearFusionPass()] if quantize_first else [LinearFusionPass(), Fp8QuantizePass()]
    out = PassManager(passes).run(g)
    linears = [n for n in out.nodes if n.op == Op.LINEAR]
    assert len(linears) == 1 and len(linears[0].inputs) == 3
    errors = weight_errors(out)
    assert len(errors) == (2 if quantize_first else 1)
    assert all(0 < err < 0.04 for _, err in errors)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(5))
    want, got = interpret(g, {"x": x}), interpret(out, {"x": x})
    for name in want:
        assert _rel(got[name], want[name]) < 0.05  # FP8 rounding, not fusion


def test_default_pipeline_runs_it_after_mla_absorb_and_it_can_be_disabled():
    names = [p.name for p in build_pipeline()]
    assert names.index("mla-absorb") < names.index("linear-fusion") < names.index("cleanup")
    assert "linear-fusion" not in [p.name for p in build_pipeline(disable=["linear-fusion"])]
    with pytest.raises(CompileError, match="'mla-absorb' must run before 'linear-fusion'"):
        build_pipeline("linear-fusion,mla-absorb")


@pytest.mark.parametrize("q_lora", [True, False])
def test_after_mla_absorb_with_folds(q_lora):
    # fold-q rewrites the query projection before fusion sees it (without q_lora the folded q_proj then fuses
    # with kv_a_proj); fold-o rewrites o_proj, which reads nothing another linear reads.
    g = MlaAbsorbPass(fold_q=True, fold_o=True).run(traced_tiny(q_lora, yarn=False)).graph
    assert g.meta.get("kv_cache_form") == "latent"
    result = LinearFusionPass().run(g)
    verify(result.graph)
    assert result.stats["fused"] == 4
    ids = torch.randint(0, 256, (1, 4), generator=torch.Generator().manual_seed(4))
    feeds = step_feeds(g, ids, torch.arange(2, 6)[None], _random_past(g, 1, 2, seed=5))
    assert _rel(interpret(result.graph, feeds)["logits"], interpret(g, feeds)["logits"]) < RTOL
