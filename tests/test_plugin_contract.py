"""Plugins are equals, and a broken one never takes specdsl down.

* A broken plugin installed beside the project (a real dist-info: a backend without ``options_schema``,
  an op with an invalid schema fragment and a hook that raises): every shipped spec still validates, the
  plugin is named in a warning, ``specdsl plugins`` marks it failed with the reasons.
* A plugin op with its own estimate, a plugin source format and the two new built-in folder formats
  (``parquet_dir``, ``hf_dataset``) are used in specs end to end: validate, plan, run.
* The core names no op and no backend: a scan of its source finds no comparison with one.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import types
import warnings
from pathlib import Path

import pytest

from specdsl import api
from specdsl.contract.hookspecs import hookimpl
from specdsl.contract.ops import STEP_REF, Estimate, StepOp, obj_schema
from specdsl.errors import SpecErrors
from specdsl.plugins import build_registry

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "specs").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _only_builtins_by_default(monkeypatch):
    monkeypatch.setenv("SPECDSL_PLUGINS", "none")


def quiet_registry(*plugins):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reg = build_registry(extra_plugins=plugins)
    return reg, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


# --------------------------------------------------------------------------------------------------
# A broken plugin, installed for real
# --------------------------------------------------------------------------------------------------

BROKEN = '''
from specdsl.contract.hookspecs import hookimpl
from specdsl.contract.ops import StepOp, obj_schema


class NoSchemaBackend:          # options_schema is missing
    name = "noschema"
    version = "1"
    def identity(self, options): return {}
    def price(self, options, i, o): return None
    def generate(self, options, requests, on_result): pass


class BadFragmentOp(StepOp):     # "type": "objekt" is not a JSON Schema type
    name = "badfrag"
    params_schema = {"type": "objekt", "properties": {}}
    def run(self, ctx): return ctx.rows


class FineOp(StepOp):
    name = "fine_op"
    params_schema = obj_schema({"from": {"type": "string", "description": "input"}}, required=["from"])
    def run(self, ctx): return ctx.rows


@hookimpl
def register_backends(register):
    register(NoSchemaBackend())


@hookimpl
def register_ops(register):
    register(BadFragmentOp())
    register(FineOp())


@hookimpl
def register_recipes(register):
    raise RuntimeError("kaboom in recipes")
'''


@pytest.fixture
def broken_site(tmp_path):
    root = tmp_path / "site"
    root.mkdir()
    (root / "tp_broken_contract.py").write_text(BROKEN)
    info = root / "tp_broken_contract-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tp-broken-contract\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text("[specdsl]\ntp_broken_contract = tp_broken_contract\n")
    return root


def _cli(*args, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "SPECDSL_PLUGINS": "tp_broken_contract", "COLUMNS": "400",
           "PYTHONPATH": os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "specdsl", *args], capture_output=True, text=True, env=env,
                          timeout=180)


def test_a_broken_plugin_beside_the_project_breaks_no_spec(broken_site):
    proc = _cli("validate", *map(str, SHIPPED), site=broken_site)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("ok: ") == len(SHIPPED)
    assert "Traceback" not in proc.stderr
    assert "specdsl plugin 'tp_broken_contract'" in proc.stderr
    assert "backend 'noschema' rejected" in proc.stderr and "options_schema" in proc.stderr
    assert "op 'badfrag' rejected" in proc.stderr and "kaboom in recipes" in proc.stderr

    listed = {p["name"]: p for p in json.loads(_cli("plugins", "--json", site=broken_site).stdout)}
    broken = listed["tp_broken_contract"]
    assert broken["provides"] == {"ops": ["fine_op"]}  # what kept the contract still loads
    assert "options_schema" in broken["error"] and "badfrag" in broken["error"] and "kaboom" in broken["error"]
    table = _cli("plugins", site=broken_site)
    assert table.returncode == 0 and "tp_broken_contract" in table.stdout and "rejected" in table.stdout


def test_every_builtin_keeps_the_whole_contract_schemas_included():
    """Start-up skips the meta-schema check of the built-ins' schema fragments: this test is that check."""
    from specdsl.contract.conformance import KINDS, contract_problems
    from specdsl.frontend.schema import fragment_for

    registry, warned = quiet_registry()
    assert warned == []
    for kind in KINDS:
        for name, obj in getattr(registry, kind).items():
            assert contract_problems(kind, obj) == [], (kind, name)
    for name, op in registry.ops.items():
        if callable(getattr(op, "schema_for", None)):
            from specdsl.contract.conformance import schema_problem

            assert schema_problem(fragment_for(name, op, registry)) is None, name


