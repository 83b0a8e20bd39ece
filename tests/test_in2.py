"""IN2 data: segmentation, long-context assembly on token ids (with statistics), prompt, mixing."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from specdsl.designs.in2 import (
    FILM_PROMPT_TEMPLATE,
    build_long_context,
    chi_square_uniform,
    draw_target_length,
    film_instruction,
    film_prompt,
    key_position_histogram,
    mix_short_context,
    segment_text,
)

# Chi-square critical values (upper tail, alpha = 0.001) by degrees of freedom, from standard tables.
CHI2_CRITICAL_0_001 = {9: 27.877, 19: 43.820}


def count_words(text: str) -> int:
    return len(text.split())


def numbered_text(lines: int, words_per_line: int) -> str:
    return "\n".join(" ".join(f"w{line}_{i}" for i in range(words_per_line)) for line in range(lines))


# --------------------------------------------------------------------------------------------------
# Segmentation
# --------------------------------------------------------------------------------------------------


def test_segments_accumulate_lines_and_merge_the_leftover():
    text = numbered_text(lines=10, words_per_line=5)  # 50 words
    segments = segment_text(text, count_words, min_tokens=12)
    # 3 lines (15 words) per segment, 3 segments, the 10th line merged into the last one.
    assert [count_words(s) for s in segments] == [15, 15, 20]
    assert all(count_words(s) >= 12 for s in segments)
    assert "\n".join(segments) == text  # exact slices, in order, nothing lost


def test_long_lines_are_cut_into_sentences():
    sentence = "This sentence has exactly seven words."
    paragraph = " ".join([sentence] * 10)  # one 70-word line
    text = "Short title line\n" + paragraph + "\nA closing line of five."
    segments = segment_text(text, count_words, min_tokens=20)
    assert all(count_words(s) >= 20 for s in segments)
    assert max(count_words(s) for s in segments) < 40  # not one 70-word blob
    assert " ".join(" ".join(s.split()) for s in segments) == " ".join(text.split())
    for segment in segments:
        assert segment in text


def test_short_text_is_one_segment_and_blank_text_none():
    assert segment_text("just a few words", count_words, min_tokens=128) == ["just a few words"]
    assert segment_text("  \n\n ", count_words, min_tokens=128) == []
    with pytest.raises(ValueError):
        segment_text("x", count_words, min_tokens=0)


def test_segments_with_the_real_tokenizer(tiny_tokenizer):
    count = lambda s: len(tiny_tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    text = "\n".join(["Paris is the capital of France. Berlin is the capital of Germany."] * 12)
    segments = segment_text(text, count, min_tokens=32)
    assert len(segments) > 1
    assert all(count(s) >= 32 for s in segments)


# --------------------------------------------------------------------------------------------------
# Long-context assembly
# --------------------------------------------------------------------------------------------------

KEY_BASE = 100_000  # key token ids never occur in fillers, so occurrences can be counted exactly


def filler_pool(rng: random.Random, size: int = 2000) -> list[list[int]]:
    return [[rng.randrange(1, 50_000) for _ in range(rng.randint(12, 20))] for _ in range(size)]


def key_segment(number: int, length: int = 16) -> list[int]:
    return [KEY_BASE + 1000 * number + i for i in range(length)]


def occurrences(context: list[int], segment: list[int]) -> int:
    first = segment[0]
    return sum(1 for i, token in enumerate(context)
               if token == first and context[i:i + len(segment)] == segment)


def test_type1_statistics_lengths_presence_and_uniform_positions():
    rng = random.Random(1234)
    pool = filler_pool(rng)
    key = key_segment(0)
    min_tokens, max_tokens = 1024, 3072
    depths, lengths = [], []
    for _ in range(1000):
        context, positions = build_long_context([key], pool, target_tokens=(min_tokens, max_tokens), rng=rng)
        assert min_tokens <= len(context) <= max_tokens
        assert occurrences(context, key) == 1
        (position,) = positions
        assert context[position["token_start"]:position["token_end"]] == key
        depths.append(position["depth"])
        lengths.append(len(context))
    bins = 10
    position_chi2 = chi_square_uniform(key_position_histogram(depths, bins))
    assert position_chi2 < CHI2_CRITICAL_0_001[bins - 1], position_chi2
    length_fractions = [(n - min_tokens) / (max_tokens - min_tokens) for n in lengths]
    length_chi2 = chi_square_uniform(key_position_histogram(length_fractions, bins))
    assert length_chi2 < CHI2_CRITICAL_0_001[bins - 1], length_chi2
    # Keys reach both ends of the context.
    assert min(depths) < 0.02 and max(depths) > 0.98


def test_chi_square_check_detects_a_biased_placement():
    # The statistic is meaningful: keys always in the first half fail it.
    rng = random.Random(0)
    biased = [rng.random() / 2 for _ in range(1000)]
    assert chi_square_uniform(key_position_histogram(biased, 10)) > CHI2_CRITICAL_0_001[9]


def test_type2_all_key_segments_once_each():
    rng = random.Random(7)
    pool = filler_pool(rng, size=500)
    keys = [key_segment(n, length=14 + n) for n in range(4)]
    separator = [99_999]
    for _ in range(200):
        context, positions = build_long_context(keys, pool, target_tokens=(400, 900), rng=rng,
                                                separator_ids=separator)
        assert 400 <= len(context) <= 900
        assert [p["key"] for p in positions] == [0, 1, 2, 3]
        for key, position in zip(keys, positions):
            assert occurrences(context, key) == 1
            assert context[position["token_start"]:position["token_end"]] == key
        assert len({p["segment_index"] for p in positions}) == 4
        # Separators sit between segments, never at either end.
        assert context[0] != 99_999 and context[-1] != 99_999


def test_type2_key_order_kept_on_request_and_shuffled_otherwise():
    rng = random.Random(11)
    pool = filler_pool(rng, size=300)
    keys = [key_segment(n) for n in range(3)]
    orders = set()
    for _ in range(100):
        _, kept = build_long_context(keys, pool, target_tokens=(300, 600), rng=rng, keep_key_order=True)
        assert [p["token_start"] for p in kept] == sorted(p["token_start"] for p in kept)
        _, shuffled = build_long_context(keys, pool, target_tokens=(300, 600), rng=rng)
        orders.add(tuple(sorted(range(3), key=lambda k: shuffled[k]["token_start"])))
    assert len(orders) == 6  # every order of three keys occurs


def test_exact_target_with_separators_and_fillers_used_once():
    rng = random.Random(5)
    pool = [[i] * 10 for i in range(1, 200)]  # filler i is ten copies of token i
    context, _ = build_long_context([key_segment(0)], pool, target_tokens=503, rng=rng, separator_ids=[0, 0])
    assert len(context) == 503
    used = [token for token in set(context) if 0 < token < KEY_BASE]
    assert all(context.count(token) <= 10 for token in used)  # no filler drawn twice


def test_short_context_is_the_key_segments_alone():
    # A short-context sample: target = the keys' own length, no filler needed (the pool may be empty).
    keys = [key_segment(0), key_segment(1)]
    context, positions = build_long_context(keys, [], target_tokens=16 + 1 + 16, rng=random.Random(0),
                                            separator_ids=[7], keep_key_order=True)
    assert context == keys[0] + [7] + keys[1]
    assert [(p["token_start"], p["depth"]) for p in positions] == [(0, 0.0), (17, 1.0)]


def test_assembly_is_deterministic_given_the_seed():
    pool = filler_pool(random.Random(0), size=300)
    first = build_long_context([key_segment(0)], pool, target_tokens=(200, 800), rng=random.Random(42))
    again = build_long_context([key_segment(0)], pool, target_tokens=(200, 800), rng=random.Random(42))
    other = build_long_context([key_segment(0)], pool, target_tokens=(200, 800), rng=random.Random(43))
    assert first == again and first != other


def test_assembly_errors_are_clear():
    pool = filler_pool(random.Random(0), size=5)
    with pytest.raises(ValueError, match="more than max_tokens"):
        build_long_context([key_segment(0, 50)], pool, target_tokens=(10, 40), rng=random.Random(0))
    with pytest.raises(ValueError, match="ran out"):
        build_long_context([key_segment(0)], pool, target_tokens=1000, rng=random.Random(0))
    with pytest.raises(ValueError, match="at least one key"):
        build_long_context([], pool, target_tokens=100, rng=random.Random(0))
    with pytest.raises(ValueError):
        draw_target_length(random.Random(0), 10, 5)
    # Excluded pool indices are never drawn.
    pool = [[1] * 10, [2] * 10, [3] * 10]
    context, _ = build_long_context([key_segment(0)], pool, target_tokens=36, rng=random.Random(0), exclude=[1])
    assert 2 not in context


# --------------------------------------------------------------------------------------------------
# Prompt and mixing
# --------------------------------------------------------------------------------------------------


def test_film_prompt_is_exactly_the_template():
    assert film_prompt("CTX", "Q?") == (
        "[INST] Below is a context and an instruction. Based on the information provided in the context, "
        "write a response for the instruction.\n\n### Context:\nCTX\n\n### Instruction:\nQ? [/INST]")
    assert film_prompt("C", "Q") == "[INST] " + film_instruction("C", "Q") + " [/INST]"
    assert FILM_PROMPT_TEMPLATE.count("{context}") == 1
    # Braces inside a context are text, not template fields.
    assert "{x}" in film_prompt("a {x} b", "q")


def test_mix_short_context():
    long = [f"long{i}" for i in range(100)]
    short = [f"short{i}" for i in range(50)]
    mixed = mix_short_context(long, short, 0.1, random.Random(0))
    assert len(mixed) == 110 and set(long) <= set(mixed)
    assert sum(1 for s in mixed if s.startswith("short")) == 10
    assert mixed == mix_short_context(long, short, 0.1, random.Random(0))
    assert mixed != long + [s for s in mixed if s.startswith("short")]  # shuffled together
    with pytest.raises(ValueError, match="need 60"):
        mix_short_context(long, short, 0.6, random.Random(0))


def test_design_modules_import_nothing_heavy():
    code = ("import sys\n"
            "import specdsl.designs.in2, specdsl.designs.masking, specdsl.designs.pam, specdsl.designs.erase, specdsl.designs.matchers\n"
            "heavy = [m for m in ('torch', 'transformers', 'trl', 'datasets', 'tokenizers') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_segment_keeps_each_segments_token_ids(tiny_model_dir, tmp_path):
    """segment (v2) stores each segment's token ids beside its text, per segment and per text: the ids
    the model's tokenizer gives that text (the tokenizer is in the fingerprint through the model)."""
    import json as _json

    from transformers import AutoTokenizer

    from specdsl import api

    text = "Paris is the capital of France. Berlin is the capital of Germany.\n" * 6
    (tmp_path / "docs.jsonl").write_text(_json.dumps({"id": "d1", "text": text}) + "\n")
    (tmp_path / "spec.yaml").write_text(f"""specdsl: 1
name: seg-ids
models:
  m: {{backend: transformers, model: {tiny_model_dir}}}
sources:
  docs: {{path: docs.jsonl}}
steps:
  - id: segs
    segment: {{from: docs, model: m, min_tokens: 16}}
  - id: texts
    segment: {{from: docs, model: m, min_tokens: 16, per: text}}
""")
    result = api.run_plan(api.compile_spec(tmp_path / "spec.yaml", passes=False), progress=False)
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    segs = result.rows("segs")
    assert len(segs) > 1
    for row in segs:
        assert row["segment_ids"] == tok(row["segment"], add_special_tokens=False)["input_ids"]
    (whole,) = result.rows("texts")
    assert whole["segments_ids"] == [row["segment_ids"] for row in segs]
