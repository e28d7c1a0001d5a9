"""make_model: random checkpoints in the official DeepSeek-V3 layout that transformers loads key for key."""

import json
import math
from pathlib import Path

import pytest
import torch
from dsc.errors import DscError
from dsc.frontends.config import config_from_dict
from dsc.frontends.presets import PRESETS, make_model, tensor_specs, write_safetensors
from dsc.ir.ops import dequantize as dequantize_fp8
from safetensors import safe_open
from safetensors.torch import load_file

FP8_LINEARS = ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj",
               "down_proj")  # fmt: skip


def read_all(ckpt: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def load_in_transformers(ckpt: Path):
    from transformers import DeepseekV3ForCausalLM

    model, info = DeepseekV3ForCausalLM.from_pretrained(
        ckpt, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    return model.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_model("tiny", tmp_path_factory.mktemp("tiny") / "ckpt", seed=7)


@pytest.fixture(scope="module")
def tiny_fp8(tmp_path_factory) -> Path:
    return make_model("tiny", tmp_path_factory.mktemp("fp8") / "ckpt", seed=7, fp8=True)


def forward(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([[1, 2, 3, 250, 7]])).logits


def test_tiny_loads_in_transformers_with_every_weight_in_place(tiny):
    model = load_in_transformers(tiny)
    logits = forward(model)
    assert logits.shape == (1, 5, 256) and torch.isfinite(logits).all()
    w = read_all(tiny)
    layer = model.model.layers[1].mlp  # first MoE layer (first_k_dense_replace 1)
    # Buffers and per-expert weights are the easiest to lose silently: check they arrived.
    assert torch.equal(layer.gate.e_score_correction_bias, w["model.layers.1.mlp.gate.e_score_correction_bias"])
    gate_up = torch.cat(
        [w["model.layers.1.mlp.experts.5.gate_proj.weight"], w["model.layers.1.mlp.experts.5.up_proj.weight"]]
    )
    assert torch.equal(layer.experts.gate_up_proj[5], gate_up)
    assert torch.equal(model.lm_head.weight, w["lm_head.weight"])


def test_sharded_checkpoint_loads_and_equals_single_file(tiny, tmp_path):
    sharded = make_model("tiny", tmp_path / "ckpt", seed=7, shards=3)
    files = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert files == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    tensors = read_all(sharded)
    assert set(index["weight_map"]) == set(tensors) and set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert torch.equal(forward(load_in_transformers(sharded)), forward(load_in_transformers(tiny)))


def test_fp8_checkpoint_layout(tiny, tiny_fp8):
    cfg = json.loads((tiny_fp8 / "config.json").read_text())
    assert cfg["quantization_config"] == {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    }
    plain, fp8 = read_all(tiny), read_all(tiny_fp8)
    scales = {k for k in fp8 if k.endswith("_scale_inv")}
    assert set(fp8) - scales == set(plain)
    for key, t in plain.items():
        quantized = key.endswith(tuple(f"{m}.weight" for m in FP8_LINEARS))
        assert (key + "_scale_inv" in scales) == quantized, key
        if quantized:
            assert fp8[key].dtype == torch.float8_e4m3fn
            rows, cols = t.shape
            assert fp8[key + "_scale_inv"].shape == (math.ceil(rows / 128), math.ceil(cols / 128))
            assert fp8[key + "_scale_inv"].dtype == torch.float32
        else:  # embeddings, lm_head, norms, router gate and bias stay high precision
            assert torch.equal(fp8[key], t), key


def test_fp8_weights_dequantize_close_to_fp32(tiny, tiny_fp8):
    plain, fp8 = read_all(tiny), read_all(tiny_fp8)
    for key in (k.removesuffix("_scale_inv") for k in fp8 if k.endswith("_scale_inv")):
        w = plain[key]
        deq = dequantize_fp8(fp8[key], fp8[key + "_scale_inv"])
        assert float((deq - w).norm() / w.norm()) < 0.05, key
        assert float((deq - w).abs().max()) <= float(w.abs().max()) / 16 + 1e-12, key  # e4m3: 3 mantissa bits


def test_fp8_checkpoint_loads_in_transformers(tiny_fp8, tmp_path):
    import accelerate  # noqa: F401  transformers' FP8 loader needs it (on CPU it dequantizes on load); a test extra

    fp8 = read_all(tiny_fp8)
    deq = {k: dequantize_fp8(t, fp8[k + "_scale_inv"]) if k + "_scale_inv" in fp8 else t for k, t in fp8.items()}
    (tmp_path / "deq").mkdir()
    write_safetensors(tmp_path / "deq" / "model.safetensors", {k: t for k, t in deq.items() if "_scale_inv" not in k})
    raw = json.loads((tiny_fp8 / "config.json").read_text())
    del raw["quantization_config"]
    (tmp_path / "deq" / "config.json").write_text(json.dumps(raw))
    logits, ref = forward(load_in_transformers(tiny_fp8)), forward(load_in_transformers(tmp_path / "deq"))
    assert float((logits - ref).abs().max() / ref.abs().max()) < 1e-4  # transformers reads scale_inv as we do


def test_bfloat16_checkpoint_keeps_the_router_in_float32(tmp_path):
    ckpt = make_model("tiny", tmp_path / "ckpt", dtype=torch.bfloat16)
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
        assert f.metadata() == {"format": "pt"}
    router = {k for k in dtypes if ".mlp.gate." in k}
    assert router and all(dtypes[k] == "F32" for k in router)
    assert all(dtypes[k] == "BF16" for k in set(dtypes) - router)
    assert json.loads((ckpt / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert torch.isfinite(forward(load_in_transformers(ckpt))).all()


def test_same_seed_gives_identical_bytes(tmp_path):
    def digest(d: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(d.iterdir())}

    a = make_model("tiny", tmp_path / "a", seed=3, fp8=True, shards=2)
    b = make_model("tiny", tmp_path / "b", seed=3, fp8=True, shards=2)
    c = make_model("tiny", tmp_path / "c", seed=4, fp8=True, shards=2)
    assert digest(a) == digest(b)
    assert digest(a)["model-00001-of-00002.safetensors"] != digest(c)["model-00001-of-00002.safetensors"]


def test_bench_preset_has_the_issue_numbers():
    bench = PRESETS["bench"]
    expected = dict(
        model_type="deepseek_v3",
        architectures=["DeepseekV3ForCausalLM"],
        hidden_size=1024,
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=16,
        q_lora_rank=384,
        kv_lora_rank=128,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        n_routed_experts=32,
        num_experts_per_tok=4,
        n_shared_experts=1,
        n_group=4,
        topk_group=2,
        moe_intermediate_size=256,
        intermediate_size=2816,
        first_k_dense_replace=1,
        vocab_size=8192,
        scoring_func="sigmoid",
        topk_method="noaux_tc",
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        max_position_embeddings=163840,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    assert {k: bench[k] for k in expected} == expected
    assert bench["rope_scaling"] == {
        "type": "yarn",
        "factor": 40.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    }
    params = sum(math.prod(shape) for _, shape in tensor_specs(config_from_dict(bench)))
    assert 100e6 < params < 120e6


def test_config_json_is_sorted_and_describes_the_weights(tiny):
    text = (tiny / "config.json").read_text()
    raw = json.loads(text)
    assert text == json.dumps(raw, indent=2, sort_keys=True) + "\n"
    assert set(read_all(tiny)) == {k for k, _ in tensor_specs(config_from_dict(raw))}


def test_custom_config_dict_and_tied_embeddings(tmp_path):
    raw = {k: v for k, v in PRESETS["tiny"].items() if k != "num_key_value_heads"}
    raw.update(tie_word_embeddings=True, q_lora_rank=None, num_hidden_layers=2, first_k_dense_replace=0)
    ckpt = make_model(raw, tmp_path / "ckpt")
    keys = set(read_all(ckpt))
    assert "lm_head.weight" not in keys and "model.layers.0.self_attn.q_proj.weight" in keys
    # transformers' V3 config would default num_key_value_heads to 128 (eager attention then fails).
    assert json.loads((ckpt / "config.json").read_text())["num_key_value_heads"] == 4
    assert torch.isfinite(forward(load_in_transformers(ckpt))).all()


def test_user_errors(tmp_path):
    with pytest.raises(DscError, match="unknown preset"):
        make_model("huge", tmp_path / "a")
    with pytest.raises(DscError, match="shards"):
        make_model("tiny", tmp_path / "b", shards=10_000)
    with pytest.raises(DscError, match="shards"):
        make_model("tiny", tmp_path / "c", shards=0)


def test_write_safetensors_round_trips_lazy_and_plain_tensors(tmp_path):
    from dsc.frontends.presets import LazyTensor

    made = []
    tensors = {
        "b": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "a": LazyTensor(torch.bfloat16, (4,), lambda: made.append("a") or torch.ones(4, dtype=torch.bfloat16)),
        "c": (torch.randn(3, 5) * 100).to(torch.float8_e4m3fn),
    }
    n = write_safetensors(tmp_path / "x.safetensors", tensors, metadata={"note": "hi"})
    assert n == 24 + 8 + 15 and made == ["a"]
    back = load_file(tmp_path / "x.safetensors")
    for k in ("a", "b"):
        assert torch.equal(back[k], tensors[k] if k == "b" else torch.ones(4, dtype=torch.bfloat16))
    assert torch.equal(back["c"].view(torch.uint8), tensors["c"].view(torch.uint8))
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt", "note": "hi"}
