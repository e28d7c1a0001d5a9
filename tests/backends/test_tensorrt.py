"""The TensorRT backend: the ONNX flavour it parses, profiles, the build driver, and the runtime engine.

Always run (no TensorRT, no GPU needed): the TensorRT-flavour ONNX of the tiny preset (fp32 and FP8) and of
transformers-saved checkpoints stays inside the kept support list, passes the ONNX checker (full) and strict
shape inference, and run by onnxruntime matches transformers within 1e-4 relative on prefill and decode;
profile flags; the missing-TensorRT error; and build_engine + TensorRTEngine + generate end to end against a
stand-in ``tensorrt`` module that executes the plan with onnxruntime on CPU (it checks the API calls, the
manifest, the timing cache and the buffer plumbing, not TensorRT's numerics).

Only where ``tensorrt`` imports and CUDA is available: real plans for the tiny preset in fp32 (1e-3) and bf16
(2e-2 relative) against transformers through TensorRTEngine and runtime.generate.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.machinery
import json
import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import dsc.backends.tensorrt as tensorrt_backend
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from dsc.backends.onnx import lower_to_onnx
from dsc.backends.onnx_io import ONNX_DTYPES, Initializer, save_model
from dsc.backends.tensorrt import Profiles, build_engine, fp32_prefixes, profiles_from_flags, tensorrt_onnx
from dsc.backends.tensorrt_ops import OP_TYPES, TENSORRT_VERSION, check_model_supported
from dsc.backends.tensorrt_support import HINT, require_tensorrt
from dsc.backends.tensorrt_types import retype
from dsc.engine_format import read_manifest
from dsc.errors import CompileError, EngineError
from dsc.frontends.loader import load_graph
from dsc.frontends.presets import make_model
from dsc.ir.graph import Op
from dsc.passes.manager import PassManager
from dsc.passes.pipeline import build_pipeline
from dsc.runtime.generate import generate
from dsc.runtime.tensorrt_engine import TensorRTEngine
from hf_reference import hf_reference_logits, rel_error, save_hf_checkpoint
from hf_reference import teacher_forced as forced
from onnx import TensorProto, helper

PROMPT = [[1, 5, 9, 17, 33, 65, 127], [100, 3, 3, 42, 7, 0, 64]]
DECODE_STEPS = 4


def teacher_forced(step, empty: list, generated: list[list[int]], steps: int = DECODE_STEPS) -> list[np.ndarray]:
    return forced(step, empty, PROMPT, generated, steps)


RTOL = 1e-4
FP16_RTOL = 3e-3  # fp16 weights and activations (measured 5.7e-4 on the tiny preset)
# The tiny preset (v3: sigmoid noaux_tc over 2 groups) and two transformers-saved v2 configs: together every
# routing branch the lowering has (grouped noaux_tc, group_limited_greedy, plain greedy softmax).
CASES = ("tiny", "v2_group_limited_yarn", "v2_greedy_no_q_lora")


@dataclass
class Case:
    name: str
    ckpt: Path
    graph: object
    prefill: np.ndarray
    steps: list[np.ndarray]
    generated: list[list[int]]


def compiled_graph(ckpt: Path):
    _, graph = load_graph(ckpt)
    return PassManager(build_pipeline(), emit=lambda _: None).run(graph)


@pytest.fixture(scope="module", params=CASES)
def case(request, tmp_path_factory) -> Case:
    root = tmp_path_factory.mktemp(request.param)
    if request.param == "tiny":
        ckpt = make_model("tiny", root / "ckpt", seed=3, lm_head_scale=4.0)
    else:
        ckpt = save_hf_checkpoint(request.param, root / "ckpt")
    prefill, steps, generated = hf_reference_logits(ckpt, PROMPT, DECODE_STEPS)
    return Case(request.param, ckpt, compiled_graph(ckpt), prefill.numpy(), [s.numpy() for s in steps], generated)


def assert_matches(case: Case, logits: list[np.ndarray], rtol: float) -> None:
    assert rel_error(logits[0], case.prefill) <= rtol, f"{case.name}: prefill"
    for i, (got, ref) in enumerate(zip(logits[1:], case.steps, strict=True)):
        assert got.shape == ref.shape
        assert rel_error(got, ref) <= rtol, f"{case.name}: decode step {i}"


def onnxruntime_step(path: Path):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    caches = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    outputs = ["logits"] + [c.name.replace("past_key_values.", "present.") for c in caches]

    def step(ids, pos, past):
        mask = np.ones((ids.shape[0], np.asarray(past[0]).shape[2] + ids.shape[1]), np.int64)
        feeds = {"input_ids": ids, "position_ids": pos, "attention_mask": mask}
        feeds.update({c.name: p for c, p in zip(caches, past, strict=True)})
        logits, *present = session.run(outputs, feeds)
        return logits, present

    empty = [
        np.zeros([len(PROMPT) if d == "batch" else 0 if d == "past" else d for d in c.shape], np.float32)
        for c in caches
    ]
    return step, empty


def write_tensorrt_onnx(graph, path: Path) -> onnx.ModelProto:
    model, initializers = tensorrt_onnx(graph)
    save_model(model, initializers, path)
    return onnx.load(str(path))


# -- the ONNX flavour --------------------------------------------------------------------------------
def assert_parseable(model: onnx.ModelProto) -> None:
    assert check_model_supported(model) == []
    assert {n.domain for n in model.graph.node} <= {""}
    assert {n.op_type for n in model.graph.node} <= set(OP_TYPES)
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, strict_mode=True)


def test_tensorrt_onnx_is_parseable_and_matches_transformers(case: Case, tmp_path: Path):
    model = write_tensorrt_onnx(case.graph, tmp_path / "trt.onnx")
    assert_parseable(model)
    assert [o.version for o in model.opset_import] == [20]  # nothing blocked: the opset TensorRT 10.0 parses
    step, empty = onnxruntime_step(tmp_path / "trt.onnx")
    assert_matches(case, teacher_forced(step, empty, case.generated), RTOL)


@pytest.fixture(scope="module")
def fp8_graph(tmp_path_factory):
    return compiled_graph(make_model("tiny", tmp_path_factory.mktemp("fp8") / "ckpt", seed=3, fp8=True))


@pytest.mark.parametrize(
    "version,precision,rtol", [((10, 13), "fp32", RTOL), ((10, 13), "fp16", FP16_RTOL), ((10, 12), "fp32", RTOL)]
)
def test_fp8_weights_the_way_each_tensorrt_version_takes_them(fp8_graph, version, precision, rtol, tmp_path: Path):
    """10.13+: the linears' FP8 stays FP8 behind DequantizeLinear with 2-D scales and whole blocks (the tiny preset's
    dims are all partial blocks: padded); expert stacks are dequantized at compile time (no DequantizeLinear feeds
    a Gather). Before 10.13 every FP8 weight is dequantized. Same numbers as the default ONNX engine."""
    model, inits = tensorrt_onnx(fp8_graph, tensorrt_version=version, precision=precision)
    save_model(model, inits, tmp_path / "trt.onnx")
    model = onnx.load(str(tmp_path / "trt.onnx"))
    assert check_model_supported(model) == []  # the blocked-DQ rules included
    fp8 = [t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT8E4M3FN]
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    if version < (10, 13):
        assert fp8 == [] and dq == [] and [o.version for o in model.opset_import] == [20]
    else:
        linears = [n for n in fp8_graph.nodes if n.op == Op.LINEAR and len(n.inputs) == 3]
        assert len(fp8) == len(dq) == len(linears) > 0 and [o.version for o in model.opset_import] == [21]
        shapes = {t.name: list(t.dims) for t in model.graph.initializer}
        for n in dq:
            assert len(shapes[n.input[1]]) == 2 and shapes[n.input[0]][0] % 128 == 0
        readers = {i: n.op_type for n in model.graph.node for i in n.input}
        assert all(readers[n.output[0]] == "Slice" for n in dq)  # the padding sliced off again
    gathers = [n for n in model.graph.node if n.op_type == "Gather" and "experts" in n.input[0]]
    assert gathers and all(n.input[0] in {t.name for t in model.graph.initializer} for n in gathers)
    reference, ref_inits = lower_to_onnx(fp8_graph)
    save_model(reference, ref_inits, tmp_path / "ref.onnx")
    got, empty = onnxruntime_step(tmp_path / "trt.onnx")
    ref, _ = onnxruntime_step(tmp_path / "ref.onnx")
    tokens = [[5] * (DECODE_STEPS + 1)] * len(PROMPT)
    for a, b in zip(teacher_forced(got, empty, tokens), teacher_forced(ref, empty, tokens), strict=True):
        assert rel_error(a, b) <= rtol


# -- strong typing: --precision is the graph's dtypes ---------------------------------------------------
def assert_strongly_typed(model: onnx.ModelProto, graph, low: int) -> None:
    """Every float value computed outside the routers, norms and rope is ``low``; inside them float32; the
    network's inputs and outputs stay float32; the router TopKs read float32; it is still parseable."""
    pinned = fp32_prefixes(graph)
    for op in (Op.MOE_ROUTE, Op.RMS_NORM, Op.ROPE):
        assert {f"{n.name}/" for n in graph.nodes if n.op == op} <= set(pinned)
    assert any(n.op == Op.MOE_ROUTE for n in graph.nodes)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type for v in (*inferred.graph.value_info, *inferred.graph.output)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    floats = {TensorProto.FLOAT, low}
    counts = {TensorProto.FLOAT: 0, low: 0}
    for node in model.graph.node:
        want = TensorProto.FLOAT if node.name.startswith(pinned) else low
        if node.op_type == "Cast":
            want = node.attribute[0].i
        for o in node.output:
            if types.get(o) in floats:
                assert types[o] == want, f"{node.name}: {o} is {types[o]}, expected {want}"
                counts[want] += 1
        if node.op_type == "TopK" and node.name.startswith(pinned):
            assert types[node.input[0]] == TensorProto.FLOAT
    assert counts[low] > counts[TensorProto.FLOAT] > 0
    assert [v.type.tensor_type.elem_type for v in model.graph.output] == [TensorProto.FLOAT] * len(model.graph.output)
    readers: dict[str, set[bool]] = {}
    for node in model.graph.node:
        for i in node.input:
            readers.setdefault(i, set()).add(node.name.startswith(pinned))
    big = [t for t in model.graph.initializer if t.data_type in floats and np.prod(t.dims) >= 256]
    for t in big:  # weights in the dtype of the nodes that read them (the routers' gates stay float32)
        assert t.data_type == (TensorProto.FLOAT if readers[t.name] == {True} else low), t.name
    assert sum(t.data_type == low for t in big) > sum(t.data_type == TensorProto.FLOAT for t in big) > 0
    assert check_model_supported(model) == []
    onnx.checker.check_model(model, full_check=True)


