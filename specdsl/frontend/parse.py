"""Checked mapping -> typed :class:`~specdsl.frontend.spec.Spec` (recipes expanded, references not yet resolved)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from specdsl.errors import ErrorSink
from specdsl.frontend.load import LoadedDoc
from specdsl.frontend.schema import fragment_for, validate_fragment
from specdsl.frontend.spec import DEFAULT_BACKEND, ModelDecl, SourceDecl, Spec, StepDecl

_STEP_KEYS = ("id", "meta", "use", "with")


def parse_spec(doc: LoadedDoc, file: Path, registry: Any, sink: ErrorSink) -> Spec | None:
    """Build the typed spec from a schema-valid document. Errors go to ``sink``; returns None on errors."""
    data: Mapping[str, Any] = doc.data
    models = {}
    for name, entry in (data.get("models") or {}).items():
        backend = entry.get("backend", DEFAULT_BACKEND)
        options = {k: v for k, v in entry.items() if k not in ("backend", "model", "meta")}
        models[name] = ModelDecl(name, backend, entry["model"], options, ("models", name))
    sources = {}
    for name, entry in (data.get("sources") or {}).items():
        path = entry["path"]
        fmt = entry.get("format") or format_of(file.parent / path, registry.sources)
        if fmt is None:
            sink.add("S105", f"cannot tell the format of source '{name}' from '{path}'",
                     doc.pos(("sources", name, "path")), ("sources", name, "path"),
                     hint=f"add `format: {' | '.join(sorted(registry.sources))}`")
            continue
        cols = tuple(entry["columns"]) if entry.get("columns") else None
        sources[name] = SourceDecl(name, path, fmt, cols, entry.get("id"), entry.get("limit"), ("sources", name))

    steps: list[StepDecl] = []
    expansions: dict[str, tuple[str, ...]] = {}
    for i, raw in enumerate(data.get("steps") or []):
        op_keys = [k for k in raw if k not in _STEP_KEYS]
        step_id = raw["id"]
        if "use" in raw:
            if op_keys:
                sink.add("S401", f"step '{step_id}' both uses a recipe and names op '{op_keys[0]}'",
                         doc.pos(("steps", i, op_keys[0]), key=True), ("steps", i),
                         hint="split it into two steps")
                continue
            expanded = _expand(doc, i, raw, registry, sink)
            if expanded is None:
                continue
            steps.extend(expanded)
            expansions[step_id] = tuple(s.id for s in expanded)
            continue
        if "with" in raw:
            sink.add("S104", "`with:` belongs to recipe steps (`use:`)", doc.pos(("steps", i, "with"), key=True),
                     ("steps", i, "with"))
        if len(op_keys) != 1:
            where = doc.pos(("steps", i))
            if not op_keys:
                sink.add("S101", f"step '{step_id}' names no op", where, ("steps", i),
                         hint=f"add one of: {', '.join(registry.step_ops())}, or `use: RECIPE`")
            else:
                sink.add("S401", f"step '{step_id}' names several ops ({', '.join(op_keys)}); a step has one",
                         doc.pos(("steps", i, op_keys[1]), key=True), ("steps", i),
                         hint="split it into one step per op")
            continue
        op = op_keys[0]
        params = raw[op] if isinstance(raw[op], dict) else {}
        steps.append(StepDecl(step_id, op, params, ("steps", i, op)))
    if sink:
        return None
    return Spec(version=data["specdsl"], name=data["name"], description=data.get("description", ""),
                file=file, models=models, sources=sources, vars=data.get("vars") or {}, steps=tuple(steps),
                seed=data.get("seed", 0), store=data.get("store"), doc=doc, expansions=expansions)


def _expand(doc: LoadedDoc, index: int, raw: Mapping[str, Any], registry: Any, sink: ErrorSink) -> list[StepDecl] | None:
    name = raw["use"]
    recipe = registry.recipes.get(name)
    if recipe is None:  # the schema's enum already reported it with the list of recipes
        return None
    params = raw.get("with") or {}
    before = len(sink.errors)
    validate_fragment(params, fragment_for(name, recipe, registry), doc, ("steps", index, "with"), sink, registry)
    if len(sink.errors) > before:
        return None
    try:
        produced = recipe.expand(raw["id"], params)
    except ValueError as exc:  # a recipe's own rule about its parameters
        sink.add("S211", f"recipe '{name}': {exc}", doc.pos(("steps", index, "use")), ("steps", index, "with"))
        return None
    except Exception as exc:  # noqa: BLE001 - a plugin's recipe must not crash the compiler
        sink.add("S211", f"recipe '{name}' failed to expand: {exc!r}", doc.pos(("steps", index, "use")),
                 ("steps", index, "with"), hint=f"a bug in the plugin that provides it ({type(recipe).__module__}); report it there")
        return None
    if not isinstance(produced, list) or not all(isinstance(s, dict) and isinstance(s.get("id"), str)
                                                 for s in produced):
        sink.add("S211", f"recipe '{name}' expanded to something that is not a list of steps with ids",
                 doc.pos(("steps", index, "use")), ("steps", index))
        return None
    out = []
    for step in produced:
        op_keys = [k for k in step if k not in _STEP_KEYS]
        if len(op_keys) != 1 or op_keys[0] not in registry.step_ops():
            sink.add("S211", f"recipe '{name}' produced an invalid step {step.get('id')!r} (ops: {op_keys})",
                     doc.pos(("steps", index, "use")), ("steps", index))
            return None
        out.append(StepDecl(step["id"], op_keys[0], step[op_keys[0]], ("steps", index), recipe=name,
                            recipe_step=raw["id"], exact_positions=False))
    # The expansion is checked against the same schema as hand-written steps.
    from jsonschema import Draft202012Validator

    for s in out:
        schema = fragment_for(s.op, registry.ops[s.op], registry)
        for err in Draft202012Validator(dict(schema)).iter_errors(dict(s.params)):
            sink.add("S211", f"recipe '{name}' produced step '{s.id}' with invalid {s.op} parameters: {err.message}",
                     doc.pos(("steps", index, "use")), ("steps", index), hint="check the recipe's parameters")
    return out


def format_of(path: Path, registry_sources: Mapping[str, Any]) -> str | None:
    """The format that reads ``path`` when a source names none: by file suffix, else (for a folder that
    exists) the first format whose ``matches(path)`` says yes; None when no format claims it."""
    suffix = path.suffix.lower()
    for name, source in registry_sources.items():
        if suffix and suffix in tuple(getattr(source, "suffixes", ()) or ()):
            return name
    if path.exists():
        for name, source in registry_sources.items():
            matches = getattr(source, "matches", None)
            try:
                if callable(matches) and matches(path):
                    return name
            except OSError:
                continue
    return None
