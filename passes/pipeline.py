"""The one pass pipeline: a lazy registry of passes by name, a textual spec with options, and the ordering
constraints between passes, stated as data and checked by the pass manager.

Spec syntax (as MLIR / xDSL write it): passes separated by commas, options in braces, option names with
dashes for the dataclass fields' underscores:

    mla-absorb{fold-q=true,fold-o=false},expert-fusion,cleanup

A pass is a frozen dataclass (STYLE.md): its fields are its options. Adding a pass is one module plus one
``REGISTRY`` line (and an ``ORDER`` entry when it must run before or after another pass).
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dsc.errors import CompileError
from dsc.passes.base import Pass

# name -> "module:Class", imported only when the pass is used.
REGISTRY: dict[str, str] = {
    "cleanup": "dsc.passes.cleanup:CleanupPass",
    "mla-absorb": "dsc.passes.mla_absorb:MlaAbsorbPass",
    "expert-fusion": "dsc.passes.expert_fusion:ExpertFusionPass",
    "fp8-quantize": "dsc.passes.fp8_quantize:Fp8QuantizePass",
    "int-quantize": "dsc.passes.int_quantize:IntQuantizePass",
    "expert-placement": "dsc.passes.expert_placement:ExpertPlacementPass",
    "linear-fusion": "dsc.passes.linear_fusion:LinearFusionPass",
}

DEFAULT_PIPELINE: tuple[str, ...] = ("mla-absorb", "expert-fusion", "linear-fusion", "cleanup")


@dataclass(frozen=True)
class Order:
    """``first`` must run before ``then`` whenever both are in a pipeline."""

    first: str
    then: str
    why: str


ORDER: tuple[Order, ...] = (
    Order("fp8-quantize", "expert-fusion", "fp8-quantize rewrites linear nodes; fused experts are no longer linear"),
    Order("mla-absorb", "cleanup", "mla-absorb matches attention blocks as traced; cleanup folds their reshapes"),
    Order("expert-fusion", "cleanup", "cleanup removes what expert-fusion leaves dead"),
    Order("mla-absorb", "int-quantize", "mla-absorb splits kv_b_proj in float; int levels cannot be re-sliced"),
    Order("expert-fusion", "int-quantize", "int-quantize quantizes fused experts stack by stack (QMoE's layout)"),
    Order("expert-placement", "int-quantize", "placement replicates float experts; quantizing after keeps one path"),
    Order("fp8-quantize", "int-quantize", "int-quantize re-expresses FP8 weights; the reverse would lose them"),
    Order(
        "mla-absorb",
        "linear-fusion",
        "without q_lora_rank, q_proj and kv_a_proj read the same input; fused first, mla-absorb's fold-q would no "
        "longer find the query projection",
    ),
    Order("linear-fusion", "int-quantize", "int-quantize quantizes the fused linears as they will run"),
)

# --quantize values and the pass each one adds.
QUANTIZE_PASSES: dict[str, tuple[str, dict[str, str]]] = {
    "fp8": ("fp8-quantize", {}),
    "int8": ("int-quantize", {"bits": "8"}),
    "int4": ("int-quantize", {"bits": "4"}),
}


def check_order(names: Sequence[str]) -> None:
    """Raise CompileError when a pipeline breaks an ``ORDER`` constraint or repeats a pass."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise CompileError(f"pass pipeline: '{name}' appears twice")
        seen.add(name)
    where = {n: i for i, n in enumerate(names)}
    for o in ORDER:
        if o.first in where and o.then in where and where[o.first] > where[o.then]:
            raise CompileError(f"pass pipeline: '{o.first}' must run before '{o.then}' ({o.why})")


# -- the textual spec ----------------------------------------------------------------------------------------
def parse_spec(spec: str) -> list[tuple[str, dict[str, str]]]:
    """``a{x=1,y=2},b`` -> [("a", {"x": "1", "y": "2"}), ("b", {})]. Raises CompileError naming the problem."""
    out: list[tuple[str, dict[str, str]]] = []
    i, n = 0, len(spec)
    while i < n:
        j = i
        while j < n and spec[j] not in ",{}":
            j += 1
        name = spec[i:j].strip()
        if not name:
            raise CompileError(f"pass spec '{spec}': expected a pass name at position {i}")
        options: dict[str, str] = {}
        if j < n and spec[j] == "{":
            close = spec.find("}", j)
            if close < 0:
                raise CompileError(f"pass spec '{spec}': '{{' after {name} is never closed")
            for item in filter(None, (t.strip() for t in spec[j + 1 : close].split(","))):
                key, eq, value = item.partition("=")
                if not eq or not key.strip():
                    raise CompileError(f"pass spec '{spec}': option '{item}' of {name} is not key=value")
                options[key.strip()] = value.strip()
            j = close + 1
        elif j < n and spec[j] == "}":
            raise CompileError(f"pass spec '{spec}': unexpected '}}' at position {j}")
        out.append((name, options))
        if j < n and spec[j] != ",":
            raise CompileError(f"pass spec '{spec}': expected ',' at position {j}")
        i = j + 1
    return out


