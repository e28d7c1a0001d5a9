"""dsc's ONNX engine against llama.cpp (the strongest CPU peer, DESIGN.md §7) on one checkpoint, side by side at
three precisions: f32 (dsc --quantize none vs an F32 GGUF), 8-bit (--quantize int8 vs Q8_0) and 4-bit
(--quantize int4 vs Q4_0).

    python benchmarks/bench_llamacpp.py [--checkpoint DIR | --preset bench] [--precisions f32,int8,int4]
        [--threads T] [--decode 64] [--workdir /tmp/dsc-bench] [--json results.json]

What is timed, warm, the same for both, as the mean of ``--repeats`` repetitions (tokens/s), and with ``--rounds R``
the best of R rounds that alternate dsc and llama.cpp (each engine's least-disturbed round: on a shared machine a
load spike during one engine's turn otherwise decides the ratio; every round's figures are in the JSON):
- decode: ``--decode`` one-token steps after a ``--context``-token context (llama-bench tg at depth --context);
- prefill: ``--prefill`` tokens in one call on top of a ``--context``-token cache (llama-bench pp at that depth).
llama.cpp is timed by its own ``llama-bench -p P -n N -d C -t T -r R -o json`` (its defaults otherwise: warm-up
run, weight repacking, f16 KV cache). dsc is timed by benchmarks/engine_probe.py, which does the same steps
through dsc.runtime.engine.OnnxEngine with onnxruntime at the same thread count, after an untimed warm-up; it
also reports cold figures (session creation, the first call, the first decode step), printed separately.
Memory: each engine runs in a process of its own (engine_probe.py for dsc, llama-bench for llama.cpp) and the
parent samples that process's /proc/PID/status every 20 ms; the figure compared is VmHWM, the kernel's peak
resident set of the process over its whole life (load and both tests included), for both. The dsc process
holds a Python interpreter and onnxruntime besides the engine (its RSS before loading is in the JSON).

Tools (flags, else environment, else defaults): --llama-dir (LLAMA_PEER_DIR, /tmp/llama-peer), where
shared/tools/llama_peer.sh builds llama-bench and llama-quantize from the llama.cpp that llama-cpp-python
0.3.36 vendors (run here if they are missing; --llama-src / LLAMA overrides the source tree);
--tools (DSC_SHARED_TOOLS, ../shared/tools beside the repository) holding llama_peer.sh and to_gguf.py.
GGUFs are converted once (to_gguf.py, f32) and quantized with that build's llama-quantize, cached in
WORKDIR/gguf and remade when the checkpoint is newer. dsc engines are compiled on every run (--reuse keeps them).
The machine may be shared: compare ratios from one run, and look at the load average printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common import THREADS, bench_checkpoint, run_with_peak_memory
from dsc.commands.compile import CompileOptions, compile_model
from dsc.errors import CompileError

HERE = Path(__file__).resolve().parent
MB = 1024 * 1024


@dataclass(frozen=True)
class Precision:
    name: str
    dsc_quantize: str  # CompileOptions.quantize
    gguf_type: str  # llama.cpp file type (to_gguf.py outtype for f32, else llama-quantize's type name)
    decode_bar: float  # acceptance: dsc decode tokens/s >= bar x llama.cpp's
    rss_bar: float | None  # acceptance: dsc peak RSS <= bar x dsc f32's


PRECISIONS = {
    p.name: p
    for p in (
        Precision("f32", "none", "f32", 0.9, None),
        Precision("int8", "int8", "q8_0", 0.9, 0.35),
        Precision("int4", "int4", "q4_0", 1.0, 0.22),
    )
}


@dataclass(frozen=True)
class Tools:
    src: Path  # llama.cpp source tree (convert_hf_to_gguf.py, gguf-py)
    bench: Path
    quantize: Path
    to_gguf: Path

    @classmethod
    def find(cls, args: argparse.Namespace) -> Tools:
        llama_dir = Path(args.llama_dir or os.environ.get("LLAMA_PEER_DIR", "/tmp/llama-peer"))
        src = Path(args.llama_src or os.environ.get("LLAMA") or llama_dir / "llama_cpp_python-0.3.36/vendor/llama.cpp")
        shared = Path(args.tools or os.environ.get("DSC_SHARED_TOOLS") or HERE.parent.parent / "shared/tools")
        tools = cls(src, src / "build/bin/llama-bench", src / "build/bin/llama-quantize", shared / "to_gguf.py")
        if not (tools.bench.exists() and tools.quantize.exists()):
            print(f"building llama-bench and llama-quantize into {llama_dir} (minutes; log in {llama_dir})")
            subprocess.run(["bash", str(shared / "llama_peer.sh"), str(llama_dir)], check=True)
        return tools


def make_ggufs(ckpt: Path, tools: Tools, gguf_dir: Path, types: list[str]) -> dict[str, Path]:
    """The checkpoint as GGUF files of the given types, converted or quantized only when missing or stale."""
    gguf_dir.mkdir(parents=True, exist_ok=True)
    newest = max(p.stat().st_mtime for p in ckpt.iterdir())
    paths = {t: gguf_dir / f"{ckpt.name}-{t}.gguf" for t in ["f32", *types]}

    def build(kind: str, command: Callable[[Path], list[str]], env: dict[str, str] | None = None) -> None:
        out = paths[kind]
        if out.exists() and out.stat().st_mtime >= newest:
            return
        part, log = out.with_name(out.stem + ".part.gguf"), out.with_suffix(".log")
        cmd = command(part)
        print(f"making {out.name}: {shlex.join(cmd)} (log {log})", flush=True)
        with open(log, "wb") as f:
            subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, env=env)
        part.rename(out)

    env = {**os.environ, "LLAMA": str(tools.src)}
    build("f32", lambda out: [sys.executable, str(tools.to_gguf), str(ckpt), str(out), "f32"], env)
    for kind in types:
        if kind != "f32":
            build(kind, lambda out, kind=kind: [str(tools.quantize), str(paths["f32"]), str(out), kind.upper()])
    return {t: paths[t] for t in types}


def run_llama(gguf: Path, tools: Tools, args: argparse.Namespace, logs: Path) -> dict:
    cmd = [str(tools.bench), "-m", str(gguf), "-p", str(args.prefill), "-n", str(args.decode), "-d", str(args.context)]
    cmd += ["-t", str(args.threads), "-r", str(args.repeats), "-o", "json"]
    print(f"  llama.cpp: {shlex.join(cmd)}", flush=True)
    out, err = logs / f"llama-bench-{gguf.stem}.json", logs / f"llama-bench-{gguf.stem}.log"
    rc, wall_s, memory = run_with_peak_memory(cmd, out, err)
    result = {"command": shlex.join(cmd), "wall_s": wall_s, "peak_memory": memory}
    if rc != 0:
        return {**result, "error": f"llama-bench exited {rc}, see {err}"}
    for test in json.loads(out.read_text()):
        kind = "prefill" if test["n_prompt"] > 0 else "decode"
        result[f"{kind}_tokens_per_s"] = test["avg_ts"]
        result[f"{kind}_samples"] = test["samples_ts"]
    result["peak_rss_bytes"] = memory.get("VmHWM", 0)
    return result


def run_dsc(ckpt: Path, prec: Precision, args: argparse.Namespace, logs: Path) -> dict:
    engine = args.workdir / f"dsc-{ckpt.name}-{prec.name}.onnx"
    result: dict = {"engine": str(engine), "quantize": prec.dsc_quantize}
    if not (args.reuse and engine.exists()):
        try:
            summary = compile_model(ckpt, engine, CompileOptions(quantize=prec.dsc_quantize))
        except CompileError as exc:
            return {**result, "available": False, "reason": str(exc)}
        result["compile_s"] = sum(summary.stages.values())
        result["engine_bytes"] = summary.engine_bytes
    cmd = [sys.executable, str(HERE / "engine_probe.py"), str(engine), "--threads", str(args.threads)]
    cmd += ["--context", str(args.context), "--prefill", str(args.prefill), "--decode", str(args.decode)]
    cmd += ["--repeats", str(args.repeats)]
    print(f"  dsc:       {shlex.join(cmd)}", flush=True)
    out, err = logs / f"probe-{engine.stem}.json", logs / f"probe-{engine.stem}.log"
    rc, wall_s, memory = run_with_peak_memory(cmd, out, err)
    result.update(command=shlex.join(cmd), wall_s=wall_s, peak_memory=memory)
    if rc != 0:
        return {**result, "available": False, "reason": f"engine_probe.py exited {rc}, see {err}"}
    return {**result, **json.loads(out.read_text()), "available": True, "peak_rss_bytes": memory.get("VmHWM", 0)}


def best_of(rounds: list[dict]) -> dict:
    """Per engine, the last round's record with the best tokens/s of all rounds and the highest peak RSS."""
    row = {}
    for engine in ("dsc", "llama.cpp"):
        records = [r[engine] for r in rounds]
        best = dict(records[-1])
        for key in ("decode_tokens_per_s", "prefill_tokens_per_s"):
            values = [rec[key] for rec in records if rec.get(key)]
            if values:
                best[key], best[f"{key}_rounds"] = max(values), values
        peaks = [rec["peak_rss_bytes"] for rec in records if rec.get("peak_rss_bytes")]
        if peaks:
            best["peak_rss_bytes"] = max(peaks)
        row[engine] = best
    return row


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def compare(rows: dict[str, dict]) -> None:
    """Add the ratios (dsc / llama.cpp, and dsc RSS / dsc f32 RSS) and the acceptance bars to each row."""
    f32_rss = rows.get("f32", {}).get("dsc", {}).get("peak_rss_bytes")
    for name, row in rows.items():
        dsc, llama, prec = row["dsc"], row["llama.cpp"], PRECISIONS[name]
        row["ratio"] = {
            k: ratio(dsc.get(k), llama.get(k))
            for k in ("decode_tokens_per_s", "prefill_tokens_per_s", "peak_rss_bytes")
        }
        row["rss_of_dsc_f32"] = ratio(dsc.get("peak_rss_bytes"), f32_rss) if name != "f32" else None
        decode = row["ratio"]["decode_tokens_per_s"]
        row["bars"] = {f"decode >= {prec.decode_bar}x llama.cpp": None if decode is None else decode >= prec.decode_bar}
        if prec.rss_bar is not None:
            rss = row["rss_of_dsc_f32"]
            row["bars"][f"RSS <= {prec.rss_bar}x dsc f32"] = None if rss is None else rss <= prec.rss_bar


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_table(rows: dict[str, dict], busy: bool = False) -> None:
    head = f"{'':>9} | {'decode tok/s':^23} | {'prefill tok/s':^23} | {'peak RSS MB':^20} | dsc RSS"
    sub = (
        f"{'precision':>9}"
        + f" | {'dsc':>7} {'llama':>7} {'ratio':>7}" * 2
        + f" | {'dsc':>6} {'llama':>6} {'ratio':>6} | / f32"
    )
    print(head, sub, "-" * len(sub), sep="\n")
    for name, row in rows.items():
        dsc, llama, r = row["dsc"], row["llama.cpp"], row["ratio"]
        label = f"{name:>9} | "
        if not dsc.get("available"):
            print(
                f"{label}dsc not available ({dsc['reason']}); llama.cpp decode "
                f"{fmt(llama.get('decode_tokens_per_s'), '.1f')} tok/s, prefill "
                f"{fmt(llama.get('prefill_tokens_per_s'), '.1f')} tok/s, "
                f"peak RSS {fmt(llama.get('peak_rss_bytes', 0) / MB, '.0f')} MB"
            )
            continue
        cells = []
        for k in ("decode_tokens_per_s", "prefill_tokens_per_s"):
            cells.append(f"{fmt(dsc.get(k), '7.1f')} {fmt(llama.get(k), '7.1f')} {fmt(r[k], '6.2f')}x")
        rss = [x / MB if x else None for x in (dsc.get("peak_rss_bytes"), llama.get("peak_rss_bytes"))]
        cells.append(f"{fmt(rss[0], '6.0f')} {fmt(rss[1], '6.0f')} {fmt(r['peak_rss_bytes'], '5.2f')}x")
        cells.append(fmt(row["rss_of_dsc_f32"], ".2f"))
        print(label + " | ".join(cells))
    print()
    for name, row in rows.items():
        cold = row["dsc"].get("cold")
        if cold:
            print(
                f"dsc {name} cold: session {cold['load_s']:.2f} s, first call ({cold['first_call_tokens']} tokens) "
                f"{cold['first_call_s'] * 1000:.0f} ms, first decode step {cold['first_decode_step_s'] * 1000:.1f} ms"
            )
        if "error" in row["llama.cpp"]:
            print(f"llama.cpp {name}: {row['llama.cpp']['error']}")
    print()
    for name, row in rows.items():
        for bar, met in row["bars"].items():
            verdict = "not measured" if met is None else "met" if met else "MISSED"
            caveat = " (busy machine: see the warning)" if busy and met is not None else ""
            print(f"bar {name:>4}: {bar:<26} {verdict}{caveat}")


