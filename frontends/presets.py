"""Random-weight checkpoints in the Hugging Face DeepSeek-V3 format, written without transformers.

Tensors carry the official checkpoint's names and shapes (DESIGN.md §2): per-expert
``mlp.experts.{e}.{gate,up,down}_proj.weight``, an fp32 router gate and e_score_correction_bias, and,
with ``fp8=True``, float8_e4m3fn linear weights with 128x128 ``weight_scale_inv`` block scales (§5). Every
tensor comes from its own generator seeded by (seed, name), so files are deterministic, tensors can be made
in any order, and they are written one at a time: memory stays bounded by the largest tensor, whatever the
preset's size.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import struct
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from dsc.errors import DscError
from dsc.frontends.config import ModelConfig, config_from_dict
from dsc.ir.ops import block_scale_shape, quantize_fp8

# DeepSeek-V3's own rope_scaling (config.json of deepseek-ai/DeepSeek-V3).
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
    "attention_dropout": 0.0,
    "num_nextn_predict_layers": 0,  # no MTP layer is written
    "bos_token_id": 0,
    "eos_token_id": 1,
    "initializer_range": 0.02,
    "use_cache": True,
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

# DeepSeek-V3.2 (DSA, DESIGN.md §9): V3 plus the lightning indexer. The bench preset keeps V3.2's attention
# proportions: index_n_heads = heads / 2, index_head_dim = 2 * qk_rope_head_dim, kv_lora_rank = 8 * rope, so
# the indexer reads 8 * 64 = 512 values per key where absorbed MLA reads 16 * (256 + 32) = 4608 (V3.2: 8192 vs
# 73728, the same 9x), and index_topk is V3.2's 2048.
_V32 = {"architectures": ["DeepseekV32ForCausalLM"], "model_type": "deepseek_v32"}
PRESETS["tiny-v32"] = {
    **PRESETS["tiny"],
    **_V32,
    "index_n_heads": 8,
    "index_head_dim": 16,
    "index_topk": 8,
}
PRESETS["bench-v32"] = {
    **PRESETS["bench"],
    **_V32,
    "num_hidden_layers": 2,
    "kv_lora_rank": 256,
    "qk_rope_head_dim": 32,
    "index_n_heads": 8,
    "index_head_dim": 64,
    "index_topk": 2048,
}

FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
# The linear weights DeepSeek ships in FP8 (DESIGN.md §2); the router gate also ends in ``gate.weight`` but not
# in ``gate_proj.weight``, so it never matches.
_FP8_SUFFIXES = tuple(
    f"{m}.weight"
    for m in (
        "q_a_proj",
        "q_b_proj",
        "q_proj",
        "kv_a_proj_with_mqa",
        "kv_b_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "indexer.wq_b",  # DeepSeek-V3.2 ships the indexer's projections in FP8 too, weights_proj in high precision
        "indexer.wk",
    )
)
_ST_DTYPES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float8_e4m3fn: "F8_E4M3",
}


@dataclass(frozen=True)
class LazyTensor:
    """A tensor known by dtype and shape until ``make()`` produces it (once, when it is written)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    make: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def write_safetensors(
    path: str | Path,
    tensors: Mapping[str, torch.Tensor | LazyTensor],
    metadata: Mapping[str, str] | None = None,
) -> int:
    """Stream tensors into one safetensors file; returns the bytes of tensor data written.

    The header (keys sorted, 8-byte little-endian length, JSON padded to 8 bytes) is built from dtypes and
    shapes alone, then each tensor is produced and written in key order, so only one is in memory at a time.
    """
    lazy = {
        k: t if isinstance(t, LazyTensor) else LazyTensor(t.dtype, tuple(t.shape), lambda t=t: t)
        for k, t in tensors.items()
    }
    header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name in sorted(lazy):
        t = lazy[name]
        if t.dtype not in _ST_DTYPES:
            raise DscError(f"{name}: dtype {t.dtype} cannot be written (supported: {sorted(map(str, _ST_DTYPES))})")
        header[name] = {
            "dtype": _ST_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in sorted(lazy):
            t = lazy[name].make()
            if t.dtype != lazy[name].dtype or tuple(t.shape) != lazy[name].shape:
                raise AssertionError(f"{name}: produced {t.dtype} {tuple(t.shape)}, declared {lazy[name]}")
            f.write(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return offset


def tensor_specs(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the checkpoint (official names, without FP8 scales), in layer order."""
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
        if cfg.sparse_attention is not None:
            x, d = a + "indexer.", cfg.sparse_attention.head_dim
            specs += [
                (x + "wq_b.weight", (cfg.sparse_attention.heads * d, cfg.q_lora_rank)),
                (x + "wk.weight", (d, h)),
                (x + "k_norm.weight", (d,)),
                (x + "k_norm.bias", (d,)),
                (x + "weights_proj.weight", (cfg.sparse_attention.heads, h)),
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
    """The float32 value of one tensor; depends only on (name, shape, seed)."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=g)  # not all ones, so norms matter
    if name.endswith("e_score_correction_bias"):
        return 0.05 * torch.randn(shape, generator=g)  # not zeros, so the bias matters
    t = 0.02 * torch.randn(shape, generator=g)  # DeepSeek's initializer_range
    return t * lm_head_scale if name == "lm_head.weight" else t


def make_model(
    preset_or_config: str | Mapping,
    out_dir: str | Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    fp8: bool = False,
    shards: int = 1,
    lm_head_scale: float = 1.0,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write config.json and random weights (one file, or ``shards`` files plus an index) into ``out_dir``.

    ``preset_or_config`` is a PRESETS name or a config.json dict. ``dtype`` is the dtype of every tensor
    except the router (gate weight and bias stay float32, as transformers keeps them) and, with ``fp8``, the
    FP8 linear weights and their scales. ``lm_head_scale`` multiplies lm_head (clear greedy margins in tests).
    """
    if isinstance(preset_or_config, str):
        if preset_or_config not in PRESETS:
            raise DscError(f"unknown preset '{preset_or_config}'; choose one of: {', '.join(sorted(PRESETS))}")
        raw = copy.deepcopy(PRESETS[preset_or_config])
    else:
        raw = copy.deepcopy(dict(preset_or_config))
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise DscError(f"dtype {dtype} is not supported for random checkpoints (float32, bfloat16, float16)")
    if shards < 1:
        raise DscError(f"shards must be >= 1, got {shards}")
    # transformers' DeepseekV3Config defaults num_key_value_heads to 128, not to num_attention_heads.
    raw.setdefault("num_key_value_heads", raw.get("num_attention_heads"))
    raw["torch_dtype"] = str(dtype).removeprefix("torch.")
    if fp8:
        raw["quantization_config"] = copy.deepcopy(FP8_CONFIG)
    cfg = config_from_dict(raw, "make_model config")

    groups = _plan(cfg, seed, dtype, fp8, lm_head_scale)
    if shards > len(groups):
        raise DscError(f"shards {shards} exceeds the {len(groups)} weights of this model")
    out = Path(out_dir)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        _write_checkpoint(out, raw, groups, shards, progress)
    except BaseException as exc:
        if created:  # never leave half a checkpoint behind
            shutil.rmtree(out, ignore_errors=True)
        if isinstance(exc, OSError):
            raise DscError(f"{out}: cannot write the checkpoint: {exc.strerror or exc}") from exc
        raise
    return out


def _write_checkpoint(out: Path, raw: dict, groups: list[dict], shards: int, progress) -> None:
    weight_map: dict[str, str] = {}
    total = 0
    for k, chunk in enumerate(_split(groups, shards), start=1):
        fname = "model.safetensors" if shards == 1 else f"model-{k:05d}-of-{shards:05d}.safetensors"
        tensors = {name: t for group in chunk for name, t in group.items()}
        if progress:
            progress(f"writing {fname}: {len(tensors)} tensors, {sum(t.nbytes for t in tensors.values()) / 1e6:.1f} MB")
        total += write_safetensors(out / fname, tensors)
        weight_map.update(dict.fromkeys(tensors, fname))
    if shards > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")


def _plan(cfg: ModelConfig, seed: int, dtype: torch.dtype, fp8: bool, lm_head_scale: float) -> list[dict]:
    """One {name: LazyTensor} group per weight: the weight, plus its scale_inv when it is FP8."""

    @lru_cache(maxsize=1)  # weight and scale are adjacent in key order: quantize once, hold one tensor
    def quantized(name: str, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_fp8(random_tensor(name, shape, seed, lm_head_scale))

    def plain(name: str, shape: tuple[int, ...], dt: torch.dtype) -> dict[str, LazyTensor]:
        return {name: LazyTensor(dt, shape, lambda: random_tensor(name, shape, seed, lm_head_scale).to(dt))}

    def fp8_pair(name: str, shape: tuple[int, ...]) -> dict[str, LazyTensor]:
        scale_shape = block_scale_shape(shape)
        return {
            name: LazyTensor(torch.float8_e4m3fn, shape, lambda: quantized(name, shape)[0]),
            name + "_scale_inv": LazyTensor(torch.float32, scale_shape, lambda: quantized(name, shape)[1]),
        }

    groups = []
    for name, shape in tensor_specs(cfg):
        if fp8 and name.endswith(_FP8_SUFFIXES):
            groups.append(fp8_pair(name, shape))
        else:  # the router (gate weight and bias) stays float32 whatever the dtype
            # (transformers also keeps the indexer's weights_proj in float32)
            high = ".mlp.gate." in name or ".weights_proj." in name
            groups.append(plain(name, shape, torch.float32 if high else dtype))
    return groups


def _split(items: list, parts: int) -> list[list]:
    """``parts`` contiguous, non-empty chunks whose lengths differ by at most one."""
    q, r = divmod(len(items), parts)
    bounds = [i * q + min(i, r) for i in range(parts + 1)]
    return [items[bounds[i] : bounds[i + 1]] for i in range(parts)]
