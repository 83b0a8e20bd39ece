"""Lowering: a typed Spec -> a Plan.

Resolves references (sources, steps, models), finds cycles, flows columns through the DAG so every
template and column reference is checked where it is used, lets each op check its own rules, and builds
plan nodes with fingerprints and estimates. All errors of a spec are collected and raised together.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import replace
from typing import Any, Mapping

from specdsl.errors import ErrorSink, SourcePos, SpecError, SpecErrors, did_you_mean
from specdsl.ir.plan import ModelRef, Plan, PlanNode, canonical_json, refingerprint, topo_order, topo_sort
from specdsl.frontend.spec import ModelDecl, Spec, StepDecl
from specdsl.contract.ops import SOURCE_OP, CheckContext
from specdsl import templates


_PLAIN_COLUMN = re.compile(r"^[A-Za-z_][A-Za-z0-9_. -]{0,63}$")


def _outside(path: Any, folder: Any) -> bool:
    """``path`` resolves (symlinks followed) outside ``folder``."""
    try:
        target, base = path.resolve(), folder.resolve()
    except OSError:
        return True
    return target != base and base not in target.parents


def lower(spec: Spec, registry: Any, *, identities: bool = True) -> Plan:
    """Lower ``spec`` into a Plan. ``identities=False`` skips work only fingerprints need (validate)."""
    sink = ErrorSink()
    step_ids: dict[str, StepDecl] = {}
    for step in spec.steps:
        if step.id in step_ids or step.id in spec.sources:
            if step.id in spec.sources:
                what = f"source '{step.id}' (line {spec.pos(spec.sources[step.id].key_path, key=True).line})"
            else:
                first = step_ids[step.id]
                what = f"the step at line {_id_pos(spec, first).line}"
                if first.recipe:
                    what += f" (made by recipe '{first.recipe}')"
            sink.add("S205", f"step id '{step.id}' is already used by {what}", _id_pos(spec, step),
                     (step.id,), hint="step ids and source names share one namespace; rename one of them")
            continue
        step_ids[step.id] = step

    # Model identities (what decides a backend's outputs; never secrets).
    model_refs: dict[str, ModelRef] = {}
    for name, decl in spec.models.items():
        backend = registry.backends.get(decl.backend)
        if backend is None:
            continue  # reported by the schema
        model = decl.model
        if getattr(backend, "model_is_path", False) and (model.startswith((".", "/")) or "/" in model) \
                and (spec.dir / model).exists():
            # A local model folder is relative to the spec, like a source, not to wherever `run` is typed.
            model = str((spec.dir / model).resolve())
        options = {"model": model, **decl.options}
        identity = {"backend": backend.name, "backend_version": backend.version}
        # The backend's own checks run for validate too (identity() may be slow, so validate skips it);
        # when they find problems, identity() would only fail on the same ones less precisely.
        rejected = _check_options(spec, name, decl, backend, options, sink)
        if identities and not rejected:
            try:
                identity.update(backend.identity(options))
            except Exception as exc:  # noqa: BLE001 - a backend's identity failing is the user's model problem
                message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
                sink.add("S210", f"model '{name}': {message}", spec.pos(decl.path), decl.path,
                         hint=getattr(exc, "hint", None) or f"backend '{decl.backend}' rejected this model entry")
        model_refs[name] = ModelRef(name, decl.backend, decl.model, canonical_json(options), canonical_json(identity))

    # Source nodes.
    columns: dict[str, tuple[str, ...]] = {}
    unknown_columns: set[str] = set()  # sources/steps whose columns are unknown because of an earlier error
    nodes: dict[str, PlanNode] = {}
    for name, src in spec.sources.items():
        cols = src.columns
        path = spec.dir / src.path
        reader = registry.sources.get(src.format)  # always there: the schema's enum is the registry's formats
        if cols is None:
            try:
                cols = reader.columns(path)
                if cols and _outside(path, spec.dir) and not all(_PLAIN_COLUMN.match(str(c)) for c in cols):
                    # Column names reach hints; a file outside the spec's folder (`../`, an absolute path, a
                    # symlink) may be no data file at all, and its first line must not be printed (CI).
                    raise ValueError("the file is outside the spec's folder and its column names are not plain "
                                     "names (not shown); declare the source's `columns:` if it is data")
            except FileNotFoundError:
                sink.add("S405", f"source '{name}': file '{src.path}' does not exist",
                         spec.pos(src.key_path + ("path",)), src.key_path + ("path",),
                         hint=f"looked in {path.parent}; or declare `columns:` to check the spec without the data")
                cols = ()
                unknown_columns.add(name)
            except Exception as exc:  # noqa: BLE001 - whatever a reader raises, it is this file's problem
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                # Readers start with the file's name ("rows.parquet: not a readable ..."), which the message
                # names already; dropped, a file named like a secret key reads as no `passwd: value`.
                reason = reason.removeprefix(f"{path.name}: ")
                sink.add("S405", f"source '{name}': cannot read '{src.path}': {reason}",
                         spec.pos(src.key_path + ("path",)), src.key_path + ("path",),
                         hint=f"check the file and its format (read as {src.format}; `format:` sets it), or "
                              "declare the source's `columns:` to check the spec without reading it")
                cols = ()
                unknown_columns.add(name)
        if src.id_column and cols and src.id_column not in cols:
            sink.add("S403", f"source '{name}' has no column '{src.id_column}' to use as id",
                     spec.pos(src.key_path + ("id",)), src.key_path + ("id",), hint=f"columns: {', '.join(cols)}")
        out_cols = tuple(cols) if "id" in cols or not cols else ("id",) + tuple(cols)
        params = {"path": src.path, "format": src.format, "id": src.id_column, "limit": src.limit}
        identity = dict(reader.identity(path)) if identities else {}
        nodes[name] = PlanNode(id=name, op=SOURCE_OP, kind="source", params_json=canonical_json(params), inputs=(),
                               columns=out_cols, identity_json=canonical_json(identity), step=name,
                               pos=spec.pos(src.key_path, key=True))
        columns[name] = out_cols

    # Dependencies between steps, for cycle detection and order.
    deps: dict[str, list[tuple[str, str]]] = {}
    unresolved: set[str] = set()  # steps with an input that names nothing
    # Inputs naming a helper node (`from: sft.tokens`): the helper's id -> the step that makes it. Helpers
    # exist only once their step is checked, so order and cycles go by that step; the helper itself is
    # looked up when the reading step is built.
    helper_refs: dict[str, str] = {}
    for step in step_ids.values():
        op = registry.ops.get(step.op)
        if op is None:
            unknown_columns.add(step.id)
            continue
        refs = []
        for key in op.input_keys:
            value = step.params.get(key)
            if value is None:
                continue
            # A list of inputs (concat) becomes params from[0], from[1], ... in the plan.
            items = [(f"{key}[{i}]", v) for i, v in enumerate(value)] if isinstance(value, list) else [(key, value)]
            for i, (param, ref) in enumerate(items):
                if ref in step_ids or ref in spec.sources:
                    refs.append((param, ref))
                    continue
                owner = _helper_owner(ref, step_ids)
                if owner is not None and owner != step.id:
                    helper_refs[ref] = owner
                    refs.append((param, ref))
                    continue
                unresolved.add(step.id)
                code, message, hint = _unknown_input(str(ref), list(step_ids), list(spec.sources))
                keys = (key, i) if isinstance(value, list) else (key,)
                sink.add(code, message, spec.step_pos(step, *keys), (step.id,) + keys, hint=hint)
        for key in op.model_keys:
            value = step.params.get(key)
            if value is None:
                continue
            for ref in (value if isinstance(value, list) else [value]):
                if ref in spec.models:
                    continue
                if ref in step_ids and _makes_model(registry, step_ids[ref]):
                    refs.append((key, ref))
                    continue
                trained = [s.id for s in step_ids.values() if _makes_model(registry, s)]
                hint = did_you_mean(str(ref), list(spec.models) + trained)
                sink.add("S201", f"unknown model '{ref}'", spec.step_pos(step, key), (step.id, key),
                         hint=hint or "define it under `models:` or name a train step")
        deps[step.id] = refs
    # Order and cycles see a helper reference as one to the step that makes the helper.
    step_deps = {sid: [(key, helper_refs.get(ref, ref)) for key, ref in refs] for sid, refs in deps.items()}
    cycle = _find_cycle(step_deps)
    if cycle:
        first = step_ids[cycle[0]]
        shown = cycle + [cycle[0]] if len(cycle) <= 8 else cycle[:4] + [f"... ({len(cycle)} steps) ..."] + cycle[-2:] \
            + [cycle[0]]
        sink.add("S206", "steps form a cycle: " + " -> ".join(shown), spec.step_pos(first, key=True),
                 (first.id,), hint="a step can only read steps that do not read it back")
        raise SpecErrors(_sorted(sink.errors), {spec.doc.file: spec.doc.lines})

    order = _topo(list(step_ids), step_deps)
    model_kinds = {name: decl.backend for name, decl in spec.models.items()}
    model_kinds.update({s.id: "trained" for s in step_ids.values() if _makes_model(registry, s)})
    var_names = frozenset(spec.vars)
    for sid in order:
        step = step_ids[sid]
        op = registry.ops.get(step.op)
        if op is None:
            continue
        for key, ref in deps.get(sid, []):
            if ref in helper_refs and ref not in nodes and helper_refs[ref] not in unknown_columns:
                # The step exists but makes no such helper node: say which ones it makes.
                owner = helper_refs[ref]
                made = sorted(n for n in nodes if n.startswith(owner + ".") and nodes[n].step == owner)
                base_key, _, index = key.partition("[")
                keys = (base_key, int(index.rstrip("]"))) if index else (base_key,)
                sink.add("S203", f"step '{owner}' makes no node '{ref}'", spec.step_pos(step, *keys),
                         (sid,) + keys, hint=f"its nodes: {', '.join(made + [owner])}")
                unresolved.add(sid)
        inputs = {key: columns.get(ref, ()) for key, ref in deps.get(sid, []) if key.split("[")[0] in op.input_keys}
        # When an input's columns are unknown (it names nothing, its file is missing, its op failed), every
        # column check here would only echo that first error: keep the step's other errors, drop those.
        blind = sid in unresolved or any(ref in unknown_columns or helper_refs.get(ref) in unknown_columns
                                         for key, ref in deps.get(sid, []) if key.split("[")[0] in op.input_keys)
        step_sink = ErrorSink() if blind else sink

        def pos_of(*keys, key=False, _step=step):
            return spec.step_pos(_step, *keys, key=key)

        ctx = CheckContext(step_id=sid, params=step.params, inputs=inputs, var_names=var_names, sink=step_sink,
                           pos_of=pos_of, models=model_kinds, registry=registry)
        for key in op.template_keys:
            if key in step.params:
                ctx.template(step.params[key], key)
        try:
            out_cols = tuple(op.check(ctx))
        except Exception as exc:  # noqa: BLE001 - a plugin op's check must not crash the compiler
            sink.add("S401", f"op '{step.op}' failed to check step '{sid}': {exc!r}", pos_of(), (sid,),
                     hint=f"a bug in the plugin that provides '{step.op}' ({type(op).__module__}); report it there")
            out_cols = ()
            unknown_columns.add(sid)
        if blind:
            unknown_columns.add(sid)
            sink.errors.extend(e for e in step_sink.errors if e.code not in _COLUMN_CODES)
        columns[sid] = out_cols
        model_deps = tuple((k, r) for k, r in deps.get(sid, []) if k in op.model_keys)
        input_deps = tuple((k, r) for k, r in deps.get(sid, []) if k.split("[")[0] in op.input_keys)
        identity: dict[str, Any] = {}
        backends: dict[str, None] = {}     # "name version" of each backend the step's models use, in order
        model_names: dict[str, None] = {}  # declared and trained, in the step's order (a dict: no repeats)
        for key, value in step.params.items():
            if key not in op.model_keys:
                continue
            for ref in (value if isinstance(value, list) else [value]):
                model_names[ref] = None
                if ref in model_refs:
                    identity[f"model:{ref}"] = canonical_json(model_refs[ref].to_dict()["identity"])
                    name = model_refs[ref].backend
                    backends[f"{name} {registry.backends[name].version}"] = None
        backend = ", ".join(backends) or None
        used_vars = sorted(ctx.used_vars & var_names)
        if used_vars:
            identity["vars"] = {v: spec.vars[v] for v in used_vars}
        # An op may put helper nodes in front of itself (train: tokenize, so the exact labels are a cached,
        # inspectable table before any training); the step then reads the last helper.
        for helper in _helpers(op, ctx, sid, sink, pos_of):
            helper_id = sid + helper.suffix
            helper_op = registry.ops.get(helper.op)
            nodes[helper_id] = PlanNode(
                id=helper_id, op=helper.op, kind=getattr(helper_op, "kind", "transform"),
                params_json=canonical_json(dict(helper.params)), inputs=input_deps, columns=tuple(helper.columns),
                models=model_deps, model_names=tuple(model_names), identity_json=canonical_json(identity), step=sid,
                recipe=step.recipe, pos=pos_of(key=True), op_version=getattr(helper_op, "version", "1"))
            input_deps = (("from", helper_id),)
            columns[helper_id] = tuple(helper.columns)  # a later step may read the helper (`from: sft.tokens`)
        label = op.backend_label(step.params) if callable(getattr(op, "backend_label", None)) else None
        backend = label or backend
        reads = None
        if getattr(op, "reads_known", False) and not _reads_dynamically(step.params):
            reads = tuple(sorted(ctx.used_columns))
        nodes[sid] = PlanNode(
            id=sid, op=step.op, kind=op.kind, params_json=canonical_json(dict(step.params)), inputs=input_deps,
            columns=out_cols, models=model_deps, model_names=tuple(model_names), backend=backend,
            identity_json=canonical_json(identity), step=step.recipe_step or sid, recipe=step.recipe,
            pos=pos_of(key=True), op_version=op.version, reads=reads, sink=bool(getattr(op, "sink_op", False)))

    if sink:
        errors = [_pinpoint(e, spec.doc.lines) for e in sink.errors]
        raise SpecErrors(_sorted(errors), {spec.doc.file: spec.doc.lines})
    ordered = topo_sort(nodes.values())
    plan = Plan(name=spec.name, spec_file=str(spec.file), spec_hash=_spec_hash(spec), nodes=refingerprint(ordered),
                models=tuple(model_refs.values()), vars_json=canonical_json(dict(spec.vars)), seed=spec.seed,
                store=spec.store, expansions=tuple(spec.expansions.items()),
                notes=tuple(f"{s.id}: {s.note}" for s in spec.steps if s.note))
    return plan


def _makes_model(registry: Any, step: StepDecl) -> bool:
    """Whether the step's output is a model later steps may name (its op has a ``model_backend``)."""
    return getattr(registry.ops.get(step.op), "model_backend", None) is not None


