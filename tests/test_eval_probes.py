"""The evaluation probes measure what they claim to measure.

Position probes are checked with answerers that only see the prompt, never the item: an oracle that
solves each task by searching the context must score 100 at every position, and an answerer that is
right only for targets in the first 30% of the context must show exactly that bias. Self-correction and
accuracy metrics are checked against hand-counted cases.
"""

from __future__ import annotations

import json
import math
import re

import pytest

from specdsl.probes.accuracy import (
    Condition, accuracy_table, build_accuracy_prompts, compare_conditions, prompt_erasure_conditions,
    score_accuracy,
)
from specdsl.probes.position import (
    POSITION_TASKS, PositionResult, approx_token_count, bucket_of, build_position_probe,
    combine_position_results, plot_position_results, results_table, run_position_probe, score_answer,
    score_position_probe, source_fingerprint,
)
from specdsl.probes.self_correction import (
    FORMAT_INSTRUCTION, build_self_correction_prompts, parse_self_correction, score_self_correction,
)
from specdsl.tables import format_table

BUDGET = 2400
N_BUCKETS = 10
PER_BUCKET = 2


@pytest.fixture(scope="module")
def probes() -> dict[str, list]:
    return {task: build_position_probe(task, context_tokens=BUDGET, n_buckets=N_BUCKETS,
                                       per_bucket=PER_BUCKET, seed=7)
            for task in POSITION_TASKS}


# -- an oracle that reads only the prompt ----------------------------------------------------------

_SENTENCE_BOUNDARY = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _context_and_query(messages: list[dict]) -> tuple[str, str]:
    content = messages[-1]["content"]
    context = content.split("### Context:\n", 1)[1].rsplit("\n\n### Instruction:\n", 1)[0]
    instruction = content.rsplit("### Instruction:\n", 1)[1]
    query = re.search(r'"(.*)"\?', instruction).group(1)  # greedy: code lines may contain quotes
    return context, query


def solve_by_search(messages: list[dict]) -> str:
    """Answer a position question by searching its context; fail loudly when it is ambiguous."""
    context, query = _context_and_query(messages)
    assert context.count(query) == 1, f"query {query!r} occurs {context.count(query)} times"
    if "which sentence contains the piece" in messages[-1]["content"]:
        matches = [s for s in _SENTENCE_BOUNDARY.split(context) if query in s]
        assert len(matches) == 1
        return matches[0]
    if "which function contains the code line" in messages[-1]["content"]:
        before = context[:context.index(query)]
        return re.findall(r"^def (\w+)\(", before, re.MULTILINE)[-1]
    line = re.search(rf"^id: {re.escape(query)}, name: [^,]+, label: (.+)$", context, re.MULTILINE)
    return line.group(1)


def oracle(prompts: list[list[dict]]) -> list[str]:
    return [solve_by_search(messages) for messages in prompts]


# -- position probes -----------------------------------------------------------------------------


@pytest.mark.parametrize("task", POSITION_TASKS)
def test_search_oracle_scores_100_at_every_position(probes, task):
    result, answers = run_position_probe(probes[task], oracle, batch_size=7)
    assert result.per_bucket == (100.0,) * N_BUCKETS
    assert result.counts == (PER_BUCKET,) * N_BUCKETS
    assert (result.avg, result.gap, result.n) == (100.0, 0.0, N_BUCKETS * PER_BUCKET)
    assert answers == [item.expected for item in probes[task]]


@pytest.mark.parametrize("task", POSITION_TASKS)
def test_position_biased_answerer_shows_exactly_its_bias(probes, task):
    items = probes[task]
    # Right only when the target sits in the first 30% of the context; says nothing otherwise.
    answers = [solve_by_search(item.prompt()) if item.position < 0.3 else "" for item in items]
    result = score_position_probe(items, answers)
    assert result.per_bucket == (100.0,) * 3 + (0.0,) * 7
    assert result.avg == pytest.approx(30.0)
    assert result.gap == 100.0


@pytest.mark.parametrize("task", POSITION_TASKS)
def test_targets_occur_once_and_contexts_fit(probes, task):
    for item in probes[task]:
        context = item.context
        assert item.target_span[1] - item.target_span[0] > 0
        assert context.count(item.target) == 1
        assert context.count(item.query) == 1
        if task == "document":
            assert item.target == item.expected and item.query in item.expected
        elif task == "code":
            assert item.target.startswith(f"def {item.expected}(")
            assert context.count(f"def {item.expected}(") == 1
            assert item.query in item.target
        else:
            assert item.target.startswith(f"id: {item.query}, ") and item.target.endswith(item.expected)
        # Within budget, and filled: the measured length is what the item reports.
        assert approx_token_count(context) == item.context_tokens
        assert 0.9 * BUDGET <= item.context_tokens <= BUDGET
        # The bucket is where the target's midpoint really is.
        assert bucket_of(item.position, N_BUCKETS) == item.bucket
        assert item.prompt()[-1]["content"].startswith("Below is a context and an instruction.")


