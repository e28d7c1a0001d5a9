"""DeepSeek-V3.2 sparse attention (DSA) against transformers' DeepseekV32ForCausalLM, on random-weight checkpoints
that transformers saved itself (tests/hf_reference.py DSA_CONFIGS: top-k below the prompt, top-k covering the
whole context, yarn rope with one expert group and odd sizes, an all-rope indexer), plus a native FP8 checkpoint.

Tolerance: max |dsc - transformers| / max |transformers| <= 1e-4 over every logit of the prefill and of 16 decode
steps through dsc's cache (latent + indexer keys), identical greedy tokens; default engine, naive engine and the
IR interpreter.

Ties: transformers selects with torch.topk, whose order among exactly equal scores is unspecified. dsc breaks ties
lowest position first (interpreter: a stable sort; engine: ONNX TopK's rule, tested with exact ties in
tests/backends/test_lowerings.py). So that the comparison with transformers never depends on a tie, every
selection made while running these prompts is checked to have a clear margin: the k-th and (k+1)-th best scores
of each query differ by more than 1e-4 of the row's largest score (a test fails loudly instead of flaking if a
seed ever produced a near-tie).
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from dsc.commands.compile import CompileOptions, compile_model
from dsc.frontends.loader import load_graph
from dsc.ir import Interpreter
from dsc.ir.graph import Op
from dsc.ir.ops import index_scores
from dsc.runtime.engine import OnnxEngine
from dsc.runtime.generate import generate
from hf_reference import DSA_CONFIGS, hf_reference_logits, load_hf_model, rel_error, save_hf_checkpoint
from hf_reference import teacher_forced as forced

PROMPT = [[1, 5, 9, 17, 33, 65, 127], [100, 3, 3, 42, 7, 0, 64]]
DECODE_STEPS = 16
RTOL = 1e-4
TIE_MARGIN = 1e-4


@dataclass
class Case:
    name: str
    ckpt: Path
    prefill: np.ndarray
    steps: list[np.ndarray]
    generated: list[list[int]]


@pytest.fixture(scope="module", params=sorted(DSA_CONFIGS))
def case(request, tmp_path_factory) -> Case:
    ckpt = save_hf_checkpoint(request.param, tmp_path_factory.mktemp(request.param) / "ckpt")
    prefill, steps, generated = hf_reference_logits(ckpt, PROMPT, DECODE_STEPS)
    return Case(request.param, ckpt, prefill.numpy(), [s.numpy() for s in steps], generated)


def check(case: Case, logits: list[np.ndarray]) -> None:
    assert rel_error(logits[0], case.prefill) <= RTOL, f"{case.name}: prefill"
    for i, (got, ref) in enumerate(zip(logits[1:], case.steps, strict=True)):
        assert got.shape == ref.shape
        assert rel_error(got, ref) <= RTOL, f"{case.name}: decode step {i}"


FORMS = {
    "default": CompileOptions(),  # absorbed latent cache, gathered top-k latent rows
    "naive": CompileOptions(disable_passes=("mla-absorb", "expert-fusion")),  # per-head cache, gathered rows
    # standard ops (the TensorRT flavour): TopK with a constant K = index_topk over -inf-padded scores
    "gather": CompileOptions(moe_lowering="gather"),
}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_onnx_engine_matches_transformers(case: Case, form: str, tmp_path: Path):
    summary = compile_model(case.ckpt, tmp_path / "model.onnx", FORMS[form])
    engine = OnnxEngine(summary.output, threads=1)
    manifest = engine.manifest
    layers = DSA_CONFIGS[case.name]["num_hidden_layers"]
    roles = [c.role for c in manifest.kv_cache.tensors]
    assert roles.count("indexer_key") == layers
    assert roles.count("key") == roles.count("value") == layers  # naive and latent (halves) alike
    assert manifest.kv_cache.form == ("naive" if form == "naive" else "latent")
    assert "indexer_key" in manifest.kv_cache.layout
    assert "gather" in manifest.extra["sparse_attention"]["decode"]
    assert manifest.extra["sparse_attention"]["prefill"].startswith("mask")
    assert manifest.config["index_topk"] == DSA_CONFIGS[case.name]["index_topk"]  # reads back as config.json
    index_dim = DSA_CONFIGS[case.name]["index_head_dim"]
    assert all(c.shape == ("batch", 1, "past", index_dim) for c in manifest.kv_cache.tensors if c.role == "indexer_key")
    past = [c.empty(len(PROMPT)) for c in engine.cache]
    check(case, forced(engine.step, past, PROMPT, case.generated, DECODE_STEPS))
    assert generate(engine, PROMPT, DECODE_STEPS + 1).tokens == case.generated


def test_interpreter_matches_transformers_with_clear_selection_margins(case: Case):
    _, graph = load_graph(case.ckpt)
    margins: list[float] = []
    env: dict[str, torch.Tensor] = {}

    def observe(node, outs):
        for v, t in zip(node.outputs, outs, strict=True):
            env[v.name] = t
        if node.op == Op.INDEX_TOPK:
            q, k, w, mask = (env[v.name] for v in node.inputs)
            scores = index_scores(q, k, w, mask, node.attrs)
            top = node.attrs["top_k"]
            if scores.shape[-1] > top:
                ranked = scores.sort(dim=-1, descending=True).values
                kth, nxt = ranked[..., top - 1], ranked[..., top]
                valid = torch.isfinite(nxt)  # a row with <= k earlier keys takes them all: no choice made
                if valid.any():
                    gap = (kth - nxt)[valid] / ranked[..., 0].abs()[valid].clamp_min(1e-30)
                    margins.append(float(gap.min()))

    interp = Interpreter(graph, observe=observe)
    caches = [v for v in graph.inputs if v.name.startswith("past_key_values.")]

    def step(ids, pos, past):
        env.clear()
        env.update({v.name: p for v, p in zip(caches, past, strict=True)})
        env["attention_mask"] = torch.ones(ids.shape[0], past[0].shape[2] + ids.shape[1], dtype=torch.int64)
        feeds = {"input_ids": torch.from_numpy(ids), "position_ids": torch.from_numpy(pos), **env}
        out = interp.run(feeds)
        return out["logits"].numpy(), [out[v.name.replace("past_key_values.", "present.")] for v in caches]

    empty = [
        torch.zeros([len(PROMPT) if d == "batch" else 0 if d == "past" else d for d in v.type.shape]) for v in caches
    ]
    check(case, forced(step, empty, PROMPT, case.generated, DECODE_STEPS))
    total = len(PROMPT[0]) + DECODE_STEPS
    if DSA_CONFIGS[case.name]["index_topk"] < total:
        assert margins, "the indexer never had to choose"
        assert min(margins) > TIE_MARGIN, f"{case.name}: a near-tie in the indexer's selection ({min(margins):.2e})"
    else:
        assert not margins  # top-k covers the context: every earlier key, DSA is dense attention


@pytest.mark.parametrize("name", ["v32_topk_below_context", "v32_yarn_one_group_odd"])
def test_selection_changes_the_logits(name: str, tmp_path: Path):
    """The configs whose top-k is below the context would pass a dense implementation only if selection did not
    matter: transformers itself, with index_topk raised above the context, differs far beyond the tolerance."""
    ckpt = save_hf_checkpoint(name, tmp_path / "ckpt")
    sparse = load_hf_model(ckpt)
    dense = load_hf_model(ckpt)
    dense.config.index_topk = 10_000
    for layer in dense.model.layers:
        layer.self_attn.indexer.index_topk = 10_000
    ids = torch.tensor(PROMPT)
    with torch.no_grad():
        assert rel_error(sparse(ids).logits, dense(ids).logits) > 100 * RTOL


PADDED_PROMPTS = [[5, 17, 42], [1, 9, 3, 77, 100, 12, 64, 8, 21, 30], [33, 2, 90, 11, 7]]


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_rows_equal_each_prompt_alone(form: str, side: str, tmp_path: Path):
    """attention_mask with DSA: padded keys are never selected by the indexer's top-k nor attended, so each row of a
    padded batch gives the tokens (and logits) of its prompt alone, with top-k below the context."""
    ckpt = save_hf_checkpoint("v32_topk_below_context", tmp_path / "ckpt")
    engine = OnnxEngine(compile_model(ckpt, tmp_path / "model.onnx", FORMS[form]).output, threads=1)
    batch = generate(engine, PADDED_PROMPTS, 6, padding=side, keep_logits=True)
    for row, prompt in enumerate(PADDED_PROMPTS):
        alone = generate(engine, [prompt], 6, keep_logits=True)
        assert batch.tokens[row] == alone.tokens[0], (side, row)
        for got, want in zip(batch.steps_logits, alone.steps_logits, strict=True):
            np.testing.assert_allclose(got[row], want[0], rtol=0, atol=1e-4 * np.abs(want).max())
