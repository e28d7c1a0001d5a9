"""The streaming ONNX writer: single file vs external data, exactness, atomicity, bounded memory."""

import subprocess
import sys
import textwrap

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from dsc.backends.onnx_io import Initializer, check_model, save_model
from dsc.errors import CompileError
from onnx import TensorProto, helper


def tiny_model() -> tuple[onnx.ModelProto, list[Initializer]]:
    w = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    b = torch.randn(32, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    q = torch.randn(64, 32).to(torch.float8_e4m3fn)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["xw"]),
        helper.make_node("Cast", ["b"], ["bf"], to=TensorProto.FLOAT),
        helper.make_node("DequantizeLinear", ["q", "scale"], ["qf"]),
        helper.make_node("MatMul", ["x", "qf"], ["xq"]),
        helper.make_node("Add", ["xw", "bf"], ["y0"]),
        helper.make_node("Add", ["y0", "xq"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "t",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 32])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    scale = torch.tensor(0.5)
    inits = [
        Initializer("w", torch.float32, (64, 32), lambda: w),
        Initializer("b", torch.bfloat16, (32,), lambda: b),
        Initializer("q", torch.float8_e4m3fn, (64, 32), lambda: q),
        Initializer("scale", torch.float32, (), lambda: scale),
    ]
    expected = lambda x: x @ w.numpy() + b.float().numpy() + x @ (q.float() * 0.5).numpy()  # noqa: E731
    return model, inits, expected


@pytest.mark.parametrize("external", [False, True])
def test_round_trip_runs_in_onnxruntime(tmp_path, external):
    model, inits, expected = tiny_model()
    files = save_model(model, inits, tmp_path / "m.onnx", external_data=external)
    assert [f.name for f in files] == (["m.onnx", "m.onnx.data"] if external else ["m.onnx"])
    check_model(tmp_path / "m.onnx")
    loaded = onnx.load(str(tmp_path / "m.onnx"))
    assert sorted(i.name for i in loaded.graph.initializer) == ["b", "q", "scale", "w"]
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    y = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, expected(x), rtol=1e-5, atol=1e-5)


def test_single_file_equals_standard_serialization(tmp_path):
    model, inits, _ = tiny_model()
    save_model(model, inits, tmp_path / "m.onnx")
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    for init in inits:
        t = helper.make_tensor(
            init.name,
            {torch.float32: 1, torch.bfloat16: 16, torch.float8_e4m3fn: 17}[init.dtype],
            init.shape,
            bytes(init.tensor_bytes()),
            raw=True,
        )
        reference.graph.initializer.append(t)
    assert onnx.load(str(tmp_path / "m.onnx")) == reference


def test_deterministic_and_atomic(tmp_path):
    model, inits, _ = tiny_model()
    save_model(model, inits, tmp_path / "a.onnx")
    save_model(model, inits, tmp_path / "b.onnx")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()

    def boom():
        raise RuntimeError("disk on fire")

    bad = [*inits, Initializer("late", torch.float32, (2,), boom)]
    with pytest.raises(RuntimeError, match="disk on fire"):
        save_model(model, bad, tmp_path / "c.onnx")
    with pytest.raises(RuntimeError, match="disk on fire"):
        save_model(model, bad, tmp_path / "d.onnx", external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "b.onnx"]


def test_unwritable_destination(tmp_path):
    model, inits, _ = tiny_model()
    with pytest.raises(CompileError, match="does not exist"):
        save_model(model, inits, tmp_path / "missing" / "m.onnx")


def test_streaming_keeps_memory_bounded(tmp_path):
    """300 MB of weights produced on the fly: peak RSS grows by about two tensors (30 MB each), < 100 MB."""
    script = textwrap.dedent(f"""
        import resource, torch, onnx
        from onnx import helper, TensorProto
        from dsc.backends.onnx_io import Initializer, save_model
        def rss():
            return int(open('/proc/self/statm').read().split()[1]) * resource.getpagesize()
        n = 10
        outs = [helper.make_tensor_value_info(f"w{{i}}", TensorProto.FLOAT, [30 * 2**18]) for i in range(n)]
        nodes = [helper.make_node("Identity", [f"w{{i}}"], [f"o{{i}}"]) for i in range(n)]
        g = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info(f"o{{i}}", TensorProto.FLOAT, None)
                                            for i in range(n)])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
        inits = [Initializer(f"w{{i}}", torch.float32, (30 * 2**18,), lambda i=i: torch.full((30 * 2**18,), float(i)))
                 for i in range(n)]
        torch.zeros(1); before = rss()
        save_model(m, inits, __import__("pathlib").Path({str(tmp_path)!r}) / "big.onnx")
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the (large) pytest parent across exec.
        peak = next(int(x.split()[1]) * 1024 for x in open('/proc/self/status') if x.startswith('VmHWM:'))
        print((peak - before) / 2**20)
    """)
    growth_mb = float(
        subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout.strip()
    )
    assert (tmp_path / "big.onnx").stat().st_size > 300 * 2**20
    assert growth_mb < 100, growth_mb
