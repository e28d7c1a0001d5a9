"""Every ONNX lowering record against its op's reference: a one-node IR graph with small random inputs, run by
onnxruntime and by the interpreter (ir/ops.py's torch reference implementations).

Tolerance: float32 outputs agree to 1e-5 relative, elementwise or to the output's largest magnitude (an element
that is a sum cancelling to near zero keeps the rounding error of its terms); integer outputs
(the experts moe_route picks) agree exactly. Each op has at least one case, and every variant that lowers
differently has its own: FP8 block scales, int8/int4 blocks, both MoE lowerings, both rope layouts, every
routing method.

Int weights run in MatMulNBits / QMoE at accuracy level 4, which quantizes the activations to int8 per block
as well: those cases allow 2e-2 relative to the output's largest magnitude (about 1/127 per activation block,
summed over blocks), where a wrong bit layout, nibble order or scale placement errs by O(1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from dsc.backends.onnx import LOWERINGS, MOE_LOWERINGS, Lowering, lower_to_onnx
from dsc.backends.onnx_io import save_model
from dsc.ir.graph import Constant, Graph, GraphBuilder, Op, Stacked, Value
from dsc.ir.interpreter import interpret
from dsc.ir.ops import block_scale_shape, quantize_fp8, quantize_int
from dsc.ir.types import DType
from dsc.ir.verify import verify
from dsc.runtime.engine import ort_session

RTOL = 1e-5
INT_RTOL = 2e-2
BS = ("batch", "seq")  # the symbolic leading dims of activations, as the frontend traces them


class OneNode:
    """Builds a graph of one IR node and the feeds for its inputs, from a fixed seed."""

    def __init__(self) -> None:
        self.b = GraphBuilder(Graph("one_node"))
        self.feeds: dict[str, torch.Tensor] = {}
        self.gen = torch.Generator().manual_seed(0)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen)

    def experts(self, *lead: int, k: int, n_exp: int) -> torch.Tensor:
        """k distinct expert ids per token (ScatterElements leaves duplicate indices undefined)."""
        rows = [torch.randperm(n_exp, generator=self.gen)[:k] for _ in range(torch.Size(lead).numel())]
        return torch.stack(rows).reshape(*lead, k)

    def input(self, name: str, t: torch.Tensor, dims: tuple[str, ...] = BS) -> Value:
        v = self.b.input(name, DType.from_torch(t.dtype), dims + tuple(t.shape[len(dims) :]))
        self.feeds[v.name] = t
        return v

    def weight(self, name: str, t: torch.Tensor) -> Value:
        return self.b.weight(name, DType.from_torch(t.dtype), tuple(t.shape), Constant(t, name))

    def fp8_weight(self, name: str, w: torch.Tensor, stacked: bool = False) -> tuple[Value, Value]:
        """DeepSeek's FP8 format: e4m3 values and one float32 scale per 128 x 128 block (expert by expert)."""
        mats = list(w) if w.dim() == 3 else [w]
        q, s = zip(*(quantize_fp8(m) for m in mats), strict=True)
        if w.dim() == 2:
            return self.weight(name, q[0]), self.weight(f"{name}.scale", s[0])
        if not stacked:
            return self.weight(name, torch.stack(q)), self.weight(f"{name}.scale", torch.stack(s))
        return self.stacked(name, q), self.stacked(f"{name}.scale", s)

    def int_weight(self, name: str, w: torch.Tensor, bits: int, block: int) -> tuple[Value, Value]:
        """int levels and one float32 scale per ``block`` inputs of a row (expert by expert when stacked)."""
        mats = list(w) if w.dim() == 3 else [w]
        q, s = zip(*(quantize_int(m, bits, block) for m in mats), strict=True)
        if w.dim() == 2:
            return self.weight(name, q[0]), self.weight(f"{name}.scale", s[0])
        return self.stacked(name, q), self.stacked(f"{name}.scale", s)

    def stacked(self, name: str, parts) -> Value:
        """Experts stacked lazily, as the frontend declares them (the writer lays them out expert by expert)."""
        source = Stacked(name, tuple(Constant(p, f"{name}.{i}") for i, p in enumerate(parts)))
        return self.b.weight(name, DType.from_torch(parts[0].dtype), (len(parts), *parts[0].shape), source)

    def node(self, op: Op, inputs: list[Value], attrs: dict | None = None) -> Graph:
        self.b.graph.outputs = list(self.b.op(op, inputs, attrs).outputs)
        return self.b.graph


