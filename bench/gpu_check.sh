#!/usr/bin/env bash
# Every GPU check of the cuda training target in ONE device call (device time is scarce: 15 minutes a
# session, each machine start costs minutes). Prepare here first, on the CPU:
#
#   bash bench/gpu_wheels.sh                                   # trl, datasets, ... into .whl (git-ignored)
#   python bench/bench_gpu_training.py --device cpu --tiny     # the benchmark's code runs
#
# then:  device run  command="bash bench/gpu_check.sh"  carry=[".whl"]  timeout_s=560
#
# It installs the carried wheels beside the image's torch/transformers, runs tests/test_gpu.py (labels at the
# model's input on the fast path, first loss vs the CPU path), then the benchmark (plain TRL vs the cuda
# target: tokens/s, MFU, loss curves). Logs and bench.json land in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/specdsl-gpu-out}
mkdir -p "$OUT"
ls .whl/*.whl >/dev/null 2>&1 || { echo "no wheels in .whl: run bash bench/gpu_wheels.sh and carry .whl"; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 - <<'PY' 2>&1 | tee "$OUT/versions.txt"
import importlib
for name in ("torch", "transformers", "trl", "accelerate", "datasets", "peft", "liger_kernel", "flash_attn"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as exc:  # an optional kernel missing is information, not a failure
        print(name, "-", type(exc).__name__)
from specdsl.training.trl import detect_capabilities, plan_settings, resolve_params
caps = detect_capabilities()
print("capabilities:", caps)
try:
    print("cuda target would choose:", "; ".join(plan_settings(resolve_params({}), "cuda", caps)["reasons"]))
except Exception as exc:
    print("cuda target:", exc)
PY
echo "== tests/test_gpu.py"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log"
echo "== bench/bench_gpu_training.py"
timeout 380 python3 bench/bench_gpu_training.py --deadline 300 --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
