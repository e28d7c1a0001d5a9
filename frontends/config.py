"""config.json of a Hugging Face DeepSeek-V3 / V2 checkpoint, normalized into one frozen ModelConfig.

transformers (5.24, ``models/deepseek_v3`` and ``models/deepseek_v2``) is the numerical reference, so a
field config.json leaves out takes the default of transformers' DeepseekV3Config / DeepseekV2Config, and
the model semantics follow transformers' modeling code where it and DESIGN.md differ (noted where it
matters). Both transformers 4.x ``rope_scaling`` and 5.x ``rope_parameters`` are accepted.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dsc.errors import ConfigError

SUPPORTED = ("deepseek_v3", "deepseek_v2", "deepseek_v32")

# Where config.json omits a field: the class defaults of transformers 5.24's DeepseekV3Config
# (configuration_deepseek_v3.py) and DeepseekV2Config (configuration_deepseek_v2.py). None means
# transformers has no usable default: the field is required wherever the model needs it.
_COMMON: dict[str, Any] = dict(
    kv_lora_rank=512,
    q_lora_rank=1536,
    qk_rope_head_dim=64,
    v_head_dim=128,
    qk_nope_head_dim=128,
    hidden_act="silu",
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    attention_bias=False,
    mlp_bias=False,
)
_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v3": dict(
        _COMMON,
        vocab_size=129280,
        hidden_size=7168,
        intermediate_size=18432,
        moe_intermediate_size=2048,
        num_hidden_layers=61,
        num_attention_heads=128,
        n_shared_experts=1,
        n_routed_experts=256,
        routed_scaling_factor=2.5,
        n_group=8,
        topk_group=4,
        num_experts_per_tok=8,
        first_k_dense_replace=3,
        norm_topk_prob=True,
        max_position_embeddings=4096,
        rope_interleave=True,
        num_nextn_predict_layers=1,  # DeepseekV3Config.num_mtp_layers = 1 (attribute_map alias)
        # Not DeepseekV3Config fields: transformers' V3 router is always sigmoid + noaux_tc, and it ignores
        # moe_layer_freq (see ModelConfig.is_moe_layer).
        scoring_func="sigmoid",
        topk_method="noaux_tc",
        moe_layer_freq=1,
    ),
    "deepseek_v2": dict(
        _COMMON,
        vocab_size=102400,
        hidden_size=4096,
        intermediate_size=11008,
        moe_intermediate_size=1407,
        num_hidden_layers=32,
        num_attention_heads=32,
        n_shared_experts=2,
        n_routed_experts=64,
        routed_scaling_factor=1.0,
        n_group=None,
        topk_group=None,
        num_experts_per_tok=None,
        first_k_dense_replace=0,
        norm_topk_prob=False,
        max_position_embeddings=2048,
        topk_method="greedy",
        # Not DeepseekV2Config fields: V2's router is always softmax, its rope always rotates adjacent pairs
        # (view_as_complex), and it has neither MTP layers nor a moe_layer_freq rule.
        scoring_func="softmax",
        rope_interleave=True,
        num_nextn_predict_layers=0,
        moe_layer_freq=1,
    ),
}
# transformers 5.24's DeepseekV32Config: V3's fields plus the lightning indexer's (DESIGN.md §9); its MLA rope
# is always interleaved (apply_rotary_pos_emb_interleave), whatever rope_interleave says.
_DEFAULTS["deepseek_v32"] = dict(
    _DEFAULTS["deepseek_v3"],
    max_position_embeddings=163840,
    index_n_heads=64,
    index_head_dim=128,
    index_topk=2048,
)
_DEFAULT_ROPE_THETA = 10000.0  # transformers' RotaryEmbeddingConfigMixin.default_theta


@dataclass(frozen=True)
class RopeScaling:
    """YaRN parameters (DESIGN.md §4), with transformers' defaults filled in."""

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
    """quantization_config of a DeepSeek FP8 checkpoint (DESIGN.md §5)."""

    fmt: str
    weight_block_size: tuple[int, int]
    activation_scheme: str


