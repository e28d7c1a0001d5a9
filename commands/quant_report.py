"""`dsc compile --report`: how much FP8 quantization changed the weights, and (with calibration prompts) the
logits, measured against the unquantized model."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from dsc.errors import DscError
from dsc.ir.graph import Graph, Stacked
from dsc.ir.ops import dequantize
from dsc.passes.fp8_quantize import _Quantized

_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def _quantized_pairs(graph: Graph) -> Iterator[tuple[str, _Quantized, _Quantized]]:
    """(name, values source, scales source) for every weight the fp8-quantize pass produced."""
    sources = {name: w.source for name, w in graph.weights.items()}
    for name, src in sources.items():
        if name.endswith("_scale_inv") or "_scale_inv." in name:
            continue
        scale = sources.get(f"{name}_scale_inv") or sources.get(name.replace(".stacked", "_scale_inv.stacked"))
        if isinstance(src, _Quantized) and isinstance(scale, _Quantized):
            yield name, src, scale
        elif isinstance(src, Stacked) and isinstance(scale, Stacked):
            for i, (v, s) in enumerate(zip(src.parts, scale.parts, strict=True)):
                if isinstance(v, _Quantized):
                    yield name.replace("experts.", f"experts.{i}.").replace(".stacked", ".weight"), v, s


def weight_errors(graph: Graph) -> list[tuple[str, float]]:
    """Relative Frobenius error ||dequant(q) - w|| / ||w|| of each quantized weight."""
    out = []
    for name, values, scales in _quantized_pairs(graph):
        original = values.source.load().float()
        restored = dequantize(values.load(), scales.load())
        out.append((name, float((restored - original).norm() / original.norm().clamp_min(1e-30))))
    return out


def per_layer(errors: list[tuple[str, float]]) -> list[str]:
    layers: dict[str, list[float]] = {}
    for name, err in errors:
        m = _LAYER.match(name)
        layers.setdefault(f"layer {m.group(1)}" if m else "other", []).append(err)
    lines = [f"{'layer':>10} {'weights':>8} {'mean rel err':>13} {'max rel err':>12}"]
    for layer, errs in sorted(layers.items(), key=lambda kv: (len(kv[0]), kv[0])):
        lines.append(f"{layer:>10} {len(errs):>8} {np.mean(errs):>13.4%} {np.max(errs):>12.4%}")
    return lines


def read_prompts(path: Path) -> list[list[int]]:
    try:
        lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
        prompts = [[int(t) for t in ln.split(",")] for ln in lines]
    except (OSError, ValueError) as exc:
        raise DscError(f"{path}: calibration prompts must be lines of comma-separated token ids ({exc})") from exc
    if not prompts:
        raise DscError(f"{path}: no calibration prompts")
    return prompts


def calibration(reference: Graph, engine, prompts: list[list[int]]) -> tuple[float, float]:
    """(max relative logit error, top-1 agreement) of the engine against the reference graph, prompt by prompt."""
    from dsc.frontends.trace import empty_cache
    from dsc.ir.interpreter import Interpreter

    ref = Interpreter(reference)
    errors, agree = [], []
    for ids in prompts:
        arr = np.asarray([ids], dtype=np.int64)
        pos = np.arange(len(ids))[None].copy()
        feeds = {"input_ids": torch.from_numpy(arr), "position_ids": torch.from_numpy(pos), **empty_cache(reference, 1)}
        want = ref.run(feeds)["logits"].numpy()
        got, _ = engine.step(arr, pos, [c.empty(1) for c in engine.cache])
        errors.append(float(np.abs(got - want).max() / np.abs(want).max()))
        agree.append(got.argmax(-1) == want.argmax(-1))
    return max(errors), float(np.concatenate([a.reshape(-1) for a in agree]).mean())
