"""Position probing after IN2's VaL probing (An et al. 2024, arXiv 2404.16811, repo microsoft/FILM).

A position probe asks the same kind of question about a *target* placed at different relative positions
of a long context, and reports accuracy per position bucket. A model that uses its whole context scores
flat; a "lost in the middle" model sags in the middle buckets. The summary follows the paper's Table 1:
the average over buckets and the max-min gap between buckets.

Three tasks, one per retrieval pattern of VaL probing, all built offline and deterministically:

``document`` -- document sentence retrieval, *bi-directional*.
    The context is a run of English sentences taken from the docstrings of a fixed list of standard-library
    modules. The instruction quotes a piece (8 consecutive words) from the middle of one sentence and asks
    for the complete sentence, so the model has to read both backward and forward from the piece. Scored
    as in the paper's ``plot.py``: recall of the gold sentence's words in the answer.
``code`` -- code function retrieval, *backward*.
    The context is a run of Python functions taken from the source of a fixed list of standard-library
    modules. The instruction quotes one line of a function body and asks for the function's name, which
    stands *before* the line. Scored 1 when the name appears in the answer as a whole word.
``records`` -- structured record retrieval, *forward*.
    The context is a list of generated records ``id: ..., name: ..., label: ...``. The instruction gives
    an id and asks for the label, which stands *after* the id. Scored 1 when the label appears in the
    answer (case-insensitive).

Every target's query (piece, code line, id) occurs exactly once in its context, so each question has
exactly one right answer. Contexts are filled up to ``context_tokens`` as measured by the ``count_tokens``
callable passed in (default: :func:`approx_token_count`), and the target's *midpoint* is placed so that
its relative token position falls in the requested bucket. Everything is a pure function of the
arguments, the seed and the running Python's standard library (docstrings and sources change between
Python versions: :func:`source_fingerprint` names the material so caches can key on it).

The probe never talks to a model itself: :func:`run_position_probe` takes an ``answer(prompts) -> texts``
callable, so any generation backend (or a test oracle) can stand behind it.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

POSITION_TASKS: tuple[str, ...] = ("document", "code", "records")
# The longest code line a ``code`` instruction quotes (the plan's estimate sizes prompts by it).
MAX_CODE_QUERY_CHARS = 100

# The IN2 training/evaluation template (FACTS.md), without Mistral's [INST] tags: the chat template of
# whichever model answers adds its own turn markers around the user message.
IN2_TEMPLATE = (
    "Below is a context and an instruction. Based on the information provided in the context, "
    "write a response for the instruction.\n\n### Context:\n{context}\n\n### Instruction:\n{instruction}"
)

INSTRUCTIONS: Mapping[str, str] = {
    "document": 'In the above context, which sentence contains the piece "{query}"? '
                "Output the complete sentence.",
    "code": 'In the above context, which function contains the code line "{query}"? '
            "Output the function name.",
    "records": 'In the above context, what is the label of the record whose id is "{query}"? '
               "Output the label.",
}

# How units are joined into a context. Sentences read as one running document (the paper's contexts are
# prose); functions are separated like in a source file; records are one per line.
_JOINERS: Mapping[str, str] = {"document": " ", "code": "\n\n\n", "records": "\n"}

CountTokens = Callable[[str], int]
AnswerFn = Callable[[list[list[dict]]], list[str]]


def approx_token_count(text: str) -> int:
    """A tokenizer-free token estimate: the larger of the word count and characters / 4.

    It is subadditive (the count of a concatenation never exceeds the sum of the parts), so a context
    assembled from counted parts never overshoots its budget under this estimate.
    """
    return max(len(text.split()), -(-len(text) // 4))


# --------------------------------------------------------------------------------------------------
# Items and results
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeItem:
    """One question of a position probe.

    ``position`` is the relative token position of the target's midpoint in the context, in [0, 1);
    ``bucket`` is ``floor(position * n_buckets)``. ``context_span`` locates the context inside the last
    message's content and ``target_span`` locates the target inside the context (character offsets), so
    the context is not stored twice.
    """

    task: str
    messages: tuple[Mapping[str, str], ...]
    expected: str
    bucket: int
    position: float
    n_buckets: int
    query: str
    context_tokens: int
    context_span: tuple[int, int]
    target_span: tuple[int, int]

    @property
    def context(self) -> str:
        start, end = self.context_span
        return self.messages[-1]["content"][start:end]

    @property
    def target(self) -> str:
        start, end = self.target_span
        return self.context[start:end]

    def prompt(self) -> list[dict]:
        """The chat messages as fresh mutable dicts, the shape an ``answer`` callable receives."""
        return [dict(message) for message in self.messages]

    def to_dict(self) -> dict:
        return {
            "task": self.task, "messages": self.prompt(), "expected": self.expected,
            "bucket": self.bucket, "position": self.position, "n_buckets": self.n_buckets,
            "query": self.query, "context_tokens": self.context_tokens,
            "context_span": list(self.context_span), "target_span": list(self.target_span),
        }


@dataclass(frozen=True)
class PositionResult:
    """Scores of one probe, in percent (0-100) like the paper's Table 1.

    ``per_bucket[b]`` is the mean item score in bucket b (NaN for a bucket without items; JSON gets
    null); ``avg`` is the mean over non-empty buckets and ``gap`` their max minus min.
    """

    task: str
    per_bucket: tuple[float, ...]
    counts: tuple[int, ...]
    avg: float
    gap: float
    n: int

    @property
    def n_buckets(self) -> int:
        return len(self.per_bucket)

    def to_dict(self) -> dict:
        return {
            "task": self.task,
            "per_bucket": [None if math.isnan(v) else v for v in self.per_bucket],
            "counts": list(self.counts),
            "avg": None if math.isnan(self.avg) else self.avg,
            "gap": None if math.isnan(self.gap) else self.gap,
            "n": self.n,
        }


# --------------------------------------------------------------------------------------------------
# Offline source material
# --------------------------------------------------------------------------------------------------

# Fixed lists keep the material deterministic for a given Python. Modules missing from a particular
# build are skipped rather than failing the probe.
DOC_MODULES: tuple[str, ...] = (
    "argparse", "ast", "asyncio.events", "asyncio.tasks", "base64", "bdb", "bisect", "calendar", "cmd",
    "codecs", "collections", "concurrent.futures._base", "configparser", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "dis", "doctest", "email.header", "email.message",
    "email.parser", "email.utils", "enum", "filecmp", "fnmatch", "fractions", "ftplib", "functools",
    "getopt", "gettext", "glob", "gzip", "heapq", "hmac", "html.parser", "http.client", "http.cookies",
    "http.server", "imaplib", "importlib.metadata", "inspect", "ipaddress", "json.decoder",
    "json.encoder", "locale", "logging", "logging.handlers", "mailbox", "mimetypes",
    "multiprocessing.pool", "netrc", "ntpath", "numbers", "operator", "optparse", "os", "pathlib",
    "pdb", "pickle", "pickletools", "pkgutil", "platform", "plistlib", "poplib", "posixpath", "pprint",
    "pstats", "pydoc", "queue", "quopri", "random", "reprlib", "runpy", "sched", "secrets", "selectors",
    "shelve", "shlex", "shutil", "smtplib", "socket", "socketserver", "statistics", "string",
    "subprocess", "sysconfig", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize",
    "trace", "traceback", "types", "typing", "unittest.case", "urllib.parse", "urllib.request",
    "urllib.robotparser", "uuid", "warnings", "wave", "weakref", "xml.etree.ElementTree",
    "xmlrpc.client", "zipfile", "zoneinfo",
)
CODE_MODULES: tuple[str, ...] = DOC_MODULES

_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_PIECE_WORDS = 8
_MIN_SENTENCE_WORDS = _PIECE_WORDS + 4  # at least two words on each side of the piece
_MAX_SENTENCE_WORDS = 60
_MIN_FUNCTION_LINES, _MAX_FUNCTION_LINES = 4, 40


def _import_modules(names: Sequence[str]) -> list:
    import importlib

    modules = []
    for name in names:
        try:
            modules.append(importlib.import_module(name))
        except Exception:  # noqa: BLE001 - a module absent from this Python build is simply skipped
            continue
    return modules


def _docstrings(module) -> Iterator[str]:
    import inspect

    doc = inspect.getdoc(module)
    if doc:
        yield doc
    for _, obj in sorted(vars(module).items()):
        if getattr(obj, "__module__", None) != module.__name__:
            continue  # re-exported objects would repeat another module's docstrings
        if inspect.isclass(obj) or inspect.isfunction(obj):
            doc = inspect.getdoc(obj)
            if doc:
                yield doc
        if inspect.isclass(obj):
            for _, member in sorted(vars(obj).items()):
                if inspect.isfunction(member) and member.__doc__:
                    yield inspect.cleandoc(member.__doc__)


def _is_prose(sentence: str) -> bool:
    if not (sentence.isascii() and sentence[0].isupper() and sentence[-1] in ".!?"):
        return False
    if not _MIN_SENTENCE_WORDS <= len(sentence.split()) <= _MAX_SENTENCE_WORDS:
        return False
    # Mostly letters: drops signatures, doctest fragments and tables that slipped through.
    letters = sum(c.isalpha() or c == " " for c in sentence)
    return letters >= 0.85 * len(sentence)


@lru_cache(maxsize=1)
def document_sentences() -> tuple[str, ...]:
    """Unique prose sentences from standard-library docstrings, in a fixed order.

    Each sentence starts with a capital, ends with ``.``/``!``/``?`` and contains no sentence boundary
    (terminator, whitespace, capital) inside, so splitting a context at boundaries gives them back.
    """
    import warnings

    seen: dict[str, None] = {}
    with warnings.catch_warnings():  # reading deprecated aliases' docstrings (typing.io, ...) warns
        warnings.simplefilter("ignore", DeprecationWarning)
        for module in _import_modules(DOC_MODULES):
            for doc in _docstrings(module):
                for paragraph in re.split(r"\n\s*\n", doc):
                    lines = paragraph.splitlines()
                    if any(line.startswith((" ", "\t", ">>>")) for line in lines):
                        continue  # indented blocks are code samples or tables, not prose
                    for sentence in _SENTENCE_SPLIT.split(" ".join(paragraph.split())):
                        if _is_prose(sentence):
                            seen.setdefault(sentence, None)
    return tuple(seen)


@dataclass(frozen=True)
class _Function:
    name: str
    text: str                         # dedented source, ``def`` at column 0
    query_lines: tuple[str, ...]      # stripped body lines usable as the question, in source order
    nested: bool                      # contains a nested def/class: the answer would be ambiguous


def _functions_of(module) -> Iterator[_Function]:
    import ast
    import inspect
    import textwrap

    try:
        source = inspect.getsource(module)
    except (OSError, TypeError):
        return
    tree = ast.parse(source)
    lines = source.splitlines()
    nodes = list(tree.body)
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            nodes.extend(node.body)  # methods; nested classes' methods are left out
    for node in nodes:
        if not isinstance(node, ast.FunctionDef) or node.name.startswith("__"):
            continue
        n_lines = node.end_lineno - node.lineno + 1
        if not _MIN_FUNCTION_LINES <= n_lines <= _MAX_FUNCTION_LINES:
            continue
        text = textwrap.dedent("\n".join(lines[node.lineno - 1:node.end_lineno]))
        if not text.startswith("def ") or not text.isascii():
            continue  # a body line indented less than the def (odd string literal) breaks the layout
        body_start = node.body[0].lineno
        first = node.body[0]
        if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)):
            body_start = first.end_lineno + 1  # skip the docstring: the question is about code
        query_lines = []
        for raw in lines[body_start - 1:node.end_lineno]:
            line = raw.strip()
            if 20 <= len(line) <= MAX_CODE_QUERY_CHARS and not line.startswith("#") and node.name not in line:
                query_lines.append(line)  # a line naming its own function would give the answer away
        nested = any(isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda))
                     for stmt in node.body for sub in ast.walk(stmt))
        yield _Function(node.name, text, tuple(query_lines), nested)


@lru_cache(maxsize=1)
def code_functions() -> tuple[_Function, ...]:
    """Standard-library functions whose names are unique across the whole collection, in a fixed order."""
    found = [fn for module in _import_modules(CODE_MODULES) for fn in _functions_of(module)]
    name_counts: dict[str, int] = {}
    for fn in found:
        name_counts[fn.name] = name_counts.get(fn.name, 0) + 1
    # A name defined twice (get, close, ...) would make "which function?" ambiguous.
    return tuple(fn for fn in found if name_counts[fn.name] == 1)


@lru_cache(maxsize=1)
def _code_corpus() -> str:
    return "\n".join(fn.text for fn in code_functions())


@lru_cache(maxsize=1)
def _document_corpus() -> str:
    return "\n".join(document_sentences())


def source_fingerprint(task: str) -> str:
    """A hash of the material a task draws from (differs between Python versions): a cache key part."""
    _check_task(task)
    if task == "document":
        material = _document_corpus()
    elif task == "code":
        material = _code_corpus()
    else:
        material = "records-v1:" + ",".join(_LABEL_ADJECTIVES + _LABEL_NOUNS + _FIRST_NAMES + _SURNAMES)
    return hashlib.sha256(material.encode("utf-8")).hexdigest()[:16]


_LABEL_ADJECTIVES = (
    "amber", "brisk", "candid", "dusty", "eager", "frosty", "gentle", "hollow", "idle", "jagged",
    "keen", "lunar", "mellow", "nimble", "olive", "plain", "quiet", "rustic", "silver", "tidal",
    "umber", "vivid", "woolen", "young", "zesty", "bold", "coral", "dense", "faint", "golden",
    "humble", "ivory", "lofty", "murky", "noble", "polar", "rapid", "sober", "tawny", "velvet",
)
_LABEL_NOUNS = (
    "anchor", "beacon", "canyon", "delta", "ember", "falcon", "glacier", "harbor", "island", "jasper",
    "kettle", "lantern", "meadow", "nebula", "orchard", "pebble", "quarry", "river", "summit", "thicket",
    "upland", "valley", "willow", "yarrow", "zephyr", "badger", "cobalt", "dune", "fjord", "grove",
    "heron", "inlet", "juniper", "kestrel", "lagoon", "marsh", "nectar", "otter", "prairie", "reef",
)
_FIRST_NAMES = (
    "Ada", "Bram", "Cleo", "Dara", "Emil", "Fern", "Gus", "Hana", "Ivo", "Jude", "Kira", "Lars", "Mina",
    "Nils", "Orla", "Pia", "Quin", "Rosa", "Sven", "Tess", "Uma", "Vito", "Wren", "Yara", "Zeno",
)
_SURNAMES = (
    "Abbott", "Berger", "Castell", "Dorsey", "Ellery", "Finch", "Garrow", "Holt", "Ingram", "Jarvis",
    "Keller", "Lindqvist", "Marlow", "Novak", "Okafor", "Pryor", "Quist", "Rowan", "Sato", "Tindall",
    "Ueda", "Vance", "Whitlock", "Yilmaz", "Zoller",
)
_ID_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no 0/O or 1/I look-alikes


# --------------------------------------------------------------------------------------------------
# Per-task targets and fillers
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    text: str       # the unit placed in the context
    query: str      # what the instruction quotes
    expected: str   # the gold answer


def _document_targets(rng: random.Random, count: int, max_tokens: int, tokens: CountTokens) -> list[_Target]:
    corpus = _document_corpus()
    sentences = list(document_sentences())
    rng.shuffle(sentences)
    targets = []
    for sentence in sentences:
        if len(targets) == count:
            break
        if tokens(sentence) > max_tokens:
            continue
        words = sentence.split()
        start = rng.randint(2, len(words) - _PIECE_WORDS - 2)
        piece = " ".join(words[start:start + _PIECE_WORDS])
        if corpus.count(piece) == 1:  # the piece must point at one sentence of the whole source
            targets.append(_Target(sentence, piece, sentence))
    return targets


def _document_fillers(rng: random.Random, target: _Target) -> Iterator[str]:
    sentences = list(document_sentences())
    rng.shuffle(sentences)
    for sentence in sentences:
        if sentence != target.text and target.query not in sentence:
            yield sentence


def _code_targets(rng: random.Random, count: int, max_tokens: int, tokens: CountTokens) -> list[_Target]:
    corpus = _code_corpus()
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
                targets.append(_Target(fn.text, line, fn.name))
                break
    return targets


def _code_fillers(rng: random.Random, target: _Target) -> Iterator[str]:
    functions = [fn.text for fn in code_functions()]
    rng.shuffle(functions)
    for text in functions:
        if text != target.text and target.query not in text:
            yield text


def _new_record(rng: random.Random) -> tuple[str, str, str]:
    record_id = "".join(rng.choice(_ID_ALPHABET) for _ in range(4)) + "-" + \
        "".join(rng.choice(_ID_ALPHABET) for _ in range(4))
    name = f"{rng.choice(_FIRST_NAMES)} {rng.choice(_SURNAMES)}"
    label = f"{rng.choice(_LABEL_ADJECTIVES)} {rng.choice(_LABEL_NOUNS)}"
    return record_id, name, label


def _record_line(record_id: str, name: str, label: str) -> str:
    return f"id: {record_id}, name: {name}, label: {label}"


def _records_targets(rng: random.Random, count: int, max_tokens: int, tokens: CountTokens) -> list[_Target]:
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
        targets.append(_Target(line, record_id, label))
    return targets


def _records_fillers(rng: random.Random, target: _Target) -> Iterator[str]:
    used = {target.query}
    while True:  # endless: the builder stops drawing when the context is full
        record_id, name, label = _new_record(rng)
        if record_id not in used:
            used.add(record_id)
            yield _record_line(record_id, name, label)


_TARGETS = {"document": _document_targets, "code": _code_targets, "records": _records_targets}
_FILLERS = {"document": _document_fillers, "code": _code_fillers, "records": _records_fillers}


def _check_task(task: str) -> None:
    if task not in POSITION_TASKS:
        raise ValueError(f"unknown position task {task!r}; expected one of {', '.join(POSITION_TASKS)}")


# --------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------


class _MemoCounter:
    """Caches token counts of repeated units (sentences and functions recur across items)."""

    def __init__(self, count_tokens: CountTokens):
        self._count = count_tokens
        self._memo: dict[str, int] = {}

    def __call__(self, text: str) -> int:
        n = self._memo.get(text)
        if n is None:
            n = int(self._count(text))
            if len(text) < 20_000:  # whole contexts are counted once; keep only units
                self._memo[text] = n
        return n


def bucket_of(position: float, n_buckets: int) -> int:
    return min(int(position * n_buckets), n_buckets - 1)


def _assemble(fillers: list[str], k: int, target: str, joiner: str) -> tuple[str, int, int]:
    before = joiner.join(fillers[:k])
    after = joiner.join(fillers[k:])
    start = len(before) + (len(joiner) if k > 0 else 0)
    end = start + len(target)
    parts = [p for p in (before, target, after) if p]
    return joiner.join(parts), start, end


def _place(task: str, target: _Target, fillers: list[str], bucket: int, n_buckets: int,
           budget: int, rng: random.Random, tokens: _MemoCounter) -> tuple[str, int, int, float, int]:
    """Insert the target among the fillers so that its measured midpoint falls in ``bucket``.

    The insertion index is first chosen from additive estimates (unit counts plus separators), then the
    assembled context is measured with the real counter: a context over budget loses a filler, a
    midpoint outside the bucket moves the target by one unit, until both hold.
    """
    joiner = _JOINERS[task]
    sep = tokens(joiner)
    target_tokens = tokens(target.text)
    unit_tokens = [tokens(f) for f in fillers]
    total_est = sum(unit_tokens) + target_tokens + len(fillers) * sep
    lo, hi = bucket / n_buckets, (bucket + 1) / n_buckets
    prefix, mids = 0, []
    for k in range(len(fillers) + 1):
        mids.append((prefix + target_tokens / 2) / total_est)
        if k < len(fillers):
            prefix += unit_tokens[k] + sep
    inside = [k for k, mid in enumerate(mids) if lo <= mid < hi]
    center = (lo + hi) / 2
    k = rng.choice(inside) if inside else min(range(len(mids)), key=lambda i: abs(mids[i] - center))

    fillers = list(fillers)
    visited: set[tuple[int, int]] = set()
    while True:
        context, start, end = _assemble(fillers, k, target.text, joiner)
        total = tokens(context)
        if total > budget:
            if not fillers:
                break
            if k < len(fillers):
                fillers.pop()            # drop from the far end: the target's index is unchanged
            else:
                fillers.pop(0)
                k -= 1
            continue
        position = (tokens(context[:start]) + tokens(target.text) / 2) / total if total else 0.0
        position = min(position, math.nextafter(1.0, 0.0))
        if bucket_of(position, n_buckets) == bucket:
            return context, start, end, position, total
        if (k, len(fillers)) in visited:
            break
        visited.add((k, len(fillers)))
        step = 1 if position < lo else -1
        if not 0 <= k + step <= len(fillers):
            break
        k += step
    raise ValueError(
        f"cannot place a {task} target in position bucket {bucket} of {n_buckets} within "
        f"{budget} tokens: raise context_tokens or lower n_buckets")


def build_position_probe(
    task: str,
    *,
    context_tokens: int,
    n_buckets: int = 8,    # the evaluate step's defaults (PositionProbe.DEFAULTS; a test keeps them equal)
    per_bucket: int = 4,
    seed: int = 0,
    count_tokens: CountTokens | None = None,
    system: str | None = None,
    template: str = IN2_TEMPLATE,
) -> list[ProbeItem]:
    """Build ``n_buckets * per_bucket`` probe items for ``task``, ordered by bucket.

    ``context_tokens`` bounds the context alone (the template and instruction add a few dozen tokens on
    top). Each unit of the context (sentence, function, record) is at most ``context_tokens / n_buckets``
    tokens so every bucket can be hit. Targets are distinct within one build where the source allows.
    ``template`` must contain ``{context}`` and ``{instruction}``; ``system`` adds a system message.
    """
    _check_task(task)
    if context_tokens <= 0 or n_buckets <= 0 or per_bucket <= 0:
        raise ValueError("context_tokens, n_buckets and per_bucket must be positive")
    if "{context}" not in template or "{instruction}" not in template:
        raise ValueError("template must contain {context} and {instruction}")
    tokens = _MemoCounter(count_tokens or approx_token_count)
    max_unit = context_tokens // n_buckets
    wanted = n_buckets * per_bucket
    targets = _TARGETS[task](random.Random(f"specdsl.position:{task}:{seed}:targets"), wanted, max_unit,
                             tokens)
    if not targets:
        raise ValueError(f"no {task} target fits in {max_unit} tokens: raise context_tokens or lower n_buckets")
    while len(targets) < wanted:  # a small source repeats targets rather than under-filling buckets
        targets = targets + targets[:wanted - len(targets)]

    joiner = _JOINERS[task]
    sep = tokens(joiner)
    items: list[ProbeItem] = []
    for index, target in enumerate(targets):
        bucket, sample = divmod(index, per_bucket)
        rng = random.Random(f"specdsl.position:{task}:{seed}:{bucket}:{sample}")
        room = context_tokens - tokens(target.text)
        chosen: list[str] = []
        pool = _FILLERS[task](rng, target)
        # Two rounds: the first fills by summed unit counts (an upper bound for subadditive counters,
        # close for real tokenizers); the second spends whatever the measured context left free.
        for _ in range(2):
            used, misses = 0, 0
            for filler in pool:
                size = tokens(filler)
                if size > max_unit:
                    continue  # a unit wider than a bucket would make some buckets unreachable
                if used + size + sep <= room:
                    chosen.append(filler)
                    used += size + sep
                    misses = 0
                else:
                    misses += 1
                    if misses >= 64 or room - used <= sep:
                        break  # the context is as full as the remaining units allow
            room = context_tokens - tokens(joiner.join([*chosen, target.text]))
            if room <= sep:
                break
        context, start, end, position, total = _place(task, target, chosen, bucket, n_buckets,
                                                      context_tokens, rng, tokens)
        instruction = INSTRUCTIONS[task].format(query=target.query)
        # Plain replacement, not str.format: contexts (code, docstrings) are full of braces.
        head, tail = template.split("{context}", 1)
        head = head.replace("{instruction}", instruction)
        tail = tail.replace("{instruction}", instruction)
        content = head + context + tail
        messages: list[Mapping[str, str]] = []
        if system is not None:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": content})
        items.append(ProbeItem(
            task=task, messages=tuple(messages), expected=target.expected, bucket=bucket,
            position=position, n_buckets=n_buckets, query=target.query, context_tokens=total,
            context_span=(len(head), len(head) + len(context)), target_span=(start, end)))
    return items


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------

_WORD = re.compile(r"\w+")


def score_answer(task: str, answer: str, expected: str) -> float:
    """The score of one answer in [0, 1], following the matching rules of the paper's ``plot.py``."""
    _check_task(task)
    answer = answer or ""
    if task == "document":
        # Word recall of the gold sentence. Words are \w+ runs rather than whitespace splits, so quotes
        # and punctuation around a copied sentence do not cost recall.
        gold = set(_WORD.findall(expected.lower()))
        if not gold:
            return 0.0
        return len(gold & set(_WORD.findall(answer.lower()))) / len(gold)
    if task == "code":
        # Whole-word match: "get" must not count as found inside "get_value".
        return 1.0 if re.search(rf"(?<!\w){re.escape(expected)}(?!\w)", answer) else 0.0
    normalized = " ".join(answer.lower().split())
    return 1.0 if " ".join(expected.lower().split()).strip(".") in normalized else 0.0


