"""Hand-built IR graphs shared by the pass tests."""

import zlib

import torch
from dsc.ir import Constant, DType, Graph, GraphBuilder, Op
from dsc.ir.graph import CacheEntry

N, NOPE, ROPE, V, KV_LORA, Q_LORA, H = 4, 8, 4, 6, 12, 10, 16


def _w(b: GraphBuilder, name: str, *shape: int, seed: int):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) / shape[-1] ** 0.5
    return b.weight(name, DType.F32, shape, Constant(t, name))


def hand_built_mla(q_lora: bool = True, scale: float = 0.3, kv_lora: int = KV_LORA) -> Graph:
    """The naive MLA block of DESIGN.md §4, built op by op as the frontend traces it (cache in, present cache out;
    head-major caches of one shape, the values zero-padded to the keys' width, the attention mask)."""
    KV_LORA = kv_lora  # noqa: N806 (the block's own latent width)
    b = GraphBuilder(Graph("mla"))
    x = b.input("x", DType.F32, ("batch", "seq", H))
    pos = b.input("position_ids", DType.I64, ("batch", "seq"))
    mask = b.input("attention_mask", DType.I64, ("batch", "past+seq"))
    past_k = b.input("past_key_values.0.key", DType.F32, ("batch", N, "past", NOPE + ROPE))
    past_v = b.input("past_key_values.0.value", DType.F32, ("batch", N, "past", NOPE + ROPE))
    rope = {"inv_freq": (1.0, 0.1), "scaling": 1.0, "interleaved": True}
    if q_lora:
        z = b.op(Op.LINEAR, [x, _w(b, "q_a", Q_LORA, H, seed=1)]).output
        z = b.op(Op.RMS_NORM, [z, _w(b, "q_a_norm", Q_LORA, seed=2)], {"eps": 1e-6}).output
        q = b.op(Op.LINEAR, [z, _w(b, "q_b", N * (NOPE + ROPE), Q_LORA, seed=3)]).output
    else:
        q = b.op(Op.LINEAR, [x, _w(b, "q_proj", N * (NOPE + ROPE), H, seed=3)]).output
    q = b.op(Op.RESHAPE, [q], {"shape": (0, 0, N, NOPE + ROPE)}).output
    q_nope, q_pe = b.op(Op.SPLIT, [q], {"axis": -1, "sizes": (NOPE, ROPE)}).outputs
    q_pe = b.op(Op.ROPE, [q_pe, pos], rope).output
    c, k_pe = b.op(
        Op.SPLIT,
        [b.op(Op.LINEAR, [x, _w(b, "kv_a", KV_LORA + ROPE, H, seed=4)]).output],
        {"axis": -1, "sizes": (KV_LORA, ROPE)},
    ).outputs
    k_pe = b.op(Op.ROPE, [b.op(Op.RESHAPE, [k_pe], {"shape": (0, 0, 1, ROPE)}).output, pos], rope).output
    c = b.op(Op.RMS_NORM, [c, _w(b, "kv_a_norm", KV_LORA, seed=5)], {"eps": 1e-6}).output
    kv = b.op(Op.LINEAR, [c, _w(b, "kv_b", N * (NOPE + V), KV_LORA, seed=6)]).output
    kv = b.op(Op.RESHAPE, [kv], {"shape": (0, 0, N, NOPE + V)}).output
    k_nope, v = b.op(Op.SPLIT, [kv], {"axis": -1, "sizes": (NOPE, V)}).outputs
    k = b.op(Op.CONCAT, [k_nope, b.op(Op.EXPAND, [k_pe], {"axis": 2, "size": N}).output], {"axis": -1}).output
    q = b.op(Op.CONCAT, [q_nope, q_pe], {"axis": -1}).output
    v = b.op(Op.PAD, [v], {"after": NOPE + ROPE - V}).output
    k = b.op(Op.TRANSPOSE, [k], {"perm": (0, 2, 1, 3)}).output
    v = b.op(Op.TRANSPOSE, [v], {"perm": (0, 2, 1, 3)}).output
    k_all = b.op(Op.CACHE_APPEND, [past_k, k, mask], out_names=["present.0.key"]).output
    v_all = b.op(Op.CACHE_APPEND, [past_v, v, mask], out_names=["present.0.value"]).output
    o = b.op(Op.ATTENTION, [q, k_all, v_all, mask], {"scale": scale}).output
    o = b.op(Op.SPLIT, [o], {"axis": -1, "sizes": (V, NOPE + ROPE - V)}).outputs[0]
    o = b.op(Op.RESHAPE, [o], {"shape": (0, 0, N * V)}).output
    y = b.op(Op.LINEAR, [o, _w(b, "o_proj", H, N * V, seed=7)], out_names=["y"]).output
    b.graph.outputs = [y, k_all, v_all]
    b.graph.meta["kv_cache"] = (CacheEntry.named(0, "key"), CacheEntry.named(0, "value"))
    return b.graph


