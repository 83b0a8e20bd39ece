"""One tokenized row made ready to show: per-character labels and trained flags, IN2 key segments in text
coordinates, and token boundaries checked against the stored ``input_ids``.

What is "trained" is the ``labels`` column when token boundaries are known (the exact truth), and the
trained character spans otherwise (the intent; see :mod:`specdsl.designs.masking` for the boundary rule).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from specdsl.designs.masking import IGNORE_INDEX
# Where the IN2 context starts inside a rendered sample (the FILM instruction, chat or [INST] format).
CONTEXT_MARKER = "### Context:\n"

# Labels of text the assistant says: untrained, they are masked *answers* (struck through), not prompt.
ANSWER_LABELS = frozenset({"assistant", "completion", "initial_answer", "corrected_answer", "verification",
                           "final_verification"})
MARKUP = "markup"  # characters no span covers: what the chat template writes around the contents


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


def char_runs(sample: Sample) -> list[tuple[int, int, str, bool, int | None]]:
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
