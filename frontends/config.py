"""config.json of a Hugging Face DeepSeek-V3 / V2 checkpoint, normalized into one frozen ModelConfig.

Defaults follow transformers 5.x's DeepseekV3Config / DeepseekV2Config, and the model semantics follow
transformers' modeling code where it and DESIGN.md differ (noted at each field). Both transformers 4.x
``rope_scaling`` and 5.x ``rope_parameters`` are accepted.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dsc.errors import ConfigError

SUPPORTED = ("deepseek_v3", "deepseek_v2")

# Defaults where config.json omits a field: transformers 5.x DeepseekV3Config / DeepseekV2Config.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v3": dict(
        vocab_size=129280,
        hidden_size=7168,
        intermediate_size=18432,
        moe_intermediate_size=2048,
        num_hidden_layers=61,
        num_attention_heads=128,
        n_shared_experts=1,
        n_routed_experts=256,
        routed_scaling_factor=2.5,
        kv_lora_rank=512,
        q_lora_rank=1536,
        qk_rope_head_dim=64,
        v_head_dim=128,
        qk_nope_head_dim=128,
        n_group=8,
        topk_group=4,
        num_experts_per_tok=8,
        first_k_dense_replace=3,
        norm_topk_prob=True,
        hidden_act="silu",
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        rope_interleave=True,
        attention_bias=False,
        scoring_func="sigmoid",
        topk_method="noaux_tc",
        moe_layer_freq=1,
        rope_theta=10000.0,
        num_nextn_predict_layers=0,
    ),
    "deepseek_v2": dict(
        vocab_size=102400,
        hidden_size=4096,
        intermediate_size=11008,
        moe_intermediate_size=1407,
        num_hidden_layers=32,
        num_attention_heads=32,
        n_shared_experts=2,
        n_routed_experts=64,
        routed_scaling_factor=1.0,
        kv_lora_rank=512,
        q_lora_rank=1536,
        qk_rope_head_dim=64,
        v_head_dim=128,
        qk_nope_head_dim=128,
        n_group=1,
        topk_group=1,
        num_experts_per_tok=None,
        first_k_dense_replace=0,
        norm_topk_prob=False,
        hidden_act="silu",
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        rope_interleave=True,
        attention_bias=False,
        scoring_func="softmax",
        topk_method="greedy",
        moe_layer_freq=1,
        rope_theta=10000.0,
        num_nextn_predict_layers=0,
    ),
}


@dataclass(frozen=True)
class RopeScaling:
    """YaRN parameters (DESIGN.md §4)."""

    type: str
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0  # 0 = absent: transformers then scales cos/sin by 0.1 ln(factor) + 1
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None  # explicit cos/sin scaling, overrides the mscale rule


@dataclass(frozen=True)
class FP8Quantization:
    fmt: str
    weight_block_size: tuple[int, int]
    activation_scheme: str


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int | None
    n_shared_experts: int | None
    num_experts_per_tok: int | None
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    scoring_func: str
    topk_method: str
    norm_topk_prob: bool
    first_k_dense_replace: int
    moe_layer_freq: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    rope_interleave: bool
    tie_word_embeddings: bool
    max_position_embeddings: int
    hidden_act: str
    num_nextn_predict_layers: int
    quantization: FP8Quantization | None

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, i: int) -> bool:
        # transformers 5.x (both V2 and V3) makes layer i MoE exactly when i >= first_k_dense_replace; it
        # ignores moe_layer_freq, which DeepSeek's own code also honours (i % moe_layer_freq == 0). Released
        # checkpoints all use moe_layer_freq 1, where the two agree; we follow DeepSeek's rule for others.
        if not self.n_routed_experts or not self.num_experts_per_tok:
            return False
        return i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times mscale^2 under YaRN with mscale_all_dim (DESIGN.md §4)."""
        scale = self.qk_head_dim**-0.5
        ys = self.rope_scaling
        if ys is not None and ys.mscale_all_dim:
            m = 0.1 * ys.mscale_all_dim * math.log(ys.factor) + 1.0 if ys.factor > 1 else 1.0
            scale *= m * m
        return scale

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.quantization is not None:
            d["quantization"]["weight_block_size"] = list(self.quantization.weight_block_size)
        return d


def _rope(raw: dict[str, Any], source: str) -> tuple[float, RopeScaling | None]:
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in (None, "default"):
        return theta, None
    if kind != "yarn":
        raise ConfigError(f"{source}: rope type '{kind}' is not supported (supported: default, yarn)")
    if "factor" not in params:
        raise ConfigError(f"{source}: yarn rope scaling needs 'factor'")
    orig = params.get("original_max_position_embeddings") or raw.get("max_position_embeddings")
    return theta, RopeScaling(
        type="yarn",
        factor=float(params["factor"]),
        original_max_position_embeddings=int(orig),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=float(params.get("mscale") or 0.0),
        mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
        attention_factor=float(params["attention_factor"]) if params.get("attention_factor") else None,
    )


