"""Compiling the bench preset streams weights: resident memory grows by less than 0.5x the checkpoint.

Measured from outside the process, as benchmarks/common.py run_with_peak_memory does: the parent samples the
child's /proc/PID/status (VmHWM, the kernel's high-water mark of the child's resident set) while it runs, so the
figure does not depend on what dsc reports about itself. The baseline is the same interpreter importing what a
compile imports, measured the same way.
"""

import subprocess
import sys
import time
from pathlib import Path


def _kb(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def peak_rss_mb(cmd: list[str], interval_s: float = 0.01) -> float:
    """The child's VmHWM in MB, the largest value sampled while it ran (the exit code must be 0)."""
    peak = 0
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while proc.poll() is None:
        peak = max(peak, _kb(proc.pid, "VmHWM"))
        time.sleep(interval_s)
    assert proc.returncode == 0, proc.stderr.read().decode()
    return peak / 1024


def test_bench_compile_peak_memory(tmp_path):
    dsc = str(Path(sys.executable).with_name("dsc"))
    subprocess.run([dsc, "make-model", "bench", "-o", str(tmp_path / "bench")], check=True, capture_output=True)
    checkpoint_mb = (tmp_path / "bench" / "model.safetensors").stat().st_size / 2**20
    # the same imports as a compile, then a pause so that the sampler sees the settled figure
    imports = "import dsc.commands.compile, dsc.frontends.loader, dsc.backends.onnx, onnx, onnxruntime, time"
    baseline_mb = peak_rss_mb([sys.executable, "-c", imports + "; time.sleep(0.5)"])
    peak_mb = peak_rss_mb([dsc, "compile", str(tmp_path / "bench"), "-o", str(tmp_path / "bench.onnx"), "-q"])
    growth_mb = peak_mb - baseline_mb
    print(f"peak {peak_mb:.0f} MB, baseline {baseline_mb:.0f} MB, growth {growth_mb:.0f} MB of {checkpoint_mb:.0f}")
    assert checkpoint_mb > 400  # the bench preset: ~113M fp32 parameters
    assert growth_mb < 0.5 * checkpoint_mb, (peak_mb, baseline_mb, checkpoint_mb)
