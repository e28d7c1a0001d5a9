"""Checkpoint -> IR -> ONNX -> onnxruntime, against transformers on checkpoints transformers saved itself.

Tolerance: max |engine - transformers| / max |transformers| <= 1e-4 over every logit (fp32), on prefill and
on each of 16 decode steps fed through the engine's KV cache; greedy generations must be identical.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from dsc.commands.compile import CompileOptions, compile_model
from dsc.frontends.loader import load_graph
from dsc.frontends.trace import step_feeds
from dsc.ir import Interpreter
from dsc.runtime.engine import OnnxEngine
from dsc.runtime.generate import generate
from hf_reference import HF_CONFIGS, hf_reference_logits, rel_error, save_hf_checkpoint
from hf_reference import teacher_forced as forced

PROMPT = [[1, 5, 9, 17, 33, 65, 127], [100, 3, 3, 42, 7, 0, 64]]
DECODE_STEPS = 16


def teacher_forced(step, empty: list, generated: list[list[int]], steps: int = DECODE_STEPS) -> list[np.ndarray]:
    return forced(step, empty, PROMPT, generated, steps)


RTOL = 1e-4


@dataclass
class Case:
    name: str
    ckpt: Path
    prefill: np.ndarray
    steps: list[np.ndarray]
    generated: list[list[int]]


@pytest.fixture(scope="module", params=sorted(HF_CONFIGS))
def case(request, tmp_path_factory) -> Case:
    ckpt = save_hf_checkpoint(request.param, tmp_path_factory.mktemp(request.param) / "ckpt")
    prefill, steps, generated = hf_reference_logits(ckpt, PROMPT, DECODE_STEPS)
    return Case(request.param, ckpt, prefill.numpy(), [s.numpy() for s in steps], generated)


def check_against_reference(case: Case, logits: list[np.ndarray]) -> None:
    assert rel_error(logits[0], case.prefill) <= RTOL, f"{case.name}: prefill"
    for i, (got, ref) in enumerate(zip(logits[1:], case.steps, strict=True)):
        assert got.shape == ref.shape
        assert rel_error(got, ref) <= RTOL, f"{case.name}: decode step {i}"


FORMS = {
    "default": CompileOptions(),  # absorbed latent cache, fused experts on onnxruntime's MoE kernel
    "naive": CompileOptions(disable_passes=("mla-absorb", "expert-fusion")),
    "gather": CompileOptions(moe_lowering="gather"),  # fused experts lowered to standard ops
}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_onnx_engine_matches_transformers(case: Case, form: str, tmp_path: Path):
    options = FORMS[form]
    summary = compile_model(case.ckpt, tmp_path / "model.onnx", options)
    engine = OnnxEngine(summary.output, threads=1)
    assert engine.manifest.kv_cache.form == ("naive" if form == "naive" else "latent")
    check_against_reference(
        case, teacher_forced(engine.step, [c.empty(len(PROMPT)) for c in engine.cache], case.generated)
    )
    result = generate(engine, PROMPT, DECODE_STEPS + 1)
    assert result.tokens == case.generated


def test_interpreter_matches_transformers(case: Case):
    _, graph = load_graph(case.ckpt)
    interp = Interpreter(graph)
    caches = [v for v in graph.inputs if v.name.startswith("past_key_values.")]

    def step(ids, pos, past):
        out = interp.run(step_feeds(graph, ids, pos, {v.name: p for v, p in zip(caches, past, strict=True)}))
        return out["logits"].numpy(), [out[v.name.replace("past_key_values.", "present.")] for v in caches]

    empty = [
        torch.zeros([len(PROMPT) if d == "batch" else 0 if d == "past" else d for d in v.type.shape]) for v in caches
    ]
    check_against_reference(case, teacher_forced(step, empty, case.generated))
