"""Expert-parallel engines on 2 and 4 CPU ranks (gloo) against the single-rank engine: logits within 1e-5
relative on prefill and every decode step; a dead rank and a wrong placement fail clearly."""

import json
from pathlib import Path

import numpy as np
import pytest
from dsc.cli import main
from dsc.commands.compile import CompileOptions, compile_model
from dsc.engine_format import read_manifest
from dsc.errors import DscError, EngineError
from dsc.runtime.engine import OnnxEngine
from dsc.runtime.ep import run_expert_parallel
from dsc.runtime.generate import generate
from hf_reference import HF_CONFIGS, save_hf_checkpoint

PROMPTS = [[1, 5, 9, 17, 33, 65, 127], [100, 3, 3, 42, 7, 0, 64]]
STEPS = 5
RTOL = 1e-5


def compile_quiet(src, out, **kw):
    return compile_model(src, out, CompileOptions(**kw))


def single_rank(ckpt: Path, tmp: Path):
    engine = OnnxEngine(compile_quiet(ckpt, tmp / "single.onnx").output, threads=1)
    return generate(engine, PROMPTS, STEPS, keep_logits=True)


def assert_same(ep, ref) -> None:
    assert ep.tokens == ref.tokens
    assert ep.prefill_logits.shape == ref.prefill_logits.shape == (*np.shape(PROMPTS), ep.prefill_logits.shape[-1])
    for a, b in zip([ep.prefill_logits, *ep.steps_logits], [ref.prefill_logits, *ref.steps_logits], strict=True):
        assert float(np.abs(a - b).max() / np.abs(b).max()) <= RTOL


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_two_ranks_match_single_rank(name, tmp_path):
    ckpt = save_hf_checkpoint(name, tmp_path / "ckpt")
    experts = HF_CONFIGS[name]["n_routed_experts"]
    placement = None
    if experts % 2:  # odd expert counts need a redundant slot per rank: give the first experts a second replica
        slots = experts + experts % 2
        row = list(range(experts)) + list(range(slots - experts))
        layers = sum(
            1
            for i in range(HF_CONFIGS[name]["num_hidden_layers"])
            if i >= HF_CONFIGS[name].get("first_k_dense_replace", 0)
        )
        placement = tmp_path / "placement.json"
        placement.write_text(json.dumps({"phy2log": [row] * layers, "ranks": 2}))
    compile_quiet(ckpt, tmp_path / "ep", ep_size=2, placement=placement)
    assert_same(run_expert_parallel(tmp_path / "ep", 2, PROMPTS, STEPS, keep_logits=True), single_rank(ckpt, tmp_path))


@pytest.mark.parametrize("name", ["v3_yarn_grouped", "v3_no_q_lora_all_moe_tied"])
def test_four_ranks_with_replicas_match_single_rank(name, tmp_path):
    ckpt = save_hf_checkpoint(name, tmp_path / "ckpt")
    experts = HF_CONFIGS[name]["n_routed_experts"]
    layers = sum(
        1 for i in range(HF_CONFIGS[name]["num_hidden_layers"]) if i >= HF_CONFIGS[name].get("first_k_dense_replace", 0)
    )
    row = list(range(experts)) + [0, 1, 2, 3][: 12 - experts] if experts < 12 else list(range(experts))
    row = (row + list(range(16)))[:12] if len(row) < 12 else row  # 12 slots: 3 per rank, hot experts replicated
    placement = tmp_path / "placement.json"
    placement.write_text(json.dumps({"phy2log": [row[::-1]] * layers, "ranks": 4}))
    compile_quiet(ckpt, tmp_path / "ep", ep_size=4, placement=placement)
    ep = read_manifest(tmp_path / "ep").expert_parallel
    assert len(ep.rank_files) == 4 and ep.placement.slots == 12
    assert_same(run_expert_parallel(tmp_path / "ep", 4, PROMPTS, STEPS, keep_logits=True), single_rank(ckpt, tmp_path))


def test_dead_rank_fails_every_rank_without_hanging(tmp_path, monkeypatch, capsys):
    ckpt = save_hf_checkpoint("v3_tied_single_group", tmp_path / "ckpt")
    compile_quiet(ckpt, tmp_path / "ep", ep_size=2)
    monkeypatch.setenv("DSC_EP_TEST_DIE_RANK", "1")
    code = main(["run", str(tmp_path / "ep"), "--prompt-ids", "1,2,3", "--max-new-tokens", "3", "--timeout", "10"])
    err = capsys.readouterr().err
    assert code == 2 and "expert-parallel run failed" in err and "rank 1: exited with code 3" in err
    assert "rank 0:" in err  # the survivor reports too, instead of waiting forever


def test_placement_must_fit_the_model(tmp_path):
    ckpt = save_hf_checkpoint("v3_yarn_grouped", tmp_path / "ckpt")
    (tmp_path / "p.json").write_text(json.dumps({"phy2log": [list(range(8))], "ranks": 2}))
    with pytest.raises(DscError, match="covers 1 MoE layers, the model has 2"):
        compile_quiet(ckpt, tmp_path / "ep", ep_size=2, placement=tmp_path / "p.json")
    (tmp_path / "p.json").write_text(json.dumps({"phy2log": [[0] * 8, [0] * 8], "ranks": 2}))
    with pytest.raises(DscError, match="every one of the 8 experts"):
        compile_quiet(ckpt, tmp_path / "ep", ep_size=2, placement=tmp_path / "p.json")
    assert not (tmp_path / "ep").exists()
    compile_quiet(ckpt, tmp_path / "ep", ep_size=2)
    with pytest.raises(EngineError, match="run it with --ep-size 2"):
        run_expert_parallel(tmp_path / "ep", 4, PROMPTS, 1)


def test_profile_place_compile_run_round_trip(tmp_path, capsys):
    """dsc profile -> dsc place -> dsc compile --ep-size --placement -> dsc run, and dsc inspect shows the balance."""
    ckpt = save_hf_checkpoint("v3_yarn_grouped", tmp_path / "ckpt")
    (tmp_path / "prompts.txt").write_text("1,5,9,17,33,65,127\n100,3,3,42,7,0,64\n")
    assert (
        main(["profile", str(ckpt), "--prompts", str(tmp_path / "prompts.txt"), "-o", str(tmp_path / "load.json")]) == 0
    )
    assert (
        main(
            [
                "place",
                "--load",
                str(tmp_path / "load.json"),
                "--ranks",
                "2",
                "--slots",
                "10",
                "--groups",
                "2",
                "-o",
                str(tmp_path / "placement.json"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "max/mean rank load" in out
    placement = json.loads((tmp_path / "placement.json").read_text())
    assert len(placement["phy2log"]) == 2 and all(len(row) == 10 for row in placement["phy2log"])
    assert all(b <= u + 1e-9 for b, u in zip(placement["balance"], placement["unbalanced"], strict=True))
    assert (
        main(
            [
                "compile",
                str(ckpt),
                "-o",
                str(tmp_path / "ep"),
                "--ep-size",
                "2",
                "--placement",
                str(tmp_path / "placement.json"),
                "-q",
            ]
        )
        == 0
    )
    assert read_manifest(tmp_path / "ep").expert_parallel.placement.phy2log == placement["phy2log"]
    assert main(["inspect", str(tmp_path / "ep")]) == 0
    assert "2 redundant slots, max/mean rank load" in capsys.readouterr().out
    assert_same(run_expert_parallel(tmp_path / "ep", 2, PROMPTS, STEPS, keep_logits=True), single_rank(ckpt, tmp_path))
