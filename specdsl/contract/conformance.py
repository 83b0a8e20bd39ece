"""Whether a registered object keeps the contract: checked once, where a plugin registers it.

An object that lacks a required member, or carries a schema fragment that is not a valid JSON Schema,
is turned away with the reasons here, so that one plugin's mistake becomes a warning naming it instead of
an AttributeError in every later ``specdsl validate`` (and a broken fragment never reaches the schema
that every spec is checked against).
"""

from __future__ import annotations

from typing import Any, Mapping

# kind -> (attributes that must be non-empty strings, methods that must be callable,
#          attributes that must hold a JSON Schema object fragment, optional fragment attributes)
_RULES: Mapping[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "backends": (("name", "version"), ("identity", "price", "generate"), ("options_schema",), ()),
    "targets": (("name", "version"), ("available", "train"), (), ("params_schema",)),
    "ops": (("name", "kind"), ("check", "run"), ("params_schema",), ()),
    "recipes": (("name",), ("expand",), ("params_schema",), ()),
    "probes": (("name",), ("run",), ("params_schema",), ()),
    "executors": (("name",), ("map_rows", "wrap_backend"), (), ()),
    "sources": (("name",), ("columns", "count", "read", "identity"), (), ()),
}

KINDS = tuple(_RULES)


def contract_problems(kind: str, obj: Any, *, check_schemas: bool = True) -> list[str]:
    """Everything wrong with ``obj`` as a registered ``kind`` (``"backends"``, ``"ops"``, ...); [] if none.

    ``check_schemas=False`` still requires each schema attribute to be a mapping but skips validating it
    against the JSON Schema meta-schema (about 10 ms a fragment, a third of a run's start-up for the
    built-ins, whose fragments the test suite checks instead)."""
    strings, methods, schemas, optional_schemas = _RULES[kind]
    what = kind[:-1]
    problems = []
    for attr in strings:
        value = getattr(obj, attr, None)
        if not isinstance(value, str) or not value:
            problems.append(f"{what} without a {attr}" if value is None else f"{what} whose {attr} is not a string")
    for attr in methods:
        if not callable(getattr(obj, attr, None)):
            problems.append(f"{what} without a {attr}() method")
    for attr in schemas + optional_schemas:
        if attr in optional_schemas and getattr(obj, attr, None) is None:
            continue
        problem = schema_problem(getattr(obj, attr, None), meta=check_schemas)
        if problem:
            problems.append(f"{what} whose {attr} {problem}")
    if kind == "sources":
        suffixes = getattr(obj, "suffixes", None)
        if not isinstance(suffixes, (tuple, list)) or not all(isinstance(s, str) for s in suffixes):
            problems.append("source whose suffixes is not a list of strings like ['.jsonl']")
    return problems


def schema_problem(fragment: Any, *, meta: bool = True) -> str | None:
    """Why ``fragment`` cannot be a parameter schema (an object schema in JSON Schema 2020-12), or None.
    ``meta=False``: only its shape, not its validity against the meta-schema (see contract_problems)."""
    if fragment is None:
        return "is missing (a JSON Schema object: {'type': 'object', 'properties': {...}})"
    if not isinstance(fragment, Mapping):
        return f"is a {type(fragment).__name__}, not a JSON Schema mapping"
    if meta:
        from jsonschema import Draft202012Validator
        from jsonschema.exceptions import SchemaError

        try:
            Draft202012Validator.check_schema(dict(fragment))
        except SchemaError as exc:
            where = "/".join(str(p) for p in exc.absolute_path)
            return f"is not a valid JSON Schema{f' at {where}' if where else ''}: {exc.message}"
    if "properties" in fragment and not isinstance(fragment["properties"], Mapping):
        return "has properties that are not a mapping"
    return None
