"""Train a tiny DeepSeek-V3 checkpoint on the Python standard library's source, so accuracy tests mean something.

    python tools/train_tiny.py --out tests/data/tiny_trained --steps 5000 --seed 0 \
        --heldout-text tests/data/heldout.txt

The model is transformers' DeepseekV3ForCausalLM with every V3 feature on (q_lora_rank, MLA, YaRN rope, sigmoid
noaux_tc routing with 2 expert groups, a shared expert, a dense first layer) and a byte-level vocabulary: token id
= byte value, so any text encodes without a trained tokenizer. The corpus is this interpreter's stdlib ``*.py``
files, sorted by relative path; files whose index % 10 == 0 are held out. transformers does not train the router's
``e_score_correction_bias`` (a buffer); this script updates it with DeepSeek-V3's auxiliary-loss-free rule
(paper §2.1.2): after every step, bias_e += rate * sign(mean load - load_e), loads counted over the step's tokens.

Output: config.json + model.safetensors (float32, as save_pretrained writes them), tokenizer.json (byte level,
ids = byte values) and README.md (how it was trained). transformers is a tooling dependency only.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

VOCAB = 256  # token id = byte value


def stdlib_files() -> tuple[Path, list[Path]]:
    """The stdlib's own *.py files (installed packages excluded), sorted by path relative to the stdlib root."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [f for f in root.rglob("*.py") if not {"site-packages", "dist-packages"} & set(f.relative_to(root).parts)]
    return root, sorted(files, key=lambda f: f.relative_to(root).as_posix())


def load_corpus() -> tuple[np.ndarray, np.ndarray, list[Path]]:
    """(train bytes, held-out bytes, held-out files): every file whose sorted index % 10 == 0 is held out."""
    _, files = stdlib_files()
    train, held, held_files = [], [], []
    for i, f in enumerate(files):
        (held if i % 10 == 0 else train).append(f.read_bytes())
        if i % 10 == 0:
            held_files.append(f)
    return np.frombuffer(b"".join(train), np.uint8), np.frombuffer(b"".join(held), np.uint8), held_files


def tiny_config(context: int):
    """A DeepSeek-V3 config with every feature on, ~1M parameters; hidden 128 so FP8 128x128 blocks are whole."""
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=384,  # the dense layer
        moe_intermediate_size=64,
        num_hidden_layers=3,
        first_k_dense_replace=1,  # layer 0 dense, layers 1-2 MoE
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=128,
        kv_lora_rank=128,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        max_position_embeddings=4 * context,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": context,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, the alphabet of tokenizers' ByteLevel pre-tokenizer."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_tokenizer():
    """A tokenizers Tokenizer whose ids are the UTF-8 byte values of the text (a BPE with no merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    for text in ("def f():", "x = 'é'\n\tpass"):
        ids = tok.encode(text).ids
        assert ids == list(text.encode()), (text, ids)
        assert tok.decode(ids) == text, text
    return tok


def sample_windows(data: np.ndarray, rng: np.random.Generator, batch: int, length: int) -> torch.Tensor:
    starts = rng.integers(0, len(data) - length, size=batch)
    return torch.from_numpy(np.stack([data[s : s + length] for s in starts]).astype(np.int64))


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


class LoadBalancer:
    """DeepSeek-V3's auxiliary-loss-free balancing: count each router's expert picks during training forwards,
    then nudge e_score_correction_bias towards the under-loaded experts."""

    def __init__(self, model, rate: float) -> None:
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

        self.rate = rate
        self.routers = [m for m in model.modules() if isinstance(m, DeepseekV3TopkRouter)]
        self.loads = [torch.zeros(r.num_experts) for r in self.routers]
        for i, router in enumerate(self.routers):
            router.register_forward_hook(self._hook(i))

    def _hook(self, i: int):
        def record(module, args, output) -> None:
            if module.training:
                self.loads[i] += torch.bincount(output[2].flatten(), minlength=module.num_experts).float()

        return record

    @torch.no_grad()
    def update(self) -> float:
        """Apply the rule and reset the counts; returns the worst max/mean load seen this step."""
        imbalance = 0.0
        for router, load in zip(self.routers, self.loads, strict=True):
            if self.rate:
                router.e_score_correction_bias += self.rate * torch.sign(load.mean() - load)
            imbalance = max(imbalance, float(load.max() / load.mean().clamp(min=1)))
            load.zero_()
        return imbalance


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch: int) -> tuple[float, float]:
    """(mean next-byte loss in nats, top-1 next-byte accuracy) over the windows."""
    model.eval()
    loss = hits = 0.0
    for i in range(0, len(windows), batch):
        ids = windows[i : i + batch]
        logits = model(ids[:, :-1]).logits
        loss += float(F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="sum"))
        hits += float((logits.argmax(-1) == ids[:, 1:]).sum())
    model.train()
    positions = windows[:, 1:].numel()
    return loss / positions, hits / positions


def heldout_excerpt(files: list[Path], target_bytes: int) -> str:
    """Whole lines from the start of consecutive held-out files (ASCII-clean ones, the first 80 lines of each), at
    most target_bytes long. Deterministic given the Python version; a longer target extends a shorter one's text."""
    lines: list[str] = []
    size = 0
    for f in files[1:]:  # files[0] is __future__.py's licence-heavy header; any held-out file would do
        try:
            text = f.read_text(encoding="ascii")
        except (UnicodeDecodeError, ValueError):
            continue
        for line in text.splitlines(keepends=True)[:80]:
            if size + len(line) > target_bytes:
                return "".join(lines)
            lines.append(line)
            size += len(line)
    return "".join(lines)


