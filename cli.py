"""The dsc command line: argument parsing and error reporting only; the work lives in the library."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from dsc import __version__
from dsc.errors import DscError

EXAMPLES = """\
examples:
  dsc make-model bench -o bench/                 # random-weight DeepSeek-V3-format checkpoint
  dsc compile bench/ -o bench.onnx               # checkpoint -> optimized ONNX engine + manifest
  dsc run bench.onnx --prompt-ids 1,2,3 --max-new-tokens 32
  dsc verify bench/ bench.onnx                   # engine vs the reference interpreter
  dsc inspect bench.onnx
"""


def _ids(text: str) -> list[int]:
    from dsc.prompts import parse_ids

    try:
        return parse_ids(text, "token ids")
    except DscError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("token ids: ")) from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"'{text}' must be positive")
    return value


def _pass_option(text: str) -> tuple[str, str, str]:
    name, dot, rest = text.partition(".")
    key, eq, value = rest.partition("=")
    if not (name and dot and key and eq):
        raise argparse.ArgumentTypeError(f"'{text}' is not PASS.OPTION=VALUE (e.g. mla-absorb.fold-q=true)")
    return name, key, value


class _Parser(argparse.ArgumentParser):
    """argparse, except that a bad flag is one line on stderr (the usage block is what --help is for)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="dsc",
        description="dsc compiles DeepSeek-V2/V3-style Mixture-of-Experts checkpoints into optimized engines "
        "(ONNX for onnxruntime, TensorRT plans) and runs them.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"dsc {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_compile, _add_run, _add_inspect, _add_verify, _add_profile, _add_place, _add_make_model):
        add(sub)
    return p


