"""The plugin system, exercised with plugins defined right here.

* an inline plugin (a module object passed through ``build_registry(extra_plugins=...)``) registers a
  backend, an op and a recipe, and a spec compiled against that registry uses all three and runs;
* a plugin whose hook raises, or that cannot be registered, is a RuntimeWarning naming it, never a crash;
* broken entry points (a real ``*.dist-info`` in a temporary folder on ``sys.path``) are warnings naming
  them, and ``SPECDSL_PLUGINS`` limits which entry points load;
* the example package ``plugins/specdsl-textstats`` shows up in ``specdsl plugins --json`` when installed;
* importing a plugin and loading the registry imports no heavy library.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types
import warnings
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest

from specdsl import api
from specdsl.errors import SpecErrors
from specdsl.contract.hookspecs import GenResult, hookimpl
from specdsl.plugins import build_registry
from specdsl.frontend.schema import SECRET_PATTERN, build_schema
from specdsl.contract.ops import COLUMN, STEP_REF, StepOp, obj_schema

ROOT = Path(__file__).resolve().parent.parent
TEXTSTATS = ROOT / "plugins" / "specdsl-textstats"
HEAVY = ("torch", "transformers", "trl", "datasets", "litellm", "peft", "accelerate")


# --------------------------------------------------------------------------------------------------
# An inline plugin: backend `reverse`, op `shout`, recipe `inline.shout_answers`
# --------------------------------------------------------------------------------------------------


class ReverseBackend:
    """Answers with the words of the last user message reversed; records what it was given."""

    name = "reverse"
    version = "7"
    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "upper": {"type": "boolean"},
            "api_key": {"type": "string", "pattern": SECRET_PATTERN},
        },
    }

    def __init__(self):
        self.calls: list[dict] = []

    def identity(self, options):
        return {"model": options["model"], "upper": options.get("upper", False)}  # never the api_key

    def price(self, options, input_tokens, output_tokens):
        return None  # cannot price: estimates say so instead of guessing

    def generate(self, options, requests, on_result):
        self.calls.append({"options": dict(options), "n": len(requests)})
        for r in requests:
            text = " ".join(reversed(r.messages[-1]["content"].split()))
            on_result(GenResult(key=r.key, text=text.upper() if options.get("upper") else text,
                                input_tokens=1, output_tokens=1))


class ShoutOp(StepOp):
    name = "shout"
    description = "add COLUMN_shout, the column in capitals"
    row_parallel = True
    params_schema = obj_schema({"from": STEP_REF, "column": COLUMN}, required=["from", "column"])

    def check(self, ctx):
        ctx.column(ctx.params.get("column"), "column")
        return tuple(ctx.columns) + (f"{ctx.params.get('column')}_shout",)

    def run(self, ctx):
        col = ctx.params["column"]
        return [{**row, f"{col}_shout": str(row.get(col, "")).upper() + "!"} for row in ctx.rows]


class ShoutAnswersRecipe:
    name = "inline.shout_answers"
    description = "generate an answer, then shout it"
    params_schema = {"type": "object", "additionalProperties": False, "required": ["source", "model"],
                     "properties": {"source": {"type": "string"}, "model": {"type": "string"},
                                    "question": {"type": "string"}}}

    def expand(self, step_id, p):
        return [
            {"id": f"{step_id}.answers", "generate": {
                "from": p["source"], "model": p["model"],
                "user": "{{ row." + p.get("question", "question") + " }}", "into": "answer"}},
            {"id": step_id, "shout": {"from": f"{step_id}.answers", "column": "answer"}},
        ]


def make_inline_plugin(name: str = "inline_plugin") -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.backend = ReverseBackend()

    @hookimpl
    def register_backends(register):
        register(mod.backend)

    @hookimpl
    def register_ops(register):
        register(ShoutOp())

    @hookimpl
    def register_recipes(register):
        register(ShoutAnswersRecipe())

    mod.register_backends, mod.register_ops, mod.register_recipes = register_backends, register_ops, register_recipes
    return mod


def quiet_registry(*plugins):
    """build_registry with only the built-ins and ``plugins``; warnings recorded, not shown."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reg = build_registry(extra_plugins=plugins)
    return reg, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


