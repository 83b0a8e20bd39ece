"""Per task, the targets a probe asks about (the unit placed in the context, what the instruction quotes,
the gold answer) and the endless stream of filler units around them; every query occurs once."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator

from specdsl.probes.position.items import CountTokens
from specdsl.probes.position.material import (FIRST_NAMES, ID_ALPHABET, LABEL_ADJECTIVES, LABEL_NOUNS, PIECE_WORDS, SURNAMES,
                                             code_corpus, code_functions, document_corpus, document_sentences)


@dataclass(frozen=True)
class Target:
    text: str       # the unit placed in the context
    query: str      # what the instruction quotes
    expected: str   # the gold answer


def _document_targets(rng: random.Random, count: int, max_tokens: int, tokens: CountTokens) -> list[Target]:
    corpus = document_corpus()
    sentences = list(document_sentences())
    rng.shuffle(sentences)
    targets = []
    for sentence in sentences:
        if len(targets) == count:
            break
        if tokens(sentence) > max_tokens:
            continue
        words = sentence.split()
        start = rng.randint(2, len(words) - PIECE_WORDS - 2)
        piece = " ".join(words[start:start + PIECE_WORDS])
        if corpus.count(piece) == 1:  # the piece must point at one sentence of the whole source
            targets.append(Target(sentence, piece, sentence))
    return targets


def _document_fillers(rng: random.Random, target: Target) -> Iterator[str]:
    sentences = list(document_sentences())
    rng.shuffle(sentences)
    for sentence in sentences:
        if sentence != target.text and target.query not in sentence:
            yield sentence


def _code_targets(rng: random.Random, count: int, max_tokens: int, tokens: CountTokens) -> list[Target]:
    corpus = code_corpus()
    functions = [fn for fn in code_functions() if fn.query_lines and not fn.nested]
    rng.shuffle(functions)
    targets = []
    for fn in functions:
        if len(targets) == count:
            break
        if tokens(fn.text) > max_tokens:
            continue
        candidates = list(fn.query_lines)
        rng.shuffle(candidates)
        for line in candidates[:4]:
            if corpus.count(line) == 1:  # the line must exist once in the whole source, as a substring
                targets.append(Target(fn.text, line, fn.name))
                break
    return targets


def _code_fillers(rng: random.Random, target: Target) -> Iterator[str]:
    functions = [fn.text for fn in code_functions()]
    rng.shuffle(functions)
    for text in functions:
        if text != target.text and target.query not in text:
            yield text


def _new_record(rng: random.Random) -> tuple[str, str, str]:
    record_id = "".join(rng.choice(ID_ALPHABET) for _ in range(4)) + "-" + \
        "".join(rng.choice(ID_ALPHABET) for _ in range(4))
    name = f"{rng.choice(FIRST_NAMES)} {rng.choice(SURNAMES)}"
    label = f"{rng.choice(LABEL_ADJECTIVES)} {rng.choice(LABEL_NOUNS)}"
    return record_id, name, label


def _record_line(record_id: str, name: str, label: str) -> str:
    return f"id: {record_id}, name: {name}, label: {label}"


def _records_targets(rng: random.Random, count: int, max_tokens: int, tokens: CountTokens) -> list[Target]:
    targets, ids = [], set()
    while len(targets) < count:
        record_id, name, label = _new_record(rng)
        if record_id in ids:
            continue
        ids.add(record_id)
        line = _record_line(record_id, name, label)
        if tokens(line) > max_tokens:
            raise ValueError(f"a record needs {tokens(line)} tokens but a bucket holds {max_tokens}: "
                             "raise context_tokens or lower n_buckets")
        targets.append(Target(line, record_id, label))
    return targets


def _records_fillers(rng: random.Random, target: Target) -> Iterator[str]:
    used = {target.query}
    while True:  # endless: the builder stops drawing when the context is full
        record_id, name, label = _new_record(rng)
        if record_id not in used:
            used.add(record_id)
            yield _record_line(record_id, name, label)


TARGETS = {"document": _document_targets, "code": _code_targets, "records": _records_targets}
FILLERS = {"document": _document_fillers, "code": _code_fillers, "records": _records_fillers}
