"""Config parsing and the lazy checkpoint reader."""

import json
import math
from pathlib import Path

import pytest
import torch
from dsc.errors import CheckpointError, ConfigError
from dsc.frontends.checkpoint import Checkpoint
from dsc.frontends.config import config_from_dict, load_config
from dsc.frontends.presets import PRESETS
from dsc.ir.ops import quantize_fp8
from safetensors.torch import save_file

V3 = json.loads((Path(__file__).parent / "deepseek_v3_config.json").read_text())


def write_ckpt(d: Path, tensors: dict, config: dict | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    save_file(tensors, d / "model.safetensors")
    (d / "config.json").write_text(json.dumps(config or PRESETS["tiny"]))
    return d


def test_official_v3_config_values():
    cfg = config_from_dict(V3)
    assert cfg.rope_scaling.factor == 40 and cfg.rope_scaling.mscale_all_dim == 1.0
    assert cfg.softmax_scale == pytest.approx(0.1352338, abs=1e-6)  # DESIGN.md §4
    assert [cfg.is_moe_layer(i) for i in range(4)] == [False, False, False, True]
    assert cfg.num_nextn_predict_layers == 1 and cfg.quantization.weight_block_size == (128, 128)


def test_rope_scaling_and_rope_parameters_are_equivalent():
    old = dict(V3)
    new = {k: v for k, v in V3.items() if k not in ("rope_scaling", "rope_theta")}
    new["rope_parameters"] = {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        **{k: v for k, v in V3["rope_scaling"].items() if k != "type"},
    }
    assert config_from_dict(old) == config_from_dict(new)
    plain = dict(new, rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
    cfg = config_from_dict(plain)
    assert cfg.rope_scaling is None and cfg.rope_theta == 5000.0 and cfg.softmax_scale == 192**-0.5


def test_moe_layer_rule():
    base = dict(V3, num_hidden_layers=6)
    assert [config_from_dict(dict(base, first_k_dense_replace=0)).is_moe_layer(i) for i in range(3)] == [True] * 3
    freq2 = config_from_dict(dict(base, first_k_dense_replace=2, moe_layer_freq=2))
    assert [freq2.is_moe_layer(i) for i in range(6)] == [False, False, True, False, True, False]


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"model_type": "llama"}, "not supported"),
        ({"n_group": 5}, "not divisible"),
        ({"topk_group": 9}, "topk_group"),
        ({"num_experts_per_tok": 300}, "exceeds"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2}}, "rope type 'dynamic'"),
        ({"attention_bias": True}, "attention_bias"),
    ],
)
def test_bad_configs_are_named(change, needle):
    with pytest.raises(ConfigError, match=needle):
        config_from_dict(dict(V3, **change), "x/config.json")


def test_v2_routing_follows_transformers():
    v2 = config_from_dict(dict(V3, model_type="deepseek_v2", topk_method="group_limited_greedy", norm_topk_prob=True))
    assert (v2.scoring_func, v2.norm_topk_prob) == ("softmax", False)  # transformers' V2 router never renormalizes


def test_missing_and_invalid_config(tmp_path):
    with pytest.raises(ConfigError, match="config.json: not found"):
        load_config(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="invalid JSON"):
        load_config(tmp_path / "config.json")


def test_open_file_directory_and_index(tmp_path):
    d = write_ckpt(tmp_path / "m", {"a": torch.ones(2, 3), "model.layers.99.x": torch.zeros(1)})
    for path in (d, d / "model.safetensors"):
        ck = Checkpoint.open(path)
        assert ck.keys() == ["a"] and ck.skipped_keys == ["model.layers.99.x"]  # layer >= num_hidden_layers: MTP
        assert torch.equal(ck.load("a"), torch.ones(2, 3))
    (d / "model.safetensors").rename(d / "shard-1.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "shard-1.safetensors"}}))
    assert Checkpoint.open(d / "model.safetensors.index.json").info("a").shape == (2, 3)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(CheckpointError, match="shard 'gone.safetensors' is missing"):
        Checkpoint.open(d)


def test_truncated_and_corrupt_files_fail_at_open(tmp_path):
    d = write_ckpt(tmp_path / "m", {"a": torch.ones(64, 64)})
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        Checkpoint.open(d)
    f.write_bytes((10**12).to_bytes(8, "little") + data[8:])
    with pytest.raises(CheckpointError, match="header length"):
        Checkpoint.open(d)
    f.write_bytes(data[:4])
    with pytest.raises(CheckpointError, match="truncated"):
        Checkpoint.open(d)


def test_expect_checks_shape(tmp_path):
    ck = Checkpoint.open(write_ckpt(tmp_path / "m", {"a": torch.ones(2, 3)}))
    with pytest.raises(CheckpointError, match=r"shape \[2, 3\], expected \[3, 2\]"):
        ck.expect("a", (3, 2))
    with pytest.raises(CheckpointError, match="'b' is missing"):
        ck.expect("b", (1,))


def test_fp8_dequantization_is_exact_on_partial_blocks(tmp_path):
    w = torch.randn(200, 300, generator=torch.Generator().manual_seed(0))
    q, scale = quantize_fp8(w)
    assert scale.shape == (2, 3) and q.dtype == torch.float8_e4m3fn
    cfg = dict(PRESETS["tiny"], quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]})
    ck = Checkpoint.open(write_ckpt(tmp_path / "m", {"w": q, "w_scale_inv": scale}, cfg))
    expected = q.float().clone()
    for i in range(2):
        for j in range(3):
            expected[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128] *= scale[i, j]
    assert torch.equal(ck.load_float("w"), expected)
    assert (ck.load_float("w") - w).norm() / w.norm() < 0.05


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_loading_every_tensor_keeps_memory_bounded(tmp_path):
    """Streaming 160 MB of tensors one at a time must not keep the file's pages resident (< 0.25x growth)."""
    tensors = {f"t{i}": torch.full((1024, 1024), float(i)) for i in range(40)}  # 40 x 4 MB
    ck = Checkpoint.open(write_ckpt(tmp_path / "m", tensors))
    del tensors
    size = (tmp_path / "m" / "model.safetensors").stat().st_size
    ck.load("t0")
    before = rss_bytes()
    for key in ck.keys():
        t = ck.load_float(key)
        assert t[0, 0].item() == float(key[1:])
        del t
    assert rss_bytes() - before < 0.25 * size


def test_opening_is_lazy(tmp_path):
    ck_dir = write_ckpt(tmp_path / "m", {f"t{i}": torch.zeros(1024, 1024) for i in range(20)})
    before = rss_bytes()
    ck = Checkpoint.open(ck_dir)
    assert len(ck.keys()) == 20
    assert rss_bytes() - before < 20 * 2**20  # headers only, not the 80 MB of data
    assert math.isclose(sum(p.stat().st_size for p in ck.files), 80 * 2**20, rel_tol=0.01)
