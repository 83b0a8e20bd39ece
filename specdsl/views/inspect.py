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

:func:`render_examples_html` and :data:`CSS` are shared with :mod:`specdsl.views.report`.
"""

from __future__ import annotations

import html as _html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from specdsl.errors import RunError, did_you_mean
from specdsl.ir.plan import Plan, PlanNode

from specdsl.designs.masking import IGNORE_INDEX
# Where the IN2 context starts inside a rendered sample (the FILM instruction, chat or [INST] format).
CONTEXT_MARKER = "### Context:\n"
# Untrained runs longer than this are shortened in the terminal (never key segments, never trained text).
TERMINAL_MAX_RUN = 600

# Labels of text the assistant says: untrained, they are masked *answers* (struck through), not prompt.
ANSWER_LABELS = frozenset({"assistant", "completion", "initial_answer", "corrected_answer", "verification",
                           "final_verification"})
MARKUP = "markup"  # characters no span covers: what the chat template writes around the contents


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


@dataclass
class Totals:
    """Counts over every row of a tokenized node."""

    rows: int = 0
    tokens: int = 0
    trained: int = 0
    truncated: int = 0

    @property
    def share(self) -> float:
        return self.trained / self.tokens if self.tokens else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "tokens": self.tokens, "trained": self.trained, "truncated": self.truncated,
                "share": round(self.share, 6)}


@dataclass
class Inspection:
    """What :func:`inspect_node` showed (handy in a notebook or a test)."""

    node: str
    op: str
    fingerprint: str
    rows_total: int
    rows: list[dict[str, Any]]
    tokenized: bool
    totals: Totals | None = None
    html_path: Path | None = None
    token_view: bool = False          # token boundaries known (the tokenizer was found and matches)
    notes: list[str] = field(default_factory=list)


def is_tokenized(columns: Iterable[str]) -> bool:
    cols = set(columns)
    return {"input_ids", "labels"} <= cols


def read_node_rows(store: Any, fingerprint: str, limit: int | None = None) -> list[dict[str, Any]]:
    """The first ``limit`` rows of a stored node (all when None), without reading the rest of the table."""
    from specdsl.execute.store import DATA, META

    if limit is None:
        return store.load(fingerprint)
    import pyarrow.parquet as pq

    d = store.node_dir(fingerprint)
    json_columns = json.loads((d / META).read_text()).get("json_columns", [])
    if limit <= 0:
        return []
    pf = pq.ParquetFile(d / DATA)
    rows: list[dict[str, Any]] = []
    for batch in pf.iter_batches(batch_size=limit):
        rows.extend(batch.to_pylist())
        if len(rows) >= limit:
            break
    rows = rows[:limit]
    for row in rows:
        for c in json_columns:
            if row.get(c) is not None:
                row[c] = json.loads(row[c])
    return rows


def tokenized_totals(store: Any, fingerprint: str) -> Totals:
    """Tokens, trained tokens and truncated rows over ALL rows of a tokenized node (reads three columns)."""
    import pyarrow.parquet as pq

    from specdsl.execute.store import DATA

    path = store.node_dir(fingerprint) / DATA
    pf = pq.ParquetFile(path)  # not pq.read_table: that imports pyarrow.dataset (and pandas), ~1 s
    names = set(pf.schema_arrow.names)
    wanted = [c for c in ("n_tokens", "n_trained", "truncated") if c in names]
    if len(wanted) < 2:  # not our tokenize op's layout: count from the labels themselves
        rows = store.load(fingerprint)
        t = Totals(rows=len(rows))
        for r in rows:
            t.tokens += len(r.get("input_ids") or [])
            t.trained += sum(1 for x in r.get("labels") or [] if x != IGNORE_INDEX)
            t.truncated += bool(r.get("truncated"))
        return t
    table = pf.read(columns=wanted).to_pydict()
    n = len(table[wanted[0]])
    return Totals(rows=n, tokens=sum(v or 0 for v in table.get("n_tokens", [])),
                  trained=sum(v or 0 for v in table.get("n_trained", [])),
                  truncated=sum(1 for v in table.get("truncated", []) if v))


class FastTokenizerFile:
    """The model's ``tokenizer.json`` through the ``tokenizers`` library alone: the same ids and offsets as
    the Hugging Face fast tokenizer built from it, without importing torch/transformers (a report written
    after a fully cached run stays instant). Every row is checked against its stored ``input_ids``."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self.path = path
        self._tok = Tokenizer.from_file(str(path))

    def __call__(self, text: str, add_special_tokens: bool = False, return_offsets_mapping: bool = True):
        enc = self._tok.encode(text, add_special_tokens=add_special_tokens)
        return {"input_ids": list(enc.ids), "offset_mapping": [tuple(o) for o in enc.offsets]}