def test_buckets_cover_the_whole_range(probes):
    for items in probes.values():
        assert [item.bucket for item in items] == [b for b in range(N_BUCKETS) for _ in range(PER_BUCKET)]
        assert min(item.position for item in items) < 0.1 and max(item.position for item in items) >= 0.9
        assert len({item.expected for item in items}) == len(items)  # distinct targets


def test_custom_token_counter_bounds_the_context():
    def by_chars(text: str) -> int:  # a counter unlike the default, e.g. a byte-level tokenizer
        return len(text) // 3 + 1

    items = build_position_probe("code", context_tokens=3000, n_buckets=5, per_bucket=2, seed=3,
                                 count_tokens=by_chars)
    for item in items:
        assert by_chars(item.context) == item.context_tokens <= 3000
        assert item.context_tokens >= 0.9 * 3000
        prefix, target = item.context[:item.target_span[0]], item.target
        assert item.position == pytest.approx((by_chars(prefix) + by_chars(target) / 2) / item.context_tokens)
        assert bucket_of(item.position, 5) == item.bucket


def test_same_seed_same_items_other_seed_other_items():
    def build(seed):
        return [item.to_dict() for item in build_position_probe(
            "document", context_tokens=1500, n_buckets=4, per_bucket=2, seed=seed)]

    first = build(1)
    assert first == build(1)
    assert first != build(2)
    json.dumps(first)  # items serialize
    assert len(source_fingerprint("document")) == 16


def test_system_message_and_template_are_honoured():
    items = build_position_probe("records", context_tokens=800, n_buckets=2, per_bucket=1, seed=0,
                                 system="You are terse.", template="{context}\n---\n{instruction}")
    messages = items[0].prompt()
    assert messages[0] == {"role": "system", "content": "You are terse."}
    assert messages[1]["content"].startswith(items[0].context + "\n---\nIn the above context")


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown position task"):
        build_position_probe("haystack", context_tokens=1000)
    with pytest.raises(ValueError, match="raise context_tokens"):
        build_position_probe("code", context_tokens=200, n_buckets=10, per_bucket=1)
    with pytest.raises(ValueError, match="answers"):
        score_position_probe([], ["x"])


def test_answer_matching_rules():
    sentence = "The quick brown fox jumps over the lazy dog."
    assert score_answer("document", f'The sentence is: "{sentence}"', sentence) == 1.0
    assert score_answer("document", "The quick brown fox.", sentence) == pytest.approx(4 / 8)
    assert score_answer("code", "The function is `get_value`.", "get_value") == 1.0
    assert score_answer("code", "get_value_or_default", "get_value") == 0.0
    assert score_answer("records", "The label is Amber  Lantern.", "amber lantern") == 1.0
    assert score_answer("records", "amber harbor", "amber lantern") == 0.0


def _result(task, avg, gap, n_buckets=4):
    per_bucket = (avg + gap / 2, avg - gap / 2) + (avg,) * (n_buckets - 2)
    return PositionResult(task, per_bucket, (1,) * n_buckets, avg, gap, n_buckets)


def test_table_all_column_averages_task_averages_and_gaps():
    # Table 1 arithmetic: Mistral-7B-Instruct-v0.2's three tasks give All 47.3 / 56.2.
    mistral = {"document": _result("document", 74.7, 32.1), "code": _result("code", 20.3, 59.5),
               "records": _result("records", 47.0, 77.0)}
    rows = results_table({"mistral": mistral, "flat": _result("code", 50.0, 10.0)})
    assert rows[0] == {"model": "mistral", "document avg": 74.7, "document gap": 32.1,
                       "code avg": 20.3, "code gap": 59.5, "records avg": 47.0, "records gap": 77.0,
                       "all avg": 47.3, "all gap": 56.2}
    assert rows[1]["code avg"] == 50.0 and rows[1]["document avg"] is None and rows[1]["all avg"] == 50.0
    text = format_table(rows)
    assert "mistral" in text and "all gap" in text
    combined = combine_position_results(list(mistral.values()))
    assert combined.task == "all" and combined.n == 12
    assert json.loads(json.dumps(combined.to_dict()))["avg"] == pytest.approx(47.333, abs=1e-3)


def test_empty_bucket_is_nan_and_null_in_json(probes):
    items = [item for item in probes["records"] if item.bucket != 4]
    result = score_position_probe(items, [item.expected for item in items])
    assert math.isnan(result.per_bucket[4]) and result.counts[4] == 0
    assert result.avg == 100.0 and result.gap == 0.0
    assert json.loads(json.dumps(result.to_dict()))["per_bucket"][4] is None


