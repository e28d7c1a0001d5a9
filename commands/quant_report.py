"""`dsc compile --report`: how much quantization (fp8, int8, int4) changed the weights, per layer and format,
and (with calibration prompts) the logits, measured against the unquantized model."""

from __future__ import annotations

import numpy as np
from dsc.ir.graph import Graph
from dsc.passes.base import QuantizedWeight


def weight_errors(graph: Graph) -> list[tuple[QuantizedWeight, float]]:
    """Relative Frobenius error ||restored - w|| / ||w|| of each weight a quantization pass recorded."""
    out = []
    for q in graph.meta.get("quantized_weights", ()):
        original = q.original.load().float()
        restored = q.restore()
        out.append((q, float((restored - original).norm() / original.norm().clamp_min(1e-30))))
    return out


def per_layer(errors: list[tuple[QuantizedWeight, float]]) -> list[str]:
    """One line per (layer, format); weights outside the layers (embedding, lm_head) under their own names."""
    layers: dict[tuple[int, str, str], list[float]] = {}
    for q, err in errors:
        where = f"layer {q.layer}" if q.layer is not None else q.name.removesuffix(".weight").split(".")[-1]
        layers.setdefault((-1 if q.layer is None else q.layer, where, q.format), []).append(err)
    lines = [f"{'where':>12} {'format':<32} {'weights':>8} {'mean rel err':>13} {'max rel err':>12}"]
    for (_, where, fmt), errs in sorted(layers.items()):
        lines.append(f"{where:>12} {fmt:<32} {len(errs):>8} {np.mean(errs):>13.4%} {np.max(errs):>12.4%}")
    return lines


def calibration(reference: Graph, engine, prompts: list[list[int]]) -> tuple[float, float]:
    """(max relative logit error, top-1 agreement) of the engine against the reference graph, prompt by prompt."""
    from dsc.frontends.trace import step_feeds
    from dsc.ir.interpreter import Interpreter

    ref = Interpreter(reference)
    errors, agree = [], []
    for ids in prompts:
        arr = np.asarray([ids], dtype=np.int64)
        pos = np.arange(len(ids))[None].copy()
        want = ref.run(step_feeds(reference, arr, pos))["logits"].numpy()
        got, _ = engine.step(arr, pos, [c.empty(1) for c in engine.cache])
        errors.append(float(np.abs(got - want).max() / np.abs(want).max()))
        agree.append(got.argmax(-1) == want.argmax(-1))
    return max(errors), float(np.concatenate([a.reshape(-1) for a in agree]).mean())
