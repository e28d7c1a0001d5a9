"""API drift between the TensorRT versions dsc supports, checked without a GPU: every attribute name dsc's TensorRT
code uses is recorded (tests/data/tensorrt_api.json, made by tools/tensorrt_api_names.py from each version's
``tensorrt-cu12-bindings`` string table) as present or absent per version. A name present in one supported version
and absent in another must be on GUARDED, with the code path that keeps it away from the version that lacks it."""

import ast
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RECORD = json.loads((ROOT / "tests" / "data" / "tensorrt_api.json").read_text())

# Names in some supported versions only, and why dsc never reaches them on the others.
GUARDED = {
    "ranges": "not TensorRT's: Profiles.ranges, a dsc dataclass field (a word of 10.13's docstrings)",
    "__version__": "the tensorrt package's own, set by its __init__, not in the bindings' string table",
}
# Weak typing, gone from TensorRT 11 (its string table keeps some of these words in docstrings, so the record cannot
# show their removal): dsc builds strongly typed networks and must not use them at all.
WEAK_TYPING = {"FP16", "BF16", "FP8", "set_output_type", "PREFER_PRECISION_CONSTRAINTS", "OBEY_PRECISION_CONSTRAINTS"}


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


def test_no_weak_typing_api_is_used():
    assert _used_names() & WEAK_TYPING == set()
    assert {"NetworkDefinitionCreationFlag", "STRONGLY_TYPED"} <= _used_names()
