"""Plan estimates: generate and evaluate nodes, with numbers worked out by hand for a small spec.

The spec below has a priced backend (``metered``: $1 per million input tokens, $3 per million output
tokens), a free local model, a filter upstream of a generation and an evaluate node running all three
built-in probes. Each expected number is derived in a comment next to it. A second group of tests runs the
real probes against a recording model and checks that the estimate counts what they send.
"""

from __future__ import annotations

import json
import types
import warnings
from pathlib import Path

import pytest

from specdsl import api
from specdsl.errors import RunError
from specdsl.passes.estimate import estimate_plan
from specdsl.contract.hookspecs import hookimpl
from specdsl.plugins import build_registry
from specdsl.contract.ops import MODEL_REF, STEP_REF, Estimate, StepOp, obj_schema
from specdsl.ops.evaluate import ProbeContext


class MeteredBackend:
    """A provider that bills $1 / $3 per million input / output tokens and is never called here."""

    name = "metered"
    version = "1"
    options_schema = {"type": "object", "properties": {"max_tokens": {"type": "integer"}},
                      "additionalProperties": False}

    def identity(self, options):
        return {"model": options["model"]}

    def price(self, options, input_tokens, output_tokens):
        return input_tokens * 1e-6 + output_tokens * 3e-6

    def generate(self, options, requests, on_result):  # pragma: no cover - estimates call nothing
        raise AssertionError("an estimate must not call a model")


class OpaqueProbe:
    """A plugin probe: the estimator cannot know what it sends."""

    name = "opaque"
    params_schema = {"type": "object"}

    def run(self, ctx):  # pragma: no cover - never run here
        return {"probe": "opaque", "table": []}


class TranslateOp(StepOp):
    """A plugin op that calls a model twice per row (translate, then back-translate) and says so."""

    name = "translate"
    kind = "generate"
    sink_op = True  # nothing reads it in these specs: keep it through the prune pass
    model_keys = ("model",)
    params_schema = obj_schema({"from": STEP_REF, "model": MODEL_REF}, required=["from", "model"])

    def check(self, ctx):
        return ctx.columns + ("translation",)

    def estimate(self, params, input_rows, services):
        if input_rows is None:
            return None
        # 50 tokens in and 40 out per call, two calls a row; measured rows would refine the 50
        chars = [len(r.get("question", "")) for r in services.sample_rows]
        assert chars, "the planner hands the op its input's sample rows"
        tin, tout = 2 * input_rows * 50, 2 * input_rows * 40
        return Estimate(requests=2 * input_rows, input_tokens=tin, output_tokens=tout,
                        cost=services.price(params["model"], tin, tout), rows=input_rows)

    def run(self, ctx):  # pragma: no cover - estimates run nothing
        raise AssertionError("an estimate must not run an op")


class SilentGenerateOp(TranslateOp):
    """A plugin op that calls models but gives no estimate."""

    name = "silent"

    def estimate(self, params, input_rows, services):
        return None


def make_plugin() -> types.ModuleType:
    mod = types.ModuleType("estimate_test_plugin")

    @hookimpl
    def register_ops(register):
        register(TranslateOp())
        register(SilentGenerateOp())

    @hookimpl
    def register_backends(register):
        register(MeteredBackend())

    @hookimpl
    def register_probes(register):
        register(OpaqueProbe())

    mod.register_backends, mod.register_probes, mod.register_ops = register_backends, register_probes, register_ops
    return mod


@pytest.fixture(scope="module")
def registry():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return build_registry(extra_plugins=(make_plugin(),))


@pytest.fixture(autouse=True)
def _only_builtins_by_default(monkeypatch):
    monkeypatch.setenv("SPECDSL_PLUGINS", "none")