@dataclass(frozen=True)
class Case:
    op: Op
    build: Callable[[OneNode], Graph]
    moe_lowering: str = "contrib"
    rtol: float = RTOL


CASES: dict[str, Case] = {}


def case(op: Op, name: str | None = None, moe_lowering: str = "contrib", rtol: float = RTOL):
    def register(build: Callable[[OneNode], Graph]) -> Callable[[OneNode], Graph]:
        CASES[name or op.value] = Case(op, build, moe_lowering, rtol)
        return build

    return register


# -- dense ops --------------------------------------------------------------------------------------
@case(Op.EMBEDDING)
def _(g: OneNode) -> Graph:
    return g.node(
        Op.EMBEDDING, [g.input("ids", torch.randint(0, 10, (2, 3), generator=g.gen)), g.weight("t", g.randn(10, 8))]
    )


for _bits in (8, 4):  # GatherBlockQuantized dequantizes exactly: float32 tolerance
    case(Op.EMBEDDING, f"embedding-int{_bits}")(
        lambda g, bits=_bits: g.node(
            Op.EMBEDDING,
            [
                g.input("ids", torch.randint(0, 10, (2, 3), generator=g.gen)),
                *g.int_weight("t", g.randn(10, 64), bits, 32),
            ],
            {"bits": bits, "block": 32},
        )
    )


@case(Op.LINEAR)
def _(g: OneNode) -> Graph:
    return g.node(Op.LINEAR, [g.input("x", g.randn(2, 3, 16)), g.weight("w", g.randn(8, 16))])


@case(Op.LINEAR, "linear-fp8")
def _(g: OneNode) -> Graph:
    # 130 x 256: two blocks along each axis, the last output block partial
    return g.node(Op.LINEAR, [g.input("x", g.randn(2, 3, 256)), *g.fp8_weight("w", g.randn(130, 256) / 16)])


for _bits in (8, 4):
    # K = 80 with block 32: two full blocks and a partial one (MatMulNBits pads it with the zero point)
    case(Op.LINEAR, f"linear-int{_bits}", rtol=INT_RTOL)(
        lambda g, bits=_bits: g.node(
            Op.LINEAR,
            [g.input("x", g.randn(2, 3, 80)), *g.int_weight("w", g.randn(24, 80) / 9, bits, 32)],
            {"bits": bits, "block": 32},
        )
    )


@case(Op.HEAD_LINEAR)
def _(g: OneNode) -> Graph:
    return g.node(Op.HEAD_LINEAR, [g.input("x", g.randn(2, 3, 4, 8)), g.weight("w", g.randn(4, 6, 8))])


@case(Op.RMS_NORM)
def _(g: OneNode) -> Graph:
    return g.node(Op.RMS_NORM, [g.input("x", g.randn(2, 3, 16)), g.weight("w", g.randn(16) + 1)], {"eps": 1e-6})


def _rope(g: OneNode, shape: tuple[int, ...], interleaved: bool, scaling: float) -> Graph:
    pos = g.input("position_ids", torch.randint(0, 50, (2, 3), generator=g.gen))
    attrs = {"inv_freq": (1.0, 0.3, 0.05, 0.01), "scaling": scaling, "interleaved": interleaved}
    return g.node(Op.ROPE, [g.input("x", g.randn(*shape)), pos], attrs)


@case(Op.ROPE, "rope-interleaved")
def _(g: OneNode) -> Graph:
    return _rope(g, (2, 3, 4, 8), interleaved=True, scaling=1.0)  # DeepSeek: [b, s, heads, d]


@case(Op.ROPE, "rope-half-split")
def _(g: OneNode) -> Graph:
    return _rope(g, (2, 3, 8), interleaved=False, scaling=0.8)  # rotate_half, rank 3, yarn's mscale


def _mask(g: OneNode) -> Value:
    """[2, 5] padding mask: row 0 right-padded (its last key), row 1 left-padded so that its first new query
    sees no key at all (that row must stay finite)."""
    mask = torch.tensor([[1, 1, 1, 1, 0], [0, 0, 0, 1, 1]])
    return g.input("attention_mask", mask, ("batch", "total"))


def _attention(g: OneNode, kv_heads: int) -> Graph:
    q = g.input("q", g.randn(2, 3, 4, 8))
    k = g.input("k", g.randn(2, kv_heads, 5, 8), ("batch", kv_heads, "total"))  # 2 cached tokens before 3 new
    v = g.input("v", g.randn(2, kv_heads, 5, 6), ("batch", kv_heads, "total"))
    return g.node(Op.ATTENTION, [q, k, v, _mask(g)], {"scale": 0.35})