def _helper_owner(ref: Any, step_ids: Mapping[str, StepDecl]) -> str | None:
    """The step whose helper node ``ref`` would be (``sft`` for ``sft.tokens``), or None: a step id, a dot,
    and a suffix. The longest step id wins (ids may hold dots themselves)."""
    if not isinstance(ref, str):
        return None
    head = ref
    while "." in head:
        head = head.rsplit(".", 1)[0]
        if head in step_ids:
            return head
    return None


def _helpers(op: Any, ctx: CheckContext, step_id: str, sink: ErrorSink, pos_of: Any) -> tuple[Any, ...]:
    """The op's helper nodes (see specdsl.contract.ops.HelperNode); a plugin's failing ``expand`` is an error
    at the step, not a crash of the compiler."""
    expand = getattr(op, "expand", None)
    if not callable(expand):
        return ()
    try:
        return tuple(expand(ctx))
    except Exception as exc:  # noqa: BLE001 - a plugin op's expansion must not crash the compiler
        sink.add("S401", f"op '{op.name}' failed to expand step '{step_id}': {exc!r}", pos_of(), (step_id,),
                 hint=f"a bug in the plugin that provides '{op.name}' ({type(op).__module__}); report it there")
        return ()


def _check_options(spec: Spec, name: str, decl: ModelDecl, backend: Any, options: Mapping[str, Any],
                   sink: ErrorSink) -> bool:
    """Run the backend's optional ``check_options``; each problem is an S210 at its option. True if any."""
    check = getattr(backend, "check_options", None)
    if check is None:
        return False  # a backend written before the method existed: its identity() still checks at plan
    try:
        problems = list(check(options) or ())
        found = [(_option_path(p.path), str(p.message), p.hint) for p in problems]
    except Exception as exc:  # noqa: BLE001 - a plugin's check must not crash the compiler
        sink.add("S210", f"backend '{decl.backend}' failed to check model '{name}': {exc!r}", spec.pos(decl.path),
                 decl.path, hint=f"a bug in the plugin that provides it ({type(backend).__module__}); report it there")
        return True
    for path, message, hint in found:
        where = decl.path + path
        sink.add("S210", f"model '{name}': {message}", spec.pos(where), where,
                 hint=str(hint) if hint else None)
    return bool(found)


