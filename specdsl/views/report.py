"""``report.html``: one self-contained page per run, written next to its ``run.json``.

It shows the plan as a graph (an inline SVG DAG in layers whose edges never pass behind a box), every node's status,
rows, requests, tokens, cost and duration, the evaluation tables and plots (PNG files of the evaluate
nodes embedded as data URIs), and the first examples of every tokenized node rendered token by token as
``specdsl inspect --html`` renders them. No external asset, no JS framework: the file can be mailed,
archived with the run, or opened offline.

    from specdsl.views.report import write_report
    write_report(result)                        # a RunResult: next to result.manifest_path
    write_report("store/run.json", "out.html")  # a manifest file (its store is found beside it)
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

from specdsl.views.dag import BOX_H, BOX_W, compute_layout, curve_path
from specdsl.views.html_page import esc, evaluation_html, format_cell, page, table_html
from specdsl.views.inspect.html_view import legend_html, render_examples_html, totals_html
from specdsl.views.inspect.load import is_tokenized, read_node_rows, resolve_tokenizer, tokenized_totals

EXAMPLES = 3
MAX_MASKED_RUN = 200  # report examples hide the middle of longer untrained stretches (IN2 contexts)
REPORT_NAME = "report.html"

STATUS_COLOURS = {  # fill, stroke
    "ran": ("#dcf5e1", "#2f8f46"), "cached": ("#e3ecfb", "#3b6fc4"), "incomplete": ("#fff1d6", "#c98a00"),
    "failed": ("#fbe0e0", "#c23b3b"), "skipped": ("#f0f0f0", "#888888"), "would-run": ("#f4f0fb", "#7a5cc2"),
    "in store": ("#eef3fb", "#8aa6d6"), "not computed": ("#f7f7f7", "#b5b5b5"),
}

REPORT_CSS = """
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:12px 0}
.card{border:1px solid #e0e0e0;border-radius:8px;padding:8px 12px;flex:1 1 0;min-width:96px;background:#fafafa}
.card .v{font-size:19px;font-weight:600} .card .k{font-size:12px;color:#666}
.graph{overflow-x:auto;border:1px solid #e3e3e3;border-radius:8px;padding:8px;background:#fdfdfd}
.graph svg text{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif}
.graph g.node:hover rect{stroke-width:2.5}
.status{display:inline-block;padding:0 8px;border-radius:10px;font-size:12px;border:1px solid}
img.plot{max-width:100%;border:1px solid #eee;border-radius:6px;margin:6px 0}
pre.summary{background:#f7f7f7;padding:8px;border-radius:6px;overflow-x:auto}
details{margin:8px 0} summary{cursor:pointer;color:#333}
"""


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


def _load(run: Any, store_dir: str | Path | None) -> tuple[dict[str, Any], Path | None, Path | None]:
    """(manifest, store root, run.json path) from a RunResult, a manifest mapping or a run.json path."""
    manifest_path = None
    if hasattr(run, "plan") and hasattr(run, "store") and hasattr(run, "nodes"):  # a RunResult
        manifest_path = getattr(run, "manifest_path", None)
        if manifest_path and Path(manifest_path).exists():
            manifest = json.loads(Path(manifest_path).read_text())
        else:  # a dry run writes no manifest: build one from the result
            from specdsl.execute.runner import _manifest

            manifest = _manifest(run.plan, run.store, run.nodes, time.time(), evaluations=run.evaluations)
        return manifest, Path(store_dir) if store_dir else run.store.root, manifest_path
    if isinstance(run, (str, Path)):
        manifest_path = Path(run)
        manifest = json.loads(manifest_path.read_text())
        if store_dir is None:  # <store>/run.json or <store>/runs/<id>/run.json
            parent = manifest_path.parent
            store_dir = parent if (parent / "nodes").is_dir() else parent.parent.parent
        return manifest, Path(store_dir), manifest_path
    if isinstance(run, Mapping):
        manifest = dict(run)
        if store_dir is None:
            try:
                from specdsl.execute.runner import default_store_dir
                from specdsl.ir.plan import Plan

                store_dir = default_store_dir(Plan.from_dict(manifest["plan"]))
            except Exception:  # noqa: BLE001
                store_dir = None
        return manifest, Path(store_dir) if store_dir else None, None
    raise TypeError(f"write_report takes a RunResult, a manifest mapping or a run.json path, not {type(run).__name__}")


def _plan_of(manifest: Mapping[str, Any]):
    from specdsl.ir.plan import Plan

    try:
        return Plan.from_dict(manifest["plan"])
    except Exception:  # noqa: BLE001 - a report of an older manifest still shows what it can
        return None


def _store(root: Path | None):
    if root is None or not (root / "nodes").is_dir():
        return None
    from specdsl.execute.store import Store

    return Store(root)


# --------------------------------------------------------------------------------------------------
# The graph
# --------------------------------------------------------------------------------------------------

def layout(nodes: Sequence[Mapping[str, Any]]) -> dict[str, tuple[int, int]]:
    """(layer, index in the layer) per node: layer = 1 + the deepest upstream node's layer; the order within
    a layer (dummy lanes of long edges included) from barycentre sweeps. See :mod:`specdsl.views.dag`."""
    return dict(compute_layout(nodes).order)


def graph_svg(nodes: Sequence[Mapping[str, Any]], status: Mapping[str, str], rows: Mapping[str, Any]) -> str:
    """The plan as an inline SVG: one ``<g class="node" data-node=...>`` per node, edges input -> consumer
    (dashed where a node is used as a model, e.g. a trained model evaluated downstream), laid out in layers
    so that no edge passes behind a box (:mod:`specdsl.views.dag`)."""
    geometry = compute_layout(nodes)
    if not geometry.boxes:
        return "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"10\" height=\"10\"></svg>"
    width, height = geometry.width, geometry.height

    def xy(i: str) -> tuple[int, int]:
        x, y, _, _ = geometry.boxes[i]
        return round(x), round(y)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="dag" width="{width}" height="{height}" '
           f'style="max-width:100%;height:auto" viewBox="0 0 {width} {height}" role="img" aria-label="plan graph">',
           '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
           'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#888"/></marker></defs>']
    for edge in geometry.edges:
        dash = ' stroke-dasharray="5 4"' if edge.is_model else ""
        out.append(f'<path class="edge" data-from="{esc(edge.src)}" data-to="{esc(edge.dst)}" d="{curve_path(edge)}" '
                   f'fill="none" stroke="#9a9a9a" stroke-width="1.4"{dash} marker-end="url(#arrow)"/>')
    for n in nodes:
        i = n["id"]
        x, y = xy(i)
        st = status.get(i, "not computed")
        fill, stroke = STATUS_COLOURS.get(st, ("#f5f5f5", "#999"))
        name = i if len(i) <= 21 else i[:20] + "…"
        r = rows.get(i)
        sub = f"{n['op']} · {st}" + (f" · {r:,} row{'' if r == 1 else 's'}" if isinstance(r, int) else "")
        if len(sub) > 31:
            sub = sub[:30] + "…"
        dashed = ' stroke-dasharray="4 3"' if st in ("not computed", "in store") else ""
        out.append(f'<g class="node" data-node="{esc(i)}" data-status="{esc(st)}">'
                   f'<a href="#node-{esc(i)}"><title>{esc(i)} ({esc(n["op"])}): {esc(st)}</title>'
                   f'<rect x="{x}" y="{y}" width="{BOX_W}" height="{BOX_H}" rx="8" fill="{fill}" stroke="{stroke}" '
                   f'stroke-width="1.5"{dashed}/>'
                   f'<text x="{x + 10}" y="{y + 22}" font-size="14" font-weight="600" fill="#1d1d1f">{esc(name)}</text>'
                   f'<text x="{x + 10}" y="{y + 41}" font-size="11.5" fill="#555">{esc(sub)}</text></a></g>')
    out.append("</svg>")
    return "".join(out)


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


def _when(ts: Any) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(ts)))
    except (TypeError, ValueError):
        return ""


def _card(value: str, key: str) -> str:
    return f'<div class="card"><div class="v">{esc(value)}</div><div class="k">{esc(key)}</div></div>'


def render_report(manifest: Mapping[str, Any], store: Any = None, *, examples: int = EXAMPLES,
                  registry: Any = None) -> str:
    """The report page for ``manifest`` (a run.json mapping); ``store`` supplies node data, plots and examples."""
    plan = _plan_of(manifest)
    plan_nodes = list((manifest.get("plan") or {}).get("nodes") or [])
    run_nodes = {n["id"]: n for n in manifest.get("nodes") or []}
    if not plan_nodes:  # a manifest without its plan: the run's nodes alone, unconnected
        plan_nodes = [{"id": n["id"], "op": n.get("op", "?"), "inputs": [], "models": []} for n in run_nodes.values()]
    status: dict[str, str] = {}
    rows: dict[str, Any] = {}
    metas: dict[str, dict[str, Any]] = {}
    for n in plan_nodes:
        i, fp = n["id"], n.get("fingerprint", "")
        has = bool(store is not None and fp and store.has(fp))
        if has:
            try:
                metas[i] = store.meta(fp)
            except (OSError, ValueError):
                has = False
        if i in run_nodes:
            status[i] = run_nodes[i].get("status", "?")
            rows[i] = run_nodes[i].get("rows")
        else:
            status[i] = "in store" if has else "not computed"
            rows[i] = metas.get(i, {}).get("rows")

    ok = all(status[i] in ("cached", "ran", "skipped", "would-run") for i in run_nodes)
    spec = manifest.get("spec") or {}
    totals = manifest.get("totals") or {}
    name = spec.get("name") or (plan.name if plan else "run")
    badge_colour = "#2f8f46" if ok else "#c23b3b"
    parts = [f'<h1>{esc(name)} <span class="badge" style="background:{badge_colour}">'
             f'{"ok" if ok else "incomplete"}</span></h1>',
             f'<div class="muted">spec <code>{esc(spec.get("file", ""))}</code> · sha256 <code>'
             f'{esc(str(spec.get("sha256", ""))[:12])}</code> · started {esc(_when(manifest.get("started_at")))} · '
             f'seed {esc(manifest.get("seed"))}'
             + (f' · <code>--until {esc(manifest["until"])}</code>' if manifest.get("until") else "")
             + (f' · <code>--only {esc(manifest["only"])}</code>' if manifest.get("only") else "") + "</div>"]
    parts.append('<div class="cards">' + "".join([
        _card(f"{len(run_nodes)}/{len(plan_nodes)}", "nodes in this run"),
        _card(f"{sum(1 for s in status.values() if s == 'ran')}", "ran"),
        _card(f"{sum(1 for s in status.values() if s == 'cached')}", "cached"),
        _card(f"{totals.get('requests', 0):,} ({totals.get('cached_requests', 0):,})", "requests (cached)"),
        _card(f"{totals.get('failed_requests', 0):,}", "failed requests"),
        _card(f"{totals.get('input_tokens', 0):,} / {totals.get('output_tokens', 0):,}", "tokens in / out"),
        _card("unknown" if totals.get("requests") and totals.get("cost", 0) is None
              else f"${float(totals.get('cost') or 0):.4f}", "cost"),
        _card(f"{float(manifest.get('seconds') or 0):.1f} s", "duration")]) + "</div>")

    artifacts = list(manifest.get("artifacts") or [])
    if artifacts:
        parts.append("<h2>Artifacts</h2>")
        parts.append(artifacts_html(artifacts))

    # The graph.
    legend = " ".join(f'<span class="status" style="background:{f};border-color:{s}">{esc(k)}</span>'
                      for k, (f, s) in STATUS_COLOURS.items() if k in set(status.values()))
    parts.append(f'<h2>Plan</h2><div class="muted">click a node for its details · {legend} · '
                 'dashed edge: used as a model</div>')
    parts.append(f'<div class="graph">{graph_svg(plan_nodes, status, rows)}</div>')

    # Node table.
    tok_totals: dict[str, Any] = {}
    tokenized_ids = []
    for n in plan_nodes:
        i = n["id"]
        cols = metas.get(i, {}).get("columns") or n.get("columns") or []
        if i in metas and is_tokenized(cols):
            tokenized_ids.append(i)
            try:
                tok_totals[i] = tokenized_totals(store, n["fingerprint"])
            except Exception:  # noqa: BLE001
                pass
    parts.append("<h2>Nodes</h2>")
    head = ("<tr><th>node</th><th>op</th><th>status</th><th class=num>rows</th><th>requests (cached, failed)</th>"
            "<th>tokens in / out</th><th>trained tokens</th><th class=num>cost</th><th class=num>seconds</th>"
            "<th>fingerprint</th><th>note</th></tr>")
    body = []
    for n in plan_nodes:
        i = n["id"]
        r = run_nodes.get(i, {})
        st = status[i]
        fill, stroke = STATUS_COLOURS.get(st, ("#f5f5f5", "#999"))
        req = f"{r.get('requests', 0):,} ({r.get('cached_requests', 0):,}, {r.get('failed', 0):,})" \
            if r.get("requests") else ""
        tok = f"{r.get('input_tokens', 0):,} / {r.get('output_tokens', 0):,}" if r.get("requests") else ""
        trained = ""
        if i in tok_totals:
            t = tok_totals[i]
            trained = f"{t.trained:,} of {t.tokens:,} ({t.share:.1%})"
            tok = tok or f"{t.tokens:,} tokenized"
        train_meta = metas.get(i, {}).get("metrics") if n.get("op") == "train" else None
        note = r.get("note") or ""
        if train_meta:
            note = (note + " " if note else "") + ", ".join(f"{k}: {format_cell(v)}" for k, v in train_meta.items()
                                                             if isinstance(v, (int, float)))[:300]
        link = f' · <a href="#examples-{esc(i)}">examples</a>' if i in tokenized_ids and examples else ""
        link += f' · <a href="#eval-{esc(i)}">results</a>' if n.get("kind") == "evaluate" and i in metas else ""
        body.append(
            f'<tr id="node-{esc(i)}"><td><b>{esc(i)}</b>{link}</td><td>{esc(n.get("op"))}</td>'
            f'<td><span class="status" style="background:{fill};border-color:{stroke}">{esc(st)}</span></td>'
            f'<td class=num>{esc(format_cell(rows.get(i)))}</td><td>{esc(req)}</td><td>{esc(tok)}</td><td>{esc(trained)}</td>'
            f'<td class=num>{"$%.4f" % r["cost"] if r.get("cost") else ("unknown" if r.get("requests") and "cost" in r and r["cost"] is None else "")}</td>'
            f'<td class=num>{esc(format_cell(r.get("seconds")) if i in run_nodes else "")}</td>'
            f'<td><code>{esc(str(n.get("fingerprint", ""))[:12])}</code></td><td>{esc(note)}</td></tr>')
        for e in (r.get("errors") or [])[:5]:
            body.append(f'<tr><td></td><td colspan="10" class="note">{esc(e)}</td></tr>')
    parts.append(f'<table class="grid">{head}{"".join(body)}</table>')

    # Evaluations: from this run's manifest, else from the store (an evaluate node computed earlier).
    evaluations = dict(manifest.get("evaluations") or {})
    for n in plan_nodes:
        if n.get("kind") == "evaluate" and n["id"] not in evaluations and metas.get(n["id"], {}).get("evaluation"):
            evaluations[n["id"]] = metas[n["id"]]["evaluation"]
    if evaluations:
        parts.append("<h2>Evaluation</h2>")
        fps = {n["id"]: n.get("fingerprint") for n in plan_nodes}
        for node_id, evaluation in evaluations.items():
            if not evaluation:
                continue
            fp = fps.get(node_id)
            node_dir = store.node_dir(fp) if store is not None and fp and store.has(fp) else None
            parts.append(evaluation_html(node_id, evaluation, node_dir))

    # Examples of tokenized nodes, rendered as `specdsl inspect --html` does.
    if tokenized_ids and examples:
        parts.append("<h2>Training examples</h2>")
        parts.append(f'<div class="muted">the first {examples} rows of each tokenized node; all rows: '
                     f'<code>specdsl inspect SPEC --node NODE --html FILE</code></div>')
        parts.append('<label><input type="checkbox" id="tokb" checked> token boundaries</label>' + legend_html())
        by_id = {n.id: n for n in plan.nodes} if plan else {}
        tokenizers: dict[str, Any] = {}
        for i in tokenized_ids:
            fp = next(n["fingerprint"] for n in plan_nodes if n["id"] == i)
            tokenizer, why = (None, "plan unavailable")
            if i in by_id:
                tokenizer, why = resolve_tokenizer(plan, by_id[i], store, registry, cache=tokenizers)
            parts.append(f'<h3 id="examples-{esc(i)}">{esc(i)}</h3>')
            if i in tok_totals:
                parts.append(totals_html(tok_totals[i]))
            if tokenizer is None:
                parts.append(f'<div class="note">token boundaries unavailable ({esc(why)}): character spans shown</div>')
            try:
                sample_rows = read_node_rows(store, fp, examples)
                parts.append(render_examples_html(sample_rows, tokenizer, anchor_prefix=f"ex-{i}",
                                                  max_masked_run=MAX_MASKED_RUN))
            except Exception as exc:  # noqa: BLE001
                parts.append(f'<div class="note">cannot show examples: {esc(exc)}</div>')

    # Details.
    versions = manifest.get("versions") or {}
    parts.append("<h2>Details</h2>")
    parts.append("<details><summary>package versions</summary>" +
                 table_html([{"package": k, "version": v} for k, v in versions.items()]) + "</details>")
    if manifest.get("argv"):
        parts.append(f"<details><summary>command</summary><code>{esc(' '.join(map(str, manifest['argv'])))}</code>"
                     "</details>")
    notes = (manifest.get("plan") or {}).get("notes") or []
    if notes:
        parts.append("<details><summary>plan notes</summary><ul>" + "".join(f"<li>{esc(x)}</li>" for x in notes)
                     + "</ul></details>")
    body_html = "\n".join(parts)
    return page(f"specdsl report: {name}", body_html).replace("</style>", REPORT_CSS + "</style>", 1)


ARTIFACT_KINDS = {"export": "exported dataset", "model": "trained model (store)",
                  "model output": "trained model (output folder)", "evaluation rows": "per-row evaluation table",
                  "plot": "plot"}


def artifacts_html(artifacts: Sequence[Mapping[str, Any]]) -> str:
    """Every file or folder a run made that people take elsewhere: node, what it is, its path (a link)."""
    rows = []
    for a in artifacts:
        path = str(a.get("path", ""))
        href = Path(path).as_uri() if Path(path).is_absolute() else path
        rows.append(f'<tr><td><a href="#node-{esc(a.get("node", ""))}">{esc(a.get("node", ""))}</a></td>'
                    f'<td>{esc(ARTIFACT_KINDS.get(a.get("kind"), a.get("kind", "")))}</td>'
                    f'<td><a href="{esc(href)}"><code>{esc(path)}</code></a></td></tr>')
    return ('<table class="grid"><tr><th>node</th><th>artifact</th><th>path</th></tr>' + "".join(rows)
            + "</table>")


def write_report(run: Any, path: str | Path | None = None, *, store_dir: str | Path | None = None,
                 examples: int = EXAMPLES, registry: Any = None) -> Path:
    """Write ``report.html`` for a run: ``run`` is a RunResult, a manifest mapping or a run.json path.

    ``path`` defaults to ``report.html`` beside the run's manifest. Returns the path written.
    """
    manifest, root, manifest_path = _load(run, store_dir)
    if path is None:
        if manifest_path is None:
            raise ValueError("no manifest file to write the report beside: pass a path")
        path = Path(manifest_path).parent / REPORT_NAME
    text = render_report(manifest, _store(root), examples=examples, registry=registry)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def write_run_reports(manifest: Mapping[str, Any], store_root: Path, run_dir: Path) -> Path | None:
    """What every API run calls once its manifest is written (the runner's ``on_manifest``; see
    :func:`specdsl.api.run_plan`): ``report.html`` in the run's folder and, like
    ``run.json``, a copy for the latest run at the top of the store. A report never fails a run."""
    try:
        path = write_report(manifest, Path(run_dir) / REPORT_NAME, store_dir=store_root)
        latest = Path(store_root) / REPORT_NAME
        tmp = latest.with_name(REPORT_NAME + ".tmp")
        tmp.write_bytes(path.read_bytes())
        tmp.replace(latest)
        return path
    except Exception as exc:  # noqa: BLE001
        warnings.warn(f"could not write the run report: {exc!r}", RuntimeWarning, stacklevel=2)
        return None
