"""Terminal views of plans and runs (rich)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from specdsl.ir.plan import Plan


def _fmt_int(n: Any) -> str:
    return f"{n:,}" if isinstance(n, int) else ("-" if n is None else str(n))


def render_plan(plan: Plan, *, store_dir: Path | None = None, expanded: bool = False, console: Any = None) -> None:
    """One block per node: id, op, inputs -> columns, then backend, estimates, cache state, fingerprint."""
    from rich.console import Console
    from rich.markup import escape

    from specdsl.execute.runner import cached_nodes, default_store_dir
    from specdsl.execute.store import Store
    from specdsl.plugins import default_registry


    console = console or Console()
    root = Path(store_dir) if store_dir else default_store_dir(plan)
    store = Store(root) if root.exists() else None
    registry = default_registry() if store is not None else None  # an export whose files are gone is not cached
    cached_ids = cached_nodes(plan, store, registry=registry) if store is not None else set()  # inputs cached too
    console.print(f"[bold]plan[/bold] {plan.name}: {len(plan.nodes)} nodes")
    total_cost, unknown_cost, total_requests, upper_bound = 0.0, False, 0, False
    for n in plan.nodes:
        est = n.estimate or {}
        ins = ", ".join(src for _, src in n.inputs) or n.params.get("path", "-")
        cached = n.id in cached_ids
        console.print(f"[bold cyan]{escape(n.id)}[/bold cyan] [magenta]{n.op}[/magenta]  {escape(ins)} -> "
                      f"{escape(', '.join(n.columns))}")
        facts = []
        if n.backend:
            facts.append(n.backend)
        if n.model_names:
            facts.append(("models " if len(n.model_names) > 1 else "model ") + escape(", ".join(n.model_names)))
        # What a node sends (requests, tokens, cost) assumes the steps before it keep every row; whatever the
        # node itself drops, it drops after sending.
        assumed = [step for step in est.get("assumed_to_keep_every_row") or [] if step != n.id]
        if n.kind in ("generate", "evaluate") or "requests" in est:  # built-in, or a plugin op's own estimate
            req = est.get("requests")
            if req is None:
                facts.append(f"requests: {_unknown_requests_reason(n, est)}")
            else:
                total_requests += req
                upper_bound = upper_bound or bool(assumed)
                facts.append(f"{req:,} requests{_requests_by_probe(est)}, ~{_fmt_int(est.get('input_tokens'))} in "
                             f"/ <= {_fmt_int(est.get('output_tokens'))} out tokens")
            cost = est.get("cost")
            if cost is None:
                unknown_cost = True
                facts.append("cost unknown")
            else:
                total_cost += cost
                facts.append(f"${cost:.4f}")
            if assumed and req is not None:
                facts.append(_upper_bound(assumed))
        elif est.get("train_tokens"):
            facts.append(f"~{est['train_tokens']:,} training tokens")
            if assumed:
                facts.append(_upper_bound(assumed))
        elif est.get("rows") is not None and n.kind == "source":
            facts.append(f"{est['rows']:,} rows")
        facts.append("[green]cached[/green]" if cached else "not cached")
        facts.append(f"fp {n.short}")
        console.print("    " + " · ".join(facts))
    cost_line = f"estimated: {total_requests:,} requests, ${total_cost:.4f}" + \
        (" + models that cannot be priced" if unknown_cost else "") + \
        (" (upper bound: steps that may drop rows assumed to keep every row)" if upper_bound else "")
    console.print(cost_line)
    if expanded and plan.expansions:
        for step, ids in plan.expansions:
            console.print(f"recipe step [bold]{escape(step)}[/bold] expanded to: {escape(', '.join(ids))}")
    for note in plan.notes:
        console.print(f"[dim]note: {escape(note)}[/dim]")


def _upper_bound(steps: list[str]) -> str:
    return _escape_markup(f"upper bound: {', '.join(steps)} assumed to keep every row")


def _requests_by_probe(est: dict[str, Any]) -> str:
    """An evaluate node's requests split by probe, like ' (accuracy 24, position 12)', when it has several."""
    per_probe: dict[str, int] = {}
    for part in est.get("probes") or []:
        per_probe[part["probe"]] = per_probe.get(part["probe"], 0) + (part.get("requests") or 0)
    if len(per_probe) < 2:
        return ""
    return " (" + ", ".join(f"{_escape_markup(name)} {count:,}" for name, count in per_probe.items()) + ")"


def _unknown_requests_reason(node: Any, est: dict[str, Any]) -> str:
    opaque = [part["probe"] for part in est.get("probes") or [] if part.get("estimable") is False]
    if opaque:
        return _escape_markup(f"unknown (probe {', '.join(dict.fromkeys(opaque))} cannot be estimated before it runs)")
    if "requests" not in est:
        return _escape_markup(f"unknown (op {node.op} gives no estimate)")
    return "unknown until upstream runs"


def _escape_markup(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _fmt_cost(stats: dict[str, Any]) -> str:
    cost = stats.get("cost", 0)
    return "unknown" if cost is None else f"${cost:.4f}"  # a model that cannot be priced is not free


def render_run_summary(result: Any, console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"run: {result.plan.name}")
    for col in ("node", "op", "status", "rows", "requests (cached)", "tokens in/out", "cost", "seconds"):
        # A long node name wraps onto more lines rather than being cut (logs are 80 columns wide).
        table.add_column(col, overflow="fold" if col == "node" else "ellipsis")
    for r in result.nodes:
        s = r.stats
        req = f"{s.get('requests', 0)} ({s.get('cached_requests', 0)})" if s.get("requests") else ""
        tok = f"{s.get('input_tokens', 0):,}/{s.get('output_tokens', 0):,}" if s.get("requests") else ""
        status = {"cached": "[dim]cached[/dim]", "ran": "[green]ran[/green]",
                  "incomplete": "[red]incomplete[/red]"}.get(r.status, r.status)
        table.add_row(r.id, r.op, status, _fmt_int(r.rows), req, tok, _fmt_cost(s) if s.get("requests") else "",
                      f"{r.seconds:.1f}")
    console.print(table)
    for r in result.nodes:
        if r.note:
            console.print(f"[yellow]{r.id}: {r.note}[/yellow]")
        for e in r.stats.get("errors", [])[:5]:
            console.print(f"[red]  {r.id}: {e}[/red]")
    for node_id, evaluation in (result.evaluations or {}).items():
        if evaluation and evaluation.get("summary"):
            console.print(f"\n[bold]{node_id}[/bold]")
            console.print(evaluation["summary"])
    artifacts = [(r.id, a) for r in result.nodes for a in r.stats.get("artifacts", [])]
    if artifacts:
        console.print("\n[bold]artifacts[/bold]")
        for node_id, a in artifacts:
            # Plain text, never cut: a path is copied from here.
            console.print(f"  {node_id} {a.get('kind', 'file')}: {a['path']}", markup=False, soft_wrap=True)
    if result.manifest_path:
        console.print(f"[dim]manifest: {result.manifest_path}[/dim]")
        report = result.manifest_path.parent / "report.html"
        if report.exists():
            console.print(f"[dim]report: {report}[/dim]")
