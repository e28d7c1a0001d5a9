"""The command line: bad input gets one clear line and exit code 2, and leaves no output behind."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dsc.cli import main
from dsc.frontends.presets import make_model
from safetensors.torch import load_file, save_file


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_model("tiny", tmp_path_factory.mktemp("tiny") / "ckpt", seed=1)


@pytest.fixture
def broken(tiny, tmp_path) -> Path:
    """A private copy of the tiny checkpoint that a test may damage."""
    return Path(shutil.copytree(tiny, tmp_path / "ckpt"))


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean_failure(code: int, err: str, out_dir: Path, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.startswith("dsc: error:")]
    assert code == 2
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not list(out_dir.glob("out*")), "no (partial) output may be left behind"
    assert not list(out_dir.glob(".out*")), "no temporary file may be left behind"


def test_missing_config_json(broken, tmp_path, capsys):
    (broken / "config.json").unlink()
    code, _, err = run_cli(capsys, "compile", str(broken), "-o", str(tmp_path / "out.onnx"), "-q")
    assert_clean_failure(code, err, tmp_path, "config.json", "not found")


def test_truncated_safetensors(broken, tmp_path, capsys):
    f = broken / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    code, _, err = run_cli(capsys, "compile", str(broken), "-o", str(tmp_path / "out.onnx"), "-q")
    assert_clean_failure(code, err, tmp_path, "model.safetensors", "truncated")


def test_corrupt_safetensors_header(broken, tmp_path, capsys):
    f = broken / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"\xff" * 32
    f.write_bytes(bytes(data))
    code, _, err = run_cli(capsys, "compile", str(broken), "-o", str(tmp_path / "out.onnx"), "-q")
    assert_clean_failure(code, err, tmp_path, "model.safetensors", "corrupt")


def test_missing_tensor(broken, tmp_path, capsys):
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.self_attn.kv_b_proj.weight"]
    save_file(tensors, broken / "model.safetensors")
    code, _, err = run_cli(capsys, "compile", str(broken), "-o", str(tmp_path / "out.onnx"), "-q")
    assert_clean_failure(code, err, tmp_path, "model.layers.1.self_attn.kv_b_proj.weight", "missing")


def test_wrong_tensor_shape(broken, tmp_path, capsys):
    tensors = load_file(broken / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(95, 64)
    save_file(tensors, broken / "model.safetensors")
    code, _, err = run_cli(capsys, "compile", str(broken), "-o", str(tmp_path / "out.onnx"), "-q")
    assert_clean_failure(code, err, tmp_path, "model.layers.0.mlp.up_proj.weight", "[95, 64]", "[96, 64]")


def test_unsupported_model_type(broken, tmp_path, capsys):
    cfg = json.loads((broken / "config.json").read_text())
    cfg["model_type"] = "llama"
    (broken / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(capsys, "compile", str(broken), "-o", str(tmp_path / "out.onnx"), "-q")
    assert_clean_failure(code, err, tmp_path, "config.json", "llama", "deepseek_v3")


def test_output_directory_missing_or_not_a_directory(tiny, tmp_path, capsys):
    code, _, err = run_cli(capsys, "compile", str(tiny), "-o", str(tmp_path / "nope" / "out.onnx"), "-q")
    assert_clean_failure(code, err, tmp_path, str(tmp_path / "nope"), "does not exist")
    (tmp_path / "file").write_text("")
    code, _, err = run_cli(capsys, "compile", str(tiny), "-o", str(tmp_path / "file" / "out.onnx"), "-q")
    assert_clean_failure(code, err, tmp_path, "file", "not a directory")


def test_output_directory_not_writable(tiny, tmp_path, capsys):
    # /proc takes no new files, not even from root (a chmod 555 directory would not stop root)
    code, _, err = run_cli(capsys, "compile", str(tiny), "-o", "/proc/out.onnx", "-q")
    assert_clean_failure(code, err, Path("/proc"), "/proc", "not writable")
    code, _, err = run_cli(capsys, "make-model", "tiny", "-o", "/proc/out")
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not Path("/proc/out").exists()


def test_failed_write_leaves_nothing(tiny, tmp_path, capsys, monkeypatch):
    """A failure while the weights stream out (here: a checkpoint read error) removes the partial engine."""
    from dsc.frontends import checkpoint

    real = checkpoint.Checkpoint.load_float
    calls = {"n": 0}

    def flaky(self, key, dtype=torch.float32):
        calls["n"] += 1
        if calls["n"] == 20:
            raise checkpoint.CheckpointError(f"{self.root}: simulated read failure of {key}")
        return real(self, key, dtype)

    monkeypatch.setattr(checkpoint.Checkpoint, "load_float", flaky)
    code, _, err = run_cli(capsys, "compile", str(tiny), "-o", str(tmp_path / "out.onnx"), "-q")
    assert_clean_failure(code, err, tmp_path, "simulated read failure")


def test_compile_run_inspect_verify(tiny, tmp_path, capsys):
    engine = tmp_path / "tiny.onnx"
    code, out, err = run_cli(capsys, "compile", str(tiny), "-o", str(engine))
    assert code == 0
    assert "[4/4] writing" in err and "peak memory" in out and "active per token" in out
    assert (tmp_path / "tiny.manifest.json").is_file()
    code, out, _ = run_cli(capsys, "run", str(engine), "--prompt-ids", "1,2,3", "--max-new-tokens", "5", "--json")
    result = json.loads(out)
    assert code == 0 and len(result["tokens"]) == 5 and result["tokens_per_s"] > 0 and result["prefill_s"] > 0
    code, out, _ = run_cli(capsys, "run", str(engine), "--prompt-ids", "1,2,3", "--max-new-tokens", "5")
    assert code == 0 and out.startswith("tokens: " + ",".join(map(str, result["tokens"])))
    code, out, _ = run_cli(capsys, "inspect", str(engine))
    assert code == 0 and "latent" in out and "mla-absorb" in out
    code, out, _ = run_cli(capsys, "verify", str(tiny), str(engine), "--steps", "4")
    assert code == 0 and "PASS" in out
    code, out, _ = run_cli(capsys, "verify", str(tiny), str(engine), "--steps", "2", "--tolerance", "0")
    assert code == 1 and "FAIL" in out


def test_run_rejects_out_of_vocab_ids_and_missing_engine(tiny, tmp_path, capsys):
    engine = tmp_path / "tiny.onnx"
    assert run_cli(capsys, "compile", str(tiny), "-o", str(engine), "-q")[0] == 0
    code, _, err = run_cli(capsys, "run", str(engine), "--prompt-ids", "1,999999")
    assert code == 2 and "outside the vocabulary" in err
    code, _, err = run_cli(capsys, "run", str(tmp_path / "missing.onnx"), "--prompt-ids", "1")
    assert code == 2 and "not found" in err
    code, _, err = run_cli(capsys, "run", str(engine), "--prompt", "hello")
    assert code == 2 and "tokenizer" in err


def test_tensorrt_output_without_tensorrt_is_a_clear_error(tiny, tmp_path, capsys):
    code, _, err = run_cli(capsys, "compile", str(tiny), "-o", str(tmp_path / "out.plan"), "-q")
    assert_clean_failure(code, err, tmp_path, "tensorrt", "-o model.onnx")


def test_console_script_reports_errors_without_traceback(tmp_path):
    exe = Path(sys.executable).with_name("dsc")
    proc = subprocess.run(
        [str(exe), "compile", str(tmp_path), "-o", str(tmp_path / "out.onnx")], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("dsc: error:") and "Traceback" not in proc.stderr
    assert "no model.safetensors" in proc.stderr


def test_prompt_text_through_the_checkpoints_tokenizer(tiny, tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["hello", "world", "deep", "seek", "mixture", "of", "experts"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)} | {"[UNK]": len(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    ckpt = Path(shutil.copytree(tiny, tmp_path / "ckpt"))
    tok.save(str(ckpt / "tokenizer.json"))
    engine = tmp_path / "t.onnx"
    assert run_cli(capsys, "compile", str(ckpt), "-o", str(engine), "-q")[0] == 0
    assert (tmp_path / "t.tokenizer.json").is_file()
    code, out, _ = run_cli(capsys, "run", str(engine), "--prompt", "hello deep seek", "--max-new-tokens", "4", "--json")
    by_text = json.loads(out)["tokens"]
    code2, out2, _ = run_cli(capsys, "run", str(engine), "--prompt-ids", "0,2,3", "--max-new-tokens", "4", "--json")
    assert code == code2 == 0 and by_text == json.loads(out2)["tokens"]
    code, out, _ = run_cli(capsys, "run", str(engine), "--prompt", "hello deep seek", "--max-new-tokens", "4")
    assert code == 0 and "text:" in out


def test_quantize_flags_and_report(tmp_path, capsys):
    fp8 = make_model("tiny", tmp_path / "fp8", seed=2, fp8=True)
    code, _, err = run_cli(capsys, "compile", str(fp8), "-o", str(tmp_path / "native.onnx"), "--report")
    assert code == 0
    # native FP8 runs as int8 on onnxruntime by default, and --report gives the error that conversion adds
    assert "int8 block" in err and "(from fp8)" in err and "native FP8 weights: running them as int8" in err
    code, _, _ = run_cli(capsys, "compile", str(fp8), "-o", str(tmp_path / "deq.onnx"), "-q", "--quantize", "none")
    assert code == 0
    native, deq = (tmp_path / "native.onnx").stat().st_size, (tmp_path / "deq.onnx").stat().st_size
    assert native < 0.6 * deq  # int8 by default; --quantize none stores float32
    plain = make_model("tiny", tmp_path / "plain", seed=2)
    (tmp_path / "prompts.txt").write_text("1,2,3,4,5\n6,7,8\n")
    code, _, err = run_cli(
        capsys,
        "compile",
        str(plain),
        "-o",
        str(tmp_path / "q.onnx"),
        "--quantize",
        "fp8",
        "--report",
        "--calibration-prompts",
        str(tmp_path / "prompts.txt"),
    )
    assert code == 0
    assert "block quantization of" in err and "layer 1" in err and "fp8 e4m3, 128x128 block scales" in err
    assert "calibration prompts: max relative logit error" in err and "top-1 agreement" in err
    (tmp_path / "bad.txt").write_text("one,two\n")
    code, _, err = run_cli(
        capsys,
        "compile",
        str(plain),
        "-o",
        str(tmp_path / "q2.onnx"),
        "-q",
        "--quantize",
        "fp8",
        "--calibration-prompts",
        str(tmp_path / "bad.txt"),
    )
    assert code == 2 and "bad.txt" in err
    assert not (tmp_path / "q2.onnx").exists()


def test_inspect_a_bare_config(tmp_path, capsys):
    cfg = json.loads((Path(__file__).parent / "frontends" / "deepseek_v3_config.json").read_text())
    (tmp_path / "v3.json").write_text(json.dumps(dict(cfg, num_hidden_layers=4)))
    code, out, _ = run_cli(capsys, "inspect", str(tmp_path / "v3.json"))
    assert code == 0
    # naive: values zero-padded to the keys' 192 per head (one cache shape, onnxruntime-genai): 85.3x, 71.1x unpadded
    assert "3 dense" in out and "softmax scale 0.1352338" in out and "(85.3x)" in out
    (tmp_path / "bad.json").write_text("{")
    code, _, err = run_cli(capsys, "inspect", str(tmp_path / "bad.json"))
    assert code == 2 and "bad.json" in err


# ---------------------------------------------------------------- inputs that used to get through


@pytest.mark.parametrize("bad", ["../elsewhere/w.safetensors", "ABSOLUTE", "sub/../../elsewhere/w.safetensors"])
def test_index_shard_names_must_stay_inside_the_checkpoint(tmp_path, capsys, bad):
    ckpt = make_model("tiny", tmp_path / "ckpt", seed=1, shards=2)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    index = ckpt / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    first = sorted(set(data["weight_map"].values()))[0]
    shutil.move(ckpt / first, outside / "w.safetensors")  # a real shard, so only the name can refuse it
    name = str(outside / "w.safetensors") if bad == "ABSOLUTE" else bad
    data["weight_map"] = {k: (name if v == first else v) for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))
    code, _, err = run_cli(capsys, "compile", str(ckpt), "-o", str(tmp_path / "out.onnx"), "-q")
    assert_clean_failure(code, err, tmp_path, "model.safetensors.index.json", name, "leaves the checkpoint directory")


def test_hf_cache_snapshot_with_symlinked_shards_compiles(tmp_path, capsys):
    """A Hugging Face cache: snapshots/<rev>/ holds symlinks into ../../blobs/; the names in the index are plain."""
    src = make_model("tiny", tmp_path / "src", seed=1, shards=2)
    blobs, snap = tmp_path / "hub" / "blobs", tmp_path / "hub" / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(src.iterdir())):
        shutil.copy(f, blobs / f"blob{i}")
        (snap / f.name).symlink_to(Path("../../blobs") / f"blob{i}")
    code, out, err = run_cli(capsys, "compile", str(snap), "-o", str(tmp_path / "out.onnx"), "-q")
    assert code == 0, err
    assert (tmp_path / "out.onnx").is_file() and (tmp_path / "out.manifest.json").is_file()


def _poison(path: Path, key: str, values) -> int:
    """Write NaN/Inf (or, for FP8, NaN bit patterns) into ``key``'s first elements, in place; the count written."""
    tensors = load_file(path)
    t = tensors[key].clone()
    flat = t.view(-1)
    if t.dtype == torch.float8_e4m3fn:
        flat.view(torch.uint8)[: len(values)] = torch.tensor([0x7F, 0xFF] * len(values), dtype=torch.uint8)[
            : len(values)
        ]  # e4m3fn NaN, both signs (it has no Inf)
    else:
        flat[: len(values)] = torch.tensor(values, dtype=t.dtype)
    tensors[key] = t
    save_file(tensors, path)
    return len(values)


