"""``evaluate``: run probes against models side by side (base vs trained) and keep the results.

Probes are plugins (``register_probes``). Built in:

* ``accuracy`` — task accuracy with an answer matcher under named conditions (model + system prompt);
  for prompt erasure: the student with the generic prompt vs the base model with the generic prompt vs
  the base model with the detailed prompt.
* ``self_correction`` — initial vs final accuracy, wrong->right and right->wrong rates and verification
  accuracy of a model's self-correcting answers.
* ``position`` — IN2-style position probing (document sentence, code function and record retrieval);
  per-bucket accuracy, average and max-min gap, and a PNG plot of accuracy against position.

Model answers go through the request journal like any generation, so re-running an evaluation costs
nothing. Results are a table in the store, in the manifest, and printed at the end of a run.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Sequence

from specdsl.errors import RunError, did_you_mean
from specdsl import templates
from specdsl.tables import summary_table as _table
from specdsl.probes.claims import CLAIMS_SCHEMA, claims_table, judge, pairs_for
from specdsl.probes.rows import parsed_answer, position_rows, prompt_text, write_probe_rows
from specdsl.contract.ops import (COLUMN, MODEL_REF, STEP_REF, TEMPLATE, CheckContext, Estimate, Rows, RunContext, StepOp,
                                  obj_schema)

RULE = {"enum": ["exact", "contains", "regex", "number"], "description": "how an answer is compared with the gold one"}
PATTERN = {"type": "string", "description": "for rule: regex, a pattern whose first group is the answer"}
# An evaluate node's answer cap when the spec sets none; the planner's estimate (specdsl.passes.estimate) uses it too.
DEFAULT_MAX_TOKENS = 256
# The row columns the accuracy and self_correction probes read unless told otherwise.
DEFAULT_COLUMNS: Mapping[str, str] = MappingProxyType({"question": "question", "gold": "answer"})


PROBE_DESCRIPTION = "the probe's name (an installed probe: see `specdsl plugins`)"


@dataclass
class ProbeContext:
    node_id: str
    params: Mapping[str, Any]
    models: list[str]
    rows: Rows
    vars: Mapping[str, Any]
    services: Any
    artifact_dir: Path
    max_tokens: int

    def answer(self, model: str, prompts: Sequence[Sequence[Mapping[str, str]]], condition: str | None = None) -> list[str]:
        """The model's answers; the progress bar reads ``node · probe · condition · model``."""
        label = " · ".join(dict.fromkeys(str(x) for x in (self.params.get("probe"), condition, model) if x))
        return self.services.answer(self.node_id, model, prompts, {"temperature": 0, "max_tokens": self.max_tokens},
                                    label=label)

    def matcher(self):
        from specdsl.designs.matchers import match_answer

        rule, pattern = self.params.get("rule", "number"), self.params.get("pattern")
        return lambda pred, gold: pred is not None and match_answer(rule, pred, gold, pattern=pattern)


@dataclass
class ProbeCheckContext:
    """What a probe's optional ``check(ctx)`` sees at compile time: its own params, and checks positioned
    under ``probes[index]`` of its evaluate step, against the columns of the step's ``on:`` input."""

    step: CheckContext
    index: int
    params: Mapping[str, Any]

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(self.step.inputs.get("on", ()))

    @property
    def models(self) -> list[str]:
        """The step's evaluated models (``models:``)."""
        return list(self.step.params.get("models") or [])

    def template(self, text: Any, *keys: str | int) -> None:
        """Check a row template in the probe's params (``keys`` locate it inside the probe's mapping)."""
        self.step.template(text, "probes", self.index, *keys, columns=self.columns)

    def column(self, name: Any, *keys: str | int) -> None:
        """Require a column of the ``on:`` rows."""
        self.step.column(name, "probes", self.index, *keys, input_key="on")

    def error(self, code: str, message: str, *keys: str | int, hint: str | None = None) -> None:
        self.step.error(code, message, "probes", self.index, *keys, hint=hint)


