"""Request keys of the ``generate`` op: they differ exactly when the request differs.

A key is the cache and journal address of one answer (``specdsl.contract.hookspecs.request_key`` over
the model identity, the messages and the decoding parameters the op sends). If sampling parameters
dropped out of it, samples of one row would collapse into one cached answer, and a changed seed or
temperature would silently reuse answers made under the old one.

These tests go through ``GenerateOp.requests``, the code that builds the requests a run sends.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from specdsl.contract.ops import RunContext
from specdsl.ops.generate import GenerateOp

IDENTITY = {"backend": "litellm", "model": "openai/some-model", "max_tokens": 64}
ROWS = [{"id": "r1", "question": "What is 7 times 8?"}, {"id": "r2", "question": "Name a prime above 10."}]


def keys(spec_seed: int = 0, **params) -> list[str]:
    """The request keys ``generate`` builds for ROWS with these step params and the spec's seed."""
    services = SimpleNamespace(model_identity=lambda ref: dict(IDENTITY))
    ctx = RunContext(node_id="answers", params={"from": "problems", "model": "teacher",
                                                 "user": "{{ row.question }}", **params},
                     inputs={"from": [dict(r) for r in ROWS]}, vars={}, seed=spec_seed, services=services,
                     artifact_dir=Path("."))
    return [req.key for _, req, _ in GenerateOp().requests(ctx)]


def test_equal_requests_have_equal_keys():
    assert keys(temperature=0.7, seed=3) == keys(temperature=0.7, seed=3)
    assert keys() == keys()
    first, second = keys()
    assert first != second  # different prompts


def test_keys_differ_by_seed_alone():
    for a, b in zip(keys(seed=1), keys(seed=2)):  # the step's seed
        assert a != b
    # The spec's seed stands in when the step sets none: it counts the same way.
    assert set(keys(spec_seed=1)).isdisjoint(keys(spec_seed=2))
    assert keys(spec_seed=5) == keys(seed=5)  # the same seed sent, however it was given


def test_keys_differ_by_temperature_alone():
    for a, b in zip(keys(temperature=0.2), keys(temperature=0.9)):
        assert a != b
    for a, b in zip(keys(), keys(temperature=0.9)):
        assert a != b


def test_keys_differ_by_top_p_and_max_tokens_alone():
    for a, b in zip(keys(top_p=0.5), keys(top_p=0.9)):
        assert a != b
    for a, b in zip(keys(max_tokens=16), keys(max_tokens=32)):
        assert a != b


def test_n_samples_of_one_row_are_n_keys():
    sampled = keys(n=3, temperature=0.8)
    assert len(sampled) == 3 * len(ROWS)
    assert len(set(sampled)) == len(sampled)  # three samples of a row: three requests, three answers
    # Sample 0 is the request a single-sample step sends: n does not change what an answer is.
    assert sampled[0] == keys(temperature=0.8)[0]


# -- request_key itself: the same bytes as the one json.dumps it was written as ------------------------

def reference_request_key(identity, messages, params) -> str:
    """request_key as first written: journals and fingerprints made before its fast path depend on it."""
    import hashlib
    import json

    blob = json.dumps({"identity": identity, "messages": list(messages), "params": params},
                      sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class Text(str):
    """A str subclass (a key must encode it as the str it is)."""


def test_request_key_is_the_reference_hash_for_any_request():
    from hypothesis import given, settings, strategies as st

    from specdsl.contract.hookspecs import request_key, request_keys

    text = st.text(alphabet=st.characters(codec="utf-8"), max_size=12) | st.sampled_from(
        ["", "role", "content", "é", "\u2028", '"\\\n\t', "\x00\x1f", "日本語", "😀"])
    scalar = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | text
    value = st.recursive(scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
                         max_leaves=6)
    plain_message = st.dictionaries(text, text, max_size=4)
    odd_message = st.dictionaries(text, value, max_size=3) | st.dictionaries(
        st.integers(), text, max_size=2) | st.builds(lambda d: {Text(k): v for k, v in d.items()}, plain_message) | \
        st.builds(lambda d: {k: Text(v) for k, v in d.items()}, plain_message)
    messages = st.lists(plain_message | odd_message, max_size=4)
    mapping = st.dictionaries(text, value, max_size=4)

    @settings(max_examples=400, deadline=None)
    @given(identity=mapping, messages=messages, params=mapping, as_tuple=st.booleans())
    def same(identity, messages, params, as_tuple):
        if as_tuple:
            messages = tuple(messages)
        assert request_key(identity, messages, params) == reference_request_key(identity, messages, params)
        assert request_keys(identity, params)(messages) == reference_request_key(identity, messages, params)

    same()


def test_request_key_of_a_usual_request_is_unchanged():
    from specdsl.contract.hookspecs import request_key

    messages = ({"role": "system", "content": "You are a careful assistant."},
                {"role": "user", "content": "Question 7: what is 7 plus 7? «é» \u2028"})
    params = {"max_tokens": 64, "temperature": 0.7, "seed": 3}
    assert request_key(IDENTITY, messages, params) == reference_request_key(IDENTITY, messages, params)
    # Pinned: the key a journal written before holds for this request.
    assert request_key({"backend": "litellm", "model": "m"}, [{"role": "user", "content": "hi"}], {}) == \
        "df2fa3652e3dc0e6611e0565bd6d052089ee8e6640f254b8c448bf6e7bde946f"


def test_one_key_maker_keys_many_requests_as_request_key_does():
    from specdsl.contract.hookspecs import request_key, request_keys

    params = {"max_tokens": 64, "seed": 0}
    key = request_keys(IDENTITY, params)
    batch = [[{"role": "user", "content": f"question {i}"}] for i in range(3)] + \
        [[{"content": "é", "role": "system", "name": "x"}], [{"role": "user", "content": ["a", "part"]}], []]
    for _ in range(2):  # the maker's hash state is copied, never used up
        assert [key(m) for m in batch] == [reference_request_key(IDENTITY, m, params) for m in batch]
    assert key(batch[0]) == request_key(IDENTITY, batch[0], params)


def test_request_key_raises_what_json_raises():
    import pytest

    from specdsl.contract.hookspecs import request_key, request_keys

    for messages in ([{"role": "user", 1: "x"}], [{"role": object()}], [object()]):
        with pytest.raises(TypeError):
            reference_request_key(IDENTITY, messages, {})
        with pytest.raises(TypeError):
            request_key(IDENTITY, messages, {})
        with pytest.raises(TypeError):
            request_keys(IDENTITY, {})(messages)
