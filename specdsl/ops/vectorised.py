"""Row templates over a whole Arrow batch at once: the row-parallel ops' fast path (``run_arrow``).

A template that is only literal text and column or var references (``{{ row.question }}``,
``Q: {{ row.q ~ "?" }}``, ``{{ vars.system }}``) renders a batch as one Arrow string operation instead of
a Python call per row; a ``where:`` condition built from integer columns, constants, ``%``/``//``, the
comparisons and ``not``/``and``/``or`` (``{{ row.n % 3 != 0 }}``) is evaluated as one array. Each function
here returns None for anything it does not reproduce exactly, and the op then runs the batch row by row
(specdsl.templates); tests/test_vectorised.py holds the two paths to the same tables.

What "exactly" covers: Jinja prints a value with ``str()``, so a string column is itself, an integer
column its decimal digits, a boolean ``True``/``False`` and a null ``None`` (a stored row has every
column, a missing value is null); a float column (Python's and Arrow's float formatting differ), a
JSON-text column, a dict attribute name (``row.items``) or a missing column is left to Jinja. Integer
arithmetic runs in int64 only where it cannot overflow; a null in a condition's column, or a condition
that renders text, is left to Jinja.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Mapping, Sequence

from specdsl import templates
from specdsl.execute.columns import numpy_of, string_array, string_scalar

_DICT_ATTRIBUTES = frozenset(dir(dict))
_INT_SAFE = 1 << 62  # operands below this in magnitude cannot overflow int64 through + or -


class _NotVectorised(Exception):
    pass


@lru_cache(maxsize=256)
def _body(source: str) -> tuple | None:
    """The template's output parts (literal text or a Jinja expression node), or None for other statements."""
    from jinja2 import nodes

    env = templates.environment()
    if env.autoescape is not False or env.finalize is not None:
        return None
    try:
        ast = env.parse(source)
    except Exception:  # noqa: BLE001 - rendered by Jinja, which reports the error
        return None
    parts: list[Any] = []
    for stmt in ast.body:
        if not isinstance(stmt, nodes.Output):
            return None
        for child in stmt.nodes:
            parts.append(child.data if isinstance(child, nodes.TemplateData) else child)
    return tuple(parts)


def render_column(source: str, table: Any, json_columns: Sequence[str], variables: Mapping[str, Any]) -> Any:
    """``source`` rendered for every row of ``table`` as an Arrow string array (what
    :func:`specdsl.templates.render_many` gives for the table's rows), or None when not vectorised."""
    import pyarrow as pa
    import pyarrow.compute as pc

    parts = _body(source)
    if not parts or type(variables) is not dict:
        return None
    pieces: list[Any] = []
    try:
        for part in parts:
            if isinstance(part, str):
                pieces.append(part)
            else:
                pieces.extend(_text_pieces(part, table, set(json_columns), variables))
    except _NotVectorised:
        return None
    n = table.num_rows
    merged: list[Any] = []  # neighbouring literals joined: fewer array passes
    for piece in pieces:
        if isinstance(piece, str) and merged and isinstance(merged[-1], str):
            merged[-1] += piece
        else:
            merged.append(piece)
    if len(merged) == 1:
        only = merged[0]
        return string_array([only] * n) if isinstance(only, str) else only
    args = [string_scalar(p) if isinstance(p, str) else p for p in merged]
    return pc.binary_join_element_wise(*args, string_scalar(""))


def _text_pieces(node: Any, table: Any, json_columns: set[str], variables: Mapping[str, Any]) -> list[Any]:
    """An expression's str() per row: literal strings and string arrays, concatenated in order."""
    from jinja2 import nodes

    if isinstance(node, nodes.Concat):
        return [p for child in node.nodes for p in _text_pieces(child, table, json_columns, variables)]
    if isinstance(node, nodes.Const):
        return [templates._text(node.value)]
    column = _row_column(node)
    if column is not None:
        name, default = column
        if name not in table.column_names:
            if default is _REQUIRED:
                raise _NotVectorised(name)  # Jinja: undefined, an error for that row
            return [templates._text(default)]
        if name in json_columns:
            raise _NotVectorised(name)
        return [_as_text(table.column(name))]
    return [templates._text(_var_value(node, variables))]


_REQUIRED = object()


