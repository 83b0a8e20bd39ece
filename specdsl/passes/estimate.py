"""Estimates before any call: requests, input/output tokens and cost per generate and evaluate node,
training tokens.

Row counts flow from the sources (counted exactly) through the DAG. Steps whose op may drop rows (its
``drops_rows``: a filter without ``into:``, a generation whose failed requests are left out, a plugin's
dedupe) are counted as keeping every row, so a figure downstream of one is an upper bound: its estimate
names those steps under ``assumed_to_keep_every_row`` (the node itself among them when its own output
may be short). Input tokens come from rendering the prompts over the real source
rows where the node reads a source (directly or through steps that pass rows on), else from the templates'
length; output tokens assume each answer runs to its token cap. Cost is the backend's price (litellm's
local cost map; zero for local models; unknown when the backend cannot price the model).

An evaluate node is estimated from what its probes send (see specdsl.ops.evaluate), per probe and
model under ``probes``:

* ``accuracy``: one request per evaluated row per condition (default: one condition per model without a
  system prompt); the prompt is the condition's system prompt plus the question.
* ``self_correction``: one request per evaluated row per model. The model answers, verifies and corrects
  itself within that one output, so the output cap covers all of it.
* ``position``: ``buckets x per_bucket`` requests per task per model, whatever the rows; each prompt is a
  context of at most ``context_tokens`` plus the IN2 template, the instruction and its quoted query.
* a probe from a plugin: unknown, and so are the node's totals.

Every probe request carries the node's ``max_tokens`` (default: specdsl.ops.evaluate.DEFAULT_MAX_TOKENS),
which overrides the model's own cap.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from specdsl.ir.plan import Plan

log = logging.getLogger("specdsl.passes.estimate")

CHARS_PER_TOKEN = 4          # the usual rule of thumb for English text with BPE tokenizers
CHAT_TEMPLATE_TOKENS = 8     # role markers and separators a chat template adds around each request
DEFAULT_OUTPUT_TOKENS = 256
SAMPLE_ROWS = 200            # source rows rendered to measure prompts: enough for a stable average


# Steps whose output rows are input rows (all or some of them, maybe with columns added), so the input's
# sample rows still measure the prompts rendered downstream.
SAME_ROW_OPS = ("filter", "map", "format", "erase_prompt", "pam")


def estimate_plan(plan: Plan, registry: Any = None) -> Plan:
    from specdsl.sources.files import count_rows, read_rows

    if registry is None:
        from specdsl.plugins import default_registry

        registry = default_registry()
    spec_dir = Path(plan.spec_file).parent
    rows: dict[str, int | None] = {}
    samples: dict[str, list[dict]] = {}
    droppers: dict[str, list[str]] = {}  # node -> the steps its rows went through that may drop rows
    nodes = []
    for n in plan.nodes:
        p = n.params
        est: dict[str, Any] = {}
        src = n.input("from")
        in_rows = rows.get(src) if src else None
        droppers[n.id] = _row_droppers(n, registry.ops.get(n.op), droppers)
        if n.op == "source":
            path = spec_dir / p["path"]
            # Both read only what the run will (up to the source's limit), and hold little of it: the count
            # scans without keeping rows (a malformed file is reported when the run reads it), the sample
            # stops after its rows.
            try:
                count = count_rows(path, p["format"], limit=p.get("limit"))
            except Exception:  # noqa: BLE001 - estimates never fail a plan
                count = None
            rows[n.id] = count
            try:
                samples[n.id] = read_rows(path, p["format"], id_column=p.get("id"),
                                          limit=min(p.get("limit") or SAMPLE_ROWS, SAMPLE_ROWS))
            except Exception:  # noqa: BLE001 - estimates never fail a plan
                samples[n.id] = []
            est["rows"] = count
        elif (own := _op_estimate(registry.ops.get(n.op), plan, registry, n, in_rows,
                                  samples.get(src or "", []))) is not None:
            rows[n.id] = own.rows if own.rows is not None else in_rows
            est["rows"] = in_rows
            est.update({"requests": own.requests, "input_tokens": own.input_tokens,
                        "output_tokens": own.output_tokens, "cost": own.cost})
            if own.train_tokens:
                est["train_tokens"] = own.train_tokens
        elif n.op == "generate":
            mult = p.get("n", 1)
            count = None if in_rows is None else in_rows * mult
            rows[n.id] = count
            est.update(_generation(plan, registry, n, samples.get(src or "", []), count))
            est["rows"] = count
        elif n.kind == "evaluate":
            on = n.input("on")
            evaluated = rows.get(on) if on else None
            sample = samples.get(on or "", [])
            if p.get("limit"):
                evaluated = None if evaluated is None else min(evaluated, p["limit"])
                sample = sample[: p["limit"]]  # the probes see the first rows only
            rows[n.id] = len(p.get("probes") or [])  # one summary row per probe
            est["rows"] = evaluated
            est.update(_evaluation(plan, registry, n, sample, evaluated))
        elif n.op == "train":
            rows[n.id] = 1
            est["rows"] = in_rows
            est["train_tokens"] = _train_tokens(plan, n, rows)
        elif n.op == "segment":
            rows[n.id] = None  # depends on text lengths: known once it runs
            est["rows"] = None
        elif n.op == "concat":
            parts = [rows.get(src) for _, src in n.inputs]
            rows[n.id] = None if any(r is None for r in parts) else sum(parts)
            est["rows"] = rows[n.id]
        else:
            rows[n.id] = in_rows
            est["rows"] = in_rows
            if n.op in SAME_ROW_OPS and src in samples:
                samples[n.id] = samples[src]
        if droppers[n.id]:
            est["assumed_to_keep_every_row"] = droppers[n.id]
        nodes.append(replace(n, estimate=est))
    return replace(plan, nodes=tuple(nodes))


class PlanPrices:
    """What a plugin op's ``estimate(params, input_rows, services)`` receives as ``services``: the price of
    tokens on a model of this plan, and a few of its input's rows (to measure prompts)."""

    def __init__(self, plan: Plan, registry: Any, sample_rows: list[dict]):
        self._plan, self._registry = plan, registry
        self.sample_rows = sample_rows

    def price(self, model: str, input_tokens: int, output_tokens: int) -> float | None:
        """USD for these tokens on ``model`` (a name under ``models:`` or a train step), None if unknown."""
        backend, options = _backend_and_options(self._plan, self._registry, model)
        return _usage(backend, options, 1, input_tokens, output_tokens)["cost"]