def _add_compile(sub) -> None:
    c = sub.add_parser(
        "compile",
        help="compile a checkpoint into an engine",
        description="Compile a Hugging Face DeepSeek-V3/V2 checkpoint (model.safetensors with "
        "config.json beside it, a model directory, or a sharded model.safetensors.index.json) "
        "into an engine. The output suffix picks the backend: .onnx -> ONNX, .plan/.engine -> "
        "TensorRT. A manifest (<name>.manifest.json) is written beside the engine.",
    )
    c.add_argument("model", type=Path, help="checkpoint file, directory, or index json")
    c.add_argument("-o", "--output", type=Path, required=True, help="engine path (.onnx, .plan, .engine)")
    c.add_argument("--backend", choices=["onnx", "tensorrt"], help="override the backend chosen by the suffix")
    c.add_argument(
        "--passes",
        metavar="SPEC",
        help="run exactly these passes, in this order, with options: 'mla-absorb{fold-q=true},expert-fusion,cleanup' "
        "(passes: cleanup, expert-fusion, expert-placement, fp8-quantize, int-quantize, mla-absorb)",
    )
    c.add_argument(
        "--pass-option",
        action="append",
        default=[],
        type=_pass_option,
        metavar="PASS.OPT=VALUE",
        help="set one option of a pass in the pipeline (repeatable), e.g. mla-absorb.fold-o=true",
    )
    c.add_argument(
        "--disable-pass",
        action="append",
        default=[],
        metavar="NAME",
        help="drop a pass from the pipeline (repeatable)",
    )
    c.add_argument("--print-ir-after-all", action="store_true", help="print the IR after every pass (stderr)")
    c.add_argument("--print-ir-after-change", action="store_true", help="print the IR after passes that changed it")
    c.add_argument("--dump-ir-dir", type=Path, metavar="DIR", help="write the IR after each pass to DIR/NNN_pass.txt")
    c.add_argument(
        "--external-data",
        action="store_true",
        help="always put weights in <engine>.data (default: for --quantize int8/int4 engines, which onnxruntime "
        "then maps and releases weight by weight, and past 2 GB)",
    )
    c.add_argument(
        "--moe-lowering",
        choices=["contrib", "gather"],
        default="contrib",
        help="fused experts in ONNX: onnxruntime's com.microsoft MoE kernel (default, fastest on CPU) "
        "or standard ops only (gather the chosen experts' weights)",
    )
    c.add_argument(
        "--quantize",
        choices=["auto", "int8", "int4", "fp8", "none"],
        default="auto",
        help="int8 / int4: weight-only block quantization of every linear layer (lm_head included) and the "
        "routed experts, run by onnxruntime's low-bit kernels (MatMulNBits, QMoE; int8 activations): about "
        "1/3.7 and 1/6.5 of the float32 engine's memory, faster decode; embeddings, router and norms stay "
        "float32. auto (default): weights as stored, except native FP8 checkpoints, which run as int8 on "
        "onnxruntime (it has no FP8 GEMM on CPU and would fold FP8 to float32 at load). fp8: DeepSeek's FP8 "
        "with 128x128 block scales, for TensorRT (on onnxruntime the file is small but the weights run as "
        "float32). none: everything float32",
    )
    c.add_argument("--report", action="store_true", help="print per-layer quantization error (every quantized format)")
    c.add_argument(
        "--calibration-prompts",
        type=Path,
        metavar="FILE",
        help="with --report: token-id prompts (one comma-separated line each) to measure logit error "
        "and top-1 agreement of the engine against the unquantized model",
    )
    c.add_argument(
        "--ep-size",
        type=_positive,
        default=1,
        metavar="N",
        help="expert parallelism: write a directory of engines for N ranks (dense segments + each "
        "rank's experts); run it with dsc run DIR --ep-size N",
    )
    c.add_argument(
        "--placement",
        type=Path,
        metavar="FILE",
        help="with --ep-size: placement.json from dsc place (default: experts split evenly, no replicas)",
    )
    t = c.add_argument_group("TensorRT (-o x.plan)")
    t.add_argument("--max-batch", type=_positive, default=1, help="largest batch the plan serves (default 1)")
    t.add_argument(
        "--max-seq-len",
        type=_positive,
        default=4096,
        help="longest prompt + generated tokens the plan serves (default 4096)",
    )
    t.add_argument(
        "--prefill-chunk",
        type=_positive,
        default=512,
        help="most prompt tokens per step; longer prompts run in chunks (default 512; bounds activation memory)",
    )
    t.add_argument("--opt-seq-len", type=_positive, help="prefill length to tune for (default: the prefill chunk)")
    t.add_argument(
        "--precision",
        choices=["fp32", "fp16", "bf16"],
        default="fp32",
        help="TensorRT precision for the non-FP8 layers (FP8 weights stay FP8)",
    )
    t.add_argument("--workspace", type=_positive, default=4096, metavar="MB", help="builder workspace (default 4096)")
    t.add_argument("--timing-cache", type=Path, metavar="FILE", help="reuse and update a TensorRT timing cache")
    c.add_argument("-q", "--quiet", action="store_true", help="print only the closing summary")


def _add_run(sub) -> None:
    r = sub.add_parser(
        "run",
        help="generate tokens with an engine",
        description="Generation with the KV cache, greedy or sampled; stops at the checkpoint's eos. Streams the text "
        "(or ids) of a single prompt as tokens arrive; prints the generated token ids and decode tokens/s.",
    )
    r.add_argument("engine", type=Path)
    g = r.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt-ids", type=_ids, metavar="1,2,3", help="prompt token ids")
    g.add_argument("--prompt", metavar="TEXT", help="prompt text (needs the tokenizer.json the compile copied)")
    g.add_argument(
        "--prompts",
        type=Path,
        metavar="FILE",
        help="a batch: one prompt per line, token ids (1,2,3) or text; prompts may differ in length (padded batch)",
    )
    r.add_argument("--chat", action="store_true", help="wrap text prompts in the checkpoint's chat template")
    r.add_argument("--max-new-tokens", type=_positive, default=32)
    r.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sample")
    r.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    r.add_argument("--top-p", type=float, default=1.0, help="sample within the smallest set of probability >= p")
    r.add_argument("--seed", type=int, help="sampling seed: the same seed gives the same tokens")
    r.add_argument("--padding", choices=["right", "left"], default="right", help="padding side of a batch")
    r.add_argument("--threads", type=_positive, help="onnxruntime intra-op threads (default: all cores)")
    r.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="ONNX engines: onnxruntime's CPU (default) or CUDA execution provider (needs onnxruntime-gpu >= 1.28, "
        "installed instead of onnxruntime); .plan engines always run on the GPU",
    )
    r.add_argument("--json", action="store_true", help="print one JSON object: tokens, tokens_per_s, prefill_s")
    r.add_argument(
        "--ep-size",
        type=_positive,
        metavar="N",
        help="run an expert-parallel engine directory on N local processes (gloo); under torchrun the "
        "ranks come from the environment instead",
    )
    r.add_argument("--timeout", type=float, default=60.0, help="seconds before a stuck collective fails (EP runs)")


