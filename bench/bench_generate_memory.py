"""Peak memory of a whole `specdsl run` whose generate step answers N rows: flat in N when it streams.

    python bench/bench_generate_memory.py [--rows 20000,200000] [--before /path/to/other/checkout]
                                          [--concurrency 256]

Each row is a fresh ``specdsl run`` process (source -> generate -> map) on a fresh store against the fake
OpenAI-compatible server (tests/fakeserver.py, a separate process, answering at once). Printed per N:
wall seconds, the run's peak RSS (``wait4``'s ``ru_maxrss`` of that process alone) and the growth
against the smallest N. ``generate`` reads its input a batch at a time and answers a window of four
batches (32,768 rows) at a time, so past one window the peak should stay where it is; a checkout that
holds the step's whole table (``--before``) grows with N.
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

from bench_requests import start_server  # noqa: E402
from bench_run_requests import SPEC as RUN_SPEC  # noqa: E402

# bench_run_requests' spec (source -> generate), with a map after it that reads the answers back.
SPEC = RUN_SPEC + """\
  - id: short
    map: {{from: answers, columns: {{head: "{{{{ row.response[:16] }}}}"}}}}
"""


def run_once(spec: Path, store: Path, tree: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one ``specdsl run`` process."""
    env = {**os.environ, "BENCH_KEY": "sk-bench", "PYTHONPATH": str(tree)}
    t = time.perf_counter()
    # cwd: `python -m` puts the working directory first on sys.path, ahead of PYTHONPATH; run from the
    # tree itself so that each variant imports its own specdsl whatever folder the bench is started in.
    proc = subprocess.Popen([sys.executable, "-m", "specdsl.cli", "run", str(spec), "--store", str(store),
                             "--no-progress"], env=env, cwd=tree, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.stdout.read()
    _pid, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(out.decode(errors="replace"))
    return elapsed, usage.ru_maxrss / 1024  # kB on Linux


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="20000,200000", help="comma-separated row counts")
    ap.add_argument("--before", type=Path, help="another checkout to measure beside this one")
    ap.add_argument("--concurrency", type=int, default=256)
    args = ap.parse_args()
    trees = {"this": ROOT}
    if args.before:
        trees["before"] = args.before.resolve()
    sizes = [int(x) for x in args.rows.split(",")]
    server, api_base = start_server(0.0)
    results: dict[str, list[tuple[int, float, float]]] = {name: [] for name in trees}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            for n in sizes:
                folder = d / f"n{n}"
                folder.mkdir()
                (folder / "questions.jsonl").write_text("".join(
                    json.dumps({"id": f"q{i}", "q": f"Question {i}: what is {i} plus {i}?"}) + "\n"
                    for i in range(n)))
                spec = folder / "spec.yaml"
                spec.write_text(SPEC.format(api_base=api_base, conc=args.concurrency, prefix="hosted_vllm"))
                for name, tree in trees.items():
                    took, rss = run_once(spec, folder / f"store-{name}", tree)
                    results[name].append((n, took, rss))
                    print(f"  {name:7s} rows={n:>9,}  {took:7.1f} s  peak RSS {rss:7.0f} MB", flush=True)
    finally:
        server.kill()
    print()
    for name, rows in results.items():
        base = rows[0][2]
        growth = ", ".join(f"{n:,}: {rss / base:.2f}x" for n, _t, rss in rows)
        print(f"{name}: peak RSS against {rows[0][0]:,} rows: {growth}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
