"""int-quantize: the int8/int4 block format, its packing for onnxruntime, the pass on traced graphs, and engines.

Reference semantics: ``ir.ops.quantize_int`` / ``dequantize_int`` (the interpreter runs the dequantized weights
in float32). The engine runs MatMulNBits / QMoE at accuracy level 4, which also quantizes activations to int8
per block: engine vs interpreter of the *quantized* graph is held to 2e-2 of the logits' largest magnitude
(measured ~1e-2 on these graphs), while a wrong bit layout, nibble order or scale placement errs by O(1).
"""

from pathlib import Path

import pytest
import torch
from dsc.backends.onnx import pack_nbits
from dsc.commands.compile import CompileOptions, compile_model
from dsc.errors import CompileError
from dsc.frontends.presets import make_model
from dsc.ir import DType, Op, interpret, verify
from dsc.ir.ops import dequantize_int, quantize_int
from dsc.passes.expert_fusion import ExpertFusionPass
from dsc.passes.int_quantize import IntQuantizePass
from dsc.runtime.engine import OnnxEngine
from graphs import hand_built_moe, traced_tiny

ENGINE_RTOL = 2e-2


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape,block", [((24, 80), 32), ((3, 5, 64), 16), ((7, 130), 128)])
def test_levels_scales_and_error_bound(bits, shape, block):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(bits))
    q, s = quantize_int(w, bits, block)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert s.dtype == torch.float32 and s.shape == (*shape[:-1], -(-shape[-1] // block))
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    assert int(q.min()) >= lo and int(q.max()) <= hi
    restored = dequantize_int(q, s, block)
    # round to nearest: every weight within half a step, except 4-bit blocks on the 16-level scale, where a
    # value of the other sign than the largest-magnitude one may clip to 7 (within one step)
    step = s.abs().repeat_interleave(block, -1)[..., : shape[-1]]
    err = (restored - w).abs()
    assert bool((err <= (step / 2 if bits == 8 else step) + 1e-6).all())
    if bits == 8:
        assert bool((err <= step / 2 + 1e-6).all())
    else:  # both 4-bit scales are in use, and per block the chosen one is never worse than amax / 7 alone
        assert int(q.min()) == -8 and bool((s < 0).any()) and bool((s > 0).any())
        pad = torch.nn.functional.pad(w, (0, s.shape[-1] * block - shape[-1])).unflatten(-1, (-1, block))
        s7 = pad.abs().amax(-1, keepdim=True) / 7
        err7 = ((torch.round(pad / s7).clamp(-7, 7) * s7 - pad) ** 2).sum(-1)
        pad_err = torch.nn.functional.pad(restored - w, (0, s.shape[-1] * block - shape[-1])).unflatten(-1, (-1, block))
        assert bool(((pad_err**2).sum(-1) <= err7 + 1e-6).all())


def test_zero_block_gets_unit_scale():
    w = torch.zeros(2, 64)
    w[1, 40] = 3.0
    q, s = quantize_int(w, 8, 32)
    assert s[0].tolist() == [1.0, 1.0] and s[1, 0] == 1.0
    assert torch.equal(dequantize_int(q, s, 32), w)


def test_packing_matches_matmulnbits_layout():
    # levels -8..7 -> stored level + 8; two 4-bit values per byte, the first in the low nibble
    q = torch.tensor([[-8, 7, 0, -1] * 4 + [1] * 3], dtype=torch.int8)  # K = 19: one full block, one partial
    packed = pack_nbits(q, 4, 16)
    assert packed.dtype == torch.uint8 and packed.shape == (1, 2, 8)
    assert packed[0, 0, :2].tolist() == [0 | (15 << 4), 8 | (7 << 4)]
    assert packed[0, 1].tolist() == [9 | (9 << 4), 9 | (8 << 4)] + [8 | (8 << 4)] * 6  # padded with the zero point
    eight = pack_nbits(torch.tensor([[-128, 127, 0]], dtype=torch.int8), 8, 16)
    assert eight.shape == (1, 1, 16) and eight[0, 0, :4].tolist() == [0, 255, 128, 128]


@pytest.mark.parametrize("bits", [8, 4])
def test_pass_quantizes_linears_and_fused_experts(bits):
    g = ExpertFusionPass().run(hand_built_moe(hidden=32, inter=16)).graph
    result = IntQuantizePass(bits=bits, block=16).run(g)
    q = result.graph
    verify(q)
    assert result.stats["experts"] == 1 and result.stats["linear"] == 3
    experts = next(n for n in q.nodes if n.op == Op.MOE_EXPERTS)
    assert experts.attrs["bits"] == bits and [v.type.dtype for v in experts.inputs[3:6]] == [DType.I8] * 3
    route = next(n for n in q.nodes if n.op == Op.MOE_ROUTE)
    assert route.inputs[1].type.dtype == DType.F32  # routing stays exact
    x = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(0))
    want, got = interpret(g, {"x": x})["y"], interpret(q, {"x": x})["y"]
    rel = float((got - want).norm() / want.norm())
    assert rel < (0.02 if bits == 8 else 0.2), rel
    assert len(q.meta["quantized_weights"]) == 6


def test_experts_left_float_when_no_block_divides():
    g = ExpertFusionPass().run(hand_built_moe(hidden=24, inter=12)).graph  # 24 and 12 share no block >= 16
    result = IntQuantizePass(bits=8, block=32).run(g)
    assert result.stats["experts"] == 0 and "no block" in next(iter(result.stats["experts_kept_float"].values()))
    assert result.stats["linear"] == 3  # linear layers pad their last block instead


def test_bad_options_are_refused():
    with pytest.raises(CompileError, match="bits must be 8 or 4"):
        IntQuantizePass(bits=3)
    with pytest.raises(CompileError, match="powers of two"):
        IntQuantizePass(block=48)


def test_traced_model_quantizes_embedding_at_8_bits_and_lm_head():
    g = IntQuantizePass(bits=4).run(traced_tiny(q_lora=True, yarn=True)).graph
    verify(g)
    embed = next(n for n in g.nodes if n.op == Op.EMBEDDING)
    assert embed.inputs[1].type.dtype == DType.I8 and embed.attrs["bits"] == 8
    head = next(n for n in g.nodes if n.op == Op.LINEAR and n.outputs[0].name == "logits")
    assert head.inputs[1].type.dtype == DType.I8 and head.attrs["bits"] == 4
    route = next(n for n in g.nodes if n.op == Op.MOE_ROUTE)
    assert route.inputs[1].type.dtype == DType.F32
    kept = IntQuantizePass(bits=8, embedding_bits=0).run(traced_tiny(q_lora=True, yarn=True)).graph
    assert kept.weights["model.embed_tokens.weight"].value.type.dtype == DType.F32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("intq") / "tiny"
    make_model("tiny", path, seed=3)
    return path


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("lowering", ["contrib", "gather"])
def test_engine_matches_interpreter_of_quantized_graph(tiny, tmp_path, bits, lowering):
    from dsc.frontends.loader import load_graph
    from dsc.frontends.trace import step_feeds
    from dsc.ir.interpreter import Interpreter

    options = CompileOptions(quantize=f"int{bits}", moe_lowering=lowering)
    summary = compile_model(tiny, tmp_path / "e.onnx", options)
    assert summary.manifest.quantized == f"int{bits}"
    groups = {(w.group, w.format) for w in summary.manifest.weights}
    # hidden 64, inter 32: the experts' block shrinks to 32; the embedding's (8 bits) to 64 at most
    assert ("routed experts", f"int{bits} block 32") in groups
    assert ("embedding", "int8 block 64") in groups and ("router", "float32") in groups
    # the reference: the same pipeline's graph, run by the interpreter
    from dsc.commands.compile import make_pass_manager

    _, graph = load_graph(tiny)
    quantized = make_pass_manager(options, f"int{bits}").run(graph)
    ids = torch.tensor([[5, 17, 42, 7, 99, 3]])
    pos = torch.arange(6)[None]
    want = Interpreter(quantized).run(step_feeds(quantized, ids, pos))["logits"]
    engine = OnnxEngine(summary.output, threads=1)
    got, _ = engine.step(ids.numpy(), pos.numpy(), [c.empty(1) for c in engine.cache])
    err = float((torch.from_numpy(got) - want).abs().max() / want.abs().max())
    assert err < ENGINE_RTOL, err


def test_native_fp8_runs_as_int8_by_default_on_onnxruntime(tmp_path):
    ckpt = tmp_path / "fp8"
    make_model("tiny", ckpt, seed=1, fp8=True)
    auto = compile_model(ckpt, tmp_path / "auto.onnx", CompileOptions())
    kept = compile_model(ckpt, tmp_path / "fp8.onnx", CompileOptions(quantize="fp8"))
    assert auto.manifest.quantized == "int8"
    assert any("(from fp8)" in str(p.stats) or p.stats.get("from_fp8") for p in auto.manifest.passes)
    assert {w.format for w in kept.manifest.weights} >= {"fp8 e4m3 128x128"}
    assert not any(w.format.startswith("fp8") for w in auto.manifest.weights)


def test_tensorrt_refuses_int_formats(tmp_path, tiny):
    with pytest.raises(CompileError, match="TensorRT plans take --quantize fp8"):
        compile_model(tiny, tmp_path / "e.plan", CompileOptions(quantize="int8"))


@pytest.mark.parametrize(
    "scoring,method,groups,norm",
    [("sigmoid", "noaux_tc", 4, True), ("softmax", "greedy", 1, False), ("softmax", "group_limited_greedy", 2, True)],
)
def test_qmoe_routes_by_itself_with_deepseeks_rule(tmp_path, scoring, method, groups, norm):
    """QMoE fed the router's dense selection scores and mixing scores picks DeepSeek's experts and weights: the
    router's TopK is gone from the engine, which still matches the interpreter (a wrong pick, a missing
    normalization or scaling errs by O(1), far past the activation-quantization tolerance)."""
    import onnx
    from dsc.backends.onnx import lower_to_onnx
    from dsc.backends.onnx_io import save_model
    from dsc.ir import Constant, Graph, GraphBuilder
    from dsc.runtime.engine import ort_session

    gen = torch.Generator().manual_seed(4)
    b = GraphBuilder(Graph("routed"))
    x = b.input("x", DType.F32, ("batch", "seq", 64))
    gate = b.weight("gate", DType.F32, (8, 64), Constant(torch.randn(8, 64, generator=gen) / 4, "gate"))
    extra = [b.weight("bias", DType.F32, (8,), Constant(torch.randn(8, generator=gen) / 8, "b"))]
    attrs = dict(
        num_experts=8,
        top_k=3,
        n_group=groups,
        topk_group=max(1, groups // 2),
        scoring=scoring,
        method=method,
        norm_topk_prob=norm,
        scaling=2.5,
    )
    w, idx = b.op(Op.MOE_ROUTE, [x, gate, *(extra if method == "noaux_tc" else [])], attrs).outputs
    mats = []
    for name, shape in (("g", (8, 32, 64)), ("u", (8, 32, 64)), ("d", (8, 64, 32))):
        q, s = quantize_int(torch.randn(*shape, generator=gen) / 6, 8, 32)
        mats.append(
            (
                b.weight(name, DType.I8, shape, Constant(q, name)),
                b.weight(f"{name}.s", DType.F32, tuple(s.shape), Constant(s, "s")),
            )
        )
    ins = [x, w, idx, *(m[0] for m in mats), *(m[1] for m in mats)]
    b.output(b.op(Op.MOE_EXPERTS, ins, {"num_experts": 8, "bits": 8, "block": 32}, out_names=["y"]).output)
    graph = b.graph
    verify(graph)
    model, inits = lower_to_onnx(graph)
    ops = [nd.op_type for nd in model.graph.node]
    group_topks = (2 if method == "noaux_tc" else 1) if groups > 1 else 0  # the group choice keeps its own
    assert "QMoE" in ops and ops.count("TopK") == group_topks and "GatherElements" not in ops
    qmoe = next(nd for nd in model.graph.node if nd.op_type == "QMoE")
    assert len(qmoe.input) == 15 and qmoe.input[14]  # router_weights given
    save_model(model, inits, tmp_path / "m.onnx")
    onnx.checker.check_model(str(tmp_path / "m.onnx"))
    feeds = {"x": torch.randn(2, 5, 64, generator=gen)}
    got = ort_session(tmp_path / "m.onnx", threads=1).run(["y"], {"x": feeds["x"].numpy()})[0]
    want = interpret(graph, feeds)["y"]
    err = float((torch.from_numpy(got) - want).abs().max() / want.abs().max())
    assert err < ENGINE_RTOL, err


def test_int8_expert_parallel_equals_single_int8_engine(tiny, tmp_path):
    """Each rank's expert engines hold its slots' int8 experts (QMoE with the slot-indexed routing); the run
    equals the single int8 engine within float32 rounding of the cross-rank sum (the same int8 kernels)."""
    import numpy as np
    from dsc.runtime.ep import run_expert_parallel
    from dsc.runtime.generate import generate

    compile_model(tiny, tmp_path / "ep", CompileOptions(quantize="int8", ep_size=2))
    single = compile_model(tiny, tmp_path / "one.onnx", CompileOptions(quantize="int8"))
    prompts = [[5, 17, 42, 7, 99, 3], [1, 2, 3, 4, 5, 6]]
    ep = run_expert_parallel(tmp_path / "ep", 2, prompts, 6, keep_logits=True)
    ref = generate(OnnxEngine(single.output, threads=1), prompts, 6, keep_logits=True)
    assert ep.tokens == ref.tokens
    for a, b in zip(ep.steps_logits, ref.steps_logits, strict=True):
        assert float(np.abs(a - b).max() / np.abs(b).max()) <= 1e-4


def test_old_onnxruntime_is_named_not_a_load_failure(tiny, tmp_path, monkeypatch):
    import onnxruntime as ort
    from dsc.errors import EngineError

    summary = compile_model(tiny, tmp_path / "e.onnx", CompileOptions(quantize="int4"))
    monkeypatch.setattr(ort, "__version__", "1.30.0")
    with pytest.raises(EngineError, match=r"needs onnxruntime >= 1\.31 \(installed: 1\.30\.0\)"):
        OnnxEngine(summary.output)