def write_readme(out: Path, argv: list[str], report: dict) -> None:
    r = report
    curve = ", ".join(f"{step} {loss:.3f}" for step, loss in r["curve"])
    heldout = (
        f"""- `{r["heldout_text"]}` ({r["heldout_text_bytes"]:,} bytes, written by the same command): the first 80 lines
  of each ASCII-only held-out file (sorted index % 10 == 0, skipping the first, `__future__.py`), whole lines, in
  order, until {r["heldout_text_target"]:,} bytes; none of it was trained on.
"""
        if r["heldout_text"]
        else ""
    )
    (out / "README.md").write_text(
        f"""# tiny_trained — a trained tiny DeepSeek-V3 checkpoint for accuracy tests

Written by `tools/train_tiny.py`; rerun with

    python {" ".join(argv)}

- architecture: transformers `DeepseekV3ForCausalLM`, {r["params"]:,} parameters, 3 layers (layer 0 dense,
  layers 1-2 MoE: 8 routed experts in 2 groups, top-2 of 1 group, 1 shared expert, sigmoid noaux_tc routing),
  MLA with q_lora_rank 128 and kv_lora_rank 128, YaRN rope (factor 4 over {r["context"]} positions), hidden 128,
  byte vocabulary (token id = byte value; `tokenizer.json` is a byte-level BPE with no merges).
- data: the Python {r["python"]} standard library's `*.py` files ({r["files"]} files, site-packages excluded),
  sorted by relative path; index % 10 != 0 trains ({r["train_bytes"]:,} bytes), index % 10 == 0 is held out
  ({r["heldout_bytes"]:,} bytes).
- training: {r["steps"]} steps of AdamW (lr {r["lr"]}, cosine to 10%, {r["warmup"]} warmup steps, weight decay 0.01,
  clip 1.0), batch {r["batch"]} random windows of {r["context"]} tokens, seed {r["seed"]}, float32, CPU with
  {r["threads"]} thread(s), {r["train_s"]:.0f} s.
- router bias: `e_score_correction_bias` updated with DeepSeek-V3's auxiliary-loss-free rule after every step
  (bias += {r["bias_rate"]} * sign(mean load - load)); max/mean expert load in the last step {r["imbalance"]:.2f}.
- final loss (nats/byte): train {r["train_loss"]:.3f}, held-out {r["heldout_loss"]:.3f} (held-out perplexity
  {math.exp(r["heldout_loss"]):.2f}; uniform would be 256); top-1 next-byte accuracy train {r["train_acc"]:.1%},
  held-out {r["heldout_acc"]:.1%}; measured on {r["eval_windows"]} fixed random windows of {r["context"]} bytes each
  ({r["eval_windows"] * r["context"]:,} positions).
- held-out loss during training (every {r["eval_every"]} steps): {curve}.
  Over the last 20% of steps (from step {r["plateau_step"]}) it went {r["plateau_from"]:.4f} -> {r["heldout_loss"]:.4f}
  ({r["plateau_gain"]:.1%} better).
{heldout}"""
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--bias-rate", type=float, default=1e-3, help="aux-loss-free bias step (0 leaves it zero)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--eval-windows", type=int, default=256)
    p.add_argument("--heldout-text", type=Path, help="also write held-out text here (for tests)")
    p.add_argument("--heldout-bytes", type=int, default=66 * 1024, help="size of --heldout-text")
    a = p.parse_args(argv)

    from transformers import DeepseekV3ForCausalLM

    # One thread by default: on a 2-core machine shared with other jobs, two OpenMP threads stall each other
    # (steps measured 0.08 s idle but up to 10x slower under load); one thread steadily takes ~0.14 s.
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    train, held, held_files = load_corpus()
    eval_rng = np.random.default_rng(12345)  # the same evaluation windows whatever the seed
    train_eval = sample_windows(train, eval_rng, a.eval_windows, a.context + 1)
    held_eval = sample_windows(held, eval_rng, a.eval_windows, a.context + 1)

    config = tiny_config(a.context)
    model = DeepseekV3ForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    print(f"{params:,} parameters; train {len(train):,} bytes, held-out {len(held):,} bytes", flush=True)
    balancer = LoadBalancer(model, a.bias_rate)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, a.steps // 20)

    def lr_at(step: int) -> float:  # linear warmup, then cosine from lr down to lr / 10
        if step < warmup:
            return a.lr * step / warmup
        return a.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, a.steps - warmup))))

    start = time.perf_counter()
    imbalance = 0.0
    curve: list[tuple[int, float]] = []  # (step, held-out loss)
    plateau_step = a.steps - a.steps // 5  # the plateau check compares the last 20% of steps
    for step in range(1, a.steps + 1):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = lm_loss(model, sample_windows(train, rng, a.batch, a.context + 1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        imbalance = balancer.update()
        if step % a.eval_every == 0 or step in (plateau_step, a.steps):
            held_loss, held_acc = evaluate(model, held_eval, a.batch)
            curve.append((step, held_loss))
            print(
                f"step {step:5d}  loss {loss.item():.3f}  held-out {held_loss:.3f} (top-1 {held_acc:.3f})  "
                f"max/mean load {imbalance:.2f}  {time.perf_counter() - start:.0f}s",
                flush=True,
            )
    train_s = time.perf_counter() - start
    (train_loss, train_acc), (held_loss, held_acc) = evaluate(model, train_eval, a.batch), (held_loss, held_acc)
    plateau_from = dict(curve)[plateau_step]
    print(
        f"final: train loss {train_loss:.4f} (top-1 {train_acc:.4f}), held-out loss {held_loss:.4f} "
        f"(top-1 {held_acc:.4f}, perplexity {math.exp(held_loss):.2f}); held-out loss at step {plateau_step} "
        f"{plateau_from:.4f}, {1 - held_loss / plateau_from:.2%} better since"
    )

    excerpt = heldout_excerpt(held_files, a.heldout_bytes) if a.heldout_text else ""
    if a.heldout_text:
        a.heldout_text.write_text(excerpt)
    a.out.mkdir(parents=True, exist_ok=True)
    model.config._attn_implementation = "eager"  # keep config.json free of the training-only sdpa choice
    model.save_pretrained(a.out, safe_serialization=True)
    byte_tokenizer().save(str(a.out / "tokenizer.json"))
    write_readme(
        a.out,
        ["tools/train_tiny.py", *(argv if argv is not None else sys.argv[1:])],
        dict(
            params=params,
            context=a.context,
            python=platform.python_version(),
            files=len(stdlib_files()[1]),
            train_bytes=len(train),
            heldout_bytes=len(held),
            steps=a.steps,
            lr=a.lr,
            warmup=warmup,
            batch=a.batch,
            seed=a.seed,
            threads=a.threads,
            train_s=train_s,
            bias_rate=a.bias_rate,
            imbalance=imbalance,
            train_loss=train_loss,
            heldout_loss=held_loss,
            train_acc=train_acc,
            heldout_acc=held_acc,
            eval_windows=a.eval_windows,
            eval_every=a.eval_every,
            curve=curve,
            plateau_step=plateau_step,
            plateau_from=plateau_from,
            plateau_gain=1 - held_loss / plateau_from,
            heldout_text=a.heldout_text.as_posix() if a.heldout_text else None,
            heldout_text_bytes=len(excerpt.encode()),
            heldout_text_target=a.heldout_bytes,
        ),
    )
    sizes = {f.name: f.stat().st_size for f in sorted(a.out.iterdir())}
    print(json.dumps(sizes), f"total {sum(sizes.values()):,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