def test_each_kind_is_checked_against_its_contract():
    class NoRun:
        name, kind, params_schema = "norun", "transform", {"type": "object"}

        def check(self, ctx):
            return ctx.columns

    class SourceWithoutSuffixes:
        name = "weird"

        def columns(self, path): return ()
        def count(self, path, *, limit=None): return 0
        def read(self, path, **kw): return []
        def identity(self, path): return {}

    class TargetBadParams:
        name, version = "tgt", "1"
        params_schema = {"properties": {"x": {"type": "nope"}}}

        def available(self): return True
        def train(self, request, progress): return request.output_dir

    plugin = types.ModuleType("checked_plugin")
    plugin.register_ops = hookimpl(lambda register: register(NoRun()))
    plugin.register_sources = hookimpl(lambda register: register(SourceWithoutSuffixes()))
    plugin.register_training_targets = hookimpl(lambda register: register(TargetBadParams()))
    reg, warned = quiet_registry(plugin)
    assert "norun" not in reg.ops and "weird" not in reg.sources and "tgt" not in reg.targets
    info = next(p for p in reg.plugins if p.name == "checked_plugin")
    assert any("run() method" in r for r in info.rejected)
    assert any("suffixes" in r for r in info.rejected)
    assert any("params_schema is not a valid JSON Schema" in r for r in info.rejected)
    assert len([w for w in warned if "checked_plugin" in w]) == 3


# --------------------------------------------------------------------------------------------------
# Plugin equality: an op with its own estimate, a source format, folder sources
# --------------------------------------------------------------------------------------------------


class PairsOp(StepOp):
    """Doubles the rows (each with a `copy` column) and says so in plan, with a made-up price."""

    name = "pairs"
    row_parallel = False
    params_schema = obj_schema({"from": STEP_REF}, required=["from"])

    def check(self, ctx):
        return ctx.columns + ("copy",)

    def estimate(self, params, input_rows, services):
        rows = None if input_rows is None else 2 * input_rows
        return Estimate(requests=0, input_tokens=0, output_tokens=0, cost=0.5, rows=rows)

    def run(self, ctx):
        return [{**r, "id": f"{r['id']}.{k}", "copy": k} for r in ctx.rows for k in (0, 1)]


class TsvSource:
    """Tab-separated values: a format the built-ins lack."""

    name = "tsv"
    suffixes = (".tsv",)

    def columns(self, path):
        return tuple(Path(path).read_text(encoding="utf-8").splitlines()[0].split("\t"))

    def count(self, path, *, limit=None):
        n = len(Path(path).read_text(encoding="utf-8").splitlines()) - 1
        return min(n, limit) if limit else n

    def read(self, path, *, id_column=None, limit=None, display=None):
        header, *lines = Path(path).read_text(encoding="utf-8").splitlines()
        rows = [dict(zip(header.split("\t"), line.split("\t"))) for line in lines[:limit or None]]
        return [{**r, "id": r.get(id_column or "id", str(i))} for i, r in enumerate(rows)]

    def identity(self, path):
        return {"text": Path(path).read_text(encoding="utf-8")}


def equality_plugin():
    mod = types.ModuleType("equality_plugin")
    mod.register_ops = hookimpl(lambda register: register(PairsOp()))
    mod.register_sources = hookimpl(lambda register: register(TsvSource()))
    return mod


