"""The HTML view of tokenized samples: every token a ``<span class="tok trained|masked" data-label=...>``,
each example with ``data-trained-count`` (labels != -100), the character spans when no tokenizer is at
hand. :func:`render_examples_html` is shared by the inspect page and ``report.html``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from specdsl.ir.plan import Plan, PlanNode
from specdsl.views.html_page import esc, page
from specdsl.views.inspect.load import Totals
from specdsl.views.inspect.sample import ANSWER_LABELS, MARKUP, Sample, Token, char_runs, prepare_sample
from specdsl.views.inspect.terminal import short_text


def _show(text: str) -> str:
    """Escape text for the sample view; newlines get a faint return mark so whitespace tokens stay visible."""
    return esc(text).replace("\n", '<span class="nl">↵</span>\n')


def legend_html() -> str:
    return ('<div class="legend">'
            '<span><span class="sw trained">trained</span>token with loss (label != -100)</span>'
            '<span><span class="sw masked">prompt</span>no loss (system, user, prompt)</span>'
            '<span><span class="sw answer">answer</span>masked answer (e.g. a wrong initial answer)</span>'
            '<span><span class="sw markup">&lt;|markup|&gt;</span>chat-template text outside any span</span>'
            '<span><span class="sw key">key</span>IN2 key segment inside the context</span>'
            '<span><span class="sw" style="background:#f7f7f7;color:#888"><s>erased</s></span>'
            'erased instruction (not in the training text)</span>'
            '<span class="muted">hover a token for its id and label</span></div>')


def _cls(kind: str, trained: bool, label: str) -> str:
    if trained:
        return f"{kind} trained"
    return f"{kind} masked answer" if label in ANSWER_LABELS else f"{kind} masked"


def _elided(sample: Sample, max_masked_run: int | None) -> dict[int, int]:
    """Token index -> last index of a stretch hidden from view: the middle of every run of more than
    ``max_masked_run`` untrained tokens outside the key segments (long IN2 contexts). Trained tokens and key
    segments are always shown."""
    if not max_masked_run or sample.tokens is None:
        return {}
    hidden: dict[int, int] = {}
    keep = max(1, max_masked_run // 2)

    def in_key(tok: Token) -> bool:
        return any(k["start"] <= tok.start < k["end"] for k in sample.keys)

    i, tokens = 0, sample.tokens
    while i < len(tokens):
        if tokens[i].trained or in_key(tokens[i]):
            i += 1
            continue
        j = i
        while j < len(tokens) and not tokens[j].trained and not in_key(tokens[j]):
            j += 1
        if j - i > max_masked_run:
            hidden[i + keep] = j - keep - 1
        i = j
    return hidden


def _sample_body_html(sample: Sample, max_masked_run: int | None = None) -> str:
    out: list[str] = []
    hidden = _elided(sample, max_masked_run)
    keys = sample.keys
    text = sample.text

    def key_at(pos: int) -> int | None:
        for k, kr in enumerate(keys):
            if kr["start"] <= pos < kr["end"]:
                return k
        return None

    def open_key(k: int) -> str:
        kr = keys[k]
        depth = kr.get("depth")
        title = f"key segment {kr['key']} · segment #{kr['segment_index']}" + \
            (f" · depth {depth:.2f}" if isinstance(depth, (int, float)) else "")
        return f'<span class="key" data-key="{esc(kr["key"])}" title="{esc(title)}">'

    if sample.tokens is not None:
        cursor, current_key = 0, None
        skip_to = -1
        for i, tok in enumerate(sample.tokens):
            if i <= skip_to:
                continue
            if i in hidden:  # never inside a key segment: current_key is None here
                last = hidden[i]
                skip_to = last
                end = max(cursor, sample.tokens[last].end)
                out.append(f'<span class="elided" data-elided="{last - i + 1}" title="{esc(text[cursor:end][:200])}…">'
                           f' … {last - i + 1:,} tokens without loss not shown (specdsl inspect --html shows all) … '
                           '</span>')
                cursor = end
                continue
            start = max(tok.start, cursor)
            k = key_at(tok.start) if tok.end > tok.start else current_key
            if k != current_key:
                if current_key is not None:
                    out.append("</span>")
                if start > cursor:  # text no token covers
                    out.append(_show(text[cursor:start]))
                    cursor = start
                if k is not None:
                    out.append(open_key(k))
                current_key = k
            elif start > cursor:
                out.append(_show(text[cursor:start]))
            piece = text[start:tok.end] if tok.end > start else ""
            cursor = max(cursor, tok.end)
            out.append(f'<span class="{_cls("tok", tok.trained, tok.label)}" data-label="{esc(tok.label)}" '
                       f'data-i="{i}" title="#{i} id {tok.id} · {esc(tok.label)}">{_show(piece)}</span>')
        if current_key is not None:
            out.append("</span>")
        if cursor < len(text):
            out.append(f'<span class="trunc" title="past max_length: not in the sample">{_show(text[cursor:])}</span>')
        return "".join(out)
    for s, e, label, trained, key in char_runs(sample):
        seg = f'<span class="{_cls("seg", trained, label)}" data-label="{esc(label)}">{_show(text[s:e])}</span>'
        out.append(open_key(key) + seg + "</span>" if key is not None else seg)
    return "".join(out)


def _label_token_counts(sample: Sample) -> dict[tuple[str, bool], int]:
    counts: dict[tuple[str, bool], int] = {}
    for tok in sample.tokens or []:
        counts[(tok.label, tok.trained)] = counts.get((tok.label, tok.trained), 0) + 1
    return counts


def render_sample_html(sample: Sample, *, anchor: str = "", max_masked_run: int | None = None) -> str:
    row = sample.row
    share = sample.trained_count / sample.token_count if sample.token_count else 0.0
    view = "tokens" if sample.tokens is not None else "spans"
    h = [f'<section class="example" id="{esc(anchor)}" data-id="{esc(sample.id)}" '
         f'data-trained-count="{sample.trained_count}" data-token-count="{sample.token_count}" data-view="{view}">',
         f'<h3>id <code>{esc(sample.id)}</code></h3>',
         f'<div class="counts">tokens <b>{sample.token_count:,}</b> · trained <b>{sample.trained_count:,}</b> · '
         f'{share:.1%} with loss' + (' · <span class="leak">truncated</span>' if row.get("truncated") else "") + "</div>"]
    erased = row.get("erased_system")
    if erased:
        leak = ' <span class="leak">LEAK: the erased instruction appears in the training text</span>' \
            if str(erased) in sample.text else ' <span class="muted">(not in the training text)</span>'
        h.append(f'<div class="erased">erased: <s>{esc(erased)}</s>{leak}</div>')
    h.append(f'<div class="sample">{_sample_body_html(sample, max_masked_run)}</div>')
    # Spans and what they produced.
    tcounts = _label_token_counts(sample)
    lines = ['<table class="grid spans"><tr><th>span label</th><th>loss</th><th>chars</th>'
             + ("<th>tokens</th>" if sample.tokens is not None else "") + "</tr>"]
    for label, t, chars in sample.labels_present():
        sw = "trained" if t else ("answer" if label in ANSWER_LABELS else "masked")
        lines.append(f'<tr><td><span class="sw {sw}">{esc(label)}</span></td><td>{"yes" if t else "no"}</td>'
                     f'<td class="num">{chars:,}</td>'
                     + (f'<td class="num">{tcounts.get((label, t), 0):,}</td>' if sample.tokens is not None else "")
                     + "</tr>")
    if sample.tokens is not None and any(lbl == MARKUP for lbl, _ in tcounts):
        lines.append(f'<tr><td><span class="sw markup">{MARKUP}</span></td><td>'
                     f'{"yes" if tcounts.get((MARKUP, True)) else "no"}</td><td class="num"></td><td class="num">'
                     f'{tcounts.get((MARKUP, False), 0) + tcounts.get((MARKUP, True), 0):,}</td></tr>')
    lines.append("</table>")
    h.append("".join(lines))
    for k in sample.keys:
        depth = k.get("depth")
        h.append(f'<div class="muted">key segment {esc(k["key"])}: segment #{esc(k["segment_index"])} of the '
                 f'context, context tokens {esc(k["token_start"])}–{esc(k["token_end"])}'
                 + (f', depth {depth:.2f}' if isinstance(depth, (int, float)) else "") + "</div>")
    for note in sample.notes:
        h.append(f'<div class="note">note: {esc(note)}</div>')
    h.append("</section>")
    return "\n".join(h)


def render_examples_html(rows: Sequence[Mapping[str, Any]], tokenizer: Any = None, *, anchor_prefix: str = "ex",
                         max_masked_run: int | None = None) -> str:
    """The examples of a tokenized node as HTML sections (shared by the inspect page and the report).
    ``max_masked_run``: hide the middle of longer runs of untrained tokens (the report; None: show all)."""
    return "\n".join(render_sample_html(prepare_sample(row, tokenizer), anchor=f"{anchor_prefix}-{i}",
                                         max_masked_run=max_masked_run)
                     for i, row in enumerate(rows))


def totals_html(totals: Totals) -> str:
    return (f'<table class="grid"><tr><th>rows</th><th>tokens</th><th>trained tokens</th><th>with loss</th>'
            f'<th>truncated rows</th></tr><tr><td class="num">{totals.rows:,}</td><td class="num">{totals.tokens:,}</td>'
            f'<td class="num">{totals.trained:,}</td><td class="num">{totals.share:.1%}</td>'
            f'<td class="num">{totals.truncated:,}</td></tr></table>')


def inspect_html(plan: Plan, node: PlanNode, rows: Sequence[Mapping[str, Any]], totals: Totals | None,
                 tokenizer: Any, tokenizer_note: str | None) -> str:
    spec = Path(plan.spec_file).name
    head = [f"<h1>{esc(node.id)} <span class=\"muted\">({esc(node.op)})</span></h1>",
            f"<div class=\"muted\">spec <code>{esc(spec)}</code> · plan <b>{esc(plan.name)}</b> · fingerprint "
            f"<code>{esc(node.short)}</code> · showing {len(rows)} example(s)</div>"]
    if totals is not None:
        head.append("<h2>All rows of the node</h2>" + totals_html(totals))
    head.append('<label><input type="checkbox" id="tokb" checked> token boundaries</label>')
    head.append(legend_html())
    if tokenizer is None:
        head.append(f'<div class="note">token boundaries unavailable ({esc(tokenizer_note)}): showing the character '
                    'spans the masks were made from; counts come from the labels.</div>')
    return page(f"specdsl inspect {node.id}", "\n".join(head) + "\n"
                + render_examples_html(rows, tokenizer, anchor_prefix=f"ex-{node.id}"))


def rows_table_html(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], width: int = 200) -> str:
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{esc(short_text(r.get(c), width)) if r.get(c) is not None else ''}</td>"
                                    for c in columns) + "</tr>" for r in rows)
    return f'<table class="grid"><tr>{head}</tr>{body}</table>'
