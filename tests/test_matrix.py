"""Variants in the language: a step's `matrix:` expands into one step per combination, later steps follow.

* two variants share the nodes upstream of the matrix (one set of requests in the journal) and differ only
  where the matrix says;
* an evaluate step lists every variant side by side, and an accuracy condition naming the matrixed step
  becomes one condition per variant;
* a wrong matrix value is an error positioned at that value.
"""

from __future__ import annotations

import textwrap
import types
import warnings

import pytest

from specdsl import api
from specdsl.contract.hookspecs import GenResult, hookimpl
from specdsl.errors import SpecErrors
from specdsl.plugins import build_registry


class CountingEcho:
    name, version = "counting_echo", "1"
    options_schema = {"type": "object", "properties": {}, "additionalProperties": False}

    def __init__(self):
        self.sent = 0

    def identity(self, options): return {"model": options["model"]}
    def price(self, options, i, o): return 0.0

    def generate(self, options, requests, on_result):
        for r in requests:
            self.sent += 1
            on_result(GenResult(key=r.key, text=r.messages[-1]["content"].upper()))


@pytest.fixture(autouse=True)
def _only_builtins(monkeypatch):
    monkeypatch.setenv("SPECDSL_PLUGINS", "none")


def registry_with_echo():
    backend = CountingEcho()
    mod = types.ModuleType("echo_plugin")
    mod.register_backends = hookimpl(lambda register: register(backend))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return build_registry(extra_plugins=(mod,)), backend


SPEC = """\
specdsl: 1
name: matrix
models:
  m: {backend: counting_echo, model: e}
sources:
  rows: {path: rows.jsonl}
steps:
  - id: answers
    generate: {from: rows, model: m, user: "{{ row.q }}"}
  - id: tagged
    matrix: {columns.tag: [left, right]}
    map: {from: answers, columns: {tag: "none"}}
  - id: judged
    generate: {from: tagged, model: m, user: "{{ row.response }}", into: verdict}
"""


def test_variants_share_upstream_nodes_and_differ_only_where_the_matrix_says(tmp_path):
    (tmp_path / "rows.jsonl").write_text('{"id": "a", "q": "one"}\n{"id": "b", "q": "two"}\n')
    (tmp_path / "spec.yaml").write_text(SPEC)
    registry, backend = registry_with_echo()
    plan = api.compile_spec(tmp_path / "spec.yaml", registry=registry)
    ids = [n.id for n in plan.nodes]
    assert ids.count("answers") == 1
    assert {"tagged.columns_tag-left", "tagged.columns_tag-right",
            "judged.columns_tag-left", "judged.columns_tag-right"} <= set(ids)
    assert plan.node("judged.columns_tag-left").input("from") == "tagged.columns_tag-left"
    assert plan.node("tagged.columns_tag-left").params["columns"] == {"tag": "left"}
    assert dict(plan.expansions)["tagged"] == ("tagged.columns_tag-left", "tagged.columns_tag-right")
    result = api.run_plan(plan, store_dir=tmp_path / "store", registry=registry, progress=False)
    assert result.ok, [n.to_dict() for n in result.nodes]
    assert [r["tag"] for r in result.rows("tagged.columns_tag-right")] == ["right", "right"]
    assert [r["verdict"] for r in result.rows("judged.columns_tag-left")] == ["ONE", "TWO"]
    # The teacher was asked once per row, and the judge's requests (the same prompts in both variants)
    # once per row too: the second variant's come from the journal.
    assert backend.sent == 4
    assert result.report("judged.columns_tag-right").stats["cached_requests"] == 2


EVAL_SPEC = """\
specdsl: 1
name: matrix-eval
models:
  base: {{backend: transformers, model: {model}}}
sources:
  chats: {{path: chats.jsonl}}
  held: {{path: held.jsonl}}
steps:
  - id: sft
    matrix: {{mask: [true, false]}}
    train: {{from: chats, model: base, max_steps: 1}}
  - id: score
    evaluate:
      models: [base, sft]
      on: held
      probes: [{{probe: accuracy, conditions: [{{name: base, model: base}}, {{name: trained, model: sft}}],
                baseline: base}}]
"""


def _eval_spec(tmp_path, model_dir, text=EVAL_SPEC):
    (tmp_path / "chats.jsonl").write_text(
        '{"id": "c", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    (tmp_path / "held.jsonl").write_text('{"id": "h", "question": "2+2?", "answer": "4"}\n')
    (tmp_path / "spec.yaml").write_text(text.format(model=model_dir))
    return tmp_path / "spec.yaml"


def test_an_evaluate_step_compares_every_variant_side_by_side(tmp_path, tiny_model_dir):
    plan = api.compile_spec(_eval_spec(tmp_path, tiny_model_dir), identities=False)
    score = plan.node("score")
    assert score.params["models"] == ["base", "sft.mask-true", "sft.mask-false"]
    conditions = score.params["probes"][0]["conditions"]
    assert [(c["name"], c["model"]) for c in conditions] == [
        ("base", "base"), ("trained.mask-true", "sft.mask-true"), ("trained.mask-false", "sft.mask-false")]
    assert plan.node("sft.mask-false").params["mask"] is False and plan.node("sft.mask-true").params["mask"] is True
    # The variants' tokenize nodes differ (mask changes the labels); the base model is shared.
    assert plan.node("sft.mask-true.tokens").fingerprint != plan.node("sft.mask-false.tokens").fingerprint


def test_a_wrong_matrix_value_is_reported_at_the_value(tmp_path, tiny_model_dir):
    spec = _eval_spec(tmp_path, tiny_model_dir, EVAL_SPEC.replace("mask: [true, false]", "mask: [true, maybe]"))
    with pytest.raises(SpecErrors) as info:
        api.compile_spec(spec, identities=False)
    (err,) = info.value.errors
    line = spec.read_text().splitlines()[9]
    assert err.code == "S103" and err.pos.line == 10 and err.pos.col == line.index("maybe") + 1
    assert "matrix value 'maybe' for `mask`" in err.message


def test_plan_expanded_shows_the_variants(tmp_path, tiny_model_dir):
    from specdsl.cli import main
    from click.testing import CliRunner

    spec = _eval_spec(tmp_path, tiny_model_dir)
    out = CliRunner().invoke(main, ["plan", "--expanded", str(spec)])
    assert out.exit_code == 0, out.output
    assert "sft.mask-true" in out.output and "sft.mask-false" in out.output
