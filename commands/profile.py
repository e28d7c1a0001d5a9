"""`dsc profile`: count how many tokens each routed expert receives, per MoE layer, on calibration prompts.

The counts are what expert placement balances (DESIGN.md §6). The model runs in dsc's reference interpreter,
so profiling needs no engine and sees exactly the routing the engines compute.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from dsc.errors import DscError
from dsc.ir.graph import Node, Op
from tqdm import tqdm

log = logging.getLogger("dsc")


def profile_expert_load(model: Path, prompts: list[list[int]]) -> dict:
    from dsc.frontends.checkpoint import Checkpoint
    from dsc.frontends.loader import trace_checkpoint
    from dsc.frontends.trace import step_feeds
    from dsc.ir.interpreter import Interpreter
    from dsc.prompts import check_ids

    checkpoint = Checkpoint.open(model)
    check_ids(prompts, checkpoint.config.vocab_size, "prompts")  # before tracing: a bad id must not cost a run
    checkpoint, graph = trace_checkpoint(checkpoint)
    routes = [n for n in graph.nodes if n.op == Op.MOE_ROUTE]
    if not routes:
        raise DscError(f"{model}: the model has no MoE layers to profile")
    layer_of = {n.name: graph.layer_of(n) for n in routes}
    experts = routes[0].attrs["num_experts"]
    counts = {n.name: np.zeros(experts, dtype=np.int64) for n in routes}

    def observe(node: Node, outputs: list[torch.Tensor]) -> None:
        if node.op == Op.MOE_ROUTE:
            counts[node.name] += np.bincount(outputs[1].reshape(-1).numpy(), minlength=experts)

    interp = Interpreter(graph, observe=observe)
    tokens = 0
    quiet = not log.isEnabledFor(logging.INFO)
    for ids in tqdm(prompts, desc="profiling", unit="prompt", disable=quiet or None):
        interp.run(step_feeds(graph, torch.tensor([ids]), torch.arange(len(ids))[None]))
        tokens += len(ids)
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
