"""The spec schema (specdsl.frontend.schema): strictness, plugin fragments, and how violations are reported."""

from __future__ import annotations

import pytest

from specdsl.contract import hookspecs
from specdsl.errors import ErrorSink
from specdsl.frontend.load import load_yaml_text
from specdsl.plugins import build_registry, default_registry
from specdsl.frontend.schema import build_schema, validate, validator

# Objects whose keys are the user's own names or values: everything else is closed.
OPEN = {("properties", "meta"), ("properties", "vars"), ("properties", "with")}


def walk(schema, path=()):
    if isinstance(schema, dict):
        yield path, schema
        for k, v in schema.items():
            yield from walk(v, path + (k,))
    elif isinstance(schema, list):
        for i, v in enumerate(schema):
            yield from walk(v, path + (i,))


def check(text: str, registry=None) -> list[tuple[str, int, int, str]]:
    doc = load_yaml_text(text, "s.yaml")
    sink = ErrorSink()
    validate(doc, registry or default_registry(), sink)
    return [(e.code, e.pos.line, e.pos.col, e.message) for e in sink.errors]


def test_every_object_with_properties_is_closed():
    schema = build_schema(default_registry())
    open_objects = []
    for path, node in walk(schema):
        if node.get("type") == "object" and "properties" in node and node.get("additionalProperties") is not False:
            if path[-2:] in OPEN or "if" in path or path[-1:] == ("then",):
                continue
            if path[-1] == "items" and path[-2:-1] == ("probes",):
                continue  # an evaluate probe: closed by the if/then of its `probe:` value
            if path == ("properties", "models", "additionalProperties"):
                continue  # a model entry: closed by the if/then of its backend (its options fragment)
            open_objects.append(path)
    assert open_objects == []


def test_meta_is_accepted_everywhere_and_never_checked():
    text = """\
specdsl: 1
name: t
meta: {owner: me, anything: [1, {deep: true}]}
models:
  m: {model: smollm2-135m-instruct, meta: {note: x}}
sources:
  s: {path: s.jsonl, meta: {origin: y}}
steps:
  - id: a
    meta: {ticket: 1}
    map: {from: s, columns: {x: '1'}, meta: {why: z}}
"""
    assert check(text) == []


def test_version_must_be_the_integer_1():
    base = "name: t\nsteps:\n  - id: a\n    map: {from: s, columns: {x: '1'}}\n"
    assert check("specdsl: 1\n" + base) == []
    for value in ("'1'", "true", "2", "[1]"):
        result = check(f"specdsl: {value}\n" + base)
        assert [(c, line, col) for c, line, col, _ in result] == [("S010", 1, 10)], value


def test_top_level_types():
    result = check("specdsl: 1\nname: t\nmodels: []\nsources: 3\nvars: x\nsteps: {}\n")
    assert [(c, line) for c, line, _, _ in result] == [("S102", 3), ("S102", 4), ("S102", 5), ("S102", 6)]
    assert result[0][3] == "models must be a mapping, not a list"


def test_errors_come_in_file_order_with_their_keys():
    result = check("""\
specdsl: 1
name: 'bad name'
colour: blue
models:
  m: {model: '', backend: transformers, dtype: int4}
steps:
  - id: a
    generate: {from: s, model: m, user: hi, n: 0, max_tokens: -1, toppp: 1}
""")
    assert [(c, line, col) for c, line, col, _ in result] == [
        ("S103", 2, 7), ("S104", 3, 1), ("S103", 5, 14), ("S210", 5, 48),
        ("S103", 8, 48), ("S103", 8, 63), ("S104", 8, 67)]
    assert result[6][3] == "unknown key 'toppp'"


def test_recipe_parameters_are_checked_by_the_recipe_fragment():
    result = check("""\
specdsl: 1
name: t
steps:
  - id: r
    use: isc.pam
    with: {source: s, model: m, teacher: m, student: m, samples: 99, train: {epoch: 1}}
""")
    assert [(c, line, col) for c, line, col, _ in result] == [("S103", 6, 66), ("S104", 6, 78)]


class ToyBackend:
    name = "toy"
    version = "0"
    options_schema = {"type": "object", "properties": {"size": {"type": "integer", "minimum": 1}}}

    def identity(self, options):
        return {"model": options["model"]}

    def price(self, options, i, o):
        return 0.0

    def generate(self, options, requests, on_result):  # pragma: no cover
        raise AssertionError


class ToyPlugin:
    @hookspecs.hookimpl
    def register_backends(self, register):
        register(ToyBackend())


def test_backend_options_come_from_the_backend_fragment():
    registry = build_registry(extra_plugins=(ToyPlugin(),))
    ok = "specdsl: 1\nname: t\nmodels:\n  a: {backend: toy, model: x, size: 3}\nsteps: []\n"
    assert [c for c, *_ in check(ok, registry)] == ["S103"]  # only `steps: []` (minItems 1)
    bad = ("specdsl: 1\nname: t\nmodels:\n  a: {backend: toy, model: x, size: 0, max_new_tokens: 5}\n"
           "  b: {model: y, size: 3}\nsteps: [{id: s, map: {from: a, columns: {x: '1'}}}]\n")
    result = check(bad, registry)
    # size is toy's option (out of range), max_new_tokens is not; b defaults to transformers, which has no size.
    assert [(c, line, col) for c, line, col, _ in result] == [("S210", 4, 37), ("S104", 4, 40), ("S104", 5, 17)]
    assert result[0][3] == "invalid option `size` for backend 'toy': 0 is less than the minimum of 1"


def test_validator_is_built_once_per_registry():
    registry = default_registry()
    assert validator(registry) is validator(registry)
    other = build_registry()
    assert validator(other) is not validator(registry)


def test_schema_is_json_serializable_and_self_consistent():
    import json

    from jsonschema import Draft202012Validator

    schema = build_schema(default_registry())
    Draft202012Validator.check_schema(schema)
    assert json.loads(json.dumps(schema)) == schema
    assert schema["properties"]["specdsl"] == {"const": 1, "description": "the spec language version"}


@pytest.mark.parametrize("op", sorted(default_registry().ops))
def test_each_op_fragment_is_strict_and_described(op):
    schema = default_registry().ops[op].params_schema
    assert schema["type"] == "object" and schema["additionalProperties"] is False
    assert "meta" in schema["properties"]
    for name, prop in schema["properties"].items():
        if name != "meta":
            assert prop, f"{op}.{name} has an empty schema"