def test_plugin_op_estimate_and_plugin_source_end_to_end(tmp_path):
    (tmp_path / "words.tsv").write_text("id\tword\na\tred\nb\tgreen\nc\tblue\n", encoding="utf-8")
    (tmp_path / "spec.yaml").write_text(textwrap.dedent("""\
        specdsl: 1
        name: equality
        sources:
          words: {path: words.tsv}
        steps:
          - id: doubled
            pairs: {from: words}
          - id: out
            export: {from: doubled, path: out}
        """))
    reg, warned = quiet_registry(equality_plugin())
    assert not [w for w in warned if "equality_plugin" in w]
    from specdsl.passes.estimate import estimate_plan

    plan = estimate_plan(api.compile_spec(tmp_path / "spec.yaml", registry=reg), reg)
    assert plan.node("words").params["format"] == "tsv"  # picked by the plugin's suffix
    assert plan.node("words").columns == ("id", "word")
    assert plan.node("words").estimate["rows"] == 3
    assert plan.node("doubled").estimate["rows"] == 3 and plan.node("doubled").estimate["cost"] == 0.5
    assert plan.node("out").estimate["rows"] == 6  # the op's own row count flows downstream
    result = api.run_plan(plan, store_dir=tmp_path / "store", registry=reg, progress=False)
    assert result.ok, [n.to_dict() for n in result.nodes]
    assert [(r["word"], r["copy"]) for r in result.rows("doubled")] == [
        ("red", 0), ("red", 1), ("green", 0), ("green", 1), ("blue", 0), ("blue", 1)]
    # Without the plugin the format is unknown: a positioned error, not a traceback.
    base, _ = quiet_registry()
    with pytest.raises(SpecErrors) as exc:
        api.compile_spec(tmp_path / "spec.yaml", registry=base)
    assert "S105" in exc.value.codes or "S208" in exc.value.codes


FOLDER_SPEC = """\
specdsl: 1
name: folders
sources:
  rows: {{path: {path}{fmt}}}
steps:
  - id: kept
    filter: {{from: rows, where: "{{{{ row.n > 1 }}}}"}}
"""


def _run_folder_spec(tmp_path, path: str, fmt: str = ""):
    (tmp_path / "spec.yaml").write_text(FOLDER_SPEC.format(path=path, fmt=fmt))
    reg, _ = quiet_registry()
    plan = api.compile_spec(tmp_path / "spec.yaml", registry=reg)
    result = api.run_plan(plan, store_dir=tmp_path / "store", registry=reg, progress=False)
    assert result.ok, [n.to_dict() for n in result.nodes]
    return plan, result


def test_parquet_folder_source(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    folder = tmp_path / "shards"
    folder.mkdir()
    pq.write_table(pa.table({"id": ["a", "b"], "n": [1, 2]}), folder / "part-0.parquet")
    pq.write_table(pa.table({"id": ["c"], "n": [3]}), folder / "part-1.parquet")
    plan, result = _run_folder_spec(tmp_path, "shards")
    assert plan.node("rows").params["format"] == "parquet_dir"
    assert plan.node("rows").columns == ("id", "n")
    assert [r["id"] for r in result.store.load(plan.node("rows").fingerprint)] == ["a", "b", "c"]
    assert [r["id"] for r in result.rows("kept")] == ["b", "c"]
    # The folder's content is its identity: a changed shard changes the fingerprint.
    before = plan.node("rows").fingerprint
    pq.write_table(pa.table({"id": ["c"], "n": [4]}), folder / "part-1.parquet")
    assert api.compile_spec(tmp_path / "spec.yaml").node("rows").fingerprint != before


def test_saved_hf_dataset_source(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"id": ["x", "y", "z"], "n": [0, 5, 7],
                                     "messages": [[{"role": "user", "content": "hi"}]] * 3})
    ds.save_to_disk(str(tmp_path / "saved"))
    plan, result = _run_folder_spec(tmp_path, "saved")
    assert plan.node("rows").params["format"] == "hf_dataset"
    assert plan.node("rows").columns == ("id", "n", "messages")
    kept = result.rows("kept")
    assert [r["id"] for r in kept] == ["y", "z"]
    assert kept[0]["messages"] == [{"role": "user", "content": "hi"}]  # nested types come back as data
    # A DatasetDict folder is named as such, with the split to point at.
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
    (tmp_path / "spec.yaml").write_text(FOLDER_SPEC.format(path="dd", fmt=", format: hf_dataset"))
    with pytest.raises(SpecErrors) as exc:
        api.compile_spec(tmp_path / "spec.yaml")
    assert exc.value.codes == ["S405"] and "dd/train" in str(exc.value)


