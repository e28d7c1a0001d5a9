"""`dsc verify`: an engine against the reference interpreter on the same tokens, step by step."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from dsc.errors import DscError


@dataclass
class VerifyReport:
    max_abs: float = 0.0
    max_rel: float = 0.0
    agreement: float = 1.0
    quantized: str | None = None  # the engine's quantization (manifest), which sets the default bars
    steps: list[dict] = field(default_factory=list)

    def text(self) -> str:
        lines = [f"{'step':>8} {'tokens':>6} {'max abs':>10} {'max rel':>10} {'top-1':>6}"]
        for s in self.steps:
            lines.append(
                f"{s['step']:>8} {s['tokens']:>6} {s['max_abs']:10.3g} {s['max_rel']:10.3g} {s['top1_agree']:6.2f}"
            )
        lines.append(f"max abs {self.max_abs:.3g}, max rel {self.max_rel:.3g}, top-1 agreement {self.agreement:.3f}")
        return "\n".join(lines)


# (max relative logit error, min teacher-forced top-1 agreement) per engine quantization: exact engines must
# match the reference to float32 rounding; quantized ones are judged by agreement (issue 11's bars).
BARS: dict[str | None, tuple[float | None, float]] = {
    None: (1e-4, 1.0),
    "fp8": (None, 0.97),
    "int8": (None, 0.97),
    "int4": (None, 0.90),
}


def default_bars(quantized: str | None) -> tuple[float | None, float]:
    return BARS.get(quantized, BARS[None])


def compare_logits(engine_logits: np.ndarray, ref_logits: np.ndarray) -> tuple[float, float, np.ndarray]:
    """(max abs error, max abs error / max |reference|, per-position top-1 agreement)."""
    diff = float(np.abs(engine_logits - ref_logits).max())
    scale = float(np.abs(ref_logits).max()) or 1.0
    agree = engine_logits.argmax(-1) == ref_logits.argmax(-1)
    return diff, diff / scale, agree


def verify_engine(model: Path, engine_path: Path, *, prompt: Sequence[int] | None, steps: int, seed: int = 0):
    from dsc.engine_format import read_manifest
    from dsc.frontends.checkpoint import Checkpoint
    from dsc.frontends.loader import trace_checkpoint
    from dsc.frontends.trace import empty_cache, step_feeds
    from dsc.ir.interpreter import Interpreter
    from dsc.prompts import check_ids
    from dsc.runtime.engine import load_engine

    # the inputs first (headers, config.json, manifest, prompt), then the work (engine session, tracing)
    checkpoint = Checkpoint.open(model)
    cfg = checkpoint.config
    if read_manifest(engine_path).config != cfg.to_dict():
        raise DscError(f"{engine_path}: the engine was compiled from a model with a different config than {model}")
    if prompt is None:
        prompt = torch.randint(0, cfg.vocab_size, (16,), generator=torch.Generator().manual_seed(seed)).tolist()
    check_ids([prompt], cfg.vocab_size, "--prompt-ids")
    engine = load_engine(engine_path)
    checkpoint, graph = trace_checkpoint(checkpoint)
    ref = Interpreter(graph)
    ref_past = empty_cache(graph, 1)
    eng_past = [c.empty(1) for c in engine.cache]
    report = VerifyReport(quantized=engine.manifest.quantized)
    agreements: list[np.ndarray] = []
    ids = list(prompt)
    new = list(prompt)
    for step in range(steps + 1):
        start = len(ids) - len(new)
        input_ids = np.asarray([new], dtype=np.int64)
        positions = np.arange(start, len(ids), dtype=np.int64)[None, :]
        out = ref.run(step_feeds(graph, input_ids, positions, ref_past))
        ref_logits = out["logits"].numpy()
        ref_past = {c.past: out[c.present] for c in graph.cache_entries()}
        eng_logits, eng_past = engine.step(input_ids, positions, eng_past)
        abs_err, rel_err, agree = compare_logits(eng_logits, ref_logits)
        report.steps.append(
            {
                "step": "prefill" if step == 0 else f"decode{step}",
                "tokens": len(new),
                "max_abs": abs_err,
                "max_rel": rel_err,
                "top1_agree": float(agree.mean()),
            }
        )
        report.max_abs, report.max_rel = max(report.max_abs, abs_err), max(report.max_rel, rel_err)
        agreements.append(agree.reshape(-1))
        nxt = int(ref_logits[0, -1].argmax())  # both sides are fed the reference's greedy choice
        ids.append(nxt)
        new = [nxt]
    report.agreement = float(np.concatenate(agreements).mean())
    return report