@pytest.mark.parametrize(
    ("flags", "fp8"),
    [
        ((), False),
        (("--quantize", "int8"), False),
        (("--quantize", "fp8"), False),
        ((), True),
        (("--quantize", "none"), True),
    ],
)
def test_non_finite_weights_are_refused_with_name_and_count(tmp_path, capsys, flags, fp8):
    ckpt = make_model("tiny", tmp_path / "ckpt", seed=1, fp8=fp8)
    key = "model.layers.1.mlp.experts.3.down_proj.weight"  # a routed expert: fused, quantized, packed (FP8 if fp8)
    n = _poison(ckpt / "model.safetensors", key, [float("nan"), float("inf"), float("-inf")])
    code, _, err = run_cli(capsys, "compile", str(ckpt), "-o", str(tmp_path / "out.onnx"), "-q", *flags)
    count = "1 non-finite value " if n == 1 else f"{n} non-finite values"
    assert_clean_failure(code, err, tmp_path, "model.safetensors", key, count)


def test_non_finite_fp8_scale_is_refused(tmp_path, capsys):
    ckpt = make_model("tiny", tmp_path / "ckpt", seed=1, fp8=True)
    key = "model.layers.0.self_attn.kv_b_proj.weight_scale_inv"
    _poison(ckpt / "model.safetensors", key, [float("inf")])
    code, _, err = run_cli(capsys, "compile", str(ckpt), "-o", str(tmp_path / "out.onnx"), "-q")
    assert_clean_failure(code, err, tmp_path, key, "1 non-finite value")


