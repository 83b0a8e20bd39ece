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
from typing import Any, Callable, Sequence

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


def _draw_filler(rng: random.Random, pool: Sequence[Sequence[int]], used: set[int]) -> int:
    # Rejection sampling is O(1) for the usual huge pool; an almost-used-up pool falls back to a scan.
    for _ in range(64):
        index = rng.randrange(len(pool))
        if index not in used and len(pool[index]) > 0:
            return index
    remaining = [index for index in range(len(pool)) if index not in used and len(pool[index]) > 0]
    if not remaining:
        raise ValueError("the filler pool ran out of unused non-empty segments before the target length")
    return rng.choice(remaining)


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
    keys = [list(segment) for segment in key_segments_ids]
    if not keys:
        raise ValueError("need at least one key segment")
    if any(not segment for segment in keys):
        raise ValueError("key segments must not be empty")
    separator = list(separator_ids)
    key_total = sum(len(segment) for segment in keys) + len(separator) * (len(keys) - 1)

    if isinstance(target_tokens, int):
        target = target_tokens
        if target < key_total:
            raise ValueError(f"target length {target} is shorter than the key segments ({key_total} tokens)")
    else:
        min_tokens, max_tokens = target_tokens
        if key_total > max_tokens:
            raise ValueError(f"key segments take {key_total} tokens, more than max_tokens={max_tokens}")
        target = draw_target_length(rng, max(min_tokens, key_total), max_tokens)
        if 0 < target - key_total <= len(separator):
            # No filler fits in a gap this small; move to the nearest fillable length inside the range.
            target = key_total + len(separator) + 1 if key_total + len(separator) + 1 <= max_tokens else key_total
            if target < min_tokens:
                raise ValueError(f"no context length in [{min_tokens}, {max_tokens}] can be filled around "
                                 f"{key_total} key tokens with a {len(separator)}-token separator")

    # Each filler adds itself plus one separator. A remaining budget of 1..len(separator) could not be
    # filled, so a filler that would leave one is cut instead: the budget ends at exactly 0.
    budget = target - key_total
    if 0 < budget <= len(separator):
        raise ValueError(f"target {target} is within the separator length of the key segments' length; "
                         f"no filler fits")
    used: set[int] = set(exclude)
    fillers: list[list[int]] = []
    while budget > 0:
        index = _draw_filler(rng, filler_pool, used)
        used.add(index)
        filler = list(filler_pool[index])
        cost = len(separator) + len(filler)
        left = budget - cost
        if left == 0 or left > len(separator):
            fillers.append(filler)
            budget = left
        else:
            fillers.append(filler[: budget - len(separator)])
            budget = 0

    total_segments = len(fillers) + len(keys)
    key_slots = rng.sample(range(total_segments), len(keys))
    if keep_key_order:
        key_slots.sort()
    slot_to_key = {slot: key for key, slot in enumerate(key_slots)}
    filler_iter = iter(fillers)
    context: list[int] = []
    positions: dict[int, dict[str, Any]] = {}
    for slot in range(total_segments):
        if slot:
            context.extend(separator)
        if slot in slot_to_key:
            key = slot_to_key[slot]
            positions[key] = {"key": key, "segment_index": slot, "token_start": len(context),
                              "token_end": len(context) + len(keys[key])}
            context.extend(keys[key])
        else:
            context.extend(next(filler_iter))
    for key, position in positions.items():
        room = len(context) - len(keys[key])
        position["depth"] = position["token_start"] / room if room > 0 else 0.0
    return context, [positions[key] for key in range(len(keys))]


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

