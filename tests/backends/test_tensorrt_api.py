"""API drift between the TensorRT versions dsc supports, checked without a GPU: every attribute name dsc's TensorRT
code uses is recorded (tests/data/tensorrt_api.json, made by tools/tensorrt_api_names.py from each version's
``tensorrt-cu12-bindings`` string table) as present or absent per version. A name present in one supported version
and absent in another must be on GUARDED, with the code path that keeps it away from the version that lacks it."""

import ast
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from dsc.errors import CompileError

ROOT = Path(__file__).resolve().parents[2]
RECORD = json.loads((ROOT / "tests" / "data" / "tensorrt_api.json").read_text())

# Names in some supported versions only, and why dsc never reaches them on the others.
GUARDED = {
    "PREFER_PRECISION_CONSTRAINTS": "fp16/bf16 flags of weakly typed networks; _set_precision refuses them on 11.x",
    "set_output_type": "the same fp16/bf16 path (routers pinned to fp32), refused on 11.x first",
    "ranges": "not TensorRT's: Profiles.ranges, a dsc dataclass field (a word of 10.13's docstrings)",
    "__version__": "the tensorrt package's own, set by its __init__, not in the bindings' string table",
}


def _used_names() -> set[str]:
    names = set()
    for rel in RECORD["sources"]:
        for node in ast.walk(ast.parse((ROOT / rel).read_text())):
            if isinstance(node, ast.Attribute):
                names.add(node.attr)
    return names


def test_record_covers_every_name_the_code_uses():
    missing = sorted(_used_names() - set(RECORD["names"]))
    assert not missing, f"new names {missing}: rerun tools/tensorrt_api_names.py for every supported version"


def test_names_missing_from_a_supported_version_are_guarded():
    versions = {v: set(names) for v, names in RECORD["versions"].items()}
    assert (
        len(versions) >= 2 and any(v.startswith("10.") for v in versions) and any(v.startswith("11.") for v in versions)
    )
    everywhere = set.intersection(*versions.values())
    somewhere = set.union(*versions.values())
    drift = sorted(somewhere - everywhere)
    assert [n for n in drift if n not in GUARDED] == [], "TensorRT API drift: guard these names or stop using them"
    core = {"build_serialized_network", "create_execution_context", "set_input_shape", "execute_async_v3"}
    assert core <= everywhere & _used_names()


def test_weak_typing_precisions_are_refused_before_any_11x_only_gap():
    """On TensorRT 11 (no BuilderFlag.BF16), fp16/bf16 fail with one CompileError before the guarded calls."""
    from dsc.backends.tensorrt import _set_precision

    trt11 = SimpleNamespace(BuilderFlag=SimpleNamespace(TF32=1), __version__="11.4.0", float32="f32")

    class Untouchable:
        def __getattr__(self, name):
            raise AssertionError(f"{name} reached on TensorRT 11")

    with pytest.raises(CompileError, match="strongly typed networks only; precision bf16 needs TensorRT 10"):
        _set_precision(trt11, Untouchable(), Untouchable(), "bf16", False, ("router",))
