"""fp8-quantize alone: DeepSeek's 128x128 block format, pass-through of native FP8, interpreter equality."""

import onnx
import pytest
import torch
from dsc.ir import Constant, DType, Graph, GraphBuilder, Op, interpret, verify
from dsc.ir.ops import dequantize, quantize_fp8
from dsc.passes.expert_fusion import ExpertFusionPass
from dsc.passes.fp8_quantize import Fp8QuantizePass
from graphs import hand_built_moe

E4M3_MAX = 448.0


@pytest.mark.parametrize("shape", [(256, 384), (200, 300), (130, 64), (1, 1)])
def test_block_scales_follow_deepseek_layout(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    q, scale = quantize_fp8(w)
    rows, cols = -(-shape[0] // 128), -(-shape[1] // 128)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert scale.dtype == torch.float32 and scale.shape == (rows, cols)
    for i in range(rows):
        for j in range(cols):  # partial edge tiles get their own amax / 448
            tile = w[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128]
            assert scale[i, j] == pytest.approx(tile.abs().max().item() / E4M3_MAX, rel=1e-6)
    restored = dequantize(q, scale)
    assert restored.abs().max() <= w.abs().max() * (1 + 1e-6)
    assert (restored - w).norm() / w.norm() < 0.04  # e4m3 keeps 3 mantissa bits


def linear_graph(native_fp8: bool = False) -> Graph:
    b = GraphBuilder(Graph("lin"))
    x = b.input("x", DType.F32, ("batch", 200))
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(1))
    if native_fp8:
        q, s = quantize_fp8(w)
        wv = b.weight("proj.weight", DType.F8E4M3, (300, 200), Constant(q, "q"))
        sv = b.weight("proj.weight_scale_inv", DType.F32, (3, 2), Constant(s, "s"))
        h = b.op(Op.LINEAR, [x, wv, sv]).output
    else:
        h = b.op(Op.LINEAR, [x, b.weight("proj.weight", DType.F32, (300, 200), Constant(w, "w"))]).output
    head = b.weight(
        "lm_head.weight",
        DType.F32,
        (50, 300),
        Constant(torch.randn(50, 300, generator=torch.Generator().manual_seed(9)), "head"),
    )
    b.output(b.op(Op.LINEAR, [h, head], out_names=["y"]).output)
    return b.graph


def test_quantizes_linear_weights_and_keeps_lm_head():
    g = linear_graph()
    result = Fp8QuantizePass().run(g)
    verify(result.graph)
    assert result.modified and result.stats["quantized"] == 1
    assert result.stats["kept_high_precision"] == ["lm_head.weight"]
    proj = result.graph.nodes[0]
    assert [v.type.dtype for v in proj.inputs[1:]] == [DType.F8E4M3, DType.F32]
    assert proj.inputs[2].type.shape == (3, 2)
    assert result.graph.weights["lm_head.weight"].value.type.dtype == DType.F32
    # The interpreter's output equals the float graph evaluated with the dequantized weights.
    q = result.graph.weights["proj.weight"].load()
    s = result.graph.weights["proj.weight_scale_inv"].load()
    dequantized = linear_graph()
    dequantized.weights["proj.weight"] = type(dequantized.weights["proj.weight"])(
        dequantized.weights["proj.weight"].value, Constant(dequantize(q, s), "deq")
    )
    x = torch.randn(4, 200, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(
        interpret(result.graph, {"x": x})["y"], interpret(dequantized, {"x": x})["y"], rtol=1e-5, atol=1e-5
    )


def test_native_fp8_passes_through_bit_exactly():
    g = linear_graph(native_fp8=True)
    result = Fp8QuantizePass().run(g)
    assert not result.modified and result.stats["already_fp8"] == 1 and result.stats["quantized"] == 0
    assert result.graph.weights["proj.weight"].source is g.weights["proj.weight"].source
    assert result.graph.nodes[0] is g.nodes[0]


def test_quantized_experts_fuse_with_their_scales():
    g = Fp8QuantizePass().run(hand_built_moe(experts=4, hidden=16, inter=8)).graph
    fused = ExpertFusionPass().run(g)
    verify(fused.graph)
    assert fused.stats["fused_layers"] == 1
    node = next(n for n in fused.graph.nodes if n.op == Op.MOE_EXPERTS)
    assert [v.type.dtype for v in node.inputs[3:]] == [DType.F8E4M3] * 3 + [DType.F32] * 3
    x = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(interpret(fused.graph, {"x": x})["y"], interpret(g, {"x": x})["y"], rtol=1e-5, atol=1e-6)


def test_engine_bytes_per_quantized_weight(tmp_path):
    """Each FP8 weight costs at most 1.04 bytes per element in the engine file, scales included."""
    from dsc.backends.onnx import lower_to_onnx
    from dsc.backends.onnx_io import save_model

    g = Fp8QuantizePass().run(linear_graph()).graph
    model, inits = lower_to_onnx(g)
    save_model(model, inits, tmp_path / "m.onnx")
    m = onnx.load(str(tmp_path / "m.onnx"))
    sizes = {t.name: len(t.raw_data) for t in m.graph.initializer}
    dq = next(n for n in m.graph.node if n.op_type == "DequantizeLinear")
    weight_bytes = sizes[dq.input[0]] + sizes[dq.input[1]]
    assert weight_bytes / (300 * 200) <= 1.04
