"""The templates' fast path renders exactly what Jinja renders, for every shape it covers.

Templates are generated from the covered shapes (literal text, constants, columns by attribute, by
key and by ``row.get``, vars by attribute, by key and by bare name, a var subscripted by a column,
``~`` concatenation, whitespace control) over rows holding None, numbers, booleans, unicode, markup
characters (autoescape is off in the environment, and must stay off in the output) and sometimes a
missing column. Every result is compared with Jinja rendering the same row, errors included.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specdsl import templates

COLUMNS = ["q", "cat", "n", "with space"]
VALUES = st.one_of(st.none(), st.integers(-10**6, 10**6), st.floats(allow_nan=False), st.booleans(),
                   st.text(max_size=12), st.sampled_from(["<b>&amp;</b>", "Zürich 🙂", "日本語", "", "a\nb"]),
                   st.lists(st.integers(0, 9), max_size=3))
CATEGORIES = ["math", "code", "trivia"]
VARIABLES = {"greeting": "Hello <you> & 🙂", "count": 3, "ratio": 0.5, "nothing": None,
             "strategies": {"math": "step by step", "code": "explain, then write", 1: "one"}}
LITERAL = st.text(alphabet=st.characters(blacklist_characters="{}%#", blacklist_categories=("Cs",)), max_size=10)

SIMPLE_EXPRESSIONS = st.sampled_from([
    "row.q", "row.cat", "row.n", "row['q']", "row['with space']", "row.get('q')", "row.get('missing')",
    "row.get('missing', 'fallback')", "row.missing", "vars.greeting", "vars['count']", "greeting", "ratio",
    "nothing", "strategies[row.cat]", "vars.strategies[row.cat]", "'const'", "42", "1.50", "none", "true",
    "strategies[1]", "unknown_var",
])


@st.composite
def expressions(draw):
    parts = draw(st.lists(SIMPLE_EXPRESSIONS, min_size=1, max_size=3))
    return " ~ ".join(parts)


@st.composite
def template_sources(draw):
    pieces = []
    for _ in range(draw(st.integers(1, 4))):
        pieces.append(draw(LITERAL))
        left, right = draw(st.sampled_from([("{{ ", " }}"), ("{{- ", " }}"), ("{{ ", " -}}"), ("{{", "}}")]))
        pieces.append(left + draw(expressions()) + right)
    pieces.append(draw(st.sampled_from(["", "\n", " tail\n\n"])))
    return "".join(pieces)


@st.composite
def rows(draw):
    row = {"id": draw(st.integers(0, 100)), "cat": draw(st.sampled_from(CATEGORIES + ["unknown", 1]))}
    for column in COLUMNS:
        if column != "cat" and draw(st.integers(0, 9)) > 0:  # sometimes the column is missing
            row[column] = draw(VALUES)
    return row


def jinja(source, row, variables):
    try:
        return templates._render_jinja(source, row, variables)
    except Exception as exc:  # noqa: BLE001
        return ("error", type(exc).__name__, str(exc))


def fast(render, *args):
    try:
        return render(*args)
    except Exception as exc:  # noqa: BLE001
        return ("error", type(exc).__name__, str(exc))


@settings(max_examples=400, deadline=None)
@given(source=template_sources(), batch=st.lists(rows(), max_size=6))
def test_fast_path_renders_like_jinja(source, batch):
    assert templates._fast_parts(source) is not None, source  # the shape is one the fast path covers
    expected = [jinja(source, row, VARIABLES) for row in batch]
    assert [fast(templates.render, source, row, VARIABLES) for row in batch] == expected
    if all(not isinstance(e, tuple) for e in expected):
        assert templates.render_many(source, batch, VARIABLES) == expected
    else:  # the batch raises the error of its first failing row, as a row-by-row loop would
        first_error = next(e for e in expected if isinstance(e, tuple))
        assert fast(templates.render_many, source, batch, VARIABLES) == first_error


@pytest.mark.parametrize("source", [
    "{% if row.q %}yes{% endif %}", "{{ row.q | upper }}", "{{ row.items() }}", "{{ row.keys }}", "{{ row }}",
    "{{ row[row.cat] }}", "{{ row.q[1:] }}", "{{ row.q + 1 }}", "{% for x in row.n %}{{ x }}{% endfor %}",
    "{{ row.q if row.n }}", "{{ vars }}", "{{ row._private }}",
])
def test_other_templates_take_the_jinja_path(source):
    assert templates._fast_parts(source) is None


def test_the_empty_template_renders_an_empty_string_per_row():
    assert templates.render_many("", [{"q": "x"}, {"q": "y"}], {}) == ["", ""]
    assert templates.render_many("{# only a comment #}", [{"q": "x"}], {}) == [""]


def test_comments_vanish_as_in_jinja():
    assert templates._fast_parts("{# note #}{{ row.q }}") is not None
    assert templates.render_many("{# note #}{{ row.q }}!", [{"q": "x"}], {}) == ["x!"]


def test_escaping_stays_off_and_markup_passes_through():
    row = {"q": "<script>&</script>", "cat": "math"}
    assert templates.render_many("{{ row.q }}|{{ strategies[row.cat] }}", [row], VARIABLES) == \
        ["<script>&</script>|step by step"]


def test_a_missing_column_raises_jinjas_error():
    with pytest.raises(Exception, match="no attribute 'q'"):
        templates.render_many("{{ row.q }}", [{"q": 1}, {"id": 2}], {})
