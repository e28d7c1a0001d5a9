"""``dsc compile CKPT -o DIR``: a model folder that onnxruntime-genai's own Generator runs, with transformers' greedy
tokens (single prompt, a right-padded batch of two prompts of different lengths, and a second turn appended after
generation); the folder also runs under dsc run / verify / inspect.

Tolerance: greedy token ids, exactly (random-weight checkpoints saved by transformers, lm_head scaled up for clear
margins, hf_reference.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from dsc.commands.compile import CompileOptions, compile_model
from dsc.errors import CompileError
from dsc.runtime.engine import load_engine
from dsc.runtime.generate import generate
from hf_reference import _cache_kwarg, hf_reference_logits, load_hf_model, save_hf_checkpoint

og = pytest.importorskip("onnxruntime_genai")

NEW_TOKENS = 10
# token ids >= 2: genai masks the pad id (eos = 1 here) wherever it appears in a prompt
SHORT, LONG = [5, 17, 42], [9, 3, 77, 100, 12, 64, 8]
FORMS = {"latent": CompileOptions(), "naive": CompileOptions(disable_passes=("mla-absorb",))}


@pytest.fixture(scope="module", params=["v3_yarn_grouped", "v2_group_limited_yarn"])
def ckpt(request, tmp_path_factory) -> Path:
    return save_hf_checkpoint(request.param, tmp_path_factory.mktemp(request.param) / "ckpt")


@pytest.fixture(scope="module", params=sorted(FORMS))
def folder(request, ckpt) -> Path:
    out = ckpt.parent / f"folder-{request.param}"
    compile_model(ckpt, out, FORMS[request.param])
    return out


def hf_greedy(ckpt: Path, prompt: list[int], n: int, *, stop_at_eos: bool = True) -> list[int]:
    """transformers' greedy tokens, those before the checkpoint's eos (where genai stops) when ``stop_at_eos``."""
    tokens = hf_reference_logits(ckpt, [prompt], n - 1)[2][0]
    eos = json.loads((ckpt / "config.json").read_text()).get("eos_token_id")
    return tokens[: tokens.index(eos)] if stop_at_eos and eos in tokens else tokens


def genai_greedy(folder: Path, prompts: list[list[int]], n: int) -> list[list[int]]:
    """genai's Generator, greedy, on a batch right-padded with the folder's pad id; the new tokens per row."""
    model = og.Model(str(folder))
    pad = json.loads((folder / "genai_config.json").read_text())["model"]["pad_token_id"]
    longest = max(len(p) for p in prompts)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=longest + n, do_sample=False, batch_size=len(prompts))
    gen = og.Generator(model, params)
    gen.append_tokens(np.asarray([p + [pad] * (longest - len(p)) for p in prompts], dtype=np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    rows = [list(map(int, gen.get_sequence(b)))[longest:][:n] for b in range(len(prompts))]
    eos = json.loads((folder / "genai_config.json").read_text())["model"]["eos_token_id"]
    # genai 0.18 leaves a single sequence's eos out of it, and pads a finished batch row with the pad id (= eos
    # here): compare the tokens before the eos
    return [r[: r.index(eos)] if eos in r else r for r in rows]


def test_folder_layout(ckpt, folder):
    names = {p.name for p in folder.iterdir()}
    assert {"model.onnx", "model.manifest.json", "genai_config.json"} <= names
    assert not any(n.startswith(".") for n in folder.parent.iterdir() if n.name.startswith(f".{folder.name}"))
    config = json.loads((folder / "genai_config.json").read_text())
    assert config["model"]["type"] == "decoder"
    saved = json.loads((ckpt / "config.json").read_text())  # transformers' defaults, saved with the checkpoint
    assert (config["model"]["eos_token_id"], config["model"]["bos_token_id"]) == (
        saved["eos_token_id"],
        saved["bos_token_id"],
    )
    decoder = config["model"]["decoder"]
    manifest = load_engine(folder).manifest
    (key,) = {c.shape for c in manifest.cache}  # one shape for every key and value
    assert (decoder["num_key_value_heads"], decoder["head_size"]) == (key[1], key[3])
    assert config["search"]["past_present_share_buffer"] is False


def test_genai_single_prompt_gives_transformers_tokens(ckpt, folder):
    want = hf_greedy(ckpt, LONG, NEW_TOKENS)
    assert genai_greedy(folder, [LONG], NEW_TOKENS) == [want]
    # dsc's runtime on the folder: the same tokens (it keeps the eos it stops at)
    eos = json.loads((ckpt / "config.json").read_text())["eos_token_id"]
    (dsc_tokens,) = generate(load_engine(folder), [LONG], NEW_TOKENS, eos_token_id=eos).tokens
    assert dsc_tokens[: len(want)] == want and dsc_tokens[len(want) :] in ([], [eos])


def test_genai_right_padded_batch_gives_transformers_tokens(ckpt, folder):
    want = [hf_greedy(ckpt, SHORT, NEW_TOKENS), hf_greedy(ckpt, LONG, NEW_TOKENS)]
    assert genai_greedy(folder, [SHORT, LONG], NEW_TOKENS) == want


@torch.no_grad()
def hf_greedy_at(ckpt: Path, ids: list[int], positions: list[int], n: int) -> list[int]:
    """transformers' greedy continuation of ``ids`` placed at ``positions`` (explicit position ids, cache)."""
    model = load_hf_model(ckpt)
    out = model(torch.tensor([ids]), position_ids=torch.tensor([positions]), use_cache=True)
    tokens, at = [], positions[-1] + 1
    for i in range(n):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(nxt))
        if i < n - 1:
            cache = out.cache if hasattr(out, "cache") else out.past_key_values
            out = model(nxt, position_ids=torch.tensor([[at + i]]), use_cache=True, **{_cache_kwarg(model): cache})
    return tokens


