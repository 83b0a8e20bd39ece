"""The terminal view of ``specdsl inspect`` (rich): a tokenized sample styled by what carries loss, and
a plain table of rows for every other node."""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from specdsl.errors import printable
from specdsl.views.inspect.sample import ANSWER_LABELS, MARKUP, Sample, char_runs

# Untrained runs longer than this are shortened in the terminal (never key segments, never trained text).
TERMINAL_MAX_RUN = 600

STYLE_TRAINED = "bold black on dark_sea_green2"
STYLE_MASKED_ANSWER = "strike red"
STYLE_PROMPT = "grey62"
STYLE_MARKUP = "grey42 italic"
STYLE_KEY = "underline bold dark_orange"
STYLE_ERASED = "dim strike"


def _terminal_style(label: str, trained: bool, key: bool) -> str:
    if trained:
        style = STYLE_TRAINED
    elif label in ANSWER_LABELS:
        style = STYLE_MASKED_ANSWER
    elif label == MARKUP:
        style = STYLE_MARKUP
    else:
        style = STYLE_PROMPT
    return f"{style} {STYLE_KEY}" if key else style


def legend_text():
    from rich.text import Text

    legend = Text("legend: ")
    for name, style in (("trained (loss)", STYLE_TRAINED), ("masked answer", STYLE_MASKED_ANSWER),
                        ("prompt (no loss)", STYLE_PROMPT), ("template markup", STYLE_MARKUP),
                        ("IN2 key segment", STYLE_KEY), ("erased instruction", STYLE_ERASED)):
        legend.append(name, style=style)
        legend.append("  ")
    return legend


def render_sample_terminal(sample: Sample, *, max_run: int = TERMINAL_MAX_RUN):
    """A rich renderable: the text styled per character run, then spans and counts."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.text import Text

    body = Text()
    keep = max(40, max_run // 3)
    pieces: list[list[str]] = []  # [text, style], neighbours of one style merged (label changes are not shown)
    for s, e, label, trained, key in char_runs(sample):
        style = _terminal_style(label, trained, key is not None)
        if pieces and pieces[-1][1] == style:
            pieces[-1][0] += printable(sample.text[s:e])  # row text never drives the terminal
        else:
            pieces.append([printable(sample.text[s:e]), style])
    for chunk, style in pieces:
        if style in (STYLE_PROMPT, STYLE_MARKUP) and len(chunk) > max_run:
            body.append(chunk[:keep], style=style)
            body.append(f" … [{len(chunk) - 2 * keep:,} characters not shown] … ", style="reverse dim")
            body.append(chunk[-keep:], style=style)
        else:
            body.append(chunk, style=style)
    parts: list[Any] = []
    erased = sample.row.get("erased_system")
    if erased:
        line = Text("erased: ", style="dim")
        line.append(printable(str(erased)), style=STYLE_ERASED)
        if str(erased) in sample.text:
            line.append("  LEAK: the erased instruction appears in the training text", style="bold red")
        else:
            line.append("  (not in the training text)", style="dim")
        parts.append(line)
    parts.append(body)
    spans = Text("spans: ", style="dim")
    for i, (label, t, chars) in enumerate(sample.labels_present()):
        if i:
            spans.append(" · ", style="dim")
        spans.append(label, style=_terminal_style(label, t, False))
        spans.append(f" {'loss' if t else 'no loss'}, {chars:,} chars", style="dim")
    parts.append(spans)
    for k in sample.keys:
        depth = k.get("depth")
        parts.append(Text(f"key segment {k['key']}: segment #{k['segment_index']} of the context, depth "
                          f"{depth:.2f}, tokens {k['token_start']}-{k['token_end']} of the context"
                          if isinstance(depth, (int, float)) else f"key segment {k['key']}", style=STYLE_KEY))
    for note in sample.notes:
        parts.append(Text(f"note: {note}", style="yellow"))
    share = sample.trained_count / sample.token_count if sample.token_count else 0.0
    title = (f"id={sample.id}  tokens {sample.token_count:,}  trained {sample.trained_count:,}  "
             f"({share:.1%} with loss)" + ("  TRUNCATED" if sample.row.get("truncated") else ""))
    return Panel(Group(*parts), title=Text(title), title_align="left")


def short_text(value: Any, width: int = 80) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    text = printable(text.replace("\n", "⏎"))  # escapes in data must not retitle or recolour the terminal
    return text if len(text) <= width else text[: width - 1] + "…"


def print_rows_table(console: Any, rows: Sequence[Mapping[str, Any]], columns: Sequence[str], width: int = 80) -> None:
    from rich.table import Table
    from rich.text import Text

    table = Table(show_lines=True)
    for c in columns:
        table.add_column(Text(printable(c)), overflow="fold")
    for row in rows:  # Text, not markup: data may hold brackets
        table.add_row(*[Text(short_text(row.get(c), width) if row.get(c) is not None else "") for c in columns])
    console.print(table)