def hand_built_moe(
    experts: int = 4, top_k: int = 2, hidden: int = 16, inter: int = 8, odd_expert: bool = False
) -> Graph:
    """One MoE layer as the frontend traces it: route, one FFN branch per expert, combine, plus a shared FFN."""
    b = GraphBuilder(Graph("moe"))
    x = b.input("x", DType.F32, ("batch", "seq", hidden))
    gate = _w(b, "gate", experts, hidden, seed=10)
    bias = b.weight("bias", DType.F32, (experts,), Constant(torch.linspace(-0.1, 0.1, experts), "bias"))
    attrs = dict(
        num_experts=experts,
        top_k=top_k,
        n_group=1,
        topk_group=1,
        scoring="sigmoid",
        method="noaux_tc",
        norm_topk_prob=True,
        scaling=2.5,
    )
    w, idx = b.op(Op.MOE_ROUTE, [x, gate, bias], attrs).outputs
    ys = []
    for e in range(experts):
        i = inter + (1 if odd_expert and e == experts - 1 else 0)
        g = b.op(Op.LINEAR, [x, _w(b, f"e{e}.gate", i, hidden, seed=100 + e)]).output
        u = b.op(Op.LINEAR, [x, _w(b, f"e{e}.up", i, hidden, seed=200 + e)]).output
        h = b.op(Op.MUL, [b.op(Op.SILU, [g]).output, u]).output
        ys.append(b.op(Op.LINEAR, [h, _w(b, f"e{e}.down", hidden, i, seed=300 + e)]).output)
    y = b.op(Op.MOE_COMBINE, [w, idx, *ys], {"num_experts": experts}).output
    sg = b.op(Op.LINEAR, [x, _w(b, "shared.gate", inter, hidden, seed=400)]).output
    su = b.op(Op.LINEAR, [x, _w(b, "shared.up", inter, hidden, seed=401)]).output
    sh = b.op(Op.MUL, [b.op(Op.SILU, [sg]).output, su]).output
    shared = b.op(Op.LINEAR, [sh, _w(b, "shared.down", hidden, inter, seed=402)]).output
    b.output(b.op(Op.ADD, [y, shared], out_names=["y"]).output)
    return b.graph


def traced_tiny(q_lora: bool, yarn: bool) -> Graph:
    """The frontend's trace of a small random-weight model (2 layers, 1 dense + 1 MoE)."""
    from dsc.frontends.config import config_from_dict
    from dsc.frontends.presets import PRESETS
    from dsc.frontends.trace import trace_model
    from dsc.ir import Constant

    raw = dict(PRESETS["tiny"], num_hidden_layers=2, q_lora_rank=32 if q_lora else None)
    if not yarn:
        raw.pop("rope_scaling")
    cfg = config_from_dict(raw)

    def provider(key, shape):
        gen = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        t = torch.randn(shape, generator=gen) * (0.1 if len(shape) == 2 else 0.05) + (1.0 if "norm" in key else 0.0)
        return DType.F32, Constant(t, key)

    return trace_model(cfg, provider)
