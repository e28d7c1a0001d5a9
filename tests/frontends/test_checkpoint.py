"""config.json parsing and the lazy safetensors checkpoint reader (frontends/config.py, frontends/checkpoint.py).

Self-contained: every checkpoint here is written with safetensors.torch.save_file (or byte by byte, for the
corrupt ones) into tmp_path, with a small config dict defined below.
"""

import json
import struct
import time
from pathlib import Path

import pytest
import torch
from dsc.errors import CheckpointError, ConfigError
from dsc.frontends.checkpoint import Checkpoint, read_header
from dsc.frontends.config import config_from_dict, load_config
from safetensors.torch import save_file

# deepseek-ai/DeepSeek-V3 config.json values (DESIGN.md §2)
OFFICIAL_V3 = {
    "model_type": "deepseek_v3",
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "first_k_dense_replace": 3,
    "moe_layer_freq": 1,
    "num_attention_heads": 128,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "n_group": 8,
    "topk_group": 4,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "norm_topk_prob": True,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000,
    "rope_scaling": {
        "type": "yarn",
        "factor": 40,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
    "max_position_embeddings": 163840,
    "quantization_config": {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    },
    "num_nextn_predict_layers": 1,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
}

# A tiny V3 (2 layers: 0 dense, 1 MoE); the reader never checks tensors against it except where a test asks.
TINY = {
    "model_type": "deepseek_v3",
    "vocab_size": 32,
    "hidden_size": 16,
    "intermediate_size": 32,
    "moe_intermediate_size": 8,
    "num_hidden_layers": 2,
    "first_k_dense_replace": 1,
    "num_attention_heads": 2,
    "q_lora_rank": 8,
    "kv_lora_rank": 8,
    "qk_nope_head_dim": 4,
    "qk_rope_head_dim": 4,
    "v_head_dim": 4,
    "n_routed_experts": 4,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "n_group": 2,
    "topk_group": 1,
    "max_position_embeddings": 64,
}


def write_ckpt(d: Path, tensors: dict, config: dict | None = None, name: str = "model.safetensors") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    save_file(tensors, d / name)
    (d / "config.json").write_text(json.dumps(config or TINY))
    return d


def write_raw(path: Path, header: dict, data: bytes) -> None:
    """A safetensors file from an explicit header, to build corrupt ones."""
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


# ---------------------------------------------------------------- config.json


def test_official_v3_config():
    cfg = config_from_dict(OFFICIAL_V3)
    assert cfg.softmax_scale == pytest.approx(0.1352338, abs=1e-6)  # 192^-0.5 * 1.3688879^2, DESIGN.md §4
    assert cfg.qk_head_dim == 192 and cfg.rope_scaling.factor == 40 and cfg.rope_scaling.mscale_all_dim == 1
    assert [cfg.is_moe_layer(i) for i in (0, 1, 2, 3, 60)] == [False, False, False, True, True]
    assert cfg.quantization.weight_block_size == (128, 128) and cfg.num_nextn_predict_layers == 1
    assert config_from_dict({**OFFICIAL_V3, "num_mtp_layers": 2}).num_nextn_predict_layers == 1
    renamed = {k: v for k, v in OFFICIAL_V3.items() if k != "num_nextn_predict_layers"}
    assert config_from_dict({**renamed, "num_mtp_layers": 2}).num_nextn_predict_layers == 2  # transformers 5.x name
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d and d["quantization"]["weight_block_size"] == [128, 128]


def test_rope_scaling_and_rope_parameters_are_equivalent():
    yarn = OFFICIAL_V3["rope_scaling"]
    old = config_from_dict(OFFICIAL_V3)
    new = dict(OFFICIAL_V3, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, **yarn})
    del new["rope_scaling"], new["rope_theta"]
    new["rope_parameters"].pop("type")
    assert config_from_dict(new) == old
    # 4.x configs may spell the type "rope_type" too
    assert config_from_dict(dict(OFFICIAL_V3, rope_scaling={**yarn, "rope_type": "yarn"})) == old
    # rope_type default = plain rope, rope_theta taken from rope_parameters
    plain = config_from_dict(dict(new, rope_parameters={"rope_type": "default", "rope_theta": 5000.0}))
    assert plain.rope_scaling is None and plain.rope_theta == 5000.0 and plain.softmax_scale == 192**-0.5
    # transformers: a non-empty rope_scaling wins over rope_parameters (convert_rope_params_to_dict)
    both = config_from_dict(dict(OFFICIAL_V3, rope_parameters={"rope_type": "default"}))
    assert both.rope_scaling == old.rope_scaling


