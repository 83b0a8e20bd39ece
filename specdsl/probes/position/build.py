"""Building a probe: contexts filled up to ``context_tokens`` around each target, the target's midpoint
placed so that its relative token position falls in the requested bucket."""

from __future__ import annotations

import math
import random
from typing import Mapping

from specdsl.probes.position.items import (IN2_TEMPLATE, INSTRUCTIONS, JOINERS, CountTokens, ProbeItem, approx_token_count,
                                          check_task)
from specdsl.probes.position.targets import FILLERS, TARGETS, Target


class _MemoCounter:
    """Caches token counts of repeated units (sentences and functions recur across items)."""

    def __init__(self, count_tokens: CountTokens):
        self._count = count_tokens
        self._memo: dict[str, int] = {}

    def __call__(self, text: str) -> int:
        n = self._memo.get(text)
        if n is None:
            n = int(self._count(text))
            if len(text) < 20_000:  # whole contexts are counted once; keep only units
                self._memo[text] = n
        return n


def bucket_of(position: float, n_buckets: int) -> int:
    return min(int(position * n_buckets), n_buckets - 1)


def _assemble(fillers: list[str], k: int, target: str, joiner: str) -> tuple[str, int, int]:
    before = joiner.join(fillers[:k])
    after = joiner.join(fillers[k:])
    start = len(before) + (len(joiner) if k > 0 else 0)
    end = start + len(target)
    parts = [p for p in (before, target, after) if p]
    return joiner.join(parts), start, end


def _place(task: str, target: Target, fillers: list[str], bucket: int, n_buckets: int,
           budget: int, rng: random.Random, tokens: _MemoCounter) -> tuple[str, int, int, float, int]:
    """Insert the target among the fillers so that its measured midpoint falls in ``bucket``.

    The insertion index is first chosen from additive estimates (unit counts plus separators), then the
    assembled context is measured with the real counter: a context over budget loses a filler, a
    midpoint outside the bucket moves the target by one unit, until both hold.
    """
    joiner = JOINERS[task]
    sep = tokens(joiner)
    target_tokens = tokens(target.text)
    unit_tokens = [tokens(f) for f in fillers]
    total_est = sum(unit_tokens) + target_tokens + len(fillers) * sep
    lo, hi = bucket / n_buckets, (bucket + 1) / n_buckets
    prefix, mids = 0, []
    for k in range(len(fillers) + 1):
        mids.append((prefix + target_tokens / 2) / total_est)
        if k < len(fillers):
            prefix += unit_tokens[k] + sep
    inside = [k for k, mid in enumerate(mids) if lo <= mid < hi]
    center = (lo + hi) / 2
    k = rng.choice(inside) if inside else min(range(len(mids)), key=lambda i: abs(mids[i] - center))

    fillers = list(fillers)
    visited: set[tuple[int, int]] = set()
    while True:
        context, start, end = _assemble(fillers, k, target.text, joiner)
        total = tokens(context)
        if total > budget:
            if not fillers:
                break
            if k < len(fillers):
                fillers.pop()            # drop from the far end: the target's index is unchanged
            else:
                fillers.pop(0)
                k -= 1
            continue
        position = (tokens(context[:start]) + tokens(target.text) / 2) / total if total else 0.0
        position = min(position, math.nextafter(1.0, 0.0))
        if bucket_of(position, n_buckets) == bucket:
            return context, start, end, position, total
        if (k, len(fillers)) in visited:
            break
        visited.add((k, len(fillers)))
        step = 1 if position < lo else -1
        if not 0 <= k + step <= len(fillers):
            break
        k += step
    raise ValueError(
        f"cannot place a {task} target in position bucket {bucket} of {n_buckets} within "
        f"{budget} tokens: raise context_tokens or lower n_buckets")


def build_position_probe(
    task: str,
    *,
    context_tokens: int,
    n_buckets: int = 8,    # the evaluate step's defaults (PositionProbe.DEFAULTS; a test keeps them equal)
    per_bucket: int = 4,
    seed: int = 0,
    count_tokens: CountTokens | None = None,
    system: str | None = None,
    template: str = IN2_TEMPLATE,
) -> list[ProbeItem]:
    """Build ``n_buckets * per_bucket`` probe items for ``task``, ordered by bucket.

    ``context_tokens`` bounds the context alone (the template and instruction add a few dozen tokens on
    top). Each unit of the context (sentence, function, record) is at most ``context_tokens / n_buckets``
    tokens so every bucket can be hit. Targets are distinct within one build where the source allows.
    ``template`` must contain ``{context}`` and ``{instruction}``; ``system`` adds a system message.
    """
    check_task(task)
    if context_tokens <= 0 or n_buckets <= 0 or per_bucket <= 0:
        raise ValueError("context_tokens, n_buckets and per_bucket must be positive")
    if "{context}" not in template or "{instruction}" not in template:
        raise ValueError("template must contain {context} and {instruction}")
    tokens = _MemoCounter(count_tokens or approx_token_count)
    max_unit = context_tokens // n_buckets
    wanted = n_buckets * per_bucket
    targets = TARGETS[task](random.Random(f"specdsl.position:{task}:{seed}:targets"), wanted, max_unit,
                             tokens)
    if not targets:
        raise ValueError(f"no {task} target fits in {max_unit} tokens: raise context_tokens or lower n_buckets")
    while len(targets) < wanted:  # a small source repeats targets rather than under-filling buckets
        targets = targets + targets[:wanted - len(targets)]

    joiner = JOINERS[task]
    sep = tokens(joiner)
    items: list[ProbeItem] = []
    for index, target in enumerate(targets):
        bucket, sample = divmod(index, per_bucket)
        rng = random.Random(f"specdsl.position:{task}:{seed}:{bucket}:{sample}")
        room = context_tokens - tokens(target.text)
        chosen: list[str] = []
        pool = FILLERS[task](rng, target)
        # Two rounds: the first fills by summed unit counts (an upper bound for subadditive counters,
        # close for real tokenizers); the second spends whatever the measured context left free.
        for _ in range(2):
            used, misses = 0, 0
            for filler in pool:
                size = tokens(filler)
                if size > max_unit:
                    continue  # a unit wider than a bucket would make some buckets unreachable
                if used + size + sep <= room:
                    chosen.append(filler)
                    used += size + sep
                    misses = 0
                else:
                    misses += 1
                    if misses >= 64 or room - used <= sep:
                        break  # the context is as full as the remaining units allow
            room = context_tokens - tokens(joiner.join([*chosen, target.text]))
            if room <= sep:
                break
        context, start, end, position, total = _place(task, target, chosen, bucket, n_buckets,
                                                      context_tokens, rng, tokens)
        instruction = INSTRUCTIONS[task].format(query=target.query)
        # Plain replacement, not str.format: contexts (code, docstrings) are full of braces.
        head, tail = template.split("{context}", 1)
        head = head.replace("{instruction}", instruction)
        tail = tail.replace("{instruction}", instruction)
        content = head + context + tail
        messages: list[Mapping[str, str]] = []
        if system is not None:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": content})
        items.append(ProbeItem(
            task=task, messages=tuple(messages), expected=target.expected, bucket=bucket,
            position=position, n_buckets=n_buckets, query=target.query, context_tokens=total,
            context_span=(len(head), len(head) + len(context)), target_span=(start, end)))
    return items
