"""Scoring a probe: one answer by the paper's matching rules, accuracy per position bucket with the
average and the max-min gap, several tasks combined as Table 1's "All" column."""

from __future__ import annotations

import math
import re
from typing import Sequence

from specdsl.probes.position.items import AnswerFn, PositionResult, ProbeItem, check_task

_WORD = re.compile(r"\w+")


def score_answer(task: str, answer: str, expected: str) -> float:
    """The score of one answer in [0, 1], following the matching rules of the paper's ``plot.py``."""
    check_task(task)
    answer = answer or ""
    if task == "document":
        # Word recall of the gold sentence. Words are \w+ runs rather than whitespace splits, so quotes
        # and punctuation around a copied sentence do not cost recall.
        gold = set(_WORD.findall(expected.lower()))
        if not gold:
            return 0.0
        return len(gold & set(_WORD.findall(answer.lower()))) / len(gold)
    if task == "code":
        # Whole-word match: "get" must not count as found inside "get_value".
        return 1.0 if re.search(rf"(?<!\w){re.escape(expected)}(?!\w)", answer) else 0.0
    normalized = " ".join(answer.lower().split())
    return 1.0 if " ".join(expected.lower().split()).strip(".") in normalized else 0.0


def score_position_probe(items: Sequence[ProbeItem], answers: Sequence[str]) -> PositionResult:
    """Per-bucket accuracy (percent), the mean over buckets and the max-min gap.

    Items may mix tasks only if they share ``n_buckets``; the result's ``task`` then joins their names.
    """
    if len(items) != len(answers):
        raise ValueError(f"{len(items)} items but {len(answers)} answers")
    if not items:
        raise ValueError("no items to score")
    n_buckets = items[0].n_buckets
    if any(item.n_buckets != n_buckets for item in items):
        raise ValueError("items come from probes with different n_buckets")
    sums = [0.0] * n_buckets
    counts = [0] * n_buckets
    scores: list[list[float]] = [[] for _ in range(n_buckets)]
    for item, answer in zip(items, answers):
        score = score_answer(item.task, answer, item.expected)
        sums[item.bucket] += score
        counts[item.bucket] += 1
        scores[item.bucket].append(score)
    per_bucket = tuple(100.0 * s / c if c else math.nan for s, c in zip(sums, counts))
    filled = [v for v in per_bucket if not math.isnan(v)]
    tasks = "+".join(dict.fromkeys(item.task for item in items))
    return PositionResult(task=tasks, per_bucket=per_bucket, counts=tuple(counts),
                          avg=sum(filled) / len(filled), gap=max(filled) - min(filled), n=len(items),
                          bucket_scores=tuple(tuple(s) for s in scores))


def combine_position_results(results: Sequence[PositionResult], task: str = "all") -> PositionResult:
    """The paper's "All" column: the mean of the tasks' averages and the mean of their gaps.

    (The gap of the mean curve would be smaller, because tasks sag at different positions; Table 1
    averages the per-task gaps.) ``per_bucket`` is the mean curve, for plotting.
    """
    if not results:
        raise ValueError("no results to combine")
    n_buckets = results[0].n_buckets
    if any(r.n_buckets != n_buckets for r in results):
        raise ValueError("results have different numbers of buckets")
    per_bucket = []
    for b in range(n_buckets):
        values = [r.per_bucket[b] for r in results if not math.isnan(r.per_bucket[b])]
        per_bucket.append(sum(values) / len(values) if values else math.nan)
    counts = tuple(sum(r.counts[b] for r in results) for b in range(n_buckets))
    return PositionResult(task=task, per_bucket=tuple(per_bucket), counts=counts,
                          avg=sum(r.avg for r in results) / len(results),
                          gap=sum(r.gap for r in results) / len(results),
                          n=sum(r.n for r in results))


def run_position_probe(items: Sequence[ProbeItem], answer: AnswerFn, *,
                       batch_size: int | None = None) -> tuple[PositionResult, list[str]]:
    """Ask ``answer`` every item's prompt (in batches when ``batch_size`` is set) and score the answers.

    Returns the result and the raw answers (keep them: rescoring is free, regenerating is not).
    """
    prompts = [item.prompt() for item in items]
    size = batch_size or len(prompts) or 1
    answers: list[str] = []
    for start in range(0, len(prompts), size):
        batch = prompts[start:start + size]
        got = list(answer(batch))
        if len(got) != len(batch):
            raise ValueError(f"answer() returned {len(got)} texts for {len(batch)} prompts")
        answers.extend(got)
    return score_position_probe(items, answers), answers
