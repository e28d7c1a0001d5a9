"""Expert-parallel engines on 2 and 4 CPU ranks (gloo) against the single-rank engine: logits within 1e-5
relative on every prefill position and every decode step; a wrong placement fails clearly. Faults are injected
from outside, as signals to the rank processes: a rank stopped (SIGSTOP) or killed (SIGKILL) mid-decode or at
start-up makes every rank fail with one line each within --timeout, and leaves no rank process behind."""

import functools
import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from dsc.cli import main
from dsc.commands.compile import CompileOptions, compile_model
from dsc.engine_format import read_manifest
from dsc.errors import DscError, EngineError
from dsc.runtime import ep as ep_runtime
from dsc.runtime.engine import OnnxEngine
from dsc.runtime.ep import RankStep, run_expert_parallel
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


def rank_pids() -> list[int]:
    """The expert-parallel ranks this test process has started (its spawned multiprocessing children)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == os.getpid() and b"spawn_main" in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except (OSError, ValueError, IndexError):
            continue
    return pids


def assert_gone(pids) -> None:
    """No rank outlives the run: each process is gone, not even a zombie waiting to be reaped."""
    assert pids and not [pid for pid in pids if Path(f"/proc/{pid}").exists()]


class SignalAt:
    """An on_progress hook: send ``sig`` to rank ``rank`` once it has finished ``steps`` engine steps."""

    def __init__(self, sig: signal.Signals, rank: int = 1, steps: int = 3) -> None:
        self.sig, self.rank, self.steps = sig, rank, steps
        self.pids: set[int] = set()
        self.sent_at: float | None = None
        self.sent_after: int | None = None

    def __call__(self, step: RankStep) -> None:
        self.pids.add(step.pid)
        if step.rank == self.rank and step.steps >= self.steps and self.sent_at is None:
            os.kill(step.pid, self.sig)
            self.sent_at, self.sent_after = time.monotonic(), step.steps


LONG = 300  # decode steps: the fault lands mid-decode, long before the last token


@pytest.fixture(scope="module")
def ep_engine(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ep2")
    ckpt = save_hf_checkpoint("v3_tied_single_group", tmp / "ckpt")
    compile_quiet(ckpt, tmp / "ep", ep_size=2)
    return ckpt, tmp / "ep"


def test_hung_rank_fails_every_rank_within_timeout(ep_engine, monkeypatch, capsys):
    """dsc run with rank 1 stopped (SIGSTOP) mid-decode: rank 0's collective times out, rank 1 is killed, one line."""
    timeout = 3.0
    fault = SignalAt(signal.SIGSTOP)
    monkeypatch.setattr(ep_runtime, "run_expert_parallel", functools.partial(run_expert_parallel, on_progress=fault))
    argv = ["run", str(ep_engine[1]), "--prompt-ids", "1,2,3", "--max-new-tokens", str(LONG), "--timeout", "3"]
    code = main(argv)
    took = time.monotonic() - fault.sent_at
    err = capsys.readouterr().err
    assert code == 2 and fault.sent_after < LONG
    assert err.count("\n") == 1 and "Traceback" not in err and "failed on 2 of 2 ranks" in err
    assert "rank 0: a collective timed out after 3 s" in err
    assert "rank 1: stopped by a signal, no progress for" in err and "killed" in err
    assert timeout <= took <= timeout + 3.0, took  # the stopped rank is killed as soon as rank 0 times out
    assert_gone(fault.pids)


@pytest.mark.parametrize("when", ["mid-decode", "start-up"])
def test_killed_rank_fails_every_rank_without_hanging(ep_engine, when):
    """Rank 1 killed (SIGKILL) mid-decode or rank processes killed as they start: every rank reports, at once."""
    timeout = 5.0
    fault = SignalAt(signal.SIGKILL)
    killer = None
    if when == "start-up":  # from outside, before any rank has made a step: kill the first rank process that appears

        def kill_first() -> None:
            while not (pids := rank_pids()):
                time.sleep(0.01)
            fault.pids.update(pids)
            os.kill(pids[0], signal.SIGKILL)
            fault.sent_at = time.monotonic()

        killer = threading.Thread(target=kill_first, daemon=True)
        killer.start()
    start = time.monotonic()
    with pytest.raises(EngineError, match="expert-parallel run failed on 2 of 2 ranks") as info:
        run_expert_parallel(ep_engine[1], 2, PROMPTS, LONG, timeout_s=timeout, on_progress=fault)
    took = time.monotonic() - (fault.sent_at or start)
    message = str(info.value)
    assert "\n" not in message and "killed by SIGKILL" in message and "rank 0: " in message and "rank 1: " in message
    if when == "mid-decode":
        assert fault.sent_after < LONG and "rank 1: killed by SIGKILL" in message
        assert "rank 0: lost the connection to a peer rank" in message or "rank 0: a collective timed out" in message
        assert took < timeout, took  # a dead peer closes its sockets: no need to wait out the timeout
    else:
        killer.join()
    assert took <= timeout + ep_runtime._GRACE_S + 2.0, took
    assert_gone(fault.pids)


def test_large_result_is_read_while_the_ranks_run(ep_engine, tmp_path):
    """A result far bigger than a pipe buffer (every prefill position's logits, many steps) comes back: the parent
    reads rank 0's result before joining it, so rank 0's queue feeder never blocks its exit."""
    ckpt, ep_dir = ep_engine
    prompts = [list(range(1, 121)), list(range(121, 1, -1))]
    start = time.monotonic()
    ep = run_expert_parallel(ep_dir, 2, prompts, 64, keep_logits=True, timeout_s=20)
    assert time.monotonic() - start < 20
    assert ep.prefill_logits.nbytes + sum(s.nbytes for s in ep.steps_logits) > 1 << 17
    ref = generate(
        OnnxEngine(compile_quiet(ckpt, tmp_path / "single.onnx").output, threads=1), prompts, 64, keep_logits=True
    )
    assert ep.tokens == ref.tokens
    assert float(np.abs(ep.prefill_logits - ref.prefill_logits).max() / np.abs(ref.prefill_logits).max()) <= RTOL


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