@pytest.mark.parametrize("precision,low", [("bf16", TensorProto.BFLOAT16), ("fp16", TensorProto.FLOAT16)])
def test_reduced_precision_is_written_into_the_onnx(case: Case, precision: str, low: int, tmp_path: Path):
    model, inits = tensorrt_onnx(case.graph, precision=precision)
    save_model(model, inits, tmp_path / "m.onnx")
    assert_strongly_typed(onnx.load(str(tmp_path / "m.onnx")), case.graph, low)
    if precision == "fp16":  # onnxruntime runs fp16 on the CPU (not bf16): the numbers, against transformers
        step, empty = onnxruntime_step(tmp_path / "m.onnx")
        assert_matches(case, teacher_forced(step, empty, case.generated), FP16_RTOL)


def test_retype_pins_by_name_and_keeps_small_constants_per_dtype():
    """A constant read by a pinned node and an unpinned one is stored in both dtypes (1e-20 is 0 in fp16)."""
    x = vi("x", TensorProto.FLOAT, [2])
    eps = Initializer("eps", torch.float32, (1,), lambda: torch.tensor([1e-20]))
    nodes = [
        helper.make_node("Add", ["x", "eps"], ["a"], name="router/Add"),
        helper.make_node("Add", ["a", "eps"], ["b"], name="mlp/Add"),
        helper.make_node("ConstantOfShape", [helper_shape := "shape"], ["z"], name="mlp/Zeros", value=_ONE),
        helper.make_node("Mul", ["b", "z"], ["y"], name="mlp/Mul"),
    ]
    shape = Initializer(helper_shape, torch.int64, (1,), lambda: torch.tensor([2]))
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x], [vi("y", TensorProto.FLOAT, [2])]),
        opset_imports=[helper.make_opsetid("", 20)],
    )
    out, inits, stats = retype(model, [eps, shape], "fp16", ("router/",))
    assert {i.name: i.dtype for i in inits} == {"eps": torch.float32, "eps.fp16": torch.float16, "shape": torch.int64}
    assert stats == {"casts": 2, "pinned_nodes": 1, "weights_converted": 1}
    by_name = {n.name: n for n in out.graph.node}
    assert list(by_name["router/Add"].input) == ["x", "eps"]
    assert list(by_name["mlp/Add"].input) == ["to_fp16/a", "eps.fp16"]
    assert by_name["mlp/Zeros"].attribute[0].t.data_type == TensorProto.FLOAT16
    assert by_name["to_fp32/y"].output == ["y"] and by_name["mlp/Mul"].output == ["y.fp16"]
    session = ort.InferenceSession(
        _with_initializers(out, inits).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    (y,) = session.run(None, {"x": np.array([1.0, -2.0], np.float32)})
    assert y.dtype == np.float32 and np.array_equal(y, np.array([1.0, -2.0], np.float32))
    with pytest.raises(CompileError, match="--precision must be one of fp32, fp16, bf16, not 'fp8'"):
        tensorrt_onnx(None, precision="fp8")


_ONE = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])


