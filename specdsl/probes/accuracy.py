"""Task accuracy, and the prompt-erasure comparison of Orca 2 (Mitra et al. 2023, arXiv 2311.11045).

Prompt erasure trains a student on a teacher's answers given under *detailed* task-specific system
instructions, with those instructions replaced by a *generic* one. The question the evaluation answers
is whether the student, under the generic prompt, reaches what the base model only reaches when told
the strategy. Hence the same questions under several conditions, typically::

    student + generic prompt     (the trained model as it will be used)
    base    + generic prompt     (what training added)
    base    + detailed prompt    (what the erased instructions were worth before training)

Each condition is an ``answer(prompts) -> texts`` callable plus a system prompt (a string, None, or a
function of the row, e.g. the per-category strategy). Correctness comes from a ``match(pred, gold)``
callable passed in -- the same one the data filter uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from specdsl.probes.claims import Evidence, Metric
from specdsl.probes.stats import paired_difference, percent_interval
from specdsl.tables import format_table

AnswerFn = Callable[[list[list[dict]]], list[str]]
Match = Callable[[str, str], bool]

__all__ = [
    "AccuracyResult", "Condition", "GroupAccuracy", "accuracy_table", "build_accuracy_prompts",
    "compare_conditions", "format_table", "paired_comparisons", "prompt_erasure_conditions", "score_accuracy",
]


@dataclass(frozen=True)
class GroupAccuracy:
    group: str
    n: int
    correct: int
    accuracy: float  # percent

    def to_dict(self) -> dict:
        return {**self.__dict__, "ci95": percent_interval(self.correct, self.n)}


@dataclass(frozen=True)
class AccuracyResult:
    """Accuracy in percent over ``n`` rows; ``groups`` per value of the group field when one was given;
    ``correct_flags`` per row, in row order (for paired comparisons between conditions)."""

    n: int
    correct: int
    accuracy: float
    groups: tuple[GroupAccuracy, ...] = ()
    correct_flags: tuple[bool, ...] = ()

    def to_dict(self, *, with_flags: bool = False) -> dict:
        out = {"n": self.n, "correct": self.correct, "accuracy": self.accuracy,
               "ci95": percent_interval(self.correct, self.n), "groups": [g.to_dict() for g in self.groups]}
        if with_flags:
            out["correct_flags"] = list(self.correct_flags)
        return out


def paired_comparisons(results: Mapping[str, AccuracyResult], baseline: str | None) -> list[dict]:
    """Each condition against ``baseline`` on the same items: the difference in points with a paired
    bootstrap interval and the exact McNemar test. Conditions scored on other items are not paired."""
    if baseline is None or baseline not in results:
        return []
    base = results[baseline]
    out = []
    for name, res in results.items():
        if name == baseline or len(res.correct_flags) != len(base.correct_flags) or not res.correct_flags:
            continue
        out.append({"condition": name, "vs": baseline, **paired_difference(res.correct_flags, base.correct_flags)})
    return out


def build_accuracy_prompts(
    rows: Sequence[Mapping],
    system: "str | Callable[[Mapping], str | None] | None" = None,
    user_field: str = "question",
) -> list[list[dict]]:
    """One chat per row: the system message (a fixed string, or ``system(row)`` for per-row
    instructions; None or an empty result leaves it out), then ``row[user_field]`` as the user turn."""
    prompts = []
    for row in rows:
        text = system(row) if callable(system) else system
        messages = [{"role": "system", "content": text}] if text else []
        messages.append({"role": "user", "content": str(row[user_field])})
        prompts.append(messages)
    return prompts


def score_accuracy(
    rows: Sequence[Mapping],
    answers: Sequence[str],
    match: Match,
    gold_field: str = "answer",
    *,
    group_field: str | None = None,
) -> AccuracyResult:
    """Share of answers that ``match`` the row's gold value (percent), overall and per group."""
    if len(rows) != len(answers):
        raise ValueError(f"{len(rows)} rows but {len(answers)} answers")
    if not rows:
        raise ValueError("no rows to score")
    flags = tuple(answer is not None and bool(match(answer, str(row[gold_field])))
                  for row, answer in zip(rows, answers))
    groups: tuple[GroupAccuracy, ...] = ()
    if group_field is not None:
        tally: dict[str, list[int]] = {}
        for row, ok in zip(rows, flags):
            counts = tally.setdefault(str(row[group_field]), [0, 0])
            counts[0] += 1
            counts[1] += ok
        groups = tuple(GroupAccuracy(g, n, c, 100.0 * c / n) for g, (n, c) in sorted(tally.items()))
    correct = sum(flags)
    return AccuracyResult(n=len(rows), correct=correct, accuracy=100.0 * correct / len(rows),
                          groups=groups, correct_flags=flags)


