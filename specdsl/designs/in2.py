"""IN2 training data (information-intensive training; An et al. 2024, arXiv 2404.16811, FILM-7B).

Long contexts are synthesized from short texts so that the answer to a question depends on a short
*key* stretch placed anywhere in a long context:

* Texts are cut into ~128-token segments (:func:`segment_text`).
* Type 1 (fine-grained awareness): a QA pair is generated from ONE segment; the context is that segment
  shuffled among random filler segments from other texts.
* Type 2 (integration and reasoning): a QA pair needs >= 2 segments of one text; all of that text's
  segments are shuffled among fillers.
* Context lengths are drawn uniformly from [min, max] tokens (4K-32K in the paper) and the key segments
  land at uniformly random positions (:func:`build_long_context`).
* The sample is the FILM prompt (:func:`film_prompt`) with loss on the answer only, mixed with some
  short-context QA (:func:`mix_short_context`).

Everything here is pure and deterministic given the ``random.Random`` passed in. Contexts are assembled
on token ids (each segment is tokenized once by the caller), so length targets are exact without
re-tokenizing 32K-token strings. This module imports nothing heavy: tokenizers are passed in as
callables.
"""

from __future__ import annotations

import random
import re
from typing import Any, Callable, Mapping, Sequence

# The FILM-7B prompt (github.com/microsoft/FILM README), with Mistral's [INST] markup.
FILM_INSTRUCTION_TEMPLATE = (
    "Below is a context and an instruction. Based on the information provided in the context, write a "
    "response for the instruction.\n\n### Context:\n{context}\n\n### Instruction:\n{question}"
)
FILM_PROMPT_TEMPLATE = "[INST] " + FILM_INSTRUCTION_TEMPLATE + " [/INST]"

# A sentence ends at . ! ? (optionally followed by a closing quote or bracket) before whitespace.
_SENTENCE_END = re.compile(r"[.!?][\"'\u201d\u2019)\]]*(?=\s)")


# --------------------------------------------------------------------------------------------------
# Segmentation
# --------------------------------------------------------------------------------------------------


def _units(text: str, count_tokens: Callable[[str], int], min_tokens: int) -> list[tuple[int, int, int]]:
    """(start, end, tokens) of each line; lines longer than ``min_tokens`` are cut into sentences."""
    units: list[tuple[int, int, int]] = []
    for line_match in re.finditer(r"[^\n]+", text):
        line = line_match.group(0)
        if not line.strip():
            continue
        start = line_match.start() + (len(line) - len(line.lstrip()))
        end = line_match.start() + len(line.rstrip())
        tokens = count_tokens(text[start:end])
        if tokens <= min_tokens:
            units.append((start, end, tokens))
            continue
        # A long paragraph would make one oversized segment; sentences keep segments near min_tokens.
        cursor = start
        for sentence_end in _SENTENCE_END.finditer(text, start, end):
            stop = sentence_end.end()
            piece = text[cursor:stop]
            if piece.strip():
                lead = len(piece) - len(piece.lstrip())
                units.append((cursor + lead, stop, count_tokens(piece.strip())))
            cursor = stop
        tail = text[cursor:end]
        if tail.strip():
            lead = len(tail) - len(tail.lstrip())
            units.append((cursor + lead, end, count_tokens(tail.strip())))
    return units


def segment_text(text: str, count_tokens: Callable[[str], int], *, min_tokens: int = 128) -> list[str]:
    """Cut ``text`` into segments of at least ``min_tokens`` tokens, as IN2 does.

    Lines are accumulated until their token count reaches ``min_tokens``; a line that alone exceeds
    ``min_tokens`` is accumulated sentence by sentence instead. The leftover at the end of the text
    (under ``min_tokens``) is merged into the last segment; a text shorter than ``min_tokens`` is one
    segment. Each segment is an exact slice of ``text`` (original spacing and line breaks inside it
    kept, surrounding whitespace dropped). Token counts are summed per line/sentence with
    ``count_tokens`` (the caller's tokenizer), which is how the threshold is applied.
    """
    if min_tokens < 1:
        raise ValueError("min_tokens must be >= 1")
    units = _units(text, count_tokens, min_tokens)
    bounds: list[list[int]] = []
    current_start = None
    current_tokens = 0
    current_end = 0
    for start, end, tokens in units:
        if current_start is None:
            current_start = start
        current_end = end
        current_tokens += tokens
        if current_tokens >= min_tokens:
            bounds.append([current_start, current_end])
            current_start, current_tokens = None, 0
    if current_start is not None:  # leftover shorter than min_tokens
        if bounds:
            bounds[-1][1] = current_end
        else:
            bounds.append([current_start, current_end])
    return [text[start:end] for start, end in bounds]


