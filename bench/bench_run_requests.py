"""Whole `specdsl run` processes against the fake provider, beside a bare aiohttp client, interleaved.

    python bench/bench_run_requests.py [--rows 2000:0.2:64,20000:0.05:256,openai/2000:0.2:64]
                                       [--repeats 3] [--before /path/to/other/checkout] [--prefix hosted_vllm]

Each row is ``[prefix/]requests:latency_s:concurrency``. Every variant talks to the same fake
OpenAI-compatible server (a separate process), addressed as a self-hosted server (``hosted_vllm/``, as
one would a vLLM fleet, unless the row or ``--prefix`` names another prefix; ``openai/`` is the
``openai/<model>``-at-a-custom-``api_base`` form). A specdsl run is timed as a user sees it: a fresh
``specdsl run`` process (interpreter, imports, compile, journal, backend, store, manifest) on a fresh
store. The bare client runs in a fresh process too, timed from its first request to its last answer
(its start-up and imports are not counted). ``--before`` also times the same run with another checkout's ``specdsl`` on PYTHONPATH (e.g. the
main branch), so before/after ratios come from one run on one machine state.

The variants run interleaved (bare, after, before, bare, after, ...) ``--repeats`` times and each
keeps its best, so a burst of load from elsewhere does not land on one variant alone. Ratios are
against the best bare client of the same row. A cached rerun (everything journaled) is timed too: the
fixed cost of a run. CPU seconds (user + system, the least over the repeats) are printed beside the
wall times: on a shared machine they move far less with other people's load than wall time does.
Goal: a whole run within 1.2x the bare client.

Byte-compiled modules are cached, as they are for a user (pip compiles an installed package): the runs
go without ``PYTHONDONTWRITEBYTECODE`` and keep their ``.pyc`` files under a temporary
``PYTHONPYCACHEPREFIX`` (the checkouts are left untouched), and each variant makes one untimed run on a
few rows first. Without that each run would compile every specdsl module again (about 0.3 s of CPU
here), a cost no installed copy pays. ``--compile-each-run`` measures that way instead.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from bench_requests import start_server  # noqa: E402

SPEC = """\
specdsl: 1
name: bench-run
models:
  fake: {{backend: litellm, model: {prefix}/fake, api_base: "{api_base}", api_key: "${{env:BENCH_KEY}}",
          concurrency: {conc}, max_tokens: 64}}
sources:
  questions: {{path: questions.jsonl}}
steps:
  - id: answers
    generate: {{from: questions, model: fake, system: "You are a careful assistant.", user: "{{{{ row.q }}}}"}}
"""


def cpu_s(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def timed_run(spec: Path, store: Path, env: dict) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one ``specdsl run`` process."""
    t, c = time.perf_counter(), cpu_s(resource.RUSAGE_CHILDREN)
    # cwd: `python -m` puts the working directory first on sys.path, ahead of PYTHONPATH. Started from the
    # spec's folder, each variant imports the specdsl its PYTHONPATH names (run from a checkout's root,
    # --before would time that checkout twice).
    proc = subprocess.run([sys.executable, "-m", "specdsl.cli", "run", str(spec), "--store", str(store),
                           "--no-progress"], env=env, cwd=spec.parent, capture_output=True, text=True)
    elapsed = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(proc.stdout + proc.stderr)
    return elapsed, cpu_s(resource.RUSAGE_CHILDREN) - c


_BARE = """
import json, resource, sys
sys.path.insert(0, sys.argv[1])
import aiohttp  # noqa: F401 - imported before the clock starts
from bench_requests import bench_bare
def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
c = cpu()
took = bench_bare(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
print(json.dumps({"wall": took, "cpu": cpu() - c}))
"""


