"""``specdsl inspect``: look at a node's output before (or after) anything trains on it.

* Ordinary nodes: a table of the first rows, long values cut short.
* Tokenized nodes (``input_ids`` + ``labels``, what a ``train`` step's ``.tokens`` node holds): each sample's
  rendered text with the characters that carry loss highlighted, its spans named (a masked initial answer
  struck through, the erased instruction shown apart), IN2 key segments marked inside the context, and the
  counts: tokens, trained tokens, the share with loss, and the totals over every row of the node.
* ``html=``: a self-contained page (inline CSS, a few lines of inline JS, no external asset) showing every
  selected sample token by token. Token boundaries come from the student's tokenizer (resolved the way the
  tokenize step resolved it); each token is ``<span class="tok trained|masked" data-label=... title=...>``
  and each example carries ``data-trained-count`` (the number of labels != -100). Without the tokenizer
  the page falls back to the character spans the masks were made from.

What is "trained" is always the ``labels`` column when token boundaries are known (the exact truth), and
the trained character spans otherwise (the intent; see :mod:`specdsl.designs.masking` for the boundary rule).

The package: :mod:`.load` (rows, totals and the tokenizer from the store), :mod:`.sample` (one sample's
characters, spans, tokens and key segments), :mod:`.terminal` and :mod:`.html_view` (the two renderings;
:func:`render_examples_html` is shared with :mod:`specdsl.views.report`); the command is here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from specdsl.errors import RunError, did_you_mean
from specdsl.ir.plan import Plan
from specdsl.views.html_page import esc, evaluation_html, page
from specdsl.views.inspect.html_view import inspect_html, render_examples_html, rows_table_html
from specdsl.views.inspect.load import Inspection, is_tokenized, read_node_rows, resolve_tokenizer, tokenized_totals
from specdsl.views.inspect.sample import prepare_sample
from specdsl.views.inspect.terminal import (STYLE_KEY, STYLE_MASKED_ANSWER, STYLE_TRAINED, legend_text, print_rows_table,
                                            render_sample_terminal)

__all__ = ["Inspection", "STYLE_KEY", "STYLE_MASKED_ANSWER", "STYLE_TRAINED", "inspect_node", "render_examples_html"]


def _spec_display(plan: Plan) -> str:
    try:
        return str(Path(plan.spec_file).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return plan.spec_file


def inspect_node(plan: Plan, node_id: str, *, rows: int | None = 3, html: str | Path | None = None,
                 store_dir: str | Path | None = None, console: Any = None, registry: Any = None) -> Inspection:
    """Show the first ``rows`` rows of ``node_id`` from the store (all rows when None); see the module doc."""
    from rich.console import Console
    from rich.markup import escape

    from specdsl.execute.runner import default_store_dir
    from specdsl.execute.store import Store

    if not plan.has(node_id):
        names = [n.id for n in plan.nodes]
        close = did_you_mean(node_id, names)
        hint = (close + " " if close and close.startswith("did") else "") + "nodes: " + ", ".join(names)
        raise RunError(f"no node '{node_id}' in plan '{plan.name}'", hint=hint)
    node = plan.node(node_id)
    root = Path(store_dir) if store_dir else default_store_dir(plan)
    run_hint = f"specdsl run {_spec_display(plan)} --until {node_id}" + (f" --store {store_dir}" if store_dir else "")
    if not (root / "nodes").is_dir():
        raise RunError(f"'{node_id}' is not in the store: there is no run store at {root}", node=node_id,
                       hint=f"compute it first: {run_hint}")
    store = Store(root)
    if not store.has(node.fingerprint):
        raise RunError(f"'{node_id}' is not in the store {root} (fingerprint {node.short}: never run, or the spec "
                       "changed since)", node=node_id, hint=f"compute it first: {run_hint}")
    if rows is not None and rows < 0:
        raise RunError("rows must be >= 0", hint="give --rows 0 or more")
    meta = store.meta(node.fingerprint)
    console = console or Console()
    shown = read_node_rows(store, node.fingerprint, rows)
    columns = list(meta.get("columns") or [])
    for r in shown:
        for c in r:
            if c not in columns:
                columns.append(c)
    total = int(meta.get("rows", len(shown)))
    result = Inspection(node=node.id, op=node.op, fingerprint=node.fingerprint, rows_total=total, rows=shown,
                        tokenized=is_tokenized(columns))
    plural = "" if total == 1 else "s"
    console.print(f"[bold]{escape(node.id)}[/bold] [magenta]{escape(node.op)}[/magenta]  {total:,} row{plural} · "
                  f"fingerprint {node.short}"
                  f" · showing {len(shown)}", highlight=False)

    if not result.tokenized:
        print_rows_table(console, shown, columns)
        evaluation = meta.get("evaluation")
        answer_tables: list[tuple[str, Path, list[dict[str, Any]], int]] = []
        if evaluation:
            console.print(evaluation.get("summary", ""), markup=False, highlight=False)
            for res in evaluation.get("results", []):
                if res.get("plot"):
                    console.print(f"plot: {store.node_dir(node.fingerprint) / res['plot']}", style="dim", markup=False)
            answer_tables = evaluation_rows(store.node_dir(node.fingerprint), evaluation, rows)
            for probe, path, probe_rows, count in answer_tables:
                console.print(f"\n{probe}: {count:,} answers, row by row ({path}) · showing {len(probe_rows)}",
                              markup=False, highlight=False)
                print_rows_table(console, probe_rows, list(ANSWER_COLUMNS), width=48)
        if html:
            body = (f"<h1>{esc(node.id)} <span class=\"muted\">({esc(node.op)})</span></h1>"
                    f"<div class=\"muted\">{total:,} rows · fingerprint <code>{esc(node.short)}</code></div>"
                    + rows_table_html(shown, columns))
            if evaluation:
                body += evaluation_html(node.id, evaluation, store.node_dir(node.fingerprint))
            for probe, path, probe_rows, count in answer_tables:
                body += (f"<h4>{esc(probe)}: {count:,} answers, row by row</h4><div class=\"muted\"><code>{esc(path)}"
                         "</code></div>" + rows_table_html(probe_rows, list(ANSWER_COLUMNS)))
            result.html_path = _write(Path(html), page(f"specdsl inspect {node.id}", body))
            console.print(f"html: {result.html_path}", style="dim", markup=False)
        return result

    totals = tokenized_totals(store, node.fingerprint)
    result.totals = totals
    tokenizer, why = resolve_tokenizer(plan, node, store, registry) if node.params.get("model") else (None, "no model")
    samples = [prepare_sample(row, tokenizer) for row in shown]
    result.token_view = tokenizer is not None and all(s.tokens is not None for s in samples)
    if why:
        result.notes.append(f"token boundaries unavailable: {why}")
    console.print(legend_text())
    for sample in samples:
        console.print(render_sample_terminal(sample))
    console.print(f"[bold]all {totals.rows:,} rows:[/bold] {totals.tokens:,} tokens, {totals.trained:,} with loss "
                  f"({totals.share:.1%}), {totals.truncated:,} truncated", highlight=False)
    for note in result.notes:
        console.print(f"note: {note}", style="yellow", markup=False)
    if html:
        result.html_path = _write(Path(html), inspect_html(plan, node, shown, totals, tokenizer, why))
        console.print(f"html: {result.html_path}", style="dim", markup=False)
    return result


# The columns of an evaluate node's per-row tables shown by inspect (see specdsl.probes.rows).
ANSWER_COLUMNS = ("condition", "model", "id", "prompt", "answer", "parsed", "gold", "verdict")


def evaluation_rows(node_dir: Path, evaluation: Any, limit: int | None) -> list[tuple[str, Path, list[dict], int]]:
    """(probe, file, first ``limit`` rows, row count) for each probe of an evaluate node that kept its
    answers row by row."""
    import pyarrow.parquet as pq

    out = []
    for res in evaluation.get("results", []):
        name = res.get("rows_file")
        if not name or not (node_dir / name).is_file():
            continue
        table = pq.read_table(node_dir / name)
        shown = table.slice(0, limit).to_pylist() if limit is not None else table.to_pylist()
        out.append((str(res.get("probe", "?")), node_dir / name, shown, table.num_rows))
    return out


def _write(path: Path, text: str) -> Path:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise RunError(f"cannot write {path}: {exc.strerror or exc}",
                       hint="write the page to a folder you can write to (--html PATH)") from None
    return path
