"""IR data model, verifier, printer and interpreter on hand-built graphs."""

import pytest
import torch
from dsc.ir import (
    Constant,
    DType,
    Graph,
    GraphBuilder,
    Node,
    Op,
    Value,
    VerifyError,
    format_graph,
    interpret,
    verify,
)
from dsc.ir.ops import route
from dsc.ir.types import TensorType, bind_dims, dim_add


def small_graph() -> Graph:
    b = GraphBuilder(Graph("mlp"))
    x = b.input("x", DType.F32, ("batch", "seq", 8))
    w1 = b.weight("w1", DType.F32, (16, 8), Constant(torch.randn(16, 8, generator=torch.Generator().manual_seed(1))))
    w2 = b.weight("w2", DType.F32, (8, 16), Constant(torch.randn(8, 16, generator=torch.Generator().manual_seed(2))))
    h = b.op(Op.SILU, [b.op(Op.LINEAR, [x, w1]).output]).output
    y = b.op(Op.LINEAR, [h, w2], out_names=["y"]).output
    b.output(b.op(Op.ADD, [y, x], out_names=["out"]).output)
    return b.graph


def test_dims_are_canonical_sums():
    assert dim_add("seq", "past") == "past+seq" == dim_add("past", "seq")
    assert dim_add(3, 4) == 7
    assert dim_add("past+seq", 0) == "past+seq"
    env = {}
    assert bind_dims(("batch", "past+seq", 4), (2, 5, 4), {"past": 3, **env}) is None
    assert "expected" in bind_dims(("batch", 4), (2, 5), {})


def test_builder_infers_types_and_verifier_accepts():
    g = small_graph()
    verify(g)
    assert g.outputs[0].type == TensorType(DType.F32, ("batch", "seq", 8))
    assert g.op_counts() == {"add": 1, "linear": 2, "silu": 1}
    assert g.param_count() == 16 * 8 * 2


def test_interpreter_matches_torch():
    g = small_graph()
    x = torch.randn(2, 3, 8)
    w1, w2 = g.weights["w1"].load(), g.weights["w2"].load()
    expected = torch.nn.functional.silu(x @ w1.t()) @ w2.t() + x
    torch.testing.assert_close(interpret(g, {"x": x})["out"], expected, rtol=1e-6, atol=1e-6)


def test_interpreter_rejects_wrong_input_shape():
    with pytest.raises(ValueError, match="expected f32"):
        interpret(small_graph(), {"x": torch.randn(2, 3, 7)})


def test_verifier_names_bad_types():
    g = small_graph()
    n = g.nodes[0]
    bad_out = Value(n.output.name, TensorType(DType.F32, ("batch", "seq", 99)))
    g.nodes[0] = Node(n.op, n.name, n.inputs, (bad_out,), n.attrs)
    with pytest.raises(VerifyError, match=r"linear.*inference says"):
        verify(g)


def test_verifier_catches_use_before_definition():
    g = small_graph()
    g.nodes = g.nodes[::-1]
    with pytest.raises(VerifyError, match="not defined before use"):
        verify(g)


def test_verifier_catches_shape_mismatch_in_op():
    b = GraphBuilder()
    x = b.input("x", DType.F32, ("batch", 8))
    w = b.weight("w", DType.F32, (4, 9), Constant(torch.zeros(4, 9)))
    with pytest.raises(Exception, match="does not match weight"):
        b.op(Op.LINEAR, [x, w])


def test_printer_is_stable_and_readable():
    text = format_graph(small_graph())
    assert text == format_graph(small_graph())
    assert "%y: f32[batch,seq,8] = linear(%silu, %w1)" not in text  # inputs are printed in order
    assert "= linear(%silu, %w2)" in text
    assert "weight %w1: f32[16,8]" in text
    assert text.strip().endswith("return %out\n}")


def test_attention_is_causal_with_cache_offset():
    torch.manual_seed(0)
    b = GraphBuilder()
    q = b.input("q", DType.F32, ("batch", "seq", 2, 4))
    k = b.input("k", DType.F32, ("batch", 2, "total", 4))
    v = b.input("v", DType.F32, ("batch", 2, "total", 3))
    mask = b.input("attention_mask", DType.I64, ("batch", "total"))
    b.output(b.op(Op.ATTENTION, [q, k, v, mask], {"scale": 0.5}, out_names=["o"]).output)
    qs, ks, vs = torch.randn(1, 2, 2, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 3)
    padding = torch.tensor([[1, 0, 1, 1, 1]])  # key 1 is padding: hidden from every query
    out = interpret(b.graph, {"q": qs, "k": ks, "v": vs, "attention_mask": padding})["o"]
    for i in range(2):  # query i sits at absolute position 3 + i and sees keys 0..3+i, except the padding
        seen = [j for j in range(3 + i + 1) if j != 1]
        probs = torch.softmax(torch.einsum("hd,htd->ht", qs[0, i], ks[0][:, seen]) * 0.5, dim=-1)
        want = torch.einsum("ht,htd->hd", probs, vs[0][:, seen])
        torch.testing.assert_close(out[0, i], want, rtol=1e-5, atol=1e-6)


def test_route_sigmoid_group_limited_by_hand():
    # 4 experts in 2 groups, keep 1 group, top-2; bias pushes expert 3's group ahead.
    gate = torch.eye(4)
    x = torch.tensor([[2.0, 1.5, 0.0, -1.0]])
    bias = torch.tensor([0.0, 0.0, 0.6, 0.6])
    attrs = dict(
        num_experts=4,
        top_k=2,
        n_group=2,
        topk_group=1,
        scoring="sigmoid",
        method="noaux_tc",
        norm_topk_prob=True,
        scaling=2.0,
    )
    w, e = route(x, gate, bias, attrs)
    s = torch.sigmoid(x[0])
    # group scores: g0 = s0+s1 = 1.70, g1 = s2+s3+1.2 = 1.97 -> group 1 wins
    assert sorted(e[0].tolist()) == [2, 3]
    expected = torch.stack([s[i] for i in e[0].tolist()])
    torch.testing.assert_close(w[0], 2.0 * expected / expected.sum())