def test_plot_writes_a_valid_png(tmp_path, probes):
    items = probes["records"]
    good = score_position_probe(items, [item.expected for item in items])
    biased = score_position_probe(items, [item.expected if item.position < 0.3 else "" for item in items])
    several = plot_position_results({"trained": {"records": good, "code": good},
                                     "base": {"records": biased}}, tmp_path / "figs" / "position.png",
                                    title="VaL probing")
    single = plot_position_results({"trained": good, "base": biased}, tmp_path / "single.png")
    for path in (several, single):
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and data[-8:-4] == b"IEND"
        from matplotlib.image import imread

        assert imread(path).shape[0] > 100
    # Two panels are wider than one.
    assert int.from_bytes(several.read_bytes()[16:20], "big") > int.from_bytes(single.read_bytes()[16:20], "big")


# -- self-correction ------------------------------------------------------------------------------


def number_match(pred: str, gold: str) -> bool:
    numbers = re.findall(r"-?\d+(?:\.\d+)?", pred)
    return bool(numbers) and float(numbers[-1]) == float(gold)


SC_ROWS = [{"question": f"q{i}", "answer": gold} for i, gold in enumerate(["56", "7", "10", "3", "9", "4"])]
SC_OUTPUTS = [
    # wrong -> right; the verification rightly says incorrect
    "7 x 8 = 54. Answer: 54\nVerification: 7 x 8 is 56, not 54, so the answer is incorrect.\n"
    "Recompute: 7 x 8 = 56. Answer: 56\nVerification: the answer is correct.",
    # right -> right; rightly says correct
    "3 + 4 = 7. Answer: 7\nVerification: the answer is correct.",
    # right -> wrong; wrongly says incorrect
    "Answer: 10\nVerification: this is wrong.\nAnswer: 12",
    # wrong -> wrong; wrongly says correct
    "Answer: 5\nVerification: correct.",
    # no answer at all
    "",
    # right, never verified
    "Answer: 4",
]


def test_self_correction_metrics_on_hand_counted_cases():
    result = score_self_correction(SC_ROWS, SC_OUTPUTS, number_match)
    assert result.n == 6
    assert result.initial_accuracy == pytest.approx(50.0)       # q1, q2, q5 right at first
    assert result.final_accuracy == pytest.approx(50.0)         # q0, q1, q5 right at the end
    assert (result.wrong_to_right, result.right_to_wrong) == (1, 1)
    assert result.wrong_to_right_rate == pytest.approx(100 / 3)  # 1 of 3 initially wrong
    assert result.right_to_wrong_rate == pytest.approx(100 / 3)  # 1 of 3 initially right
    assert result.n_verdicts == 4 and result.verification_accuracy == pytest.approx(50.0)
    assert (result.said_correct_was_right, result.said_correct_was_wrong,
            result.said_incorrect_was_right, result.said_incorrect_was_wrong) == (1, 1, 1, 1)
    assert result.no_answer == 1 and result.improvement == 0.0
    assert [c.final for c in result.cases] == ["56", "7", "12", "5", None, "4"]
    assert json.loads(json.dumps(result.to_dict(with_cases=True)))["cases"][0]["initial"] == "54"


def test_self_correction_parser_formats():
    # The PAM sample layout: attempts and verifications separated by blank lines, no "Answer:" needed.
    pam_output = ("7 x 8 = 54, so the result is 54.\n\n"
                  "Verification: the answer above is incorrect. Let me solve it again.\n\n"
                  "7 x 8 = 56, so the result is 56.\n\n"
                  "Verification: the answer above is correct.")
    initial, verdict, final = parse_self_correction(pam_output)
    assert (initial, verdict, final) == ("7 x 8 = 54, so the result is 54.", False, "7 x 8 = 56, so the result is 56.")
    assert not number_match(initial, "56") and number_match(final, "56")
    assert parse_self_correction("Answer: 54 Verification: that is not correct. Answer: 56.") == ("54", False, "56")
    assert parse_self_correction("Work.\nAnswer: 9\n\nVerification: the answer above is correct.") == ("9", True, "9")
    assert parse_self_correction("Final answer: 12\nVerification: Verified.") == ("12", True, "12")
    assert parse_self_correction("Answer: 3\nVerification: let me look again") == ("3", None, "3")
    assert parse_self_correction("   ") == (None, None, None)
    assert parse_self_correction("Verification: wrong.") == (None, False, None)
    assert parse_self_correction("Verification: wrong.\n\nAnswer: 5") == (None, False, "5")
    lone_verdict = score_self_correction([{"answer": "1"}], ["Verification: wrong."], number_match)
    assert (lone_verdict.n_verdicts, lone_verdict.verification_accuracy, lone_verdict.no_answer) == (0, None, 1)


