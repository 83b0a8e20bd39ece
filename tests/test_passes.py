"""The plan IR and its passes: fingerprints, secrets, JSON round trip, filter push-down, pruning.

The pipeline under test is tests/specs/full.yaml (generate -> filter -> filter -> erase -> train, a
map nothing reads, format -> export, evaluate), copied into a temporary folder so each test can edit
the spec and its data.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from specdsl import api

from specdsl.contract import hookspecs
from specdsl.ir.plan import Plan
from specdsl.plugins import build_registry
from specdsl.frontend.schema import SECRET_PATTERN

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "specs"


@pytest.fixture
def full(tmp_path) -> Path:
    shutil.copytree(FIXTURES / "data", tmp_path / "data")
    shutil.copy(FIXTURES / "full.yaml", tmp_path / "full.yaml")
    return tmp_path / "full.yaml"


def fingerprints(path: Path, **kwargs) -> dict[str, str]:
    plan = api.compile_spec(path, passes=False, **kwargs)
    return {n.id: n.fingerprint for n in plan.nodes}


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new))


def changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    assert before.keys() == after.keys()
    return {k for k in before if before[k] != after[k]}


# Everything downstream of the teacher's answers (the pruned `scratch` map reads only the source).
AFTER_ANSWERS = {"answers", "additions", "kept", "erased", "sft.tokens", "sft", "pairs", "dump", "score"}


# --------------------------------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------------------------------


def test_fingerprints_are_stable_across_runs(full):
    first = fingerprints(full)
    assert fingerprints(full) == first
    assert len(set(first.values())) == len(first)  # distinct nodes, distinct keys
    assert all(len(fp) == 64 for fp in first.values())


def test_fingerprints_are_stable_across_processes(full):
    script = ("import json, sys; from specdsl import api; "
              "p = api.compile_spec(sys.argv[1], passes=False); "
              "print(json.dumps({n.id: n.fingerprint for n in p.nodes}))")
    results = []
    for seed in ("1", "2"):  # different hash seeds: no set or dict ordering may leak into a fingerprint
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONWARNINGS": "ignore"}
        out = subprocess.run([sys.executable, "-c", script, str(full)], capture_output=True, text=True, env=env,
                             cwd=full.parent, timeout=60, check=True)
        results.append(json.loads(out.stdout))
    assert results[0] == results[1] == fingerprints(full)


def test_a_param_change_invalidates_the_node_and_what_follows(full):
    before = fingerprints(full)
    edit(full, "      temperature: 0\n", "      temperature: 0.5\n")
    assert changed(before, fingerprints(full)) == AFTER_ANSWERS


def test_a_template_change_invalidates_the_node_and_what_follows(full):
    before = fingerprints(full)
    edit(full, 'user: "{{ row.question }}"', 'user: "Question: {{ row.question }}"')
    assert changed(before, fingerprints(full)) == AFTER_ANSWERS


def test_an_unrelated_step_change_invalidates_only_that_step(full):
    before = fingerprints(full)
    edit(full, "path: out/pairs", "path: out/other")
    assert changed(before, fingerprints(full)) == {"dump"}
    edit(full, "shout: \"{{ row.question | upper }}\"", "shout: \"{{ row.question | lower }}\"")
    assert changed(before, fingerprints(full)) == {"dump", "scratch"}


def test_a_source_file_change_invalidates_its_readers(full):
    before = fingerprints(full)
    with (full.parent / "data" / "problems.jsonl").open("a") as fh:
        fh.write('{"id": "p4", "category": "addition", "question": "What is 3 + 3?", "answer": "6"}\n')
    assert changed(before, fingerprints(full)) == {"problems", "scratch"} | AFTER_ANSWERS
    # The held-out file did not change: nor did its source node.
    assert "heldout" not in changed(before, fingerprints(full))


def test_a_used_var_change_invalidates_its_readers_and_an_unused_one_nothing(full):
    before = fingerprints(full)
    edit(full, "nobody reads this var", "still nobody")
    assert changed(before, fingerprints(full)) == set()
    edit(full, "Subtract. End with", "Take away. End with")  # vars.strategies: the teacher's system prompt
    assert changed(before, fingerprints(full)) == AFTER_ANSWERS
    before = fingerprints(full)
    edit(full, 'generic: "You are a helpful assistant."', 'generic: "You are terse."')  # evaluate's systems
    assert changed(before, fingerprints(full)) == {"score"}


def test_layout_comments_and_meta_do_not_change_fingerprints(full):
    before = fingerprints(full)
    text = full.read_text()
    text = text.replace("steps:\n", "steps:\n  # a comment\n\n")
    text = text.replace("    train: {from: erased,", "    meta: {owner: me}\n    train: {from: erased,")
    text = text.replace("{from: additions, match:", "{meta: {why: gold}, from: additions, match:")
    full.write_text(text)
    assert fingerprints(full) == before


def test_model_options_are_part_of_the_identity(full):
    before = fingerprints(full, identities=True)
    edit(full, "max_new_tokens: 32", "max_new_tokens: 33")
    assert changed(before, fingerprints(full, identities=True)) == AFTER_ANSWERS
    # batch_size is an execution choice, not an identity: it changes nothing.
    before = fingerprints(full, identities=True)
    edit(full, "max_new_tokens: 33", "max_new_tokens: 33, batch_size: 2")
    assert changed(before, fingerprints(full, identities=True)) == set()


# --------------------------------------------------------------------------------------------------
# Secrets
# --------------------------------------------------------------------------------------------------


class KeyedBackend:
    """A provider-like backend defined in the test: it takes an api_key, which must be a reference."""

    name = "keyed"
    version = "3"
    options_schema = {"type": "object", "properties": {"api_key": {"type": "string", "pattern": SECRET_PATTERN},
                                                       "temperature": {"type": "number"}}}

    def identity(self, options):
        return {"model": options["model"], "temperature": options.get("temperature", 0)}

    def price(self, options, input_tokens, output_tokens):
        return None

    def generate(self, options, requests, on_result):  # pragma: no cover - never run here
        raise AssertionError("compile time only")


class KeyedPlugin:
    @hookspecs.hookimpl
    def register_backends(self, register):
        register(KeyedBackend())


def test_secrets_never_appear_resolved_in_the_plan(full, monkeypatch):
    secret = "sk-test-0123456789abcdefghij"
    monkeypatch.setenv("KEYED_API_KEY", secret)
    registry = build_registry(extra_plugins=(KeyedPlugin(),))
    edit(full, "teacher: {backend: transformers, model: smollm2-135m-instruct, max_new_tokens: 32}",
         "teacher: {backend: keyed, model: big-model, api_key: '${env:KEYED_API_KEY}'}")
    plan = api.compile_spec(full, registry=registry, identities=True)
    text = plan.to_json()
    assert secret not in text
    assert plan.model("teacher").options["api_key"] == "${env:KEYED_API_KEY}"
    assert plan.node("answers").backend == "keyed 3"
    # Rotating the key changes nothing the cache sees.
    monkeypatch.setenv("KEYED_API_KEY", "sk-test-another-key-0000000000")
    again = api.compile_spec(full, registry=registry, identities=True)
    assert [n.fingerprint for n in again.nodes] == [n.fingerprint for n in plan.nodes]


def test_inline_secret_for_a_provider_backend_is_S404(full):
    registry = build_registry(extra_plugins=(KeyedPlugin(),))
    edit(full, "teacher: {backend: transformers, model: smollm2-135m-instruct, max_new_tokens: 32}",
         "teacher: {backend: keyed, model: big-model, api_key: hunter2hunter2}")
    from specdsl.errors import SpecErrors

    with pytest.raises(SpecErrors) as info:
        api.compile_spec(full, registry=registry, identities=False)
    assert info.value.codes == ["S404"]  # one error, not one from the schema and one from the scan
    assert "hunter2" not in info.value.render()


# --------------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------------


def test_plan_json_round_trips(full):
    from specdsl.passes.estimate import estimate_plan

    for plan in (api.compile_spec(full), api.compile_spec(full, passes=False),
                 api.compile_spec(FIXTURES / "recipe.yaml", identities=False)):
        data = json.loads(plan.to_json())
        assert data["format"] == 1
        assert Plan.from_dict(data) == plan
        assert Plan.from_dict(data).to_dict() == plan.to_dict()
    estimated = estimate_plan(api.compile_spec(full))
    assert estimated.node("answers").estimate is not None
    assert Plan.from_dict(json.loads(estimated.to_json())) == estimated


def test_plan_json_rejects_other_formats(full):
    data = api.compile_spec(full).to_dict()
    data["format"] = 2
    with pytest.raises(ValueError, match="plan format 2"):
        Plan.from_dict(data)


# --------------------------------------------------------------------------------------------------
# Passes
# --------------------------------------------------------------------------------------------------


def test_filter_on_source_columns_moves_ahead_of_generation(full):
    raw = api.compile_spec(full, passes=False)
    assert raw.node("answers").inputs == (("from", "problems"),)
    assert raw.node("additions").inputs == (("from", "answers"),)

    plan = api.compile_spec(full)
    assert plan.node("additions").inputs == (("from", "problems"),)
    assert plan.node("answers").inputs == (("from", "additions"),)
    assert plan.node("additions").columns == plan.node("problems").columns
    # `kept` reads the generated answer: it stays after generation, now reading `answers`.
    assert plan.node("kept").inputs == (("from", "answers"),)
    ids = [n.id for n in plan.nodes]
    assert ids.index("additions") < ids.index("answers") < ids.index("kept")
    assert any("pushed filter 'additions' ahead of generation 'answers'" in n for n in plan.notes)
    # The moved nodes are re-fingerprinted; the source is untouched.
    assert plan.node("answers").fingerprint != raw.node("answers").fingerprint
    assert plan.node("problems").fingerprint == raw.node("problems").fingerprint


@pytest.mark.parametrize("filter_params, why", [
    ("{from: answers, match: {field: response, gold: answer}}", "reads the generated column"),
    ("{from: answers, where: \"{{ row.category == 'addition' }}\", into: is_addition}", "writes a verdict"),
    ("{from: answers, where: \"{{ row[vars.col] == 'addition' }}\"}", "reads columns dynamically"),
])
def test_filters_that_must_stay_after_generation(full, filter_params, why):
    edit(full, "    filter: {from: answers, where: \"{{ row.category == 'addition' }}\"}",
         f"    filter: {filter_params}")
    edit(full, "  unused:", "  col: category\n  unused:")
    plan = api.compile_spec(full)
    assert plan.node("additions").inputs == (("from", "answers"),), why
    assert not any("pushed filter" in n for n in plan.notes)


def test_filter_on_id_stays_after_a_generation_with_several_samples(full):
    edit(full, "      temperature: 0\n", "      temperature: 0.7\n      n: 2\n")
    edit(full, "where: \"{{ row.category == 'addition' }}\"", "where: \"{{ row.id != 'p2' }}\"")
    plan = api.compile_spec(full)
    assert plan.node("additions").inputs == (("from", "answers"),)
    # With one sample per row the ids are unchanged, so the same filter moves.
    edit(full, "      n: 2\n", "")
    assert api.compile_spec(full).node("additions").inputs == (("from", "problems"),)


def test_filter_stays_when_others_read_the_generation(full):
    edit(full, "format: {from: kept,", "format: {from: answers,")
    plan = api.compile_spec(full)
    assert plan.node("additions").inputs == (("from", "answers"),)


def test_prune_drops_an_unused_map_step(full):
    assert api.compile_spec(full, passes=False).has("scratch")
    plan = api.compile_spec(full)
    assert not plan.has("scratch")
    assert "dropped 'scratch': nothing uses its output" in plan.notes
    # Sinks and everything they need stay: train, evaluate, export and their inputs.
    for node_id in ("sft", "sft.tokens", "score", "dump", "pairs", "heldout", "problems"):
        assert plan.has(node_id)


def test_prune_keeps_the_last_step_of_a_data_only_spec(tmp_path):
    (tmp_path / "rows.jsonl").write_text('{"id": "1", "q": "x"}\n')
    spec = tmp_path / "s.yaml"
    spec.write_text("specdsl: 1\nname: data\nsources:\n  rows: {path: rows.jsonl}\nsteps:\n"
                    "  - id: unused\n    map: {from: rows, columns: {a: '{{ row.q }}'}}\n"
                    "  - id: final\n    map: {from: rows, columns: {b: '{{ row.q }}'}}\n")
    plan = api.compile_spec(spec)
    assert [n.id for n in plan.nodes] == ["rows", "final"]


def test_passes_return_new_plans_and_leave_the_input_alone(full):
    from specdsl.passes import PASSES

    raw = api.compile_spec(full, passes=False)
    snapshot = raw.to_dict()
    out = raw
    for p in PASSES:
        out = p(out)
    assert raw.to_dict() == snapshot
    assert out != raw


def test_recipe_expansion_is_in_the_plan_json():
    data = json.loads(api.compile_spec(FIXTURES / "recipe.yaml", identities=False).to_json())
    assert data["expansions"] == {"orca": ["orca.answers", "orca.kept", "orca.erased", "orca"]}
    assert {n["id"]: n["recipe"] for n in data["nodes"]}["orca.kept"] == "orca.prompt_erasure"
