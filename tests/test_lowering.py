"""Lowering: golden plans for every shipped spec and fixture, column flow, recipe expansion, references.

Golden files live in tests/golden/<spec name>.plan.json. They are compiled with model identities (known
model names are pinned by a hash of their source wheel: nothing is downloaded) and with paths made
relative to the repository, so they are the same on every machine. ``UPDATE_GOLDEN=1 pytest
tests/test_lowering.py`` rewrites them; review the diff before committing it.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path

import pytest

from specdsl import api
from specdsl.errors import SpecErrors
from specdsl.ir.plan import PlanNode

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden"
FIXTURES = ROOT / "tests" / "specs"
SPECS = sorted((ROOT / "specs").glob("*.yaml")) + [FIXTURES / "full.yaml", FIXTURES / "recipe.yaml"]


def normalized(plan_dict: dict) -> dict:
    """The plan with absolute paths under the repository made relative (machine-independent)."""
    root = str(ROOT) + os.sep

    def fix(value):
        if isinstance(value, str) and value.startswith(root):
            return value[len(root):]
        if isinstance(value, list):
            return [fix(v) for v in value]
        if isinstance(value, dict):
            return {k: fix(v) for k, v in value.items()}
        return value

    return fix(plan_dict)


@pytest.mark.parametrize("spec_path", SPECS, ids=lambda p: p.stem)
def test_golden_plan(spec_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # error and node positions name files relative to the working directory
    plan = api.compile_spec(spec_path.relative_to(ROOT), identities=True)
    got = normalized(plan.to_dict())
    text = json.dumps(got, indent=2, ensure_ascii=False, sort_keys=True) + "\n"
    golden = GOLDEN / f"{spec_path.stem}.plan.json"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text, encoding="utf-8")
    assert golden.exists(), f"no golden file for {spec_path.name}: run with UPDATE_GOLDEN=1"
    assert str(ROOT) not in text  # nothing machine-specific
    expected = golden.read_text(encoding="utf-8")
    if text != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(True), text.splitlines(True), golden.name, "now", n=2))
        pytest.fail(f"{spec_path.name} lowers differently from {golden.name} (UPDATE_GOLDEN=1 rewrites it; "
                    f"review the diff):\n{diff[:4000]}")


def test_every_shipped_spec_has_a_golden_and_no_golden_is_stale():
    wanted = {f"{p.stem}.plan.json" for p in SPECS}
    have = {p.name for p in GOLDEN.glob("*.plan.json")}
    assert wanted == have


def compile_text(tmp_path: Path, text: str, **kwargs):
    (tmp_path / "problems.jsonl").write_text(
        '{"id": "p1", "category": "addition", "question": "What is 2 + 3?", "answer": "5"}\n')
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return api.compile_spec(path, identities=False, **kwargs)


HEAD = """\
specdsl: 1
name: t
models:
  m: {model: smollm2-135m-instruct}
sources:
  problems: {path: problems.jsonl}
steps:
"""


def test_columns_flow_through_each_op(tmp_path):
    plan = compile_text(tmp_path, HEAD + """\
  - id: answers
    generate: {from: problems, model: m, user: "{{ row.question }}", into: reply, n: 2, temperature: 0.7}
  - id: parsed
    map: {from: answers, columns: {number: "{{ row.reply | regex_search('Answer: *([0-9]+)', 1) }}"}}
  - id: judged
    filter: {from: parsed, match: {field: number, gold: answer}, into: correct}
  - id: chat
    format: {from: judged, user: "{{ row.question }}", assistant: "{{ row.reply }}"}
