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


def subschemas(node, path=()):
    """Every (path, schema) in a JSON Schema, except ``if`` conditions (tests, never shown to a user)."""
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            if key == "if":
                continue
            if key in ("properties", "$defs", "patternProperties"):
                for name, sub in value.items():
                    yield from subschemas(sub, path + (key, name))
            elif isinstance(value, (dict, list)):
                yield from subschemas(value, path + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from subschemas(value, path + (i,))


def completion_problems(schema) -> list[str]:
    """What makes yaml-language-server drop a completion item (checked against its 2.0.0 source and by running it).

    Completing a key whose schema has ``properties`` (an op under a step) builds a snippet of its properties
    with defaults (``getInsertTextForObject``). The type is the first entry of a ``type`` list, and for a
    ``string`` the default (or, when required, the const) goes through ``toYamlStringScalar``, which throws on
    anything but a string: the item disappears from the list (``train`` did, because of
    ``main_process_ip: {type: [string, null], default: null}``).
    """
    problems = []
    for path, node in subschemas(schema):
        required = node.get("required", []) if isinstance(node.get("required"), list) else []
        for name, prop in (node.get("properties") or {}).items():
            if not isinstance(prop, dict):
                continue
            kind = prop["type"][0] if isinstance(prop.get("type"), list) and prop["type"] else prop.get("type")
            if kind != "string":
                continue
            values = [prop["default"]] if "default" in prop else []
            if name in required and "default" not in prop and "const" in prop:
                values.append(prop["const"])
            problems += [f"{'/'.join(map(str, path + ('properties', name)))}: a string's default is {v!r}"
                         for v in values if not isinstance(v, str)]
    return problems


def test_an_editor_offers_every_op_in_a_step(monkeypatch):
    monkeypatch.setenv("SPECDSL_PLUGINS", "none")
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    Draft202012Validator.check_schema(schema)
    step = schema["properties"]["steps"]["items"]
    registry = build_registry()
    missing = [op for op in registry.step_ops() if op not in step["properties"]]
    assert missing == []
    for op in registry.step_ops():
        Draft202012Validator.check_schema(step["properties"][op])  # each op's fragment is a schema of its own
        assert step["properties"][op].get("description"), op       # shown beside the op in the completion list
    assert completion_problems(schema) == []


def test_the_completion_check_catches_the_train_bug():
    broken = {"type": "object", "properties": {"steps": {"type": "array", "items": {"type": "object", "properties": {
        "train": {"type": "object", "properties": {"ip": {"type": ["string", "null"], "default": None}}}}}}}}
    assert len(completion_problems(broken)) == 1


def test_every_property_has_a_description():
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    missing = ["/".join(map(str, path + ("properties", name)))
               for path, node in subschemas(schema) for name, prop in (node.get("properties") or {}).items()
               if isinstance(prop, dict) and not prop.get("description")]
    assert missing == [], f"{len(missing)} properties without a description"


def test_registered_names_are_enums(monkeypatch):
    monkeypatch.setenv("SPECDSL_PLUGINS", "none")
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    registry = build_registry()
    step = schema["properties"]["steps"]["items"]["properties"]
    assert step["evaluate"]["properties"]["probes"]["items"]["properties"]["probe"]["enum"] == sorted(registry.probes)
    source = schema["properties"]["sources"]["additionalProperties"]["properties"]
    assert source["format"]["enum"] == sorted(registry.sources)
    data = load_yaml_text((ROOT / "tests" / "specs" / "full.yaml").read_text(encoding="utf-8"), "full.yaml").data
    evaluate = next(s for s in data["steps"] if "evaluate" in s)
    evaluate["evaluate"]["probes"][0]["probe"] = "acuracy"
    errors = list(editor_validator().iter_errors(data))
    assert any(list(e.absolute_path)[-1:] == ["probe"] and e.validator == "enum" for e in errors), errors


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


def test_the_reference_in_docs_is_generated_from_the_schema():
    from specdsl.views.docs import BEGIN, END, builtin_reference, with_reference

    text = DOC.read_text(encoding="utf-8")
    assert BEGIN in text and END in text
    assert with_reference(text, builtin_reference()) == text, \
        "docs/spec.md's reference is stale: run python -m specdsl.views.docs --write docs/spec.md"
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    reference = text[text.index(BEGIN):]
    missing = [name for path, node in subschemas(schema) for name, prop in (node.get("properties") or {}).items()
               if isinstance(prop, dict) and prop.get("description")
               and prop["description"].replace("|", "\\|").replace("\n", " ") not in reference]
    assert missing == []  # every description an editor shows is on the page, word for word
