"""Compile every preset and every transformers test config through the CLI and print the sha256 of each engine file.

Refactors must leave engines byte-identical: run this before and after and diff the two JSON files.

    python tools/engine_hashes.py -o before.json [--bench]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

VARIANTS: dict[str, list[str]] = {
    "default": [],
    "naive": ["--disable-pass", "mla-absorb"],
    "gather": ["--moe-lowering", "gather"],
    "fp8": ["--quantize", "fp8"],
}


def _dsc(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "dsc.cli", *args], check=True, stdout=subprocess.DEVNULL)


def _hash_files(out: Path) -> dict[str, str]:
    files = sorted(p for p in (out.rglob("*") if out.is_dir() else out.parent.glob(out.stem + "*")) if p.is_file())
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in files
        if not p.name.endswith(".json")  # manifests carry versions and may change shape
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("--bench", action="store_true", help="also the 432 MB bench preset (slow)")
    a = ap.parse_args()
    from hf_reference import HF_CONFIGS, save_hf_checkpoint

    hashes: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpts: dict[str, Path] = {}
        for preset in ["tiny"] + (["bench"] if a.bench else []):
            ckpts[preset] = tmp / preset
            _dsc("make-model", preset, "-o", str(ckpts[preset]))
        ckpts["tiny-fp8-sharded"] = tmp / "tiny-fp8-sharded"
        _dsc("make-model", "tiny", "-o", str(ckpts["tiny-fp8-sharded"]), "--fp8", "--shards", "3")
        for name in HF_CONFIGS:
            ckpts[name] = save_hf_checkpoint(name, tmp / name)
        for name, ckpt in ckpts.items():
            for variant, flags in VARIANTS.items():
                if name == "bench" and variant not in ("default", "fp8"):
                    continue
                out = tmp / "out" / f"{name}-{variant}" / "model.onnx"
                out.parent.mkdir(parents=True)
                _dsc("compile", str(ckpt), "-o", str(out), *flags)
                hashes[f"{name}/{variant}"] = _hash_files(out)
                print(name, variant, flush=True)
            out = tmp / "out" / f"{name}-ep2"
            _dsc("compile", str(ckpt), "-o", str(out), "--ep-size", "2")
            hashes[f"{name}/ep2"] = _hash_files(out)
    a.output.write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