QUESTIONS = [  # question lengths 12, 20, 8, 16 characters: 14 on average
    {"id": "q1", "level": "easy", "question": "What is 1+1?"},
    {"id": "q2", "level": "hard", "question": "What is 1234 * 5678?"},
    {"id": "q3", "level": "easy", "question": "Say hey."},
    {"id": "q4", "level": "hard", "question": "What is 99 - 17?"},
]
HELDOUT = [  # only the first two are evaluated (limit: 2): 12 and 14 characters
    {"id": "h1", "question": "What is 2+2?", "answer": "4"},
    {"id": "h2", "question": "Name a colour.", "answer": "red"},
    {"id": "h3", "question": "x" * 400, "answer": "x"},
]
SPEC = """\
specdsl: 1
name: estimates
models:
  teacher: {backend: metered, model: big}
  local: {backend: transformers, model: smollm2-135m-instruct}
sources:
  questions: {path: questions.jsonl}
  heldout: {path: heldout.jsonl}
vars:
  generic: "Be brief."
steps:
  - id: easy
    filter: {from: questions, where: "{{ row.level == 'easy' }}"}
  - id: answers
    generate: {from: easy, model: teacher, user: "{{ row.question }}", into: response, max_tokens: 10}
  - id: judged
    filter: {from: answers, where: "{{ row.response != '' }}", into: nonempty}
  - id: dump
    export: {from: judged, path: out/answers}
  - id: score
    evaluate:
      models: [teacher, local]
      on: heldout
      limit: 2
      max_tokens: 5
      probes:
        - probe: accuracy
          conditions:
            - {name: teacher+generic, model: teacher, system: "{{ generic }}"}
            - {name: local, model: local}
        - probe: self_correction
          prompt: "Q: {{ row.question }}"
        - probe: position
          tasks: [records]
          context_tokens: 100
          buckets: 2
          per_bucket: 3
"""


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture
def spec_file(tmp_path) -> Path:
    write_jsonl(tmp_path / "questions.jsonl", QUESTIONS)
    write_jsonl(tmp_path / "heldout.jsonl", HELDOUT)
    path = tmp_path / "spec.yaml"
    path.write_text(SPEC, encoding="utf-8")
    return path


def plan_of(spec: Path, registry):
    """The compiled, estimated plan of ``spec`` (identities skipped: no model is loaded)."""
    return estimate_plan(api.compile_spec(spec, registry=registry, identities=False), registry)


@pytest.fixture
def estimated(spec_file, registry):
    return estimate_plan(api.compile_spec(spec_file, registry=registry, identities=False), registry)


def test_generation_downstream_of_a_filter_is_an_upper_bound(estimated):
    assert estimated.node("answers").estimate == {
        # The filter is assumed to keep all 4 rows: 4 requests.
        "rows": 4, "requests": 4,
        # Prompt = the question: 14 characters on average / 4 + 8 chat-template tokens = 11.5 per request.
        "input_tokens": 46,
        "output_tokens": 40,  # max_tokens 10 per request
        "cost": pytest.approx(46e-6 + 40 * 3e-6),
        # Its 4 rows also assume that no request fails (a failed one leaves its row out).
        "assumed_to_keep_every_row": ["answers", "easy"],
    }
    assert estimated.node("easy").estimate["assumed_to_keep_every_row"] == ["easy"]
    # A filter with `into:` keeps every row for certain: it is no assumption.
    assert estimated.node("judged").estimate["assumed_to_keep_every_row"] == ["answers", "easy"]


# Position probe prompts: up to context_tokens of context, plus the IN2 template (160 characters), the
# records instruction (87) and a quoted query (counted as the longest, 100): 347 / 4 + 8 = 94.75 tokens.
POSITION_REQUEST_TOKENS = 100 + 94.75


def test_position_prompt_overhead_is_what_the_expected_numbers_assume():
    from specdsl.probes.position import IN2_TEMPLATE, INSTRUCTIONS

    assert len(IN2_TEMPLATE.replace("{context}", "").replace("{instruction}", "")) == 160
    assert len(INSTRUCTIONS["records"].replace("{query}", "")) == 87