@pytest.fixture(autouse=True)
def _only_builtins_by_default(monkeypatch):
    """Installed third-party plugins never leak into these tests unless a test opts in."""
    monkeypatch.setenv("SPECDSL_PLUGINS", "none")


SPEC = """\
specdsl: 1
name: inline
models:
  rev: {backend: reverse, model: r1, upper: true, api_key: "${env:INLINE_TEST_KEY}"}
sources:
  questions: {path: questions.jsonl}
steps:
  - id: shouted
    use: inline.shout_answers
    with: {source: questions, model: rev}
  - id: again
    shout: {from: shouted, column: question}
"""


@pytest.fixture
def spec_dir(tmp_path):
    (tmp_path / "questions.jsonl").write_text(
        '{"id": "a", "question": "one two three"}\n{"id": "b", "question": "red green"}\n')
    (tmp_path / "spec.yaml").write_text(SPEC)
    return tmp_path


def test_inline_plugin_registers_backend_op_and_recipe():
    plugin = make_inline_plugin()
    reg, warned = quiet_registry(plugin)
    assert not [w for w in warned if "inline_plugin" in w]
    info = next(p for p in reg.plugins if p.name == "inline_plugin")
    assert info.provides == {"backends": ["reverse"], "ops": ["shout"], "recipes": ["inline.shout_answers"]}
    assert info.error is None and info.version == "test"
    assert reg.backends["reverse"] is plugin.backend
    assert reg.owner[("ops", "shout")] == "inline_plugin"
    assert reg.owner[("ops", "generate")] == "builtin"
    # The fragments enter the schema exactly where the built-ins' do.
    schema = build_schema(reg)
    assert "shout" in schema["properties"]["steps"]["items"]["properties"]
    assert "inline.shout_answers" in schema["properties"]["steps"]["items"]["properties"]["use"]["enum"]
    model_entry = schema["properties"]["models"]["additionalProperties"]
    assert "reverse" in model_entry["properties"]["backend"]["enum"]


def test_inline_plugin_compiles_and_runs(spec_dir, monkeypatch):
    secret = "sk-inline-test-0123456789abcdef"
    monkeypatch.setenv("INLINE_TEST_KEY", secret)
    plugin = make_inline_plugin()
    reg, _ = quiet_registry(plugin)
    plan = api.compile_spec(spec_dir / "spec.yaml", registry=reg)
    assert [n.id for n in plan.nodes] == ["questions", "shouted.answers", "shouted", "again"]
    assert plan.node("shouted.answers").backend == "reverse 7"
    assert plan.node("again").columns[-2:] == ("answer_shout", "question_shout")
    assert secret not in plan.to_json()

    result = api.run_plan(plan, store_dir=spec_dir / "store", registry=reg, progress=False)
    assert result.ok, [n.to_dict() for n in result.nodes]
    rows = result.rows("again")
    assert [(r["answer"], r["answer_shout"], r["question_shout"]) for r in rows] == [
        ("THREE TWO ONE", "THREE TWO ONE!", "ONE TWO THREE!"), ("GREEN RED", "GREEN RED!", "RED GREEN!")]
    # The backend got the secret resolved and was asked each request once; nothing stored holds it.
    calls = list(plugin.backend.calls)
    assert sum(c["n"] for c in calls) == 2
    assert all(c["options"]["api_key"] == secret for c in calls)
    assert secret not in Path(result.manifest_path).read_text()
    for f in (spec_dir / "store").rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f

    # Unchanged spec: every node is cached and the backend is not called again.
    again = api.run_plan(api.compile_spec(spec_dir / "spec.yaml", registry=reg), store_dir=spec_dir / "store",
                         registry=reg, progress=False)
    assert {n.status for n in again.nodes} == {"cached"}
    assert plugin.backend.calls == calls
    # A backend option in identity() changes the generation fingerprint and everything after it.
    (spec_dir / "spec.yaml").write_text(SPEC.replace("upper: true", "upper: false"))
    changed = api.compile_spec(spec_dir / "spec.yaml", registry=reg)
    assert {n.id for n in changed.nodes if n.fingerprint != plan.node(n.id).fingerprint} == \
        {"shouted.answers", "shouted", "again"}


