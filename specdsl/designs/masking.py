"""Loss masks as data: character spans of the rendered text, mapped exactly onto tokens.

The flow every design uses::

    messages ──render_chat──▶ RenderedSample(text, spans) ──tokenize_with_mask──▶ {input_ids, labels, ...}

1. :func:`render_chat` renders a conversation with the tokenizer's *own* chat template (the one the
   model is served with, so training and inference see the same text) and records, for every message,
   where its content landed in the rendered text as :class:`Span` objects (character offsets), each
   marked trained or not. By default the content of every assistant message is trained, together with
   the end-of-turn text the template writes right after it (``<|im_end|>`` for ChatML, ``</s>`` for
   Llama 2, ``<|eot_id|>`` for Llama 3) so the model learns to stop.
2. :func:`tokenize_with_mask` tokenizes the text once with a *fast* tokenizer and maps the spans onto
   tokens through ``offset_mapping``. ``labels`` are ``input_ids`` where a token carries loss and
   ``-100`` elsewhere (the Hugging Face convention; the model shifts labels itself).
3. :func:`trained_text` decodes each contiguous trained run back to text, so a test (or a user) can
   always see exactly what the loss sees.

Message format
--------------
A message is a mapping with ``role`` and ``content`` plus optional keys:

* ``content`` is a string, or a list of *parts* for messages whose pieces are trained differently (the
  PAM self-correction answer: a wrong first attempt without loss, then verification and correction with
  loss). A part is ``{"text": str, "trained": bool (optional), "label": str (optional)}`` (a bare string
  is a part with the message's defaults). Parts are concatenated with nothing in between: separators
  belong to the part they introduce, so a trained part teaches the model to emit its own separator.
* ``trained`` (bool) overrides the role rule for this message (and is the default for its parts).

Every other key (``name``, ``tool_calls``, ...) is passed to the template untouched.

How content is located (robustly)
---------------------------------
For message *i*, the conversation is rendered a second time with message *i*'s content replaced by a
unique sentinel. The text before the sentinel must be a prefix of the real rendering and the text after
it a suffix; what lies between them is exactly how the template wrote that content. This is immune to
duplicate contents (a naive ``str.find`` would hit an earlier copy, or a role name in a header) and to
templates that move content (Llama 2 folds the system prompt into the first user turn) or rewrite it
(``content.strip()``). A message the template does not write at all (some drop system messages) gets no
span if it is untrained. A template that writes a content twice, escapes it, drops a trained message, or
lets one message's content change the rest of the rendering is reported with :class:`TemplateMaskError`
rather than guessed at.

Boundary rule (tokens that straddle a span boundary)
----------------------------------------------------
A token carries loss iff at least one of its characters is trained and every one of its *untrained*
characters is whitespace. Two consequences, both intended:

* Whitespace the template glues to the first trained word is trained with it. Llama 2 writes
  ``[/INST] Answer``; byte-level BPE makes `` Answer`` one token; training it is right, because the
  model must emit exactly that token after ``[/INST]``. Span boundaries thus snap to token boundaries
  wherever only template whitespace lies in between.
* A token mixing untrained *text* with trained text is left untrained and counted in
  ``num_straddling_tokens``: text that must not be learned (an erased instruction, a wrong first answer)
  never leaks into the loss through a merged token. The designs in this package put separators at the
  start of parts (``"\\n\\n"``, ``" "``) where byte-level tokenizers split anyway, so straddling tokens
  are rare; the count tells you when they are not.

``boundary="overlap"`` switches to "any trained character trains the token", which is the rule
Hugging Face's ``return_assistant_tokens_mask`` (and so TRL's ``assistant_only_loss``) applies.

Special tokens written inside a message's content (e.g. a teacher answer that contains ``<|im_end|>``)
are tokenized as special tokens, exactly as ``apply_chat_template(tokenize=True)`` would do; filter such
rows upstream if that matters.

No heavy imports here: the tokenizer object is passed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from typing import Any, Collection, Mapping, Sequence

IGNORE_INDEX = -100
END_OF_TURN_LABEL = "end_of_turn"

# Private-use code points: never produced by tokenizers' normalizers nor written by chat templates,
# and unchanged by the string filters templates apply to content (strip, trim).
_SENTINEL = "\ue000specdsl-content-{index}\ue001"


class TemplateMaskError(ValueError):
    """The chat template renders a message in a way whose content cannot be located exactly."""


@dataclass(frozen=True)
class Span:
    """Characters ``text[start:end]`` of a rendered sample, with or without loss.

    ``label`` names what the characters are: the role (``"assistant"``), a part label
    (``"initial_answer"``, ``"verification"``), ``"end_of_turn"``, ``"prompt"``, ``"completion"``.
    """

    start: int
    end: int
    trained: bool
    label: str

    def __post_init__(self) -> None:
        if not 0 <= self.start <= self.end:
            raise ValueError(f"invalid span [{self.start}, {self.end})")


@dataclass(frozen=True)
class RenderedSample:
    """A rendered training text and its spans (sorted by start, non-overlapping)."""

    text: str
    spans: tuple[Span, ...]

    def __post_init__(self) -> None:
        previous_end = 0
        for span in self.spans:
            if span.end > len(self.text):
                raise ValueError(f"span [{span.start}, {span.end}) exceeds the text ({len(self.text)} chars)")
            if span.start < previous_end:
                raise ValueError("spans must be sorted and must not overlap")
            previous_end = span.end

    def trained_spans(self) -> tuple[Span, ...]:
        return tuple(span for span in self.spans if span.trained and span.end > span.start)

    def trained_runs(self) -> list[tuple[int, int]]:
        """Character ranges that carry loss, adjacent trained spans merged into one run."""
        runs: list[list[int]] = []
        for span in self.trained_spans():
            if runs and runs[-1][1] == span.start:
                runs[-1][1] = span.end
            else:
                runs.append([span.start, span.end])
        return [(start, end) for start, end in runs]

    def trained_texts(self) -> list[str]:
        """The text of each trained run: what :func:`trained_text` should decode to."""
        return [self.text[start:end] for start, end in self.trained_runs()]

    def texts(self, label: str) -> list[str]:
        """The text of every span with ``label``."""
        return [self.text[span.start:span.end] for span in self.spans if span.label == label]

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (JSON / Parquet friendly)."""
        return {
            "text": self.text,
            "spans": [[span.start, span.end, span.trained, span.label] for span in self.spans],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RenderedSample":
        return cls(text=data["text"],
                   spans=tuple(Span(int(s), int(e), bool(t), str(label)) for s, e, t, label in data["spans"]))


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Part:
    text: str
    trained: bool
    label: str


def _role_is_trained(role: str, trained: str | Collection[str]) -> bool:
    if isinstance(trained, str):
        return trained == "all" or role == trained
    return role in trained


def _message_parts(message: Mapping[str, Any], index: int, trained: str | Collection[str]) -> list[_Part]:
    if "role" not in message:
        raise ValueError(f"message {index} has no 'role'")
    role = str(message["role"])
    message_trained = message.get("trained")
    if message_trained is None:
        message_trained = _role_is_trained(role, trained)
    content = message.get("content", "")
    if content is None:
        content = ""
    if isinstance(content, str):
        return [_Part(content, bool(message_trained), role)]
    if not isinstance(content, (list, tuple)):
        raise ValueError(f"message {index}: content must be a string or a list of parts, got {type(content).__name__}")
    parts = []
    for part_index, part in enumerate(content):
        if isinstance(part, str):
            parts.append(_Part(part, bool(message_trained), role))
            continue
        if not isinstance(part, Mapping) or not isinstance(part.get("text"), str):
            raise ValueError(f"message {index}, part {part_index}: a part is a string or a mapping with a "
                             f"string 'text' (and optional 'trained', 'label')")
        if part.get("type", "text") != "text":
            raise ValueError(f"message {index}, part {part_index}: only text parts are supported")
        part_trained = part.get("trained")
        parts.append(_Part(part["text"], bool(message_trained if part_trained is None else part_trained),
                           str(part.get("label") or role)))
    return parts


def _special_token_strings(tokenizer: Any) -> list[str]:
    """Every special or added token string, longest first (so ``<|im_end|>`` beats a shorter prefix)."""
    tokens: set[str] = set()
    for token in getattr(tokenizer, "all_special_tokens", None) or []:
        tokens.add(str(token))
    get_added_vocab = getattr(tokenizer, "get_added_vocab", None)
    if callable(get_added_vocab):
        tokens.update(str(token) for token in get_added_vocab())
    return sorted((token for token in tokens if token), key=len, reverse=True)


def _find_first(text: str, candidates: Sequence[str], start: int, end: int) -> tuple[int, str] | None:
    best: tuple[int, str] | None = None
    for candidate in candidates:
        position = text.find(candidate, start, end)
        if position >= 0 and (best is None or position < best[0]):
            best = (position, candidate)
    return best


def render_chat(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    *,
    trained: str | Collection[str] = ("assistant",),
    train_end_of_turn: bool = True,
    end_of_turn: str | Sequence[str] | None = None,
    chat_template: str | None = None,
    template_kwargs: Mapping[str, Any] | None = None,
) -> RenderedSample:
    """Render ``messages`` with the tokenizer's chat template and mark which characters carry loss.

    ``trained``: the roles whose messages carry loss (``"all"`` for every role); a message's own
    ``trained`` key, and a part's, override it. ``train_end_of_turn``: also train the end-of-turn text
    written after a message whose last part is trained; it runs from the end of the content to the end
    of the first special token the template writes for that message (``end_of_turn`` overrides the
    candidates, e.g. ``"<|eot_id|>"``; then it must be found or :class:`TemplateMaskError` is raised).
    ``chat_template`` replaces the tokenizer's template (default: the tokenizer's own), and
    ``template_kwargs`` are passed to it (``enable_thinking=False``, ...).

    The rendered text is the conversation only: no generation prompt is appended.
    """
    if not messages:
        raise ValueError("cannot render an empty conversation")
    kwargs = dict(template_kwargs or {})

    def render(conversation: list[dict[str, Any]]) -> str:
        return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=False,
                                             chat_template=chat_template, **kwargs)

    parts_per_message = [_message_parts(message, index, trained) for index, message in enumerate(messages)]
    contents = ["".join(part.text for part in parts) for parts in parts_per_message]
    # What the template sees: plain string contents, our own keys removed.
    plain = [{**{k: v for k, v in message.items() if k not in ("content", "trained")}, "content": content}
             for message, content in zip(messages, contents)]
    text = render(plain)

    # 1. Where does each message's content sit in the rendered text?
    located: list[tuple[int, int, int] | None] = []  # (start, end, offset of the rendered text in content)
    for index, content in enumerate(contents):
        if content == "":
            located.append(None)
            continue
        sentinel = _SENTINEL.format(index=index)
        probe = [dict(message) for message in plain]
        probe[index]["content"] = sentinel
        probe_text = render(probe)
        if probe_text.count(sentinel) == 0 and probe_text == text and not any(
                part.trained for part in parts_per_message[index]):
            # The template does not write this message at all (some drop system messages): nothing of
            # it reaches the model, so there is nothing to mask. A dropped *trained* message is an error.
            located.append(None)
            continue
        if probe_text.count(sentinel) != 1:
            raise TemplateMaskError(
                f"message {index} ({plain[index]['role']}): the chat template writes its content "
                f"{probe_text.count(sentinel)} times (expected once); its loss span is ambiguous")
        prefix, suffix = probe_text.split(sentinel)
        start, end = len(prefix), len(text) - len(suffix)
        if not (end >= start and text.startswith(prefix) and text.endswith(suffix)):
            raise TemplateMaskError(
                f"message {index} ({plain[index]['role']}): the chat template renders the rest of the "
                f"conversation differently depending on this message's content; cannot locate it exactly")
        rendered = text[start:end]
        if rendered == content:
            offset = 0
        else:
            # Templates commonly strip content; find the rendered text inside the content.
            offset = content.find(rendered)
            if offset < 0:
                distinct = {(part.trained, part.label) for part in parts_per_message[index] if part.text}
                if len(distinct) > 1:
                    raise TemplateMaskError(
                        f"message {index} ({plain[index]['role']}): the chat template rewrites the content "
                        f"(not a substring of it), so its parts cannot be placed")
                offset = -1  # rendered differently but uniform: the whole rendered range is one span
        located.append((start, end, offset))

    spans: list[Span] = []
    special_tokens: list[str] | None = None
    explicit_end = [end_of_turn] if isinstance(end_of_turn, str) else list(end_of_turn or [])
    for index, parts in enumerate(parts_per_message):
        where = located[index]
        if where is None:
            continue
        start, end, offset = where
        if offset < 0:
            part = next(part for part in parts if part.text)
            spans.append(Span(start, end, part.trained, part.label))
        else:
            # Place each part, clipped to the part of the content the template actually wrote.
            cursor = 0
            for part in parts:
                part_start, part_end = cursor, cursor + len(part.text)
                cursor = part_end
                lo = max(part_start, offset) - offset
                hi = min(part_end, offset + (end - start)) - offset
                if hi > lo:
                    spans.append(Span(start + lo, start + hi, part.trained, part.label))
        last_part = next((part for part in reversed(parts) if part.text), None)
        if not (train_end_of_turn and last_part is not None and last_part.trained):
            continue

        # 2. The end-of-turn text: search only inside what the template writes for THIS message, i.e.
        # up to the end of the rendering of messages[: index + 1] when that rendering is a prefix of the
        # whole (it is for prefix-preserving templates), else up to the next message's content.
        region_end = None
        try:
            head = render(plain[: index + 1])
            if text.startswith(head) and len(head) >= end:
                region_end = len(head)
        except Exception:  # a template may refuse a partial conversation; fall back below
            region_end = None
        if region_end is None:
            later_starts = [where[0] for where in located[index + 1:] if where is not None and where[0] >= end]
            region_end = min(later_starts) if later_starts else len(text)
        if explicit_end:
            found = _find_first(text, explicit_end, end, region_end)
            if found is None:
                raise TemplateMaskError(
                    f"message {index} ({plain[index]['role']}): end-of-turn text {explicit_end!r} not found "
                    f"after its content in {text[end:region_end]!r}")
        else:
            if special_tokens is None:
                special_tokens = _special_token_strings(tokenizer)
            found = _find_first(text, special_tokens, end, region_end)
        if found is not None:
            position, token = found
            spans.append(Span(end, position + len(token), True, END_OF_TURN_LABEL))

    spans.sort(key=lambda span: (span.start, span.end))
    return RenderedSample(text=text, spans=tuple(span for span in spans if span.end > span.start))