def _option_path(path: Any) -> tuple[str | int, ...]:
    if isinstance(path, (str, int)):
        return (path,)  # one key, not a sequence of one-letter keys
    return tuple(p if isinstance(p, (str, int)) else str(p) for p in (path or ()))


# Codes that only say "this column is not there": meaningless when the input's columns are unknown.
_COLUMN_CODES = frozenset({"S302", "S402", "S403"})


def _id_pos(spec: Spec, step: StepDecl) -> SourcePos:
    """Where a step's id is written (for a recipe's step: its `use:` step)."""
    if step.exact_positions and len(step.path) >= 2:
        return spec.pos(tuple(step.path[:2]) + ("id",))
    return spec.step_pos(step, key=True)


def _unknown_input(ref: str, steps: list[str], sources: list[str]) -> tuple[str, str, str | None]:
    """The error for an input that names nothing: S202 when it looks like a source, S203 otherwise."""
    import difflib

    close_source = difflib.get_close_matches(ref, sources, n=1, cutoff=0.6)
    close_step = difflib.get_close_matches(ref, steps, n=1, cutoff=0.6)
    if close_source and (not close_step or difflib.SequenceMatcher(None, ref, close_source[0]).ratio()
                         >= difflib.SequenceMatcher(None, ref, close_step[0]).ratio()):
        return "S202", f"unknown source '{ref}'", f"did you mean '{close_source[0]}'? (sources: {', '.join(sources)})"
    if close_step:
        return "S203", f"unknown step '{ref}'", f"did you mean '{close_step[0]}'?"
    return "S203", f"'{ref}' is neither a step nor a source", did_you_mean(ref, steps + sources)


