"""The three data designs end to end on the tiny tokenizer: decode what the loss sees, compare with intent."""

from __future__ import annotations

import copy
import random

import pytest

from specdsl.designs.erase import (
    DEFAULT_GENERIC_SYSTEM,
    ErasureLeakError,
    UnknownStrategyError,
    erase_prompt,
    erase_row,
    strategy_for,
    teacher_messages,
)
from specdsl.designs.in2 import build_long_context, film_prompt, in2_messages
from specdsl.designs.masking import IGNORE_INDEX, render_chat, render_prompt_completion, tokenize_with_mask, trained_text
from specdsl.designs.pam import (
    DEFAULT_FORMAT,
    SelfCorrectionFormat,
    self_correction_messages,
    self_correction_parts,
    self_correction_row,
)
from tests.test_masking import LLAMA2_TEMPLATE


@pytest.fixture(scope="module", params=["chatml", "llama2"])
def tokenizer(request, tiny_tokenizer):
    if request.param == "chatml":
        return tiny_tokenizer
    other = copy.deepcopy(tiny_tokenizer)
    other.chat_template = LLAMA2_TEMPLATE
    return other


def end_of_turn(tokenizer):
    return "<|im_end|>" if tokenizer.chat_template != LLAMA2_TEMPLATE else " <|im_end|>"


def full_text(tokenizer, row):
    return tokenizer.decode(row["input_ids"], skip_special_tokens=False)


def assert_trained_exactly(tokenizer, sample, row):
    """The decoded trained runs are the intended runs (up to template whitespace glued to a token)."""
    decoded = trained_text(tokenizer, row["input_ids"], row["labels"])
    assert [text.lstrip(" ") for text in decoded] == sample.trained_texts()
    assert row["num_straddling_tokens"] == 0
    return decoded


# --------------------------------------------------------------------------------------------------
# Prompt erasure
# --------------------------------------------------------------------------------------------------

STRATEGIES = {
    "arithmetic": "Restate the quantities, compute step by step, and end with Answer: N.",
    "recall": "First recall the relevant facts, then answer in one sentence.",
}
ROWS = [
    {"id": "a1", "category": "arithmetic", "question": "Alice has 12 apples and gives 5 to Bob. How many are left?",
     "response": "12 - 5 = 7. Answer: 7"},
    {"id": "r1", "category": "recall", "question": "What is the capital of France?",
     "response": "Paris is the capital of France."},
]


def test_strategy_for_picks_by_key_and_explains_missing_keys():
    assert strategy_for(ROWS[0], STRATEGIES, "category") == STRATEGIES["arithmetic"]
    assert strategy_for({"category": "poetry"}, STRATEGIES, "category", default="Be direct.") == "Be direct."
    with pytest.raises(UnknownStrategyError) as error:
        strategy_for({"category": "poetry"}, STRATEGIES, "category")
    message = str(error.value)
    assert "'poetry'" in message and "'arithmetic'" in message and "'recall'" in message
    with pytest.raises(UnknownStrategyError, match="no field 'task'"):
        strategy_for(ROWS[0], STRATEGIES, "task")


def test_erased_instruction_never_reaches_a_training_input(tokenizer):
    for row in ROWS:
        detailed = strategy_for(row, STRATEGIES, "category")
        teacher = teacher_messages(row, system=detailed, user_field="question")
        assert teacher[0]["content"] == detailed  # the teacher did see it

        student_row = {**row, "system": detailed}
        messages = erase_prompt(student_row, system_field="system", generic_system=DEFAULT_GENERIC_SYSTEM,
                                user_field="question", answer_field="response")
        assert messages == [{"role": "system", "content": DEFAULT_GENERIC_SYSTEM},
                            {"role": "user", "content": row["question"]},
                            {"role": "assistant", "content": row["response"]}]
        sample = render_chat(tokenizer, messages)
        tokenized = tokenize_with_mask(tokenizer, sample)
        text = full_text(tokenizer, tokenized)
        for instruction in STRATEGIES.values():
            assert instruction not in text
        assert DEFAULT_GENERIC_SYSTEM in text and row["question"] in text
        decoded = assert_trained_exactly(tokenizer, sample, tokenized)
        # Loss on the teacher's answer (and the end of turn) only.
        assert [t.lstrip(" ") for t in decoded] == [row["response"] + end_of_turn(tokenizer)]


def test_erasure_generic_message_is_configurable(tiny_tokenizer):
    row = {**ROWS[0], "system": STRATEGIES["arithmetic"]}
    custom = erase_prompt(row, system_field="system", generic_system="You are a careful assistant.",
                          user_field="question", answer_field="response")
    assert custom[0] == {"role": "system", "content": "You are a careful assistant."}
    bare = erase_prompt(row, system_field="system", generic_system=None, user_field="question",
                        answer_field="response")
    assert [m["role"] for m in bare] == ["user", "assistant"]
    # Without a system message the template's own default appears (untrained), never the detailed one.
    text = render_chat(tiny_tokenizer, bare).text
    assert "named SmolLM" in text and STRATEGIES["arithmetic"] not in text


