"""FP8 engines against fp32 engines on a *trained* DeepSeek-V3-architecture model and held-out text.

The model (tests/data/tiny_trained, ~1M parameters, byte vocabulary) was trained by tools/train_tiny.py on
the Python standard library; tests/data/heldout.txt comes from files it never saw. Both engines prefill the
first 512 windows of 128 bytes of it (65,536 positions, 65,024 of them with a next byte to score).

Measured on the checkpoint retrained for 5000 steps (held-out top-1 next-byte accuracy 67%): top-1 agreement
98.15% over all 65,536 positions (95% Wilson interval 98.05-98.25%, window bootstrap 98.03-98.26%); perplexity
3.7370 fp32 vs 3.7390 FP8 (+0.05%); mean KL(fp32 || FP8) 3.8e-3 nats per position (99.9th percentile 0.51).
The disagreements sit where the fp32 model itself hesitates: median top-2 logit margin 0.04 there vs 1.71 overall.
The issue's bar, 99% agreement overall, does not hold: the whole interval lies below it, and the 1500-step
checkpoint measured 98.4% (24 windows: 97.8%), so training longer did not close the gap. That test is a strict
xfail stating the measurement; the perplexity and KL bounds hold with room.
"""

from pathlib import Path

import numpy as np
import pytest
from accuracy import bootstrap_interval, kl_divergence, next_token_eval, perplexity, token_windows, wilson_interval
from dsc.commands.compile import CompileOptions, compile_model
from dsc.ir.ops import dequantize
from dsc.runtime.engine import OnnxEngine

DATA = Path(__file__).parent / "data"
WINDOWS, WINDOW, BATCH = 512, 128, 32
KL_BOUND = 1e-2  # nats per position, mean; measured 3.8e-3


@pytest.fixture(scope="module")
def evaluations(tmp_path_factory):
    out = tmp_path_factory.mktemp("fp8acc")
    windows = token_windows((DATA / "heldout.txt").read_text(), WINDOW, WINDOWS)
    results = {}
    for name, options in {"fp32": CompileOptions(), "fp8": CompileOptions(quantize="fp8")}.items():
        summary = compile_model(DATA / "tiny_trained", out / f"{name}.onnx", options)
        engine = OnnxEngine(summary.output, threads=1)
        logits, _ = next_token_eval(
            engine.step, lambda b, cache=engine.cache: [c.empty(b) for c in cache], windows, BATCH
        )
        results[name] = (logits, summary.engine_bytes)
    return windows, results


@pytest.fixture(scope="module")
def metrics(evaluations):
    windows, results = evaluations
    fp32, fp8 = results["fp32"][0], results["fp8"][0]
    agree = fp8.argmax(-1) == fp32.argmax(-1)  # [windows, positions]
    kl = kl_divergence(fp32, fp8)
    ppl32, ppl8 = perplexity(fp32, windows), perplexity(fp8, windows)
    top2 = np.sort(fp32, axis=-1)[..., -2:]
    margin = top2[..., 1] - top2[..., 0]
    m = dict(
        positions=agree.size,
        agreement=float(agree.mean()),
        wilson=wilson_interval(int(agree.sum()), agree.size),
        bootstrap=bootstrap_interval(agree),
        ppl32=ppl32,
        ppl8=ppl8,
        ppl_change=ppl8 / ppl32 - 1,
        kl_mean=float(kl.mean()),
        kl_p999=float(np.quantile(kl, 0.999)),
        disagree_margin=float(np.median(margin[~agree])) if (~agree).any() else float("nan"),
        margin=float(np.median(margin)),
    )
    print(
        f"\nfp8 vs fp32 over {m['positions']:,} positions: top-1 agreement {m['agreement']:.4%} "
        f"(95% Wilson {m['wilson'][0]:.4%}-{m['wilson'][1]:.4%}, window bootstrap "
        f"{m['bootstrap'][0]:.4%}-{m['bootstrap'][1]:.4%}); perplexity {ppl32:.4f} -> {ppl8:.4f} "
        f"({m['ppl_change']:+.3%}); KL(fp32||fp8) mean {m['kl_mean']:.2e} nats, 99.9th percentile "
        f"{m['kl_p999']:.2e}; median fp32 top-2 margin {m['margin']:.3f} overall, {m['disagree_margin']:.3f} "
        "where they disagree"
    )
    return m


def test_evaluation_is_large_enough(metrics):
    assert metrics["positions"] >= 50_000
    lo, hi = metrics["wilson"]
    assert hi - lo < 0.005  # the sample pins agreement down to well under the 1% the bar allows


@pytest.mark.xfail(
    strict=True,
    reason="measured 98.15% top-1 agreement over 65,536 held-out positions (95% CI 98.05-98.25%), below the 99% bar",
)
def test_fp8_top1_agreement_is_at_least_99_percent_overall(metrics):
    assert metrics["agreement"] >= 0.99, metrics


def test_fp8_keeps_perplexity_and_distribution(metrics):
    assert metrics["agreement"] >= 0.97, metrics  # the floor this test held before retraining; measured 98.15%
    assert abs(metrics["ppl_change"]) <= 0.01, metrics
    assert metrics["kl_mean"] <= KL_BOUND, metrics
    assert metrics["ppl32"] < 4.2  # measured 3.737: the model is trained (uniform over bytes would be 256)


def test_fp8_engine_is_smaller(evaluations):
    _, results = evaluations
    # Embeddings and lm_head stay fp32 (they dominate this tiny model); the rest shrinks about 4x.
    assert results["fp8"][1] < 0.75 * results["fp32"][1]


def test_quantization_error_per_weight_is_small():
    from dsc.frontends.loader import load_graph
    from dsc.passes.fp8_quantize import Fp8QuantizePass

    _, graph = load_graph(DATA / "tiny_trained")
    g = Fp8QuantizePass().run(graph).graph
    for name, w in g.weights.items():
        if w.value.type.dtype.value == "float8_e4m3fn":
            original = graph.weights[name].load()
            restored = dequantize(w.load(), g.weights[name + "_scale_inv"].load())
            assert (restored - original).norm() / original.norm() < 0.05, name