def _row_column(node: Any) -> tuple[str, Any] | None:
    """(column, default) for ``row.X``, ``row['X']`` and ``row.get('X'[, d])``; None for anything else."""
    from jinja2 import nodes

    if isinstance(node, nodes.Getattr) and templates._is_name(node.node, templates.ROW):
        if node.attr.startswith("_") or node.attr in _DICT_ATTRIBUTES:
            raise _NotVectorised(node.attr)
        return node.attr, _REQUIRED
    if isinstance(node, nodes.Getitem) and templates._is_name(node.node, templates.ROW):
        if not isinstance(node.arg, nodes.Const) or not isinstance(node.arg.value, str):
            raise _NotVectorised("row[expr]")
        return node.arg.value, _REQUIRED
    if (isinstance(node, nodes.Call) and isinstance(node.node, nodes.Getattr)
            and templates._is_name(node.node.node, templates.ROW) and node.node.attr == "get"
            and not node.kwargs and node.dyn_args is None and node.dyn_kwargs is None
            and 1 <= len(node.args) <= 2 and all(isinstance(a, nodes.Const) for a in node.args)
            and isinstance(node.args[0].value, str)):
        return node.args[0].value, node.args[1].value if len(node.args) == 2 else None
    return None


def _var_value(node: Any, variables: Mapping[str, Any]) -> Any:
    """The value of ``vars.X``, ``vars['X']`` or a bare var name (the same for every row)."""
    from jinja2 import nodes

    if isinstance(node, nodes.Name) and node.ctx == "load" and node.name not in (templates.ROW, templates.VARS):
        if node.name in variables:
            return variables[node.name]
    elif isinstance(node, nodes.Getattr) and templates._is_name(node.node, templates.VARS):
        if not node.attr.startswith("_") and node.attr not in _DICT_ATTRIBUTES and node.attr in variables:
            return variables[node.attr]
    elif isinstance(node, nodes.Getitem) and templates._is_name(node.node, templates.VARS):
        if isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str) and node.arg.value in variables:
            return variables[node.arg.value]
    raise _NotVectorised(type(node).__name__)


def _as_text(column: Any) -> Any:
    """str() of each value of a stored column (``None`` for a null), as a string array."""
    import pyarrow as pa
    import pyarrow.compute as pc

    t = column.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        text = column.cast(pa.string())
    elif pa.types.is_integer(t):
        text = pc.cast(column, pa.string())
    elif pa.types.is_boolean(t):
        text = pc.if_else(column, string_scalar("True"), string_scalar("False"))
    elif pa.types.is_null(t):
        return string_array(["None"] * len(column))
    else:
        raise _NotVectorised(str(t))
    return pc.fill_null(text, string_scalar("None")).combine_chunks() if column.null_count else _flat(text)


def _flat(array: Any) -> Any:
    return array.combine_chunks() if hasattr(array, "combine_chunks") else array


# -- conditions -----------------------------------------------------------------------------------------


def condition_mask(source: str, table: Any, json_columns: Sequence[str], variables: Mapping[str, Any]) -> Any:
    """Whether ``source`` renders truthy (specdsl.ops.filter.is_truthy) for each row of ``table``, as a numpy
    bool array; None when not vectorised."""
    import numpy as np

    parts = _body(source)
    if parts is None or type(variables) is not dict:
        return None
    expressions = [p for p in parts if not isinstance(p, str)]
    if len(expressions) != 1 or any(isinstance(p, str) and p.strip() for p in parts):
        return None  # text around the expression: rendered by Jinja
    try:
        kind, value = _evaluate(expressions[0], table, set(json_columns), variables)
    except _NotVectorised:
        return None
    n = table.num_rows
    if kind == "bool":      # str() is "True" / "False"
        mask = value
    elif kind == "int":     # str() is "0" (falsy) or other digits
        mask = value != 0
    else:                   # text: its truthiness is a string rule, left to Python
        return None
    return np.broadcast_to(np.asarray(mask, dtype=bool), (n,)).copy()


