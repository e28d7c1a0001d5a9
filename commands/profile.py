"""`dsc profile`: count how many tokens each routed expert receives, per MoE layer, on calibration prompts.

The counts are what expert placement balances (DESIGN.md §6). The model runs in dsc's reference interpreter,
so profiling needs no engine and sees exactly the routing the engines compute.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from dsc.errors import DscError
from dsc.ir.graph import Node, Op


def read_prompt_file(path: Path, vocab: int, tokenizer_path: Path | None) -> list[list[int]]:
    """Lines of comma-separated token ids, or plain text (tokenized with the checkpoint's tokenizer.json)."""
    try:
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DscError(f"{path}: cannot read prompts: {exc}") from exc
    if not lines:
        raise DscError(f"{path}: no prompts")
    try:
        prompts = [[int(t) for t in ln.split(",")] for ln in lines]
    except ValueError:
        if tokenizer_path is None:
            raise DscError(f"{path}: lines are not token ids and the checkpoint has no tokenizer.json") from None
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tokenizer_path))
        prompts = [tok.encode(ln).ids for ln in lines]
    bad = [max(p) for p in prompts if p and max(p) >= vocab]
    if bad or any(not p for p in prompts):
        raise DscError(f"{path}: token ids must be non-empty lists below the vocabulary size {vocab}")
    return prompts


def profile_expert_load(model: Path, prompts: list[list[int]], log: Callable[[str], None] = print) -> dict:
    from dsc.frontends.loader import load_graph
    from dsc.frontends.trace import empty_cache
    from dsc.ir.interpreter import Interpreter

    checkpoint, graph = load_graph(model)
    routes = [n for n in graph.nodes if n.op == Op.MOE_ROUTE]
    if not routes:
        raise DscError(f"{model}: the model has no MoE layers to profile")
    layer_of = {n.name: int(n.name.split("/")[0].split(".")[1]) for n in routes}
    experts = routes[0].attrs["num_experts"]
    counts = {n.name: np.zeros(experts, dtype=np.int64) for n in routes}

    def observe(node: Node, outputs: list[torch.Tensor]) -> None:
        if node.op == Op.MOE_ROUTE:
            counts[node.name] += np.bincount(outputs[1].reshape(-1).numpy(), minlength=experts)

    interp = Interpreter(graph, observe=observe)
    tokens = 0
    for i, ids in enumerate(prompts, start=1):
        feeds = {
            "input_ids": torch.tensor([ids]),
            "position_ids": torch.arange(len(ids))[None],
            **empty_cache(graph, 1),
        }
        interp.run(feeds)
        tokens += len(ids)
        log(f"  prompt {i}/{len(prompts)}: {len(ids)} tokens")
    return {
        "format": "dsc-expert-load",
        "model_type": checkpoint.config.model_type,
        "layers": [layer_of[n.name] for n in routes],
        "experts": experts,
        "top_k": routes[0].attrs["top_k"],
        "tokens": tokens,
        "load": [counts[n.name].tolist() for n in routes],
    }


def write_load(result: dict, out: Path) -> None:
    from dsc.files import atomic_write_bytes

    atomic_write_bytes(out, (json.dumps(result, indent=1) + "\n").encode())
