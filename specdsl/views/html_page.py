"""The HTML both pages are made of (``specdsl inspect --html`` and ``report.html``): the stylesheet, escaping,
the page shell, tables of values, and an evaluate node's results (tables, PNG plots as data URIs).

Self-contained by design: inline CSS and a few lines of inline JS, no external asset.
"""

from __future__ import annotations

import base64
import html as _html
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

CSS = """
:root{--trained:#b7ebc0;--trained-b:#3c9a4e;--masked:#f1f1f1;--answer:#c23b3b;--markup:#8a8a8a;--key:#d97706;}
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d1d1f;background:#fff;}
h1{font-size:22px;margin:0 0 6px} h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:15px;margin:0 0 6px}
.muted{color:#666} code{background:#f4f4f4;padding:0 3px;border-radius:3px}
table.grid{border-collapse:collapse;margin:6px 0 12px} table.grid th,table.grid td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
table.grid th{background:#f6f6f6} td.num{text-align:right;font-variant-numeric:tabular-nums}
.legend{display:flex;flex-wrap:wrap;gap:10px 18px;margin:8px 0 14px;padding:8px 10px;border:1px solid #e3e3e3;border-radius:6px;background:#fafafa}
.legend span.sw{display:inline-block;padding:0 6px;margin-right:4px;border-radius:3px}
.example{border:1px solid #d8d8d8;border-radius:8px;padding:10px 12px;margin:14px 0;background:#fff}
.example .counts{font-size:13px;color:#444;margin-bottom:6px}
.example .counts b{color:#111}
.sample{font:12.5px/1.6 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;white-space:pre-wrap;word-break:break-word;
  background:#fcfcfc;border:1px solid #eee;border-radius:6px;padding:8px;margin:6px 0;max-height:640px;overflow:auto}
.tok,.seg{border-radius:2px}
.tok{box-shadow:inset -1px 0 0 rgba(0,0,0,.14)}
body.plain .tok{box-shadow:none}
.tok.trained,.seg.trained,.sw.trained{background:var(--trained);color:#0b3d17;box-shadow:inset -1px 0 0 var(--trained-b)}
.tok.masked,.seg.masked,.sw.masked{color:#6b6b6b}
.tok.masked[data-label=markup],.seg.masked[data-label=markup],.sw.markup{color:var(--markup);font-style:italic}
.tok.masked.answer,.seg.masked.answer,.sw.answer{color:var(--answer);text-decoration:line-through;background:#fdeeee}
.key{outline:2px solid var(--key);outline-offset:1px;background:#fff4dc;border-radius:2px}
.sw.key{outline:2px solid var(--key)}
.nl{color:#bbb}
.erased{margin:4px 0;padding:4px 8px;border-left:3px solid #bbb;background:#f7f7f7;color:#888}
.erased s{color:#999} .leak{color:#b00;font-weight:bold}
.note{color:#8a5a00}
.trunc{color:#aaa;border-top:1px dashed #ccc}
.elided{display:inline-block;margin:2px 0;padding:0 8px;border:1px dashed #bbb;border-radius:10px;color:#777;background:#f3f3f3;font-style:italic}
.spans{font-size:12.5px}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;color:#fff;background:#777}
"""

JS = """
document.addEventListener('change',function(e){if(e.target&&e.target.id==='tokb'){document.body.classList.toggle('plain',!e.target.checked);}});
"""


def esc(value: Any) -> str:
    return _html.escape("" if value is None else str(value), quote=True)


def page(title: str, body: str) -> str:
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\"><title>{esc(title)}</title>"
            f"<style>{CSS}</style></head><body>\n{body}\n<script>{JS}</script></body></html>\n")


def format_cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:  # NaN
            return "–"
        return f"{v:,.1f}" if abs(v) >= 1 else f"{v:.3f}"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, (list, dict)):
        return json.dumps(v, ensure_ascii=False, default=str)
    return str(v)


def table_html(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return '<div class="muted">(no rows)</div>'
    cols = list(columns or dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{esc(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(
        f'<td{" class=num" if isinstance(r.get(c), (int, float)) and not isinstance(r.get(c), bool) else ""}>'
        f"{esc(format_cell(r.get(c)))}</td>" for c in cols) + "</tr>" for r in rows)
    return f'<table class="grid"><tr>{head}</tr>{body}</table>'


def data_uri_png(path: Path) -> str | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def evaluation_html(node_id: str, evaluation: Mapping[str, Any], node_dir: Path | None) -> str:
    out = [f'<h3 id="eval-{esc(node_id)}">{esc(node_id)}</h3>']
    for res in evaluation.get("results") or []:
        out.append(f"<h4>probe: {esc(res.get('probe', '?'))}</h4>")
        out.append(table_html(res.get("table") or []))
        if res.get("claims"):  # the comparisons the spec claims, judged: a row per variant, a sentence each
            from specdsl.probes.claims import claims_table

            out.append("<h4>claims (95% paired-bootstrap intervals, paired test on the same items)</h4>")
            out.append(table_html(claims_table(res["claims"])))
            out.append("<ul>" + "".join(f"<li>{esc(c.get('conclusion', ''))}</li>" for c in res["claims"]) + "</ul>")
        rows_file = res.get("rows_file")
        if rows_file:
            where = node_dir / rows_file if node_dir else Path(rows_file)
            href = where.as_uri() if where.is_absolute() else str(where)
            out.append(f'<div class="muted">every answer, row by row (condition, model, prompt, answer, parsed '
                       f'answer, verdict): <a class="rows" href="{esc(href)}"><code>{esc(where)}</code></a> · '
                       f'<code>specdsl inspect SPEC --node {esc(node_id)} --rows N</code></div>')
        plot = res.get("plot")
        if plot:
            uri = data_uri_png(node_dir / plot) if node_dir else None
            if uri:
                out.append(f'<img class="plot" alt="{esc(res.get("probe"))} plot of {esc(node_id)}" src="{uri}">')
            else:
                out.append(f'<div class="note">plot {esc(plot)} not found in the store</div>')
    if not evaluation.get("results") and evaluation.get("summary"):
        out.append(f'<pre class="summary">{esc(evaluation["summary"])}</pre>')
    return "\n".join(out)
