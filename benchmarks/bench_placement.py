"""Expert placement balance: this pass vs DeepSeek's EPLB vs no balancing vs the lower bound (DESIGN.md §6).

    python benchmarks/bench_placement.py [--layers 3] [--seed 0]

Each case is a seeded [layers][experts] token-count matrix (tokens sampled from a skewed expert
distribution, experts shuffled per layer). Columns are max / mean rank load (1.000 is perfect), averaged over
the case's layers; "none" puts expert s % E in slot s. A layer where this pass's max / mean is within 1e-9 of
EPLB's is a tie.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from dsc.placement.search import eplb_baseline, place_experts

# (skew, experts, ranks, slots, groups, nodes); skew is "uniform", "zipf<s>" or "hot<share>"
CASES = [
    ("uniform", 8, 2, 8, 1, 1),
    ("zipf1.0", 8, 4, 12, 1, 1),
    ("hot0.5", 8, 8, 16, 1, 1),
    ("zipf1.5", 16, 8, 16, 1, 1),
    ("zipf0.5", 16, 4, 20, 1, 1),
    ("hot0.3", 16, 4, 24, 4, 2),
    ("uniform", 32, 8, 40, 1, 1),
    ("zipf1.0", 32, 8, 48, 4, 2),
    ("zipf1.5", 32, 16, 48, 1, 1),
    ("zipf0.5", 64, 8, 72, 8, 4),
    ("zipf1.0", 64, 16, 80, 8, 2),
    ("hot0.3", 64, 16, 64, 1, 1),
    ("zipf1.5", 64, 32, 96, 1, 1),
    ("uniform", 128, 16, 144, 8, 4),
    ("zipf1.0", 128, 32, 160, 1, 1),
    ("zipf0.5", 128, 64, 192, 8, 8),
    ("hot0.2", 128, 8, 136, 8, 2),
    ("zipf1.0", 256, 8, 288, 8, 2),
    ("zipf0.5", 256, 32, 288, 8, 4),
    ("zipf1.5", 256, 64, 320, 1, 1),
    ("uniform", 256, 64, 256, 8, 8),
    ("hot0.1", 256, 32, 256, 8, 4),
    ("zipf1.0", 256, 16, 256, 1, 1),
    ("zipf1.5", 12, 6, 12, 4, 2),
]


def expert_load(skew: str, experts: int, layers: int, rng: np.random.Generator) -> np.ndarray:
    """Tokens routed to each expert: 64 per expert on average, drawn from the skewed distribution."""
    rows = []
    for _ in range(layers):
        if skew == "uniform":
            p = np.full(experts, 1.0)
        elif skew.startswith("zipf"):
            p = 1.0 / np.arange(1, experts + 1) ** float(skew[4:])
        else:  # one expert takes the share, the rest split the remainder evenly
            share = float(skew[3:])
            p = np.full(experts, (1 - share) / (experts - 1))
            p[0] = share
        rows.append(rng.multinomial(64 * experts, rng.permutation(p / p.sum())))
    return np.asarray(rows, dtype=np.float64)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    head = f"{'case':>4} {'skew':>8} {'experts':>7} {'ranks':>5} {'slots':>5} {'groups/nodes':>12}"
    print(f"{head} {'none':>7} {'EPLB':>7} {'dsc':>7} {'bound':>7} {'dsc s':>6}")
    wins = ties = losses = 0
    gaps, eplb_gaps, total_s = [], [], 0.0
    for i, (skew, experts, ranks, slots, groups, nodes) in enumerate(CASES):
        load = expert_load(skew, experts, args.layers, rng)
        opts = dict(slots=slots, ranks=ranks, nodes=nodes, groups=groups)
        base = eplb_baseline(load, **opts)
        start = time.perf_counter()
        ours = place_experts(load, **opts)
        seconds = time.perf_counter() - start
        total_s += seconds
        for b, o in zip(base.balance, ours.balance, strict=True):
            wins, ties, losses = wins + (o < b - 1e-9), ties + (abs(o - b) <= 1e-9), losses + (o > b + 1e-9)
        gaps += [o / lb - 1 for o, lb in zip(ours.balance, ours.lower_bound, strict=True)]
        eplb_gaps += [b / lb - 1 for b, lb in zip(base.balance, ours.lower_bound, strict=True)]
        cols = [np.mean(x) for x in (ours.unbalanced, base.balance, ours.balance, ours.lower_bound)]
        figures = " ".join(f"{c:>7.3f}" for c in cols)
        shape = f"{i:>4} {skew:>8} {experts:>7} {ranks:>5} {slots:>5} {f'{groups}/{nodes}':>12}"
        print(f"{shape} {figures} {seconds:>6.2f}", flush=True)
    layers = len(gaps)
    print(
        f"summary over {len(CASES)} cases, {layers} layers: dsc beats EPLB on {wins}, ties {ties}, loses {losses}; "
        f"mean gap to the lower bound {100 * np.mean(gaps):.2f}% (EPLB {100 * np.mean(eplb_gaps):.2f}%), "
        f"max {100 * np.max(gaps):.2f}%; layers within 1% of the bound {sum(g <= 0.01 for g in gaps)}/{layers}; "
        f"dsc {total_s:.1f} s"
    )


if __name__ == "__main__":
    main()