def _op_estimate(op: Any, plan: Plan, registry: Any, node: Any, in_rows: int | None,
                 sample_rows: list[dict]) -> Any:
    """A plugin op's own estimate (an ``Estimate``), or None to use the planner's rules for the op.

    The built-in ops are estimated here, from their rendered prompts; their ``estimate`` returns None.
    An op's estimate failing leaves the node unestimated rather than failing the plan.
    """
    estimate = getattr(op, "estimate", None)
    if not callable(estimate):
        return None
    try:
        return estimate(node.params, in_rows, PlanPrices(plan, registry, sample_rows))
    except Exception:  # noqa: BLE001 - estimates never fail a plan
        log.debug("estimate of %s failed", node.id, exc_info=True)
        return None


def _row_droppers(node: Any, op: Any, known: Mapping[str, list[str]]) -> list[str]:
    """The steps that may drop rows whose rows reach ``node`` (itself included when ``op`` may), in a
    stable order. Only data inputs count: a model trained downstream of a filter costs an evaluation the
    same, whatever the filter kept."""
    found = {step for _, src in node.inputs for step in known.get(src, [])}
    if _may_drop_rows(op, node.params):
        found.add(node.id)
    return sorted(found)


def _may_drop_rows(op: Any, params: Mapping[str, Any]) -> bool:
    """An op's ``drops_rows`` (see specdsl.contract.ops.StepOp): a bool, or a function of the step's params.
    An op without it, or not installed, keeps every row."""
    drops = getattr(op, "drops_rows", False)
    return bool(drops(params)) if callable(drops) else bool(drops)


def _backend_and_options(plan: Plan, registry: Any, model_ref: str) -> tuple[Any, dict[str, Any]]:
    try:
        m = plan.model(model_ref)
        return registry.backends.get(m.backend), m.options
    except KeyError:  # a trained model: local, free
        return registry.backends.get("transformers"), {}


def _usage(backend: Any, options: Mapping[str, Any], requests: int | None, avg_input_tokens: float | None,
           output_cap: int) -> dict[str, Any]:
    """Requests, tokens (inputs measured, outputs at their cap) and the backend's price for them."""
    if requests is None or avg_input_tokens is None:
        return {"requests": requests, "input_tokens": None, "output_tokens": None, "cost": None}
    tin, tout = int(avg_input_tokens * requests), int(output_cap * requests)
    cost = None
    if backend is not None:
        try:
            cost = backend.price(options, tin, tout)
        except Exception:  # noqa: BLE001 - a backend that cannot price leaves the cost unknown
            cost = None
    return {"requests": requests, "input_tokens": tin, "output_tokens": tout, "cost": cost}


def _average_prompt_tokens(sample_rows: Sequence[Mapping[str, Any]], prompt_chars: Callable[[Mapping], int],
                           fallback_chars: int) -> float:
    """Mean tokens of one request's prompt over the sample rows; ``fallback_chars`` (the templates' own
    length) when no row is known or none renders."""
    lengths = []
    for row in sample_rows[:SAMPLE_ROWS]:
        try:
            lengths.append(prompt_chars(row))
        except Exception:  # noqa: BLE001 - a row the template cannot render is reported at run time
            continue
    if not lengths:
        lengths = [fallback_chars]
    return sum(lengths) / len(lengths) / CHARS_PER_TOKEN + CHAT_TEMPLATE_TOKENS


