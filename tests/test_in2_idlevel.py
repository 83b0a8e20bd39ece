"""IN2 interleave at id level: the same samples as the text-level path it replaced, for the same seed.

``reference_interleave`` is the op's previous ``run`` body, verbatim but for taking its inputs as
arguments: it tokenized every key per row, decoded every context whole and decoded two growing
prefixes per key for the character offsets. The op now tokenizes each distinct segment once and
renders contexts from cached per-segment text (or takes the reference path when the tokenizer's
decoding is not concatenative); both must give identical rows.
"""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import pytest

from specdsl.contract.ops import RunContext
from specdsl.designs.in2 import build_long_context, film_prompt, in2_messages
from specdsl.ops.designs import InterleaveOp, _decodes_concatenatively


def reference_interleave(tok, rows_in, pool_rows, p, seed):
    rng = random.Random(p.get("seed", seed))
    sep = p.get("separator", "\n\n")
    sep_ids = tok(sep, add_special_tokens=False)["input_ids"] if sep else []
    pool_col = p.get("pool_column", "segment")
    pool_ids = [tok(r[pool_col], add_special_tokens=False)["input_ids"] for r in pool_rows]
    by_text: dict[str, list[int]] = {}
    for i, r in enumerate(pool_rows):
        by_text.setdefault(str(r.get("text_id", r.get("id"))), []).append(i)
    key_col, q_col, a_col = p.get("key", "segment"), p.get("question", "question"), p.get("answer", "answer")
    rows = [r for r in rows_in if r.get(q_col) and r.get(a_col) and r.get(key_col)]
    short_count = round(p.get("short_ratio", 0) * len(rows))
    short_ids = set(rng.sample(range(len(rows)), min(short_count, len(rows))))
    out = []
    for i, row in enumerate(rows):
        keys = row[key_col] if isinstance(row[key_col], list) else [row[key_col]]
        key_ids = [tok(k, add_special_tokens=False)["input_ids"] for k in keys]
        text_id = str(row.get("text_id", ""))
        if sum(map(len, key_ids)) + len(sep_ids) * (len(key_ids) - 1) > p["max_tokens"]:
            continue
        ids, positions = build_long_context(key_ids, pool_ids, target_tokens=(p["min_tokens"], p["max_tokens"]),
                                            rng=rng, separator_ids=sep_ids, exclude=by_text.get(text_id, []))
        samples = [(False, ids, positions)]
        if i in short_ids:
            short_ids_list, short_pos = build_long_context(key_ids, [], target_tokens=sum(map(len, key_ids)) +
                                                           len(sep_ids) * (len(key_ids) - 1), rng=rng,
                                                           separator_ids=sep_ids)
            samples.append((True, short_ids_list, short_pos))
        for is_short, ctx_ids, pos in samples:
            context = tok.decode(ctx_ids)
            for kp in pos:
                kp["char_start"] = len(tok.decode(ctx_ids[: kp["token_start"]]))
                kp["char_end"] = len(tok.decode(ctx_ids[: kp["token_end"]]))
            new = {"id": f"{row['id']}{'#short' if is_short else ''}", "question": row[q_col],
                   "answer": row[a_col], "context_tokens": len(ctx_ids), "key_positions": pos,
                   "short": is_short, "text_id": text_id}
            if p.get("format", "chat") == "chat":
                new["messages"] = in2_messages(context, row[q_col], row[a_col])
            else:
                new["prompt"] = film_prompt(context, row[q_col]) + " "
                new["completion"] = str(row[a_col])
            out.append(new)
    return out


# Texts with multi-byte characters, so that a filler cut to the target length can end inside a
# character (the replacement character must come out the same both ways).
WORDS = ["apple", "Zürich", "naïve", "日本語", "テキスト", "emoji 🙂", "ñandú", "Ωmega", "data", "línea",
         "x=1;", "(paren)", "«quote»", "tab\there", "über", "—dash—"]


