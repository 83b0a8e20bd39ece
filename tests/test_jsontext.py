"""specdsl.jsontext writes chat messages as JSON by hand: the same text as the json.dumps call each
function stands for, byte for byte, for any value (request keys, request bodies and stored prompts
depend on it)."""

from __future__ import annotations

import json
from collections import OrderedDict
from types import MappingProxyType

from hypothesis import given, settings, strategies as st

from specdsl.jsontext import json_text, messages_json, messages_key_json


class Text(str):
    """A str subclass (json writes it as the str it is)."""


text = st.text(alphabet=st.characters(codec="utf-8"), max_size=10) | st.sampled_from(
    ["", "role", "content", "é", "\u2028", '"\\\n\t', "\x00\x1f", "日本", "😀"])
plain = st.dictionaries(text, text, max_size=4)
odd = st.dictionaries(text, st.none() | st.integers() | st.floats(allow_nan=False) | st.lists(text, max_size=2),
                      max_size=3) | \
    st.builds(lambda d: {k: Text(v) for k, v in d.items()}, plain) | \
    st.builds(lambda d: {Text(k): v for k, v in d.items()}, plain)
mappings = st.builds(lambda d: OrderedDict(d), plain) | st.builds(lambda d: MappingProxyType(d), plain)


@settings(max_examples=300, deadline=None)
@given(messages=st.lists(plain | odd | mappings, max_size=4), as_tuple=st.booleans())
def test_messages_json_is_json_dumps_of_the_messages(messages, as_tuple):
    expected = json.dumps([dict(m) for m in messages], ensure_ascii=False)
    assert messages_json(tuple(messages) if as_tuple else messages) == expected


@settings(max_examples=300, deadline=None)
@given(messages=st.lists(plain | odd, max_size=4), as_tuple=st.booleans())
def test_messages_key_json_is_sorted_compact_json_dumps(messages, as_tuple):
    expected = json.dumps(list(messages), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    assert messages_key_json(tuple(messages) if as_tuple else messages) == expected


@settings(max_examples=300, deadline=None)
@given(value=st.lists(plain | odd, max_size=4) | st.recursive(
    st.none() | st.booleans() | st.integers() | text, lambda inner: st.lists(inner, max_size=3) |
    st.dictionaries(text, inner, max_size=3), max_leaves=6))
def test_json_text_is_json_dumps(value):
    assert json_text(value) == json.dumps(value, ensure_ascii=False)


def test_what_json_cannot_write_raises_as_json_does():
    import pytest

    for value in ([{"role": object()}], [object()], [{"role": "user", 1: "x"}]):
        with pytest.raises(TypeError):
            json.dumps(value, sort_keys=True)
        with pytest.raises(TypeError):
            messages_key_json(value)
    with pytest.raises(TypeError):
        json_text([{"role": object()}])