def _generation(plan: Plan, registry: Any, node: Any, sample_rows: list[dict], requests: int | None) -> dict[str, Any]:
    from specdsl.ops.generate import prompt_messages

    p = node.params
    backend, options = _backend_and_options(plan, registry, p["model"])
    variables = plan.vars
    texts = [p.get("system") or "", p.get("user") or ""] + [m.get("content", "") for m in p.get("messages") or []]
    avg_in = _average_prompt_tokens(
        sample_rows, lambda row: sum(len(x["content"]) for x in prompt_messages(p, row, variables)),
        sum(len(t) for t in texts))
    cap = p.get("max_tokens") or options.get("max_tokens") or options.get("max_new_tokens") or DEFAULT_OUTPUT_TOKENS
    return _usage(backend, options, requests, avg_in, cap)


def _evaluation(plan: Plan, registry: Any, node: Any, sample_rows: list[dict], rows: int | None) -> dict[str, Any]:
    """Totals over the node's probes, and one entry per probe and model under ``probes``."""
    from specdsl.ops.evaluate import DEFAULT_MAX_TOKENS

    p = node.params
    cap = p.get("max_tokens", DEFAULT_MAX_TOKENS)
    parts = []
    for probe in p.get("probes") or []:
        for ask in _probe_requests(probe, list(p.get("models") or []), sample_rows, rows, plan.vars):
            backend, options = _backend_and_options(plan, registry, ask["model"])
            usage = _usage(backend, options, ask.pop("requests"), ask.pop("avg_input_tokens"), cap)
            parts.append({"probe": probe.get("probe"), **ask, **usage})
    totals = {key: _sum_if_all_known(part[key] for part in parts)
              for key in ("requests", "input_tokens", "output_tokens", "cost")}
    return {**totals, "probes": parts}


def _probe_requests(probe: Mapping[str, Any], models: list[str], sample_rows: list[dict], rows: int | None,
                    variables: Mapping[str, Any]) -> list[dict[str, Any]]:
    """What a probe's ``run`` sends (specdsl.ops.evaluate), one entry per model it asks (and condition
    or task, where the probe has them): ``requests`` and ``avg_input_tokens`` per request."""
    from specdsl import templates
    from specdsl.ops.evaluate import DEFAULT_COLUMNS

    name = probe.get("probe")
    question = probe.get("question", DEFAULT_COLUMNS["question"])
    if name == "accuracy":
        conditions = probe.get("conditions") or [{"name": m, "model": m} for m in models]
        asks = []
        for cond in conditions:
            system = cond.get("system")

            def prompt_chars(row: Mapping, system: str | None = system) -> int:
                return (len(templates.render(system, row, variables)) if system else 0) + len(str(row[question]))

            asks.append({"condition": cond["name"], "model": cond["model"], "requests": rows,
                         "avg_input_tokens": _average_prompt_tokens(sample_rows, prompt_chars, len(system or ""))})
        return asks
    if name == "self_correction":
        from specdsl.ops.evaluate import SelfCorrectionProbe

        prompt = probe.get("prompt", SelfCorrectionProbe.DEFAULT_PROMPT.replace("QUESTION", question))
        avg_in = _average_prompt_tokens(sample_rows, lambda row: len(templates.render(prompt, row, variables)),
                                        len(prompt))
        return [{"model": m, "requests": rows, "avg_input_tokens": avg_in} for m in models]
    if name == "position":
        from specdsl.probes.position import IN2_TEMPLATE, INSTRUCTIONS, MAX_CODE_QUERY_CHARS
        from specdsl.ops.evaluate import PositionProbe

        settings = PositionProbe.settings(probe)
        requests = settings["buckets"] * settings["per_bucket"]
        template_chars = len(IN2_TEMPLATE.replace("{context}", "").replace("{instruction}", ""))
        # Every task's query is counted as the longest any quotes: a code line (document pieces are 8
        # words, record ids 9 characters).
        query_chars = MAX_CODE_QUERY_CHARS
        asks = []
        for task in settings["tasks"]:
            wrapper_chars = template_chars + len(INSTRUCTIONS[task].replace("{query}", "")) + query_chars
            avg_in = settings["context_tokens"] + wrapper_chars / CHARS_PER_TOKEN + CHAT_TEMPLATE_TOKENS
            asks += [{"task": task, "model": m, "requests": requests, "avg_input_tokens": avg_in} for m in models]
        return asks
    # A plugin's probe: what it sends is its own business, known only once it runs.
    return [{"model": m, "estimable": False, "requests": None, "avg_input_tokens": None} for m in models]


def _sum_if_all_known(values: Iterable[Any]) -> Any:
    values = list(values)
    return None if not values or any(v is None for v in values) else sum(values)


def _train_tokens(plan: Plan, node: Any, rows: dict[str, int | None]) -> int | None:
    tok = plan.node(node.input("from")) if node.input("from") else None
    if tok is None:
        return None
    upstream = tok.input("from")
    n = rows.get(upstream) if upstream else None
    if n is None:
        return None
    max_len = node.params.get("max_length") or 512
    epochs = node.params.get("epochs", 1)
    return int(n * min(max_len, 256) * epochs)  # rough: samples x typical length, capped by max_length
