"""Generation throughput: 2,000 chat requests at 200 ms server latency, concurrency 64.

    python bench/bench_requests.py [--n 2000] [--latency 0.2] [--concurrency 64] [--only a,b,c,d]

Variants, all against the same fake OpenAI-compatible server:

  (a) bare aiohttp: one ClientSession, a semaphore, json in / json out (the floor)
  (b) litellm.acompletion in a plain asyncio loop (what a user would write with litellm)
  (c) specdsl run_requests + LiteLLMBackend (transport auto -> direct) + a journal in a temp dir
  (d) specdsl run_requests + LiteLLMBackend (transport litellm) + a journal in a temp dir

The server runs in its own process so its CPU does not share the client's GIL (on a 2-core machine it
still shares the cores). The ideal wall time is n / concurrency * latency. Reported per variant: wall
seconds, ratio to (a), client CPU per request, and overhead per request in ms, defined as
(wall - ideal) * concurrency / n: the extra time each of the `concurrency` slots spent per request.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


def start_server(latency: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "tests.fakeserver", "--port", "0", "--latency",
                             str(latency)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if "listening on" not in line:
        proc.kill()
        raise SystemExit(f"fake server did not start: {line!r}")
    return proc, line.split()[-1]


def messages(i: int) -> list[dict]:
    return [{"role": "system", "content": "You are a careful assistant."},
            {"role": "user", "content": f"Question {i}: what is {i} plus {i}?"}]


def bench_bare(api_base: str, n: int, conc: int) -> float:
    import aiohttp

    async def main() -> float:
        sem = asyncio.Semaphore(conc)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conc)) as session:
            async def one(i: int) -> str:
                async with sem:
                    async with session.post(f"{api_base}/chat/completions",
                                            json={"model": "fake", "messages": messages(i), "max_tokens": 64},
                                            headers={"Authorization": "Bearer sk-bench"}) as r:
                        return (await r.json())["choices"][0]["message"]["content"]

            t = time.perf_counter()
            out = await asyncio.gather(*(one(i) for i in range(n)))
            assert len(out) == n
            return time.perf_counter() - t

    return asyncio.run(main())


def bench_litellm_plain(api_base: str, n: int, conc: int) -> float:
    import litellm

    litellm.suppress_debug_info = True

    async def main() -> float:
        sem = asyncio.Semaphore(conc)

        async def one(i: int) -> str:
            async with sem:
                r = await litellm.acompletion(model="openai/fake", api_base=api_base, api_key="sk-bench",
                                              messages=messages(i), max_tokens=64, max_retries=0)
                return r.choices[0].message.content

        t = time.perf_counter()
        out = await asyncio.gather(*(one(i) for i in range(n)))
        assert len(out) == n
        return time.perf_counter() - t

    return asyncio.run(main())


def bench_specdsl(api_base: str, n: int, conc: int, transport: str) -> float:
    from specdsl.backends.litellm.backend import LiteLLMBackend
    from specdsl.execute.generation import run_requests
    from specdsl.execute.journal import RequestJournal
    from specdsl.contract.hookspecs import GenRequest, request_key

    backend = LiteLLMBackend()
    options = {"model": "openai/fake", "api_base": api_base, "api_key": "sk-bench", "max_tokens": 64,
               "concurrency": conc, "transport": transport, "_api_key_env": "BENCH_KEY"}
    ident = backend.identity(options)
    reqs = [GenRequest(key=request_key(ident, messages(i), {"i": i}), messages=tuple(messages(i)))
            for i in range(n)]
    with tempfile.TemporaryDirectory() as d:
        journal = RequestJournal(Path(d) / "journal.sqlite")
        t = time.perf_counter()
        out = run_requests(backend, options, reqs, journal)
        wall = time.perf_counter() - t
        assert len(out) == n and all(r.ok for r in out.values()), "some requests failed"
        assert len(journal) == n
        journal.close()
    return wall


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--latency", type=float, default=0.2)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--only", default="a,b,c,d")
    p.add_argument("--repeat", type=int, default=1, help="runs per variant; the best is reported")
    args = p.parse_args()
    chosen = set(args.only.split(","))
    t = time.perf_counter()
    import litellm  # noqa: F401  (imported up front: its ~4 s import is not part of any variant)
    print(f"litellm {litellm_version()} imported in {time.perf_counter() - t:.1f} s")
    proc, api_base = start_server(args.latency)
    ideal = args.n / args.concurrency * args.latency
    variants = {
        "a": ("bare aiohttp", lambda: bench_bare(api_base, args.n, args.concurrency)),
        "b": ("litellm.acompletion, plain loop", lambda: bench_litellm_plain(api_base, args.n, args.concurrency)),
        "c": ("run_requests + LiteLLMBackend (direct)",
              lambda: bench_specdsl(api_base, args.n, args.concurrency, "auto")),
        "d": ("run_requests + LiteLLMBackend (litellm)",
              lambda: bench_specdsl(api_base, args.n, args.concurrency, "litellm")),
    }
    rows = []
    try:
        # Warm up the server and the client libraries (connection setup, lazy imports) untimed.
        bench_bare(api_base, 64, args.concurrency)
        if chosen & {"b", "d"}:
            bench_litellm_plain(api_base, 64, args.concurrency)
        for key, (label, fn) in variants.items():
            if key not in chosen:
                continue
            best_wall, best_cpu = float("inf"), 0.0
            for _ in range(args.repeat):
                c0 = time.process_time()
                wall = fn()
                cpu = time.process_time() - c0
                if wall < best_wall:
                    best_wall, best_cpu = wall, cpu
            rows.append((key, label, best_wall, best_cpu))
            print(f"  ({key}) {label}: {best_wall:.2f} s", flush=True)
    finally:
        proc.terminate()
        proc.wait(10)
    base = next((w for k, _, w, _ in rows if k == "a"), None)
    print(f"\n{args.n} requests, latency {args.latency * 1000:.0f} ms, concurrency {args.concurrency}; "
          f"ideal {ideal:.2f} s; {os.cpu_count()} CPUs")
    print(f"{'variant':44s} {'wall s':>7s} {'x (a)':>6s} {'cpu ms/req':>10s} {'overhead ms/req':>15s}")
    for key, label, wall, cpu in rows:
        ratio = f"{wall / base:.2f}" if base else "-"
        over = (wall - ideal) * args.concurrency / args.n * 1000
        print(f"({key}) {label:40s} {wall:7.2f} {ratio:>6s} {cpu / args.n * 1000:10.2f} {over:15.1f}")
    return 0


def litellm_version() -> str:
    from importlib.metadata import version

    return version("litellm")


if __name__ == "__main__":
    sys.exit(main())
