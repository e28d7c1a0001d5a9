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
import queue
import signal
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from dsc.engine_format import Manifest, full_mask, read_manifest
from dsc.errors import EngineError
from dsc.ir.graph import ATTENTION_MASK
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

    def __init__(
        self, directory: Path, rank: int, world: int, threads: int = 1, progress: RankProgress | None = None
    ) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.progress = progress
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
        self._collective(self.dist.all_gather, every, mine)
        if len({int(t) for t in every}) != 1:
            raise EngineError(
                f"rank {self.rank}: ranks loaded different engines or placements "
                f"(checksums {[hex(int(t)) for t in every]})"
            )

    def step(self, input_ids, position_ids, past, attention_mask=None) -> tuple[np.ndarray, list[np.ndarray]]:
        if attention_mask is None:
            attention_mask = full_mask(input_ids, past, self.cache)
        env: dict[str, np.ndarray] = {
            "input_ids": input_ids,
            "position_ids": position_ids,
            ATTENTION_MASK: np.ascontiguousarray(attention_mask, dtype=np.int64),
        }
        env.update({c.input: np.asarray(p) for c, p in zip(self.cache, past, strict=True)})
        for k, (seg, spec) in enumerate(zip(self.segments, self.ep.segments, strict=True)):
            outs = seg.run(list(spec.outputs), {i.name: env[i.name] for i in spec.inputs})
            env.update(zip(spec.outputs, outs, strict=True))
            if k < len(self.ep.moe_layers):
                cut = self.ep.moe_layers[k]
                env[cut.output] = self._moe(k, env[cut.x], env[cut.weights], env[cut.experts])
        if self.progress is not None:
            self.progress.step()
        return env["logits"], [env[c.output] for c in self.cache]

    def _collective(self, op, *args) -> None:
        """Run one collective, marking its start and end for the parent's watch on hung ranks."""
        if self.progress is not None:
            self.progress.beat()
        op(*args)
        if self.progress is not None:
            self.progress.beat()

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
        self._collective(dist.all_to_all_single, recv_counts, send_counts)
        tokens = np.asarray([r[0] for r in rows], dtype=np.int64)
        send_x = xs[tokens] if rows else torch.zeros(0, hidden)
        send_meta = torch.tensor([[r[1], r[3]] for r in rows], dtype=torch.float32).reshape(-1, 2)
        n_in = int(recv_counts.sum())
        recv_x, recv_meta = torch.empty(n_in, hidden), torch.empty(n_in, 2)
        splits_out, splits_in = send_counts.tolist(), recv_counts.tolist()
        self._collective(dist.all_to_all_single, recv_x, send_x.contiguous(), splits_in, splits_out)
        self._collective(dist.all_to_all_single, recv_meta, send_meta, splits_in, splits_out)
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
        self._collective(dist.all_to_all_single, back, y.contiguous(), splits_out, splits_in)
        out = torch.zeros_like(xs)
        if rows:
            out.index_add_(0, torch.from_numpy(tokens), back)
        self._collective(dist.all_reduce, out)
        return out.numpy().reshape(x.shape)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RankProgress:
    """What one rank has done, in memory the parent reads while the rank runs: engine steps finished, and the
    time of its last collective boundary (entered or left). The parent tells a rank that stopped moving from one
    that waits in a collective by the second, and reports steps to ``on_progress`` by the first."""

    def __init__(self, steps, beats, rank: int) -> None:
        self.steps, self.beats, self.rank = steps, beats, rank

    def beat(self) -> None:
        self.beats[self.rank] = time.monotonic()

    def step(self) -> None:
        self.steps[self.rank] += 1
        self.beat()


def _collective_error(exc: Exception, timeout_s: float) -> str:
    """One line for a failed gloo collective: timeouts and lost peers in words, gloo's own text after them."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    gloo = text.split("] ", 1)[-1] if text.startswith("[") else text  # drop gloo's "[file.cc:123] " prefix
    gloo = gloo.split(". ", 1)[0].rstrip(".")  # and its advice after the first sentence
    if "timed out" in text.lower() or "timeout" in text.lower():
        return f"a collective timed out after {timeout_s:g} s: a peer rank is hung or too slow ({gloo})"
    if "closed" in text.lower() or "reset" in text.lower() or "broken pipe" in text.lower():
        return f"lost the connection to a peer rank: it died ({gloo})"
    return gloo


def _die_with_parent() -> None:
    """Linux: the kernel kills this rank when the process that started it dies, so no rank outlives a killed run."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker(rank: int, world: int, port: int, directory: str, job: dict, results, progress, timeout_s: float) -> None:
    import torch.distributed as dist

    _die_with_parent()
    if not os.environ.get("DSC_EP_DEBUG"):  # c10d logs failures with C++ stack frames; the parent reports in one line
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
    progress = RankProgress(*progress, rank)
    try:
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        progress.beat()
        engine = EpEngine(Path(directory), rank, world, progress=progress)
        from dsc.runtime.generate import generate

        result = generate(engine, job["prompts"], job["max_new_tokens"], keep_logits=job.get("keep_logits", False))
        if rank == 0:
            results.put(("ok", rank, result))
        progress.beat()
        dist.barrier()
        dist.destroy_process_group()
    except RuntimeError as exc:  # gloo's failures (DistBackendError and plain RuntimeError)
        results.put(("error", rank, _with_debug(_collective_error(exc, timeout_s))))
    except Exception as exc:  # report every rank's failure as one line to the parent
        results.put(("error", rank, _with_debug(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)))


