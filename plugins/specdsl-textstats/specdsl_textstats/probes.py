"""``answer_length``: an evaluation probe reporting how long each model's answers are.

    - id: lengths
      evaluate:
        models: [bot, sft]
        on: heldout
        probes: [{probe: answer_length, prompt: "{{ row.question }}"}]

Answers go through ``ctx.answer`` (the journal), so re-running costs nothing.
"""

from __future__ import annotations

from typing import Any

from specdsl.contract.ops import TEMPLATE, obj_schema


class AnswerLengthProbe:
    name = "answer_length"
    params_schema = obj_schema({
        "probe": {"const": "answer_length"},
        "prompt": {**TEMPLATE, "description": "the user message per row (default: '{{ row.question }}')"},
    }, required=["probe"])

    def check(self, ctx: Any) -> None:
        """Compile time: the prompt template must render against the evaluated rows' columns."""
        ctx.template(ctx.params.get("prompt", "{{ row.question }}"), "prompt" if "prompt" in ctx.params else "probe")

    def run(self, ctx: Any) -> dict[str, Any]:
        from specdsl import templates

        source = ctx.params.get("prompt", "{{ row.question }}")
        prompts = [[{"role": "user", "content": templates.render(source, row, ctx.vars)}] for row in ctx.rows]
        table = []
        for model in ctx.models:
            answers = ctx.answer(model, prompts) if prompts else []
            n = len(answers) or 1
            table.append({
                "model": model,
                "answers": len(answers),
                "mean_words": sum(len(a.split()) for a in answers) / n,
                "mean_chars": sum(len(a) for a in answers) / n,
                "empty": sum(1 for a in answers if not a.strip()),
            })
        return {"probe": self.name, "results": {row["model"]: row for row in table}, "table": table}
