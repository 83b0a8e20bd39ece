"""No hidden help: a PAM teacher shown the gold answer is an explicit, documented option, shown in plan."""

from __future__ import annotations

import pytest

from specdsl import api
from specdsl.errors import SpecErrors
from specdsl.recipes import CORRECTION_PROMPT

SPEC = """\
specdsl: 1
name: help
models:
  base: {{backend: litellm, model: hosted_vllm/m, api_base: "http://127.0.0.1:9/v1"}}
  student: {{model: smollm2-135m-instruct}}
sources:
  problems: {{path: p.jsonl}}
steps:
  - id: sc
    use: isc.pam
    with: {{source: problems, model: base, teacher: base, student: student{extra}}}
"""


def compile_with(tmp_path, extra: str):
    (tmp_path / "p.jsonl").write_text('{"id": "1", "question": "2+2?", "answer": "4"}\n')
    (tmp_path / "s.yaml").write_text(SPEC.format(extra=extra))
    return api.compile_spec(tmp_path / "s.yaml", identities=False, passes=False)


def test_by_default_the_teacher_corrects_unaided(tmp_path):
    plan = compile_with(tmp_path, "")
    assert plan.node("sc.corrections").params["user"] == CORRECTION_PROMPT.replace("QUESTION", "question")
    assert "{{ row.answer }}" not in plan.node("sc.corrections").params["user"]
    assert not [n for n in plan.notes if "STaR" in n]


def test_reveal_gold_is_explicit_and_shown_in_the_plan(tmp_path):
    plan = compile_with(tmp_path, ", reveal_gold: true")
    assert "The correct answer is {{ row.answer }}" in plan.node("sc.corrections").params["user"]
    assert any(n.startswith("sc.corrections: STaR rationalisation") for n in plan.notes)


def test_a_prompt_that_quotes_the_gold_answer_must_say_so(tmp_path):
    with pytest.raises(SpecErrors) as info:
        compile_with(tmp_path, ", correction_prompt: 'Q: {{ row.question }} The answer is {{ row.answer }}.'")
    (err,) = info.value.errors
    assert err.code == "S211" and "reveal_gold: true" in err.message and err.pos.line == 10
    plan = compile_with(tmp_path, ", reveal_gold: true, correction_prompt: 'The answer is {{ row.answer }}.'")
    assert plan.node("sc.corrections").params["user"] == "The answer is {{ row.answer }}."