def test_unsupported_rope_type_is_named():
    for params in ({"rope_scaling": {"type": "linear", "factor": 2.0}}, {"rope_parameters": {"rope_type": "llama3"}}):
        raw = {k: v for k, v in OFFICIAL_V3.items() if k != "rope_scaling"} | params
        kind = next(iter(params.values())).get("type") or next(iter(params.values()))["rope_type"]
        with pytest.raises(ConfigError, match=rf"^x/config.json: rope type '{kind}' is not supported"):
            config_from_dict(raw, "x/config.json")


@pytest.mark.parametrize("model_type", ["deepseek_v3", "deepseek_v2"])
def test_missing_fields_take_transformers_defaults(model_type):
    from transformers import DeepseekV2Config, DeepseekV3Config

    hf_cls = {"deepseek_v3": DeepseekV3Config, "deepseek_v2": DeepseekV2Config}[model_type]
    hf = hf_cls(num_experts_per_tok=6) if model_type == "deepseek_v2" else hf_cls()
    raw = {"model_type": model_type}
    if model_type == "deepseek_v2":
        raw["num_experts_per_tok"] = 6  # DeepseekV2Config defaults it to None: the router needs it
    cfg = config_from_dict(raw)
    for name in (
        "vocab_size hidden_size intermediate_size moe_intermediate_size num_hidden_layers num_attention_heads "
        "q_lora_rank kv_lora_rank qk_nope_head_dim qk_rope_head_dim v_head_dim n_routed_experts n_shared_experts "
        "num_experts_per_tok routed_scaling_factor first_k_dense_replace rms_norm_eps max_position_embeddings "
        "tie_word_embeddings hidden_act"
    ).split():
        assert getattr(cfg, name) == getattr(hf, name), name
    assert cfg.rope_theta == hf.rope_parameters["rope_theta"] and cfg.rope_scaling is None
    if model_type == "deepseek_v3":
        assert (cfg.n_group, cfg.topk_group, cfg.norm_topk_prob) == (hf.n_group, hf.topk_group, hf.norm_topk_prob)
        assert cfg.rope_interleave == hf.rope_interleave and cfg.num_nextn_predict_layers == hf.num_mtp_layers
    else:
        assert (hf.n_group, hf.topk_group) == (None, None) and (cfg.n_group, cfg.topk_group) == (1, 1)
        assert cfg.topk_method == hf.topk_method == "greedy" and cfg.norm_topk_prob is hf.norm_topk_prob is False


@pytest.mark.parametrize("model_type", ["deepseek_v3", "deepseek_v2"])
def test_moe_layers_are_the_ones_transformers_builds(model_type):
    import importlib

    names = {"deepseek_v3": ("DeepseekV3Config", "DeepseekV3DecoderLayer", "DeepseekV3MoE")}
    names["deepseek_v2"] = ("DeepseekV2Config", "DeepseekV2DecoderLayer", "DeepseekV2Moe")
    cfg_name, layer_name, moe_name = names[model_type]
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    for first_dense, freq in ((0, 1), (2, 1), (1, 2), (2, 3)):
        raw = dict(TINY, model_type=model_type, num_hidden_layers=5, first_k_dense_replace=first_dense)
        raw["moe_layer_freq"] = freq  # transformers ignores it (DESIGN.md §2 says i % freq == 0)
        if model_type == "deepseek_v2":
            raw.update(topk_method="group_limited_greedy")
        ours = [config_from_dict(raw).is_moe_layer(i) for i in range(5)]
        assert ours == [i >= first_dense for i in range(5)]
        hf_cfg = getattr(module, cfg_name)(**{k: v for k, v in raw.items() if k != "model_type"})
        layers = [getattr(module, layer_name)(hf_cfg, i) for i in range(5)]
        assert ours == [type(layer.mlp).__name__ == moe_name for layer in layers], (first_dense, freq)


