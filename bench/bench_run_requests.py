"""A whole `specdsl run` of 2,000 requests against the fake provider, beside a bare aiohttp client.

    python bench/bench_run_requests.py [--n 2000] [--latency 0.2] [--concurrency 64]

Both talk to the same fake OpenAI-compatible server (a separate process, 200 ms per answer), addressed
as a self-hosted server (`hosted_vllm/`, as one would a vLLM fleet), which the litellm backend serves
without importing litellm. The run
is timed as a user sees it: a fresh `specdsl run` process (compile, journal, litellm backend, store,
manifest). A second, fully cached `specdsl run` measures the fixed cost (interpreter start, imports,
compile, store); the difference is the generation itself. Goal: within 20% of the bare client.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from bench_requests import bench_bare, start_server  # noqa: E402

SPEC = """\
specdsl: 1
name: bench-run
models:
  fake: {{backend: litellm, model: hosted_vllm/fake, api_base: "{api_base}", api_key: "${{env:BENCH_KEY}}",
          concurrency: {conc}, max_tokens: 64}}
sources:
  questions: {{path: questions.jsonl}}
steps:
  - id: answers
    generate: {{from: questions, model: fake, system: "You are a careful assistant.", user: "{{{{ row.q }}}}"}}
"""


def timed_run(spec: Path, env: dict) -> float:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "specdsl.cli", "run", str(spec), "--no-progress"], env=env,
                          capture_output=True, text=True)
    elapsed = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(proc.stdout + proc.stderr)
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--concurrency", type=int, default=64)
    args = ap.parse_args()
    server, api_base = start_server(args.latency)
    try:
        bare = bench_bare(api_base, args.n, args.concurrency)
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            (d / "questions.jsonl").write_text("".join(
                json.dumps({"id": f"q{i}", "q": f"Question {i}: what is {i} plus {i}?"}) + "\n" for i in range(args.n)))
            spec = d / "spec.yaml"
            spec.write_text(SPEC.format(api_base=api_base, conc=args.concurrency))
            env = {**os.environ, "BENCH_KEY": "sk-bench", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
            whole = timed_run(spec, env)
            fixed = timed_run(spec, env)  # everything cached: interpreter, imports, compile, store
    finally:
        server.kill()
    ideal = args.n / args.concurrency * args.latency
    print(f"requests={args.n} latency={args.latency}s concurrency={args.concurrency} ideal={ideal:.2f}s")
    print(f"bare aiohttp client              {bare:7.2f} s  1.00x")
    print(f"specdsl run (whole process)      {whole:7.2f} s  {whole / bare:.2f}x")
    print(f"specdsl run, cached (fixed cost) {fixed:7.2f} s")
    gen = whole - fixed
    print(f"specdsl run minus fixed cost     {gen:7.2f} s  {gen / bare:.2f}x  "
          f"({(gen - bare) / args.n * 1000:.2f} ms overhead per request vs bare)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
