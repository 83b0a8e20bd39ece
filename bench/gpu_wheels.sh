#!/usr/bin/env bash
# Download the wheels the lent GPU machine lacks into .whl/ (git-ignored), for `bench/gpu_check.sh`.
#
# The GPU image (python3.12: torch 2.11 cu130, transformers 5.17, accelerate 1.15, peft, pyarrow, pandas,
# pluggy, pyyaml, jinja2, rich, click, tokenizers, xxhash, triton, attrs) has no trl, datasets, dill,
# multiprocess, liger-kernel or jsonschema, and it cannot reach a registry. All but rpds-py are pure
# Python (liger-kernel is Python + Triton); each is fetched for CPython 3.12 on x86-64 without its
# dependencies, which the image already has.
#
#   bash bench/gpu_wheels.sh            # then carry .whl in the device call (see bench/gpu_check.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .whl
# jsonschema and its three helpers: specdsl's compiler needs them (the tests and `specdsl run` there do).
WHEELS=(trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 liger-kernel==0.8.5
        jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1)
for w in "${WHEELS[@]}"; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "$w"
done
# One version of each: two copies of a package stop the whole --no-deps install there.
ls .whl
du -sh .whl
