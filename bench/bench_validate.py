"""How long a cold `specdsl validate specs/*.yaml` takes, against importing the libraries it cannot avoid.

Each measurement is a fresh process (nothing cached in memory; the OS file cache is warm after the first
round, as on a developer's machine). Both commands run interleaved, several times; the medians and their
ratio are printed. The goal is a ratio <= 2: validating should cost about what importing yaml,
jsonschema, jinja2 and pluggy costs, plus a little.

    python bench/bench_validate.py [--repeats 15] [--importtime]

``--importtime`` also prints the 25 slowest imports of one validate run (``python -X importtime``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINE = [sys.executable, "-c", "import yaml, jsonschema, jinja2, pluggy"]


def validate_cmd(specs: list[str]) -> list[str]:
    script = Path(sys.executable).with_name("specdsl")
    head = [str(script)] if script.exists() else [sys.executable, "-m", "specdsl.cli"]
    return head + ["validate", *specs]


def timed(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - start
    if proc.returncode not in (0, 2):
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr.decode()}")
    return elapsed


def import_profile(cmd: list[str], env: dict[str, str], top: int = 25) -> str:
    head = [sys.executable, "-X", "importtime", "-m", "specdsl.cli"] + cmd[cmd.index("validate"):]
    proc = subprocess.run(head, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    rows = []
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        self_us, cumulative, name = (part.strip() for part in line[len("import time:"):].split("|"))
        if self_us.isdigit():
            rows.append((int(self_us), int(cumulative), name))
    rows.sort(reverse=True)
    lines = [f"{'self ms':>8} {'cum ms':>8}  module"]
    lines += [f"{s / 1000:8.1f} {c / 1000:8.1f}  {n}" for s, c, n in rows[:top]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--importtime", action="store_true", help="print the slowest imports of one run")
    parser.add_argument("specs", nargs="*", help="default: specs/*.yaml")
    args = parser.parse_args()
    specs = args.specs or sorted(str(p.relative_to(ROOT)) for p in (ROOT / "specs").glob("*.yaml"))
    if not specs:
        sys.exit("no specs to validate")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    cmd = validate_cmd(specs)
    # One untimed round of each: byte-compile caches and the OS file cache are warm, as they are for a user.
    timed(cmd, env)
    timed(BASELINE, env)
    ours, base = [], []
    for _ in range(args.repeats):
        ours.append(timed(cmd, env))
        base.append(timed(BASELINE, env))
    m_ours, m_base = statistics.median(ours), statistics.median(base)
    print(f"specs: {' '.join(specs)}")
    print(f"validate  : median {m_ours * 1000:7.1f} ms  (min {min(ours) * 1000:.1f}, max {max(ours) * 1000:.1f})  "
          f"{' '.join(cmd[:2])} ...")
    print(f"baseline  : median {m_base * 1000:7.1f} ms  (min {min(base) * 1000:.1f}, max {max(base) * 1000:.1f})  "
          "python -c 'import yaml, jsonschema, jinja2, pluggy'")
    print(f"ratio     : {m_ours / m_base:.2f}x  (goal <= 2.0x, {args.repeats} repeats each, interleaved)")
    if args.importtime:
        print()
        print(import_profile(cmd, env))


if __name__ == "__main__":
    main()
