"""benchmarks/gpu_check.py --dry-run: everything the GPU check can do without a GPU runs, and what needs one is
skipped with the reason (the real run is for a machine with a GPU, README "GPU deployment")."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_on_tiny(gpu_check, tmp_path: Path):
    out = tmp_path / "gpu.json"
    assert gpu_check.main(["--dry-run", "--presets", "tiny", "--out", str(out), "--workdir", str(tmp_path)]) == 0
    result = json.loads(out.read_text())
    assert result["passed"] is True and result["dry_run"] is True
    assert result["tolerances"] == {"fp32": 1e-3, "bf16": 3e-2, "fp8": 1e-3}
    tiny = result["presets"]["tiny"]
    for kind, ran_as, rtol in (("fp32", "fp32", 1e-4), ("bf16", "fp16", 3e-3), ("fp8", "fp32", 1e-4)):
        part = tiny[f"tensorrt_onnx_{kind}_on_cpu"]  # fp8: FP8 weights, fp32 compute, against the FP8 ONNX engine
        assert part["ok"] is True and part["ran_as"] == ran_as, part
        assert max(part["prefill_rel_error"], part["decode_rel_error_max"]) <= rtol
        assert part["top1_agreement"] == 1.0
        assert (part["fp8_weights"] > 0) == (kind == "fp8")
        estimate = part["activation_bytes_estimate"]
        assert 0 < estimate["decode"] < estimate["prefill"]
    for key in ("tensorrt_fp32", "tensorrt_bf16", "tensorrt_fp8", "onnxruntime_gpu_fp32", "transformers_cuda_bf16"):
        assert tiny[key]["skipped"] == "dry run"
    # transformers itself, on the CPU, against the reference the plans are compared with: an independent check
    hf = tiny["transformers_cpu_fp32"]
    assert hf["prefill_rel_error_vs_reference"] <= 1e-4 and hf["decode_tok_s"] > 0
    assert tiny["side_by_side_decode_tok_s"]["reference_onnxruntime_cpu"] > 0


def test_budget_skips_and_bad_presets(gpu_check, tmp_path: Path, capsys):
    assert gpu_check.main(["--presets", "tiny,huge", "--out", str(tmp_path / "x.json")]) == 2
    assert "unknown preset(s) ['huge']" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
    out = tmp_path / "budget.json"
    args = ["--dry-run", "--presets", "tiny", "--budget-s", "0", "--out", str(out), "--workdir", str(tmp_path)]
    assert gpu_check.main(args) == 0
    tiny = json.loads(out.read_text())["presets"]["tiny"]
    assert tiny["tensorrt_onnx_fp32_on_cpu"]["skipped"].startswith("time budget")
    assert gpu_check._passed({"a": {"ok": True}, "b": {"skipped": "x"}})
    assert not gpu_check._passed({"a": {"b": {"ok": False}}}) and not gpu_check._passed({"c": {"error": "E: x"}})
