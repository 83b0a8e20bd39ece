"""Terminal views of plans and runs (rich)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .plan import Plan


def _fmt_int(n: Any) -> str:
    return f"{n:,}" if isinstance(n, int) else ("-" if n is None else str(n))


def render_plan(plan: Plan, *, store_dir: Path | None = None, expanded: bool = False, console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    from .execute.runner import default_store_dir
    from .execute.store import Store

    console = console or Console()
    root = Path(store_dir) if store_dir else default_store_dir(plan)
    store = Store(root) if root.exists() else None
    table = Table(title=f"plan: {plan.name}", show_lines=False)
    for col in ("node", "op", "inputs -> columns", "backend", "requests", "tokens in/out", "cost", "cached", "fp"):
        table.add_column(col, overflow="fold")
    total_cost, unknown_cost = 0.0, False
    for n in plan.nodes:
        est = n.estimate or {}
        ins = ", ".join(src for _, src in n.inputs) or "(file)"
        cols = ", ".join(n.columns[:8]) + (", ..." if len(n.columns) > 8 else "")
        cost = est.get("cost")
        if n.kind == "generate":
            if cost is None:
                unknown_cost = True
            else:
                total_cost += cost
        cached = "yes" if store is not None and store.has(n.fingerprint) else "no"
        tokens = ""
        if est.get("requests"):
            tokens = f"{_fmt_int(est.get('input_tokens'))}/{_fmt_int(est.get('output_tokens'))}"
        elif est.get("train_tokens"):
            tokens = f"{_fmt_int(est['train_tokens'])} train"
        table.add_row(n.id, n.op, f"{ins} -> {cols}", n.backend or "", _fmt_int(est.get("requests")) if est.get("requests") else "",
                      tokens, "" if n.kind != "generate" else ("?" if cost is None else f"${cost:.4f}"),
                      cached, n.short)
    console.print(table)
    cost_line = f"estimated cost: ${total_cost:.4f}" + (" + unpriced models" if unknown_cost else "")
    console.print(cost_line)
    if expanded and plan.expansions:
        for step, ids in plan.expansions:
            console.print(f"recipe step [bold]{step}[/bold] expanded to: {', '.join(ids)}")
    for note in plan.notes:
        console.print(f"[dim]note: {note}[/dim]")


def render_run_summary(result: Any, console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"run: {result.plan.name}")
    for col in ("node", "op", "status", "rows", "requests (cached)", "tokens in/out", "cost", "seconds"):
        table.add_column(col)
    for r in result.nodes:
        s = r.stats
        req = f"{s.get('requests', 0)} ({s.get('cached_requests', 0)})" if s.get("requests") else ""
        tok = f"{s.get('input_tokens', 0):,}/{s.get('output_tokens', 0):,}" if s.get("requests") else ""
        status = {"cached": "[dim]cached[/dim]", "ran": "[green]ran[/green]",
                  "incomplete": "[red]incomplete[/red]"}.get(r.status, r.status)
        table.add_row(r.id, r.op, status, _fmt_int(r.rows), req, tok, f"${s.get('cost', 0):.4f}" if s.get("requests") else "",
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
    if result.manifest_path:
        console.print(f"[dim]manifest: {result.manifest_path}[/dim]")
