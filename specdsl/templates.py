"""Sandboxed Jinja2 templates, checked statically at compile time.

Templates see ``row`` (the current row), ``vars`` (the spec's vars, also available by bare name) and
nothing else. At compile time each template is parsed once; the columns it reads through ``row.X`` /
``row['X']`` and the names it uses are found from the AST and checked against the columns that exist
at that point of the DAG. Attribute access to dunder/private names is rejected before anything runs;
the sandbox stops whatever dynamic access gets past the static check.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from itertools import repeat
from typing import Any, Iterable, Mapping, Sequence

from jinja2 import StrictUndefined, TemplateSyntaxError, nodes
from jinja2.sandbox import SandboxedEnvironment

ROW = "row"
VARS = "vars"


@dataclass(frozen=True)
class TemplateInfo:
    columns: frozenset[str]          # row columns read statically (row.X, row['X'], row.get('X'))
    names: frozenset[str]            # free top-level names (row, vars, var names, unknowns)
    var_names: frozenset[str]        # vars read via vars.X / vars['X'] (bare-name reads are in ``names``)
    dynamic_row_access: bool         # row[expr], row.items(), bare `row`: the columns read are not known
    unsafe: tuple[str, ...]          # private/dunder attribute names and constructs the sandbox forbids


class TemplateError(Exception):
    def __init__(self, message: str, lineno: int | None = None, code: str = "S301", hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.lineno = lineno
        self.code = code
        self.hint = hint


# A power whose result would need more bits than this is refused: `{{ 9 ** (9 ** 9) }}` would otherwise
# compute for hours (a Python int has no size limit), and no template needs numbers this large.
MAX_POWER_BITS = 16384


def bounded_power(left: Any, right: Any) -> Any:
    """``left ** right``, refused (ValueError) when an integer result would exceed MAX_POWER_BITS."""
    if isinstance(left, int) and isinstance(right, int) and not isinstance(left, bool) and right > 0 \
            and abs(left) > 1 and (abs(left).bit_length() - 1) * right > MAX_POWER_BITS:
        raise ValueError(f"the power {left} ** {right} is too large to compute (over {MAX_POWER_BITS} bits)")
    return left ** right


def regex_problem(pattern: str) -> str | None:
    """Why ``pattern`` may not be used as a regular expression, or None: it does not compile (the message
    says where), or it nests an unbounded quantifier inside a repeated group (``(a+)+``, ``(a*)*``,
    ``(\\w+\\s?)*``), which backtracks exponentially on a near-miss: one answer could stall a run for
    hours. Possessive quantifiers and atomic groups (``(?>...)``) never backtrack and are allowed."""
    return _regex_problem(str(pattern))


@lru_cache(maxsize=1024)
def _regex_problem(pattern: str) -> str | None:
    import re

    try:
        re.compile(pattern)
    except re.error as exc:
        return f"invalid regular expression: {exc.msg}" + (
            f" at position {exc.pos}" if exc.pos is not None else "") + f" of {pattern!r}"
    except (OverflowError, RecursionError, ValueError) as exc:
        return f"invalid regular expression: {exc} ({pattern!r})"
    try:
        from re import _parser as sre_parse  # Python 3.11+
    except ImportError:  # pragma: no cover - Python 3.10
        import sre_parse  # type: ignore[no-redef]
    try:
        nested = _nested_repeat(sre_parse.parse(pattern), False)
    except RecursionError:
        nested = True
    if nested:
        return (f"the regular expression {pattern!r} repeats a group that holds an unbounded quantifier "
                "(like `(a+)+`); it can take exponential time on text that almost matches")
    return None


def _nested_repeat(items: Any, in_repeat: bool) -> bool:
    """An unbounded repeat inside a repeat of more than one, somewhere in a parsed pattern."""
    for op, av in items:
        name = str(op)
        if name in ("POSSESSIVE_REPEAT", "ATOMIC_GROUP"):
            continue
        if name in ("MAX_REPEAT", "MIN_REPEAT"):
            _lo, hi, sub = av
            if in_repeat and hi == _max_repeat():
                return True
            if _nested_repeat(sub, in_repeat or hi > 1):
                return True
            continue
        for child in (av if isinstance(av, (tuple, list)) else ()):
            subs = child if isinstance(child, list) else [child]
            for sub in subs:
                if hasattr(sub, "data") and _nested_repeat(sub, in_repeat):  # a parsed sub-pattern
                    return True
    return False


def _max_repeat() -> int:
    try:
        from re import _constants as sre_constants
    except ImportError:  # pragma: no cover - Python 3.10
        import sre_constants  # type: ignore[no-redef]
    return sre_constants.MAXREPEAT


def checked_regex(pattern: str) -> str:
    """``pattern``, or ValueError saying why it may not be used (see :func:`regex_problem`)."""
    problem = regex_problem(pattern)
    if problem:
        raise ValueError(problem)
    return pattern


def _regex_search(value: Any, pattern: str, group: int = 0, default: str = "") -> str:
    """``{{ row.qa | regex_search('Answer:\\s*(.*)', 1) }}``: the match (or a group), else ``default``."""
    import re

    m = re.search(checked_regex(pattern), "" if value is None else str(value), re.DOTALL)
    return m.group(group).strip() if m else default


def _regex_replace(value: Any, pattern: str, replacement: str = "") -> str:
    import re

    return re.sub(checked_regex(pattern), replacement, "" if value is None else str(value))


class _BoundedSandbox(SandboxedEnvironment):
    """The sandbox with ``**`` bounded (see :data:`MAX_POWER_BITS`). An intercepted operator is also never
    folded at compile time, so a constant power cannot hang the compilation either."""

    intercepted_binops = frozenset(["**"])

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**":
            return bounded_power(left, right)
        return super().call_binop(context, operator, left, right)


@lru_cache(maxsize=1)
def environment() -> SandboxedEnvironment:
    env = _BoundedSandbox(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)
    # Answers come back as free text; these filters pull fields out of it without leaving the sandbox.
    env.filters["regex_search"] = _regex_search
    env.filters["regex_replace"] = _regex_replace
    return env


_GLOBALS = frozenset({"range", "dict", "lipsum", "cycler", "joiner", "namespace", "loop", "true", "false",
                      "none", "True", "False", "None"})


# dict methods a template may call on `row`; `row.get('X')` reads column X, the others read every column.
_ROW_METHODS = frozenset({"get", "items", "keys", "values"})


@lru_cache(maxsize=4096)
def analyze(source: str) -> TemplateInfo:
    """Parse a template and report what it reads. Raises :class:`TemplateError` on syntax errors."""
    try:
        return _analyze(source)
    except RecursionError:  # Jinja's parser and node walks recurse: `((((...))))` thousands deep
        raise TemplateError("template nests too deeply to check", 1,
                            hint="remove the extra parentheses or brackets; split the expression in steps") from None


def _analyze(source: str) -> TemplateInfo:
    env = environment()
    try:
        ast = env.parse(source)
    except TemplateSyntaxError as exc:
        raise TemplateError(exc.message or "template syntax error", exc.lineno,
                            hint="close each `{{` with `}}` and each `{% if %}` or `{% for %}` with its "
                                 "`{% endif %}` or `{% endfor %}`; write a literal `{{` as {{ '{{' }}") from None
    columns: set[str] = set()
    var_names: set[str] = set()
    unsafe: list[str] = []
    dynamic = False
    accounted: set[int] = set()  # ids of `row` Name nodes whose access is understood

    for node in ast.find_all((nodes.Include, nodes.Import, nodes.FromImport, nodes.Extends)):
        unsafe.append(f"{{% {type(node).__name__.lower()} %}}")
    for call in ast.find_all(nodes.Call):
        fn = call.node
        if isinstance(fn, nodes.Getattr) and _is_name(fn.node, ROW) and fn.attr in _ROW_METHODS:
            accounted.add(id(fn.node))
            arg = call.args[0] if call.args else None
            if fn.attr == "get" and isinstance(arg, nodes.Const) and isinstance(arg.value, str):
                columns.add(arg.value)
            else:
                dynamic = True
    for flt in ast.find_all((nodes.Filter, nodes.Test)):
        known = env.filters if isinstance(flt, nodes.Filter) else env.tests
        if flt.name not in known:  # Jinja itself only notices when the template is compiled
            kind = "filter" if isinstance(flt, nodes.Filter) else "test"
            close = _close(flt.name, known)
            raise TemplateError(f"unknown {kind} '{flt.name}'" + (f" ({close})" if close else ""), flt.lineno,
                                hint=f"templates may use Jinja's built-in {kind}s and specdsl's (docs/spec.md, "
                                     "Templates)")
        if flt.name == "attr" and flt.args and isinstance(flt.args[0], nodes.Const) \
                and str(flt.args[0].value).startswith("_"):
            unsafe.append(str(flt.args[0].value))
        if flt.name in _REGEX_FILTERS and flt.args and isinstance(flt.args[0], nodes.Const):
            problem = regex_problem(str(flt.args[0].value))  # a constant pattern is checked here, not per row
            if problem:
                code = "S301" if problem.startswith("invalid") else "S304"
                raise TemplateError(f"{flt.name}: {problem}", flt.lineno, code=code,
                                    hint="fix the pattern; avoid repeating a group that holds `+` or `*`")
    for power in ast.find_all(nodes.Pow):
        try:
            bounded_power(_constant(power.left), _constant(power.right))
        except _NotConstant:
            pass
        except ValueError as exc:
            raise TemplateError(str(exc), power.lineno, code="S304",
                                hint="use smaller numbers; a power is bounded so a template cannot hang") from None
        except Exception:  # noqa: BLE001 - e.g. a type error: the render reports it with the row
            pass
    for node in ast.find_all((nodes.Getattr, nodes.Getitem)):
        base = node.node
        key: Any
        if isinstance(node, nodes.Getattr):
            key = node.attr
            if key.startswith("_"):
                unsafe.append(key)  # the sandbox refuses every attribute that starts with _
        else:
            key = node.arg.value if isinstance(node.arg, nodes.Const) else None
            if isinstance(key, str) and key.startswith("__") and not _is_name(base, ROW):
                unsafe.append(key)
        if _is_name(base, ROW) and id(base) not in accounted:
            accounted.add(id(base))
            if isinstance(node, nodes.Getattr) and node.attr.startswith("_"):
                continue  # reported as unsafe, not as a missing column
            if isinstance(key, str):
                columns.add(key)
            else:
                dynamic = True
        if _is_name(base, VARS) and isinstance(key, str):
            var_names.add(key)
    # `row` used whole ({{ row }}, {{ row | tojson }}, {% for k in row %}) reads every column.
    if any(id(n) not in accounted for n in ast.find_all(nodes.Name) if n.name == ROW and n.ctx == "load"):
        dynamic = True
    names = _free_names(ast)
    return TemplateInfo(frozenset(columns), frozenset(names), frozenset(var_names), dynamic,
                        tuple(dict.fromkeys(unsafe)))


_REGEX_FILTERS = frozenset({"regex_search", "regex_replace"})


class _NotConstant(Exception):
    pass


def _constant(node: Any) -> Any:
    """The value of a constant expression of numbers and powers (``9 ** (9 ** 9)``), computed with the bound."""
    if isinstance(node, nodes.Const) and isinstance(node.value, (int, float)):
        return node.value
    if isinstance(node, nodes.Neg):
        return -_constant(node.node)
    if isinstance(node, nodes.Pow):
        return bounded_power(_constant(node.left), _constant(node.right))
    raise _NotConstant


def _is_name(node: Any, name: str) -> bool:
    return isinstance(node, nodes.Name) and node.name == name


def _free_names(ast: nodes.Template) -> set[str]:
    """Names read but never assigned in the template (loop variables and {% set %} are local)."""
    assigned = {n.name for n in ast.find_all(nodes.Name) if n.ctx in ("store", "param")}
    macros = list(ast.find_all(nodes.Macro))
    assigned |= {m.name for m in macros}  # {% macro m() %} defines m for the rest of the template
    if macros:
        assigned |= {"caller", "varargs", "kwargs"}  # what Jinja gives a macro's body
    loaded = {n.name for n in ast.find_all(nodes.Name) if n.ctx == "load"}
    return loaded - assigned


def check(source: str, *, columns: Iterable[str] | None, var_names: Iterable[str]) -> list[TemplateError]:
    """Static check of a template against the columns and vars available at its step.

    ``columns=None`` skips the column check (the input's columns are unknown, e.g. after an earlier error).
    """
    try:
        info = analyze(source)
    except TemplateError as exc:
        return [exc]
    errors: list[TemplateError] = []
    if info.unsafe:
        shown = ", ".join(f"'{u}'" for u in info.unsafe)
        errors.append(TemplateError(f"template uses {shown}, which the sandbox forbids", code="S304",
                                    hint="templates may read row columns and vars, not private attributes "
                                         "or other templates"))
    known_vars = set(var_names)
    for name in sorted(info.names - {ROW, VARS} - _GLOBALS):
        if name in known_vars:
            continue
        close = _close(name, known_vars | {ROW, VARS})
        errors.append(TemplateError(f"template uses unknown variable '{name}'" + (f" ({close})" if close else ""),
                                    code="S303", hint="templates see `row`, `vars` and the names under `vars:`"))
    for name in sorted(info.var_names - known_vars):
        close = _close(name, known_vars)
        errors.append(TemplateError(
            f"template uses unknown var 'vars.{name}'", code="S204",
            hint=close or (f"vars defined: {', '.join(sorted(known_vars))}" if known_vars
                           else "define it under `vars:`")))
    if columns is not None:
        available = set(columns)
        for col in sorted(info.columns - available):
            errors.append(TemplateError(f"template reads column 'row.{col}', which does not exist at this step",
                                        code="S302"))
    return errors


def _close(word: str, choices: Iterable[str]) -> str | None:
    import difflib

    match = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return f"did you mean '{match[0]}'?" if match else None


@lru_cache(maxsize=1024)
def _compiled(source: str):
    return environment().from_string(source)


def render(source: str, row: Mapping[str, Any], variables: Mapping[str, Any]) -> str:
    """Render a template for one row. Errors propagate; callers add the row id to the message."""
    fast = _fast_parts(source)
    if fast is not None and type(row) is dict and type(variables) is dict:
        try:
            return "".join([part if isinstance(part, str) else _text(part(row, variables)) for part in fast])
        except Exception:  # noqa: BLE001 - Jinja renders the row instead, and raises its own error if any
            pass
    return _render_jinja(source, row, variables)


def render_many(source: str, rows: Sequence[Mapping[str, Any]], variables: Mapping[str, Any]) -> list[str]:
    """Render a template for each of ``rows``; the same strings as :func:`render` row by row.

    A template the fast path covers (see :func:`_fast_parts`) is rendered a column at a time: one list
    comprehension per template expression and one ``"".join`` per row, no Jinja context per row. A row
    on which the fast path cannot produce Jinja's result (a missing column or key: Jinja's error, or
    its fallbacks) is rendered by Jinja; so is every row of any other template. Errors propagate as
    :func:`render`'s do.
    """
    fast = _fast_parts(source)
    if fast is None or type(variables) is not dict or not all(type(row) is dict for row in rows):
        return [_render_jinja(source, row, variables) for row in rows]
    try:
        columns = [repeat(part) if isinstance(part, str) else [_text(part(row, variables)) for row in rows]
                   for part in fast]
    except Exception:  # noqa: BLE001 - some row needs Jinja: render row by row, the fast way where it can
        return [render(source, row, variables) for row in rows]
    if not columns:  # the empty template
        return [""] * len(rows)
    if len(columns) == 1:
        return list(columns[0]) if not isinstance(columns[0], repeat) else [fast[0]] * len(rows)
    return ["".join(parts) for parts in zip(*columns)] if rows else []


def _render_jinja(source: str, row: Mapping[str, Any], variables: Mapping[str, Any]) -> str:
    context = dict(variables)
    context[VARS] = variables
    context[ROW] = row
    return _compiled(source).render(context)


def _text(value: Any) -> str:
    # What Jinja's generated code does with an expression's value when autoescape is off: str() it.
    return value if type(value) is str else str(value)


# -- the fast path ------------------------------------------------------------------------------------
#
# Templates that are only literal text and `{{ }}` expressions built from constants, columns
# (row.X, row['X'], row.get('X'[, default])), vars (vars.X, vars['X'], a bare var name), subscripts of
# those (`{{ strategies[row.category] }}`) and `~` concatenation are rendered without Jinja: each such
# expression becomes a closure (row, variables) -> value that does what the sandbox does on success,
# and raises where Jinja would do anything else (undefined, a getattr fallback, an error), so that the
# caller hands that row to Jinja. `row.X` and `vars.X` are Jinja getattr lookups, which find dict
# methods first: names that are attributes of dict (row.items, row.copy, ...) are left to Jinja.

_DICT_ATTRIBUTES = frozenset(dir(dict))


class _NotFast(Exception):
    """A template construct the fast path does not cover."""


@lru_cache(maxsize=1024)
def _fast_parts(source: str) -> tuple | None:
    """The template as literal strings and expression closures, or None if Jinja must render it."""
    env = environment()
    if env.autoescape is not False or env.finalize is not None:
        return None  # str() of each value would no longer be what Jinja outputs
    try:
        ast = env.parse(source)
    except Exception:  # noqa: BLE001 - render() reports syntax errors through Jinja
        return None
    parts: list[Any] = []
    try:
        for stmt in ast.body:
            if not isinstance(stmt, nodes.Output):
                raise _NotFast(type(stmt).__name__)
            for child in stmt.nodes:
                if isinstance(child, nodes.TemplateData):
                    parts.append(child.data)
                else:
                    parts.append(_expression(child))
    except _NotFast:
        return None
    return tuple(parts)


def _expression(node: Any):
    if isinstance(node, nodes.Const):
        value = node.value
        return lambda row, variables: value
    if isinstance(node, nodes.Name) and node.ctx == "load" and node.name not in (ROW, VARS):
        name = node.name
        return lambda row, variables: variables[name]  # KeyError: undefined (or a Jinja global): Jinja
    if isinstance(node, nodes.Getattr) and isinstance(node.node, nodes.Name) and node.node.name in (ROW, VARS):
        attr = node.attr
        if attr.startswith("_") or attr in _DICT_ATTRIBUTES:
            raise _NotFast(attr)
        if node.node.name == ROW:
            return lambda row, variables: row[attr]
        return lambda row, variables: variables[attr]
    if isinstance(node, nodes.Getitem):
        if isinstance(node.node, nodes.Name) and node.node.name in (ROW, VARS):
            if not isinstance(node.arg, nodes.Const) or not isinstance(node.arg.value, str):
                raise _NotFast("row[expr]")
            key = node.arg.value
            if node.node.name == ROW:
                return lambda row, variables: row[key]
            return lambda row, variables: variables[key]
        if isinstance(node.arg, nodes.Slice):
            raise _NotFast("slice")
        base, index = _expression(node.node), _expression(node.arg)
        return lambda row, variables: base(row, variables)[index(row, variables)]
    if isinstance(node, nodes.Concat):
        items = [_expression(child) for child in node.nodes]
        return lambda row, variables: "".join([_text(item(row, variables)) for item in items])
    if (isinstance(node, nodes.Call) and isinstance(node.node, nodes.Getattr) and _is_name(node.node.node, ROW)
            and node.node.attr == "get" and not node.kwargs and node.dyn_args is None and node.dyn_kwargs is None
            and 1 <= len(node.args) <= 2 and all(isinstance(arg, nodes.Const) for arg in node.args)):
        args = tuple(arg.value for arg in node.args)
        return lambda row, variables: row.get(*args)
    raise _NotFast(type(node).__name__)


def is_template(text: str) -> bool:
    return "{{" in text or "{%" in text