def test_erase_row_drops_the_detailed_column_and_catches_leaks():
    row = {**ROWS[0], "system": STRATEGIES["arithmetic"]}
    out = erase_row(row, system_field="system", user_field="question", answer_field="response")
    assert "system" not in out and out["id"] == "a1" and out["messages"][2]["content"] == row["response"]
    assert row["system"] == STRATEGIES["arithmetic"]  # the input row is not mutated
    leaky = {**row, "question": row["question"] + " " + STRATEGIES["arithmetic"]}
    with pytest.raises(ErasureLeakError, match="user prompt"):
        erase_prompt(leaky, system_field="system", generic_system="G", user_field="question",
                     answer_field="response")
    # The check can be turned off (the caller owns the consequence).
    erase_prompt(leaky, system_field="system", generic_system="G", user_field="question",
                 answer_field="response", check_leak=False)


# --------------------------------------------------------------------------------------------------
# Self-correction with Partial Answer Masking
# --------------------------------------------------------------------------------------------------

QUESTION = "What is 7 times 8?"
WRONG = "7 times 8 is 54. Answer: 54"
RIGHT = "7 times 8 is 56. Answer: 56"


def test_pam_text_format_is_exact():
    parts = self_correction_parts([WRONG, RIGHT], [False, True])
    content = "".join(part["text"] for part in parts)
    assert content == (WRONG + "\n\n" + DEFAULT_FORMAT.negative_verification + "\n\n" + RIGHT + "\n\n"
                       + DEFAULT_FORMAT.positive_verification)
    assert [(p["label"], p["trained"]) for p in parts] == [
        ("initial_answer", False), ("verification", True), ("corrected_answer", True),
        ("final_verification", True)]
    fmt = SelfCorrectionFormat(separator="\n", negative_verification="Wrong.", positive_verification="Right.")
    parts = self_correction_parts(["  " + RIGHT + "\n"], [True], fmt=fmt)
    assert "".join(p["text"] for p in parts) == RIGHT + "\nRight."


def test_pam_bad_case_wrong_answer_never_carries_loss(tokenizer):
    messages = self_correction_messages(QUESTION, [WRONG, RIGHT], [False, True], pam=True)
    sample = render_chat(tokenizer, messages)
    row = tokenize_with_mask(tokenizer, sample)
    decoded = assert_trained_exactly(tokenizer, sample, row)
    assert decoded[0].lstrip(" ") == ("\n\n" + DEFAULT_FORMAT.negative_verification + "\n\n" + RIGHT + "\n\n"
                                      + DEFAULT_FORMAT.positive_verification + end_of_turn(tokenizer))
    assert all("54" not in text and QUESTION not in text for text in decoded)
    # Token by token: every token inside the wrong answer's characters is masked.
    (wrong_span,) = [span for span in sample.spans if span.label == "initial_answer"]
    encoding = tokenizer(sample.text, add_special_tokens=False, return_offsets_mapping=True)
    inside = [i for i, (s, e) in enumerate(encoding["offset_mapping"]) if s < wrong_span.end and e > wrong_span.start]
    assert inside and all(row["labels"][i] == IGNORE_INDEX for i in inside)


def test_without_pam_the_wrong_answer_carries_loss(tokenizer):
    messages = self_correction_messages(QUESTION, [WRONG, RIGHT], [False, True], pam=False)
    sample = render_chat(tokenizer, messages)
    row = tokenize_with_mask(tokenizer, sample)
    decoded = assert_trained_exactly(tokenizer, sample, row)
    assistant = "".join(part["text"] for part in messages[-1]["content"])
    assert [text.lstrip(" ") for text in decoded] == [assistant + end_of_turn(tokenizer)]
    assert WRONG in decoded[0]
    assert QUESTION not in "".join(decoded)  # the prompt never carries loss


def test_pam_good_case_trains_the_whole_answer_and_verification(tokenizer):
    messages = self_correction_messages(QUESTION, [RIGHT], [True], pam=True)
    sample = render_chat(tokenizer, messages)
    row = tokenize_with_mask(tokenizer, sample)
    decoded = assert_trained_exactly(tokenizer, sample, row)
    assert [t.lstrip(" ") for t in decoded] == [
        RIGHT + "\n\n" + DEFAULT_FORMAT.positive_verification + end_of_turn(tokenizer)]