def test_v2_routing_follows_transformers():
    raw = dict(TINY, model_type="deepseek_v2", topk_method="group_limited_greedy", norm_topk_prob=True)
    v2 = config_from_dict(dict(raw, rope_interleave=False, scoring_func="sigmoid"))
    # DeepseekV2TopkRouter: softmax always, never renormalizes the top-k; apply_rotary_emb always pairwise
    assert (v2.scoring_func, v2.topk_method, v2.norm_topk_prob, v2.rope_interleave) == (
        "softmax",
        "group_limited_greedy",
        False,
        True,
    )
    with pytest.raises(ConfigError, match="deepseek_v2 topk_method 'noaux_tc' is not supported"):
        config_from_dict(dict(raw, topk_method="noaux_tc"), "x/config.json")
    with pytest.raises(ConfigError, match="'n_group' is null"):
        config_from_dict(dict(raw, n_group=None), "x/config.json")
    greedy = config_from_dict(dict(raw, topk_method="greedy", n_group=None, topk_group=None))
    assert (greedy.n_group, greedy.topk_group) == (1, 1)
    missing = {k: v for k, v in raw.items() if k != "num_experts_per_tok"}
    with pytest.raises(ConfigError, match="missing required field 'num_experts_per_tok'"):
        config_from_dict(missing, "x/config.json")
    dense_only = config_from_dict(dict(missing, first_k_dense_replace=2))  # no MoE layer: no router to set up
    assert dense_only.num_experts_per_tok is None and not any(dense_only.is_moe_layer(i) for i in range(2))


@pytest.mark.parametrize(
    "change,needle",
    [
        (
            {"model_type": "llama"},
            "model_type 'llama' is not supported (supported: deepseek_v3, deepseek_v2, deepseek_v32)",
        ),
        ({"model_type": None}, "model_type missing is not supported"),
        ({"n_group": 3}, "n_routed_experts 4 is not divisible by n_group 3"),
        ({"topk_group": 3}, "topk_group 3 exceeds n_group 2"),
        ({"num_experts_per_tok": 5}, "num_experts_per_tok 5 exceeds n_routed_experts 4"),
        ({"num_experts_per_tok": 3}, "num_experts_per_tok 3 exceeds the 2 experts of the topk_group 1 groups kept"),
        ({"n_group": 4, "topk_group": 2}, "noaux_tc needs at least 2 experts per group"),
        ({"hidden_size": "16"}, "'hidden_size' must be an integer, got \"16\""),
        ({"hidden_size": 0}, "'hidden_size' must be >= 1, got 0"),
        ({"v_head_dim": None}, "'v_head_dim' is null"),
        ({"qk_rope_head_dim": 3}, "qk_rope_head_dim must be even"),
        ({"scoring_func": "softmax"}, "deepseek_v3 needs scoring_func sigmoid and topk_method noaux_tc"),
        ({"attention_bias": True}, "attention_bias=true is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
        ({"quantization_config": {"quant_method": "awq"}}, "quantization 'awq' is not supported"),
        ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128]}}, "weight_block_size"),
        ({"rope_scaling": {"type": "yarn"}}, "yarn rope scaling needs 'factor'"),
    ],
)
def test_bad_configs_are_named(change, needle):
    with pytest.raises(ConfigError) as exc:
        config_from_dict(dict(TINY, **change), "x/config.json")
    msg = str(exc.value)
    assert msg.startswith("x/config.json: ") and needle in msg and "\n" not in msg


def test_missing_and_invalid_config_json(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "config.json")
    assert (
        str(exc.value)
        == f"{tmp_path}/config.json: not found; a DeepSeek checkpoint needs config.json beside its weights"
    )
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config.json: invalid JSON"):
        load_config(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"config.json: expected a JSON object"):
        load_config(tmp_path / "config.json")