# What a template error is about, as it appears in the template: the caret goes under it.
_TEMPLATE_TOKENS = {
    "S302": (re.compile(r"'row\.([^']+)'"), r"\brow(?:\.|\[['\"]|\.get\(['\"]){}\b"),
    "S303": (re.compile(r"variable '([^']+)'"), r"(?<![\w.]){}\b"),
    "S204": (re.compile(r"'vars\.([^']+)'"), r"\bvars(?:\.|\[['\"]){}\b"),
    "S304": (re.compile(r"uses '([^']+)'"), r"{}"),
}


def _pinpoint(err: SpecError, lines: list[str]) -> SpecError:
    """Move a template error's column from the start of the template to the name it is about.

    Templates are checked as parsed text, so the checker knows *what* is wrong but only where the
    template starts; the name is found in the source from there (on the same line, or further down a
    block scalar). When it cannot be found unambiguously the position stays at the template's start.
    """
    rule = _TEMPLATE_TOKENS.get(err.code)
    if rule is None or err.pos is None or not (0 < err.pos.line <= len(lines)):
        return err
    m = rule[0].search(err.message)
    if m is None:
        return err
    token = re.compile(rule[1].format(re.escape(m.group(1))))
    first = lines[err.pos.line - 1]
    indent = len(first) - len(first.lstrip())
    for i in range(err.pos.line - 1, min(len(lines), err.pos.line + 200)):
        text = lines[i]
        if i > err.pos.line - 1 and text.strip() and len(text) - len(text.lstrip()) <= indent:
            break  # past the end of a block scalar
        start = err.pos.col - 1 if i == err.pos.line - 1 else 0
        found = token.search(text, start)
        if found:
            return replace(err, pos=SourcePos(err.pos.file, i + 1, found.start() + 1))
    return err


