"""Built-in recipes: one per data design. A recipe is a macro: parameters in, primitive steps out.

``specdsl plan --expanded`` shows what each expanded to; anything a recipe does can be written by hand
with the same primitive steps. The recipe step's own id names its final train step, so later steps can
use the trained model by that id.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from specdsl.ops.train import TrainOp

_TRAIN_KEYS = {k: v for k, v in TrainOp.params_schema["properties"].items() if k not in ("from", "model", "meta")}
TRAIN = {"type": "object", "properties": _TRAIN_KEYS, "additionalProperties": False,
         "description": "parameters of the final train step"}
RULE = {"enum": ["exact", "contains", "regex", "number"], "description": "how answers are compared with gold (default: number)"}
STR = {"type": "string", "minLength": 1}
TEACHER = {**STR, "description": "the model that writes the training data (a name under `models:`)"}
STUDENT = {**STR, "description": "the model that is trained (a `backend: transformers` model)"}
MAX_TOKENS = {"type": "integer", "minimum": 1, "description": "cap on each generated answer (default: the model's)"}


class _TrainsAtTheEnd:
    """A recipe whose last step trains: its ``train`` parameter takes what the train step takes for the
    installed training targets (a plugin target's parameters too), not only the built-in TRL ones."""

    params_schema: Mapping[str, Any]

    def schema_for(self, registry: Any) -> dict[str, Any]:
        import copy

        train_op = registry.ops.get("train")
        build = getattr(train_op, "schema_for", None)
        if not callable(build):
            return dict(self.params_schema)
        train = build(registry)
        fragment: dict[str, Any] = {
            "type": "object", "additionalProperties": False, "description": TRAIN["description"],
            "properties": {k: v for k, v in train["properties"].items() if k not in ("from", "model", "meta")}}
        if train.get("allOf"):
            fragment["allOf"] = copy.deepcopy(train["allOf"])  # a named target takes only its own keys
        schema = copy.deepcopy(dict(self.params_schema))
        schema["properties"]["train"] = fragment
        return schema


def _strict(properties: Mapping[str, Any], required: list[str]) -> dict:
    return {"type": "object", "properties": {**properties, "meta": {"type": "object", "description": "free-form metadata, never interpreted"}}, "required": required,
            "additionalProperties": False}


class PromptErasureRecipe(_TrainsAtTheEnd):
    name = "orca.prompt_erasure"
    description = ("Orca 2 prompt erasure: the teacher answers under a per-category strategy instruction, answers "
                   "that match gold are kept, the instruction is replaced by a generic one, the student is trained "
                   "on the answer only.")
    params_schema = _strict({
        "source": {**STR, "description": "rows with a question, a category and a gold answer"},
        "teacher": TEACHER, "student": STUDENT,
        "strategies": {**STR, "description": "name of a var: category -> detailed system instruction"},
        "strategy_key": {**STR, "description": "the category column (default: category)"},
        "question": {**STR, "description": "default: question"},
        "gold": {**STR, "description": "default: answer; set `filter: false` to keep every answer"},
        "rule": RULE,
        "filter": {"type": "boolean", "description": "keep only answers that match gold (default: true)"},
        "generic_system": {"type": ["string", "null"],
                           "description": "the system message that replaces the strategy (default: Orca 2's)"},
        "max_tokens": MAX_TOKENS,
        "train": TRAIN,
    }, ["source", "teacher", "student", "strategies"])

    def expand(self, step_id: str, p: Mapping[str, Any]) -> list[dict[str, Any]]:
        key = p.get("strategy_key", "category")
        gen = {"from": p["source"], "model": p["teacher"],
               "system": "{{ vars." + p["strategies"] + "[row." + key + "] }}",
               "user": "{{ row." + p.get("question", "question") + " }}", "into": "response"}
        if "max_tokens" in p:
            gen["max_tokens"] = p["max_tokens"]
        steps: list[dict[str, Any]] = [{"id": f"{step_id}.answers", "generate": gen}]
        last = f"{step_id}.answers"
        if p.get("filter", True):
            steps.append({"id": f"{step_id}.kept", "filter": {
                "from": last, "match": {"field": "response", "gold": p.get("gold", "answer"),
                                        "rule": p.get("rule", "number")}}})
            last = f"{step_id}.kept"
        erase: dict[str, Any] = {"from": last}
        if "generic_system" in p:
            erase["generic_system"] = p["generic_system"]
        steps.append({"id": f"{step_id}.erased", "erase_prompt": erase})
        steps.append({"id": step_id, "train": {"from": f"{step_id}.erased", "model": p["student"],
                                               **(p.get("train") or {})}})
        return steps


INITIAL_PROMPT = ("{{ row.QUESTION }}\n\nSolve the problem step by step, then give the final answer on its own line "
                  "as 'Answer: <number>'.")
CORRECTION_PROMPT = ("Question: {{ row.QUESTION }}\n\nA student answered:\n{{ row.initial_answer }}\n\nThat answer is "
                     "wrong. Solve the problem again correctly, step by step, and end with 'Answer: <number>'.")
# STaR-style rationalisation (reveal_gold: true): the teacher is shown the gold answer and asked to explain it.
RATIONALIZE_PROMPT = ("Question: {{ row.QUESTION }}\n\nThe correct answer is {{ row.GOLD }}. Explain briefly how to get "
                      "it, then write 'Answer: {{ row.GOLD }}'.")
REVEALED_GOLD_NOTE = "STaR rationalisation: the teacher's correction prompt shows the gold answer (reveal_gold: true)"


class SelfCorrectionRecipe(_TrainsAtTheEnd):
    name = "isc.pam"
    description = ("Intrinsic self-correction with partial answer masking: initial answers are checked against gold; "
                   "wrong ones get a teacher's correction; samples chain answer, verification and correction; the "
                   "loss skips a wrong initial answer.")
    params_schema = _strict({
        "source": {**STR, "description": "rows with a question and a gold answer"},
        "model": {**STR, "description": "who writes the initial answers (usually the student itself)"},
        "teacher": {**STR, "description": "who writes corrections for wrong initial answers"},
        "student": STUDENT,
        "question": {**STR, "description": "the question column (default: question)"},
        "gold": {**STR, "description": "the gold answer column (default: answer)"}, "rule": RULE,
        "samples": {"type": "integer", "minimum": 1, "maximum": 16, "description": "initial answers per question"},
        "temperature": {"type": "number", "minimum": 0,
                        "description": "sampling temperature of the initial answers (default: 0.8 when samples > 1)"},
        "mask": {"type": "boolean", "description": "partial answer masking (false = the paper's ablation)"},
        "initial_prompt": {"type": "string", "description": "the user prompt of an initial answer (QUESTION "
                                                          "stands for the question column)"},
        "correction_prompt": {"type": "string", "description": "the teacher's prompt for a correction (QUESTION "
                                                             "stands for the question column)"},
        "reveal_gold": {"type": "boolean",
                        "description": "STaR-style rationalisation: show the teacher the gold answer in its correction "
                                       "prompt (a weak teacher then still writes right corrections). Off by default; "
                                       "a correction_prompt that quotes the gold column needs it set"},
        "max_tokens": MAX_TOKENS,
        "train": TRAIN,
    }, ["source", "model", "teacher", "student"])

    def expand(self, step_id: str, p: Mapping[str, Any]) -> list[dict[str, Any]]:
        q, gold, rule = p.get("question", "question"), p.get("gold", "answer"), p.get("rule", "number")
        samples = p.get("samples", 1)
        initial = {"from": p["source"], "model": p["model"],
                   "user": p.get("initial_prompt", INITIAL_PROMPT).replace("QUESTION", q), "into": "initial_answer"}
        if samples > 1:
            initial["n"] = samples
            initial["temperature"] = p.get("temperature", 0.8)
        elif "temperature" in p:
            initial["temperature"] = p["temperature"]
        reveal = p.get("reveal_gold", False)
        default_prompt = RATIONALIZE_PROMPT.replace("GOLD", gold) if reveal else CORRECTION_PROMPT
        prompt = p.get("correction_prompt", default_prompt).replace("QUESTION", q)
        if not reveal and re.search(r"\brow\.%s\b|row\[['\"]%s['\"]\]" % (re.escape(gold), re.escape(gold)), prompt):
            raise ValueError(f"the correction prompt shows the teacher the gold answer (row.{gold}): that is STaR-style "
                             "rationalisation, not a correction; set `reveal_gold: true` to say so, or leave the gold "
                             "out of the prompt")
        correction = {"from": f"{step_id}.judged", "model": p["teacher"], "user": prompt,
                      "where": "{{ not row.initial_correct }}", "into": "corrected_answer"}
        corrections: dict[str, Any] = {"id": f"{step_id}.corrections", "generate": correction}
        if reveal:  # in the plan for everyone to see: these corrections had help
            corrections["note"] = REVEALED_GOLD_NOTE
        if "max_tokens" in p:
            initial["max_tokens"] = correction["max_tokens"] = p["max_tokens"]
        pam = {"from": f"{step_id}.corrections", "question": q, "gold": gold, "initial": "initial_answer",
               "corrected": "corrected_answer", "rule": rule, "mask": p.get("mask", True)}
        return [
            {"id": f"{step_id}.initial", "generate": initial},
            {"id": f"{step_id}.judged", "filter": {"from": f"{step_id}.initial", "into": "initial_correct",
                                                   "match": {"field": "initial_answer", "gold": gold, "rule": rule}}},
            corrections,
            {"id": f"{step_id}.samples", "pam": pam},
            {"id": step_id, "train": {"from": f"{step_id}.samples", "model": p["student"], "mask": p.get("mask", True),
                                      **(p.get("train") or {})}},
        ]


QA1_PROMPT = ("Read the passage and write ONE question that can be answered only from it, then its short answer.\n\n"
              "Passage:\n{{ row.segment }}\n\nReply exactly as:\nQuestion: <question>\nAnswer: <answer>")
QA2_PROMPT = ("Read the passages and write ONE question whose answer needs information from at least two of them, "
              "then its short answer.\n\n{% for s in row.segments %}Passage {{ loop.index }}:\n{{ s }}\n\n{% endfor %}"
              "Reply exactly as:\nQuestion: <question>\nAnswer: <answer>")
PARSE = {"question": "{{ row.qa | regex_search('Question:\\\\s*(.*?)\\\\s*Answer:', 1) }}",
         "answer": "{{ row.qa | regex_search('Answer:\\\\s*(.*)', 1) }}"}


class LongContextRecipe(_TrainsAtTheEnd):
    name = "in2.long_context"
    description = ("IN2 (FILM): segment texts, have a teacher write QA about one segment (type 1) and about several "
                   "segments of one text (type 2), hide the key segments among other texts' segments in contexts of "
                   "uniformly drawn length, train on the answer only.")
    params_schema = _strict({
        "source": {**STR, "description": "rows with a `text` column"},
        "text": {**STR, "description": "the text column (default: text)"},
        "teacher": TEACHER, "student": STUDENT,
        "segment_tokens": {"type": "integer", "minimum": 1, "description": "default: 128"},
        "min_tokens": {"type": "integer", "minimum": 1, "description": "shortest long context, in tokens"},
        "max_tokens": {"type": "integer", "minimum": 1, "description": "longest long context, in tokens"},
        "type2": {"type": "boolean", "description": "also make integration QA over >= 2 segments (default: true)"},
        "short_ratio": {"type": "number", "minimum": 0,
                        "description": "short-context samples (the key alone) per long one (default: 0)"},
        "format": {"enum": ["chat", "film"], "description": "chat (default) or the raw FILM [INST] prompt"},
        "max_qa_tokens": {"type": "integer", "minimum": 1, "description": "cap on each QA the teacher writes"},
        "train": TRAIN,
    }, ["source", "teacher", "student", "min_tokens", "max_tokens"])

    def expand(self, step_id: str, p: Mapping[str, Any]) -> list[dict[str, Any]]:
        if p["min_tokens"] > p["max_tokens"]:
            raise ValueError(f"min_tokens ({p['min_tokens']}) must be <= max_tokens ({p['max_tokens']})")
        seg = {"from": p["source"], "model": p["student"], "min_tokens": p.get("segment_tokens", 128)}
        if "text" in p:
            seg["text"] = p["text"]
        common = {"model": p["student"], "min_tokens": p["min_tokens"], "max_tokens": p["max_tokens"],
                  "pool": f"{step_id}.segments"}
        if "short_ratio" in p:
            common["short_ratio"] = p["short_ratio"]
        if "format" in p:
            common["format"] = p["format"]
        qa_extra = {"max_tokens": p["max_qa_tokens"]} if "max_qa_tokens" in p else {}
        steps: list[dict[str, Any]] = [
            {"id": f"{step_id}.segments", "segment": {**seg, "per": "segment"}},
            {"id": f"{step_id}.qa1", "generate": {"from": f"{step_id}.segments", "model": p["teacher"],
                                                  "user": QA1_PROMPT, "into": "qa", **qa_extra}},
            {"id": f"{step_id}.qa1_parsed", "map": {"from": f"{step_id}.qa1", "columns": PARSE}},
            {"id": f"{step_id}.qa1_ok", "filter": {"from": f"{step_id}.qa1_parsed",
                                                   "where": "{{ row.question != '' and row.answer != '' }}"}},
            {"id": f"{step_id}.long1", "interleave": {"from": f"{step_id}.qa1_ok", "key": "segment", **common}},
        ]
        parts = [f"{step_id}.long1"]
        if p.get("type2", True):
            steps += [
                {"id": f"{step_id}.texts", "segment": {**seg, "per": "text"}},
                {"id": f"{step_id}.qa2", "generate": {"from": f"{step_id}.texts", "model": p["teacher"],
                                                      "user": QA2_PROMPT, "into": "qa",
                                                      "where": "{{ row.n_segments >= 2 }}", **qa_extra}},
                {"id": f"{step_id}.qa2_parsed", "map": {"from": f"{step_id}.qa2", "columns": PARSE}},
                {"id": f"{step_id}.qa2_ok", "filter": {"from": f"{step_id}.qa2_parsed",
                                                       "where": "{{ row.n_segments >= 2 and row.question != '' "
                                                                "and row.answer != '' }}"}},
                {"id": f"{step_id}.long2", "interleave": {"from": f"{step_id}.qa2_ok", "key": "segments", **common}},
            ]
            parts.append(f"{step_id}.long2")
            steps.append({"id": f"{step_id}.samples", "concat": {"from": parts}})
            source = f"{step_id}.samples"
        else:
            source = parts[0]
        steps.append({"id": step_id, "train": {"from": source, "model": p["student"], **(p.get("train") or {})}})
        return steps


RECIPES = (PromptErasureRecipe(), SelfCorrectionRecipe(), LongContextRecipe())
