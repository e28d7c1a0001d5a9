"""Expert-parallel execution on torch.distributed (gloo on CPU, nccl on GPU): one process per rank.

Every rank runs the dense segments on all tokens. At each MoE layer the tokens are owned round-robin by the
ranks (token t by rank t % R); each owner sends every (token, chosen expert) pair to the rank holding a replica
of that expert — replicas of one expert split the tokens between them (t % replicas) — with all-to-all, the
expert ranks run their local experts and send the weighted outputs back with a second all-to-all, the owners
sum them, and an all-reduce gives every rank the layer's MoE output. Collectives carry a timeout, so a rank that
dies surfaces as an error on the others instead of a hang.
"""

from __future__ import annotations

import datetime
import os
import socket
import traceback
from pathlib import Path

import numpy as np
import torch
from dsc.engine_format import Manifest, read_manifest
from dsc.errors import EngineError
from dsc.runtime.engine import ort_session


def read_ep_manifest(path: Path) -> Manifest:
    """The manifest of an expert-parallel engine directory (EngineError for anything else)."""
    path = Path(path)
    if not path.is_dir():
        raise EngineError(f"{path}: not an expert-parallel engine directory")
    manifest = read_manifest(path)
    if manifest.expert_parallel is None:
        raise EngineError(f"{path}: the manifest describes no expert-parallel engine")
    return manifest


class EpEngine:
    """One rank's share of an expert-parallel engine, behind the same ``step`` as every other engine."""

    def __init__(self, directory: Path, rank: int, world: int, threads: int = 1) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.dir, self.rank, self.world = Path(directory), rank, world
        self.manifest = read_ep_manifest(self.dir)
        self.ep = ep = self.manifest.expert_parallel
        if ep.ranks != world:
            raise EngineError(f"{self.dir}: compiled for {ep.ranks} ranks, running {world}")
        self._check_same_engine()
        self.cache = self.manifest.cache
        self.segments = [ort_session(self.dir / s.file, threads) for s in ep.segments]
        self.experts = [ort_session(self.dir / f, threads) for f in ep.rank_files[rank]]
        self.placement = ep.placement

    def _check_same_engine(self) -> None:
        """All ranks must run the same compiled engine and placement (a mismatch fails everywhere, at once)."""
        mine = torch.tensor([int(self.manifest.checksum[:15], 16)], dtype=torch.int64)
        every = [torch.zeros_like(mine) for _ in range(self.world)]
        self.dist.all_gather(every, mine)
        if len({int(t) for t in every}) != 1:
            raise EngineError(
                f"rank {self.rank}: ranks loaded different engines or placements "
                f"(checksums {[hex(int(t)) for t in every]})"
            )

    def step(self, input_ids, position_ids, past) -> tuple[np.ndarray, list[np.ndarray]]:
        env: dict[str, np.ndarray] = {"input_ids": input_ids, "position_ids": position_ids}
        env.update({c.input: np.asarray(p) for c, p in zip(self.cache, past, strict=True)})
        for k, (seg, spec) in enumerate(zip(self.segments, self.ep.segments, strict=True)):
            outs = seg.run(list(spec.outputs), {i.name: env[i.name] for i in spec.inputs})
            env.update(zip(spec.outputs, outs, strict=True))
            if k < len(self.ep.moe_layers):
                cut = self.ep.moe_layers[k]
                env[cut.output] = self._moe(k, env[cut.x], env[cut.weights], env[cut.experts])
        return env["logits"], [env[c.output] for c in self.cache]

    def _moe(self, k: int, x: np.ndarray, weights: np.ndarray, experts: np.ndarray) -> np.ndarray:
        dist, world = self.dist, self.world
        hidden, top_k = x.shape[-1], experts.shape[-1]
        xs = torch.from_numpy(np.ascontiguousarray(x.reshape(-1, hidden)))
        ws = weights.reshape(-1, top_k)
        es = experts.reshape(-1, top_k)
        owned = np.arange(self.rank, xs.shape[0], world)
        # (token, weight, destination rank, local slot) for every pair this rank owns, grouped by destination
        rows = []
        for t in owned:
            for j in range(top_k):
                slots = self.placement.replicas(k, int(es[t, j]))
                slot = slots[t % len(slots)]
                per = self.placement.slots_per_rank
                rows.append((t, ws[t, j], slot // per, slot % per))
        rows.sort(key=lambda r: r[2])
        send_counts = torch.tensor([sum(1 for r in rows if r[2] == d) for d in range(world)], dtype=torch.int64)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts)
        tokens = np.asarray([r[0] for r in rows], dtype=np.int64)
        send_x = xs[tokens] if rows else torch.zeros(0, hidden)
        send_meta = torch.tensor([[r[1], r[3]] for r in rows], dtype=torch.float32).reshape(-1, 2)
        n_in = int(recv_counts.sum())
        recv_x, recv_meta = torch.empty(n_in, hidden), torch.empty(n_in, 2)
        splits_out, splits_in = send_counts.tolist(), recv_counts.tolist()
        dist.all_to_all_single(recv_x, send_x.contiguous(), splits_in, splits_out)
        dist.all_to_all_single(recv_meta, send_meta, splits_in, splits_out)
        if n_in:
            (y,) = self.experts[k].run(
                ["y"],
                {
                    "x": recv_x.numpy(),
                    "weight": recv_meta[:, :1].numpy(),
                    "slot": recv_meta[:, 1:].numpy().astype(np.int64),
                },
            )
            y = torch.from_numpy(y)
        else:
            y = torch.zeros(0, hidden)
        back = torch.empty(len(rows), hidden)
        dist.all_to_all_single(back, y.contiguous(), splits_out, splits_in)
        out = torch.zeros_like(xs)
        if rows:
            out.index_add_(0, torch.from_numpy(tokens), back)
        dist.all_reduce(out)
        return out.numpy().reshape(x.shape)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, directory: str, job: dict, results, timeout_s: float) -> None:
    import torch.distributed as dist

    try:
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        if os.environ.get("DSC_EP_TEST_DIE_RANK") == str(rank):  # failure-injection hook for tests
            os._exit(3)
        engine = EpEngine(Path(directory), rank, world)
        from dsc.runtime.generate import generate

        result = generate(engine, job["prompts"], job["max_new_tokens"], keep_logits=job.get("keep_logits", False))
        if rank == 0:
            results.put(("ok", rank, result))
        dist.barrier()
        dist.destroy_process_group()
    except Exception as exc:  # report every rank's failure as one line to the parent
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if os.environ.get("DSC_EP_DEBUG"):
            message += "\n" + traceback.format_exc()
        results.put(("error", rank, message))


