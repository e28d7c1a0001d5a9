"""The GPU check (issue 15): TensorRT plans and onnxruntime-gpu against onnxruntime on the CPU, and decode speed.

    # on the GPU machine, after the install step (README, "GPU deployment"):
    pip install -c constraints.txt -e '.[test]' && pip install 'tensorrt-cu12>=10.13,<12' \\
        && pip uninstall -y onnxruntime && pip install 'onnxruntime-gpu>=1.31'
    python benchmarks/gpu_check.py --out $OUT/gpu.json          # < 8 minutes on one H200 (--budget-s 420)
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu.json # no GPU: everything that can run on the CPU

For each preset (tiny, then bench) and each plan kind: fp32 (TF32 off), bf16 (strongly typed: bf16 weights and
activations, routers/norms/rope in fp32) and FP8 (``--quantize fp8``, fp32 compute), it builds the plan with a decode
and a prefill-chunk profile (the tiny prompt is longer than its chunk, so prefill runs chunked), runs it teacher-forced
on the reference's own greedy tokens and compares its logits with onnxruntime on the CPU running the same checkpoint
(the FP8 plan against the FP8 ONNX engine). Tolerances, max |plan - ref| / max |ref| over prefill and every decode
step: fp32 1e-3, bf16 3e-2, FP8 1e-3. It records each profile's activation memory as TensorRT reports it (and dsc's
estimate) and the device memory a context took, then decode tok/s of the plan, of onnxruntime-gpu (CUDA provider, the
cache bound on the device) and of transformers on CUDA (fp32 and bf16), side by side.

Every part whose package or device is missing is recorded as skipped with the reason; an error in one part is
recorded and the others still run; the JSON is rewritten after each part, so a timeout leaves what was done.
``--dry-run`` runs, without a GPU: the references, the TensorRT ONNX flavour of every plan kind (support list, the
blocked-FP8 rules, activation estimate per profile) run by onnxruntime on the CPU against the reference (bf16 through
its fp16 stand-in: onnxruntime has no bf16 CPU kernels), and the CPU decode speeds; the GPU parts are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

PLANS = {  # kind -> compile options and the tolerance against onnxruntime CPU
    "fp32": {"precision": "fp32", "quantize": "none", "rtol": 1e-3},
    "bf16": {"precision": "bf16", "quantize": "none", "rtol": 3e-2},
    "fp8": {"precision": "fp32", "quantize": "fp8", "rtol": 1e-3},
}
# fp16 (the CPU stand-in for bf16 in the dry run) measured 5.7e-4 on tiny; FP8 flavour = the FP8 ONNX engine
FLAVOUR_RTOL = {"fp32": 1e-4, "fp16": 3e-3, "fp8": 1e-4}
PRESETS = {  # prompt longer than the prefill chunk on tiny: chunked prefill is exercised
    "tiny": {"prompt": 24, "new_tokens": 32, "max_seq_len": 64, "prefill_chunk": 16},
    "bench": {"prompt": 128, "new_tokens": 64, "max_seq_len": 1024, "prefill_chunk": 256},
}


class Skip(Exception):
    """A part that cannot run here; the message says why."""


def rel_error(got, ref) -> float:
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def forced_logits(step, empty: list, prompt: list[int], tokens: list[int]) -> list[np.ndarray]:
    """Prefill logits, then the last-position logits of each decode step fed the reference's tokens."""
    logits, past = step(np.asarray([prompt], np.int64), np.arange(len(prompt), dtype=np.int64)[None], empty)
    out = [np.asarray(logits)]
    for i, tok in enumerate(tokens[:-1]):
        logits, past = step(np.asarray([[tok]], np.int64), np.asarray([[len(prompt) + i]], np.int64), past)
        out.append(np.asarray(logits)[:, -1:])
    return out


def compare(got: list[np.ndarray], ref: list[np.ndarray], rtol: float) -> dict:
    errors = [rel_error(g, r) for g, r in zip(got, ref, strict=True)]
    agree = [int(g[0, -1].argmax() == r[0, -1].argmax()) for g, r in zip(got, ref, strict=True)]
    return {
        "prefill_rel_error": errors[0],
        "decode_rel_error_max": max(errors[1:], default=0.0),
        "top1_agreement": sum(agree) / len(agree),
        "rtol": rtol,
        "ok": max(errors) <= rtol,
    }