def format_spec(passes: Sequence[Pass]) -> str:
    """The spec that rebuilds ``passes`` (options that differ from their defaults only)."""
    parts = []
    for p in passes:
        opts = [
            f"{f.name.replace('_', '-')}={_format(getattr(p, f.name))}"
            for f in dataclasses.fields(p)
            if f.default is not dataclasses.MISSING and getattr(p, f.name) != f.default
        ]
        parts.append(p.name + (f"{{{','.join(opts)}}}" if opts else ""))
    return ",".join(parts)


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ";".join(str(v) for v in value)
    return str(value)


def pass_class(name: str) -> type:
    if name not in REGISTRY:
        raise CompileError(f"unknown pass '{name}'; known passes: {', '.join(sorted(REGISTRY))}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def pass_options(name: str) -> dict[str, str]:
    """The options a pass takes (spec spelling) and their types, for help and error messages."""
    cls = pass_class(name)
    hints = typing.get_type_hints(cls)
    return {f.name.replace("_", "-"): str(hints[f.name]) for f in dataclasses.fields(cls) if f.init}


def load_pass(name: str, options: Mapping[str, str] | None = None) -> Pass:
    """Build pass ``name`` with ``options`` given as spec text (converted by the fields' types)."""
    cls = pass_class(name)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, text in (options or {}).items():
        field = key.replace("-", "_")
        if field not in fields:
            known = ", ".join(sorted(pass_options(name))) or "none"
            raise CompileError(f"pass '{name}' has no option '{key}' (its options: {known})")
        kwargs[field] = _convert(cls, name, field, hints[field], text)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise CompileError(f"pass '{name}': {exc}") from None


def _convert(cls: type, name: str, field: str, hint: Any, text: str) -> Any:
    parse = getattr(cls, "parse_option", None)
    if parse is not None:
        value = parse(field, text)
        if value is not NotImplemented:
            return value
    base = typing.get_origin(hint)
    if hint is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise CompileError(f"pass '{name}': option '{field.replace('_', '-')}' must be true or false, not '{text}'")
        return text.lower() in ("true", "1")
    if hint in (int, float):
        try:
            return hint(text)
        except ValueError:
            raise CompileError(f"pass '{name}': option '{field.replace('_', '-')}' must be {hint.__name__}") from None
    if base is tuple:
        return tuple(t for t in text.split(";") if t)
    if hint is str:
        return text
    raise CompileError(f"pass '{name}': option '{field.replace('_', '-')}' cannot be set from text")


# -- building a pipeline -------------------------------------------------------------------------------------
def build_pipeline(
    passes: str | Sequence[str] | None = None,
    disable: Sequence[str] = (),
    *,
    quantize: str | None = None,
    options: Mapping[str, Mapping[str, str]] | None = None,
    extra: Sequence[tuple[str, Mapping[str, str]]] = (),
) -> list[Pass]:
    """The default pipeline, or ``passes`` (a spec string or a list of names), with ``extra`` passes inserted
    where ``ORDER`` wants them (``quantize``: a ``QUANTIZE_PASSES`` key), minus the ``disable``d ones, and ``options``
    ({pass: {option: text}}) applied on top of the spec's own. Checks names, options and order."""
    known = ", ".join(sorted(REGISTRY))
    for name in disable:
        if name not in REGISTRY:
            raise CompileError(f"--disable-pass: unknown pass '{name}'; known passes: {known}")
    for name in options or {}:
        pass_class(name)
    if passes is None:
        entries = [(n, {}) for n in DEFAULT_PIPELINE]
    elif isinstance(passes, str):
        entries = parse_spec(passes)
    else:
        entries = [(n, {}) for n in passes]
    entries = [(n, dict(o)) for n, o in entries]
    if quantize is not None:
        extra = [*extra, QUANTIZE_PASSES[quantize]]
    for name, opts in extra:
        if name not in [n for n, _ in entries]:
            entries.insert(_slot_for(name, [n for n, _ in entries]), (name, dict(opts)))
    for name, opts in (options or {}).items():
        for n, current in entries:
            if n == name:
                current.update(opts)
    entries = [(n, o) for n, o in entries if n not in disable]
    check_order([n for n, _ in entries])
    return [load_pass(n, o) for n, o in entries]


def _slot_for(name: str, names: list[str]) -> int:
    """Where to insert ``name``: before the first pass ORDER says must follow it, else before cleanup, else last."""
    after = [names.index(o.then) for o in ORDER if o.first == name and o.then in names]
    if after:
        return min(after)
    return names.index("cleanup") if "cleanup" in names else len(names)