# ---------------------------------------------------------------- opening


def test_open_file_directory_and_index(tmp_path):
    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(4), "model.layers.2.mtp.weight": torch.zeros(1)}
    d = write_ckpt(tmp_path / "m", tensors)
    (d / "tokenizer.json").write_text("{}")
    for path in (d, d / "model.safetensors"):
        ck = Checkpoint.open(path)
        assert ck.root == d and ck.files == [d / "model.safetensors"] and ck.tokenizer_path == d / "tokenizer.json"
        assert ck.keys() == ["a", "b"] and ck.has("a") and not ck.has("model.layers.2.mtp.weight")
        assert ck.skipped_keys == ["model.layers.2.mtp.weight"]  # layer 2 >= num_hidden_layers: MTP, skipped
        assert ck.info("b").shape == (2, 3) and ck.info("b").dtype == torch.float32
        assert torch.equal(ck.load("b"), tensors["b"]) and ck.config.hidden_size == 16
    # the same tensors as two shards behind an index
    s = tmp_path / "sharded"
    write_ckpt(s, {"a": tensors["a"]}, name="model-00001-of-00002.safetensors")
    save_file({"b": tensors["b"]}, s / "model-00002-of-00002.safetensors")
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (s / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for path in (s, s / "model.safetensors.index.json"):
        ck = Checkpoint.open(path)
        assert ck.keys() == ["a", "b"] and ck.tokenizer_path is None and len(ck.files) == 2
        assert ck.info("b").file == s / "model-00002-of-00002.safetensors"
        assert torch.equal(ck.load("a"), tensors["a"]) and torch.equal(ck.load("b"), tensors["b"])


def test_sharded_index_errors_name_the_index_and_shard(tmp_path):
    s = write_ckpt(tmp_path / "s", {"a": torch.ones(2)}, name="shard-1.safetensors")
    index = s / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "shard-1.safetensors", "b": "shard-2.safetensors"}}))
    with pytest.raises(CheckpointError, match=rf"^{index}: shard 'shard-2.safetensors' is missing"):
        Checkpoint.open(s)
    index.write_text(json.dumps({"weight_map": {"a": "shard-1.safetensors", "b": "shard-1.safetensors"}}))
    with pytest.raises(CheckpointError, match=rf"^{index}: tensor 'b' is listed in shard 'shard-1.safetensors'"):
        Checkpoint.open(s)
    index.write_text(json.dumps({"files": []}))
    with pytest.raises(CheckpointError, match="not a safetensors index"):
        Checkpoint.open(index)


def test_every_supported_dtype_round_trips(tmp_path):
    tensors = {
        "f32": torch.randn(3, 5),
        "f16": torch.randn(7).half(),
        "bf16": torch.randn(2, 2).bfloat16(),
        "fp8": torch.randn(4, 4).to(torch.float8_e4m3fn),
        "i64": torch.arange(5),
        "i32": torch.arange(5, dtype=torch.int32),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
    }
    ck = Checkpoint.open(write_ckpt(tmp_path / "m", tensors))
    for key, want in tensors.items():
        got = ck.load(key)
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got.view(-1), want.view(-1)), key
    assert ck.load_float("bf16").dtype == torch.float32 and torch.equal(ck.load_float("bf16"), tensors["bf16"].float())
    assert torch.equal(ck.load_float("f16", torch.bfloat16), tensors["f16"].to(torch.bfloat16))