def resolve_tokenizer(plan: Plan, node: PlanNode, store: Any, registry: Any = None,
                      cache: dict[str, tuple[Any, str | None]] | None = None) -> tuple[Any, str | None]:
    """The tokenizer the tokenize node used, or ``(None, why not)``. Never downloads a model.

    Resolved as the tokenize step resolves it (``Services(plan, store, registry)``): the model's folder,
    then its ``tokenizer.json`` read directly (fast), else ``Services.tokenizer`` (Hugging Face).
    ``cache`` (model ref -> result) lets a report share one tokenizer between nodes."""
    ref = node.params.get("model")
    if not ref:
        return None, f"node '{node.id}' names no model"
    if cache is not None and ref in cache:
        return cache[ref]
    result = _resolve_tokenizer(plan, ref, store, registry)
    if cache is not None:
        cache[ref] = result
    return result


def _resolve_tokenizer(plan: Plan, ref: str, store: Any, registry: Any) -> tuple[Any, str | None]:
    try:
        if not plan.has(ref):
            m = plan.model(ref)
            if m.backend != "transformers":
                return None, f"model '{ref}' is served by '{m.backend}' (no local tokenizer)"
            try:
                from specdsl.modelcache.models import is_cached, is_known

                if is_known(m.model) and not is_cached(m.model):
                    return None, f"model '{m.model}' is not in the local cache (`specdsl models pull {m.model}`)"
            except ImportError:
                pass
        if registry is None:
            from specdsl.plugins import default_registry

            registry = default_registry()
        from specdsl.execute.services import Services

        services = Services(plan, store, registry)
        tokenizer_file = Path(services.model_dir(ref)) / "tokenizer.json"
        if tokenizer_file.is_file():
            try:
                return FastTokenizerFile(tokenizer_file), None
            except Exception:  # noqa: BLE001 - an unusual file: let transformers read the folder
                pass
        return services.tokenizer(ref), None
    except KeyError:
        return None, f"unknown model '{ref}'"
    except RunError as exc:
        return None, exc.message
    except Exception as exc:  # noqa: BLE001 - a view must not fail because a tokenizer cannot load
        return None, f"cannot load the tokenizer of '{ref}': {exc}"


# --------------------------------------------------------------------------------------------------
# One sample: characters, spans, tokens, key segments
# --------------------------------------------------------------------------------------------------


@dataclass
class Token:
    id: int
    start: int
    end: int
    trained: bool
    label: str


@dataclass
class Sample:
    """A tokenized row made ready to show: per-character labels, trained flags, keys and tokens."""

    row: Mapping[str, Any]
    text: str
    char_label: list[str]
    char_trained: bytearray
    keys: list[dict[str, Any]]             # {start, end, key, segment_index, depth} in text coordinates
    tokens: list[Token] | None             # None: token boundaries unknown
    trained_count: int                     # labels != -100
    token_count: int
    notes: list[str]

    @property
    def id(self) -> Any:
        return self.row.get("id")

    def labels_present(self) -> list[tuple[str, bool, int]]:
        """(label, trained, characters) in order of first appearance; trained per the span."""
        out: dict[tuple[str, bool], int] = {}
        for s, e, t, label in self.row.get("spans") or []:
            out[(str(label), bool(t))] = out.get((str(label), bool(t)), 0) + (int(e) - int(s))
        return [(label, t, n) for (label, t), n in out.items()]


