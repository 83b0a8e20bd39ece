"""The core install: how long `pip install specdsl` takes in a fresh venv and how much it puts on disk.

Creates a venv in a temporary folder, installs this checkout without extras (editable, as the
pre-commit hook installs the repository), then checks that `specdsl validate specs/` and `specdsl plan`
of every shipped spec succeed there and that no heavy distribution came along. Prints one JSON line:

    python bench/bench_core_install.py            # goal: site-packages <= ~150 MB, no torch/pyarrow/...

Needs the package index (or a local mirror pip is configured for); nothing else.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = {"torch", "transformers", "trl", "datasets", "peft", "accelerate", "gguf", "litellm", "pyarrow",
         "matplotlib", "aiohttp", "numpy", "ray"}


def folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink()) / 1e6


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="specdsl-core-") as tmp:
        venv = Path(tmp) / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        bin_dir = venv / "bin"
        t0 = time.monotonic()
        subprocess.run([str(bin_dir / "pip"), "install", "-q", "-e", str(ROOT)], check=True)
        seconds = time.monotonic() - t0
        (site,) = venv.glob("lib/python*/site-packages")
        listed = subprocess.run([str(bin_dir / "pip"), "list", "--format", "json"], check=True,
                                capture_output=True, text=True).stdout
        dists = sorted(d["name"].lower() for d in json.loads(listed))
        checks = {"validate": [str(bin_dir / "specdsl"), "validate", str(ROOT / "specs")]}
        for spec in sorted((ROOT / "specs").glob("*.yaml")):
            checks[f"plan {spec.name}"] = [str(bin_dir / "specdsl"), "plan", str(spec)]
        failed = [name for name, cmd in checks.items()
                  if subprocess.run(cmd, capture_output=True, text=True).returncode != 0]
        report = {"install_seconds": round(seconds, 1), "site_packages_mb": round(folder_mb(site), 1),
                  "distributions": len(dists), "heavy": sorted(HEAVY & set(dists)), "failed": failed}
    print(json.dumps(report))
    return 1 if report["heavy"] or failed else 0


if __name__ == "__main__":
    sys.exit(main())
