"""OnnxEngine.step through onnxruntime's IO binding: the same numbers as a plain session.run, the present cache
kept as OrtValues between steps, numpy past accepted."""

import numpy as np
import onnxruntime as ort
import pytest
from dsc.commands.compile import CompileOptions, compile_model
from dsc.frontends.presets import make_model
from dsc.runtime.engine import OnnxEngine
from dsc.runtime.generate import generate


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> OnnxEngine:
    tmp = tmp_path_factory.mktemp("iobinding")
    ckpt = make_model("tiny", tmp / "ckpt", seed=5, lm_head_scale=4.0)
    return OnnxEngine(compile_model(ckpt, tmp / "m.onnx", CompileOptions()).output, threads=1)


def _plain_run(engine: OnnxEngine, ids, pos, past):
    seen = np.asarray(past[0]).shape[2]
    mask = np.ones((len(ids), seen + ids.shape[1]), np.int64)
    feeds = {"input_ids": ids, "position_ids": pos, "attention_mask": mask}
    feeds.update({c.input: np.asarray(p) for c, p in zip(engine.cache, past, strict=True)})
    logits, *present = engine.session.run(["logits"] + [c.output for c in engine.cache], feeds)
    return logits, present


def test_bound_steps_equal_plain_runs_and_keep_the_cache_in_onnxruntime(engine):
    batch, prompt = 2, np.array([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]], dtype=np.int64)
    pos = np.broadcast_to(np.arange(5), (batch, 5)).copy()
    past = [c.empty(batch) for c in engine.cache]
    logits, present = engine.step(prompt, pos, past)
    want, want_present = _plain_run(engine, prompt, pos, past)
    np.testing.assert_array_equal(logits, want)
    for step in range(4):
        assert all(isinstance(p, ort.OrtValue) for p in present)
        for got, ref in zip(present, want_present, strict=True):
            np.testing.assert_array_equal(np.asarray(got), ref)  # np.asarray reads an OrtValue without a copy
        nxt = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        at = np.full((batch, 1), 5 + step, dtype=np.int64)
        want, want_present = _plain_run(engine, nxt, at, want_present)
        logits, present = engine.step(nxt, at, present)
        np.testing.assert_array_equal(logits, want)
    assert np.asarray(present[0]).shape[:3] == (batch, 1, 9)  # head-major: [batch, heads, past, dim]


def test_numpy_past_and_logits_outlive_the_next_step(engine):
    ids, pos = np.array([[7, 8, 9]], dtype=np.int64), np.arange(3)[None].copy()
    logits, present = engine.step(ids, pos, [c.empty(1) for c in engine.cache])
    kept = logits.copy()
    as_numpy = [np.array(p) for p in present]  # a cache that went through numpy (another engine, a file) still works
    a, _ = engine.step(np.array([[1]]), np.array([[3]]), as_numpy)
    b, _ = engine.step(np.array([[1]]), np.array([[3]]), present)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(logits, kept)  # earlier logits are not overwritten by later steps


def test_generate_runs_on_bound_engine(engine):
    result = generate(engine, [[1, 2, 3]], 6)
    assert len(result.tokens[0]) == 6


class _RecordingBinding:
    """onnxruntime's IO binding with every call recorded; outputs asked on "cuda" are served on the CPU, so the
    CUDA binding path runs here (which values are bound how, and whether the cache comes back as OrtValues)."""

    def __init__(self, binding, calls: list):
        self._b, self.calls = binding, calls

    def bind_cpu_input(self, name, array):
        self.calls.append(("cpu_input", name))
        self._b.bind_cpu_input(name, array)

    def bind_ortvalue_input(self, name, value):
        self.calls.append(("ortvalue_input", name))
        self._b.bind_ortvalue_input(name, value)

    def bind_output(self, name, device_type="cpu", *args):
        self.calls.append(("output", name, device_type))
        self._b.bind_output(name)

    def __getattr__(self, name):
        return getattr(self._b, name)


def test_cuda_binding_path_keeps_the_cache_on_the_device(engine, monkeypatch):
    calls: list = []
    session = engine.session
    monkeypatch.setattr(engine, "cache_device", "cuda")
    monkeypatch.setattr(
        engine,
        "session",
        type(
            "S",
            (),
            {
                "io_binding": lambda self: _RecordingBinding(session.io_binding(), calls),
                "run_with_iobinding": lambda self, b: session.run_with_iobinding(b._b),
            },
        )(),
    )
    ids, pos = np.array([[7, 8, 9]], dtype=np.int64), np.arange(3)[None].copy()
    logits, present = engine.step(ids, pos, [c.empty(1) for c in engine.cache])
    first = list(calls)
    calls.clear()
    logits2, _ = engine.step(np.array([[1]]), np.array([[3]]), present)
    caches = [c.output for c in engine.cache]
    for step_calls in (first, calls):
        assert ("output", "logits", "cpu") in step_calls
        assert [c for c in step_calls if c[0] == "output" and c[1] in caches] == [("output", n, "cuda") for n in caches]
    inputs = [c.input for c in engine.cache]
    assert {"input_ids", "position_ids", *inputs} <= {c[1] for c in first if c[0] == "cpu_input"}  # numpy past
    # the second step binds the previous present as it is: no host copy of the cache
    assert [c[1] for c in calls if c[0] == "ortvalue_input"] == inputs
    assert not {c[1] for c in calls if c[0] == "cpu_input"} & set(inputs)
    monkeypatch.undo()
    want, _ = engine.step(np.array([[1]]), np.array([[3]]), present)
    np.testing.assert_array_equal(logits2, want)


def test_cache_device_follows_the_provider(engine):
    assert engine.cache_device == "cpu" and engine.session.get_providers()[0] == "CPUExecutionProvider"
