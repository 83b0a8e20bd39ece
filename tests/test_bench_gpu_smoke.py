"""The GPU training benchmark's own code, run on the CPU with a tiny model.

GPU time is scarce (a lent machine, minutes a session): the script a GPU session runs must not be found
broken there. This runs it end to end (--device cpu --tiny) and checks its report; it asserts nothing
about speed (the figures that matter come from the GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.training  # a real (tiny) TRL training run through the benchmark script

ROOT = Path(__file__).resolve().parent.parent


def test_bench_gpu_training_runs_on_the_cpu(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_gpu_training.py"), "--device", "cpu", "--tiny",
                           "--steps", "4", "--warmup", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    (shape,) = report["results"]
    runs = shape["runs"]
    for name in ("trl-default", "specdsl-same-batches", "specdsl-fast"):
        assert "error" not in runs[name], runs[name]
        assert runs[name]["steps"] == 4 and runs[name]["tokens_per_s"] > 0 and len(runs[name]["losses"]) == 4
    # The same batches in the same order: the fast path's loss tracks plain TRL's step for step.
    assert runs["loss_max_abs_diff_same_batches"] < 1e-3
    assert "speed-up specdsl-fast vs trl-default" in proc.stdout
