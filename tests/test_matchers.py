"""Answer matchers: the rules filter steps and accuracy probes rely on."""

from __future__ import annotations

import pytest

from specdsl.designs.matchers import RULES, extract_number, match_answer, normalize_text


@pytest.mark.parametrize("text, expected", [
    ("Alice has 12 - 5 = 7 apples left. Answer: 7", 7.0),
    ("The answer is 56.", 56.0),                          # sentence period is not a decimal point
    ("**Answer:** -3", -3.0),
    ("Total: 1,234,567 dollars", 1234567.0),
    ("It costs $1,000.50 in all", 1000.5),
    ("three quarters: 3/4", 0.75),
    ("the answer is −4", -4.0),                           # U+2212 minus
    ("5-3 leaves 2", 2.0),                                # a hyphen after a digit is subtraction
    ("Answer: 54. Wait, that is wrong. Answer: 56. (checked 3 times)", 56.0),  # last answer form wins
    ("steps 1, 2, 3 then 10", 10.0),                     # no answer form: last number
    ("#### 72", 72.0),
    ("so \\boxed{12} it is", 12.0),
    ("half is .5", 0.5),
    ("1e3 grams", 1000.0),
    ("no digits here", None),
    ("", None),
])
def test_extract_number(text, expected):
    assert extract_number(text) == expected


def test_extract_number_passes_numbers_through():
    assert extract_number(7) == 7.0
    assert extract_number(2.5) == 2.5
    assert extract_number(None) is None
    assert extract_number(True) is None


@pytest.mark.parametrize("predicted, gold, expected", [
    ("Answer: 7", "7", True),
    ("Answer: 7", 7, True),
    ("the answer is 7.0", "7", True),
    ("Answer: 1,000", "1000", True),
    ("Answer: 0.75", "3/4", True),
    ("Answer: 3/4", 0.75, True),
    ("Answer: -2", "-2", True),
    ("Answer: 2", "-2", False),
    ("Answer: 54", "56", False),
    ("I computed 56 but the answer is 54", "56", False),  # the explicit answer form decides
    ("no number", "5", False),
    ("Answer: 0.3333", "1/3", False),                      # a rounded value is a different answer
    ("Answer: 0.1", 0.1 + 1e-12, True),                    # float noise is not
])
def test_number_rule(predicted, gold, expected):
    assert match_answer("number", predicted, gold) is expected


def test_exact_rule_normalizes_whitespace_and_case():
    assert match_answer("exact", "  Paris\n", "paris")
    assert match_answer("exact", "New   York City", "new york\tcity")
    assert not match_answer("exact", "Paris, France", "Paris")
    assert normalize_text(" A\n b ") == "a b"


def test_contains_rule():
    assert match_answer("contains", "The capital is PARIS, of course.", "paris")
    assert not match_answer("contains", "The capital is Rome.", "paris")
    assert not match_answer("contains", "anything", "")  # an empty gold matches nothing


def test_regex_rule_with_group_compares_the_group():
    pattern = r"Answer:\s*\(?([A-E])\)?"
    assert match_answer("regex", "I think... Answer: (C)", "c", pattern=pattern)
    assert not match_answer("regex", "Answer: B", "C", pattern=pattern)
    assert not match_answer("regex", "no answer", "C", pattern=pattern)
    # numeric groups compare numerically
    assert match_answer("regex", "Result = 1,000 units", "1000", pattern=r"Result = ([\d,]+)")


def test_regex_rule_without_group_and_without_pattern():
    assert match_answer("regex", "value: 42 units", "42 units", pattern=r"\d+ units")
    assert match_answer("regex", "the color is grey", r"gr[ae]y")  # the gold is the pattern
    assert not match_answer("regex", "the color is blue", r"gr[ae]y")


def test_missing_prediction_never_matches():
    for rule in RULES:
        assert match_answer(rule, None, "7") is False


def test_unknown_rule_names_the_known_ones():
    with pytest.raises(ValueError) as error:
        match_answer("fuzzy", "a", "a")
    for rule in RULES:
        assert rule in str(error.value)