def key_ranges(row: Mapping[str, Any], text: str) -> tuple[list[dict[str, Any]], str | None]:
    """IN2 key segments in ``text`` coordinates: their offsets are relative to the decoded context, which
    sits right after the FILM instruction's ``### Context:`` line."""
    positions = row.get("key_positions") or []
    if not positions:
        return [], None
    at = text.find(CONTEXT_MARKER)
    if at < 0:
        return [], "key positions present but the context could not be located in the text"
    base = at + len(CONTEXT_MARKER)
    out = []
    for kp in positions:
        if kp.get("char_start") is None or kp.get("char_end") is None:
            continue
        s, e = base + int(kp["char_start"]), base + int(kp["char_end"])
        if not 0 <= s <= e <= len(text):
            return [], "key positions fall outside the text"
        out.append({"start": s, "end": e, "key": kp.get("key"), "segment_index": kp.get("segment_index"),
                    "depth": kp.get("depth"), "token_start": kp.get("token_start"), "token_end": kp.get("token_end")})
    return sorted(out, key=lambda k: k["start"]), None


def prepare_sample(row: Mapping[str, Any], tokenizer: Any = None) -> Sample:
    text = row.get("text") or ""
    n = len(text)
    labels = list(row.get("labels") or [])
    input_ids = list(row.get("input_ids") or [])
    char_label = [MARKUP] * n
    span_trained = bytearray(n)
    for s, e, t, label in row.get("spans") or []:
        s, e = max(0, int(s)), min(n, int(e))
        for i in range(s, e):
            char_label[i] = str(label)
        if t:
            span_trained[s:e] = b"\x01" * (e - s)
    notes: list[str] = []
    keys, why = key_ranges(row, text)
    if why:
        notes.append(why)
    tokens = None
    if tokenizer is not None and input_ids:
        tokens, why = _align_tokens(tokenizer, text, input_ids, labels, char_label)
        if why:
            notes.append(why)
    if tokens is not None:
        char_trained = bytearray(n)
        for tok in tokens:
            if tok.trained and tok.end > tok.start:
                char_trained[tok.start:tok.end] = b"\x01" * (tok.end - tok.start)
    else:
        char_trained = span_trained
    return Sample(row=row, text=text, char_label=char_label, char_trained=char_trained, keys=keys, tokens=tokens,
                  trained_count=sum(1 for x in labels if x != IGNORE_INDEX), token_count=len(input_ids), notes=notes)


