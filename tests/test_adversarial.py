"""Adversarial inputs (issue 14, item 9 and 14): a broken store, hostile or malformed data files, values
that validate must bound, and small front-end positions. Every case must end in a clear message (a
positioned error at validate, or a RunError naming the file and row at run), never a traceback or a hang.

Runs go through the API or `specdsl` subprocesses; nothing of specdsl's is mocked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from specdsl import api
from specdsl.errors import RunError
from tests.conftest import ROOT

TRANSFORM_SPEC = """\
specdsl: 1
name: adversarial
sources:
  rows: {path: rows.jsonl}
steps:
  - id: doubled
    map: {from: rows, columns: {q2: "{{ row.q }}{{ row.q }}"}}
"""


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "specdsl", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def transform_spec(tmp_path: Path) -> Path:
    (tmp_path / "rows.jsonl").write_text('{"id":"a","q":"x"}\n{"id":"b","q":"y"}\n')
    spec = tmp_path / "spec.yaml"
    spec.write_text(TRANSFORM_SPEC)
    return spec


def node_dir(tmp_path: Path, node: str) -> Path:
    plan = api.compile_spec(tmp_path / "spec.yaml")
    fp = plan.node(node).fingerprint
    return tmp_path / ".specdsl" / "nodes" / fp[:2] / fp


def run_twice_statuses(tmp_path: Path) -> tuple[str, str]:
    """The `doubled` node's status in the run after the damage, and in the run after that."""
    statuses = []
    for _ in range(2):
        result = api.run_plan(api.compile_spec(tmp_path / "spec.yaml"), progress=False)
        assert result.ok
        assert [r["q2"] for r in result.rows("doubled")] == ["xx", "yy"]
        manifest = json.loads((tmp_path / ".specdsl" / "run.json").read_text())
        statuses.append({n["id"]: n["status"] for n in manifest["nodes"]}["doubled"])
    return statuses[0], statuses[1]


# -- the store (item 9) ---------------------------------------------------------------------------------

def _damage_truncate_data(d: Path) -> None:
    data = d / "data.parquet"
    data.write_bytes(data.read_bytes()[:40])


def _damage_garbage_meta(d: Path) -> None:
    (d / "meta.json").write_text("{not json at all")


def _damage_delete_meta(d: Path) -> None:
    (d / "meta.json").unlink()


def _damage_meta_is_a_list(d: Path) -> None:
    (d / "meta.json").write_text("[1, 2, 3]")


@pytest.mark.parametrize("damage", [_damage_truncate_data, _damage_garbage_meta, _damage_delete_meta,
                                    _damage_meta_is_a_list], ids=lambda f: f.__name__[8:])
def test_a_damaged_stored_node_is_recomputed_once_then_cached(tmp_path, damage):
    spec = transform_spec(tmp_path)
    assert api.run_plan(api.compile_spec(spec), progress=False).ok
    damage(node_dir(tmp_path, "doubled"))
    first, second = run_twice_statuses(tmp_path)
    assert (first, second) == ("ran", "cached")  # recomputed, then trusted: never re-run forever
    assert any((tmp_path / ".specdsl" / "quarantine").iterdir())  # the broken copy is kept for a post-mortem


def test_a_file_where_the_store_should_be_is_a_clear_error(tmp_path):
    spec = transform_spec(tmp_path)
    (tmp_path / ".specdsl").write_text("in the way")
    for command in ("run", "plan"):
        out = cli(command, "--no-progress" if command == "run" else "--json", str(spec))
        assert "Traceback" not in out.stderr, out.stderr
        if command == "run":
            assert out.returncode == 1
            assert "is not a folder" in out.stderr and "--store" in out.stderr, out.stderr


def test_a_garbage_journal_is_a_clear_error_naming_the_file(tmp_path):
    from specdsl.execute.journal import RequestJournal

    path = tmp_path / "journal.sqlite"
    path.write_bytes(b"this is not an sqlite database, just garbage " * 200)
    with pytest.raises(RunError) as err:
        RequestJournal(path)
    assert str(path) in str(err.value) and err.value.hint
    assert path.read_bytes().startswith(b"this is not")  # never overwritten: it may hold paid answers


def test_a_run_over_a_garbage_journal_stops_with_that_message(tmp_path):
    from tests.fakeserver import FakeServer

    (tmp_path / "rows.jsonl").write_text('{"id":"a","q":"x"}\n')
    with FakeServer() as srv:
        spec = tmp_path / "spec.yaml"
        spec.write_text(f"""\
specdsl: 1
name: journal
models:
  m: {{backend: litellm, model: hosted_vllm/m, api_base: "http://127.0.0.1:{srv.port}/v1", max_retries: 0}}
sources:
  rows: {{path: rows.jsonl}}
steps:
  - id: answers
    generate: {{from: rows, model: m, user: "{{{{ row.q }}}}"}}
""")
        (tmp_path / ".specdsl").mkdir()
        (tmp_path / ".specdsl" / "journal.sqlite").write_bytes(b"garbage " * 1000)
        out = cli("run", "--no-progress", str(spec))
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert "journal.sqlite cannot be read" in out.stderr and "move it aside" in out.stderr, out.stderr
