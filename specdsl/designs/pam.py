"""Intrinsic self-correction data with Partial Answer Masking (Han et al., AAAI 2024, arXiv 2401.07301).

A model answers a question (reasoning + answer); string matching against the gold answer makes the row a
*good case* (right first time) or a *bad case* (wrong). The training sample is one assistant turn::

    reasoning_1 + answer_1 ∥ verification ∥ reasoning_2 + answer_2 ∥ ... ∥ final positive verification

Exact text format (all pieces are parameters, see :class:`SelfCorrectionFormat`)
------------------------------------------------------------------------------
The assistant content is the concatenation of these parts (``SEP`` = ``fmt.separator``, default
``"\\n\\n"``; every attempt and verification is stripped of surrounding whitespace first)::

    part                                   label                 PAM on   PAM off
    attempt_1                              initial_answer        *        trained
    SEP + verification_1 (negative)        verification          trained  trained
    SEP + attempt_2                        corrected_answer      *        trained
    ...                                    (one pair per wrong attempt)
    SEP + final verification (positive)    final_verification    trained  trained

    * trained iff that attempt is correct. Only the last attempt may be (and must be) correct.

Good case: ``attempt_1 + SEP + positive``; bad case: ``attempt_1 + SEP + negative + SEP + attempt_2 +
SEP + positive`` (more rounds repeat the middle pair). Negative verifications default to
``fmt.negative_verification``, the final one to ``fmt.positive_verification``; per-attempt texts (a
model's own critique) replace them. The separator opens the part it precedes, so under PAM the model
is trained to emit ``SEP + verification`` after an answer it was never trained to produce, and the
chat template's end-of-turn token after the final verification is trained as well (the model learns
to stop once it has verified an answer).

PAM on (the paper's method): no loss on the prompt, none on any *incorrect* attempt, loss on the
verifications and on the correct answer (in good cases the whole answer plus the positive verification).
PAM off (ablation): loss on everything the assistant says.

Pure functions over plain rows; the masks become tokens through :mod:`specdsl.designs.masking`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from specdsl.designs.matchers import match_answer


@dataclass(frozen=True)
class SelfCorrectionFormat:
    """The text glue of a self-correction sample; a spec may override every field."""

    separator: str = "\n\n"
    negative_verification: str = "Verification: the answer above is incorrect. Let me solve it again."
    positive_verification: str = "Verification: the answer above is correct."


DEFAULT_FORMAT = SelfCorrectionFormat()

INITIAL_ANSWER = "initial_answer"
CORRECTED_ANSWER = "corrected_answer"
VERIFICATION = "verification"
FINAL_VERIFICATION = "final_verification"


def self_correction_parts(
    attempts: Sequence[str],
    correct: Sequence[bool],
    *,
    verifications: Sequence[str | None] | None = None,
    pam: bool = True,
    fmt: SelfCorrectionFormat = DEFAULT_FORMAT,
) -> list[dict[str, Any]]:
    """The assistant content as a list of parts ``{"text", "trained", "label"}`` (see module docs).

    ``attempts[i]`` is the i-th answer (reasoning + answer) and ``correct[i]`` whether it matched the
    gold; every attempt but the last must be wrong and the last must be right (a sample ends with a
    positive verification). ``verifications[i]``, when given and not None, is the verification text
    written after attempt ``i`` instead of the default phrase.
    """
    if not attempts:
        raise ValueError("a self-correction sample needs at least one attempt")
    if len(correct) != len(attempts):
        raise ValueError(f"{len(attempts)} attempts but {len(correct)} correctness flags")
    if verifications is not None and len(verifications) != len(attempts):
        raise ValueError(f"{len(attempts)} attempts but {len(verifications)} verification texts")
    if not correct[-1]:
        raise ValueError("the last attempt must be correct: a sample ends with a positive verification "
                         "(drop rows whose correction is still wrong)")
    if any(correct[:-1]):
        raise ValueError("only the last attempt may be correct: a correct answer ends the sample")

    parts: list[dict[str, Any]] = []
    for index, (attempt, is_correct) in enumerate(zip(attempts, correct)):
        attempt_text = str(attempt).strip()
        if not attempt_text:
            raise ValueError(f"attempt {index} is empty")
        prefix = "" if index == 0 else fmt.separator
        parts.append({
            "text": prefix + attempt_text,
            # The point of PAM: a wrong answer is context, never a target.
            "trained": bool(is_correct) or not pam,
            "label": INITIAL_ANSWER if index == 0 else CORRECTED_ANSWER,
        })
        custom = verifications[index] if verifications is not None else None
        default = fmt.positive_verification if is_correct else fmt.negative_verification
        verification = str(custom).strip() if custom is not None and str(custom).strip() else default
        parts.append({
            "text": fmt.separator + verification,
            "trained": True,
            "label": FINAL_VERIFICATION if is_correct else VERIFICATION,
        })
    return parts


def self_correction_messages(
    question: str,
    attempts: Sequence[str],
    correct: Sequence[bool],
    *,
    verifications: Sequence[str | None] | None = None,
    pam: bool = True,
    fmt: SelfCorrectionFormat = DEFAULT_FORMAT,
    system: str | None = None,
) -> list[dict[str, Any]]:
    """Chat messages: optional system, the question (no loss), one assistant turn made of parts."""
    messages: list[dict[str, Any]] = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": str(question)})
    messages.append({"role": "assistant",
                     "content": self_correction_parts(attempts, correct, verifications=verifications,
                                                      pam=pam, fmt=fmt)})
    return messages


def self_correction_row(
    row: Mapping[str, Any],
    *,
    question_field: str = "question",
    gold_field: str = "answer",
    initial_field: str = "initial_answer",
    corrected_field: str | None = "corrected_answer",
    verification_field: str | None = None,
    rule: str = "number",
    pattern: str | None = None,
    pam: bool = True,
    fmt: SelfCorrectionFormat = DEFAULT_FORMAT,
    system: str | None = None,
    into: str = "messages",
) -> dict[str, Any] | None:
    """Turn one row into a self-correction sample, or None when it cannot make one (drop it).

    The initial answer is checked against the gold with :func:`match_answer` (``rule``, ``pattern``).
    Right: a good case (initial answer + positive verification). Wrong: a bad case, which needs a
    corrected answer in ``corrected_field`` that matches the gold; otherwise the row yields None.
    ``verification_field`` optionally holds the negative verification text for the bad case (a model's
    critique). The output row is a copy of ``row`` plus ``into`` (messages), ``case`` (``"good"`` or
    ``"bad"``) and ``initial_correct``.
    """
    initial = row.get(initial_field)
    if initial is None or not str(initial).strip():
        return None
    gold = row.get(gold_field)
    initial_correct = match_answer(rule, initial, gold, pattern=pattern)
    if initial_correct:
        attempts, correct, verifications = [initial], [True], None
    else:
        corrected = row.get(corrected_field) if corrected_field else None
        if corrected is None or not str(corrected).strip():
            return None
        if not match_answer(rule, corrected, gold, pattern=pattern):
            return None
        attempts, correct = [initial, corrected], [False, True]
        critique = row.get(verification_field) if verification_field else None
        verifications = [critique, None]
    out = dict(row)
    out[into] = self_correction_messages(row[question_field], attempts, correct, verifications=verifications,
                                         pam=pam, fmt=fmt, system=system)
    out["case"] = "good" if initial_correct else "bad"
    out["initial_correct"] = initial_correct
    return out