# --------------------------------------------------------------------------------------------------
# Long-context assembly
# --------------------------------------------------------------------------------------------------


def draw_target_length(rng: random.Random, min_tokens: int, max_tokens: int) -> int:
    """A context length drawn uniformly from the integers in [min_tokens, max_tokens]."""
    if not 0 < min_tokens <= max_tokens:
        raise ValueError(f"need 0 < min_tokens <= max_tokens, got [{min_tokens}, {max_tokens}]")
    return rng.randint(min_tokens, max_tokens)


def _draw_filler(rng: random.Random, lengths: Sequence[int], used: set[int]) -> int:
    # Rejection sampling is O(1) for the usual huge pool; an almost-used-up pool falls back to a scan.
    for _ in range(64):
        index = rng.randrange(len(lengths))
        if index not in used and lengths[index] > 0:
            return index
    remaining = [index for index in range(len(lengths)) if index not in used and lengths[index] > 0]
    if not remaining:
        raise ValueError("the filler pool ran out of unused non-empty segments before the target length")
    return rng.choice(remaining)


class _Lengths:
    """The token counts of a pool of id lists, computed on demand (a pool may be far larger than a context)."""

    def __init__(self, pool: Sequence[Sequence[int]]):
        self.pool = pool

    def __len__(self) -> int:
        return len(self.pool)

    def __getitem__(self, index: int) -> int:
        return len(self.pool[index])


# One slot of a planned context: (KEY, key number, its length) or (FILLER, pool index, tokens taken from
# the start of that segment: all of it, or fewer for the one filler cut to the exact target length).
KEY, FILLER = 0, 1


def plan_long_context(
    key_lengths: Sequence[int],
    filler_lengths: Sequence[int],
    *,
    target_tokens: int | tuple[int, int],
    rng: random.Random,
    separator_length: int = 0,
    keep_key_order: bool = False,
    exclude: Sequence[int] = (),
) -> tuple[list[tuple[int, int, int]], list[dict[str, Any]]]:
    """The layout of :func:`build_long_context` from token counts alone: ``(slots, key_positions)``.

    Draws exactly what :func:`build_long_context` draws from ``rng`` (it is built on this), so a caller
    that already holds every segment's ids or text can assemble a context, or just its text, without
    copying ids around. See :func:`build_long_context` for the parameters and the positions.
    """
    keys = list(key_lengths)
    if not keys:
        raise ValueError("need at least one key segment")
    if any(length <= 0 for length in keys):
        raise ValueError("key segments must not be empty")
    sep = separator_length
    key_total = sum(keys) + sep * (len(keys) - 1)

    if isinstance(target_tokens, int):
        target = target_tokens
        if target < key_total:
            raise ValueError(f"target length {target} is shorter than the key segments ({key_total} tokens)")
    else:
        min_tokens, max_tokens = target_tokens
        if key_total > max_tokens:
            raise ValueError(f"key segments take {key_total} tokens, more than max_tokens={max_tokens}")
        target = draw_target_length(rng, max(min_tokens, key_total), max_tokens)
        if 0 < target - key_total <= sep:
            # No filler fits in a gap this small; move to the nearest fillable length inside the range.
            target = key_total + sep + 1 if key_total + sep + 1 <= max_tokens else key_total
            if target < min_tokens:
                raise ValueError(f"no context length in [{min_tokens}, {max_tokens}] can be filled around "
                                 f"{key_total} key tokens with a {sep}-token separator")

    # Each filler adds itself plus one separator. A remaining budget of 1..len(separator) could not be
    # filled, so a filler that would leave one is cut instead: the budget ends at exactly 0.
    budget = target - key_total
    if 0 < budget <= sep:
        raise ValueError(f"target {target} is within the separator length of the key segments' length; "
                         f"no filler fits")
    used: set[int] = set(exclude)
    fillers: list[tuple[int, int, int]] = []
    while budget > 0:
        index = _draw_filler(rng, filler_lengths, used)
        used.add(index)
        length = filler_lengths[index]
        left = budget - sep - length
        if left == 0 or left > sep:
            fillers.append((FILLER, index, length))
            budget = left
        else:
            # Cut to the remaining budget (as a slice would: never longer than the segment itself).
            fillers.append((FILLER, index, min(length, budget - sep)))
            budget = 0

    total_segments = len(fillers) + len(keys)
    key_slots = rng.sample(range(total_segments), len(keys))
    if keep_key_order:
        key_slots.sort()
    slot_to_key = {slot: key for key, slot in enumerate(key_slots)}
    filler_iter = iter(fillers)
    slots: list[tuple[int, int, int]] = []
    positions: dict[int, dict[str, Any]] = {}
    cursor = 0
    for slot in range(total_segments):
        if slot:
            cursor += sep
        if slot in slot_to_key:
            key = slot_to_key[slot]
            positions[key] = {"key": key, "segment_index": slot, "token_start": cursor,
                              "token_end": cursor + keys[key]}
            slots.append((KEY, key, keys[key]))
            cursor += keys[key]
        else:
            filler = next(filler_iter)
            slots.append(filler)
            cursor += filler[2]
    for key, position in positions.items():
        room = cursor - keys[key]
        position["depth"] = position["token_start"] / room if room > 0 else 0.0
    return slots, [positions[key] for key in range(len(keys))]