@dataclass(frozen=True)
class Condition:
    """A way to ask the questions: who answers, under which system prompt."""

    name: str
    answer: AnswerFn
    system: "str | Callable[[Mapping], str | None] | None" = None


def prompt_erasure_conditions(
    *,
    student: AnswerFn,
    base: AnswerFn,
    generic_system: str | None,
    detailed_system: "str | Callable[[Mapping], str | None]",
) -> list[Condition]:
    """The three conditions of the prompt-erasure comparison, under fixed names."""
    return [
        Condition("student+generic", student, generic_system),
        Condition("base+generic", base, generic_system),
        Condition("base+detailed", base, detailed_system),
    ]


def compare_conditions(
    rows: Sequence[Mapping],
    conditions: Sequence[Condition],
    match: Match,
    *,
    user_field: str = "question",
    gold_field: str = "answer",
    group_field: str | None = None,
    batch_size: int | None = None,
) -> dict[str, AccuracyResult]:
    """Ask every condition the same questions and score each; keys keep the conditions' order."""
    names = [c.name for c in conditions]
    if len(set(names)) != len(names):
        raise ValueError(f"condition names must be unique: {names}")
    results: dict[str, AccuracyResult] = {}
    for condition in conditions:
        prompts = build_accuracy_prompts(rows, condition.system, user_field)
        size = batch_size or len(prompts) or 1
        answers: list[str] = []
        for start in range(0, len(prompts), size):
            batch = prompts[start:start + size]
            got = list(condition.answer(batch))
            if len(got) != len(batch):
                raise ValueError(f"condition {condition.name!r} returned {len(got)} texts for {len(batch)} prompts")
            answers.extend(got)
        results[condition.name] = score_accuracy(rows, answers, match, gold_field, group_field=group_field)
    return results


def accuracy_table(
    results: Mapping[str, AccuracyResult],
    *,
    baseline: str | None = None,
    digits: int = 1,
) -> list[dict[str, object]]:
    """One row per condition: n, correct, accuracy, and ``delta`` (points vs ``baseline``) when a
    baseline is named; one ``acc[<group>]`` column per group when results carry groups."""
    if baseline is not None and baseline not in results:
        raise ValueError(f"baseline {baseline!r} is not one of {list(results)}")
    group_names = list(dict.fromkeys(g.group for r in results.values() for g in r.groups))
    rows = []
    for name, result in results.items():
        row: dict[str, object] = {"condition": name, "n": result.n, "correct": result.correct,
                                  "accuracy": round(result.accuracy, digits)}
        if baseline is not None:
            row["delta"] = round(result.accuracy - results[baseline].accuracy, digits)
        by_group = {g.group: g for g in result.groups}
        for group in group_names:
            g = by_group.get(group)
            row[f"acc[{group}]"] = None if g is None else round(g.accuracy, digits)
        rows.append(row)
    return rows


def accuracy_evidence(results: Mapping[str, AccuracyResult]) -> Evidence:
    """The per-item outcomes a claim compares: each condition's right/wrong flags (the same items, in
    order, under every condition); the metric ``accuracy`` is their mean, so McNemar applies."""
    return Evidence(arms={name: list(res.correct_flags) for name, res in results.items()},
                    metrics={"accuracy": Metric(value=_percent_true, flag=bool, description="share right (%)")})


def _percent_true(flags: Sequence[bool]) -> float | None:
    return 100.0 * sum(flags) / len(flags) if flags else None