def test_inline_plugin_errors_are_positioned(spec_dir):
    reg, _ = quiet_registry(make_inline_plugin())
    path = spec_dir / "spec.yaml"
    path.write_text(SPEC.replace("upper: true", "uper: true")
                    .replace('"${env:INLINE_TEST_KEY}"', "sk-live-0123456789abcdef0123")
                    .replace("column: question}", "column: questoin}"))
    with pytest.raises(SpecErrors) as info:
        api.compile_spec(path, registry=reg)
    by_code = {e.code: e for e in info.value.errors}
    assert set(by_code) == {"S104", "S404"}
    assert by_code["S104"].message == "unknown key 'uper'" and by_code["S104"].hint == "did you mean 'upper'?"
    assert (by_code["S104"].pos.line, by_code["S104"].pos.col) == (4, 38)
    assert by_code["S404"].key_path == ("models", "rev", "api_key")
    assert "sk-live" not in info.value.render()  # a secret is never echoed back

    path.write_text(SPEC.replace("column: question}", "column: questoin}"))
    with pytest.raises(SpecErrors) as info:
        api.compile_spec(path, registry=reg)
    (err,) = info.value.errors
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "questoin" in text)
    col = path.read_text().splitlines()[line - 1].index("questoin") + 1
    assert (err.code, err.key_path, err.pos.line, err.pos.col) == ("S403", ("again", "column"), line, col)
    assert err.hint.startswith("did you mean 'question'?")


def test_plugin_ops_are_unknown_without_the_plugin(spec_dir):
    reg, _ = quiet_registry()
    with pytest.raises(SpecErrors) as info:
        api.compile_spec(spec_dir / "spec.yaml", registry=reg)
    codes = {e.code: e for e in info.value.errors}
    assert {"S207", "S208", "S209"} <= set(codes)
    assert codes["S208"].message == "unknown op 'shout'"


# --------------------------------------------------------------------------------------------------
# Faulty plugins: warnings naming them, never a crash
# --------------------------------------------------------------------------------------------------


class ExplodingPlugin:
    """A plugin object (not a module) whose register_ops raises; its other hooks are fine."""

    __name__ = "exploding_plugin"

    @hookimpl
    def register_ops(self, register):
        raise RuntimeError("kaboom in register_ops")

    @hookimpl
    def register_recipes(self, register):
        register(ShoutAnswersRecipe())


def test_hook_that_raises_is_a_warning_and_other_plugins_load():
    good = make_inline_plugin()
    reg, warned = quiet_registry(ExplodingPlugin(), good)
    assert any(w.startswith("specdsl plugin 'exploding_plugin' failed in register_ops: ") and "kaboom" in w
               for w in warned), warned
    bad = next(p for p in reg.plugins if p.name == "exploding_plugin")
    assert "kaboom" in bad.error
    assert bad.provides == {"recipes": ["inline.shout_answers"]}  # its healthy hook still registered
    assert next(p for p in reg.plugins if p.name == "inline_plugin").error is None
    assert {"shout", "generate", "filter"} <= set(reg.ops)
    # it was loaded first, so it owns the recipe; the same name from inline_plugin is a duplicate (warned)
    assert reg.owner[("recipes", "inline.shout_answers")] == "exploding_plugin"
    assert any("plugin 'inline_plugin' registers recipe 'inline.shout_answers', already provided by "
               "'exploding_plugin'" in w for w in warned), warned


