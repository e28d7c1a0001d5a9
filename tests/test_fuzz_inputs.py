"""Property-based fuzzing of every file dsc reads: safetensors headers, sharded indexes, config.json, engine
manifests and engine files. Whatever the corruption, the CLI must answer exit 2 (or 0 when the change happens
to leave a valid input), print at most one line on stderr and no traceback, and leave no output behind.

The CLI runs in-process (cli.main) for speed. Each test sets max_examples and a deadline and derandomizes,
so CI sees the same N examples every run (N = 300 + 150 + 300 + 300 + 120 = 1170); about 35 s on 2 busy cores.
"""

import contextlib
import io
import json
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
from dsc.cli import main
from dsc.frontends.presets import make_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FUZZ = settings(
    max_examples=300,
    deadline=None,  # a corruption that happens to be valid compiles the tiny model (~3 s on a busy machine)
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
FEW = settings(FUZZ, max_examples=150)

DTYPES = ["F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "I64", "I32", "I16", "I8", "U8", "BOOL", "F33", "", 7]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_model("tiny", tmp_path_factory.mktemp("fuzz") / "ckpt", seed=2)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    return make_model("tiny", tmp_path_factory.mktemp("fuzz") / "sharded", seed=2, shards=3)


@pytest.fixture(scope="module")
def engine(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fuzz") / "e.onnx"
    assert main(["compile", str(tiny), "-o", str(out), "-q"]) == 0
    return out


def run_cli(*argv: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(list(argv))
    return code, err.getvalue()


def check_outcome(code: int, err: str, out_dir: Path, *, must_fail: bool) -> None:
    assert "Traceback" not in err, err
    assert code in ((2,) if must_fail else (0, 2)), (code, err)
    if code == 2:
        assert len(err.strip().splitlines()) == 1 and err.startswith("dsc: error: "), err
        assert sorted(p.name for p in out_dir.iterdir()) == [], "a failed command left output behind"


def compile_copy(src: Path, corrupt) -> tuple[int, str, Path]:
    """Copy ``src`` to a fresh directory, apply ``corrupt(copy)``, compile it into an empty output directory."""
    work = Path(tempfile.mkdtemp(prefix="dsc-fuzz-"))
    try:
        ckpt = Path(shutil.copytree(src, work / "ckpt"))
        corrupt(ckpt)
        (work / "out").mkdir()
        code, err = run_cli("compile", str(ckpt), "-o", str(work / "out" / "e.onnx"), "-q")
        check_outcome(code, err, work / "out", must_fail=getattr(corrupt, "must_fail", True))
        return code, err, work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join_safetensors(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


# ---------------------------------------------------------------- safetensors


@FUZZ
@given(data=st.data())
def test_fuzz_safetensors_header(tiny, data):
    """One corruption of model.safetensors: its length field, header bytes, an entry's dtype/shape/offsets,
    or a truncation. Every one of them breaks the file (a corruption that changes nothing is skipped)."""
    kind = data.draw(st.sampled_from(["length", "bytes", "dtype", "shape", "offsets", "truncate", "entry"]))
    original = (tiny / "model.safetensors").read_bytes()
    header, body = split_safetensors(original)
    keys = sorted(k for k in header if k != "__metadata__")
    key = data.draw(st.sampled_from(keys))
    if kind == "length":
        (n,) = struct.unpack("<Q", original[:8])
        new_n = data.draw(st.integers(0, 2**64 - 1).filter(lambda v: v != n))
        corrupted = struct.pack("<Q", new_n) + original[8:]
    elif kind == "bytes":
        (n,) = struct.unpack("<Q", original[:8])
        pos = data.draw(st.integers(8, 8 + n - 1))
        byte = data.draw(st.integers(0, 255))
        corrupted = original[:pos] + bytes([byte]) + original[pos + 1 :]
    elif kind == "truncate":
        corrupted = original[: data.draw(st.integers(0, len(original) - 1))]
    else:
        entry = dict(header[key])
        if kind == "dtype":
            entry["dtype"] = data.draw(st.sampled_from([d for d in DTYPES if d != entry["dtype"]]))
        elif kind == "shape":
            entry["shape"] = data.draw(
                st.lists(st.one_of(st.integers(-3, 300), st.text(max_size=2), st.none()), max_size=4).filter(
                    lambda s: s != header[key]["shape"]
                )
            )
        elif kind == "offsets":
            entry["data_offsets"] = data.draw(
                st.one_of(
                    st.lists(st.integers(-5, len(body) + 5), min_size=0, max_size=3),
                    st.just("0,1"),
                    st.none(),
                ).filter(lambda o: o != header[key]["data_offsets"])
            )
        else:  # the entry itself replaced by something that is not one
            entry = data.draw(st.one_of(st.none(), st.integers(), st.text(max_size=5), st.lists(st.integers())))
        header = dict(header, **{key: entry})
        corrupted = join_safetensors(header, body)
    if corrupted == original:
        return
    must_fail = True
    if kind == "bytes":
        # a changed byte can leave a valid header (padding space -> space, a digit in a name the model does
        # not read): then only "no traceback, exit 0 or 2" holds
        must_fail = False

    def corrupt(ckpt: Path) -> None:
        (ckpt / "model.safetensors").write_bytes(corrupted)

    corrupt.must_fail = must_fail
    compile_copy(tiny, corrupt)


# ---------------------------------------------------------------- sharded index

JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)


@FEW
@given(data=st.data())
def test_fuzz_index(sharded, data):
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    kind = data.draw(st.sampled_from(["bytes", "weight_map", "value", "name"]))
    shard_names = sorted(set(index["weight_map"].values()))
    if kind == "bytes":
        raw = index_path.read_bytes()
        cut = data.draw(st.integers(0, len(raw) - 1))
        text = raw[:cut]
        must_fail = True
    elif kind == "weight_map":
        index["weight_map"] = data.draw(JSONISH.filter(lambda v: not isinstance(v, dict) or v))
        text, must_fail = json.dumps(index).encode(), True
    elif kind == "value":
        key = data.draw(st.sampled_from(sorted(index["weight_map"])))
        index["weight_map"][key] = data.draw(JSONISH.filter(lambda v: v != index["weight_map"][key]))
        text = json.dumps(index).encode()
        must_fail = True
    else:  # a shard name rewritten: elsewhere, escaping, absolute, or another shard
        key = data.draw(st.sampled_from(sorted(index["weight_map"])))
        name = data.draw(
            st.sampled_from(["../" + shard_names[0], "/etc/passwd", "./" + shard_names[0], "", ".", "sub/x"])
            | st.sampled_from(shard_names)
            | st.text(max_size=8)
        )
        # "./name" names the same file; another shard's name makes the tensor missing there
        if index["weight_map"][key] == name or name == "./" + index["weight_map"][key]:
            return
        index["weight_map"][key] = name
        text, must_fail = json.dumps(index).encode(), True

    def corrupt(ckpt: Path) -> None:
        (ckpt / "model.safetensors.index.json").write_bytes(text)

    corrupt.must_fail = must_fail
    compile_copy(sharded, corrupt)


# ---------------------------------------------------------------- config.json

BAD_VALUES = st.one_of(
    st.integers(-(2**40), 0),
    st.integers(2**31, 2**62),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
    st.none(),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@FUZZ
@given(data=st.data())
def test_fuzz_config(tiny, data):
    """One config.json value replaced (or removed); the outcome is exit 0 or 2, never a traceback."""
    config = json.loads((tiny / "config.json").read_text())
    key = data.draw(st.sampled_from(sorted(config)))
    removed = data.draw(st.booleans())
    if removed:
        del config[key]
    else:
        value = data.draw(BAD_VALUES | JSONISH)
        if value == config[key]:
            return
        config[key] = value
    text = data.draw(st.sampled_from([json.dumps(config), json.dumps(config)[:-1], "[]", "null", ""]))

    def corrupt(ckpt: Path) -> None:
        (ckpt / "config.json").write_text(text)

    corrupt.must_fail = False
    compile_copy(tiny, corrupt)


# ---------------------------------------------------------------- engines and manifests


@FUZZ
@given(data=st.data())
def test_fuzz_engine_and_manifest(engine, data):
    """A corrupted manifest (a value replaced, a key removed, bytes cut) or engine file (bytes changed or cut):
    `dsc run` and `dsc inspect` answer exit 0 or 2 in one line; a changed engine byte fails the checksum."""
    manifest_path = engine.with_name("e.manifest.json")
    manifest = json.loads(manifest_path.read_text())
    kind = data.draw(st.sampled_from(["value", "remove", "cut", "engine-byte", "engine-cut"]))
    work = Path(tempfile.mkdtemp(prefix="dsc-fuzz-"))
    try:
        eng, man = work / "e.onnx", work / "e.manifest.json"
        shutil.copy(engine, eng)
        shutil.copy(manifest_path, man)
        must_fail = True
        if kind == "value":
            key = data.draw(st.sampled_from(sorted(manifest)))
            value = data.draw(BAD_VALUES | JSONISH)
            if value == manifest[key]:
                return
            manifest[key] = value
            man.write_text(json.dumps(manifest))
            must_fail = False  # e.g. a different 'params' count still describes a runnable engine
        elif kind == "remove":
            del manifest[data.draw(st.sampled_from(sorted(manifest)))]
            man.write_text(json.dumps(manifest))
            must_fail = False  # optional fields may go
        elif kind == "cut":
            raw = manifest_path.read_bytes()
            man.write_bytes(raw[: data.draw(st.integers(0, len(raw) - 2))])
        else:
            raw = bytearray(engine.read_bytes())
            if kind == "engine-cut":
                raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
            else:
                pos = data.draw(st.integers(0, len(raw) - 1))
                new = data.draw(st.integers(0, 255).filter(lambda b: b != raw[pos]))
                raw[pos] = new
            eng.write_bytes(bytes(raw))
        before = sorted(p.name for p in work.iterdir())
        for argv in (["run", str(eng), "--prompt-ids", "1,2", "--max-new-tokens", "2"], ["inspect", str(eng)]):
            code, err = run_cli(*argv)
            assert "Traceback" not in err, err
            assert code in ((2,) if must_fail and argv[0] == "run" else (0, 2)), (argv, code, err)
            if code == 2:
                assert len(err.strip().splitlines()) == 1 and err.startswith("dsc: error: "), err
            assert sorted(p.name for p in work.iterdir()) == before
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------- flags

TRICKY = st.sampled_from(
    ["", "0", "-1", "1", "3", "1e9", "nan", "inf", "-0", "99999999999999999999", "1,2", "1,,2", "a", "/proc/x", "."]
)


@settings(FUZZ, max_examples=120)
@given(data=st.data())
def test_fuzz_flags(tiny, engine, data):
    """Random values for the flags of run, place and compile: exit 0, 1 (verify's FAIL) or 2, one line, no
    traceback, and a failed compile leaves nothing behind."""
    command = data.draw(st.sampled_from(["run", "place", "compile", "verify", "inspect"]))
    work = Path(tempfile.mkdtemp(prefix="dsc-fuzz-"))
    try:
        (work / "out").mkdir()
        if command == "run":
            flags = ["--max-new-tokens", "--threads", "--timeout", "--ep-size"]
            argv = ["run", str(engine), "--prompt-ids", data.draw(TRICKY | st.just("1,2"))]
        elif command == "place":
            (work / "load.json").write_text("[[1, 2, 3, 4]]")
            flags = ["--ranks", "--slots", "--groups", "--nodes"]
            argv = ["place", "--load", str(work / "load.json"), "-o", str(work / "out" / "p.json")]
            argv += ["--ranks", "2", "--slots", "4"]
        elif command == "verify":
            flags = ["--steps", "--tolerance", "--min-agreement", "--seed", "--prompt-ids"]
            argv = ["verify", str(tiny), str(engine)]
        elif command == "inspect":
            flags = []
            argv = ["inspect", data.draw(TRICKY | st.just(str(engine)) | st.just(str(tiny)))]
        else:
            flags = ["--quantize", "--ep-size", "--max-seq-len", "--passes", "--disable-pass", "--pass-option"]
            flags += ["--placement", "--calibration-prompts", "--moe-lowering", "--backend", "--max-batch"]
            argv = [
                "compile",
                str(tiny),
                "-o",
                str(work / "out" / data.draw(st.sampled_from(["e.onnx", "e.plan", "ep"]))),
            ]
        for flag in data.draw(st.lists(st.sampled_from(flags), max_size=2, unique=True)) if flags else []:
            argv += [flag, data.draw(TRICKY)]
        code, err = run_cli(*argv)
        assert "Traceback" not in err, (argv, err)
        assert code in (0, 1, 2), (argv, code, err)
        if code == 2:
            assert len(err.strip().splitlines()) == 1, (argv, err)
            if command == "compile":
                assert sorted(p.name for p in (work / "out").iterdir()) == [], argv
    finally:
        shutil.rmtree(work, ignore_errors=True)