def corpus(seed: int, texts: int = 30, segments: int = 6):
    rng = random.Random(seed)
    pool, qa_type1, qa_type2 = [], [], []
    for t in range(texts):
        segs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) + "." for _ in range(segments)]
        for i, seg in enumerate(segs):
            pool.append({"id": f"t{t}:{i}", "text_id": f"t{t}", "segment": seg})
        qa_type1.append({"id": f"q{t}", "text_id": f"t{t}", "segment": segs[t % segments],
                         "question": f"What about {t}?", "answer": f"It is {t}."})
        qa_type2.append({"id": f"m{t}", "text_id": f"t{t}", "segments": segs[: 2 + t % 3],
                         "question": f"Combine {t}?", "answer": f"Both {t}."})
    qa_type1.append({"id": "unseen", "text_id": "zz", "segment": "A key that is no pool segment: ünïcödé.",
                     "question": "Q?", "answer": "A."})
    qa_type1.append({"id": "noanswer", "text_id": "t1", "segment": "x", "question": "Q?", "answer": ""})
    return pool, qa_type1, qa_type2


def run_op(tok, rows, pool, params, seed):
    services = SimpleNamespace(tokenizer=lambda ref: tok, note=lambda node, text: None)
    ctx = RunContext(node_id="long", params={"from": "qa", "pool": "segs", "model": "m", **params},
                     inputs={"from": [dict(r) for r in rows], "pool": [dict(r) for r in pool]}, vars={},
                     seed=seed, services=services, artifact_dir=Path("."))
    return InterleaveOp().run(ctx)


CASES = [
    dict(min_tokens=60, max_tokens=240),
    dict(min_tokens=60, max_tokens=240, short_ratio=0.5, format="film"),
    dict(min_tokens=30, max_tokens=400, separator=" | ", seed=5),
    dict(min_tokens=50, max_tokens=200, separator="", short_ratio=1.0),
]


@pytest.mark.parametrize("params", CASES)
@pytest.mark.parametrize("multi_hop", [False, True])
def test_id_level_matches_the_text_level_path(tiny_tokenizer, params, multi_hop):
    assert _decodes_concatenatively(tiny_tokenizer)  # the fast path is the one under test
    pool, type1, type2 = corpus(seed=3)
    rows = type2 if multi_hop else type1
    if multi_hop:  # several keys need room
        params = {**params, "key": "segments", "max_tokens": 4 * params["max_tokens"]}
    expected = reference_interleave(tiny_tokenizer, rows, pool, params, seed=11)
    got = run_op(tiny_tokenizer, rows, pool, params, seed=11)
    assert len(got) >= len(rows) // 2
    assert got == expected
    for sample in got:  # the offsets point at the key text in the rendered context
        content = sample["messages"][0]["content"] if "messages" in sample else sample["prompt"]
        assert all(p["char_end"] > p["char_start"] for p in sample["key_positions"])
        assert content


def test_a_cut_filler_ending_inside_a_character_renders_the_same(tiny_tokenizer):
    # Only 3-byte characters: a filler cut at a token boundary often ends in the middle of one.
    pool = [{"id": f"p{i}", "text_id": f"p{i}", "segment": "日本語テキスト" * (3 + i % 4)} for i in range(40)]
    rows = [{"id": f"q{i}", "text_id": f"p{i}", "segment": pool[i]["segment"], "question": "Q?", "answer": "A."}
            for i in range(40)]
    params = dict(min_tokens=40, max_tokens=300, separator="")
    expected = reference_interleave(tiny_tokenizer, rows, pool, params, seed=2)
    assert any("\ufffd" in r["messages"][0]["content"] for r in expected)  # the case is exercised
    assert run_op(tiny_tokenizer, rows, pool, params, seed=2) == expected


def test_a_tokenizer_whose_decoding_is_not_concatenative_takes_the_exact_path(tiny_tokenizer):
    # SentencePiece-style decoding strips the first token's leading space: decode(a + b) != decode(a) +
    # decode(b). The op must notice and render every context the reference way.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    pool, type1, type2 = corpus(seed=4, texts=12)
    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace()
    raw.decoder = decoders.Metaspace()
    raw.train_from_iterator([r["segment"] for r in pool] * 2,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"], show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>")
    assert not _decodes_concatenatively(tok)
    for rows, params in ((type1, dict(min_tokens=40, max_tokens=160, short_ratio=0.5)),
                         (type2, dict(min_tokens=40, max_tokens=300, key="segments"))):
        assert run_op(tok, rows, pool, params, seed=1) == reference_interleave(tok, rows, pool, params, seed=1)
