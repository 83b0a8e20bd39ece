"""The light core install and its extras.

* pyproject.toml: the core holds no heavy library; ``EXTRA_INCLUDES`` (which extra installs which) is
  what the extras really say;
* ``specdsl validate`` and ``specdsl plan`` run with every heavy library hidden (as in a core install);
* ``specdsl run`` of a step whose backend, op or target needs a missing extra stops before any work with
  one message naming each missing module and the ``pip install "specdsl[...]"`` line, exit code 1, no
  traceback, nothing in the store; a run whose nodes are all cached needs nothing;
* ``specdsl plugins`` shows what each plugin's objects require and whether it is installed.

Libraries are hidden the way an uninstalled package is missing: every finder on ``sys.meta_path`` is
wrapped to answer None for them, so ``import`` raises ModuleNotFoundError and ``find_spec`` returns None.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
import types
from pathlib import Path

import pytest

from specdsl import api
from specdsl.contract.hookspecs import hookimpl
from specdsl.contract.ops import STEP_REF, StepOp, obj_schema
from specdsl.plugins import build_registry
from specdsl.requirements import (EXTRA_INCLUDES, EXTRAS, check_requirements, describe_requirements,
                                  install_hint, is_installed, missing_requirements)
from specdsl.errors import RunError

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "trl", "datasets", "peft", "accelerate", "gguf", "litellm", "pyarrow",
         "matplotlib", "aiohttp", "numpy", "ray")

# Runs the specdsl CLI with the modules named in argv[1] (comma-separated) hidden from every finder.
HIDE_AND_RUN = textwrap.dedent("""
    import sys
    HIDDEN = set(filter(None, sys.argv[1].split(",")))

    class Hide:
        def __init__(self, inner):
            self.inner = inner
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in HIDDEN:
                return None
            find = getattr(self.inner, "find_spec", None)
            return find(name, path, target) if find else None
        def __getattr__(self, attr):
            return getattr(self.inner, attr)

    sys.meta_path[:] = [Hide(finder) for finder in sys.meta_path]
    sys.argv = ["specdsl"] + sys.argv[2:]
    from specdsl.cli import main
    main()
""")


def _cli(hidden: tuple[str, ...], *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "SPECDSL_PLUGINS": "none"}
    return subprocess.run([sys.executable, "-c", HIDE_AND_RUN, ",".join(hidden), *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=300)


@pytest.fixture
def specs(tmp_path) -> Path:
    """A copy of the shipped specs and their data (runs write their store beside the spec)."""
    shutil.copytree(ROOT / "specs", tmp_path / "specs")
    return tmp_path / "specs"


def _store_writes(spec_dir: Path) -> list[str]:
    """What a run left in the store beside the spec: committed nodes, manifests, the request journal."""
    store = spec_dir / ".specdsl"
    if not store.exists():
        return []
    return sorted(str(p.relative_to(store)) for p in store.rglob("*")
                  if p.is_file() or (p.is_dir() and p.parent.name == "nodes"))


# --------------------------------------------------------------------------------------------------
# pyproject.toml
# --------------------------------------------------------------------------------------------------


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _names(requirements: list[str]) -> set[str]:
    import re

    return {re.split(r"[\s<>=!\[;,~]", r, maxsplit=1)[0].lower() for r in requirements}


def _closure(extras: dict[str, list[str]], extra: str) -> set[str]:
    """The distributions an extra installs, following ``specdsl[...]`` self-references."""
    out: set[str] = set()
    for req in extras[extra]:
        if req.startswith("specdsl["):
            for inner in req[len("specdsl["):req.index("]")].split(","):
                out |= _closure(extras, inner.strip())
        else:
            out |= _names([req])
    return out


def test_the_core_install_holds_no_heavy_library():
    core = _names(_pyproject()["dependencies"])
    assert core == {"pyyaml", "jsonschema", "pluggy", "jinja2", "rich", "click"}


def test_each_extra_is_declared_and_includes_what_the_table_says():
    extras = _pyproject()["optional-dependencies"]
    assert set(EXTRAS) <= set(extras)
    for extra, included in EXTRA_INCLUDES.items():
        for inner in included:
            assert _closure(extras, inner) <= _closure(extras, extra), (extra, inner)
    # every extra that runs something brings the store's pyarrow
    for extra in ("run", "local", "train", "litellm", "ray", "all"):
        assert "pyarrow" in _closure(extras, extra), extra
    assert "litellm>=1.60,!=1.82.7,!=1.82.8" in extras["litellm"]  # the compromised releases stay out
    assert {"pytest", "import-linter"} <= _names(extras["test"])


# --------------------------------------------------------------------------------------------------
# validate and plan need only the core
# --------------------------------------------------------------------------------------------------


def test_validate_and_plan_run_with_every_heavy_library_hidden(specs):
    proc = _cli(HEAVY, "validate", str(specs), cwd=specs)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for spec in sorted(specs.glob("*.yaml")):
        proc = _cli(HEAVY, "plan", str(spec), cwd=specs)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr
    assert _store_writes(specs) == []


# --------------------------------------------------------------------------------------------------
# A run that needs a missing extra stops before any work
# --------------------------------------------------------------------------------------------------


def test_run_without_the_train_extra_names_it_and_does_nothing(specs):
    proc = _cli(("transformers", "trl"), "run", "orca_erasure.yaml", cwd=specs)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "Traceback" not in out
    assert 'pip install "specdsl[train]"' in out  # train includes local: one extra named
    assert "transformers (specdsl[local])" in out and "trl (specdsl[train])" in out
    assert "training target cpu" in out and "op tokenize" in out
    assert _store_writes(specs) == []


def test_run_without_pyarrow_names_the_run_extra(specs):
    proc = _cli(("pyarrow",), "run", "orca_erasure.yaml", cwd=specs)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "Traceback" not in out
    assert "pyarrow (specdsl[run]), needed by the run store" in out
    assert 'pip install "specdsl[run]"' in out
    assert _store_writes(specs) == []


def test_a_dry_run_needs_nothing(specs):
    proc = _cli(("pyarrow", "torch", "transformers", "trl"), "run", "orca_erasure.yaml", "--dry-run", cwd=specs)
    assert proc.returncode == 0, proc.stdout + proc.stderr


NO_MODEL_SPEC = """\
specdsl: 1
name: no-model
sources:
  rows: {path: rows.jsonl}
