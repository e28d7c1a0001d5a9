"""One schema per op: type inference and the torch reference implementation (the interpreter's).

The reference implementations favour clarity and float32 accuracy over speed; they define what an op
means, and every backend lowering is tested against them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from dsc.ir.types import Dim, DType, Op, TensorType, dim_add

Attrs = dict[str, Any]
FP8_BLOCK = 128


class TypeError_(Exception):
    """An op's inputs or attributes do not fit its schema (a compiler bug, reported by the verifier)."""


@dataclass(frozen=True)
class OpSchema:
    n_inputs: tuple[int, int | None]  # (min, max); max None = variadic
    infer: Callable[[list[TensorType], Attrs], list[TensorType]]
    run: Callable[[list[torch.Tensor], Attrs], list[torch.Tensor]]


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise TypeError_(msg)


def _same_dim(a: Dim, b: Dim) -> bool:
    return a == b or a == 1 or b == 1


def _broadcast(a: TensorType, b: TensorType) -> TensorType:
    _need(a.dtype == b.dtype, f"dtype mismatch {a} vs {b}")
    ra, rb = a.shape[::-1], b.shape[::-1]
    out = []
    for i in range(max(len(ra), len(rb))):
        da = ra[i] if i < len(ra) else 1
        db = rb[i] if i < len(rb) else 1
        _need(_same_dim(da, db), f"cannot broadcast {a} with {b}")
        out.append(db if da == 1 else da)
    return a.with_shape(tuple(out[::-1]))


def _axis(axis: int, rank: int) -> int:
    _need(-rank <= axis < rank, f"axis {axis} out of range for rank {rank}")
    return axis % rank


# -- inference -------------------------------------------------------------------------------------
def _infer_embedding(t: list[TensorType], a: Attrs) -> list[TensorType]:
    ids, table = t[:2]
    _need(ids.dtype in (DType.I64, DType.I32), "embedding ids must be integers")
    _need(table.rank == 2, "embedding table must be 2-D")
    _check_scales([table], t[2:], "embedding", a)
    return [TensorType(DType.F32 if table.dtype == DType.I8 else table.dtype, ids.shape + (table.shape[1],))]


