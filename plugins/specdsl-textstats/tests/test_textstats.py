"""specdsl-textstats, tested the way a plugin author should: compile and run real specs through
``specdsl.api`` with a registry holding the plugin, and check the errors a user would see.

Run with ``pytest plugins/specdsl-textstats/tests`` (no network, no model, a temporary store).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from importlib.metadata import PackageNotFoundError, distribution, entry_points
from pathlib import Path

import pytest

import specdsl_textstats
from specdsl import api
from specdsl.errors import SpecErrors
from specdsl.contract.hookspecs import GenRequest, request_key
from specdsl.plugins import build_registry
from specdsl_textstats.backend import OptionError, TemplateBackend

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _installed() -> bool:
    try:
        distribution("specdsl-textstats")
    except PackageNotFoundError:
        return False
    return any(ep.name == "textstats" for ep in entry_points(group="specdsl"))


needs_install = pytest.mark.skipif(not _installed(), reason="specdsl-textstats is not pip-installed "
                                   "(pip install -e plugins/specdsl-textstats) so its entry point is absent")


@pytest.fixture
def registry(monkeypatch):
    """The built-ins plus this plugin passed directly: independent of what else is installed."""
    monkeypatch.setenv("SPECDSL_PLUGINS", "none")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reg = build_registry(extra_plugins=(specdsl_textstats,))
    assert not [w for w in caught if "specdsl_textstats" in str(w.message)], [str(w.message) for w in caught]
    return reg


@pytest.fixture
def demo(tmp_path) -> Path:
    for f in EXAMPLES.iterdir():
        shutil.copy(f, tmp_path / f.name)
    return tmp_path / "demo.yaml"


def write_spec(tmp_path: Path, body: str) -> Path:
    (tmp_path / "questions.jsonl").write_text((EXAMPLES / "questions.jsonl").read_text())
    path = tmp_path / "spec.yaml"
    path.write_text(textwrap.dedent(body).lstrip())
    return path


def spec_errors(path: Path, registry) -> list:
    with pytest.raises(SpecErrors) as info:
        api.compile_spec(path, registry=registry)
    return info.value.errors


def line_col(path: Path, needle: str) -> tuple[int, int]:
    """1-based line and column of the first occurrence of ``needle`` in the file."""
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if needle in line:
            return i, line.index(needle) + 1
    raise AssertionError(f"{needle!r} not in {path}")


# -- what the plugin registers ---------------------------------------------------------------------


def test_registers_backend_ops_recipe_probe(registry):
    info = next(p for p in registry.plugins if p.name == "specdsl_textstats")
    assert info.error is None
    assert info.provides == {"backends": ["template"], "ops": ["stats", "dedupe"],
                             "recipes": ["textstats.clean"], "probes": ["answer_length"]}
    assert registry.owner[("ops", "dedupe")] == "specdsl_textstats"


@needs_install
def test_entry_point_is_declared():
    (ep,) = [ep for ep in entry_points(group="specdsl") if ep.name == "textstats"]
    assert ep.value == "specdsl_textstats"
    assert ep.load() is specdsl_textstats


# -- end to end ------------------------------------------------------------------------------------


def test_demo_compiles_and_runs(demo, registry, tmp_path):
    plan = api.compile_spec(demo, registry=registry)
    assert [n.id for n in plan.nodes] == ["questions", "clean.deduped", "clean.stats", "clean", "answers",
                                          "lengths", "correct"]
    assert dict(plan.expansions)["clean"] == ("clean.deduped", "clean.stats", "clean")
    assert plan.node("answers").backend == "template 1"
    assert "response_words" in plan.node("lengths").columns

    result = api.run_plan(plan, store_dir=tmp_path / "store", registry=registry, progress=False)
    assert result.ok, [n.to_dict() for n in result.nodes]
    # dedupe (case/whitespace-insensitive) drops q2; the word-count filter drops "Hi".
    assert [r["id"] for r in result.rows("clean.deduped")] == ["q1", "q3", "q4", "q5", "q6"]
    assert [r["id"] for r in result.rows("clean")] == ["q1", "q4", "q5", "q6"]
    answers = {r["id"]: r["response"] for r in result.rows("answers")}
    assert answers == {"q1": "Let me add. Answer: 5", "q4": "Let me add. Answer: 17",
                       "q5": "I don't know: What is the capital of France?", "q6": "Let me add. Answer: 8"}
    assert {r["id"]: r["response_words"] for r in result.rows("lengths")}["q1"] == 5
    assert [r["id"] for r in result.rows("correct")] == ["q1", "q4"]

    stats = result.report("answers").stats
    assert stats["requests"] == 4 and stats["failed"] == 0
    assert stats["output_tokens"] == 5 + 5 + 9 + 5
    assert stats["cost"] == pytest.approx(0.5 * (stats["input_tokens"] + stats["output_tokens"]) / 1000)

    # A second run is served from the store: nothing recomputed, no request re-issued.
    again = api.run_plan(api.compile_spec(demo, registry=registry), store_dir=tmp_path / "store",
                         registry=registry, progress=False)
    assert {n.status for n in again.nodes} == {"cached"}


def test_estimates_downstream_of_dedupe_are_upper_bounds(demo, registry):
    """dedupe declares ``drops_rows``, so `plan` counts it as keeping every row and says the figures after
    it are upper bounds; stats keeps every row and adds no such assumption."""
    from specdsl.passes.estimate import estimate_plan
    from specdsl_textstats.ops import DedupeOp, StatsOp

    assert DedupeOp.drops_rows is True and StatsOp.drops_rows is False
    plan = estimate_plan(api.compile_spec(demo, registry=registry), registry)
    # The demo's questions file has 6 rows; dedupe and the recipe's word-count filter are assumed to keep them.
    assert plan.node("clean.stats").estimate["assumed_to_keep_every_row"] == ["clean.deduped"]
    answers = plan.node("answers").estimate
    assert answers["requests"] == 6
    assert answers["assumed_to_keep_every_row"] == ["answers", "clean", "clean.deduped"]


def test_changing_the_template_changes_only_generation_fingerprints(demo, registry):
    before = api.compile_spec(demo, registry=registry)
    demo.write_text(demo.read_text().replace("I don't know", "No idea"))
    after = api.compile_spec(demo, registry=registry)
    changed = {n.id for n in after.nodes if n.fingerprint != before.node(n.id).fingerprint}
    assert changed == {"answers", "lengths", "correct"}
    # The price is not part of the identity: a new price re-bills nothing.
    demo.write_text(demo.read_text().replace("price_per_1k_tokens: 0.5", "price_per_1k_tokens: 2"))
    repriced = api.compile_spec(demo, registry=registry)
    assert [n.fingerprint for n in repriced.nodes] == [n.fingerprint for n in after.nodes]


def test_failed_requests_leave_the_node_incomplete(tmp_path, registry):
    spec = write_spec(tmp_path, """
        specdsl: 1
        name: failing
        models:
          bot: {backend: template, model: m, fail_on: capital}
        sources:
          questions: {path: questions.jsonl}
        steps:
          - id: answers
            generate: {from: questions, model: bot, user: "{{ row.question }}"}
        """)
    result = api.run_plan(api.compile_spec(spec, registry=registry), store_dir=tmp_path / "store",
                          registry=registry, progress=False)
    report = result.report("answers")
    assert report.status == "incomplete" and report.stats["failed"] == 1
    assert "fail_on" in report.stats["errors"][0]


# -- the backend on its own ------------------------------------------------------------------------


def _requests(identity, prompts, **params):
    out = []
    for p in prompts:
        messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": p}]
        out.append(GenRequest(key=request_key(identity, messages, params), messages=tuple(messages),
                              params=params))
    return out


def test_backend_answers_each_request_through_on_result():
    backend = TemplateBackend()
    options = {"model": "m", "template": "[{{ system }}] {{ prompt | upper }} #{{ seed }}",
               "rules": [{"match": r"(?P<a>\d+)\*(?P<b>\d+)", "reply": "{{ named.a | int * named.b | int }}"}],
               "fail_on": "boom"}
    ident = backend.identity(options)
    reqs = _requests(ident, ["hello there", "6*7", "boom", "one two three four"], max_tokens=4, seed=1)
    seen = []
    backend.generate(options, reqs, seen.append)
    assert [r.key for r in seen] == [r.key for r in reqs]
    assert [r.text for r in seen] == ["[be brief] HELLO THERE", "42", None, "[be brief] ONE TWO"]
    assert "fail_on" in seen[2].error and not seen[2].ok
    assert seen[0].input_tokens == 4 and seen[0].output_tokens == 4
    assert seen[3].output_tokens == 4  # "[be brief] ONE TWO THREE FOUR #1" truncated to max_tokens words


def test_identity_fills_defaults_and_leaves_out_the_price():
    backend = TemplateBackend()
    plain = backend.identity({"model": "m"})
    explicit = backend.identity({"model": "m", "template": "{{ prompt }}", "rules": [],
                                 "price_per_1k_tokens": 3.0})
    assert plain == explicit
    assert "price_per_1k_tokens" not in json.dumps(plain)
    assert backend.price({"model": "m", "price_per_1k_tokens": 2.0}, 300, 200) == pytest.approx(1.0)
    assert backend.price({"model": "m"}, 300, 200) == 0.0


@pytest.mark.parametrize("options, message", [
    ({"template": "{{ prompt "}, "template: template syntax error"),
    ({"template": "{{ row.question }}"}, "unknown name 'row'"),
    ({"rules": [{"match": "(", "reply": "x"}]}, "rules[0].match: invalid regular expression"),
    ({"fail_on": "[a-"}, "fail_on: invalid regular expression"),
])
def test_identity_rejects_bad_templates_and_regexes(options, message):
    with pytest.raises(OptionError, match=message.replace("[", r"\[").replace("]", r"\]")):
        TemplateBackend().identity({"model": "m", **options})


# -- the errors a user gets ------------------------------------------------------------------------


def test_unknown_backend_option_is_a_positioned_error(tmp_path, registry):
    spec = write_spec(tmp_path, """
        specdsl: 1
        name: typo
        models:
          bot:
            backend: template
            model: m
            templte: "{{ prompt }}"
            max_words: ten
        sources:
          questions: {path: questions.jsonl}
        steps:
          - id: answers
            generate: {from: questions, model: bot, user: "{{ row.question }}"}
        """)
    errors = {e.code: e for e in spec_errors(spec, registry)}
    # S104: a key the backend's options_schema does not declare; S210: a declared option, bad value
    assert set(errors) == {"S104", "S210"}
    unknown = errors["S104"]
    assert unknown.message == "unknown key 'templte'"
    assert (unknown.pos.line, unknown.pos.col) == line_col(spec, "templte")
    assert unknown.key_path == ("models", "bot", "templte")
    assert unknown.hint == "did you mean 'template'?"
    wrong_type = errors["S210"]
    assert (wrong_type.pos.line, wrong_type.pos.col) == line_col(spec, "ten")
    assert wrong_type.key_path == ("models", "bot", "max_words")
    assert "backend 'template'" in wrong_type.message and "integer" in wrong_type.message


def test_bad_template_in_options_names_the_model(tmp_path, registry):
    spec = write_spec(tmp_path, """
        specdsl: 1
        name: badtemplate
        models:
          bot: {backend: template, model: m, template: "{{ row.question }}"}
        sources:
          questions: {path: questions.jsonl}
        steps:
          - id: answers
            generate: {from: questions, model: bot, user: "{{ row.question }}"}
        """)
    (err,) = spec_errors(spec, registry)
    assert err.code == "S210"
    assert err.message == "model 'bot': template: template uses unknown name 'row'"
    assert "render them into the step's `user:` template" in err.hint
    # check_options points at the template itself, and `specdsl validate` (no identities) finds it too.
    assert (err.pos.line, err.pos.col) == line_col(spec, '"{{ row.question }}"')
    assert err.key_path == ("models", "bot", "template")
    with pytest.raises(SpecErrors) as info:
        api.compile_spec(spec, registry=registry, identities=False)
    assert info.value.errors == [err]


def test_every_bad_template_and_regex_is_reported_at_its_option(tmp_path, registry):
    spec = write_spec(tmp_path, """
        specdsl: 1
        name: badrules
        models:
          bot:
            backend: template
            model: m
            rules:
              - {match: '(\\d+', reply: "{{ match[1] }}"}
              - {match: 'ok', reply: "{{ nope }}"}
            fail_on: '[a-'
        sources:
          questions: {path: questions.jsonl}
        steps:
          - id: answers
            generate: {from: questions, model: bot, user: "{{ row.question }}"}
        """)
    with pytest.raises(SpecErrors) as info:
        api.compile_spec(spec, registry=registry, identities=False)
    errors = info.value.errors
    assert [e.key_path[2:] for e in errors] == [("rules", 0, "match"), ("rules", 1, "reply"), ("fail_on",)]
    assert [(e.pos.line, e.pos.col) for e in errors] == [
        line_col(spec, "'(\\d+'"), line_col(spec, '"{{ nope }}"'), line_col(spec, "'[a-'")]
    assert "rules[0].match: invalid regular expression" in errors[0].message
    assert "unknown name 'nope'" in errors[1].message
    assert errors[2].message.startswith("model 'bot': fail_on: invalid regular expression")


def test_missing_columns_are_positioned_errors_with_hints(tmp_path, registry):
    spec = write_spec(tmp_path, """
        specdsl: 1
        name: columns
        sources:
          questions: {path: questions.jsonl}
        steps:
          - id: unique
            dedupe: {from: questions, columns: [question, anwser]}
          - id: lengths
            stats: {from: unique, column: questoin}
          - id: again
            stats: {from: lengths, column: answer, prefix: questoin}
        """)
    errors = spec_errors(spec, registry)
    assert [e.code for e in errors] == ["S403", "S403", "S401"]
    dedupe, stats, clash = errors
    assert (dedupe.pos.line, dedupe.pos.col) == line_col(spec, "anwser")
    assert dedupe.key_path == ("unique", "columns", 1)
    assert dedupe.message == "column 'anwser' does not exist at this step"
    assert dedupe.hint.startswith("did you mean 'answer'?")
    assert (stats.pos.line, stats.pos.col) == line_col(spec, "questoin}")
    assert stats.hint.startswith("did you mean 'question'?")
    # the columns of the broken `lengths` step still flow on, so `again` gets its own error
    assert clash.message == ("columns 'questoin_chars', 'questoin_words', 'questoin_lines' already exist; "
                             "stats would overwrite them")
    assert clash.key_path == ("again", "prefix")


RECIPE_SPEC = """
    specdsl: 1
    name: recipes
    sources:
      questions: {path: questions.jsonl}
    steps:
      - id: first
        map: {from: questions, columns: {q: "{{ row.question }}"}}
      - id: cleaned
        use: textstats.clean
        with: WITH
    """


@pytest.mark.parametrize("with_, code, message, hint, needle", [
    # the recipe's params_schema (checked by the schema stage, positioned at the key)
    ("{source: questions, colum: question}", "S104", "unknown key 'colum'", "did you mean 'column'?", "colum:"),
    ("{source: questions, min_words: -1}", "S103", "steps[1].with.min_words: -1 is less than the minimum of 0",
     None, "-1"),
    # the recipe's own rule (a ValueError from expand), positioned at `use:`
    ("{source: questions, column: question, min_words: 5, max_words: 2}", "S211",
     "recipe 'textstats.clean': min_words (5) must be <= max_words (2)", None, "use: textstats.clean"),
    # the expansion is checked like hand-written steps: the default column `text` does not exist
    ("{source: questions}", "S403", "column 'text' does not exist at this step", "columns here",
     "use: textstats.clean"),
])
def test_recipe_errors(tmp_path, registry, with_, code, message, hint, needle):
    spec = write_spec(tmp_path, RECIPE_SPEC.replace("WITH", with_))
    errors = spec_errors(spec, registry)
    if code == "S403":  # both expanded steps that read the column say so
        assert [e.key_path for e in errors] == [("cleaned.deduped", "columns", 0), ("cleaned.stats", "column")]
    else:
        assert len(errors) == 1, [e.headline() for e in errors]
    err = errors[0]
    assert (err.code, err.message) == (code, message)
    if hint:
        assert hint in err.hint
    assert err.pos.line == line_col(spec, needle)[0]
    if code in ("S104", "S103"):
        assert err.pos.col == line_col(spec, needle)[1]


def test_cli_reports_the_error_with_a_caret(tmp_path):
    if not _installed():
        pytest.skip("the CLI finds plugins through entry points; specdsl-textstats is not installed")
    spec = write_spec(tmp_path, """
        specdsl: 1
        name: cli
        sources:
          questions: {path: questions.jsonl}
        steps:
          - id: lengths
            stats: {from: questions, column: questoin}
        """)
    env = {**os.environ, "SPECDSL_PLUGINS": "textstats"}
    proc = subprocess.run([sys.executable, "-m", "specdsl.cli", "validate", str(spec)], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    line, col = line_col(spec, "questoin")
    assert f"spec.yaml:{line}:{col}: error[S403]: column 'questoin' does not exist at this step" in proc.stderr
    assert "did you mean 'question'?" in proc.stderr
    assert "Traceback" not in proc.stderr


# -- the probe -------------------------------------------------------------------------------------


def test_the_probes_parameters_are_checked_by_its_schema(tmp_path, registry):
    """The evaluate step's schema includes this plugin's probe: a misspelt parameter is a positioned error."""
    spec = write_spec(tmp_path, """
        specdsl: 1
        name: probe
        models:
          short: {backend: template, model: s, template: "ok"}
        sources:
          questions: {path: questions.jsonl}
        steps:
          - id: lengths
            evaluate:
              models: [short]
              on: questions
              probes: [{probe: answer_length, promt: "{{ row.question }}"}]
        """)
    (err,) = spec_errors(spec, registry)
    assert (err.code, (err.pos.line, err.pos.col)) == ("S104", line_col(spec, "promt")), err.render()
    assert "promt" in err.message and "prompt" in (err.hint or "")
    spec.write_text(spec.read_text().replace("promt", "prompt"))
    assert api.compile_spec(spec, registry=registry).has("lengths")

    # The probe's own check: its template must fit the rows it is asked about.
    spec.write_text(spec.read_text().replace("row.question", "row.qestion"))
    (err,) = spec_errors(spec, registry)
    assert (err.code, (err.pos.line, err.pos.col)) == ("S302", line_col(spec, "row.qestion")), err.render()
    assert "did you mean 'question'" in err.hint


@needs_install
def test_answer_length_probe(tmp_path, monkeypatch):
    # Run through the installed entry point (the process-wide registry a run uses by default).
    monkeypatch.setenv("SPECDSL_PLUGINS", "textstats")
    import specdsl.plugins as plugins

    monkeypatch.setattr(plugins, "_DEFAULT", None)
    spec = write_spec(tmp_path, """
        specdsl: 1
        name: probe
        models:
          short: {backend: template, model: s, template: "ok"}
          long: {backend: template, model: l, template: "{{ prompt }} {{ prompt }}"}
        sources:
          questions: {path: questions.jsonl}
        steps:
          - id: lengths
            evaluate:
              models: [short, long]
              on: questions
              probes: [{probe: answer_length, prompt: "{{ row.question }}"}]
        """)
    result = api.run_plan(api.compile_spec(spec), store_dir=tmp_path / "store", progress=False)
    assert result.ok
    (evaluation,) = result.evaluations["lengths"]["results"]
    assert evaluation["results"]["short"]["mean_words"] == 1
    assert evaluation["results"]["long"]["answers"] == 6
    assert evaluation["results"]["long"]["mean_words"] > 4