def test_bad_ids_are_refused_before_any_work(tiny, tmp_path, capsys, monkeypatch):
    """Calibration prompts, profile prompts and --prompt-ids: checked against the vocabulary before tracing."""
    from dsc.frontends import loader

    def no_tracing(*_a, **_k):
        raise AssertionError("traced before the prompts were checked")

    monkeypatch.setattr(loader, "trace_checkpoint", no_tracing)
    for text, needle in [
        ("1,2,3\n5,99999\n", "99999"),
        ("1,2\n-3\n", "'-3'"),
        ("1,x\n", "'1,x'"),
        ("\n", "no prompts"),
    ]:
        prompts = tmp_path / "prompts.txt"
        prompts.write_text(text)
        code, _, err = run_cli(
            capsys, "compile", str(tiny), "-o", str(tmp_path / "out.onnx"), "-q", "--calibration-prompts", str(prompts)
        )
        assert_clean_failure(code, err, tmp_path, "prompts.txt", needle)
        code, _, err = run_cli(
            capsys, "profile", str(tiny), "--prompts", str(prompts), "-o", str(tmp_path / "out.json")
        )
        assert_clean_failure(code, err, tmp_path, "prompts.txt", needle)


def test_verify_checks_prompt_ids_before_loading(tiny, tmp_path, capsys):
    engine = tmp_path / "e.onnx"
    assert run_cli(capsys, "compile", str(tiny), "-o", str(engine), "-q")[0] == 0
    code, _, err = run_cli(capsys, "verify", str(tiny), str(engine), "--prompt-ids", "1,256")
    assert code == 2 and err.count("\n") == 1 and "token id 256 is outside the vocabulary (size 256)" in err
    code, _, err = run_cli(capsys, "verify", str(tiny), str(engine), "--prompt-ids", "1,-2")
    assert code == 2 and "Traceback" not in err