def _add_inspect(sub) -> None:
    i = sub.add_parser("inspect", help="summarize a checkpoint, config.json or engine")
    i.add_argument("path", type=Path)
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.add_argument(
        "--check",
        action="store_true",
        help="engines: hash the files against the manifest's sha256 (loads do it only up to 2 GB); exit 2 on mismatch",
    )


def _add_verify(sub) -> None:
    v = sub.add_parser(
        "verify",
        help="check an engine against the reference interpreter",
        description="Run the engine and dsc's reference interpreter (the traced model, no "
        "optimizations, torch float32) on the same prompt: prefill plus decode steps fed the "
        "same tokens. Prints max abs/rel logit error and greedy top-1 agreement; exits 1 when "
        "the relative error passes --tolerance or top-1 agreement is below --min-agreement.",
    )
    v.add_argument("model", type=Path)
    v.add_argument("engine", type=Path)
    v.add_argument("--prompt-ids", type=_ids, metavar="1,2,3", help="prompt (default: 16 seeded random ids)")
    v.add_argument("--steps", type=_positive, default=8, help="decode steps to compare (default 8)")
    v.add_argument(
        "--tolerance",
        type=float,
        help="max relative logit error (default: 1e-4 for float32 and FP8-as-stored engines; "
        "not checked for int8/int4 engines, whose bar is agreement)",
    )
    v.add_argument(
        "--min-agreement",
        type=float,
        help="min teacher-forced top-1 agreement (default: 1.0 float32, 0.97 int8, 0.90 int4)",
    )
    v.add_argument("--seed", type=int, default=0)


def _add_profile(sub) -> None:
    pr = sub.add_parser(
        "profile",
        help="count tokens per routed expert on calibration prompts",
        description="Run the model (reference interpreter) on calibration prompts and record, "
        "per MoE layer, how many tokens each routed expert received: the input of `dsc place`.",
    )
    pr.add_argument("model", type=Path)
    pr.add_argument(
        "--prompts",
        type=Path,
        required=True,
        help="a file of prompts: comma-separated token ids per line, or text lines (tokenizer.json)",
    )
    pr.add_argument("-o", "--output", type=Path, required=True, help="expert_load.json to write")


def _add_place(sub) -> None:
    pl = sub.add_parser(
        "place",
        help="balance routed experts over ranks (redundant hot experts)",
        description="Compute a physical-to-logical expert placement from a measured load "
        "(dsc profile, or a [layers, experts] JSON / .npy array from elsewhere), in DeepSeek "
        "EPLB's layout: phy2log [layers][slots] (slot s lives on rank s // (slots/ranks)), "
        "log2phy, logcnt, plus balance figures (max/mean rank load) before and after.",
    )
    pl.add_argument("--load", type=Path, required=True, help="expert_load.json (dsc profile) or a .npy/.json array")
    pl.add_argument("--ranks", type=_positive, required=True)
    pl.add_argument("--slots", type=_positive, required=True, help="physical expert slots (>= experts)")
    pl.add_argument("--groups", type=_positive, default=1, help="expert groups (n_group) for hierarchical placement")
    pl.add_argument("--nodes", type=_positive, default=1, help="nodes; groups stay within a node when it divides")
    pl.add_argument("-o", "--output", type=Path, required=True, help="placement.json to write")


def _add_make_model(sub) -> None:
    m = sub.add_parser("make-model", help="write a random-weight checkpoint in the Hugging Face format")
    m.add_argument("preset", help="tiny, bench (DeepSeek-V3), tiny-v32 or bench-v32 (DeepSeek-V3.2 sparse attention)")
    m.add_argument("-o", "--output", type=Path, required=True, help="directory to create")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--fp8", action="store_true", help="store linear weights as FP8 with 128x128 block scales")
    m.add_argument("--shards", type=_positive, default=1, help="write a sharded index checkpoint")


