"""DeepSeek-V3.2 (DSA) through the rest of dsc: the make-model presets (their tensor names load into transformers
with nothing missing or unexpected), sharded / bf16 / native-FP8 checkpoints, expert parallelism, int8, and the
CLI's inspect / verify.

Tolerances: fp32 paths 1e-4 relative to transformers' logits (as tests/test_dsa.py); expert-parallel engines
1e-5 relative to the single-rank engine (tests/test_expert_parallel.py); the int8 engine within 2e-2 of the
interpreter run on the same int8-quantized graph (int8 activations in MatMulNBits / QMoE,
tests/backends/test_lowerings.py), where a wrong selection or layout errs by O(1).
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from dsc.cli import main
from dsc.commands.compile import CompileOptions, compile_model, make_pass_manager
from dsc.frontends.checkpoint import Checkpoint
from dsc.frontends.loader import load_graph
from dsc.frontends.presets import PRESETS, make_model
from dsc.frontends.trace import step_feeds
from dsc.ir import Interpreter
from dsc.runtime.engine import OnnxEngine
from dsc.runtime.ep import run_expert_parallel
from dsc.runtime.generate import generate
from hf_reference import hf_reference_logits, load_hf_model, rel_error
from hf_reference import teacher_forced as forced
from test_checkpoint_formats import dequantized_copy

# 12 > tiny-v32's top-8. No token repeats: at layer 0 equal tokens differ only in their rotated indexer dims, which
# makes exact ties at score 0 (every head's ReLU off) likelier; transformers' torch.topk orders ties arbitrarily.
PROMPT = [[3, 1, 4, 15, 92, 65, 35, 89, 79, 32, 38, 46], [2, 7, 18, 28, 182, 84, 59, 45, 23, 53, 60, 28 + 100]]
STEPS = 16
RTOL = 1e-4


def engine_against_reference(engine_path: Path, ref_ckpt: Path) -> None:
    prefill, steps, generated = hf_reference_logits(ref_ckpt, PROMPT, STEPS)
    engine = OnnxEngine(engine_path, threads=1)
    logits = forced(engine.step, [c.empty(len(PROMPT)) for c in engine.cache], PROMPT, generated, STEPS)
    assert rel_error(logits[0], prefill.numpy()) <= RTOL
    for got, ref in zip(logits[1:], steps, strict=True):
        assert rel_error(got, ref.numpy()) <= RTOL
    assert generate(engine, PROMPT, STEPS + 1).tokens == generated


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_model("tiny-v32", tmp_path_factory.mktemp("v32") / "ckpt", seed=7, lm_head_scale=4.0)


def test_presets_are_v32_with_deepseek_attention_proportions():
    for name in ("tiny-v32", "bench-v32"):
        assert PRESETS[name]["model_type"] == "deepseek_v32"
    b = PRESETS["bench-v32"]
    mla = b["num_attention_heads"] * (b["kv_lora_rank"] + b["qk_rope_head_dim"])
    assert mla == 9 * b["index_n_heads"] * b["index_head_dim"]  # V3.2: 128 * 576 = 9 * 64 * 128
    assert b["index_topk"] == 2048


def test_preset_loads_in_transformers_and_compiles_to_match(tiny, tmp_path):
    _, info = load_hf_model(tiny, loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    summary = compile_model(tiny, tmp_path / "m.onnx", CompileOptions())
    engine_against_reference(summary.output, tiny)


def test_sharded_bf16_checkpoint(tmp_path):
    ckpt = make_model("tiny-v32", tmp_path / "bf16", seed=7, lm_head_scale=4.0, dtype=torch.bfloat16, shards=3)
    c = Checkpoint.open(ckpt)
    assert c.info("model.layers.1.self_attn.indexer.wq_b.weight").dtype == torch.bfloat16
    assert c.info("model.layers.1.self_attn.indexer.weights_proj.weight").dtype == torch.float32
    summary = compile_model(ckpt / "model.safetensors.index.json", tmp_path / "m.onnx", CompileOptions())
    engine_against_reference(summary.output, ckpt)  # transformers reads the same bf16 values as float32


def test_native_fp8_indexer_matches_dequantized_transformers(tmp_path):
    fp8 = make_model("tiny-v32", tmp_path / "fp8", seed=5, fp8=True, lm_head_scale=4.0)
    c = Checkpoint.open(fp8)
    for name in ("wq_b", "wk"):
        key = f"model.layers.1.self_attn.indexer.{name}.weight"
        assert c.info(key).dtype == torch.float8_e4m3fn and c.info(key + "_scale_inv").dtype == torch.float32
    assert c.info("model.layers.1.self_attn.indexer.weights_proj.weight").dtype == torch.float32
    summary = compile_model(fp8, tmp_path / "fp8.onnx", CompileOptions(quantize="fp8"))  # FP8 as stored
    engine_against_reference(summary.output, dequantized_copy(fp8, tmp_path / "deq"))


def test_expert_parallel_two_ranks_match_single_rank(tiny, tmp_path):
    single = OnnxEngine(compile_model(tiny, tmp_path / "one.onnx", CompileOptions()).output, threads=1)
    ref = generate(single, PROMPT, 5, keep_logits=True)
    compile_model(tiny, tmp_path / "ep", CompileOptions(ep_size=2))
    ep = run_expert_parallel(tmp_path / "ep", 2, PROMPT, 5, keep_logits=True)
    assert ep.tokens == ref.tokens
    for a, b in zip([ep.prefill_logits, *ep.steps_logits], [ref.prefill_logits, *ref.steps_logits], strict=True):
        assert float(np.abs(a - b).max() / np.abs(b).max()) <= 1e-5


def test_int8_engine_matches_its_quantized_graph(tiny, tmp_path):
    options = CompileOptions(quantize="int8")
    summary = compile_model(tiny, tmp_path / "int8.onnx", options)
    engine = OnnxEngine(summary.output, threads=1)
    assert engine.manifest.quantized == "int8"
    ids = np.asarray(PROMPT, dtype=np.int64)
    pos = np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()
    got, _ = engine.step(ids, pos, [c.empty(len(PROMPT)) for c in engine.cache])
    _, graph = load_graph(tiny)
    graph = make_pass_manager(options, "int8").run(graph)
    feeds = step_feeds(graph, ids, pos)
    want = Interpreter(graph).run(feeds)["logits"].numpy()
    assert rel_error(got, want) <= 2e-2


def test_cli_inspect_shows_the_indexer_and_verify_passes(tiny, tmp_path, capsys):
    assert main(["inspect", str(tiny)]) == 0
    out = capsys.readouterr().out
    assert "indexer 8 heads x 16 dims, top-8" in out and "indexer cache 192 B/token" in out
    assert main(["inspect", str(tiny), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["sparse_attention"]["index_topk"] == 8
    assert main(["compile", str(tiny), "-o", str(tmp_path / "m.onnx"), "-q"]) == 0
    assert main(["verify", str(tiny), str(tmp_path / "m.onnx")]) == 0


def test_v32_config_errors_name_the_file(tmp_path, capsys):
    for field, value, words in (
        ("q_lora_rank", None, "q_lora_rank"),
        ("index_head_dim", 4, "index_head_dim 4 is smaller than qk_rope_head_dim 8"),
        ("mlp_layer_types", ["sparse", "dense", "sparse"], "mlp_layer_types"),
    ):
        cfg = dict(PRESETS["tiny-v32"], **{field: value})
        d = tmp_path / field
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg))
        assert main(["inspect", str(d / "config.json")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "config.json" in err and words in err, err


def test_tensorrt_flavour_is_on_the_support_list_and_refuses_large_top_k(tiny, tmp_path):
    """The standard-ops lowering TensorRT parses: every op (If branches included) on backends/tensorrt_ops.py's
    list, TopK's K a constant; an index_topk of 3840 or more is refused in one line (TensorRT's TopK limit)."""
    import onnx
    from dsc.backends.tensorrt import tensorrt_onnx
    from dsc.backends.tensorrt_ops import OP_TYPES
    from dsc.errors import CompileError

    def step_graph(ckpt: Path):
        _, graph = load_graph(ckpt)
        return make_pass_manager(CompileOptions(), None).run(graph)

    model, _ = tensorrt_onnx(step_graph(tiny))  # raises CompileError on any problem of the top-level graph

    def ops(nodes):
        for node in nodes:
            yield node.op_type
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    yield from ops(attr.g.node)

    used = set(ops(model.graph.node))
    assert {"If", "TopK", "GatherND", "LayerNormalization"} <= used
    assert used <= set(OP_TYPES), used - set(OP_TYPES)
    big = make_model(dict(PRESETS["tiny-v32"], index_topk=4096), tmp_path / "big", seed=1)
    with pytest.raises(CompileError, match="K=4096 must be less than 3840"):
        tensorrt_onnx(step_graph(big))


def test_profile_place_and_expert_parallel_with_placement(tiny, tmp_path, capsys):
    """dsc profile counts tokens per routed expert through the V3.2 interpreter; its placement compiles into an
    expert-parallel engine that still equals the single-rank one (1e-5)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(",".join(map(str, row)) for row in PROMPT) + "\n")
    assert main(["profile", str(tiny), "--prompts", str(prompts), "-o", str(tmp_path / "load.json")]) == 0
    load = json.loads((tmp_path / "load.json").read_text())
    counts = np.asarray(load["load"] if isinstance(load, dict) and "load" in load else load)
    moe_layers = sum(1 for i in range(3) if i >= PRESETS["tiny-v32"]["first_k_dense_replace"])
    assert counts.shape == (moe_layers, 8)
    # every token of every prompt reaches num_experts_per_tok experts in each MoE layer
    assert (counts.sum(axis=1) == len(PROMPT) * len(PROMPT[0]) * 2).all()
    args = ["--ranks", "2", "--slots", "10", "--groups", "2", "-o", str(tmp_path / "placement.json")]
    assert main(["place", "--load", str(tmp_path / "load.json"), *args]) == 0
    capsys.readouterr()
    compile_model(tiny, tmp_path / "ep", CompileOptions(ep_size=2, placement=tmp_path / "placement.json"))
    single = OnnxEngine(compile_model(tiny, tmp_path / "one.onnx", CompileOptions()).output, threads=1)
    ref = generate(single, PROMPT, 3, keep_logits=True)
    ep = run_expert_parallel(tmp_path / "ep", 2, PROMPT, 3, keep_logits=True)
    assert ep.tokens == ref.tokens
    assert float(np.abs(ep.prefill_logits - ref.prefill_logits).max() / np.abs(ref.prefill_logits).max()) <= 1e-5