def _with_initializers(model: onnx.ModelProto, inits) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for i in inits:
        raw = i.load().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        out.graph.initializer.append(helper.make_tensor(i.name, ONNX_DTYPES[i.dtype], list(i.shape), raw, raw=True))
    return out


def test_fp16_plan_runs_through_the_engine_interface(fake_trt: dict, tmp_path: Path):
    """The stand-in executes the parsed fp16 graph with onnxruntime: float32 at the edges, fp16 inside."""
    ckpt = make_model("tiny", tmp_path / "ckpt", seed=3, lm_head_scale=4.0)
    prefill, steps, generated = hf_reference_logits(ckpt, PROMPT, DECODE_STEPS)
    case = Case("tiny", ckpt, None, prefill.numpy(), [s.numpy() for s in steps], generated)
    plan = build_engine(
        compiled_graph(ckpt), tmp_path / "m.plan", profiles=profiles_from_flags(2, 32), precision="fp16"
    )
    engine = TensorRTEngine(plan, device="cpu")
    assert_matches(case, teacher_forced(engine.step, [c.empty(2) for c in engine.cache], generated), FP16_RTOL)


# -- the support list ------------------------------------------------------------------------------
def one_node_model(node, inputs, outputs, initializers=(), opset=21) -> onnx.ModelProto:
    graph = helper.make_graph([node], "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def vi(name, dtype, shape):
    return helper.make_tensor_value_info(name, dtype, shape)


def test_onnxruntime_flavour_is_refused_for_its_moe_kernel(case: Case):
    model, inits = lower_to_onnx(case.graph)  # default: com.microsoft MoE
    problems = check_model_supported(model, declared=[(i.name, ONNX_DTYPES[i.dtype], i.shape) for i in inits])
    assert any(p.startswith("op com.microsoft::MoE") and TENSORRT_VERSION in p for p in problems), problems


def test_tensorrt_onnx_refuses_what_the_parser_would(monkeypatch, tmp_path: Path):
    graph = compiled_graph(make_model("tiny", tmp_path / "ckpt", seed=3))
    monkeypatch.setattr(tensorrt_backend, "lower_to_onnx", lambda g, **kw: lower_to_onnx(g))  # keeps the MoE op
    with pytest.raises(CompileError, match=r"^the model needs ONNX that TensorRT cannot parse: op com\.microsoft::MoE"):
        tensorrt_onnx(graph)


def test_support_list_constraints():
    x = vi("x", TensorProto.FLOAT, [2, 5000])
    k = helper.make_tensor("k", TensorProto.INT64, [1], [4096])
    topk = helper.make_node("TopK", ["x", "k"], ["v", "i"], name="t")
    outs = [vi("v", TensorProto.FLOAT, [2, 4096]), vi("i", TensorProto.INT64, [2, 4096])]
    assert check_model_supported(one_node_model(topk, [x], outs, [k])) == [
        "node 't' (TopK): K=4096 must be less than 3840"
    ]
    k.int64_data[0] = 3839
    assert check_model_supported(one_node_model(topk, [x], outs, [k])) == []
    # K from the graph, not a constant
    dyn = one_node_model(topk, [x, vi("k", TensorProto.INT64, [1])], outs)
    assert check_model_supported(dyn) == ["node 't' (TopK): K must be a build-time constant"]

    data, idx = vi("d", TensorProto.FLOAT, [4, 3]), vi("j", TensorProto.INT64, [2, 1])
    scatter = helper.make_node("ScatterND", ["d", "j", "u"], ["o"], name="s", reduction="add")
    model = one_node_model(
        scatter, [data, idx, vi("u", TensorProto.FLOAT, [2, 3])], [vi("o", TensorProto.FLOAT, [4, 3])]
    )
    assert check_model_supported(model) == [
        "node 's' (ScatterND): reduction must be none (TensorRT needs a plugin otherwise)"
    ]

    # FP8 blocks along one axis pass; along two they do not (the parser infers the blocks from the shapes).
    w = helper.make_tensor("w", TensorProto.FLOAT8E4M3FN, [256, 4], [0.0] * 1024)
    ok = helper.make_tensor("s", TensorProto.FLOAT, [2, 4], [1.0] * 8)
    bad = helper.make_tensor("s", TensorProto.FLOAT, [2, 2], [1.0] * 4)
    dq = helper.make_node("DequantizeLinear", ["w", "s"], ["y"], name="q", axis=0, block_size=128)
    y = [vi("y", TensorProto.FLOAT, [256, 4])]
    assert check_model_supported(one_node_model(dq, [], y, [w, ok])) == []
    # partial blocks, a 3-D scale, a scale computed in the graph (TensorRT 10.13's blocked-DQ rules)
    partial = helper.make_tensor("w", TensorProto.FLOAT8E4M3FN, [200, 4], [0.0] * 800)
    assert check_model_supported(one_node_model(dq, [], [vi("y", TensorProto.FLOAT, [200, 4])], [partial, ok])) == [
        "node 'q' (DequantizeLinear): axis 0 of 200 is not 2 whole blocks of 128 (the parser infers the block as "
        "dim / scale dim)"
    ]
    w3 = helper.make_tensor("w", TensorProto.FLOAT8E4M3FN, [2, 256, 4], [0.0] * 2048)
    s3 = helper.make_tensor("s", TensorProto.FLOAT, [2, 2, 4], [1.0] * 16)
    dq1 = helper.make_node("DequantizeLinear", ["w", "s"], ["y"], name="q", axis=1, block_size=128)
    assert check_model_supported(one_node_model(dq1, [], [vi("y", TensorProto.FLOAT, [2, 256, 4])], [w3, s3])) == [
        "node 'q' (DequantizeLinear): a blocked scale must have rank <= 2 (TensorRT 10.13+), not 3"
    ]
    computed = one_node_model(dq, [vi("s", TensorProto.FLOAT, [2, 4])], y, [w])
    assert check_model_supported(computed) == [
        "node 'q' (DequantizeLinear): a blocked scale must be a constant (TensorRT 10.13+)"
    ]
    assert check_model_supported(one_node_model(dq, [], y, [w, bad])) == [
        "node 'q' (DequantizeLinear): scale [2, 2] blocks input [256, 4] along 2 axes, not one"
    ]
    # FP8 anywhere but into DequantizeLinear, a double tensor, an op outside the list, a too-new opset
    cast = helper.make_node("Cast", ["x"], ["z"], name="c", to=TensorProto.FLOAT8E4M3FN)
    problems = check_model_supported(one_node_model(cast, [x], [vi("z", TensorProto.FLOAT8E4M3FN, [2, 5000])]))
    assert problems == ["tensor 'z': FLOAT8E4M3FN is only supported into DequantizeLinear"]
    erf = helper.make_node("Erf", ["a"], ["b"], name="e")
    problems = check_model_supported(
        one_node_model(erf, [vi("a", TensorProto.DOUBLE, [3])], [vi("b", TensorProto.DOUBLE, [3])], opset=25)
    )
    assert problems == [
        "opset 25 is outside TensorRT 10.15's range (9, 24)",
        "op Erf (1 node(s), first 'e') is not in TensorRT 10.15's ONNX support list",
        "tensor 'a': dtype DOUBLE is not supported by TensorRT",
        "tensor 'b': dtype DOUBLE is not supported by TensorRT",
    ]
    mm = helper.make_node("MatMul", ["a", "a2"], ["b"], name="m")
    ints = [vi("a", TensorProto.INT64, [2, 2]), vi("a2", TensorProto.INT64, [2, 2])]
    problems = check_model_supported(one_node_model(mm, ints, [vi("b", TensorProto.INT64, [2, 2])]))
    assert problems == ["node 'm' (MatMul): INT64 is not a type TensorRT supports for MatMul"]


# -- profiles --------------------------------------------------------------------------------------
def test_decode_and_bounded_prefill_profiles():
    p = profiles_from_flags(max_batch=4, max_seq_len=2048)
    assert p == Profiles(4, 2048, 512, 512) and p.names == ("decode", "prefill")
    latent = ["batch", "past", 576]
    assert p.shapes_for("decode", "input_ids", ["batch", "seq"]) == ((1, 1), (4, 1), (4, 1))
    assert p.shapes_for("decode", "past_key_values.0.latent", latent) == (
        (1, 0, 576),
        (4, 1023, 576),  # tuned for a decode step over a half-full cache
        (4, 2047, 576),
    )
    assert p.shapes_for("prefill", "input_ids", ["batch", "seq"]) == ((1, 1), (4, 512), (4, 512))
    assert p.shapes_for("prefill", "past_key_values.0.latent", latent) == ((1, 0, 576), (4, 0, 576), (4, 2047, 576))
    tuned = profiles_from_flags(max_seq_len=512, opt_seq_len=128, prefill_chunk=256)
    assert tuned.shapes_for("prefill", "position_ids", ["batch", "seq"]) == ((1, 1), (1, 128), (1, 256))
    assert profiles_from_flags() == Profiles(1, 4096, 512, 512)
    assert profiles_from_flags(max_seq_len=64) == Profiles(1, 64, 64, 64)  # the chunk is clipped to the context
    one = profiles_from_flags(max_seq_len=1)
    assert one.names == ("decode",) and one.ranges("decode")["past"] == (0, 0, 0)
    assert profiles_from_flags(prefill_chunk=1).names == ("decode",)


@pytest.mark.parametrize(
    "flags,message",
    [
        ({"max_batch": 0}, "--max-batch must be a positive integer, not 0"),
        ({"max_seq_len": -5}, "--max-seq-len must be a positive integer, not -5"),
        ({"max_seq_len": 4.5}, "--max-seq-len must be a positive integer, not 4.5"),
        ({"max_batch": True}, "--max-batch must be a positive integer, not True"),
        ({"opt_seq_len": 0}, "--opt-seq-len must be a positive integer, not 0"),
        ({"max_seq_len": 64, "opt_seq_len": 65}, "--opt-seq-len 65 is larger than the prefill chunk 64"),
        ({"prefill_chunk": 0}, "--prefill-chunk must be a positive integer, not 0"),
        ({"prefill_chunk": 16, "opt_seq_len": 17}, "--opt-seq-len 17 is larger than the prefill chunk 16"),
    ],
)
def test_bad_profile_flags_name_the_flag(flags, message):
    with pytest.raises(CompileError) as err:
        profiles_from_flags(**flags)
    assert str(err.value) == message


def test_profile_errors():
    with pytest.raises(CompileError, match="dimension 'tokens' has no profile"):
        profiles_from_flags().shapes_for("decode", "x", ["batch", "tokens"])
    with pytest.raises(CompileError, match=r"need 1 <= opt seq <= prefill chunk <= max seq and batch >= 1, got 9, 8"):
        Profiles(1, 64, 8, 9)


def test_activation_estimate_grows_with_the_profile_not_with_one_span(tmp_path: Path):
    """The graph-based estimate recorded where TensorRT cannot be asked: the decode profile's activations are a
    small fraction of the prefill chunk's, and a single seq-1..max profile (the old plan) needs far more."""
    from dsc.backends.tensorrt import _input_dims
    from dsc.backends.tensorrt_types import activation_bytes_estimate

    graph = compiled_graph(make_model("tiny", tmp_path / "ckpt", seed=3))
    model, inits = tensorrt_onnx(graph)
    dims = _input_dims(model)
    p = profiles_from_flags(max_seq_len=1024, prefill_chunk=64)
    est = {
        n: activation_bytes_estimate(model, inits, {k: p.shapes_for(n, k, d)[2] for k, d in dims.items()})
        for n in p.names
    }
    single, _ = activation_bytes_estimate(
        model,
        inits,
        {k: [{"batch": 1, "seq": 1024, "past": 1023, "past+seq": 2047}.get(x, x) for x in d] for k, d in dims.items()},
    )
    assert 0 < est["decode"][0] < est["prefill"][0] < single / 4
    # the prefill chunk's gathered expert weights alone: 64 tokens x top-k x H x 2I floats, alive at once
    experts = next(n for n in graph.nodes if n.op == Op.MOE_EXPERTS)
    inter, hidden = experts.inputs[3].type.shape[1:]
    k = experts.inputs[1].type.shape[-1]
    assert est["prefill"][0] >= 64 * k * hidden * 2 * inter * 4
    assert est["prefill"][1] < 20  # values whose size inference could not resolve


# -- without TensorRT ------------------------------------------------------------------------------
def test_missing_tensorrt_is_a_one_line_compile_error(monkeypatch, tmp_path: Path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    with pytest.raises(CompileError) as err:
        require_tensorrt()
    assert "'tensorrt' package" in str(err.value) and HINT in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(CompileError, match="'tensorrt' package"):  # before any work
        build_engine(None, tmp_path / "m.plan", profiles=profiles_from_flags())


# -- build_engine and TensorRTEngine against a stand-in tensorrt module -------------------------------
_ONNX_TO_FAKE = {
    TensorProto.FLOAT: "float32",
    TensorProto.INT64: "int64",
    TensorProto.BOOL: "bool",
    TensorProto.INT32: "int32",
    TensorProto.FLOAT16: "float16",
    TensorProto.BFLOAT16: "bfloat16",
}


def fake_tensorrt(record: dict) -> types.ModuleType:
    """The slice of TensorRT 10's Python API that build_engine and TensorRTEngine call; the "plan" is the parsed
    ONNX model with its weights inlined, executed by onnxruntime on host memory at the addresses given."""
    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)  # torch._dynamo asks find_spec("tensorrt")
    trt.__version__ = "10.99-fake"
    for name in ("float32", "float16", "bfloat16", "int64", "int32", "int8", "uint8", "bool"):
        setattr(trt, name, name)
    trt.BuilderFlag = types.SimpleNamespace(TF32="TF32")  # TensorRT 11 has no FP16/BF16/FP8 flags
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)
    trt.ExecutionContextAllocationStrategy = types.SimpleNamespace(ON_PROFILE_CHANGE="ON_PROFILE_CHANGE")
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            pass

    class Tensor:
        def __init__(self, name, dtype):
            self.name, self.dtype = name, dtype

    class Layer:
        def __init__(self, node, types_):
            self.name, self.precision = node.name, None
            self.outputs = [Tensor(o, _ONNX_TO_FAKE.get(types_.get(o), "float32")) for o in node.output]
            self.num_outputs = len(self.outputs)

        def get_output(self, i):
            return self.outputs[i]

    class Network:
        model = None

        @property
        def num_inputs(self):
            return len(self.model.graph.input)

        def get_input(self, i):
            return Tensor(self.model.graph.input[i].name, "?")

        @property
        def num_layers(self):
            return len(self.layers)

        def get_layer(self, i):
            return self.layers[i]

    class ParserError:
        def __init__(self, node, name, op, desc):
            self._v = (node, name, op, desc)

        def node(self):
            return self._v[0]

        def node_name(self):
            return self._v[1]

        def node_operator(self):
            return self._v[2]

        def desc(self):
            return self._v[3]

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.errors = network, []

        def parse_from_file(self, path):
            model = onnx.load(path)  # external data next to it, as TensorRT reads it
            record["onnx_files"] = sorted(p.name for p in Path(path).parent.iterdir())
            self.network.model = model
            inferred = onnx.shape_inference.infer_shapes(model)
            types_ = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
            self.network.layers = [Layer(n, types_) for n in model.graph.node]
            self.errors = [ParserError(*e) for e in record.get("parse_errors", [])]
            return not self.errors

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, i):
            return self.errors[i]

    class TimingCache:
        def __init__(self, data):
            self.data = data

        def serialize(self):
            return b"fake-cache:" + str(record.get("builds", 0)).encode()

    class Config:
        def __init__(self):
            self.flags, self.cache = set(), None
            record["config"] = self

        def set_memory_pool_limit(self, pool, size):
            record["pool"] = (pool, size)

        def set_flag(self, flag):
            self.flags.add(flag)

        def clear_flag(self, flag):
            record.setdefault("cleared", set()).add(flag)

        def add_optimization_profile(self, profile):
            record.setdefault("profiles", []).append(profile.shapes)
            return len(record["profiles"]) - 1

        def create_timing_cache(self, data):
            return TimingCache(bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            record.setdefault("timing_loaded", []).append(cache.data)
            return cache.data == b"" or cache.data.startswith(b"fake-cache:")

        def get_timing_cache(self):
            return self.cache

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            record["network_flags"] = flags
            record["network"] = Network()
            return record["network"]

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            record["builds"] = record.get("builds", 0) + 1
            return network.model.SerializeToString()

    class Context:
        def __init__(self, engine):
            self.engine, self.shapes, self.addresses, self.profile = engine, {}, {}, None

        def set_optimization_profile_async(self, index, stream_handle):
            self.profile = index
            return index < len(record["profiles"])

        def set_input_shape(self, name, shape):
            self.shapes[name] = tuple(shape)
            return True

        def get_tensor_shape(self, name):
            if name in self.shapes:
                return self.shapes[name]
            sizes = {}
            for v in self.engine.model.graph.input:
                for d, n in zip(v.type.tensor_type.shape.dim, self.shapes[v.name], strict=True):
                    sizes[d.dim_param] = n
            out = next(v for v in self.engine.model.graph.output if v.name == name)
            return tuple(
                d.dim_value if d.HasField("dim_value") else sum(sizes[t] for t in d.dim_param.split("+"))
                for d in out.type.tensor_type.shape.dim
            )

        def set_tensor_address(self, name, address):
            assert address, f"{name}: TensorRT needs a non-null address"
            self.addresses[name] = address
            return True

        def _view(self, name, shape, dtype):
            n = int(np.prod(shape)) * np.dtype(dtype).itemsize
            raw = (ctypes.c_char * max(n, 1)).from_address(self.addresses[name])
            return np.frombuffer(raw, dtype=np.uint8, count=n).view(dtype).reshape(shape)

        def execute_async_v3(self, stream_handle):
            feeds = {i.name: self._view(i.name, self.shapes[i.name], _np_type(i.type)) for i in self.engine.inputs}
            outs = self.engine.session.run(
                [o.name for o in self.engine.outputs], {k: v.copy() for k, v in feeds.items()}
            )
            for o, value in zip(self.engine.outputs, outs, strict=True):
                self._view(o.name, value.shape, value.dtype)[...] = value
            record["steps"] = record.get("steps", 0) + 1
            seq = self.shapes["input_ids"][1]
            record.setdefault("runs", []).append((self.profile, seq))
            lo, _, hi = record["profiles"][self.profile]["input_ids"]  # TensorRT checks the profile too
            assert lo[1] <= seq <= hi[1], (self.profile, seq)
            return True

    def _np_type(ort_type: str):
        return {"tensor(float)": np.float32, "tensor(int64)": np.int64}[ort_type]

    class Engine:
        def __init__(self, data):
            self.model = onnx.load_from_string(data)
            self.session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
            self.inputs, self.outputs = self.session.get_inputs(), self.session.get_outputs()
            self.names = [v.name for v in (*self.inputs, *self.outputs)]

        @property
        def num_io_tensors(self):
            return len(self.names)

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, name):
            return "INPUT" if any(v.name == name for v in self.inputs) else "OUTPUT"

        def get_tensor_dtype(self, name):
            v = next(v for v in (*self.inputs, *self.outputs) if v.name == name)
            return {"tensor(float)": "float32", "tensor(int64)": "int64"}[v.type]

        def create_execution_context(self, strategy=None):
            record.setdefault("strategies", []).append(strategy)
            return None if record.get("no_context") else Context(self)

        def get_device_memory_size_for_profile_v2(self, index):
            return 1000 * (index + 1)

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            try:
                return Engine(bytes(data))
            except Exception:  # noqa: BLE001 (TensorRT answers None for a plan it cannot read)
                return None

    for cls in (Logger, OnnxParser, Builder, Runtime):
        setattr(trt, cls.__name__, cls)
    return trt