def _setup_logging(quiet: bool) -> None:
    """Progress goes to stderr through the ``dsc`` logger (-q: warnings only); results go to stdout."""
    log = logging.getLogger("dsc")
    log.handlers[:] = [logging.StreamHandler(sys.stderr)]
    log.handlers[0].setFormatter(logging.Formatter("%(message)s"))
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False


def cmd_compile(a: argparse.Namespace) -> int:
    from dsc.commands.compile import CompileOptions, compile_model

    pass_options: dict[str, dict[str, str]] = {}
    for name, key, value in a.pass_option:
        pass_options.setdefault(name, {})[key] = value
    opts = CompileOptions(
        passes=a.passes,
        disable_passes=tuple(a.disable_pass),
        pass_options=pass_options,
        backend=a.backend,
        print_ir_after_all=a.print_ir_after_all,
        print_ir_after_change=a.print_ir_after_change,
        dump_ir_dir=a.dump_ir_dir,
        external_data=True if a.external_data else None,
        moe_lowering=a.moe_lowering,
        quantize=a.quantize,
        report=a.report or a.calibration_prompts is not None,
        calibration_prompts=a.calibration_prompts,
        ep_size=a.ep_size,
        placement=a.placement,
        max_batch=a.max_batch,
        max_seq_len=a.max_seq_len,
        opt_seq_len=a.opt_seq_len,
        prefill_chunk=a.prefill_chunk,
        precision=a.precision,
        workspace_bytes=a.workspace << 20,
        timing_cache=a.timing_cache,
    )
    summary = compile_model(a.model, a.output, opts)
    print("\n".join(summary.lines()))
    return 0


def _print_generation(a: argparse.Namespace, result, prompts: list[list[int]], tokenizer, streamed: bool) -> None:
    if a.json:
        tokens = result.tokens[0] if len(prompts) == 1 else result.tokens
        print(json.dumps({"tokens": tokens, "tokens_per_s": result.tokens_per_s, "prefill_s": result.prefill_s}))
        return
    for row, tokens in enumerate(result.tokens):
        head = "" if len(prompts) == 1 else f"[{row}] "
        if not streamed:
            print(head + "tokens: " + ",".join(str(t) for t in tokens))
            if tokenizer is not None:
                print(head + "text:   " + tokenizer.decode(tokens))
    lengths = "+".join(str(len(p)) for p in prompts)
    print(f"prefill {result.prefill_s * 1000:.1f} ms ({lengths} tokens), decode {result.tokens_per_s:.1f} tokens/s")


