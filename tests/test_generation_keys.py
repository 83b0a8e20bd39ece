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