def _with_debug(message: str) -> str:
    return message + "\n" + traceback.format_exc() if os.environ.get("DSC_EP_DEBUG") else message


@dataclass(frozen=True)
class RankStep:
    """``on_progress``'s argument: rank ``rank`` (process ``pid``) has finished ``steps`` engine steps (prefill: 1)."""

    rank: int
    pid: int
    steps: int


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def _is_stopped(pid: int) -> bool:
    """Linux: the process is stopped by a signal (SIGSTOP, ^Z) or a tracer; False where /proc cannot tell."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


def run_expert_parallel(
    directory: Path,
    world: int,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    keep_logits: bool = False,
    timeout_s: float = 60.0,
    on_progress: Callable[[RankStep], None] | None = None,
):
    """Spawn ``world`` processes, generate on all of them, return rank 0's Generation. Raises EngineError naming
    every rank that failed and how.

    The parent reads the ranks' results while they run (a result bigger than a pipe buffer would otherwise block
    rank 0's exit and deadlock a join). Once one rank fails, every other rank gets ``timeout_s`` from its last
    collective boundary to fail on its own (gloo's timeout), then is killed; no rank outlives the call."""
    import torch.multiprocessing as mp

    ranks = read_ep_manifest(directory).expert_parallel.ranks
    if ranks != world:
        raise EngineError(f"{directory}: compiled for {ranks} ranks; run it with --ep-size {ranks}")
    if not timeout_s > 0:
        raise EngineError(f"--timeout must be positive seconds, got {timeout_s:g}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    steps, beats = ctx.Array("q", world, lock=False), ctx.Array("d", world, lock=False)
    job = {"prompts": prompts, "max_new_tokens": max_new_tokens, "keep_logits": keep_logits}
    port = _free_port()
    procs = [
        ctx.Process(
            target=_worker, args=(r, world, port, str(directory), job, results, (steps, beats), timeout_s), daemon=True
        )
        for r in range(world)
    ]
    outcome, errors = None, {}
    try:
        for r, p in enumerate(procs):
            beats[r] = time.monotonic()
            p.start()
        outcome, errors = _supervise(procs, results, steps, beats, timeout_s, on_progress)
    finally:  # reached on success, on failure and on ^C: no rank outlives the call
        started = [p for p in procs if p.pid is not None]
        for p in started:
            if p.is_alive():
                p.kill()
        for p in started:
            p.join()
        results.close()
    if errors:
        detail = "; ".join(f"rank {r}: {m}" for r, m in sorted(errors.items()))
        raise EngineError(f"{directory}: expert-parallel run failed on {len(errors)} of {world} ranks ({detail})")
    if outcome is None:
        raise EngineError(f"{directory}: expert-parallel run produced no result")
    return outcome


_GRACE_S = 2.0  # after a failure: time for a rank past its own collective timeout to report before it is killed


def _supervise(procs, results, steps, beats, timeout_s: float, on_progress):
    """Read results as they come and watch the ranks until every one has exited; kill the ones that outlive a
    failure by more than the collective timeout. Returns (rank 0's result or None, {rank: one-line error})."""
    outcome, errors, seen = None, {}, [0] * len(procs)
    launched, failed_at = list(beats), None
    while True:
        try:
            kind, rank, payload = results.get(timeout=0.05)
            if kind == "ok":
                outcome = payload
            else:
                errors.setdefault(rank, payload)
        except queue.Empty:
            pass
        for r, p in enumerate(procs):
            if on_progress is not None and steps[r] != seen[r]:
                seen[r] = steps[r]
                on_progress(RankStep(r, p.pid, seen[r]))
            if p.exitcode not in (0, None) and r not in errors:
                errors[r] = _exit_reason(p.exitcode)
        now = time.monotonic()
        if errors and failed_at is None:
            failed_at = now
        alive = [r for r, p in enumerate(procs) if p.is_alive()]
        if not alive:
            break
        if failed_at is not None:
            for r in alive:
                stopped = _is_stopped(procs[r].pid)  # it cannot report anything: no grace
                if now > max(beats[r] + timeout_s, failed_at) + (0.0 if stopped else _GRACE_S):
                    how = "stopped by a signal" if stopped else "hung"
                    if not stopped and beats[r] == launched[r]:
                        how = "never joined the process group (starting up, or waiting for a dead rank)"
                    errors.setdefault(r, f"{how}, no progress for {now - beats[r]:.1f} s; killed")
                    procs[r].kill()
    while True:  # what the ranks put just before they exited
        try:
            kind, rank, payload = results.get(timeout=0.05)
        except queue.Empty:
            break
        if kind == "ok":
            outcome = payload
        else:
            errors.setdefault(rank, payload)
    return outcome, errors


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
    except RuntimeError as exc:  # gloo's failures: one line naming this rank, not a traceback
        raise EngineError(f"{directory}: rank {rank}: {_collective_error(exc, timeout_s)}") from None
    finally:
        dist.destroy_process_group()
    return result if rank == 0 else None