def test_self_correction_accepts_a_custom_parser():
    def parse_json(text):
        record = json.loads(text)
        return record["first"], record["ok"], record["last"]

    outputs = [json.dumps({"first": "1", "ok": False, "last": "2"}),
               json.dumps({"first": "3", "ok": True, "last": "3"})]
    rows = [{"answer": "2"}, {"answer": "3"}]
    result = score_self_correction(rows, outputs, number_match, parse_json)
    assert (result.initial_accuracy, result.final_accuracy, result.wrong_to_right) == (50.0, 100.0, 1)
    assert result.verification_accuracy == 100.0 and result.right_to_wrong_rate == 0.0


def test_self_correction_prompts():
    prompts = build_self_correction_prompts(SC_ROWS[:2], system="Be careful.", instruction=FORMAT_INSTRUCTION)
    assert prompts[0][0] == {"role": "system", "content": "Be careful."}
    assert prompts[0][1]["content"] == "q0\n\n" + FORMAT_INSTRUCTION
    assert build_self_correction_prompts(SC_ROWS[:1]) == [[{"role": "user", "content": "q0"}]]


# -- accuracy and the prompt-erasure comparison ---------------------------------------------------

ACC_ROWS = [
    {"question": "2+2", "answer": "4", "category": "arithmetic"},
    {"question": "3*3", "answer": "9", "category": "arithmetic"},
    {"question": "capital of France", "answer": "Paris", "category": "recall"},
    {"question": "capital of Italy", "answer": "Rome", "category": "recall"},
]
STRATEGIES = {"arithmetic": "Compute step by step.", "recall": "Recall the fact, then answer."}


def exact_match(pred: str, gold: str) -> bool:
    return pred.strip().lower() == gold.strip().lower()


def test_score_accuracy_with_groups():
    result = score_accuracy(ACC_ROWS, ["4", "6", "paris", "Milan"], exact_match, group_field="category")
    assert (result.n, result.correct, result.accuracy) == (4, 2, 50.0)
    assert result.correct_flags == (True, False, True, False)
    assert [(g.group, g.n, g.correct, g.accuracy) for g in result.groups] == [
        ("arithmetic", 2, 1, 50.0), ("recall", 2, 1, 50.0)]


def test_build_accuracy_prompts_per_row_system():
    prompts = build_accuracy_prompts(ACC_ROWS, lambda row: STRATEGIES[row["category"]], "question")
    assert prompts[2] == [{"role": "system", "content": "Recall the fact, then answer."},
                          {"role": "user", "content": "capital of France"}]
    assert build_accuracy_prompts(ACC_ROWS[:1]) == [[{"role": "user", "content": "2+2"}]]


def test_prompt_erasure_comparison_table():
    gold = {row["question"]: row["answer"] for row in ACC_ROWS}

    def student(prompts):  # learned the strategies: right under any prompt
        return [gold[p[-1]["content"]] for p in prompts]

    def base(prompts):  # right only when told the strategy, and then only on arithmetic
        out = []
        for p in prompts:
            told = p[0]["role"] == "system" and p[0]["content"] in STRATEGIES.values()
            question = p[-1]["content"]
            out.append(gold[question] if told and "capital" not in question else "no idea")
        return out

    conditions = prompt_erasure_conditions(student=student, base=base, generic_system="You are helpful.",
                                           detailed_system=lambda row: STRATEGIES[row["category"]])
    results = compare_conditions(ACC_ROWS, conditions, exact_match, group_field="category", batch_size=3)
    assert list(results) == ["student+generic", "base+generic", "base+detailed"]
    rows = accuracy_table(results, baseline="base+generic")
    assert rows == [
        {"condition": "student+generic", "n": 4, "correct": 4, "accuracy": 100.0, "delta": 100.0,
         "acc[arithmetic]": 100.0, "acc[recall]": 100.0},
        {"condition": "base+generic", "n": 4, "correct": 0, "accuracy": 0.0, "delta": 0.0,
         "acc[arithmetic]": 0.0, "acc[recall]": 0.0},
        {"condition": "base+detailed", "n": 4, "correct": 2, "accuracy": 50.0, "delta": 50.0,
         "acc[arithmetic]": 100.0, "acc[recall]": 0.0},
    ]
    assert "base+detailed" in format_table(rows)
    with pytest.raises(ValueError, match="unique"):
        compare_conditions(ACC_ROWS, [Condition("a", student), Condition("a", base)], exact_match)


def test_the_library_and_the_evaluate_step_default_to_the_same_buckets():
    import inspect

    from specdsl.ops.evaluate import PositionProbe

    defaults = inspect.signature(build_position_probe).parameters
    assert defaults["n_buckets"].default == PositionProbe.DEFAULTS["buckets"]
    assert defaults["per_bucket"].default == PositionProbe.DEFAULTS["per_bucket"]