@pytest.fixture
def fake_trt(monkeypatch) -> dict:
    record: dict = {}
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(record))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # require_tensorrt asks
    return record


def test_build_and_run_through_the_engine_interface(case: Case, fake_trt: dict, tmp_path: Path):
    plan, cache = tmp_path / "model.plan", tmp_path / "timing.cache"
    profiles = profiles_from_flags(max_batch=2, max_seq_len=32, prefill_chunk=3)
    assert build_engine(case.graph, plan, profiles=profiles, timing_cache=cache) == plan
    assert fake_trt["network_flags"] == 1 << 1  # STRONGLY_TYPED
    assert fake_trt["onnx_files"] == ["model.onnx", "model.onnx.data"]  # weights as external data
    assert fake_trt["pool"] == ("WORKSPACE", 4 << 30)
    assert fake_trt["cleared"] == {"TF32"} and fake_trt["config"].flags == set()  # fp32 means fp32
    decode, prefill = fake_trt["profiles"]  # indices 0 and 1
    latent = next(n for n in decode if n.startswith("past_key_values."))
    assert decode["input_ids"] == ((1, 1), (2, 1), (2, 1))
    # head-major cache [batch, 1, past, dim]: batch and past ranges
    assert [(s[0], s[2]) for s in decode[latent]] == [(1, 0), (2, 15), (2, 31)]
    assert prefill["input_ids"] == ((1, 1), (2, 3), (2, 3))  # --prefill-chunk 3
    assert [(s[0], s[2]) for s in prefill[latent]] == [(1, 0), (2, 0), (2, 31)]
    assert cache.read_bytes() == b"fake-cache:1" and fake_trt["timing_loaded"] == [b""]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.manifest.json", "model.plan", "timing.cache"]

    manifest = read_manifest(plan)
    assert manifest.backend == "tensorrt" and manifest.engine_file == "model.plan"
    assert manifest.checksum == hashlib.sha256(plan.read_bytes()).hexdigest()
    assert manifest.kv_cache.form == "latent" and manifest.vocab_size
    trt_info = manifest.tensorrt
    assert trt_info["version"] == "10.99-fake" and trt_info["precision"] == "fp32"
    assert trt_info["workspace_bytes"] == 4 << 30 and trt_info["onnx_opset"] == 20
    assert trt_info["profiles"]["max_past"] == 31 and trt_info["profiles"]["prefill_chunk"] == 3
    assert trt_info["profile_shapes"]["prefill"]["input_ids"][2] == [2, 3]
    memory = trt_info["activation_bytes"]
    assert memory["source"] == "tensorrt per profile" and memory["bytes"] == {"decode": 1000, "prefill": 2000}
    assert 0 < memory["estimate"]["decode"] < memory["estimate"]["prefill"]
    assert trt_info["support_list"]["tensorrt"] == TENSORRT_VERSION

    engine = TensorRTEngine(plan, device="cpu")
    empty = [c.empty(len(PROMPT)) for c in engine.cache]  # numpy in, torch tensors back, as generate does
    logits = teacher_forced(engine.step, empty, case.generated)
    assert_matches(case, logits, RTOL)
    # The 7-token prompt ran as chunks of 3, 3 and 1 on the prefill profile, then one token per decode step.
    assert fake_trt["runs"] == [(1, 3), (1, 3), (1, 1)] + [(0, 1)] * DECODE_STEPS
    assert fake_trt["strategies"] == ["ON_PROFILE_CHANGE"] * 2  # one context per profile, each sized for its own
    assert generate(engine, PROMPT, DECODE_STEPS + 1).tokens == case.generated

    with pytest.raises(EngineError, match=r"input_ids of shape \[3, 3\] is outside the engine's prefill profile"):
        engine.step(np.zeros((3, 7), np.int64), np.zeros((3, 7), np.int64), [c.empty(3) for c in engine.cache])
    fake_trt["no_context"] = True
    with pytest.raises(EngineError, match=r"TensorRT 10\.99-fake could not create an execution context for the decode"):
        TensorRTEngine(plan, device="cpu").step(*[np.zeros((1, 1), np.int64)] * 2, [c.empty(1) for c in engine.cache])


