"""Builds the small, offline data the shipped specs read. Deterministic: re-running rewrites the same files.

    python specs/data/make_data.py

* word_problems.jsonl / word_problems_heldout.jsonl: easy arithmetic word problems with gold answers and a
  category (the strategy key of the prompt-erasure spec), small enough for a 135M model to get many right;
  64 for training, 300 held out (none of them in training, none twice).
* stdlib_docs.jsonl: long docstrings of Python standard-library modules, an IN2 corpus available offline.
"""

from __future__ import annotations

import importlib
import inspect
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
NAMES = ["Ana", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jon", "Kira", "Liam"]
THINGS = ["apples", "books", "marbles", "stickers", "pencils", "cookies", "stamps", "shells"]


def _problem(rng: random.Random, i: int) -> dict:
    kind = ["addition", "subtraction", "multiplication", "word_problem"][i % 4]
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    if kind == "addition":
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        return {"category": kind, "question": f"What is {a} + {b}?", "answer": str(a + b)}
    if kind == "subtraction":
        a, b = rng.randint(10, 30), rng.randint(1, 9)
        return {"category": kind, "question": f"What is {a} - {b}?", "answer": str(a - b)}
    if kind == "multiplication":
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        return {"category": kind, "question": f"What is {a} times {b}?", "answer": str(a * b)}
    a, b = rng.randint(3, 15), rng.randint(2, 9)
    return {"category": kind, "question": f"{name} has {a} {thing} and buys {b} more. How many {thing} does "
                                          f"{name} have now?", "answer": str(a + b)}


# Held-out problems: enough that a difference of about ten points between two conditions scored on the
# same items is resolvable (a 95% interval on one accuracy at n = 300 is about +-5.5 points; at the former
# 12 it was +-25).
HELDOUT = 300


def word_problems() -> None:
    """64 training problems, then HELDOUT held-out ones drawn from the same stream.

    The stream is the one the first version of this file drew (80 problems, the last 16 held out), so the
    training file and the first 16 held-out rows are byte for byte what they were; the stream goes on past
    80, keeping only questions that are neither in the training file nor already held out: no held-out
    item was seen in training, and none counts twice. Small categories run out first (there are only 64
    "a times b" questions), so the later rows are additions, subtractions and word problems.
    """
    rng = random.Random(7)
    rows = [{"id": f"wp{i:03d}", **_problem(rng, i)} for i in range(80)]
    train, heldout = rows[:64], rows[64:]
    seen = {r["question"] for r in rows}
    i = 80
    while len(heldout) < HELDOUT:
        row = {"id": f"wp{i:03d}", **_problem(rng, i)}
        i += 1
        if row["question"] not in seen:
            seen.add(row["question"])
            heldout.append(row)
    for name, part in (("word_problems.jsonl", train), ("word_problems_heldout.jsonl", heldout)):
        with (HERE / name).open("w") as fh:
            for r in part:
                fh.write(json.dumps(r) + "\n")


MODULES = ["json", "csv", "argparse", "logging", "functools", "itertools", "collections", "pathlib", "textwrap",
           "difflib", "heapq", "bisect", "random", "statistics", "fractions", "decimal", "datetime", "calendar",
           "zipfile", "tarfile", "shutil", "tempfile", "glob", "fnmatch", "string", "re", "struct", "codecs",
           "unittest", "doctest", "pprint", "enum", "dataclasses", "contextlib", "abc", "typing", "inspect",
           "email", "html", "xml.dom.minidom", "sqlite3", "hashlib", "hmac", "secrets", "uuid", "base64",
           "urllib.parse", "http.client", "socket", "selectors", "threading", "queue", "sched", "subprocess"]


def stdlib_docs() -> None:
    rows = []
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        parts = [inspect.getdoc(module) or ""]
        for attr in sorted(dir(module)):
            obj = getattr(module, attr, None)
            if attr.startswith("_") or not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            if getattr(obj, "__module__", None) != module.__name__:
                continue
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 200:
                parts.append(f"{attr}: {doc}")
            if sum(map(len, parts)) > 2400:
                break
        text = "\n".join(p for p in parts if p).strip()
        if len(text) >= 1200:
            # ~2,000 characters is 4-5 segments of 128 tokens: enough for type-2 QA over several
            # segments, short enough that all of a text's segments fit the shipped spec's contexts.
            rows.append({"id": name, "title": f"the {name} module", "text": text[:2000]})
    with (HERE / "stdlib_docs.jsonl").open("w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    word_problems()
    stdlib_docs()