def block_scale_shape(shape: tuple, block: int = FP8_BLOCK) -> tuple:
    """DeepSeek's FP8 scale layout (DESIGN.md §5): one float per block x block tile of the last two axes."""
    return (*shape[:-2], -(-shape[-2] // block), -(-shape[-1] // block))


def int_scale_shape(shape: tuple, block: int) -> tuple:
    """Low-bit block layout: one float per ``block`` consecutive weights of a row (along the input axis)."""
    return (*shape[:-1], -(-shape[-1] // block))


def _check_scales(weights: list[TensorType], scales: list[TensorType], op: str, a: Attrs) -> None:
    """FP8 weights take DeepSeek's 128x128 block scales; int weights (attrs ``bits``, ``block``) take one scale
    per ``block`` inputs of each row; float weights take none."""
    _need(not scales or len(scales) == len(weights), f"{op}: {len(scales)} scales for {len(weights)} weights")
    dtypes = {w.dtype for w in weights}
    _need(len(dtypes) == 1, f"{op}: weights mix dtypes {sorted(d.value for d in dtypes)}")
    dtype = dtypes.pop()
    if dtype == DType.I8:
        _need(a.get("bits") in (4, 8) and a.get("block", 0) >= 1, f"{op}: int weights need bits 4|8 and a block")
        _need(bool(scales), f"{op}: int weights need their block scales")
        for w, s in zip(weights, scales, strict=True):
            want = int_scale_shape(w.shape, a["block"])
            _need(s.dtype == DType.F32 and s.shape == want, f"{op}: scale {s} for int weight {w} (block {a['block']})")
        return
    _need("bits" not in a, f"{op}: attribute bits given for {dtype.value} weights")
    for w, s in zip(weights, scales if scales else [], strict=False):
        _need(w.dtype == DType.F8E4M3, f"{op}: a scale is given for non-FP8 weight {w}")
        _need(s.dtype == DType.F32 and s.shape == block_scale_shape(w.shape), f"{op}: scale {s} for weight {w}")
    if not scales:
        _need(dtype != DType.F8E4M3, f"{op}: FP8 weights need their block scales")


def quantize_fp8(w: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's FP8 weight format (DESIGN.md §5): e4m3 values and float32 scale_inv per block x block tile.

    scale = amax(tile) / 448 (1 for an all-zero tile), q = w / scale; partial edge tiles have their own scale.
    """
    rows, cols = w.shape
    br, bc = -(-rows // block), -(-cols // block)
    padded = torch.zeros(br * block, bc * block, dtype=torch.float32)
    padded[:rows, :cols] = w.float()
    tiles = padded.view(br, block, bc, block)
    scale = tiles.abs().amax(dim=(1, 3)) / torch.finfo(torch.float8_e4m3fn).max
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (tiles / scale[:, None, :, None]).view(br * block, bc * block)[:rows, :cols]
    return q.to(torch.float8_e4m3fn).contiguous(), scale.contiguous()


def dequantize(w: torch.Tensor, scale: torch.Tensor | None, block: int = FP8_BLOCK) -> torch.Tensor:
    """float32 weights from FP8 values and per-block scales (partial edge blocks share their scale)."""
    if scale is None:
        return w.float()
    rows, cols = w.shape[-2:]
    full = scale.repeat_interleave(block, -2)[..., :rows, :].repeat_interleave(block, -1)[..., :cols]
    return w.float() * full


def quantize_int(w: torch.Tensor, bits: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric block quantization along the last axis: int8 levels [..., K] and float32 scales [..., K/block].

    8 bits: scale = amax / 127, levels -127..127. 4 bits: per block the better (lower squared error) of two
    scales: amax / 7 (levels -7..7, nothing clipped) and m / -8 with m the largest-magnitude value (all 16
    levels -8..7, as llama.cpp's q4_0; a value of the other sign near -m clips to 7), so a scale may be
    negative. An all-zero block gets scale 1. A partial last block has its own scale."""
    k = w.shape[-1]
    nb = -(-k // block)
    padded = torch.zeros((*w.shape[:-1], nb * block), dtype=torch.float32)
    padded[..., :k] = w.float()
    tiles = padded.unflatten(-1, (nb, block))
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1

    def levels(scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = torch.where(scale != 0, scale, torch.ones_like(scale))
        return torch.round(tiles / scale[..., None]).clamp(lo, hi), scale

    q, scale = levels(tiles.abs().amax(-1) / hi)
    if bits < 8:
        top = tiles.gather(-1, tiles.abs().argmax(-1, keepdim=True)).squeeze(-1)
        q2, scale2 = levels(top / lo)
        err = ((q * scale[..., None] - tiles) ** 2).sum(-1)
        err2 = ((q2 * scale2[..., None] - tiles) ** 2).sum(-1)
        better = err2 < err
        q, scale = torch.where(better[..., None], q2, q), torch.where(better, scale2, scale)
    return q.to(torch.int8).flatten(-2)[..., :k].contiguous(), scale.contiguous()


def dequantize_int(q: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    """float32 weights from int levels and their per-block scales along the last axis."""
    return q.float() * scale.repeat_interleave(block, -1)[..., : q.shape[-1]]


def weight_of(w: torch.Tensor, scale: torch.Tensor | None, a: Attrs) -> torch.Tensor:
    """The float32 weight a LINEAR / MOE_EXPERTS node computes with, whatever its storage format."""
    if w.dtype == torch.int8:
        return dequantize_int(w, scale, a["block"])
    return dequantize(w, scale)


def _infer_linear(t: list[TensorType], a: Attrs) -> list[TensorType]:
    x, w = t[:2]
    _need(w.rank == 2, f"linear weight must be 2-D, got {w}")
    _need(x.shape[-1] == w.shape[1], f"linear: input {x} does not match weight {w}")
    _check_scales([w], t[2:], "linear", a)
    return [TensorType(x.dtype, x.shape[:-1] + (w.shape[0],))]


def _infer_head_linear(t: list[TensorType], a: Attrs) -> list[TensorType]:
    x, w = t
    _need(w.rank == 3 and x.rank >= 2, f"head_linear takes x[..., heads, in] and w[heads, out, in], got {x}, {w}")
    _need(x.shape[-2] == w.shape[0] and x.shape[-1] == w.shape[2], f"head_linear: input {x} does not match {w}")
    return [TensorType(x.dtype, x.shape[:-1] + (w.shape[1],))]


def _infer_rms_norm(t: list[TensorType], a: Attrs) -> list[TensorType]:
    x, w = t
    _need(w.shape == (x.shape[-1],), f"rms_norm weight {w} does not match input {x}")
    return [x]


def _infer_rope(t: list[TensorType], a: Attrs) -> list[TensorType]:
    x, pos = t
    _need(pos.rank == 2 and x.shape[:2] == pos.shape, f"rope positions {pos} do not match input {x}")
    _need(x.shape[-1] == 2 * len(a["inv_freq"]), f"rope: {len(a['inv_freq'])} frequencies for dim {x.shape[-1]}")
    return [x]


def _infer_attention(t: list[TensorType], a: Attrs) -> list[TensorType]:
    q, k, v, mask = t
    _need(q.rank == k.rank == v.rank == 4, "attention takes q [batch, seq, heads, dim] and k, v [batch, heads, T, dim]")
    _need(k.shape[:3] == v.shape[:3], f"attention: k {k} and v {v} differ")
    _need(k.shape[1] in (1, q.shape[2]), f"attention: {k.shape[1]} kv heads for {q.shape[2]} query heads")
    _need(mask.dtype == DType.I64 and mask.shape == (k.shape[0], k.shape[2]), f"attention: mask {mask} for keys {k}")
    if a.get("joint_kv"):  # keys = values = cat(k, v): MLA's latent stored as two halves
        _need(k.shape == v.shape and q.shape[3] <= 2 * k.shape[3], f"attention: joint k {k}, v {v} for q {q}")
        return [q.with_shape(q.shape[:3] + (2 * k.shape[3],))]
    _need(q.shape[-1] == k.shape[-1], f"attention: q {q} and k {k} differ in head dim")
    return [q.with_shape(q.shape[:3] + (v.shape[3],))]


def _topk_dim(top_k: int, total: Dim) -> Dim:
    """The number of keys the indexer selects: min(top_k, T), static when T is; symbolic otherwise."""
    if isinstance(total, int):
        return min(top_k, total)
    return f"min({top_k},{total})"


def _infer_index_topk(t: list[TensorType], a: Attrs) -> list[TensorType]:
    q, k, w, mask = t
    _need(
        q.rank == 4 and k.rank == 4 and k.shape[1] == 1 and w.rank == 3,
        f"index_topk takes q[b,s,H,d], k[b,1,T,d], w[b,s,H]: {q}, {k}, {w}",
    )
    _need(q.shape[-1] == k.shape[-1], f"index_topk: q {q} and k {k} differ in head dim")
    _need(w.shape == q.shape[:3], f"index_topk: head weights {w} do not match q {q}")
    _need(mask.dtype == DType.I64 and mask.shape == (k.shape[0], k.shape[2]), f"index_topk: mask {mask} for keys {k}")
    _need(a["top_k"] >= 1, f"index_topk: top_k must be >= 1, got {a['top_k']}")
    return [TensorType(DType.I64, q.shape[:2] + (_topk_dim(a["top_k"], k.shape[2]),))]


def _infer_sparse_attention(t: list[TensorType], a: Attrs) -> list[TensorType]:
    out = _infer_attention(t[:4], a)
    idx = t[4]
    _need(idx.dtype == DType.I64 and idx.rank == 3, f"sparse_attention: indices {idx} must be int64 [b, s, K]")
    _need(idx.shape[:2] == t[0].shape[:2], f"sparse_attention: indices {idx} do not match q {t[0]}")
    return out


def _infer_layer_norm(t: list[TensorType], a: Attrs) -> list[TensorType]:
    x, w, b = t
    _need(w.shape == b.shape == (x.shape[-1],), f"layer_norm weight {w} / bias {b} do not match input {x}")
    return [x]


def _infer_cache_append(t: list[TensorType], a: Attrs) -> list[TensorType]:
    past, new, mask = t
    _need(past.rank == new.rank == 4 and past.dtype == new.dtype, f"cache_append: past {past}, new {new}")
    _need(past.shape[:2] == new.shape[:2] and past.shape[3] == new.shape[3], f"cache_append: past {past}, new {new}")
    _need(mask.rank == 2 and mask.shape[0] == past.shape[0], f"cache_append: mask {mask} for {past}")
    return [past.with_shape(past.shape[:2] + (mask.shape[1],) + past.shape[3:])]


def _run_cache_append(past: torch.Tensor, new: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    gap = mask.shape[1] - past.shape[2] - new.shape[2]
    if gap < 0:
        raise ValueError(f"cache_append: attention_mask covers {mask.shape[1]} tokens, fewer than the cache's")
    zeros = past.new_zeros(past.shape[0], past.shape[1], gap, past.shape[3])
    return torch.cat([past, zeros, new], dim=2)


def _infer_transpose(t: list[TensorType], a: Attrs) -> list[TensorType]:
    (x,) = t
    _need(sorted(a["perm"]) == list(range(x.rank)), f"transpose perm {a['perm']} for {x}")
    return [x.with_shape(tuple(x.shape[p] for p in a["perm"]))]


def _infer_pad(t: list[TensorType], a: Attrs) -> list[TensorType]:
    (x,) = t
    _need(isinstance(x.shape[-1], int) and a["after"] >= 0, f"pad {a['after']} on {x}")
    return [x.with_shape(x.shape[:-1] + (x.shape[-1] + a["after"],))]


def _infer_binary(t: list[TensorType], a: Attrs) -> list[TensorType]:
    return [_broadcast(t[0], t[1])]


def _infer_unary(t: list[TensorType], a: Attrs) -> list[TensorType]:
    return [t[0]]


def _infer_split(t: list[TensorType], a: Attrs) -> list[TensorType]:
    (x,) = t
    ax = _axis(a["axis"], x.rank)
    _need(sum(a["sizes"]) == x.shape[ax], f"split sizes {a['sizes']} do not sum to {x.shape[ax]}")
    return [x.with_shape(x.shape[:ax] + (s,) + x.shape[ax + 1 :]) for s in a["sizes"]]


def _infer_concat(t: list[TensorType], a: Attrs) -> list[TensorType]:
    ax = _axis(a["axis"], t[0].rank)
    for other in t[1:]:
        _need(other.dtype == t[0].dtype and other.rank == t[0].rank, f"concat: {t[0]} vs {other}")
        for i in range(t[0].rank):
            _need(i == ax or other.shape[i] == t[0].shape[i], f"concat: {t[0]} vs {other} off axis {ax}")
    return [t[0].with_shape(t[0].shape[:ax] + (dim_add(*(x.shape[ax] for x in t)),) + t[0].shape[ax + 1 :])]


def _infer_reshape(t: list[TensorType], a: Attrs) -> list[TensorType]:
    (x,) = t
    shape = a["shape"]
    out = tuple(x.shape[i] if s == 0 else s for i, s in enumerate(shape))
    copied = {i for i, s in enumerate(shape) if s == 0}
    _need(all(i < x.rank for i in copied), "reshape copies a dim past the input's rank")
    rest_in = [d for i, d in enumerate(x.shape) if i not in copied]
    rest_out = [d for i, d in enumerate(out) if i not in copied]
    _need(all(isinstance(d, int) for d in rest_in + rest_out), f"reshape {x} -> {shape} moves a symbolic dim")
    _need(_prod(rest_in) == _prod(rest_out), f"reshape {x} -> {out} changes the element count")
    return [x.with_shape(out)]


def _prod(dims: list) -> int:
    p = 1
    for d in dims:
        p *= d
    return p


def _infer_expand(t: list[TensorType], a: Attrs) -> list[TensorType]:
    (x,) = t
    ax = _axis(a["axis"], x.rank)
    _need(x.shape[ax] == 1, f"expand axis {ax} of {x} is not 1")
    return [x.with_shape(x.shape[:ax] + (a["size"],) + x.shape[ax + 1 :])]


def _infer_moe_route(t: list[TensorType], a: Attrs) -> list[TensorType]:
    x, gate = t[0], t[1]
    _need(gate.shape == (a["num_experts"], x.shape[-1]), f"moe_route gate {gate} does not match {x}")
    if len(t) == 3:
        _need(t[2].shape == (a["num_experts"],), f"moe_route bias {t[2]}")
    lead = x.shape[:-1] + (a["top_k"],)
    return [TensorType(DType.F32, lead), TensorType(DType.I64, lead)]


def _infer_moe_combine(t: list[TensorType], a: Attrs) -> list[TensorType]:
    w, idx, ys = t[0], t[1], t[2:]
    _need(len(ys) == a["num_experts"], f"moe_combine: {len(ys)} expert outputs, {a['num_experts']} experts")
    _need(w.shape == idx.shape, "moe_combine weights and experts differ in shape")
    _need(all(y == ys[0] for y in ys), "moe_combine expert outputs differ in type")
    return [ys[0]]


def _infer_moe_experts(t: list[TensorType], a: Attrs) -> list[TensorType]:
    x, w, idx, gate, up, down = t[:6]
    _check_scales([gate, up, down], t[6:], "moe_experts", a)
    e, inter, hidden = gate.shape
    _need(w.shape == idx.shape and w.shape[:-1] == x.shape[:-1], f"moe_experts: routing {w} does not match {x}")
    _need(gate.shape == up.shape == (e, inter, x.shape[-1]), f"moe_experts: gate {gate} / up {up} vs input {x}")
    _need(down.shape == (e, hidden, inter), f"moe_experts: down {down} does not match gate {gate}")
    _need(e == a["num_experts"], f"moe_experts: {e} stacked experts, attribute says {a['num_experts']}")
    return [x]


# -- reference implementations ------------------------------------------------------------------------
def _run_rope(x: torch.Tensor, pos: torch.Tensor, a: Attrs) -> torch.Tensor:
    inv_freq = torch.tensor(a["inv_freq"], dtype=torch.float32)
    freqs = pos.to(torch.float32)[..., None] * inv_freq  # [b, s, d/2]
    cos, sin = freqs.cos() * a["scaling"], freqs.sin() * a["scaling"]
    if x.dim() == 4:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    xf = x.to(torch.float32)
    half = xf.shape[-1] // 2
    if a["interleaved"]:  # DeepSeek: rotate adjacent pairs (x[2i], x[2i+1]) by frequency i
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    else:  # rotate_half layout: pair (x[i], x[i + d/2])
        x1, x2 = xf[..., :half], xf[..., half:]
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)


# Hidden scores get the lowest finite float32, not -inf: a query whose keys are all hidden (a left-pad position)
# then averages finite values instead of making NaN, which would reach the cache and, through 0 * NaN in
# softmax . V, every later query of the row.
MASKED_SCORE = float(torch.finfo(torch.float32).min)


# A cache slot whose key starts with this many exact zeros is empty (cache_append's gap: a token onnxruntime-genai
# sampled but never ran) and hidden like padding, in every later step too. A real key has no such run of zeros
# (normalized latents / projections of them); checking a few columns keeps the test's cost small.
EMPTY_SLOT_COLUMNS = 16


def _empty_slots(k: torch.Tensor) -> torch.Tensor:
    """[b, Hk, T]: True where the key cache slot is empty."""
    return (k[..., :EMPTY_SLOT_COLUMNS] == 0).all(-1)


def _run_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, a: Attrs) -> torch.Tensor:
    s, t = q.shape[1], k.shape[2]
    empty = _empty_slots(k)
    if a.get("joint_kv"):
        k = v = torch.cat([k, v], dim=-1)
        q = F.pad(q, (0, k.shape[-1] - q.shape[-1]))
    qh = q.transpose(1, 2).float()  # [b, h, s, d]; k, v are [b, h or 1, T, d]
    scores = torch.matmul(qh, k.float().transpose(-1, -2)) * a["scale"]
    # Causal with the cache in front (query i sits at (t - s) + i), and padding (mask 0) hidden everywhere.
    hidden = torch.arange(t)[None, :] > (torch.arange(s)[:, None] + (t - s))
    hidden = hidden[None, None] | (mask == 0)[:, None, None, :] | empty[:, :, None, :]
    probs = torch.softmax(scores.masked_fill(hidden, MASKED_SCORE), dim=-1)
    return torch.matmul(probs, v.float()).transpose(1, 2).to(q.dtype)


def index_scores(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, mask: torch.Tensor, a: Attrs) -> torch.Tensor:
    """The lightning indexer's score of every key for every query, [b, s, T], float32, with keys after the query
    (causal, the cache in front) and padded keys (attention_mask 0) at -inf: sum_h w[h] * weight_scale *
    relu(q[h] . k * scale) (DESIGN.md §9, transformers' DeepseekV32Indexer). k is head-major [b, 1, T, d]."""
    k = k[:, 0]
    s, t = q.shape[1], k.shape[1]
    dots = torch.einsum("bshd,btd->bsht", q.float(), k.float()) * a["scale"]
    scores = torch.einsum("bsh,bsht->bst", w.float() * a["weight_scale"], torch.relu(dots))
    future = torch.arange(t)[None, :] > (torch.arange(s)[:, None] + (t - s))
    hidden = future[None] | (mask == 0)[:, None, :]
    return scores.masked_fill(hidden, float("-inf"))


def select_top_k(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """The min(top_k, T) best positions per row, best first; equal scores go lowest position first (a stable
    sort), the tie order ONNX's TopK specifies, so the engine and the interpreter select the same keys."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return order[..., : min(top_k, scores.shape[-1])]


def _run_sparse_attention(q, k, v, mask, idx, a: Attrs):
    """Causal attention restricted to the keys at ``idx`` (a selected key after the query, or a padded one, stays
    hidden: rows with fewer earlier keys than K select some later ones, as the reference's top-k over -inf does).
    k, v head-major [b, Hk, T, d] as attention's, ``joint_kv`` too; hidden scores get MASKED_SCORE."""
    s, t = q.shape[1], k.shape[2]
    if a.get("joint_kv"):
        k = v = torch.cat([k, v], dim=-1)
        q = F.pad(q, (0, k.shape[-1] - q.shape[-1]))
    qh = q.transpose(1, 2).float()
    scores = torch.matmul(qh, k.float().transpose(-1, -2)) * a["scale"]  # [b, h, s, T]
    chosen = torch.zeros(q.shape[0], s, t, dtype=torch.bool).scatter(-1, idx, True)
    future = torch.arange(t)[None, :] > (torch.arange(s)[:, None] + (t - s))
    hidden = (~chosen | future[None] | (mask == 0)[:, None, :])[:, None]
    probs = torch.softmax(scores.masked_fill(hidden, MASKED_SCORE), dim=-1)
    return torch.matmul(probs, v.float()).transpose(1, 2).to(q.dtype)


def route(x: torch.Tensor, gate: torch.Tensor, bias: torch.Tensor | None, a: Attrs):
    """DeepSeek routing (DESIGN.md §3): returns (weights [..., k] float32, experts [..., k] int64)."""
    logits = x.float() @ gate.float().t()
    n_exp, k, groups, keep = a["num_experts"], a["top_k"], a["n_group"], a["topk_group"]
    if a["scoring"] == "sigmoid":
        scores = logits.sigmoid()
    else:
        scores = logits.softmax(dim=-1)
    choice = scores + bias.float() if bias is not None else scores
    if a["method"] in ("noaux_tc", "group_limited_greedy") and groups > 1:
        grouped = choice.unflatten(-1, (groups, n_exp // groups))
        if a["method"] == "noaux_tc":
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)
        else:
            group_scores = grouped.max(dim=-1).values
        top_groups = group_scores.topk(keep, dim=-1).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter(-1, top_groups, True)
        expert_mask = group_mask[..., None].expand(grouped.shape).flatten(-2)
        fill = float("-inf") if a["method"] == "noaux_tc" else 0.0
        choice = choice.masked_fill(~expert_mask, fill)
    experts = choice.topk(k, dim=-1).indices
    weights = scores.gather(-1, experts)
    if a["norm_topk_prob"] and k > 1:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * a["scaling"], experts


def _run_moe_combine(ins: list[torch.Tensor], a: Attrs) -> torch.Tensor:
    w, idx, ys = ins[0], ins[1], torch.stack(ins[2:], dim=-2)  # ys [..., E, H]
    dense = torch.zeros(w.shape[:-1] + (a["num_experts"],), dtype=torch.float32).scatter(-1, idx, w)
    return (dense[..., None, :] @ ys.float()).squeeze(-2).to(ys.dtype)


def _run_moe_experts(ins: list[torch.Tensor], a: Attrs) -> torch.Tensor:
    """Each token through its chosen experts only: sum_k weight_k * down(silu(gate x) * up x)."""
    x, w, idx = ins[:3]
    scales = ins[6:] or [None, None, None]
    gate, up, down = (weight_of(m, s, a) for m, s in zip(ins[3:6], scales, strict=True))
    flat, w2, idx2 = x.reshape(-1, x.shape[-1]), w.reshape(-1, w.shape[-1]), idx.reshape(-1, idx.shape[-1])
    out = torch.zeros_like(flat, dtype=torch.float32)
    for e in idx2.unique().tolist():
        tok, slot = (idx2 == e).nonzero(as_tuple=True)
        h = flat[tok].float()
        y = F.linear(F.silu(F.linear(h, gate[e].float())) * F.linear(h, up[e].float()), down[e].float())
        out.index_add_(0, tok, y * w2[tok, slot, None].float())
    return out.reshape(x.shape).to(x.dtype)


def _rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (w.float() * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps))).to(x.dtype)


def _reshape(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return x.reshape(tuple(x.shape[i] if s == 0 else s for i, s in enumerate(shape)))


def _expand(x: torch.Tensor, a: Attrs) -> torch.Tensor:
    sizes = [-1] * x.dim()
    sizes[a["axis"]] = a["size"]
    return x.expand(sizes)


SCHEMAS: dict[Op, OpSchema] = {
    Op.EMBEDDING: OpSchema(
        (2, 3), _infer_embedding, lambda i, a: [F.embedding(i[0], weight_of(i[1], i[2] if len(i) > 2 else None, a))]
    ),
    Op.LINEAR: OpSchema(
        (2, 3),
        _infer_linear,
        lambda i, a: [F.linear(i[0], weight_of(i[1], i[2] if len(i) > 2 else None, a).to(i[0].dtype))],
    ),
    Op.HEAD_LINEAR: OpSchema(
        (2, 2), _infer_head_linear, lambda i, a: [torch.einsum("...hi,hoi->...ho", i[0], i[1].to(i[0].dtype))]
    ),
    Op.RMS_NORM: OpSchema((2, 2), _infer_rms_norm, lambda i, a: [_rms_norm(i[0], i[1], a["eps"])]),
    Op.ROPE: OpSchema((2, 2), _infer_rope, lambda i, a: [_run_rope(i[0], i[1], a)]),
    Op.ATTENTION: OpSchema((4, 4), _infer_attention, lambda i, a: [_run_attention(*i, a)]),
    Op.INDEX_TOPK: OpSchema(
        (4, 4), _infer_index_topk, lambda i, a: [select_top_k(index_scores(i[0], i[1], i[2], i[3], a), a["top_k"])]
    ),
    Op.SPARSE_ATTENTION: OpSchema((5, 5), _infer_sparse_attention, lambda i, a: [_run_sparse_attention(*i, a)]),
    Op.LAYER_NORM: OpSchema(
        (3, 3),
        _infer_layer_norm,
        lambda i, a: [F.layer_norm(i[0].float(), i[0].shape[-1:], i[1].float(), i[2].float(), a["eps"]).to(i[0].dtype)],
    ),
    Op.ADD: OpSchema((2, 2), _infer_binary, lambda i, a: [i[0] + i[1]]),
    Op.MUL: OpSchema((2, 2), _infer_binary, lambda i, a: [i[0] * i[1]]),
    Op.SILU: OpSchema((1, 1), _infer_unary, lambda i, a: [F.silu(i[0])]),
    Op.SPLIT: OpSchema((1, 1), _infer_split, lambda i, a: list(torch.split(i[0], list(a["sizes"]), a["axis"]))),
    Op.CONCAT: OpSchema((1, None), _infer_concat, lambda i, a: [torch.cat(i, a["axis"])]),
    Op.RESHAPE: OpSchema((1, 1), _infer_reshape, lambda i, a: [_reshape(i[0], a["shape"])]),
    Op.EXPAND: OpSchema((1, 1), _infer_expand, lambda i, a: [_expand(i[0], a)]),
    Op.CACHE_APPEND: OpSchema((3, 3), _infer_cache_append, lambda i, a: [_run_cache_append(*i)]),
    Op.TRANSPOSE: OpSchema((1, 1), _infer_transpose, lambda i, a: [i[0].permute(*a["perm"])]),
    Op.PAD: OpSchema((1, 1), _infer_pad, lambda i, a: [F.pad(i[0], (0, a["after"]))]),
    Op.MOE_ROUTE: OpSchema(
        (2, 3), _infer_moe_route, lambda i, a: list(route(i[0], i[1], i[2] if len(i) > 2 else None, a))
    ),
    Op.MOE_COMBINE: OpSchema((3, None), _infer_moe_combine, lambda i, a: [_run_moe_combine(i, a)]),
    Op.MOE_EXPERTS: OpSchema((6, 9), _infer_moe_experts, lambda i, a: [_run_moe_experts(i, a)]),
}


def infer_types(op: Op, inputs: list[TensorType], attrs: Attrs) -> list[TensorType]:
    schema = SCHEMAS[op]
    lo, hi = schema.n_inputs
    if len(inputs) < lo or (hi is not None and len(inputs) > hi):
        raise TypeError_(f"{op.value} takes {lo}..{hi or 'n'} inputs, got {len(inputs)}")
    return schema.infer(inputs, attrs)


def run_op(op: Op, inputs: list[torch.Tensor], attrs: Attrs) -> list[torch.Tensor]:
    return SCHEMAS[op].run(inputs, attrs)