def test_pam_multi_round_masks_every_wrong_attempt(tiny_tokenizer):
    attempts = [WRONG, "7 times 8 is 58. Answer: 58", RIGHT]
    messages = self_correction_messages(QUESTION, attempts, [False, False, True],
                                        verifications=["The product is too small.", None, None])
    sample = render_chat(tiny_tokenizer, messages)
    row = tokenize_with_mask(tiny_tokenizer, sample)
    decoded = assert_trained_exactly(tiny_tokenizer, sample, row)
    assert decoded == [
        "\n\nThe product is too small.",
        "\n\n" + DEFAULT_FORMAT.negative_verification + "\n\n" + RIGHT + "\n\n"
        + DEFAULT_FORMAT.positive_verification + "<|im_end|>",
    ]


def test_pam_rejects_inconsistent_attempts():
    with pytest.raises(ValueError, match="last attempt must be correct"):
        self_correction_parts([WRONG], [False])
    with pytest.raises(ValueError, match="only the last attempt"):
        self_correction_parts([RIGHT, RIGHT], [True, True])
    with pytest.raises(ValueError):
        self_correction_parts([], [])
    with pytest.raises(ValueError):
        self_correction_parts([WRONG, RIGHT], [True])


def test_self_correction_row_uses_the_matcher():
    base = {"id": "q1", "question": QUESTION, "answer": "56"}
    good = self_correction_row({**base, "initial_answer": RIGHT})
    assert good["case"] == "good" and good["initial_correct"] is True
    assert [p["label"] for p in good["messages"][-1]["content"]] == ["initial_answer", "final_verification"]

    bad = self_correction_row({**base, "initial_answer": WRONG, "corrected_answer": RIGHT,
                               "critique": "54 is 7 times 8 minus 2."}, verification_field="critique")
    assert bad["case"] == "bad" and bad["id"] == "q1"
    parts = bad["messages"][-1]["content"]
    assert [p["trained"] for p in parts] == [False, True, True, True]
    assert parts[1]["text"] == "\n\n54 is 7 times 8 minus 2."

    off = self_correction_row({**base, "initial_answer": WRONG, "corrected_answer": RIGHT}, pam=False)
    assert all(p["trained"] for p in off["messages"][-1]["content"])
    # Still wrong after correction, or no correction: no sample.
    assert self_correction_row({**base, "initial_answer": WRONG, "corrected_answer": WRONG}) is None
    assert self_correction_row({**base, "initial_answer": WRONG}) is None
    assert self_correction_row({**base, "initial_answer": ""}) is None


# --------------------------------------------------------------------------------------------------
# IN2
# --------------------------------------------------------------------------------------------------


def test_in2_answer_carries_loss_and_context_does_not(tokenizer):
    fillers_text = ["The quick brown fox jumps over the lazy dog.",
                    "A train leaves the station at 3 pm and travels 60 miles per hour.",
                    "Rome is in Italy."] * 4
    key_text = "Paris is the capital of France."
    encode = lambda s: tokenizer(s + "\n", add_special_tokens=False)["input_ids"]  # noqa: E731
    context_ids, positions = build_long_context(
        [encode(key_text)], [encode(t) for t in fillers_text], target_tokens=(80, 120), rng=random.Random(3))
    context = tokenizer.decode(context_ids)
    assert key_text in context
    answer = "Paris."
    sample = render_chat(tokenizer, in2_messages(context, "What is the capital of France?", answer))
    row = tokenize_with_mask(tokenizer, sample)
    decoded = assert_trained_exactly(tokenizer, sample, row)
    assert [t.lstrip(" ") for t in decoded] == [answer + end_of_turn(tokenizer)]
    untrained = tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label == IGNORE_INDEX])
    assert context in untrained and "### Instruction:\nWhat is the capital of France?" in untrained


def test_in2_prompt_completion_with_the_film_prompt(tiny_tokenizer):
    prompt = film_prompt("Paris is the capital of France.", "What is the capital of France?")
    sample = render_prompt_completion(tiny_tokenizer, prompt, " Paris.")
    row = tokenize_with_mask(tiny_tokenizer, sample)
    assert trained_text(tiny_tokenizer, row["input_ids"], row["labels"]) == [" Paris.<|im_end|>"]
    assert row["num_straddling_tokens"] == 0


def test_prompt_ending_in_a_space_trains_the_merged_first_token(tiny_tokenizer):
    # The integrator's raw-text format: film_prompt(...) + " " then the answer. The prompt's trailing
    # space merges into the answer's first token, which is trained (only whitespace of it is prompt).
    prompt = film_prompt("Paris is the capital of France.", "What is the capital of France?") + " "
    sample = render_prompt_completion(tiny_tokenizer, prompt, "Paris.")
    row = tokenize_with_mask(tiny_tokenizer, sample)
    assert row["num_straddling_tokens"] == 0
    decoded = trained_text(tiny_tokenizer, row["input_ids"], row["labels"])
    assert [text.lstrip(" ") for text in decoded] == ["Paris.<|im_end|>"]
