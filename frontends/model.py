"""dsc's own PyTorch definition of the DeepSeek-V2/V3 architecture, written to be traced by torch.fx.

Why torch.fx with leaf modules: the model's structure (residuals, the MLA split/concat dance, the unrolled
per-expert FFNs) is ordinary torch code that fx records faithfully, while the pieces whose meaning the IR
owns (linear layers with checkpoint weights, RMSNorm, RoPE, causal attention over a cache, the
data-dependent MoE routing and combine) are leaf modules that fx keeps opaque and the tracer maps to one
IR op each. Each leaf also runs eagerly through the IR op's reference implementation, so the same
definition can execute without the IR when a weight provider is bound.

Layout conventions: activations are [batch, seq, ...]; per-head tensors are [batch, seq, heads, dim];
the KV cache of layer i is a key and a value of one shape, head-major [batch, heads, past, dim], the narrower of
qk_head_dim / v_head_dim zero-padded (ir/graph.py cache_layout); attention_mask [batch, past+seq] hides padding.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from dsc.ir.graph import Op, cache_layout
from dsc.ir.ops import run_op
from torch import nn

if TYPE_CHECKING:
    from dsc.frontends.config import ModelConfig, SparseAttention

# (key, shape) -> tensor; bound by Leaf.bind for eager execution.
TensorProvider = Callable[[str, tuple[int, ...]], torch.Tensor]


class Leaf(nn.Module):
    """A module the tracer keeps whole and lowers to one IR op (with weights in ``weight_specs``)."""

    op: Op

    def __init__(self, attrs: dict[str, Any] | None = None, weights: tuple[tuple[str, tuple[int, ...]], ...] = ()):
        super().__init__()
        self.attrs = dict(attrs or {})
        self.weight_specs = weights
        self._provider: TensorProvider | None = None

    def bind(self, provider: TensorProvider) -> None:
        self._provider = provider

    def forward(self, *inputs: torch.Tensor):
        if self._provider is None:
            raise RuntimeError(f"{type(self).__name__}: bind a weight provider before running eagerly")
        weights = [self._provider(key, shape) for key, shape in self.weight_specs]
        outs = run_op(self.op, list(inputs) + weights, self.attrs)
        return outs[0] if len(outs) == 1 else tuple(outs)


class Linear(Leaf):
    op = Op.LINEAR

    def __init__(self, key: str, in_features: int, out_features: int):
        super().__init__(weights=((f"{key}.weight", (out_features, in_features)),))


class RMSNorm(Leaf):
    op = Op.RMS_NORM

    def __init__(self, key: str, dim: int, eps: float):
        super().__init__({"eps": eps}, ((f"{key}.weight", (dim,)),))


class Embedding(Leaf):
    op = Op.EMBEDDING

    def __init__(self, key: str, vocab: int, dim: int):
        super().__init__(weights=((f"{key}.weight", (vocab, dim)),))


class Rope(Leaf):
    op = Op.ROPE

    def __init__(self, inv_freq: list[float], scaling: float, interleaved: bool):
        super().__init__({"inv_freq": tuple(inv_freq), "scaling": scaling, "interleaved": interleaved})


class CausalAttention(Leaf):
    op = Op.ATTENTION

    def __init__(self, scale: float, joint_kv: bool = False):
        super().__init__({"scale": scale, **({"joint_kv": True} if joint_kv else {})})


class CacheAppend(Leaf):
    """The present cache: past, then empty slots for tokens the mask counts but no step ran, then the new tokens."""

    op = Op.CACHE_APPEND


class LayerNorm(Leaf):
    op = Op.LAYER_NORM

    def __init__(self, key: str, dim: int, eps: float):
        super().__init__({"eps": eps}, ((f"{key}.weight", (dim,)), (f"{key}.bias", (dim,))))


class IndexTopK(Leaf):
    """The lightning indexer's scoring and selection (DESIGN.md §9): top-k key positions per query."""

    op = Op.INDEX_TOPK

    def __init__(self, sparse: SparseAttention):
        super().__init__({"top_k": sparse.topk, "scale": sparse.head_dim**-0.5, "weight_scale": sparse.heads**-0.5})


class SparseCausalAttention(Leaf):
    op = Op.SPARSE_ATTENTION

    def __init__(self, scale: float):
        super().__init__({"scale": scale})


