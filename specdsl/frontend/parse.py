"""Checked mapping -> typed :class:`~specdsl.frontend.spec.Spec` (recipes expanded, references not yet resolved)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

from specdsl.errors import ErrorSink
from specdsl.frontend.load import LoadedDoc
from specdsl.frontend.matrix import NESTED_REFERENCE_KEYS, combinations, scalar_references, substitute
from specdsl.frontend.matrix import apply as matrix_apply
from specdsl.frontend.schema import fragment_for, validate_fragment
from specdsl.frontend.spec import DEFAULT_BACKEND, ModelDecl, SourceDecl, Spec, StepDecl

_STEP_KEYS = ("id", "meta", "use", "with", "matrix")


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
    matrixed: dict[str, list[tuple[str, str]]] = {}  # step id -> its variants' (id, label)
    for i, raw in enumerate(data.get("steps") or []):
        if not raw.get("matrix"):
            decls = _step_decls(doc, i, raw, registry, sink, expansions)
            steps.extend(decls or ())
            continue
        variants = _matrix_variants(doc, i, raw, registry, sink)
        if variants is None:
            continue
        produced: list[str] = []
        for label, raw_variant in variants:
            # A variant belongs to the step as written (plan groups it there; prune keeps every variant).
            decls = [replace(d, recipe_step=raw["id"]) for d in _step_decls(doc, i, raw_variant, registry, sink,
                                                                             expansions) or ()]
            steps.extend(decls)
            produced += [d.id for d in decls]
        matrixed[raw["id"]] = [(raw_variant["id"], label) for label, raw_variant in variants]
        expansions[raw["id"]] = tuple(produced)
    if matrixed and not sink:
        steps = _follow_matrices(doc, steps, matrixed, registry, sink, expansions)
    if sink:
        return None
    return Spec(version=data["specdsl"], name=data["name"], description=data.get("description", ""),
                file=file, models=models, sources=sources, vars=data.get("vars") or {}, steps=tuple(steps),
                seed=data.get("seed", 0), store=data.get("store"), doc=doc, expansions=expansions)


def _step_decls(doc: LoadedDoc, i: int, raw: Mapping[str, Any], registry: Any, sink: ErrorSink,
                expansions: dict[str, tuple[str, ...]]) -> list[StepDecl] | None:
    """The step(s) one entry of `steps:` stands for: itself, or what its recipe expands to."""
    op_keys = [k for k in raw if k not in _STEP_KEYS]
    step_id = raw["id"]
    if "use" in raw:
        if op_keys:
            sink.add("S401", f"step '{step_id}' both uses a recipe and names op '{op_keys[0]}'",
                     doc.pos(("steps", i, op_keys[0]), key=True), ("steps", i),
                     hint="split it into two steps")
            return None
        expanded = _expand(doc, i, raw, registry, sink)
        if expanded is None:
            return None
        expansions[step_id] = tuple(s.id for s in expanded)
        return expanded
    if "with" in raw:
        sink.add("S104", "`with:` belongs to recipe steps (`use:`)", doc.pos(("steps", i, "with"), key=True),
                 ("steps", i, "with"), hint="name the recipe with `use:`, or move these parameters under the op's key")
    if len(op_keys) != 1:
        where = doc.pos(("steps", i))
        if not op_keys:
            sink.add("S101", f"step '{step_id}' names no op", where, ("steps", i),
                     hint=f"add one of: {', '.join(registry.step_ops())}, or `use: RECIPE`")
        else:
            sink.add("S401", f"step '{step_id}' names several ops ({', '.join(op_keys)}); a step has one",
                     doc.pos(("steps", i, op_keys[1]), key=True), ("steps", i),
                     hint="split it into one step per op")
        return None
    op = op_keys[0]
    params = raw[op] if isinstance(raw[op], dict) else {}
    return [StepDecl(step_id, op, params, ("steps", i, op))]


def _matrix_variants(doc: LoadedDoc, i: int, raw: Mapping[str, Any], registry: Any,
                     sink: ErrorSink) -> list[tuple[str, dict[str, Any]]] | None:
    """(label, the step written out for that variant) for each combination of the step's ``matrix:``.
    Each value is checked against the parameter it sets, and a wrong one is reported at the value."""
    from jsonschema import Draft202012Validator

    matrix = raw["matrix"]
    op_keys = [k for k in raw if k not in _STEP_KEYS]
    if "use" in raw:
        target, schema = "with", fragment_for(raw["use"], registry.recipes.get(raw["use"]), registry) \
            if raw["use"] in registry.recipes else None
    elif len(op_keys) == 1 and op_keys[0] in registry.ops:
        target, schema = op_keys[0], fragment_for(op_keys[0], registry.ops[op_keys[0]], registry)
    else:
        return None  # no op, or several: reported when the step itself is read
    if schema is None:
        return None
    base = raw.get(target) if isinstance(raw.get(target), dict) else {}
    validator = Draft202012Validator(dict(schema))
    before = len(sink.errors)
    for key, values in matrix.items():
        for j, value in enumerate(values):
            trial = matrix_apply(base, {key: value})
            for err in validator.iter_errors(trial):
                sink.add("S103", f"matrix value {value!r} for `{key}` does not fit {target}: {err.message}",
                         doc.pos(("steps", i, "matrix", key, j)), ("steps", i, "matrix", key, j),
                         hint=f"each matrix key is a parameter of `{target}` (`lora.r` reaches into a mapping)")
                break
    if len(sink.errors) > before:
        return None
    out = []
    for label, bindings in combinations(matrix):
        variant = {k: v for k, v in raw.items() if k != "matrix"}
        variant["id"] = f"{raw['id']}.{label}"
        variant[target] = matrix_apply(base, bindings)
        out.append((label, variant))
    return out


def _follow_matrices(doc: LoadedDoc, steps: list[StepDecl], matrixed: dict[str, list[tuple[str, str]]],
                     registry: Any, sink: ErrorSink, expansions: dict[str, tuple[str, ...]]) -> list[StepDecl]:
    """Steps after a matrixed step follow its variants (see specdsl.frontend.matrix)."""
    out: list[StepDecl] = []
    for step in steps:
        op = registry.ops.get(step.op)
        keys = tuple(getattr(op, "input_keys", ())) + tuple(getattr(op, "model_keys", ()))
        reference_keys = frozenset(keys) | frozenset(NESTED_REFERENCE_KEYS)
        origins = list(dict.fromkeys(scalar_references(step.params, keys, matrixed)))
        if not origins:
            out.append(replace(step, params=substitute(dict(step.params), matrixed, {}, reference_keys)))
            continue
        labels = [label for _vid, label in matrixed[origins[0]]]
        if any([label for _vid, label in matrixed[o]] != labels for o in origins[1:]):
            sink.add("S401", f"step '{step.id}' reads steps with different matrices ({', '.join(origins)})",
                     doc.pos(step.path, key=True), (step.id,),
                     hint="read one matrixed step, or give the steps it reads the same matrix")
            out.append(step)
            continue
        variants = []
        for index, label in enumerate(labels):
            chosen = {origin: matrixed[origin][index][0] for origin in origins}
            params = substitute(dict(step.params), matrixed, chosen, reference_keys)
            variants.append(replace(step, id=f"{step.id}.{label}", params=params,
                                    recipe_step=step.recipe_step or step.id))
        out.extend(variants)
        matrixed[step.id] = [(v.id, label) for v, label in zip(variants, labels)]
        expansions[step.id] = tuple(v.id for v in variants)
    return out


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
        sink.add("S211", f"recipe '{name}': {exc}", doc.pos(("steps", index, "use")), ("steps", index, "with"),
                 hint=f"change the parameters under `with:` as the message says (`specdsl schema` lists "
                      f"what '{name}' takes)")
        return None
    except Exception as exc:  # noqa: BLE001 - a plugin's recipe must not crash the compiler
        sink.add("S211", f"recipe '{name}' failed to expand: {exc!r}", doc.pos(("steps", index, "use")),
                 ("steps", index, "with"), hint=f"a bug in the plugin that provides it ({type(recipe).__module__}); report it there")
        return None
    if not isinstance(produced, list) or not all(isinstance(s, dict) and isinstance(s.get("id"), str)
                                                 for s in produced):
        sink.add("S211", f"recipe '{name}' expanded to something that is not a list of steps with ids",
                 doc.pos(("steps", index, "use")), ("steps", index),
                 hint=f"a bug in the plugin that provides it ({type(recipe).__module__}); report it there")
        return None
    out = []
    for step in produced:
        op_keys = [k for k in step if k not in _STEP_KEYS + ("note",)]
        if len(op_keys) != 1 or op_keys[0] not in registry.step_ops():
            sink.add("S211", f"recipe '{name}' produced an invalid step {step.get('id')!r} (ops: {op_keys})",
                     doc.pos(("steps", index, "use")), ("steps", index),
                     hint=f"a bug in the plugin that provides it ({type(recipe).__module__}), or an op it needs is "
                          "not installed (`specdsl plugins`)")
            return None
        note = step.get("note")
        out.append(StepDecl(step["id"], op_keys[0], step[op_keys[0]], ("steps", index), recipe=name,
                            recipe_step=raw["id"], exact_positions=False,
                            note=str(note) if note else None))
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