def busy_warning(load_average: float, threads: int) -> str | None:
    """A warning when other processes already use the cores the engines need."""
    cores = os.cpu_count() or 1
    if load_average + threads <= cores + 0.5:
        return None
    return (
        f"warning: load average {load_average:.2f} on {cores} cores, {threads} threads per engine: other processes "
        "compete for the cores, and llama.cpp's thread pool (spinning at barriers) loses far more to that than "
        "onnxruntime (bench preset, f32, one busy 2-core run: llama.cpp decode 83 tok/s at -t 1, 14 at -t 2); "
        "trust ratios from a quiet machine, or use --threads 1"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, help="a DeepSeek checkpoint directory (default: make --preset)")
    p.add_argument("--preset", default="bench")
    p.add_argument("--precisions", default="f32,int8,int4", help=f"some of {','.join(PRECISIONS)}")
    p.add_argument("--threads", type=int, default=THREADS, help="both engines (default DSC_BENCH_THREADS or all)")
    p.add_argument("--context", type=int, default=128, help="tokens in the cache before each timed test")
    p.add_argument("--prefill", type=int, default=128)
    p.add_argument("--decode", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1, help="alternate dsc and llama.cpp R times; report each one's best")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/dsc-bench"))
    p.add_argument("--reuse", action="store_true", help="reuse dsc engines already in the workdir")
    p.add_argument("--json", type=Path, help="write every number here")
    p.add_argument("--llama-dir", help="llama_peer.sh's build directory (env LLAMA_PEER_DIR; /tmp/llama-peer)")
    p.add_argument("--llama-src", help="llama.cpp source tree with build/bin (env LLAMA; default in --llama-dir)")
    p.add_argument("--tools", help="directory of llama_peer.sh and to_gguf.py (env DSC_SHARED_TOOLS)")
    args = p.parse_args()
    precisions = [PRECISIONS[n] for n in args.precisions.split(",")]
    args.workdir = args.workdir.resolve()
    logs = args.workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    command = shlex.join([sys.executable, *sys.argv])
    load_start = os.getloadavg()[0]
    print(f"command: {command}\nthreads: {args.threads} (of {os.cpu_count()} cores), load average {load_start:.2f}")
    busy = busy_warning(load_start, args.threads)
    if busy:
        print(busy)
    tools = Tools.find(args)
    ckpt = (args.checkpoint or bench_checkpoint(args.workdir, args.preset)).resolve()
    ggufs = make_ggufs(ckpt, tools, args.workdir / "gguf", [prec.gguf_type for prec in precisions])
    print(
        f"checkpoint {ckpt}; context {args.context}, prefill {args.prefill}, decode {args.decode} tokens, "
        f"{args.repeats} repetitions",
        flush=True,
    )
    rounds: dict[str, list[dict]] = {p.name: [] for p in precisions}
    for r in range(args.rounds):
        for prec in precisions:
            print(f"{prec.name}:" + (f" round {r + 1}/{args.rounds}" if args.rounds > 1 else ""), flush=True)
            rounds[prec.name].append(
                {
                    "dsc": run_dsc(ckpt, prec, args, logs),
                    "llama.cpp": run_llama(ggufs[prec.gguf_type], tools, args, logs),
                }
            )
        args.reuse = True  # compile once
    rows = {name: best_of(rs) for name, rs in rounds.items()}
    compare(rows)
    load_end = os.getloadavg()[0]
    print(f"\n{ckpt.name}, {args.threads} threads, load average at end {load_end:.2f}")
    print_table(rows, busy is not None)
    if args.json:
        settings = {k: getattr(args, k) for k in ("context", "prefill", "decode", "repeats", "rounds", "threads")}
        report = {
            "command": command,
            "checkpoint": str(ckpt),
            "settings": settings,
            "tools": {k: str(v) for k, v in vars(tools).items()},
            "ggufs": {k: str(v) for k, v in ggufs.items()},
            "load_average": {"start": load_start, "end": load_end},
            "busy_warning": busy,
            "rows": rows,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