def build_long_context(
    key_segments_ids: Sequence[Sequence[int]],
    filler_pool: Sequence[Sequence[int]],
    *,
    target_tokens: int | tuple[int, int],
    rng: random.Random,
    separator_ids: Sequence[int] = (),
    keep_key_order: bool = False,
    exclude: Sequence[int] = (),
) -> tuple[list[int], list[dict[str, Any]]]:
    """Shuffle the key segment(s) among random filler segments up to a token-length target.

    ``key_segments_ids``: the token ids of the segments the QA pair was made from (one for type 1, all
    of the text's segments for type 2). ``filler_pool``: token ids of segments from *other* texts
    (``exclude`` lists pool indices to skip, e.g. the key text's own segments if the pool holds them).
    ``target_tokens``: an exact length, or ``(min_tokens, max_tokens)`` to draw it uniformly (the draw
    starts at the key segments' own length when that exceeds ``min_tokens``). ``separator_ids`` are put
    between consecutive segments (e.g. the ids of ``"\\n"``) and count towards the length.

    Fillers are drawn without replacement, whole while they fit; the filler that would overflow is cut
    to the exact remaining budget, so the context is exactly the target length: never above the max,
    never below the min. Each key segment appears exactly once, unmodified; the key segments take
    uniformly random slots among all segments (in their original order if ``keep_key_order``).

    Returns ``(context_ids, key_positions)``; ``key_positions[j]`` describes key segment ``j``:
    ``{"key": j, "segment_index": slot among the context's segments, "token_start", "token_end":
    its token range in context_ids, "depth": token_start / (len(context) - len(segment)), in [0, 1]}``.
    """
    slots, positions = plan_long_context(
        [len(segment) for segment in key_segments_ids], _Lengths(filler_pool), target_tokens=target_tokens,
        rng=rng, separator_length=len(separator_ids), keep_key_order=keep_key_order, exclude=exclude)
    separator = list(separator_ids)
    context: list[int] = []
    for number, (kind, index, length) in enumerate(slots):
        if number:
            context.extend(separator)
        segment = key_segments_ids[index] if kind == KEY else filler_pool[index]
        context.extend(segment if length == len(segment) else segment[:length])
    return context, positions