@dataclass(frozen=True)
class SparseAttention:
    """DeepSeek-V3.2's lightning indexer (DESIGN.md §9): per query the ``topk`` best earlier tokens by a
    ``heads``-head ReLU score over ``head_dim``-wide keys (one key head, cached per layer)."""

    heads: int
    head_dim: int
    topk: int


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
    attention_bias: bool
    num_nextn_predict_layers: int
    quantization: FP8Quantization | None
    sparse_attention: SparseAttention | None = None  # DeepSeek-V3.2 (deepseek_v32) only

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, i: int) -> bool:
        # DESIGN.md §2 (and DeepSeek's remote modeling_deepseek.py): MoE where i >= first_k_dense_replace and
        # i % moe_layer_freq == 0. transformers 5.24 ignores moe_layer_freq in both models:
        #   V3: `if layer_idx >= config.first_k_dense_replace: self.mlp = DeepseekV3MoE(config)`
        #   V2: `DeepseekV2Moe(config) if layer_idx >= config.first_k_dense_replace else DeepseekV2MLP(config)`
        # We follow transformers, the numerical reference; every released checkpoint has moe_layer_freq 1,
        # where the two rules agree.
        return self.first_k_dense_replace <= i < self.num_hidden_layers

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times mscale^2 under YaRN with mscale_all_dim (DESIGN.md §4; transformers'
        yarn_apply_mscale)."""
        scale = self.qk_head_dim**-0.5
        ys = self.rope_scaling
        if ys is not None and ys.mscale_all_dim and ys.factor > 1:
            m = 0.1 * ys.mscale_all_dim * math.log(ys.factor) + 1.0
            scale *= m * m
        return scale

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (tuples become lists), for manifests. DSA's fields go under config.json's own names, so the
        manifest's config reads back with config_from_dict (V2/V3 manifests are unchanged)."""
        raw = asdict(self)
        sparse = raw.pop("sparse_attention")
        if sparse is not None:
            raw.update(index_n_heads=sparse["heads"], index_head_dim=sparse["head_dim"], index_topk=sparse["topk"])
        return json.loads(json.dumps(raw))