def _prompts(a: argparse.Namespace, manifest) -> tuple[list[list[int]], object]:
    """The batch of token-id prompts the flags give, and the tokenizer for text prompts (None for id prompts)."""
    from dsc.prompts import check_ids, parse_ids
    from dsc.runtime.tokenizer import chat_prompt, load_tokenizer

    if a.prompt_ids is not None:
        if a.chat:
            raise DscError("--chat applies to text prompts (--prompt, or --prompts with text lines)")
        check_ids([a.prompt_ids], manifest.vocab_size, "--prompt-ids")
        return [a.prompt_ids], None
    if a.prompt is not None:
        texts = [a.prompt]
    else:
        try:
            lines = [ln.strip() for ln in a.prompts.read_text().splitlines() if ln.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise DscError(f"{a.prompts}: cannot read prompts: {exc}") from None
        if not lines:
            raise DscError(f"{a.prompts}: no prompts")
        try:
            prompts = [parse_ids(ln, str(a.prompts)) for ln in lines]
        except DscError:
            texts = lines
        else:
            if a.chat:
                raise DscError(f"{a.prompts}: --chat applies to text prompts, and these are token ids")
            check_ids(prompts, manifest.vocab_size, str(a.prompts))
            return prompts, None
    tokenizer = load_tokenizer(a.engine, manifest)
    if a.chat:
        texts = [chat_prompt(a.engine, manifest, t) for t in texts]
    prompts = [tokenizer.encode(t) for t in texts]
    check_ids(prompts, manifest.vocab_size, "--prompt" if a.prompt is not None else str(a.prompts))
    return prompts, tokenizer


def cmd_run(a: argparse.Namespace) -> int:
    import os

    from dsc.engine_format import read_manifest
    from dsc.runtime.generate import Sampling, generate
    from dsc.runtime.tokenizer import TextStream

    manifest = read_manifest(a.engine)
    try:
        sampling = Sampling(a.temperature, a.top_k, a.top_p, a.seed)
    except ValueError as exc:
        raise DscError(str(exc)) from None
    prompts, tokenizer = _prompts(a, manifest)
    eos = manifest.special_tokens.get("eos_token_id")
    if manifest.expert_parallel is not None or a.ep_size:
        if a.device != "cpu":
            raise DscError(
                f"{a.engine}: expert-parallel runs use the CPU (gloo ranks); --device {a.device} is not supported"
            )
        if len(prompts) > 1 or sampling.temperature:
            raise DscError(f"{a.engine}: expert-parallel runs take one prompt, greedy (no --prompts / --temperature)")
        from dsc.runtime.ep import run_expert_parallel, run_under_torchrun

        if "WORLD_SIZE" in os.environ:
            result = run_under_torchrun(a.engine, prompts, a.max_new_tokens, timeout_s=a.timeout)
            if result is None:
                return 0  # not rank 0
        else:
            ranks = a.ep_size or (manifest.expert_parallel.ranks if manifest.expert_parallel else 1)
            result = run_expert_parallel(a.engine, ranks, prompts, a.max_new_tokens, timeout_s=a.timeout)
        _print_generation(a, result, prompts, tokenizer, streamed=False)
        return 0
    from dsc.runtime.engine import load_engine

    # one text prompt, not --json: its reply goes to the terminal as each token arrives
    stream = len(prompts) == 1 and not a.json and tokenizer is not None
    text = TextStream(tokenizer) if stream else None

    def show(row: int, token: int) -> None:
        sys.stdout.write(text.add(token))
        sys.stdout.flush()

    engine = load_engine(a.engine, threads=a.threads, device=a.device)
    if stream:
        sys.stdout.write("text:   ")
    result = generate(
        engine,
        prompts,
        a.max_new_tokens,
        eos_token_id=eos,
        padding=a.padding,
        sampling=sampling,
        on_token=show if stream else None,
    )
    if stream:
        sys.stdout.write("\n")
        print("tokens: " + ",".join(str(t) for t in result.tokens[0]))
    _print_generation(a, result, prompts, tokenizer, streamed=stream)
    return 0


def cmd_inspect(a: argparse.Namespace) -> int:
    from dsc.commands.inspect import inspect_path

    if a.check:
        from dsc.engine_format import check_files, read_manifest

        check_files(read_manifest(a.path), a.path, full=True)
    info, text = inspect_path(a.path)
    print(
        json.dumps(info, indent=2, sort_keys=True)
        if a.json
        else text + ("\n  files         sha256 checked" if a.check else "")
    )
    return 0


def cmd_verify(a: argparse.Namespace) -> int:
    from dsc.commands.verify import default_bars, verify_engine

    report = verify_engine(a.model, a.engine, prompt=a.prompt_ids, steps=a.steps, seed=a.seed)
    print(report.text())
    tolerance, min_agreement = default_bars(report.quantized)
    tolerance = a.tolerance if a.tolerance is not None else tolerance
    min_agreement = a.min_agreement if a.min_agreement is not None else min_agreement
    ok = (tolerance is None or report.max_rel <= tolerance) and report.agreement >= min_agreement
    print(
        f"{'PASS' if ok else 'FAIL'}: rel error {report.max_rel:.3g} "
        f"({'not checked' if tolerance is None else f'tolerance {tolerance:g}'}), "
        f"top-1 agreement {report.agreement:.3f} (min {min_agreement:g})"
        + (f"; {report.quantized} engine vs the unquantized model" if report.quantized else "")
    )
    return 0 if ok else 1


def cmd_profile(a: argparse.Namespace) -> int:
    from dsc.commands.profile import profile_expert_load, write_load
    from dsc.frontends.checkpoint import Checkpoint
    from dsc.prompts import read_prompt_file

    ckpt = Checkpoint.open(a.model)
    prompts = read_prompt_file(a.prompts, ckpt.config.vocab_size, ckpt.tokenizer_path)
    result = profile_expert_load(a.model, prompts)
    write_load(result, a.output)
    load = np.asarray(result["load"], dtype=float)
    imbalance = (load.max(axis=1) / load.mean(axis=1)).round(2).tolist()
    print(
        f"wrote {a.output}: {len(result['layers'])} MoE layers x {result['experts']} experts, "
        f"{result['tokens']} tokens; hottest expert / mean per layer: {imbalance}"
    )
    return 0


def cmd_place(a: argparse.Namespace) -> int:
    from dsc.files import atomic_write_bytes
    from dsc.placement.search import load_from_file, place_experts

    load = load_from_file(a.load)
    placement = place_experts(load, slots=a.slots, ranks=a.ranks, nodes=a.nodes, groups=a.groups)
    atomic_write_bytes(a.output, (json.dumps(placement.to_json(), indent=1) + "\n").encode())
    print(f"wrote {a.output}: {len(placement.phy2log)} layers, {a.slots} slots on {a.ranks} ranks")
    for layer, (before, after, bound) in enumerate(
        zip(placement.unbalanced, placement.balance, placement.lower_bound, strict=True)
    ):
        print(f"  layer {layer}: max/mean rank load {before:.3f} -> {after:.3f} (lower bound {bound:.3f})")
    return 0


def cmd_make_model(a: argparse.Namespace) -> int:
    from dsc.frontends.presets import PRESETS, make_model

    if a.preset not in PRESETS:
        raise DscError(f"unknown preset '{a.preset}'; choose one of: {', '.join(sorted(PRESETS))}")
    if a.output.exists() and any(a.output.iterdir()) if a.output.is_dir() else a.output.exists():
        raise DscError(f"{a.output}: already exists and is not an empty directory")
    path = make_model(
        a.preset, a.output, seed=a.seed, fp8=a.fp8, shards=a.shards, progress=logging.getLogger("dsc").info
    )
    print(f"wrote {a.preset} checkpoint to {path}")
    return 0


COMMANDS = {
    "compile": cmd_compile,
    "run": cmd_run,
    "inspect": cmd_inspect,
    "verify": cmd_verify,
    "profile": cmd_profile,
    "place": cmd_place,
    "make-model": cmd_make_model,
}


# Signals that end a command early: each raises Interrupted where Python is running, the partial outputs are
# removed on the way out (atomic_output, the engine writers) and dsc exits with 128 + the signal's number
# (130 SIGINT, 143 SIGTERM, 129 SIGHUP), as a shell reports a process the signal killed.
STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")


def _raise_interrupted(signum: int, _frame) -> None:
    from dsc.errors import Interrupted

    raise Interrupted(signum)


@contextlib.contextmanager
def _stop_signals_raise() -> Iterator[None]:
    """Install the handlers for the command's duration (and restore the caller's: tests run main in-process)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {}
    for name in STOP_SIGNALS:
        if hasattr(signal, name):
            num = getattr(signal, name)
            saved[num] = signal.signal(num, _raise_interrupted)
    try:
        yield
    finally:
        for num, handler in saved.items():
            signal.signal(num, handler)


def _one_line(text: str) -> str:
    """Messages quote names from the user's files; a newline or control character there (a shard named
    '\x1e' splits lines too) is shown escaped, so an error is always one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def main(argv: list[str] | None = None) -> int:
    from dsc.errors import Interrupted

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a bad flag (already reported): an exit code, in-process too
        return exc.code if isinstance(exc.code, int) else 2
    _setup_logging(getattr(args, "quiet", False))
    try:
        with _stop_signals_raise():
            return COMMANDS[args.command](args)
    except DscError as exc:
        print(f"dsc: error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(f"dsc: interrupted by {exc}; partial outputs removed", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("dsc: interrupted by SIGINT; partial outputs removed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
