"""The one ordered pass pipeline, with a lazy registry so passes can be chosen by name.

Ordering constraints (checked by the manager through each pass's ``requires``):
- mla-absorb matches the attention blocks exactly as the frontend traces them, so it runs first.
- fp8-quantize (off by default; `dsc compile --quantize fp8`) runs before expert-fusion, which then stacks
  FP8 expert weights with their scales.
- expert-fusion matches the per-expert FFN branches as traced (independent of mla-absorb).
- cleanup runs last: rewrites leave dead nodes and foldable reshapes behind.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

from dsc.errors import CompileError
from dsc.passes.base import Pass

# name -> "module:Class", imported only when the pass is used.
REGISTRY: dict[str, str] = {
    "cleanup": "dsc.passes.cleanup:CleanupPass",
    "mla-absorb": "dsc.passes.mla_absorb:MlaAbsorbPass",
    "expert-fusion": "dsc.passes.expert_fusion:ExpertFusionPass",
    "fp8-quantize": "dsc.passes.fp8_quantize:Fp8QuantizePass",
}

DEFAULT_PIPELINE: tuple[str, ...] = ("mla-absorb", "expert-fusion", "cleanup")


def load_pass(name: str) -> Pass:
    if name not in REGISTRY:
        raise CompileError(f"unknown pass '{name}'; known passes: {', '.join(sorted(REGISTRY))}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)()


def build_pipeline(
    passes: Sequence[str] | None = None, disable: Sequence[str] = (), *, quantize: bool = False
) -> list[Pass]:
    """The default pipeline (with fp8-quantize when ``quantize``), or the given pass names, minus the disabled
    ones (names are checked)."""
    for name in disable:
        if name not in REGISTRY:
            raise CompileError(f"--disable-pass: unknown pass '{name}'; known passes: {', '.join(sorted(REGISTRY))}")
    names = list(DEFAULT_PIPELINE if passes is None else passes)
    if quantize and "fp8-quantize" not in names:
        names.insert(names.index("expert-fusion") if "expert-fusion" in names else len(names) - 1, "fp8-quantize")
    return [load_pass(n) for n in names if n not in disable]
