"""KV bytes per token, read off the emitted ONNX engine's cache inputs (not computed from the config)."""

import json
from pathlib import Path

import onnx
import pytest
from dsc.backends.onnx import lower_to_onnx
from dsc.commands.inspect import _shape_only_provider
from dsc.frontends.config import config_from_dict
from dsc.frontends.trace import trace_model
from dsc.ir.types import DType
from dsc.passes.manager import PassManager
from dsc.passes.pipeline import build_pipeline

V3 = json.loads((Path(__file__).parent / "frontends" / "deepseek_v3_config.json").read_text())


def cache_values_per_token_per_layer(model: onnx.ModelProto, layers: int) -> int:
    total = 0
    for inp in model.graph.input:
        if inp.name.startswith("past_key_values."):
            dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in inp.type.tensor_type.shape.dim]
            assert dims[0] == "batch" and dims[2] == "past"  # head-major [batch, heads, past, dim]
            n = dims[1] * dims[3]
            total += n
    assert total % layers == 0
    return total // layers


# naive: keys (192) and values (128) per head, the values zero-padded to 192 so that key and value share a shape
@pytest.mark.parametrize("disable,values", [((), 512 + 64), (("mla-absorb",), 128 * (192 + 192))])
def test_deepseek_v3_kv_bytes_per_token(disable, values):
    # The official DeepSeek-V3 attention (128 heads, kv_lora 512, rope 64, nope 128, v 128); four layers keep
    # the trace quick — the cache per layer does not depend on the layer count.
    cfg = config_from_dict(dict(V3, num_hidden_layers=4, n_routed_experts=16, n_group=8, topk_group=4))
    graph = PassManager(build_pipeline(disable=disable), emit=lambda _: None).run(
        trace_model(cfg, _shape_only_provider)
    )
    model, _ = lower_to_onnx(graph)
    per_layer = cache_values_per_token_per_layer(model, cfg.num_hidden_layers)
    assert per_layer == values  # 576 latent values vs 49152 for padded full heads (40960 unpadded): 85x
    assert per_layer * DType.F32.itemsize == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4 or disable
