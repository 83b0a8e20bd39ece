"""Self-correction probe for models trained with Partial Answer Masking (Han et al., AAAI 2024,
arXiv 2401.07301).

A PAM-trained model answers, verifies its own answer and, when the verification is negative, answers
again -- all in one output (the sample format of :mod:`specdsl.designs.pam`, parts separated by blank
lines)::

    7 x 8 = 54. Answer: 54

    Verification: the answer above is incorrect. Let me solve it again.

    7 x 8 = 56. Answer: 56

    Verification: the answer above is correct.

The probe compares the *initial* answer with the *final* one against the gold answer: accuracy before
and after, how many wrong answers were fixed (wrong->right) and how many right answers were broken
(right->wrong), and how often the first verification told the truth (it should say "correct" exactly
when the initial answer matched gold -- the self-verification accuracy the paper's PAM ablation reads).

The output format belongs to whoever builds the training samples, so parsing is a parameter:
``parse(text) -> (initial, verification_positive, final)``. :func:`parse_self_correction` handles the
format above, with or without ``Answer:`` lines, and inline variants ("Answer: 54 Verification: not
correct. Answer: 56"). Matching is a parameter too (``match(pred, gold) -> bool``): pass the matcher
the data filter uses, so "correct" means the same thing in training data and in evaluation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from specdsl.probes.claims import Evidence, Metric
from specdsl.probes.stats import mcnemar_exact, percent_interval, significant

Parse = Callable[[str], "tuple[str | None, bool | None, str | None]"]
Match = Callable[[str, str], bool]

# Optional instruction for models that were *not* trained on the format (a base model baseline). A
# PAM-trained student should be probed without it: it learned the format from its data.
FORMAT_INSTRUCTION = (
    "Solve the problem and end your solution with a line 'Answer: <answer>'. Then check your answer on "
    "a line starting with 'Verification:' that says whether it is correct or incorrect. If it is "
    "incorrect, solve the problem again and end with a new line 'Answer: <answer>'."
)

# "Answer:" (also "Final answer:"), value up to the end of the line or an inline "Verification:".
_ANSWER = re.compile(r"\banswer\s*:\s*(?P<value>.*?)\s*(?=\n|$|\bverification\s*:)", re.IGNORECASE)
_VERIFICATION_START = re.compile(r"\bverification\s*:\s*", re.IGNORECASE)
# A verification runs to the next blank line (the PAM separator) or to an inline "Answer:".
_VERIFICATION_END = re.compile(r"\n\s*\n|\banswer\s*:", re.IGNORECASE)
# Negative words are checked first: "not correct" contains "correct".
_NEGATIVE = re.compile(
    r"\b(incorrect|wrong|mistaken|mistake|erroneous|not\s+(?:correct|right|valid)|"
    r"isn't\s+(?:correct|right)|is\s+not\s+(?:correct|right))\b", re.IGNORECASE)
_POSITIVE = re.compile(r"\b(correct|right|true|valid|verified|confirmed)\b", re.IGNORECASE)


def verification_polarity(text: str) -> bool | None:
    """True when a verification says the answer is correct, False when it says it is not, else None."""
    if _NEGATIVE.search(text):
        return False
    if _POSITIVE.search(text):
        return True
    return None


def _answer_of(attempt: str) -> str | None:
    """The last ``Answer:`` value of an attempt, else the whole attempt (the matcher extracts from it)."""
    values = [m.group("value").strip().rstrip(".").strip() for m in _ANSWER.finditer(attempt)]
    values = [v for v in values if v]
    if values:
        return values[-1]
    return attempt.strip() or None


def parse_self_correction(text: str) -> tuple[str | None, bool | None, str | None]:
    """Split a self-correcting output into (initial answer, first verification's verdict, final answer).

    The output is cut at its ``Verification:`` markers into attempts (PAM's ``attempt ∥ verification ∥
    attempt ∥ ... ∥ verification``); a verification ends at the next blank line or inline ``Answer:``.
    An attempt's answer is its last ``Answer:`` value (minus a trailing period), or the whole attempt
    when it has none -- a reasoning that ends "so the result is 56." still reaches the matcher. The
    initial answer comes from the first attempt, the final answer from the last non-empty one. The
    verdict is that of the first verification: True "correct", False "incorrect", None when there is
    no verification or it says neither.
    """
    text = text or ""
    attempts: list[str] = []
    verdict: bool | None = None
    cursor = 0
    first = True
    while True:
        marker = _VERIFICATION_START.search(text, cursor)
        if marker is None:
            attempts.append(text[cursor:])
            break
        attempts.append(text[cursor:marker.start()])
        end = _VERIFICATION_END.search(text, marker.end())
        stop = end.start() if end else len(text)
        if first:
            verdict = verification_polarity(text[marker.end():stop])
            first = False
        cursor = stop
    answers = [_answer_of(a) for a in attempts]
    given = [a for a in answers if a is not None]
    # The initial answer is strictly the first attempt's: an output that opens with a verification has
    # no initial answer, whatever follows.
    return answers[0], verdict, (given[-1] if given else None)


@dataclass(frozen=True)
class SelfCorrectionCase:
    """One question's outcome. ``verification_correct`` is None when the output carried no verdict, or a
    verdict but no answer to judge."""

    initial: str | None
    verification_positive: bool | None
    final: str | None
    initial_correct: bool
    final_correct: bool
    verification_correct: bool | None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class SelfCorrectionResult:
    """Self-correction metrics. Accuracies and rates are percentages; a rate whose denominator is zero
    is None.

    * ``wrong_to_right_rate``: share of initially wrong answers that the final answer fixes.
    * ``right_to_wrong_rate``: share of initially right answers that the final answer breaks.
    * ``verification_accuracy``: share of verdicts that agree with the gold check of the initial answer,
      over the ``n_verdicts`` outputs that carried an answer and a verdict on it.
    * the four ``said_*`` counts are the verification confusion matrix.
    """

    n: int
    initial_accuracy: float
    final_accuracy: float
    wrong_to_right: int
    right_to_wrong: int
    wrong_to_right_rate: float | None
    right_to_wrong_rate: float | None
    verification_accuracy: float | None
    n_verdicts: int
    said_correct_was_right: int
    said_correct_was_wrong: int
    said_incorrect_was_right: int
    said_incorrect_was_wrong: int
    no_answer: int
    cases: tuple[SelfCorrectionCase, ...] = ()

    @property
    def improvement(self) -> float:
        """Final minus initial accuracy, in points."""
        return self.final_accuracy - self.initial_accuracy

    def intervals(self) -> dict:
        """95% Wilson intervals of the accuracies and flip rates, and the exact McNemar test of final vs
        initial correctness (the same items answered twice: wrong->right against right->wrong)."""
        initially_right = round(self.initial_accuracy * self.n / 100)
        finally_right = round(self.final_accuracy * self.n / 100)
        return {
            "initial_ci95": percent_interval(initially_right, self.n),
            "final_ci95": percent_interval(finally_right, self.n),
            "wrong_to_right_ci95": percent_interval(self.wrong_to_right, self.n - initially_right),
            "right_to_wrong_ci95": percent_interval(self.right_to_wrong, initially_right),
            "p_mcnemar": significant(mcnemar_exact(self.wrong_to_right, self.right_to_wrong)),
        }

    def to_dict(self, *, with_cases: bool = False) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "cases"}
        out["improvement"] = self.improvement
        out.update(self.intervals())
        if with_cases:
            out["cases"] = [case.to_dict() for case in self.cases]
        return out


def build_self_correction_prompts(
    rows: Sequence[Mapping],
    *,
    question_field: str = "question",
    system: str | None = None,
    instruction: str | None = None,
) -> list[list[dict]]:
    """One chat per row: an optional system message, then the question (plus ``instruction`` after a
    blank line when given, e.g. :data:`FORMAT_INSTRUCTION` for an untrained baseline)."""
    prompts = []
    for row in rows:
        user = str(row[question_field])
        if instruction:
            user = f"{user}\n\n{instruction}"
        messages = [{"role": "system", "content": system}] if system is not None else []
        messages.append({"role": "user", "content": user})
        prompts.append(messages)
    return prompts


def _pct(part: int, whole: int) -> float | None:
    return 100.0 * part / whole if whole else None


def score_self_correction(
    rows: Sequence[Mapping],
    outputs: Sequence[str],
    match: Match,
    parse: Parse = parse_self_correction,
    *,
    gold_field: str = "answer",
) -> SelfCorrectionResult:
    """Score self-correcting outputs against ``row[gold_field]``. A missing answer counts as wrong."""
    if len(rows) != len(outputs):
        raise ValueError(f"{len(rows)} rows but {len(outputs)} outputs")
    if not rows:
        raise ValueError("no rows to score")
    cases = []
    for row, output in zip(rows, outputs):
        gold = str(row[gold_field])
        initial, verdict, final = parse(output or "")
        if final is None:
            final = initial  # an output with one answer keeps it
        initial_ok = initial is not None and bool(match(initial, gold))
        final_ok = final is not None and bool(match(final, gold))
        # A verdict on no answer at all says nothing about the model's judgement: not counted.
        verification_ok = None if verdict is None or initial is None else verdict == initial_ok
        cases.append(SelfCorrectionCase(initial, verdict, final, initial_ok, final_ok, verification_ok))

    n = len(cases)
    initially_right = sum(c.initial_correct for c in cases)
    wrong_to_right = sum(not c.initial_correct and c.final_correct for c in cases)
    right_to_wrong = sum(c.initial_correct and not c.final_correct for c in cases)
    with_verdict = [c for c in cases if c.verification_correct is not None]

    def said(positive: bool, right: bool) -> int:
        return sum(c.verification_positive is positive and c.initial_correct is right for c in with_verdict)

    return SelfCorrectionResult(
        n=n,
        initial_accuracy=100.0 * initially_right / n,
        final_accuracy=100.0 * sum(c.final_correct for c in cases) / n,
        wrong_to_right=wrong_to_right,
        right_to_wrong=right_to_wrong,
        wrong_to_right_rate=_pct(wrong_to_right, n - initially_right),
        right_to_wrong_rate=_pct(right_to_wrong, initially_right),
        verification_accuracy=_pct(sum(bool(c.verification_correct) for c in with_verdict), len(with_verdict)),
        n_verdicts=len(with_verdict),
        said_correct_was_right=said(True, True),
        said_correct_was_wrong=said(True, False),
        said_incorrect_was_right=said(False, True),
        said_incorrect_was_wrong=said(False, False),
        no_answer=sum(c.initial is None for c in cases),
        cases=tuple(cases),
    )


def _share(cases: Sequence[SelfCorrectionCase], count: Callable[[SelfCorrectionCase], bool],
           among: Callable[[SelfCorrectionCase], bool] = lambda c: True) -> float | None:
    pool = [c for c in cases if among(c)]
    return 100.0 * sum(map(count, pool)) / len(pool) if pool else None


def self_correction_metrics() -> dict[str, Metric]:
    """What a claim may compare between two models' self-correcting outputs on the same items."""
    return {
        "final_accuracy": Metric(lambda cs: _share(cs, lambda c: c.final_correct), flag=lambda c: c.final_correct,
                                 description="share right after self-correction (%)"),
        "initial_accuracy": Metric(lambda cs: _share(cs, lambda c: c.initial_correct),
                                   flag=lambda c: c.initial_correct, description="share right at first (%)"),
        "wrong_to_right": Metric(lambda cs: _share(cs, lambda c: c.final_correct, lambda c: not c.initial_correct),
                                 description="share of initially wrong answers fixed (%)"),
        "right_to_wrong": Metric(lambda cs: _share(cs, lambda c: not c.final_correct, lambda c: c.initial_correct),
                                 lower_is_better=True, description="share of initially right answers broken (%)"),
        "improvement": Metric(lambda cs: _share(cs, lambda c: c.final_correct) - _share(cs, lambda c: c.initial_correct)
                              if cs else None, description="final minus initial accuracy (points)"),
        "verification_accuracy": Metric(lambda cs: _share(cs, lambda c: bool(c.verification_correct),
                                                          lambda c: c.verification_correct is not None),
                                        description="share of verdicts that agree with the gold check (%)"),
    }


def self_correction_evidence(results: Mapping[str, SelfCorrectionResult]) -> Evidence:
    """Each model's per-question outcomes (the same questions, in order, for every model)."""
    return Evidence(arms={name: list(res.cases) for name, res in results.items()}, metrics=self_correction_metrics())
