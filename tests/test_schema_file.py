"""schemas/spec.v1.json is what `specdsl schema` prints (built-ins only), and editors agree with the compiler.

Regenerate it after changing an op, backend or recipe schema:

    SPECDSL_PLUGINS=none specdsl schema -o schemas/spec.v1.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from specdsl.frontend.load import load_yaml_text
from specdsl.plugins import build_registry
from specdsl.frontend.schema import build_schema

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_FILE = ROOT / "schemas" / "spec.v1.json"
REGENERATE = "SPECDSL_PLUGINS=none specdsl schema -o schemas/spec.v1.json"


def test_schema_file_is_up_to_date(monkeypatch):
    monkeypatch.setenv("SPECDSL_PLUGINS", "none")  # third-party plugins installed here are not shipped
    expected = json.dumps(build_schema(build_registry()), indent=2) + "\n"
    assert SCHEMA_FILE.read_text(encoding="utf-8") == expected, f"schemas/spec.v1.json is stale: run {REGENERATE}"


def test_specdsl_schema_prints_the_file(tmp_path):
    env = {**os.environ, "SPECDSL_PLUGINS": "none", "PYTHONWARNINGS": "ignore"}
    cli = [sys.executable, "-m", "specdsl.cli", "schema"]
    out = subprocess.run(cli, capture_output=True, text=True, env=env, timeout=60, check=True)
    assert out.stdout == SCHEMA_FILE.read_text(encoding="utf-8"), f"run {REGENERATE}"
    subprocess.run(cli + ["-o", str(tmp_path / "s.json")], env=env, timeout=60, check=True, capture_output=True)
    assert (tmp_path / "s.json").read_text(encoding="utf-8") == out.stdout


def editor_validator() -> Draft202012Validator:
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


SHIPPED = sorted((ROOT / "specs").glob("*.yaml")) + sorted((ROOT / "tests" / "specs").glob("*.yaml"))


@pytest.mark.parametrize("spec", SHIPPED, ids=lambda p: p.name)
def test_shipped_specs_validate_against_the_schema_file(spec):
    # Loaded as editors do (YAML 1.2: `on:` is the key "on"), which is also what specdsl.frontend.load does.
    data = load_yaml_text(spec.read_text(encoding="utf-8"), spec.name).data
    errors = [e.message for e in editor_validator().iter_errors(data)]
    assert errors == []


def test_shipped_specs_point_editors_at_the_schema():
    for spec in sorted((ROOT / "specs").glob("*.yaml")):
        first = spec.read_text(encoding="utf-8").splitlines()[0]
        assert first == "# yaml-language-server: $schema=../schemas/spec.v1.json", spec.name


def test_the_schema_file_catches_what_the_compiler_catches():
    data = load_yaml_text((ROOT / "tests" / "specs" / "full.yaml").read_text(encoding="utf-8"), "full.yaml").data
    data["models"]["teacher"]["max_new_token"] = 5
    data["steps"][0]["generate"]["temprature"] = 0
    data["steps"].append({"id": "x", "summon": {}})
    paths = sorted(list(e.absolute_path) for e in editor_validator().iter_errors(data))
    assert ["models", "teacher"] in paths and ["steps", 0, "generate"] in paths and ["steps", 9] in paths


DOC = ROOT / "docs" / "spec.md"


def doc_section(heading_start: str) -> str:
    text = DOC.read_text(encoding="utf-8")
    start = text.index(heading_start)
    end = text.find("\n#", start + len(heading_start))
    return text[start: end if end > 0 else len(text)]


def test_docs_cover_every_op_parameter_recipe_probe_backend_option_and_code(monkeypatch):
    from specdsl.errors import CODES

    monkeypatch.setenv("SPECDSL_PLUGINS", "none")
    registry = build_registry()
    missing = []
    for name in registry.step_ops():  # source is placed by the compiler: documented under Sources
        op = registry.ops[name]
        section = doc_section(f"### `{name}`")
        missing += [f"op {name}: {p}" for p in op.params_schema["properties"]
                    if p != "meta" and f"`{p}`" not in section]  # meta: documented once for all ops
    sources_section = doc_section("## Sources")
    missing += [f"source format {name}" for name in registry.sources if f"| `{name}` |" not in sources_section]
    for name, recipe in registry.recipes.items():
        section = doc_section(f"### `{name}`")
        missing += [f"recipe {name}: {p}" for p in recipe.params_schema["properties"]
                    if p != "meta" and f"`{p}`" not in section]
    for name, probe in registry.probes.items():
        section = doc_section(f"**`{name}`**")
        missing += [f"probe {name}: {p}" for p in probe.params_schema["properties"]
                    if p not in ("probe", "meta") and f"`{p}`" not in section]
    for name, backend in registry.backends.items():
        section = doc_section(f"### `backend: {name}`")
        missing += [f"backend {name}: {p}" for p in backend.options_schema.get("properties", {})
                    if f"`{p}`" not in section]
    codes = doc_section("## Error codes")
    missing += [f"code {c}" for c in CODES if f"| {c} |" not in codes]
    assert missing == [], "docs/spec.md does not describe: " + ", ".join(missing)
