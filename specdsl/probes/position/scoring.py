"""Scoring a probe: one answer by the paper's matching rules, accuracy per position bucket with the
average and the max-min gap, several tasks combined as Table 1's "All" column."""

from __future__ import annotations

import math
import re
from typing import Mapping, Sequence

from specdsl.probes.claims import Evidence, Metric
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


def position_evidence(items: Sequence[ProbeItem], answers_by_model: Mapping[str, Sequence[str]]) -> Evidence:
    """Each model's per-item outcome ``(task, bucket, score)`` on the same items (every task's, in order),
    stratified by task and bucket so a resample keeps each bucket's size. Metrics: ``<task> gap`` (max-min
    over buckets, lower is better) and ``<task> avg`` per task, and ``all gap`` / ``all avg`` (their means)
    when there are several tasks; the first is the default a claim compares."""
    tasks = list(dict.fromkeys(item.task for item in items))
    arms = {model: [(item.task, item.bucket, score_answer(item.task, answer, item.expected))
                    for item, answer in zip(items, answers)] for model, answers in answers_by_model.items()}
    metrics: dict[str, Metric] = {}
    for task in tasks:
        metrics[f"{task} gap"] = Metric(lambda out, t=task: _bucket_stat(out, t, gap=True), lower_is_better=True,
                                        description=f"{task}: max minus min accuracy over position buckets (points)")
        metrics[f"{task} avg"] = Metric(lambda out, t=task: _bucket_stat(out, t, gap=False),
                                        description=f"{task}: mean accuracy over position buckets (%)")
    if len(tasks) > 1:
        metrics = {"all gap": Metric(lambda out: _mean_over(out, tasks, True), lower_is_better=True,
                                     description="mean of the tasks' gaps (points)"),
                   "all avg": Metric(lambda out: _mean_over(out, tasks, False),
                                     description="mean of the tasks' averages (%)"), **metrics}
    return Evidence(arms=arms, metrics=metrics, strata=[(item.task, item.bucket) for item in items])


def _bucket_stat(outcomes: Sequence[tuple[str, int, float]], task: str, *, gap: bool) -> float | None:
    sums: dict[int, list[float]] = {}
    for t, bucket, score in outcomes:
        if t == task:
            sums.setdefault(bucket, []).append(score)
    if not sums:
        return None
    means = [100.0 * sum(v) / len(v) for v in sums.values()]
    return max(means) - min(means) if gap else sum(means) / len(means)


def _mean_over(outcomes: Sequence[tuple[str, int, float]], tasks: Sequence[str], gap: bool) -> float | None:
    values = [_bucket_stat(outcomes, t, gap=gap) for t in tasks]
    return None if any(v is None for v in values) else sum(values) / len(values)  # type: ignore[arg-type]