def _interval_text(interval: Sequence[float] | None) -> str | None:
    """A 95% interval as the tables show it: ``62.1-91.1``."""
    return None if interval is None else f"{interval[0]:.1f}-{interval[1]:.1f}"


class AccuracyProbe:
    name = "accuracy"
    params_schema = obj_schema({
        "probe": {"const": "accuracy", "description": PROBE_DESCRIPTION},
        "question": {**COLUMN, "description": "default: question"},
        "gold": {**COLUMN, "description": "default: answer"},
        "rule": RULE, "pattern": PATTERN,
        "conditions": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["name", "model"], "additionalProperties": False,
            "properties": {"name": {"type": "string", "description": "the condition's name in the results"}, "model": MODEL_REF,
                           "system": {**TEMPLATE, "description": "system prompt (a template over the row); omit for none"}}},
            "description": "default: each evaluated model without a system prompt"},
        "baseline": {"type": "string", "description": "the condition deltas are measured against"},
        "claims": CLAIMS_SCHEMA,
    }, required=["probe"])

    @staticmethod
    def claim_arms(params: Mapping[str, Any], models: Sequence[str]) -> list[str]:
        """What a claim may name: the conditions (default: one per model)."""
        return [c.get("name") for c in params.get("conditions") or []] or list(models)

    @staticmethod
    def claim_metrics(params: Mapping[str, Any]) -> list[str]:
        return ["accuracy"]

    def run(self, ctx: ProbeContext) -> dict[str, Any]:
        from specdsl.probes.accuracy import accuracy_evidence, paired_comparisons, score_accuracy

        p = ctx.params
        q, gold = (p.get(key, DEFAULT_COLUMNS[key]) for key in ("question", "gold"))
        conditions = p.get("conditions") or [{"name": m, "model": m} for m in ctx.models]
        results, table, scored, per_row = {}, [], {}, []
        match = ctx.matcher()
        for cond in conditions:
            prompts = []
            for row in ctx.rows:
                messages = []
                if cond.get("system"):
                    messages.append({"role": "system", "content": templates.render(cond["system"], row, ctx.vars)})
                messages.append({"role": "user", "content": str(row[q])})
                prompts.append(messages)
            answers = ctx.answer(cond["model"], prompts, condition=cond["name"])
            res = score_accuracy(ctx.rows, answers, match, gold)
            scored[cond["name"]] = res
            per_row += [{"condition": cond["name"], "model": cond["model"], "id": row.get("id"),
                         "prompt": prompt_text(messages), "answer": answer,
                         "parsed": parsed_answer(p.get("rule", "number"), answer, p.get("pattern")),
                         "gold": str(row[gold]), "verdict": "correct" if ok else "wrong"}
                        for row, messages, answer, ok in zip(ctx.rows, prompts, answers, res.correct_flags)]
            results[cond["name"]] = res.to_dict()
            table.append({"condition": cond["name"], "model": cond["model"], "n": res.n, "accuracy": res.accuracy,
                          "ci95": _interval_text(results[cond["name"]]["ci95"])})
        base = p.get("baseline", conditions[-1]["name"] if len(conditions) > 1 else None)
        paired = paired_comparisons(scored, base)
        if base:
            ref = next(r["accuracy"] for r in table if r["condition"] == base)
            by_condition = {c["condition"]: c for c in paired}
            for r in table:
                r["delta"] = None if r["accuracy"] is None or ref is None else r["accuracy"] - ref
                if r["condition"] in by_condition:  # the same items under both: a paired comparison
                    r["delta_ci95"] = _interval_text(by_condition[r["condition"]]["ci95"])
                    r["p_mcnemar"] = f"{by_condition[r['condition']]['p_mcnemar']:.3g}"  # text: a table rounds floats to 0.1
        return {"probe": "accuracy", "results": results, "table": table, "paired": paired, "rows": per_row,
                "evidence": accuracy_evidence(scored)}

    def estimate(self, params: Mapping[str, Any], models: Sequence[str], sample_rows: list[dict],
                 rows: int | None, services: Any) -> list[dict[str, Any]]:
        """One request per evaluated row per condition (default: one condition per model without a system
        prompt); the prompt is the condition's system prompt plus the question."""
        question = params.get("question", DEFAULT_COLUMNS["question"])
        conditions = params.get("conditions") or [{"name": m, "model": m} for m in models]
        asks = []
        for cond in conditions:
            system = cond.get("system")

            def prompt_chars(row: Mapping, system: str | None = system) -> int:
                return (len(templates.render(system, row, services.vars)) if system else 0) + len(str(row[question]))

            asks.append({"condition": cond["name"], "model": cond["model"], "requests": rows,
                         "avg_input_tokens": services.average_prompt_tokens(sample_rows, prompt_chars,
                                                                            len(system or ""))})
        return asks


