"""The shipped trained checkpoint (tests/data/tiny_trained, written by tools/train_tiny.py): it has learned something,
dsc's fp32 ONNX engine reproduces transformers on real text, and `dsc run --prompt` works through its tokenizer."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from accuracy import next_token_eval, perplexity, token_windows, top1_agreement
from dsc.cli import main
from dsc.commands.compile import CompileOptions, compile_model
from dsc.runtime.engine import OnnxEngine
from hf_reference import hf_reference_logits, load_hf_model

DATA = Path(__file__).parent / "data"
CKPT = DATA / "tiny_trained"
WINDOW = 128  # the training context
# transformers' perplexity on all 527 of heldout.txt's 128-byte windows, measured on the shipped checkpoint (its
# README.md gives 3.40 on random held-out windows); the bound leaves 10%. Uniform guessing over 256 bytes is 256.
MEASURED_HELDOUT_PPL = 3.662
PPL_BOUND = 1.1 * MEASURED_HELDOUT_PPL
PROMPT, NEW_TOKENS = "        if not isinstance(", 48
# transformers' greedy continuation of PROMPT on the shipped checkpoint, recorded when it was trained; the test
# recomputes it from transformers and asserts dsc generates exactly the same bytes.
MEASURED_GREEDY = "self._test_state_task(self._test_state_task(self"


def heldout_text() -> str:
    return (DATA / "heldout.txt").read_text()


@torch.no_grad()
def hf_logits(model, windows: list[list[int]], batch: int = 64) -> np.ndarray:
    """transformers' logits [n, w, V] for all windows, ``batch`` at a time (each from position 0, no cache)."""
    chunks = [windows[i : i + batch] for i in range(0, len(windows), batch)]
    return np.concatenate([model(torch.tensor(c), use_cache=False).logits.numpy() for c in chunks])


@pytest.fixture(scope="module")
def hf_model():
    return load_hf_model(CKPT)


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> OnnxEngine:
    path = tmp_path_factory.mktemp("trained") / "m.onnx"
    compile_model(CKPT, path, CompileOptions())
    return OnnxEngine(path, threads=1)


def test_shipped_files_are_small_and_complete():
    names = {f.name: f.stat().st_size for f in CKPT.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(names)
    assert sum(names.values()) <= 5 * 1000 * 1000
    assert 50_000 + 10 * WINDOW <= len(heldout_text().encode()) < 200 * 1024  # >= 50,000 positions, with margin


def test_heldout_perplexity_is_far_below_uniform(hf_model):
    text = heldout_text()
    windows = token_windows(text, WINDOW, len(text.encode()) // WINDOW)
    logits = hf_logits(hf_model, windows)
    assert logits.shape == (len(windows), WINDOW, 256)
    ppl = perplexity(logits, windows)
    assert ppl < PPL_BOUND, f"held-out perplexity {ppl:.3f} (measured {MEASURED_HELDOUT_PPL} at training time)"


def test_onnx_engine_matches_transformers_on_heldout_text(hf_model, engine):
    windows = token_windows(heldout_text(), WINDOW, 8)
    ref = hf_logits(hf_model, windows)
    got, targets = next_token_eval(engine.step, lambda b: [c.empty(b) for c in engine.cache], windows, batch=4)
    assert got.shape == ref.shape and targets.tolist() == [w[1:] for w in windows]
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    assert rel < 1e-4, f"max abs diff / max abs logit = {rel:.2e}"
    ppl_ref, ppl_got = perplexity(ref, windows), perplexity(got, windows)
    assert abs(ppl_got - ppl_ref) / ppl_ref < 1e-4, (ppl_got, ppl_ref)
    assert top1_agreement(got, ref) > 0.99


def test_tokenizer_is_bytes():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(CKPT / "tokenizer.json"))
    for text in ("def f():", "\tx = 'é'  # ü\n"):
        assert tok.encode(text).ids == list(text.encode())
        assert tok.decode(list(text.encode())) == text


def test_run_prompt_generates_transformers_greedy_text(engine, capsys):
    prefill, steps, generated = hf_reference_logits(CKPT, [list(PROMPT.encode())], NEW_TOKENS - 1)
    expected = generated[0]
    # Every greedy choice is clear: the smallest top-2 logit margin along the path is 0.06 (measured), far above
    # the ~2e-3 logit error of a 1e-4-relative match, so exact equality is a fair demand. (Prompts that run into
    # indentation have near-ties between runs of spaces: "        return self." has one at 9e-4.)
    chosen = torch.cat([prefill[:, -1:], *steps], dim=1)[0]
    top2 = chosen.topk(2, dim=-1).values
    assert float((top2[:, 0] - top2[:, 1]).min()) > 0.02
    code = main([*("run", str(engine.path), "--prompt", PROMPT, "--max-new-tokens", str(NEW_TOKENS), "--json")])
    out, _ = capsys.readouterr()
    tokens = json.loads(out)["tokens"]
    assert code == 0 and tokens == expected, (bytes(tokens), bytes(expected))
    text = bytes(tokens).decode("ascii")  # a model trained on Python source answers in ASCII...
    assert text == MEASURED_GREEDY, f"transformers' greedy text changed: {text!r}"
    assert sum(c.isalpha() for c in text) > len(text) // 3, repr(text)  # ...and in words, not punctuation noise
    code = main(["run", str(engine.path), "--prompt", PROMPT, "--max-new-tokens", str(NEW_TOKENS)])
    out, _ = capsys.readouterr()
    assert code == 0 and "text:" in out and text.splitlines()[0] in out