def test_genai_second_turn_after_generation(ckpt, folder):
    """append_tokens after generating: genai 0.18 never runs the last sampled token, and its attention mask and
    positions count it; the engine leaves that cache slot empty and hidden (ir/ops.py EMPTY_SLOT_COLUMNS). The
    continuation equals transformers on the sequence without that token, at genai's positions."""
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=64, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.asarray([LONG], dtype=np.int32))
    for _ in range(4):
        gen.generate_next_token()
    turn = [33, 2, 90]
    gen.append_tokens(np.asarray([turn], dtype=np.int32))
    for _ in range(6):
        gen.generate_next_token()
    seq = list(map(int, gen.get_sequence(0)))
    first = seq[: len(LONG) + 4]
    assert first[len(LONG) :] == hf_greedy(ckpt, LONG, 4, stop_at_eos=False)
    assert seq[: len(first) + len(turn)] == first + turn
    seen = first[:-1] + turn  # the last sampled token never ran
    positions = list(range(len(first) - 1)) + list(range(len(first), len(first) + len(turn)))
    assert seq[len(first) + len(turn) :] == hf_greedy_at(ckpt, seen, positions, 6)


def test_cli_runs_verifies_and_inspects_the_folder(ckpt, folder, capsys):
    from dsc.cli import main

    assert main(["run", str(folder), "--prompt-ids", ",".join(map(str, LONG)), "--max-new-tokens", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == hf_greedy(ckpt, LONG, 4, stop_at_eos=False)
    assert main(["verify", str(ckpt), str(folder), "--steps", "2"]) == 0
    assert "PASS" in capsys.readouterr().out
    assert main(["inspect", str(folder)]) == 0
    assert "model.onnx" in capsys.readouterr().out


def test_folder_refuses_a_foreign_directory_and_an_extra_cache_kind(ckpt, tmp_path):
    from dsc.backends.genai import check_genai_cache
    from dsc.frontends.loader import load_graph
    from dsc.ir.graph import CacheEntry

    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(CompileError, match="not a model folder dsc wrote"):
        compile_model(ckpt, foreign)
    assert [p.name for p in foreign.iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".notes")]  # no partial folder left
    _, graph = load_graph(ckpt)
    graph.meta["kv_cache"] = (*graph.cache_entries(), CacheEntry.named(0, "indexer_key"))
    with pytest.raises(CompileError, match="indexer_key"):
        check_genai_cache(graph, tmp_path / "out")


def test_folder_with_the_checkpoints_tokenizer_and_chat_template(tmp_path):
    """The trained checkpoint has tokenizer.json and tokenizer_config.json (chat template): genai's own tokenizer
    and template work from the folder, and its greedy text equals dsc run's."""
    out = tmp_path / "trained"
    compile_model(Path(__file__).parents[1] / "data" / "tiny_trained", out)
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    model = og.Model(str(out))
    tok = og.Tokenizer(model)
    chat = tok.apply_chat_template('[{"role": "user", "content": "hi"}]', add_generation_prompt=True)
    assert chat == "# user: hi\n# assistant:"
    ids = tok.encode("def f(x):")
    assert list(ids) == list(b"def f(x):")  # byte vocabulary
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 12, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    while not gen.is_done():
        gen.generate_next_token()
    got = list(map(int, gen.get_sequence(0)))[len(ids) :]
    want = generate(load_engine(out), [list(map(int, ids))], 12, eos_token_id=0).tokens[0]
    assert got == [t for t in want if t != 0]
