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
from dsc.ir.graph import (
    CacheEntry,
    Graph,
    GraphBuilder,
    Node,
    Op,
    Transformed,
    Value,
    cache_layout,
    cache_shape,
)
from dsc.ir.ops import dequantize
from dsc.ir.types import DType
from dsc.passes.base import PassResult


@dataclass
class _Mla:
    """The naive MLA block around one attention node, as the frontend traces it."""

    attn: Node
    out: Value  # the attention's result [b, s, N, v] (past the split that drops padded value columns)
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


def _unwrap(producers: dict[str, Node], v: Value, *ops: Op) -> Value:
    """``v`` seen through the given single-input ops (the padding and head-major transposes of the naive cache)."""
    node = producers.get(v.name)
    while node is not None and node.op in ops:
        v = node.inputs[0]
        node = producers.get(v.name)
    return v


def _match(g: Graph, attn: Node, producers: dict[str, Node], users: dict[str, list[Node]]) -> _Mla:
    q, k_all, v_all, _mask = attn.inputs[:4]  # sparse attention adds the indexer's selection, kept as it is
    cat_k = _only(producers.get(k_all.name), Op.CACHE_APPEND)
    cat_v = _only(producers.get(v_all.name), Op.CACHE_APPEND)
    inputs = {v.name for v in g.inputs}
    if cat_k.inputs[0].name not in inputs or cat_v.inputs[0].name not in inputs:
        raise _Refuse("keys/values are not a graph-input cache concatenated with new tokens")
    if k_all not in g.outputs or v_all not in g.outputs:
        raise _Refuse("the concatenated cache is not returned as present keys/values")
    k_new = _only(producers.get(_unwrap(producers, cat_k.inputs[1], Op.TRANSPOSE, Op.PAD).name), Op.CONCAT)
    k_nope, k_pe_wide = k_new.inputs
    expand = _only(producers.get(k_pe_wide.name), Op.EXPAND)
    kv_split = _only(producers.get(k_nope.name), Op.SPLIT)
    v_new = _unwrap(producers, cat_v.inputs[1], Op.TRANSPOSE, Op.PAD)
    if v_new != kv_split.outputs[1] or k_nope != kv_split.outputs[0]:
        raise _Refuse("k_nope and v do not come from one split of kv_b_proj's output")
    kv_lin = _only(producers.get(_only(producers.get(kv_split.inputs[0].name), Op.RESHAPE).inputs[0].name), Op.LINEAR)
    c_n, kv_b = kv_lin.inputs[:2]
    kv_b_scale = kv_lin.inputs[2] if len(kv_lin.inputs) > 2 else None
    if kv_b.name not in g.weights:
        raise _Refuse("kv_b_proj is not a weight")
    q_cat = _only(producers.get(_unwrap(producers, q, Op.PAD).name), Op.CONCAT)
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
    # The attention's result: its output, or the first part of a split dropping the values' zero padding.
    out = attn.output
    o_users = users.get(out.name, [])
    if len(o_users) == 1 and o_users[0].op == Op.SPLIT:
        out = o_users[0].outputs[0]
        o_users = users.get(out.name, [])
    o_lin = None
    if len(o_users) == 1 and o_users[0].op == Op.RESHAPE and len(users[o_users[0].output.name]) == 1:
        cand = users[o_users[0].output.name][0]
        o_lin = cand if cand.op == Op.LINEAR and len(cand.inputs) == 2 and cand.inputs[1].name in g.weights else None
    heads, nope = k_nope.type.shape[2], k_nope.type.shape[3]
    return _Mla(
        attn,
        out,
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
        renames = [r for m in matches for r in self._rewrite(g, m, folded)]
        g.remove_dead()
        for entry, past, present in renames:  # the replaced naive tensors are gone: take over their names
            g.rename(past, entry.past)
            g.rename(present, entry.present)
        stats = {"absorbed": len(matches), "refused": refused, "folded_q": folded["q"], "folded_o": folded["o"]}
        return PassResult(g, bool(matches), stats)

    def _rewrite(self, g: Graph, m: _Mla, folded: dict[str, int]) -> list[tuple[CacheEntry, Value, Value]]:
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

        # The latent cache: the [c | k_pe] row of each token (one zero column when its width is odd), its first
        # half as the key cache and its second half as the value cache, each [batch, 1, past, half].
        layer = next(c.layer for c in g.cache_entries() if c.past == m.past_k.name)
        entries = (CacheEntry.named(layer, "key"), CacheEntry.named(layer, "value"))
        _, half = cache_layout("latent", heads=1, latent=kv_lora + rope)
        flat_pe = op(Op.RESHAPE, [m.k_pe], {"shape": (0, 0, rope)}).output
        new = op(Op.CONCAT, [m.c_n, flat_pe], {"axis": -1}).output
        if 2 * half > kv_lora + rope:
            new = op(Op.PAD, [new], {"after": 2 * half - kv_lora - rope}).output
        pasts, presents = [], []
        for entry, part in zip(entries, op(Op.SPLIT, [new], {"axis": -1, "sizes": (half, half)}).outputs, strict=True):
            past = Value(b.fresh(f"{entry.past}.latent"), m.past_k.type.with_shape(cache_shape(1, half)))
            rows = op(Op.RESHAPE, [part], {"shape": (0, 0, 1, half)}).output
            head_major = op(Op.TRANSPOSE, [rows], {"perm": (0, 2, 1, 3)}).output
            present = op(Op.CACHE_APPEND, [past, head_major, m.attn.inputs[3]]).output
            pasts.append(past)
            presents.append(present)

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
        # Scores and outputs over the joint [key | value] row, computed on the two cache halves as they are: no
        # copy of the cache into one row per step. The output's rope columns (and zero column) are dropped.
        # DSA (sparse_attention) keeps its selected key positions: they index the latent rows the same way.
        attrs = {**m.attn.attrs, "joint_kv": True}
        o_full = op(m.attn.op, [q_abs, *presents, *m.attn.inputs[3:]], attrs).output  # [b, s, N, 2 * half]
        o_lat = op(Op.SPLIT, [o_full], {"axis": -1, "sizes": (kv_lora, 2 * half - kv_lora)}).outputs[0]

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
            g.replace_uses(m.out, op(Op.HEAD_LINEAR, [o_lat, uv]).output)

        swap = {m.past_k: pasts[0], m.past_v: pasts[1], m.present_k: presents[0], m.present_v: presents[1]}
        g.inputs = [swap.get(v, v) for v in g.inputs]
        g.outputs = [swap.get(v, v) for v in g.outputs]
        g.meta["kv_cache_form"] = "latent"
        return list(zip(entries, pasts, presents, strict=True))