def decode_rate(engine, prompt: list[int], new_tokens: int, repeats: int = 2) -> dict:
    from dsc.runtime.generate import generate

    best = None
    for _ in range(repeats):
        g = generate(engine, [prompt], new_tokens)
        if best is None or g.tokens_per_s > best.tokens_per_s:
            best = g
    return {"decode_tok_s": best.tokens_per_s, "prefill_s": best.prefill_s, "new_tokens": new_tokens}


class Check:
    def __init__(self, out: Path, work: Path, budget_s: float, dry_run: bool) -> None:
        self.out, self.work, self.dry_run = out, work, dry_run
        self.deadline = time.monotonic() + budget_s
        self.start = time.monotonic()
        self.result: dict = {"dry_run": dry_run, "tolerances": {k: v["rtol"] for k, v in PLANS.items()}}
        self.result["flavour_tolerances"] = FLAVOUR_RTOL

    def save(self) -> None:
        self.result["elapsed_s"] = round(time.monotonic() - self.start, 1)
        self.result["passed"] = _passed(self.result)
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(self.result, indent=1, default=str))
        os.replace(tmp, self.out)

    def part(self, where: dict, key: str, fn, need_s: float = 0.0) -> dict:
        """Run one part into ``where[key]``: its dict, or skipped / error with the reason; then save."""
        t = time.monotonic()
        try:
            if time.monotonic() + need_s > self.deadline:
                raise Skip(f"time budget: {self.deadline - time.monotonic():.0f} s left, needs ~{need_s:.0f} s")
            value = fn()
        except Skip as exc:
            value = {"skipped": str(exc)}
        except ImportError as exc:
            value = {"skipped": f"missing package: {exc}"}
        except Exception as exc:  # noqa: BLE001 (one part's failure is a result; the others still run)
            value = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
            value["traceback"] = traceback.format_exc(limit=4).splitlines()[-4:]
        value["seconds"] = round(time.monotonic() - t, 2)
        where[key] = value
        print(f"  {key}: {_summary(value)}", flush=True)
        self.save()
        return value


def _passed(result) -> bool:
    """No part errored and every comparison that ran is within its tolerance (skipped parts do not fail)."""
    if isinstance(result, dict):
        if "error" in result or result.get("ok") is False:
            return False
        return all(_passed(v) for v in result.values())
    return True


def _summary(value: dict) -> str:
    if "skipped" in value or "error" in value:
        return value.get("skipped") or value["error"]
    keys = ("ok", "prefill_rel_error", "decode_rel_error_max", "decode_tok_s", "activation_bytes")
    return ", ".join(f"{k}={value[k]}" for k in keys if k in value) or "done"


