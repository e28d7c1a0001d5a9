"""The pass manager and pipeline: verification after each pass, IR printing and dumping, choosing passes."""

import pytest
from dsc.errors import CompileError
from dsc.ir import Graph, Node, VerifyError
from dsc.passes.base import PassResult
from dsc.passes.manager import PassManager
from dsc.passes.pipeline import DEFAULT_PIPELINE, build_pipeline
from graphs import hand_built_mla


def test_default_pipeline_and_disable():
    assert [p.name for p in build_pipeline()] == list(DEFAULT_PIPELINE)
    assert "mla-absorb" not in [p.name for p in build_pipeline(disable=["mla-absorb"])]
    assert [p.name for p in build_pipeline(["cleanup"])] == ["cleanup"]
    with pytest.raises(
        CompileError, match="unknown pass 'nope'; known passes: cleanup, expert-fusion, fp8-quantize, mla-absorb"
    ):
        build_pipeline(["nope"])
    with pytest.raises(CompileError, match="--disable-pass: unknown pass"):
        build_pipeline(disable=["nope"])


def test_records_stats_and_prints_ir_after_each_pass(tmp_path):
    printed: list[str] = []
    pm = PassManager(build_pipeline(), print_ir_after_all=True, dump_ir_dir=tmp_path, emit=printed.append)
    pm.run(hand_built_mla())
    assert [(r.name, r.modified) for r in pm.records] == [
        ("mla-absorb", True),
        ("expert-fusion", False),
        ("cleanup", False),
    ]
    assert pm.records[0].stats["absorbed"] == 1
    headers = [p for p in printed if p.startswith("// -----")]
    assert headers == [
        "// ----- IR after mla-absorb (changed) -----",
        "// ----- IR after expert-fusion (unchanged) -----",
        "// ----- IR after cleanup (unchanged) -----",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "000_input.txt",
        "001_mla-absorb.txt",
        "002_expert-fusion.txt",
        "003_cleanup.txt",
    ]
    assert "past_key_values.0.latent" in (tmp_path / "001_mla-absorb.txt").read_text()


def test_print_ir_after_change_skips_unchanged():
    printed: list[str] = []
    PassManager(build_pipeline(), print_ir_after_change=True, emit=printed.append).run(hand_built_mla())
    assert [p for p in printed if p.startswith("// -----")] == ["// ----- IR after mla-absorb (changed) -----"]


class BreakingPass:
    name = "breaks-things"
    requires = ()

    def run(self, graph: Graph) -> PassResult:
        g = graph.clone()
        n = g.nodes[0]
        g.nodes[0] = Node(n.op, n.name, n.inputs[:1], n.outputs, n.attrs)  # drop an input
        return PassResult(g, True)


def test_verifier_names_the_pass_that_broke_the_ir():
    with pytest.raises(VerifyError, match="after pass breaks-things"):
        PassManager([BreakingPass()], emit=lambda _: None).run(hand_built_mla())


def test_requires_is_enforced():
    class NeedsAbsorb(BreakingPass):
        name = "needs"
        requires = ("mla-absorb",)

    with pytest.raises(ValueError, match="requires"):
        PassManager([NeedsAbsorb()], emit=lambda _: None).run(hand_built_mla())


def test_quantize_inserts_fp8_before_expert_fusion():
    assert [p.name for p in build_pipeline(quantize=True)] == ["mla-absorb", "fp8-quantize", "expert-fusion", "cleanup"]