""", passes=False)
    src = ("id", "category", "question", "answer")
    assert plan.node("problems").columns == src
    generated = plan.node("answers").columns
    assert generated[:5] == src + ("reply",) and "reply_prompt" in generated and generated[-1] == "sample"
    assert plan.node("parsed").columns == plan.node("answers").columns + ("number",)
    assert plan.node("judged").columns == plan.node("parsed").columns + ("correct",)
    assert plan.node("chat").columns == plan.node("judged").columns + ("messages",)


def test_source_without_id_column_gets_one(tmp_path):
    (tmp_path / "rows.csv").write_text("question,answer\nq,a\n")
    plan = compile_text(tmp_path, HEAD.replace("problems.jsonl", "rows.csv") + """\
  - id: a
    map: {from: problems, columns: {x: "{{ row.id }}-{{ row.question }}"}}
""")
    assert plan.node("problems").columns == ("id", "question", "answer")


def test_declared_columns_check_a_spec_without_its_data(tmp_path):
    text = HEAD.replace("{path: problems.jsonl}", "{path: later.jsonl, columns: [id, text]}") + """\
  - id: a
    map: {from: problems, columns: {x: "{{ row.text }}"}}
"""
    plan = compile_text(tmp_path, text)
    assert plan.node("problems").columns == ("id", "text")
    with pytest.raises(SpecErrors) as info:
        compile_text(tmp_path, text.replace("row.text", "row.question"))
    assert info.value.codes == ["S302"]


def test_steps_may_be_written_in_any_order(tmp_path):
    plan = compile_text(tmp_path, HEAD + """\
  - id: second
    map: {from: first, columns: {y: "{{ row.x }}"}}
  - id: first
    map: {from: problems, columns: {x: "{{ row.question }}"}}
""")
    ids = [n.id for n in plan.nodes]
    assert ids.index("problems") < ids.index("first") < ids.index("second")


def test_train_lowers_to_tokenize_then_train(tmp_path):
    plan = compile_text(tmp_path, HEAD + """\
  - id: chat
    format: {from: problems, user: "{{ row.question }}", assistant: "{{ row.answer }}"}
  - id: sft
    train: {from: chat, model: m, max_length: 128, loss: assistant, max_steps: 1}
  - id: again
    generate: {from: problems, model: sft, user: "{{ row.question }}"}
""")
    tok, train = plan.node("sft.tokens"), plan.node("sft")
    assert tok.op == "tokenize" and tok.inputs == (("from", "chat"),)
    assert tok.params == {"max_length": 128, "loss": "assistant", "model": "m"}
    assert train.inputs == (("from", "sft.tokens"),) and train.backend == "trl:auto"
    # A later step may generate with the trained model: the train node is its model dependency.
    assert plan.node("again").models == (("model", "sft"),)
    assert plan.ancestors("again") == ["problems", "chat", "sft.tokens", "sft", "again"]


def test_plan_names_every_model_a_node_asks(tmp_path):
    from rich.console import Console

    from specdsl.views.plan import render_plan

    plan = compile_text(tmp_path, HEAD + """\
  - id: chat
    format: {from: problems, user: "{{ row.question }}", assistant: "{{ row.answer }}"}
  - id: sft
    train: {from: chat, model: m, max_length: 128, loss: assistant, max_steps: 1}
  - id: score
    evaluate: {models: [m, sft], on: problems, probes: [{probe: accuracy}]}
""")
    # `models` holds only the trained one (a node of the plan, and an edge); `model_names` holds both.
    assert plan.node("score").models == (("models", "sft"),)
    assert plan.node("score").model_names == ("m", "sft")
    assert plan.node("sft").model_names == plan.node("sft.tokens").model_names == ("m",)
    assert PlanNode.from_dict(plan.node("score").to_dict()) == plan.node("score")
    console = Console(record=True, width=300, color_system=None)
    render_plan(plan, store_dir=tmp_path / "no-store", console=console)
    lines = console.export_text().splitlines()
    facts = {line.split()[0]: lines[i + 1] for i, line in enumerate(lines[:-1]) if line.startswith(("score ", "sft "))}
    assert " · models m, sft · " in facts["score"]
    assert " · model m · " in facts["sft"]


def test_recipe_expansion_is_recorded_and_ids_are_prefixed(tmp_path):
    plan = api.compile_spec(FIXTURES / "recipe.yaml", identities=False)
    expansions = dict(plan.expansions)
    assert expansions == {"orca": ("orca.answers", "orca.kept", "orca.erased", "orca")}
    for node_id in ("orca.answers", "orca.kept", "orca.erased", "orca"):
        node = plan.node(node_id)
        assert node.recipe == "orca.prompt_erasure" and node.step == "orca"
    # The recipe step's own id is its train step: later steps use the trained model by that id.
    assert plan.node("after").models == (("model", "orca"),)
    assert plan.node("orca.answers").params["system"] == "{{ vars.strategies[row.category] }}"


def test_errors_inside_a_recipe_point_at_its_use_line(tmp_path):
    with pytest.raises(SpecErrors) as info:
        compile_text(tmp_path, HEAD + """\
  - id: orca
    use: orca.prompt_erasure
    with: {source: problems, teacher: m, student: m, strategies: strategy}