def test_reduced_precision_is_the_graphs_dtypes_timing_cache_reuse_and_parser_errors(
    fake_trt: dict, tmp_path: Path, caplog
):
    ckpt = make_model("tiny", tmp_path / "ckpt", seed=3)
    graph = compiled_graph(ckpt)
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"fake-cache:0")
    caplog.set_level("INFO", logger="dsc")
    build_engine(
        graph,
        tmp_path / "a.plan",
        profiles=profiles_from_flags(),
        precision="bf16",
        workspace_bytes=1 << 30,
        timing_cache=cache,
    )
    # Strongly typed: nothing is asked of the builder but TF32 off; the parsed model itself computes in bf16.
    assert fake_trt["config"].flags == set() and fake_trt["cleared"] == {"TF32"}
    assert fake_trt["network_flags"] == 2
    assert fake_trt["timing_loaded"] == [b"fake-cache:0"] and any("12 bytes from" in r.message for r in caplog.records)
    parsed = fake_trt["network"].model
    assert {TensorProto.BFLOAT16, TensorProto.FLOAT} <= {t.data_type for t in parsed.graph.initializer}
    assert_strongly_typed(parsed, graph, TensorProto.BFLOAT16)
    info = json.loads((tmp_path / "a.manifest.json").read_text())["tensorrt"]
    assert info["precision"] == "bf16" and info["strongly_typed"] is True
    assert info["weight_bytes_by_dtype"]["bfloat16"] > 4 * info["weight_bytes_by_dtype"]["float32"]

    fake_trt["parse_errors"] = [(12, "layers.1.mlp/TopK", "TopK", "K too\nlarge"), (-1, "", "", "graph broken")]
    caplog.clear()
    with pytest.raises(CompileError) as err:
        build_engine(graph, tmp_path / "b.plan", profiles=profiles_from_flags())
    assert str(err.value) == (
        "TensorRT's ONNX parser refused the model: node 12 'layers.1.mlp/TopK' (TopK): K too large "
        "(and 1 more, listed above)"
    )
    assert [r.message for r in caplog.records if "parser:" in r.message] == [
        "      parser: node 12 'layers.1.mlp/TopK' (TopK): K too large",
        "      parser: graph broken",
    ]
    assert not (tmp_path / "b.plan").exists() and not (tmp_path / "b.manifest.json").exists()

    with pytest.raises(CompileError, match="--precision must be one of fp32, fp16, bf16, not 'int8'"):
        build_engine(graph, tmp_path / "c.plan", profiles=profiles_from_flags(), precision="int8")
    with pytest.raises(CompileError, match="--workspace must be a positive number of bytes, not 0"):
        build_engine(graph, tmp_path / "c.plan", profiles=profiles_from_flags(), workspace_bytes=0)