class SelfCorrectionProbe:
    name = "self_correction"
    params_schema = obj_schema({
        "probe": {"const": "self_correction", "description": PROBE_DESCRIPTION},
        "question": COLUMN, "gold": COLUMN, "rule": RULE, "pattern": PATTERN,
        "prompt": {**TEMPLATE, "description": "the user prompt (default: the question plus an instruction to "
                                              "answer, verify, and correct if needed)"},
        "claims": CLAIMS_SCHEMA,
    }, required=["probe"])

    @staticmethod
    def claim_arms(params: Mapping[str, Any], models: Sequence[str]) -> list[str]:
        return list(models)

    @staticmethod
    def claim_metrics(params: Mapping[str, Any]) -> list[str]:
        from specdsl.probes.self_correction import self_correction_metrics

        return list(self_correction_metrics())

    DEFAULT_PROMPT = ("{{ row.QUESTION }}\n\nSolve the problem step by step and end with 'Answer: <number>'. Then verify "
                      "your answer; if it is wrong, solve it again.")

    def run(self, ctx: ProbeContext) -> dict[str, Any]:
        from specdsl.probes.self_correction import score_self_correction, self_correction_evidence

        p = ctx.params
        q, gold = (p.get(key, DEFAULT_COLUMNS[key]) for key in ("question", "gold"))
        prompt = p.get("prompt", self.DEFAULT_PROMPT.replace("QUESTION", q))
        match = ctx.matcher()
        results, table, per_row, scored = {}, [], [], {}
        for model in ctx.models:
            prompts = [[{"role": "user", "content": templates.render(prompt, row, ctx.vars)}] for row in ctx.rows]
            outputs = ctx.answer(model, prompts)
            res = score_self_correction([{**r, "answer": r[gold]} for r in ctx.rows], outputs, match)
            per_row += [{"condition": model, "model": model, "id": row.get("id"), "prompt": prompt_text(messages),
                         "answer": output, "parsed": case.final, "gold": str(row[gold]),
                         "verdict": "correct" if case.final_correct else "wrong", "initial": case.initial,
                         "initial_verdict": "correct" if case.initial_correct else "wrong",
                         "verification": {True: "positive", False: "negative"}.get(case.verification_positive)}
                        for row, messages, output, case in zip(ctx.rows, prompts, outputs, res.cases)]
            d = res.to_dict()
            results[model], scored[model] = d, res
            table.append({"model": model, **{k: _interval_text(v) if k.endswith("_ci95") else
                                             f"{v:.3g}" if k == "p_mcnemar" else v for k, v in d.items()
                                             if k.endswith("_ci95") or not isinstance(v, (list, dict))}})
        return {"probe": "self_correction", "results": results, "table": table, "rows": per_row,
                "evidence": self_correction_evidence(scored)}

    def estimate(self, params: Mapping[str, Any], models: Sequence[str], sample_rows: list[dict],
                 rows: int | None, services: Any) -> list[dict[str, Any]]:
        """One request per evaluated row per model: the model answers, verifies and corrects itself within
        that one output, so the output cap covers all of it."""
        question = params.get("question", DEFAULT_COLUMNS["question"])
        prompt = params.get("prompt", self.DEFAULT_PROMPT.replace("QUESTION", question))
        avg_in = services.average_prompt_tokens(
            sample_rows, lambda row: len(templates.render(prompt, row, services.vars)), len(prompt))
        return [{"model": m, "requests": rows, "avg_input_tokens": avg_in} for m in models]