""")
    (err,) = info.value.errors
    assert err.code == "S204" and "vars.strategy" in err.message
    assert (err.pos.line, err.pos.col) == (9, 5)


def test_recipe_parameter_errors_are_positioned_in_with(tmp_path):
    with pytest.raises(SpecErrors) as info:
        compile_text(tmp_path, HEAD + """\
  - id: pam
    use: isc.pam
    with: {source: problems, model: m, teacher: m, student: m, sample: 2}
""")
    (err,) = info.value.errors
    assert err.code == "S104" and err.message == "unknown key 'sample'" and err.hint == "did you mean 'samples'?"
    assert (err.pos.line, err.pos.col) == (10, 64)


def test_recipe_and_op_in_one_step(tmp_path):
    with pytest.raises(SpecErrors) as info:
        compile_text(tmp_path, HEAD + """\
  - id: x
    use: isc.pam
    with: {source: problems, model: m, teacher: m, student: m}
    map: {from: problems, columns: {a: "1"}}
""")
    assert [(e.code, e.pos.line) for e in info.value.errors] == [("S401", 11)]


def test_duplicate_id_between_a_recipe_step_and_a_hand_written_one(tmp_path):
    with pytest.raises(SpecErrors) as info:
        compile_text(tmp_path, (HEAD + """\
  - id: orca
    use: orca.prompt_erasure
    with: {source: problems, teacher: m, student: m, strategies: s, filter: false}
  - id: orca
    map: {from: problems, columns: {a: "1"}}
""").replace("steps:", "vars: {s: {addition: add}}\nsteps:"))
    (err,) = info.value.errors
    assert err.code == "S205"
    assert err.message == "step id 'orca' is already used by the step at line 10 (made by recipe 'orca.prompt_erasure')"
    assert (err.pos.line, err.pos.col) == (12, 9)


def test_unresolved_input_does_not_cascade(tmp_path):
    """One wrong `from:` is one error, not one per column its step and the steps after it read."""
    with pytest.raises(SpecErrors) as info:
        compile_text(tmp_path, HEAD + """\
  - id: a
    generate: {from: problemz, model: m, user: "{{ row.question }}"}
  - id: b
    filter: {from: a, match: {field: response, gold: answer}, where: "{{ row.category }}"}
  - id: c
    map: {from: b, columns: {x: "{{ row.nothing }} {{ nope }}"}}
""")
    # The unknown source, and the unknown template name (a real, independent mistake), nothing else.
    assert info.value.codes == ["S202", "S303"]


def test_template_reads_are_recorded_for_known_reads_ops(tmp_path):
    plan = compile_text(tmp_path, (HEAD + """\
  - id: gen
    generate: {from: problems, model: m, user: "{{ row.question }}"}
  - id: f1
    filter: {from: gen, where: "{{ row.get('category') == 'addition' and row.answer }}"}
  - id: f2
    filter: {from: f1, where: "{{ row[vars.key] }}"}
  - id: f3
    filter: {from: f2, where: "{% for k in row %}{{ k }}{% endfor %}"}