@case(Op.ATTENTION, "attention-cache")
def _(g: OneNode) -> Graph:
    return _attention(g, kv_heads=4)


@case(Op.ATTENTION, "attention-cache-one-kv-head")
def _(g: OneNode) -> Graph:
    return _attention(g, kv_heads=1)  # MLA absorbed: one shared latent head


for _dq in (10, 9):  # the latent as key and value halves; 9: an odd latent with its zero column
    case(Op.ATTENTION, f"attention-joint-kv-{_dq}")(
        lambda g, dq=_dq: g.node(
            Op.ATTENTION,
            [
                g.input("q", g.randn(2, 3, 4, dq)),
                g.input("k", g.randn(2, 1, 5, 5), ("batch", 1, "total")),
                g.input(
                    "v", torch.cat([g.randn(2, 1, 5, dq - 5), torch.zeros(2, 1, 5, 10 - dq)], -1), ("batch", 1, "total")
                ),
                _mask(g),
            ],
            {"scale": 0.35, "joint_kv": True},
        )
    )


@case(Op.CACHE_APPEND)
def _(g: OneNode) -> Graph:
    # 2 cached + 2 new tokens, a mask of 5: one empty slot between them (genai's un-run sampled token)
    past = g.input("past", g.randn(2, 3, 2, 4), ("batch", 3, "past"))
    new = g.input("new", g.randn(2, 3, 2, 4), ("batch", 3, "seq"))
    mask = g.input("attention_mask", torch.ones(2, 5, dtype=torch.int64), ("batch", "total"))
    return g.node(Op.CACHE_APPEND, [past, new, mask])


@case(Op.ATTENTION, "attention-empty-cache-slot")
def _(g: OneNode) -> Graph:
    # key slot 2 is empty (zeros): hidden from every query though the mask says 1
    k = g.randn(2, 1, 5, 8)
    k[:, :, 2] = 0
    q = g.input("q", g.randn(2, 2, 4, 8))
    keys = g.input("k", k, ("batch", 1, "total"))
    return g.node(
        Op.ATTENTION,
        [q, keys, keys, g.input("attention_mask", torch.ones(2, 5, dtype=torch.int64), ("batch", "total"))],
        {"scale": 0.35},
    )


@case(Op.TRANSPOSE)
def _(g: OneNode) -> Graph:
    return g.node(Op.TRANSPOSE, [g.input("x", g.randn(2, 3, 4, 5))], {"perm": (0, 2, 1, 3)})


@case(Op.PAD)
def _(g: OneNode) -> Graph:
    return g.node(Op.PAD, [g.input("x", g.randn(2, 3, 5))], {"after": 3})


@case(Op.ATTENTION, "attention-values-are-keys")
def _(g: OneNode) -> Graph:
    q = g.input("q", g.randn(2, 3, 4, 8))
    k = g.input("k", g.randn(2, 1, 5, 8), ("batch", 1, "total"))
    return g.node(Op.ATTENTION, [q, k, k, _mask(g)], {"scale": 0.35})  # values are the keys' rows


def _index_topk(g: OneNode, q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, top_k: int) -> Graph:
    # the indexer cache head-major [b, 1, T, d]; row 1 left-padded (its first key): never selected before real keys
    qv, kv = g.input("q", q), g.input("k", k.unsqueeze(1), ("batch", 1, "total"))
    wv = g.input("w", w)
    mask = torch.ones(k.shape[0], k.shape[1], dtype=torch.int64)
    mask[1, 0] = 0
    mv = g.input("attention_mask", mask, ("batch", "total"))
    return g.node(Op.INDEX_TOPK, [qv, kv, wv, mv], {"top_k": top_k, "scale": 0.3, "weight_scale": 0.5})


@case(Op.INDEX_TOPK, "index_topk-below-context")
def _(g: OneNode) -> Graph:  # 6 cached + 3 new keys, top 4: prompt rows and cached rows both select
    return _index_topk(g, g.randn(2, 3, 5, 8), g.randn(2, 9, 8), g.randn(2, 3, 5), top_k=4)


@case(Op.INDEX_TOPK, "index_topk-covers-context")
def _(g: OneNode) -> Graph:  # top_k > T: every key, later ones (at -inf) last, lowest position first
    return _index_topk(g, g.randn(2, 3, 5, 8), g.randn(2, 4, 8), g.randn(2, 3, 5), top_k=16)