class _Fields:
    """Typed reads of config.json values; every failure names the file and the field."""

    def __init__(self, raw: dict[str, Any], defaults: dict[str, Any], source: str) -> None:
        self.raw, self.defaults, self.source = raw, defaults, source

    def fail(self, msg: str) -> ConfigError:
        return ConfigError(f"{self.source}: {msg}")

    def get(self, name: str) -> Any:
        return self.raw[name] if name in self.raw else self.defaults.get(name)

    def integer(self, name: str, *, nullable: bool = False, minimum: int | None = 1) -> int | None:
        v = self.get(name)
        if v is None:
            if nullable:
                return None
            if name in self.raw:
                raise self.fail(f"'{name}' is null; it must be an integer")
            raise self.fail(f"missing required field '{name}'")
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.fail(f"'{name}' must be an integer, got {json.dumps(v)}")
        if minimum is not None and v < minimum:
            raise self.fail(f"'{name}' must be >= {minimum}, got {v}")
        return v

    def number(self, name: str, *, positive: bool = False) -> float:
        v = self.get(name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise self.fail(f"'{name}' must be a finite number, got {json.dumps(v)}")
        if positive and not v > 0:
            raise self.fail(f"'{name}' must be > 0, got {v}")
        return float(v)

    def flag(self, name: str) -> bool:
        v = self.get(name)
        if v is None:  # transformers tests these flags for truth, so null acts as false
            return False
        if not isinstance(v, bool):
            raise self.fail(f"'{name}' must be true or false, got {json.dumps(v)}")
        return v

    def text(self, name: str) -> str:
        v = self.get(name)
        if not isinstance(v, str):
            raise self.fail(f"'{name}' must be a string, got {json.dumps(v)}")
        return v


def _rope(raw: dict[str, Any], max_positions: int, source: str) -> tuple[float, RopeScaling | None]:
    # transformers' convert_rope_params_to_dict: `self.rope_parameters = rope_scaling or self.rope_parameters`,
    # so a non-empty 4.x rope_scaling wins over rope_parameters; rope_theta inside the dict wins over the
    # top-level one, which defaults to 10000.
    params = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{source}: rope parameters must be a JSON object, got {json.dumps(params)}")
    if params and all(isinstance(v, dict) for v in params.values()):
        raise ConfigError(f"{source}: per-layer-type rope parameters are not supported (DeepSeek has one rope)")
    fields = _Fields(params, {"rope_theta": raw.get("rope_theta", _DEFAULT_ROPE_THETA)}, source)
    theta = fields.number("rope_theta", positive=True)
    kind = params.get("rope_type", params.get("type")) or "default"
    if kind == "default":
        return theta, None
    if kind != "yarn":
        raise ConfigError(f"{source}: rope type '{kind}' is not supported (supported: default, yarn)")
    if params.get("factor") is None:
        raise ConfigError(f"{source}: yarn rope scaling needs 'factor'")
    if params.get("truncate", True) is not True:
        raise ConfigError(f"{source}: yarn rope with truncate=false is not supported")
    fields.defaults.update(original_max_position_embeddings=max_positions)  # as transformers' standardize
    factor = fields.number("factor", positive=True)
    optional = {
        name: fields.number(name) for name in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim") if params.get(name)
    }
    return theta, RopeScaling(
        type="yarn",
        factor=factor,
        original_max_position_embeddings=fields.integer("original_max_position_embeddings"),
        # transformers: `rope_parameters_dict.get("beta_fast") or 32`, `... .get("beta_slow") or 1`
        beta_fast=optional.get("beta_fast", 32.0),
        beta_slow=optional.get("beta_slow", 1.0),
        mscale=optional.get("mscale", 0.0),
        mscale_all_dim=optional.get("mscale_all_dim", 0.0),
        attention_factor=fields.number("attention_factor", positive=True) if params.get("attention_factor") else None,
    )


def _quantization(raw: dict[str, Any], source: str) -> FP8Quantization | None:
    quant = raw.get("quantization_config")
    if not quant:
        return None
    if not isinstance(quant, dict) or quant.get("quant_method") != "fp8":
        method = quant.get("quant_method") if isinstance(quant, dict) else quant
        raise ConfigError(f"{source}: quantization '{method}' is not supported (only DeepSeek's fp8)")
    fmt = quant.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ConfigError(f"{source}: fp8 format '{fmt}' is not supported (only e4m3)")
    block = quant.get("weight_block_size", [128, 128])
    if (
        not isinstance(block, list)
        or len(block) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
    ):
        raise ConfigError(f"{source}: quantization_config.weight_block_size must be two positive integers, got {block}")
    return FP8Quantization(fmt, (block[0], block[1]), str(quant.get("activation_scheme", "dynamic")))


def config_from_dict(raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Normalize a parsed config.json; ``source`` names it in errors."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a JSON object")
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED:
        shown = f"'{model_type}'" if model_type is not None else "missing"
        raise ConfigError(f"{source}: model_type {shown} is not supported (supported: {', '.join(SUPPORTED)})")
    if "num_nextn_predict_layers" not in raw and "num_mtp_layers" in raw:  # DeepseekV3Config's own name for it
        raw = dict(raw, num_nextn_predict_layers=raw["num_mtp_layers"])
    f = _Fields(raw, _DEFAULTS[model_type], source)
    for flag in ("attention_bias", "mlp_bias"):  # the traced model has no bias terms
        if f.flag(flag):
            raise ConfigError(f"{source}: {flag}=true is not supported (DeepSeek checkpoints have no biases)")
    if f.text("hidden_act") != "silu":
        raise ConfigError(f"{source}: hidden_act '{raw['hidden_act']}' is not supported (only silu)")

    layers = f.integer("num_hidden_layers")
    first_dense = f.integer("first_k_dense_replace", minimum=0)
    has_moe = first_dense < layers
    if model_type == "deepseek_v2":
        # transformers' DeepseekV2TopkRouter: `scores = router_logits.softmax(...)`, then
        # `if self.topk_method == "greedy": ... elif ... == "group_limited_greedy": ...` (any other method leaves
        # topk_weights unbound), then `topk_weights * self.routed_scaling_factor`: it never renormalizes, so
        # config.json's norm_topk_prob is ignored, and its rope is always pairwise (apply_rotary_emb uses
        # view_as_complex), whatever rope_interleave says.
        scoring, method, norm, interleave = "softmax", f.text("topk_method"), False, True
        if method not in ("greedy", "group_limited_greedy"):
            raise ConfigError(
                f"{source}: deepseek_v2 topk_method '{method}' is not supported "
                "(supported: greedy, group_limited_greedy)"
            )
    else:
        # transformers' DeepseekV3TopkRouter is always sigmoid + e_score_correction_bias + group-limited top-k;
        # a config.json asking for anything else describes a model transformers would not compute.
        scoring, method = f.text("scoring_func"), f.text("topk_method")
        if (scoring, method) != ("sigmoid", "noaux_tc"):
            raise ConfigError(
                f"{source}: deepseek_v3 needs scoring_func sigmoid and topk_method noaux_tc, got {scoring} and {method}"
            )
        norm, interleave = f.flag("norm_topk_prob"), f.flag("rope_interleave")
        if model_type == "deepseek_v32":
            interleave = True

    # null groups mean one group (nothing masked), except where group-limited greedy needs real ones
    if model_type == "deepseek_v2" and method == "group_limited_greedy" and has_moe:
        n_group, topk_group = f.integer("n_group"), f.integer("topk_group")
    else:
        n_group, topk_group = f.integer("n_group", nullable=True) or 1, f.integer("topk_group", nullable=True) or 1
    # the router needs expert counts as soon as one layer is MoE; a model without MoE layers may omit them
    n_routed = f.integer("n_routed_experts", nullable=not has_moe)
    per_token = f.integer("num_experts_per_tok", nullable=not has_moe)
    q_lora = f.integer("q_lora_rank", nullable=True)  # null: one q_proj instead of q_a/q_b
    sparse = None
    if model_type == "deepseek_v32":
        # the indexer's query reads q_a_layernorm's output, so V3.2 has no q_proj form (transformers neither)
        q_lora = f.integer("q_lora_rank")
        sparse = SparseAttention(f.integer("index_n_heads"), f.integer("index_head_dim"), f.integer("index_topk"))
        _check_layer_types(raw, layers, first_dense, source)
    max_positions = f.integer("max_position_embeddings")
    theta, rope_scaling = _rope(raw, max_positions, source)
    cfg = ModelConfig(
        model_type=model_type,
        vocab_size=f.integer("vocab_size"),
        hidden_size=f.integer("hidden_size"),
        intermediate_size=f.integer("intermediate_size"),
        moe_intermediate_size=f.integer("moe_intermediate_size"),
        num_hidden_layers=layers,
        num_attention_heads=f.integer("num_attention_heads"),
        q_lora_rank=q_lora,
        kv_lora_rank=f.integer("kv_lora_rank"),
        qk_nope_head_dim=f.integer("qk_nope_head_dim"),
        qk_rope_head_dim=f.integer("qk_rope_head_dim"),
        v_head_dim=f.integer("v_head_dim"),
        n_routed_experts=n_routed,
        # null: no shared experts (transformers would fail on it; DeepSeek's own code allows it)
        n_shared_experts=f.integer("n_shared_experts", nullable=True, minimum=0) or None,
        num_experts_per_tok=per_token,
        n_group=n_group,
        topk_group=topk_group,
        routed_scaling_factor=f.number("routed_scaling_factor", positive=True),
        scoring_func=scoring,
        topk_method=method,
        norm_topk_prob=norm,
        first_k_dense_replace=first_dense,
        moe_layer_freq=f.integer("moe_layer_freq", nullable=True) or 1,
        rms_norm_eps=f.number("rms_norm_eps", positive=True),
        rope_theta=theta,
        rope_scaling=rope_scaling,
        rope_interleave=interleave,
        tie_word_embeddings=f.flag("tie_word_embeddings"),
        max_position_embeddings=max_positions,
        hidden_act="silu",
        attention_bias=False,
        num_nextn_predict_layers=f.integer("num_nextn_predict_layers", nullable=True, minimum=0) or 0,
        quantization=_quantization(raw, source),
        sparse_attention=sparse,
    )
    _check(cfg, source)
    return cfg


def _check_layer_types(raw: dict[str, Any], layers: int, first_dense: int, source: str) -> None:
    """DeepseekV32Config derives mlp_layer_types from first_k_dense_replace and layer_types as all
    "indexed_attention"; a config.json that spells out another pattern describes a model dsc does not build."""
    n_dense = min(first_dense, layers)
    derived = {
        "mlp_layer_types": ["dense"] * n_dense + ["sparse"] * (layers - n_dense),
        "layer_types": ["indexed_attention"] * layers,
    }
    for name, want in derived.items():
        if raw.get(name) is not None and raw[name] != want:
            raise ConfigError(
                f"{source}: '{name}' {json.dumps(raw[name])[:80]} is not supported (dsc builds {want[:4]}...)"
            )


def _check(c: ModelConfig, source: str) -> None:
    """Cross-field consistency: what transformers would crash on, or silently compute wrongly."""

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{source}: {msg}")

    need(c.qk_rope_head_dim % 2 == 0, f"qk_rope_head_dim must be even, got {c.qk_rope_head_dim}")
    if c.sparse_attention is not None:  # the indexer rotates the first qk_rope_head_dim values of its heads
        need(
            c.sparse_attention.head_dim >= c.qk_rope_head_dim,
            f"index_head_dim {c.sparse_attention.head_dim} is smaller than qk_rope_head_dim {c.qk_rope_head_dim}",
        )
    if c.n_routed_experts is None or c.num_experts_per_tok is None:
        return  # no MoE layer (checked by the caller)
    need(
        c.num_experts_per_tok <= c.n_routed_experts,
        f"num_experts_per_tok {c.num_experts_per_tok} exceeds n_routed_experts {c.n_routed_experts}",
    )
    need(
        c.n_routed_experts % c.n_group == 0,
        f"n_routed_experts {c.n_routed_experts} is not divisible by n_group {c.n_group}",
    )
    need(c.topk_group <= c.n_group, f"topk_group {c.topk_group} exceeds n_group {c.n_group}")
    if c.topk_method == "greedy":
        return  # groups unused
    per_group = c.n_routed_experts // c.n_group
    if c.topk_method == "noaux_tc":  # a group's score is the sum of its top-2 experts
        need(per_group >= 2, f"noaux_tc needs at least 2 experts per group, got {per_group}")
    need(
        c.num_experts_per_tok <= c.topk_group * per_group,
        f"num_experts_per_tok {c.num_experts_per_tok} exceeds the {c.topk_group * per_group} experts "
        f"of the topk_group {c.topk_group} groups kept",
    )


# the fields that set tensor shapes
_SHAPE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_attention_heads",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "n_routed_experts",
    "n_shared_experts",
    "index_n_heads",
    "index_head_dim",
)


def defaults_used(raw: Any) -> dict[str, Any]:
    """The fields config.json leaves out that took transformers' defaults (named when a tensor's shape then
    disagrees: a config that omits kv_lora_rank gets 512, which the checkpoint's tensors show to be wrong)."""
    if not isinstance(raw, dict) or raw.get("model_type") not in _DEFAULTS:
        return {}
    defaults = _DEFAULTS[raw["model_type"]]
    return {k: defaults[k] for k in _SHAPE_FIELDS if k not in raw and defaults.get(k) is not None}


def load_config(path: str | Path) -> ModelConfig:
    """Read and normalize ``path`` (a config.json)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: not found; a DeepSeek checkpoint needs config.json beside its weights")
    try:
        raw = json.loads(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: invalid JSON: {exc}") from exc
    return config_from_dict(raw, str(path))