def test_engine_without_tensorrt_is_an_engine_error(fake_trt: dict, monkeypatch, tmp_path: Path):
    graph = compiled_graph(make_model("tiny", tmp_path / "ckpt", seed=3))
    plan = build_engine(graph, tmp_path / "m.plan", profiles=profiles_from_flags())
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(EngineError, match=r"m\.plan: TensorRT engines need the 'tensorrt' package"):
        TensorRTEngine(plan, device="cpu")


# -- on a GPU with TensorRT ------------------------------------------------------------------------
def _tensorrt_and_gpu() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the 'tensorrt' package is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    return None


@pytest.mark.parametrize("precision,rtol", [("fp32", 1e-3), ("bf16", 2e-2)])
def test_tensorrt_plan_matches_transformers(precision: str, rtol: float, tmp_path: Path):
    reason = _tensorrt_and_gpu()
    if reason:
        pytest.skip(f"needs TensorRT and a GPU: {reason}")
    steps = 8
    ckpt = make_model("tiny", tmp_path / "ckpt", seed=3, lm_head_scale=4.0)
    prefill, ref_steps, generated = hf_reference_logits(ckpt, PROMPT, steps)
    case = Case("tiny", ckpt, None, prefill.numpy(), [s.numpy() for s in ref_steps], generated)
    plan = build_engine(
        compiled_graph(ckpt),
        tmp_path / "tiny.plan",
        profiles=profiles_from_flags(2, 64),
        precision=precision,
    )
    engine = TensorRTEngine(plan)
    logits = teacher_forced(engine.step, [c.empty(len(PROMPT)) for c in engine.cache], generated, steps)
    assert_matches(case, logits, rtol)
    if precision == "fp32":  # bf16 may flip a near-tie argmax; its logits are checked above
        assert generate(engine, PROMPT, steps + 1).tokens == generated


