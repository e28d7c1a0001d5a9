"""Sampling (temperature, top-k, top-p, seed), stopping at eos, and `dsc run`'s text paths on the trained checkpoint
(tests/data/tiny_trained): the chat template round-trip, batches from a file, streaming.

Statistical tolerance: 40,000 draws from a fixed distribution match its probabilities within 0.015 absolute (about 6
standard deviations for p = 0.5)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from dsc.cli import main
from dsc.commands.compile import compile_model
from dsc.engine_format import read_manifest
from dsc.runtime.engine import load_engine
from dsc.runtime.generate import Sampling, choose, generate
from dsc.runtime.tokenizer import chat_prompt, load_tokenizer

CKPT = Path(__file__).parents[1] / "data" / "tiny_trained"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "model"
    compile_model(CKPT, out)
    return out


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["run", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_choose_follows_the_distribution_and_its_limits():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    rng = np.random.default_rng(0)
    draws = np.array([choose(logits, Sampling(temperature=1.0), rng)[0] for _ in range(40_000)])
    np.testing.assert_allclose(np.bincount(draws, minlength=4) / len(draws), [0.5, 0.3, 0.15, 0.05], atol=0.015)
    top2 = {int(choose(logits, Sampling(temperature=1.0, top_k=2), rng)[0]) for _ in range(500)}
    assert top2 == {0, 1}
    top_p = {int(choose(logits, Sampling(temperature=1.0, top_p=0.79), rng)[0]) for _ in range(500)}
    assert top_p == {0, 1}  # 0.5 + 0.3 reaches 0.79
    greedy = Sampling(temperature=1.0, top_p=0.1)  # the first token alone reaches it
    assert {int(choose(logits, greedy, rng)[0]) for _ in range(50)} == {0}
    for bad in ({"temperature": -1.0}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}, {"temperature": float("nan")}):
        with pytest.raises(ValueError):
            Sampling(**bad)


def test_seeded_sampling_repeats_and_seeds_differ(folder):
    engine = load_engine(folder, threads=1)
    prompt = [list(b"def main():\n    ")]
    runs = {
        seed: [generate(engine, prompt, 24, sampling=Sampling(0.9, 40, 0.95, seed)).tokens[0] for _ in range(2)]
        for seed in (1, 2, 3)
    }
    assert all(a == b for a, b in runs.values())  # a seed repeats its tokens
    assert len({tuple(a) for a, _ in runs.values()}) > 1  # and seeds differ
    greedy = generate(engine, prompt, 24).tokens[0]
    assert generate(engine, prompt, 24, sampling=Sampling(0.9, 1, 1.0, 5)).tokens[0] == greedy  # top-k 1 is greedy


def test_generation_stops_at_eos(folder):
    engine = load_engine(folder, threads=1)
    prompt = list(b"import os\nimport ")
    free = generate(engine, [prompt], 12).tokens[0]
    stop = free[3]
    got = generate(engine, [prompt], 12, eos_token_id=stop).tokens[0]
    assert got == free[: free.index(stop) + 1]


def test_chat_template_round_trip(folder):
    manifest = read_manifest(folder)
    text = chat_prompt(folder, manifest, "write a loop")
    assert text == "# user: write a loop\n# assistant:"  # tests/data/tiny_trained/tokenizer_config.json's template
    tok = load_tokenizer(folder, manifest)
    ids = tok.encode(text)
    assert ids == list(text.encode()) and tok.decode(ids) == text  # byte vocabulary: id = byte


def test_cli_chat_batch_streaming_and_seed(folder, tmp_path, capsys):
    code, out, _ = run(capsys, str(folder), "--prompt", "write a loop", "--chat", "--max-new-tokens", "8", "--json")
    chat = json.loads(out)["tokens"]
    templated = "# user: write a loop\n# assistant:"
    code2, out, _ = run(capsys, str(folder), "--prompt", templated, "--max-new-tokens", "8", "--json")
    assert code == code2 == 0 and chat == json.loads(out)["tokens"]
    # streaming: the text arrives on the terminal, then the ids
    code, out, _ = run(capsys, str(folder), "--prompt", "class ", "--max-new-tokens", "8")
    tokens = [int(t) for t in out.split("tokens: ")[1].splitlines()[0].split(",")]
    assert code == 0 and out.startswith("text:   " + bytes(tokens).decode("utf-8", "replace"))
    # a batch of different-length text prompts: each row as it runs alone
    lines = ["import sys", "def f(x):", "for i in range(10):"]
    (tmp_path / "prompts.txt").write_text("\n".join(lines) + "\n")
    code, out, _ = run(
        capsys, str(folder), "--prompts", str(tmp_path / "prompts.txt"), "--max-new-tokens", "6", "--json"
    )
    batch = json.loads(out)["tokens"]
    alone = [run(capsys, str(folder), "--prompt", ln, "--max-new-tokens", "6", "--json")[1] for ln in lines]
    assert code == 0 and batch == [json.loads(a)["tokens"] for a in alone]
    sampled = [
        run(capsys, str(folder), "--prompt", "x = ", "--temperature", "0.8", "--seed", "3", "--json")[1]
        for _ in range(2)
    ]
    assert json.loads(sampled[0])["tokens"] == json.loads(sampled[1])["tokens"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--prompt-ids", "1,2", "--chat"], "--chat applies to text prompts"),
        (["--prompt", "x", "--top-p", "0"], "--top-p"),
        (["--prompt", "x", "--temperature", "-1"], "--temperature"),
        (["--prompts", "missing.txt"], "missing.txt"),
    ],
)
def test_cli_bad_run_flags(folder, capsys, args, message):
    code, out, err = run(capsys, str(folder), *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