class PositionProbe:
    name = "position"
    requires = (("transformers", "local"), ("matplotlib", "report"))  # the tokenizer; the PNG plot
    # What a spec may leave out (the tasks default to all of them); the planner's estimate uses these too,
    # through settings().
    DEFAULTS: Mapping[str, int] = MappingProxyType({"context_tokens": 2000, "buckets": 8, "per_bucket": 4})
    params_schema = obj_schema({
        "probe": {"const": "position", "description": PROBE_DESCRIPTION},
        "tasks": {"type": "array", "items": {"enum": ["document", "code", "records"]}, "minItems": 1,
                  "description": "default: all three"},
        "context_tokens": {"type": "integer", "minimum": 64, "description": f"default: {DEFAULTS['context_tokens']}"},
        "buckets": {"type": "integer", "minimum": 1, "maximum": 64, "description": f"default: {DEFAULTS['buckets']}"},
        "per_bucket": {"type": "integer", "minimum": 1, "maximum": 1000,
                       "description": f"default: {DEFAULTS['per_bucket']}"},
        "tokenizer": {**MODEL_REF, "description": "whose tokenizer measures context length (default: first model)"},
        "seed": {"type": "integer", "minimum": 0, "description": "seed of the probe items (default: 0)"},
        "claims": CLAIMS_SCHEMA,
    }, required=["probe"])

    @staticmethod
    def claim_arms(params: Mapping[str, Any], models: Sequence[str]) -> list[str]:
        return list(models)

    @classmethod
    def claim_metrics(cls, params: Mapping[str, Any]) -> list[str]:
        """``<task> gap`` and ``<task> avg`` per task (``all gap``/``all avg`` first when several)."""
        # The schema's task list is the default: validate imports none of the probe's material.
        tasks = params.get("tasks") or cls.params_schema["properties"]["tasks"]["items"]["enum"]
        return (["all gap", "all avg"] if len(tasks) > 1 else []) + [f"{t} {m}" for t in tasks for m in ("gap", "avg")]

    @classmethod
    def settings(cls, params: Mapping[str, Any]) -> dict[str, Any]:
        """``tasks``, ``context_tokens``, ``buckets`` and ``per_bucket``: the spec's, or the defaults."""
        from specdsl.probes.position import POSITION_TASKS  # not at import: validating a spec needs none of it

        return {"tasks": tuple(params.get("tasks", POSITION_TASKS)),
                **{key: params.get(key, default) for key, default in cls.DEFAULTS.items()}}

    def run(self, ctx: ProbeContext) -> dict[str, Any]:
        from specdsl.probes.position import build_position_probe, plot_position_results, results_table, score_position_probe
        from specdsl.probes.position.scoring import position_evidence

        p = ctx.params
        settings = self.settings(p)
        tok_model = p.get("tokenizer", ctx.models[0])
        try:
            tok = ctx.services.tokenizer(tok_model)
            count = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
        except RunError:
            count = None  # a provider model: the probe's own approximation
        by_model: dict[str, dict[str, Any]] = {}
        per_row: list[dict[str, Any]] = []
        all_items: list[Any] = []
        all_answers: dict[str, list[str]] = {}
        for task in settings["tasks"]:
            try:
                items = build_position_probe(task, context_tokens=settings["context_tokens"],
                                             n_buckets=settings["buckets"], per_bucket=settings["per_bucket"],
                                             seed=p.get("seed", 0), count_tokens=count)
            except ValueError as exc:
                raise RunError(f"position probe ({task}): {exc}", node=ctx.node_id,
                               hint="change the probe's parameters (context_tokens, buckets, per_bucket) as the "
                                    "message says") from None
            for model in ctx.models:
                answers = ctx.answer(model, [it.prompt() for it in items], condition=task)
                by_model.setdefault(model, {})[task] = score_position_probe(items, answers)
                per_row += position_rows(task, model, items, answers)
                all_answers.setdefault(model, []).extend(answers)
            all_items += items
        plot = ctx.artifact_dir / "position.png"
        plot_position_results(by_model, plot)
        table = results_table(by_model)
        results = {m: {t: r.to_dict() for t, r in tasks.items()} for m, tasks in by_model.items()}
        return {"probe": "position", "results": results, "table": table, "plot": plot.name, "rows": per_row,
                "evidence": position_evidence(all_items, all_answers)}

    def estimate(self, params: Mapping[str, Any], models: Sequence[str], sample_rows: list[dict],
                 rows: int | None, services: Any) -> list[dict[str, Any]]:
        """``buckets x per_bucket`` requests per task per model, whatever the rows; each prompt is a context
        of at most ``context_tokens`` plus the IN2 template, the instruction and its quoted query."""
        from specdsl.probes.position import IN2_TEMPLATE, INSTRUCTIONS, MAX_CODE_QUERY_CHARS

        settings = self.settings(params)
        requests = settings["buckets"] * settings["per_bucket"]
        template_chars = len(IN2_TEMPLATE.replace("{context}", "").replace("{instruction}", ""))
        # Every task's query is counted as the longest any quotes: a code line (document pieces are 8
        # words, record ids 9 characters).
        query_chars = MAX_CODE_QUERY_CHARS
        asks = []
        for task in settings["tasks"]:
            wrapper_chars = template_chars + len(INSTRUCTIONS[task].replace("{query}", "")) + query_chars
            avg_in = settings["context_tokens"] + wrapper_chars / services.chars_per_token \
                + services.chat_template_tokens
            asks += [{"task": task, "model": m, "requests": requests, "avg_input_tokens": avg_in} for m in models]
        return asks