def test_duplicate_and_nameless_registrations_warn():
    class Nameless:
        pass

    clash = types.ModuleType("clash_plugin")

    @hookimpl
    def register_ops(register):
        register(ShoutOp())       # already provided by inline_plugin, loaded first

    clash.register_ops = register_ops
    nameless = types.ModuleType("nameless_plugin")

    @hookimpl
    def register_backends(register):
        register(Nameless())

    nameless.register_backends = register_backends
    reg, warned = quiet_registry(make_inline_plugin(), clash, nameless)
    assert any("plugin 'clash_plugin' registers op 'shout', already provided by 'inline_plugin'" in w
               for w in warned), warned
    assert reg.owner[("ops", "shout")] == "inline_plugin"
    assert any("'nameless_plugin'" in w and "without a name" in w for w in warned), warned
    assert next(p for p in reg.plugins if p.name == "nameless_plugin").error


def test_plugin_with_a_malformed_hook_is_a_warning():
    bad = types.ModuleType("misspelled_plugin")

    @hookimpl
    def register_ops(reg):  # the hook's argument is `register`: pluggy rejects this at registration
        pass

    bad.register_ops = register_ops
    reg, warned = quiet_registry(bad, make_inline_plugin())
    assert any("specdsl plugin 'misspelled_plugin' could not be registered" in w for w in warned), warned
    assert next(p for p in reg.plugins if p.name == "misspelled_plugin").error
    assert "shout" in reg.ops


# --------------------------------------------------------------------------------------------------
# Entry points: real dist-info folders on sys.path
# --------------------------------------------------------------------------------------------------


