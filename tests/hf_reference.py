"""The independent numerical reference: transformers' DeepseekV3/V2ForCausalLM on random-weight checkpoints
that transformers itself saved (save_pretrained), run in float32 with eager attention."""

from __future__ import annotations

import copy
import inspect
import json
from pathlib import Path

import numpy as np
import torch

_YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 40.0,
    "original_max_position_embeddings": 64,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
}
# mscale != mscale_all_dim: cos/sin scaled by yarn_mscale(40, 1) / yarn_mscale(40, 0.707) = 1.086, the only
# config where that ratio is not 1.
_YARN_RATIO = {**_YARN, "mscale": 1.0}
_COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_attention_heads=4,
    num_key_value_heads=4,
    kv_lora_rank=16,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
)

# Together: model_type v3 and v2; q_lora_rank null; yarn (with mscale_all_dim); n_group 1; first_k_dense_replace
# 0 and 2; softmax greedy and group_limited_greedy (v2); sigmoid noaux_tc (v3); tied embeddings; both rope layouts.
# No config sets moe_layer_freq: transformers ignores it (layer i is MoE iff i >= first_k_dense_replace).
HF_CONFIGS: dict[str, dict] = {
    "v3_yarn_grouped": dict(
        _COMMON,
        model_type="deepseek_v3",
        num_hidden_layers=3,
        q_lora_rank=32,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        routed_scaling_factor=2.5,
        rope_parameters=_YARN,
    ),
    "v3_no_q_lora_all_moe_tied": dict(
        _COMMON,
        model_type="deepseek_v3",
        num_hidden_layers=2,
        q_lora_rank=None,
        n_routed_experts=6,
        n_shared_experts=2,
        num_experts_per_tok=3,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=0,
        tie_word_embeddings=True,
        routed_scaling_factor=1.0,
        norm_topk_prob=False,
    ),
    "v3_dense2_half_split_rope": dict(
        _COMMON,
        model_type="deepseek_v3",
        num_hidden_layers=3,
        q_lora_rank=24,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=2,
        rope_interleave=False,
        routed_scaling_factor=1.5,
    ),
    "v2_greedy_no_q_lora": dict(
        _COMMON,
        model_type="deepseek_v2",
        num_hidden_layers=2,
        q_lora_rank=None,
        n_routed_experts=8,
        n_shared_experts=2,
        num_experts_per_tok=2,
        topk_method="greedy",
        first_k_dense_replace=1,
        routed_scaling_factor=1.0,
    ),
    "v2_group_limited_yarn": dict(
        _COMMON,
        model_type="deepseek_v2",
        num_hidden_layers=2,
        q_lora_rank=32,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        topk_method="group_limited_greedy",
        first_k_dense_replace=0,
        routed_scaling_factor=16.0,
        rope_parameters=_YARN_RATIO,
    ),
    "v3_tied_single_group": dict(
        _COMMON,
        model_type="deepseek_v3",
        num_hidden_layers=2,
        q_lora_rank=16,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
        tie_word_embeddings=True,
        routed_scaling_factor=2.5,
    ),
    # Two transformers rules the others leave untested. (1) q_a_layernorm/kv_a_layernorm are built without an
    # eps, so they use 1e-6 whatever rms_norm_eps says (DeepSeek's own code agrees); 1e-2 is exaggerated so a
    # wrong eps shows far above 1e-4 (Moonlight-style 1e-5 errs by only ~9e-5). (2) YaRN with mscale_all_dim but
    # no mscale: transformers' attention_factor falls back to 0.1 ln(factor) + 1 (1.208 here), so cos/sin are
    # scaled, while the softmax scale gets yarn_mscale(factor, mscale_all_dim)^2.
    "v3_eps_yarn_cos_scaled": dict(
        _COMMON,
        model_type="deepseek_v3",
        num_hidden_layers=2,
        q_lora_rank=32,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        routed_scaling_factor=2.5,
        rms_norm_eps=1e-2,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "original_max_position_embeddings": 32,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale_all_dim": 0.707,
        },
    ),
}


# DeepSeek-V3.2 (DSA, DESIGN.md §9). Together: top-k below the prompt (prefill and decode select), top-k at
# or above the whole context (DSA equals dense attention), yarn rope, sizes that are not multiples of 128 or of
# each other (odd index_head_dim, rope dims), one expert group, and index_head_dim == qk_rope_head_dim (all rope).
# Ties in the reference: transformers' torch.topk breaks exact ties arbitrarily, and an index score is a sum of
# ReLUs, so a key whose every head is <= 0 scores exactly 0; with 8+ index heads of random weights that happens
# to about 1 key in 2^8, and tests/test_dsa.py asserts a margin around every k-th score it relies on.
_DSA = dict(
    _COMMON,
    model_type="deepseek_v32",
    n_shared_experts=1,
    first_k_dense_replace=1,
    routed_scaling_factor=2.5,
)
DSA_CONFIGS: dict[str, dict] = {
    "v32_topk_below_context": dict(
        _DSA,
        num_hidden_layers=2,
        q_lora_rank=32,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        index_n_heads=8,
        index_head_dim=24,
        index_topk=4,
    ),
    "v32_topk_covers_context": dict(
        _DSA,
        num_hidden_layers=2,
        q_lora_rank=24,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        index_n_heads=8,
        index_head_dim=16,
        index_topk=64,
    ),
    "v32_yarn_one_group_odd": dict(
        _DSA,
        num_hidden_layers=2,
        hidden_size=72,
        num_attention_heads=3,
        num_key_value_heads=3,
        kv_lora_rank=20,
        qk_nope_head_dim=12,
        qk_rope_head_dim=6,
        v_head_dim=10,
        q_lora_rank=28,
        n_routed_experts=6,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        index_n_heads=12,
        index_head_dim=22,
        index_topk=5,
        rope_parameters=_YARN,
    ),
    "v32_all_rope_indexer": dict(
        _DSA,
        num_hidden_layers=2,
        q_lora_rank=32,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=0,
        index_n_heads=16,
        index_head_dim=8,
        index_topk=6,
    ),
}