def _evaluate(node: Any, table: Any, json_columns: set[str], variables: Mapping[str, Any]) -> tuple[str, Any]:
    """(kind, value): kind "int" (numpy int64 or a Python int), "bool" (numpy bool or a Python bool) or
    "str" (a Python str constant, or an Arrow string array)."""
    import numpy as np
    from jinja2 import nodes

    if isinstance(node, nodes.Const):
        return _constant_kind(node.value)
    column = _row_column(node)
    if column is not None:
        name, default = column
        if name not in table.column_names or name in json_columns:
            raise _NotVectorised(name)
        return _column_kind(table.column(name))
    if isinstance(node, (nodes.Name, nodes.Getattr, nodes.Getitem)):
        return _constant_kind(_var_value(node, variables))
    if isinstance(node, (nodes.Neg, nodes.Pos)):
        value = _int(_evaluate(node.node, table, json_columns, variables))
        if _magnitude(value) >= _INT_SAFE:
            raise _NotVectorised("overflow")
        return "int", (-value if isinstance(node, nodes.Neg) else value)
    if isinstance(node, nodes.Not):
        kind, value = _evaluate(node.node, table, json_columns, variables)
        if kind == "bool":
            return "bool", np.logical_not(value)
        if kind == "int":
            return "bool", np.equal(value, 0)
        raise _NotVectorised("not text")
    if isinstance(node, (nodes.And, nodes.Or)):
        left = _evaluate(node.left, table, json_columns, variables)
        right = _evaluate(node.right, table, json_columns, variables)
        if left[0] != "bool" or right[0] != "bool":
            raise _NotVectorised("and/or of non-booleans")  # Python returns an operand, not a bool
        combine = np.logical_and if isinstance(node, nodes.And) else np.logical_or
        return "bool", combine(left[1], right[1])
    if isinstance(node, (nodes.Mod, nodes.FloorDiv, nodes.Add, nodes.Sub)):
        return "int", _arithmetic(node, _int(_evaluate(node.left, table, json_columns, variables)),
                                  _int(_evaluate(node.right, table, json_columns, variables)))
    if isinstance(node, nodes.Compare):
        return "bool", _compare(node, table, json_columns, variables)
    raise _NotVectorised(type(node).__name__)


def _constant_kind(value: Any) -> tuple[str, Any]:
    if type(value) is bool:
        return "bool", value
    if type(value) is int and -_INT_SAFE < value < _INT_SAFE:
        return "int", value
    if type(value) is str:
        return "str", value
    raise _NotVectorised(type(value).__name__)


def _column_kind(column: Any) -> tuple[str, Any]:
    import pyarrow as pa

    if column.null_count:
        raise _NotVectorised("nulls")  # None in arithmetic or a comparison: Jinja's error or Python's rule
    t = column.type
    if pa.types.is_integer(t) and not pa.types.is_uint64(t):
        return "int", numpy_of(column).astype("int64", copy=False)
    if pa.types.is_boolean(t):
        return "bool", numpy_of(column)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "str", column
    raise _NotVectorised(str(t))


def _int(operand: tuple[str, Any]) -> Any:
    kind, value = operand
    if kind != "int":
        raise _NotVectorised("arithmetic on non-integers")
    return value


def _magnitude(value: Any) -> int:
    import numpy as np

    if isinstance(value, int):
        return abs(value)
    if not len(value):
        return 0
    return max(abs(int(np.min(value))), abs(int(np.max(value))))


def _arithmetic(node: Any, left: Any, right: Any) -> Any:
    """Python's integer ``%``, ``//``, ``+``, ``-`` (numpy's integer % and // floor like Python's), on
    operands that cannot overflow int64; a divisor that is not a nonzero constant is left to Jinja."""
    import numpy as np
    from jinja2 import nodes

    if isinstance(node, (nodes.Mod, nodes.FloorDiv)):
        if not isinstance(right, int) or right == 0 or _magnitude(left) >= _INT_SAFE:
            raise _NotVectorised("divisor")
        return np.remainder(left, right) if isinstance(node, nodes.Mod) else np.floor_divide(left, right)
    if _magnitude(left) >= _INT_SAFE or _magnitude(right) >= _INT_SAFE:
        raise _NotVectorised("overflow")
    return np.add(left, right) if isinstance(node, nodes.Add) else np.subtract(left, right)


_COMPARE = {"eq": "equal", "ne": "not_equal", "lt": "less", "lteq": "less_equal", "gt": "greater",
            "gteq": "greater_equal"}


