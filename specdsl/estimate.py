"""Estimates before any call: requests, input/output tokens and cost per generate node, training tokens.

Row counts flow from the sources (counted exactly) through the DAG; filters are counted as keeping
every row, so figures are upper bounds. Input tokens come from rendering the templates over the real
source rows where the generate node reads a source, else from the templates' length; output tokens
assume each answer runs to its token cap. Cost is the backend's price (litellm's local cost map;
zero for local models; unknown when the backend cannot price the model).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from .plan import Plan

CHARS_PER_TOKEN = 4          # the usual rule of thumb for English text with BPE tokenizers
DEFAULT_OUTPUT_TOKENS = 256


def estimate_plan(plan: Plan, registry: Any = None) -> Plan:
    from .steps.source import count_rows, read_rows

    if registry is None:
        from .plugins import default_registry

        registry = default_registry()
    spec_dir = Path(plan.spec_file).parent
    rows: dict[str, int | None] = {}
    samples: dict[str, list[dict]] = {}
    nodes = []
    for n in plan.nodes:
        p = n.params
        est: dict[str, Any] = {}
        src = n.input("from")
        in_rows = rows.get(src) if src else None
        if n.op == "source":
            path = spec_dir / p["path"]
            count = count_rows(path, p["format"])
            if count is not None and p.get("limit"):
                count = min(count, p["limit"])
            rows[n.id] = count
            try:
                samples[n.id] = read_rows(path, p["format"], id_column=p.get("id"), limit=min(p.get("limit") or 200, 200))
            except Exception:  # noqa: BLE001 - estimates never fail a plan
                samples[n.id] = []
            est["rows"] = count
        elif n.kind == "generate":
            mult = p.get("n", 1)
            count = None if in_rows is None else in_rows * mult
            rows[n.id] = count
            est.update(_generation(plan, registry, n, samples.get(src or "", []), count))
            est["rows"] = count
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
            if n.op in ("filter", "map", "format", "erase_prompt", "pam") and src in samples:
                samples[n.id] = samples[src]
        nodes.append(replace(n, estimate=est))
    return replace(plan, nodes=tuple(nodes))


def _generation(plan: Plan, registry: Any, node: Any, sample_rows: list[dict], requests: int | None) -> dict[str, Any]:
    from .steps.generate import prompt_messages

    p = node.params
    model_ref = p["model"]
    try:
        m = plan.model(model_ref)
        backend = registry.backends.get(m.backend)
        options = m.options
    except KeyError:  # a trained model: local, free
        backend, options = registry.backends.get("transformers"), {}
    variables = plan.vars
    lengths = []
    for row in sample_rows[:200]:
        try:
            msgs = prompt_messages(p, row, variables)
            lengths.append(sum(len(x["content"]) for x in msgs))
        except Exception:  # noqa: BLE001 - a row the template cannot render is reported at run time
            continue
    if not lengths:
        texts = [p.get("system") or "", p.get("user") or ""] + [m.get("content", "") for m in p.get("messages") or []]
        lengths = [sum(len(t) for t in texts)]
    avg_in = sum(lengths) / len(lengths) / CHARS_PER_TOKEN + 8  # + chat template overhead
    cap = p.get("max_tokens") or options.get("max_tokens") or options.get("max_new_tokens") or DEFAULT_OUTPUT_TOKENS
    if requests is None:
        return {"requests": None, "input_tokens": None, "output_tokens": None, "cost": None}
    tin, tout = int(avg_in * requests), int(cap * requests)
    cost = None
    if backend is not None:
        try:
            cost = backend.price(options, tin, tout)
        except Exception:  # noqa: BLE001
            cost = None
    return {"requests": requests, "input_tokens": tin, "output_tokens": tout, "cost": cost}


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