def _model_class(model_type: str):
    import transformers

    return {
        "deepseek_v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM),
        "deepseek_v2": (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM),
        "deepseek_v32": (transformers.DeepseekV32Config, transformers.DeepseekV32ForCausalLM),
    }[model_type]


def hf_config(name: str):
    """The transformers config object of HF_CONFIGS[name] or DSA_CONFIGS[name] (a deep copy: transformers edits
    rope dicts in place)."""
    raw = copy.deepcopy(HF_CONFIGS[name] if name in HF_CONFIGS else DSA_CONFIGS[name])
    config_cls, _ = _model_class(raw.pop("model_type"))
    return config_cls(**raw)


def save_hf_checkpoint(name: str, out_dir: Path, *, seed: int = 0, lm_head_scale: float = 4.0) -> Path:
    """Build the named config in transformers with random weights and save_pretrained it (safetensors, fp32)."""
    config = hf_config(name)
    _, model_cls = _model_class(config.model_type)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:  # norms init to ones: randomize so they matter
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
        for mod in model.modules():
            if hasattr(mod, "e_score_correction_bias"):  # inits to zeros: randomize so it matters
                mod.e_score_correction_bias.copy_(0.05 * torch.randn_like(mod.e_score_correction_bias))
        # Clear greedy margins. A tied table scales the inputs too, so it gets a milder factor.
        if not config.tie_word_embeddings:
            model.lm_head.weight.mul_(lm_head_scale)
        else:
            model.model.embed_tokens.weight.mul_(lm_head_scale**0.5)
    model.save_pretrained(out_dir)
    return Path(out_dir)


def load_hf_model(ckpt_dir: Path, *, loading_info: bool = False):
    """from_pretrained in float32 with eager attention; with loading_info, also transformers' key report."""
    model_type = json.loads((Path(ckpt_dir) / "config.json").read_text())["model_type"]
    _, model_cls = _model_class(model_type)
    model, info = model_cls.from_pretrained(
        ckpt_dir, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    return (model.eval(), info) if loading_info else model.eval()


def _cache_kwarg(model) -> str:
    # transformers 5.24 renamed past_key_values to cache (the old name still works until 5.40); earlier 5.x
    # releases take only past_key_values and would silently ignore a ``cache`` keyword.
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def hf_reference_logits(
    ckpt_dir: Path, prompt: list[list[int]], decode_steps: int
) -> tuple[torch.Tensor, list[torch.Tensor], list[list[int]]]:
    """Prefill logits [b, s, V], then greedy decode through transformers' own KV cache.

    Returns (prefill logits, per-step logits [b, 1, V] for each of ``decode_steps`` steps, generated ids per
    row). The generated ids are ``decode_steps + 1`` per row: the first comes from the prefill logits, step i
    feeds generated[i] at position s + i and its logits give generated[i + 1].
    """
    model = load_hf_model(ckpt_dir)
    key = _cache_kwarg(model)
    ids = torch.tensor(prompt)
    out = model(ids, use_cache=True)
    prefill = out.logits
    nxt = prefill[:, -1].argmax(-1, keepdim=True)
    generated, steps = [nxt], []
    for _ in range(decode_steps):
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        out = model(nxt, use_cache=True, **{key: cache})
        steps.append(out.logits)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        generated.append(nxt)
    return prefill, steps, torch.cat(generated, dim=1).tolist()


def rel_error(got, ref) -> float:
    """max |got - ref| / max |ref|: the relative logit error every numerical test states its tolerance in."""
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def teacher_forced(step, empty: list, prompt: list[list[int]], generated: list[list[int]], steps: int):
    """Prefill ``prompt`` through an engine-like ``step(ids, positions, past)``, then feed the reference's greedy
    tokens one at a time through the returned cache; the logits of every step."""
    ids = np.asarray(prompt, dtype=np.int64)
    pos = np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()
    logits, past = step(ids, pos, empty)
    out = [logits]
    for i in range(steps):
        tok = np.asarray([[row[i]] for row in generated], dtype=np.int64)
        logits, past = step(tok, np.full((len(prompt), 1), ids.shape[1] + i, dtype=np.int64), past)
        out.append(logits)
    return out