def score_position_probe(items: Sequence[ProbeItem], answers: Sequence[str]) -> PositionResult:
    """Per-bucket accuracy (percent), the mean over buckets and the max-min gap.

    Items may mix tasks only if they share ``n_buckets``; the result's ``task`` then joins their names.
    """
    if len(items) != len(answers):
        raise ValueError(f"{len(items)} items but {len(answers)} answers")
    if not items:
        raise ValueError("no items to score")
    n_buckets = items[0].n_buckets
    if any(item.n_buckets != n_buckets for item in items):
        raise ValueError("items come from probes with different n_buckets")
    sums = [0.0] * n_buckets
    counts = [0] * n_buckets
    for item, answer in zip(items, answers):
        sums[item.bucket] += score_answer(item.task, answer, item.expected)
        counts[item.bucket] += 1
    per_bucket = tuple(100.0 * s / c if c else math.nan for s, c in zip(sums, counts))
    filled = [v for v in per_bucket if not math.isnan(v)]
    tasks = "+".join(dict.fromkeys(item.task for item in items))
    return PositionResult(task=tasks, per_bucket=per_bucket, counts=tuple(counts),
                          avg=sum(filled) / len(filled), gap=max(filled) - min(filled), n=len(items))


def combine_position_results(results: Sequence[PositionResult], task: str = "all") -> PositionResult:
    """The paper's "All" column: the mean of the tasks' averages and the mean of their gaps.

    (The gap of the mean curve would be smaller, because tasks sag at different positions; Table 1
    averages the per-task gaps.) ``per_bucket`` is the mean curve, for plotting.
    """
    if not results:
        raise ValueError("no results to combine")
    n_buckets = results[0].n_buckets
    if any(r.n_buckets != n_buckets for r in results):
        raise ValueError("results have different numbers of buckets")
    per_bucket = []
    for b in range(n_buckets):
        values = [r.per_bucket[b] for r in results if not math.isnan(r.per_bucket[b])]
        per_bucket.append(sum(values) / len(values) if values else math.nan)
    counts = tuple(sum(r.counts[b] for r in results) for b in range(n_buckets))
    return PositionResult(task=task, per_bucket=tuple(per_bucket), counts=counts,
                          avg=sum(r.avg for r in results) / len(results),
                          gap=sum(r.gap for r in results) / len(results),
                          n=sum(r.n for r in results))