def test_missing_config_or_unsupported_model_type(tmp_path):
    d = write_ckpt(tmp_path / "m", {"a": torch.ones(1)})
    (d / "config.json").unlink()
    with pytest.raises(ConfigError, match=rf"^{d}/config.json: not found; a DeepSeek checkpoint needs config.json"):
        Checkpoint.open(d / "model.safetensors")
    (d / "config.json").write_text(json.dumps(dict(TINY, model_type="mixtral")))
    with pytest.raises(ConfigError, match=rf"^{d}/config.json: model_type 'mixtral' is not supported"):
        Checkpoint.open(d)
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint.open(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json inside"):
        Checkpoint.open(tmp_path / "m" / ".." / "m" / "..")


# ---------------------------------------------------------------- damaged files


def test_truncated_file_fails_at_open(tmp_path):
    d = write_ckpt(tmp_path / "m", {"a": torch.ones(64, 64), "b": torch.ones(8)})
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-100])
    with pytest.raises(CheckpointError) as exc:
        Checkpoint.open(d)
    msg = str(exc.value)
    assert msg.startswith(f"{f}: truncated: header says tensor ") and f"but the file has {len(data) - 100} bytes" in msg
    f.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match=rf"^{f}: truncated: 5 bytes, too short for a safetensors header"):
        Checkpoint.open(d)


def test_corrupt_headers_fail_at_open(tmp_path):
    d = write_ckpt(tmp_path / "m", {"a": torch.ones(4, 4)})
    f = d / "model.safetensors"
    good = f.read_bytes()
    n = struct.unpack("<Q", good[:8])[0]
    cases = [
        (good[:8] + b"\xff" * n + good[8 + n :], "corrupt: the safetensors header is not valid JSON"),
        (good[:8] + b"{" + b" " * (n - 1) + good[8 + n :], "corrupt: the safetensors header is not valid JSON"),
        (struct.pack("<Q", 10**12) + good[8:], f"header length field says {10**12} bytes but the file has"),
        (struct.pack("<Q", len(good)) + good[8:], "corrupt or truncated"),
        (good + b"\0" * 16, "corrupt: 16 bytes after the last tensor's data"),
    ]
    for blob, needle in cases:
        f.write_bytes(blob)
        with pytest.raises(CheckpointError) as exc:
            Checkpoint.open(d)
        assert str(exc.value).startswith(f"{f}: ") and needle in str(exc.value)
    bad_headers = [
        ({"a": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]}}, "unsupported dtype 'F4' for tensor 'a'"),
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, "span 12 bytes"),
        ({"a": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, "header entry for tensor 'a' is malformed"),
        ({"a": {"dtype": "F32", "shape": [4]}}, "header entry for tensor 'a' is malformed"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            "tensor 'b' overlaps the tensor before it",
        ),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, "tensor 'a' leaves a gap of 8 bytes"),
        ([1, 2], "not a JSON object"),
    ]
    for header, needle in bad_headers:
        write_raw(f, header, b"\0" * 16)
        with pytest.raises(CheckpointError) as exc:
            read_header(f)
        assert str(exc.value).startswith(f"{f}: ") and needle in str(exc.value), str(exc.value)


def test_file_changed_after_open_is_reported(tmp_path):
    d = write_ckpt(tmp_path / "m", {"a": torch.ones(64)})
    ck = Checkpoint.open(d)
    save_file({"a": torch.ones(32)}, d / "model.safetensors")
    with pytest.raises(CheckpointError, match="changed size since the checkpoint was opened"):
        ck.load("a")


# ---------------------------------------------------------------- tensors


def test_missing_tensor_and_wrong_shape(tmp_path):
    d = write_ckpt(tmp_path / "m", {"a": torch.ones(2, 3)})
    ck = Checkpoint.open(d)
    with pytest.raises(CheckpointError) as exc:
        ck.info("b")
    assert str(exc.value) == f"{d}: tensor 'b' is missing (expected by the model's config)"
    with pytest.raises(CheckpointError, match="'b' is missing"):
        ck.load("b")
    with pytest.raises(CheckpointError) as exc:
        ck.expect("a", (3, 2))
    assert str(exc.value) == (f"{d}/model.safetensors: tensor 'a' has shape [2, 3], expected [3, 2] from config.json")
    assert ck.expect("a", (2, 3)).shape == (2, 3)