def run_expert_parallel(
    directory: Path,
    world: int,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    keep_logits: bool = False,
    timeout_s: float = 60.0,
):
    """Spawn ``world`` processes, generate on all of them, return rank 0's Generation. Raises EngineError naming
    every rank that failed (a dead rank makes the others time out on their next collective)."""
    import torch.multiprocessing as mp

    ranks = read_ep_manifest(directory).expert_parallel.ranks
    if ranks != world:
        raise EngineError(f"{directory}: compiled for {ranks} ranks; run it with --ep-size {ranks}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    job = {"prompts": prompts, "max_new_tokens": max_new_tokens, "keep_logits": keep_logits}
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world, port, str(directory), job, results, timeout_s))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout_s * 4)
    for p in procs:
        if p.is_alive():
            p.kill()
    outcome, errors = None, {}
    while not results.empty():
        kind, rank, payload = results.get()
        if kind == "ok":
            outcome = payload
        else:
            errors[rank] = payload
    dead = [r for r, p in enumerate(procs) if p.exitcode not in (0, None) and r not in errors]
    for r in dead:
        errors[r] = f"exited with code {procs[r].exitcode}"
    if errors:
        detail = "; ".join(f"rank {r}: {m}" for r, m in sorted(errors.items()))
        raise EngineError(f"{directory}: expert-parallel run failed on {len(errors)} of {world} ranks ({detail})")
    if outcome is None:
        raise EngineError(f"{directory}: expert-parallel run produced no result")
    return outcome


def run_under_torchrun(directory: Path, prompts: list[list[int]], max_new_tokens: int, *, timeout_s: float = 60.0):
    """Under torchrun (RANK / WORLD_SIZE / MASTER_ADDR in the environment): this process is one rank. Returns
    rank 0's Generation, None on the other ranks."""
    import torch.distributed as dist
    from dsc.runtime.generate import generate

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
    try:
        result = generate(EpEngine(Path(directory), rank, world), prompts, max_new_tokens)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return result if rank == 0 else None
