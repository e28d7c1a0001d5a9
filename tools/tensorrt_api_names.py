"""Record which TensorRT Python API names dsc uses exist in each supported TensorRT version, without a GPU.

    python tools/tensorrt_api_names.py 10.13.3.9 11.4.0.106 > tests/data/tensorrt_api.json

The ``tensorrt-cu12-bindings`` wheel (about 1.2 MB per version) installs here although TensorRT's libraries do not;
the identifiers in its ``tensorrt.so`` string table include every Python-visible class, method, attribute and enum
member name (DESIGN.md §8). For each version given, this downloads the wheel (pip download, no install), reads those
identifiers, and writes which of the names dsc's TensorRT code uses (every attribute name in backends/tensorrt*.py and
runtime/tensorrt_engine.py) are present. tests/backends/test_tensorrt_api.py checks the code against that record.
A name found in a string table may also be a word of a docstring, so presence is an upper bound: removals whose name
survives in text (BuilderFlag.FP16 in 11.x) are not seen; those the table does lose (set_output_type,
PREFER_PRECISION_CONSTRAINTS) are.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("backends/tensorrt.py", "backends/tensorrt_support.py", "runtime/tensorrt_engine.py")


def used_names() -> list[str]:
    names: set[str] = set()
    for rel in SOURCES:
        for node in ast.walk(ast.parse((ROOT / rel).read_text())):
            if isinstance(node, ast.Attribute):
                names.add(node.attr)
    return sorted(names)


def identifiers(version: str, workdir: Path) -> set[str]:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", f"tensorrt-cu12-bindings=={version}", "-d"]
    subprocess.run([*cmd, str(workdir)], check=True)
    wheel = next(workdir.glob(f"tensorrt_cu12_bindings-{version}-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        blob = z.read(next(n for n in z.namelist() if n.endswith("tensorrt.so")))
    return {x.decode() for x in re.findall(rb"[A-Za-z_][A-Za-z0-9_]{1,80}", blob)}


def main() -> None:
    versions = sys.argv[1:]
    if not versions:
        sys.exit(__doc__)
    names = used_names()
    record = {"sources": list(SOURCES), "names": names, "versions": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for version in versions:
            have = identifiers(version, Path(tmp))
            record["versions"][version] = sorted(n for n in names if n in have)
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