def run_position_probe(items: Sequence[ProbeItem], answer: AnswerFn, *,
                       batch_size: int | None = None) -> tuple[PositionResult, list[str]]:
    """Ask ``answer`` every item's prompt (in batches when ``batch_size`` is set) and score the answers.

    Returns the result and the raw answers (keep them: rescoring is free, regenerating is not).
    """
    prompts = [item.prompt() for item in items]
    size = batch_size or len(prompts) or 1
    answers: list[str] = []
    for start in range(0, len(prompts), size):
        batch = prompts[start:start + size]
        got = list(answer(batch))
        if len(got) != len(batch):
            raise ValueError(f"answer() returned {len(got)} texts for {len(batch)} prompts")
        answers.extend(got)
    return score_position_probe(items, answers), answers


# --------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------

ResultsByModel = Mapping[str, "PositionResult | Mapping[str, PositionResult]"]


def _by_task(results: ResultsByModel) -> dict[str, dict[str, PositionResult]]:
    """Normalize ``{label: result}`` and ``{label: {task: result}}`` to the nested form."""
    nested: dict[str, dict[str, PositionResult]] = {}
    for label, value in results.items():
        if isinstance(value, PositionResult):
            nested[label] = {value.task: value}
        else:
            nested[label] = dict(value)
    return nested