# --------------------------------------------------------------------------------------------------
# The core names no op and no backend
# --------------------------------------------------------------------------------------------------

CORE = ("frontend", "ir", "lower", "passes", "execute")


def _builtin_names() -> set[str]:
    reg, _ = quiet_registry()
    return set(reg.ops) | set(reg.backends) | set(reg.targets) | set(reg.executors) | set(reg.sources)


# Kinds (source, generate, transform, train, evaluate, export) are the contract's own categories, not op
# names, and are not counted.


def test_the_core_compares_with_no_op_or_backend_name():
    names = _builtin_names()
    comparison = re.compile(r"""(?:\.op|backend|\bname|executor)\s*(?:==|!=|\bin)\s*\(?\s*["']([A-Za-z_]+)["']""")
    found = []
    for folder in CORE:
        for path in (ROOT / "specdsl" / folder).rglob("*.py"):
            for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                code = line.split("#", 1)[0]
                for match in comparison.finditer(code):
                    if match.group(1) in names:
                        found.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}")
    assert not found, "the core names built-in ops/backends:\n" + "\n".join(found)


class EvenRowsOp(StepOp):
    """Keeps rows whose `n` is even: a row selector, like filter, from a plugin."""

    name = "even_rows"
    reads_known = True
    selects_rows = True
    params_schema = obj_schema({"from": STEP_REF}, required=["from"])

    def check(self, ctx):
        ctx.column("n")
        return ctx.columns

    def run(self, ctx):
        return [r for r in ctx.rows if int(r["n"]) % 2 == 0]


class EchoBackend:
    name, version = "echo", "1"
    options_schema = {"type": "object", "properties": {}, "additionalProperties": False}

    def identity(self, options): return {"model": options["model"]}
    def price(self, options, i, o): return 0.0

    def generate(self, options, requests, on_result):
        from specdsl.contract.hookspecs import GenResult

        for r in requests:
            on_result(GenResult(key=r.key, text=r.messages[-1]["content"]))


def test_a_plugin_row_selector_is_pushed_ahead_of_generation_like_filter(tmp_path):
    mod = types.ModuleType("selector_plugin")
    mod.register_ops = hookimpl(lambda register: register(EvenRowsOp()))
    mod.register_backends = hookimpl(lambda register: register(EchoBackend()))
    reg, _ = quiet_registry(mod)
    (tmp_path / "rows.jsonl").write_text("".join(f'{{"id": "r{i}", "n": {i}}}\n' for i in range(6)))
    (tmp_path / "spec.yaml").write_text(textwrap.dedent("""\
        specdsl: 1
        name: selector
        models:
          m: {backend: echo, model: e}
        sources:
          rows: {path: rows.jsonl}
        steps:
          - id: answers
            generate: {from: rows, model: m, user: "{{ row.n }}"}
          - id: even
            even_rows: {from: answers}
        """))
    plan = api.compile_spec(tmp_path / "spec.yaml", registry=reg)
    assert plan.node("even").input("from") == "rows" and plan.node("answers").input("from") == "even"
    result = api.run_plan(plan, store_dir=tmp_path / "store", registry=reg, progress=False)
    assert result.ok and [r["response"] for r in result.rows("answers")] == ["0", "2", "4"]