def _env() -> dict:
    env = {"python": platform.python_version()}
    for name in ("torch", "onnxruntime", "tensorrt", "transformers"):
        try:
            env[name] = __import__(name).__version__
        except Exception as exc:  # noqa: BLE001
            env[name] = f"unavailable ({type(exc).__name__})"
    try:
        import torch

        env["cuda"] = torch.cuda.is_available()
        if env["cuda"]:
            env["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        env["cuda"] = False
    try:
        import onnxruntime as ort

        env["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        pass
    return env


def _need_gpu(check: Check) -> None:
    if check.dry_run:
        raise Skip("dry run")
    import torch

    if not torch.cuda.is_available():
        raise Skip("no CUDA GPU visible to torch")


def run_preset(check: Check, preset: str) -> None:
    import onnx
    from dsc.backends.onnx_io import save_model
    from dsc.backends.tensorrt import _input_dims, profiles_from_flags, tensorrt_onnx
    from dsc.backends.tensorrt_types import activation_bytes_estimate
    from dsc.commands.compile import CompileOptions, compile_model, make_pass_manager
    from dsc.frontends.loader import load_graph
    from dsc.frontends.presets import make_model
    from dsc.runtime.engine import OnnxEngine, providers_for
    from dsc.runtime.generate import generate

    spec = PRESETS[preset]
    res: dict = {"spec": spec}
    check.result.setdefault("presets", {})[preset] = res
    root = check.work / preset
    ckpt = make_model(preset, root / "ckpt", seed=0, lm_head_scale=4.0)
    vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
    prompt = [int(x) for x in np.random.default_rng(0).integers(1, vocab, spec["prompt"])]
    refs: dict[str, dict] = {}

    def reference(quantize: str) -> dict:
        path = root / f"ref-{quantize}.onnx"
        compile_model(ckpt, path, CompileOptions(quantize=quantize))
        engine = OnnxEngine(path)
        gen = generate(engine, [prompt], spec["new_tokens"])
        tokens = gen.tokens[0]
        logits = forced_logits(engine.step, [c.empty(1) for c in engine.cache], prompt, tokens)
        refs[quantize] = {"path": path, "tokens": tokens, "logits": logits, "engine": engine}
        return {"engine": str(path), "tokens": tokens[:8], **decode_rate(engine, prompt, spec["new_tokens"])}

    check.part(res, "reference_onnxruntime_cpu", lambda: reference("none"))
    check.part(res, "reference_onnxruntime_cpu_fp8", lambda: reference("fp8"))
    profiles = profiles_from_flags(1, spec["max_seq_len"], prefill_chunk=spec["prefill_chunk"])

    def flavour(kind: str) -> dict:
        """The plan's ONNX (TensorRT flavour) on the CPU: what TensorRT would parse, and its numbers."""
        quantize = PLANS[kind]["quantize"]
        if quantize not in refs:
            raise Skip(f"no {quantize} reference")
        _, graph = load_graph(ckpt)
        graph = make_pass_manager(CompileOptions(quantize=quantize), "fp8" if quantize == "fp8" else None).run(graph)
        precision = "fp16" if kind == "bf16" else PLANS[kind]["precision"]
        model, inits = tensorrt_onnx(graph, precision=PLANS[kind]["precision"])  # support list checked inside
        dims = _input_dims(model)
        estimate = {
            name: activation_bytes_estimate(
                model, inits, {k: profiles.shapes_for(name, k, d)[2] for k, d in dims.items()}
            )[0]
            for name in profiles.names
        }
        model, inits = tensorrt_onnx(graph, precision=precision)
        path = root / f"flavour-{kind}.onnx"
        save_model(model, inits, path)
        fp8 = sum(t.data_type == onnx.TensorProto.FLOAT8E4M3FN for t in onnx.load(str(path)).graph.initializer)
        import onnxruntime as ort
        from dsc.engine_format import full_mask
        from dsc.ir.graph import ATTENTION_MASK

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        ref = refs[quantize]
        cache = ref["engine"].cache
        names = ["logits"] + [c.output for c in cache]

        def step(ids, pos, past):
            logits, *present = session.run(
                names,
                {
                    "input_ids": ids,
                    "position_ids": pos,
                    ATTENTION_MASK: full_mask(ids, past, cache),
                    **dict(zip([c.input for c in cache], past, strict=True)),
                },
            )
            return logits, present

        got = forced_logits(step, [c.empty(1) for c in cache], prompt, ref["tokens"])
        rtol = FLAVOUR_RTOL["fp16" if kind == "bf16" else kind]
        return {
            "ran_as": precision,
            "fp8_weights": fp8,
            "activation_bytes_estimate": estimate,
            **compare(got, ref["logits"], rtol),
        }

    for kind in PLANS:
        check.part(res, f"tensorrt_onnx_{kind}_on_cpu", lambda kind=kind: flavour(kind), need_s=5)

    def plan(kind: str) -> dict:
        _need_gpu(check)
        import tensorrt  # noqa: F401
        import torch
        from dsc.runtime.tensorrt_engine import TensorRTEngine

        quantize = PLANS[kind]["quantize"]
        if quantize not in refs:
            raise Skip(f"no {quantize} reference")
        path = root / f"{kind}.plan"
        options = CompileOptions(
            precision=PLANS[kind]["precision"],
            quantize=quantize,
            max_seq_len=spec["max_seq_len"],
            prefill_chunk=spec["prefill_chunk"],
            timing_cache=check.work / "timing.cache",
        )
        t = time.monotonic()
        summary = compile_model(ckpt, path, options)
        build_s = time.monotonic() - t
        free_before = torch.cuda.mem_get_info()[0]
        engine = TensorRTEngine(path)
        ref = refs[quantize]
        got = forced_logits(engine.step, [c.empty(1) for c in engine.cache], prompt, ref["tokens"])
        context_bytes = free_before - torch.cuda.mem_get_info()[0]
        info = summary.manifest.tensorrt or {}
        return {
            "build_s": round(build_s, 1),
            "plan_bytes": path.stat().st_size,
            "tensorrt": info.get("version"),
            "activation_bytes": info.get("activation_bytes"),
            "device_bytes_after_both_profiles": int(context_bytes),
            **compare(got, ref["logits"], PLANS[kind]["rtol"]),
            **decode_rate(engine, prompt, spec["new_tokens"]),
        }

    for kind in PLANS:
        check.part(res, f"tensorrt_{kind}", lambda kind=kind: plan(kind), need_s=60 if preset == "bench" else 20)

    def ort_gpu(quantize: str) -> dict:
        _need_gpu(check)
        if quantize not in refs:
            raise Skip(f"no {quantize} reference")
        from dsc.errors import EngineError

        try:
            providers = providers_for("cuda")
        except EngineError as exc:
            raise Skip(str(exc)) from None
        ref = refs[quantize]
        engine = OnnxEngine(ref["path"], providers=providers)
        got = forced_logits(engine.step, [c.empty(1) for c in engine.cache], prompt, ref["tokens"])
        return {
            "cache_device": engine.cache_device,
            **compare(got, ref["logits"], 1e-3),
            **decode_rate(engine, prompt, spec["new_tokens"]),
        }

    check.part(res, "onnxruntime_gpu_fp32", lambda: ort_gpu("none"), need_s=10)
    check.part(res, "onnxruntime_gpu_fp8", lambda: ort_gpu("fp8"), need_s=10)

    def hf(device: str, dtype_name: str) -> dict:
        import torch
        from transformers import AutoModelForCausalLM

        if device == "cuda":
            _need_gpu(check)
        dtype = getattr(torch, dtype_name)
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype).to(device).eval()
        ids = torch.tensor([prompt], device=device)
        rates = []
        with torch.no_grad():
            model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False)  # warm-up
            for _ in range(2):
                times = []
                for n in (1, spec["new_tokens"]):
                    if device == "cuda":
                        torch.cuda.synchronize()
                    t = time.perf_counter()
                    model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
                    if device == "cuda":
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - t)
                if times[1] > times[0]:  # decode time = n tokens minus the prefill's one
                    rates.append((spec["new_tokens"] - 1) / (times[1] - times[0]))
            out = {"decode_tok_s": max(rates, default=0.0), "dtype": dtype_name, "device": device}
            if dtype_name == "float32" and "none" in refs:
                logits = model(ids).logits.float().cpu().numpy()
                out["prefill_rel_error_vs_reference"] = rel_error(logits, refs["none"]["logits"][0])
        return out

    check.part(res, "transformers_cuda_fp32", lambda: hf("cuda", "float32"), need_s=15)
    check.part(res, "transformers_cuda_bf16", lambda: hf("cuda", "bfloat16"), need_s=15)
    if check.dry_run:
        check.part(res, "transformers_cpu_fp32", lambda: hf("cpu", "float32"), need_s=10)
    res["side_by_side_decode_tok_s"] = {
        k: v["decode_tok_s"] for k, v in res.items() if isinstance(v, dict) and "decode_tok_s" in v
    }
    check.save()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="the JSON written (rewritten after every part)")
    ap.add_argument("--dry-run", action="store_true", help="no GPU: run everything the CPU can")
    ap.add_argument("--presets", default="tiny,bench", help="comma-separated make-model presets (default tiny,bench)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip parts that would end past this (default 420)")
    ap.add_argument("--workdir", type=Path, help="checkpoints, engines and plans (default: a temporary directory)")
    a = ap.parse_args(argv)
    presets = [p for p in a.presets.split(",") if p]
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        print(f"gpu_check: unknown preset(s) {unknown}; known: {sorted(PRESETS)}", file=sys.stderr)
        return 2
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dsc-gpu-check-") as tmp:
        check = Check(a.out, a.workdir or Path(tmp), a.budget_s, a.dry_run)
        check.result["env"] = _env()
        check.result["presets_asked"] = presets
        for preset in presets:
            print(f"{preset}:", flush=True)
            try:
                run_preset(check, preset)
            except Exception as exc:  # noqa: BLE001 (the checkpoint itself failed: record, go on)
                check.result.setdefault("presets", {})[preset] = {"error": f"{type(exc).__name__}: {exc}"}
        check.save()
    print(f"{'passed' if check.result['passed'] else 'FAILED'}; {a.out} ({check.result['elapsed_s']} s)")
    return 0 if check.result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
