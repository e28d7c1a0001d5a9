"""Sharded and native-FP8 checkpoints compile and match their dequantized reference; compiles are reproducible."""

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from dsc.backends.onnx_io import check_model
from dsc.commands.compile import CompileOptions, compile_model
from dsc.engine_format import Manifest, read_manifest
from dsc.frontends.checkpoint import Checkpoint
from dsc.frontends.presets import make_model
from dsc.runtime.engine import OnnxEngine
from dsc.runtime.generate import generate
from hf_reference import load_hf_model
from safetensors.torch import save_file

PROMPT = [[3, 1, 4, 1, 5, 9, 2, 6]]
RTOL = 1e-4


def rel_error(got, ref) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def compile_quiet(src: Path, out: Path, **kw):
    return compile_model(src, out, CompileOptions(**kw))


def engine_logits(path: Path) -> np.ndarray:
    engine = OnnxEngine(path, threads=1)
    ids = np.asarray(PROMPT, dtype=np.int64)
    logits, _ = engine.step(ids, np.arange(ids.shape[1])[None].copy(), [c.empty(1) for c in engine.cache])
    return logits


def dequantized_copy(src: Path, dst: Path) -> Path:
    """An fp32 checkpoint holding q * scale for every FP8 weight (written independently of the compiler)."""
    ckpt = Checkpoint.open(src)
    tensors = {}
    for key in ckpt.keys():
        if key.endswith("_scale_inv"):
            continue
        t = ckpt.load(key)
        if t.dtype == torch.float8_e4m3fn:
            scale = ckpt.load(key + "_scale_inv")
            full = torch.kron(scale, torch.ones(128, 128))[: t.shape[0], : t.shape[1]]
            t = t.float() * full
        tensors[key] = t.float().contiguous()
    dst.mkdir()
    save_file(tensors, dst / "model.safetensors")
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("quantization_config")
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_model("tiny", tmp_path_factory.mktemp("plain") / "ckpt", seed=3, lm_head_scale=4.0)


def test_sharded_index_checkpoint_matches_single_file(tiny, tmp_path):
    sharded = make_model("tiny", tmp_path / "sharded", seed=3, lm_head_scale=4.0, shards=3)
    assert len(list(sharded.glob("model-*-of-00003.safetensors"))) == 3
    a = compile_quiet(sharded / "model.safetensors.index.json", tmp_path / "sharded.onnx")
    b = compile_quiet(tiny, tmp_path / "single.onnx")
    np.testing.assert_array_equal(engine_logits(a.output), engine_logits(b.output))


def test_native_fp8_checkpoint_matches_dequantized_transformers(tmp_path):
    fp8 = make_model("tiny", tmp_path / "fp8", seed=5, fp8=True, lm_head_scale=4.0)
    ckpt = Checkpoint.open(fp8)
    assert ckpt.info("model.layers.1.mlp.experts.0.gate_proj.weight").dtype == torch.float8_e4m3fn
    assert ckpt.info("model.layers.1.mlp.experts.0.gate_proj.weight_scale_inv").shape == (1, 1)
    assert ckpt.info("model.layers.1.mlp.gate.weight").dtype == torch.float32
    summary = compile_quiet(fp8, tmp_path / "fp8.onnx", quantize="fp8")  # FP8 as stored (default: int8)
    reference = load_hf_model(dequantized_copy(fp8, tmp_path / "deq"))
    with torch.no_grad():
        ref = reference(torch.tensor(PROMPT)).logits.numpy()
    assert rel_error(engine_logits(summary.output), ref) <= RTOL


def test_same_input_compiles_to_identical_bytes(tiny, tmp_path):
    digests = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        s = compile_quiet(tiny, tmp_path / name / "m.onnx")
        digests.append(
            [hashlib.sha256(p.read_bytes()).hexdigest() for p in [*s.files, tmp_path / name / "m.manifest.json"]]
        )
    assert digests[0] == digests[1]


