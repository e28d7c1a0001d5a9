"""The pass manager and pipeline: verification after each pass, IR printing and dumping, choosing passes."""

import pytest
from dsc.errors import CompileError, DscError
from dsc.ir import Graph, Node, VerifyError
from dsc.passes.base import PassResult
from dsc.passes.manager import PassManager
from dsc.passes.pipeline import DEFAULT_PIPELINE, REGISTRY, build_pipeline, format_spec
from graphs import hand_built_mla


def test_default_pipeline_and_disable():
    assert [p.name for p in build_pipeline()] == list(DEFAULT_PIPELINE)
    assert "mla-absorb" not in [p.name for p in build_pipeline(disable=["mla-absorb"])]
    assert [p.name for p in build_pipeline(["cleanup"])] == ["cleanup"]
    known = ", ".join(sorted(REGISTRY))
    with pytest.raises(CompileError, match=f"unknown pass 'nope'; known passes: {known}"):
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
        ("linear-fusion", True),
        ("cleanup", False),
    ]
    assert pm.records[0].stats["absorbed"] == 1
    headers = [p for p in printed if p.startswith("// -----")]
    assert headers == [
        "// ----- IR after mla-absorb (changed) -----",
        "// ----- IR after expert-fusion (unchanged) -----",
        "// ----- IR after linear-fusion (changed) -----",
        "// ----- IR after cleanup (unchanged) -----",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "000_input.txt",
        "001_mla-absorb.txt",
        "002_expert-fusion.txt",
        "003_linear-fusion.txt",
        "004_cleanup.txt",
    ]
    assert "past_key_values.0.key: f32[batch,1,past," in (tmp_path / "001_mla-absorb.txt").read_text()


def test_print_ir_after_change_skips_unchanged():
    printed: list[str] = []
    PassManager(build_pipeline(), print_ir_after_change=True, emit=printed.append).run(hand_built_mla())
    assert [p for p in printed if p.startswith("// -----")] == [
        "// ----- IR after mla-absorb (changed) -----",
        "// ----- IR after linear-fusion (changed) -----",
    ]


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

    with pytest.raises(CompileError, match="pass needs requires mla-absorb to run before it"):
        PassManager([NeedsAbsorb()], emit=lambda _: None).run(hand_built_mla())


def test_quantize_inserts_fp8_before_expert_fusion():
    assert [p.name for p in build_pipeline(quantize="fp8")] == [
        "mla-absorb",
        "fp8-quantize",
        "expert-fusion",
        "linear-fusion",
        "cleanup",
    ]
    int4 = build_pipeline(quantize="int4")
    assert [p.name for p in int4] == ["mla-absorb", "expert-fusion", "linear-fusion", "int-quantize", "cleanup"]
    assert int4[3].bits == 4 and int4[3].block_size == 128
    with pytest.raises(CompileError, match="'expert-fusion' must run before 'int-quantize'"):
        build_pipeline("mla-absorb,int-quantize,expert-fusion")


def test_spec_sets_options_by_field_type():
    passes = build_pipeline("mla-absorb{fold-q=true, fold-o=false},expert-fusion,cleanup")
    assert [p.name for p in passes] == ["mla-absorb", "expert-fusion", "cleanup"]
    assert passes[0].fold_q is True and passes[0].fold_o is False
    assert format_spec(passes) == "mla-absorb{fold-q=true},expert-fusion,cleanup"
    assert build_pipeline(format_spec(passes))[0] == passes[0]
    keep = build_pipeline("fp8-quantize{keep=a.weight;b.weight}")[0]
    assert keep.keep == ("a.weight", "b.weight")
    # --pass-option on top of the default pipeline
    (absorb,) = [p for p in build_pipeline(options={"mla-absorb": {"fold-o": "1"}}) if p.name == "mla-absorb"]
    assert absorb.fold_o is True and absorb.fold_q is False


@pytest.mark.parametrize(
    "spec, message",
    [
        ("mla-absorb{fold-q=maybe}", "option 'fold-q' must be true or false, not 'maybe'"),
        ("mla-absorb{fold-x=true}", r"pass 'mla-absorb' has no option 'fold-x' \(its options: fold-o, fold-q\)"),
        ("mla-absorb{fold-q}", "option 'fold-q' of mla-absorb is not key=value"),
        ("mla-absorb{fold-q=true", "is never closed"),
        ("mla-absorb,,cleanup", "expected a pass name"),
        ("cleanup,mla-absorb", "'mla-absorb' must run before 'cleanup'"),
        ("expert-fusion,fp8-quantize", "'fp8-quantize' must run before 'expert-fusion'"),
        ("cleanup,cleanup", "'cleanup' appears twice"),
        ("nope{a=1}", "unknown pass 'nope'"),
    ],
)
def test_bad_specs_are_refused_with_the_reason(spec, message):
    with pytest.raises(CompileError, match=message):
        build_pipeline(spec)


def test_order_constraints_are_checked_by_the_manager():
    from dsc.passes.cleanup import CleanupPass
    from dsc.passes.mla_absorb import MlaAbsorbPass

    with pytest.raises(CompileError, match="'mla-absorb' must run before 'cleanup'"):
        PassManager([CleanupPass(), MlaAbsorbPass()], emit=lambda _: None).run(hand_built_mla())


def test_extra_passes_go_where_the_order_wants_them():
    names = [p.name for p in build_pipeline(extra=[("fp8-quantize", {})])]
    assert names == ["mla-absorb", "fp8-quantize", "expert-fusion", "linear-fusion", "cleanup"]
    with pytest.raises(DscError, match="x: cannot read expert load"):
        build_pipeline(["mla-absorb"], extra=[("expert-placement", {"load": "x"})])
