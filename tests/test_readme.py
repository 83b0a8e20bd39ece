"""The README's tour of the spec language is a spec that validates (docs that match behaviour)."""

from __future__ import annotations

import re
from pathlib import Path

from specdsl import api

ROOT = Path(__file__).resolve().parent.parent


def test_the_readme_tour_validates(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDSL_PLUGINS", "none")
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    tour = re.search(r"```yaml\n(# yaml-language-server.*?)```", text, re.S).group(1)
    (tmp_path / "data").mkdir()
    row = '{"id": "1", "category": "addition", "question": "1+1?", "answer": "2"}\n'
    for name in ("word_problems.jsonl", "word_problems_heldout.jsonl"):
        (tmp_path / "data" / name).write_text(row)
    (tmp_path / "tour.yaml").write_text(tour)
    results = api.validate_paths([tmp_path / "tour.yaml"])
    assert len(results) == 1 and all(errors is None for errors in results.values()), results