def test_engines_pass_the_onnx_checker_with_shape_inference(tiny, tmp_path):
    for name, kw in (("latent", {}), ("naive", {"disable_passes": ("mla-absorb",)}), ("ext", {"external_data": True})):
        check_model(compile_quiet(tiny, tmp_path / f"{name}.onnx", **kw).output)
        onnx.shape_inference.infer_shapes_path(
            str(tmp_path / f"{name}.onnx"), str(tmp_path / f"{name}.inf.onnx"), check_type=True, strict_mode=True
        )
        inferred = onnx.load(str(tmp_path / f"{name}.inf.onnx"), load_external_data=False)
        manifest = read_manifest(tmp_path / f"{name}.onnx")

        def dims(v) -> list:
            return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

        # the outputs keep the shapes the manifest promises (strict inference would have failed on a conflict)
        assert {o.name: dims(o) for o in inferred.graph.output} == {o.name: list(o.shape) for o in manifest.outputs}
        assert dims(inferred.graph.output[0])[-1] == 256  # logits over the tiny vocabulary
        # inference typed every intermediate value and shaped most of them (values after onnxruntime's
        # com.microsoft MoE kernel keep a type but no shape)
        produced = [o for n in inferred.graph.node for o in n.output if o]
        typed = {v.name: v for v in inferred.graph.value_info}
        assert all(v.type.tensor_type.elem_type != onnx.TensorProto.UNDEFINED for v in typed.values())
        outputs = {o.name for o in inferred.graph.output}
        assert len(typed) >= 0.9 * len([o for o in produced if o not in outputs]), name
        shaped = [v for v in typed.values() if v.type.tensor_type.HasField("shape")]
        assert len(shaped) >= 0.7 * len(typed), name


def test_external_data_engine_matches_single_file(tiny, tmp_path):
    ext = compile_quiet(tiny, tmp_path / "ext.onnx", external_data=True)
    assert [p.name for p in ext.files] == ["ext.onnx", "ext.onnx.data"]
    single = compile_quiet(tiny, tmp_path / "single.onnx")
    assert ext.files[0].stat().st_size < 100_000  # the graph alone
    np.testing.assert_array_equal(engine_logits(ext.output), engine_logits(single.output))
    assert read_manifest(ext.output).data_files == ("ext.onnx.data",)


def test_manifest_describes_the_engine(tiny, tmp_path):
    s = compile_quiet(tiny, tmp_path / "m.onnx")
    assert json.loads((tmp_path / "m.manifest.json").read_text())["format"] == "dsc-engine"
    m = read_manifest(s.output)
    assert m.backend == "onnx" and m.format_version == 3 and m.files == ("m.onnx",)
    assert m.checksum == hashlib.sha256(s.output.read_bytes()).hexdigest()
    assert [i.name for i in m.inputs[:2]] == ["input_ids", "position_ids"]
    assert m.outputs[0].name == "logits"
    assert m.kv_cache.form == "latent"
    assert [(c.layer, c.role) for c in m.cache] == [(i, r) for i in range(3) for r in ("key", "value")]
    assert [p.name for p in m.passes] == ["mla-absorb", "expert-fusion", "linear-fusion", "cleanup"]
    assert m.config["hidden_size"] == 64 and m.vocab_size == 256
    assert Manifest.from_json(m.to_json(), s.output) == m  # one writer, one reader: a lossless round trip


def test_generation_is_batched_and_greedy(tiny, tmp_path):
    s = compile_quiet(tiny, tmp_path / "m.onnx")
    engine = OnnxEngine(s.output, threads=1)
    both = generate(engine, [[1, 2, 3], [7, 8, 9]], 6).tokens
    assert both[0] == generate(engine, [[1, 2, 3]], 6).tokens[0]
    assert both[1] == generate(engine, [[7, 8, 9]], 6).tokens[0]