def _dist(root: Path, name: str, version: str, entry_points: str) -> None:
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"  # as wheels spell it
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text("[specdsl]\n" + entry_points)


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A folder on sys.path holding three installed 'distributions' with specdsl entry points."""
    root = tmp_path / "site"
    root.mkdir()
    (root / "tp_good_plugin.py").write_text(textwrap.dedent("""
        from specdsl.contract.hookspecs import hookimpl
        from specdsl.contract.ops import StepOp, obj_schema

        class Noop(StepOp):
            name = "tp_noop"
            params_schema = obj_schema({"from": {"type": "string"}}, required=["from"])
            def run(self, ctx):
                return ctx.rows

        @hookimpl
        def register_ops(register):
            register(Noop())
        """))
    (root / "tp_broken_plugin.py").write_text("raise ImportError('tp_broken_plugin needs frobnicate>=2')\n")
    _dist(root, "tp-good", "1.2.3", "tp_good = tp_good_plugin\n")
    _dist(root, "tp-broken", "0.1", "tp_broken = tp_broken_plugin\n")
    _dist(root, "tp-typo", "0.2", "tp_typo = tp_good_plugin:no_such_attribute\n")
    monkeypatch.syspath_prepend(str(root))
    for mod in ("tp_good_plugin", "tp_broken_plugin"):
        monkeypatch.delitem(sys.modules, mod, raising=False)
    yield root
    for mod in ("tp_good_plugin", "tp_broken_plugin"):
        sys.modules.pop(mod, None)


def test_broken_entry_points_warn_and_good_ones_load(site, monkeypatch):
    monkeypatch.delenv("SPECDSL_PLUGINS")
    reg, warned = quiet_registry()
    by_name = {p.name: p for p in reg.plugins}
    assert {"builtin", "tp_good", "tp_broken", "tp_typo"} <= set(by_name)
    assert by_name["tp_good"].error is None and by_name["tp_good"].version == "1.2.3"
    assert by_name["tp_good"].provides == {"ops": ["tp_noop"]} and reg.owner[("ops", "tp_noop")] == "tp_good"
    assert any("specdsl plugin 'tp_broken' (tp_broken_plugin) failed to load" in w and "frobnicate" in w
               for w in warned), warned
    assert any("specdsl plugin 'tp_typo' (tp_good_plugin:no_such_attribute) failed to load" in w
               for w in warned), warned
    assert "frobnicate" in by_name["tp_broken"].error and by_name["tp_broken"].version == "0.1"
    assert "AttributeError" in by_name["tp_typo"].error


def test_specdsl_plugins_none_loads_only_the_builtins(site, monkeypatch):
    monkeypatch.setenv("SPECDSL_PLUGINS", "none")
    reg, warned = quiet_registry()
    assert [p.name for p in reg.plugins] == ["builtin"]
    assert "tp_noop" not in reg.ops and not [w for w in warned if "tp_" in w]
    assert "tp_broken_plugin" not in sys.modules  # not even imported


def test_specdsl_plugins_names_the_ones_to_load(site, monkeypatch):
    monkeypatch.setenv("SPECDSL_PLUGINS", " tp_good , nonexistent")
    reg, warned = quiet_registry()
    assert [p.name for p in reg.plugins] == ["builtin", "tp_good"]
    assert "tp_broken_plugin" not in sys.modules
    assert not [w for w in warned if "tp_" in w]


def _cli(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "specdsl.cli", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=180)


def test_cli_plugins_lists_a_broken_entry_point(site):
    env = {"PYTHONPATH": os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "SPECDSL_PLUGINS": "tp_good,tp_broken"}
    proc = _cli("plugins", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    listed = {p["name"]: p for p in json.loads(proc.stdout)}
    assert listed["tp_good"]["provides"] == {"ops": ["tp_noop"]} and listed["tp_good"]["error"] is None
    assert "frobnicate" in listed["tp_broken"]["error"]
    assert "specdsl plugin 'tp_broken'" in proc.stderr and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------------------------------
# The example package, plugins/specdsl-textstats
# --------------------------------------------------------------------------------------------------


def _textstats_installed() -> bool:
    try:
        dist = distribution("specdsl-textstats")
    except PackageNotFoundError:
        return False
    return any(ep.group == "specdsl" and ep.name == "textstats" for ep in dist.entry_points)


@pytest.mark.skipif(not _textstats_installed(),
                    reason="specdsl-textstats is not installed; CI runs `pip install -e plugins/specdsl-textstats`")
def test_installed_textstats_appears_in_specdsl_plugins():
    proc = _cli("plugins", "--json", env={"SPECDSL_PLUGINS": "textstats"})
    assert proc.returncode == 0, proc.stderr
    listed = {p["name"]: p for p in json.loads(proc.stdout)}
    ts = listed["textstats"]
    assert ts["error"] is None and ts["module"] == "specdsl_textstats"
    assert ts["version"] == distribution("specdsl-textstats").version
    assert ts["provides"] == {"backends": ["template"], "ops": ["stats", "dedupe"],
                              "recipes": ["textstats.clean"], "probes": ["answer_length"]}
    # ...and its demo spec validates through the CLI, the way the pre-commit hook runs it.
    proc = _cli("validate", str(TEXTSTATS / "examples" / "demo.yaml"), env={"SPECDSL_PLUGINS": "textstats"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok: ")


def test_plugin_import_and_registry_load_are_cheap(tmp_path):
    """Importing a plugin, loading every plugin and validating a spec import no heavy library."""
    script = textwrap.dedent(f"""
        import json, sys, warnings
        warnings.simplefilter("ignore")
        sys.path.insert(0, {str(TEXTSTATS)!r})
        import specdsl_textstats
        from specdsl import api
        from specdsl.plugins import build_registry
        from specdsl.frontend.schema import build_schema
        reg = build_registry(extra_plugins=(specdsl_textstats,))
        build_schema(reg)
        errors = api.validate_paths([{str(TEXTSTATS / "examples" / "demo.yaml")!r}], registry=reg)
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
        print(json.dumps({{"errors": [str(e) for e in errors.values() if e], "heavy": heavy,
                          "backends": sorted(reg.backends)}}))
        """)
    env = {**os.environ, "SPECDSL_PLUGINS": "none", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["errors"] == []
    assert "template" in out["backends"]
    assert out["heavy"] == [], f"heavy modules imported at plugin load / validate: {out['heavy']}"


# --------------------------------------------------------------------------------------------------
# Probes registered through extra_plugins
# --------------------------------------------------------------------------------------------------


class CountProbe:
    name = "inline_count"
    params_schema = obj_schema({"probe": {"const": "inline_count"}}, required=["probe"])

    def run(self, ctx):
        return {"probe": self.name, "results": {"rows": len(ctx.rows)}, "table": [{"rows": len(ctx.rows)}]}


def test_probe_from_extra_plugins_is_known_at_compile_time(spec_dir):
    mod = make_inline_plugin()

    @hookimpl
    def register_probes(register):
        register(CountProbe())

    mod.register_probes = register_probes
    reg, _ = quiet_registry(mod)
    assert "inline_count" in reg.probes
    (spec_dir / "spec.yaml").write_text(SPEC.split("steps:")[0] + textwrap.dedent("""\
        steps:
          - id: counted
            evaluate: {models: [rev], on: questions, probes: [{probe: inline_count}]}
        """))
    plan = api.compile_spec(spec_dir / "spec.yaml", registry=reg)
    assert plan.node("counted").op == "evaluate"


class BrokenCheckProbe(CountProbe):
    name = "broken_check"
    params_schema = obj_schema({"probe": {"const": "broken_check"}}, required=["probe"])

    def check(self, ctx):
        raise ZeroDivisionError("oops")


def test_a_probe_check_that_crashes_blames_its_plugin(spec_dir):
    mod = make_inline_plugin()

    @hookimpl
    def register_probes(register):
        register(BrokenCheckProbe())

    mod.register_probes = register_probes
    reg, _ = quiet_registry(mod)
    (spec_dir / "spec.yaml").write_text(SPEC.split("steps:")[0] + textwrap.dedent("""\
        steps:
          - id: counted
            evaluate: {models: [rev], on: questions, probes: [{probe: broken_check}]}
        """))
    with pytest.raises(SpecErrors) as info:
        api.compile_spec(spec_dir / "spec.yaml", registry=reg)
    (err,) = info.value.errors
    assert err.code == "S401" and "probe 'broken_check' failed to check its parameters" in err.message
    assert "ZeroDivisionError" in err.message and "report it there" in err.hint


# --------------------------------------------------------------------------------------------------
# The pre-commit hook other repositories use to validate their specs
# --------------------------------------------------------------------------------------------------


def test_pre_commit_hook_runs_validate_on_spec_files(tmp_path):
    import re

    import yaml

    (hook,) = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())
    assert (hook["id"], hook["language"], hook["pass_filenames"]) == ("specdsl-validate", "python", True)
    files = re.compile(hook["files"])
    assert files.search("specs/orca_erasure.yaml") and files.search("specs/team/b.yml")
    assert not files.search("src/config.yaml") and not files.search("specs/notes.md")

    # Run the hook's entry the way pre-commit does: the command, then the matching changed files.
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "questions.jsonl").write_text('{"id": "a", "question": "q", "answer": "1"}\n')
    (specs / "good.yaml").write_text(textwrap.dedent("""\
        specdsl: 1
        name: good
        sources:
          questions: {path: questions.jsonl}
        steps:
          - id: loud
            map: {from: questions, columns: {q: "{{ row.question | upper }}"}}
        """))
    (specs / "bad.yml").write_text((specs / "good.yaml").read_text().replace("row.question", "row.questoin"))
    entry = hook["entry"].split()
    assert entry[:2] == ["specdsl", "validate"]
    base = [sys.executable, "-m", "specdsl.cli", *entry[1:]]
    env = {**os.environ, "SPECDSL_PLUGINS": "none"}
    ok = subprocess.run(base + ["specs/good.yaml"], capture_output=True, text=True, cwd=tmp_path, env=env,
                        timeout=180)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "ok: specs/good.yaml"
    bad = subprocess.run(base + ["specs/good.yaml", "specs/bad.yml"], capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=180)
    assert bad.returncode == 2
    assert "specs/bad.yml:7:" in bad.stderr and "error[S302]" in bad.stderr and "'row.questoin'" in bad.stderr
