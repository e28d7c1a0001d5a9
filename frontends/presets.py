"""Random-weight checkpoints in the Hugging Face DeepSeek-V3 format, written without transformers.

Tensors carry the official checkpoint's names and shapes (DESIGN.md §2): per-expert
``mlp.experts.{e}.{gate,up,down}_proj.weight``, an fp32 router gate and e_score_correction_bias, and,
with ``fp8=True``, float8_e4m3fn linear weights with 128x128 ``weight_scale_inv`` block scales. Every
tensor comes from its own generator seeded by (seed, name), so files are deterministic and are written
one tensor at a time: memory stays bounded by the largest tensor, whatever the preset's size.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from dsc.errors import DscError
from dsc.frontends.config import ModelConfig, config_from_dict

_YARN = {
    "type": "yarn",
    "factor": 40.0,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}

_BASE = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "hidden_act": "silu",
    "n_shared_experts": 1,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "moe_layer_freq": 1,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "rope_scaling": _YARN,
    "max_position_embeddings": 163840,
    "tie_word_embeddings": False,
    "rope_interleave": True,
    "attention_bias": False,
    "num_nextn_predict_layers": 0,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "initializer_range": 0.02,
    "torch_dtype": "float32",
}

PRESETS: dict[str, dict] = {
    "tiny": {
        **_BASE,
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 96,
        "moe_intermediate_size": 32,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": 32,
        "kv_lora_rank": 16,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "v_head_dim": 16,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "n_group": 2,
        "topk_group": 1,
        "first_k_dense_replace": 1,
    },
    "bench": {
        **_BASE,
        "vocab_size": 8192,
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "moe_intermediate_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "q_lora_rank": 384,
        "kv_lora_rank": 128,
        "qk_nope_head_dim": 64,
        "qk_rope_head_dim": 32,
        "v_head_dim": 64,
        "n_routed_experts": 32,
        "num_experts_per_tok": 4,
        "n_group": 4,
        "topk_group": 2,
        "first_k_dense_replace": 1,
    },
}

_FP8_SUFFIXES = (
    "q_a_proj.weight",
    "q_b_proj.weight",
    "q_proj.weight",
    "kv_a_proj_with_mqa.weight",
    "kv_b_proj.weight",
    "o_proj.weight",
    "gate_proj.weight",
    "up_proj.weight",
    "down_proj.weight",
)
_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float8_e4m3fn: "F8_E4M3"}


def tensor_specs(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the checkpoint, official names, in a fixed order."""
    h, n = cfg.hidden_size, cfg.num_attention_heads
    specs: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (cfg.vocab_size, h))]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        specs += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
        a = p + "self_attn."
        if cfg.q_lora_rank:
            specs += [
                (a + "q_a_proj.weight", (cfg.q_lora_rank, h)),
                (a + "q_a_layernorm.weight", (cfg.q_lora_rank,)),
                (a + "q_b_proj.weight", (n * cfg.qk_head_dim, cfg.q_lora_rank)),
            ]
        else:
            specs.append((a + "q_proj.weight", (n * cfg.qk_head_dim, h)))
        specs += [
            (a + "kv_a_proj_with_mqa.weight", (cfg.kv_lora_rank + cfg.qk_rope_head_dim, h)),
            (a + "kv_a_layernorm.weight", (cfg.kv_lora_rank,)),
            (a + "kv_b_proj.weight", (n * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)),
            (a + "o_proj.weight", (h, n * cfg.v_head_dim)),
        ]
        if cfg.is_moe_layer(i):
            m, e = p + "mlp.", cfg.n_routed_experts
            specs += [(m + "gate.weight", (e, h)), (m + "gate.e_score_correction_bias", (e,))]
            mlps = [(f"{m}experts.{j}.", cfg.moe_intermediate_size) for j in range(e)]
            if cfg.n_shared_experts:
                mlps.append((m + "shared_experts.", cfg.moe_intermediate_size * cfg.n_shared_experts))
        else:
            mlps = [(p + "mlp.", cfg.intermediate_size)]
        for prefix, inter in mlps:
            specs += [
                (prefix + "gate_proj.weight", (inter, h)),
                (prefix + "up_proj.weight", (inter, h)),
                (prefix + "down_proj.weight", (h, inter)),
            ]
    specs.append(("model.norm.weight", (h,)))
    if not cfg.tie_word_embeddings:
        specs.append(("lm_head.weight", (cfg.vocab_size, h)))
    return specs