@case(Op.INDEX_TOPK, "index_topk-static-k", moe_lowering="gather")
def _(g: OneNode) -> Graph:  # the standard-ops (TensorRT) flavour: constant K, equal to the reference when T >= k
    return _index_topk(g, g.randn(2, 3, 5, 8), g.randn(2, 9, 8), g.randn(2, 3, 5), top_k=4)


@case(Op.INDEX_TOPK, "index_topk-exact-ties")
def _(g: OneNode) -> Graph:
    # Keys repeat exactly (rows 0 = 3 = 6, 1 = 4 = 7) and positive head weights on queries pointing away from
    # key 2/5/8 make many scores exactly 0 (every ReLU off): the engine must pick the tied keys lowest position
    # first, as the interpreter's stable sort does.
    base = g.randn(3, 8)
    k = base.repeat(1, 3, 1).reshape(1, 9, 8).expand(2, 9, 8).contiguous()
    return _index_topk(g, g.randn(2, 3, 5, 8), k, g.randn(2, 3, 5).abs(), top_k=5)


def _sparse(g: OneNode, kv_heads: int, values_are_keys: bool = False, seq: int = 3, joint: bool = False) -> Graph:
    q = g.input("q", g.randn(2, seq, 4, 10 if joint else 8))
    # head-major caches [b, Hk, T, d], cached tokens in front of the new ones
    k = g.input("k", g.randn(2, kv_heads, 7, 5 if joint else 8), ("batch", kv_heads, "total"))
    dv = 5 if joint else 6
    v = k if values_are_keys else g.input("v", g.randn(2, kv_heads, 7, dv), ("batch", kv_heads, "total"))
    # top 3 of 7 per query: the query's own key, then 2 others, some after the query (prompt rows with fewer
    # earlier keys select later ones) or padded (row 1's first two keys)
    rows = []
    for _ in range(2):
        for i in range(seq):
            own = 7 - seq + i
            others = [int(j) for j in torch.randperm(7, generator=g.gen) if int(j) != own][:2]
            rows.append([own, *others])
    i = g.input("idx", torch.tensor(rows).reshape(2, seq, 3))
    mask = torch.ones(2, 7, dtype=torch.int64)
    mask[1, :2] = 0
    m = g.input("attention_mask", mask, ("batch", "total"))
    return g.node(Op.SPARSE_ATTENTION, [q, k, v, m, i], {"scale": 0.35, **({"joint_kv": True} if joint else {})})


@case(Op.SPARSE_ATTENTION, "sparse_attention-per-head")
def _(g: OneNode) -> Graph:
    return _sparse(g, kv_heads=4)


@case(Op.SPARSE_ATTENTION, "sparse_attention-values-are-keys")
def _(g: OneNode) -> Graph:
    return _sparse(g, kv_heads=1, values_are_keys=True)  # mla-absorb: the selected latent rows


@case(Op.SPARSE_ATTENTION, "sparse_attention-decode-per-head")
def _(g: OneNode) -> Graph:  # one new token: the gather branch
    return _sparse(g, kv_heads=4, seq=1)


@case(Op.SPARSE_ATTENTION, "sparse_attention-decode-values-are-keys")
def _(g: OneNode) -> Graph:
    return _sparse(g, kv_heads=1, values_are_keys=True, seq=1)


@case(Op.SPARSE_ATTENTION, "sparse_attention-joint-kv")
def _(g: OneNode) -> Graph:  # mla-absorb under genai's convention: the latent as key and value halves
    return _sparse(g, kv_heads=1, joint=True)


@case(Op.SPARSE_ATTENTION, "sparse_attention-decode-joint-kv")
def _(g: OneNode) -> Graph:
    return _sparse(g, kv_heads=1, joint=True, seq=1)


@case(Op.LAYER_NORM)
def _(g: OneNode) -> Graph:
    x = g.input("x", g.randn(2, 3, 10))
    return g.node(Op.LAYER_NORM, [x, g.weight("w", g.randn(10)), g.weight("b", g.randn(10))], {"eps": 1e-6})


@case(Op.ADD)
def _(g: OneNode) -> Graph:
    return g.node(Op.ADD, [g.input("a", g.randn(2, 3, 8)), g.input("b", g.randn(2, 3, 8))])


@case(Op.MUL)
def _(g: OneNode) -> Graph:
    return g.node(Op.MUL, [g.input("a", g.randn(2, 3, 8)), g.weight("w", g.randn(8))])  # a weight, broadcast


