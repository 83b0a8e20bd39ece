"""Transforms at scale: source -> filter -> map -> format -> Parquet export, N small rows.

Runs the same 5-step pipeline three ways in the same run, each in its own process (so peak RSS is that
pipeline's alone), and prints wall time, CPU time and peak RSS, with ratios against HF datasets by hand:

* specdsl: `specdsl run` on a spec (a fresh store each time);
* HF datasets by hand: `load_dataset("json")` -> `filter` -> `map` -> `map` -> `to_parquet`;
* pyarrow by hand: read_json -> compute filter -> string ops -> write_table (a floor, not a peer).

    python bench/bench_scale.py                      # 100K, 400K and 1M rows
    python bench/bench_scale.py --big                # and 5M, if the disk has room
    python bench/bench_scale.py --rows 20000 --skip datasets

The issue's check (read the ratios on a shared machine, not the seconds): at 400K rows specdsl's peak
RSS is at most 600 MB and its time at most 0.5x HF datasets'; its peak RSS at 1M is about its peak at
100K (memory set by the batch size, not the table).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SPEC = """\
specdsl: 1
name: scale
sources:
  rows: {path: rows.jsonl}
steps:
  - id: kept
    filter: {from: rows, where: "{{ row.n % 3 != 0 }}"}
  - id: tagged
    map: {from: kept, columns: {label: "{{ row.category }}"}}
  - id: shaped
    format: {from: tagged, user: "{{ row.question }}", assistant: "{{ row.answer }}"}
  - id: out
    export: {from: shaped, path: out, format: parquet, card: false}
"""

HF = """\
import sys
from datasets import load_dataset, disable_progress_bars
disable_progress_bars()
src, out = sys.argv[1], sys.argv[2]
ds = load_dataset("json", data_files=src, split="train", cache_dir=out + "/cache")
ds = ds.filter(lambda r: r["n"] % 3 != 0)
ds = ds.map(lambda r: {"label": r["category"]})
ds = ds.map(lambda r: {"messages": [{"role": "user", "content": r["question"]},
                                    {"role": "assistant", "content": r["answer"]}]},
            remove_columns=[c for c in ds.column_names if c != "id"])
ds.to_parquet(out + "/data.parquet")
"""

ARROW = """\
import sys
import pyarrow as pa, pyarrow.compute as pc, pyarrow.json as pj, pyarrow.parquet as pq
src, out = sys.argv[1], sys.argv[2]
t = pj.read_json(src)
n = t["n"]
t = t.filter(pc.not_equal(pc.subtract(n, pc.multiply(pc.divide(n, 3), 3)), 0))
t = t.append_column("label", t["category"])
messages = pa.array([[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
                     for q, a in zip(t["question"].to_pylist(), t["answer"].to_pylist())])
pq.write_table(pa.table({"id": t["id"], "messages": messages}), out + "/data.parquet")
"""


def make_rows(path: Path, n: int) -> None:
    cats = ["addition", "subtraction", "word_problem", "comparison"]
    with path.open("w", encoding="utf-8") as fh:
        for i in range(n):
            fh.write(json.dumps({"id": f"r{i}", "n": i, "category": cats[i % 4],
                                 "question": f"What is {i} plus {i % 97}? Show the steps briefly.",
                                 "answer": f"Answer: {i + i % 97}"}) + "\n")


def timed(cmd: list[str], cwd: Path, env: dict | None = None) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of a child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    # ru_maxrss of RUSAGE_CHILDREN is the largest child so far: run the heaviest last or read it per child
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return seconds, max(peak, before) / 1024


def run_one(kind: str, work: Path, src: Path) -> tuple[float, float]:
    out = work / kind
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    if kind == "specdsl":
        shutil.copy(src, out / "rows.jsonl")
        (out / "spec.yaml").write_text(SPEC)
        return timed([sys.executable, "-m", "specdsl", "run", "--no-progress", "spec.yaml"], out,
                     {"SPECDSL_PLUGINS": "none",  # this checkout's specdsl, whatever is installed
                      "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
    script = out / "by_hand.py"
    script.write_text(HF if kind == "datasets" else ARROW)
    return timed([sys.executable, str(script), str(src), str(out)], out)


BIG = 5_000_000
BYTES_PER_ROW = 1200  # the input and every pipeline's stores and outputs, generously


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 400_000, 1_000_000])
    parser.add_argument("--big", action="store_true", help=f"also {BIG:,} rows, if the disk has room")
    parser.add_argument("--skip", nargs="*", default=[], help="datasets and/or pyarrow")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    sizes = list(args.rows)
    if args.big:
        free = shutil.disk_usage(work).free
        if free > BIG * BYTES_PER_ROW:
            sizes.append(BIG)
        else:
            print(f"skipping {BIG:,} rows: {free / 1e9:.1f} GB free in {work}, about "
                  f"{BIG * BYTES_PER_ROW / 1e9:.0f} GB needed")
    peaks: dict[int, float] = {}
    try:
        print(f"{'rows':>9}  {'pipeline':<10} {'seconds':>8} {'cpu s':>7} {'peak MB':>8}  {'time vs datasets':>16}")
        for n in sizes:
            src = work / f"rows-{n}.jsonl"
            make_rows(src, n)
            figures = {}
            for kind in [k for k in ("pyarrow", "specdsl", "datasets") if k not in args.skip]:
                figures[kind] = peak_of(kind, work, src)
                shutil.rmtree(work / kind, ignore_errors=True)  # the disk, for the next size
            base = figures.get("datasets", (None, None, None))[0]
            for kind, (seconds, cpu, peak) in figures.items():
                ratio = f"{seconds / base:.2f}x" if base else "-"
                print(f"{n:>9}  {kind:<10} {seconds:>8.1f} {cpu:>7.1f} {peak:>8.0f}  {ratio:>16}", flush=True)
            if "specdsl" in figures:
                peaks[n] = figures["specdsl"][2]
                if n == 400_000 and base:
                    seconds, _cpu, peak = figures["specdsl"]
                    verdict = "ok" if peak <= 600 and seconds <= 0.5 * base else "NOT MET"
                    print(f"{'':>9}  check at 400K: peak {peak:.0f} MB (<= 600), time {seconds / base:.2f}x "
                          f"datasets (<= 0.50x): {verdict}", flush=True)
            src.unlink()
        if len(peaks) > 1:
            low, high = min(peaks), max(peaks)
            print(f"specdsl peak RSS at {high:,} rows / at {low:,} rows: {peaks[high] / peaks[low]:.2f}x "
                  f"({peaks[high]:.0f} MB / {peaks[low]:.0f} MB) for {high / low:.0f}x the rows")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def peak_of(kind: str, work: Path, src: Path) -> tuple[float, float, float]:
    """Run one pipeline under a wrapper process that reports its child's own (wall seconds, CPU seconds,
    peak RSS in MB): RUSAGE_CHILDREN of a process with one child is that child's."""
    wrapper = textwrap.dedent(f"""
        import resource, subprocess, sys, time, json
        sys.path.insert(0, {str(ROOT / 'bench')!r})
        import bench_scale
        from pathlib import Path
        seconds, _ = bench_scale.run_one({kind!r}, Path({str(work)!r}), Path({str(src)!r}))
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        print(json.dumps([seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024]))
        """)
    proc = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    seconds, cpu, peak = json.loads(proc.stdout.strip().splitlines()[-1])
    return seconds, cpu, peak


if __name__ == "__main__":
    main()
