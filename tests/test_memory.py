"""Compiling the bench preset streams weights: resident memory grows by less than 0.5x the checkpoint."""

import re
import subprocess
import sys
from pathlib import Path


def test_bench_compile_peak_memory(tmp_path):
    dsc = str(Path(sys.executable).with_name("dsc"))
    subprocess.run([dsc, "make-model", "bench", "-o", str(tmp_path / "bench")], check=True, capture_output=True)
    proc = subprocess.run(
        [dsc, "compile", str(tmp_path / "bench"), "-o", str(tmp_path / "bench.onnx"), "-q"],
        check=True,
        capture_output=True,
        text=True,
    )
    line = next(x for x in proc.stdout.splitlines() if x.startswith("peak memory"))
    growth_mb, checkpoint_mb = (float(v) for v in re.search(r"\+(\d+) MB over .*checkpoint (\d+) MB", line).groups())
    print(line)
    assert checkpoint_mb > 400  # the bench preset: ~113M fp32 parameters
    assert growth_mb < 0.5 * checkpoint_mb, line