@case(Op.SILU)
def _(g: OneNode) -> Graph:
    return g.node(Op.SILU, [g.input("x", g.randn(2, 3, 8))])


@case(Op.SPLIT)
def _(g: OneNode) -> Graph:
    return g.node(Op.SPLIT, [g.input("x", g.randn(2, 3, 10))], {"axis": -1, "sizes": (4, 6)})


@case(Op.CONCAT)
def _(g: OneNode) -> Graph:
    past = g.input("past", g.randn(2, 2, 4, 8), ("batch", "past"))  # the KV cache append: past + seq
    return g.node(Op.CONCAT, [past, g.input("new", g.randn(2, 3, 4, 8))], {"axis": 1})


@case(Op.RESHAPE)
def _(g: OneNode) -> Graph:
    return g.node(Op.RESHAPE, [g.input("x", g.randn(2, 3, 12))], {"shape": (0, 0, 3, 4)})


@case(Op.EXPAND)
def _(g: OneNode) -> Graph:
    return g.node(Op.EXPAND, [g.input("x", g.randn(2, 3, 1, 4))], {"axis": 2, "size": 3})


# -- MoE --------------------------------------------------------------------------------------------
def _route(g: OneNode, scoring: str, method: str, n_group: int, topk_group: int, bias: bool) -> Graph:
    x, gate = g.input("x", g.randn(2, 3, 16)), g.weight("gate", g.randn(8, 16))
    extra = [g.weight("bias", g.randn(8) / 4)] if bias else []
    attrs = dict(
        num_experts=8,
        top_k=3,
        n_group=n_group,
        topk_group=topk_group,
        scoring=scoring,
        method=method,
        norm_topk_prob=scoring == "sigmoid",
        scaling=2.5,
    )
    return g.node(Op.MOE_ROUTE, [x, gate, *extra], attrs)


@case(Op.MOE_ROUTE, "moe_route-sigmoid-noaux_tc-groups")
def _(g: OneNode) -> Graph:
    return _route(g, "sigmoid", "noaux_tc", n_group=4, topk_group=2, bias=True)  # DeepSeek-V3


@case(Op.MOE_ROUTE, "moe_route-sigmoid-noaux_tc-one-group")
def _(g: OneNode) -> Graph:
    return _route(g, "sigmoid", "noaux_tc", n_group=1, topk_group=1, bias=True)


@case(Op.MOE_ROUTE, "moe_route-softmax-greedy")
def _(g: OneNode) -> Graph:
    return _route(g, "softmax", "greedy", n_group=1, topk_group=1, bias=False)  # DeepSeek-V2-Lite


@case(Op.MOE_ROUTE, "moe_route-softmax-group_limited_greedy")
def _(g: OneNode) -> Graph:
    return _route(g, "softmax", "group_limited_greedy", n_group=4, topk_group=2, bias=False)  # DeepSeek-V2


@case(Op.MOE_COMBINE)
def _(g: OneNode) -> Graph:
    w = g.input("w", g.randn(2, 3, 2).abs())
    idx = g.input("idx", g.experts(2, 3, k=2, n_exp=4))
    ys = [g.input(f"y{e}", g.randn(2, 3, 8)) for e in range(4)]
    return g.node(Op.MOE_COMBINE, [w, idx, *ys], {"num_experts": 4})


def _experts(
    g: OneNode, hidden: int, inter: int, fp8: bool = False, stacked: bool = False, bits: int = 0, block: int = 16
) -> Graph:
    n_exp, k = 4, 2
    x = g.input("x", g.randn(2, 3, hidden))
    w, idx = g.input("w", g.randn(2, 3, k).abs()), g.input("idx", g.experts(2, 3, k=k, n_exp=n_exp))
    mats = {"gate": (n_exp, inter, hidden), "up": (n_exp, inter, hidden), "down": (n_exp, hidden, inter)}
    if fp8:
        pairs = [g.fp8_weight(name, g.randn(*shape) / shape[-1] ** 0.5, stacked) for name, shape in mats.items()]
        weights = [p[0] for p in pairs] + [p[1] for p in pairs]  # gate, up, down, then their scales
        assert weights[3].type.shape == block_scale_shape(mats["gate"])
    elif bits:
        pairs = [g.int_weight(name, g.randn(*shape) / shape[-1] ** 0.5, bits, block) for name, shape in mats.items()]
        weights = [p[0] for p in pairs] + [p[1] for p in pairs]
        return g.node(Op.MOE_EXPERTS, [x, w, idx, *weights], {"num_experts": n_exp, "bits": bits, "block": block})
    elif stacked:
        weights = [g.stacked(name, list(g.randn(*shape) / shape[-1] ** 0.5)) for name, shape in mats.items()]
    else:
        weights = [g.weight(name, g.randn(*shape) / shape[-1] ** 0.5) for name, shape in mats.items()]
    return g.node(Op.MOE_EXPERTS, [x, w, idx, *weights], {"num_experts": n_exp})


