"""Answer matchers: does a model's text contain the gold answer?

Used by ``filter`` steps (keep a teacher answer only when it is right, split self-correction data into
good and bad cases) and by evaluation (accuracy). Pure functions over strings; no I/O.

Rules (:data:`RULES`):

``exact``
    The prediction equals the gold after normalization: case-folded, whitespace collapsed, surrounding
    whitespace removed.
``contains``
    The normalized gold occurs inside the normalized prediction.
``regex``
    With ``pattern``: the first match of ``pattern`` in the prediction is compared with the gold (group 1
    when the pattern has a group, else the whole match; numerically when both sides are numbers, else
    normalized-exact). Without ``pattern``: the gold itself is the regular expression and must be found
    in the prediction.
``number``
    The prediction's final number (see :func:`extract_number`) equals the gold numerically, within a
    small tolerance.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Any

from specdsl.templates import checked_regex

RULES: tuple[str, ...] = ("exact", "contains", "regex", "number")

# Absolute and relative tolerance for numeric comparison: generous enough for "0.333" vs "1/3" rounding
# is NOT intended (that is a different answer), tight enough that float parsing noise never matters.
ABS_TOL = 1e-6
REL_TOL = 1e-9

# One number as written in model answers: optional sign, thousands separators ("1,234,567"), decimals,
# a simple fraction ("3/4", "-1/2"), or scientific notation. The sign is only taken when it does not
# follow a digit or letter, so "5-3" yields 5 and 3, not 5 and -3; "−" (U+2212) counts as a minus.
_NUMBER = (
    r"(?<![\w.])(?:[-\u2212+](?=[\d.]))?"
    r"(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
    r"(?:\s*/\s*\d+(?:\.\d+)?)?"
    r"(?:[eE][-+]?\d+)?"
)
_NUMBER_RE = re.compile(_NUMBER)

# The explicit final-answer forms models are usually asked for. The last one in the text wins, so a
# self-correction transcript "... Answer: 54 ... corrected ... Answer: 56" yields 56.
_ANSWER_FORM_RE = re.compile(
    r"(?:"
    r"answer\s*(?:is|:|=)"            # "Answer: 7", "the answer is 7", "final answer = 7"
    r"|####"                           # GSM8K's "#### 7"
    r"|\\boxed\{"                      # LaTeX "\boxed{7}"
    r")"
    r"[\s:*=]*(?:\$|\\\$)?\s*"         # markdown bold "**Answer:** 7", a currency sign
    r"(" + _NUMBER + r")",
    re.IGNORECASE,
)


def normalize_text(text: str) -> str:
    """Case-fold and collapse whitespace (the ``exact`` and ``contains`` comparisons use this)."""
    return " ".join(str(text).split()).casefold()


def _parse_number(token: str) -> float | None:
    token = token.replace("\u2212", "-").replace(",", "").replace(" ", "")
    try:
        if "/" in token and "e" not in token.lower():
            numerator, denominator = token.split("/", 1)
            if float(denominator) == 0:
                return None
            # Fraction keeps "1/3" exact until the final float conversion.
            return float(Fraction(numerator) / Fraction(denominator))
        return float(token)
    except (ValueError, ZeroDivisionError):
        return None


def extract_number(text: Any) -> float | None:
    """The final numeric answer in ``text``, or None when it has no number.

    Prefers the last explicit answer form ("Answer: N", "the answer is N", "#### N", "\\boxed{N}"),
    else takes the last number anywhere. Handles thousands separators ("1,234"), negatives ("-5",
    "−5"), decimals ("3.5", ".5"), fractions ("3/4") and a leading currency sign. A trailing sentence
    period is not a decimal point ("is 42." gives 42.0).
    """
    if text is None:
        return None
    if isinstance(text, bool):
        return None
    if isinstance(text, (int, float)):
        return float(text) if math.isfinite(float(text)) else None
    text = str(text)
    forms = list(_ANSWER_FORM_RE.finditer(text))
    if forms:
        value = _parse_number(forms[-1].group(1))
        if value is not None:
            return value
    for match in reversed(list(_NUMBER_RE.finditer(text))):
        value = _parse_number(match.group(0))
        if value is not None:
            return value
    return None


def numbers_equal(a: float, b: float, *, abs_tol: float = ABS_TOL, rel_tol: float = REL_TOL) -> bool:
    return math.isclose(a, b, rel_tol=rel_tol, abs_tol=abs_tol)


def _values_equal(extracted: str, gold: Any) -> bool:
    """Compare an extracted string with the gold: numerically when both are numbers, else normalized."""
    candidate = extracted.strip().lstrip("$").strip()
    if _NUMBER_RE.fullmatch(candidate):
        left, right = _parse_number(candidate), extract_number(gold)
        if left is not None and right is not None:
            return numbers_equal(left, right)
    return normalize_text(extracted) == normalize_text(gold)


def match_answer(rule: str, predicted_text: Any, gold: Any, *, pattern: str | None = None) -> bool:
    """True when ``predicted_text`` answers ``gold`` under ``rule`` (one of :data:`RULES`).

    A missing prediction (None) never matches. An unknown rule raises ValueError naming the known ones.
    """
    if rule not in RULES:
        raise ValueError(f"unknown match rule {rule!r}; known rules: {', '.join(RULES)}")
    if predicted_text is None or gold is None:
        return False
    predicted = str(predicted_text)
    if rule == "exact":
        return normalize_text(predicted) == normalize_text(gold)
    if rule == "contains":
        needle = normalize_text(gold)
        return bool(needle) and needle in normalize_text(predicted)
    if rule == "regex":
        # A pattern that could backtrack exponentially is refused, not run (the gold may be one, from data).
        if pattern is None:
            return re.search(checked_regex(str(gold)), predicted) is not None
        match = re.search(checked_regex(pattern), predicted)
        if match is None:
            return False
        extracted = match.group(1) if match.re.groups else match.group(0)
        return extracted is not None and _values_equal(extracted, gold)
    # rule == "number"
    predicted_value = extract_number(predicted)
    gold_value = extract_number(gold)
    if predicted_value is None or gold_value is None:
        return False
    return numbers_equal(predicted_value, gold_value)
