"""SIGINT, SIGTERM and SIGHUP during `dsc compile`: one line, exit 128 + the signal, no partial output left.

The compile runs as a real subprocess on the bench preset (432 MB of weights, a write of a few seconds) and the
signal is sent while the engine's temporary file is being written.
"""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dsc.frontends.presets import make_model


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    return make_model("bench", tmp_path_factory.mktemp("bench") / "ckpt", seed=0)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_signal_mid_write_leaves_nothing(bench, tmp_path, sig):
    out = tmp_path / "out.onnx"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dsc.cli", "compile", str(bench), "-o", str(out), "-q"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not list(tmp_path.glob(".out.onnx.tmp-*")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the compile never started writing"
            time.sleep(0.01)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + sig, err
    assert err.splitlines() == [f"dsc: interrupted by {sig.name}; partial outputs removed"], err
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "no engine, manifest or temporary file may remain"