class ContextText:
    """Renders planned contexts (:func:`plan_long_context`) as text, and each key's character range.

    The reference is ``decode(context_ids)`` and ``len(decode(context_ids[:token_start]))``. When the
    tokenizer's decoding is *concatenative* (``decode(a + b) == decode(a) + decode(b)`` whenever ``b``
    starts where a tokenized text starts: true of byte-level BPE without clean-up, whose decoding is
    the UTF-8 of the concatenated bytes) and no special token is involved, the text is the join of each
    segment's decoded text, decoded once per segment and cached, and the key offsets are running sums
    of piece lengths: no context is decoded whole and no prefix is decoded at all. Otherwise (e.g.
    SentencePiece-style decoders that strip the first space) every context takes the reference path.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], separator_ids: Sequence[int], *,
                 concatenative: bool, special_ids: frozenset[int] = frozenset()):
        self.decode = decode
        self.separator_ids = list(separator_ids)
        self.special_ids = special_ids
        self.concatenative = concatenative and not (special_ids & set(self.separator_ids))
        self.separator_text = decode(self.separator_ids) if self.separator_ids else ""
        self._texts: dict[int, str | None] = {}  # id(segment ids) -> decoded text, None: has a special token
        self._pinned: list[Sequence[int]] = []   # keeps the cached lists alive so their id() stays unique

    def _piece(self, ids: Sequence[int]) -> str | None:
        key = id(ids)
        if key not in self._texts:
            self._pinned.append(ids)
            self._texts[key] = None if not self.special_ids.isdisjoint(ids) else self.decode(ids)
        return self._texts[key]

    def render(self, slots: Sequence[tuple[int, int, int]], positions: list[dict[str, Any]],
               keys: Sequence[Sequence[int]], pool: Sequence[Sequence[int]]) -> str:
        """The context's text; adds ``char_start``/``char_end`` to each of ``positions``."""
        if self.concatenative:
            pieces: list[str] = []
            starts: list[int] = []
            cursor = 0
            for number, (kind, index, length) in enumerate(slots):
                if number:
                    cursor += len(self.separator_text)
                segment = keys[index] if kind == KEY else pool[index]
                if length == len(segment):
                    piece = self._piece(segment)
                else:  # the one filler cut to the target length: decoded on its own, not cached
                    cut = segment[:length]
                    piece = None if not self.special_ids.isdisjoint(cut) else self.decode(cut)
                if piece is None:
                    break
                pieces.append(piece)
                starts.append(cursor)
                cursor += len(piece)
            else:
                for position in positions:
                    slot = position["segment_index"]
                    position["char_start"] = starts[slot]
                    position["char_end"] = starts[slot] + len(pieces[slot])
                return self.separator_text.join(pieces)
        context_ids: list[int] = []
        for number, (kind, index, length) in enumerate(slots):
            if number:
                context_ids.extend(self.separator_ids)
            segment = keys[index] if kind == KEY else pool[index]
            context_ids.extend(segment if length == len(segment) else segment[:length])
        for position in positions:
            position["char_start"] = len(self.decode(context_ids[: position["token_start"]]))
            position["char_end"] = len(self.decode(context_ids[: position["token_end"]]))
        return self.decode(context_ids)