def quantize_blocks(x: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's FP8 weight format (DESIGN.md §5), written out independently of dsc: per 128x128 block
    scale = amax / 448, q = x / scale in float8_e4m3fn; edge blocks are partial."""
    rows, cols = x.shape
    nr, nc = -(-rows // block), -(-cols // block)
    scale = torch.empty(nr, nc)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(nr):
        for j in range(nc):
            blk = x[i * block : (i + 1) * block, j * block : (j + 1) * block]
            scale[i, j] = blk.abs().amax() / 448.0
            q[i * block : (i + 1) * block, j * block : (j + 1) * block] = (blk / scale[i, j]).to(torch.float8_e4m3fn)
    return q, scale


def test_fp8_dequantization_is_exact_with_partial_blocks(tmp_path):
    w = torch.randn(200, 300, generator=torch.Generator().manual_seed(0))
    q, scale = quantize_blocks(w)
    assert scale.shape == (2, 3)
    cfg = dict(TINY, quantization_config={"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]})
    d = write_ckpt(
        tmp_path / "m", {"w": q, "w_scale_inv": scale, "w2": q.clone(), "w2_scale_inv": scale[:1].clone()}, cfg
    )
    ck = Checkpoint.open(d)
    assert ck.fp8_block_size == (128, 128) and ck.is_fp8("w") and not ck.is_fp8("w_scale_inv")
    expanded = scale.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :300]
    expected = q.float() * expanded
    got = ck.load_float("w")
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    assert torch.equal(ck.load_float("w", torch.bfloat16), expected.to(torch.bfloat16))
    assert torch.equal(ck.load("w").view(torch.uint8), q.view(torch.uint8))  # raw bytes untouched
    assert (got - w).norm() / w.norm() < 0.05  # and it is a quantization of w
    assert ck.expect("w", (200, 300)).dtype == torch.float8_e4m3fn
    with pytest.raises(CheckpointError, match=r"'w2_scale_inv' has shape \[1, 3\], expected \[2, 3\]"):
        ck.expect("w2", (200, 300))
    with pytest.raises(CheckpointError, match=r"'w2_scale_inv' has shape \[1, 3\], expected \[2, 3\]"):
        ck.load_float("w2")
    d2 = write_ckpt(tmp_path / "noscale", {"w": q}, cfg)
    with pytest.raises(CheckpointError, match="FP8 tensor 'w' has no block scales 'w_scale_inv' beside it"):
        Checkpoint.open(d2).load_float("w")


# ---------------------------------------------------------------- laziness and memory


@pytest.fixture(scope="module")
def big_ckpt(tmp_path_factory) -> Path:
    """160 MB of fp32: 40 tensors of 4 MB, each filled with its index."""
    d = tmp_path_factory.mktemp("big")
    write_ckpt(d, {f"t{i:02d}": torch.full((1024, 1024), float(i)) for i in range(40)})
    return d


def test_opening_reads_only_headers(big_ckpt):
    size = (big_ckpt / "model.safetensors").stat().st_size
    assert size > 160 * 10**6
    before, t0 = rss_bytes(), time.perf_counter()
    ck = Checkpoint.open(big_ckpt)
    elapsed = time.perf_counter() - t0
    assert len(ck.keys()) == 40
    assert rss_bytes() - before < 8 * 2**20  # headers only, not the 160 MB of data
    assert elapsed < 0.5, elapsed  # reading 160 MB would not be free either


def test_loading_every_tensor_keeps_memory_bounded(big_ckpt):
    """Each loaded tensor is dropped before the next: RSS may grow by at most 0.25x the file (one 4 MB tensor
    plus allocator slack is what we expect), not by the file's pages."""
    size = (big_ckpt / "model.safetensors").stat().st_size
    ck = Checkpoint.open(big_ckpt)
    ck.load_float("t00")  # warm-up: allocator pools, first-call imports
    before = rss_bytes()
    peak = before
    for key in ck.keys():
        t = ck.load_float(key)
        assert t[0, 0].item() == float(key[1:]) and t[-1, -1].item() == float(key[1:])
        del t
        peak = max(peak, rss_bytes())
    assert peak - before < 0.25 * size, (peak - before) / size