def test_activation_memory_falls_back_to_what_the_version_has(tmp_path: Path):
    from dsc.backends.tensorrt import _input_dims, activation_memory

    graph = compiled_graph(make_model("tiny", tmp_path / "ckpt", seed=3))
    model, inits = tensorrt_onnx(graph)
    p = profiles_from_flags(max_seq_len=64, prefill_chunk=8)
    shapes = {n: {k: p.shapes_for(n, k, d) for k, d in _input_dims(model).items()} for n in p.names}

    def fake(engine):
        runtime = types.SimpleNamespace(deserialize_cuda_engine=lambda data: engine)
        logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, severity: None})
        return types.SimpleNamespace(Runtime=lambda _: runtime, Logger=logger)

    unreadable = activation_memory(fake(None), b"", model, inits, shapes)
    assert unreadable["source"] == "estimate" and unreadable["bytes"] == unreadable["estimate"]
    assert 0 < unreadable["bytes"]["decode"] < unreadable["bytes"]["prefill"]
    plan_wide = activation_memory(fake(types.SimpleNamespace(device_memory_size_v2=77)), b"", model, inits, shapes)
    assert plan_wide["source"] == "tensorrt, largest profile" and plan_wide["bytes"] == {"decode": 77, "prefill": 77}


@pytest.mark.parametrize("version", ["12.0.1", "9.3.0.1", "8.6.1"])
def test_unsupported_tensorrt_versions_are_named(fake_trt: dict, monkeypatch, version: str, tmp_path: Path):
    graph = compiled_graph(make_model("tiny", tmp_path / "ckpt", seed=3))
    plan = build_engine(graph, tmp_path / "m.plan", profiles=profiles_from_flags(max_seq_len=16))
    monkeypatch.setattr(sys.modules["tensorrt"], "__version__", version)
    message = (
        rf"TensorRT {re.escape(version)} is not supported: dsc builds and runs plans with TensorRT 10\.13 to 11\.x"
    )
    with pytest.raises(CompileError, match=message):
        build_engine(graph, tmp_path / "n.plan", profiles=profiles_from_flags(max_seq_len=16))
    assert not (tmp_path / "n.plan").exists()
    with pytest.raises(EngineError, match=message):
        TensorRTEngine(plan, device="cpu")


