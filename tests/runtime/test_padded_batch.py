"""Prompts of different lengths in one padded batch: each row gives exactly the tokens its prompt gives alone (right
and left padding, both cache forms), and the tokens transformers gives for the same batch with its attention mask.

Tolerance: greedy token ids, exactly (transformers' random-weight checkpoints have their lm_head scaled up for
clear margins, hf_reference.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from dsc.commands.compile import CompileOptions, compile_model
from dsc.runtime.engine import OnnxEngine
from dsc.runtime.generate import generate, pad_batch
from hf_reference import _cache_kwarg, load_hf_model, save_hf_checkpoint

PROMPTS = [[5, 17, 42], [1, 9, 3, 77, 100, 12, 64, 8], [33, 2, 90, 11, 7]]
NEW_TOKENS = 8
FORMS = {"latent": CompileOptions(), "naive": CompileOptions(disable_passes=("mla-absorb",))}


@pytest.fixture(scope="module", params=["v3_yarn_grouped", "v2_greedy_no_q_lora"])
def ckpt(request, tmp_path_factory) -> Path:
    return save_hf_checkpoint(request.param, tmp_path_factory.mktemp(request.param) / "ckpt")


@pytest.fixture(scope="module")
def engines(ckpt) -> dict[str, OnnxEngine]:
    return {
        form: OnnxEngine(compile_model(ckpt, ckpt.parent / f"{form}.onnx", options).output, threads=1)
        for form, options in FORMS.items()
    }


@torch.no_grad()
def hf_padded_greedy(ckpt: Path, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """transformers' greedy tokens for a left-padded batch, with its attention mask and per-row positions."""
    model = load_hf_model(ckpt)
    ids, mask, pos = (torch.from_numpy(a) for a in pad_batch(prompts, "left"))
    out = model(ids, attention_mask=mask, position_ids=pos, use_cache=True)
    lengths = torch.tensor([len(p) for p in prompts])
    tokens = []
    for i in range(steps):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(nxt)
        if i == steps - 1:
            break
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        kwargs = {_cache_kwarg(model): cache}
        out = model(nxt, attention_mask=mask, position_ids=(lengths + i)[:, None], use_cache=True, **kwargs)
    return torch.cat(tokens, dim=1).tolist()


def test_pad_batch_layouts():
    ids, mask, pos = pad_batch([[4, 5], [6, 7, 8]], "right")
    assert ids.tolist() == [[4, 5, 0], [6, 7, 8]] and mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert pos[0, :2].tolist() == [0, 1] and pos[1].tolist() == [0, 1, 2]
    ids, mask, pos = pad_batch([[4, 5], [6, 7, 8]], "left")
    assert ids.tolist() == [[0, 4, 5], [6, 7, 8]] and mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    assert pos[0, 1:].tolist() == [0, 1]
    with pytest.raises(ValueError, match="non-empty"):
        pad_batch([[1], []])


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_rows_equal_each_prompt_alone(engines, form, side):
    engine = engines[form]
    batch = generate(engine, PROMPTS, NEW_TOKENS, padding=side, keep_logits=True)
    for row, prompt in enumerate(PROMPTS):
        alone = generate(engine, [prompt], NEW_TOKENS, keep_logits=True)
        assert batch.tokens[row] == alone.tokens[0], (side, row)
        # the logits each token was chosen from: padding changes only the summation order
        for got, want in zip(batch.steps_logits, alone.steps_logits, strict=True):
            np.testing.assert_allclose(got[row], want[0], rtol=0, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("form", sorted(FORMS))
def test_padded_batch_matches_transformers_with_its_mask(ckpt, engines, form):
    want = hf_padded_greedy(ckpt, PROMPTS, NEW_TOKENS)
    for side in ("right", "left"):
        assert generate(engines[form], PROMPTS, NEW_TOKENS, padding=side).tokens == want, side