def test_evaluate_estimates_what_each_probe_sends(estimated):
    est = estimated.node("score").estimate
    assert est["probes"] == [
        # accuracy, one condition each: 2 rows (limit: 2). teacher+generic sends "Be brief." (9) plus the
        # question (12, 14): 22 characters on average -> 5.5 + 8 = 13.5 tokens x 2 = 27; answers 5 x 2.
        {"probe": "accuracy", "condition": "teacher+generic", "model": "teacher", "requests": 2,
         "input_tokens": 27, "output_tokens": 10, "cost": pytest.approx(27e-6 + 10 * 3e-6)},
        # local sends the question alone: 13 characters -> 3.25 + 8 = 11.25 x 2 = 22.5 -> 22; a local model is free.
        {"probe": "accuracy", "condition": "local", "model": "local", "requests": 2,
         "input_tokens": 22, "output_tokens": 10, "cost": 0.0},
        # self_correction: one request per row per model (answer, verification and correction in one
        # output). "Q: " + question: 16 characters -> 4 + 8 = 12 x 2 = 24.
        {"probe": "self_correction", "model": "teacher", "requests": 2,
         "input_tokens": 24, "output_tokens": 10, "cost": pytest.approx(24e-6 + 10 * 3e-6)},
        {"probe": "self_correction", "model": "local", "requests": 2,
         "input_tokens": 24, "output_tokens": 10, "cost": 0.0},
        # position: 2 buckets x 3 items per model, whatever the rows; 194.75 tokens x 6 = 1168.5 -> 1168.
        {"probe": "position", "task": "records", "model": "teacher", "requests": 6,
         "input_tokens": 1168, "output_tokens": 30, "cost": pytest.approx(1168e-6 + 30 * 3e-6)},
        {"probe": "position", "task": "records", "model": "local", "requests": 6,
         "input_tokens": 1168, "output_tokens": 30, "cost": 0.0},
    ]
    assert int(POSITION_REQUEST_TOKENS * 6) == 1168
    assert {k: v for k, v in est.items() if k != "probes"} == {
        "rows": 2,
        "requests": 2 + 2 + 2 + 2 + 6 + 6,
        "input_tokens": 27 + 22 + 24 + 24 + 1168 + 1168,
        "output_tokens": 100,
        "cost": pytest.approx((27 + 24 + 1168) * 1e-6 + (10 + 10 + 30) * 3e-6),
    }
    assert "assumed_to_keep_every_row" not in est  # heldout reaches it unfiltered


def test_evaluate_default_conditions_and_answer_cap(tmp_path, registry):
    write_jsonl(tmp_path / "heldout.jsonl", HELDOUT[:2])
    (tmp_path / "spec.yaml").write_text("""\
specdsl: 1
name: defaults
models:
  teacher: {backend: metered, model: big, max_tokens: 999}
sources:
  heldout: {path: heldout.jsonl}
steps:
  - id: score
    evaluate: {models: [teacher], on: heldout, probes: [{probe: accuracy}]}
""")
    plan = plan_of(tmp_path / "spec.yaml", registry)
    # One condition per model, no system prompt: 13 characters -> 11.25 x 2 = 22. Probe requests carry
    # the evaluate node's cap (default 256), not the model's max_tokens.
    assert plan.node("score").estimate["probes"] == [
        {"probe": "accuracy", "condition": "teacher", "model": "teacher", "requests": 2, "input_tokens": 22,
         "output_tokens": 512, "cost": pytest.approx(22e-6 + 512 * 3e-6)}]


def test_a_plugin_probe_leaves_the_evaluation_unknown(tmp_path, registry):
    write_jsonl(tmp_path / "heldout.jsonl", HELDOUT)
    (tmp_path / "spec.yaml").write_text("""\
specdsl: 1
name: opaque
models:
  teacher: {backend: metered, model: big}
sources:
  heldout: {path: heldout.jsonl}
steps:
  - id: score
    evaluate: {models: [teacher], on: heldout, probes: [{probe: opaque}, {probe: position, tasks: [code]}]}
""")
    plan = plan_of(tmp_path / "spec.yaml", registry)
    est = plan.node("score").estimate
    assert est["probes"][0] == {"probe": "opaque", "model": "teacher", "estimable": False, "requests": None,
                                "input_tokens": None, "output_tokens": None, "cost": None}
    assert est["probes"][1]["requests"] == 8 * 4  # the position defaults: 8 buckets x 4 items
    assert est["requests"] is None and est["cost"] is None
    text = rendered(plan, tmp_path)
    assert "requests: unknown (probe opaque cannot be estimated before it runs)" in text


