"""Hand-built IR graphs shared by the pass tests."""

import torch
from dsc.ir import Constant, DType, Graph, GraphBuilder, Op

N, NOPE, ROPE, V, KV_LORA, Q_LORA, H = 4, 8, 4, 6, 12, 10, 16


def _w(b: GraphBuilder, name: str, *shape: int, seed: int):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) / shape[-1] ** 0.5
    return b.weight(name, DType.F32, shape, Constant(t, name))


def hand_built_mla(q_lora: bool = True, scale: float = 0.3) -> Graph:
    """The naive MLA block of DESIGN.md §4, built op by op (cache in, present cache out)."""
    b = GraphBuilder(Graph("mla"))
    x = b.input("x", DType.F32, ("batch", "seq", H))
    pos = b.input("position_ids", DType.I64, ("batch", "seq"))
    past_k = b.input("past_key_values.0.key", DType.F32, ("batch", "past", N, NOPE + ROPE))
    past_v = b.input("past_key_values.0.value", DType.F32, ("batch", "past", N, V))
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
    k_all = b.op(Op.CONCAT, [past_k, k], {"axis": 1}, out_names=["present.0.key"]).output
    v_all = b.op(Op.CONCAT, [past_v, v], {"axis": 1}, out_names=["present.0.value"]).output
    o = b.op(Op.ATTENTION, [q, k_all, v_all], {"scale": scale}).output
    o = b.op(Op.RESHAPE, [o], {"shape": (0, 0, N * V)}).output
    y = b.op(Op.LINEAR, [o, _w(b, "o_proj", H, N * V, seed=7)], out_names=["y"]).output
    b.graph.outputs = [y, k_all, v_all]
    return b.graph