def _compare(node: Any, table: Any, json_columns: set[str], variables: Mapping[str, Any]) -> Any:
    """A comparison chain (``a < b <= c`` is ``a < b and b <= c``) of integers, or ``==``/``!=`` of
    texts."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    left = _evaluate(node.expr, table, json_columns, variables)
    result: Any = True
    for operand in node.ops:
        if operand.op not in _COMPARE:
            raise _NotVectorised(operand.op)
        right = _evaluate(operand.expr, table, json_columns, variables)
        if left[0] == "int" and right[0] == "int":
            step = getattr(np, _COMPARE[operand.op])(left[1], right[1])
        elif left[0] == "str" and right[0] == "str" and operand.op in ("eq", "ne"):
            a, b = (string_scalar(v) if isinstance(v, str) else v for v in (left[1], right[1]))
            step = getattr(pc, _COMPARE[operand.op])(a, b)
            step = numpy_of(step) if hasattr(step, "to_numpy") else step.as_py()
        else:
            raise _NotVectorised("comparison of mixed kinds")
        result = np.logical_and(result, step)
        left = right
    return result


# -- output batches ---------------------------------------------------------------------------------------


def with_columns(table: Any, json_columns: Sequence[str], new: Mapping[str, Any],
                 new_json: Sequence[str] = ()) -> tuple[Any, list[str]]:
    """``table`` with the ``new`` columns set (in place where the name exists, else appended, as
    ``dict(row); row[name] = ...`` orders them) and every other column as the store keeps it when an op
    returns rows (:func:`as_stored`); returns (table, JSON-text columns)."""
    table, json_columns = as_stored(table, json_columns, skip=set(new))
    json_columns = [c for c in json_columns if c not in new]
    for name, array in new.items():
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, array)
        else:
            table = table.append_column(name, array)
    json_columns += [c for c in new_json if c in new]
    return table, [c for c in table.column_names if c in set(json_columns)]


def as_stored(table: Any, json_columns: Sequence[str], skip: set[str] = frozenset()) -> tuple[Any, list[str]]:
    """``table`` as the store keeps the rows it holds (specdsl.execute.store.rows_to_table): a column of
    nulls only is Arrow's null type, a JSON-text column is JSON text only if its values still need it, and
    a column of another type is typed again from its values. The common columns (integers, floats, booleans,
    strings with a value) are kept as they are, without a Python object per value."""
    import json

    import pyarrow as pa

    from specdsl.execute.store import column_as_stored

    json_set = set(json_columns)
    out_json: list[str] = []
    for i, name in enumerate(table.column_names):
        if name in skip:
            continue
        column = table.column(i)
        if column.null_count == len(column):
            array = pa.nulls(len(column))
        elif name not in json_set and str(column.type) in _KEPT_TYPES:
            continue
        else:
            values = column.to_pylist()
            if name in json_set:
                values = [None if v is None else json.loads(v) for v in values]
            array, as_json = column_as_stored(values)
            if as_json:
                out_json.append(name)
        table = table.set_column(i, name, array)
    return table, out_json


# Arrow types that type inference gives back for the Python values they hold (with at least one non-null).
_KEPT_TYPES = frozenset({"int64", "double", "bool", "string"})


def json_string_array(texts: Any) -> Any | None:
    """Each string as ``json.dumps(s, ensure_ascii=False)`` writes it, without the quotes: backslash,
    quote and control characters escaped. None when the array has a null."""
    import pyarrow as pa
    import pyarrow.compute as pc

    texts = _flat(texts)
    if texts.null_count:
        return None
    if not pc.any(pc.match_substring_regex(texts, r'[\x00-\x1f"\\]')).as_py():
        return texts
    for char, escaped in _JSON_ESCAPES:
        texts = pc.replace_substring(texts, char, escaped)
    if pc.any(pc.match_substring_regex(texts, r"[\x00-\x1f]")).as_py():
        for code in range(0x20):
            char = chr(code)
            if pc.any(pc.match_substring(texts, char)).as_py():
                texts = pc.replace_substring(texts, char, f"\\u{code:04x}")
    return texts


_JSON_ESCAPES = (("\\", "\\\\"), ('"', '\\"'), ("\n", "\\n"), ("\r", "\\r"), ("\t", "\\t"), ("\b", "\\b"),
                 ("\f", "\\f"))