def random_tensor(name: str, shape: tuple[int, ...], seed: int, lm_head_scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=g)  # not all ones, so norms matter
    if name.endswith("e_score_correction_bias"):
        return 0.05 * torch.randn(shape, generator=g)  # not zeros, so the bias matters
    t = 0.02 * torch.randn(shape, generator=g)
    return t * lm_head_scale if name == "lm_head.weight" else t


def quantize_fp8(w: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's FP8 weight format (DESIGN.md §5): e4m3 values and float32 scale_inv per 128x128 block."""
    rows, cols = w.shape
    bo, bi = block
    br, bc = -(-rows // bo), -(-cols // bi)
    padded = torch.zeros(br * bo, bc * bi, dtype=torch.float32)
    padded[:rows, :cols] = w.float()
    blocks = padded.view(br, bo, bc, bi)
    scale = blocks.abs().amax(dim=(1, 3)) / 448.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (blocks / scale[:, None, :, None]).view(br * bo, bc * bi)[:rows, :cols].to(torch.float8_e4m3fn)
    return q.contiguous(), scale.contiguous()


def write_safetensors(
    path: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]], produce: Callable[[str], torch.Tensor]
) -> int:
    """Stream tensors into one safetensors file: header from the specs, then each tensor as produced."""
    header, offset = {}, 0
    for name, dtype, shape in sorted(specs):
        n = torch.empty((), dtype=dtype).element_size()
        for d in shape:
            n *= d
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * ((-len(blob)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, dtype, shape in sorted(specs):
            t = produce(name)
            assert t.dtype == dtype and tuple(t.shape) == tuple(shape), name
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return offset


def make_model(
    preset_or_config: str | dict,
    out_dir: str | Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    fp8: bool = False,
    shards: int = 1,
    lm_head_scale: float = 1.0,
    progress: Callable[[str], None] | None = None,
) -> Path:
    if isinstance(preset_or_config, str):
        if preset_or_config not in PRESETS:
            raise DscError(f"unknown preset '{preset_or_config}'; choose one of: {', '.join(sorted(PRESETS))}")
        raw = dict(PRESETS[preset_or_config])
    else:
        raw = dict(preset_or_config)
    raw["torch_dtype"] = str(dtype).removeprefix("torch.")
    if fp8:
        raw["quantization_config"] = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [128, 128],
        }
    cfg = config_from_dict(raw, "preset")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specs: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
    for name, shape in tensor_specs(cfg):
        keep_fp32 = name.endswith(("gate.weight", "e_score_correction_bias")) and ".mlp.gate." in name
        if fp8 and name.endswith(_FP8_SUFFIXES) and not keep_fp32:
            specs.append((name, torch.float8_e4m3fn, shape))
            specs.append((name + "_scale_inv", torch.float32, (-(-shape[0] // 128), -(-shape[1] // 128))))
        else:
            specs.append((name, torch.float32 if keep_fp32 else dtype, shape))
    shapes = dict(tensor_specs(cfg))

    def produce(name: str) -> torch.Tensor:
        base = name.removesuffix("_scale_inv")
        w = random_tensor(base, shapes[base], seed, lm_head_scale)
        if fp8 and any(s[0] == base and s[1] == torch.float8_e4m3fn for s in specs):
            q, scale = quantize_fp8(w)
            return scale if name.endswith("_scale_inv") else q
        return w.to(next(s[1] for s in specs if s[0] == name))

    groups = _shard(specs, shards)
    weight_map, total = {}, 0
    for k, group in enumerate(groups, start=1):
        fname = "model.safetensors" if shards == 1 else f"model-{k:05d}-of-{shards:05d}.safetensors"
        if progress:
            progress(f"writing {fname} ({len(group)} tensors)")
        total += write_safetensors(out / fname, group, produce)
        weight_map.update({name: fname for name, _, _ in group})
    if shards > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    return out


def _shard(specs: Iterable, shards: int) -> list[list]:
    specs = list(specs)
    per = -(-len(specs) // shards)
    groups = [specs[i * per : (i + 1) * per] for i in range(shards)]
    return [g for g in groups if g] or [[]]