def _align_tokens(tokenizer: Any, text: str, input_ids: list[int], labels: list[int],
                  char_label: list[str]) -> tuple[list[Token] | None, str | None]:
    """Token boundaries of ``text`` from the tokenizer's offsets, checked against the stored input_ids."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except Exception as exc:  # noqa: BLE001
        return None, f"the tokenizer failed on this text ({exc}); showing character spans"
    ids = list(enc["input_ids"])
    if ids[: len(input_ids)] != input_ids:
        return None, "the tokenizer does not reproduce the stored input_ids; showing character spans"
    out = []
    for i, (tid, (s, e)) in enumerate(zip(input_ids, enc["offset_mapping"])):
        trained = i < len(labels) and labels[i] != IGNORE_INDEX
        out.append(Token(int(tid), int(s), int(e), trained, _token_label(char_label, int(s), int(e), text)))
    return out, None


def _token_label(char_label: list[str], s: int, e: int, text: str) -> str:
    """The label of a token: of its first non-space character covered by a span, else of its first one."""
    first = None
    for i in range(s, min(e, len(char_label))):
        if first is None:
            first = char_label[i]
        if char_label[i] != MARKUP and not text[i].isspace():
            return char_label[i]
    return first or MARKUP


def _runs(sample: Sample) -> list[tuple[int, int, str, bool, int | None]]:
    """Maximal character runs of equal (label, trained, key index): (start, end, label, trained, key)."""
    n = len(sample.text)
    key_of: list[int | None] = [None] * n
    for k, kr in enumerate(sample.keys):
        for i in range(kr["start"], kr["end"]):
            key_of[i] = k
    runs = []
    start = 0
    for i in range(1, n + 1):
        if i == n or (sample.char_label[i], sample.char_trained[i], key_of[i]) != \
                (sample.char_label[start], sample.char_trained[start], key_of[start]):
            runs.append((start, i, sample.char_label[start], bool(sample.char_trained[start]), key_of[start]))
            start = i
    return runs


def trained_text_of(sample: Sample) -> list[str]:
    """The text of each contiguous trained run (what the loss sees)."""
    out, cur = [], []
    for ch, t in zip(sample.text, sample.char_trained):
        if t:
            cur.append(ch)
        elif cur:
            out.append("".join(cur))
            cur = []
    if cur:
        out.append("".join(cur))
    return out


# --------------------------------------------------------------------------------------------------
# Terminal
# --------------------------------------------------------------------------------------------------

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


def _legend_text():
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
    for s, e, label, trained, key in _runs(sample):
        style = _terminal_style(label, trained, key is not None)
        if pieces and pieces[-1][1] == style:
            pieces[-1][0] += sample.text[s:e]
        else:
            pieces.append([sample.text[s:e], style])
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
        line.append(str(erased), style=STYLE_ERASED)
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


def _short(value: Any, width: int = 80) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    text = text.replace("\n", "⏎")
    return text if len(text) <= width else text[: width - 1] + "…"


def _print_table(console: Any, rows: Sequence[Mapping[str, Any]], columns: Sequence[str], width: int = 80) -> None:
    from rich.table import Table
    from rich.text import Text

    table = Table(show_lines=True)
    for c in columns:
        table.add_column(Text(c), overflow="fold")
    for row in rows:  # Text, not markup: data may hold brackets
        table.add_row(*[Text(_short(row.get(c), width) if row.get(c) is not None else "") for c in columns])
    console.print(table)


# --------------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------------

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
    for s, e, label, trained, key in _runs(sample):
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


def page(title: str, body: str) -> str:
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\"><title>{esc(title)}</title>"
            f"<style>{CSS}</style></head><body>\n{body}\n<script>{JS}</script></body></html>\n")


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


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------


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
        raise RunError("rows must be >= 0")
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
        _print_table(console, shown, columns)
        evaluation = meta.get("evaluation")
        if evaluation:
            console.print(evaluation.get("summary", ""), markup=False, highlight=False)
            for res in evaluation.get("results", []):
                if res.get("plot"):
                    console.print(f"plot: {store.node_dir(node.fingerprint) / res['plot']}", style="dim", markup=False)
        if html:
            body = (f"<h1>{esc(node.id)} <span class=\"muted\">({esc(node.op)})</span></h1>"
                    f"<div class=\"muted\">{total:,} rows · fingerprint <code>{esc(node.short)}</code></div>"
                    + rows_table_html(shown, columns))
            if evaluation:
                from specdsl.views.report import evaluation_html

                body += evaluation_html(node.id, evaluation, store.node_dir(node.fingerprint))
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
    console.print(_legend_text())
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


def rows_table_html(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], width: int = 200) -> str:
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{esc(_short(r.get(c), width)) if r.get(c) is not None else ''}</td>"
                                    for c in columns) + "</tr>" for r in rows)
    return f'<table class="grid"><tr>{head}</tr>{body}</table>'


def _write(path: Path, text: str) -> Path:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise RunError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path