def test_a_json_source_is_estimated_from_what_the_run_reads(tmp_path, registry):
    """A JSON array whose tail is not JSON: the run of a spec with `limit:` never reads that far, so neither
    does the estimate (count and sample stop at the limit); without a limit the run fails there, and the
    count is unknown rather than the plan failing."""
    records = ",\n".join(json.dumps({"id": f"q{i}", "question": "What is 1+1?"}) for i in range(50))
    (tmp_path / "questions.json").write_text("[\n" + records + ',\n{"id": "cut off', encoding="utf-8")
    spec = """\
specdsl: 1
name: json
models:
  teacher: {backend: metered, model: big}
sources:
  questions: {path: questions.json, format: json%s}
steps:
  - id: answers
    generate: {from: questions, model: teacher, user: "{{ row.question }}", max_tokens: 10}
"""
    (tmp_path / "spec.yaml").write_text(spec % ", limit: 20", encoding="utf-8")
    plan = plan_of(tmp_path / "spec.yaml", registry)
    assert plan.node("questions").estimate["rows"] == 20
    # 12 characters / 4 + 8 = 11 tokens a request.
    assert plan.node("answers").estimate | {"cost": None} == {
        "rows": 20, "requests": 20, "input_tokens": 220, "output_tokens": 200, "cost": None,
        "assumed_to_keep_every_row": ["answers"]}

    (tmp_path / "spec.yaml").write_text(spec % "", encoding="utf-8")
    plan = plan_of(tmp_path / "spec.yaml", registry)
    assert plan.node("questions").estimate["rows"] is None
    assert plan.node("answers").estimate["requests"] is None


def rendered(plan, tmp_path) -> str:
    from rich.console import Console

    from specdsl.views.plan import render_plan

    console = Console(record=True, width=400, color_system=None)
    render_plan(plan, store_dir=tmp_path / "no-store", console=console)
    return console.export_text()


def test_plan_output_shows_evaluations_and_says_where_filters_make_an_upper_bound(estimated, tmp_path):
    lines = rendered(estimated, tmp_path).splitlines()

    def facts(node_id):
        return lines[next(i for i, line in enumerate(lines) if line.startswith(f"{node_id} ")) + 1]

    # What the generation sends depends on the filter before it, not on its own failures.
    assert "4 requests, ~46 in / <= 40 out tokens · $0.0002 · upper bound: easy assumed to keep every row · " \
           "not cached" in facts("answers")
    assert "20 requests (accuracy 4, self_correction 4, position 12), ~2,433 in / <= 100 out tokens · " \
           "$0.0014 · not cached" in facts("score")
    assert facts("score").lstrip().startswith("metered 1, transformers 1 · models teacher, local · ")  # both backends
    # Total: 4 + 20 requests; $0.000166 + $0.001369.
    assert "estimated: 24 requests, $0.0015 (upper bound: steps that may drop rows assumed to keep every row)" \
        in lines


def test_plan_json_carries_the_evaluate_estimate(estimated):
    data = json.loads(estimated.to_json())
    score = next(n for n in data["nodes"] if n["id"] == "score")
    assert score["estimate"]["requests"] == 20
    assert [p["probe"] for p in score["estimate"]["probes"]] == ["accuracy"] * 2 + ["self_correction"] * 2 + \
        ["position"] * 2
    answers = next(n for n in data["nodes"] if n["id"] == "answers")
    assert answers["estimate"]["assumed_to_keep_every_row"] == ["answers", "easy"]


# --------------------------------------------------------------------------------------------------
# The estimate counts what the probes really send
# --------------------------------------------------------------------------------------------------


class RecordingServices:
    """Stands in for the run's services: records every probe request, answers with nothing."""

    def __init__(self, registry=None):
        self.sent: dict[str, list[list[dict]]] = {}
        self.caps: set[int] = set()  # the max_tokens of every request
        self.registry = registry

    def answer(self, node_id, model, prompts, params, *, label=None):
        self.sent.setdefault(model, []).extend([list(p) for p in prompts])
        self.caps.add(params["max_tokens"])
        return [""] * len(prompts)

    def tokenizer(self, model):
        raise RunError("no tokenizer here")  # the position probe then measures with its own approximation


def probe_traffic(estimated, probe_index: int, tmp_path) -> RecordingServices:
    from specdsl.plugins import default_registry

    node = estimated.node("score")
    p = node.params
    rows = [dict(r) for r in HELDOUT[: p["limit"]]]
    services = RecordingServices()
    probe_params = p["probes"][probe_index]
    ctx = ProbeContext(node_id="score", params=probe_params, models=list(p["models"]), rows=rows,
                       vars=estimated.vars, services=services, artifact_dir=tmp_path, max_tokens=p["max_tokens"])
    default_registry().probes[probe_params["probe"]].run(ctx)
    return services


def chars(prompt: list[dict]) -> int:
    return sum(len(m["content"]) for m in prompt)