PROBES = (AccuracyProbe(), SelfCorrectionProbe(), PositionProbe())


def _claims_text(judged: Sequence[Mapping[str, Any]]) -> str:
    """The claims' table (each variant, and the mean over variants) and one conclusion line per claim."""
    lines = [f"claims (95% paired-bootstrap intervals, paired test on the same items):\n{_table(claims_table(judged))}",
             "conclusions:"]
    lines += [f"  - {claim['conclusion']}" for claim in judged]
    return "\n".join(lines)


class EvaluateOp(StepOp):
    name = "evaluate"
    kind = "evaluate"
    description = "run probes on models side by side; results go to the store, the manifest and the run summary"
    input_keys = ("on",)
    model_keys = ("models",)
    sink_op = True
    params_schema = obj_schema({
        "models": {"type": "array", "minItems": 1, "items": MODEL_REF, "description": "models compared side by side"},
        "on": {**STEP_REF, "description": "rows to evaluate on (accuracy, self_correction)"},
        "limit": {"type": "integer", "minimum": 1, "maximum": 10**12, "description": "evaluate on the first N rows"},
        "max_tokens": {"type": "integer", "minimum": 1,
                       "description": f"answer length cap (default: {DEFAULT_MAX_TOKENS})"},
        "probes": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["probe"],
            "properties": {"probe": {"enum": sorted(p.name for p in PROBES), "description": PROBE_DESCRIPTION,
                                     "x-specdsl-unknown": {"code": "S213", "what": "probe"}}},
            "allOf": [{"if": {"properties": {"probe": {"const": p.name}}, "required": ["probe"]},
                       "then": p.params_schema} for p in PROBES]},
            "description": "what to measure: one entry per probe, with its own parameters"},
    }, required=["models", "probes"])

    def schema_for(self, registry: Any) -> dict[str, Any]:
        """params_schema with every installed probe's parameters (a plugin probe's too), not only the built-ins'."""
        schema = copy.deepcopy(dict(self.params_schema))
        # An enum of the installed probes: editors complete the names and `probe: acuracy` fails the schema.
        schema["properties"]["probes"]["items"]["properties"]["probe"].update(
            {"enum": sorted(registry.probes), "x-specdsl-unknown": {"code": "S213", "what": "probe"}})
        schema["properties"]["probes"]["items"]["allOf"] = [
            {"if": {"properties": {"probe": {"const": name}}, "required": ["probe"]}, "then": probe.params_schema}
            for name, probe in registry.probes.items()]
        return schema

    def estimate(self, params: Mapping[str, Any], input_rows: int | None, services: Any) -> Estimate:
        """Totals over the node's probes, and one entry per probe and model under ``probes``; each probe
        says what it sends through its optional ``estimate`` (a probe without one: unknown, and so are the
        totals). Every probe request carries the node's ``max_tokens``, which overrides the model's cap."""
        evaluated, sample = services.input_rows("on"), services.samples("on")
        if params.get("limit"):
            evaluated = None if evaluated is None else min(evaluated, params["limit"])
            sample = sample[: params["limit"]]  # the probes see the first rows only
        cap = params.get("max_tokens", DEFAULT_MAX_TOKENS)
        models = list(params.get("models") or [])
        parts = []
        for probe in params.get("probes") or []:
            own = getattr(services.registry.probes.get(probe.get("probe")), "estimate", None)
            if callable(own):
                asks = own(probe, models, sample, evaluated, services)
            else:  # what it sends is the probe's own business, known only once it runs
                asks = [{"model": m, "estimable": False, "requests": None, "avg_input_tokens": None} for m in models]
            for ask in asks:
                usage = services.usage(ask["model"], ask.pop("requests"), ask.pop("avg_input_tokens"), cap)
                parts.append({"probe": probe.get("probe"), **ask, **usage})
        totals = {key: None if not parts or any(part[key] is None for part in parts) else sum(p[key] for p in parts)
                  for key in ("requests", "input_tokens", "output_tokens", "cost")}
        return Estimate(rows=len(params.get("probes") or []),  # one summary row per probe
                        details={"rows": evaluated, **totals, "probes": parts})

    def check(self, ctx: CheckContext) -> tuple[str, ...]:
        probes = ctx.registry.probes
        for i, probe in enumerate(ctx.params.get("probes") or []):
            name = probe.get("probe")
            if name not in probes:
                from specdsl.errors import did_you_mean

                ctx.error("S213", f"unknown probe '{name}'", "probes", i, "probe",
                          hint=did_you_mean(str(name), probes) or "")
                continue
            own_check = getattr(probes[name], "check", None)
            if callable(own_check):  # a plugin probe's own compile-time rules (templates, columns)
                try:
                    own_check(ProbeCheckContext(ctx, i, probe))
                except Exception as exc:  # noqa: BLE001 - a plugin's check must not crash the compiler
                    ctx.error("S401", f"probe '{name}' failed to check its parameters: {exc!r}", "probes", i,
                              hint=f"a bug in the plugin that provides '{name}' "
                                   f"({type(probes[name]).__module__}); report it there")
            if probe.get("claims"):
                self._check_claims(ctx, i, probe, probes[name])
            if name in ("accuracy", "self_correction"):
                if "on" not in ctx.params:
                    ctx.error("S101", f"probe '{name}' needs rows: add `on:` (a step or source)", "probes", i,
                              hint="e.g. on: heldout (the step or source whose rows it asks about)")
                else:
                    for key, default in DEFAULT_COLUMNS.items():
                        ctx.column(probe.get(key, default), "probes", i, key if key in probe else "probe",
                                   input_key="on")
            for j, cond in enumerate(probe.get("conditions") or []):
                ctx.template(cond.get("system"), "probes", i, "conditions", j, "system",
                             columns=ctx.inputs.get("on", ()))
                model = cond.get("model")
                if isinstance(model, str) and model not in ctx.models:
                    ctx.error("S201", f"unknown model '{model}'", "probes", i, "conditions", j, "model",
                              hint=did_you_mean(model, ctx.models) or "define it under `models:` (or train it in "
                                                                       "a step and name that step)")
                elif isinstance(model, str) and model not in (ctx.params.get("models") or []):
                    # `models:` is what the node depends on: its fingerprint (a changed model re-runs the
                    # evaluation) and its order (a trained model is trained first). A model only a condition
                    # names would be in neither.
                    ctx.error("S201", f"model '{model}' is not among this step's `models:`",
                              "probes", i, "conditions", j, "model",
                              hint=f"add it: models: [{', '.join([*(ctx.params.get('models') or []), model])}]")
        return ("probe", "summary")

    @staticmethod
    def _check_claims(ctx: CheckContext, i: int, params: Mapping[str, Any], probe: Any) -> None:
        """Each claim names two arms of its probe (a matrixed one by its prefix) and one of its metrics."""
        arms_of, metrics_of = getattr(probe, "claim_arms", None), getattr(probe, "claim_metrics", None)
        if not (callable(arms_of) and callable(metrics_of)):
            ctx.error("S101", f"probe '{params.get('probe')}' reports no per-item evidence, so it takes no claims",
                      "probes", i, "claims")
            return
        arms, metrics = arms_of(params, list(ctx.params.get("models") or [])), metrics_of(params)
        for j, claim in enumerate(params["claims"]):
            found = pairs_for(claim.get("better", ""), claim.get("than", ""), arms)
            if isinstance(found, str):
                ctx.error("S101", f"claim: {found}", "probes", i, "claims", j,
                          hint="name a condition or model of this probe; a matrixed one by its step id")
            if "metric" in claim and claim["metric"] not in metrics:
                from specdsl.errors import did_you_mean

                ctx.error("S101", f"unknown metric '{claim['metric']}' (this probe's: {', '.join(metrics)})",
                          "probes", i, "claims", j, "metric", hint=did_you_mean(str(claim["metric"]), metrics) or "")

    def run(self, ctx: RunContext) -> tuple[Rows, dict[str, Any]]:
        p = ctx.params
        rows = ctx.inputs.get("on", [])
        if p.get("limit"):
            rows = rows[: p["limit"]]
        registry = ctx.services.registry
        results, summaries, artifacts = [], [], []
        for index, probe_params in enumerate(p["probes"]):
            probe = registry.probes[probe_params["probe"]]
            pctx = ProbeContext(node_id=ctx.node_id, params=probe_params, models=list(p["models"]), rows=rows,
                                vars=ctx.vars, services=ctx.services, artifact_dir=ctx.artifact_dir,
                                max_tokens=p.get("max_tokens", DEFAULT_MAX_TOKENS))
            result = probe.run(pctx)
            evidence = result.pop("evidence", None)  # per-item outcomes: what claims are judged on
            per_row = result.pop("rows", None)  # a probe's answers row by row: a table beside the summary
            if per_row:
                result["rows_file"] = write_probe_rows(ctx.artifact_dir, index, probe_params["probe"], per_row)
                artifacts.append({"kind": "evaluation rows", "path": result["rows_file"]})
            if result.get("plot"):
                artifacts.append({"kind": "plot", "path": result["plot"]})
            results.append(result)
            summaries.append(f"{probe_params['probe']}:\n{_table(result.get('table', []))}")
            if probe_params.get("claims"):
                if evidence is None:
                    raise RunError(f"probe '{probe_params['probe']}' returned no per-item evidence to judge its claims on",
                                   node=ctx.node_id)
                try:
                    result["claims"] = [judge(claim, evidence, seed=ctx.seed) for claim in probe_params["claims"]]
                except ValueError as exc:
                    raise RunError(f"probe '{probe_params['probe']}': claim: {exc}", node=ctx.node_id) from None
                summaries.append(_claims_text(result["claims"]))
        summary = "\n\n".join(summaries)
        (ctx.artifact_dir / "evaluation.json").write_text(json.dumps(results, indent=2, default=str))
        out = [{"probe": r["probe"], "summary": _table(r.get("table", []))} for r in results]
        return out, {"evaluation": {"results": results, "summary": summary}, "artifacts": artifacts}