""").replace("steps:", "vars: {key: answer}\nsteps:"), passes=False)
    assert plan.node("f1").reads == ("answer", "category")
    assert plan.node("f2").reads is None  # dynamic access: the columns read are unknown
    assert plan.node("f3").reads is None
    assert plan.node("gen").reads == ("question",)


def test_validate_paths_reports_each_file(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text((FIXTURES / "recipe.yaml").read_text().replace("data/problems.jsonl",
                                                                   str(FIXTURES / "data/problems.jsonl")))
    bad = tmp_path / "sub" / "bad.yml"
    bad.parent.mkdir()
    bad.write_text("specdsl: 1\nname: x\nsteps: 5\n")
    (tmp_path / ".specdsl").mkdir()
    (tmp_path / ".specdsl" / "ignored.yaml").write_text("not: a spec\n")
    results = api.validate_paths([tmp_path])
    assert sorted(Path(k).name for k in results) == ["bad.yml", "good.yaml"]
    by_name = {Path(k).name: v for k, v in results.items()}
    assert by_name["good.yaml"] is None
    assert by_name["bad.yml"].codes == ["S102"]


def test_thousands_of_chained_steps_in_reverse_order(tmp_path):
    """Ordering and cycle detection are iterative: a long chain written backwards is no RecursionError."""
    n = 1100  # past Python's default recursion limit
    steps = [f"  - id: s{i}\n    filter: {{from: {'problems' if i == 0 else f's{i - 1}'}, where: '1'}}\n"
             for i in range(n)]
    plan = compile_text(tmp_path, HEAD + "".join(reversed(steps)))
    assert [node.id for node in plan.nodes] == ["problems"] + [f"s{i}" for i in range(n)]
    steps[0] = steps[0].replace("from: problems", f"from: s{n - 1}")  # close the loop
    with pytest.raises(SpecErrors) as info:
        compile_text(tmp_path, HEAD + "".join(reversed(steps)))
    (err,) = info.value.errors
    assert err.code == "S206" and f"... ({n} steps) ..." in err.message and len(err.message) < 200


class BuggyPlugin:
    """A third-party plugin with bugs: its recipe raises KeyError, its op's check raises TypeError."""

    class Recipe:
        name = "buggy.recipe"
        description = "raises"
        params_schema = {"type": "object", "properties": {}, "additionalProperties": False}

        def expand(self, step_id, params):
            return params["missing"]

    class Op:
        name = "buggy_op"
        kind = "transform"
        version = "1"
        params_schema = {"type": "object", "properties": {"from": {"type": "string"}}, "additionalProperties": False}
        input_keys = ("from",)
        model_keys = ()
        template_keys = ()

        def check(self, ctx):
            raise TypeError("oops")

        def run(self, ctx):  # pragma: no cover
            raise AssertionError

    from specdsl.contract.hookspecs import hookimpl

    @hookimpl
    def register_recipes(self, register):
        register(self.Recipe())

    @hookimpl
    def register_ops(self, register):
        register(self.Op())


def test_a_buggy_plugin_gives_positioned_errors_not_a_crash(tmp_path):
    from specdsl.plugins import build_registry

    registry = build_registry(extra_plugins=(BuggyPlugin(),))
    with pytest.raises(SpecErrors) as info:
        compile_text(tmp_path, HEAD + "  - id: r\n    use: buggy.recipe\n    with: {}\n", registry=registry)
    (err,) = info.value.errors
    assert (err.code, err.pos.line) == ("S211", 9) and "failed to expand: KeyError('missing')" in err.message
    with pytest.raises(SpecErrors) as info:
        compile_text(tmp_path, HEAD + "  - id: b\n    buggy_op: {from: problems}\n"
                               "  - id: c\n    map: {from: b, columns: {x: '{{ row.anything }}'}}\n", registry=registry)
    (err,) = info.value.errors  # and the step reading it is not blamed for columns nobody knows
    assert (err.code, err.pos.line) == ("S401", 9) and "failed to check step 'b': TypeError('oops')" in err.message