def timed_bare(api_base: str, n: int, conc: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of the bare client, timed from its first request to its last answer
    (no interpreter start, no imports). It runs in a fresh process each time, as a specdsl run does, so
    that neither side inherits this process's heap (its garbage collector walks every object the bench
    made before)."""
    proc = subprocess.run([sys.executable, "-c", _BARE, str(ROOT / "bench"), api_base, str(n), str(conc)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stdout + proc.stderr)
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    return figures["wall"], figures["cpu"]


def write_spec(d: Path, n: int, api_base: str, conc: int, prefix: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "questions.jsonl").write_text("".join(
        json.dumps({"id": f"q{i}", "q": f"Question {i}: what is {i} plus {i}?"}) + "\n" for i in range(n)))
    spec = d / "spec.yaml"
    spec.write_text(SPEC.format(api_base=api_base, conc=conc, prefix=prefix))
    return spec


def run_env(tree: Path, pycache: Path | None) -> dict:
    env = {**os.environ, "BENCH_KEY": "sk-bench", "LITELLM_LOCAL_MODEL_COST_MAP": "True", "PYTHONPATH": str(tree)}
    if pycache is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(pycache)
    return env


def bench_row(n: int, latency: float, conc: int, trees: dict[str, Path], repeats: int, prefix: str,
              compile_each_run: bool = False) -> None:
    server, api_base = start_server(latency)
    best: dict[str, float] = {}
    cpu: dict[str, float] = {}
    fixed: dict[str, float] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            spec = write_spec(d, n, api_base, conc, prefix)
            envs = {name: run_env(tree, None if compile_each_run else d / f"pycache-{name}")
                    for name, tree in trees.items()}
            if not compile_each_run:  # untimed: every module each variant imports is byte-compiled once
                warm = write_spec(d / "warm-up", 8, api_base, conc, prefix)
                for name in trees:
                    timed_run(warm, d / "warm-up" / f"store-{name}", envs[name])
            for rep in range(repeats):
                order = ["bare", *trees]
                order = order[rep % len(order):] + order[: rep % len(order)]  # rotate who goes first
                for name in order:
                    if name == "bare":
                        took, used = timed_bare(api_base, n, conc)
                    else:
                        store = d / f"store-{name}-{rep}"
                        took, used = timed_run(spec, store, envs[name])
                        again, _ = timed_run(spec, store, envs[name])  # all journaled: the fixed cost
                        fixed[name] = min(fixed.get(name, again), again)
                    best[name] = min(best.get(name, took), took)
                    cpu[name] = min(cpu.get(name, used), used)
    finally:
        server.kill()
    bare = best["bare"]
    ideal = n / conc * latency
    compiling = ", compiling every module each run" if compile_each_run else ""
    print(f"\nrequests={n} latency={latency}s concurrency={conc} ideal={ideal:.2f}s  "
          f"(best of {repeats}, interleaved, {prefix}/{compiling})")
    print(f"  {'bare aiohttp client':34s} {bare:7.2f} s  1.00x   cpu {cpu['bare']:6.2f} s")
    for name in trees:
        whole = best[name]
        print(f"  {'specdsl run (' + name + ')':34s} {whole:7.2f} s  {whole / bare:.2f}x   "
              f"cpu {cpu[name]:6.2f} s ({cpu[name] / cpu['bare']:.2f}x)   "
              f"fixed cost {fixed[name]:.2f} s, minus fixed {(whole - fixed[name]) / bare:.2f}x, "
              f"{(whole - bare) / n * 1000:.2f} ms/request over bare")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="2000:0.2:64,20000:0.05:256,openai/2000:0.2:64",
                    help="comma-separated [prefix/]requests:latency_s:concurrency")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--before", type=Path, help="another checkout to time beside this one (e.g. main)")
    ap.add_argument("--prefix", default="hosted_vllm", help="model prefix: hosted_vllm or openai")
    ap.add_argument("--compile-each-run", action="store_true",
                    help="no cached byte-code: each run compiles the modules it imports (PYTHONDONTWRITEBYTECODE)")
    args = ap.parse_args()
    trees = {"this": ROOT}
    if args.before:
        trees["before"] = args.before.resolve()
    for row in args.rows.split(","):
        prefix, _, row = row.rpartition("/")
        n, latency, conc = row.split(":")
        bench_row(int(n), float(latency), int(conc), trees, args.repeats, prefix or args.prefix,
                  args.compile_each_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
