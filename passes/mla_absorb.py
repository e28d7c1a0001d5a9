"""MLA weight absorption: attend over the compressed latent cache instead of per-head keys and values.

DESIGN.md §4. The naive block up-projects the normalized latent c (kv_lora values per token) with
kv_b_proj into per-head k_nope and v, and caches those. Absorbed, per head h:
    score(h) = (W_UK(h)^T q_nope(h)) . c + q_pe(h) . k_pe        out(h) = W_UV(h) (softmax . c)
so the cache holds only [c | k_pe] (kv_lora + rope values per token, shared by all heads), and
attention becomes multi-query attention with one latent "head". W_UK / W_UV are sliced from kv_b_proj
at compile time. Optionally W_UK is folded into the query projection's nope rows (``fold_q``) and W_UV
into o_proj (``fold_o``); both are exact but grow the matrices (kv_lora > nope), so they are off by
default: benchmarks/bench_mla.py measures the trade.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from dsc.ir.graph import CacheEntry, Graph, GraphBuilder, Node, Op, Transformed, Value
from dsc.ir.ops import dequantize
from dsc.ir.types import DType
from dsc.passes.base import PassResult


@dataclass
class _Mla:
    """The naive MLA block around one attention node, as the frontend traces it."""

    attn: Node
    q_nope: Value  # [b, s, N, nope]
    q_pe: Value  # rotated, [b, s, N, rope]
    q_split: Node  # SPLIT(RESHAPE(LINEAR(z, W_q))) -> q_nope, q_pe (unrotated)
    q_linear: Node | None  # the query projection, when its output feeds only this block
    c_n: Value  # normalized latent [b, s, kv_lora]
    k_pe: Value  # rotated shared rope key [b, s, 1, rope]
    kv_b: Value  # kv_b_proj weight [N*(nope+v), kv_lora]
    kv_b_scale: Value | None  # its FP8 block scales, when the checkpoint stores it in FP8
    past_k: Value
    past_v: Value
    present_k: Value
    present_v: Value
    o_linear: Node | None  # o_proj, when fed by RESHAPE(attention) alone
    heads: int
    nope: int
    v_dim: int


def _only(node: Node | None, op: Op) -> Node:
    if node is None or node.op != op:
        raise _Refuse(f"expected {op.value}, found {node.op.value if node else 'a graph input or weight'}")
    return node


class _Refuse(Exception):
    pass


def _match(g: Graph, attn: Node, producers: dict[str, Node], users: dict[str, list[Node]]) -> _Mla:
    q, k_all, v_all = attn.inputs[:3]  # sparse attention adds the indexer's selection, kept as it is
    cat_k, cat_v = _only(producers.get(k_all.name), Op.CONCAT), _only(producers.get(v_all.name), Op.CONCAT)
    inputs = {v.name for v in g.inputs}
    if len(cat_k.inputs) != 2 or cat_k.inputs[0].name not in inputs or cat_v.inputs[0].name not in inputs:
        raise _Refuse("keys/values are not a graph-input cache concatenated with new tokens")
    if k_all not in g.outputs or v_all not in g.outputs:
        raise _Refuse("the concatenated cache is not returned as present keys/values")
    k_new = _only(producers.get(cat_k.inputs[1].name), Op.CONCAT)
    k_nope, k_pe_wide = k_new.inputs
    expand = _only(producers.get(k_pe_wide.name), Op.EXPAND)
    kv_split = _only(producers.get(k_nope.name), Op.SPLIT)
    if cat_v.inputs[1] != kv_split.outputs[1] or k_nope != kv_split.outputs[0]:
        raise _Refuse("k_nope and v do not come from one split of kv_b_proj's output")
    kv_lin = _only(producers.get(_only(producers.get(kv_split.inputs[0].name), Op.RESHAPE).inputs[0].name), Op.LINEAR)
    c_n, kv_b = kv_lin.inputs[:2]
    kv_b_scale = kv_lin.inputs[2] if len(kv_lin.inputs) > 2 else None
    if kv_b.name not in g.weights:
        raise _Refuse("kv_b_proj is not a weight")
    q_cat = _only(producers.get(q.name), Op.CONCAT)
    q_nope, q_pe = q_cat.inputs
    q_split = _only(producers.get(q_nope.name), Op.SPLIT)
    rope = _only(producers.get(q_pe.name), Op.ROPE)
    if rope.inputs[0] != q_split.outputs[1]:
        raise _Refuse("q_pe is not the rotated second half of the query split")
    q_reshape = _only(producers.get(q_split.inputs[0].name), Op.RESHAPE)
    q_lin = producers.get(q_reshape.inputs[0].name)
    # Folding rewrites the query / output projections in float32; FP8 ones (3 inputs) keep their own form.
    single_use = q_lin is not None and q_lin.op == Op.LINEAR and len(q_lin.inputs) == 2
    single_use = single_use and len(users[q_lin.output.name]) == 1
    o_users = users.get(attn.output.name, [])
    o_lin = None
    if len(o_users) == 1 and o_users[0].op == Op.RESHAPE and len(users[o_users[0].output.name]) == 1:
        cand = users[o_users[0].output.name][0]
        o_lin = cand if cand.op == Op.LINEAR and len(cand.inputs) == 2 and cand.inputs[1].name in g.weights else None
    heads, nope = k_nope.type.shape[2], k_nope.type.shape[3]
    return _Mla(
        attn,
        q_nope,
        q_pe,
        q_split,
        q_lin if single_use else None,
        c_n,
        expand.inputs[0],
        kv_b,
        kv_b_scale,
        cat_k.inputs[0],
        cat_v.inputs[0],
        k_all,
        v_all,
        o_lin,
        heads,
        nope,
        kv_split.outputs[1].type.shape[3],
    )


# -- weight transforms (computed in float64, stored float32) -----------------------------------------
def _kv_b_heads(kv_b: torch.Tensor, heads: int, nope: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = kv_b.double().unflatten(0, (heads, -1))  # [N, nope+v, kv_lora]
    return w[:, :nope], w[:, nope:]  # W_UK [N, nope, kv_lora], W_UV [N, v, kv_lora]


def _uk_t(heads: int, nope: int):
    return lambda kv_b: _kv_b_heads(kv_b, heads, nope)[0].transpose(1, 2).float().contiguous()


def _uv(heads: int, nope: int):
    return lambda kv_b: _kv_b_heads(kv_b, heads, nope)[1].float().contiguous()


def _fold_q(heads: int, nope: int):
    def fold(w_q: torch.Tensor, kv_b: torch.Tensor) -> torch.Tensor:
        wq = w_q.double().unflatten(0, (heads, -1))  # [N, nope+rope, in]
        uk, _ = _kv_b_heads(kv_b, heads, nope)
        absorbed = uk.transpose(1, 2) @ wq[:, :nope]  # [N, kv_lora, in]
        return torch.cat([absorbed, wq[:, nope:]], dim=1).flatten(0, 1).float().contiguous()

    return fold


def _fold_o(heads: int, nope: int):
    def fold(w_o: torch.Tensor, kv_b: torch.Tensor) -> torch.Tensor:
        _, uv = _kv_b_heads(kv_b, heads, nope)
        wo = w_o.double().unflatten(1, (heads, -1))  # [H, N, v]
        return torch.einsum("hnv,nvk->hnk", wo, uv).flatten(1).float().contiguous()

    return fold


@dataclass(frozen=True)
class MlaAbsorbPass:
    name: ClassVar[str] = "mla-absorb"
    requires: ClassVar[tuple[str, ...]] = ()
    fold_q: bool = False
    fold_o: bool = False

    def run(self, graph: Graph) -> PassResult:
        g = graph.clone()
        refused: dict[str, str] = {}
        matches: list[_Mla] = []
        producers, users = g.producers(), g.consumers()
        for node in g.nodes:
            if node.op in (Op.ATTENTION, Op.SPARSE_ATTENTION):
                try:
                    matches.append(_match(g, node, producers, users))
                except _Refuse as why:
                    refused[node.name] = str(why)
        folded = {"q": 0, "o": 0}
        for m in matches:
            self._rewrite(g, m, folded)
        g.remove_dead()
        stats = {"absorbed": len(matches), "refused": refused, "folded_q": folded["q"], "folded_o": folded["o"]}
        return PassResult(g, bool(matches), stats)

    def _rewrite(self, g: Graph, m: _Mla, folded: dict[str, int]) -> None:
        b = GraphBuilder(g)
        b.insert_at = g.nodes.index(m.attn)
        meta = {**m.attn.meta, "from_pass": self.name, "from": m.attn.name}
        n, nope = m.heads, m.nope
        kv_lora, rope = m.c_n.type.shape[-1], m.k_pe.type.shape[-1]
        prefix = m.attn.name.rsplit("/", 1)[0] + "/mla_absorb"
        src = g.weights[m.kv_b.name].source
        if m.kv_b_scale is not None:  # slice W_UK / W_UV from the dequantized FP8 kv_b_proj
            src = Transformed("dequantize_fp8", (src, g.weights[m.kv_b_scale.name].source), dequantize)

        def op(kind: Op, inputs, attrs=None, **kw) -> Node:
            return b.op(kind, inputs, attrs, name=f"{prefix}/{kind.value}", meta=meta, **kw)

        # The latent cache: [c | k_pe] per token, one tensor per layer.
        layer = next(c.layer for c in g.cache_entries() if c.past == m.past_k.name)
        entry = CacheEntry.named(layer, "latent")
        past = Value(entry.past, m.past_k.type.with_shape(("batch", "past", kv_lora + rope)))
        flat_pe = op(Op.RESHAPE, [m.k_pe], {"shape": (0, 0, rope)}).output
        new = op(Op.CONCAT, [m.c_n, flat_pe], {"axis": -1}).output
        present = op(Op.CONCAT, [past, new], {"axis": 1}, out_names=[entry.present]).output
        keys = op(Op.RESHAPE, [present], {"shape": (0, 0, 1, kv_lora + rope)}).output

        if self.fold_q and m.q_linear is not None:
            w_q = m.q_linear.inputs[1]
            fold = Transformed("absorb_w_uk", (g.weights[w_q.name].source, src), _fold_q(n, nope))
            w_new = b.weight(f"{w_q.name}.absorbed", DType.F32, (n * (kv_lora + rope), w_q.type.shape[1]), fold)
            q = op(Op.LINEAR, [m.q_linear.inputs[0], w_new]).output
            q = op(Op.RESHAPE, [q], {"shape": (0, 0, n, kv_lora + rope)}).output
            q_lat, q_pe = op(Op.SPLIT, [q], {"axis": -1, "sizes": (kv_lora, rope)}).outputs
            rope_node = next(x for x in g.nodes if x.op == Op.ROPE and x.output == m.q_pe)
            q_pe = op(Op.ROPE, [q_pe, rope_node.inputs[1]], rope_node.attrs).output
            folded["q"] += 1
        else:
            uk_t = b.weight(
                f"{m.kv_b.name}.w_uk_t", DType.F32, (n, kv_lora, nope), Transformed("w_uk_t", (src,), _uk_t(n, nope))
            )
            q_lat, q_pe = op(Op.HEAD_LINEAR, [m.q_nope, uk_t]).output, m.q_pe
        q_abs = op(Op.CONCAT, [q_lat, q_pe], {"axis": -1}).output
        # The values are the c columns of the keys. Attending over whole [c | k_pe] rows and dropping the rope
        # columns of the output costs rope/kv_lora more multiply-adds in softmax . V but no copy of the cache's
        # c columns every step (a split of the cache would copy it, the whole context long).
        # DSA (sparse_attention) keeps its selected key positions: they index the latent rows the same way.
        o_full = op(
            m.attn.op, [q_abs, keys, keys, *m.attn.inputs[3:]], m.attn.attrs
        ).output  # [b, s, N, kv_lora + rope]
        o_lat = op(Op.SPLIT, [o_full], {"axis": -1, "sizes": (kv_lora, rope)}).outputs[0]  # [b, s, N, kv_lora]

        if self.fold_o and m.o_linear is not None:
            w_o = m.o_linear.inputs[1]
            fold = Transformed("absorb_w_uv", (g.weights[w_o.name].source, src), _fold_o(n, nope))
            w_new = b.weight(f"{w_o.name}.absorbed", DType.F32, (w_o.type.shape[0], n * kv_lora), fold)
            flat = op(Op.RESHAPE, [o_lat], {"shape": (0, 0, n * kv_lora)}).output
            # o_proj keeps its node and output value (downstream names stay); only its inputs change.
            at = g.nodes.index(m.o_linear)
            g.nodes[at] = Node(Op.LINEAR, m.o_linear.name, (flat, w_new), m.o_linear.outputs, {}, meta)
            folded["o"] += 1
        else:
            uv = b.weight(
                f"{m.kv_b.name}.w_uv", DType.F32, (n, m.v_dim, kv_lora), Transformed("w_uv", (src,), _uv(n, nope))
            )
            g.replace_uses(m.attn.output, op(Op.HEAD_LINEAR, [o_lat, uv]).output)

        g.inputs = [past if v == m.past_k else v for v in g.inputs if v != m.past_v]
        g.outputs = [present if v == m.present_k else v for v in g.outputs if v != m.present_v]
        kept = [c for c in g.cache_entries() if c.layer != layer or c.role not in ("key", "value")]
        g.meta["kv_cache"] = tuple(
            sorted([*kept, entry], key=lambda c: (c.layer, c.role not in ("key", "value", "latent")))
        )
        g.meta["kv_cache_form"] = "latent"