steps:
  - id: kept
    filter: {from: rows, where: "{{ row.n > 1 }}"}
  - id: out
    export: {from: kept, path: out}
"""


def test_a_fully_cached_run_needs_nothing(tmp_path):
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"id": str(i), "n": i}) + "\n" for i in range(4)))
    (tmp_path / "spec.yaml").write_text(NO_MODEL_SPEC)
    first = _cli((), "run", "spec.yaml", cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    again = _cli(("pyarrow",), "run", "spec.yaml", cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    # ...but forcing a node to run again needs the store's pyarrow
    forced = _cli(("pyarrow",), "run", "spec.yaml", "--only", "kept", cwd=tmp_path)
    assert forced.returncode == 1 and 'pip install "specdsl[run]"' in forced.stdout + forced.stderr


# --------------------------------------------------------------------------------------------------
# The requirement check in process: plugins' requirements, hints, targets
# --------------------------------------------------------------------------------------------------


class NeedyOp(StepOp):
    """An op whose library is not installed: its own pip requirement goes on the install line verbatim."""

    name = "needy"
    description = "needs a library nobody has"
    params_schema = obj_schema({"from": STEP_REF}, required=["from"])
    requires = (("specdsl_no_such_module", "specdsl-no-such-package>=1"), ("pyarrow", "run"))

    sink_op = True  # nothing reads it: kept by the prune pass all the same

    def run(self, ctx):
        raise AssertionError("must not run")


def _needy_registry():
    plugin = types.ModuleType("needy_plugin")

    @hookimpl
    def register_ops(register):
        register(NeedyOp())

    plugin.register_ops = register_ops
    return build_registry(extra_plugins=(plugin,))


def test_a_plugins_own_requirement_is_named_verbatim(tmp_path):
    (tmp_path / "rows.jsonl").write_text('{"id": "a"}\n')
    (tmp_path / "spec.yaml").write_text("specdsl: 1\nname: needy\nsources:\n  rows: {path: rows.jsonl}\n"
                                        "steps:\n  - id: n\n    needy: {from: rows}\n")
    registry = _needy_registry()
    plan = api.compile_spec(tmp_path / "spec.yaml", registry=registry)
    missing = missing_requirements(plan, registry)
    assert [m.module for m in missing] == ["specdsl_no_such_module"]
    assert missing[0].needed_by == ("step 'n' (op needy)",)
    with pytest.raises(RunError) as caught:
        api.run_plan(plan, registry=registry, store_dir=tmp_path / "store", progress=False)
    assert 'pip install "specdsl-no-such-package>=1"' in caught.value.hint
    assert not list((tmp_path / "store" / "nodes").iterdir())
    # a node that would come from the store needs nothing
    assert missing_requirements(plan, registry, cached=lambda node: True) == []
    check_requirements(plan, registry, cached=lambda node: True)


def test_install_hint_folds_extras_another_one_installs():
    assert install_hint(["run", "local"]) == 'pip install "specdsl[local]"'
    assert install_hint(["local", "train", "run"]) == 'pip install "specdsl[train]"'
    assert install_hint(["litellm", "local", "report"]) == 'pip install "specdsl[local,litellm,report]"'
    assert install_hint(["ray", "spacy>=3"]) == 'pip install "specdsl[ray]" "spacy>=3"'


def test_is_installed_imports_nothing():
    assert is_installed("json") and not is_installed("specdsl_no_such_module")
    assert not is_installed("specdsl_no_such_module.sub") and not is_installed("json.no_such_sub")
    before = set(sys.modules)
    is_installed("this")  # importing `this` prints the Zen of Python: find_spec must not
    assert "this" not in set(sys.modules) - before


def test_built_in_objects_declare_what_they_need():
    registry = build_registry()
    wanted = {("backends", "transformers"): {"torch", "transformers"}, ("backends", "litellm"): {"litellm"},
              ("targets", "cpu"): {"torch", "transformers", "trl"}, ("ops", "tokenize"): {"transformers"},
              ("probes", "position"): {"matplotlib"}}
    for (kind, name), modules in wanted.items():
        declared = {r["module"] for r in describe_requirements(getattr(registry, kind)[name])}
        assert modules <= declared, (kind, name, declared)
    assert describe_requirements(registry.ops["filter"]) == []  # pure-Python ops need only the core


def test_specdsl_plugins_shows_requirements(tmp_path):
    proc = _cli(("trl",), "plugins", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    builtin = next(p for p in json.loads(proc.stdout) if p["name"] == "builtin")
    trl = next(r for r in builtin["requires"]["targets"]["cpu"] if r["module"] == "trl")
    assert trl == {"module": "trl", "extra": "train", "installed": False}
    proc = _cli(("trl",), "plugins", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "trl" in proc.stdout and "missing" in proc.stdout
