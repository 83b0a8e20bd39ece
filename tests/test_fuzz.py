"""Property test: whatever a spec file holds, the compiler answers with positioned, coded errors or a plan.

Specs are mutated structurally (drop, rename, retype or duplicate keys; insert garbage values; swap
references) and textually (truncate, splice random bytes). For every mutant, ``validate_paths`` and
``compile_spec`` either succeed or raise :class:`SpecErrors` whose every error has a file, a line >= 1,
a column >= 1 and a known code. Any other exception is a bug. Each example must finish within a second.
"""

from __future__ import annotations

import copy
import os
import shutil
import time
import warnings
from pathlib import Path

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from specdsl import api  # noqa: E402
from specdsl.errors import CODES, SpecErrors  # noqa: E402
from specdsl.plugins import default_registry  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "specs"
SEEDS = [FIXTURES / "full.yaml", FIXTURES / "recipe.yaml"] + sorted((ROOT / "specs").glob("*.yaml"))
SEED_TEXTS = [p.read_text(encoding="utf-8") for p in SEEDS]
SEED_DATA = [yaml.safe_load(t) for t in SEED_TEXTS]

# ~100 examples per test, the same ones every run; SPECDSL_FUZZ_EXAMPLES=5000 explores at random.
_EXPLORE = int(os.environ.get("SPECDSL_FUZZ_EXAMPLES", "0"))
SETTINGS = settings(max_examples=_EXPLORE or 100, deadline=None, derandomize=not _EXPLORE, database=None,
                    suppress_health_check=list(HealthCheck))

GARBAGE = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-10**6, max_value=10**6), st.floats(allow_nan=True),
    st.text(max_size=20), st.just("{{ row.__class__ }}"), st.just("{{ row."), st.just("${env:X}"),
    st.just("sk-abcdefghijklmnop1234"), st.just([]), st.just({}), st.lists(st.integers(), max_size=3),
    st.just("problems"), st.just("teacher"), st.just({"from": "problems"}),
)
NAMES = st.sampled_from(["from", "model", "id", "use", "with", "steps", "models", "sources", "vars", "into",
                         "user", "system", "where", "match", "field", "gold", "rule", "train", "lora", "meta",
                         "max_new_token", "specdsl", "name", "path", "columns", "probes", "target", "x"])


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


def _get(node, path):
    for p in path:
        node = node[p]
    return node


@st.composite
def structural_mutant(draw) -> str:
    data = copy.deepcopy(draw(st.sampled_from(SEED_DATA)))
    for _ in range(draw(st.integers(1, 4))):
        paths = [p for p in _paths(data) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = _get(data, path[:-1])
        key = path[-1]
        action = draw(st.sampled_from(["drop", "rename", "retype", "add", "dup", "swap", "swap", "swap", "swap", "swap"]))
        strings = [v for p in _paths(data) if p and isinstance(v := _get(data, p), str)]
        if action == "swap" and strings:
            # Another string of the same spec (a step id, model, column or template): the schema still
            # passes, so references, column flow and templates are what gets exercised.
            parent[key] = draw(st.sampled_from(strings))
        elif action == "drop":
            del parent[key]
        elif action == "rename" and isinstance(parent, dict):
            parent[draw(NAMES)] = parent.pop(key)
        elif action == "retype":
            parent[key] = draw(GARBAGE)
        elif action == "add" and isinstance(parent, dict):
            parent[draw(NAMES)] = draw(GARBAGE)
        elif action == "dup" and isinstance(parent, list):
            parent.append(copy.deepcopy(parent[key]))
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


@st.composite
def textual_mutant(draw) -> bytes:
    raw = draw(st.sampled_from(SEED_TEXTS)).encode("utf-8")
    action = draw(st.sampled_from(["truncate", "splice", "delete", "insert_yaml"]))
    at = draw(st.integers(0, len(raw)))
    if action == "truncate":
        return raw[:at]
    if action == "splice":
        return raw[:at] + draw(st.binary(min_size=1, max_size=16)) + raw[at:]
    if action == "delete":
        return raw[:at] + raw[at + draw(st.integers(1, 40)):]
    snippet = draw(st.sampled_from(["&a [*a]", "!!python/name:os.system", "{", "]", ": :", "- -", "\t", "*x",
                                    "<<: *a", "? complex", "%YAML 1.2\n---", "'", "\"\\x", "\x00", "---\n"]))
    return raw[:at] + snippet.encode() + raw[at:]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(FIXTURES / "data", d / "data")
    for name in ("word_problems.jsonl", "word_problems_heldout.jsonl", "stdlib_docs.jsonl"):
        src = ROOT / "specs" / "data" / name
        if src.exists():
            shutil.copy(src, d / "data" / name)
    return d


STATS: dict[str, int] = {}


def check_outcome(path: Path) -> None:
    registry = default_registry()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.process_time()  # CPU time: the work done, not how busy the machine is
        results = api.validate_paths([path], registry=registry)
        assert time.process_time() - start < 1
        start = time.process_time()  # CPU time: the work done, not how busy the machine is
        try:
            api.compile_spec(path, registry=registry, identities=True)
            compiled = None
        except SpecErrors as exc:
            compiled = exc
        assert time.process_time() - start < 1
    stage = "ok" if compiled is None else min(compiled.codes)[:2]
    STATS[stage] = STATS.get(stage, 0) + 1
    for outcome in (results[str(path)], compiled):
        if outcome is None:
            continue
        assert outcome.errors
        for err in outcome.errors:
            assert err.code in CODES, err
            assert err.pos is not None and err.pos.file and err.pos.line >= 1 and err.pos.col >= 1, err
        outcome.render()  # printing never fails either


@SETTINGS
@given(text=structural_mutant())
def test_structural_mutants_give_positioned_errors_or_a_plan(workdir, text):
    path = workdir / "mutant.yaml"
    path.write_text(text, encoding="utf-8")
    check_outcome(path)


@SETTINGS
@given(raw=textual_mutant())
def test_textual_mutants_give_positioned_errors_or_a_plan(workdir, raw):
    path = workdir / "mutant.yaml"
    path.write_bytes(raw)
    check_outcome(path)
