"""The streaming ONNX writer: single file vs external data, exactness, determinism, atomicity, bounded memory."""

import os
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from dsc.backends import onnx_io
from dsc.backends.onnx_io import Initializer, check_model, save_model
from dsc.errors import CompileError
from dsc.files import atomic_output, atomic_write_bytes
from onnx import TensorProto, helper, numpy_helper


def tiny_model():
    """y = reshape(((x @ w + x @ dequant(q) + b + h + i32 + i8 + u8) * mask), [-1, 16]), one initializer per dtype.

    Every value is a small integer (or a quarter), so float32 sums are exact and onnxruntime must match numpy bit
    for bit. ``w`` and ``q`` are big enough to go to the external data file; the rest stay inline.
    """
    g = torch.Generator().manual_seed(0)
    ints = lambda *shape: torch.randint(-4, 5, shape, generator=g)  # noqa: E731
    tensors = {
        "w": ints(64, 32).float(),
        "q": ints(64, 32).to(torch.float8_e4m3fn),
        "scale": torch.tensor(0.5),
        "b": ints(32).to(torch.bfloat16),
        "h": (ints(32) / 4).half(),
        "i32": ints(32).int(),
        "i8": ints(32).to(torch.int8),
        "u8": ints(32).abs().to(torch.uint8),
        "mask": ints(32) > 0,
        "shape": torch.tensor([-1, 16]),
    }
    f = TensorProto.FLOAT
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["xw"]),
        helper.make_node("DequantizeLinear", ["q", "scale"], ["qf"]),
        helper.make_node("MatMul", ["x", "qf"], ["xq"]),
        helper.make_node("Add", ["xw", "xq"], ["s0"]),
        *[helper.make_node("Cast", [n], [f"{n}_f"], to=f) for n in ("b", "h", "i32", "i8", "u8", "mask")],
        helper.make_node("Add", ["s0", "b_f"], ["s1"]),
        helper.make_node("Add", ["s1", "h_f"], ["s2"]),
        helper.make_node("Add", ["s2", "i32_f"], ["s3"]),
        helper.make_node("Add", ["s3", "i8_f"], ["s4"]),
        helper.make_node("Add", ["s4", "u8_f"], ["s5"]),
        helper.make_node("Mul", ["s5", "mask_f"], ["s6"]),
        helper.make_node("Reshape", ["s6", "shape"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", f, ["n", 64])],
        [helper.make_tensor_value_info("y", f, [None, 16])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], producer_name="dsc-test")
    model.ir_version = 10
    inits = [Initializer(n, t.dtype, tuple(t.shape), lambda t=t: t) for n, t in tensors.items()]

    def expected(x):
        t = {n: v.float().numpy() for n, v in tensors.items()}
        s = x @ t["w"] + x @ (t["q"] * 0.5) + t["b"] + t["h"] + t["i32"] + t["i8"] + t["u8"]
        return (s * t["mask"]).reshape(-1, 16)

    return model, inits, tensors, expected


def run_ort(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """numpy's own view of a tensor, by way of ml_dtypes for the types numpy lacks."""
    special = {torch.bfloat16: ml_dtypes.bfloat16, torch.float8_e4m3fn: ml_dtypes.float8_e4m3fn}
    if t.dtype in special:
        return t.view(torch.int16 if t.dtype == torch.bfloat16 else torch.uint8).numpy().view(special[t.dtype])
    return t.numpy()


def counting(inits):
    """The initializers, with a list that records each load() call."""
    calls = []

    def wrap(i):
        return Initializer(i.name, i.dtype, i.shape, lambda: (calls.append(i.name), i.load())[1])

    return [wrap(i) for i in inits], calls


@pytest.mark.parametrize("external", [False, True])
def test_onnxruntime_matches_numpy_exactly(tmp_path, external):
    model, inits, _, expected = tiny_model()
    files = save_model(model, inits, tmp_path / "m.onnx", external_data=external)
    assert files == ([tmp_path / "m.onnx", tmp_path / "m.onnx.data"] if external else [tmp_path / "m.onnx"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f.name for f in files)  # no temporaries left
    check_model(tmp_path / "m.onnx")
    x = np.random.default_rng(0).integers(-3, 4, (3, 64)).astype(np.float32)
    np.testing.assert_array_equal(run_ort(tmp_path / "m.onnx", x), expected(x))


def test_single_file_is_the_standard_serialization(tmp_path):
    model, inits, tensors, _ = tiny_model()
    save_model(model, inits, tmp_path / "m.onnx")
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    reference.graph.initializer.extend(numpy_helper.from_array(to_numpy(t), n) for n, t in tensors.items())
    assert onnx.load(str(tmp_path / "m.onnx")) == reference
    assert (tmp_path / "m.onnx").read_bytes() == reference.SerializeToString()


def test_external_data_layout(tmp_path):
    model, inits, tensors, _ = tiny_model()
    save_model(model, inits, tmp_path / "m.onnx", external_data=True)
    raw = (tmp_path / "m.onnx.data").read_bytes()
    assert b".tmp-" not in (tmp_path / "m.onnx").read_bytes()
    loaded = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    external = {}
    for t in loaded.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            external[t.name] = {e.key: e.value for e in t.external_data}
        else:  # small constants stay inline, bit for bit
            assert t.raw_data == to_numpy(tensors[t.name]).tobytes(), t.name
    assert sorted(external) == ["q", "w"]
    for name, e in external.items():
        offset, length = int(e["offset"]), int(e["length"])
        assert e["location"] == "m.onnx.data" and offset % 4096 == 0
        assert raw[offset : offset + length] == to_numpy(tensors[name]).tobytes()


@pytest.mark.parametrize("external", [False, True])
def test_same_inputs_give_identical_bytes(tmp_path, external):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        model, inits, _, _ = tiny_model()
        save_model(model, inits, tmp_path / d / "m.onnx", external_data=external)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == (["m.onnx", "m.onnx.data"] if external else ["m.onnx"])
    for n in names:
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes(), n


@pytest.mark.parametrize("external", [False, True])
@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failure_midway_leaves_the_old_output_alone(tmp_path, external, error):
    model, inits, _, _ = tiny_model()
    (tmp_path / "m.onnx").write_bytes(b"old")

    def boom():
        raise error("disk on fire")

    late = Initializer("late", torch.float32, (512,), boom)
    with pytest.raises(error, match="disk on fire"):
        save_model(model, [*inits, late], tmp_path / "m.onnx", external_data=external)
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
    assert (tmp_path / "m.onnx").read_bytes() == b"old"


@pytest.mark.parametrize("bad", [torch.zeros(64, 31), torch.zeros(64, 32, dtype=torch.float16)])
def test_loaded_tensor_must_match_its_declaration(tmp_path, bad):
    model, inits, _, _ = tiny_model()
    inits[0] = Initializer("w", torch.float32, (64, 32), lambda: bad)
    with pytest.raises(ValueError, match="initializer w: got"):
        save_model(model, inits, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_bad_declarations_are_refused_before_loading(tmp_path):
    model, inits, _, _ = tiny_model()
    inits, calls = counting(inits)
    for bad, match in [
        ([*inits, inits[0]], "declared twice"),
        ([*inits, Initializer("d", torch.float64, (2,), torch.zeros)], "no ONNX type"),
        ([*inits, Initializer("n", torch.float32, (-1,), torch.zeros)], "negative dimension"),
    ]:
        with pytest.raises(ValueError, match=match):
            save_model(model, bad, tmp_path / "m.onnx")
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(1, np.float32), "extra"))
    with pytest.raises(ValueError, match="must have none"):
        save_model(model, inits, tmp_path / "m.onnx")
    assert calls == [] and list(tmp_path.iterdir()) == []


def test_unwritable_destination_is_a_user_error_found_up_front(tmp_path):
    model, inits, _, _ = tiny_model()
    inits, calls = counting(inits)
    (tmp_path / "file").write_bytes(b"")
    (tmp_path / "dir.onnx").mkdir()
    for path, match in [
        (tmp_path / "missing" / "m.onnx", "missing: output directory does not exist"),
        (tmp_path / "file" / "m.onnx", "file: output directory is not a directory"),
        (tmp_path / "dir.onnx", "dir.onnx: is a directory"),
    ]:
        for external in (False, True):
            with pytest.raises(CompileError, match=match) as e:
                save_model(model, inits, path, external_data=external)
            assert "\n" not in str(e.value)
    assert calls == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.onnx", "file"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_directory(tmp_path):
    model, inits, _, _ = tiny_model()
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(CompileError, match="ro: output directory is not writable"):
            save_model(model, inits, ro / "m.onnx")
    finally:
        ro.chmod(0o700)


@pytest.mark.parametrize("external", [False, True])
def test_progress_after_each_initializer(tmp_path, external):
    model, inits, _, _ = tiny_model()
    seen = []
    save_model(model, inits, tmp_path / "m.onnx", external_data=external, progress=lambda d, t: seen.append((d, t)))
    total = sum(i.nbytes for i in inits)
    assert len(seen) == len(inits) and seen[-1] == (total, total)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and {t for _, t in seen} == {total}


def test_auto_mode_and_the_protobuf_limit(tmp_path, monkeypatch):
    model, inits, _, _ = tiny_model()
    assert save_model(model, inits, tmp_path / "m.onnx") == [tmp_path / "m.onnx"]
    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_THRESHOLD", 1000)
    assert save_model(model, inits, tmp_path / "m.onnx") == [tmp_path / "m.onnx", tmp_path / "m.onnx.data"]
    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_THRESHOLD", 10**12)
    monkeypatch.setattr(onnx_io, "_PROTOBUF_LIMIT", 5000)  # the graph plus the weights would not fit in one file
    assert save_model(model, inits, tmp_path / "m.onnx") == [tmp_path / "m.onnx", tmp_path / "m.onnx.data"]
    with pytest.raises(CompileError, match="over protobuf's 2 GiB limit"):
        save_model(model, inits, tmp_path / "m.onnx", external_data=False)
    monkeypatch.undo()
    # Back to one file: the stale external data goes, so nothing is left to confuse a reader.
    assert save_model(model, inits, tmp_path / "m.onnx") == [tmp_path / "m.onnx"]
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
    check_model(tmp_path / "m.onnx")


def test_atomic_helpers(tmp_path):
    target = tmp_path / "manifest.json"
    atomic_write_bytes(target, b"{}")
    assert target.read_bytes() == b"{}"
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError
    assert target.read_bytes() == b"{}" and [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
    with atomic_output(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_bytes(b"[]")
    assert target.read_bytes() == b"[]" and [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
    with pytest.raises(CompileError, match="does not exist"):
        atomic_write_bytes(tmp_path / "nope" / "x", b"")


MEMORY_SCRIPT = """
import sys, torch
from pathlib import Path
from onnx import TensorProto, helper
from dsc.backends.onnx_io import Initializer, save_model

def status_bytes(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key + ":"))

n, numel = 10, 30 * 2**18  # ten tensors of 30 MiB, each made only when the writer asks for it
names = [f"w{i}" for i in range(n)]
graph = helper.make_graph(
    [helper.make_node("Identity", [w], [f"o{i}"]) for i, w in enumerate(names)], "g", [],
    [helper.make_tensor_value_info(f"o{i}", TensorProto.FLOAT, [numel]) for i in range(n)])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
make = [lambda i=i: torch.full((numel,), float(i)) for i in range(n)]
inits = [Initializer(w, torch.float32, (numel,), make[i]) for i, w in enumerate(names)]
torch.full((numel,), 0.0)  # warm up torch's allocator paths before the baseline
before = status_bytes("VmRSS")
save_model(model, inits, Path(sys.argv[1]), external_data=sys.argv[2] == "external")
# VmHWM is this process's peak RSS; ru_maxrss would carry over the (large) pytest parent's across exec.
print((status_bytes("VmHWM") - before) / 2**20)
"""


@pytest.mark.parametrize("mode", ["single", "external"])
def test_streaming_keeps_memory_bounded(tmp_path, mode):
    """300 MiB of weights made on the fly: peak RSS grows by about one 30 MiB tensor, far below the total."""
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(MEMORY_SCRIPT), str(tmp_path / "big.onnx"), mode],
        check=True,
        capture_output=True,
        text=True,
    )
    growth_mib = float(out.stdout.strip())
    written = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert written > 300 * 2**20
    assert growth_mib < 120, growth_mib
