"""Per-row evaluation outputs: each probe's answers kept as a table (condition, model, prompt, answer,
parsed answer, verdict) in the evaluate node's store folder, shown by `inspect`, linked from report.html."""

from __future__ import annotations

import json
import types

import pytest

from specdsl import api
from specdsl.contract.hookspecs import GenResult, hookimpl
from specdsl.plugins import build_registry


class ArithmeticBackend:
    """Model `right` answers each sum correctly, model `wrong` adds one; no network, no weights."""

    name = "arith"
    version = "1"
    options_schema = {"type": "object", "additionalProperties": False, "properties": {}}

    def identity(self, options):
        return {"model": options["model"]}

    def price(self, options, input_tokens, output_tokens):
        return 0.0

    def generate(self, options, requests, on_result):
        for r in requests:
            a, b = (int(x) for x in r.messages[-1]["content"].rstrip("?").split("is ")[1].split(" + "))
            total = a + b + (1 if options["model"] == "wrong" else 0)
            on_result(GenResult(key=r.key, text=f"Let me add. Answer: {total}", input_tokens=1, output_tokens=1))


def registry():
    plugin = types.ModuleType("arith_plugin")

    @hookimpl
    def register_backends(register):
        register(ArithmeticBackend())

    plugin.register_backends = register_backends
    return build_registry(extra_plugins=(plugin,))


SPEC = """\
specdsl: 1
name: eval-rows
models:
  good: {backend: arith, model: right}
  bad: {backend: arith, model: wrong}
sources:
  problems: {path: problems.jsonl}
steps:
  - id: score
    evaluate:
      models: [good, bad]
      on: problems
      probes:
        - probe: accuracy
          conditions:
            - {name: good+hint, model: good, system: "Add {{ row.question }}"}
            - {name: bad, model: bad}
"""


@pytest.fixture
def evaluated(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDSL_PLUGINS", "none")
    (tmp_path / "problems.jsonl").write_text("".join(
        json.dumps({"id": f"p{i}", "question": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n" for i in range(3)))
    (tmp_path / "spec.yaml").write_text(SPEC)
    reg = registry()
    plan = api.compile_spec(tmp_path / "spec.yaml", registry=reg)
    result = api.run_plan(plan, progress=False, registry=reg)
    assert result.ok, [(n.id, n.status, n.note) for n in result.nodes]
    return plan, result, reg


def test_each_answer_is_kept_with_its_parsed_answer_and_verdict(evaluated):
    import pyarrow.parquet as pq

    plan, result, _ = evaluated
    node_dir = result.store.node_dir(plan.node("score").fingerprint)
    evaluation = result.store.meta(plan.node("score").fingerprint)["evaluation"]
    assert evaluation["results"][0]["rows_file"] == "rows-0-accuracy.parquet"
    rows = pq.read_table(node_dir / "rows-0-accuracy.parquet").to_pylist()
    assert [(r["condition"], r["model"], r["id"]) for r in rows] == \
        [("good+hint", "good", "p0"), ("good+hint", "good", "p1"), ("good+hint", "good", "p2"),
         ("bad", "bad", "p0"), ("bad", "bad", "p1"), ("bad", "bad", "p2")]
    first, last = rows[1], rows[-1]
    assert first["prompt"] == "[system] Add What is 1 + 1?\n[user] What is 1 + 1?"
    assert (first["answer"], first["parsed"], first["gold"], first["verdict"]) == \
        ("Let me add. Answer: 2", "2", "2", "correct")
    assert (last["parsed"], last["gold"], last["verdict"]) == ("5", "4", "wrong")
    # The table is an artifact of the run, listed in run.json.
    manifest = json.loads(result.manifest_path.read_text())
    assert {"node": "score", "kind": "evaluation rows", "path": str(node_dir / "rows-0-accuracy.parquet")} in \
        manifest["artifacts"]


def test_inspect_shows_the_answers_and_the_report_links_them(evaluated, tmp_path):
    from rich.console import Console

    from specdsl.views.inspect import inspect_node

    plan, result, reg = evaluated
    console = Console(record=True, width=250, color_system=None)
    inspect_node(plan, "score", rows=4, console=console, registry=reg, html=tmp_path / "score.html")
    text = console.export_text()
    assert "accuracy: 6 answers, row by row" in text and "showing 4" in text
    for column in ("condition", "model", "prompt", "answer", "parsed", "verdict"):
        assert column in text
    assert "good+hint" in text and "correct" in text
    page = (tmp_path / "score.html").read_text()
    assert "6 answers, row by row" in page and "Let me add. Answer: 2" in page
    report = (result.manifest_path.parent / "report.html").read_text()
    node_dir = result.store.node_dir(plan.node("score").fingerprint)
    assert f'href="{(node_dir / "rows-0-accuracy.parquet").as_uri()}"' in report
