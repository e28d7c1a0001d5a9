"""int8 / int4 engines against the fp32 engine on the *trained* checkpoint and held-out text (as
tests/test_fp8_accuracy.py does for FP8): 512 windows of 128 bytes, 65,536 positions.

The issue's bars: int8 top-1 agreement >= 99.5% and perplexity within 0.5%; int4 perplexity within 3%, agreement
reported. Measured (onnxruntime 1.32, default blocks of 128):
- int8: agreement 98.51% (95% Wilson 98.41-98.60%), perplexity +0.03%, mean KL 2.9e-3 nats;
- int4: agreement 91.74% (91.53-91.95%), perplexity +1.73%, mean KL 2.9e-2 nats.
The int8 agreement bar is missed: what costs it is onnxruntime's int8 *activations* (accuracy level 4, where the
speed comes from): the same int8 weights with float32 activations (level 0, 8-bit MatMulNBits then 12-35x
slower than float32) agree 99.23% (99.35% in blocks of 32, 99.47% with the experts dequantized as well). Linear
blocks of 32 would give 98.89% at int8 activations, but decode 1.5x slower (passes/int_quantize.py). As for FP8
(98.15%), the disagreements sit on near-ties of this byte-level model. The agreement test stays at the asked bar as
a strict xfail stating the measurement.
"""

from pathlib import Path

import pytest
from accuracy import kl_divergence, next_token_eval, perplexity, token_windows, wilson_interval
from dsc.commands.compile import CompileOptions, compile_model
from dsc.runtime.engine import OnnxEngine

DATA = Path(__file__).parent / "data"
WINDOWS, WINDOW, BATCH = 512, 128, 32


@pytest.fixture(scope="module")
def evaluations(tmp_path_factory):
    out = tmp_path_factory.mktemp("intacc")
    windows = token_windows((DATA / "heldout.txt").read_text(), WINDOW, WINDOWS)
    logits = {}
    for name in ("none", "int8", "int4"):
        summary = compile_model(DATA / "tiny_trained", out / f"{name}.onnx", CompileOptions(quantize=name))
        engine = OnnxEngine(summary.output, threads=1)
        logits[name], _ = next_token_eval(
            engine.step, lambda b, cache=engine.cache: [c.empty(b) for c in cache], windows, BATCH
        )
    return windows, logits


def _metrics(evaluations, name: str) -> dict:
    windows, logits = evaluations
    ref, got = logits["none"], logits[name]
    agree = got.argmax(-1) == ref.argmax(-1)
    m = {
        "positions": agree.size,
        "agreement": float(agree.mean()),
        "wilson": wilson_interval(int(agree.sum()), agree.size),
        "ppl_change": perplexity(got, windows) / perplexity(ref, windows) - 1,
        "kl": float(kl_divergence(ref, got).mean()),
    }
    print(
        f"\n{name} vs fp32 over {m['positions']:,} positions: top-1 agreement {m['agreement']:.4%} (95% Wilson "
        f"{m['wilson'][0]:.4%}-{m['wilson'][1]:.4%}), perplexity {m['ppl_change']:+.3%}, mean KL {m['kl']:.2e}"
    )
    return m


def test_int8_perplexity_and_kl(evaluations):
    m = _metrics(evaluations, "int8")
    assert m["positions"] >= 50_000
    assert abs(m["ppl_change"]) <= 0.005
    assert m["kl"] <= 6e-3  # measured 2.9e-3
    assert m["agreement"] >= 0.97  # dsc verify's default bar for int8 engines; measured 98.51%


@pytest.mark.xfail(
    strict=True,
    reason="measured 98.51% (95% Wilson 98.41-98.60%) with onnxruntime's int8 activations; 99.23% with float32 "
    "activations (too slow to ship): the bar of 99.5% is not met (module docstring)",
)
def test_int8_top1_agreement_is_at_least_99_5_percent(evaluations):
    assert _metrics(evaluations, "int8")["agreement"] >= 0.995


def test_int4_perplexity_within_3_percent_and_agreement(evaluations):
    m = _metrics(evaluations, "int4")
    assert abs(m["ppl_change"]) <= 0.03
    assert m["agreement"] >= 0.90  # dsc verify's default bar for int4 engines; measured 91.7%
    assert m["kl"] <= 5e-2  # measured 2.9e-2
