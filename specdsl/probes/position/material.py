"""The offline source material of the three tasks, a pure function of the running Python's standard
library: prose sentences from docstrings (``document``), functions from sources (``code``), and the word
lists records are drawn from (``records``). :func:`source_fingerprint` names it so caches can key on it."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator, Sequence

from specdsl.probes.position.items import MAX_CODE_QUERY_CHARS, check_task

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
PIECE_WORDS = 8
_MIN_SENTENCE_WORDS = PIECE_WORDS + 4  # at least two words on each side of the piece
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
class SourceFunction:
    name: str
    text: str                         # dedented source, ``def`` at column 0
    query_lines: tuple[str, ...]      # stripped body lines usable as the question, in source order
    nested: bool                      # contains a nested def/class: the answer would be ambiguous


def _functions_of(module) -> Iterator[SourceFunction]:
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
        yield SourceFunction(node.name, text, tuple(query_lines), nested)


@lru_cache(maxsize=1)
def code_functions() -> tuple[SourceFunction, ...]:
    """Standard-library functions whose names are unique across the whole collection, in a fixed order."""
    found = [fn for module in _import_modules(CODE_MODULES) for fn in _functions_of(module)]
    name_counts: dict[str, int] = {}
    for fn in found:
        name_counts[fn.name] = name_counts.get(fn.name, 0) + 1
    # A name defined twice (get, close, ...) would make "which function?" ambiguous.
    return tuple(fn for fn in found if name_counts[fn.name] == 1)


@lru_cache(maxsize=1)
def code_corpus() -> str:
    return "\n".join(fn.text for fn in code_functions())


@lru_cache(maxsize=1)
def document_corpus() -> str:
    return "\n".join(document_sentences())


def source_fingerprint(task: str) -> str:
    """A hash of the material a task draws from (differs between Python versions): a cache key part."""
    check_task(task)
    if task == "document":
        material = document_corpus()
    elif task == "code":
        material = code_corpus()
    else:
        material = "records-v1:" + ",".join(LABEL_ADJECTIVES + LABEL_NOUNS + FIRST_NAMES + SURNAMES)
    return hashlib.sha256(material.encode("utf-8")).hexdigest()[:16]


LABEL_ADJECTIVES = (
    "amber", "brisk", "candid", "dusty", "eager", "frosty", "gentle", "hollow", "idle", "jagged",
    "keen", "lunar", "mellow", "nimble", "olive", "plain", "quiet", "rustic", "silver", "tidal",
    "umber", "vivid", "woolen", "young", "zesty", "bold", "coral", "dense", "faint", "golden",
    "humble", "ivory", "lofty", "murky", "noble", "polar", "rapid", "sober", "tawny", "velvet",
)
LABEL_NOUNS = (
    "anchor", "beacon", "canyon", "delta", "ember", "falcon", "glacier", "harbor", "island", "jasper",
    "kettle", "lantern", "meadow", "nebula", "orchard", "pebble", "quarry", "river", "summit", "thicket",
    "upland", "valley", "willow", "yarrow", "zephyr", "badger", "cobalt", "dune", "fjord", "grove",
    "heron", "inlet", "juniper", "kestrel", "lagoon", "marsh", "nectar", "otter", "prairie", "reef",
)
FIRST_NAMES = (
    "Ada", "Bram", "Cleo", "Dara", "Emil", "Fern", "Gus", "Hana", "Ivo", "Jude", "Kira", "Lars", "Mina",
    "Nils", "Orla", "Pia", "Quin", "Rosa", "Sven", "Tess", "Uma", "Vito", "Wren", "Yara", "Zeno",
)
SURNAMES = (
    "Abbott", "Berger", "Castell", "Dorsey", "Ellery", "Finch", "Garrow", "Holt", "Ingram", "Jarvis",
    "Keller", "Lindqvist", "Marlow", "Novak", "Okafor", "Pryor", "Quist", "Rowan", "Sato", "Tindall",
    "Ueda", "Vance", "Whitlock", "Yilmaz", "Zoller",
)
ID_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no 0/O or 1/I look-alikes