def results_table(results: ResultsByModel, *, digits: int = 1) -> list[dict[str, object]]:
    """Rows shaped like the paper's Table 1: one per model, ``<task> avg`` and ``<task> gap`` columns,
    plus ``all avg``/``all gap`` (mean of averages, mean of gaps) when a model has several tasks.

    ``results`` is ``{label: PositionResult}`` or ``{label: {task: PositionResult}}``. Values are
    rounded to ``digits``; a missing task is None.
    """
    nested = _by_task(results)
    tasks = list(dict.fromkeys(task for per_task in nested.values() for task in per_task))
    rows = []
    for label, per_task in nested.items():
        row: dict[str, object] = {"model": label}
        for task in tasks:
            result = per_task.get(task)
            row[f"{task} avg"] = None if result is None else round(result.avg, digits)
            row[f"{task} gap"] = None if result is None else round(result.gap, digits)
        if len(tasks) > 1:
            present = [per_task[t] for t in tasks if t in per_task]
            overall = combine_position_results(present)
            row["all avg"] = round(overall.avg, digits)
            row["all gap"] = round(overall.gap, digits)
        rows.append(row)
    return rows


def format_table(rows: Sequence[Mapping[str, object]]) -> str:
    """Plain-text, column-aligned rendering of table rows (for a terminal or a log)."""
    if not rows:
        return ""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    cells = [["" if row.get(c) is None else str(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def plot_position_results(results: ResultsByModel, path: str | Path, *, title: str | None = None) -> Path:
    """Write a PNG of accuracy against relative position, one panel per task, one line per model.

    ``results`` is ``{label: PositionResult}`` or ``{label: {task: PositionResult}}``. Uses matplotlib's
    object API with the Agg canvas, so no global backend or pyplot state is touched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    nested = _by_task(results)
    tasks = list(dict.fromkeys(task for per_task in nested.values() for task in per_task))
    if not tasks:
        raise ValueError("no results to plot")
    figure = Figure(figsize=(5.5 * len(tasks), 4.2), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(tasks), squeeze=False)[0]
    for ax, task in zip(axes, tasks):
        for label, per_task in nested.items():
            result = per_task.get(task)
            if result is None:
                continue
            n = result.n_buckets
            x = [100.0 * (b + 0.5) / n for b in range(n)]
            ax.plot(x, list(result.per_bucket), marker="o", linewidth=2,
                    label=f"{label} (avg {result.avg:.1f}, gap {result.gap:.1f})")
        ax.set_title(task)
        ax.set_xlim(0, 100)
        ax.set_ylim(-2, 102)
        ax.set_xlabel("relative position of the target in the context (%)")
        ax.set_ylabel("accuracy (%)")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower left", fontsize="small")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path