def render_prompt_completion(
    tokenizer: Any,
    prompt: str | Sequence[Mapping[str, Any]],
    completion: str | Sequence[Mapping[str, Any]],
    *,
    add_eos: bool = True,
    **chat_options: Any,
) -> RenderedSample:
    """A prompt/completion sample with loss on the completion only.

    * Plain strings: the text is ``prompt + completion`` (plus the tokenizer's EOS token when
      ``add_eos`` and the completion does not already end with it, so the model learns to stop). Spans:
      ``prompt`` (untrained), ``completion`` and ``end_of_turn`` (trained). No chat template is applied:
      this is the format for prompts that already carry their own markup (e.g. :func:`specdsl.designs.in2.film_prompt`).
    * Conversational (lists of messages; a string completion becomes one assistant message): rendered
      with :func:`render_chat`, prompt messages untrained, completion messages trained. ``chat_options``
      are passed to :func:`render_chat`.
    """
    if isinstance(prompt, str):
        if not isinstance(completion, str):
            raise ValueError("a plain-string prompt needs a plain-string completion")
        eos = ""
        if add_eos:
            eos = getattr(tokenizer, "eos_token", None) or ""
            if not eos:
                raise ValueError("add_eos=True but the tokenizer has no eos_token")
            if completion.endswith(eos):
                completion, eos = completion[: -len(eos)], eos
        text = prompt + completion + eos
        spans = [Span(0, len(prompt), False, "prompt"),
                 Span(len(prompt), len(prompt) + len(completion), True, "completion")]
        if eos:
            spans.append(Span(len(prompt) + len(completion), len(text), True, END_OF_TURN_LABEL))
        return RenderedSample(text=text, spans=tuple(span for span in spans if span.end > span.start))
    if isinstance(completion, str):
        completion = [{"role": "assistant", "content": completion}]
    messages = [{**message, "trained": False} for message in prompt]
    messages += [{**message, "trained": message.get("trained", True)} for message in completion]
    return render_chat(tokenizer, messages, **chat_options)


