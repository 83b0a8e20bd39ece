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

This pass names no op: every op estimates itself through its optional ``estimate(params, input_rows,
services)`` (see specdsl.contract.ops.StepOp.estimate), built-in and plugin ops alike; ``services`` is
an :class:`EstimateServices` for the node. An op without ``estimate`` passes its input's row count on.
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


def estimate_plan(plan: Plan, registry: Any = None) -> Plan:
    if registry is None:
        from specdsl.plugins import default_registry

        registry = default_registry()
    rows: dict[str, int | None] = {}
    samples: dict[str, list[dict]] = {}
    droppers: dict[str, list[str]] = {}  # node -> the steps its rows went through that may drop rows
    nodes = []
    for n in plan.nodes:
        op = registry.ops.get(n.op)
        src = n.input("from")
        in_rows = rows.get(src) if src else None
        droppers[n.id] = _row_droppers(n, op, droppers)
        services = EstimateServices(plan, registry, n, rows, samples)
        own = _op_estimate(op, n, in_rows, services)
        est: dict[str, Any] = {}
        if own is None:
            rows[n.id] = in_rows
            est["rows"] = in_rows
        elif own.details is not None:  # the op wrote the whole estimate it shows
            rows[n.id] = None if own.rows_unknown else (own.rows if own.rows is not None else in_rows)
            est.update(own.details)
        else:
            rows[n.id] = None if own.rows_unknown else (own.rows if own.rows is not None else in_rows)
            est["rows"] = in_rows
            est.update({"requests": own.requests, "input_tokens": own.input_tokens,
                        "output_tokens": own.output_tokens, "cost": own.cost})
            if own.train_tokens:
                est["train_tokens"] = own.train_tokens
        if own is not None and own.sample_rows is not None:
            samples[n.id] = list(own.sample_rows)
        elif getattr(op, "row_parallel", False) and src in samples:
            # A row-parallel op's rows are its input's rows (some of them, maybe with columns added), so
            # the input's sample rows still measure the prompts rendered downstream.
            samples[n.id] = samples[src]
        if droppers[n.id]:
            est["assumed_to_keep_every_row"] = droppers[n.id]
        nodes.append(replace(n, estimate=est))
    return replace(plan, nodes=tuple(nodes))


class EstimateServices:
    """What an op's ``estimate(params, input_rows, services)`` receives as ``services``: the rows and sample
    rows estimated upstream, the plan's models and their prices, and the planner's rules of thumb.

    Never call a model from an estimate: ``specdsl plan`` must stay free and offline.
    """

    chars_per_token = CHARS_PER_TOKEN
    chat_template_tokens = CHAT_TEMPLATE_TOKENS
    default_output_tokens = DEFAULT_OUTPUT_TOKENS
    sample_size = SAMPLE_ROWS

    def __init__(self, plan: Plan, registry: Any, node: Any, rows: Mapping[str, int | None],
                 samples: Mapping[str, list[dict]]):
        self.plan, self.registry, self.node = plan, registry, node
        self._rows, self._samples = rows, samples

    @property
    def vars(self) -> Mapping[str, Any]:
        return self.plan.vars

    @property
    def spec_dir(self) -> Path:
        return Path(self.plan.spec_file).parent

    @property
    def sample_rows(self) -> list[dict]:
        """A few rows of ``from`` (real source rows carried through row-parallel steps), or []."""
        return self.samples("from")

    def input_rows(self, param: str = "from") -> int | None:
        """The estimated row count of the node's input ``param`` (``from[1]`` for the second of a list)."""
        ref = self.node.input(param)
        return self._rows.get(ref) if ref else None

    def samples(self, param: str = "from") -> list[dict]:
        ref = self.node.input(param)
        return self._samples.get(ref, []) if ref else []

    def rows_of(self, node_id: str) -> int | None:
        """The estimated row count of any earlier node."""
        return self._rows.get(node_id)

    def model(self, model: str) -> tuple[Any, dict[str, Any]]:
        """The backend object and options of a model (a name under ``models:``, or a train step: local)."""
        return _backend_and_options(self.plan, self.registry, model)

    def price(self, model: str, input_tokens: int, output_tokens: int) -> float | None:
        """USD for these tokens on ``model`` (a name under ``models:`` or a train step), None if unknown."""
        backend, options = self.model(model)
        return _usage(backend, options, 1, input_tokens, output_tokens)["cost"]

    def usage(self, model: str, requests: int | None, avg_input_tokens: float | None,
              output_cap: int) -> dict[str, Any]:
        """``requests``, ``input_tokens``, ``output_tokens`` (each answer at its cap) and ``cost``."""
        backend, options = self.model(model)
        return _usage(backend, options, requests, avg_input_tokens, output_cap)

    def average_prompt_tokens(self, sample_rows: Sequence[Mapping[str, Any]],
                              prompt_chars: Callable[[Mapping], int], fallback_chars: int) -> float:
        """Mean tokens of one request's prompt over the sample rows; ``fallback_chars`` (the templates' own
        length) when no row is known or none renders."""
        return _average_prompt_tokens(sample_rows, prompt_chars, fallback_chars)


# The name plugin ops were documented with before the services grew; kept for their type hints.
PlanPrices = EstimateServices


def _op_estimate(op: Any, node: Any, in_rows: int | None, services: EstimateServices) -> Any:
    """The op's own estimate (an ``Estimate``), or None: not estimable, its rows pass on. An op's estimate
    failing leaves the node unestimated rather than failing the plan."""
    estimate = getattr(op, "estimate", None)
    if not callable(estimate):
        return None
    try:
        return estimate(node.params, in_rows, services)
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
    except KeyError:  # a model a step makes (train): served by its op's model_backend
        op = registry.ops.get(plan.node(model_ref).op) if plan.has(model_ref) else None
        return registry.backends.get(getattr(op, "model_backend", None) or ""), {}


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