def interleave_samples(
    rows: Sequence[Mapping[str, Any]],
    pool: Sequence[Sequence[int]],
    pool_text_ids: Sequence[str],
    keys_ids: Callable[[Mapping[str, Any]], list[Sequence[int]]],
    text: ContextText,
    *,
    question: str,
    answer: str,
    min_tokens: int,
    max_tokens: int,
    short_ratio: float,
    chat: bool,
    rng: random.Random,
    on_error: Callable[[Mapping[str, Any], ValueError], Exception],
) -> tuple[list[dict[str, Any]], list[str]]:
    """IN2 samples for QA ``rows``: each row's key segment(s) hidden among ``pool`` segments.

    ``pool``: each pool segment's token ids; ``pool_text_ids``: the text each came from (a row's own
    text is never its filler). ``keys_ids(row)``: the ids of the row's key segments. ``rows`` must
    already hold a question, an answer and a key. Returns ``(samples, ids of rows skipped because their
    keys exceed max_tokens)``; a row that cannot be assembled raises ``on_error(row, error)``.
    """
    by_text: dict[str, list[int]] = {}
    for index, text_id in enumerate(pool_text_ids):
        by_text.setdefault(text_id, []).append(index)
    pool_lengths = _Lengths(pool)
    sep = len(text.separator_ids)
    short_count = round(short_ratio * len(rows))
    short_rows = set(rng.sample(range(len(rows)), min(short_count, len(rows))))
    out: list[dict[str, Any]] = []
    too_long: list[str] = []
    for i, row in enumerate(rows):
        keys = keys_ids(row)
        key_lengths = [len(k) for k in keys]
        text_id = str(row.get("text_id", ""))
        if sum(key_lengths) + sep * (len(keys) - 1) > max_tokens:
            too_long.append(str(row.get("id")))  # cannot be hidden in a context of at most max_tokens
            continue
        try:
            planned = [(False, *plan_long_context(key_lengths, pool_lengths, target_tokens=(min_tokens, max_tokens),
                                                  rng=rng, separator_length=sep,
                                                  exclude=by_text.get(text_id, [])))]
        except ValueError as exc:
            raise on_error(row, exc) from None
        if i in short_rows:
            planned.append((True, *plan_long_context(key_lengths, (), target_tokens=sum(key_lengths) + sep * (len(keys) - 1),
                                                     rng=rng, separator_length=sep)))
        for is_short, slots, positions in planned:
            context = text.render(slots, positions, keys, pool)
            new = {"id": f"{row['id']}{'#short' if is_short else ''}", "question": row[question],
                   "answer": row[answer], "context_tokens": sum(length for _, _, length in slots) + sep * (len(slots) - 1),
                   "key_positions": positions, "short": is_short, "text_id": text_id}
            if chat:
                new["messages"] = in2_messages(context, row[question], row[answer])
            else:
                new["prompt"] = film_prompt(context, row[question]) + " "
                new["completion"] = str(row[answer])
            out.append(new)
    return out, too_long


# --------------------------------------------------------------------------------------------------
# Prompt and mixing
# --------------------------------------------------------------------------------------------------


def film_instruction(context: str, question: str) -> str:
    """The FILM prompt without the ``[INST]``/``[/INST]`` markup, for a chat template to wrap."""
    return FILM_INSTRUCTION_TEMPLATE.format(context=context, question=question)


def film_prompt(context: str, question: str) -> str:
    """The FILM-7B prompt, exactly: ``[INST] Below is a context ... ### Instruction:\\n{q} [/INST]``."""
    return FILM_PROMPT_TEMPLATE.format(context=context, question=question)


def in2_messages(context: str, question: str, answer: str) -> list[dict[str, str]]:
    """Chat messages for a model served with its own template: FILM instruction, then the answer
    (the only part with loss under :func:`specdsl.designs.masking.render_chat`'s default)."""
    return [{"role": "user", "content": film_instruction(context, question)},
            {"role": "assistant", "content": answer}]


def mix_short_context(samples: Sequence[Any], short_samples: Sequence[Any], ratio: float,
                      rng: random.Random) -> list[Any]:
    """Add ``round(ratio * len(samples))`` short-context samples (drawn without replacement) and shuffle.

    ``ratio`` is short samples per long sample: the paper's 150K short-context QA for 1.4M IN2 samples
    is ``ratio≈0.107``. Raises ValueError when ``short_samples`` has fewer than needed.
    """
    if ratio < 0:
        raise ValueError("ratio must be >= 0")
    count = round(ratio * len(samples))
    if count > len(short_samples):
        raise ValueError(f"need {count} short-context samples for ratio {ratio}, have {len(short_samples)}")
    mixed = list(samples) + rng.sample(list(short_samples), count)
    rng.shuffle(mixed)
    return mixed


def key_position_histogram(depths: Sequence[float], bins: int) -> list[int]:
    """Counts of key depths (0..1) in ``bins`` equal bins: the input to a uniformity check."""
    counts = [0] * bins
    for depth in depths:
        counts[min(bins - 1, max(0, int(depth * bins)))] += 1
    return counts


def chi_square_uniform(counts: Sequence[int]) -> float:
    """Pearson's chi-square statistic of ``counts`` against the uniform distribution."""
    total = sum(counts)
    if total == 0:
        raise ValueError("no observations")
    expected = total / len(counts)
    return sum((observed - expected) ** 2 / expected for observed in counts)