def test_profile_library_call_checks_ids(tiny):
    from dsc.commands.profile import profile_expert_load
    from dsc.errors import DscError

    with pytest.raises(DscError, match="token id -1 is outside the vocabulary"):
        profile_expert_load(tiny, [[1, 2], [-1]])


@pytest.mark.parametrize(
    ("change", "needles"),
    [
        ({"num_attention_heads": 0}, ["num_attention_heads", ">= 1"]),
        ({"hidden_size": -4}, ["hidden_size"]),
        ({"vocab_size": "256"}, ["vocab_size", "integer"]),
        ({"n_group": 3}, ["n_group"]),
        ({"num_experts_per_tok": 9}, ["num_experts_per_tok", "n_routed_experts"]),
        ({"rope_theta": float("inf")}, ["rope_theta", "finite"]),
        ({"routed_scaling_factor": float("nan")}, ["routed_scaling_factor"]),
        ({"kv_lora_rank": None}, ["kv_lora_rank", "null"]),
        ({"kv_lora_rank": ...}, ["kv_a_proj_with_mqa", "omits kv_lora_rank (default 512)"]),
    ],
)
def test_config_inconsistencies_name_the_key(broken, tmp_path, capsys, change, needles):
    config = json.loads((broken / "config.json").read_text())
    for key, value in change.items():
        if value is ...:
            del config[key]
        else:
            config[key] = value
    (broken / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(capsys, "compile", str(broken), "-o", str(tmp_path / "out.onnx"), "-q")
    assert_clean_failure(code, err, tmp_path, "config.json", *needles)


def test_engine_with_a_changed_byte_or_bad_manifest_is_refused(tiny, tmp_path, capsys):
    engine = tmp_path / "e.onnx"
    assert run_cli(capsys, "compile", str(tiny), "-o", str(engine), "-q")[0] == 0
    manifest = tmp_path / "e.manifest.json"
    good = manifest.read_text()
    for key, value in [("checksum", None), ("files", ["../e.onnx"]), ("config", {"model_type": "llama"})]:
        manifest.write_text(json.dumps(dict(json.loads(good), **{key: value})))
        code, _, err = run_cli(capsys, "run", str(engine), "--prompt-ids", "1,2")
        assert code == 2 and len(err.splitlines()) == 1 and "e.manifest.json" in err, err
    manifest.write_text(good)
    data = bytearray(engine.read_bytes())
    data[len(data) // 2] ^= 0xFF
    engine.write_bytes(bytes(data))
    code, _, err = run_cli(capsys, "run", str(engine), "--prompt-ids", "1,2")
    assert code == 2 and "checksum mismatch" in err and len(err.splitlines()) == 1, err


def _fp8_roundtrip_error(w: torch.Tensor, block: int = 128) -> float:
    """Relative Frobenius error of DeepSeek FP8 (e4m3, amax/448 scale per block x block tile), written out here
    from DESIGN.md §5 rather than taken from dsc."""
    w = w.double()
    restored = torch.empty_like(w)
    for r in range(0, w.shape[0], block):
        for c in range(0, w.shape[1], block):
            tile = w[r : r + block, c : c + block]
            scale = float(tile.abs().max()) / 448.0 or 1.0
            restored[r : r + block, c : c + block] = (tile / scale).float().to(torch.float8_e4m3fn).double() * scale
    return float((restored - w).norm() / w.norm())


def test_report_numbers_match_an_independent_computation(tmp_path, capsys):
    """--report's per-layer FP8 errors against the checkpoint's weights quantized here, and its calibration line
    against transformers' logits and the engine's: numbers compared, not substrings."""
    import re

    import numpy as np
    from dsc.runtime.engine import OnnxEngine
    from hf_reference import load_hf_model

    ckpt = make_model("tiny", tmp_path / "ckpt", seed=2)
    prompts = [[1, 2, 3, 4, 5], [6, 7, 8]]
    (tmp_path / "prompts.txt").write_text("\n".join(",".join(map(str, p)) for p in prompts) + "\n")
    engine = tmp_path / "q.onnx"
    argv = ["compile", str(ckpt), "-o", str(engine), "--passes", "fp8-quantize", "--report"]
    code, _, err = run_cli(capsys, *argv, "--calibration-prompts", str(tmp_path / "prompts.txt"))
    assert code == 0, err

    reported = {}
    for m in re.finditer(r"^\s+layer (\d+) fp8 e4m3, 128x128 block scales\s+(\d+)\s+([\d.]+)%\s+([\d.]+)%$", err, re.M):
        reported[int(m[1])] = (int(m[2]), float(m[3]) / 100, float(m[4]) / 100)
    weights = load_file(ckpt / "model.safetensors")
    mine: dict[int, list[float]] = {}
    for key, w in weights.items():
        m = re.match(r"model\.layers\.(\d+)\..*\.weight$", key)
        if m and w.dim() == 2 and ".mlp.gate." not in key:  # the router stays float32
            mine.setdefault(int(m[1]), []).append(_fp8_roundtrip_error(w))
    assert sorted(reported) == sorted(mine) == [0, 1, 2], err
    for layer, errs in mine.items():
        count, mean, worst = reported[layer]
        assert count == len(errs)
        assert mean == pytest.approx(np.mean(errs), abs=1e-6)  # printed with 4 decimals of a percent
        assert worst == pytest.approx(max(errs), abs=1e-6)

    m = re.search(r"(\d+) calibration prompts: max relative logit error ([\d.e+-]+), top-1 agreement ([\d.]+)%", err)
    assert m, err
    model, eng = load_hf_model(ckpt), OnnxEngine(engine)
    rel, agree = [], []
    for ids in prompts:
        with torch.no_grad():
            want = model(torch.tensor([ids])).logits.numpy()
        pos = np.arange(len(ids))[None]
        got, _ = eng.step(np.asarray([ids]), pos, [c.empty(1) for c in eng.cache])
        rel.append(np.abs(got - want).max() / np.abs(want).max())
        agree.extend((got.argmax(-1) == want.argmax(-1)).reshape(-1))
    assert int(m[1]) == len(prompts)
    assert float(m[2]) == pytest.approx(max(rel), rel=0.01)  # printed with 3 significant digits
    assert float(m[3]) / 100 == pytest.approx(np.mean(agree), abs=5e-5)


def test_dump_ir_dir_that_cannot_be_created(tiny, tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    for bad in ("/proc/dsc-ir", str(tmp_path / "afile")):
        code, _, err = run_cli(
            capsys, "compile", str(tiny), "-o", str(tmp_path / "out.onnx"), "-q", "--dump-ir-dir", bad
        )
        assert_clean_failure(code, err, tmp_path, bad, "--dump-ir-dir")


def test_control_characters_in_names_keep_the_error_on_one_line(tmp_path, capsys):
    """Found by tests/test_fuzz_inputs.py: a shard named '\\x1e' split the error in two (str.splitlines)."""
    ckpt = make_model("tiny", tmp_path / "ckpt", seed=1, shards=2)
    index = ckpt / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    key = sorted(data["weight_map"])[0]
    for name in ("\x1e", "a\nb"):
        data["weight_map"][key] = name
        index.write_text(json.dumps(data))
        code, _, err = run_cli(capsys, "compile", str(ckpt), "-o", str(tmp_path / "out.onnx"), "-q")
        assert code == 2 and len(err.splitlines()) == 1 and repr(name)[1:-1] in err, err


def test_run_device_cuda_is_refused_with_the_reason_here(tmp_path, capsys):
    ckpt = make_model("tiny", tmp_path / "ckpt", seed=1)
    code, _, _ = run_cli(capsys, "compile", str(ckpt), "-o", str(tmp_path / "e.onnx"), "-q")
    assert code == 0
    code, out, err = run_cli(capsys, "run", str(tmp_path / "e.onnx"), "--prompt-ids", "1,2", "--device", "cuda")
    assert code == 2 and not out
    assert len(err.strip().splitlines()) == 1 and "no CUDA execution provider" in err and "onnxruntime-gpu" in err


def test_cuda_providers_need_an_onnxruntime_gpu_with_the_moe_fix(monkeypatch):
    import onnxruntime as ort
    from dsc.errors import EngineError
    from dsc.runtime.engine import providers_for

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "__version__", "1.27.1")
    with pytest.raises(EngineError, match=r"ignores the SwiGLU attributes .* \(fixed in 1\.28\)"):
        providers_for("cuda")
    monkeypatch.setattr(ort, "__version__", "1.31.0")
    assert providers_for("cuda") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert providers_for("cpu") == ["CPUExecutionProvider"]
