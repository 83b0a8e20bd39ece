"""The JSON Schema of spec version 1, assembled from the core and what plugins register.

The core (top level, models, sources, steps) is written here; each op, backend and recipe contributes
the fragment for its own parameters. ``schemas/spec.v1.json`` is this schema as exported for editors
(``specdsl schema``); a test keeps the two identical. Validation reports every error at once, each
with the position of the offending key and a code from :mod:`specdsl.errors`.
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable, Mapping

from specdsl.errors import ErrorSink, did_you_mean, format_key_path, is_secret_key, looks_like_secret
from specdsl.frontend.load import LoadedDoc
from specdsl.frontend.spec import DEFAULT_BACKEND

SCHEMA_ID = "https://specdsl.dev/schemas/spec.v1.json"
VERSION = 1
ID_PATTERN = "^[A-Za-z_][A-Za-z0-9_-]*$"
from specdsl.secrets import ENV_REF_PATTERN as SECRET_PATTERN  # noqa: E402 - the one definition of a reference


# A fragment's enum of registered names may carry {"code": "S213", "what": "probe"}: a value outside it is
# reported as "unknown probe 'x'" with that code and a did-you-mean hint. Editors ignore the keyword.
UNKNOWN_NAME_KEY = "x-specdsl-unknown"


def _meta() -> dict:
    return {"type": "object", "description": "free-form metadata, never interpreted (the one escape hatch)"}


def build_schema(registry: Any) -> dict:
    """The whole spec schema for the plugins in ``registry``."""
    backends = sorted(registry.backends)
    model_rules = []
    for name in backends:
        backend = registry.backends[name]
        entry = {
            "type": "object",
            "properties": {"backend": {"const": name, "description": f"served by the {name} backend"},
                           "model": {"type": "string", "minLength": 1, "description": "the backend's model name"},
                           "meta": _meta(), **dict(backend.options_schema.get("properties", {}))},
            "additionalProperties": False,
        }
        cond: dict[str, Any] = {"properties": {"backend": {"const": name, "description": f"the {name} backend"}},
                                "required": ["backend"]}
        if name == DEFAULT_BACKEND:  # the backend a model entry without `backend:` uses
            cond = {"anyOf": [cond, {"not": {"required": ["backend"]}}]}
        model_rules.append({"if": cond, "then": entry})
    model_entry = {
        "type": "object",
        "required": ["model"],
        "properties": {"backend": {"enum": backends, "description": "which generation backend serves the model"},
                       "model": {"type": "string", "minLength": 1,
                                 "description": "the backend's model name (a known name or a local directory "
                                                "for transformers, a provider/model for litellm)"}},
        "allOf": model_rules,
    }
    source_entry = {
        "type": "object",
        "required": ["path"],
        "properties": {
            "path": {"type": "string", "minLength": 1, "description": "data file or folder, relative to the spec"},
            "format": {"enum": sorted(registry.sources),
                       "description": "the data format (default: from the file's extension, or what the folder holds)"},
            "columns": {"type": "array", "items": {"type": "string"}, "uniqueItems": True,
                        "description": "the file's columns; read from the file when omitted"},
            "id": {"type": "string", "description": "the column that identifies a row (default: `id` if present)"},
            "limit": {"type": "integer", "minimum": 1, "maximum": 10**12, "description": "read only the first N rows"},
            "meta": _meta(),
        },
        "additionalProperties": False,
    }
    # An op whose parameters depend on other plugins (evaluate's probes) builds its fragment from the registry.
    op_props = {name: _described(fragment_for(name, op, registry), getattr(op, "description", "") or f"the {name} op")
                for name, op in sorted(registry.ops.items()) if getattr(op, "spec_step", True)}
    recipe_rules = [
        {"if": {"properties": {"use": {"const": name}}, "required": ["use"]},
         "then": {"properties": {"with": _described(fragment_for(name, recipe, registry),
                                                    f"the {name} recipe's parameters")}}}
        for name, recipe in sorted(registry.recipes.items())
    ]
    step = {
        "type": "object",
        "required": ["id"],
        "properties": {
            "id": {"type": "string", "pattern": ID_PATTERN, "description": "the step's id, unique in the spec"},
            "meta": _meta(),
            "use": {"enum": sorted(registry.recipes), "description": "a recipe to expand here"},
            "with": {"type": "object", "description": "the recipe's parameters"},
            "matrix": {"type": "object", "minProperties": 1,
                       "propertyNames": {"pattern": r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"},
                       "additionalProperties": {"type": "array", "minItems": 1, "maxItems": 64},
                       "description": "one variant of this step per combination of these values: each key is a "
                                      "parameter of the op (or of the recipe's `with:`), each value a list; "
                                      "later steps follow the variants (docs/spec.md, Variants)"},
            **op_props,
        },
        "additionalProperties": False,
        "allOf": recipe_rules,
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "specdsl data-design spec, version 1",
        "type": "object",
        "required": ["specdsl", "name", "steps"],
        "properties": {
            "specdsl": {"const": VERSION, "description": "the spec language version"},
            "name": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                     "description": "the spec's name (plan, manifest, dataset cards)"},
            "description": {"type": "string", "description": "free text about the spec"},
            "seed": {"type": "integer", "minimum": 0, "description": "base seed for sampling and shuffling"},
            "store": {"type": "string", "description": "the run store folder (default: .specdsl beside the spec)"},
            "meta": _meta(),
            "models": {"type": "object", "propertyNames": {"pattern": ID_PATTERN},
                       "additionalProperties": model_entry, "description": "the models steps may name: name -> entry"},
            "sources": {"type": "object", "propertyNames": {"pattern": ID_PATTERN},
                        "additionalProperties": source_entry, "description": "data files: name -> entry"},
            "vars": {"type": "object", "description": "values templates can read (`vars.NAME` or `NAME`)"},
            "steps": {"type": "array", "minItems": 1, "items": step, "description": "the pipeline, in order"},
        },
        "additionalProperties": False,
    }


def _described(schema: Mapping[str, Any], description: str) -> Mapping[str, Any]:
    """``schema`` with a description (an editor shows it beside the op's name), unless it has its own."""
    return schema if "description" in schema else {**schema, "description": description}


# fragment_for's results per (registry, op): checking a built schema against the meta-schema costs tens of
# milliseconds, and a matrixed recipe step asks for the same fragments once per variant.
_FRAGMENTS: dict[tuple[int, int], tuple[Any, Any, Mapping[str, Any]]] = {}


def fragment_for(name: str, obj: Any, registry: Any) -> Mapping[str, Any]:
    """An op's or recipe's parameter schema; built from the registry when it has ``schema_for``. A
    ``schema_for`` that raises or builds an invalid schema falls back to the static ``params_schema``
    (checked when the plugin registered), so one plugin's broken fragment never breaks every spec's schema.
    Built once per registry and op."""
    op = obj
    build = getattr(op, "schema_for", None)
    if not callable(build):
        return op.params_schema
    cached = _FRAGMENTS.get((id(registry), id(op)))
    if cached is not None and cached[0] is registry and cached[1] is op:
        return cached[2]
    fragment = _built_fragment(name, op, build, registry)
    _FRAGMENTS[(id(registry), id(op))] = (registry, op, fragment)
    return fragment


def _built_fragment(name: str, op: Any, build: Any, registry: Any) -> Mapping[str, Any]:
    from specdsl.contract.conformance import schema_problem

    try:
        schema = build(registry)
        # A built-in op's fragment is checked against the meta-schema by the test suite, not per process.
        problem = schema_problem(schema, meta=not type(op).__module__.startswith("specdsl."))
    except Exception as exc:  # noqa: BLE001 - a plugin's bug must not break every spec's schema
        problem = f"raised {exc!r}"
    if problem is None:
        return schema
    import warnings

    warnings.warn(f"'{name}' ({type(op).__module__}): schema_for(registry) {problem}; using its params_schema",
                  RuntimeWarning, stacklevel=2)
    return op.params_schema


_VALIDATORS: dict[int, tuple[Any, Any]] = {}


def validator(registry: Any):
    """The compiled validator for ``registry`` (built once per registry and process)."""
    cached = _VALIDATORS.get(id(registry))
    if cached is not None and cached[0] is registry:
        return cached[1]
    from jsonschema import Draft202012Validator

    v = Draft202012Validator(build_schema(registry))
    _VALIDATORS[id(registry)] = (registry, v)  # the registry is kept alive, so its id is never reused
    return v


def _all_errors(errors: Iterable[Any]) -> list[Any]:
    """Flatten if/then/allOf so each leaf error keeps its own path."""
    out = []
    for err in errors:
        if err.validator in ("allOf",) and err.context:
            out.extend(_all_errors(err.context))
        else:
            out.append(err)
    return out


def validate(doc: LoadedDoc, registry: Any, sink: ErrorSink) -> None:
    """Validate a loaded document, adding one positioned error per problem to ``sink`` (in file order)."""
    data = doc.data
    local = ErrorSink()
    if "specdsl" not in data:
        local.add("S010", "missing `specdsl:` version key", doc.pos(()),
                  hint=f"add `specdsl: {VERSION}` as the first line")
    elif data.get("specdsl") != VERSION or isinstance(data.get("specdsl"), bool):
        local.add("S010", f"unknown spec version {data.get('specdsl')!r}", doc.pos(("specdsl",)),
                  ("specdsl",), hint=f"this specdsl reads version {VERSION}")
    seen: set[tuple] = set()
    for err in _all_errors(validator(registry).iter_errors(data)):
        if _not_finite(err.instance):
            continue  # reported by check_finite_numbers, with a clearer message
        path = tuple(err.absolute_path)
        if path and path[0] == "specdsl":
            continue  # reported above with a better message
        if err.validator == "required" and path == () and "specdsl" in str(err.message):
            continue
        for code, message, where, key, hint in _translate(err, path, doc, registry):
            ident = (code, where, message)
            if ident in seen:
                continue
            seen.add(ident)
            local.add(code, message, doc.pos(where, key=key), where, hint)
    check_inline_secrets(data, doc, local)
    check_finite_numbers(data, doc, local)
    sink.errors.extend(sorted(local.errors, key=_position_key))


def _position_key(err: Any) -> tuple:
    return (err.pos.line, err.pos.col) if err.pos else (0, 0)


def _not_finite(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def check_finite_numbers(data: Any, doc: LoadedDoc, sink: ErrorSink, path: tuple = ()) -> None:
    """YAML's ``.nan`` and ``.inf`` pass every range check (NaN compares false both ways), would be sent to a
    provider as they are, and make ``plan --json`` print invalid JSON: no value of a spec may be one."""
    if _not_finite(data):
        sink.add("S103", f"{format_key_path(path) or 'the value'} is {data!r}; a number here must be finite",
                 doc.pos(path), path, hint="write a plain number (YAML reads .nan and .inf as not-a-number "
                                           "and infinity)")
    elif isinstance(data, dict):
        for k, v in data.items():
            check_finite_numbers(v, doc, sink, path + (k,))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            check_finite_numbers(v, doc, sink, path + (i,))


def check_inline_secrets(data: Any, doc: LoadedDoc, sink: ErrorSink, path: tuple = ()) -> None:
    """Secrets must be ``${env:NAME}`` references, never the secret itself (it would end up in git).

    A value is an inline secret when its key names a secret (``api_key``, ``hf_token``, ``password``, ...)
    or when it has the shape of a well-known provider key (``sk-...``, ``hf_...``). Under ``vars:`` only the
    second rule applies: a var called ``token`` is usually a marker string, not a credential.
    """
    if isinstance(data, dict):
        for k, v in data.items():
            where = path + (k,)
            if isinstance(v, str) and not re.match(SECRET_PATTERN, v) and v.strip() and (
                    (is_secret_key(k) and path[:1] != ("vars",)) or looks_like_secret(v)):
                if not any(e.code == "S404" and e.key_path == where for e in sink.errors):
                    sink.add("S404", f"'{k}' holds an inline secret; write it as ${{env:NAME}}", doc.pos(where),
                             where, hint="put the secret in an environment variable and reference it: "
                                         f"{k}: ${{env:MY_SECRET}}")
            check_inline_secrets(v, doc, sink, where)
    elif isinstance(data, list):
        for i, v in enumerate(data):
            check_inline_secrets(v, doc, sink, path + (i,))


def _translate(err: Any, path: tuple, doc: LoadedDoc, registry: Any):
    """One jsonschema error -> (code, message, key path, point-at-key, hint) tuples."""
    v = err.validator
    schema = err.schema if isinstance(err.schema, dict) else {}
    where = format_key_path(path) or "the top level"
    if v == "additionalProperties":
        allowed = set(schema.get("properties", {}))
        patterns = list(schema.get("patternProperties", {}))
        extras = [k for k in (err.instance or {}) if k not in allowed and not any(re.search(p, k) for p in patterns)]
        is_step = len(path) == 2 and path[0] == "steps"
        for extra in extras:
            if is_step:
                ops = registry.step_ops()
                close = did_you_mean(extra, ops + ["id", "use", "with", "meta"])
                hint = close if close and close.startswith("did") else f"installed ops: {', '.join(ops)}"
                yield "S208", f"unknown op '{extra}'", path + (extra,), True, hint
            else:
                hint = did_you_mean(extra, sorted(allowed)) or f"{where} takes no keys; remove it"
                yield "S104", f"unknown key '{extra}'", path + (extra,), True, hint
        return
    if v == "required":
        missing = [k for k in schema.get("required", []) if isinstance(err.instance, dict) and k not in err.instance]
        for key in missing:
            # A list item (a step) has no key to point at: point at the item itself, not at the list's key.
            on_key = bool(path) and not isinstance(path[-1], int)
            yield "S101", f"missing required key '{key}' in {where}", path, on_key, _required_hint(key, schema)
        return
    if v == "enum" and len(path) == 3 and path[0] == "models" and path[2] == "backend":
        yield "S207", f"unknown backend {err.instance!r}", path, False, \
            f"installed backends: {', '.join(sorted(registry.backends))}"
        return
    if v == "enum" and len(path) == 3 and path[0] == "steps" and path[-1] == "use":
        close = did_you_mean(str(err.instance), registry.recipes)
        hint = close if close and close.startswith("did") else \
            f"installed recipes: {', '.join(sorted(registry.recipes)) or '(none)'}"
        yield "S209", f"unknown recipe {err.instance!r}", path, False, hint
        return
    unknown = schema.get(UNKNOWN_NAME_KEY) if v == "enum" else None
    if isinstance(unknown, Mapping):
        # A name from the registry (a probe, a training target): the fragment says which error code it gets.
        yield unknown["code"], f"unknown {unknown['what']} {err.instance!r}", path, False, \
            did_you_mean(str(err.instance), [str(x) for x in schema.get("enum", [])]) or \
            f"no {unknown['what']} is installed (`specdsl plugins` lists what is)"
        return
    if v == "const" and path and path[-1] == "backend":
        return  # an if/then branch for another backend; the enum check reports unknown ones
    if v == "pattern" and schema.get("pattern") == SECRET_PATTERN:
        yield "S404", f"{where} must be a secret reference like ${{env:API_KEY}}, never the secret itself", \
            path, False, "put the key in an environment variable and reference it"
        return
    if v in ("oneOf", "anyOf") and err.context:
        best = max(err.context, key=lambda e: len(list(e.absolute_path)))
        yield from _translate(best, tuple(best.absolute_path), doc, registry)
        return
    if len(path) >= 3 and path[0] == "models" and path[2] not in ("backend", "model", "meta") and \
            isinstance(doc.data.get("models"), dict):
        # A backend's own option (the fragment it registered) has a wrong type or value.
        entry = doc.data["models"].get(path[1])
        backend = entry.get("backend", DEFAULT_BACKEND) if isinstance(entry, dict) else "?"
        for _code, message, where_, key, hint in _translate_plain(err, path, schema, prefix=False):
            yield "S210", f"invalid option `{path[-1]}` for backend '{backend}': {message}", where_, key, hint
        return
    yield from _translate_plain(err, path, schema)


def _translate_plain(err: Any, path: tuple, schema: Mapping[str, Any], prefix: bool = True):
    """Type, range and value errors, the same wherever they occur."""
    v = err.validator
    where = format_key_path(path) or "the top level"
    if "propertyNames" in err.schema_path and isinstance(err.instance, str):
        # A name under a mapping (a model or source name); jsonschema reports it at the parent's path.
        yield "S105", f"invalid name {err.instance!r} under {where}", path + (err.instance,), True, \
            "names start with a letter or _ and hold only letters, digits, _ and -"
        return
    if v == "type":
        expected = schema.get("type")
        expected = " or ".join(expected) if isinstance(expected, list) else expected
        subject = where if prefix else "it"
        yield "S102", f"{subject} must be {_article(expected)}, not {_json_type(err.instance)}", path, False, \
            _type_hint(expected, err.instance)
        return
    if v in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength", "minItems",
             "maxItems", "enum", "const", "pattern", "uniqueItems", "multipleOf", "minProperties", "maxProperties"):
        hint = None
        if v == "enum":
            hint = f"allowed: {', '.join(map(repr, schema.get('enum', [])))}"
            close = did_you_mean(err.instance, [x for x in schema.get("enum", []) if isinstance(x, str)]) \
                if isinstance(err.instance, str) else None
            if close and close.startswith("did"):
                hint = f"{close} {hint}"
        elif v == "pattern":
            hint = f"it must match {schema.get('pattern')}"
        else:
            hint = _limit_hint(v, schema)
        yield "S103", (f"{where}: " if prefix else "") + _short(err.message), path, False, hint
        return
    if v == "propertyNames":
        yield "S105", f"invalid name under {where}: {_short(err.message)}", path, False, f"names match {ID_PATTERN}"
        return
    description = schema.get("description")
    yield "S105", f"{where}: {_short(err.message)}", path, False, \
        f"expected: {_short(description)}" if isinstance(description, str) and description else \
        "`specdsl schema` prints what each key takes"


def _required_hint(key: str, schema: Mapping[str, Any]) -> str:
    """``add `key: ...```, with what the key means when the schema says."""
    prop = (schema.get("properties") or {}).get(key)
    description = prop.get("description") if isinstance(prop, dict) else None
    first = description.split(". ")[0].rstrip(".") if isinstance(description, str) else ""
    return f"add `{key}: ...`" + (f" ({_short(first)})" if first else "")


def _type_hint(expected: Any, instance: Any) -> str:
    if expected in ("integer", "number") and isinstance(instance, str):
        return "write the number without quotes (quoted, YAML reads it as text)"
    if expected == "string" and isinstance(instance, (int, float, bool)):
        return "quote the value to make it text"
    if expected == "array":
        return "write a list: [a, b] or one `- item` per line"
    if expected == "object":
        return "write a mapping: {key: value} or one `key: value` per line"
    return f"write {_article(str(expected))} here"


def _limit_hint(validator_name: str, schema: Mapping[str, Any]) -> str:
    """What the value may be, from the schema's limits."""
    lo = schema.get("minimum", schema.get("exclusiveMinimum"))
    hi = schema.get("maximum", schema.get("exclusiveMaximum"))
    if validator_name in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        low = "" if lo is None else f"{'>' if 'exclusiveMinimum' in schema else '>='} {lo}"
        high = "" if hi is None else f"{'<' if 'exclusiveMaximum' in schema else '<='} {hi}"
        return f"use a value {' and '.join(x for x in (low, high) if x)}"
    if validator_name in ("minLength", "maxLength"):
        return f"use {schema.get('minLength', 0)} to {schema.get('maxLength', 'any number of')} characters"
    if validator_name in ("minItems", "maxItems"):
        return f"list {schema.get('minItems', 0)} to {schema.get('maxItems', 'any number of')} items"
    if validator_name in ("minProperties", "maxProperties"):
        return f"give {schema.get('minProperties', 0)} to {schema.get('maxProperties', 'any number of')} entries"
    if validator_name == "const":
        return f"the only value allowed here is {schema.get('const')!r}"
    if validator_name == "uniqueItems":
        return "remove the repeated items"
    if validator_name == "multipleOf":
        return f"use a multiple of {schema.get('multipleOf')}"
    return "`specdsl schema` prints what each key takes"


def _short(message: str) -> str:
    """A jsonschema message cut to length, secrets redacted first: a key quoted across the cut would
    otherwise survive in part, where ErrorSink's later redaction cannot recognise it."""
    from specdsl.secret_shapes import redact_secrets

    message = redact_secrets(message)
    return message if len(message) < 160 else message[:157] + "..."


def _article(type_name: Any) -> str:
    name = {"object": "mapping", "array": "list", "integer": "integer", "number": "number", "string": "string",
            "boolean": "boolean (true/false)", "null": "null"}.get(str(type_name), str(type_name))
    return ("an " if name[0] in "aeiou" else "a ") + name


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a number ({value})"
    if isinstance(value, str):
        return f"a string ({value[:40]!r})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return "null" if value is None else type(value).__name__


def validate_fragment(data: Any, schema: Mapping[str, Any], doc: LoadedDoc, base: tuple, sink: ErrorSink,
                      registry: Any, code: str | None = None) -> None:
    """Validate a piece of the document against a plugin's fragment (recipe parameters, say)."""
    from jsonschema import Draft202012Validator

    for err in _all_errors(Draft202012Validator(dict(schema)).iter_errors(data)):
        path = base + tuple(err.absolute_path)
        for c, message, where, key, hint in _translate(err, path, doc, registry):
            sink.add(code or c, message, doc.pos(where, key=key), where, hint)
