"""The reference interpreter: runs any IR graph with the ops' torch reference implementations."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from dsc.ir.graph import Graph, Node
from dsc.ir.ops import run_op
from dsc.ir.types import bind_dims


class Interpreter:
    """Runs a graph; weights load once and stay cached for repeated calls (decode loops)."""

    def __init__(self, graph: Graph, observe: Callable[[Node, list[torch.Tensor]], None] | None = None) -> None:
        """``observe(node, outputs)`` is called after each node runs (profiling, debugging)."""
        self.graph = graph
        self.observe = observe
        self._weights: dict[str, torch.Tensor] = {}

    def weight(self, name: str) -> torch.Tensor:
        if name not in self._weights:
            self._weights[name] = self.graph.weights[name].load()
        return self._weights[name]

    @torch.no_grad()
    def run(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        env: dict[str, torch.Tensor] = {}
        dims: dict[str, int] = {}
        for v in self.graph.inputs:
            if v.name not in feeds:
                raise KeyError(f"missing input {v.name}")
            t = feeds[v.name]
            problem = bind_dims(v.type.shape, tuple(t.shape), dims)
            if problem or t.dtype != v.type.dtype.torch:
                raise ValueError(f"input {v.name}: got {t.dtype}{list(t.shape)}, expected {v.type} ({problem})")
            env[v.name] = t
        for name in self.graph.weights:
            env[name] = self.weight(name)
        users_left: dict[str, int] = {}
        for node in self.graph.nodes:
            for v in node.inputs:
                users_left[v.name] = users_left.get(v.name, 0) + 1
        keep = {v.name for v in self.graph.outputs} | set(self.graph.weights)
        for node in self.graph.nodes:
            outs = run_op(node.op, [env[v.name] for v in node.inputs], node.attrs)
            if self.observe is not None:
                self.observe(node, outs)
            for v, t in zip(node.outputs, outs, strict=True):
                env[v.name] = t
            for v in node.inputs:  # free intermediates as soon as their last user ran
                users_left[v.name] -= 1
                if users_left[v.name] == 0 and v.name not in keep:
                    env.pop(v.name, None)
        return {v.name: env[v.name] for v in self.graph.outputs}


def interpret(graph: Graph, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return Interpreter(graph).run(feeds)
