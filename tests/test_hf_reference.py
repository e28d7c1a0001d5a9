"""The transformers reference itself: every HF config saves, reloads with exactly its keys, and the reference's
cached decode equals one uncached forward over prompt + generated tokens (so its KV-cache path is sound)."""

import json

import pytest
import torch
from hf_reference import HF_CONFIGS, hf_config, hf_reference_logits, load_hf_model, save_hf_checkpoint
from safetensors import safe_open

PROMPT = [[3, 14, 15, 92, 65, 35, 8], [89, 79, 32, 38, 46, 26, 43]]
DECODE_STEPS = 6
RTOL = 1e-4


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


@pytest.fixture(scope="module", params=sorted(HF_CONFIGS))
def ckpt(request, tmp_path_factory):
    return request.param, save_hf_checkpoint(request.param, tmp_path_factory.mktemp(request.param) / "ckpt")


def test_checkpoint_reloads_with_exactly_its_keys(ckpt):
    name, path = ckpt
    _, info = load_hf_model(path, loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    saved = json.loads((path / "config.json").read_text())
    assert saved["model_type"] == HF_CONFIGS[name]["model_type"]


def test_cached_decode_equals_full_forward(ckpt):
    _, path = ckpt
    prefill, steps, generated = hf_reference_logits(path, PROMPT, DECODE_STEPS)
    b, s = len(PROMPT), len(PROMPT[0])
    vocab = HF_CONFIGS[ckpt[0]]["vocab_size"]
    assert prefill.shape == (b, s, vocab) and len(steps) == DECODE_STEPS
    assert all(step.shape == (b, 1, vocab) for step in steps)
    assert [len(row) for row in generated] == [DECODE_STEPS + 1] * b
    with torch.no_grad():
        full = load_hf_model(path)(
            torch.tensor([p + g[:DECODE_STEPS] for p, g in zip(PROMPT, generated, strict=True)])
        ).logits
    assert rel_error(prefill, full[:, :s]) <= RTOL
    for i, step in enumerate(steps):
        assert rel_error(step[:, 0], full[:, s + i]) <= RTOL, f"decode step {i}"
    # Greedy: each generated token is the argmax at the position before it (teacher-forced full forward).
    assert full[:, s - 1 :].argmax(-1).tolist() == generated


def test_saved_tensor_names_are_the_official_per_expert_ones(ckpt):
    name, path = ckpt
    cfg = hf_config(name)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        moe = cfg.first_k_dense_replace  # first MoE layer
        m = f"model.layers.{moe}.mlp."
        for e in range(cfg.n_routed_experts):
            assert {f"{m}experts.{e}.{p}_proj.weight" for p in ("gate", "up", "down")} <= keys
        assert not any(".experts.gate_up_proj" in k or k.endswith("experts.down_proj") for k in keys)
        assert f.get_slice(m + "gate.weight").get_shape() == [cfg.n_routed_experts, cfg.hidden_size]
        bias = m + "gate.e_score_correction_bias"
        if cfg.model_type == "deepseek_v3":
            assert f.get_tensor(bias).abs().min() > 0  # randomized, not the zeros it inits to
        else:
            assert bias not in keys
        norm = f.get_tensor("model.norm.weight")
        assert not torch.equal(norm, torch.ones_like(norm))
    a = "model.layers.0.self_attn."
    if cfg.q_lora_rank is None:
        assert a + "q_proj.weight" in keys and a + "q_a_proj.weight" not in keys
    else:
        assert {a + "q_a_proj.weight", a + "q_a_layernorm.weight", a + "q_b_proj.weight"} <= keys
    assert ("lm_head.weight" in keys) != cfg.tie_word_embeddings


def test_configs_cover_the_variants_the_frontend_must_handle():
    cfgs = [hf_config(n) for n in HF_CONFIGS]
    v2 = [c for c in cfgs if c.model_type == "deepseek_v2"]
    v3 = [c for c in cfgs if c.model_type == "deepseek_v3"]
    assert v2 and v3
    assert {c.topk_method for c in v2} == {"greedy", "group_limited_greedy"}
    assert any(c.n_group > 1 for c in v3) and any(c.n_group == 1 for c in v3)
    assert {c.rope_interleave for c in v3} == {True, False}
    assert any(c.q_lora_rank is None for c in cfgs) and any(c.tie_word_embeddings for c in cfgs)
    assert {0, 2} <= {c.first_k_dense_replace for c in cfgs}
    yarn = [c.rope_parameters for c in cfgs if c.rope_parameters["rope_type"] == "yarn"]
    assert any(r.get("mscale") and r.get("mscale") == r.get("mscale_all_dim") for r in yarn)  # cos/sin scale 1
    assert any(r.get("mscale") and r.get("mscale_all_dim") and r["mscale"] != r["mscale_all_dim"] for r in yarn)
    assert any(r.get("mscale_all_dim") and not r.get("mscale") for r in yarn)  # transformers' fallback
    assert any(c.rms_norm_eps != 1e-6 for c in cfgs)  # latent norms keep 1e-6 regardless
    assert all(c.num_key_value_heads == c.num_attention_heads for c in cfgs)  # V3's default is 128
