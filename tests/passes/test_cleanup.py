"""The cleanup pass alone, on hand-built graphs (STYLE.md's per-pass recipe)."""

import torch
from dsc.ir import Constant, DType, Graph, GraphBuilder, Op, interpret, verify
from dsc.passes.cleanup import CleanupPass


def graph_with_dead_code() -> Graph:
    b = GraphBuilder(Graph("g"))
    x = b.input("x", DType.F32, ("batch", "seq", 6))
    w = b.weight("w", DType.F32, (6, 6), Constant(torch.randn(6, 6, generator=torch.Generator().manual_seed(0))))
    unused = b.weight("unused", DType.F32, (6, 6), Constant(torch.zeros(6, 6)))
    b.op(Op.LINEAR, [x, unused])  # dead
    r1 = b.op(Op.RESHAPE, [x], {"shape": (0, 0, 2, 3)}).output
    r2 = b.op(Op.RESHAPE, [r1], {"shape": (0, 0, 6)}).output  # reshape of a reshape
    same = b.op(Op.RESHAPE, [r2], {"shape": (0, 0, 6)}).output  # identity
    b.output(b.op(Op.LINEAR, [same, w], out_names=["y"]).output)
    return b.graph


def test_cleanup_removes_dead_and_folds_reshapes():
    g = graph_with_dead_code()
    x = torch.randn(2, 3, 6)
    before = interpret(g, {"x": x})["y"]
    result = CleanupPass().run(g)
    verify(result.graph)
    assert result.modified
    assert result.stats["identity_reshapes"] >= 1
    assert result.stats["dead_nodes"] >= 2
    assert result.graph.op_counts() == {"linear": 1, "reshape": 1} or result.graph.op_counts() == {"linear": 1}
    assert "unused" not in result.graph.weights
    torch.testing.assert_close(interpret(result.graph, {"x": x})["y"], before, rtol=0, atol=0)
    assert len(g.nodes) == 5, "the input graph is left untouched"


def test_cleanup_on_clean_graph_reports_unmodified():
    once = CleanupPass().run(graph_with_dead_code()).graph
    again = CleanupPass().run(once)
    assert not again.modified
    assert again.stats == {"dead_nodes": 0, "identity_reshapes": 0, "folded_reshapes": 0}