for _lowering in MOE_LOWERINGS:
    case(Op.MOE_EXPERTS, f"moe_experts-{_lowering}", _lowering)(lambda g: _experts(g, hidden=16, inter=8))
    case(Op.MOE_EXPERTS, f"moe_experts-{_lowering}-stacked", _lowering)(
        lambda g: _experts(g, hidden=16, inter=8, stacked=True)
    )
    # 160 x 136: two blocks along each axis, both partial, so the per-row scale layouts are exercised
    case(Op.MOE_EXPERTS, f"moe_experts-{_lowering}-fp8", _lowering)(
        lambda g: _experts(g, hidden=160, inter=136, fp8=True)
    )
    case(Op.MOE_EXPERTS, f"moe_experts-{_lowering}-fp8-stacked", _lowering)(
        lambda g: _experts(g, hidden=160, inter=136, fp8=True, stacked=True)
    )
    for _bits in (8, 4):
        case(Op.MOE_EXPERTS, f"moe_experts-{_lowering}-int{_bits}", _lowering, rtol=INT_RTOL)(
            lambda g, bits=_bits: _experts(g, hidden=64, inter=32, bits=bits, block=16)
        )


# -- the tests --------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", list(Op), ids=lambda op: op.value)
def test_every_op_has_one_lowering_record_and_a_case(op: Op):
    assert op in LOWERINGS, f"{op.value} has no ONNX lowering record"
    rec = LOWERINGS[op]
    assert rec.op == op
    assert any(c.op == op for c in CASES.values()), f"{op.value} has no case in {__name__}"


def test_every_moe_lowering_has_cases():
    assert {c.moe_lowering for c in CASES.values() if c.op == Op.MOE_EXPERTS} == set(MOE_LOWERINGS)


@pytest.mark.parametrize("name", list(CASES))
def test_lowering_matches_reference(name: str, tmp_path: Path):
    c, g = CASES[name], OneNode()
    graph = c.build(g)
    verify(graph)
    assert [n.op for n in graph.nodes] == [c.op]
    model, inits = lower_to_onnx(graph, moe_lowering=c.moe_lowering)
    save_model(model, inits, tmp_path / "m.onnx")
    session = ort_session(tmp_path / "m.onnx", threads=1)
    got = session.run([v.name for v in graph.outputs], {k: t.numpy() for k, t in g.feeds.items()})
    want = interpret(graph, g.feeds)
    for v, out in zip(graph.outputs, got, strict=True):
        ref = want[v.name]
        assert tuple(out.shape) == tuple(ref.shape), v.name
        if ref.dtype.is_floating_point:
            torch.testing.assert_close(
                torch.from_numpy(out),
                ref,
                rtol=c.rtol,
                atol=c.rtol * ref.abs().max().item(),
                msg=lambda m, name=v.name: f"{name}: {m}",
            )
        else:
            assert torch.equal(torch.from_numpy(out), ref), f"{v.name}: {out} != {ref}"


@pytest.mark.parametrize("form", ["gather", "mask"])
@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.op == Op.SPARSE_ATTENTION])
def test_both_sparse_prefill_forms_match_reference(name: str, form: str, tmp_path: Path, monkeypatch):
    """DSA's prefill form is a measured choice (backends/onnx.py SPARSE_PREFILL); the other must stay correct."""
    import dsc.backends.onnx as onnx_backend

    monkeypatch.setattr(onnx_backend, "SPARSE_PREFILL", form)
    test_lowering_matches_reference(name, tmp_path)


def test_a_lowering_that_leaves_its_output_unwritten_is_caught(monkeypatch):
    half_done = Lowering(Op.SILU, lambda t, n, ins: t.op("Sigmoid", ins))  # forgot the Mul into the IR output
    monkeypatch.setitem(LOWERINGS, Op.SILU, half_done)
    with pytest.raises(AssertionError, match="unwritten"):
        lower_to_onnx(CASES["silu"].build(OneNode()))