@pytest.mark.parametrize("probe_index", [0, 1])
def test_row_probes_estimate_exactly_what_they_send(estimated, probe_index, tmp_path):
    parts = [part for part in estimated.node("score").estimate["probes"]
             if part["probe"] == estimated.node("score").params["probes"][probe_index]["probe"]]
    sent = probe_traffic(estimated, probe_index, tmp_path).sent
    for model in ("teacher", "local"):
        prompts = sent[model]
        mine = [part for part in parts if part["model"] == model]
        assert sum(part["requests"] for part in mine) == len(prompts)
        # Same measure as the estimate: characters / 4 + 8 chat-template tokens per request.
        assert sum(part["input_tokens"] for part in mine) == int(
            (sum(chars(p) for p in prompts) / len(prompts) / 4 + 8) * len(prompts))


def test_position_probe_sends_as_many_requests_as_estimated_and_no_longer_prompts(estimated, tmp_path):
    from specdsl.probes.position import approx_token_count

    parts = [part for part in estimated.node("score").estimate["probes"] if part["probe"] == "position"]
    sent = probe_traffic(estimated, 2, tmp_path).sent
    for part in parts:
        prompts = sent[part["model"]]
        assert len(prompts) == part["requests"] == 6
        longest = max(approx_token_count(p[-1]["content"]) for p in prompts) + 8
        assert longest <= part["input_tokens"] / part["requests"]  # an upper bound per request


def test_the_estimate_and_the_run_share_the_evaluate_defaults(tmp_path, registry, monkeypatch):
    """The answer cap and the position probe's sizes a spec leaves out are defined once, in
    specdsl.ops.evaluate: changed there, both what the run sends and what the plan estimates follow."""
    from specdsl.ops import evaluate
    from specdsl.contract.ops import RunContext

    monkeypatch.setattr(evaluate, "DEFAULT_MAX_TOKENS", 7)
    monkeypatch.setattr(evaluate.PositionProbe, "DEFAULTS", {"context_tokens": 100, "buckets": 3, "per_bucket": 2})
    write_jsonl(tmp_path / "heldout.jsonl", HELDOUT[:2])
    (tmp_path / "spec.yaml").write_text("""\
specdsl: 1
name: defaults
models:
  teacher: {backend: metered, model: big}
sources:
  heldout: {path: heldout.jsonl}
steps:
  - id: score
    evaluate: {models: [teacher], on: heldout, probes: [{probe: position, tasks: [records]}]}
""")
    plan = plan_of(tmp_path / "spec.yaml", registry)
    [part] = plan.node("score").estimate["probes"]
    assert (part["requests"], part["output_tokens"]) == (3 * 2, 3 * 2 * 7)

    node = plan.node("score")
    services = RecordingServices(registry)
    ctx = RunContext(node_id="score", params=node.params, inputs={"on": [dict(r) for r in HELDOUT[:2]]},
                     vars={}, seed=0, services=services, artifact_dir=tmp_path)
    evaluate.EvaluateOp().run(ctx)
    assert len(services.sent["teacher"]) == part["requests"]
    assert services.caps == {7}


def test_a_plugin_op_estimates_itself_and_one_that_cannot_is_shown_as_unknown(tmp_path, registry):
    write_jsonl(tmp_path / "questions.jsonl", QUESTIONS)
    (tmp_path / "spec.yaml").write_text("""\
specdsl: 1
name: plugin-estimates
models:
  teacher: {backend: metered, model: big}
sources:
  questions: {path: questions.jsonl}
steps:
  - id: fr
    translate: {from: questions, model: teacher}
  - id: quiet
    silent: {from: questions, model: teacher}
""")
    plan = plan_of(tmp_path / "spec.yaml", registry)
    est = plan.node("fr").estimate
    # 4 rows x 2 calls; 400 tokens in at $1/M + 320 out at $3/M = $0.000400 + $0.000960
    assert (est["requests"], est["input_tokens"], est["output_tokens"]) == (8, 400, 320)
    assert est["cost"] == pytest.approx(0.00136)
    assert "requests" not in plan.node("quiet").estimate

    from rich.console import Console

    from specdsl.views.plan import render_plan

    console = Console(record=True, width=200)
    render_plan(plan, store_dir=tmp_path / "store", console=console)
    text = console.export_text()
    assert "8 requests, ~400 in / <= 320 out tokens · $0.0014" in text
    assert "requests: unknown (op silent gives no estimate)" in text
    assert "estimated: 8 requests, $0.0014" in text