class MoeRouter(Leaf):
    op = Op.MOE_ROUTE

    def __init__(self, key: str, cfg: ModelConfig):
        weights = [(f"{key}.weight", (cfg.n_routed_experts, cfg.hidden_size))]
        if cfg.topk_method == "noaux_tc":
            weights.append((f"{key}.e_score_correction_bias", (cfg.n_routed_experts,)))
        super().__init__(
            {
                "num_experts": cfg.n_routed_experts,
                "top_k": cfg.num_experts_per_tok,
                "n_group": cfg.n_group,
                "topk_group": cfg.topk_group,
                "scoring": cfg.scoring_func,
                "method": cfg.topk_method,
                "norm_topk_prob": cfg.norm_topk_prob,
                "scaling": cfg.routed_scaling_factor,
            },
            tuple(weights),
        )


class MoeCombine(Leaf):
    op = Op.MOE_COMBINE

    def __init__(self, num_experts: int):
        super().__init__({"num_experts": num_experts})


# transformers and DeepSeek's reference build q_a_layernorm / kv_a_layernorm with the RMSNorm default eps,
# whatever rms_norm_eps says (it only reaches the per-layer and final norms).
LATENT_NORM_EPS = 1e-6


def rope_frequencies(cfg: ModelConfig) -> tuple[list[float], float]:
    """RoPE inverse frequencies and cos/sin scaling, with YaRN when configured (DESIGN.md §4)."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv_freq = 1.0 / pos_freqs
    ys = cfg.rope_scaling
    if ys is None:
        return inv_freq.tolist(), 1.0

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    def correction_dim(rotations: float) -> float:
        orig = ys.original_max_position_embeddings
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(ys.beta_fast)), 0)
    high = min(math.ceil(correction_dim(ys.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (ys.factor * pos_freqs)) * (1 - extrapolation) + inv_freq * extrapolation
    if ys.attention_factor is not None:
        scaling = ys.attention_factor
    elif ys.mscale and ys.mscale_all_dim:
        scaling = get_mscale(ys.factor, ys.mscale) / get_mscale(ys.factor, ys.mscale_all_dim)
    else:
        scaling = get_mscale(ys.factor)
    return inv_freq.tolist(), float(scaling)


class MLP(nn.Module):
    def __init__(self, key: str, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = Linear(f"{key}.gate_proj", hidden, inter)
        self.up_proj = Linear(f"{key}.up_proj", hidden, inter)
        self.down_proj = Linear(f"{key}.down_proj", inter, hidden)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """Routed experts unrolled one FFN per expert (the form expert fusion starts from), plus shared ones."""

    def __init__(self, key: str, cfg: ModelConfig):
        super().__init__()
        self.gate = MoeRouter(f"{key}.gate", cfg)
        self.experts = nn.ModuleList(
            MLP(f"{key}.experts.{e}", cfg.hidden_size, cfg.moe_intermediate_size) for e in range(cfg.n_routed_experts)
        )
        self.combine = MoeCombine(cfg.n_routed_experts)
        shared = (cfg.n_shared_experts or 0) * cfg.moe_intermediate_size
        self.shared_experts = MLP(f"{key}.shared_experts", cfg.hidden_size, shared) if shared else None

    def forward(self, x):
        weights, experts = self.gate(x)
        y = self.combine(weights, experts, *[expert(x) for expert in self.experts])
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y


class MLA(nn.Module):
    """Multi-head Latent Attention in its naive (per-head key/value) form (DESIGN.md §4)."""

    def __init__(self, key: str, cfg: ModelConfig, rope: Rope):
        super().__init__()
        h, n = cfg.hidden_size, cfg.num_attention_heads
        self.n_heads, self.nope, self.rope_dim = n, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.kv_lora, self.v_dim = cfg.kv_lora_rank, cfg.v_head_dim
        qk = cfg.qk_head_dim
        if cfg.q_lora_rank:
            self.q_a_proj = Linear(f"{key}.q_a_proj", h, cfg.q_lora_rank)
            self.q_a_layernorm = RMSNorm(f"{key}.q_a_layernorm", cfg.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = Linear(f"{key}.q_b_proj", cfg.q_lora_rank, n * qk)
        else:
            self.q_proj = Linear(f"{key}.q_proj", h, n * qk)
        self.kv_a_proj_with_mqa = Linear(f"{key}.kv_a_proj_with_mqa", h, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        self.kv_a_layernorm = RMSNorm(f"{key}.kv_a_layernorm", cfg.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = Linear(f"{key}.kv_b_proj", cfg.kv_lora_rank, n * (cfg.qk_nope_head_dim + cfg.v_head_dim))
        self.o_proj = Linear(f"{key}.o_proj", n * cfg.v_head_dim, h)
        self.rope = rope
        self.attn = CausalAttention(cfg.softmax_scale)
        self.append_k, self.append_v = CacheAppend(), CacheAppend()
        self.has_q_lora = bool(cfg.q_lora_rank)

    def forward(self, x, positions, mask, past_k, past_v):
        n, nope, rope = self.n_heads, self.nope, self.rope_dim
        if self.has_q_lora:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        else:
            q = self.q_proj(x)
        q_nope, q_pe = q.unflatten(-1, (n, nope + rope)).split([nope, rope], dim=-1)
        q_pe = self.rope(q_pe, positions)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora, rope], dim=-1)
        k_pe = self.rope(k_pe.unsqueeze(2), positions)  # one rope key shared by all heads
        kv = self.kv_b_proj(self.kv_a_layernorm(c_kv)).unflatten(-1, (n, nope + self.v_dim))
        k_nope, v = kv.split([nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.expand(-1, -1, n, -1)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        _, width = cache_layout("naive", heads=n, qk_dim=nope + rope, v_dim=self.v_dim)
        if nope + rope < width:  # zero columns add nothing to q . k
            q, k = F.pad(q, (0, width - nope - rope)), F.pad(k, (0, width - nope - rope))
        if self.v_dim < width:
            v = F.pad(v, (0, width - self.v_dim))
        k_all = self.append_k(past_k, k.transpose(1, 2), mask)
        v_all = self.append_v(past_v, v.transpose(1, 2), mask)
        out = self.attn(q, k_all, v_all, mask)
        if self.v_dim < width:
            out = out.split([self.v_dim, width - self.v_dim], dim=-1)[0]
        return self.o_proj(out.flatten(-2)), k_all, v_all


class Indexer(nn.Module):
    """DeepSeek-V3.2's lightning indexer (DESIGN.md §9), as transformers 5.24 computes it: q from MLA's
    normalized q_lora latent, one LayerNorm-ed key head, both rotated on their first qk_rope_head_dim values
    ([rope | rest], half-split rotate_half rope, unlike MLA's [nope | rope] interleaved). DeepSeek's own code also
    applies a Hadamard rotation to q and k and scores in FP8; transformers skips both (the rotation is
    orthogonal, so exact scores are unchanged) and so does dsc."""

    def __init__(self, key: str, cfg: ModelConfig, rope: Rope):
        super().__init__()
        sparse = cfg.sparse_attention
        assert sparse is not None and cfg.q_lora_rank
        self.heads, self.dim, self.rope_dim = sparse.heads, sparse.head_dim, cfg.qk_rope_head_dim
        self.wq_b = Linear(f"{key}.wq_b", cfg.q_lora_rank, sparse.heads * sparse.head_dim)
        self.wk = Linear(f"{key}.wk", cfg.hidden_size, sparse.head_dim)
        self.k_norm = LayerNorm(f"{key}.k_norm", sparse.head_dim, 1e-6)  # transformers: nn.LayerNorm(eps=1e-6)
        self.weights_proj = Linear(f"{key}.weights_proj", cfg.hidden_size, sparse.heads)
        self.rope = Rope(list(rope.attrs["inv_freq"]), rope.attrs["scaling"], interleaved=False)
        self.select = IndexTopK(sparse)
        self.append = CacheAppend()

    def _rotate(self, x, positions):
        if self.dim == self.rope_dim:
            return self.rope(x, positions)
        x_pe, x_rest = x.split([self.rope_dim, self.dim - self.rope_dim], dim=-1)
        return torch.cat([self.rope(x_pe, positions), x_rest], dim=-1)

    def forward(self, x, q_resid, positions, mask, past_keys):
        q = self._rotate(self.wq_b(q_resid).unflatten(-1, (self.heads, self.dim)), positions)
        k = self._rotate(self.k_norm(self.wk(x)), positions)
        # the indexer cache, one head, head-major as the others: [batch, 1, past + seq, index_head_dim]
        keys = self.append(past_keys, k.unsqueeze(2).transpose(1, 2), mask)
        return self.select(q, keys, self.weights_proj(x), mask), keys


class SparseMLA(MLA):
    """MLA whose queries attend only to the indexer's top-k keys (DeepSeek-V3.2 DSA, DESIGN.md §9)."""

    def __init__(self, key: str, cfg: ModelConfig, rope: Rope):
        super().__init__(key, cfg, rope)
        self.indexer = Indexer(f"{key}.indexer", cfg, rope)
        self.attn = SparseCausalAttention(cfg.softmax_scale)

    def forward(self, x, positions, mask, past_k, past_v, past_index):
        n, nope, rope = self.n_heads, self.nope, self.rope_dim
        q_resid = self.q_a_layernorm(self.q_a_proj(x))
        q = self.q_b_proj(q_resid)
        q_nope, q_pe = q.unflatten(-1, (n, nope + rope)).split([nope, rope], dim=-1)
        q_pe = self.rope(q_pe, positions)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora, rope], dim=-1)
        k_pe = self.rope(k_pe.unsqueeze(2), positions)
        kv = self.kv_b_proj(self.kv_a_layernorm(c_kv)).unflatten(-1, (n, nope + self.v_dim))
        k_nope, v = kv.split([nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.expand(-1, -1, n, -1)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        _, width = cache_layout("naive", heads=n, qk_dim=nope + rope, v_dim=self.v_dim)
        if nope + rope < width:  # zero columns add nothing to q . k
            q, k = F.pad(q, (0, width - nope - rope)), F.pad(k, (0, width - nope - rope))
        if self.v_dim < width:
            v = F.pad(v, (0, width - self.v_dim))
        k_all = self.append_k(past_k, k.transpose(1, 2), mask)
        v_all = self.append_v(past_v, v.transpose(1, 2), mask)
        selected, index_keys = self.indexer(x, q_resid, positions, mask, past_index)
        out = self.attn(q, k_all, v_all, mask, selected)
        if self.v_dim < width:
            out = out.split([self.v_dim, width - self.v_dim], dim=-1)[0]
        return self.o_proj(out.flatten(-2)), k_all, v_all, index_keys


class DecoderLayer(nn.Module):
    def __init__(self, index: int, cfg: ModelConfig, rope: Rope):
        super().__init__()
        key = f"model.layers.{index}"
        self.input_layernorm = RMSNorm(f"{key}.input_layernorm", cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = (SparseMLA if cfg.sparse_attention else MLA)(f"{key}.self_attn", cfg, rope)
        self.post_attention_layernorm = RMSNorm(f"{key}.post_attention_layernorm", cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.is_moe_layer(index):
            self.mlp = MoE(f"{key}.mlp", cfg)
        else:
            self.mlp = MLP(f"{key}.mlp", cfg.hidden_size, cfg.intermediate_size)

    def forward(self, h, positions, mask, past_k, past_v):
        attn, k_all, v_all = self.self_attn(self.input_layernorm(h), positions, mask, past_k, past_v)
        h = h + attn
        h = h + self.mlp(self.post_attention_layernorm(h))
        return h, k_all, v_all


class SparseDecoderLayer(DecoderLayer):
    """A DeepSeek-V3.2 layer: its cache adds the indexer's keys (DESIGN.md §9)."""

    def forward(self, h, positions, mask, past_k, past_v, past_index):
        attn, k_all, v_all, index_keys = self.self_attn(
            self.input_layernorm(h), positions, mask, past_k, past_v, past_index
        )
        h = h + attn
        h = h + self.mlp(self.post_attention_layernorm(h))
        return h, k_all, v_all, index_keys


class Embed(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = Embedding("model.embed_tokens", cfg.vocab_size, cfg.hidden_size)

    def forward(self, input_ids):
        return self.embed_tokens(input_ids)


class Head(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm("model.norm", cfg.hidden_size, cfg.rms_norm_eps)
        head_key = "model.embed_tokens" if cfg.tie_word_embeddings else "lm_head"
        self.lm_head = Linear(head_key, cfg.hidden_size, cfg.vocab_size)

    def forward(self, h):
        return self.lm_head(self.norm(h))


class DeepseekModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        inv_freq, scaling = rope_frequencies(cfg)
        rope = Rope(inv_freq, scaling, cfg.rope_interleave)
        self.embed = Embed(cfg)
        layer = SparseDecoderLayer if cfg.sparse_attention else DecoderLayer
        self.layers = nn.ModuleList(layer(i, cfg, rope) for i in range(cfg.num_hidden_layers))
        self.head = Head(cfg)

    def bind(self, provider: TensorProvider) -> None:
        for m in self.modules():
            if isinstance(m, Leaf):
                m.bind(provider)

    def forward(self, input_ids, position_ids, attention_mask, past: list[tuple[torch.Tensor, ...]]):
        """Eager execution (leaves run their IR reference ops). Returns (logits, present)."""
        h = self.embed(input_ids)
        present = []
        for layer, layer_past in zip(self.layers, past, strict=True):
            h, *layer_present = layer(h, position_ids, attention_mask, *layer_past)
            present.append(tuple(layer_present))
        return self.head(h), present