def _reads_dynamically(value: Any) -> bool:
    """True when a template among ``value`` reads row columns it does not name (row[expr], bare row)."""
    if isinstance(value, str):
        if not templates.is_template(value):
            return False
        try:
            return templates.analyze(value).dynamic_row_access
        except templates.TemplateError:
            return True
    if isinstance(value, dict):
        return any(_reads_dynamically(v) for v in value.values())
    if isinstance(value, list):
        return any(_reads_dynamically(v) for v in value)
    return False


def _spec_hash(spec: Spec) -> str:
    return hashlib.sha256("\n".join(spec.doc.lines).encode("utf-8")).hexdigest()


def _sorted(errors: list[SpecError]) -> list[SpecError]:
    return sorted(errors, key=lambda e: (e.pos.line if e.pos else 0, e.pos.col if e.pos else 0))


def _find_cycle(deps: Mapping[str, list[tuple[str, str]]]) -> list[str] | None:
    """A cycle among the steps (as a list of ids), or None. Iterative: a spec may chain thousands of steps."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in deps:
        if root in state:
            continue
        path: list[str] = [root]
        state[root] = 1
        stack = [iter([m for _, m in deps.get(root, [])])]
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                stack.pop()
                state[path.pop()] = 2
                continue
            if nxt not in deps:
                continue  # a source
            if state.get(nxt) == 1:
                return path[path.index(nxt):]
            if nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter([m for _, m in deps.get(nxt, [])]))
    return None


def _topo(ids: list[str], deps: Mapping[str, list[tuple[str, str]]]) -> list[str]:
    """Steps in dependency order (declaration order where free); ``deps`` must be acyclic."""
    return topo_order(ids, lambda step: [m for _, m in deps.get(step, []) if m in deps])

