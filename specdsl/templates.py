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
from typing import Any, Iterable, Mapping

from jinja2 import StrictUndefined, TemplateSyntaxError, nodes
from jinja2.sandbox import SandboxedEnvironment

ROW = "row"
VARS = "vars"


@dataclass(frozen=True)
class TemplateInfo:
    columns: frozenset[str]          # row columns read statically
    names: frozenset[str]            # free top-level names (row, vars, var names, unknowns)
    var_names: frozenset[str]        # vars read via vars.X or by bare name
    dynamic_row_access: bool         # row[expr] with a non-constant key: columns cannot be checked
    unsafe: tuple[str, ...]          # attribute names the sandbox forbids


class TemplateError(Exception):
    def __init__(self, message: str, lineno: int | None = None, code: str = "S301"):
        super().__init__(message)
        self.message = message
        self.lineno = lineno
        self.code = code


def _regex_search(value: Any, pattern: str, group: int = 0, default: str = "") -> str:
    """``{{ row.qa | regex_search('Answer:\\s*(.*)', 1) }}``: the match (or a group), else ``default``."""
    import re

    m = re.search(pattern, "" if value is None else str(value), re.DOTALL)
    return m.group(group).strip() if m else default


def _regex_replace(value: Any, pattern: str, replacement: str = "") -> str:
    import re

    return re.sub(pattern, replacement, "" if value is None else str(value))


@lru_cache(maxsize=1)
def environment() -> SandboxedEnvironment:
    env = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)
    # Answers come back as free text; these filters pull fields out of it without leaving the sandbox.
    env.filters["regex_search"] = _regex_search
    env.filters["regex_replace"] = _regex_replace
    return env


_GLOBALS = frozenset({"range", "dict", "lipsum", "cycler", "joiner", "namespace", "loop", "true", "false",
                      "none", "True", "False", "None"})


@lru_cache(maxsize=4096)
def analyze(source: str) -> TemplateInfo:
    """Parse a template and report what it reads. Raises :class:`TemplateError` on syntax errors."""
    env = environment()
    try:
        ast = env.parse(source)
    except TemplateSyntaxError as exc:
        raise TemplateError(exc.message or "template syntax error", exc.lineno) from None
    columns: set[str] = set()
    var_names: set[str] = set()
    unsafe: list[str] = []
    dynamic = False
    for node in ast.find_all((nodes.Getattr, nodes.Getitem)):
        base = node.node
        key: Any
        if isinstance(node, nodes.Getattr):
            key = node.attr
        else:
            key = node.arg.value if isinstance(node.arg, nodes.Const) else None
        if isinstance(key, str) and key.startswith("_"):
            unsafe.append(key)
        if isinstance(base, nodes.Name) and base.name == ROW:
            if isinstance(key, str):
                columns.add(key)
            else:
                dynamic = True
        if isinstance(base, nodes.Name) and base.name == VARS and isinstance(key, str):
            var_names.add(key)
    names = _free_names(ast)
    return TemplateInfo(frozenset(columns), frozenset(names), frozenset(var_names), dynamic, tuple(unsafe))


def _free_names(ast: nodes.Template) -> set[str]:
    """Names read but never assigned in the template (loop variables and {% set %} are local)."""
    assigned = {n.name for n in ast.find_all(nodes.Name) if n.ctx in ("store", "param")}
    loaded = {n.name for n in ast.find_all(nodes.Name) if n.ctx == "load"}
    return loaded - assigned


def check(source: str, *, columns: Iterable[str] | None, var_names: Iterable[str]) -> list[TemplateError]:
    """Static check of a template against the columns and vars available at its step."""
    try:
        info = analyze(source)
    except TemplateError as exc:
        return [exc]
    errors: list[TemplateError] = []
    for attr in info.unsafe:
        errors.append(TemplateError(f"template reads '{attr}', which the sandbox forbids", code="S304"))
    known_vars = set(var_names)
    for name in sorted(info.names - {ROW, VARS} - _GLOBALS):
        if name in known_vars:
            continue
        errors.append(TemplateError(f"template uses unknown variable '{name}'", code="S303"))
    for name in sorted(info.var_names - known_vars):
        errors.append(TemplateError(f"template uses unknown var 'vars.{name}'", code="S303"))
    if columns is not None:
        available = set(columns)
        for col in sorted(info.columns - available):
            errors.append(TemplateError(f"template reads column 'row.{col}', which does not exist at this step",
                                        code="S302"))
    return errors


@lru_cache(maxsize=1024)
def _compiled(source: str):
    return environment().from_string(source)


def render(source: str, row: Mapping[str, Any], variables: Mapping[str, Any]) -> str:
    """Render a template for one row. Errors propagate; callers add the row id to the message."""
    context = dict(variables)
    context[VARS] = variables
    context[ROW] = row
    return _compiled(source).render(context)


def is_template(text: str) -> bool:
    return "{{" in text or "{%" in text