def test_tensorrt_before_10_13_builds_with_fp8_dequantized(fake_trt: dict, monkeypatch, tmp_path: Path, caplog):
    monkeypatch.setattr(sys.modules["tensorrt"], "__version__", "10.8.0.43")
    graph = compiled_graph(make_model("tiny", tmp_path / "ckpt", seed=3, fp8=True))
    caplog.set_level("INFO", logger="dsc")
    build_engine(graph, tmp_path / "m.plan", profiles=profiles_from_flags(max_seq_len=16))
    assert any("older than 10.13" in r.message for r in caplog.records)
    assert any("TensorRT 10.8 has no FP8 block dequantization" in r.message for r in caplog.records)
    parsed = fake_trt["network"].model
    assert TensorProto.FLOAT8E4M3FN not in {t.data_type for t in parsed.graph.initializer}


def test_plan_without_a_prefill_profile_feeds_prompts_token_by_token(fake_trt: dict, tmp_path: Path):
    ckpt = make_model("tiny", tmp_path / "ckpt", seed=3, lm_head_scale=4.0)
    _, _, generated = hf_reference_logits(ckpt, PROMPT, 2)
    profiles = profiles_from_flags(2, 16, prefill_chunk=1)
    plan = build_engine(compiled_graph(ckpt), tmp_path / "m.plan", profiles=profiles)
    assert len(fake_trt["profiles"]) == 1
    assert generate(TensorRTEngine(plan, device="cpu"), PROMPT, 3).tokens == generated
    assert fake_trt["runs"] == [(0, 1)] * (len(PROMPT[0]) + 2)


def test_fp8_blocks_held_out_shapes():
    """Whole blocks stay as written; a 3-D (expert) scale and a DequantizeLinear feeding a Gather are dequantized at
    compile time; numbers equal onnxruntime's DequantizeLinear of the original."""
    from dsc.backends.tensorrt_types import fp8_for_tensorrt

    g = torch.Generator().manual_seed(0)
    w2 = (torch.randn(256, 3, generator=g) * 4).to(torch.float8_e4m3fn)
    s2 = torch.rand(2, 3, generator=g) + 0.5
    w3 = (torch.randn(2, 384, 5, generator=g) * 4).to(torch.float8_e4m3fn)
    s3 = torch.rand(2, 3, 5, generator=g) + 0.5
    inits = [
        Initializer(n, t.dtype, tuple(t.shape), lambda t=t: t)
        for n, t in (("w2", w2), ("s2", s2), ("w3", w3), ("s3", s3), ("i", torch.tensor([1])))
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["w2", "s2"], ["d2"], name="a", axis=0, block_size=128),
        helper.make_node("DequantizeLinear", ["w3", "s3"], ["d3"], name="b", axis=1, block_size=128),
        helper.make_node("Gather", ["d3", "i"], ["e"], name="g", axis=0),
    ]
    outs = [vi("d2", TensorProto.FLOAT, [256, 3]), vi("e", TensorProto.FLOAT, [1, 384, 5])]
    model = helper.make_model(helper.make_graph(nodes, "g", [], outs), opset_imports=[helper.make_opsetid("", 21)])
    out, new, stats = fp8_for_tensorrt(model, inits, (10, 13))
    assert stats == {"kept": 1, "padded": 0, "dequantized": 1, "dequantized_bytes": 2 * 384 * 5 * 4}
    assert [n.op_type for n in out.graph.node] == ["DequantizeLinear", "Gather"]
    assert {i.name: i.dtype for i in new} == {
        "w2": torch.float8_e4m3fn,
        "s2": torch.float32,
        "w3": torch.float32,
        "i": torch.int64,
    }

    def run(m, i):
        session = ort.InferenceSession(_with_initializers(m, i).SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, {})

    for got, want in zip(run(out, new), run(model, inits), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6)