# --------------------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------------------


def tokenize_with_mask(
    tokenizer: Any,
    sample: RenderedSample,
    *,
    max_length: int | None = None,
    add_special_tokens: bool = False,
    boundary: str = "inside",
) -> dict[str, Any]:
    """Tokenize ``sample.text`` once and turn its trained spans into ``labels``.

    Returns a plain dict (one row of the dataset handed to the trainer)::

        input_ids              list[int]
        labels                 list[int]   input_ids where trained, -100 elsewhere
        attention_mask         list[int]   all ones (no padding here; collators pad)
        num_tokens             int         after truncation
        num_trained_tokens     int         after truncation
        truncated              bool        True when max_length cut the sequence
        num_tokens_untruncated int
        num_straddling_tokens  int         tokens mixing trained and untrained non-whitespace text,
                                           left untrained (see the module's boundary rule)
        trained_char_spans     list[[start, end]]  characters actually covered by trained tokens
        target_char_spans      list[[start, end]]  the sample's trained spans (the intent)
        target_labels          list[str]           their labels

    ``add_special_tokens`` is False because chat templates already write BOS where the model expects it
    (this is what ``apply_chat_template(tokenize=True)`` does). Truncation keeps the first
    ``max_length`` tokens; callers decide whether a truncated row is kept. ``boundary`` is ``"inside"``
    (default, see module docs) or ``"overlap"`` (any trained character trains the token).
    """
    if boundary not in ("inside", "overlap"):
        raise ValueError(f"boundary must be 'inside' or 'overlap', got {boundary!r}")
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("tokenize_with_mask needs a fast tokenizer (offset mapping); got a slow one")
    text = sample.text
    encoding = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    input_ids = list(encoding["input_ids"])
    offsets = [tuple(pair) for pair in encoding["offset_mapping"]]

    trained_chars = bytearray(len(text))
    for span in sample.trained_spans():
        trained_chars[span.start:span.end] = b"\x01" * (span.end - span.start)
    # Prefix sums make each token's test O(1), which matters for 32K-token IN2 contexts.
    trained_prefix = [0, *accumulate(trained_chars)]
    blocking_prefix = [0, *accumulate(1 if not flag and not char.isspace() else 0
                                      for flag, char in zip(trained_chars, text))]

    labels: list[int] = []
    straddling = 0
    for token_id, (start, end) in zip(input_ids, offsets):
        if end <= start:  # special tokens added outside the text (offset (0, 0)) never carry loss
            labels.append(IGNORE_INDEX)
            continue
        trained_count = trained_prefix[end] - trained_prefix[start]
        blocking_count = blocking_prefix[end] - blocking_prefix[start]
        if boundary == "overlap":
            is_trained = trained_count > 0
        else:
            is_trained = trained_count > 0 and blocking_count == 0
            if trained_count > 0 and blocking_count > 0:
                straddling += 1
        labels.append(token_id if is_trained else IGNORE_INDEX)

    total = len(input_ids)
    truncated = max_length is not None and total > max_length
    if truncated:
        input_ids, labels, offsets = input_ids[:max_length], labels[:max_length], offsets[:max_length]

    trained_char_spans: list[list[int]] = []
    for label, (start, end) in zip(labels, offsets):
        if label == IGNORE_INDEX:
            continue
        if trained_char_spans and trained_char_spans[-1][1] >= start:
            trained_char_spans[-1][1] = max(trained_char_spans[-1][1], end)
        else:
            trained_char_spans.append([start, end])

    trained_spans = sample.trained_spans()
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": [1] * len(input_ids),
        "num_tokens": len(input_ids),
        "num_trained_tokens": sum(1 for label in labels if label != IGNORE_INDEX),
        "truncated": truncated,
        "num_tokens_untruncated": total,
        "num_straddling_tokens": straddling,
        "trained_char_spans": trained_char_spans,
        "target_char_spans": [[span.start, span.end] for span in trained_spans],
        "target_labels": [span.label for span in trained_spans],
    }


def trained_runs(labels: Sequence[int]) -> list[tuple[int, int]]:
    """Token index ranges ``[start, end)`` of each contiguous run of trained labels."""
    runs: list[tuple[int, int]] = []
    run_start = None
    for index, label in enumerate(labels):
        if label != IGNORE_INDEX and run_start is None:
            run_start = index
        elif label == IGNORE_INDEX and run_start is not None:
            runs.append((run_start, index))
            run_start = None
    if run_start is not None:
        runs.append((run_start, len(labels)))
    return runs


def trained_text(tokenizer: Any, input_ids: Sequence[int], labels: Sequence[int]) -> list[str]:
    """Decode each contiguous run of trained tokens (special tokens kept, spaces not cleaned up)."""
    if len(input_ids) != len(labels):
        raise ValueError("input_ids and labels differ in length")
    return [tokenizer.decode(list(input_ids[start:end]), skip_special_tokens=False,
                             clean_up_tokenization_spaces=False)
            for start, end in trained_runs(labels)]