def config_from_dict(raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED:
        raise ConfigError(f"{source}: model_type '{model_type}' is not supported (supported: {', '.join(SUPPORTED)})")
    for flag in ("attention_bias", "mlp_bias"):
        if raw.get(flag):
            raise ConfigError(f"{source}: {flag}=true is not supported (DeepSeek checkpoints have no biases)")
    if raw.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{source}: hidden_act '{raw['hidden_act']}' is not supported (only silu)")
    d = {**_DEFAULTS[model_type], **{k: v for k, v in raw.items() if v is not None or k == "q_lora_rank"}}
    theta, rope_scaling = _rope(raw, source)
    quant = raw.get("quantization_config")
    fp8 = None
    if quant:
        if quant.get("quant_method") != "fp8":
            raise ConfigError(f"{source}: quantization '{quant.get('quant_method')}' is not supported (only fp8)")
        fp8 = FP8Quantization(
            str(quant.get("fmt", "e4m3")),
            tuple(quant.get("weight_block_size", (128, 128))),
            str(quant.get("activation_scheme", "dynamic")),
        )
    if model_type == "deepseek_v2":
        # transformers' V2 router: softmax scores, greedy or group_limited_greedy, no renormalization of the
        # top-k weights (it has no norm_topk_prob branch), and complex-pair (interleaved) rope always.
        d.update(scoring_func="softmax", norm_topk_prob=False, rope_interleave=True)
        if d["topk_method"] not in ("greedy", "group_limited_greedy"):
            raise ConfigError(f"{source}: deepseek_v2 topk_method '{d['topk_method']}' is not supported")
    else:
        # transformers' V3 router is always sigmoid + e_score_correction_bias + group-limited (noaux_tc).
        if d.get("scoring_func", "sigmoid") != "sigmoid" or d.get("topk_method", "noaux_tc") != "noaux_tc":
            raise ConfigError(f"{source}: deepseek_v3 needs scoring_func sigmoid and topk_method noaux_tc")
        d.update(scoring_func="sigmoid", topk_method="noaux_tc")
    mtp = raw.get("num_nextn_predict_layers", raw.get("num_mtp_layers", 0)) or 0
    try:
        cfg = ModelConfig(
            model_type=model_type,
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            moe_intermediate_size=int(d["moe_intermediate_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=int(d["num_attention_heads"]),
            q_lora_rank=int(d["q_lora_rank"]) if d.get("q_lora_rank") else None,
            kv_lora_rank=int(d["kv_lora_rank"]),
            qk_nope_head_dim=int(d["qk_nope_head_dim"]),
            qk_rope_head_dim=int(d["qk_rope_head_dim"]),
            v_head_dim=int(d["v_head_dim"]),
            n_routed_experts=int(d["n_routed_experts"]) if d.get("n_routed_experts") else None,
            n_shared_experts=int(d["n_shared_experts"]) if d.get("n_shared_experts") else None,
            num_experts_per_tok=int(d["num_experts_per_tok"]) if d.get("num_experts_per_tok") else None,
            n_group=int(d.get("n_group") or 1),
            topk_group=int(d.get("topk_group") or 1),
            routed_scaling_factor=float(d["routed_scaling_factor"]),
            scoring_func=str(d["scoring_func"]),
            topk_method=str(d["topk_method"]),
            norm_topk_prob=bool(d["norm_topk_prob"]),
            first_k_dense_replace=int(d["first_k_dense_replace"]),
            moe_layer_freq=int(d.get("moe_layer_freq") or 1),
            rms_norm_eps=float(d["rms_norm_eps"]),
            rope_theta=theta,
            rope_scaling=rope_scaling,
            rope_interleave=bool(d["rope_interleave"]),
            tie_word_embeddings=bool(d["tie_word_embeddings"]),
            max_position_embeddings=int(d["max_position_embeddings"]),
            hidden_act=str(d["hidden_act"]),
            num_nextn_predict_layers=int(mtp),
            quantization=fp8,
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: invalid value: {exc}") from exc
    _check(cfg, source)
    return cfg


def _check(c: ModelConfig, source: str) -> None:
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{source}: {msg}")

    for name in (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "kv_lora_rank",
        "qk_rope_head_dim",
        "v_head_dim",
    ):
        need(getattr(c, name) > 0, f"{name} must be positive")
    need(c.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim must be even")
    if c.n_routed_experts and c.num_experts_per_tok:
        need(c.num_experts_per_tok <= c.n_routed_experts, "num_experts_per_tok exceeds n_routed_experts")
        need(
            c.n_routed_experts % c.n_group == 0,
            f"n_routed_experts {c.n_routed_experts} is not divisible by n_group {c.n_group}",
        )
        need(1 <= c.topk_group <= c.n_group, f"topk_group {c.topk_group} must be in 1..n_group ({c.n_group})")
        per_group = c.n_routed_experts // c.n_group
        need(
            c.topk_method != "noaux_tc" or c.n_group == 1 or per_group >= 2,
            "noaux_tc group scores need at least 2 experts per group",
        )
        need(
            c.num_experts_per_tok <= c.topk_group * per_group or c.topk_method == "greedy",
            "num_experts_per_tok exceeds the experts in the kept groups",
        )
    need(c.moe_layer_freq >= 1, "moe_layer_freq must be >= 1")


def load_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: not found; a DeepSeek checkpoint needs config.json beside its weights")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return config_from_dict(raw, str(path))
